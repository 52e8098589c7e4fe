//! Alarms: the environment's hook, called with a JSON body when reconcile
//! finds drift, heals, or a write does not come from the pipeline. An
//! `http://` or `https://` hook gets a POST through `ureq` (connect and
//! overall timeouts; a non-2xx status is a failure); anything else runs as
//! a shell command with the body on stdin. A failing hook is logged, never
//! fatal: the write it reports has happened.

use std::io::Write;
use std::time::Duration;

use crate::Engine;

/// How long a hook may take before it counts as failed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum HookError {
    #[error("POST {url}: {source}")]
    Http {
        url: String,
        source: Box<ureq::Error>,
    },
    #[error("POST {url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("cannot run hook `{cmd}`")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("hook `{cmd}` exited with {status}")]
    Exit { cmd: String, status: String },
}

impl Engine<'_> {
    /// Calls the environment's alarm hook, if it has one.
    pub fn alarm(&self, env: &str, kind: &str, detail: serde_json::Value) {
        let Some(hook) = self.project.envs.get(env).and_then(|e| e.alarm.clone()) else {
            return;
        };
        let body = serde_json::json!({ "env": env, "kind": kind, "time": (self.clock)(), "detail": detail })
            .to_string();
        let sent = if hook.starts_with("http://") || hook.starts_with("https://") {
            post(&hook, &body)
        } else {
            run_hook(&hook, &body)
        };
        if let Err(e) = sent {
            tracing::warn!(env, kind, error = %e, "alarm hook failed");
        }
    }
}

fn post(url: &str, body: &str) -> Result<(), HookError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(HOOK_TIMEOUT))
        .timeout_global(Some(HOOK_TIMEOUT))
        .http_status_as_error(false)
        .build()
        .into();
    let resp = agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .map_err(|e| HookError::Http {
            url: url.into(),
            source: Box::new(e),
        })?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(HookError::Status {
            url: url.into(),
            status,
        });
    }
    Ok(())
}

fn run_hook(cmd: &str, body: &str) -> Result<(), HookError> {
    let spawn = |source| HookError::Spawn {
        cmd: cmd.into(),
        source,
    };
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its input is not a failure.
        let _ = stdin.write_all(body.as_bytes());
    }
    let status = child.wait().map_err(spawn)?;
    if status.success() {
        Ok(())
    } else {
        Err(HookError::Exit {
            cmd: cmd.into(),
            status: status.to_string(),
        })
    }
}
