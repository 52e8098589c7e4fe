//! Environment locks: one row per environment in `locks`, taken by whoever
//! changes the environment (apply, deploy, destroy, rollback) and released
//! when the `EnvLock` guard drops. The row outlives a crashed process, so a
//! lock whose process is gone is reported as such, for `kiln unlock`.

use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StateError};
use crate::{now, State};

/// Who holds an environment's lock, and for what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub env: String,
    pub holder: String,
    pub pid: u32,
    pub host: String,
    /// Seconds since the epoch.
    pub since: i64,
    pub op: String,
}

impl LockInfo {
    /// Whether the holding process may still run: it does unless it was on
    /// this host and its pid is gone. A lock from another host (a state file
    /// on shared storage) cannot be checked, so it counts as alive.
    pub fn holder_alive(&self) -> bool {
        self.host != hostname() || std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// A held environment lock; dropping it deletes the row (only if it is still
/// ours: `kiln unlock` may have removed it and another process taken it).
#[derive(Debug)]
pub struct EnvLock<'a> {
    state: &'a State,
    info: LockInfo,
}

impl EnvLock<'_> {
    pub fn env(&self) -> &str {
        &self.info.env
    }
    pub fn info(&self) -> &LockInfo {
        &self.info
    }
}

impl Drop for EnvLock<'_> {
    fn drop(&mut self) {
        let i = &self.info;
        let res = self.state.conn.execute(
            "DELETE FROM locks WHERE env = ?1 AND pid = ?2 AND host = ?3",
            params![i.env, i.pid, i.host],
        );
        // Drop cannot fail; a row left behind shows as a dead holder.
        if let Err(e) = res {
            tracing::warn!(env = %i.env, error = %e, "cannot release environment lock");
        }
    }
}

fn read(conn: &Connection, env: &str) -> rusqlite::Result<Option<LockInfo>> {
    conn.query_row(
        "SELECT env, holder, pid, host, since, op FROM locks WHERE env = ?1",
        [env],
        |r| {
            Ok(LockInfo {
                env: r.get(0)?,
                holder: r.get(1)?,
                pid: r.get(2)?,
                host: r.get(3)?,
                since: r.get(4)?,
                op: r.get(5)?,
            })
        },
    )
    .optional()
}

impl State {
    /// Takes the lock of `env` for `op`, or fails at once if anyone holds it.
    pub fn lock(&self, env: &str, op: &str) -> Result<EnvLock<'_>> {
        let err = self.fail("lock", format!("environment `{env}`"));
        // IMMEDIATE takes SQLite's write lock before the read, so two
        // processes cannot both see no row and both insert one.
        let tx =
            Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(&err)?;
        if let Some(holder) = read(&tx, env).map_err(&err)? {
            let holder_alive = holder.holder_alive();
            return Err(StateError::Locked {
                env: env.to_string(),
                holder: Box::new(holder),
                holder_alive,
            });
        }
        let info = LockInfo {
            env: env.to_string(),
            holder: crate::actor(),
            pid: std::process::id(),
            host: hostname(),
            since: now(),
            op: op.to_string(),
        };
        tx.execute(
            "INSERT INTO locks (env, holder, pid, host, since, op) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                info.env,
                info.holder,
                info.pid,
                info.host,
                info.since,
                info.op
            ],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(EnvLock { state: self, info })
    }

    /// Removes the lock of `env` whoever holds it, and records who did in the
    /// history. Returns the lock removed, if there was one.
    pub fn unlock(&self, env: &str, actor: &str) -> Result<Option<LockInfo>> {
        let err = self.fail("unlock", format!("environment `{env}`"));
        let tx = self.write_tx().map_err(&err)?;
        let Some(held) = read(&tx, env).map_err(&err)? else {
            return Ok(None);
        };
        tx.execute("DELETE FROM locks WHERE env = ?1", [env])
            .map_err(&err)?;
        let gone = if held.holder_alive() {
            ""
        } else {
            ", process gone"
        };
        let detail = format!(
            "lock held by {} (pid {} on host {}{gone}) since {} for {}",
            held.holder,
            held.pid,
            held.host,
            crate::rfc3339(held.since),
            held.op
        );
        crate::insert_event(&tx, env, actor, "unlock", &detail).map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(Some(held))
    }

    /// Who holds the lock of `env`, if anyone.
    pub fn lock_info(&self, env: &str) -> Result<Option<LockInfo>> {
        read(&self.conn, env).map_err(self.fail("read the lock of", format!("environment `{env}`")))
    }
}

/// This machine's name, as recorded in locks.
pub(crate) fn hostname() -> String {
    nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_string())
}
