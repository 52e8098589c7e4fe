//! The control directory: how kiln and a running DNS server talk, the same
//! way kiln talks to its balancers.
//!
//! - `records.json`, written by kiln (temporary file + rename): the record
//!   set and its generation. The server checks it every [`POLL`] and
//!   switches to a new generation in one step.
//! - `status.json`, written by the server (also temporary file + rename):
//!   the generation it answers from, where it listens, its counters. kiln
//!   waits on it ([`wait_generation`]) before counting a switch as done.
//! - `pid`: the server's pid, for people; [`running`] uses the status.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::DnsError;

/// How often the server checks `records.json` for a new generation.
pub const POLL: Duration = Duration::from_millis(10);

/// TTL of answers when kiln does not say: short, because a server leaving
/// a role must be forgotten by clients within it before it stops.
pub const DEFAULT_TTL: u32 = 2;

/// The names one environment's DNS server answers itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Records {
    /// The environment these names belong to (reported in the status).
    pub env: String,
    /// TTL in seconds of every answer.
    #[serde(default = "default_ttl")]
    pub ttl: u32,
    /// Name → IPv4 addresses. Matched without regard to ASCII case, with or
    /// without a trailing dot. A name with no address is still known: it
    /// answers NOERROR with no records instead of being forwarded, so a
    /// role whose servers are all out of rotation never resolves to
    /// whatever the host's resolvers say about that name.
    pub names: BTreeMap<String, Vec<Ipv4Addr>>,
}

fn default_ttl() -> u32 {
    DEFAULT_TTL
}

impl Records {
    /// An empty record set for `env` with the default TTL.
    pub fn new(env: &str) -> Self {
        Records {
            env: env.to_string(),
            ttl: DEFAULT_TTL,
            names: BTreeMap::new(),
        }
    }
}

/// `records.json`: a record set and the generation kiln gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordsFile {
    pub generation: u64,
    #[serde(flatten)]
    pub records: Records,
}

/// What the server reports in `status.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    /// The process's start time in clock ticks after boot (field 22 of
    /// `/proc/PID/stat`): with `pid`, it names the process even after the
    /// pid is reused.
    pub start_ticks: u64,
    pub env: String,
    /// The generation of the record set it answers from (0: none yet).
    pub generation: u64,
    /// Where it answers, on UDP and TCP each.
    pub listen: Vec<SocketAddr>,
    /// Names in the record set.
    pub names: usize,
    pub counters: Counters,
    /// Increases with every write, so a reader can wait for a fresh one.
    pub seq: u64,
}

/// Queries by outcome, since the server started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Answered from the record set.
    pub local: u64,
    /// Forwarded and answered by an upstream resolver.
    pub forwarded: u64,
    /// Forwarded, but no upstream answered in time (SERVFAIL).
    pub forward_failed: u64,
    /// Not forwarded because its client (or the server) had too many
    /// forwards in flight (REFUSED).
    pub refused: u64,
    /// Unknown names with no upstream to ask (NXDOMAIN).
    pub nxdomain: u64,
    /// Packets that were not a well-formed query (FORMERR, NOTIMP or
    /// dropped).
    pub malformed: u64,
}

pub fn records_path(dir: &Path) -> PathBuf {
    dir.join("records.json")
}

pub fn status_path(dir: &Path) -> PathBuf {
    dir.join("status.json")
}

pub fn pid_path(dir: &Path) -> PathBuf {
    dir.join("pid")
}

/// Writes a file through a temporary file and a rename, so a reader sees
/// the old content or the new, never a part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DnsError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|source| DnsError::Io {
        op: "write",
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| DnsError::Io {
        op: "rename",
        path: path.to_path_buf(),
        source,
    })
}

/// Sets the record set (kiln's side). Every name is checked first, so a
/// bad name is refused here rather than ignored by the server. Returns the
/// new generation, for [`wait_generation`].
pub fn set_records(dir: &Path, records: &Records) -> Result<u64, DnsError> {
    for name in records.names.keys() {
        crate::zone::parse_name(name)?;
    }
    std::fs::create_dir_all(dir).map_err(|source| DnsError::Io {
        op: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    let generation = read_records(dir).map(|r| r.generation).unwrap_or(0) + 1;
    let file = RecordsFile {
        generation,
        records: records.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&file).expect("a record set serializes");
    write_atomic(&records_path(dir), &bytes)?;
    Ok(generation)
}

/// The record set kiln last wrote, if there is a readable one.
pub fn read_records(dir: &Path) -> Option<RecordsFile> {
    std::fs::read(records_path(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The server's last status, whether or not it still runs.
pub fn read_status(dir: &Path) -> Option<Status> {
    std::fs::read(status_path(dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// The status of the server for `dir` if that very process still runs
/// (same pid and start time), so kiln can tell whether to start one.
pub fn running(dir: &Path) -> Option<Status> {
    let status = read_status(dir)?;
    (start_ticks(status.pid) == Some(status.start_ticks)).then_some(status)
}

/// Waits until the server answers from `generation` or a later one
/// (kiln's side).
pub fn wait_generation(dir: &Path, generation: u64, timeout: Duration) -> Result<Status, DnsError> {
    let start = Instant::now();
    loop {
        if let Some(s) = read_status(dir) {
            if s.generation >= generation {
                return Ok(s);
            }
        }
        if start.elapsed() > timeout {
            return Err(DnsError::Timeout {
                dir: dir.to_path_buf(),
                generation,
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks.
pub(crate) fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_ticks_are_read() {
        let mine = start_ticks(std::process::id());
        assert!(mine.is_some());
        assert_eq!(mine, start_ticks(std::process::id()));
    }

    #[test]
    fn generations_increase_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Records::new("staging");
        r.names
            .insert("app".into(), vec![Ipv4Addr::new(10, 0, 0, 2)]);
        assert_eq!(set_records(dir.path(), &r).unwrap(), 1);
        assert_eq!(set_records(dir.path(), &r).unwrap(), 2);
        let back = read_records(dir.path()).unwrap();
        assert_eq!(back.generation, 2);
        assert_eq!(back.records, r);
        r.names.insert("a..b".into(), vec![]);
        let err = set_records(dir.path(), &r).unwrap_err();
        assert!(err.to_string().contains("a..b"), "{err}");
        assert_eq!(read_records(dir.path()).unwrap().generation, 2);
    }

    #[test]
    fn ttl_defaults_when_absent() {
        let r: RecordsFile =
            serde_json::from_str(r#"{"generation":1,"env":"e","names":{"x":["10.1.2.3"]}}"#)
                .unwrap();
        assert_eq!(r.records.ttl, DEFAULT_TTL);
    }
}
