//! The balancer's image on a swarm: kiln bakes it from its own binary, on
//! `scratch`, so that the balancer kiln runs on the cluster is exactly the
//! `kiln balancer serve` it runs locally, sealed and pushed like any image.
//!
//! A static binary needs nothing else. A dynamically linked one (the usual
//! `cargo build`) is staged with the shared objects it loads, at the paths
//! its loader looks for them, as `ldd` reports them; that image works on
//! any node of the same architecture whatever its distribution.
//!
//! How to get a static kiln here: the musl target's standard library is not
//! installable (rustup cannot download), but glibc links statically with
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p kiln
//! --target x86_64-unknown-linux-gnu` (the explicit `--target` keeps build
//! scripts and proc macros dynamic). glibc's NSS then cannot load modules,
//! so name lookups through getaddrinfo fail; the balancer only connects to
//! numeric `IP:PORT` backends, which never reach NSS.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Result, SwarmError};
use crate::server::{PortMap, Restart, ServerSpec, VolumeMount};

/// Where the balancer keeps its control files inside its container: a
/// node-local volume, so a restarted balancer serves the last backend set
/// kiln gave it at once.
pub const CONTROL_DIR: &str = "/state";
/// The port of the balancer's control channel inside its container.
pub const CONTROL_PORT: u16 = 9190;
/// The environment variable carrying the control channel's token.
pub const TOKEN_VAR: &str = "KILN_BALANCER_TOKEN";
/// The image's name in kiln's store.
pub const IMAGE_NAME: &str = "kiln-balancer";

/// Files of the balancer image: `(file on this host, path in the image)`.
/// The binary goes to `/kiln`; shared objects (if any) keep their paths.
pub fn image_files(kiln: &Path) -> Result<Vec<(PathBuf, String)>> {
    let mut files = vec![(kiln.to_path_buf(), "kiln".to_string())];
    for lib in shared_objects(kiln)? {
        let inside = lib.to_string_lossy().trim_start_matches('/').to_string();
        // Follow the symlink: the image gets the library's bytes under the
        // name the loader asks for.
        let real = std::fs::canonicalize(&lib).map_err(|source| SwarmError::Io {
            op: "resolve",
            path: lib.clone(),
            source,
        })?;
        files.push((real, inside));
    }
    Ok(files)
}

/// Copies [`image_files`] into `files_dir` (a kiln image's `files/`).
pub fn stage(kiln: &Path, files_dir: &Path) -> Result<()> {
    for (from, to) in image_files(kiln)? {
        let dest = files_dir.join(&to);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|source| SwarmError::Io {
                op: "create directory",
                path: parent.into(),
                source,
            })?;
        }
        if to == "kiln" && strip(&from, &dest) {
            continue;
        }
        std::fs::copy(&from, &dest).map_err(|source| SwarmError::Io {
            op: "copy",
            path: from.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Copies `from` to `to` without debug sections (binutils' `strip`: kiln's
/// binary carries line tables that triple its size and that a balancer on
/// a node never uses). False when `strip` is missing or fails; the caller
/// then copies the binary as it is.
fn strip(from: &Path, to: &Path) -> bool {
    Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(to)
        .arg(from)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The project that bakes the balancer image: `scratch` plus the staged
/// files, entrypoint `/kiln`.
pub fn project_toml() -> String {
    format!(
        "[project]\nname = \"kiln\"\n[images.{IMAGE_NAME}]\nfrom = \"scratch\"\nentrypoint = [\"/kiln\"]\n"
    )
}

/// The shared objects `binary` loads (absolute paths, loader included);
/// empty for a static binary.
pub fn shared_objects(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| SwarmError::Io {
            op: "run ldd on",
            path: binary.into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "not a dynamic executable" (exit 1) or "statically linked".
    if !out.status.success() || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Where one balancer of a role runs and how kiln reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The node's id (the service is pinned to it).
    pub node: String,
    /// The host port clients reach the balancer on (`listen`'s port).
    pub published: u16,
    /// The host port of its control channel.
    pub control: u16,
}

/// The balancer's server id on `node`: `ROLE-lb-NODE` (the node id's first
/// 10 characters: node ids are random, so that is unique in practice).
pub fn server_id(role: &str, node: &str) -> String {
    let short: String = node.chars().take(10).collect();
    format!("{role}-lb-{short}")
}

/// The balancer of `role` on one node as a server spec: the baked
/// balancer image, listening on `port` inside, published on the node, its
/// control channel too, its control directory on a node-local volume.
pub fn spec(
    env: &str,
    role: &str,
    image: &str,
    port: u16,
    at: &Placement,
    token: &str,
) -> ServerSpec {
    ServerSpec {
        env: env.into(),
        role: role.into(),
        release: 0,
        slot: 0,
        server: server_id(role, &at.node),
        image: image.into(),
        argv: vec![
            "/kiln".into(),
            "balancer".into(),
            "serve".into(),
            "--listen".into(),
            format!("0.0.0.0:{port}"),
            "--dir".into(),
            CONTROL_DIR.into(),
            "--control".into(),
            format!("0.0.0.0:{CONTROL_PORT}"),
        ],
        env_vars: vec![format!("{TOKEN_VAR}={token}")],
        workdir: None,
        user: None,
        cpus: 0.0,
        memory_bytes: 256 << 20,
        reserve: false,
        // Listening on a port below 1024 is all it needs.
        cap_add: vec!["CAP_NET_BIND_SERVICE".into()],
        cap_drop: vec!["ALL".into()],
        ports: vec![
            PortMap {
                target: port,
                published: at.published,
            },
            PortMap {
                target: CONTROL_PORT,
                published: at.control,
            },
        ],
        constraints: vec![],
        node: Some(at.node.clone()),
        volumes: vec![VolumeMount {
            name: format!("kiln-{env}-{role}-balancer"),
            target: CONTROL_DIR.into(),
        }],
        tmpfs_bytes: 0,
        // The balancer is what keeps traffic flowing: Swarm restarts it in
        // place at once, rather than waiting for kiln's reconcile.
        restart: Restart::OnFailure { max_attempts: 0 },
        stop_grace: std::time::Duration::from_secs(10),
    }
}
