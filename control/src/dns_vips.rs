//! VIPs for services that have hostnames but no VIP (DNS auto-allocation, as Istio's
//! DNS proxy does for ServiceEntries): without one, a workload that resolves the
//! name through its agent's DNS would get no address to connect to, and a
//! connection the agent could route.
//!
//! Each such service gets one IPv4 address from `--dns-vip-range` (240.240.0.0/16 by
//! default, reserved space no network routes), derived from its first hostname
//! (lowest in lower case) by a fixed hash, so the same hostname gets the same address
//! after a restart of the control plane and in every replica. A collision (with
//! another allocation or a registry VIP inside the range) moves on to the next free
//! address; services are allocated in hostname order, so that too comes out the
//! same every time for the same registry.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use mesh_api as api;

/// The default range, as Istio's.
pub const DEFAULT_RANGE: &str = "240.240.0.0/16";

/// An IPv4 range to allocate from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipRange {
    base: u32,
    prefix: u8,
}

/// A `--dns-vip-range` that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{value:?}: {reason}")]
pub struct RangeError {
    value: String,
    reason: &'static str,
}

impl FromStr for VipRange {
    type Err = RangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| RangeError { value: s.to_owned(), reason };
        let (addr, prefix) = s.trim().split_once('/').ok_or_else(|| bad("not ADDRESS/PREFIX"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| bad("the prefix length is not a number"))?;
        if !(8..=30).contains(&prefix) {
            return Err(bad("the prefix length must be 8 to 30"));
        }
        let base = u32::from(addr);
        if base & !mask(prefix) != 0 {
            return Err(bad("host bits are set"));
        }
        let ip = IpAddr::V4(addr);
        if ip.is_loopback() || addr.is_unspecified() || addr.is_multicast() {
            return Err(bad("loopback, unspecified and multicast addresses cannot be VIPs"));
        }
        Ok(Self { base, prefix })
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX << (32 - u32::from(prefix))
}

impl std::fmt::Display for VipRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.base), self.prefix)
    }
}

impl VipRange {
    /// Usable addresses: all but the range's first and last.
    fn usable(&self) -> u32 {
        (1u32 << (32 - u32::from(self.prefix))) - 2
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == self.base
    }

    fn nth(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1 + i)
    }
}

/// FNV-1a, 64 bits: fixed by its definition, unlike std's hasher, so an address
/// derived from it is the same in every build and release.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// The name an allocation is keyed by: the service's lowest hostname, in lower case
/// without the root's dot.
fn key(s: &api::Service) -> Option<String> {
    s.hostnames.iter().map(|h| h.trim_end_matches('.').to_ascii_lowercase()).filter(|h| !h.is_empty()).min()
}

/// Gives every service with hostnames and no VIP, unless headless, an address of `range` in
/// `allocated_vips` (replacing what it had). Returns a problem per service left
/// without one because the range is full.
pub fn allocate(services: &mut [api::Service], range: &VipRange) -> Vec<String> {
    let mut taken: BTreeSet<u32> = services
        .iter()
        .flat_map(|s| &s.vips)
        .filter_map(|v| v.parse::<IpAddr>().ok())
        .filter_map(|ip| match ip.to_canonical() {
            IpAddr::V4(v4) if range.contains(v4) => Some(u32::from(v4)),
            _ => None,
        })
        .collect();
    let mut wanting: Vec<(String, usize)> = services
        .iter_mut()
        .enumerate()
        .filter_map(|(i, s)| {
            s.allocated_vips.clear();
            if !s.vips.is_empty() || s.headless {
                return None;
            }
            key(s).map(|k| (k, i))
        })
        .collect();
    wanting.sort();
    let usable = range.usable();
    let mut problems = Vec::new();
    for (name, i) in wanting {
        let start = (fnv1a(name.as_bytes()) % u64::from(usable)) as u32;
        let free = (0..usable)
            .map(|step| range.nth((start + step) % usable))
            .find(|ip| !taken.contains(&u32::from(*ip)));
        match free {
            Some(ip) => {
                taken.insert(u32::from(ip));
                services[i].allocated_vips = vec![ip.to_string()];
            }
            None => {
                let s = &services[i];
                problems.push(format!(
                    "service {}/{}: no address left in --dns-vip-range {range} for {name}",
                    s.namespace, s.name
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, vips: &[&str], hostnames: &[&str]) -> api::Service {
        api::Service {
            name: name.into(),
            namespace: "shop".into(),
            vips: vips.iter().map(|s| (*s).into()).collect(),
            hostnames: hostnames.iter().map(|s| (*s).into()).collect(),
            ..Default::default()
        }
    }

    fn allocated(services: &[api::Service]) -> Vec<Vec<String>> {
        services.iter().map(|s| s.allocated_vips.clone()).collect()
    }

    #[test]
    fn ranges_parse_with_errors_that_say_why() {
        let r: VipRange = DEFAULT_RANGE.parse().unwrap();
        assert_eq!(r.to_string(), "240.240.0.0/16");
        assert_eq!(r.usable(), 65_534);
        for (bad, why) in [
            ("240.240.0.1/16", "host bits"),
            ("240.240.0.0", "ADDRESS/PREFIX"),
            ("fd00::/64", "IPv4"),
            ("240.0.0.0/4", "8 to 30"),
            ("127.0.0.0/8", "loopback"),
        ] {
            let e = bad.parse::<VipRange>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn only_services_without_vips_get_one_derived_from_their_hostname() {
        let range: VipRange = DEFAULT_RANGE.parse().unwrap();
        let mut services = vec![
            service("catalog", &["10.96.0.20"], &["catalog.shop.svc.cluster.local"]),
            service("legacy", &[], &["legacy.example.com", "Alpha.Example.com."]),
            service("nameless", &[], &[]),
            api::Service { headless: true, ..service("db", &[], &["db.shop.svc.cluster.local"]) },
        ];
        assert!(allocate(&mut services, &range).is_empty());
        assert!(services[0].allocated_vips.is_empty());
        assert!(services[2].allocated_vips.is_empty());
        assert!(services[3].allocated_vips.is_empty(), "a headless service keeps resolving to its endpoints");
        let ip: Ipv4Addr = services[1].allocated_vips[0].parse().unwrap();
        assert!(range.contains(ip));
        // Keyed by the lowest hostname: the same whatever the order or case.
        let expected = range.nth((fnv1a(b"alpha.example.com") % u64::from(range.usable())) as u32);
        assert_eq!(ip, expected);
    }

    #[test]
    fn stable_across_runs_and_orders_and_collisions_move_on() {
        let range: VipRange = "240.240.0.0/30".parse().unwrap();
        assert_eq!(range.usable(), 2);
        let mk = || vec![service("a", &[], &["a.example"]), service("b", &[], &["b.example"])];
        let mut one = mk();
        assert!(allocate(&mut one, &range).is_empty());
        let mut two = mk();
        two.reverse();
        allocate(&mut two, &range);
        two.reverse();
        assert_eq!(allocated(&one), allocated(&two), "order of the registry does not matter");
        assert_ne!(one[0].allocated_vips, one[1].allocated_vips, "a collision took the next address");
        // Run again on its own output: unchanged.
        let before = allocated(&one);
        allocate(&mut one, &range);
        assert_eq!(allocated(&one), before);

        // A registry VIP inside the range is never handed out, and a full range says so.
        let mut full = vec![
            service("held", &["240.240.0.1"], &["held.example"]),
            service("a", &[], &["a.example"]),
            service("b", &[], &["b.example"]),
        ];
        let problems = allocate(&mut full, &range);
        assert_eq!(full[1].allocated_vips, ["240.240.0.2"]);
        assert!(full[2].allocated_vips.is_empty());
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("shop/b") && problems[0].contains("--dns-vip-range"), "{problems:?}");
    }
}
