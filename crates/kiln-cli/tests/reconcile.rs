//! End-to-end reconcile (self-healing, phoenix TTL, drift kill under load,
//! refusal to replace from a corrupt image) and the audit chain.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;

fn fleet(subnet: &str, extra_role: &str, extra_env: &str) -> (Project, u16) {
    let port = free_port();
    let p = web_fleet(
        subnet,
        2,
        extra_env,
        &format!("balancer = {{ listen = \"127.0.0.1:{port}\", port = 8080 }}\n{extra_role}"),
    );
    p.kiln(&["apply", "staging", "--yes"]).ok();
    (p, port)
}

#[test]
fn reconcile_replaces_a_hung_server() {
    // A server whose process is alive but answers nothing (SIGSTOP: a
    // wedged process) is not "crashed"; reconcile finds it by its health
    // checks failing in a row, and replaces it.
    let (p, _) = fleet("10.77.47.0/24", "replace_share = 100", "");
    let _t = Teardown(&p);
    let victim = p.servers()[0].clone();
    let pid = victim["pid"].as_i64().unwrap() as i32;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    );
    let dry = p.kiln(&["reconcile", "staging", "--dry-run"]).ok();
    let id = victim["id"].as_str().unwrap();
    assert!(
        dry.stdout.contains(id)
            && dry
                .stdout
                .contains("self-heal: failed 3 health checks in a row"),
        "{}",
        dry.stdout
    );
    assert_eq!(
        dry.stdout.matches("  ~ web-").count(),
        1,
        "only the hung one: {}",
        dry.stdout
    );
    p.kiln(&["reconcile", "staging", "--yes"]).ok();
    let now = p.servers();
    assert_eq!(now.len(), 2);
    assert!(
        now.iter()
            .all(|s| s["health"] == "healthy" && s["id"] != victim["id"]),
        "{now:?}"
    );
    assert!(dead(pid), "the hung process was stopped for good");
}

#[test]
fn reconcile_heals_a_killed_server() {
    let (p, _) = fleet("10.77.40.0/24", "", "");
    let _t = Teardown(&p);
    let victim = &p.servers()[0];
    let victim_pid = victim["pid"].as_i64().unwrap() as i32;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_until("the killed server's process to die", || dead(victim_pid));
    let dry = p.kiln(&["reconcile", "staging", "--dry-run"]).ok();
    assert!(
        dry.stdout.contains("has no running server"),
        "{}",
        dry.stdout
    );
    p.kiln(&["reconcile", "staging", "--yes"]).ok();
    let now = p.servers();
    assert_eq!(now.len(), 2);
    assert!(
        now.iter()
            .all(|s| s["health"] == "healthy" && s["id"] != victim["id"]),
        "{now:?}"
    );
    p.kiln(&["drift", "staging"]).expect(0);
}

#[test]
fn phoenix_rotation_respects_the_share() {
    let (p, _) = fleet("10.77.41.0/24", "ttl = \"7d\"\nreplace_share = 50", "");
    let _t = Teardown(&p);
    let first = p.ids();
    let later = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 8 * 86_400)
        .to_string();
    let run = p
        .kiln_env(&["reconcile", "staging"], &[("KILN_NOW", &later)])
        .expect(0);
    assert_eq!(
        run.stdout.matches("phoenix: past its ttl").count(),
        1,
        "one of two at a time: {}",
        run.stdout
    );
    let second = p.ids();
    assert_eq!(
        second.iter().filter(|id| first.contains(id)).count(),
        1,
        "{first:?} → {second:?}"
    );
    let run = p
        .kiln_env(&["reconcile", "staging"], &[("KILN_NOW", &later)])
        .expect(0);
    assert_eq!(run.stdout.matches("phoenix").count(), 1, "{}", run.stdout);
    let third = p.ids();
    assert!(
        third.iter().all(|id| !first.contains(id)),
        "both rotated after two passes: {first:?} → {third:?}"
    );
}

#[test]
fn drift_kill_quarantines_and_replaces_without_a_failed_request() {
    let (p, port) = fleet("10.77.42.0/24", "drift = \"kill\"", "");
    let _t = Teardown(&p);
    let target = p.servers()[0].clone();
    let pid = target["pid"].as_i64().unwrap().to_string();
    let mut intruder = std::process::Command::new("nsenter")
        .args([
            "--target",
            &pid,
            "--pid",
            "--mount",
            "--",
            "/bin/sleep",
            "300",
        ])
        .spawn()
        .unwrap();
    wait_until("the intruder inside the server", || {
        runs_in(pid.parse().unwrap(), "/bin/sleep 300")
    });
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load: Vec<_> = (0..3)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                while !stop.load(Ordering::Relaxed) {
                    let good = std::net::TcpStream::connect(("127.0.0.1", port))
                        .ok()
                        .and_then(|mut s| {
                            s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
                            let mut out = String::new();
                            s.read_to_string(&mut out).ok()?;
                            out.contains(" 200 ").then_some(())
                        });
                    if good.is_some() {
                        ok.fetch_add(1, Ordering::Relaxed)
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed)
                    };
                }
            })
        })
        .collect();
    let run = p.kiln(&["reconcile", "staging"]).ok();
    stop.store(true, Ordering::Relaxed);
    for h in load {
        h.join().unwrap();
    }
    intruder.kill().ok();
    intruder.wait().ok();
    let id = target["id"].as_str().unwrap();
    assert!(
        run.stdout
            .contains(&format!("{id}: quarantined for drift (process")),
        "{}",
        run.stdout
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the kill"
    );
    assert!(ok.load(Ordering::Relaxed) > 50);
    assert!(
        !p.ids().contains(&id.to_string()),
        "the server was replaced"
    );
    let record = std::fs::read_to_string(
        p.store()
            .join(format!("quarantine/staging/{id}/findings.json")),
    )
    .unwrap();
    assert!(record.contains("sleep 300"), "{record}");
    let audit = p.kiln(&["audit", "staging"]).ok().stdout;
    assert!(audit.contains("quarantine"), "{audit}");
}

#[test]
fn corrupt_image_is_not_used_to_replace_drifted_servers() {
    let (p, _) = fleet("10.77.43.0/24", "drift = \"replace\"", "");
    let _t = Teardown(&p);
    std::fs::write(p.root_of("web").join("srv/www/index.html"), "defaced\n").unwrap();
    let drift = p.kiln(&["drift", "staging"]).expect(2);
    assert_eq!(
        drift.stdout.matches("changed /srv/www/index.html").count(),
        2,
        "{}",
        drift.stdout
    );
    let run = p.kiln(&["reconcile", "staging"]).expect(1);
    assert!(
        run.stderr.contains("does not match its seal") && run.stderr.contains("rebuild"),
        "{}",
        run.stderr
    );
    // Repair: rebuild the image ignoring the cache; the same digest gets a
    // fresh root; servers still on the old one are drift until replaced.
    p.kiln(&["image", "build", "--no-cache", "web"]).ok();
    p.kiln(&["image", "verify", "web"]).ok();
    let drift = p.kiln(&["drift", "staging"]).expect(2);
    assert_eq!(
        drift.stdout.matches("was replaced after tampering").count(),
        2,
        "{}",
        drift.stdout
    );
    // replace_share (25% by default) lets one of the two go per pass.
    let first = p.kiln(&["reconcile", "staging"]).ok();
    assert_eq!(
        first.stdout.matches("replace web-").count(),
        1,
        "{}",
        first.stdout
    );
    // The retired root is still mounted by the other server: gc keeps it.
    let gc = p.kiln(&["image", "gc", "--json"]).ok().json();
    assert_eq!(
        (gc["retired"].as_u64(), gc["retired_in_use"].as_u64()),
        (Some(0), Some(1)),
        "{gc}"
    );
    assert_eq!(entries(&p.store().join("retired")).len(), 1);
    p.kiln(&["reconcile", "staging"]).ok();
    p.kiln(&["drift", "staging"]).expect(0);
    // Nothing mounts it any more: gc removes it.
    let gc = p.kiln(&["image", "gc", "--json"]).ok().json();
    assert_eq!(
        (gc["retired"].as_u64(), gc["retired_in_use"].as_u64()),
        (Some(1), Some(0)),
        "{gc}"
    );
    assert!(entries(&p.store().join("retired")).is_empty());
    for s in p.servers() {
        let addr = s["address"].as_str().unwrap();
        let body = std::process::Command::new("python3").arg("-c").arg(format!("import urllib.request; print(urllib.request.urlopen('http://{addr}:8080/').read().decode(), end='')")).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&body.stdout), "v1\n");
    }
}

#[test]
fn audit_chain_detects_an_edited_byte_and_alarms_non_pipeline_writes() {
    let alarms = tempfile::NamedTempFile::new().unwrap();
    let hook = format!(
        "alarm = \"cat >> {}\"\npipeline_identities = [\"ci-bot\"]",
        alarms.path().display()
    );
    let (p, _) = fleet("10.77.44.0/24", "", &hook);
    let _t = Teardown(&p);
    // The first apply was made by the OS user, not the pipeline: alarmed.
    let got = std::fs::read_to_string(alarms.path()).unwrap();
    assert!(got.contains("\"kind\":\"non_pipeline_write\""), "{got}");
    // A write by the pipeline identity raises no alarm.
    let before = std::fs::read_to_string(alarms.path()).unwrap().len();
    p.kiln_env(
        &["deploy", "--cold", "staging", "--yes"],
        &[("KILN_ACTOR", "ci-bot")],
    )
    .ok();
    assert_eq!(
        std::fs::read_to_string(alarms.path()).unwrap().len(),
        before
    );
    let log = p.kiln(&["audit", "--json"]).ok().json();
    let entries = log.as_array().unwrap();
    assert!(entries.len() >= 2);
    assert_eq!(entries.last().unwrap()["actor"], "ci-bot");
    assert_eq!(entries.last().unwrap()["pipeline"], true);
    p.kiln(&["audit", "verify"]).ok();
    // Edit one byte of the first entry, straight in the database.
    let db = p.store().join("state.db");
    let st = std::process::Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(\"UPDATE audit SET outcome = 'succeedeD' WHERE seq = 1\"); c.commit()")
        .arg(&db)
        .status()
        .unwrap();
    assert!(st.success());
    let bad = p.kiln(&["audit", "verify"]).expect(2);
    assert!(
        bad.stdout
            .contains("audit entry #1 its content does not match its hash"),
        "{}",
        bad.stdout
    );
}

#[test]
fn drift_alarm_is_posted_to_a_loopback_webhook() {
    // A real HTTP listener on loopback receives the alarm's JSON body.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = format!(
        "alarm = \"http://{}/hooks/kiln\"",
        listener.local_addr().unwrap()
    );
    let received = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = s.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length").then_some(v)
                    })
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if body.len() >= len {
                    break;
                }
            }
        }
        let _ = s.write_all(b"HTTP/1.0 204 No Content\r\n\r\n");
        String::from_utf8_lossy(&buf).into_owned()
    });
    let (p, _) = fleet("10.77.45.0/24", "drift = \"alarm\"", &hook);
    let _t = Teardown(&p);
    std::fs::write(p.root_of("web").join("srv/www/index.html"), "defaced\n").unwrap();
    let run = p.kiln(&["reconcile", "staging"]).ok();
    assert!(
        run.stdout.contains("needs nothing"),
        "alarm policy replaces nothing: {}",
        run.stdout
    );
    let got = received.join().unwrap();
    assert!(got.starts_with("POST /hooks/kiln HTTP/1.1"), "{got}");
    assert!(
        got.contains("\"kind\":\"drift\"") && got.contains("changed /srv/www/index.html"),
        "{got}"
    );
}

fn start_stray(p: &Project) -> String {
    let runtime = kiln_sandbox::Runtime::new(&p.store().join("servers"));
    let id = format!("web-stray{}", std::process::id());
    let mut stray = kiln_sandbox::SandboxSpec::readonly(
        &id,
        &p.root_of("web"),
        vec!["/bin/sleep".into(), "300".into()],
        &p.path().join("stray.log"),
    );
    stray.labels = vec![
        ("dev.kiln.env".into(), "staging".into()),
        ("dev.kiln.role".into(), "web".into()),
    ];
    runtime.start(&stray).unwrap();
    id
}

#[test]
fn unmanaged_servers_are_alarmed_or_killed_by_policy() {
    let (p, _) = fleet("10.77.46.0/24", "", "");
    let _t = Teardown(&p);
    let stray = start_stray(&p);
    // And a backend added to the balancer by hand, behind kiln's back.
    // (Through the same control file kiln writes: anyone with root can.)
    let wanted = kiln_balancer::read_backends(&p.web_front()).unwrap();
    let rogue = [wanted.backends, vec!["10.77.46.99:8080".to_string()]].concat();
    kiln_balancer::set_backends(&p.web_front(), &rogue, wanted.check.as_ref()).unwrap();
    let rogue_active = || {
        p.web_backends()
            .iter()
            .any(|b| b.addr == "10.77.46.99:8080" && b.active)
    };
    wait_until("the balancer to route to the rogue backend", rogue_active);
    // Default policy: alarm only. Reconcile leaves both in place.
    let run = p.kiln(&["reconcile", "staging"]).ok();
    assert!(
        run.stdout.contains(&format!("found {stray}: unmanaged")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("found 10.77.46.99:8080: unmanaged"),
        "{}",
        run.stdout
    );
    assert!(p.store().join("servers/state").join(&stray).exists());
    assert!(rogue_active());
    // With `unmanaged = "kill"`, reconcile removes it.
    let spec = std::fs::read_to_string(p.path().join("kiln.toml")).unwrap();
    p.write("kiln.toml", &format!("{spec}unmanaged = \"kill\"\n"));
    p.kiln(&["reconcile", "staging"]).ok();
    assert!(
        !p.store().join("servers/state").join(&stray).exists(),
        "the stray is gone"
    );
    p.kiln(&["drift", "staging"]).expect(0);
    let events = p.kiln(&["history", "staging"]).ok().stdout;
    let history = p.kiln(&["--json", "history", "staging"]).ok().json();
    let last = history["releases"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        (last["kind"].as_str(), last["summary"].as_str()),
        (
            Some("reconcile"),
            Some("0 to create, 0 to replace, 1 to destroy")
        ),
        "the stray was destroyed by a reconcile release: {events}"
    );
    assert!(
        events.contains("removed backend 10.77.46.99:8080 from the balancer of `web`"),
        "{events}"
    );
    wait_until("the balancer to drop the rogue backend", || !rogue_active());
}

#[test]
fn watch_loop_outlives_a_failing_pass_and_heals_after_the_rebuild() {
    let (p, _) = fleet("10.77.48.0/24", "drift = \"replace\"", "");
    let _t = Teardown(&p);
    std::fs::write(p.root_of("web").join("srv/www/index.html"), "defaced\n").unwrap();
    let (out, err) = (p.path().join("watch.out"), p.path().join("watch.err"));
    let mut watch = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("-C")
        .arg(p.path())
        .args(["reconcile", "staging", "--watch", "--interval", "200ms"])
        .env("NO_COLOR", "1")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let read = |f: &std::path::Path| std::fs::read_to_string(f).unwrap_or_default();
    // The image is corrupt: every pass refuses, and the loop goes on.
    wait_until("two failed passes", || {
        read(&err).matches("reconcile pass failed:").count() >= 2
    });
    assert!(
        read(&err).contains("does not match its seal"),
        "{}",
        read(&err)
    );
    // Rebuilt: the next passes replace the drifted servers, one per pass.
    p.kiln(&["image", "build", "--no-cache", "web"]).ok();
    wait_until("both servers replaced", || {
        read(&out).matches("reconciled `staging`").count() >= 2
    });
    watch.kill().unwrap();
    watch.wait().unwrap();
    p.kiln(&["drift", "staging"]).expect(0);
}

#[test]
fn reconcile_restarts_a_dead_balancer() {
    let (p, port) = fleet("10.77.49.0/24", "", "");
    let _t = Teardown(&p);
    let get = || {
        std::process::Command::new("python3").arg("-c").arg(format!("import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=5).read().decode(), end='')")).output().unwrap()
    };
    assert_eq!(String::from_utf8_lossy(&get().stdout), "v1\n");
    let pid: i32 = std::fs::read_to_string(p.web_front().join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_until("the balancer to die", || dead(pid));
    assert!(
        !get().status.success(),
        "nothing listens on the front any more"
    );
    let drift = p.kiln(&["drift", "staging"]).expect(2);
    assert!(
        drift.stdout.contains("balancer:web")
            && drift
                .stdout
                .contains("the balancer of role `web` is not running"),
        "{}",
        drift.stdout
    );
    let dry = p.kiln(&["reconcile", "staging", "--dry-run"]).ok();
    assert!(
        dry.stdout
            .contains("the balancer of `web` is not running: it would be restarted"),
        "{}",
        dry.stdout
    );
    assert!(!get().status.success(), "a dry run changes nothing");
    let run = p.kiln(&["reconcile", "staging"]).ok();
    assert!(
        run.stdout
            .contains("the balancer of `web` was not running: restarted"),
        "{}",
        run.stdout
    );
    assert_eq!(String::from_utf8_lossy(&get().stdout), "v1\n");
    let history = p.kiln(&["history", "staging"]).ok().stdout;
    assert!(
        history.contains("restarted the balancer of `web`"),
        "{history}"
    );
    p.kiln(&["drift", "staging"]).expect(0);
}
