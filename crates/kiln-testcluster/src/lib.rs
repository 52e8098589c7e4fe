//! A real two-node Docker Swarm and an image registry on this machine, for
//! kiln's tests and benchmarks (dev-only: nothing in kiln links it).
//!
//! Layout of cluster `S` (a slot, 0..64, so concurrent test binaries do not
//! collide):
//!
//! ```text
//! host ── ktcSh (10.213.S.1/24) ══ veth ══ netns ktcS-lan: bridge br0
//!                                             ├─ veth ═ netns ktcS-n1: eth0 10.213.S.11  dockerd (manager)
//!                                             └─ veth ═ netns ktcS-n2: eth0 10.213.S.12  dockerd (worker)
//! docker-registry on the host at 10.213.S.1:5000 (insecure, both nodes pull from it)
//! /var/tmp/ktcS/       owner.lock, registry/, n1/{data,exec,daemon.json,dockerd.log,docker.sock}, n2/...
//! ```
//!
//! Why every daemon runs in its own network namespace (node 1 too): a
//! `dockerd` sets the firewall of the namespace it runs in (FORWARD policy
//! DROP, its chains, NAT) and turns on IP forwarding. In namespaces of their
//! own, the host's firewall is never touched, so the `local` provider's
//! bridges and other tests on this host keep working while the cluster runs.
//! The bridge lives in a namespace of its own (`lan`) for the same reason:
//! frames between the nodes never cross the host's `br_netfilter` hooks.
//! Nodes have no default route: nothing they send can leave the machine.
//!
//! Each daemon also gets a private mount namespace (slave of the host's), so
//! its overlay and namespace mounts vanish with it instead of piling up in
//! the host's mount table; and its own data root, exec root, pid file,
//! socket, cgroup parent and containerd.
//!
//! Teardown (explicit, on drop, and at process exit for [`Cluster::shared`])
//! stops the daemons, kills whatever is left in their namespaces and cgroups,
//! deletes links and namespaces, removes the directory, and compares the
//! host's firewall with the snapshot taken at start: if Docker's chains
//! appeared on the host, the snapshot is restored; any other change is
//! another program's on this shared host and is left alone. A cluster left
//! by a killed process is reaped by the next start.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bollard::models::{SwarmInitRequest, SwarmJoinRequest, SwarmSpec, SwarmSpecDispatcher};
use bollard::Docker;
use kiln_model::error_chain;

const BASE: &str = "/var/tmp";
const SLOTS: u32 = 64;
const REGISTRY_PORT: u16 = 5000;
const DAEMON_START: Duration = Duration::from_secs(60);
const DAEMON_STOP: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{cmd}` (is it installed? scripts/setup.sh installs it)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("all {SLOTS} cluster slots under {BASE} are in use")]
    NoSlot,
    #[error("{what} not ready after {}s; see {log}", .after.as_secs())]
    NotReady {
        what: String,
        after: Duration,
        log: PathBuf,
    },
    #[error("docker API of {node}: {detail}")]
    Docker { node: String, detail: String },
}

type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Swarm's dispatcher heartbeat: a node is declared down after a few
    /// missed heartbeats. Docker's default is 5 s.
    pub heartbeat: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// One swarm node: a `dockerd` in its own network namespace.
#[derive(Debug)]
pub struct Node {
    /// `n1`, `n2`.
    pub name: String,
    /// Network namespace (under `/var/run/netns`).
    pub netns: String,
    /// The node's address on the cluster network (also its swarm address).
    pub ip: Ipv4Addr,
    /// The daemon's API socket.
    pub socket: PathBuf,
    /// Swarm node id.
    pub id: String,
    dir: PathBuf,
    cgroup_parent: String,
    dockerd: Option<Child>,
}

impl Node {
    /// `unix:///var/tmp/ktcS/nI/docker.sock`: what kiln is pointed at.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }
}

/// Wall times of the phases of a start and of a teardown.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub network: Duration,
    pub registry: Duration,
    pub daemons: Duration,
    pub swarm: Duration,
    pub start: Duration,
    pub teardown: Option<Duration>,
}

/// What a teardown found and did.
#[derive(Debug, Clone, Default)]
pub struct Teardown {
    pub elapsed: Duration,
    /// Processes that survived their daemon and were killed.
    pub killed: usize,
    /// The host firewall differed from the snapshot and was restored.
    pub firewall_restored: bool,
    /// Anything that could not be removed (empty when clean).
    pub leftovers: Vec<String>,
}

struct Inner {
    nodes: Vec<Node>,
    registry: Option<Child>,
    timings: Timings,
    done: Option<Teardown>,
}

/// A running cluster: registry plus two swarm nodes (`n1` manager, `n2` worker).
pub struct Cluster {
    slot: u32,
    dir: PathBuf,
    subnet_host: Ipv4Addr,
    firewall: Firewall,
    inner: Mutex<Inner>,
    _owner: fs::File,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("slot", &self.slot)
            .field("dir", &self.dir)
            .finish()
    }
}

static SHARED: OnceLock<std::result::Result<Cluster, String>> = OnceLock::new();

extern "C" fn teardown_shared() {
    if let Some(Ok(c)) = SHARED.get() {
        let t = c.teardown();
        eprintln!(
            "kiln-testcluster: slot {} torn down in {:.2}s{}",
            c.slot,
            t.elapsed.as_secs_f64(),
            if t.leftovers.is_empty() {
                String::new()
            } else {
                format!("; LEFT: {:?}", t.leftovers)
            }
        );
    }
}

impl Cluster {
    /// The cluster shared by every test of this process: started by the
    /// first caller, torn down when the process exits.
    pub fn shared() -> &'static Cluster {
        let c = SHARED.get_or_init(|| {
            let c = Cluster::start(Options::default()).map_err(|e| error_chain(&e))?;
            // SAFETY: registering a plain extern "C" function.
            unsafe { libc::atexit(teardown_shared) };
            let t = c.timings();
            eprintln!(
                "kiln-testcluster: slot {} up in {:.2}s (network {:.2}s, registry {:.2}s, daemons {:.2}s, swarm {:.2}s)",
                c.slot,
                t.start.as_secs_f64(),
                t.network.as_secs_f64(),
                t.registry.as_secs_f64(),
                t.daemons.as_secs_f64(),
                t.swarm.as_secs_f64()
            );
            Ok(c)
        });
        match c {
            Ok(c) => c,
            Err(e) => panic!("cannot start the test cluster: {e}"),
        }
    }

    /// Starts a private cluster (torn down by [`Cluster::teardown`] or on drop).
    pub fn start(opts: Options) -> Result<Cluster> {
        let t0 = Instant::now();
        let (slot, owner) = take_slot()?;
        let dir = slot_dir(slot);
        let subnet_host = Ipv4Addr::new(10, 213, slot as u8, 1);
        let firewall = Firewall::save()?;
        let nodes = (1..=2)
            .map(|i| Node {
                name: format!("n{i}"),
                netns: format!("ktc{slot}-n{i}"),
                ip: Ipv4Addr::new(10, 213, slot as u8, 10 + i as u8),
                socket: dir.join(format!("n{i}/docker.sock")),
                id: String::new(),
                dir: dir.join(format!("n{i}")),
                cgroup_parent: format!("ktc{slot}-n{i}"),
                dockerd: None,
            })
            .collect();
        let c = Cluster {
            slot,
            dir,
            subnet_host,
            firewall,
            inner: Mutex::new(Inner {
                nodes,
                registry: None,
                timings: Timings::default(),
                done: None,
            }),
            _owner: owner,
        };
        // From here on, a failure drops `c`, which tears everything down.
        c.bring_up(&opts, t0)?;
        Ok(c)
    }

    fn bring_up(&self, opts: &Options, t0: Instant) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let t = Instant::now();
        self.wire_network(&g.nodes)?;
        g.timings.network = t.elapsed();

        let t = Instant::now();
        g.registry = Some(self.spawn_registry()?);
        g.timings.registry = t.elapsed();

        let t = Instant::now();
        for n in g.nodes.iter_mut() {
            self.write_daemon_config(n)?;
            n.dockerd = Some(spawn_dockerd(n)?);
        }
        // The registry starts while the daemons do; wait for all of them.
        self.wait_registry()?;
        g.timings.registry = g.timings.registry.max(t.elapsed());
        let rt = runtime();
        for n in g.nodes.iter_mut() {
            wait_daemon(&rt, n)?;
        }
        g.timings.daemons = t.elapsed();

        let t = Instant::now();
        rt.block_on(form_swarm(&mut g.nodes, opts))?;
        g.timings.swarm = t.elapsed();
        g.timings.start = t0.elapsed();
        Ok(())
    }

    /// `10.213.S.1:5000`: the registry, as the host and both nodes reach it.
    pub fn registry(&self) -> String {
        format!("{}:{REGISTRY_PORT}", self.subnet_host)
    }

    /// The manager's API endpoint (node 1).
    pub fn manager_endpoint(&self) -> String {
        self.with_node(0, |n| n.endpoint())
    }

    /// Endpoints, addresses and swarm ids of the nodes, in order.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.nodes
            .iter()
            .map(|n| NodeInfo {
                name: n.name.clone(),
                id: n.id.clone(),
                ip: n.ip,
                endpoint: n.endpoint(),
                netns: n.netns.clone(),
                log: n.log(),
            })
            .collect()
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    pub fn timings(&self) -> Timings {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .timings
            .clone()
    }

    fn with_node<T>(&self, i: usize, f: impl FnOnce(&Node) -> T) -> T {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&g.nodes[i])
    }

    /// Stops node `i`'s daemon (SIGTERM, as a shutdown of that machine
    /// would) and waits until it is gone. Its containers stop with it.
    pub fn stop_node(&self, i: usize) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = &mut g.nodes[i];
        if let Some(child) = n.dockerd.take() {
            stop_children(vec![child], DAEMON_STOP);
        }
        Ok(())
    }

    /// Starts node `i`'s daemon again from its data root; it rejoins the
    /// swarm by itself. Returns once its API answers.
    pub fn start_node(&self, i: usize) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = &mut g.nodes[i];
        if n.dockerd.is_none() {
            n.dockerd = Some(spawn_dockerd(n)?);
            wait_daemon(&runtime(), n)?;
        }
        Ok(())
    }

    /// Runs a command inside a node's network namespace (and nothing else
    /// of it): e.g. to reach a published port from the node itself.
    pub fn in_node(&self, i: usize, cmd: &mut Command) -> Result<std::process::Output> {
        let netns = self.with_node(i, |n| n.netns.clone());
        let f = fs::File::open(format!("/var/run/netns/{netns}")).map_err(|source| {
            ClusterError::Io {
                op: "open",
                path: netns.clone().into(),
                source,
            }
        })?;
        let fd = f.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd stays open in the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let what = format!("{cmd:?}");
        cmd.output()
            .map_err(|source| ClusterError::Spawn { cmd: what, source })
    }

    /// Stops and removes everything; idempotent. The returned report says
    /// what had to be killed and whether anything is left.
    pub fn teardown(&self) -> Teardown {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(done) = &g.done {
            return done.clone();
        }
        let t0 = Instant::now();
        let mut report = Teardown::default();
        // All at once: each daemon takes seconds to leave, in parallel.
        let mut children: Vec<Child> = g
            .nodes
            .iter_mut()
            .filter_map(|n| n.dockerd.take())
            .collect();
        children.extend(g.registry.take());
        stop_children(children, DAEMON_STOP);
        report.killed = reap_slot(self.slot);
        report.firewall_restored = self.firewall.restore_if_changed();
        report.leftovers = leftovers(self.slot);
        // The owner lock goes last: once the directory is gone, the slot is free.
        let _ = fs::remove_dir_all(&self.dir);
        report.elapsed = t0.elapsed();
        g.timings.teardown = Some(report.elapsed);
        g.done = Some(report.clone());
        report
    }

    fn wire_network(&self, nodes: &[Node]) -> Result<()> {
        let s = self.slot;
        let lan = format!("ktc{s}-lan");
        let mut host = format!(
            "netns add {lan}\nlink add ktc{s}h type veth peer name h netns {lan}\n\
             addr add {}/24 dev ktc{s}h\nlink set dev ktc{s}h up\n",
            self.subnet_host
        );
        let mut inside = String::from(
            "link set dev lo up\nlink add br0 type bridge\nlink set dev br0 up\n\
             link set dev h master br0 up\n",
        );
        for n in nodes {
            host.push_str(&format!("netns add {}\n", n.netns));
            inside.push_str(&format!(
                "link add {0} type veth peer name eth0 netns {1}\nlink set dev {0} master br0 up\n",
                n.name, n.netns
            ));
        }
        ip(&[], &host)?;
        ip(&["-n", &lan], &inside)?;
        for n in nodes {
            ip(
                &["-n", &n.netns],
                &format!(
                    "link set dev lo up\naddr add {}/24 dev eth0\nlink set dev eth0 up\n",
                    n.ip
                ),
            )?;
        }
        Ok(())
    }

    fn spawn_registry(&self) -> Result<Child> {
        let rdir = self.dir.join("registry");
        mkdir(&rdir.join("data"))?;
        let config = rdir.join("config.yml");
        let yaml = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {}\n",
            rdir.join("data").display(),
            self.registry()
        );
        write(&config, yaml.as_bytes())?;
        let log = create(&rdir.join("registry.log"))?;
        let log2 = log.try_clone().map_err(|source| ClusterError::Io {
            op: "dup",
            path: rdir.join("registry.log"),
            source,
        })?;
        Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|source| ClusterError::Spawn {
                cmd: "docker-registry serve".into(),
                source,
            })
    }

    fn wait_registry(&self) -> Result<()> {
        let addr: SocketAddr = self.registry().parse().expect("registry address");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if http_status(addr, "/v2/") == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::NotReady {
                    what: format!("registry at {addr}"),
                    after: Duration::from_secs(20),
                    log: self.dir.join("registry/registry.log"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn write_daemon_config(&self, n: &Node) -> Result<()> {
        mkdir(&n.dir)?;
        let config = serde_json::json!({
            "insecure-registries": [self.registry()],
            // Containers get this long to stop when the daemon does.
            "shutdown-timeout": 3,
            "log-level": "warn",
        });
        write(
            &n.dir.join("daemon.json"),
            serde_json::to_vec_pretty(&config).expect("json").as_slice(),
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// What tests need to know about a node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub id: String,
    pub ip: Ipv4Addr,
    pub endpoint: String,
    pub netns: String,
    pub log: PathBuf,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn connect(n: &Node) -> Result<Docker> {
    Docker::connect_with_unix(
        &n.socket.to_string_lossy(),
        20,
        bollard::API_DEFAULT_VERSION,
    )
    .map_err(|e| ClusterError::Docker {
        node: n.name.clone(),
        detail: e.to_string(),
    })
}

fn spawn_dockerd(n: &Node) -> Result<Child> {
    let netns = fs::File::open(format!("/var/run/netns/{}", n.netns)).map_err(|source| {
        ClusterError::Io {
            op: "open",
            path: format!("/var/run/netns/{}", n.netns).into(),
            source,
        }
    })?;
    let _ = fs::remove_file(&n.socket);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(n.log())
        .map_err(|source| ClusterError::Io {
            op: "open",
            path: n.log(),
            source,
        })?;
    let log2 = log.try_clone().map_err(|source| ClusterError::Io {
        op: "dup",
        path: n.log(),
        source,
    })?;
    let mut cmd = Command::new("dockerd");
    cmd.arg("--config-file")
        .arg(n.dir.join("daemon.json"))
        .arg("--data-root")
        .arg(n.dir.join("data"))
        .arg("--exec-root")
        .arg(n.dir.join("exec"))
        .arg("--pidfile")
        .arg(n.dir.join("docker.pid"))
        .arg("--host")
        .arg(n.endpoint())
        .arg("--cgroup-parent")
        .arg(format!("/{}", n.cgroup_parent))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let fd = netns.as_raw_fd();
    // SAFETY: only async-signal-safe syscalls between fork and exec; `fd`
    // stays open in the parent until `spawn` returns.
    unsafe {
        cmd.pre_exec(move || {
            // A private mount namespace, receiving the host's mounts but not
            // sending its own: `ip netns exec` would also remount /sys, which
            // hides the cgroup hierarchies dockerd needs.
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let root = c"/";
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| ClusterError::Spawn {
        cmd: "dockerd".into(),
        source,
    })
}

fn wait_daemon(rt: &tokio::runtime::Runtime, n: &mut Node) -> Result<()> {
    let deadline = Instant::now() + DAEMON_START;
    loop {
        if let Some(child) = n.dockerd.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                n.dockerd = None;
                return Err(ClusterError::Docker {
                    node: n.name.clone(),
                    detail: format!("dockerd exited ({status}): {}", tail(&n.log(), 5)),
                });
            }
        }
        if n.socket.exists() {
            if let Ok(d) = connect(n) {
                if rt.block_on(d.ping()).is_ok() {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(ClusterError::NotReady {
                what: format!("dockerd of {}", n.name),
                after: DAEMON_START,
                log: n.log(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn form_swarm(nodes: &mut [Node], opts: &Options) -> Result<()> {
    let err = |node: &str| {
        let node = node.to_string();
        move |e: bollard::errors::Error| ClusterError::Docker {
            node: node.clone(),
            detail: e.to_string(),
        }
    };
    let manager = connect(&nodes[0])?
        .negotiate_version()
        .await
        .map_err(err("n1"))?;
    let spec = SwarmSpec {
        dispatcher: Some(SwarmSpecDispatcher {
            heartbeat_period: Some(opts.heartbeat.as_nanos() as i64),
        }),
        ..Default::default()
    };
    let id = manager
        .init_swarm(SwarmInitRequest {
            listen_addr: Some(format!("{}:2377", nodes[0].ip)),
            advertise_addr: Some(nodes[0].ip.to_string()),
            spec: Some(spec),
            ..Default::default()
        })
        .await
        .map_err(err("n1"))?;
    nodes[0].id = id;
    let token = manager
        .inspect_swarm()
        .await
        .map_err(err("n1"))?
        .join_tokens
        .and_then(|t| t.worker)
        .ok_or_else(|| ClusterError::Docker {
            node: "n1".into(),
            detail: "swarm has no worker join token".into(),
        })?;
    let manager_addr = format!("{}:2377", nodes[0].ip);
    for n in nodes.iter_mut().skip(1) {
        let d = connect(n)?
            .negotiate_version()
            .await
            .map_err(err(&n.name))?;
        d.join_swarm(SwarmJoinRequest {
            listen_addr: Some(format!("{}:2377", n.ip)),
            advertise_addr: Some(n.ip.to_string()),
            remote_addrs: Some(vec![manager_addr.clone()]),
            join_token: Some(token.clone()),
            ..Default::default()
        })
        .await
        .map_err(err(&n.name))?;
        let info = d.info().await.map_err(err(&n.name))?;
        n.id = info.swarm.and_then(|s| s.node_id).unwrap_or_default();
    }
    // Ready means the manager sees every node ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = manager.list_nodes(None).await.map_err(err("n1"))?;
        let ready = listed
            .iter()
            .filter(|n| {
                n.status.as_ref().and_then(|s| s.state) == Some(bollard::models::NodeState::READY)
            })
            .count();
        if ready == nodes.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(ClusterError::NotReady {
                what: format!("{} swarm nodes ({ready} ready)", nodes.len()),
                after: Duration::from_secs(30),
                log: nodes[0].log(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- slots, reaping, leftovers ---------------------------------------------

fn slot_dir(slot: u32) -> PathBuf {
    Path::new(BASE).join(format!("ktc{slot}"))
}

/// Takes the first slot nobody holds, reaping what a dead owner left in it
/// and in every other unheld slot on the way (under a global lock, so two
/// starting processes never pick the same slot).
fn take_slot() -> Result<(u32, fs::File)> {
    let guard = Path::new(BASE).join("ktc.lock");
    let g = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&guard)
        .map_err(|source| ClusterError::Io {
            op: "open",
            path: guard.clone(),
            source,
        })?;
    // SAFETY: flock on a valid descriptor; released when `g` is dropped.
    unsafe { libc::flock(g.as_raw_fd(), libc::LOCK_EX) };
    let mut chosen = None;
    for slot in 0..SLOTS {
        let used = slot_dir(slot).exists() || has_network(slot);
        if !used && chosen.is_some() {
            continue;
        }
        let Some(lock) = lock_owner(slot)? else {
            continue; // a live cluster
        };
        if used {
            reap_slot(slot);
        }
        if chosen.is_none() {
            chosen = Some((slot, lock));
        } else {
            let _ = fs::remove_dir_all(slot_dir(slot));
        }
    }
    drop(g);
    chosen.ok_or(ClusterError::NoSlot)
}

fn has_network(slot: u32) -> bool {
    let prefix = format!("ktc{slot}-");
    Path::new(&format!("/sys/class/net/ktc{slot}h")).exists()
        || netns_names().iter().any(|n| n.starts_with(&prefix))
}

/// An exclusive `flock` on the slot's owner file, or None if held. flock,
/// not a record lock, so that it is per open file: the daemons never hold
/// it (Rust opens files close-on-exec).
fn lock_owner(slot: u32) -> Result<Option<fs::File>> {
    let dir = slot_dir(slot);
    mkdir(&dir)?;
    let path = dir.join("owner.lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| ClusterError::Io {
            op: "open",
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a valid descriptor.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    Ok((r == 0).then_some(f))
}

/// Kills and removes everything of a slot: processes in its namespaces and
/// cgroups, the registry serving its address, links, namespaces, stray
/// mounts, the directory. Returns how many processes it killed.
fn reap_slot(slot: u32) -> usize {
    let prefix = format!("ktc{slot}-");
    let namespaces: Vec<String> = netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    let dir = slot_dir(slot);
    let mut killed = 0;
    // Whatever still runs: in the node namespaces (containerd, shims,
    // proxies), in the nodes' cgroups (containers), or started from the
    // slot's directory (the registry).
    for _round in 0..50 {
        let mut pids: BTreeSet<i32> = BTreeSet::new();
        let inodes: Vec<u64> = namespaces
            .iter()
            .filter_map(|n| inode(&format!("/var/run/netns/{n}")))
            .collect();
        for pid in all_pids() {
            let in_ns = inode(&format!("/proc/{pid}/ns/net")).is_some_and(|i| inodes.contains(&i));
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let from_dir = String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy());
            if in_ns || from_dir {
                pids.insert(pid);
            }
        }
        pids.extend(cgroup_pids(slot));
        pids.remove(&(std::process::id() as i32));
        if pids.is_empty() {
            break;
        }
        for pid in &pids {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        killed += pids.len();
        std::thread::sleep(Duration::from_millis(50));
    }
    remove_cgroups(slot);
    let mut script = String::new();
    if Path::new(&format!("/sys/class/net/ktc{slot}h")).exists() {
        script.push_str(&format!("link del ktc{slot}h\n"));
    }
    for n in &namespaces {
        script.push_str(&format!("netns del {n}\n"));
    }
    if !script.is_empty() {
        let _ = ip(&["-force"], &script);
    }
    // Mounts only leak if a daemon ran outside its private namespace.
    for m in mounts_under(&dir).into_iter().rev() {
        if let Ok(c) = std::ffi::CString::new(m) {
            // SAFETY: umount2 with a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _ = fs::remove_dir_all(dir.join("n1"));
    let _ = fs::remove_dir_all(dir.join("n2"));
    let _ = fs::remove_dir_all(dir.join("registry"));
    killed
}

/// What a slot still has on this host: namespaces, links, cgroups, mounts,
/// processes. Empty once torn down.
pub fn leftovers(slot: u32) -> Vec<String> {
    let mut out = Vec::new();
    let prefix = format!("ktc{slot}-");
    for n in netns_names() {
        if n.starts_with(&prefix) {
            out.push(format!("netns {n}"));
        }
    }
    if Path::new(&format!("/sys/class/net/ktc{slot}h")).exists() {
        out.push(format!("link ktc{slot}h"));
    }
    for c in cgroup_dirs(slot) {
        out.push(format!("cgroup {}", c.display()));
    }
    for m in mounts_under(&slot_dir(slot)) {
        out.push(format!("mount {m}"));
    }
    let dir = slot_dir(slot).to_string_lossy().into_owned();
    for pid in all_pids() {
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&dir) {
            out.push(format!("process {pid}: {}", cmdline.trim()));
        }
    }
    out
}

fn netns_names() -> Vec<String> {
    fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn inode(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(path).ok().map(|m| m.ino())
}

fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// The nodes' cgroup-parent directories in every mounted hierarchy.
fn cgroup_dirs(slot: u32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for h in fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        for i in 1..=2 {
            let d = h.path().join(format!("ktc{slot}-n{i}"));
            if d.is_dir() {
                out.push(d);
            }
        }
    }
    out
}

fn cgroup_pids(slot: u32) -> Vec<i32> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<i32>) {
        if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        for e in fs::read_dir(d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), out);
            }
        }
    }
    for d in cgroup_dirs(slot) {
        walk(&d, &mut out);
    }
    out
}

fn remove_cgroups(slot: u32) {
    fn rm(d: &Path) {
        for e in fs::read_dir(d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rm(&e.path());
            }
        }
        let _ = fs::remove_dir(d);
    }
    for d in cgroup_dirs(slot) {
        rm(&d);
    }
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = format!("{}/", dir.display());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
        .collect()
}

// ---- firewall ----------------------------------------------------------------

/// The host's iptables and ip6tables rules, as `*-save` prints them without
/// comments and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Firewall {
    v4: Option<String>,
    v6: Option<String>,
}

impl Firewall {
    fn save() -> Result<Firewall> {
        Ok(Firewall {
            v4: save_rules("iptables-save"),
            v6: save_rules("ip6tables-save"),
        })
    }

    /// Restores the snapshot if a Docker daemon changed the host's rules
    /// (Docker's chains appeared since the snapshot). Other differences are
    /// someone else's (kiln's local provider, another test on this host):
    /// restoring would undo their work, so they are only reported.
    fn restore_if_changed(&self) -> bool {
        let Ok(now) = Firewall::save() else {
            return false;
        };
        let mut restored = false;
        for (before, after, tool) in [
            (&self.v4, &now.v4, "iptables-restore"),
            (&self.v6, &now.v6, "ip6tables-restore"),
        ] {
            let (Some(before), Some(after)) = (before, after) else {
                continue;
            };
            if before == after {
                continue;
            }
            let docker = |t: &str| {
                t.lines()
                    .filter(|l| l.starts_with(":DOCKER"))
                    .map(str::to_string)
                    .collect::<BTreeSet<_>>()
            };
            if docker(after).difference(&docker(before)).next().is_some() {
                eprintln!(
                    "kiln-testcluster: a dockerd changed the host firewall; restoring it ({tool})"
                );
                let _ = run_stdin(tool, &[], before);
                restored = true;
            } else {
                eprintln!(
                    "kiln-testcluster: the host firewall changed during the run, not by a dockerd; left as is"
                );
            }
        }
        restored
    }
}

/// Rules without comments and with counters zeroed; None when the tool is
/// missing (then there is no firewall for a daemon to change either).
fn save_rules(tool: &str) -> Option<String> {
    let out = Command::new(tool).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
                (true, Some(i)) => format!("{} [0:0]", &l[..i]),
                _ => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n",
    )
}

// ---- small helpers -------------------------------------------------------------

/// Runs `ip [global] -batch -` with `script` on stdin.
fn ip(global: &[&str], script: &str) -> Result<()> {
    let args: Vec<&str> = global.iter().copied().chain(["-batch", "-"]).collect();
    run_stdin("ip", &args, script)
}

fn run_stdin(prog: &str, args: &[&str], input: &str) -> Result<()> {
    let cmd = format!(
        "{prog} {} [{}]",
        args.join(" "),
        input.lines().collect::<Vec<_>>().join("; ")
    );
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ClusterError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    let _ = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes());
    let out = child
        .wait_with_output()
        .map_err(|source| ClusterError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(ClusterError::Command {
        cmd,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// SIGTERM to all, wait up to `grace`, then SIGKILL; always reaps.
fn stop_children(mut children: Vec<Child>, grace: Duration) {
    for c in &children {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        children.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
        if children.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The status code of `GET path` on `addr`, or None if it does not answer.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let head = std::str::from_utf8(&buf[..n]).ok()?;
    head.split(' ').nth(1)?.parse().ok()
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn mkdir(d: &Path) -> Result<()> {
    fs::create_dir_all(d).map_err(|source| ClusterError::Io {
        op: "create directory",
        path: d.into(),
        source,
    })
}

fn write(p: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(p, bytes).map_err(|source| ClusterError::Io {
        op: "write",
        path: p.into(),
        source,
    })
}

fn create(p: &Path) -> Result<fs::File> {
    fs::File::create(p).map_err(|source| ClusterError::Io {
        op: "create",
        path: p.into(),
        source,
    })
}
