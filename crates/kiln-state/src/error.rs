//! The one error type of the state layer. Each variant's message is what a
//! user reads; `Display` never repeats the source, which callers print as
//! the rest of the chain.

use std::path::PathBuf;

use crate::LockInfo;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The directory that holds the database cannot be created.
    #[error("cannot create state directory {}", path.display())]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The database cannot be opened or configured.
    #[error("cannot open state database {}", path.display())]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// A schema migration failed; the transaction left the database as it was.
    #[error("cannot migrate state database {} to schema version {version}", path.display())]
    Migrate {
        path: PathBuf,
        version: i64,
        source: rusqlite::Error,
    },
    /// The database was written by a newer kiln.
    #[error("state database {} has schema version {found}; this kiln knows up to {known}", path.display())]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    /// A query failed: `op` and `subject` say what was being done to what.
    /// The source is boxed to keep every `Result` of this crate small.
    #[error("cannot {op} {subject} in state database {}", path.display())]
    Db {
        path: PathBuf,
        op: &'static str,
        subject: String,
        source: Box<rusqlite::Error>,
    },
    /// The file system holding the database is full: nothing was written.
    #[error("the disk holding {} is full ({free} bytes free): free some space and run the command again; nothing was changed", path.display())]
    DiskFull { path: PathBuf, free: u64 },
    /// A row the caller refers to does not exist.
    #[error("{subject} is not in state database {}", path.display())]
    Missing { path: PathBuf, subject: String },
    /// Another process holds the environment's lock (boxed: see `Db`).
    #[error("{}", locked_message(env, holder, *holder_alive))]
    Locked {
        env: String,
        holder: Box<LockInfo>,
        holder_alive: bool,
    },
}

pub type Result<T, E = StateError> = std::result::Result<T, E>;

fn locked_message(env: &str, h: &LockInfo, alive: bool) -> String {
    let mut msg = format!(
        "environment `{env}` is locked by {} (pid {} on host {}) since {} for {}",
        h.holder,
        h.pid,
        h.host,
        crate::rfc3339(h.since),
        h.op
    );
    if !alive {
        msg.push_str(&format!(
            ", by a process that no longer exists; run `kiln unlock {env}`"
        ));
    }
    msg
}
