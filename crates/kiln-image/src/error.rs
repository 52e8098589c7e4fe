//! The one error type of the image layer. Each variant's message is what a
//! user reads; `Display` never repeats the source, which callers print as
//! the rest of the chain.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O operation on a path failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A JSON document in the store or an OCI layout is unreadable.
    #[error("cannot parse {}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The project declares no such image.
    #[error("unknown image `{0}`")]
    UnknownImage(String),
    /// The store has no such version of an image.
    #[error("image `{name}` has no version {version}")]
    UnknownVersion { name: String, version: u32 },
    /// The image was never built successfully.
    #[error("image `{0}` has no current version; run `kiln image build {0}`")]
    NotBuilt(String),
    /// An archive entry tries to leave the root or is not allowed.
    #[error("refused {archive}: entry `{entry}` {reason}")]
    Hostile {
        archive: String,
        entry: String,
        reason: String,
    },
    /// A build script failed inside the sandbox.
    #[error(
        "script {script} of image `{image}` exited with status {status}; last output:\n{tail}"
    )]
    ScriptFailed {
        image: String,
        script: String,
        status: i32,
        tail: String,
    },
    /// A build script ran past the image's `timeout` and was killed.
    #[error("script {script} of image `{image}` timed out after {secs}s and was killed (raise `timeout` in kiln.toml if it needs longer); last output:\n{tail}")]
    ScriptTimedOut {
        image: String,
        script: String,
        secs: u64,
        tail: String,
    },
    /// An image test ran past the image's test timeout and was killed.
    #[error("test {command:?} of image `{image}` timed out after {secs}s and was killed; output:\n{output}")]
    TestTimedOut {
        image: String,
        command: Vec<String>,
        secs: u64,
        output: String,
    },
    /// The image's `user` does not resolve in its own passwd and group files.
    #[error("image `{image}` cannot run as user `{user}`")]
    User {
        image: String,
        user: String,
        source: crate::user::UserError,
    },
    /// An import expanded past its size cap; nothing of it was kept.
    #[error("refused {archive}: it expands past the import limit of {} (`import_limit` in kiln.toml)", human(*.limit))]
    ImportTooLarge { archive: String, limit: u64 },
    /// A tree holds a path too long for kiln to handle safely.
    #[error("{}/{}… is a path longer than {limit} bytes; image roots may not hold paths that long", root.display(), path)]
    PathTooLong {
        root: PathBuf,
        /// The start of the offending path.
        path: String,
        limit: usize,
    },
    /// An image test failed in the sealed image.
    #[error("test {command:?} of image `{image}` exited with status {status}; output:\n{output}")]
    TestFailed {
        image: String,
        command: Vec<String>,
        status: i32,
        output: String,
    },
    /// A sandbox could not be started or waited for.
    #[error("sandbox for {what} failed")]
    Sandbox {
        what: String,
        source: kiln_sandbox::SandboxError,
    },
    /// `debootstrap` failed or is missing.
    #[error("debootstrap of {suite} from {mirror} failed: {detail}")]
    Debootstrap {
        suite: String,
        mirror: String,
        detail: String,
    },
    /// An OCI image layout could not be used as a base.
    #[error("OCI layout {}: {reason}", dir.display())]
    Oci { dir: PathBuf, reason: String },
    /// The store holds something it should not.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// OSV advisories could not be read.
    #[error("advisories from {origin}: {reason}")]
    Advisories { origin: String, reason: String },
    /// An advisory URL could not be fetched and nothing is cached.
    #[error("cannot fetch advisories from {url} ({reason}) and there is no cached copy; check the URL or point `vulnerabilities.osv` at a local copy")]
    AdvisoriesUnreachable { url: String, reason: String },
    /// A version has findings at or above its gate's `fail_on`.
    #[error("image `{image}` v{version} fails its vulnerability gate (fail_on = \"{fail_on}\"); {kept}:\n{findings}")]
    Vulnerable {
        image: String,
        version: u32,
        fail_on: String,
        /// What stays current, in words.
        kept: String,
        findings: String,
    },
    /// A version breaks its hardening policy.
    #[error("image `{image}` v{version} breaks its hardening policy; {kept}:\n{violations}")]
    Policy {
        image: String,
        version: u32,
        kept: String,
        violations: String,
    },
    /// The value of a project secret was found in a version's files.
    #[error("image `{image}` v{version} contains the value of a secret; {kept}:\n{found}")]
    SecretInImage {
        image: String,
        version: u32,
        kept: String,
        /// `secret NAME in /path` lines; never the value.
        found: String,
    },
    /// A file that an image copies in cannot be used.
    #[error("image `{image}`: {reason}")]
    Input { image: String, reason: String },
}

/// Bytes as people read them: `8 GiB`, `1.5 MiB`, `512 bytes`.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size {
            let whole = bytes / size;
            let tenths = (bytes % size) * 10 / size;
            return if tenths == 0 {
                format!("{whole} {unit}")
            } else {
                format!("{whole}.{tenths} {unit}")
            };
        }
    }
    format!("{bytes} bytes")
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Attaches the operation and path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| ImageError::Io {
            op,
            path: path.into(),
            source,
        })
    }
}
