//! Crash convergence, end to end: `kiln apply` killed at every journaled
//! step boundary of a rolling update, a blue-green rollout and a destroy
//! (`KILN_CRASH_AT`), each followed by a plain re-run with no `unlock`; a
//! lost state database; a relative `-C`.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use support::*;

/// A busybox `crash` image and a role of two servers behind a balancer;
/// each test names its role, so its leftovers can be told from other
/// tests' servers running at the same time.
fn crash_fleet(role: &str, subnet: &str, strategy: &str) -> (Project, u16) {
    let port = free_port();
    let p = Project::new();
    p.busybox_tarball("base.tar.gz");
    p.write("images/crash/files/srv/www/healthz", "ok\n");
    p.write(
        "kiln.toml",
        &format!(
            r#"
[project]
name = "crash"
[images.base]
from = {{ rootfs = "base.tar.gz" }}
[images.crash]
from = "base"
entrypoint = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"]
health = {{ http = "/healthz", port = 8080 }}
[env.staging]
subnet = "{subnet}"
[env.staging.roles.{role}]
image = "crash"
servers = 2
ports = [8080]
env = {{ ROUND = "0" }}
balancer = {{ listen = "127.0.0.1:{port}", port = 8080, drain_timeout = "2s" }}
{strategy}
"#
        ),
    );
    p.kiln(&["image", "build", "--all"]).ok();
    (p, port)
}

/// Ten hex digits of FNV-1a, as the local provider names bridges.
fn hash10(s: &str) -> String {
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{h:016x}")[..10].to_string()
}

/// What the host has of this test's servers: network namespaces, cgroups,
/// container states, mounts, and the veths on the environment's bridge.
fn host_leftovers(p: &Project, role: &str) -> (BTreeSet<String>, usize, usize, usize) {
    let prefix = format!("{role}-");
    let ids = |dir: &Path| -> BTreeSet<String> {
        fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter_map(|n| {
                        n.strip_prefix("kiln-")
                            .unwrap_or(&n)
                            .starts_with(&prefix)
                            .then(|| n.trim_start_matches("kiln-").to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut seen = ids(Path::new("/var/run/netns"));
    seen.extend(ids(&p.store().join("servers/state")));
    let cgroups = fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .map(|c| ids(&c.path().join("kiln")).len())
        .max()
        .unwrap_or(0);
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&format!("kiln-{prefix}")))
        .count();
    let store = fs::canonicalize(p.store()).unwrap();
    let bridge = format!("kb-{}", hash10(&format!("{}:staging", store.display())));
    let veths = fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
        .map(|d| d.count())
        .unwrap_or(0);
    (seen, cgroups, mounts, veths)
}

/// Asserts the environment is what it declares and nothing else: `want`
/// servers running (all on `round`), every sandbox, namespace, cgroup,
/// mount and veth one of theirs, drift clean.
fn assert_converged(p: &Project, role: &str, want: usize, round: &str, what: &str) {
    let servers = p.servers();
    let running: BTreeSet<String> = servers
        .iter()
        .filter(|s| s["status"] == "running")
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(running.len(), want, "{what}: {servers:?}");
    let known: BTreeSet<String> = servers
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    for s in &servers {
        let pid = s["pid"].as_i64().unwrap();
        let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&environ).contains(&format!("ROUND={round}")),
            "{what}: {} runs another round",
            s["id"]
        );
    }
    let (seen, cgroups, mounts, veths) = host_leftovers(p, role);
    assert_eq!(
        seen, known,
        "{what}: namespaces and sandboxes are the servers'"
    );
    assert_eq!(cgroups, known.len(), "{what}: cgroups");
    assert_eq!(mounts, known.len(), "{what}: netns mounts");
    assert_eq!(veths, known.len(), "{what}: veths on the bridge");
    p.kiln(&["drift", "staging"]).expect(0);
}

fn set_round(p: &Project, round: u32) {
    let spec = fs::read_to_string(p.path().join("kiln.toml")).unwrap();
    let line = spec
        .lines()
        .find(|l| l.starts_with("env = { ROUND"))
        .unwrap()
        .to_string();
    fs::write(
        p.path().join("kiln.toml"),
        spec.replace(&line, &format!("env = {{ ROUND = \"{round}\" }}")),
    )
    .unwrap();
}

#[test]
fn a_kill_at_every_boundary_of_a_rolling_update_converges() {
    let (p, port) = crash_fleet("crashroll", "10.77.60.0/24", "");
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let covered = crash_everywhere(
        &p,
        &["apply", "staging", "--yes"],
        |round| set_round(&p, round),
        |round| {
            assert_converged(
                &p,
                "crashroll",
                2,
                &round.to_string(),
                &format!("rolling, boundary {round}"),
            );
            assert!(!p
                .kiln(&["server", "list", "staging"])
                .stdout
                .contains("destroying"));
            let _ = port;
        },
    );
    assert!(covered >= 6, "boundaries covered: {covered}");
    let history = p.kiln(&["history", "staging"]).ok().stdout;
    assert!(history.contains("lock takeover"), "{history}");
}

#[test]
fn a_kill_at_every_boundary_of_a_blue_green_rollout_converges() {
    let (p, _) = crash_fleet(
        "crashbg",
        "10.77.61.0/24",
        "strategy = { kind = \"blue_green\", rollback_window = \"0s\" }",
    );
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let covered = crash_everywhere(
        &p,
        &["apply", "staging", "--yes"],
        |round| set_round(&p, round),
        |round| {
            // The previous set may wait out its (empty) window on standby;
            // one more apply collects it.
            p.kiln(&["apply", "staging", "--yes"]).ok();
            assert_converged(
                &p,
                "crashbg",
                2,
                &round.to_string(),
                &format!("blue-green, boundary {round}"),
            );
        },
    );
    assert!(covered >= 4, "boundaries covered: {covered}");
}

#[test]
fn a_kill_at_every_boundary_of_a_destroy_converges() {
    let (p, _) = crash_fleet("crashdown", "10.77.62.0/24", "");
    let covered = crash_everywhere(
        &p,
        &["destroy", "staging", "--yes"],
        |_| {
            p.kiln(&["apply", "staging", "--yes"]).ok();
        },
        |at| {
            assert!(p.servers().is_empty(), "destroy, boundary {at}");
            let (seen, cgroups, mounts, veths) = host_leftovers(&p, "crashdown");
            assert!(
                seen.is_empty() && cgroups == 0 && mounts == 0 && veths == 0,
                "destroy, boundary {at}: {seen:?} {cgroups} {mounts} {veths}"
            );
        },
    );
    assert!(covered >= 4, "boundaries covered: {covered}");
}

#[test]
fn a_lost_state_database_is_refused_then_adopted() {
    let (p, port) = crash_fleet("crashlost", "10.77.63.0/24", "");
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let before = p.ids();
    // The state is emptied behind kiln's back; the servers still run.
    for f in ["state.db-wal", "state.db-shm"] {
        let _ = fs::remove_file(p.store().join(f));
    }
    fs::write(p.store().join("state.db"), "").unwrap();
    for args in [
        &["plan", "staging"][..],
        &["apply", "staging", "--yes"],
        &["reconcile", "staging", "--yes"],
    ] {
        let refused = p.kiln(args).expect(1);
        assert!(
            refused
                .stderr
                .contains("the state has no record of `staging`")
                && refused.stderr.contains("--adopt"),
            "{args:?}: {}",
            refused.stderr
        );
    }
    assert_eq!(
        host_leftovers(&p, "crashlost").0.len(),
        2,
        "nothing was killed as a stray"
    );
    let load_ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    assert!(load_ok, "the front still serves");
    p.kiln(&["apply", "staging", "--adopt", "--yes"]).ok();
    assert_eq!(p.ids(), before, "the same servers, adopted");
    assert!(p
        .kiln(&["plan", "staging"])
        .ok()
        .stdout
        .contains("No changes"));
    // The audit log was reset with the database: its anchor says so.
    let verify = p.kiln(&["audit", "verify"]).expect(2);
    assert!(
        verify.stdout.contains("reset or cut short"),
        "{}",
        verify.stdout
    );
}

#[test]
fn a_relative_project_directory_works_from_anywhere() {
    let (p, _) = crash_fleet("crashrel", "10.77.64.0/24", "");
    let _t = Teardown(&p);
    let parent = p.path().parent().unwrap();
    let name = p.path().file_name().unwrap().to_str().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .current_dir(parent)
            .arg("-C")
            .arg(name)
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    let out = run(&["apply", "staging", "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same environment seen through an absolute path: one bridge, no changes.
    assert!(p
        .kiln(&["plan", "staging"])
        .ok()
        .stdout
        .contains("No changes"));
    assert_eq!(
        host_leftovers(&p, "crashrel").3,
        2,
        "both servers on the one bridge"
    );
}
