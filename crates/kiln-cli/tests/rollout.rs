//! Zero downtime under load: a real client keeps sending HTTP requests
//! through the role's balancer while kiln replaces every server behind it.
//! Every request must succeed; the count proves the load was real.

mod support;

use std::time::Duration;

use support::load::{get, Load};
use support::*;

fn project(subnet: &str, port: u16) -> Project {
    project_with(subnet, port, "")
}

/// Three `web` servers behind a balancer on `port`; `strategy` is more TOML for the role.
fn project_with(subnet: &str, port: u16, strategy: &str) -> Project {
    web_fleet(subnet, 3, "", &format!("balancer = {{ listen = \"127.0.0.1:{port}\", port = 8080, drain_timeout = \"5s\" }}\n{strategy}"))
}

fn request(port: u16) -> Result<String, String> {
    request_path(port, "/")
}

fn request_path(port: u16, path: &str) -> Result<String, String> {
    get(&format!("127.0.0.1:{port}"), path)
}

#[test]
fn rolling_replacement_under_load_drops_nothing() {
    let port = free_port();
    let p = project("10.77.20.0/24", port);
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    assert_eq!(request(port).unwrap(), "v1\n");
    let load = Load::local(port, 4);
    std::thread::sleep(Duration::from_millis(300));
    p.write("images/web/files/srv/www/index.html", "v2\n");
    p.kiln(&["image", "build", "web"]).ok();
    p.kiln(&["apply", "staging", "--yes"]).ok();
    std::thread::sleep(Duration::from_millis(300));
    load.finish_clean(100);
    assert_eq!(request(port).unwrap(), "v2\n");
}

#[test]
fn rolling_with_max_unavailable_under_load_drops_nothing() {
    // Batches of two: one old server drained and destroyed first, one new
    // server surged; the balancer only ever points at live servers.
    let port = free_port();
    let p = project_with(
        "10.77.27.0/24",
        port,
        "strategy = { kind = \"rolling\", max_surge = 1, max_unavailable = 1 }",
    );
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let load = Load::local(port, 4);
    std::thread::sleep(Duration::from_millis(300));
    p.write("images/web/files/srv/www/index.html", "v2\n");
    p.kiln(&["image", "build", "web"]).ok();
    let plan = p
        .kiln(&["plan", "staging", "--detailed-exitcode"])
        .expect(2);
    assert!(
        plan.stdout.contains("batch 1 (2 servers")
            && plan.stdout.matches("destroy first").count() == 2
            && plan.stdout.matches("create first").count() == 1,
        "{}",
        plan.stdout
    );
    p.kiln(&["apply", "staging", "--yes"]).ok();
    std::thread::sleep(Duration::from_millis(300));
    load.finish_clean(100);
    assert_eq!(request(port).unwrap(), "v2\n");
    let servers = p.kiln(&["server", "list", "staging", "--json"]).ok().json();
    assert_eq!(servers.as_array().unwrap().len(), 3, "{servers}");
}

#[test]
fn sigkill_mid_rollout_then_rerun_drops_nothing() {
    let port = free_port();
    let p = project("10.77.21.0/24", port);
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let load = Load::local(port, 4);
    p.write("images/web/files/srv/www/index.html", "v2\n");
    p.kiln(&["image", "build", "web"]).ok();
    for delay in [60u64, 200] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("-C")
            .arg(p.path())
            .args(["apply", "staging", "--yes"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = p.kiln(&["unlock", "staging"]);
    }
    p.kiln(&["apply", "staging", "--yes"]).ok();
    load.finish_clean(50);
    assert_eq!(request(port).unwrap(), "v2\n");
    // The balancer routes only to servers that exist.
    let status: serde_json::Value = serde_json::from_slice(
        &std::fs::read(p.store().join("balancers/staging-web/status.json")).unwrap(),
    )
    .unwrap();
    let servers = p.kiln(&["server", "list", "staging", "--json"]).ok().json();
    let mut live: Vec<String> = servers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{}:8080", s["address"].as_str().unwrap()))
        .collect();
    let mut routed: Vec<String> = status["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["active"] == true)
        .map(|b| b["addr"].as_str().unwrap().to_string())
        .collect();
    live.sort();
    routed.sort();
    assert_eq!(routed, live);
}

#[test]
fn manual_rollback_under_load_drops_nothing() {
    let port = free_port();
    let p = project("10.77.22.0/24", port);
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    p.write("images/web/files/srv/www/index.html", "v2\n");
    p.kiln(&["image", "build", "web"]).ok();
    p.kiln(&["apply", "staging", "--yes"]).ok();
    assert_eq!(request(port).unwrap(), "v2\n");
    let load = Load::local(port, 4);
    let run = p.kiln(&["rollback", "staging", "--yes"]).ok();
    assert!(
        run.stdout.contains("back to release #1")
            && run.stdout.contains("image changed (web@2 → web@1)"),
        "{}",
        run.stdout
    );
    load.finish_clean(50);
    assert_eq!(request(port).unwrap(), "v1\n");
    let history = p.kiln(&["history", "staging"]).ok().stdout;
    assert!(history.contains("rollback"), "{history}");
    // gc keeps what releases ran, so a rollback always has its images.
    let gc = p
        .kiln(&["image", "gc", "--keep", "0", "--json"])
        .ok()
        .json();
    assert!(gc["versions"].as_array().unwrap().is_empty(), "{gc}");
}

#[test]
fn failed_rollout_rolls_back_automatically_under_load() {
    let port = free_port();
    let p = project("10.77.23.0/24", port);
    let _t = Teardown(&p);
    // A second role, started after `web`, whose next image never gets healthy.
    p.write("images/api/files/srv/www/healthz", "ok\n");
    let spec = std::fs::read_to_string(p.path().join("kiln.toml")).unwrap();
    p.write("kiln.toml", &format!("{spec}\n[images.api]\nfrom = \"base\"\nentrypoint = [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"9090\", \"-h\", \"/srv/www\"]\nhealth = {{ http = \"/healthz\", port = 9090 }}\n[env.staging.roles.api]\nimage = \"api\"\nservers = 1\ndepends_on = [\"web\"]\n"));
    p.kiln(&["image", "build", "--all"]).ok();
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let load = Load::local(port, 4);
    p.write("images/web/files/srv/www/index.html", "v2\n");
    std::fs::remove_file(p.path().join("images/api/files/srv/www/healthz")).unwrap();
    p.write("images/api/files/srv/www/other", "x\n");
    p.kiln(&["image", "build", "--all"]).ok();
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
        stderr.contains("did not become healthy")
            && stderr.contains("rolled back automatically to release #1"),
        "{stderr}"
    );
    load.finish_clean(50);
    assert_eq!(
        request(port).unwrap(),
        "v1\n",
        "web is back on its previous image"
    );
    let servers = p.kiln(&["server", "list", "staging", "--json"]).ok().json();
    for s in servers.as_array().unwrap() {
        assert!(s["image"] == "web@1" || s["image"] == "api@1", "{s}");
    }
    let history = p.kiln(&["history", "staging"]).ok().stdout;
    assert!(
        history.contains("failed") && history.contains("rollback (automatic)"),
        "{history}"
    );
}

#[test]
fn blue_green_switches_in_one_step_and_switches_back_instantly() {
    let port = free_port();
    let p = project_with(
        "10.77.24.0/24",
        port,
        "strategy = { kind = \"blue_green\", rollback_window = \"10m\" }",
    );
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let blue: Vec<String> = p.ids();
    let load = Load::local(port, 4);
    p.write("images/web/files/srv/www/index.html", "v2\n");
    p.kiln(&["image", "build", "web"]).ok();
    let plan = p.kiln(&["plan", "staging"]).ok();
    assert!(
        plan.stdout
            .contains("batch 1 (3 servers, blue-green: all up and healthy, then one switch)"),
        "{}",
        plan.stdout
    );
    let run = p.kiln(&["apply", "staging", "--yes"]).ok();
    assert_eq!(
        run.stderr.matches("switched to the new servers").count(),
        1,
        "one switch: {}",
        run.stderr
    );
    assert_eq!(request(port).unwrap(), "v2\n");
    // The blue set is warm, out of the balancer.
    let list = p.kiln(&["server", "list", "staging", "--json"]).ok().json();
    let standby: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "standby")
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(standby.len(), 3, "{list}");
    assert!(standby.iter().all(|id| blue.contains(id)));
    // Rollback inside the window: a switch back to the warm servers, no new server.
    let run = p.kiln(&["rollback", "staging", "--yes"]).ok();
    assert!(run.stdout.contains("switch back"), "{}", run.stdout);
    assert!(!run.stderr.contains("creating"), "{}", run.stderr);
    load.finish_clean(50);
    assert_eq!(request(port).unwrap(), "v1\n");
    assert_eq!(
        p.ids_with("staging", "running"),
        blue,
        "the very same blue servers serve again"
    );
}

#[test]
fn failing_canary_is_rolled_back_without_a_failed_request() {
    let port = free_port();
    let p = project_with(
        "10.77.25.0/24",
        port,
        "strategy = { kind = \"canary\", share = 34, bake = \"3s\" }",
    );
    // The balancer's own checks act within 200 ms.
    let spec = std::fs::read_to_string(p.path().join("kiln.toml")).unwrap();
    p.write(
        "kiln.toml",
        &spec.replace(
            r#"drain_timeout = "5s" }"#,
            r#"drain_timeout = "5s", check_interval = "100ms", fall = 2 }"#,
        ),
    );
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let before = p.ids();
    let load = Load::local(port, 4);
    // v2 keeps serving traffic, but its health endpoint (a second listener,
    // on another port than v1's check) passes at first and goes away a
    // second later, during the bake. The balancer checks each server as
    // its own release declares: v1's servers stay in rotation throughout.
    let spec = std::fs::read_to_string(p.path().join("kiln.toml")).unwrap();
    let spec = spec.replace(r#"entrypoint = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"]"#, r#"entrypoint = ["/bin/sh", "-c", "/bin/busybox httpd -f -p 8081 -h /srv/www & H=$!; /bin/busybox httpd -f -p 8080 -h /srv/www & sleep 1; kill $H; wait"]"#);
    p.write(
        "kiln.toml",
        &spec.replace(
            r#"health = { http = "/healthz", port = 8080 }"#,
            r#"health = { http = "/healthz", port = 8081 }"#,
        ),
    );
    p.kiln(&["image", "build", "web"]).ok();
    let run = p.kiln(&["apply", "staging", "--yes"]).expect(1);
    assert!(
        run.stderr.contains("canary of `web` failed"),
        "{}",
        run.stderr
    );
    load.finish_clean(50);
    assert_eq!(p.ids(), before, "the old servers never left");
    assert_eq!(request(port).unwrap(), "v1\n");
}

#[test]
fn canary_answering_server_errors_fails_the_error_rate_gate() {
    // v2 stays healthy (`/healthz` is a static file) but its application,
    // a CGI, answers 500: only the balancer's view of real traffic sees it.
    let port = free_port();
    let p = project_with(
        "10.77.29.0/24",
        port,
        "strategy = { kind = \"canary\", share = 34, bake = \"3s\", max_error_rate = 0.05 }",
    );
    let _t = Teardown(&p);
    let app = |body: &str| {
        let f = p.write(
            "images/web/files/srv/www/cgi-bin/app",
            &format!("#!/bin/sh\n{body}\n"),
        );
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    };
    app("printf 'Content-Type: text/plain\\r\\n\\r\\nv1\\n'");
    p.kiln(&["image", "build", "web"]).ok();
    p.kiln(&["apply", "staging", "--yes"]).ok();
    assert_eq!(request_path(port, "/cgi-bin/app").unwrap(), "v1\n");
    let before = p.ids();
    let load = Load::start(format!("127.0.0.1:{port}"), "/cgi-bin/app", 4);
    app("printf 'Status: 500 Internal Server Error\\r\\nContent-Type: text/plain\\r\\n\\r\\nbroken\\n'");
    p.kiln(&["image", "build", "web"]).ok();
    let run = p.kiln(&["apply", "staging", "--yes"]).expect(1);
    assert!(
        run.stderr.contains("canary of `web` failed: error rate")
            && run.stderr.contains("at the balancer is above 0.05"),
        "{}",
        run.stderr
    );
    let (ok, failed, errors) = load.finish();
    // The canary's share of clients saw its errors, and only them.
    assert!(
        failed > 0 && errors.iter().all(|e| e.contains("500")),
        "{failed} failed: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(ok > failed, "{ok} ok, {failed} failed");
    assert_eq!(p.ids(), before, "the old servers never left");
    assert_eq!(request_path(port, "/cgi-bin/app").unwrap(), "v1\n");
}

#[test]
fn passing_canary_bakes_then_rolls_on() {
    let port = free_port();
    let p = project_with(
        "10.77.26.0/24",
        port,
        "strategy = { kind = \"canary\", share = 34, bake = \"1s\" }",
    );
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let load = Load::local(port, 4);
    p.write("images/web/files/srv/www/index.html", "v2\n");
    p.kiln(&["image", "build", "web"]).ok();
    let run = p.kiln(&["apply", "staging", "--yes"]).ok();
    assert!(
        run.stderr.contains("canary of web baking for 1s"),
        "{}",
        run.stderr
    );
    load.finish_clean(50);
    assert_eq!(request(port).unwrap(), "v2\n");
}

#[test]
fn balancer_takes_a_failing_server_out_of_rotation_and_back() {
    // Each server serves /srv/www from its own volume, so one can be made
    // to fail (404 on everything) from the host without touching the others.
    let port = free_port();
    let p = web_fleet(
        "10.77.28.0/24",
        3,
        "",
        &format!("balancer = {{ listen = \"127.0.0.1:{port}\", port = 8080, check_interval = \"100ms\", fall = 2, rise = 2 }}\nvolumes = {{ www = \"/srv/www\" }}"),
    );
    let www = |slot: u32| p.store().join(format!("volumes/staging/web-{slot}/www"));
    for slot in 0..3 {
        std::fs::create_dir_all(www(slot)).unwrap();
        std::fs::write(www(slot).join("index.html"), format!("slot-{slot}\n")).unwrap();
        std::fs::write(www(slot).join("healthz"), "ok\n").unwrap();
    }
    let _t = Teardown(&p);
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let unhealthy = || p.web_backends().iter().filter(|b| !b.healthy).count();
    wait_until("every backend healthy", || {
        p.web_backends().len() == 3 && unhealthy() == 0
    });

    // Slot 1 starts failing: the balancer's own checks take it out.
    std::fs::remove_file(www(1).join("healthz")).unwrap();
    std::fs::remove_file(www(1).join("index.html")).unwrap();
    wait_until("slot 1 taken out", || unhealthy() == 1);
    let listed = p.servers();
    assert_eq!(
        listed
            .iter()
            .filter(|s| s["balancer"] == "failing checks")
            .count(),
        1,
        "{listed:?}"
    );
    assert_eq!(
        listed
            .iter()
            .filter(|s| s["balancer"] == "in rotation")
            .count(),
        2,
        "{listed:?}"
    );
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..150 {
        let body = request(port).expect("every request is served by a passing server");
        seen.insert(body);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["slot-0\n", "slot-2\n"]
    );

    // It recovers: back in rotation after `rise` passing checks.
    std::fs::write(www(1).join("index.html"), "slot-1\n").unwrap();
    std::fs::write(www(1).join("healthz"), "ok\n").unwrap();
    wait_until("slot 1 back", || unhealthy() == 0);
    let back = (0..150)
        .filter_map(|_| request(port).ok())
        .filter(|b| b == "slot-1\n")
        .count();
    assert!(back > 0, "slot 1 never served again");
}
