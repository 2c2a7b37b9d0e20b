//! Request-head rewriting on the proxy path (`mesh_agent::l7::headers`, and the trace
//! context of `mesh_agent::observe::trace`).
//!
//! Input: a flags byte, 16 bytes of workload address, then an HTTP/1 request head.
//! The head is parsed as hyper parses it (httparse into an `http::HeaderMap`); a head
//! hyper would refuse is skipped. It then goes the way a request goes through the
//! mesh: the sending agent strips hop-by-hop headers, adds the client address and
//! continues the trace; the receiving agent rewrites it for the workload.
//!
//! Asserts, beyond "no panic":
//! - after stripping, no hop-by-hop header and no header `Connection` names is left
//!   (bar `TE: trailers` and an upgrade's own), every other header keeps its values in
//!   order, and stripping again changes nothing;
//! - the trace context the sending agent writes reads back as the same context;
//! - what reaches the workload carries exactly the identity the receiving agent
//!   verified (none when it verified none), never the internal client-address header,
//!   and `x-forwarded-for` ends with the real client.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use libfuzzer_sys::fuzz_target;
use mesh_agent::l7::headers::{
    Arrival, X_FORWARDED_CLIENT_CERT, X_FORWARDED_CLIENT_IDENTITY, is_upgrade, rewrite_inbound, strip_hop_by_hop,
};
use mesh_agent::l7::outbound::CLIENT_ADDR_HEADER;
use mesh_agent::observe::trace::{Origin, TraceContext};

/// Headers that never cross a hop (RFC 9110 §7.6.1, and the two legacy ones).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "keep-alive",
    "proxy-connection",
];

/// The head as hyper hands it to the proxy: `None` for one hyper would refuse.
fn parse(head: &[u8]) -> Option<(http::Uri, HeaderMap)> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut slots);
    let httparse::Status::Complete(_) = request.parse(head).ok()? else { return None };
    let uri: http::Uri = request.path?.parse().ok()?;
    let mut headers = HeaderMap::new();
    for h in request.headers.iter() {
        headers
            .append(HeaderName::from_bytes(h.name.as_bytes()).ok()?, HeaderValue::from_bytes(h.value).ok()?);
    }
    Some((uri, headers))
}

/// The tokens of every `Connection` header, lowercased, as header names.
fn connection_tokens(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

fn values<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Vec<&'a HeaderValue> {
    headers.get_all(name).iter().collect()
}

/// Strips `original` and checks the result against what stripping promises.
fn strip_checked(original: &HeaderMap, upgrade: bool) -> HeaderMap {
    let named = connection_tokens(original);
    let mut stripped = original.clone();
    strip_hop_by_hop(&mut stripped, upgrade);
    let upgrade_header = HeaderName::from_static("upgrade");
    for name in stripped.keys() {
        let kept_for_upgrade = upgrade && (*name == header::CONNECTION || *name == upgrade_header);
        if *name == header::TE {
            assert_eq!(values(&stripped, name), ["trailers"], "TE is kept only as `trailers`");
            assert!(!named.contains(name) && original.contains_key(name));
        } else if !kept_for_upgrade {
            assert!(!HOP_BY_HOP.contains(&name.as_str()), "hop-by-hop {name} kept");
            assert!(!named.contains(name), "{name} is named by Connection but kept");
        }
    }
    for name in original.keys() {
        let end_to_end = !HOP_BY_HOP.contains(&name.as_str()) && !named.contains(name);
        if end_to_end {
            assert_eq!(values(&stripped, name), values(original, name), "{name} changed");
        }
    }
    if upgrade {
        assert_eq!(values(&stripped, &header::CONNECTION), ["upgrade"]);
        assert_eq!(values(&stripped, &upgrade_header), values(original, &upgrade_header));
    }
    let mut again = stripped.clone();
    strip_hop_by_hop(&mut again, upgrade);
    assert_eq!(again, stripped, "stripping twice differs from once");
    stripped
}

fn ip(flags: u8, bytes: [u8; 16]) -> IpAddr {
    if flags & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Some((addr, head)) = rest.split_first_chunk::<16>() else { return };
    let Some((uri, original)) = parse(head) else { return };
    let workload = ip(flags, *addr);
    let authority = uri.authority().map(|a| a.as_str());

    let upgrade = is_upgrade(&original);
    if upgrade {
        assert!(original.contains_key("upgrade"));
        assert!(connection_tokens(&original).iter().any(|t| t == "upgrade"));
    }
    strip_checked(&original, false);

    // The sending agent.
    let mut sent = strip_checked(&original, upgrade);
    sent.insert(CLIENT_ADDR_HEADER, HeaderValue::from_str(&workload.to_canonical().to_string()).unwrap());
    let (arrived, origin) = TraceContext::from_headers(&original);
    let hop = arrived.child();
    hop.apply(&mut sent);
    let (read_back, read_origin) = TraceContext::from_headers(&sent);
    assert_eq!(read_origin, Origin::Propagated, "the trace context written does not read back");
    assert_eq!(read_back, hop, "the trace context written reads back differently");
    assert_eq!(hop.trace_id(), arrived.trace_id());
    if origin == Origin::Propagated {
        assert_eq!(hop.tracestate(), arrived.tracestate());
    }

    // The receiving agent, after mutual TLS with the sending one.
    let node = SocketAddr::new(ip(flags >> 1, *addr).to_canonical(), 15008);
    let verified = HeaderValue::from_static("spiffe://cluster.local/ns/shop/sa/cart");
    let xfcc = HeaderValue::from_static("By=spiffe://cluster.local/ns/shop/sa/api;URI=spiffe://cluster.local/ns/shop/sa/cart");
    let mut delivered = sent.clone();
    let arrival = Arrival { peer_addr: node, via_peer_proxy: true, identity: Some((&xfcc, &verified)), authority };
    rewrite_inbound(&mut delivered, upgrade, arrival);
    assert_eq!(values(&delivered, &X_FORWARDED_CLIENT_IDENTITY), [&verified]);
    assert_eq!(values(&delivered, &X_FORWARDED_CLIENT_CERT), [&xfcc]);
    assert!(!delivered.contains_key(CLIENT_ADDR_HEADER));
    let client = if workload.to_canonical().is_loopback() { node.ip() } else { workload.to_canonical() };
    let xff = delivered.get("x-forwarded-for").and_then(|v| v.to_str().ok()).expect("x-forwarded-for");
    assert!(xff == client.to_string() || xff.ends_with(&format!(", {client}")), "{xff:?} for {client}");
    assert!(delivered.contains_key("x-forwarded-proto"));

    // A request that did not come from an agent (plaintext, permissive): nothing it
    // says about identity or the client's address survives.
    let mut direct = original.clone();
    let arrival = Arrival { peer_addr: node, via_peer_proxy: false, identity: None, authority };
    rewrite_inbound(&mut direct, upgrade, arrival);
    assert!(!direct.contains_key(&X_FORWARDED_CLIENT_IDENTITY), "a forged identity reached the workload");
    assert!(!direct.contains_key(&X_FORWARDED_CLIENT_CERT), "a forged certificate header reached the workload");
    let xff = direct.get("x-forwarded-for").and_then(|v| v.to_str().ok()).expect("x-forwarded-for");
    assert!(xff == node.ip().to_string() || xff.ends_with(&format!(", {}", node.ip())), "{xff:?}: a client named itself");
    assert!(!direct.contains_key(CLIENT_ADDR_HEADER));
});
