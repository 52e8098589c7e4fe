//! The audit trail: every write to an environment appended to a
//! hash-chained log. Entry `n` stores the BLAKE3 of entry `n-1`'s hash and
//! its own fields, so editing, deleting or reordering any entry breaks the
//! chain from that entry on; `verify_audit` names the first bad one.
//!
//! The head of the chain (its last sequence number and hash) is also kept
//! outside the database, in an anchor file next to it, rewritten after
//! every append. A chain that was reset (the database emptied or deleted)
//! or cut short no longer reaches the anchor, and `verify_audit` says so.

use rusqlite::params;
use serde::Serialize;

use crate::{Result, State};

/// One audited write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub time: i64,
    pub actor: String,
    pub env: String,
    pub action: String,
    pub plan_hash: String,
    pub outcome: String,
    /// Whether the actor is one of the environment's pipeline identities
    /// (or the environment declares none).
    pub pipeline: bool,
    pub prev: String,
    pub hash: String,
}

/// Hash of the chain up to and including `e` (its own `hash` aside).
fn link(e: &AuditEntry) -> String {
    let fields = serde_json::json!([
        e.prev,
        e.seq,
        e.time,
        e.actor,
        e.env,
        e.action,
        e.plan_hash,
        e.outcome,
        e.pipeline
    ]);
    blake3::hash(fields.to_string().as_bytes())
        .to_hex()
        .to_string()
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

impl State {
    /// Appends an entry to the chain (atomically with reading its predecessor).
    pub fn append_audit(
        &self,
        env: &str,
        actor: &str,
        action: &str,
        plan_hash: &str,
        outcome: &str,
        pipeline: bool,
    ) -> Result<AuditEntry> {
        let err = self.fail("append to the audit log of", format!("environment `{env}`"));
        let tx = self.write_tx().map_err(&err)?;
        let (seq, prev): (i64, String) = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap_or((0, GENESIS.to_string()));
        let seq = seq + 1;
        let time = chrono::Utc::now().timestamp();
        let mut e = AuditEntry {
            seq,
            time,
            actor: actor.into(),
            env: env.into(),
            action: action.into(),
            plan_hash: plan_hash.into(),
            outcome: outcome.into(),
            pipeline,
            prev,
            hash: String::new(),
        };
        e.hash = link(&e);
        tx.execute(
            "INSERT INTO audit (seq, time, actor, env, action, plan_hash, outcome, pipeline, prev, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![e.seq, e.time, e.actor, e.env, e.action, e.plan_hash, e.outcome, e.pipeline, e.prev, e.hash],
        )
        .map_err(&err)?;
        // A chain that does not reach the anchor (a reset database) never
        // moves it: the anchor keeps saying what the chain lost.
        let continues = match self.anchor() {
            None => true,
            Some((seq, hash)) => tx
                .query_row("SELECT hash FROM audit WHERE seq = ?1", [seq], |r| {
                    r.get::<_, String>(0)
                })
                .is_ok_and(|h| h == hash),
        };
        tx.commit().map_err(&err)?;
        if continues {
            self.write_anchor(&e);
        }
        Ok(e)
    }

    /// Where the chain's head is kept outside the database.
    pub fn anchor_path(&self) -> std::path::PathBuf {
        self.path.with_file_name("audit-anchor")
    }

    /// Records the head of the chain (temp file, then rename). A failure
    /// only weakens reset detection, so it is logged, not returned.
    fn write_anchor(&self, head: &AuditEntry) {
        let path = self.anchor_path();
        let tmp = path.with_extension("tmp");
        let text = format!("{} {}\n", head.seq, head.hash);
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the audit anchor");
        }
    }

    /// The head recorded in the anchor file: (sequence number, hash).
    fn anchor(&self) -> Option<(i64, String)> {
        let text = std::fs::read_to_string(self.anchor_path()).ok()?;
        let (seq, hash) = text.trim().split_once(' ')?;
        Some((seq.parse().ok()?, hash.to_string()))
    }

    /// The audit log, oldest first; of one environment, or all.
    pub fn audit(&self, env: Option<&str>) -> Result<Vec<AuditEntry>> {
        let err = self.fail("read", "the audit log".to_string());
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, time, actor, env, action, plan_hash, outcome, pipeline, prev, hash FROM audit WHERE ?1 IS NULL OR env = ?1 ORDER BY seq")
            .map_err(&err)?;
        let rows = stmt
            .query_map([env], |r| {
                Ok(AuditEntry {
                    seq: r.get(0)?,
                    time: r.get(1)?,
                    actor: r.get(2)?,
                    env: r.get(3)?,
                    action: r.get(4)?,
                    plan_hash: r.get(5)?,
                    outcome: r.get(6)?,
                    pipeline: r.get(7)?,
                    prev: r.get(8)?,
                    hash: r.get(9)?,
                })
            })
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(&err)
    }

    /// Walks the whole chain; returns the first entry that does not hold
    /// (edited, deleted, inserted or reordered), with why, or `None`.
    pub fn verify_audit(&self) -> Result<Option<(i64, String)>> {
        let mut prev = GENESIS.to_string();
        let entries = self.audit(None)?;
        if let Some((seq, hash)) = self.anchor() {
            let found = entries.iter().find(|e| e.seq == seq);
            if found.is_none_or(|e| e.hash != hash) {
                let why = format!(
                    "was recorded in {} as the head of the chain, but the log {}: it was reset or cut short",
                    self.anchor_path().display(),
                    match found {
                        None => format!("has {} entries", entries.len()),
                        Some(_) => "has another entry there".to_string(),
                    }
                );
                return Ok(Some((seq, why)));
            }
        }
        for (expected_seq, e) in (1..).zip(entries) {
            if e.seq != expected_seq {
                return Ok(Some((
                    e.seq,
                    format!("entry {expected_seq} is missing (found {} next)", e.seq),
                )));
            }
            if e.prev != prev {
                return Ok(Some((
                    e.seq,
                    "does not follow the entry before it (deleted or reordered entries)".into(),
                )));
            }
            let hash = link(&e);
            if hash != e.hash {
                return Ok(Some((
                    e.seq,
                    "its content does not match its hash (edited)".into(),
                )));
            }
            prev = e.hash;
        }
        Ok(None)
    }
}
