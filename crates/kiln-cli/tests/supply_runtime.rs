//! End-to-end tests of the supply chain at run time: an environment that
//! trusts signers runs only signed versions (at plan and at launch of a
//! saved plan), drift reports servers whose image is no longer trusted or
//! that today's advisories fail, and secrets reach servers as 0400 files on
//! a tmpfs at `/run/secrets`, owned by the server's user, and nowhere else:
//! not in `.kiln/`, history, the audit log, logs or plans. A new value
//! replaces the servers under load without a failed request. The real
//! `kiln` binary, real sandboxes and balancer; root, busybox and
//! openssh-client needed.

mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use support::load::{get, Load};
use support::*;

/// An ed25519 key pair `NAME`, `NAME.pub` in `dir`; returns the public key line.
fn keygen(dir: &Path, name: &str) -> String {
    let st = Command::new("ssh-keygen")
        .args(["-t", "ed25519", "-N", "", "-q", "-C"])
        .arg(format!("{name}@ops"))
        .arg("-f")
        .arg(dir.join(name))
        .status()
        .expect("ssh-keygen (openssh-client)");
    assert!(st.success());
    fs::read_to_string(dir.join(format!("{name}.pub")))
        .unwrap()
        .trim()
        .to_string()
}

/// An OSV record in the Debian export's shape, critical.
fn advisory(id: &str, source: &str, fixed: &str) -> String {
    serde_json::json!({
        "schema_version": "1.6.0",
        "id": id,
        "modified": "2026-11-01T00:00:00Z",
        "published": "2026-10-30T00:00:00Z",
        "aliases": [],
        "summary": format!("{source} security update"),
        "severity": [{ "type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H" }],
        "affected": [{
            "package": { "ecosystem": "Debian:12", "name": source },
            "ranges": [{ "type": "ECOSYSTEM", "events": [{ "introduced": "0" }, { "fixed": fixed }] }]
        }]
    })
    .to_string()
}

/// Kinds of `kiln drift staging --json`'s findings, with their details.
fn drift(p: &Project, env: &[(&str, &str)]) -> Vec<(String, String)> {
    let run = p.kiln_env(&["drift", "staging", "--json"], env);
    assert!(
        run.code == 0 || run.code == 2,
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    run.json()["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap().to_string(),
                f["detail"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn trusted_toml(p: &Project, signer: &str) {
    p.write(
        "kiln.toml",
        &format!(
            r#"
[project]
name = "trusted"
vulnerabilities = {{ osv = "osv" }}
[images.base]
from = {{ rootfs = "base.tar.gz" }}
[images.web]
from = "base"
entrypoint = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"]
health = {{ http = "/healthz", port = 8080 }}
[env.staging]
subnet = "10.77.93.0/24"
trust = {{ signers = ["{signer}"] }}
[env.staging.roles.web]
image = "web"
servers = 1
ports = [8080]
"#
        ),
    );
}

#[test]
fn trusted_env_runs_only_signed_images_and_drift_reports_untrusted_and_vulnerable() {
    let keys = tempfile::tempdir().unwrap();
    let alice = keygen(keys.path(), "alice");
    let bob = keygen(keys.path(), "bob");
    let p = Project::new();
    p.busybox_tarball("base.tar.gz");
    p.write("images/web/files/srv/www/index.html", "v1\n");
    p.write("images/web/files/srv/www/healthz", "ok\n");
    // A Debian 12 package database, so the image has packages to scan.
    p.write(
        "images/web/files/etc/os-release",
        "ID=debian\nVERSION_ID=\"12\"\n",
    );
    p.write(
        "images/web/files/var/lib/dpkg/status",
        "Package: busybox\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1:1.36.1-3\n\n",
    );
    p.write(
        "osv/DSA-0001-1.json",
        &advisory("DSA-0001-1", "openssl", "3.0.99-1"),
    );
    trusted_toml(&p, &alice);
    p.kiln(&["image", "build", "--all"]).ok();
    let _t = Teardown(&p);

    // Unsigned: refused at plan, naming the image.
    let refused = p.kiln(&["plan", "staging"]).expect(1);
    assert!(
        refused.stderr.contains("web@1") && refused.stderr.contains("is not signed"),
        "{}",
        refused.stderr
    );
    let alice_key = keys.path().join("alice");
    p.kiln(&["image", "sign", "web", "--key", alice_key.to_str().unwrap()])
        .ok();
    let plan = p.path().join("plan.json");
    p.kiln(&["plan", "staging", "-o", plan.to_str().unwrap()])
        .ok();

    // The saved plan is refused at launch once its signer is no longer trusted.
    trusted_toml(&p, &bob);
    let refused = p
        .kiln(&["apply", "staging", plan.to_str().unwrap(), "--yes"])
        .expect(1);
    assert!(
        refused.stderr.contains("web@1") && refused.stderr.contains("does not trust"),
        "{}",
        refused.stderr
    );
    assert!(p.ids().is_empty(), "nothing was launched");

    // Trusted again: the signed version runs.
    trusted_toml(&p, &alice);
    p.kiln(&["apply", "staging", plan.to_str().unwrap(), "--yes"])
        .ok();
    let servers = p.servers();
    let addr = format!("{}:8080", servers[0]["address"].as_str().unwrap());
    assert_eq!(get(&addr, "/").unwrap(), "v1\n");
    let clean = drift(&p, &[]);
    assert!(
        !clean
            .iter()
            .any(|(k, _)| k == "untrusted" || k == "vulnerable"),
        "{clean:?}"
    );

    // New advisories fail the running version: `vulnerable`, naming the
    // advisory, the package and both versions.
    p.write(
        "osv/DSA-0002-1.json",
        &advisory("DSA-0002-1", "busybox", "1:1.36.1-4"),
    );
    let found = drift(&p, &[]);
    let vulnerable: Vec<&String> = found
        .iter()
        .filter(|(k, _)| k == "vulnerable")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(vulnerable.len(), 1, "{found:?}");
    for word in ["web@1", "DSA-0002-1", "busybox", "1:1.36.1-3", "1:1.36.1-4"] {
        assert!(vulnerable[0].contains(word), "{word} in {}", vulnerable[0]);
    }
    let text = p.kiln(&["drift", "staging"]).expect(2);
    assert!(text.stdout.contains("vulnerable"), "{}", text.stdout);

    // The environment stops trusting alice: the server is `untrusted`.
    trusted_toml(&p, &bob);
    let found = drift(&p, &[]);
    assert!(
        found
            .iter()
            .any(|(k, d)| k == "untrusted" && d.contains("web@1")),
        "{found:?}"
    );
}

/// Runs kiln with `stdin` fed in and `KILN_AGE_IDENTITY` as given.
fn kiln_stdin(p: &Project, args: &[&str], identity: &str, stdin: &[u8]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("-C")
        .arg(p.path())
        .args(args)
        .env("KILN_AGE_IDENTITY", identity)
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
        what: format!("kiln {}", args.join(" ")),
    };
    run.ok()
}

/// What each server of `staging` says it read from `/run/secrets`, and how
/// the file looks from the host: (value served, uid of the server process,
/// file mode, file owner, is it on a tmpfs).
fn delivered(p: &Project) -> Vec<(String, String, u32, u32, bool)> {
    p.servers()
        .iter()
        .map(|s| {
            let addr = format!("{}:8080", s["address"].as_str().unwrap());
            let pid = s["pid"].as_i64().unwrap();
            let file = format!("/proc/{pid}/root/run/secrets/db_password");
            let meta = fs::metadata(&file).unwrap();
            let mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
            let tmpfs = mounts.lines().any(|l| {
                l.split_whitespace().nth(4) == Some("/run/secrets")
                    && l.split(" - ")
                        .nth(1)
                        .is_some_and(|t| t.starts_with("tmpfs "))
            });
            (
                get(&addr, "/secret").unwrap(),
                get(&addr, "/uid").unwrap().trim().to_string(),
                meta.mode() & 0o7777,
                meta.uid(),
                tmpfs,
            )
        })
        .collect()
}

/// Asserts that `value` is in none of kiln's records: the store and state
/// (`.kiln/`), plans, history, the audit log and the servers' logs.
fn nowhere(p: &Project, identity: &str, value: &str) {
    assert_eq!(
        files_containing(&p.store(), value.as_bytes()),
        Vec::<String>::new()
    );
    let env = [("KILN_AGE_IDENTITY", identity)];
    for args in [
        &["history", "staging", "--json"][..],
        &["audit", "staging", "--json"][..],
        &["logs", "staging"][..],
        &["plan", "staging", "--json"][..],
        &["server", "list", "staging", "--json"][..],
        &["drift", "staging", "--json"][..],
    ] {
        let run = p.kiln_env(args, &env);
        assert!(
            !run.stdout.contains(value) && !run.stderr.contains(value),
            "`kiln {}` shows the secret",
            args.join(" ")
        );
    }
}

#[test]
fn secrets_reach_servers_on_tmpfs_as_their_user_and_nowhere_else() {
    const FIRST: &str = "correct-horse-battery-staple-1";
    const SECOND: &str = "correct-horse-battery-staple-2";
    let identity = kiln_secrets::Identity::generate();
    let key = identity.to_secret_string().to_string();
    let env = [("KILN_AGE_IDENTITY", key.as_str())];
    let port = free_port();
    let p = Project::new();
    p.busybox_tarball("base.tar.gz");
    p.write(
        "images/web/files/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/tmp:/bin/sh\n",
    );
    p.write("images/web/files/etc/group", "root:x:0:\napp:x:1000:\n");
    // The server reads its secret as its own user and serves what it read
    // (the test's window into the server; never logged).
    p.write(
        "images/web/files/srv/start.sh",
        "mkdir -p /tmp/www\necho ok > /tmp/www/healthz\ncat /run/secrets/db_password > /tmp/www/secret\nid -u > /tmp/www/uid\nexec /bin/busybox httpd -f -p 8080 -h /tmp/www\n",
    );
    p.write(
        "kiln.toml",
        &format!(
            r#"
[project]
name = "secrets"
[images.base]
from = {{ rootfs = "base.tar.gz" }}
[images.web]
from = "base"
entrypoint = ["/bin/sh", "/srv/start.sh"]
health = {{ http = "/healthz", port = 8080 }}
[env.staging]
subnet = "10.77.94.0/24"
secrets = {{ recipients = ["{}"] }}
[env.staging.roles.web]
image = "web"
servers = 2
ports = [8080]
user = "app"
secrets = ["db_password"]
balancer = {{ listen = "127.0.0.1:{port}", port = 8080, drain_timeout = "5s" }}
"#,
            identity.recipients()[0]
        ),
    );
    kiln_stdin(
        &p,
        &["secret", "set", "staging", "db_password"],
        &key,
        FIRST.as_bytes(),
    );
    p.kiln_env(&["image", "build", "--all"], &env).ok();
    let _t = Teardown(&p);

    // Without the identity, nothing is planned: a clear error, no value.
    let no_identity = p.kiln(&["plan", "staging"]).expect(1);
    assert!(
        no_identity.stderr.contains("KILN_AGE_IDENTITY"),
        "{}",
        no_identity.stderr
    );

    let plan = p.kiln_env(&["plan", "staging", "--json"], &env).ok();
    assert!(plan.stdout.contains("db_password") && plan.stdout.contains("b3k:"));
    // A saved plan carries fingerprints: a value changed since it was made
    // refuses it (naming the secret, never a value); the value it was made
    // with applies it.
    let saved = p.path().join("first.json");
    p.kiln_env(&["plan", "staging", "-o", saved.to_str().unwrap()], &env)
        .ok();
    kiln_stdin(
        &p,
        &["secret", "set", "staging", "db_password"],
        &key,
        b"not-what-was-planned",
    );
    let stale = p
        .kiln_env(
            &["apply", "staging", saved.to_str().unwrap(), "--yes"],
            &env,
        )
        .expect(1);
    assert!(
        stale
            .stderr
            .contains("secret `db_password` of `staging` changed since the plan was made"),
        "{}",
        stale.stderr
    );
    assert!(!stale.stderr.contains("not-what-was-planned"));
    assert!(p.ids().is_empty());
    kiln_stdin(
        &p,
        &["secret", "set", "staging", "db_password"],
        &key,
        FIRST.as_bytes(),
    );
    p.kiln_env(
        &["apply", "staging", saved.to_str().unwrap(), "--yes"],
        &env,
    )
    .ok();
    let first_ids = p.ids();
    assert_eq!(first_ids.len(), 2);
    for (value, uid, mode, owner, tmpfs) in delivered(&p) {
        assert_eq!(value, FIRST);
        assert_eq!(uid, "1000");
        assert_eq!(mode, 0o400);
        assert_eq!(owner, 1000);
        assert!(tmpfs, "/run/secrets is a tmpfs");
    }
    // The host let go of its staging mounts.
    assert!(entries(&p.store().join("secrets")).is_empty());
    nowhere(&p, &key, FIRST);
    let audit = p.kiln(&["audit", "staging", "--json"]).ok().stdout;
    assert!(audit.contains("db_password (b3k:"), "{audit}");

    // A new value replaces every server through the zero-downtime path.
    kiln_stdin(
        &p,
        &["secret", "set", "staging", "db_password"],
        &key,
        SECOND.as_bytes(),
    );
    let planned = p.kiln_env(&["plan", "staging"], &env).ok();
    assert!(planned.stdout.contains("replace"), "{}", planned.stdout);
    let load = Load::start(format!("127.0.0.1:{port}"), "/healthz", 4);
    wait_until("load flows", || load.ok() > 20);
    p.kiln_env(&["apply", "staging", "--yes"], &env).ok();
    let settled = load.ok() + 20;
    wait_until("load after the apply", || load.ok() > settled);
    load.finish_clean(100);
    let second_ids = p.ids();
    assert_eq!(second_ids.len(), 2);
    assert!(
        second_ids.iter().all(|id| !first_ids.contains(id)),
        "{first_ids:?} → {second_ids:?}"
    );
    for (value, ..) in delivered(&p) {
        assert_eq!(value, SECOND);
    }
    nowhere(&p, &key, FIRST);
    nowhere(&p, &key, SECOND);
}
