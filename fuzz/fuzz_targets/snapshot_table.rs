//! Snapshot validation on the agent (`mesh_agent::discovery::table::RouteTable::decode`):
//! the bytes of a discovery response's snapshot, decoded and turned into the route
//! table the data path reads, or refused (and NACKed) as a whole.
//!
//! Input: the encoded `mesh.v1.Snapshot`. A custom mutator also decodes the input
//! and rewrites one of its strings (an address, an identity, a name) before encoding
//! it again: byte-level mutations alone rarely keep protobuf's length prefixes right.
//!
//! Asserts, beyond "no panic": a refusal says why; a table holds no more endpoints
//! than the limit, and one endpoint fewer in the limit refuses it; every VIP:port
//! and hostname:port of the snapshot finds its service; an endpoint behind an agent
//! always has a parsed identity to check (never dialed without mutual TLS); each
//! endpoint's address header and lookup agree with its address; a service port's
//! compiled routes are those of the snapshot that apply to it; and the snapshot
//! re-encoded builds the same table.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::{fuzz_mutator, fuzz_target, fuzzer_mutate};
use mesh_agent::discovery::table::{RouteTable, TableError};
use mesh_api as api;
use prost::Message;

const MAX_ENDPOINTS: usize = 10_000;

fuzz_target!(|data: &[u8]| {
    let table = match RouteTable::decode(7, data, MAX_ENDPOINTS) {
        Ok(table) => table,
        Err(e) => {
            let reason = e.to_string();
            assert!(
                reason.starts_with("snapshot ") || reason.starts_with("service "),
                "a NACK reason that does not say what is wrong: {reason:?}"
            );
            return;
        }
    };
    let snapshot = api::Snapshot::decode(data).expect("decoded once already");
    assert_eq!(table.version, 7);
    assert_eq!(table.trust_domain, snapshot.trust_domain);

    let count: usize = snapshot.services.iter().map(|s| s.endpoints.len()).sum();
    assert_eq!(table.endpoint_count(), count);
    if count > 0 {
        assert_eq!(
            RouteTable::build(7, &snapshot, count - 1).err(),
            Some(TableError::TooManyEndpoints { count, limit: count - 1 })
        );
    }

    for s in &snapshot.services {
        let name = format!("{}/{}", s.namespace, s.name);
        for p in &s.ports {
            let port = u16::try_from(p.port).expect("an accepted port");
            for vip in &s.vips {
                let ip: IpAddr = vip.parse().expect("an accepted VIP");
                let route = table
                    .by_addr(SocketAddr::new(ip, port))
                    .unwrap_or_else(|| panic!("{name}: VIP {vip} port {port} is not in the table"));
                assert_eq!(*route.service, name);
            }
            for host in &s.hostnames {
                assert!(
                    table.by_host(host, port).is_some(),
                    "{name}: hostname {host:?} port {port} is not in the table"
                );
            }
        }
    }

    for route in table.routes() {
        assert_ne!(route.port, 0);
        // (A snapshot may name a service twice: one of them is this route's.)
        let applying = |s: &api::Service| {
            s.routes.iter().filter(|r| r.ports.is_empty() || r.ports.contains(&u32::from(route.port))).count()
        };
        assert!(
            snapshot
                .services
                .iter()
                .filter(|s| format!("{}/{}", s.namespace, s.name) == *route.service)
                .any(|s| applying(s) == route.http_routes.len()),
            "{}: routes compiled for port {}",
            route.service,
            route.port
        );
        for e in &route.endpoints {
            assert_ne!(e.addr.port(), 0, "{}: endpoint {} has port 0", route.service, e.addr);
            if e.agent_address.is_some() {
                let id = e.spiffe_id.as_ref().expect("a meshed endpoint without an identity");
                assert_eq!(id.to_string(), e.identity);
            }
            assert_eq!(e.addr_header, e.addr.to_string().as_str());
            let found = route.endpoint(e.addr).expect("every endpoint is found by its address");
            assert_eq!(found.addr, e.addr);
        }
    }

    let again = RouteTable::decode(7, &snapshot.encode_to_vec()[..], MAX_ENDPOINTS).expect("re-encoded");
    assert_eq!(again.endpoint_count(), table.endpoint_count());
    assert_eq!(again.routes().len(), table.routes().len());
    for (a, b) in again.routes().iter().zip(table.routes()) {
        assert_eq!(serde_json::to_value(&**a).ok(), serde_json::to_value(&**b).ok());
    }
});

/// What a string in a snapshot may become: forms an agent must handle with care.
const TOKENS: &[&str] = &[
    "::ffff:10.96.0.10",
    "::ffff:127.0.0.1",
    "127.0.0.1",
    "0.0.0.0",
    "::",
    "::1",
    "fe80::1%2",
    "10.96.0.10",
    "fd96::10",
    "10.77.0.5:15008",
    "[fd00::1]:15008",
    "[::ffff:10.77.0.5]:15008",
    "spiffe://cluster.local/ns/shop/sa/web",
    "spiffe://cluster.local/ns/shop/sa/",
    "web.shop.",
    "WEB.shop",
    ".",
    "",
    "/api/(",
    "/api/v[0-9]+/.*",
    "(?:[a-z]{100}){100}",
    "shop/web",
    "shop/",
    "x-canary",
    "bad header",
    "GET",
    "get",
];

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    let Ok(mut snapshot) = api::Snapshot::decode(&data[..size]) else {
        return fuzzer_mutate(data, size, max_size);
    };
    let mut fields = strings(&mut snapshot);
    if seed % 4 == 0 || fields.is_empty() {
        return fuzzer_mutate(data, size, max_size);
    }
    let pick = (seed as usize / 4) % fields.len();
    let field = &mut fields[pick];
    if seed % 3 == 0 {
        **field = TOKENS[(seed as usize / 16) % TOKENS.len()].to_owned();
    } else {
        let mut bytes = std::mem::take(*field).into_bytes();
        let len = bytes.len();
        bytes.resize(len + 16, 0);
        let new_len = fuzzer_mutate(&mut bytes, len, len + 16);
        bytes.truncate(new_len);
        **field = String::from_utf8_lossy(&bytes).into_owned();
    }
    let encoded = snapshot.encode_to_vec();
    if encoded.len() > max_size {
        return fuzzer_mutate(data, size, max_size);
    }
    data[..encoded.len()].copy_from_slice(&encoded);
    encoded.len()
});

/// Every string of `snapshot` a mutation may rewrite.
fn strings(snapshot: &mut api::Snapshot) -> Vec<&mut String> {
    let mut out = vec![&mut snapshot.trust_domain];
    for s in &mut snapshot.services {
        out.extend([&mut s.name, &mut s.namespace]);
        out.extend(s.vips.iter_mut().chain(s.hostnames.iter_mut()));
        out.extend(s.ports.iter_mut().map(|p| &mut p.name));
        for e in &mut s.endpoints {
            out.extend([&mut e.address, &mut e.identity, &mut e.node, &mut e.agent_address, &mut e.workload]);
            out.extend(e.labels.values_mut());
        }
        for r in &mut s.routes {
            out.push(&mut r.name);
            for m in &mut r.matches {
                out.push(&mut m.method);
                out.extend(m.path.as_mut().and_then(|p| p.kind.as_mut()).map(kind_string));
                for n in m.headers.iter_mut().chain(m.query_params.iter_mut()) {
                    out.push(&mut n.name);
                    out.extend(n.value.as_mut().and_then(|v| v.kind.as_mut()).map(kind_string));
                }
            }
            for b in r.backends.iter_mut().chain(r.mirror.as_mut().and_then(|m| m.backend.as_mut())) {
                out.push(&mut b.service);
                out.extend(b.subset.values_mut());
            }
        }
    }
    out
}

fn kind_string(kind: &mut api::string_match::Kind) -> &mut String {
    match kind {
        api::string_match::Kind::Exact(s) | api::string_match::Kind::Prefix(s) | api::string_match::Kind::Regex(s) => s,
    }
}
