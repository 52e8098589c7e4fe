//! What kiln knows about its environments, persisted in one SQLite file
//! (`.kiln/state.db` by the caller's choice): each environment's generation,
//! its lock, its servers, its releases with the journal of their steps, and
//! the history of events outside releases.
//!
//! Invariant: every write to an environment's servers bumps its generation in
//! the same transaction, so a plan made against an older generation is
//! stale. Other writers (the CLI after a release, say) call `bump_generation`.

mod audit;
mod error;
mod lock;
mod schema;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use kiln_model::{Outcome, PlanKind, Release, RoleTarget, Server, ServerStatus};
use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};

pub use audit::AuditEntry;
pub use error::{Result, StateError};
pub use lock::{EnvLock, LockInfo};

/// An open state database. Cheap calls, each its own transaction.
#[derive(Debug)]
pub struct State {
    conn: Connection,
    path: PathBuf,
}

/// One step of a release, journaled before and after it runs, so that after
/// a crash a `running` step says what was interrupted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub idx: u32,
    pub action: String,
    pub server: String,
    /// `running`, `done`, `failed`.
    pub status: String,
    pub started: i64,
    pub finished: Option<i64>,
    pub detail: String,
}

/// Something that happened to an environment outside a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub time: i64,
    pub actor: String,
    pub action: String,
    pub detail: String,
}

const SERVER_COLUMNS: &str = "id, env, role, slot, image, image_digest, spec_hash, address, \
     created, status, pid, release_id, standby_until, node, published";
const RELEASE_COLUMNS: &str =
    "env, id, created, finished, actor, kind, plan_hash, summary, roles_json, outcome, detail";

impl State {
    /// Opens the database at `path`, creating it and its directory if
    /// needed, and migrates it to the current schema.
    pub fn open(path: &Path) -> Result<State> {
        Ok(State {
            conn: schema::open(path)?,
            path: path.to_path_buf(),
        })
    }

    /// The path the database was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Maps a database error to `StateError::Db` with what was being done.
    fn fail(
        &self,
        op: &'static str,
        subject: String,
    ) -> impl Fn(rusqlite::Error) -> StateError + '_ {
        move |source| {
            if let Some(free) = disk_full(&self.path, &source) {
                return StateError::DiskFull {
                    path: self.path.clone(),
                    free,
                };
            }
            StateError::Db {
                path: self.path.clone(),
                op,
                subject: subject.clone(),
                source: Box::new(source),
            }
        }
    }

    fn missing(&self, subject: String) -> StateError {
        StateError::Missing {
            path: self.path.clone(),
            subject,
        }
    }

    /// A write transaction that holds SQLite's write lock from the start: a
    /// deferred one that reads then writes fails, without waiting, when
    /// another process wrote in between.
    fn write_tx(&self) -> rusqlite::Result<Transaction<'_>> {
        Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate)
    }

    /// The generation of `env`: 0 until its first write.
    pub fn generation(&self, env: &str) -> Result<i64> {
        self.conn
            .query_row("SELECT generation FROM envs WHERE env = ?1", [env], |r| {
                r.get(0)
            })
            .optional()
            .map(|g| g.unwrap_or(0))
            .map_err(self.fail("read the generation of", format!("environment `{env}`")))
    }

    /// Increments the generation of `env` and returns the new one.
    pub fn bump_generation(&self, env: &str) -> Result<i64> {
        bump(&self.conn, env)
            .map_err(self.fail("bump the generation of", format!("environment `{env}`")))
    }

    /// Servers of `env` (or of every environment), by env, role, slot, id.
    pub fn servers(&self, env: Option<&str>) -> Result<Vec<Server>> {
        let subject = env.map_or("servers".to_string(), |e| {
            format!("servers of environment `{e}`")
        });
        let err = self.fail("read", subject);
        let sql =
            format!("SELECT {SERVER_COLUMNS} FROM servers WHERE ?1 IS NULL OR env = ?1 ORDER BY env, role, slot, id");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(&err)?;
        let rows = stmt.query_map([env], server_row).map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }

    /// The id of every server of every environment.
    pub fn server_ids(&self) -> Result<Vec<String>> {
        let err = self.fail("read", "server ids".to_string());
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id FROM servers")
            .map_err(&err)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }

    pub fn server(&self, id: &str) -> Result<Option<Server>> {
        let sql = format!("SELECT {SERVER_COLUMNS} FROM servers WHERE id = ?1");
        self.conn
            .query_row(&sql, [id], server_row)
            .optional()
            .map_err(self.fail("read", format!("server `{id}`")))
    }

    /// Inserts or replaces the server with `s.id`.
    pub fn put_server(&self, s: &Server) -> Result<()> {
        let err = self.fail("write", format!("server `{}`", s.id));
        let tx = self.write_tx().map_err(&err)?;
        tx.execute(
            &format!(
                "INSERT OR REPLACE INTO servers ({SERVER_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
            ),
            params![
                s.id,
                s.env,
                s.role,
                s.slot,
                s.image,
                s.image_digest,
                s.spec_hash,
                s.address,
                s.created,
                s.status.as_str(),
                s.pid,
                s.release,
                s.standby_until,
                s.node,
                published_json(&s.published)
            ],
        )
        .map_err(&err)?;
        bump(&tx, &s.env).map_err(&err)?;
        tx.commit().map_err(&err)
    }

    /// Puts a running server on standby (out of its balancer, kept warm) until `until`.
    pub fn set_standby(&self, id: &str, until: i64) -> Result<()> {
        let err = self.fail("put on standby", format!("server `{id}`"));
        let tx = self.write_tx().map_err(&err)?;
        let env = server_env(&tx, id)
            .map_err(&err)?
            .ok_or_else(|| self.missing(format!("server `{id}`")))?;
        tx.execute(
            "UPDATE servers SET status = 'standby', standby_until = ?2 WHERE id = ?1",
            params![id, until],
        )
        .map_err(&err)?;
        bump(&tx, &env).map_err(&err)?;
        tx.commit().map_err(&err)
    }

    pub fn set_server_status(
        &self,
        id: &str,
        status: ServerStatus,
        pid: Option<i32>,
    ) -> Result<()> {
        let err = self.fail("set the status of", format!("server `{id}`"));
        let tx = self.write_tx().map_err(&err)?;
        let env = server_env(&tx, id)
            .map_err(&err)?
            .ok_or_else(|| self.missing(format!("server `{id}`")))?;
        tx.execute(
            "UPDATE servers SET status = ?2, pid = ?3 WHERE id = ?1",
            params![id, status.as_str(), pid],
        )
        .map_err(&err)?;
        bump(&tx, &env).map_err(&err)?;
        tx.commit().map_err(&err)
    }

    /// Forgets a server; forgetting one that is not there does nothing, so
    /// that finishing an interrupted destroy is idempotent.
    pub fn remove_server(&self, id: &str) -> Result<()> {
        let err = self.fail("remove", format!("server `{id}`"));
        let tx = self.write_tx().map_err(&err)?;
        if let Some(env) = server_env(&tx, id).map_err(&err)? {
            tx.execute("DELETE FROM servers WHERE id = ?1", [id])
                .map_err(&err)?;
            bump(&tx, &env).map_err(&err)?;
        }
        tx.commit().map_err(&err)
    }

    /// Records the start of a release and returns its id (the next in `env`).
    pub fn begin_release(
        &self,
        env: &str,
        actor: &str,
        kind: PlanKind,
        plan_hash: &str,
        summary: &str,
        targets: &[RoleTarget],
    ) -> Result<i64> {
        let targets = serde_json::to_string(targets).unwrap_or_else(|_| "[]".into());
        let err = self.fail("begin a release of", format!("environment `{env}`"));
        let tx = self.write_tx().map_err(&err)?;
        let id: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(id), 0) + 1 FROM releases WHERE env = ?1",
                [env],
                |r| r.get(0),
            )
            .map_err(&err)?;
        tx.execute(
            &format!(
                "INSERT INTO releases ({RELEASE_COLUMNS}) VALUES (?1, ?2, ?3, NULL, ?4, ?5, ?6, ?7, ?8, 'running', '')"
            ),
            params![env, id, now(), actor, kind.as_str(), plan_hash, summary, targets],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(id)
    }

    pub fn finish_release(&self, env: &str, id: i64, outcome: Outcome, detail: &str) -> Result<()> {
        let subject = format!("release {id} of environment `{env}`");
        let n = self
            .conn
            .execute(
                "UPDATE releases SET outcome = ?3, detail = ?4, finished = ?5 WHERE env = ?1 AND id = ?2",
                params![env, id, outcome.as_str(), detail, now()],
            )
            .map_err(self.fail("finish", subject.clone()))?;
        if n == 0 {
            return Err(self.missing(subject));
        }
        Ok(())
    }

    /// Release `id` of `env`, if there is one.
    pub fn release(&self, env: &str, id: i64) -> Result<Option<Release>> {
        let err = self.fail("read", format!("release {id} of environment `{env}`"));
        let sql = format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE env = ?1 AND id = ?2");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(&err)?;
        stmt.query_row(params![env, id], release_row)
            .optional()
            .map_err(&err)
    }

    /// Releases of `env`, oldest first.
    pub fn releases(&self, env: &str) -> Result<Vec<Release>> {
        let err = self.fail("read the releases of", format!("environment `{env}`"));
        let sql = format!("SELECT {RELEASE_COLUMNS} FROM releases WHERE env = ?1 ORDER BY id");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(&err)?;
        let rows = stmt.query_map([env], release_row).map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }

    /// Journals step `idx` of a release as `running`, before it runs.
    pub fn step_started(
        &self,
        env: &str,
        release: i64,
        idx: u32,
        action: &str,
        server: &str,
        detail: &str,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO steps (env, release_id, idx, action, server, status, started, finished, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6, NULL, ?7)",
                params![env, release, idx, action, server, now(), detail],
            )
            .map_err(self.fail("journal", format!("step {idx} of release {release} of environment `{env}`")))?;
        Ok(())
    }

    /// Journals the end of step `idx`: `done` or `failed`. An empty `detail`
    /// keeps the one given at the start.
    pub fn step_finished(
        &self,
        env: &str,
        release: i64,
        idx: u32,
        ok: bool,
        detail: &str,
    ) -> Result<()> {
        let subject = format!("step {idx} of release {release} of environment `{env}`");
        let n = self
            .conn
            .execute(
                "UPDATE steps SET status = ?4, finished = ?5, detail = CASE WHEN ?6 = '' THEN detail ELSE ?6 END
                 WHERE env = ?1 AND release_id = ?2 AND idx = ?3",
                params![env, release, idx, if ok { "done" } else { "failed" }, now(), detail],
            )
            .map_err(self.fail("journal", subject.clone()))?;
        if n == 0 {
            return Err(self.missing(subject));
        }
        Ok(())
    }

    /// Steps of a release, by index.
    pub fn steps(&self, env: &str, release: i64) -> Result<Vec<Step>> {
        let err = self.fail(
            "read the steps of",
            format!("release {release} of environment `{env}`"),
        );
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT idx, action, server, status, started, finished, detail FROM steps
                 WHERE env = ?1 AND release_id = ?2 ORDER BY idx",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map(params![env, release], |r| {
                Ok(Step {
                    idx: r.get(0)?,
                    action: r.get(1)?,
                    server: r.get(2)?,
                    status: r.get(3)?,
                    started: r.get(4)?,
                    finished: r.get(5)?,
                    detail: r.get(6)?,
                })
            })
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }

    /// Records an event outside a release (unlock, adopting or cleaning up orphans).
    pub fn record_event(&self, env: &str, actor: &str, action: &str, detail: &str) -> Result<()> {
        insert_event(&self.conn, env, actor, action, detail)
            .map_err(self.fail("record an event of", format!("environment `{env}`")))
    }

    /// Events of `env`, oldest first.
    pub fn events(&self, env: &str) -> Result<Vec<Event>> {
        let err = self.fail("read the events of", format!("environment `{env}`"));
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT time, actor, action, detail FROM events WHERE env = ?1 ORDER BY seq",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([env], |r| {
                Ok(Event {
                    time: r.get(0)?,
                    actor: r.get(1)?,
                    action: r.get(2)?,
                    detail: r.get(3)?,
                })
            })
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }

    /// Every environment with a generation or servers, by name.
    pub fn envs(&self) -> Result<Vec<String>> {
        let err = self.fail("list", "environments".to_string());
        let mut stmt = self
            .conn
            .prepare_cached("SELECT env FROM envs UNION SELECT env FROM servers ORDER BY 1")
            .map_err(&err)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }
}

/// When `e` is an I/O or full-disk failure and the file system holding
/// `path` has (almost) no space left: the bytes still free. SQLite reports
/// a full disk as anything from SQLITE_FULL to a failed shared-memory map.
pub(crate) fn disk_full(path: &Path, e: &rusqlite::Error) -> Option<u64> {
    use rusqlite::ErrorCode::{DiskFull, SystemIoFailure};
    let rusqlite::Error::SqliteFailure(f, _) = e else {
        return None;
    };
    if !matches!(f.code, DiskFull | SystemIoFailure) {
        return None;
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    (free < 1 << 20).then_some(free)
}

/// Increments the generation of `env` on `conn` (a transaction, usually).
fn bump(conn: &Connection, env: &str) -> rusqlite::Result<i64> {
    conn.query_row(
        "INSERT INTO envs (env, generation) VALUES (?1, 1)
         ON CONFLICT (env) DO UPDATE SET generation = generation + 1 RETURNING generation",
        [env],
        |r| r.get(0),
    )
}

fn server_env(conn: &Connection, id: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT env FROM servers WHERE id = ?1", [id], |r| r.get(0))
        .optional()
}

fn server_row(r: &Row<'_>) -> rusqlite::Result<Server> {
    let status: String = r.get(9)?;
    let status = ServerStatus::parse(&status).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            9,
            Type::Text,
            format!("unknown server status `{status}`").into(),
        )
    })?;
    Ok(Server {
        id: r.get(0)?,
        env: r.get(1)?,
        role: r.get(2)?,
        slot: r.get(3)?,
        image: r.get(4)?,
        image_digest: r.get(5)?,
        spec_hash: r.get(6)?,
        address: r.get(7)?,
        created: r.get(8)?,
        status,
        pid: r.get(10)?,
        release: r.get(11)?,
        standby_until: r.get(12)?,
        node: r.get(13)?,
        published: r
            .get::<_, Option<String>>(14)?
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default(),
    })
}

fn published_json(p: &std::collections::BTreeMap<u16, u16>) -> Option<String> {
    (!p.is_empty()).then(|| serde_json::to_string(p).unwrap_or_default())
}

/// A release kind as stored; kinds written before they were typed keep
/// their old spelling.
fn kind_row(s: &str) -> Option<PlanKind> {
    PlanKind::parse(s).or(match s {
        "deploy --cold" => Some(PlanKind::DeployCold),
        "rollback (automatic)" => Some(PlanKind::AutoRollback),
        _ => None,
    })
}

fn release_row(r: &Row<'_>) -> rusqlite::Result<Release> {
    let bad = |col: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(col, Type::Text, what.into())
    };
    let kind: String = r.get(5)?;
    let outcome: String = r.get(9)?;
    let targets: String = r.get(8)?;
    Ok(Release {
        env: r.get(0)?,
        id: r.get(1)?,
        created: r.get(2)?,
        finished: r.get(3)?,
        actor: r.get(4)?,
        kind: kind_row(&kind).ok_or_else(|| bad(5, format!("unknown release kind `{kind}`")))?,
        plan_hash: r.get(6)?,
        summary: r.get(7)?,
        // Releases recorded before targets were complete have none usable.
        targets: serde_json::from_str::<Vec<RoleTarget>>(&targets).unwrap_or_default(),
        outcome: Outcome::parse(&outcome)
            .ok_or_else(|| bad(9, format!("unknown release outcome `{outcome}`")))?,
        detail: r.get(10)?,
    })
}

pub(crate) fn insert_event(
    conn: &Connection,
    env: &str,
    actor: &str,
    action: &str,
    detail: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO events (env, time, actor, action, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![env, now(), actor, action, detail],
    )?;
    Ok(())
}

/// Seconds since the epoch; a clock before 1970 reads as 0.
pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `2026-11-21T10:00:00Z`, for messages.
pub fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map_or_else(
        || secs.to_string(),
        |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// Who is acting, for locks and history: `$KILN_ACTOR` (a pipeline's
/// identity), else `$USER` or `$LOGNAME`, else the numeric uid.
pub fn actor() -> String {
    ["KILN_ACTOR", "USER", "LOGNAME"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find(|v| !v.is_empty())
        .unwrap_or_else(user_name)
}

/// The name of the real user from /etc/passwd, or the uid as a number.
fn user_name() -> String {
    let uid = nix::unistd::getuid().to_string();
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)? == uid).then(|| name.to_string())
            })
        })
        .unwrap_or(uid)
}
