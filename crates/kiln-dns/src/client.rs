//! Asking a DNS server from the host, as a server's libc would: for
//! `kiln dns ENV NAME` and for tests. The exchange is hickory-net's.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::{DnsHandle, FirstAnswer};
use hickory_net::NetError;
use hickory_proto::op::{DnsRequest, DnsRequestOptions, Query, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

use crate::zone::parse_name;
use crate::DnsError;

/// One question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// Asked as written, as a fully qualified name (no search suffix).
    pub name: String,
    pub record_type: RecordType,
    /// Over TCP instead of UDP.
    pub tcp: bool,
    /// With an EDNS OPT record (libc does not send one by default).
    pub edns: bool,
}

impl Lookup {
    /// An A query over UDP without EDNS.
    pub fn a(name: &str) -> Lookup {
        Lookup {
            name: name.to_string(),
            record_type: RecordType::A,
            tcp: false,
            edns: false,
        }
    }
}

/// What the server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub rcode: ResponseCode,
    /// A and AAAA records of the answer section, in the server's order.
    pub addresses: Vec<IpAddr>,
    /// The smallest TTL among them.
    pub ttl: Option<u32>,
    /// Set on kiln's own answers, not on forwarded ones (unless the
    /// upstream was authoritative).
    pub authoritative: bool,
    /// The answer did not fit: ask again over TCP.
    pub truncated: bool,
    /// Records of the answer section of any type.
    pub records: usize,
}

/// Asks `server` one question.
pub async fn lookup(
    server: SocketAddr,
    question: &Lookup,
    timeout: Duration,
) -> Result<Answer, DnsError> {
    let name = parse_name(&question.name)?;
    let mut options = DnsRequestOptions::default();
    options.use_edns = question.edns;
    let request = DnsRequest::from_query(Query::query(name, question.record_type), options);
    let failed = |source: NetError| match source {
        NetError::Timeout => DnsError::NoAnswer {
            server,
            waited: timeout,
        },
        source => DnsError::Query { server, source },
    };
    // The provider owns the exchange's background task: it must outlive
    // the exchange.
    let provider = TokioRuntimeProvider::new();
    let asked = async {
        if question.tcp {
            let exchange =
                TcpClientStream::exchange(server, None, timeout, Some(1), provider.clone())
                    .await
                    .map_err(failed)?;
            exchange.send(request).first_answer().await.map_err(failed)
        } else {
            UdpClientStream::builder(server, provider.clone())
                .with_timeout(Some(timeout))
                .exchange()
                .send(request)
                .first_answer()
                .await
                .map_err(failed)
        }
    };
    let response =
        tokio::time::timeout(timeout, asked)
            .await
            .map_err(|_| DnsError::NoAnswer {
                server,
                waited: timeout,
            })??;
    drop(provider);
    let message = response.into_message();
    let mut addresses = Vec::new();
    let mut ttl: Option<u32> = None;
    for record in &message.answers {
        let ip = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        addresses.push(ip);
        ttl = Some(ttl.map_or(record.ttl, |t| t.min(record.ttl)));
    }
    Ok(Answer {
        rcode: message.metadata.response_code,
        addresses,
        ttl,
        authoritative: message.metadata.authoritative,
        truncated: message.metadata.truncation,
        records: message.answers.len(),
    })
}

/// The A records of `name` at `server`, over UDP and again over TCP when
/// the answer was truncated. Blocking: it runs its own runtime on its own
/// thread, so it may be called from anywhere, a runtime included.
pub fn query(server: SocketAddr, name: &str, timeout: Duration) -> Result<Answer, DnsError> {
    let name = name.to_string();
    std::thread::scope(|s| {
        s.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(DnsError::Runtime)?;
            rt.block_on(async {
                let mut question = Lookup::a(&name);
                let answer = lookup(server, &question, timeout).await?;
                if !answer.truncated {
                    return Ok(answer);
                }
                question.tcp = true;
                lookup(server, &question, timeout).await
            })
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
