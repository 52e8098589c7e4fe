//! Forwarding names the record set does not hold to the host's resolvers,
//! within bounds: every forward has a deadline, and forwards in flight are
//! limited per client address and in total, so one client flooding the
//! server with names to forward gets REFUSED instead of taking the
//! capacity every other client needs. Local answers never wait on this.
//!
//! The exchange itself is hickory-net's: a fresh random source port and id
//! per query, the answer checked against both and against the question.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::{DnsExchange, DnsHandle, FirstAnswer};
use hickory_proto::op::{DnsRequest, DnsRequestOptions, Message};
use tokio::time::Instant;

use crate::limit::Limiter;
use crate::respond::{Transport, EDNS_PAYLOAD};

pub(crate) struct Forwarder {
    upstreams: Vec<(SocketAddr, DnsExchange<TokioRuntimeProvider>)>,
    timeout: Duration,
    /// Forwards in flight, per client address and in total.
    pub(crate) limits: Arc<Limiter>,
}

impl Forwarder {
    /// Must be called inside the runtime: each exchange spawns its driver.
    pub(crate) fn new(upstreams: &[SocketAddr], timeout: Duration, limits: Limiter) -> Forwarder {
        let upstreams = upstreams
            .iter()
            .map(|&addr| {
                let exchange = UdpClientStream::builder(addr, TokioRuntimeProvider::new())
                    .with_timeout(Some(timeout))
                    .exchange();
                (addr, exchange)
            })
            .collect();
        Forwarder {
            upstreams,
            timeout,
            limits: Arc::new(limits),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.upstreams.is_empty()
    }

    /// Asks the upstreams in order until one answers, all within the
    /// forward timeout. `None`: none answered in time.
    pub(crate) async fn forward(&self, request: &Message, transport: Transport) -> Option<Message> {
        let query = request.queries.first()?.clone();
        let mut options = DnsRequestOptions::default();
        options.recursion_desired = request.metadata.recursion_desired;
        options.use_edns = request.edns.is_some();
        options.edns_payload_len = EDNS_PAYLOAD;
        let deadline = Instant::now() + self.timeout;
        // Each upstream gets an equal share of the time, and what an
        // earlier one left unused.
        for (i, (addr, udp)) in self.upstreams.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let share = left / (self.upstreams.len() - i) as u32;
            if share.is_zero() {
                break;
            }
            let dns_request = DnsRequest::from_query(query.clone(), options);
            let asked = async {
                match transport {
                    Transport::Udp => udp.send(dns_request).first_answer().await.ok(),
                    Transport::Tcp => {
                        // The provider owns the connection's background
                        // task: it lives as long as this exchange.
                        let provider = TokioRuntimeProvider::new();
                        let tcp = TcpClientStream::exchange(
                            *addr,
                            None,
                            share,
                            Some(1),
                            provider.clone(),
                        )
                        .await
                        .ok()?;
                        let answer = tcp.send(dns_request).first_answer().await.ok();
                        drop(provider);
                        answer
                    }
                }
            };
            match tokio::time::timeout(share, asked).await {
                Ok(Some(response)) => return Some(response.into_message()),
                Ok(None) => tracing::debug!("upstream {addr} failed for {}", query.name()),
                Err(_) => tracing::debug!("upstream {addr} timed out for {}", query.name()),
            }
        }
        None
    }
}
