//! A record set compiled for answering: names parsed once, and the answer
//! to a plain query for each name encoded once per generation (one per
//! rotation of its addresses), so a query for a known name costs a decode,
//! a hash lookup and a copy. All encoding and decoding is hickory-proto's.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use hickory_proto::op::{Header, HeaderCounts, Message, MessageType, Metadata, OpCode, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{
    BinDecodable, BinDecoder, BinEncodable, BinEncoder, EncodedSize,
};

use crate::control::RecordsFile;
use crate::DnsError;

/// The size every DNS client accepts over UDP without EDNS (RFC 1035).
pub(crate) const PLAIN_UDP: usize = 512;

/// Parses a name of the record set as a fully qualified name: `app`,
/// `app.staging` and `app.staging.` all mean the same name.
pub(crate) fn parse_name(name: &str) -> Result<Name, DnsError> {
    let mut parsed = Name::from_ascii(name).map_err(|source| DnsError::InvalidName {
        name: name.to_string(),
        source,
    })?;
    if parsed.is_root() {
        return Err(DnsError::EmptyName);
    }
    parsed.set_fqdn(true);
    Ok(parsed)
}

/// A complete response, encoded, whose header and question the server
/// rewrites for each query (id, flags, and the question exactly as the
/// client wrote it: some clients check the case of the name they sent).
#[derive(Debug)]
pub(crate) struct Template {
    bytes: Vec<u8>,
    counts: HeaderCounts,
    /// Bytes of the question section (from offset 12).
    question_len: usize,
}

impl Template {
    fn new(message: &Message) -> Template {
        let bytes = message.to_vec().expect("a record set's answer encodes");
        let mut decoder = BinDecoder::new(&bytes);
        let header = Header::read(&mut decoder).expect("own encoding decodes");
        Query::read(&mut decoder).expect("own encoding decodes");
        let question_len = decoder.index() - Header::LEN;
        Template {
            counts: header.counts,
            question_len,
            bytes,
        }
    }

    /// Writes the answer to the query whose header is `request` and whose
    /// question is `question` (the raw bytes after the header), if the
    /// template fits: same question length and within `limit` bytes.
    pub(crate) fn answer(
        &self,
        request: &Metadata,
        question: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        if question.len() != self.question_len || self.bytes.len() > limit {
            return false;
        }
        out.clear();
        out.extend_from_slice(&self.bytes);
        let header = Header {
            metadata: local_metadata(request),
            counts: self.counts,
        };
        // Overwrites the first 12 bytes in place.
        if header.emit(&mut BinEncoder::new(out)).is_err() {
            return false;
        }
        out[Header::LEN..Header::LEN + question.len()].copy_from_slice(question);
        true
    }
}

/// The header of a local answer to `request`: authoritative, recursion
/// available (unknown names are forwarded).
pub(crate) fn local_metadata(request: &Metadata) -> Metadata {
    let mut m = Metadata::response_from_request(request);
    m.authoritative = true;
    m.recursion_available = true;
    m
}

#[derive(Debug)]
pub(crate) struct Entry {
    addresses: Vec<Ipv4Addr>,
    /// Answers to a plain A query, one per rotation of `addresses`.
    rotations: Vec<Template>,
    /// The answer to any other type: the name exists, no record of it.
    nodata: Template,
}

impl Entry {
    /// The template for a query of `record_type`; `turn` picks the
    /// rotation, so successive clients see the addresses in turn.
    pub(crate) fn template(&self, record_type: RecordType, turn: usize) -> &Template {
        if answers_with_addresses(record_type) && !self.rotations.is_empty() {
            &self.rotations[turn % self.rotations.len()]
        } else {
            &self.nodata
        }
    }

    /// The answer records for `name` (as the client wrote it), rotated.
    pub(crate) fn records(
        &self,
        name: &Name,
        record_type: RecordType,
        ttl: u32,
        turn: usize,
    ) -> Vec<Record> {
        if !answers_with_addresses(record_type) || self.addresses.is_empty() {
            return Vec::new();
        }
        let n = self.addresses.len();
        (0..n)
            .map(|i| {
                let ip = self.addresses[(turn + i) % n];
                Record::from_rdata(name.clone(), ttl, RData::A(A(ip)))
            })
            .collect()
    }
}

fn answers_with_addresses(record_type: RecordType) -> bool {
    matches!(record_type, RecordType::A | RecordType::ANY)
}

/// One generation of the record set, ready to answer from.
#[derive(Debug, Default)]
pub(crate) struct Zone {
    pub(crate) generation: u64,
    pub(crate) env: String,
    pub(crate) ttl: u32,
    names: HashMap<Name, Entry>,
}

impl Zone {
    /// Compiles a record set. Names that do not parse are skipped with a
    /// warning (kiln's `set_records` refuses them before writing).
    pub(crate) fn compile(file: &RecordsFile) -> Zone {
        let ttl = file.records.ttl;
        let mut names = HashMap::with_capacity(file.records.names.len());
        for (text, addresses) in &file.records.names {
            let name = match parse_name(text) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("skipping a name of generation {}: {e}", file.generation);
                    continue;
                }
            };
            let mut addresses = addresses.clone();
            addresses.dedup();
            let entry = compile_entry(&name, addresses, ttl);
            names.insert(name, entry);
        }
        Zone {
            generation: file.generation,
            env: file.records.env.clone(),
            ttl,
            names,
        }
    }

    /// The entry of a name, matched without regard to ASCII case (hickory's
    /// `Name` hashes and compares that way).
    pub(crate) fn get(&self, name: &Name) -> Option<&Entry> {
        if self.names.is_empty() {
            return None;
        }
        if name.is_fqdn() {
            self.names.get(name)
        } else {
            let mut fqdn = name.clone();
            fqdn.set_fqdn(true);
            self.names.get(&fqdn)
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }
}

fn compile_entry(name: &Name, addresses: Vec<Ipv4Addr>, ttl: u32) -> Entry {
    let request = Metadata::new(0, MessageType::Query, OpCode::Query);
    let message = |record_type: RecordType, records: Vec<Record>| {
        let mut m = Message::new(0, MessageType::Response, OpCode::Query);
        m.metadata = local_metadata(&request);
        m.queries.push(Query::query(name.clone(), record_type));
        m.answers = records;
        m
    };
    let entry = Entry {
        addresses,
        rotations: Vec::new(),
        nodata: Template::new(&message(RecordType::AAAA, Vec::new())),
    };
    let rotations = (0..entry.addresses.len())
        .map(|turn| {
            Template::new(&message(
                RecordType::A,
                entry.records(name, RecordType::A, ttl, turn),
            ))
        })
        .collect();
    Entry { rotations, ..entry }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Records;

    fn zone(names: &[(&str, &[[u8; 4]])]) -> Zone {
        let mut r = Records::new("staging");
        for (n, ips) in names {
            r.names.insert(
                n.to_string(),
                ips.iter().map(|o| Ipv4Addr::from(*o)).collect(),
            );
        }
        Zone::compile(&RecordsFile {
            generation: 1,
            records: r,
        })
    }

    #[test]
    fn names_match_without_case_or_trailing_dot() {
        let z = zone(&[("App.Staging.", &[[10, 0, 0, 2]])]);
        for q in ["app.staging", "APP.STAGING.", "aPp.sTaGiNg"] {
            assert!(z.get(&Name::from_ascii(q).unwrap()).is_some(), "{q}");
        }
        assert!(z.get(&Name::from_ascii("app").unwrap()).is_none());
    }

    #[test]
    fn templates_rotate_and_keep_the_clients_question() {
        let z = zone(&[("app", &[[10, 0, 0, 2], [10, 0, 0, 3]])]);
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.queries.push(Query::query(
            Name::from_ascii("ApP.").unwrap(),
            RecordType::A,
        ));
        let packet = q.to_vec().unwrap();
        let question = &packet[Header::LEN..];
        let entry = z.get(&Name::from_ascii("app.").unwrap()).unwrap();
        let mut firsts = Vec::new();
        for turn in 0..2 {
            let mut out = Vec::new();
            assert!(entry.template(RecordType::A, turn).answer(
                &q.metadata,
                question,
                PLAIN_UDP,
                &mut out
            ));
            let r = Message::from_vec(&out).unwrap();
            assert_eq!(r.metadata.id, q.metadata.id);
            assert!(r.metadata.recursion_desired && r.metadata.authoritative);
            assert_eq!(r.queries[0].name().to_ascii(), "ApP.");
            assert_eq!(r.answers.len(), 2);
            firsts.push(r.answers[0].data.clone());
        }
        assert_ne!(firsts[0], firsts[1]);
    }
}
