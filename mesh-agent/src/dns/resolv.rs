//! The node's resolver, as the agent's own `/etc/resolv.conf` names it: where
//! queries for names outside the registry go.

use std::net::{IpAddr, SocketAddr};

/// Where the node's resolver is listed.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Most upstreams tried per query (glibc reads three `nameserver` lines too).
pub const MAX_UPSTREAMS: usize = 3;

/// The `nameserver` addresses of resolv.conf text, port 53, in order, at most
/// [`MAX_UPSTREAMS`]. Lines that do not parse are skipped, as libc does; an IPv6
/// address with a zone (`fe80::1%eth0`) keeps only the address (the agent dials it
/// from the node's namespace, where the default zone applies).
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let line = line.split(['#', ';']).next()?;
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let addr = words.next()?;
            let addr = addr.split('%').next()?;
            addr.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
        })
        .take(MAX_UPSTREAMS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_in_order_skipping_what_does_not_parse() {
        let text = "# generated\nsearch shop.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n\
                    nameserver   fd00::53%eth0 # v6\nnameserver not-an-ip\noptions ndots:5\n\
                    ; comment\nnameserver 127.0.0.53\nnameserver 1.1.1.1\n";
        assert_eq!(
            nameservers(text),
            [
                "10.96.0.10:53".parse::<SocketAddr>().unwrap(),
                "[fd00::53]:53".parse().unwrap(),
                "127.0.0.53:53".parse().unwrap(),
            ]
        );
        assert!(nameservers("").is_empty());
        assert!(nameservers("nameserver").is_empty());
    }
}
