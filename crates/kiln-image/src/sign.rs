//! Image signatures: SSH signatures (the format of `ssh-keygen -Y sign -n
//! kiln`, made and checked with the `ssh-key` crate's `SshSig`) over a
//! version's manifest digest and seal root, stored as OCI artifacts whose
//! subject is the image manifest.
//!
//! What is signed is [`payload`]: a few lines naming the image, its
//! manifest digest and its seal root, so a signature is worth exactly one
//! image. `kiln image sign --payload` prints it, so a key kiln cannot read
//! (passphrase, agent, hardware) signs with `ssh-keygen -Y sign -n kiln`,
//! and `kiln image sign --signature FILE` attaches the result.
//!
//! [`verify_signature`] is what an environment with `trust = { signers }`
//! asks before it plans or launches a version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;
use ssh_key::{HashAlg, LineEnding, PrivateKey, PublicKey, SshSig};

use crate::error::ImageError;
use crate::store::{Digest, Referrer, Store, VersionRecord};

/// The artifact type (and layer media type) of an SSH signature.
pub const ARTIFACT_TYPE: &str = "application/vnd.dev.kiln.signature.v1+sshsig";

/// The SSH signature namespace (`ssh-keygen -Y sign -n kiln`).
pub const NAMESPACE: &str = "kiln";

/// The exact bytes signed for a version.
pub fn payload(record: &VersionRecord) -> Vec<u8> {
    format!(
        "kiln image signature v1\nimage {}\nmanifest {}\nseal {}\n",
        record.name, record.digest, record.seal_root
    )
    .into_bytes()
}

/// A key that signed an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Signer {
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// The public key in OpenSSH format (with its comment, if the signer had one).
    pub key: String,
    pub comment: String,
}

impl Signer {
    fn of(key: &PublicKey) -> Signer {
        Signer {
            fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
            key: key.to_openssh().unwrap_or_default(),
            comment: key.comment().to_string(),
        }
    }
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.comment.is_empty() {
            f.write_str(&self.fingerprint)
        } else {
            write!(f, "{} ({})", self.fingerprint, self.comment)
        }
    }
}

/// A stored signature of a version.
#[derive(Debug, Clone, Serialize)]
pub struct Signature {
    pub signer: Signer,
    /// The armored signature (`-----BEGIN SSH SIGNATURE-----`).
    pub armored: String,
    pub artifact: Digest,
}

/// Why an image could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The private key file cannot be read or is not an OpenSSH private key.
    #[error("cannot read the SSH private key {}", path.display())]
    Key {
        path: PathBuf,
        source: ssh_key::Error,
    },
    /// The private key is encrypted; kiln does not prompt.
    #[error("the SSH key {} is protected by a passphrase; sign with ssh-keygen instead: `kiln image sign IMAGE --payload | ssh-keygen -Y sign -n kiln -f KEY > sig` then `kiln image sign IMAGE --signature sig`", path.display())]
    Encrypted { path: PathBuf },
    /// kiln signs with Ed25519 and ECDSA keys only.
    #[error("kiln cannot sign with the RSA key {}; sign with ssh-keygen instead: `kiln image sign IMAGE --payload | ssh-keygen -Y sign -n kiln -f KEY > sig` then `kiln image sign IMAGE --signature sig`", path.display())]
    Unsupported { path: PathBuf },
    /// Signing failed in the crypto layer.
    #[error("cannot sign with {}", path.display())]
    Sign {
        path: PathBuf,
        source: ssh_key::Error,
    },
    /// A signature to attach is not an SSH signature.
    #[error("not an SSH signature (expected -----BEGIN SSH SIGNATURE-----)")]
    Malformed { source: ssh_key::Error },
    /// A signature to attach is for another namespace.
    #[error("the signature is for namespace `{found}`; sign with `ssh-keygen -Y sign -n kiln`")]
    Namespace { found: String },
    /// A signature to attach does not verify over this version's payload.
    #[error("the signature does not verify over {image}@{version} ({digest}); was it made over another image's payload?")]
    Mismatch {
        image: String,
        version: u32,
        digest: Digest,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] ImageError),
}

/// Why a version is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The version has no signature at all.
    #[error(
        "image {image} ({digest}) is not signed; sign it with `kiln image sign {image} --key KEY`"
    )]
    Unsigned { image: String, digest: Digest },
    /// Signed, but by nobody the environment trusts.
    #[error(
        "image {image} ({digest}) is signed only by keys this environment does not trust: {found}"
    )]
    Untrusted {
        image: String,
        digest: Digest,
        /// The signers found, comma-separated.
        found: String,
    },
    /// A trusted key's signature does not verify over this version (made
    /// over another digest, or altered).
    #[error("image {image} ({digest}) has a signature by {signer} that does not verify over its manifest and seal: {reason}")]
    Invalid {
        image: String,
        digest: Digest,
        signer: String,
        reason: String,
    },
    /// A configured signer is not an OpenSSH public key.
    #[error("trusted signer `{key}` is not an OpenSSH public key: {reason}")]
    BadSigner { key: String, reason: String },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] ImageError),
}

/// Signs a version with the OpenSSH private key at `key` and stores the
/// signature. Callers hold the store lock.
pub fn sign(store: &Store, record: &VersionRecord, key: &Path) -> Result<Signature, SignError> {
    let private = PrivateKey::read_openssh_file(key).map_err(|source| SignError::Key {
        path: key.to_path_buf(),
        source,
    })?;
    if private.is_encrypted() {
        return Err(SignError::Encrypted {
            path: key.to_path_buf(),
        });
    }
    if matches!(private.algorithm(), ssh_key::Algorithm::Rsa { .. }) {
        return Err(SignError::Unsupported {
            path: key.to_path_buf(),
        });
    }
    let sig = private
        .sign(NAMESPACE, HashAlg::Sha512, &payload(record))
        .map_err(|source| SignError::Sign {
            path: key.to_path_buf(),
            source,
        })?;
    let armored = sig
        .to_pem(LineEnding::LF)
        .map_err(|source| SignError::Sign {
            path: key.to_path_buf(),
            source,
        })?;
    store_signature(store, record, armored, private.public_key().clone())
}

/// Attaches a signature made elsewhere (`ssh-keygen -Y sign -n kiln`)
/// after checking that it verifies over this version's payload. Callers
/// hold the store lock.
pub fn attach(
    store: &Store,
    record: &VersionRecord,
    armored: &str,
) -> Result<Signature, SignError> {
    let sig = SshSig::from_pem(armored.trim()).map_err(|source| SignError::Malformed { source })?;
    if sig.namespace() != NAMESPACE {
        return Err(SignError::Namespace {
            found: sig.namespace().to_string(),
        });
    }
    let key = PublicKey::from(sig.public_key().clone());
    if key.verify(NAMESPACE, &payload(record), &sig).is_err() {
        return Err(SignError::Mismatch {
            image: record.name.clone(),
            version: record.version,
            digest: record.digest.clone(),
        });
    }
    let armored = sig
        .to_pem(LineEnding::LF)
        .map_err(|source| SignError::Malformed { source })?;
    store_signature(store, record, armored, key)
}

fn store_signature(
    store: &Store,
    record: &VersionRecord,
    armored: String,
    key: PublicKey,
) -> Result<Signature, SignError> {
    let signer = Signer::of(&key);
    let annotations = BTreeMap::from([
        ("dev.kiln.image".to_string(), record.name.clone()),
        ("dev.kiln.signer".to_string(), signer.fingerprint.clone()),
    ]);
    let Referrer { digest, .. } = store.put_artifact(
        &record.digest,
        ARTIFACT_TYPE,
        armored.as_bytes(),
        annotations,
    )?;
    Ok(Signature {
        signer,
        armored,
        artifact: digest,
    })
}

/// Every stored signature of a version (unverified), oldest first.
pub fn signatures(store: &Store, record: &VersionRecord) -> Result<Vec<Signature>, ImageError> {
    let mut out = Vec::new();
    for r in store.referrers(&record.digest)? {
        if r.artifact_type != ARTIFACT_TYPE {
            continue;
        }
        let bytes = store.read_blob(&r.payload)?;
        let armored = String::from_utf8_lossy(&bytes).into_owned();
        let Ok(sig) = SshSig::from_pem(armored.trim()) else {
            continue;
        };
        out.push(Signature {
            signer: Signer::of(&PublicKey::from(sig.public_key().clone())),
            armored,
            artifact: r.digest,
        });
    }
    Ok(out)
}

/// Checks that `record` carries a valid signature by one of `signers`
/// (OpenSSH public keys, as in `trust = { signers = [...] }`); returns
/// that signer. Untrusted and invalid signatures of other keys are
/// ignored when a trusted one verifies.
pub fn verify_signature(
    store: &Store,
    record: &VersionRecord,
    signers: &[String],
) -> Result<Signer, TrustError> {
    let trusted: Vec<PublicKey> = signers
        .iter()
        .map(|k| {
            PublicKey::from_openssh(k.trim()).map_err(|e| TrustError::BadSigner {
                key: k.clone(),
                reason: e.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    let image = format!("{}@{}", record.name, record.version);
    let message = payload(record);
    let mut found = Vec::new();
    let mut invalid = None;
    for s in signatures(store, record)? {
        let Ok(sig) = SshSig::from_pem(s.armored.trim()) else {
            continue;
        };
        let Some(key) = trusted.iter().find(|k| k.key_data() == sig.public_key()) else {
            found.push(s.signer.to_string());
            continue;
        };
        let checked = if sig.namespace() != NAMESPACE {
            Err(format!(
                "namespace is `{}`, not `{NAMESPACE}`",
                sig.namespace()
            ))
        } else {
            key.verify(NAMESPACE, &message, &sig)
                .map_err(|e| e.to_string())
        };
        match checked {
            Ok(()) => {
                let mut signer = Signer::of(key);
                if signer.comment.is_empty() {
                    signer.comment = s.signer.comment;
                }
                return Ok(signer);
            }
            Err(reason) => {
                invalid.get_or_insert((Signer::of(key).to_string(), reason));
            }
        }
    }
    if let Some((signer, reason)) = invalid {
        return Err(TrustError::Invalid {
            image,
            digest: record.digest.clone(),
            signer,
            reason,
        });
    }
    if found.is_empty() {
        return Err(TrustError::Unsigned {
            image,
            digest: record.digest.clone(),
        });
    }
    Err(TrustError::Untrusted {
        image,
        digest: record.digest.clone(),
        found: found.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Inputs, Outcome};

    /// A store holding two versions' manifests.
    fn store_with(names: &[&str]) -> (tempfile::TempDir, Store, Vec<VersionRecord>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join(".kiln")).unwrap();
        let recs = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let digest = store
                    .put_blob(format!("manifest of {n}").as_bytes())
                    .unwrap();
                VersionRecord {
                    name: n.to_string(),
                    version: i as u32 + 1,
                    digest,
                    parent: None,
                    parent_digest: None,
                    created: "2026-11-22T00:00:00Z".into(),
                    size: 0,
                    outcome: Outcome::Ok,
                    error: None,
                    seal_root: format!("root-{n}"),
                    seal: Digest::of(b"seal"),
                    config: Digest::of(b"config"),
                    layers: vec![],
                    inputs: Inputs {
                        source: "scratch".into(),
                        files: vec![],
                        scripts: vec![],
                        tests: 0,
                        cache_key: String::new(),
                    },
                    build_ms: 0,
                    user: None,
                }
            })
            .collect();
        (dir, store, recs)
    }

    fn keypair(dir: &Path, name: &str) -> (PathBuf, String) {
        let key = PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap();
        let mut key = key;
        key.set_comment(format!("{name}@ops"));
        let path = dir.join(name);
        key.write_openssh_file(&path, LineEnding::LF).unwrap();
        (path, key.public_key().to_openssh().unwrap())
    }

    #[test]
    fn signed_by_a_trusted_key_verifies() {
        let (dir, store, recs) = store_with(&["app"]);
        let (alice, alice_pub) = keypair(dir.path(), "alice");
        let (_, bob_pub) = keypair(dir.path(), "bob");
        let app = &recs[0];
        match verify_signature(&store, app, std::slice::from_ref(&alice_pub)) {
            Err(TrustError::Unsigned { image, .. }) => assert_eq!(image, "app@1"),
            other => panic!("{other:?}"),
        }
        let s = sign(&store, app, &alice).unwrap();
        assert!(s.armored.starts_with("-----BEGIN SSH SIGNATURE-----"));
        let who = verify_signature(&store, app, &[bob_pub.clone(), alice_pub]).unwrap();
        assert_eq!(who.comment, "alice@ops");
        assert!(who.fingerprint.starts_with("SHA256:"));
        let e = verify_signature(&store, app, &[bob_pub])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("image app@1 (sha256:")
                && e.ends_with(&format!(
                    "is signed only by keys this environment does not trust: {}",
                    who.fingerprint
                )),
            "{e}"
        );
        // Signing twice stores one signature.
        sign(&store, app, &alice).unwrap();
        assert_eq!(
            signatures(&store, app).unwrap().len(),
            1,
            "Ed25519 signatures are deterministic"
        );
    }

    #[test]
    fn a_signature_over_another_digest_is_refused() {
        let (dir, store, recs) = store_with(&["app", "evil"]);
        let (alice, alice_pub) = keypair(dir.path(), "alice");
        let good = sign(&store, &recs[0], &alice).unwrap();
        // Attaching app's signature to another image fails up front...
        match attach(&store, &recs[1], &good.armored) {
            Err(SignError::Mismatch { image, .. }) => assert_eq!(image, "evil"),
            other => panic!("{other:?}"),
        }
        // ...and one smuggled into the store does not verify.
        store
            .put_artifact(
                &recs[1].digest,
                ARTIFACT_TYPE,
                good.armored.as_bytes(),
                BTreeMap::new(),
            )
            .unwrap();
        match verify_signature(&store, &recs[1], &[alice_pub]) {
            Err(TrustError::Invalid { image, signer, .. }) => {
                assert_eq!(image, "evil@2");
                assert!(signer.contains("alice@ops"), "{signer}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            attach(&store, &recs[0], "garbage"),
            Err(SignError::Malformed { .. })
        ));
        match verify_signature(&store, &recs[0], &["ssh-ed25519 nope".into()]) {
            Err(TrustError::BadSigner { key, .. }) => assert_eq!(key, "ssh-ed25519 nope"),
            other => panic!("{other:?}"),
        }
    }
}
