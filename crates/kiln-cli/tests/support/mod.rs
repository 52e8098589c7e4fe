//! Helpers of the end-to-end tests: scratch projects in temporary
//! directories, a busybox userland nobody here wrote, and a runner for the
//! real `kiln` binary that prints the directory, stdout and stderr when an
//! expectation fails.

#![allow(dead_code)]

pub mod debian;
pub mod load;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BUSYBOX: &str = "/bin/busybox";

pub struct Project {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Run {
    fn from(out: Output, what: String) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
            what,
        }
    }

    /// Panics with the whole context unless the exit code is `code`.
    pub fn expect(self, code: i32) -> Run {
        if self.code != code {
            panic!(
                "`{}` exited {} (wanted {code})\n--- stdout\n{}\n--- stderr\n{}",
                self.what, self.code, self.stdout, self.stderr
            );
        }
        self
    }

    pub fn ok(self) -> Run {
        self.expect(0)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "`{}` printed no JSON ({e}):\n{}\n--- stderr\n{}",
                self.what, self.stdout, self.stderr
            )
        })
    }
}

impl Project {
    pub fn new() -> Project {
        Project {
            dir: tempfile::Builder::new()
                .prefix("kiln-e2e-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, content: &str) -> PathBuf {
        let p = self.path().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        p
    }

    pub fn script(&self, image: &str, name: &str, body: &str) {
        let p = self.write(
            &format!("images/{image}/scripts/{name}"),
            &format!("#!/bin/sh\nset -e\n{body}\n"),
        );
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Runs `kiln -C <project> ARGS` with colors off and no TTY.
    pub fn kiln(&self, args: &[&str]) -> Run {
        self.kiln_in(self.path(), args)
    }

    pub fn kiln_in(&self, dir: &Path, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run kiln");
        Run::from(out, format!("kiln -C {} {}", dir.display(), args.join(" ")))
    }

    pub fn store(&self) -> PathBuf {
        self.path().join(".kiln")
    }

    /// The unpacked root of an image's current version.
    pub fn root_of(&self, image: &str) -> PathBuf {
        let shown = self.kiln(&["image", "show", image, "--json"]).ok().json();
        let digest = shown["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
            .to_string();
        self.store().join("roots").join(digest)
    }

    /// Writes `base.tar.gz`: a busybox userland with a few applet links.
    pub fn busybox_tarball(&self, name: &str) -> PathBuf {
        let staging = self.path().join(".rootfs-staging");
        make_busybox_root(&staging);
        let out = self.path().join(name);
        let flag = if name.ends_with(".gz") { "-czf" } else { "-cf" };
        let st = Command::new("tar")
            .arg("-C")
            .arg(&staging)
            .arg("--numeric-owner")
            .arg(flag)
            .arg(&out)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        if name.ends_with(".zst") {
            let plain = self.path().join(format!("{name}.tmp"));
            fs::rename(&out, &plain).unwrap();
            let st = Command::new("zstd")
                .arg("-q")
                .arg(&plain)
                .arg("-o")
                .arg(&out)
                .status()
                .unwrap();
            assert!(st.success());
            fs::remove_file(plain).unwrap();
        }
        fs::remove_dir_all(staging).unwrap();
        out
    }
}

/// A minimal root: /bin/busybox and applet symlinks.
pub fn make_busybox_root(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::copy(BUSYBOX, root.join("bin/busybox"))
        .expect("busybox-static is installed (apt-get install busybox-static)");
    for applet in [
        "sh", "echo", "cat", "ls", "touch", "test", "mkdir", "rm", "sleep", "hostname", "id", "wc",
        "grep", "chmod", "true", "false", "env",
    ] {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link).unwrap();
        }
    }
    fs::write(root.join("etc/os-release"), "NAME=busybox\n").unwrap();
}

/// Writes a tarball whose entries are described to Python's tarfile, which
/// (unlike Rust's tar writer) lets a test build hostile archives.
pub fn python_tar(out: &Path, script: &str) {
    let program = format!(
        "import tarfile, io, sys\nt = tarfile.open(sys.argv[1], 'w')\ndef add(name, data=b'x', **kw):\n    i = tarfile.TarInfo(name)\n    for k, v in kw.items(): setattr(i, k, v)\n    i.size = len(data) if i.type == tarfile.REGTYPE else 0\n    t.addfile(i, io.BytesIO(data) if i.type == tarfile.REGTYPE else None)\n{script}\nt.close()\n"
    );
    let st = Command::new("python3")
        .arg("-c")
        .arg(program)
        .arg(out)
        .status()
        .expect("python3");
    assert!(st.success(), "python tar writer failed");
}

/// Files left under a directory (recursively), for "nothing left behind" checks.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(items) = fs::read_dir(dir) {
        for i in items.flatten() {
            out.push(i.path().display().to_string());
        }
    }
    out
}

/// A free TCP port on loopback (for a balancer's listen address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A busybox base, a `web` image serving `/srv/www` (with `/healthz`) on
/// 8080 with busybox httpd, and a `staging` environment on `subnet` with a
/// `web` role of `servers` servers; `env_extra` and `role_extra` are more
/// TOML lines for the environment and the role. Images are built.
pub fn web_fleet(subnet: &str, servers: u32, env_extra: &str, role_extra: &str) -> Project {
    let p = Project::new();
    p.busybox_tarball("base.tar.gz");
    p.write("images/web/files/srv/www/index.html", "v1\n");
    p.write("images/web/files/srv/www/healthz", "ok\n");
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
entrypoint = ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"]
health = {{ http = "/healthz", port = 8080 }}
[env.staging]
subnet = "{subnet}"
{env_extra}
[env.staging.roles.web]
image = "web"
servers = {servers}
ports = [8080]
{role_extra}
"#
        ),
    );
    p.kiln(&["image", "build", "--all"]).ok();
    p
}

/// Destroys `staging` when dropped, so a failed test leaves no servers.
pub struct Teardown<'a>(pub &'a Project);

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        let _ = self.0.kiln(&["destroy", "staging", "--yes", "--forget"]);
    }
}

impl Project {
    /// `kiln server list staging --json`.
    pub fn servers(&self) -> Vec<serde_json::Value> {
        self.kiln(&["server", "list", "staging", "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .clone()
    }

    /// Sorted ids of `env`'s servers with `status` (`running`, `standby`).
    pub fn ids_with(&self, env: &str, status: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .kiln(&["server", "list", env, "--json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == status)
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    }

    /// Sorted ids of staging's servers.
    pub fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .servers()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    }

    /// Runs kiln with extra environment variables.
    pub fn kiln_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("-C")
            .arg(self.path())
            .args(args)
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .output()
            .expect("run kiln");
        Run::from(out, format!("kiln {}", args.join(" ")))
    }
}

/// Polls `cond` every 20 ms until it holds; fails naming `what` after 30 s.
/// Tests wait for events this way, never for a fixed time.
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "waited 30 s for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether `pid` is gone or a zombie.
pub fn dead(pid: i32) -> bool {
    !kiln_sandbox::alive(pid)
}

/// Whether a process in the pid namespace of `server_pid` runs `cmdline`
/// (arguments joined by spaces): someone who entered the server.
pub fn runs_in(server_pid: i32, cmdline: &str) -> bool {
    let Ok(ns) = fs::read_link(format!("/proc/{server_pid}/ns/pid")) else {
        return false;
    };
    let Ok(procs) = fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        fs::read_link(p.path().join("ns/pid")).is_ok_and(|n| n == ns)
            && fs::read(p.path().join("cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .split('\0')
                    .filter(|a| !a.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
                    == cmdline
            })
    })
}

impl Project {
    /// The control directory of `staging`'s `web` balancer.
    pub fn web_front(&self) -> PathBuf {
        self.store().join("balancers/staging-web")
    }

    /// What `staging`'s `web` balancer last reported about its backends.
    pub fn web_backends(&self) -> Vec<kiln_balancer::BackendStatus> {
        kiln_balancer::read_status(&self.web_front())
            .map(|s| s.backends)
            .unwrap_or_default()
    }
}

/// Every file under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(items) = fs::read_dir(&d) else {
            continue;
        };
        for i in items.flatten() {
            let path = i.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file()
                && fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                out.push(path.display().to_string());
            }
        }
    }
    out
}

/// Kills `kiln ARGS` at every journal boundary in turn, re-running plainly
/// after each kill; returns the number of boundaries covered.
pub fn crash_everywhere(
    p: &Project,
    args: &[&str],
    mut before: impl FnMut(u32),
    check: impl Fn(u32),
) -> u32 {
    for at in 1.. {
        before(at);
        let n = at.to_string();
        let run = p.kiln_env(args, &[("KILN_CRASH_AT", n.as_str())]);
        if run.code == 0 {
            // Past the last boundary: nothing was killed.
            check(at);
            // The figure BENCHMARKS.md records (`-- --nocapture`).
            eprintln!(
                "crash points of `kiln {}`: {} boundaries killed, {} re-runs converged",
                args.join(" "),
                at - 1,
                at - 1
            );
            return at - 1;
        }
        assert_eq!(
            run.code, -1,
            "killed at boundary {at}, not failed: {}",
            run.stderr
        );
        let rerun = p.kiln(args);
        assert_eq!(
            rerun.code, 0,
            "re-run after a kill at boundary {at}: {}",
            rerun.stderr
        );
        check(at);
    }
    unreachable!()
}
