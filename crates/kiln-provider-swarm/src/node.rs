//! What only a node's own engine can tell: exec sessions in a server's
//! container (an interactive login, since kiln never execs) and the
//! container's filesystem, exported and hashed against the image's seal.
//!
//! A manager does not proxy container calls to other nodes, so kiln
//! connects to each node's engine (its endpoint comes from the node's
//! `dev.kiln.engine` label or kiln's configuration). A read-only root makes
//! every container of one image version on one node show the same files,
//! so one export per (node, image version) is enough; [`export_targets`]
//! picks them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read as _;

use bollard::query_parameters::EventsOptions;
use futures_util::TryStreamExt as _;
use kiln_image::seal::{self, Difference, Entry, Kind, Seal};

use crate::engine::{Endpoint, Engine};
use crate::error::{Result, SwarmError};
use crate::server::Server;

/// Paths Docker adds to every container's root filesystem (its "init
/// layer": mount points and files it bind-mounts over), which an export
/// shows although the image has none of them.
pub const ENGINE_PATHS: &[&str] = &[
    ".dockerenv",
    "dev",
    "dev/console",
    "dev/pts",
    "dev/shm",
    "etc",
    "etc/hostname",
    "etc/hosts",
    "etc/mtab",
    "etc/resolv.conf",
    "proc",
    "sys",
];

/// One node's engine.
#[derive(Debug, Clone)]
pub struct NodeEngine {
    engine: Engine,
}

/// Exec sessions seen in a container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSessions {
    /// Exec instances the container has now (Docker's `ExecIDs`): sessions
    /// still running. Docker forgets an exec once it exits.
    pub open: Vec<String>,
    /// Exec starts in the engine's event log since the container started
    /// (the engine keeps its last 256 events): `(unix time, command)`.
    pub started: Vec<(i64, String)>,
}

impl ExecSessions {
    /// Whether anyone ever entered the container.
    pub fn any(&self) -> bool {
        !self.open.is_empty() || !self.started.is_empty()
    }
}

impl NodeEngine {
    pub async fn connect(endpoint: &Endpoint) -> Result<NodeEngine> {
        Ok(NodeEngine {
            engine: Engine::connect(endpoint).await?,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Exec sessions of `container` (open ones and those the event log
    /// remembers).
    pub async fn exec_sessions(&self, container: &str) -> Result<ExecSessions> {
        let e = &self.engine;
        let info = e
            .docker
            .inspect_container(container, None)
            .await
            .map_err(e.api(format!("inspect container {container}")))?;
        let open = info.exec_ids.unwrap_or_default();
        let since = info
            .state
            .and_then(|s| s.started_at)
            .and_then(|t| chrono_secs(&t))
            .unwrap_or(0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let filters = HashMap::from([
            ("type".to_string(), vec!["container".to_string()]),
            ("container".to_string(), vec![container.to_string()]),
            ("event".to_string(), vec!["exec_start".to_string()]),
        ]);
        // `until` makes the engine answer from its log and close the stream.
        let events: Vec<_> = e
            .docker
            .events(Some(EventsOptions {
                since: Some(since.to_string()),
                until: Some((now + 1).to_string()),
                filters: Some(filters),
            }))
            .try_collect()
            .await
            .map_err(e.api(format!("events of container {container}")))?;
        let started = events
            .into_iter()
            .filter_map(|ev| {
                let action = ev.action?;
                let cmd = action.strip_prefix("exec_start:")?.trim().to_string();
                Some((ev.time.unwrap_or_default(), cmd))
            })
            .collect();
        Ok(ExecSessions { open, started })
    }

    /// The seal of `container`'s root filesystem as the engine exports it
    /// (image layers plus the container's own changes; mounted volumes and
    /// tmpfs are not part of it).
    pub async fn export_seal(&self, container: &str) -> Result<Seal> {
        let e = &self.engine;
        let stream = e
            .docker
            .export_container(container)
            .map_err(std::io::Error::other);
        let reader = tokio_util::io::StreamReader::new(stream);
        let bridge = tokio_util::io::SyncIoBridge::new(reader);
        let id = container.to_string();
        tokio::task::spawn_blocking(move || seal_tar(bridge))
            .await
            .map_err(|j| SwarmError::Export {
                container: id.clone(),
                source: std::io::Error::other(j.to_string()),
            })?
            .map_err(|source| SwarmError::Export {
                container: id,
                source,
            })
    }

    /// The differences between `container`'s exported files and `expected`
    /// (the image version's seal), leaving out what the engine adds
    /// ([`ENGINE_PATHS`]) and the mount points in `mounts` when the image
    /// does not have them.
    pub async fn verify_export(
        &self,
        container: &str,
        expected: &Seal,
        mounts: &[&str],
    ) -> Result<Vec<Difference>> {
        let actual = self.export_seal(container).await?;
        Ok(drift_of(expected, &actual, mounts))
    }
}

/// Differences from `expected` to `actual` that are not the engine's doing.
pub fn drift_of(expected: &Seal, actual: &Seal, mounts: &[&str]) -> Vec<Difference> {
    let skip: BTreeSet<String> = ENGINE_PATHS
        .iter()
        .copied()
        .chain(mounts.iter().map(|m| m.trim_matches('/')))
        .map(str::to_string)
        .collect();
    seal::diff(expected, actual)
        .into_iter()
        .filter(|d| !matches!(d, Difference::Added { path } if skip.contains(path)))
        .collect()
}

/// One (node, image digest) → one running container to export, from the
/// servers' current tasks.
pub fn export_targets(servers: &[Server]) -> Vec<ExportTarget> {
    let mut seen: BTreeMap<(String, String), ExportTarget> = BTreeMap::new();
    for s in servers {
        let (Some(t), Some(spec)) = (s.current(), s.spec.as_ref()) else {
            continue;
        };
        let (Some(container), Some(digest)) = (t.container_id.clone(), spec.digest()) else {
            continue;
        };
        if !t.alive() {
            continue;
        }
        seen.entry((t.node_id.clone(), digest.to_string()))
            .or_insert_with(|| ExportTarget {
                node_id: t.node_id.clone(),
                digest: digest.to_string(),
                container,
                server: spec.server.clone(),
            });
    }
    seen.into_values().collect()
}

/// A container whose export stands for every server of its image on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTarget {
    pub node_id: String,
    pub digest: String,
    pub container: String,
    pub server: String,
}

/// Seals a tar stream as kiln seals a directory: same entries, same hashes.
pub fn seal_tar(r: impl std::io::Read) -> std::io::Result<Seal> {
    let mut archive = tar::Archive::new(r);
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    for item in archive.entries()? {
        let mut item = item?;
        let h = item.header().clone();
        let path = normalize(&item.path()?.to_string_lossy());
        if path.is_empty() {
            continue;
        }
        let kind = match h.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Link => {
                Kind::File
            }
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Symlink => Kind::Symlink,
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::Char => Kind::CharDevice,
            tar::EntryType::Block => Kind::BlockDevice,
            _ => continue,
        };
        let (hash, size, target) = match h.entry_type() {
            tar::EntryType::Link => {
                // A hard link carries no data: it is the file it names.
                let to = normalize(
                    &item
                        .link_name()?
                        .map(|l| l.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
                let same = entries.get(&to);
                (
                    same.and_then(|e| e.hash.clone()),
                    same.map_or(0, |e| e.size),
                    None,
                )
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut hasher = blake3::Hasher::new();
                let mut buf = vec![0u8; 1 << 16];
                let mut size = 0u64;
                loop {
                    let n = item.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    size += n as u64;
                    hasher.update(&buf[..n]);
                }
                (Some(hasher.finalize().to_hex().to_string()), size, None)
            }
            tar::EntryType::Symlink => (
                None,
                0,
                item.link_name()?.map(|l| l.to_string_lossy().into_owned()),
            ),
            _ => (None, 0, None),
        };
        entries.insert(
            path.clone(),
            Entry {
                path,
                kind,
                mode: h.mode()? & 0o7777,
                uid: h.uid()? as u32,
                gid: h.gid()? as u32,
                size,
                hash,
                target,
            },
        );
    }
    Ok(Seal::from_entries(entries.into_values().collect()))
}

fn normalize(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

/// Seconds since the epoch of an RFC 3339 time as Docker writes it
/// (`2026-11-22T15:34:52.246485767Z`), without a date library.
fn chrono_secs(t: &str) -> Option<i64> {
    let (date, time) = t.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.trim_end_matches('Z');
    let hms = time.split(['.', '+']).next()?;
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_times_convert_to_unix_seconds() {
        assert_eq!(chrono_secs("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            chrono_secs("2026-11-22T15:34:52.246485767Z"),
            Some(1_795_361_692)
        );
        assert_eq!(chrono_secs("garbage"), None);
    }

    #[test]
    fn a_tar_seals_like_the_tree_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        std::os::unix::fs::symlink("tool", root.join("bin/alias")).unwrap();
        std::fs::hard_link(root.join("bin/tool"), root.join("bin/again")).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all(".", &root).unwrap();
        let bytes = b.into_inner().unwrap();
        let from_tar = seal_tar(bytes.as_slice()).unwrap();
        let from_tree = seal::seal_tree(&root).unwrap();
        assert_eq!(seal::diff(&from_tree, &from_tar), vec![]);
        assert_eq!(from_tar.root, from_tree.root);
    }

    #[test]
    fn engine_additions_are_not_drift_but_changes_are() {
        let e = |path: &str, hash: &str| Entry {
            path: path.into(),
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 1,
            hash: Some(hash.into()),
            target: None,
        };
        let sealed = Seal::from_entries(vec![e("app", "1")]);
        let exported = Seal::from_entries(vec![
            e("app", "2"),
            e(".dockerenv", "0"),
            e("etc/hosts", "0"),
            e("data", "0"),
            e("evil", "0"),
        ]);
        let d = drift_of(&sealed, &exported, &["/data"]);
        let paths: Vec<&str> = d.iter().map(|d| d.path()).collect();
        assert_eq!(paths, ["app", "evil"]);
    }
}
