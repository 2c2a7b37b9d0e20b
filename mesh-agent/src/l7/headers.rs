//! Header rules of a proxy (RFC 9110 §7.6.1): hop-by-hop headers end at each hop,
//! upgrades pass through, and the receiving side says who the client was.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, HeaderValue, header};

use super::outbound::CLIENT_ADDR_HEADER;

/// Headers that describe one connection, never the message.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Envoy's header for the caller's certificate identity: `By=<this workload's SPIFFE
/// ID>;URI=<caller's SPIFFE ID>` (names made once: a string key would be parsed on
/// every request).
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
/// The caller's verified SPIFFE ID alone, for apps that do not parse
/// `x-forwarded-client-cert`.
pub static X_FORWARDED_CLIENT_IDENTITY: HeaderName = HeaderName::from_static("x-forwarded-client-identity");

/// Whether the request asks to switch protocols on this connection (WebSocket).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, including those the `Connection` header names. With
/// `upgrade`, `Connection: upgrade` and `Upgrade` stay so the next hop can switch
/// protocols too. `TE: trailers` stays (gRPC needs it over HTTP/2).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none: one pass over the names instead of a hashed
    // removal per hop-by-hop name, on every request and response at each agent.
    if !headers.keys().any(|n| HOP_BY_HOP.contains(n) || *n == KEEP_ALIVE || *n == PROXY_CONNECTION) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(&name);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    for name in &HOP_BY_HOP {
        if upgrade && (*name == header::CONNECTION || *name == header::UPGRADE) {
            continue;
        }
        headers.remove(name);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Adds the `x-forwarded-*` headers a server behind the mesh reads to learn about
/// the original client: its address appended to `x-forwarded-for`, the scheme it
/// used, and the host it asked for (unless an earlier proxy already said).
pub fn add_forwarded(headers: &mut HeaderMap, client: SocketAddr, authority: Option<&str>) {
    let ip = client.ip().to_canonical().to_string();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if !prior.is_empty() => format!("{prior}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if !headers.contains_key(&X_FORWARDED_HOST)
        && let Some(v) = authority.and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert(X_FORWARDED_HOST.clone(), v);
    }
}

/// What the receiving agent knows about a request besides its head.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    /// The tunnel's peer (the client's node), or the plaintext client.
    pub peer_addr: SocketAddr,
    /// The requests were written by a peer agent's L7 proxy, whose client-address
    /// header names the original client; otherwise the client wrote that header and
    /// it is dropped like any forgery.
    pub via_peer_proxy: bool,
    /// What this agent verified about the caller, as the values of
    /// `x-forwarded-client-cert` and `x-forwarded-client-identity`; `None` for a
    /// caller it verified nothing of (plaintext).
    pub identity: Option<(&'a HeaderValue, &'a HeaderValue)>,
    /// The request target's authority (absolute form, or HTTP/2's `:authority`).
    pub authority: Option<&'a str>,
}

/// The receiving agent's rewrite of a request head before the local workload sees
/// it: hop-by-hop headers go (an upgrade's excepted), the client address a peer
/// agent wrote becomes `x-forwarded-for` (loopback, the eBPF redirect, or none: the
/// peer), and the identity headers say only what this agent verified, so whatever a
/// client wrote there never reaches the workload. Returns the authority the request
/// named, for the access log.
pub fn rewrite_inbound(headers: &mut HeaderMap, upgrade: bool, arrival: Arrival<'_>) -> Option<String> {
    strip_hop_by_hop(headers, upgrade);
    let client = headers
        .remove(CLIENT_ADDR_HEADER)
        .filter(|_| arrival.via_peer_proxy)
        .and_then(|v| v.to_str().ok()?.parse::<IpAddr>().ok())
        // Loopback is the eBPF redirect the sending agent saw, not the client: the
        // tunnel's peer (the client's node) says more.
        .filter(|ip| !ip.to_canonical().is_loopback())
        .map_or(arrival.peer_addr, |ip| SocketAddr::new(ip, 0));
    let host = arrival
        .authority
        .map(str::to_owned)
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned));
    add_forwarded(headers, client, host.as_deref());
    headers.remove(&X_FORWARDED_CLIENT_CERT);
    headers.remove(&X_FORWARDED_CLIENT_IDENTITY);
    if let Some((xfcc, id)) = arrival.identity {
        headers.insert(X_FORWARDED_CLIENT_CERT.clone(), xfcc.clone());
        headers.insert(X_FORWARDED_CLIENT_IDENTITY.clone(), id.clone());
    }
    host
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("te", "gzip, trailers"),
            ("x-app", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-app", "te"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn an_upgrade_keeps_connection_and_upgrade() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-key", "k")]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "k");
    }

    #[test]
    fn forwarded_for_appends_the_client() {
        let mut h = map(&[("x-forwarded-for", "192.0.2.1")]);
        add_forwarded(&mut h, "[::ffff:10.0.0.7]:5000".parse().unwrap(), Some("web.default:80"));
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "web.default:80");
    }

    /// A client cannot speak for the receiving agent: the identity it claims and the
    /// client address it forges are replaced by what the agent knows.
    #[test]
    fn inbound_rewrite_replaces_forged_identity_and_client_address() {
        let peer: SocketAddr = "10.0.0.9:41000".parse().unwrap();
        let verified = HeaderValue::from_static("spiffe://td/ns/a/sa/web");
        let xfcc = HeaderValue::from_static("By=spiffe://td/ns/a/sa/api;URI=spiffe://td/ns/a/sa/web");
        let forged = [
            ("x-forwarded-client-identity", "spiffe://td/ns/a/sa/admin"),
            ("x-forwarded-client-identity", "spiffe://td/ns/b/sa/root"),
            ("x-forwarded-client-cert", "URI=spiffe://td/ns/b/sa/root"),
            ("x-mesh-client-addr", "127.0.0.1"),
            ("host", "web.default"),
        ];
        let mut h = map(&forged);
        let arrival = Arrival {
            peer_addr: peer,
            via_peer_proxy: true,
            identity: Some((&xfcc, &verified)),
            authority: None,
        };
        assert_eq!(rewrite_inbound(&mut h, false, arrival).as_deref(), Some("web.default"));
        let ids: Vec<_> = h.get_all(&X_FORWARDED_CLIENT_IDENTITY).iter().collect();
        assert_eq!(ids, [&verified]);
        let certs: Vec<_> = h.get_all(&X_FORWARDED_CLIENT_CERT).iter().collect();
        assert_eq!(certs, [&xfcc]);
        assert!(!h.contains_key(CLIENT_ADDR_HEADER));
        assert_eq!(h["x-forwarded-for"], "10.0.0.9", "loopback is not a client: the peer is");

        let mut h = map(&forged);
        let arrival =
            Arrival { peer_addr: peer, via_peer_proxy: false, identity: None, authority: Some("web:80") };
        assert_eq!(rewrite_inbound(&mut h, false, arrival).as_deref(), Some("web:80"));
        assert!(!h.contains_key(&X_FORWARDED_CLIENT_IDENTITY), "no verified identity: none at all");
        assert!(!h.contains_key(&X_FORWARDED_CLIENT_CERT));

        let mut h = map(&[("x-mesh-client-addr", "192.0.2.7")]);
        let via_peer = Arrival { peer_addr: peer, via_peer_proxy: true, identity: None, authority: None };
        rewrite_inbound(&mut h, false, via_peer);
        assert_eq!(h["x-forwarded-for"], "192.0.2.7", "a peer agent's proxy names the client");
        let mut h = map(&[("x-mesh-client-addr", "192.0.2.7")]);
        rewrite_inbound(&mut h, false, Arrival { via_peer_proxy: false, ..via_peer });
        assert_eq!(h["x-forwarded-for"], "10.0.0.9", "a client cannot name itself");
    }
}
