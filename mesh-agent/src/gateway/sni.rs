//! The TLS server name that asks an east-west gateway for one of its cluster's
//! agents.
//!
//! A caller in another cluster cannot reach the destination agent's address, and
//! the gateway must not terminate the caller's mutual TLS (it would see the
//! traffic and could stand in for either side). So the caller names the agent in
//! the only cleartext field of its ClientHello a router may read, the server name,
//! and the gateway forwards the bytes unopened:
//!
//! `ip4-10-77-0-3.p15008.<trust domain>` or `ip6-<32 hex digits>.p15008.<trust domain>`
//!
//! The trust domain lets a gateway refuse names meant for another cluster. A name
//! is a DNS name (what rustls sends as SNI), and decoding accepts exactly what
//! encoding produces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why a server name is not a gateway name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("server name {0:?} does not name an agent (ip4-A-B-C-D.pPORT.<trust domain>)")]
    Malformed(String),
    #[error("server name {name:?} is for trust domain {found:?}, this gateway serves {expected:?}")]
    OtherTrustDomain { name: String, found: String, expected: String },
}

/// The server name asking the gateway of `trust_domain` for the agent at `agent`.
pub fn encode(agent: SocketAddr, trust_domain: &str) -> String {
    let ip = match agent.ip().to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("ip4-{a}-{b}-{c}-{d}")
        }
        IpAddr::V6(v6) => {
            let hex: String = v6.octets().iter().map(|b| format!("{b:02x}")).collect();
            format!("ip6-{hex}")
        }
    };
    format!("{ip}.p{}.{trust_domain}", agent.port())
}

/// The agent a server name asks for, if it is meant for `trust_domain`'s gateway.
/// Case-insensitive, as DNS names are.
pub fn decode(name: &str, trust_domain: &str) -> Result<SocketAddr, SniError> {
    let malformed = || SniError::Malformed(name.to_owned());
    let lower = name.to_ascii_lowercase();
    let mut labels = lower.splitn(3, '.');
    let (ip, port, domain) = match (labels.next(), labels.next(), labels.next()) {
        (Some(ip), Some(port), Some(domain)) => (ip, port, domain),
        _ => return Err(malformed()),
    };
    if domain != trust_domain {
        return Err(SniError::OtherTrustDomain {
            name: name.to_owned(),
            found: domain.to_owned(),
            expected: trust_domain.to_owned(),
        });
    }
    let port: u16 = port
        .strip_prefix('p')
        .filter(|p| !p.starts_with('0') && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse().ok())
        .ok_or_else(malformed)?;
    let ip = if let Some(v4) = ip.strip_prefix("ip4-") {
        let octets: Vec<u8> = v4
            .split('-')
            .map(|o| (o == "0" || !o.starts_with('0')).then(|| o.parse::<u8>().ok()).flatten())
            .collect::<Option<_>>()
            .ok_or_else(malformed)?;
        let [a, b, c, d] = <[u8; 4]>::try_from(octets).map_err(|_| malformed())?;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else if let Some(hex) = ip.strip_prefix("ip6-") {
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        let mut octets = [0u8; 16];
        for (i, o) in octets.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| malformed())?;
        }
        let v6 = Ipv6Addr::from(octets);
        if v6.to_ipv4_mapped().is_some() {
            return Err(malformed());
        }
        IpAddr::V6(v6)
    } else {
        return Err(malformed());
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_server_names_rustls_sends() {
        for addr in ["10.77.0.3:15008", "0.0.0.0:1", "[fd00::1]:15008", "[::ffff:10.0.0.1]:80"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let name = encode(addr, "east.example");
            assert!(rustls::pki_types::ServerName::try_from(name.clone()).is_ok(), "{name}");
            let expected = SocketAddr::new(addr.ip().to_canonical(), addr.port());
            assert_eq!(decode(&name, "east.example"), Ok(expected), "{name}");
            assert_eq!(decode(&name.to_ascii_uppercase(), "east.example"), Ok(expected));
        }
        assert_eq!(encode("10.77.0.3:15008".parse().unwrap(), "td"), "ip4-10-77-0-3.p15008.td");
    }

    #[test]
    fn other_domains_and_garbage_are_refused() {
        let name = encode("10.77.0.3:15008".parse().unwrap(), "east.example");
        assert!(matches!(decode(&name, "west.example"), Err(SniError::OtherTrustDomain { .. })));
        assert!(matches!(decode(&name, "example"), Err(SniError::OtherTrustDomain { .. })));
        for bad in [
            "",
            "east.example",
            "ip4-10-77-0-3.east.example",
            "ip4-10-77-0.p15008.east.example",
            "ip4-10-77-0-3-4.p15008.east.example",
            "ip4-10-77-0-256.p15008.east.example",
            "ip4-10-77-0-03.p15008.east.example",
            "ip4-10-77-0-3.p0.east.example",
            "ip4-10-77-0-3.p015008.east.example",
            "ip4-10-77-0-3.p65536.east.example",
            "ip4-10-77-0-3.15008.east.example",
            "ip6-fd00.p15008.east.example",
            "ip6-00000000000000000000ffff0a000001.p80.east.example",
            "ip6-zz000000000000000000000000000001.p80.east.example",
            "ip5-10-77-0-3.p15008.east.example",
        ] {
            assert!(decode(bad, "east.example").is_err(), "{bad:?} was accepted");
        }
    }
}
