//! The provider's helper processes (balancers, DNS servers): the `kiln`
//! binary itself with a hidden subcommand, started in a session of its own
//! so it outlives the kiln that started it and the terminal, with its
//! output appended to a log file in its control directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Starts `kiln ARGS…`, detached, logging to `log`.
pub(crate) fn spawn(args: &[&std::ffi::OsStr], log: &Path) -> Result<Child, String> {
    let exe = std::env::var_os("KILN_EXE")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok())
        .ok_or("cannot find the kiln executable")?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("open {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe and touches no memory of ours; it
    // detaches the child from kiln's session and terminal.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| {
        format!(
            "cannot start `kiln {}`: {e}",
            args.first()
                .map(|a| a.to_string_lossy())
                .unwrap_or_default()
        )
    })
}

/// Sends SIGTERM to `pid` and waits (bounded) until it is gone.
pub(crate) fn stop(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    for _ in 0..200 {
        if !kiln_sandbox::alive(pid) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    crate::reap(pid);
}
