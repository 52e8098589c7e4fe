//! The hardening policy of an image: paths it may not contain (`forbid`,
//! globs over absolute paths), packages it may not have installed
//! (`forbid_packages`), and whether setuid/setgid files are denied or only
//! reported (`setuid`). Also lists the files `kiln image show` reports:
//! setuid/setgid and world-writable ones.
//!
//! Everything is decided from the seal (the exact files of the version)
//! and the SBOM's packages; nothing here reads the root again.

use std::collections::{BTreeMap, BTreeSet};

use globset::{GlobBuilder, GlobMatcher};
use kiln_model::{Hardening, SetuidPolicy};
use serde::Serialize;

use crate::error::{ImageError, Result};
use crate::sbom::Package;
use crate::seal::{Kind, Seal};

/// A file with a special mode: setuid, setgid or world-writable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpecialFile {
    /// Absolute path in the image.
    pub path: String,
    /// Permission bits in octal, `4755`.
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    #[serde(rename = "type")]
    pub kind: Kind,
}

impl SpecialFile {
    fn of(e: &crate::seal::Entry) -> SpecialFile {
        SpecialFile {
            path: format!("/{}", e.path),
            mode: format!("{:04o}", e.mode),
            uid: e.uid,
            gid: e.gid,
            kind: e.kind,
        }
    }
}

/// Regular files with the setuid or setgid bit, in path order.
pub fn setuid_files(seal: &Seal) -> Vec<SpecialFile> {
    seal.entries
        .iter()
        .filter(|e| e.kind == Kind::File && e.mode & 0o6000 != 0)
        .map(SpecialFile::of)
        .collect()
}

/// Files and directories anyone may write (symlinks, always 0777, are
/// not), in path order. Sticky directories such as `/tmp` are included:
/// their mode says it.
pub fn world_writable(seal: &Seal) -> Vec<SpecialFile> {
    seal.entries
        .iter()
        .filter(|e| e.kind != Kind::Symlink && e.mode & 0o002 != 0)
        .map(SpecialFile::of)
        .collect()
}

/// What breaks the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Violation {
    /// A path matching a `forbid` pattern.
    ForbiddenPath {
        path: String,
        pattern: String,
        /// The name the pattern matched, when it reached the file through
        /// a directory symlink (`/bin/bash` for `/usr/bin/bash`).
        #[serde(skip_serializing_if = "Option::is_none")]
        via: Option<String>,
    },
    /// An installed package named in `forbid_packages`.
    ForbiddenPackage { package: String, version: String },
    /// A setuid or setgid file under `setuid = "deny"`.
    Setuid { path: String, mode: String },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::ForbiddenPath { path, pattern, via } => match via {
                Some(v) => write!(f, "forbidden file {path} (as {v}, matches `{pattern}`)"),
                None => write!(f, "forbidden file {path} (matches `{pattern}`)"),
            },
            Violation::ForbiddenPackage { package, version } => {
                write!(f, "forbidden package {package} {version}")
            }
            Violation::Setuid { path, mode } => {
                write!(
                    f,
                    "setuid/setgid file {path} (mode {mode}; setuid = \"deny\")"
                )
            }
        }
    }
}

/// Every violation of `policy` by a version with this seal and these
/// packages (`None`: no package database), in a stable order.
pub fn check(
    policy: &Hardening,
    seal: &Seal,
    packages: Option<&[Package]>,
) -> Result<Vec<Violation>> {
    let mut out = Vec::new();
    if !policy.forbid.is_empty() {
        let globs: Vec<(String, GlobMatcher)> = policy
            .forbid
            .iter()
            .map(|p| {
                GlobBuilder::new(p)
                    .literal_separator(true)
                    .build()
                    .map(|g| (p.clone(), g.compile_matcher()))
                    .map_err(|e| ImageError::Input {
                        image: String::new(),
                        reason: format!("forbid pattern `{p}`: {e}"),
                    })
            })
            .collect::<Result<_>>()?;
        let aliases = aliases(seal);
        for e in &seal.entries {
            let path = format!("/{}", e.path);
            let names =
                std::iter::once(path.clone()).chain(aliases.iter().filter_map(|(link, target)| {
                    e.path
                        .strip_prefix(target.as_str())
                        .and_then(|rest| rest.strip_prefix('/'))
                        .map(|rest| format!("/{link}/{rest}"))
                }));
            'names: for name in names {
                for (pattern, g) in &globs {
                    if g.is_match(&name) {
                        out.push(Violation::ForbiddenPath {
                            path: path.clone(),
                            pattern: pattern.clone(),
                            via: (name != path).then_some(name),
                        });
                        break 'names;
                    }
                }
            }
        }
    }
    if let Some(pkgs) = packages {
        let wanted: BTreeSet<&str> = policy.forbid_packages.iter().map(String::as_str).collect();
        for p in pkgs {
            if wanted.contains(p.name.as_str()) {
                out.push(Violation::ForbiddenPackage {
                    package: p.name.clone(),
                    version: p.version.clone(),
                });
            }
        }
    }
    if policy.setuid == SetuidPolicy::Deny {
        for f in setuid_files(seal) {
            out.push(Violation::Setuid {
                path: f.path,
                mode: f.mode,
            });
        }
    }
    Ok(out)
}

/// Directory symlinks of the root (`bin` → `usr/bin` on merged-/usr
/// systems), as (link path, resolved target path), both without a leading
/// slash: a file under the target is also reachable under the link.
fn aliases(seal: &Seal) -> Vec<(String, String)> {
    let by_path: BTreeMap<&str, Kind> = seal
        .entries
        .iter()
        .map(|e| (e.path.as_str(), e.kind))
        .collect();
    let mut out = Vec::new();
    for e in &seal.entries {
        let (Kind::Symlink, Some(target)) = (e.kind, e.target.as_deref()) else {
            continue;
        };
        let base = if target.starts_with('/') {
            String::new()
        } else {
            e.path
                .rsplit_once('/')
                .map(|(d, _)| d.to_string())
                .unwrap_or_default()
        };
        let mut parts: Vec<&str> = base.split('/').filter(|s| !s.is_empty()).collect();
        for c in target.split('/') {
            match c {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                c => parts.push(c),
            }
        }
        let resolved = parts.join("/");
        if by_path.get(resolved.as_str()) == Some(&Kind::Dir) {
            out.push((e.path.clone(), resolved));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::Entry;

    fn entry(path: &str, kind: Kind, mode: u32, target: Option<&str>) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            size: 0,
            hash: (kind == Kind::File).then(|| "h".into()),
            target: target.map(Into::into),
        }
    }

    /// A merged-/usr root: `/bin` is a link to `usr/bin`.
    fn merged_usr() -> Seal {
        Seal::from_entries(vec![
            entry("bin", Kind::Symlink, 0o777, Some("usr/bin")),
            entry("usr", Kind::Dir, 0o755, None),
            entry("usr/bin", Kind::Dir, 0o755, None),
            entry("usr/bin/bash", Kind::File, 0o755, None),
            entry("usr/bin/wget", Kind::File, 0o755, None),
            entry("usr/bin/ssh", Kind::File, 0o755, None),
            entry("usr/bin/ssh-agent", Kind::File, 0o2755, None),
            entry("usr/bin/passwd", Kind::File, 0o4755, None),
            entry("usr/bin/sh", Kind::Symlink, 0o777, Some("dash")),
            entry("tmp", Kind::Dir, 0o1777, None),
            entry("srv", Kind::Dir, 0o755, None),
            entry("srv/drop", Kind::File, 0o666, None),
        ])
    }

    fn pkg(name: &str, version: &str) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            architecture: "amd64".into(),
            source: name.into(),
            source_version: version.into(),
            purl: String::new(),
        }
    }

    #[test]
    fn forbidden_paths_match_through_directory_links() {
        let policy = Hardening {
            forbid: vec![
                "/bin/bash".into(),
                "/usr/bin/ssh*".into(),
                "/usr/bin/wget".into(),
            ],
            ..Default::default()
        };
        let v = check(&policy, &merged_usr(), None).unwrap();
        let shown: Vec<String> = v.iter().map(|v| v.to_string()).collect();
        assert_eq!(
            shown,
            [
                "forbidden file /usr/bin/bash (as /bin/bash, matches `/bin/bash`)",
                "forbidden file /usr/bin/ssh (matches `/usr/bin/ssh*`)",
                "forbidden file /usr/bin/ssh-agent (matches `/usr/bin/ssh*`)",
                "forbidden file /usr/bin/wget (matches `/usr/bin/wget`)",
            ]
        );
        // `*` does not cross directories.
        let deep = Hardening {
            forbid: vec!["/usr/*".into()],
            ..Default::default()
        };
        let v = check(&deep, &merged_usr(), None).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
    }

    #[test]
    fn forbidden_packages_and_setuid() {
        let policy = Hardening {
            forbid_packages: vec!["wget".into(), "openssh-server".into()],
            setuid: SetuidPolicy::Deny,
            ..Default::default()
        };
        let pkgs = [pkg("bash", "5.2.15-2+b2"), pkg("wget", "1.21.3-1+b2")];
        let v = check(&policy, &merged_usr(), Some(&pkgs)).unwrap();
        assert_eq!(
            v,
            vec![
                Violation::ForbiddenPackage {
                    package: "wget".into(),
                    version: "1.21.3-1+b2".into()
                },
                Violation::Setuid {
                    path: "/usr/bin/passwd".into(),
                    mode: "4755".into()
                },
                Violation::Setuid {
                    path: "/usr/bin/ssh-agent".into(),
                    mode: "2755".into()
                },
            ]
        );
        // `report` only lists them.
        let report = Hardening::default();
        assert!(check(&report, &merged_usr(), Some(&pkgs))
            .unwrap()
            .is_empty());
        let listed: Vec<String> = setuid_files(&merged_usr())
            .into_iter()
            .map(|f| f.path)
            .collect();
        assert_eq!(listed, ["/usr/bin/passwd", "/usr/bin/ssh-agent"]);
    }

    #[test]
    fn world_writable_files_are_listed_but_not_links() {
        let ww: Vec<(String, String)> = world_writable(&merged_usr())
            .into_iter()
            .map(|f| (f.path, f.mode))
            .collect();
        assert_eq!(
            ww,
            [
                ("/srv/drop".to_string(), "0666".to_string()),
                ("/tmp".to_string(), "1777".to_string())
            ]
        );
    }
}
