//! What the agent does with one DNS query: answer it from the routing table (a
//! registry hostname), refuse it as malformed, or hand it to the node's resolver
//! unchanged. Pure: bytes and a table in, a decision out, so every case is tested
//! without sockets.

use std::net::IpAddr;

use hickory_proto::{
    op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode},
    rr::{DNSClass, RData, Record, RecordType, rdata},
};

use crate::discovery::table::RouteTable;

/// TTL of the records the agent answers: short, so a VIP that changes in the
/// registry reaches resolvers' caches within half a minute (Istio's DNS proxy
/// answers with the same).
pub const ANSWER_TTL: u32 = 30;

/// The largest answer a UDP client without EDNS accepts (RFC 1035).
const CLASSIC_UDP_PAYLOAD: usize = 512;

/// How the query reached the agent: a UDP answer larger than the client accepts is
/// sent truncated, so the client retries over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send these bytes back: a registry hostname's answer, or FORMERR.
    Reply(Vec<u8>, Outcome),
    /// Not a registry hostname (or not a question the agent answers): send the
    /// query as it came to the node's resolver and relay its answer.
    Forward,
    /// Not worth an answer: too short to carry an ID, or a response rather than a
    /// query (answering responses would let two resolvers bounce packets forever).
    Drop,
}

/// Why a reply was made, for `mesh_dns_queries_total{answer}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A registry hostname, answered with its addresses (possibly none of the type).
    Registry,
    /// The packet did not parse: FORMERR.
    Malformed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Registry => "registry",
            Outcome::Malformed => "formerr",
        }
    }
}

/// The lower-case name without the root's dot, as the routing table keys hostnames.
fn table_key(name: &hickory_proto::rr::Name) -> String {
    let mut s = name.to_ascii();
    if s.ends_with('.') {
        s.pop();
    }
    s.make_ascii_lowercase();
    s
}

/// Decides what to do with `packet`, a DNS message a workload sent.
pub fn decide(packet: &[u8], table: &RouteTable, transport: Transport) -> Decision {
    let query = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => return malformed(packet),
    };
    if query.metadata.message_type != MessageType::Query {
        return Decision::Drop;
    }
    // Only a standard query with one question is the agent's to answer; anything
    // else (several questions, updates, notifies) is the resolver's business.
    if query.metadata.op_code != OpCode::Query || query.queries.len() != 1 {
        return Decision::Forward;
    }
    let question = &query.queries[0];
    if question.query_class() != DNSClass::IN {
        return Decision::Forward;
    }
    let Some(addresses) = table.name_addresses(&table_key(question.name())) else {
        return Decision::Forward;
    };
    let mut response = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    response.metadata = Metadata::response_from_request(&query.metadata);
    response.metadata.authoritative = true;
    response.metadata.recursion_available = true;
    response.metadata.response_code = ResponseCode::NoError;
    response.add_query(question.clone());
    let wanted = question.query_type();
    for ip in addresses {
        let data = match (ip, wanted) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => RData::A(rdata::A(*v4)),
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => RData::AAAA(rdata::AAAA(*v6)),
            // The name exists with other types only: NOERROR with no answer (NODATA),
            // never NXDOMAIN, or a resolver asking AAAA first would give up on A.
            _ => continue,
        };
        response.add_answer(Record::from_rdata(question.name().clone(), ANSWER_TTL, data));
    }
    let limit = match (&query.edns, transport) {
        (_, Transport::Tcp) => usize::from(u16::MAX),
        (Some(edns), Transport::Udp) => usize::from(edns.max_payload()).max(CLASSIC_UDP_PAYLOAD),
        (None, Transport::Udp) => CLASSIC_UDP_PAYLOAD,
    };
    if let Some(edns) = &query.edns {
        // A query with EDNS gets EDNS back (RFC 6891), offering what it offered.
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload().max(CLASSIC_UDP_PAYLOAD as u16));
        response.set_edns(ours);
    }
    match response.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Decision::Reply(bytes, Outcome::Registry),
        // Too large for the client's UDP: the header and question with TC set, so it
        // asks again over TCP (RFC 2181 section 9).
        Ok(_) => {
            response.answers.clear();
            response.metadata.truncation = true;
            response.to_vec().map_or(Decision::Drop, |b| Decision::Reply(b, Outcome::Registry))
        }
        Err(_) => Decision::Drop,
    }
}

/// FORMERR for a packet that did not parse, when it at least carries a header
/// whose ID the client can match and says it is a query; otherwise nothing.
fn malformed(packet: &[u8]) -> Decision {
    if packet.len() < 12 || packet[2] & 0x80 != 0 {
        return Decision::Drop;
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let op_code = OpCode::from_u8((packet[2] >> 3) & 0x0f);
    let mut response = Message::error_msg(id, op_code, ResponseCode::FormErr);
    response.metadata.recursion_desired = packet[2] & 0x01 != 0;
    response.to_vec().map_or(Decision::Drop, |b| Decision::Reply(b, Outcome::Malformed))
}

/// SERVFAIL for a query the node's resolver did not answer, so the client moves on
/// at once instead of waiting out its own timeout.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::new(q.metadata.id, MessageType::Response, q.metadata.op_code);
    r.metadata = Metadata::response_from_request(&q.metadata);
    r.metadata.recursion_available = true;
    r.metadata.response_code = ResponseCode::ServFail;
    r.add_queries(q.queries);
    r.to_vec().ok()
}

/// Whether `reply` answers `query`: same ID, a response, same question. The
/// forwarder checks every upstream answer with it, so a stray or spoofed datagram
/// on a forwarding socket is never relayed to a workload.
pub fn answers(query: &[u8], reply: &[u8]) -> bool {
    if query.len() < 12 || reply.len() < 12 || query[..2] != reply[..2] || reply[2] & 0x80 == 0 {
        return false;
    }
    // The question section (right after the header) must be the same bytes up to
    // case, when the reply carries one; a truncated or FORMERR reply may carry none.
    let count = |m: &[u8]| u16::from_be_bytes([m[4], m[5]]);
    if count(reply) == 0 {
        return true;
    }
    match (question_end(query), question_end(reply)) {
        (Some(q), Some(r)) => q == r && query[12..q].eq_ignore_ascii_case(&reply[12..r]),
        // A query whose name is compressed (no resolver library sends one) is
        // matched by its ID alone, on the fresh socket connected to the upstream.
        (None, _) => true,
        (Some(_), None) => false,
    }
}

/// The end of the first question (name, type, class) of a message, if it has one
/// made of plain labels (compression is not used in questions of queries).
fn question_end(m: &[u8]) -> Option<usize> {
    let mut i = 12;
    loop {
        let len = usize::from(*m.get(i)?);
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        i += 1 + len;
    }
    let end = i + 1 + 4;
    (end <= m.len()).then_some(end)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::{op::Query, rr::Name};
    use mesh_api as api;

    use super::*;

    fn table(services: Vec<api::Service>) -> RouteTable {
        let snapshot = api::Snapshot { services, ..Default::default() };
        RouteTable::build(1, &snapshot, 100).unwrap()
    }

    fn service(name: &str, vips: &[&str], allocated: &[&str], hostnames: &[&str]) -> api::Service {
        api::Service {
            name: name.into(),
            namespace: "shop".into(),
            vips: vips.iter().map(|s| (*s).into()).collect(),
            allocated_vips: allocated.iter().map(|s| (*s).into()).collect(),
            hostnames: hostnames.iter().map(|s| (*s).into()).collect(),
            ports: vec![api::ServicePort { port: 80, ..Default::default() }],
            ..Default::default()
        }
    }

    fn sample() -> RouteTable {
        table(vec![
            service("catalog", &["10.96.0.20", "fd96::20"], &[], &["catalog.shop.svc.cluster.local"]),
            service("legacy", &[], &["240.240.1.2"], &["Legacy.Example.COM."]),
            // Headless: no address of the mesh's, the node's resolver lists the pods.
            service("db", &[], &[], &["db.shop.svc.cluster.local"]),
        ])
    }

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m
    }

    fn reply(d: Decision) -> Message {
        match d {
            Decision::Reply(bytes, _) => Message::from_vec(&bytes).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn addresses(m: &Message) -> Vec<IpAddr> {
        m.answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                other => panic!("unexpected record {other:?}"),
            })
            .collect()
    }

    #[test]
    fn registry_names_are_answered_with_their_vips_by_type() {
        let t = sample();
        let q = query("catalog.shop.svc.cluster.local.", RecordType::A);
        let m = reply(decide(&q.to_vec().unwrap(), &t, Transport::Udp));
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addresses(&m), [IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20))]);
        assert_eq!(m.answers[0].ttl, ANSWER_TTL);
        assert_eq!(m.queries, q.queries);

        let q = query("catalog.shop.svc.cluster.local.", RecordType::AAAA);
        let m = reply(decide(&q.to_vec().unwrap(), &t, Transport::Udp));
        assert_eq!(addresses(&m), ["fd96::20".parse::<Ipv6Addr>().unwrap()]);
    }

    #[test]
    fn allocated_vips_answer_and_names_match_whatever_their_case() {
        let t = sample();
        let q = query("LEGACY.example.com", RecordType::A);
        let m = reply(decide(&q.to_vec().unwrap(), &t, Transport::Udp));
        assert_eq!(addresses(&m), [IpAddr::V4(Ipv4Addr::new(240, 240, 1, 2))]);
        // No IPv6 address: NODATA, not NXDOMAIN.
        let q = query("legacy.example.com.", RecordType::AAAA);
        let m = reply(decide(&q.to_vec().unwrap(), &t, Transport::Udp));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        // Other types of a registry name: NODATA too.
        let q = query("legacy.example.com.", RecordType::MX);
        let m = reply(decide(&q.to_vec().unwrap(), &t, Transport::Udp));
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn other_names_and_questions_are_forwarded() {
        let t = sample();
        for q in [
            query("example.org.", RecordType::A),
            query("shop.svc.cluster.local.", RecordType::A),
            query("catalog.shop.svc.cluster.local.other.", RecordType::A),
            query("db.shop.svc.cluster.local.", RecordType::A),
        ] {
            assert_eq!(decide(&q.to_vec().unwrap(), &t, Transport::Udp), Decision::Forward);
        }
        let mut two = query("catalog.shop.svc.cluster.local.", RecordType::A);
        two.add_query(Query::query(Name::from_ascii("example.org.").unwrap(), RecordType::A));
        assert_eq!(decide(&two.to_vec().unwrap(), &t, Transport::Udp), Decision::Forward);
        let mut chaos = query("catalog.shop.svc.cluster.local.", RecordType::A);
        chaos.queries[0].set_query_class(DNSClass::CH);
        assert_eq!(decide(&chaos.to_vec().unwrap(), &t, Transport::Udp), Decision::Forward);
    }

    #[test]
    fn malformed_queries_get_formerr_and_garbage_or_responses_nothing() {
        let t = sample();
        let mut bytes = query("catalog.shop.svc.cluster.local.", RecordType::A).to_vec().unwrap();
        bytes.truncate(20);
        let m = reply(decide(&bytes, &t, Transport::Udp));
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(decide(&[1, 2, 3], &t, Transport::Udp), Decision::Drop);
        assert_eq!(decide(&[], &t, Transport::Udp), Decision::Drop);
        let mut response = query("catalog.shop.svc.cluster.local.", RecordType::A);
        response.metadata.message_type = MessageType::Response;
        assert_eq!(decide(&response.to_vec().unwrap(), &t, Transport::Udp), Decision::Drop);
    }

    #[test]
    fn an_answer_too_large_for_udp_is_truncated_but_not_over_tcp() {
        let vips: Vec<String> = (0..60).map(|i| format!("10.96.1.{i}")).collect();
        let vips: Vec<&str> = vips.iter().map(String::as_str).collect();
        let t = table(vec![service("big", &vips, &[], &["big.shop.svc.cluster.local"])]);
        let q = query("big.shop.svc.cluster.local.", RecordType::A).to_vec().unwrap();
        let m = reply(decide(&q, &t, Transport::Udp));
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        let m = reply(decide(&q, &t, Transport::Tcp));
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 60);
        // With EDNS offering more room, UDP carries it whole.
        let mut e = query("big.shop.svc.cluster.local.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        e.set_edns(edns);
        let m = reply(decide(&e.to_vec().unwrap(), &t, Transport::Udp));
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 60);
        assert!(m.edns.is_some());
    }

    #[test]
    fn servfail_answers_the_question() {
        let q = query("example.org.", RecordType::A);
        let qb = q.to_vec().unwrap();
        let f = servfail(&qb).unwrap();
        assert!(answers(&qb, &f));
        let m = Message::from_vec(&f).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(servfail(&[1, 2]), None);
    }

    #[test]
    fn replies_are_matched_to_their_query() {
        let q = query("example.org.", RecordType::A);
        let qb = q.to_vec().unwrap();
        let mut r = q.clone();
        r.metadata.message_type = MessageType::Response;
        r.queries[0].set_name(Name::from_ascii("EXAMPLE.org.").unwrap());
        assert!(answers(&qb, &r.to_vec().unwrap()));
        r.metadata.id = 1;
        assert!(!answers(&qb, &r.to_vec().unwrap()), "another ID");
        let mut other = q.clone();
        other.metadata.message_type = MessageType::Response;
        other.queries[0].set_name(Name::from_ascii("example.net.").unwrap());
        assert!(!answers(&qb, &other.to_vec().unwrap()), "another question");
        assert!(!answers(&qb, &qb), "a query is no answer");
        assert!(!answers(&qb, &[0x12]), "too short");
        // A compressed question (found by fuzzing): the ID decides, and SERVFAIL for
        // it matches.
        let mut compressed = qb[..12].to_vec();
        compressed.extend_from_slice(&[7, b'c', b'a', b't', b'a', b'l', b'o', b'g', 0xc0, 0x04, 0, 1, 0, 1]);
        if let Some(f) = servfail(&compressed) {
            assert!(answers(&compressed, &f));
        }
    }

    proptest::proptest! {
        /// Whatever arrives, deciding never panics, and a reply always parses.
        #[test]
        fn any_bytes_are_decided_without_panicking(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let t = sample();
            if let Decision::Reply(reply, _) = decide(&bytes, &t, Transport::Udp) {
                proptest::prop_assert!(Message::from_vec(&reply).is_ok());
            }
            let _ = answers(&bytes, &bytes);
        }
    }
}
