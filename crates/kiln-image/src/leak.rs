//! Secrets never baked: finds the value of any project secret in an image
//! version, in any file's content, any path or link target, or the image
//! config (environment, labels), and names where, never what.
//!
//! The root is the union of every layer (layers are written from the
//! seal), so searching the root's files searches every layer. All values
//! are searched at once (Aho-Corasick), streaming each file, on every core.

use std::fs;
use std::io;
use std::path::Path;

use aho_corasick::AhoCorasick;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{ImageError, IoContext, Result};
use crate::seal::{Kind, Seal};

/// Values shorter than this are not searched: they would match everywhere.
pub const MIN_LEN: usize = 4;

/// A secret value to look for. `Debug` never shows the value.
pub struct Needle {
    /// `ENV/NAME`, for the report.
    pub name: String,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for Needle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Needle")
            .field("name", &self.name)
            .field("value", &"[redacted]")
            .finish()
    }
}

/// What the bake knows about the project's secrets.
#[derive(Debug, Default)]
pub enum SecretCheck {
    /// The project has no secrets: nothing to check.
    #[default]
    None,
    /// The decrypted values of every secret of the project.
    Values(Vec<Needle>),
    /// The project has secrets but they could not be decrypted (no
    /// identity): the check is skipped, and the caller says so loudly.
    Skipped { reason: String },
}

/// One place a secret was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leak {
    /// `ENV/NAME` of the secret.
    pub secret: String,
    /// `/path` in the image, or `image config`.
    pub place: String,
}

impl std::fmt::Display for Leak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "secret {} in {}", self.secret, self.place)
    }
}

/// Where the needles (at least [`MIN_LEN`] bytes long) occur in `root`
/// (sealed as `seal`) and in `config` (the image config JSON), sorted.
pub fn find(root: &Path, seal: &Seal, config: &[u8], needles: &[Needle]) -> Result<Vec<Leak>> {
    let usable: Vec<&Needle> = needles
        .iter()
        .filter(|n| n.value.len() >= MIN_LEN)
        .collect();
    if usable.is_empty() {
        return Ok(Vec::new());
    }
    let ac = AhoCorasick::new(usable.iter().map(|n| &n.value))
        .map_err(|e| ImageError::Corrupt(format!("cannot search for secrets: {e}")))?;
    let hits = |bytes: &[u8]| -> Vec<usize> {
        let mut ids: Vec<usize> = ac
            .find_iter(bytes)
            .map(|m| m.pattern().as_usize())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    };
    let mut out: Vec<Leak> = seal
        .entries
        .par_iter()
        .map(|e| -> Result<Vec<Leak>> {
            let place = format!("/{}", e.path);
            let mut ids = hits(e.path.as_bytes());
            if let Some(t) = &e.target {
                ids.extend(hits(t.as_bytes()));
            }
            if e.kind == Kind::File {
                let p = root.join(&e.path);
                let f = fs::File::open(&p).ctx("open", &p)?;
                for m in ac.stream_find_iter(io::BufReader::with_capacity(256 << 10, f)) {
                    ids.push(m.ctx("read", &p)?.pattern().as_usize());
                }
            }
            ids.sort();
            ids.dedup();
            Ok(ids
                .into_iter()
                .map(|i| Leak {
                    secret: usable[i].name.clone(),
                    place: place.clone(),
                })
                .collect())
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    for i in hits(config) {
        out.push(Leak {
            secret: usable[i].name.clone(),
            place: "image config".into(),
        });
    }
    out.sort_by(|a, b| (&a.place, &a.secret).cmp(&(&b.place, &b.secret)));
    Ok(out)
}

/// Names of needles too short to search.
pub fn too_short(needles: &[Needle]) -> Vec<String> {
    needles
        .iter()
        .filter(|n| n.value.len() < MIN_LEN)
        .map(|n| n.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_values_in_content_names_links_and_config_without_showing_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc/app")).unwrap();
        fs::write(
            root.join("etc/app/config.ini"),
            b"user=app\npassword=hunter2-very-secret\n",
        )
        .unwrap();
        fs::write(root.join("etc/app/clean"), b"nothing here").unwrap();
        // Across the stream reader's buffer boundary.
        let mut big = vec![b'x'; (256 << 10) - 5];
        big.extend_from_slice(b"hunter2-very-secret");
        fs::write(root.join("big.bin"), big).unwrap();
        std::os::unix::fs::symlink("/opt/tok-abcdef123", root.join("link")).unwrap();
        let seal = crate::seal::seal_tree(root).unwrap();
        let needles = vec![
            Needle {
                name: "staging/db_password".into(),
                value: b"hunter2-very-secret".to_vec(),
            },
            Needle {
                name: "staging/token".into(),
                value: b"tok-abcdef123".to_vec(),
            },
            Needle {
                name: "staging/pin".into(),
                value: b"12".to_vec(),
            },
        ];
        let config = br#"{"config":{"Env":["TOKEN=tok-abcdef123"]}}"#;
        let found: Vec<String> = find(root, &seal, config, &needles)
            .unwrap()
            .iter()
            .map(|l| l.to_string())
            .collect();
        assert_eq!(
            found,
            [
                "secret staging/db_password in /big.bin",
                "secret staging/db_password in /etc/app/config.ini",
                "secret staging/token in /link",
                "secret staging/token in image config",
            ]
        );
        assert_eq!(too_short(&needles), ["staging/pin"]);
        assert!(!format!("{:?}", needles[0]).contains("hunter2"));
    }
}
