//! The source address a workload's connection would have had without eBPF
//! redirection.
//!
//! The connect programs send a workload's `connect()` to the agent's loopback
//! listener, so the kernel picks a loopback source address and the agent sees the
//! client as `127.0.0.1:port`. Under iptables REDIRECT the source is chosen by
//! routing towards the original destination before the rewrite, so the agent sees
//! the node's address. To report the same client address in both modes (access log,
//! spans, `x-forwarded-for` on the receiving side), the agent asks routing the same
//! question: which source address would a socket connecting to the original
//! destination get? A connected UDP socket answers without sending a packet.
//!
//! Answers are cached per destination for [`TTL`], so a busy node does the three
//! syscalls once per destination and half-minute, not per connection.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long a routing answer is reused.
pub const TTL: Duration = Duration::from_secs(30);
/// Destinations remembered at most; the cache is emptied when it fills.
const MAX_ENTRIES: usize = 4096;

/// Destination -> (routed source, when it was looked up).
type Cache = HashMap<IpAddr, (Option<IpAddr>, Instant)>;

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

/// The address a connection from `peer` to `orig_dst` had before redirection:
/// `peer` itself unless it is a loopback address the redirect made up (the original
/// destination was not loopback). The port is the workload's own either way.
pub fn unredirected(peer: SocketAddr, orig_dst: SocketAddr) -> SocketAddr {
    if !peer.ip().to_canonical().is_loopback() || orig_dst.ip().to_canonical().is_loopback() {
        return peer;
    }
    match source_for(orig_dst.ip().to_canonical()) {
        Some(ip) => SocketAddr::new(ip, peer.port()),
        None => peer,
    }
}

/// The source address routing picks for `dst`, cached; `None` when there is no
/// route.
pub fn source_for(dst: IpAddr) -> Option<IpAddr> {
    let now = Instant::now();
    {
        let cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((ip, at)) = cache.as_ref().and_then(|c| c.get(&dst))
            && now.duration_since(*at) < TTL
        {
            return *ip;
        }
    }
    let ip = route_source(dst);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if cache.len() >= MAX_ENTRIES {
        cache.clear();
    }
    cache.insert(dst, (ip, now));
    ip
}

fn route_source(dst: IpAddr) -> Option<IpAddr> {
    let any: IpAddr = match dst {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((any, 0)).ok()?;
    // The port does not matter: a UDP connect only looks the route up.
    socket.connect((dst, 9)).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_made_up_loopback_source_is_replaced() {
        let loopback: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        // A workload talking to loopback really had a loopback source.
        let local_dst: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(unredirected(loopback, local_dst), loopback);
        // A source that is not loopback was not made up by the redirect.
        let real: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        assert_eq!(unredirected(real, "10.96.0.10:80".parse().unwrap()), real);
    }

    #[test]
    fn the_source_is_what_routing_picks_and_keeps_the_port() {
        // Whatever routes this machine has, the answer must agree with routing's own
        // (or keep the loopback address when there is no route at all).
        let dst: SocketAddr = "192.0.2.1:80".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let got = unredirected(peer, dst);
        assert_eq!(got.port(), 40000);
        match route_source(dst.ip()) {
            Some(ip) => assert_eq!(got.ip(), ip),
            None => assert_eq!(got, peer),
        }
        // Cached: the same answer again.
        assert_eq!(unredirected(peer, dst), got);
        assert_eq!(source_for(IpAddr::V4(Ipv4Addr::LOCALHOST)), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
