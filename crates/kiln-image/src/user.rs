//! Users of an image: a declared `user` resolved against the image's own
//! `/etc/passwd` and `/etc/group`, the way Docker (runc) resolves
//! `--user`: a name must exist in passwd; a numeric uid need not (its
//! group is then 0, as in Docker); supplementary groups are the groups of
//! `/etc/group` that list the user's name; `:GROUP` replaces the primary
//! group and must exist when it is a name.
//!
//! The files are read from inside the root without following symlinks: a
//! root whose `/etc/passwd` is a link (possibly to a host file) is refused.

use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kiln_model::{IdRef, ResolvedUser, UserSpec};

/// Why a declared user could not be resolved in an image.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The name is not in the image's passwd.
    #[error("user `{0}` is not defined in the image's /etc/passwd")]
    NoSuchUser(String),
    /// The group name is not in the image's group file.
    #[error("group `{0}` is not defined in the image's /etc/group")]
    NoSuchGroup(String),
    /// passwd or group is a symlink, a directory, or unreadable.
    #[error("cannot read {}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One line of `/etc/passwd`.
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// One line of `/etc/group`.
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Resolves `spec` against the passwd and group files of the image root
/// `root` (a directory on the host).
pub fn resolve_user(root: &Path, spec: &UserSpec) -> Result<ResolvedUser, UserError> {
    let passwd = read_db(root, "etc/passwd")?;
    let users: Vec<PasswdEntry> = passwd.lines().filter_map(parse_passwd).collect();
    let found = match &spec.user {
        IdRef::Name(n) => Some(
            users
                .iter()
                .find(|u| &u.name == n)
                .ok_or_else(|| UserError::NoSuchUser(n.clone()))?,
        ),
        IdRef::Id(id) => users.iter().find(|u| u.uid == *id),
    };
    let mut out = match (found, &spec.user) {
        (Some(u), _) => ResolvedUser {
            name: Some(u.name.clone()),
            uid: u.uid,
            gid: u.gid,
            additional_gids: Vec::new(),
            home: Some(u.home.clone()).filter(|h| !h.is_empty()),
        },
        (None, IdRef::Id(id)) => ResolvedUser {
            name: None,
            uid: *id,
            gid: 0,
            additional_gids: Vec::new(),
            home: None,
        },
        (None, IdRef::Name(n)) => return Err(UserError::NoSuchUser(n.clone())),
    };
    // Only read the group file when something needs it: many minimal roots have none.
    if spec.group.is_some() || out.name.is_some() {
        let group = read_db(root, "etc/group")?;
        let groups: Vec<GroupEntry> = group.lines().filter_map(parse_group).collect();
        match &spec.group {
            Some(IdRef::Id(g)) => out.gid = *g,
            Some(IdRef::Name(g)) => {
                out.gid = groups
                    .iter()
                    .find(|e| &e.name == g)
                    .map(|e| e.gid)
                    .ok_or_else(|| UserError::NoSuchGroup(g.clone()))?
            }
            None => {}
        }
        if let Some(name) = &out.name {
            let mut extra: Vec<u32> = groups
                .iter()
                .filter(|g| g.members.iter().any(|m| m == name) && g.gid != out.gid)
                .map(|g| g.gid)
                .collect();
            extra.sort_unstable();
            extra.dedup();
            out.additional_gids = extra;
        }
    }
    Ok(out)
}

/// A passwd or group file of the root; empty when it does not exist.
fn read_db(root: &Path, rel: &str) -> Result<String, UserError> {
    let path = root.join(rel);
    let unreadable = |source: std::io::Error| UserError::Unreadable {
        path: Path::new("/").join(rel),
        source,
    };
    // `etc` itself must be a real directory, or `etc/passwd` could resolve
    // anywhere on the host.
    match fs::symlink_metadata(root.join("etc")) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(unreadable(std::io::Error::other(
                "/etc is not a directory (a symlink is not followed)",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(unreadable(e)),
    }
    let mut f = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(unreadable(e)),
    };
    let meta = f.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(unreadable(std::io::Error::other("not a regular file")));
    }
    // A passwd file is small; a huge one is not a passwd file.
    let mut text = String::new();
    (&mut f)
        .take(16 << 20)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    Ok(text)
}

fn parse_passwd(line: &str) -> Option<PasswdEntry> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 7 || f[0].is_empty() || f[0].starts_with('#') {
        return None;
    }
    Some(PasswdEntry {
        name: f[0].to_string(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: f[5].to_string(),
    })
}

fn parse_group(line: &str) -> Option<GroupEntry> {
    let f: Vec<&str> = line.split(':').collect();
    if f.len() < 4 || f[0].is_empty() || f[0].starts_with('#') {
        return None;
    }
    Some(GroupEntry {
        name: f[0].to_string(),
        gid: f[2].parse().ok()?,
        members: f[3]
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\npostgres:x:102:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\nbroken line\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nadm:x:4:postgres\nwww-data:x:33:\npostgres:x:104:\nssl-cert:x:108:postgres, www-data\n",
        )
        .unwrap();
        dir
    }

    fn resolve(root: &Path, spec: &str) -> Result<ResolvedUser, UserError> {
        resolve_user(root, &spec.parse().unwrap())
    }

    #[test]
    fn names_ids_and_groups_resolve_like_docker() {
        let r = root();
        let pg = resolve(r.path(), "postgres").unwrap();
        assert_eq!(
            (
                pg.uid,
                pg.gid,
                pg.additional_gids.clone(),
                pg.home.as_deref()
            ),
            (102, 104, vec![4, 108], Some("/var/lib/postgresql"))
        );
        let www = resolve(r.path(), "www-data:adm").unwrap();
        assert_eq!((www.uid, www.gid, www.additional_gids), (33, 4, vec![108]));
        // A known uid takes its passwd entry; an unknown one gets group 0.
        assert_eq!(
            resolve(r.path(), "33").unwrap().name.as_deref(),
            Some("www-data")
        );
        let anon = resolve(r.path(), "4242").unwrap();
        assert_eq!((anon.uid, anon.gid, anon.name), (4242, 0, None));
        assert_eq!(resolve(r.path(), "4242:4343").unwrap().gid, 4343);
    }

    #[test]
    fn unknown_names_and_linked_files_are_refused() {
        let r = root();
        assert_eq!(
            resolve(r.path(), "nginx").unwrap_err().to_string(),
            "user `nginx` is not defined in the image's /etc/passwd"
        );
        assert_eq!(
            resolve(r.path(), "postgres:wheel").unwrap_err().to_string(),
            "group `wheel` is not defined in the image's /etc/group"
        );
        // Without a passwd only numeric users resolve.
        let empty = tempfile::tempdir().unwrap();
        assert!(resolve(empty.path(), "postgres").is_err());
        assert_eq!(resolve(empty.path(), "1000:1000").unwrap().gid, 1000);
        // A passwd that is a link to a host file is not read.
        fs::remove_file(r.path().join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.path().join("etc/passwd")).unwrap();
        let err = resolve(r.path(), "root").unwrap_err();
        assert!(matches!(err, UserError::Unreadable { .. }), "{err}");
    }
}
