//! The database schema and its migrations. `meta.schema_version` counts the
//! entries of `MIGRATIONS` already applied; a migration is never edited once
//! released, only followed by a new one.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};

use crate::error::{Result, StateError};

/// Applied in order; entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: environments, locks, servers, releases, the step journal, events.
    // `release_id` rather than `release`: RELEASE is an SQL keyword.
    "CREATE TABLE envs (env TEXT PRIMARY KEY, generation INTEGER NOT NULL);
     CREATE TABLE locks (env TEXT PRIMARY KEY, holder TEXT NOT NULL, pid INTEGER NOT NULL,
         host TEXT NOT NULL, since INTEGER NOT NULL, op TEXT NOT NULL);
     CREATE TABLE servers (id TEXT PRIMARY KEY, env TEXT NOT NULL, role TEXT NOT NULL,
         slot INTEGER NOT NULL, image TEXT NOT NULL, image_digest TEXT NOT NULL,
         spec_hash TEXT NOT NULL, address TEXT NOT NULL, created INTEGER NOT NULL,
         status TEXT NOT NULL, pid INTEGER, release_id INTEGER NOT NULL);
     CREATE INDEX servers_by_env ON servers (env, role, slot, id);
     CREATE TABLE releases (env TEXT NOT NULL, id INTEGER NOT NULL, created INTEGER NOT NULL,
         finished INTEGER, actor TEXT NOT NULL, kind TEXT NOT NULL, plan_hash TEXT NOT NULL,
         summary TEXT NOT NULL, roles_json TEXT NOT NULL, outcome TEXT NOT NULL,
         detail TEXT NOT NULL, PRIMARY KEY (env, id));
     CREATE TABLE steps (env TEXT NOT NULL, release_id INTEGER NOT NULL, idx INTEGER NOT NULL,
         action TEXT NOT NULL, server TEXT NOT NULL, status TEXT NOT NULL,
         started INTEGER NOT NULL, finished INTEGER, detail TEXT NOT NULL,
         PRIMARY KEY (env, release_id, idx));
     CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, env TEXT NOT NULL,
         time INTEGER NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, detail TEXT NOT NULL);
     CREATE INDEX events_by_env ON events (env, seq);",
    // 2: blue-green standby servers and the end of their rollback window.
    "ALTER TABLE servers ADD COLUMN standby_until INTEGER;",
    // 3: the hash-chained audit log.
    "CREATE TABLE audit (seq INTEGER PRIMARY KEY, time INTEGER NOT NULL, actor TEXT NOT NULL,
         env TEXT NOT NULL, action TEXT NOT NULL, plan_hash TEXT NOT NULL, outcome TEXT NOT NULL,
         pipeline INTEGER NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL);",
    // 4: where a server runs and where its ports are published (remote providers).
    "ALTER TABLE servers ADD COLUMN node TEXT;
     ALTER TABLE servers ADD COLUMN published TEXT;",
    // 5: when a lock's holder started, to tell a dead holder from a reused pid.
    "ALTER TABLE locks ADD COLUMN start INTEGER;",
];

/// Opens (creating) the database at `path`, configures it and brings its
/// schema up to date.
pub(crate) fn open(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let err = |source| match crate::disk_full(path, &source) {
        Some(free) => StateError::DiskFull {
            path: path.to_path_buf(),
            free,
        },
        None => StateError::Open {
            path: path.to_path_buf(),
            source,
        },
    };
    let conn = Connection::open(path).map_err(err)?;
    // Several kiln processes share the file (a `plan` while an `apply` runs):
    // they wait for each other's short write transactions instead of failing.
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(err)?;
    // WAL lets readers proceed while a writer commits. `synchronous` stays at
    // FULL: a row saying a server is being created must survive a power cut.
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        .map_err(err)?;
    migrate(&conn, path)?;
    Ok(conn)
}

fn migrate(conn: &Connection, path: &Path) -> Result<()> {
    let known = MIGRATIONS.len() as i64;
    let err = |version, source| StateError::Migrate {
        path: path.to_path_buf(),
        version,
        source,
    };
    // IMMEDIATE: two processes opening a new file must not both migrate it.
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
        .map_err(|e| err(known, e))?;
    // `value` has no declared type so that it keeps whatever type is stored.
    tx.execute_batch("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)")
        .map_err(|e| err(known, e))?;
    let found: i64 = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| err(known, e))?
        .unwrap_or(0);
    if found > known {
        return Err(StateError::TooNew {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    if found == known {
        return Ok(());
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql).map_err(|e| err(i as i64 + 1, e))?;
    }
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?1)",
        [known],
    )
    .map_err(|e| err(known, e))?;
    tx.commit().map_err(|e| err(known, e))
}

#[cfg(test)]
pub(crate) fn schema_version(conn: &Connection) -> i64 {
    conn.query_row(
        "SELECT value FROM meta WHERE key = 'schema_version'",
        [],
        |r| r.get(0),
    )
    .expect("schema_version row")
}

#[cfg(test)]
pub(crate) const KNOWN: i64 = MIGRATIONS.len() as i64;
