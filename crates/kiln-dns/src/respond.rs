//! What to do with one packet: answer it from the zone, forward it, or
//! drop it, and the encoding of every reply the server itself writes.
//!
//! The rules, in order:
//! - fewer than 12 bytes, or a response (QR set): dropped, so two servers
//!   can never bounce packets at each other;
//! - an opcode other than QUERY: NOTIMP; not exactly one question, or a
//!   body that does not decode: FORMERR;
//! - a known name (class IN or ANY): its A records for A and ANY, NOERROR
//!   with no records (NODATA) for any other type;
//! - anything else: forwarded when there are upstream resolvers, NXDOMAIN
//!   when there are none.
//!
//! A plain query (no EDNS, nothing after the question) for a known name
//! takes the fast path: a precomputed [`crate::zone::Template`]. Every other
//! packet is decoded whole and answered through hickory's `Message`.

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::{DNSClass, Record};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, EncodedSize};

use crate::zone::{local_metadata, Zone, PLAIN_UDP};

/// The UDP payload size this server advertises and accepts at most
/// (the DNS flag day 2020 value: no IP fragmentation on common paths).
pub(crate) const EDNS_PAYLOAD: u16 = 1232;

/// The transport a query came on: it bounds the size of the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// What became of a packet.
#[derive(Debug)]
pub(crate) enum Action {
    /// `out` holds the reply; the outcome says which counter it counts in.
    Reply(Outcome),
    /// Ask the upstream resolvers, then [`relay`] their answer.
    Forward(Box<Message>),
    /// Say nothing.
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Local,
    NxDomain,
    Malformed,
}

/// Decides about `packet` and, for a reply, writes it to `out`. `turn`
/// rotates the addresses of names with several.
pub(crate) fn handle(
    zone: &Zone,
    packet: &[u8],
    transport: Transport,
    forwarding: bool,
    turn: usize,
    out: &mut Vec<u8>,
) -> Action {
    let mut decoder = BinDecoder::new(packet);
    let Ok(header) = Header::read(&mut decoder) else {
        return Action::Drop;
    };
    if header.message_type == MessageType::Response {
        return Action::Drop;
    }
    if header.op_code != OpCode::Query {
        header_only(&header.metadata, ResponseCode::NotImp, out);
        return Action::Reply(Outcome::Malformed);
    }
    if header.counts.queries != 1 {
        header_only(&header.metadata, ResponseCode::FormErr, out);
        return Action::Reply(Outcome::Malformed);
    }
    let Ok(query) = Query::read(&mut decoder) else {
        header_only(&header.metadata, ResponseCode::FormErr, out);
        return Action::Reply(Outcome::Malformed);
    };
    let plain = header.counts.answers == 0
        && header.counts.authorities == 0
        && header.counts.additionals == 0;
    let local = is_local_class(&query);
    if plain && local {
        if let Some(entry) = zone.get(query.name()) {
            let question = &packet[Header::LEN..decoder.index()];
            let limit = match transport {
                Transport::Udp => PLAIN_UDP,
                Transport::Tcp => usize::from(u16::MAX),
            };
            if entry.template(query.query_type(), turn).answer(
                &header.metadata,
                question,
                limit,
                out,
            ) {
                return Action::Reply(Outcome::Local);
            }
        }
    }
    let message = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => {
            header_only(&header.metadata, ResponseCode::FormErr, out);
            return Action::Reply(Outcome::Malformed);
        }
    };
    if message.edns.as_ref().is_some_and(|e| e.version() > 0) {
        // RFC 6891 6.1.3: only version 0 exists.
        error_reply(&message, ResponseCode::BADVERS, transport, out);
        return Action::Reply(Outcome::Malformed);
    }
    if local {
        if let Some(entry) = zone.get(query.name()) {
            let mut reply = response_to(&message);
            reply.answers = entry.records(query.name(), query.query_type(), zone.ttl, turn);
            encode(reply, limit(&message, transport), out);
            return Action::Reply(Outcome::Local);
        }
    }
    if forwarding {
        Action::Forward(Box::new(message))
    } else {
        error_reply(&message, ResponseCode::NXDomain, transport, out);
        Action::Reply(Outcome::NxDomain)
    }
}

fn is_local_class(query: &Query) -> bool {
    matches!(query.query_class(), DNSClass::IN | DNSClass::ANY)
}

/// The most bytes a reply to `request` may have on `transport`.
pub(crate) fn limit(request: &Message, transport: Transport) -> usize {
    match (transport, &request.edns) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, None) => PLAIN_UDP,
        (Transport::Udp, Some(e)) => usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD)),
    }
}

/// An empty response to `request`: its id, flags and question, and an OPT
/// record of our own when it had one (EDNS is hop by hop).
fn response_to(request: &Message) -> Message {
    let mut reply = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata = local_metadata(&request.metadata);
    reply.queries = request.queries.clone();
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        reply.edns = Some(edns);
    }
    reply
}

/// A reply with `code` and no records.
pub(crate) fn error_reply(
    request: &Message,
    code: ResponseCode,
    transport: Transport,
    out: &mut Vec<u8>,
) {
    let mut reply = response_to(request);
    reply.metadata.authoritative = false;
    reply.metadata.response_code = code;
    encode(reply, limit(request, transport), out);
}

/// The upstream's answer, passed on to the client: the client's id and
/// question, our OPT record (or none), the upstream's flags and records.
pub(crate) fn relay(request: &Message, upstream: Message, transport: Transport, out: &mut Vec<u8>) {
    let mut reply = response_to(request);
    reply.metadata.authoritative = upstream.metadata.authoritative;
    reply.metadata.authentic_data = false;
    reply.metadata.truncation = upstream.metadata.truncation;
    reply.metadata.response_code = upstream.metadata.response_code;
    reply.answers = upstream.answers;
    reply.authorities = upstream.authorities;
    reply.additionals = upstream
        .additionals
        .into_iter()
        .filter(|r: &Record| !r.record_type().is_dnssec())
        .collect();
    encode(reply, limit(request, transport), out);
}

/// Encodes `reply`; one too large for the client is sent truncated (TC
/// set, no records), so the client asks again over TCP.
fn encode(mut reply: Message, limit: usize, out: &mut Vec<u8>) {
    out.clear();
    match reply.to_vec() {
        Ok(bytes) if bytes.len() <= limit => {
            out.extend_from_slice(&bytes);
            return;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!("cannot encode a reply: {e}");
            reply.metadata.response_code = ResponseCode::ServFail;
        }
    }
    reply.metadata.truncation = reply.metadata.response_code != ResponseCode::ServFail;
    reply.answers.clear();
    reply.authorities.clear();
    reply.additionals.clear();
    if let Ok(bytes) = reply.to_vec() {
        out.extend_from_slice(&bytes);
    }
}

/// A reply carrying only a header: for packets whose question could not
/// be read.
fn header_only(request: &Metadata, code: ResponseCode, out: &mut Vec<u8>) {
    let mut reply = Message::error_msg(request.id, request.op_code, code);
    reply.metadata.recursion_desired = request.recursion_desired;
    out.clear();
    if let Ok(bytes) = reply.to_vec() {
        out.extend_from_slice(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Records, RecordsFile};
    use hickory_proto::rr::{Name, RecordType};

    fn zone() -> Zone {
        let mut r = Records::new("staging");
        let many = (2..=60)
            .map(|i| std::net::Ipv4Addr::new(10, 0, 0, i))
            .collect();
        r.names.insert("big".into(), many);
        r.names
            .insert("app".into(), vec![std::net::Ipv4Addr::new(10, 0, 0, 2)]);
        Zone::compile(&RecordsFile {
            generation: 1,
            records: r,
        })
    }

    fn ask(name: &str, t: RecordType, edns: bool, transport: Transport) -> (Action, Vec<u8>) {
        let mut q = Message::query();
        q.queries
            .push(Query::query(Name::from_ascii(name).unwrap(), t));
        if edns {
            q.edns = Some(Edns::new());
        }
        let mut out = Vec::new();
        let a = handle(&zone(), &q.to_vec().unwrap(), transport, true, 0, &mut out);
        (a, out)
    }

    #[test]
    fn edns_queries_get_an_opt_record_back() {
        let (a, out) = ask("app", RecordType::A, true, Transport::Udp);
        assert!(matches!(a, Action::Reply(Outcome::Local)));
        let r = Message::from_vec(&out).unwrap();
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.edns.unwrap().max_payload(), EDNS_PAYLOAD);
    }

    #[test]
    fn too_large_for_plain_udp_is_truncated_but_whole_over_tcp() {
        let (_, out) = ask("big", RecordType::A, false, Transport::Udp);
        let r = Message::from_vec(&out).unwrap();
        assert!(r.metadata.truncation);
        assert!(r.answers.is_empty());
        let (_, out) = ask("big", RecordType::A, false, Transport::Tcp);
        let r = Message::from_vec(&out).unwrap();
        assert!(!r.metadata.truncation);
        assert_eq!(r.answers.len(), 59);
    }

    #[test]
    fn unknown_names_are_forwarded_and_responses_dropped() {
        let (a, _) = ask("example.org", RecordType::A, false, Transport::Udp);
        assert!(matches!(a, Action::Forward(_)));
        let mut m = Message::query();
        m.metadata.message_type = MessageType::Response;
        let mut out = Vec::new();
        let a = handle(
            &zone(),
            &m.to_vec().unwrap(),
            Transport::Udp,
            true,
            0,
            &mut out,
        );
        assert!(matches!(a, Action::Drop));
    }
}
