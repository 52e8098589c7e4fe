//! Helpers of the swarm tests: the real `kiln` binary bakes a tiny image
//! (static busybox on scratch, serving HTTP) into a temporary project, once
//! per test binary; server specs; HTTP from the host; bounded polling.

#![allow(dead_code)]

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_image::seal::Seal;
use kiln_image::{Digest, Store};
use kiln_provider_swarm::{PortMap, Restart, ServerSpec};

pub const PAGE: &str = "kiln on swarm\n";

/// A baked image version in a temporary project's store.
pub struct Baked {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub digest: Digest,
    pub seal: Seal,
}

/// The `kiln` binary: `$KILN_BIN`, else `target/<profile>/kiln` beside
/// this test binary (`cargo test --workspace` builds it first).
pub fn kiln_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("kiln"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p kiln` first (or set KILN_BIN)",
        bin.display()
    );
    bin
}

/// `web`: `/busybox httpd` serving `/www/index.html` on 8080, baked once.
pub fn web_image() -> &'static Baked {
    static IMAGE: OnceLock<Baked> = OnceLock::new();
    IMAGE.get_or_init(|| {
        bake(
            "web",
            "[\"/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]",
        )
    })
}

pub fn bake(name: &str, entrypoint: &str) -> Baked {
    let dir = tempfile::Builder::new()
        .prefix("kiln-swarm-")
        .tempdir()
        .unwrap();
    let p = dir.path();
    std::fs::write(
        p.join("kiln.toml"),
        format!("[project]\nname = \"swarmtest\"\n[images.{name}]\nfrom = \"scratch\"\nentrypoint = {entrypoint}\n"),
    )
    .unwrap();
    let files = p.join(format!("images/{name}/files"));
    std::fs::create_dir_all(files.join("www")).unwrap();
    std::fs::copy("/bin/busybox", files.join("busybox")).unwrap();
    std::fs::write(files.join("www/index.html"), PAGE).unwrap();
    let out = Command::new(kiln_bin())
        .args(["image", "build", name])
        .current_dir(p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kiln image build in {}: {}\n{}",
        p.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Store::open(p.join(".kiln")).unwrap();
    let rec = store.current_record(name).unwrap();
    let seal: Seal = store.read_json_blob(&rec.seal).unwrap();
    Baked {
        digest: rec.digest,
        seal,
        store,
        dir,
    }
}

/// A server of role `web` in `env`, published on `published`.
pub fn spec(env: &str, server: &str, image: &str, published: u16) -> ServerSpec {
    ServerSpec {
        env: env.into(),
        role: "web".into(),
        release: 1,
        slot: 0,
        server: server.into(),
        image: image.into(),
        argv: vec![],
        env_vars: vec!["GREETING=hi".into()],
        workdir: None,
        user: None,
        cpus: 0.2,
        memory_bytes: 64 << 20,
        reserve: false,
        cap_add: vec![],
        cap_drop: vec!["NET_RAW".into()],
        ports: vec![PortMap {
            target: 8080,
            published,
        }],
        constraints: vec![],
        node: None,
        volumes: vec![],
        tmpfs_bytes: 0,
        restart: Restart::Never,
        stop_grace: Duration::from_secs(2),
    }
}

/// The body of `GET /` at `addr` if the answer is a 200.
pub fn http_get(addr: &str) -> Option<String> {
    let sa: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.")
        .then_some(())
        .filter(|_| head.split(' ').nth(1) == Some("200"))?;
    Some(body.to_string())
}

/// Polls `f` every 50 ms until it gives Some, or panics after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
