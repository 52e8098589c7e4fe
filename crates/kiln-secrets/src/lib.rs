//! Secrets of a kiln project: values encrypted with age to an
//! environment's recipients, one file per secret, safe to commit (like
//! sops), never in an image, the store, a plan or a log.
//!
//! ```text
//! secrets/<env>/<name>.age             the value, age-encrypted to the env's recipients
//! secrets/<env>/.fingerprint-key.age   32 random bytes, age-encrypted likewise
//! ```
//!
//! - **Identity**: decryption needs an age X25519 identity, from
//!   `$KILN_AGE_IDENTITY`: either the key itself (`AGE-SECRET-KEY-1...`) or
//!   the path of an identity file (as `age-keygen` writes it: `#` comments
//!   and one key per line). Encryption needs only the recipients.
//! - **Fingerprints** are keyed BLAKE3 hashes of a value, keyed with the
//!   environment's fingerprint key: they change when the value changes
//!   (so a role's spec hash can include them) and say nothing about the
//!   value to whoever lacks an identity, even for short passwords.
//! - [`SecretValue`] never prints its bytes (`Debug` is redacted) and is
//!   zeroed when dropped; no error message contains a value.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use zeroize::Zeroizing;

/// The environment variable holding the identity (a key or a path).
pub const IDENTITY_ENV: &str = "KILN_AGE_IDENTITY";

/// Where secrets live in a project.
pub const DIR: &str = "secrets";

const KEY_FILE: &str = ".fingerprint-key.age";

/// Why a secret operation failed. Messages never contain a secret value
/// or key.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// No identity was given.
    #[error("no age identity: set ${IDENTITY_ENV} to an identity file's path or to the key itself (AGE-SECRET-KEY-1...)")]
    NoIdentity,
    /// The identity (file or key) is unusable. `origin` is the path or
    /// "the key in $KILN_AGE_IDENTITY", never the key.
    #[error("age identity from {origin} is unusable: {reason}")]
    BadIdentity { origin: String, reason: String },
    /// A recipient is not an age X25519 recipient.
    #[error("`{recipient}` is not an age recipient: {reason}")]
    BadRecipient { recipient: String, reason: String },
    /// The environment declares no recipients.
    #[error("environment `{env}` declares no `secrets = {{ recipients = [...] }}`")]
    NoRecipients { env: String },
    /// A secret name that cannot be a file name.
    #[error("secret name `{name}` is invalid; expected letters, digits, `_`, `-` or `.`, starting with a letter or digit")]
    BadName { name: String },
    /// The secret was never set.
    #[error("secret `{name}` of `{env}` is not set ({} is missing); set it with `kiln secret set {env} {name}`", path.display())]
    NotSet {
        env: String,
        name: String,
        path: PathBuf,
    },
    /// The file is not encrypted to any key of the identity.
    #[error("cannot decrypt {}: it is not encrypted to this identity ({recipients}); either ${IDENTITY_ENV} is the wrong identity or the file was encrypted to other recipients (set it again with `kiln secret set`)", path.display())]
    NotForThisIdentity {
        path: PathBuf,
        /// The identity's public recipients, comma-separated.
        recipients: String,
    },
    /// The file is not an age file, or is damaged.
    #[error("{} is not a readable age file: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// An empty value.
    #[error("the value of secret `{name}` is empty")]
    Empty { name: String },
    /// A file operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

pub type Result<T, E = SecretError> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SecretError + 'a {
    move |source| SecretError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A decrypted value. Not `Display`; `Debug` is redacted; zeroed on drop.
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> SecretValue {
        SecretValue(Zeroizing::new(bytes))
    }
    /// The bytes. Whoever calls this is responsible for where they go.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretValue([redacted, {} bytes])", self.0.len())
    }
}

/// One or more age X25519 identities.
pub struct Identity {
    keys: Vec<age::x25519::Identity>,
    /// The path it came from, or "the key in $KILN_AGE_IDENTITY".
    pub origin: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({}, {} keys)", self.origin, self.keys.len())
    }
}

impl Identity {
    /// The identity of `$KILN_AGE_IDENTITY`, if set (and not empty).
    pub fn from_env() -> Result<Option<Identity>> {
        match std::env::var(IDENTITY_ENV) {
            Ok(v) if !v.trim().is_empty() => Identity::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// The identity of `$KILN_AGE_IDENTITY`, or `NoIdentity`.
    pub fn required() -> Result<Identity> {
        Identity::from_env()?.ok_or(SecretError::NoIdentity)
    }

    /// `AGE-SECRET-KEY-1...` itself, or the path of an identity file.
    pub fn parse(spec: &str) -> Result<Identity> {
        let spec = spec.trim();
        if spec.starts_with("AGE-SECRET-KEY-") {
            return Identity::from_text(spec, format!("the key in ${IDENTITY_ENV}"));
        }
        let path = Path::new(spec);
        let text =
            Zeroizing::new(
                fs::read_to_string(path).map_err(|e| SecretError::BadIdentity {
                    origin: path.display().to_string(),
                    reason: format!("cannot read it: {e}"),
                })?,
            );
        Identity::from_text(&text, path.display().to_string())
    }

    /// Keys from identity-file text: `#` comments, one key per line.
    pub fn from_text(text: &str, origin: String) -> Result<Identity> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match age::x25519::Identity::from_str(line) {
                Ok(k) => keys.push(k),
                Err(_) => {
                    return Err(SecretError::BadIdentity {
                        origin,
                        reason: format!(
                            "line {} is not an age X25519 secret key (AGE-SECRET-KEY-1...)",
                            i + 1
                        ),
                    })
                }
            }
        }
        if keys.is_empty() {
            return Err(SecretError::BadIdentity {
                origin,
                reason: "it holds no key".into(),
            });
        }
        Ok(Identity { keys, origin })
    }

    /// A new random identity (for tests and `kiln init`-like tooling).
    pub fn generate() -> Identity {
        Identity {
            keys: vec![age::x25519::Identity::generate()],
            origin: "a generated key".into(),
        }
    }

    /// The key as identity-file text (one line). Treat it as a secret.
    pub fn to_secret_string(&self) -> Zeroizing<String> {
        use age::secrecy::ExposeSecret;
        Zeroizing::new(
            self.keys
                .iter()
                .map(|k| k.to_string().expose_secret().to_string())
                .collect::<Vec<_>>()
                .join("\n"),
        )
    }

    /// The public recipients (`age1...`) of its keys.
    pub fn recipients(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.to_public().to_string())
            .collect()
    }

    fn decrypt(&self, path: &Path, bytes: &[u8]) -> Result<SecretValue> {
        let corrupt = |reason: String| SecretError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let decryptor = age::Decryptor::new(bytes).map_err(|e| corrupt(e.to_string()))?;
        let mut reader = decryptor
            .decrypt(self.keys.iter().map(|k| k as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => SecretError::NotForThisIdentity {
                    path: path.to_path_buf(),
                    recipients: self.recipients().join(", "),
                },
                e => corrupt(e.to_string()),
            })?;
        let mut out = Zeroizing::new(Vec::new());
        reader
            .read_to_end(&mut out)
            .map_err(|e| corrupt(e.to_string()))?;
        Ok(SecretValue(out))
    }
}

/// Checks a secret's name (it is a file name here and in `/run/secrets`).
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SecretError::BadName { name: name.into() })
    }
}

/// `secrets/ENV/NAME.age` under the project.
pub fn path(project_dir: &Path, env: &str, name: &str) -> PathBuf {
    project_dir.join(DIR).join(env).join(format!("{name}.age"))
}

fn parse_recipients(recipients: &[String]) -> Result<Vec<age::x25519::Recipient>> {
    recipients
        .iter()
        .map(|r| {
            age::x25519::Recipient::from_str(r.trim()).map_err(|e| SecretError::BadRecipient {
                recipient: r.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

fn encrypt(recipients: &[age::x25519::Recipient], value: &[u8]) -> Result<Vec<u8>> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| SecretError::BadRecipient {
                recipient: String::new(),
                reason: e.to_string(),
            })?;
    let mut out = Vec::new();
    let mut w = encryptor
        .wrap_output(&mut out)
        .map_err(io_err("encrypt", Path::new("-")))?;
    w.write_all(value)
        .map_err(io_err("encrypt", Path::new("-")))?;
    w.finish().map_err(io_err("encrypt", Path::new("-")))?;
    Ok(out)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let mut f = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename into", path))
}

/// Encrypts `value` to `recipients` into `secrets/ENV/NAME.age` (and
/// creates the environment's fingerprint key if it has none). Needs no
/// identity. Returns the file written.
pub fn set(
    project_dir: &Path,
    env: &str,
    name: &str,
    value: &[u8],
    recipients: &[String],
) -> Result<PathBuf> {
    check_name(name)?;
    if recipients.is_empty() {
        return Err(SecretError::NoRecipients { env: env.into() });
    }
    if value.is_empty() {
        return Err(SecretError::Empty { name: name.into() });
    }
    let parsed = parse_recipients(recipients)?;
    let key_path = project_dir.join(DIR).join(env).join(KEY_FILE);
    if !key_path.exists() {
        let mut key = Zeroizing::new([0u8; 32]);
        getrandom(&mut key[..]).map_err(io_err("read random bytes for", &key_path))?;
        write_atomic(&key_path, &encrypt(&parsed, &key[..])?)?;
    }
    let p = path(project_dir, env, name);
    write_atomic(&p, &encrypt(&parsed, value)?)?;
    Ok(p)
}

fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Names of the secrets set for an environment, sorted.
pub fn names(project_dir: &Path, env: &str) -> Result<Vec<String>> {
    let dir = project_dir.join(DIR).join(env);
    let mut out = Vec::new();
    let items = match fs::read_dir(&dir) {
        Ok(i) => i,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err("read directory", &dir)(e)),
    };
    for item in items {
        let item = item.map_err(io_err("read directory", &dir))?;
        let file = item.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".age") {
            if check_name(name).is_ok() {
                out.push(name.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Environments with a secrets directory, sorted.
pub fn envs(project_dir: &Path) -> Result<Vec<String>> {
    let dir = project_dir.join(DIR);
    let mut out = Vec::new();
    let Ok(items) = fs::read_dir(&dir) else {
        return Ok(out);
    };
    for item in items {
        let item = item.map_err(io_err("read directory", &dir))?;
        if item.path().is_dir() {
            out.push(item.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Decrypts `secrets/ENV/NAME.age` with `identity`.
pub fn decrypt(
    project_dir: &Path,
    env: &str,
    name: &str,
    identity: &Identity,
) -> Result<SecretValue> {
    check_name(name)?;
    let p = path(project_dir, env, name);
    let bytes = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SecretError::NotSet {
                env: env.into(),
                name: name.into(),
                path: p,
            })
        }
        Err(e) => return Err(io_err("read", &p)(e)),
    };
    identity.decrypt(&p, &bytes)
}

/// The key fingerprints of an environment are made with.
pub struct FingerprintKey(Zeroizing<[u8; 32]>);

impl FingerprintKey {
    /// Decrypts the environment's fingerprint key.
    pub fn load(project_dir: &Path, env: &str, identity: &Identity) -> Result<FingerprintKey> {
        let p = project_dir.join(DIR).join(env).join(KEY_FILE);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SecretError::Corrupt {
                    path: p,
                    reason:
                        "missing; it is written by the first `kiln secret set` of the environment"
                            .into(),
                })
            }
            Err(e) => return Err(io_err("read", &p)(e)),
        };
        let v = identity.decrypt(&p, &bytes)?;
        let key: [u8; 32] = v.expose().try_into().map_err(|_| SecretError::Corrupt {
            path: p.clone(),
            reason: "not a 32-byte key".into(),
        })?;
        Ok(FingerprintKey(Zeroizing::new(key)))
    }

    /// A key from bytes (tests, benchmarks).
    pub fn from_bytes(key: [u8; 32]) -> FingerprintKey {
        FingerprintKey(Zeroizing::new(key))
    }

    /// `b3k:` and 24 hex digits of the keyed BLAKE3 hash of `value`.
    pub fn fingerprint(&self, value: &SecretValue) -> String {
        let h = blake3::keyed_hash(&self.0, value.expose());
        format!("b3k:{}", &h.to_hex()[..24])
    }
}

/// The fingerprint of one secret: changes exactly when its value does.
pub fn fingerprint(
    project_dir: &Path,
    env: &str,
    name: &str,
    identity: &Identity,
) -> Result<String> {
    let key = FingerprintKey::load(project_dir, env, identity)?;
    Ok(key.fingerprint(&decrypt(project_dir, env, name, identity)?))
}

/// Fingerprints of the named secrets of an environment (a role's
/// `secrets`), by name: what a role's spec hash includes.
pub fn fingerprints(
    project_dir: &Path,
    env: &str,
    names: &[String],
    identity: &Identity,
) -> Result<std::collections::BTreeMap<String, String>> {
    if names.is_empty() {
        return Ok(Default::default());
    }
    let key = FingerprintKey::load(project_dir, env, identity)?;
    names
        .iter()
        .map(|n| {
            Ok((
                n.clone(),
                key.fingerprint(&decrypt(project_dir, env, n, identity)?),
            ))
        })
        .collect()
}

/// Every secret of every environment of the project, decrypted, as
/// (`ENV/NAME`, value): what a bake searches images for.
pub fn all_values(project_dir: &Path, identity: &Identity) -> Result<Vec<(String, SecretValue)>> {
    let mut out = Vec::new();
    for env in envs(project_dir)? {
        for name in names(project_dir, &env)? {
            out.push((
                format!("{env}/{name}"),
                decrypt(project_dir, &env, &name, identity)?,
            ));
        }
    }
    Ok(out)
}

/// Whether the project has any secret at all.
pub fn any(project_dir: &Path) -> Result<bool> {
    for env in envs(project_dir)? {
        if !names(project_dir, &env)?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests;
