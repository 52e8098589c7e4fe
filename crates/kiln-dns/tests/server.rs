//! The DNS server on real UDP and TCP sockets on 127.0.0.1: local answers,
//! record switches, forwarding to a second server, failure modes and
//! fairness. No assertion depends on timing; waits poll with a deadline.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdUdp};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::Name;
use kiln_dns::{lookup, Answer, Config, Lookup, RecordType, Records, ResponseCode, Server};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(5);

struct Running {
    addr: SocketAddr,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), kiln_dns::DnsError>>>,
    _tmp: Option<tempfile::TempDir>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

fn records(names: &[(&str, &[[u8; 4]])]) -> Records {
    let mut r = Records::new("staging");
    for (n, ips) in names {
        r.names.insert(
            n.to_string(),
            ips.iter().map(|o| Ipv4Addr::from(*o)).collect(),
        );
    }
    r
}

async fn start_with(records: &Records, tweak: impl FnOnce(&mut Config)) -> Running {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("dns");
    kiln_dns::set_records(&dir, records).unwrap();
    let mut config = Config::new(dir.clone(), vec!["127.0.0.1:0".parse().unwrap()]);
    tweak(&mut config);
    let server = Server::bind(config).unwrap();
    let addr = server.local_addrs()[0];
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let running = Running {
        addr,
        dir,
        stop: Some(tx),
        task: Some(task),
        _tmp: Some(tmp),
    };
    wait_switch(&running.dir, 1).await;
    running
}

async fn start(records: &Records) -> Running {
    start_with(records, |_| {}).await
}

async fn wait_switch(dir: &Path, generation: u64) {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || kiln_dns::wait_generation(&dir, generation, WAIT))
        .await
        .unwrap()
        .unwrap();
}

async fn ask(server: SocketAddr, name: &str, t: RecordType) -> Answer {
    let q = Lookup {
        record_type: t,
        ..Lookup::a(name)
    };
    lookup(server, &q, WAIT).await.unwrap()
}

fn v4(o: [u8; 4]) -> std::net::IpAddr {
    Ipv4Addr::from(o).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_known_names_with_their_addresses_and_ttl() {
    let mut r = records(&[
        ("app", &[[10, 0, 0, 2], [10, 0, 0, 3]]),
        ("app-3f9c", &[[10, 0, 0, 2]]),
    ]);
    r.ttl = 7;
    let s = start(&r).await;
    let a = ask(s.addr, "app-3f9c", RecordType::A).await;
    assert_eq!(a.rcode, ResponseCode::NoError);
    assert_eq!(a.addresses, vec![v4([10, 0, 0, 2])]);
    assert_eq!(a.ttl, Some(7));
    assert!(a.authoritative);
    // Both servers of the role, and each comes first in turn.
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let a = ask(s.addr, "app", RecordType::A).await;
        assert_eq!(a.addresses.len(), 2);
        firsts.insert(a.addresses[0]);
    }
    assert_eq!(firsts.len(), 2);
    // dig's kind of query: EDNS.
    let q = Lookup {
        edns: true,
        ..Lookup::a("app-3f9c")
    };
    let a = lookup(s.addr, &q, WAIT).await.unwrap();
    assert_eq!(a.addresses, vec![v4([10, 0, 0, 2])]);
    // The blocking client, as `kiln dns` uses it.
    let a = kiln_dns::query(s.addr, "app-3f9c", WAIT).unwrap();
    assert_eq!(a.addresses, vec![v4([10, 0, 0, 2])]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_match_in_any_case_with_or_without_the_final_dot() {
    let s = start(&records(&[("db.Staging", &[[10, 0, 0, 9]])])).await;
    for name in ["db.staging", "DB.STAGING.", "dB.sTaGiNg"] {
        let a = ask(s.addr, name, RecordType::A).await;
        assert_eq!(a.addresses, vec![v4([10, 0, 0, 9])], "{name}");
    }
    // The question comes back exactly as the client wrote it.
    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut q = Message::query();
    q.queries.push(Query::query(
        Name::from_ascii("Db.StAgInG.").unwrap(),
        RecordType::A,
    ));
    sock.send_to(&q.to_vec().unwrap(), s.addr).unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, q.metadata.id);
    assert_eq!(r.queries[0].name().to_ascii(), "Db.StAgInG.");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_is_visible_once_acknowledged() {
    let s = start(&records(&[("app", &[[10, 0, 0, 2]])])).await;
    assert_eq!(
        ask(s.addr, "app", RecordType::A).await.addresses,
        vec![v4([10, 0, 0, 2])]
    );
    let generation = kiln_dns::set_records(
        &s.dir,
        &records(&[("app", &[[10, 0, 0, 3]]), ("db", &[[10, 0, 0, 4]])]),
    )
    .unwrap();
    assert_eq!(generation, 2);
    wait_switch(&s.dir, generation).await;
    assert_eq!(
        ask(s.addr, "app", RecordType::A).await.addresses,
        vec![v4([10, 0, 0, 3])]
    );
    assert_eq!(
        ask(s.addr, "db", RecordType::A).await.addresses,
        vec![v4([10, 0, 0, 4])]
    );
    // The status names this very process and its record set.
    let status = kiln_dns::running(&s.dir).expect("running");
    assert_eq!(status.pid, std::process::id());
    assert_eq!(status.generation, 2);
    assert_eq!(status.names, 2);
    assert_eq!(status.listen, vec![s.addr]);
    let dir = s.dir.clone();
    s.stop().await;
    assert!(!kiln_dns::control::pid_path(&dir).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_names_get_nodata_and_unknown_ones_nxdomain() {
    let s = start(&records(&[("app", &[[10, 0, 0, 2]]), ("cache", &[])])).await;
    let a = ask(s.addr, "app", RecordType::AAAA).await;
    assert_eq!((a.rcode, a.records), (ResponseCode::NoError, 0));
    assert!(a.authoritative);
    let a = ask(s.addr, "app", RecordType::MX).await;
    assert_eq!((a.rcode, a.records), (ResponseCode::NoError, 0));
    // A role with no server in rotation: known, empty, not forwarded.
    let a = ask(s.addr, "cache", RecordType::A).await;
    assert_eq!((a.rcode, a.records), (ResponseCode::NoError, 0));
    // No upstream: unknown names are NXDOMAIN at once.
    let a = ask(s.addr, "nothing.example", RecordType::A).await;
    assert_eq!((a.rcode, a.records), (ResponseCode::NXDomain, 0));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_are_forwarded_to_the_upstream() {
    // The upstream: a second server, authoritative for its own names.
    let upstream = start(&records(&[("www.example.test", &[[192, 0, 2, 1]])])).await;
    let up = upstream.addr;
    let s = start_with(&records(&[("app", &[[10, 0, 0, 2]])]), |c| {
        c.upstreams = vec![up];
    })
    .await;
    let a = ask(s.addr, "www.example.test", RecordType::A).await;
    assert_eq!(a.rcode, ResponseCode::NoError);
    assert_eq!(a.addresses, vec![v4([192, 0, 2, 1])]);
    // The upstream's NXDOMAIN comes through as such.
    let a = ask(s.addr, "missing.example.test", RecordType::A).await;
    assert_eq!(a.rcode, ResponseCode::NXDomain);
    // Over TCP, forwarded over TCP.
    let q = Lookup {
        tcp: true,
        ..Lookup::a("www.example.test")
    };
    let a = lookup(s.addr, &q, WAIT).await.unwrap();
    assert_eq!(a.addresses, vec![v4([192, 0, 2, 1])]);
    // Local names are still answered locally.
    let a = ask(s.addr, "app", RecordType::A).await;
    assert_eq!(a.addresses, vec![v4([10, 0, 0, 2])]);
    let counters = wait_counters(&s.dir, |c| c.forwarded >= 3).await;
    assert_eq!(counters.forward_failed, 0);
    s.stop().await;
    upstream.stop().await;
}

async fn wait_counters(dir: &Path, ok: impl Fn(&kiln_dns::Counters) -> bool) -> kiln_dns::Counters {
    let start = Instant::now();
    loop {
        if let Some(s) = kiln_dns::read_status(dir) {
            if ok(&s.counters) {
                return s.counters;
            }
            assert!(start.elapsed() < WAIT, "counters: {:?}", s.counters);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_gets_servfail_within_the_timeout() {
    // Bound, never read: queries to it vanish.
    let silent = StdUdp::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let s = start_with(&records(&[("app", &[[10, 0, 0, 2]])]), |c| {
        c.upstreams = vec![silent_addr];
        c.forward_timeout = Duration::from_millis(300);
    })
    .await;
    // The client waits up to 5 s; the server gives up after 300 ms.
    let a = ask(s.addr, "www.example.test", RecordType::A).await;
    assert_eq!(a.rcode, ResponseCode::ServFail);
    let q = Lookup {
        tcp: true,
        ..Lookup::a("www.example.test")
    };
    assert_eq!(
        lookup(s.addr, &q, WAIT).await.unwrap().rcode,
        ResponseCode::ServFail
    );
    wait_counters(&s.dir, |c| c.forward_failed == 2).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_queries_and_answers_too_large_for_udp() {
    let many: Vec<[u8; 4]> = (2..=61).map(|i| [10, 0, 1, i]).collect();
    let s = start(&records(&[("app", &[[10, 0, 0, 2]]), ("big", &many)])).await;
    let tcp = |name: &str| Lookup {
        tcp: true,
        ..Lookup::a(name)
    };
    let a = lookup(s.addr, &tcp("app"), WAIT).await.unwrap();
    assert_eq!(a.addresses, vec![v4([10, 0, 0, 2])]);
    let udp = ask(s.addr, "big", RecordType::A).await;
    assert!(udp.truncated);
    assert!(udp.addresses.is_empty());
    let a = lookup(s.addr, &tcp("big"), WAIT).await.unwrap();
    assert_eq!(a.addresses.len(), 60);
    // The blocking client retries over TCP by itself.
    assert_eq!(
        kiln_dns::query(s.addr, "big", WAIT)
            .unwrap()
            .addresses
            .len(),
        60
    );
    s.stop().await;
}

/// A small deterministic generator: the same "random" packets every run.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u8 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u8
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_do_not_stop_the_server() {
    let s = start(&records(&[("app", &[[10, 0, 0, 2]])])).await;
    let sock = StdUdp::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 2048];
    // A header announcing one question and none after it: FORMERR, same id.
    let header = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    sock.send_to(&header, s.addr).unwrap();
    let n = sock.recv(&mut buf).unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, 0x1234);
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    // An UPDATE: not implemented.
    let update = [0x12, 0x35, 0x28, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
    sock.send_to(&update, s.addr).unwrap();
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(
        Message::from_vec(&buf[..n]).unwrap().metadata.response_code,
        ResponseCode::NotImp
    );
    // Larger than any query: cut by the receive buffer, dropped.
    sock.send_to(&[0x55u8; 6000], s.addr).unwrap();
    // Garbage of every length, and truncations of a valid query.
    let mut rng = Lcg(7);
    for len in 0..300usize {
        let junk: Vec<u8> = (0..len).map(|_| rng.next()).collect();
        sock.send_to(&junk, s.addr).unwrap();
    }
    let mut q = Message::query();
    q.queries.push(Query::query(
        Name::from_ascii("app.").unwrap(),
        RecordType::A,
    ));
    let valid = q.to_vec().unwrap();
    for cut in 0..valid.len() {
        sock.send_to(&valid[..cut], s.addr).unwrap();
    }
    // Flipped bits in a valid query.
    for i in 0..valid.len() * 8 {
        let mut bent = valid.clone();
        bent[i / 8] ^= 1 << (i % 8);
        sock.send_to(&bent, s.addr).unwrap();
    }
    // Garbage over TCP, then a connection that says it sends more than it does.
    {
        use tokio::io::AsyncWriteExt;
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        c.write_all(&[0, 5, 1, 2, 3, 4, 5]).await.unwrap();
        let mut c2 = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        c2.write_all(&[0xff, 0xff, 1]).await.unwrap();
    }
    // Still answering, both ways.
    assert_eq!(
        ask(s.addr, "app", RecordType::A).await.addresses,
        vec![v4([10, 0, 0, 2])]
    );
    let q = Lookup {
        tcp: true,
        ..Lookup::a("app")
    };
    assert_eq!(
        lookup(s.addr, &q, WAIT).await.unwrap().addresses,
        vec![v4([10, 0, 0, 2])]
    );
    let c = wait_counters(&s.dir, |c| c.malformed >= 300).await;
    assert!(c.local >= 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_client_does_not_starve_another() {
    // Forwards to a silent upstream take the whole timeout: without a
    // per-client bound the flood would hold every forward slot.
    let silent = StdUdp::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let s = start_with(&records(&[("app", &[[10, 0, 0, 2]])]), |c| {
        c.upstreams = vec![silent_addr];
        c.forward_timeout = Duration::from_secs(3);
        c.forwards_per_client = 8;
        c.forwards_total = 16;
    })
    .await;
    let server = s.addr;
    let flooder = std::thread::spawn(move || {
        let sock = StdUdp::bind("127.0.0.2:0").unwrap();
        sock.set_nonblocking(true).unwrap();
        let mut refused = 0u32;
        let mut buf = [0u8; 512];
        for i in 0..3000u32 {
            let mut q = Message::query();
            let name = format!("n{i}.flood.example.");
            q.queries.push(Query::query(
                Name::from_ascii(&name).unwrap(),
                RecordType::A,
            ));
            let _ = sock.send_to(&q.to_vec().unwrap(), server);
            while let Ok(n) = sock.recv(&mut buf) {
                if let Ok(r) = Message::from_vec(&buf[..n]) {
                    if r.metadata.response_code == ResponseCode::Refused {
                        refused += 1;
                    }
                }
            }
        }
        refused
    });
    // Meanwhile another client asks for a local name 50 times. It retries
    // a lost packet like a resolver does; every question gets its answer.
    let mut answered = 0;
    for _ in 0..50 {
        let q = Lookup::a("app");
        for _attempt in 0..5 {
            if let Ok(a) = lookup(server, &q, Duration::from_secs(1)).await {
                assert_eq!(a.addresses, vec![v4([10, 0, 0, 2])]);
                answered += 1;
                break;
            }
        }
    }
    let refused = tokio::task::spawn_blocking(move || flooder.join().unwrap())
        .await
        .unwrap();
    assert_eq!(answered, 50);
    assert!(refused > 0, "the flood was never refused");
    s.stop().await;
}

/// An upstream that answers names starting with "ok" (192.0.2.7) and
/// never answers the others.
async fn selective_upstream() -> SocketAddr {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let Some(query) = q.queries.first().cloned() else {
                continue;
            };
            if !query.name().to_ascii().starts_with("ok") {
                continue;
            }
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            let name = query.name().clone();
            r.queries.push(query);
            r.answers.push(hickory_proto::rr::Record::from_rdata(
                name,
                60,
                hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(
                    192, 0, 2, 7,
                ))),
            ));
            let _ = sock.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_are_bounded_per_client() {
    let upstream = selective_upstream().await;
    let s = start_with(&records(&[("app", &[[10, 0, 0, 2]])]), |c| {
        c.upstreams = vec![upstream];
        // Longer than the test: hung forwards hold their place throughout.
        c.forward_timeout = Duration::from_secs(60);
        c.forwards_per_client = 8;
        c.forwards_total = 16;
    })
    .await;
    // One client sends 20 forwards that hang: 8 take its share, the other
    // 12 are refused at once.
    let greedy = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
    for i in 0..20 {
        let mut q = Message::query();
        q.queries.push(Query::query(
            Name::from_ascii(format!("hang{i}.example.")).unwrap(),
            RecordType::A,
        ));
        greedy.send_to(&q.to_vec().unwrap(), s.addr).await.unwrap();
    }
    let mut refused = 0;
    let mut buf = [0u8; 512];
    while refused < 12 {
        let n = tokio::time::timeout(WAIT, greedy.recv(&mut buf))
            .await
            .expect("12 refusals")
            .unwrap();
        let r = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        refused += 1;
    }
    // Another client's forward still goes out and is answered, and local
    // names are answered to everyone, the greedy client included.
    let a = ask(s.addr, "ok.example", RecordType::A).await;
    assert_eq!(a.addresses, vec![v4([192, 0, 2, 7])]);
    for _ in 0..20 {
        assert_eq!(
            ask(s.addr, "app", RecordType::A).await.addresses,
            vec![v4([10, 0, 0, 2])]
        );
    }
    let mut q = Message::query();
    q.queries.push(Query::query(
        Name::from_ascii("app.").unwrap(),
        RecordType::A,
    ));
    greedy.send_to(&q.to_vec().unwrap(), s.addr).await.unwrap();
    let n = tokio::time::timeout(WAIT, greedy.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(Message::from_vec(&buf[..n]).unwrap().answers.len(), 1);
    let c = wait_counters(&s.dir, |c| c.refused == 12 && c.forwarded == 1).await;
    assert_eq!(c.forward_failed, 0);
    // Shutdown does not wait the minute out for the hung forwards.
    s.stop().await;
}
