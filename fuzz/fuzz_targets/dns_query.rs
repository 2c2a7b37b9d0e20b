//! The agent's DNS (`mesh_agent::dns::answer`): what it makes of a packet a workload
//! sends to port 53, against a routing table with registry hostnames.
//!
//! Input: one byte choosing UDP or TCP, then the packet.
//!
//! Asserts, beyond "no panic": every reply parses as DNS, is a response and carries
//! the query's ID; a registry answer fits the client's UDP payload (or is truncated)
//! and its answers all name the question; the forwarder's match of replies to
//! queries and its SERVFAIL never panic either, and a SERVFAIL it makes matches.
#![no_main]

use std::sync::LazyLock;

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use mesh_agent::{
    discovery::table::RouteTable,
    dns::answer::{self, Decision, Outcome, Transport},
};

static TABLE: LazyLock<RouteTable> = LazyLock::new(|| {
    let service = |name: &str, vips: &[&str], allocated: &[&str], hostnames: &[&str]| mesh_api::Service {
        name: name.into(),
        namespace: "shop".into(),
        vips: vips.iter().map(|s| (*s).into()).collect(),
        allocated_vips: allocated.iter().map(|s| (*s).into()).collect(),
        hostnames: hostnames.iter().map(|s| (*s).into()).collect(),
        ports: vec![mesh_api::ServicePort { port: 80, ..Default::default() }],
        ..Default::default()
    };
    let snapshot = mesh_api::Snapshot {
        services: vec![
            service("catalog", &["10.96.0.20", "fd96::20"], &[], &["catalog.shop.svc.cluster.local"]),
            service("legacy", &[], &["240.240.1.2"], &["legacy.example.com"]),
        ],
        ..Default::default()
    };
    RouteTable::build(1, &snapshot, 100).expect("a valid table")
});

fuzz_target!(|data: &[u8]| {
    let [mode, ref packet @ ..] = *data else { return };
    let transport = if mode & 1 == 0 { Transport::Udp } else { Transport::Tcp };
    if let Decision::Reply(reply, outcome) = answer::decide(packet, &TABLE, transport) {
        let m = Message::from_vec(&reply).expect("the agent's reply parses");
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(reply[..2], packet[..2], "the query's ID");
        if outcome == Outcome::Registry {
            let q = &m.queries[0];
            assert!(m.answers.iter().all(|r| r.name == *q.name()));
            if transport == Transport::Udp && reply.len() > 512 {
                assert!(m.edns.is_some(), "over 512 bytes only when the client offered more");
            }
        }
    }
    if let Some(fail) = answer::servfail(packet) {
        assert!(answer::answers(packet, &fail), "SERVFAIL matches its query");
    }
    let _ = answer::answers(packet, packet);
});
