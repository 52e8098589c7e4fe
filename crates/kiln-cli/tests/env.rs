//! End-to-end tests of environments on the local provider: real
//! libcontainer servers with read-only roots on a real bridge, real HTTP
//! health checks, real SQLite state. Each test uses its own subnet.

mod support;

use std::fs;
use std::time::{Duration, Instant};

use support::*;

/// A busybox base and a `web` image serving /srv/www with busybox httpd.
/// The entrypoint first reports, into the server's log, what it can write.
fn web_project(subnet: &str) -> Project {
    let p = Project::new();
    p.busybox_tarball("base.tar.gz");
    p.write("images/web/files/srv/www/index.html", "hello v1\n");
    p.write("images/web/files/srv/www/healthz", "ok\n");
    p.write("images/store/files/srv/www/index.html", "store\n");
    p.write("images/store/files/srv/www/healthz", "ok\n");
    p.write("images/store/files/data/.keep", "");
    p.write(
        "kiln.toml",
        &format!(
            r#"
[project]
name = "fleet"

[images.base]
from = {{ rootfs = "base.tar.gz" }}

[images.web]
from = "base"
entrypoint = ["/bin/sh", "-c", "echo host=$(hostname); if touch /etc/probe 2>/dev/null; then echo root=WRITABLE; else echo root=READONLY; fi; touch /tmp/t && echo tmp=WRITABLE; if [ -d /data ]; then echo data >> /data/lines && echo data=WRITABLE; fi; exec /bin/busybox httpd -f -p 8080 -h /srv/www"]
ports = [8080]
health = {{ http = "/healthz", port = 8080 }}

[images.store]
from = "base"
entrypoint = ["/bin/sh", "-c", "echo host=$(hostname); if [ -d /data ]; then echo data >> /data/lines && echo data=WRITABLE; fi; exec /bin/busybox httpd -f -p 8080 -h /srv/www"]
ports = [8080]
health = {{ http = "/healthz", port = 8080 }}

[env.staging]
subnet = "{subnet}"

[env.staging.roles.db]
image = "store"
servers = 1
volumes = {{ data = "/data" }}
size = {{ cpus = 0.5, memory = "64M" }}

[env.staging.roles.web]
image = "web"
servers = 2
depends_on = ["db"]
size = {{ cpus = 0.5, memory = "64M" }}
"#
        ),
    );
    p.kiln(&["image", "build", "--all"]).ok();
    p
}

fn get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &format!("{addr}:8080").parse().ok()?,
        Duration::from_secs(1),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split("\r\n\r\n").nth(1).map(|b| b.to_string())
}

/// Sandboxes in the runtime's state: must equal the servers the state knows.
fn sandboxes(p: &Project) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p.store().join("servers/state"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn apply_fires_read_only_servers_reachable_over_http() {
    let p = web_project("10.77.1.0/24");
    let _t = Teardown(&p);
    let plan = p
        .kiln(&["plan", "staging", "--detailed-exitcode"])
        .expect(2);
    assert!(
        plan.stdout
            .contains("Plan: 3 to create, 0 to replace, 0 to destroy."),
        "{}",
        plan.stdout
    );
    let json = p.kiln(&["plan", "staging", "--json"]).ok().json();
    let changes = json["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 3);
    assert_eq!(
        (changes[0]["action"].as_str(), changes[0]["role"].as_str()),
        (Some("create"), Some("db")),
        "db first: web depends on it"
    );
    for c in changes {
        assert!(c["server"].is_string() && c["reason"].is_string());
    }
    let run = p.kiln(&["apply", "staging", "--yes"]).ok();
    assert!(
        run.stdout.contains("http://10.77.1."),
        "addresses to curl are printed: {}",
        run.stdout
    );
    // The servers outlive the kiln process that started them, and answer.
    let list = p.servers();
    assert_eq!(list.len(), 3);
    for s in &list {
        for field in [
            "id",
            "env",
            "role",
            "image",
            "image_digest",
            "address",
            "ports",
            "created",
            "health",
            "pid",
        ] {
            assert!(s.get(field).is_some(), "server list lacks {field}: {s}");
        }
        assert_eq!(s["health"], "healthy", "{s}");
        let addr = s["address"].as_str().unwrap();
        let want = if s["role"] == "db" {
            "store\n"
        } else {
            "hello v1\n"
        };
        assert_eq!(get(addr, "/").as_deref(), Some(want));
        let pid = s["pid"].as_i64().unwrap();
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
    // Inside: hostname is the id, the root is read-only, /tmp writable,
    // the declared volume writable (all printed by the entrypoint).
    let web = list.iter().find(|s| s["role"] == "web").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let log = p.kiln(&["logs", "staging", &web]).ok().stdout;
    assert!(log.contains(&format!("host={web}")), "{log}");
    assert!(
        log.contains("root=READONLY") && !log.contains("root=WRITABLE"),
        "{log}"
    );
    assert!(log.contains("tmp=WRITABLE"), "{log}");
    let db = list.iter().find(|s| s["role"] == "db").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(p
        .kiln(&["logs", "staging", &db])
        .ok()
        .stdout
        .contains("data=WRITABLE"));
    // Nothing to do once converged.
    p.kiln(&["plan", "staging", "--detailed-exitcode"])
        .expect(0);
    // Memory limit from the role's size, in the server's cgroup.
    let limit = fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/kiln/{web}/memory.limit_in_bytes"
    ))
    .unwrap_or_default();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    assert_eq!(sandboxes(&p), p.ids());
}

#[test]
fn new_image_replaces_servers_and_volumes_survive() {
    let p = web_project("10.77.2.0/24");
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let before = p.ids();
    p.write("images/web/files/srv/www/index.html", "hello v2\n");
    p.kiln(&["image", "build", "web"]).ok();
    p.write("images/store/files/srv/www/index.html", "store v2\n");
    p.kiln(&["image", "build", "store"]).ok();
    let plan = p.kiln(&["plan", "staging"]).ok();
    assert!(
        plan.stdout.contains("image changed (web@1 → web@2)"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout
            .contains("destroy first  (image changed (store@1 → store@2); cold-only"),
        "db has a volume: cold replacement: {}",
        plan.stdout
    );
    assert!(
        plan.stdout
            .contains("create first  (image changed (web@1 → web@2))"),
        "{}",
        plan.stdout
    );
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let after = p.ids();
    assert_eq!(after.len(), 3);
    assert!(
        after.iter().all(|id| !before.contains(id)),
        "every server was replaced: {before:?} → {after:?}"
    );
    for s in p.servers() {
        let want = if s["role"] == "db" {
            "store v2\n"
        } else {
            "hello v2\n"
        };
        assert_eq!(
            get(s["address"].as_str().unwrap(), "/").as_deref(),
            Some(want)
        );
    }
    // The db's volume kept the first server's line and got the second's.
    let lines = fs::read_to_string(p.store().join("volumes/staging/db-0/data/lines")).unwrap();
    assert_eq!(lines, "data\ndata\n");
    assert_eq!(sandboxes(&p), after);
    // Servers never wrote into the shared image roots.
    p.kiln(&["image", "verify", "web@1"]).ok();
    p.kiln(&["image", "verify", "store@1"]).ok();
    // Logs of destroyed servers are still there.
    assert!(p
        .kiln(&["logs", "staging", &before[0]])
        .ok()
        .stdout
        .contains("host="));
    let history = p.kiln(&["history", "staging"]).ok().stdout;
    assert_eq!(history.matches("apply").count(), 2, "{history}");
}

#[test]
fn saved_plans_apply_exactly_and_stale_plans_are_refused() {
    let p = web_project("10.77.3.0/24");
    let _t = Teardown(&p);
    let plan_file = p.path().join("plan.json");
    p.kiln(&["plan", "staging", "-o", plan_file.to_str().unwrap()])
        .ok();
    let saved: serde_json::Value = serde_json::from_slice(&fs::read(&plan_file).unwrap()).unwrap();
    let mut planned: Vec<String> = saved["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["server"].as_str().unwrap().to_string())
        .collect();
    planned.sort();
    p.kiln(&["apply", "staging", plan_file.to_str().unwrap()])
        .ok();
    assert_eq!(
        p.ids(),
        planned,
        "the saved plan's server ids are the ones created"
    );
    let run = p
        .kiln(&["apply", "staging", plan_file.to_str().unwrap()])
        .expect(1);
    assert!(run.stderr.contains("the plan is stale"), "{}", run.stderr);
    // Without --yes and without a TTY, apply refuses to act.
    p.write("images/web/files/srv/www/index.html", "v3\n");
    p.kiln(&["image", "build", "web"]).ok();
    let run = p.kiln(&["apply", "staging"]).expect(1);
    assert!(
        run.stderr.contains("without confirmation; pass --yes"),
        "{}",
        run.stderr
    );
    assert_eq!(p.ids(), planned);
}

#[test]
fn unhealthy_release_fails_and_keeps_the_old_servers() {
    let p = web_project("10.77.4.0/24");
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let before = p.ids();
    fs::remove_file(p.path().join("images/web/files/srv/www/healthz")).unwrap();
    p.kiln(&["image", "build", "web"]).ok();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("-C")
        .arg(p.path())
        .args(["apply", "staging", "--yes"])
        .env("KILN_HEALTH_TIMEOUT", "2s")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("did not become healthy within 2s"),
        "{stderr}"
    );
    assert!(
        stderr.contains("root=READONLY"),
        "the log tail is shown: {stderr}"
    );
    assert_eq!(p.ids(), before, "the previous servers still run");
    for s in p.servers().iter().filter(|s| s["role"] == "web") {
        assert_eq!(
            get(s["address"].as_str().unwrap(), "/").as_deref(),
            Some("hello v1\n")
        );
    }
    assert_eq!(sandboxes(&p), before, "the unhealthy server is gone");
    assert!(p
        .kiln(&["history", "staging"])
        .ok()
        .stdout
        .contains("failed"));
}

#[test]
fn tampered_image_is_refused_at_launch() {
    let p = web_project("10.77.5.0/24");
    let _t = Teardown(&p);
    let root = p.root_of("web");
    fs::write(root.join("srv/www/index.html"), "defaced\n").unwrap();
    let run = p.kiln(&["apply", "staging", "--yes"]).expect(1);
    assert!(
        run.stderr.contains("does not match its seal")
            && run.stderr.contains("/srv/www/index.html"),
        "{}",
        run.stderr
    );
    assert!(sandboxes(&p).is_empty(), "nothing was launched");
}

#[test]
fn cold_deploy_replaces_everything() {
    let p = web_project("10.77.6.0/24");
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let before = p.ids();
    let run = p.kiln(&["deploy", "--cold", "staging", "--yes"]).ok();
    assert!(run.stderr.contains("NOT zero-downtime"), "{}", run.stderr);
    let after = p.ids();
    assert_eq!(after.len(), 3);
    assert!(after.iter().all(|id| !before.contains(id)));
    assert_eq!(sandboxes(&p), after);
}

#[test]
fn sigkill_mid_apply_then_rerun_converges_without_orphans() {
    let p = web_project("10.77.7.0/24");
    let _t = Teardown(&p);
    // Kill kiln at several points of a 3-server apply; every re-run must
    // converge to exactly the declared servers, with no stray sandbox.
    for delay_ms in [40u64, 150, 400] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("-C")
            .arg(p.path())
            .args(["deploy", "--cold", "staging", "--yes"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // The lock of the dead apply is reported as such and broken.
        let blocked = p.kiln(&["apply", "staging", "--yes"]);
        if blocked.code == 1 {
            assert!(
                blocked
                    .stderr
                    .contains("no longer exists; run `kiln unlock staging`"),
                "{}",
                blocked.stderr
            );
            p.kiln(&["unlock", "staging"]).ok();
            p.kiln(&["apply", "staging", "--yes"]).ok();
        }
        let now = p.ids();
        assert_eq!(now.len(), 3, "after a kill at {delay_ms} ms: {now:?}");
        assert_eq!(
            sandboxes(&p),
            now,
            "runtime and state agree after a kill at {delay_ms} ms"
        );
        for s in p.servers() {
            assert_eq!(s["health"], "healthy");
        }
        p.kiln(&["plan", "staging", "--detailed-exitcode"])
            .expect(0);
    }
}

#[test]
fn concurrent_apply_fails_at_once_naming_the_holder() {
    let p = web_project("10.77.8.0/24");
    let _t = Teardown(&p);
    // A first apply whose servers are slow to become healthy holds the lock.
    p.write(
        "kiln.toml",
        &fs::read_to_string(p.path().join("kiln.toml"))
            .unwrap()
            .replace(
                "exec /bin/busybox httpd",
                "sleep 2; exec /bin/busybox httpd",
            ),
    );
    p.kiln(&["image", "build", "web"]).ok();
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("-C")
        .arg(p.path())
        .args(["apply", "staging", "--yes"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        std::thread::sleep(Duration::from_millis(100));
        let r = p.kiln(&["apply", "staging", "--yes"]);
        if r.code == 1 && r.stderr.contains("is locked by") {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "never saw the lock: {}",
            r.stderr
        );
    };
    assert!(second.stderr.contains("for apply"), "{}", second.stderr);
    assert!(first.wait().unwrap().success());
    assert_eq!(p.ids().len(), 3);
}

#[test]
fn destroy_removes_every_server_and_keeps_logs() {
    let p = web_project("10.77.9.0/24");
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let before = p.ids();
    p.kiln(&["destroy", "staging", "--yes"]).ok();
    assert!(p.ids().is_empty());
    assert!(sandboxes(&p).is_empty());
    let netns: Vec<String> = fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into())
                .collect()
        })
        .unwrap_or_default();
    for id in &before {
        assert!(
            !netns.contains(&format!("kiln-{id}")),
            "network namespace of {id} left"
        );
        assert!(p
            .kiln(&["logs", "staging", id])
            .ok()
            .stdout
            .contains("host="));
    }
    let all = p.kiln(&["logs", "staging"]).ok().stdout;
    assert_eq!(all.matches("host=").count(), 3, "{all}");
}

#[test]
fn approvals_gate_apply_and_destroy_of_a_guarded_environment() {
    let p = web_fleet("10.77.11.0/24", 2, "approvals = 1", "");
    let _t = Teardown(&p);
    let as_ = |who: &str, args: &[&str]| p.kiln_env(args, &[("KILN_ACTOR", who)]);
    // No approved plan: refused before anything starts, with the way out.
    let refused = p.kiln(&["apply", "staging", "--yes"]).expect(1);
    assert!(
        refused.stderr.contains("`staging` needs 1 approval(s)")
            && refused.stderr.contains("kiln approve staging plan.json"),
        "{}",
        refused.stderr
    );
    assert!(p.servers().is_empty());
    // alice plans; she cannot approve her own plan; bob can.
    let plan = p.path().join("plan.json");
    let planned = as_("alice", &["plan", "staging", "-o", plan.to_str().unwrap()]).ok();
    assert!(
        planned
            .stdout
            .contains("needs 1 approval(s) first, by someone other than alice"),
        "{}",
        planned.stdout
    );
    let own = as_("alice", &["approve", "staging", plan.to_str().unwrap()]).expect(1);
    assert!(
        own.stderr.contains("alice made plan")
            && own.stderr.contains("someone else must approve it"),
        "{}",
        own.stderr
    );
    let ok = as_(
        "bob",
        &["--json", "approve", "staging", plan.to_str().unwrap()],
    )
    .ok()
    .json();
    assert_eq!(
        (
            ok["approvers"].clone(),
            ok["ready"].clone(),
            ok["author"].clone()
        ),
        (
            serde_json::json!(["bob"]),
            serde_json::json!(true),
            serde_json::json!("alice")
        )
    );
    // An edited copy of the approved plan is not approved.
    let edited = p.path().join("edited.json");
    fs::write(
        &edited,
        fs::read_to_string(&plan)
            .unwrap()
            .replace("new server", "new server (edited)"),
    )
    .unwrap();
    let refused = p
        .kiln(&["apply", "staging", edited.to_str().unwrap()])
        .expect(1);
    assert!(refused.stderr.contains("has 0"), "{}", refused.stderr);
    // The approved plan applies, by anyone (the pipeline).
    as_("ci-bot", &["apply", "staging", plan.to_str().unwrap()]).ok();
    assert_eq!(p.servers().len(), 2);
    let audit = p.kiln(&["--json", "audit", "staging"]).ok().json();
    let actions: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        actions.contains(&("bob".into(), "approve".into()))
            && actions.contains(&("ci-bot".into(), "apply".into())),
        "{actions:?}"
    );
    let history = p.kiln(&["history", "staging"]).ok().stdout;
    assert!(
        history.contains("approved plan") && history.contains("by alice (1 of 1)"),
        "{history}"
    );
    // Destroying it takes an approved destroy plan too.
    p.kiln(&["destroy", "staging", "--yes"]).expect(1);
    assert_eq!(p.servers().len(), 2);
    let down = p.path().join("down.json");
    as_(
        "alice",
        &["plan", "staging", "--destroy", "-o", down.to_str().unwrap()],
    )
    .ok();
    as_("bob", &["approve", "staging", down.to_str().unwrap()]).ok();
    p.kiln(&["apply", "staging", down.to_str().unwrap()]).ok();
    assert!(p.servers().is_empty());
}

#[test]
fn following_logs_picks_up_servers_created_meanwhile() {
    use std::io::BufRead;
    let p = web_project("10.77.12.0/24");
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let mut follow = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("-C")
        .arg(p.path())
        .args(["logs", "staging", "-f"])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let (seen, out) = (seen.clone(), follow.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let mut s = seen.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        })
    };
    // A rollout while `logs -f` runs: the new servers' lines appear too.
    p.write("images/web/files/srv/www/index.html", "hello v2\n");
    p.kiln(&["image", "build", "web"]).ok();
    let before = p.ids();
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let fresh: Vec<String> = p
        .ids()
        .into_iter()
        .filter(|id| !before.contains(id))
        .collect();
    assert_eq!(fresh.len(), 2);
    for id in &fresh {
        wait_until(&format!("the log of {id} in the stream"), || {
            seen.lock()
                .unwrap()
                .contains(&format!("{id:<10} | host={id}"))
        });
    }
    follow.kill().unwrap();
    follow.wait().unwrap();
    reader.join().unwrap();
}
