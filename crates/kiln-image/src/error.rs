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
