//! kiln's image signatures are OpenSSH signatures, in both directions: a
//! signature kiln makes verifies with `ssh-keygen -Y verify -n kiln`, and
//! one made with `ssh-keygen -Y sign -n kiln` over kiln's payload is
//! accepted by kiln and trusted through the signer's public key. Needs
//! `ssh-keygen` (openssh-client).

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_image::sign::{self, SignError, TrustError};
use kiln_image::store::{Digest, Inputs, Outcome, Store, VersionRecord};

fn record(store: &Store, name: &str) -> VersionRecord {
    let digest = store
        .put_blob(format!("manifest of {name}").as_bytes())
        .unwrap();
    VersionRecord {
        name: name.into(),
        version: 1,
        digest,
        parent: None,
        parent_digest: None,
        created: "2026-11-22T10:00:00Z".into(),
        size: 0,
        outcome: Outcome::Ok,
        error: None,
        seal_root: format!("seal-root-of-{name}"),
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
}

/// `ssh-keygen -t KIND` into `dir/name`; returns the public key line.
fn keygen(dir: &Path, name: &str, kind: &[&str]) -> String {
    let st = Command::new("ssh-keygen")
        .args(kind)
        .args(["-N", "", "-q", "-C", &format!("{name}@ops"), "-f"])
        .arg(dir.join(name))
        .status()
        .expect("ssh-keygen (openssh-client) is installed");
    assert!(st.success());
    fs::read_to_string(dir.join(format!("{name}.pub")))
        .unwrap()
        .trim()
        .to_string()
}

/// `ssh-keygen -Y verify` of `sig` over `payload` for `principal` with `pubkey`.
fn ssh_verify(
    dir: &Path,
    principal: &str,
    pubkey: &str,
    payload: &[u8],
    sig: &str,
) -> (bool, String) {
    let signers = dir.join("allowed_signers");
    fs::write(&signers, format!("{principal} {pubkey}\n")).unwrap();
    let sig_path = dir.join("kiln.sig");
    fs::write(&sig_path, sig).unwrap();
    let mut child = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-n", "kiln", "-I", principal, "-f"])
        .arg(&signers)
        .arg("-s")
        .arg(&sig_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `ssh-keygen -Y sign -n kiln` of `payload` with the key at `key`.
fn ssh_sign(dir: &Path, key: &Path, payload: &[u8]) -> String {
    let msg = dir.join("payload");
    fs::write(&msg, payload).unwrap();
    let _ = fs::remove_file(dir.join("payload.sig"));
    let out = Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", "kiln", "-q", "-f"])
        .arg(key)
        .arg(&msg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::read_to_string(dir.join("payload.sig")).unwrap()
}

#[test]
fn kiln_signatures_verify_with_ssh_keygen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join(".kiln")).unwrap();
    let app = record(&store, "app");
    // kiln signs with Ed25519 and ECDSA keys (RSA keys sign through
    // `--payload` and ssh-keygen; kiln verifies RSA signatures, below).
    for (name, kind) in [
        ("ed", vec!["-t", "ed25519"]),
        ("ec", vec!["-t", "ecdsa", "-b", "256"]),
    ] {
        let public = keygen(dir.path(), name, &kind);
        let signed = sign::sign(&store, &app, &dir.path().join(name)).unwrap();
        let (ok, out) = ssh_verify(
            dir.path(),
            &format!("{name}@ops"),
            &public,
            &sign::payload(&app),
            &signed.armored,
        );
        assert!(ok, "{name}: {out}");
        assert!(
            out.contains(&format!("Good \"kiln\" signature for {name}@ops")),
            "{out}"
        );
        // Over another image's payload, ssh-keygen refuses it too.
        let other = record(&store, "other");
        let (ok, _) = ssh_verify(
            dir.path(),
            &format!("{name}@ops"),
            &public,
            &sign::payload(&other),
            &signed.armored,
        );
        assert!(!ok, "{name}: a signature verified over another payload");
        // And kiln trusts it through the same public key line.
        let who = sign::verify_signature(&store, &app, std::slice::from_ref(&public)).unwrap();
        assert_eq!(who.comment, format!("{name}@ops"));
    }
}

#[test]
fn ssh_keygen_signatures_are_accepted_and_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join(".kiln")).unwrap();
    let app = record(&store, "app");
    let evil = record(&store, "evil");
    let alice = keygen(dir.path(), "alice", &["-t", "ed25519"]);
    let bob = keygen(dir.path(), "bob", &["-t", "rsa", "-b", "3072"]);
    match sign::verify_signature(&store, &app, std::slice::from_ref(&alice)) {
        Err(TrustError::Unsigned { .. }) => {}
        other => panic!("unsigned image trusted: {other:?}"),
    }
    let sig = ssh_sign(dir.path(), &dir.path().join("alice"), &sign::payload(&app));
    assert!(sig.starts_with("-----BEGIN SSH SIGNATURE-----"));
    let attached = sign::attach(&store, &app, &sig).unwrap();
    assert_eq!(
        attached.signer.fingerprint,
        {
            let out = Command::new("ssh-keygen")
                .arg("-lf")
                .arg(dir.path().join("alice.pub"))
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .nth(1)
                .unwrap()
                .to_string()
        },
        "kiln and ssh-keygen agree on the fingerprint"
    );
    assert_eq!(
        sign::verify_signature(&store, &app, &[bob.clone(), alice.clone()])
            .unwrap()
            .comment,
        "alice@ops"
    );
    match sign::verify_signature(&store, &app, std::slice::from_ref(&bob)) {
        Err(TrustError::Untrusted { found, .. }) => {
            assert!(found.starts_with("SHA256:"), "{found}")
        }
        other => panic!("{other:?}"),
    }
    // RSA from ssh-keygen (rsa-sha2-512) too.
    let sig = ssh_sign(dir.path(), &dir.path().join("bob"), &sign::payload(&app));
    sign::attach(&store, &app, &sig).unwrap();
    assert_eq!(
        sign::verify_signature(&store, &app, &[bob])
            .unwrap()
            .comment,
        "bob@ops"
    );
    // A signature made over another digest is refused.
    let wrong = ssh_sign(dir.path(), &dir.path().join("alice"), &sign::payload(&app));
    match sign::attach(&store, &evil, &wrong) {
        Err(SignError::Mismatch { image, .. }) => assert_eq!(image, "evil"),
        other => panic!("{other:?}"),
    }
    // Another namespace is refused with the reason.
    let msg = dir.path().join("payload");
    fs::write(&msg, sign::payload(&app)).unwrap();
    let _ = fs::remove_file(dir.path().join("payload.sig"));
    let st = Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", "git", "-q", "-f"])
        .arg(dir.path().join("alice"))
        .arg(&msg)
        .status()
        .unwrap();
    assert!(st.success());
    let git = fs::read_to_string(dir.path().join("payload.sig")).unwrap();
    match sign::attach(&store, &app, &git) {
        Err(SignError::Namespace { found }) => assert_eq!(found, "git"),
        other => panic!("{other:?}"),
    }
}
