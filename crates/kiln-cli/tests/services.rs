//! Real services, end to end: the `examples/shop` project (stock Debian
//! nginx in front of a Python app that keeps its data in PostgreSQL on a
//! volume, each finding the next by name) deployed from the shared Debian
//! fixture, with a probe server that tries what no server may do. One test
//! in steps, so the Debian base is imported and nginx and PostgreSQL are
//! installed once. Real `kiln` binary, real sandboxes, the Debian mirror
//! for `apt-get`; root and debootstrap needed.

mod support;

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

const SUBNET: &str = "10.77.93.0/24";

/// The probe: tries, as root with the default capabilities, what a server
/// must not be able to do, and says what happened.
const PROBE: &str = r#"#!/bin/sh
try() { if out=$("$@" 2>&1); then echo "ALLOWED: $*"; else echo "REFUSED: $*: $out"; fi; }
try sh -c 'echo 4294967296 > /sys/fs/cgroup/memory.max'
try mkdir /sys/fs/cgroup/escape
try sh -c 'echo evil > /proc/sys/kernel/domainname'
try mount -t tmpfs none /mnt
try unshare --mount true
try unshare --user --map-root-user true
grep -E '^(Seccomp|NoNewPrivs|CapEff|CapBnd):' /proc/self/status
echo PROBE-DONE
# The first process of its server: SIGTERM would be ignored without a trap.
trap 'exit 0' TERM
sleep infinity &
wait
"#;

/// Docker's default capability set as a `/proc/PID/status` mask: CHOWN,
/// DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP,
/// NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP.
const DOCKER_CAPS: &str = "00000000a80425fb";

/// `examples/shop` copied into a scratch project, its base imported from
/// the shared Debian fixture, on this test's subnet, plus the probe.
fn shop() -> Project {
    let p = Project::new();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/shop");
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", example.display()))
        .arg(p.path())
        .status()
        .unwrap();
    assert!(st.success(), "copy of examples/shop");
    let spec = fs::read_to_string(p.path().join("kiln.toml")).unwrap();
    let base = debian::debian_rootfs();
    let spec = spec
        .replace(
            r#"from = { debootstrap = "bookworm" }"#,
            &format!("from = {{ rootfs = \"{}\" }}", base.display()),
        )
        .replace(
            r#"subnet = "10.88.20.0/24""#,
            &format!("subnet = \"{SUBNET}\""),
        );
    assert!(spec.contains("rootfs") && spec.contains(SUBNET), "{spec}");
    p.write(
        "kiln.toml",
        &format!(
            "{spec}\n[images.probe]\nfrom = \"base\"\nentrypoint = [\"/usr/local/bin/probe\"]\n\
             [env.staging.roles.probe]\nimage = \"probe\"\n"
        ),
    );
    let probe = p.write("images/probe/files/usr/local/bin/probe", PROBE);
    fs::set_permissions(probe, fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// One HTTP/1.0 request to `addr:80`; the status and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let to: SocketAddr = format!("{addr}:80").parse().unwrap();
    let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .map_err(|e| format!("connect {to}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let (head, body) = out.split_once("\r\n\r\n").ok_or(out.clone())?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(head.to_string())?;
    Ok((status, body.to_string()))
}

/// The server of `role` (the first one).
fn server(p: &Project, role: &str) -> serde_json::Value {
    p.servers()
        .into_iter()
        .find(|s| s["role"] == role)
        .unwrap_or_else(|| panic!("no {role} server"))
}

/// Every process in the pid namespace of `pid`: (cmdline, status).
fn processes(pid: i64) -> Vec<(String, String)> {
    let ns = fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|p| fs::read_link(p.path().join("ns/pid")).is_ok_and(|n| n == ns))
        .filter_map(|p| {
            let cmd = fs::read(p.path().join("cmdline")).ok()?;
            let status = fs::read_to_string(p.path().join("status")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            Some((cmd.trim().to_string(), status))
        })
        .collect()
}

/// A field of a `/proc/PID/status` text.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

/// The real uid of a process, from its status.
fn uid(status: &str) -> u32 {
    field(status, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The uid of `user` in an image root's `/etc/passwd`.
fn uid_in(root: &Path, user: &str) -> u32 {
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == user).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no {user} in the image"))
}

/// The md5 dpkg recorded for a conffile in an image root.
fn packaged_md5(root: &Path, conffile: &str) -> String {
    let status = fs::read_to_string(root.join("var/lib/dpkg/status")).unwrap();
    status
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(conffile)).then(|| f.next().unwrap().to_string())
        })
        .unwrap_or_else(|| panic!("dpkg knows no conffile {conffile}"))
}

fn md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `kiln drift staging --json`: its exit code and report.
fn drift(p: &Project) -> (i32, String) {
    let r = p.kiln(&["drift", "staging", "--json"]);
    assert!(r.code == 0 || r.code == 2, "drift failed: {}", r.stderr);
    (r.code, r.stdout)
}

#[test]
fn the_shop_runs_debian_software_as_debian_ships_it() {
    let p = shop();
    p.kiln(&["image", "build", "--all"]).ok();
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let lb = server(&p, "lb");
    let lb_addr = lb["address"].as_str().unwrap().to_string();

    // Stock nginx: its packaged nginx.conf, a root master and www-data workers.
    let lb_root = p.root_of("lb");
    assert_eq!(
        md5(&lb_root.join("etc/nginx/nginx.conf")),
        packaged_md5(&lb_root, "/etc/nginx/nginx.conf"),
        "nginx.conf is the packaged one"
    );
    let www_data = uid_in(&lb_root, "www-data");
    let nginx = processes(lb["pid"].as_i64().unwrap());
    let masters: Vec<_> = nginx
        .iter()
        .filter(|(c, _)| c.starts_with("nginx: master process"))
        .collect();
    let workers: Vec<_> = nginx
        .iter()
        .filter(|(c, _)| c.starts_with("nginx: worker process"))
        .collect();
    assert_eq!(masters.len(), 1, "{nginx:?}");
    assert_eq!(uid(&masters[0].1), 0);
    assert!(!workers.is_empty(), "no nginx worker: {nginx:?}");
    for (_, status) in &workers {
        assert_eq!(uid(status), www_data, "a worker is not www-data");
    }

    // Through nginx to the app, which writes to PostgreSQL found as `db`.
    assert_eq!(
        http(&lb_addr, "POST", "/notes", "first note"),
        Ok((201, "added\n".into()))
    );
    assert_eq!(
        http(&lb_addr, "GET", "/notes", ""),
        Ok((200, "first note\n".into()))
    );
    let db = server(&p, "db");
    let db_addr = db["address"].as_str().unwrap();
    let resolved = p.kiln(&["--json", "dns", "staging", "db"]).ok().json();
    assert_eq!(resolved["addresses"], serde_json::json!([db_addr]));

    // PostgreSQL runs as postgres, on its volume.
    let db_root = p.root_of("db");
    let postgres = uid_in(&db_root, "postgres");
    let procs = processes(db["pid"].as_i64().unwrap());
    assert!(
        procs.iter().any(|(c, _)| c.contains("postgres -D")),
        "{procs:?}"
    );
    for (cmd, status) in &procs {
        assert_eq!(uid(status), postgres, "{cmd} is not postgres");
    }
    // The provider's layout: `volumes/ENV/ROLE-SLOT/NAME`; one db, slot 0.
    let volume = p.store().join("volumes/staging/db-0/data");
    let meta = fs::metadata(&volume).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (postgres, 0o700),
        "the volume takes its mount point's owner and mode"
    );
    assert!(volume.join("PG_VERSION").is_file());

    // A healthy fleet writing its data has no drift; an executable dropped
    // into the database's volume is drift.
    let (code, report) = drift(&p);
    assert_eq!(code, 0, "drift on the healthy shop: {report}");
    let dropped = volume.join("payload");
    fs::write(&dropped, "#!/bin/sh\nexec sh\n").unwrap();
    fs::set_permissions(&dropped, fs::Permissions::from_mode(0o755)).unwrap();
    let (code, report) = drift(&p);
    assert_eq!(code, 2, "{report}");
    assert!(report.contains("payload"), "{report}");
    fs::remove_file(&dropped).unwrap();

    // A cold replacement of the database (its environment changed) keeps
    // the data: the new server finds its cluster on the volume.
    let spec = fs::read_to_string(p.path().join("kiln.toml")).unwrap();
    let at = spec.find("[env.staging.roles.db]").unwrap();
    let (head, tail) = spec.split_at(at);
    let tail = tail.replacen(
        r#"env = { DB_PASSWORD = "shop-demo" }"#,
        r#"env = { DB_PASSWORD = "shop-demo", PGAPPNAME = "shop" }"#,
        1,
    );
    assert_ne!(tail, spec[at..], "the db role's env was not found");
    p.write("kiln.toml", &format!("{head}{tail}"));
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let new_db = server(&p, "db");
    assert_ne!(new_db["id"], db["id"], "the db server was not replaced");
    wait_until("the notes through the new database", || {
        http(&lb_addr, "GET", "/notes", "") == Ok((200, "first note\n".into()))
    });
    assert_eq!(
        http(&lb_addr, "POST", "/notes", "second note"),
        Ok((201, "added\n".into()))
    );
    assert_eq!(
        http(&lb_addr, "GET", "/notes", ""),
        Ok((200, "first note\nsecond note\n".into()))
    );

    // Every server is under seccomp with no_new_privileges; daemons running
    // as a user hold no capability.
    for s in p.servers() {
        let pid = s["pid"].as_i64().unwrap();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert_eq!(field(&status, "Seccomp"), "2", "{}", s["id"]);
        assert_eq!(field(&status, "NoNewPrivs"), "1", "{}", s["id"]);
        assert_eq!(field(&status, "CapBnd"), DOCKER_CAPS, "{}", s["id"]);
        let want = if uid(&status) == 0 {
            DOCKER_CAPS
        } else {
            "0000000000000000"
        };
        assert_eq!(field(&status, "CapEff"), want, "{}", s["id"]);
    }

    // Inside a server, as root: nothing that would lift its limits works.
    let probe = server(&p, "probe");
    let id = probe["id"].as_str().unwrap().to_string();
    let log = || p.kiln(&["logs", "staging", &id]).ok().stdout;
    wait_until("the probe's report", || log().contains("PROBE-DONE"));
    let report = log();
    assert!(!report.contains("ALLOWED"), "{report}");
    assert_eq!(report.matches("REFUSED").count(), 6, "{report}");
    // Refused for the right reasons: read-only mounts, then seccomp and
    // the capability set.
    assert_eq!(
        report.matches("Read-only file system").count(),
        3,
        "{report}"
    );
    let unshares = report.matches("unshare failed: Operation not permitted");
    assert_eq!(unshares.count(), 2, "{report}");
    for line in [
        "Seccomp:\t2",
        "NoNewPrivs:\t1",
        &format!("CapEff:\t{DOCKER_CAPS}"),
        &format!("CapBnd:\t{DOCKER_CAPS}"),
    ] {
        assert!(report.contains(line), "no `{line}` in {report}");
    }
}
