//! Role balancers of the local provider: `kiln balancer serve` processes,
//! one per environment and role, each with its control directory
//! `<store>/balancers/<env>-<role>/` (see `kiln_balancer`). Started in a
//! session of their own so they outlive kiln; restarted by the next kiln
//! command that needs one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_provider::{Backend, BalancerState, Rotation};
use kiln_sandbox::alive;

use crate::{reap, Local};

impl Local {
    /// `.kiln/balancers/<env>-<role>/`: the balancer's control directory.
    pub fn balancer_dir(&self, env: &str, role: &str) -> PathBuf {
        self.dir.join("balancers").join(format!("{env}-{role}"))
    }

    /// Starts the role's balancer unless it runs. It is `kiln balancer
    /// serve` in a session of its own, so it outlives this process; any
    /// kiln command that needs it restarts it if it died.
    pub(crate) fn ensure_balancer(&self, dir: &Path, listen: &str) -> Result<(), String> {
        if balancer_pid(dir).is_some() {
            return Ok(());
        }
        let exe = std::env::var_os("KILN_EXE")
            .map(PathBuf::from)
            .or_else(|| std::env::current_exe().ok())
            .ok_or("cannot find the kiln executable")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("balancer.log"))
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(dir.join("pid"));
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("balancer")
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--dir")
            .arg(dir);
        cmd.stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; it detaches the balancer
        // from kiln's session so it survives the terminal and kiln.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the balancer: {e}"))?;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if kiln_balancer::read_status(dir).is_some_and(|s| s.pid == child.id()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(format!(
            "the balancer did not start; see {}",
            dir.join("balancer.log").display()
        ))
    }

    /// The balancer of a role as kiln sees it: whether it runs, and each
    /// backend's place and counts. Attempts are connections made plus
    /// connections that failed; failures are failed connections plus
    /// responses with an HTTP 5xx status.
    pub(crate) fn balancer_state(&self, env: &str, role: &str) -> Option<BalancerState> {
        let dir = self.balancer_dir(env, role);
        if !dir.exists() {
            return None;
        }
        let alive = balancer_pid(&dir).is_some();
        let backends = match kiln_balancer::read_status(&dir) {
            Some(s) => kiln_provider::front::backends_of(&[s]),
            // Not started yet: what it was asked to serve.
            None => kiln_balancer::read_backends(&dir)
                .map(|b| b.backends)
                .unwrap_or_default()
                .into_iter()
                .map(|addr| Backend {
                    addr,
                    rotation: Rotation::InRotation,
                    attempts: 0,
                    failures: 0,
                })
                .collect(),
        };
        // One process: it always serves the last set written.
        Some(BalancerState {
            alive,
            backends,
            behind: Vec::new(),
        })
    }

    /// Stops and removes a role's balancer; idempotent.
    pub(crate) fn stop_balancer(&self, env: &str, role: &str) {
        let dir = self.balancer_dir(env, role);
        if let Some(pid) = balancer_pid(&dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
            for _ in 0..200 {
                if !alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            reap(pid);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The pid of a live balancer for `dir`, if one runs.
fn balancer_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (alive(pid) && cmdline.windows(8).any(|w| w == b"balancer")).then_some(pid)
}
