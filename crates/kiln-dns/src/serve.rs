//! The server's sockets, threads and tasks: binding (UDP sockets sharing
//! an address with `SO_REUSEPORT`, one TCP listener per address), one
//! thread per UDP socket, and on the runtime one task per TCP connection,
//! one per forward, the watcher that switches record sets and writes the
//! status; and graceful shutdown.

use std::future::Future;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hickory_proto::op::{Message, ResponseCode};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch::{Inbox, Outbox};
use crate::control::{self, Counters, RecordsFile, Status, POLL};
use crate::forward::Forwarder;
use crate::limit::Limiter;
use crate::respond::{self, Action, Outcome, Transport};
use crate::zone::Zone;
use crate::{Config, DnsError};

/// The largest DNS message (a TCP read buffer).
const MAX_MESSAGE: usize = 65535;

/// A server whose sockets are bound; [`Server::run`] serves on them.
pub struct Server {
    config: Config,
    udp: Vec<UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
    addrs: Vec<SocketAddr>,
}

/// Counters of one UDP thread (or the shared one
/// of TCP connections and forwards): written by few, summed for the
/// status.
#[derive(Debug, Default)]
struct Tally {
    local: AtomicU64,
    forwarded: AtomicU64,
    forward_failed: AtomicU64,
    refused: AtomicU64,
    nxdomain: AtomicU64,
    malformed: AtomicU64,
}

impl Tally {
    fn count(&self, outcome: Outcome) {
        let c = match outcome {
            Outcome::Local => &self.local,
            Outcome::NxDomain => &self.nxdomain,
            Outcome::Malformed => &self.malformed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// What every task shares.
struct Shared {
    /// The zone answers come from; replaced whole on a switch.
    zone: Mutex<Arc<Zone>>,
    /// Its generation, read on every packet so a task notices a switch
    /// without taking the lock.
    generation: AtomicU64,
    forwarder: Arc<Forwarder>,
    tcp_limits: Arc<Limiter>,
    tallies: Mutex<Vec<Arc<Tally>>>,
    /// The tally of TCP connections and forwards.
    common: Arc<Tally>,
    /// Spreads the rotation of TCP answers.
    turns: AtomicU64,
    tracker: TaskTracker,
    stop: CancellationToken,
    tcp_idle: Duration,
}

impl Shared {
    fn zone(&self) -> Arc<Zone> {
        self.zone.lock().expect("zone").clone()
    }

    fn tally(&self) -> Arc<Tally> {
        let t = Arc::new(Tally::default());
        self.tallies.lock().expect("tallies").push(t.clone());
        t
    }

    fn counters(&self) -> Counters {
        let mut c = Counters::default();
        for t in self.tallies.lock().expect("tallies").iter() {
            c.local += t.local.load(Ordering::Relaxed);
            c.forwarded += t.forwarded.load(Ordering::Relaxed);
            c.forward_failed += t.forward_failed.load(Ordering::Relaxed);
            c.refused += t.refused.load(Ordering::Relaxed);
            c.nxdomain += t.nxdomain.load(Ordering::Relaxed);
            c.malformed += t.malformed.load(Ordering::Relaxed);
        }
        c
    }
}

/// How long a UDP thread blocks in a receive before it looks whether the
/// server is stopping.
const UDP_WAKE: Duration = Duration::from_millis(100);

fn udp_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    // Room for bursts; the kernel caps it at net.core.rmem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    s.set_read_timeout(Some(UDP_WAKE))?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s.into())
}

impl Server {
    /// Binds every listen address, over UDP (`udp_sockets` sockets) and
    /// TCP. An address already in use by anyone is an error, even though
    /// the UDP sockets share theirs among themselves.
    pub fn bind(config: Config) -> Result<Server, DnsError> {
        if config.listen.is_empty() {
            return Err(DnsError::NoListen);
        }
        let n = config.udp_sockets.max(1);
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut addrs = Vec::new();
        for &want in &config.listen {
            let listen_err = |transport, source| DnsError::Listen {
                addr: want,
                transport,
                source,
            };
            // Port 0: the first UDP socket picks a port, then TCP must get
            // the same one; a few tries find a port free on both.
            let mut tries = if want.port() == 0 { 20 } else { 1 };
            let (first, listener, addr) = loop {
                tries -= 1;
                if want.port() != 0 && n > 1 {
                    // SO_REUSEPORT would let us share a port another
                    // process holds: make sure nobody does.
                    drop(udp_socket(want, false).map_err(|e| listen_err("udp", e))?);
                }
                let first = udp_socket(want, n > 1).map_err(|e| listen_err("udp", e))?;
                let addr = first.local_addr().map_err(|e| listen_err("udp", e))?;
                match tcp_listener(addr) {
                    Ok(l) => break (first, l, addr),
                    Err(e) if e.kind() == ErrorKind::AddrInUse && tries > 0 => continue,
                    Err(e) => return Err(listen_err("tcp", e)),
                }
            };
            udp.push(first);
            for _ in 1..n {
                udp.push(udp_socket(addr, true).map_err(|e| listen_err("udp", e))?);
            }
            tcp.push(listener);
            addrs.push(addr);
        }
        Ok(Server {
            config,
            udp,
            tcp,
            addrs,
        })
    }

    /// Where the server answers (ports resolved), in the order given.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Serves until `shutdown` completes. Must run inside a tokio runtime.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), DnsError> {
        let Server {
            config,
            udp,
            tcp,
            addrs,
        } = self;
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| DnsError::Io {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        let forwarder = Arc::new(Forwarder::new(
            &config.upstreams,
            config.forward_timeout,
            Limiter::new(config.forwards_per_client, config.forwards_total),
        ));
        let common = Arc::new(Tally::default());
        let shared = Arc::new(Shared {
            zone: Mutex::new(Arc::new(Zone::default())),
            generation: AtomicU64::new(0),
            forwarder,
            tcp_limits: Arc::new(Limiter::new(config.tcp_per_client, config.tcp_total)),
            tallies: Mutex::new(vec![common.clone()]),
            common,
            turns: AtomicU64::new(0),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
            tcp_idle: config.tcp_idle,
        });
        let mut watcher = Watcher {
            dir: dir.clone(),
            shared: shared.clone(),
            listen: addrs.clone(),
            seen: None,
            seq: 0,
            start_ticks: control::start_ticks(std::process::id()).unwrap_or(0),
            last_counters: None,
        };
        watcher.poll();
        watcher.write_status();
        control::write_atomic(
            &control::pid_path(&dir),
            std::process::id().to_string().as_bytes(),
        )?;

        let runtime = tokio::runtime::Handle::current();
        let mut threads = Vec::new();
        for (i, socket) in udp.into_iter().enumerate() {
            let shared = shared.clone();
            let runtime = runtime.clone();
            let thread = std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || serve_udp(Arc::new(socket), shared, runtime))
                .map_err(|source| DnsError::Io {
                    op: "start a thread for",
                    path: dir.clone(),
                    source,
                })?;
            threads.push(thread);
        }
        let mut serving = tokio::task::JoinSet::new();
        for listener in tcp {
            let listener = TcpListener::from_std(listener).map_err(|source| DnsError::Io {
                op: "register a listener for",
                path: dir.clone(),
                source,
            })?;
            serving.spawn(serve_tcp(listener, shared.clone()));
        }
        tracing::info!(
            "answering for {:?} on {addrs:?} (udp and tcp), {} upstream(s)",
            shared.zone().env,
            config.upstreams.len()
        );

        let watch = {
            let stop = shared.stop.clone();
            tokio::spawn(async move {
                let mut ticks = 0u32;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(POLL) => {}
                        _ = stop.cancelled() => break,
                    }
                    ticks = ticks.wrapping_add(1);
                    if !watcher.poll() && ticks.is_multiple_of(100) {
                        // Counters: about once a second, when they moved.
                        watcher.write_status_if_counted();
                    }
                }
                watcher
            })
        };

        shutdown.await;
        shared.stop.cancel();
        while serving.join_next().await.is_some() {}
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        shared.tracker.close();
        // Forwards end within SHUTDOWN_GRACE and TCP connections at the
        // cancellation; this bound only guards against a peer that stops
        // reading our last reply.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE * 4, shared.tracker.wait()).await;
        if let Ok(mut w) = watch.await {
            w.write_status();
        }
        let _ = std::fs::remove_file(control::pid_path(&dir));
        Ok(())
    }
}

/// Switches record sets when `records.json` changes, and writes the
/// status.
struct Watcher {
    dir: std::path::PathBuf,
    shared: Arc<Shared>,
    listen: Vec<SocketAddr>,
    /// What identified the file last loaded (modification time, size,
    /// inode): a new rename changes at least the inode.
    seen: Option<(SystemTime, u64, u64)>,
    seq: u64,
    start_ticks: u64,
    last_counters: Option<Counters>,
}

impl Watcher {
    /// Loads `records.json` if it changed; true when it switched.
    fn poll(&mut self) -> bool {
        let path = control::records_path(&self.dir);
        let id = std::fs::metadata(&path).ok().and_then(|m| {
            use std::os::unix::fs::MetadataExt;
            Some((m.modified().ok()?, m.len(), m.ino()))
        });
        if id.is_none() || id == self.seen {
            return false;
        }
        self.seen = id;
        let Some(file) = read_file(&path) else {
            return false;
        };
        // Whatever generation the file holds is the one to serve: kiln is
        // its only writer, under the environment's lock.
        if file.generation == self.shared.generation.load(Ordering::Acquire) {
            return false;
        }
        let zone = Arc::new(Zone::compile(&file));
        tracing::info!(
            "record set {} for {:?}: {} names",
            zone.generation,
            zone.env,
            zone.len()
        );
        *self.shared.zone.lock().expect("zone") = zone;
        self.shared
            .generation
            .store(file.generation, Ordering::Release);
        self.write_status();
        true
    }

    fn write_status_if_counted(&mut self) {
        if self.last_counters != Some(self.shared.counters()) {
            self.write_status();
        }
    }

    fn write_status(&mut self) {
        let zone = self.shared.zone();
        let counters = self.shared.counters();
        self.seq += 1;
        let status = Status {
            pid: std::process::id(),
            start_ticks: self.start_ticks,
            env: zone.env.clone(),
            generation: zone.generation,
            listen: self.listen.clone(),
            names: zone.len(),
            counters,
            seq: self.seq,
        };
        self.last_counters = Some(counters);
        let bytes = serde_json::to_vec_pretty(&status).expect("a status serializes");
        if let Err(e) = control::write_atomic(&control::status_path(&self.dir), &bytes) {
            tracing::warn!("{e}");
        }
    }
}

fn read_file(path: &Path) -> Option<RecordsFile> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", path.display());
            None
        }
    }
}

/// One UDP socket's thread: local answers right here, forwards handed
/// to the runtime as tasks. A thread blocked in `recvfrom` is woken by the
/// kernel as a packet arrives, with no scheduler between: the shortest
/// path there is for the queries that matter most.
fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>, runtime: tokio::runtime::Handle) {
    let tally = shared.tally();
    let mut inbox = Inbox::new();
    let mut outbox = Outbox::new();
    let mut out = Vec::with_capacity(4096);
    let mut zone = shared.zone();
    let mut turn = 0usize;
    let forwarding = shared.forwarder.enabled();
    while !shared.stop.is_cancelled() {
        let n = match inbox.receive(&socket) {
            Ok(n) => n,
            Err(e) => {
                if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                    // ICMP errors of earlier sends surface here; the
                    // socket itself is fine.
                    tracing::debug!("udp receive: {e}");
                }
                continue;
            }
        };
        if shared.generation.load(Ordering::Acquire) != zone.generation {
            zone = shared.zone();
        }
        for i in 0..n {
            let (packet, cut, from) = inbox.datagram(i);
            let Some(src) = from.filter(|a| a.port() != 0) else {
                continue;
            };
            if cut {
                tally.count(Outcome::Malformed);
                continue;
            }
            turn = turn.wrapping_add(1);
            match respond::handle(&zone, packet, Transport::Udp, forwarding, turn, &mut out) {
                Action::Reply(outcome) => {
                    tally.count(outcome);
                    outbox.push(&out, src);
                }
                Action::Drop => tally.count(Outcome::Malformed),
                Action::Forward(request) => {
                    let Some(permit) = shared.forwarder.limits.admit(src.ip()) else {
                        tally.refused.fetch_add(1, Ordering::Relaxed);
                        respond::error_reply(
                            &request,
                            ResponseCode::Refused,
                            Transport::Udp,
                            &mut out,
                        );
                        outbox.push(&out, src);
                        continue;
                    };
                    let socket = socket.clone();
                    let shared2 = shared.clone();
                    shared.tracker.spawn_on(
                        async move {
                            let mut out = Vec::new();
                            forward(&shared2, &request, Transport::Udp, &mut out).await;
                            // A UDP send does not wait (the datagram is
                            // queued or dropped): fine to make from a task.
                            send(&socket, &out, src);
                            drop(permit);
                        },
                        &runtime,
                    );
                }
            }
        }
        outbox.flush(&socket);
    }
}

fn send(socket: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    if bytes.is_empty() {
        return;
    }
    if let Err(e) = socket.send_to(bytes, to) {
        tracing::debug!("udp send to {to}: {e}");
    }
}

/// Forwards `request` and writes the reply: the upstream's answer, or
/// SERVFAIL.
/// When the server stops, a forward still waiting gets this long before
/// its client is told SERVFAIL.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

async fn forward(shared: &Shared, request: &Message, transport: Transport, out: &mut Vec<u8>) {
    let stopped = async {
        shared.stop.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let answer = tokio::select! {
        a = shared.forwarder.forward(request, transport) => a,
        _ = stopped => None,
    };
    match answer {
        Some(answer) => {
            shared.common.forwarded.fetch_add(1, Ordering::Relaxed);
            respond::relay(request, answer, transport, out);
        }
        None => {
            shared.common.forward_failed.fetch_add(1, Ordering::Relaxed);
            respond::error_reply(request, ResponseCode::ServFail, transport, out);
        }
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shared.stop.cancelled() => break,
        };
        let (stream, src) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was
                // accepted: wait a little rather than spin.
                tracing::debug!("tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(permit) = shared.tcp_limits.admit(src.ip()) else {
            // Over its share: closed at once.
            drop(stream);
            continue;
        };
        let shared2 = shared.clone();
        shared.tracker.spawn(async move {
            connection(stream, src.ip(), &shared2).await;
            drop(permit);
        });
    }
}

/// One TCP connection: length-prefixed queries answered in order until
/// the client closes, goes idle, or the server stops.
async fn connection(mut stream: TcpStream, src: IpAddr, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut out = Vec::with_capacity(4096);
    let mut frame = Vec::with_capacity(4096);
    loop {
        let read = async {
            let len = usize::from(stream.read_u16().await?);
            stream.read_exact(&mut buf[..len]).await?;
            Ok::<usize, std::io::Error>(len)
        };
        let len = tokio::select! {
            r = tokio::time::timeout(shared.tcp_idle, read) => match r {
                Ok(Ok(len)) => len,
                _ => return,
            },
            _ = shared.stop.cancelled() => return,
        };
        let zone = shared.zone();
        let turn = shared.turns.fetch_add(1, Ordering::Relaxed) as usize;
        let forwarding = shared.forwarder.enabled();
        match respond::handle(
            &zone,
            &buf[..len],
            Transport::Tcp,
            forwarding,
            turn,
            &mut out,
        ) {
            Action::Reply(outcome) => shared.common.count(outcome),
            Action::Drop => {
                shared.common.count(Outcome::Malformed);
                return;
            }
            Action::Forward(request) => match shared.forwarder.limits.admit(src) {
                None => {
                    shared.common.refused.fetch_add(1, Ordering::Relaxed);
                    respond::error_reply(&request, ResponseCode::Refused, Transport::Tcp, &mut out);
                }
                Some(_permit) => forward(shared, &request, Transport::Tcp, &mut out).await,
            },
        }
        if out.is_empty() {
            continue;
        }
        frame.clear();
        frame.extend_from_slice(&(out.len() as u16).to_be_bytes());
        frame.extend_from_slice(&out);
        match tokio::time::timeout(shared.tcp_idle, stream.write_all(&frame)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}
