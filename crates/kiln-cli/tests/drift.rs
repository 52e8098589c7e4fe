//! End-to-end drift detection on real servers: tampered image roots,
//! processes entered from outside, strays in kiln's runtime space, dead
//! servers, stale images and expired servers, and `.kilnignore`.

mod support;

use std::fs;

use support::*;

fn fleet(subnet: &str) -> Project {
    let p = web_fleet(
        subnet,
        2,
        "ttl = \"1d\"",
        "size = { cpus = 0.5, memory = \"64M\" }",
    );
    p.kiln(&["apply", "staging", "--yes"]).ok();
    p
}

fn findings(p: &Project, envs: &[(&str, String)]) -> (i32, Vec<(String, String, String)>) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("-C")
        .arg(p.path())
        .args(["drift", "staging", "--json"])
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let code = out.status.code().unwrap_or(-1);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    let f = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["server"].as_str().unwrap().into(),
                f["kind"].as_str().unwrap().into(),
                f["detail"].as_str().unwrap().into(),
            )
        })
        .collect();
    (code, f)
}

#[test]
fn clean_fleet_has_no_drift_and_tampering_is_named_on_every_server() {
    let p = fleet("10.77.30.0/24");
    let _t = Teardown(&p);
    let clean = p.kiln(&["drift", "staging"]).expect(0);
    assert!(clean.stdout.contains("no drift"), "{}", clean.stdout);
    fs::write(p.root_of("web").join("srv/www/index.html"), "defaced\n").unwrap();
    let (code, f) = findings(&p, &[]);
    assert_eq!(code, 2);
    let ids: Vec<String> = p
        .servers()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    for id in &ids {
        assert!(
            f.contains(&(
                id.clone(),
                "files".into(),
                "changed /srv/www/index.html (content)".into()
            )),
            "{f:?}"
        );
    }
    let json = p.kiln(&["drift", "staging", "--json"]).expect(2).json();
    assert_eq!(
        json["images_verified"],
        serde_json::json!(["web@1"]),
        "each image version is verified once"
    );
    let text = p.kiln(&["drift", "staging"]).expect(2).stdout;
    assert!(text.contains("DRIFT") && text.contains("files"), "{text}");
    // .kilnignore silences it, with a reason.
    p.write(
        ".kilnignore",
        "files * /srv/www/index.html  # known defacement drill\n",
    );
    p.kiln(&["drift", "staging"]).expect(0);
    p.write(
        ".kilnignore",
        "files * /srv/www/index.html until=2000-01-01 # expired entry\n",
    );
    p.kiln(&["drift", "staging"]).expect(2);
}

#[test]
fn entered_processes_strays_and_dead_servers_are_found() {
    let p = fleet("10.77.31.0/24");
    let _t = Teardown(&p);
    let list = p.servers();
    let (a, b) = (&list[0], &list[1]);
    // Someone enters a server's namespaces from the host and starts a process.
    let pid = a["pid"].as_i64().unwrap().to_string();
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
    // A sandbox started by hand in kiln's runtime space, claiming the environment.
    let runtime = kiln_sandbox::Runtime::new(&p.store().join("servers"));
    let log = p.path().join("stray.log");
    // Unique on the host: cgroups and sandbox ids are host-wide.
    let stray_id = format!("web-stray{}", std::process::id());
    let mut stray = kiln_sandbox::SandboxSpec::readonly(
        &stray_id,
        &p.root_of("web"),
        vec!["/bin/sleep".into(), "300".into()],
        &log,
    );
    stray.labels = vec![
        ("dev.kiln.env".into(), "staging".into()),
        ("dev.kiln.role".into(), "web".into()),
    ];
    runtime.start(&stray).unwrap();
    // And a server's process is killed from outside.
    let victim = b["pid"].as_i64().unwrap() as i32;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_until("the killed server's process to die", || dead(victim));
    let (code, f) = findings(&p, &[]);
    assert_eq!(code, 2);
    let id_a = a["id"].as_str().unwrap();
    assert!(
        f.iter()
            .any(|(s, k, d)| s == id_a && k == "process" && d.contains("sleep 300")),
        "{f:?}"
    );
    assert!(
        f.iter().any(|(s, k, _)| s == &stray_id && k == "unmanaged"),
        "{f:?}"
    );
    assert!(
        f.iter().any(|(s, k, d)| s == b["id"].as_str().unwrap()
            && k == "unmanaged"
            && d.contains("process is gone")),
        "{f:?}"
    );
    // The intruder outlives nsenter inside the server: stop it by its pid.
    for (_, _, d) in f.iter().filter(|(_, k, _)| k == "process") {
        let pid: i32 = d
            .rsplit_once("?): ")
            .unwrap()
            .1
            .split(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    intruder.kill().ok();
    intruder.wait().ok();
    // An apply heals: the stray is removed, the dead server replaced.
    p.kiln(&["apply", "staging", "--yes"]).ok();
    let _ = runtime.delete(&stray_id);
    let (code, f) = findings(&p, &[]);
    assert_eq!(code, 0, "{f:?}");
}

#[test]
fn stale_and_expired_servers_are_reported() {
    let p = fleet("10.77.32.0/24");
    let _t = Teardown(&p);
    p.write("images/web/files/srv/www/index.html", "v2\n");
    p.kiln(&["image", "build", "web"]).ok();
    let (code, f) = findings(&p, &[]);
    assert_eq!(code, 2);
    assert_eq!(
        f.iter()
            .filter(|(_, k, d)| k == "stale"
                && d.contains("runs web@1, the role's current image is web@2"))
            .count(),
        2,
        "{f:?}"
    );
    let later = (chrono_now() + 2 * 86_400).to_string();
    let (_, f) = findings(&p, &[("KILN_NOW", later)]);
    assert_eq!(
        f.iter()
            .filter(|(_, k, d)| k == "expired" && d.contains("ttl 1d"))
            .count(),
        2,
        "{f:?}"
    );
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn warm_scan_still_catches_an_edit_with_its_mtime_restored() {
    let p = fleet("10.77.33.0/24");
    let _t = Teardown(&p);
    p.kiln(&["drift", "staging"]).expect(0); // fills the per-file cache
    let file = p.root_of("web").join("srv/www/index.html");
    let mtime = fs::metadata(&file).unwrap().modified().unwrap();
    fs::write(&file, "v9\n").unwrap(); // same size
    fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let (code, f) = findings(&p, &[]);
    assert_eq!(code, 2);
    assert!(
        f.iter()
            .any(|(_, k, d)| k == "files" && d == "changed /srv/www/index.html (content)"),
        "{f:?}"
    );
    p.kiln(&["drift", "staging", "--full"]).expect(2);
}

#[test]
fn an_undeclared_listener_is_config_drift() {
    let p = fleet("10.77.34.0/24");
    let _t = Teardown(&p);
    p.kiln(&["drift", "staging"]).expect(0);
    // Someone opens a listener inside a server's network namespace.
    let server = p.servers()[0].clone();
    let pid = server["pid"].as_i64().unwrap().to_string();
    let script = "import socket, time\ns = socket.socket()\ns.bind(('0.0.0.0', 4444))\ns.listen()\ntime.sleep(300)";
    let mut listener = std::process::Command::new("nsenter")
        .args(["--target", &pid, "--net", "--", "python3", "-c", script])
        .spawn()
        .unwrap();
    let listening = || {
        std::fs::read_to_string(format!("/proc/{pid}/net/tcp"))
            .unwrap()
            .lines()
            .any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| a.ends_with(":115C"))
                    && l.split_whitespace().nth(3) == Some("0A")
            })
    };
    wait_until("the listener in the server's namespace", listening);
    let (code, f) = findings(&p, &[]);
    listener.kill().ok();
    listener.wait().ok();
    assert_eq!(code, 2);
    let id = server["id"].as_str().unwrap();
    assert!(
        f.iter().any(|(s, k, d)| s == id
            && k == "config"
            && d.contains(
                "listens on TCP port 4444, which the role does not declare (ports = [8080])"
            )),
        "{f:?}"
    );
    assert_eq!(
        f.iter().filter(|(_, k, _)| k == "config").count(),
        1,
        "only that server, only that port: {f:?}"
    );
}
