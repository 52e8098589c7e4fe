//! Environment locks: one row per environment in `locks`, taken by whoever
//! changes the environment (apply, deploy, destroy, rollback) and released
//! when the `EnvLock` guard drops. The row outlives a crashed process: a
//! lock whose holder is provably dead (same host, and its pid is gone or now
//! belongs to a process started at another time) is taken over by the next
//! writer, and the takeover is recorded. A holder on another host cannot be
//! checked; `kiln unlock` breaks such a lock by hand.

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
    /// When the holding process started (clock ticks after boot, from
    /// `/proc/PID/stat`), so a reused pid is not mistaken for the holder.
    #[serde(default)]
    pub start: Option<u64>,
}

impl LockInfo {
    /// Whether the holding process may still run: it does unless it was on
    /// this host and its pid is gone, or is now another process (started at
    /// another time). A lock from another host (a state file on shared
    /// storage) cannot be checked, so it counts as alive.
    pub fn holder_alive(&self) -> bool {
        if self.host != hostname() {
            return true;
        }
        match (process_start(self.pid), self.start) {
            (None, _) => false,
            (Some(now), Some(then)) => now == then,
            (Some(_), None) => true,
        }
    }
}

/// When process `pid` started, in clock ticks after boot (field 22 of
/// `/proc/PID/stat`), or `None` if it does not exist (or is a zombie).
pub(crate) fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its closing parenthesis.
    let rest = stat.rsplit_once(") ")?.1;
    if rest.starts_with('Z') || rest.starts_with('X') {
        return None;
    }
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A held environment lock; dropping it deletes the row (only if it is still
/// ours: `kiln unlock` may have removed it and another process taken it).
#[derive(Debug)]
pub struct EnvLock<'a> {
    state: &'a State,
    info: LockInfo,
    took_over: Option<LockInfo>,
}

impl EnvLock<'_> {
    pub fn env(&self) -> &str {
        &self.info.env
    }
    pub fn info(&self) -> &LockInfo {
        &self.info
    }
    /// The dead holder's lock this one took over, if it did.
    pub fn took_over(&self) -> Option<&LockInfo> {
        self.took_over.as_ref()
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
        "SELECT env, holder, pid, host, since, op, start FROM locks WHERE env = ?1",
        [env],
        |r| {
            Ok(LockInfo {
                env: r.get(0)?,
                holder: r.get(1)?,
                pid: r.get(2)?,
                host: r.get(3)?,
                since: r.get(4)?,
                op: r.get(5)?,
                start: r.get::<_, Option<i64>>(6)?.map(|s| s as u64),
            })
        },
    )
    .optional()
}

impl State {
    /// Takes the lock of `env` for `op`. Fails at once if a live process
    /// (or one on another host) holds it; takes over, and records in the
    /// history, a lock whose holder died on this host.
    pub fn lock(&self, env: &str, op: &str) -> Result<EnvLock<'_>> {
        let err = self.fail("lock", format!("environment `{env}`"));
        // IMMEDIATE takes SQLite's write lock before the read, so two
        // processes cannot both see no row and both insert one.
        let tx =
            Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(&err)?;
        let mut took_over = None;
        if let Some(holder) = read(&tx, env).map_err(&err)? {
            if holder.holder_alive() {
                return Err(StateError::Locked {
                    env: env.to_string(),
                    holder: Box::new(holder),
                    holder_alive: true,
                });
            }
            tx.execute("DELETE FROM locks WHERE env = ?1", [env])
                .map_err(&err)?;
            let detail = format!(
                "took over the lock of {} (pid {} on host {}, gone) held since {} for {}",
                holder.holder,
                holder.pid,
                holder.host,
                crate::rfc3339(holder.since),
                holder.op
            );
            crate::insert_event(&tx, env, &crate::actor(), "lock takeover", &detail)
                .map_err(&err)?;
            took_over = Some(holder);
        }
        let pid = std::process::id();
        let info = LockInfo {
            env: env.to_string(),
            holder: crate::actor(),
            pid,
            host: hostname(),
            since: now(),
            op: op.to_string(),
            start: process_start(pid),
        };
        tx.execute(
            "INSERT INTO locks (env, holder, pid, host, since, op, start) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                info.env,
                info.holder,
                info.pid,
                info.host,
                info.since,
                info.op,
                info.start.map(|s| s as i64)
            ],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(EnvLock {
            state: self,
            info,
            took_over,
        })
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
