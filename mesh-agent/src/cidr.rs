//! CIDR blocks for include/exclude rules, shared by both interception modes.

use std::{fmt, net::IpAddr, str::FromStr};

/// An address block such as `10.96.0.0/12` or `fd00::/64`.
///
/// Host bits must be zero (`10.1.2.3/8` is rejected): a typo in an exclusion list
/// should fail loudly at start rather than silently exclude something else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR did not parse; each variant names the offending text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CidrError {
    #[error("{0:?} is not an IP address or CIDR")]
    Address(String),
    #[error("{0:?}: prefix length must be a number up to {1}")]
    Prefix(String, u8),
    #[error("{0:?}: bits set after the prefix (did you mean {1}?)")]
    HostBits(String, Cidr),
}

impl Cidr {
    /// A block from an address and prefix length, with host bits cleared.
    pub fn new_truncating(addr: IpAddr, prefix: u8) -> Self {
        let prefix = prefix.min(max_prefix(addr));
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Self { addr, prefix }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` falls inside the block (an IPv4 address never matches an IPv6 block).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Self::new_truncating(ip, self.prefix).addr == self.addr
            }
            _ => false,
        }
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text.trim().parse().map_err(|_| CidrError::Address(s.to_owned()))?;
        let max = max_prefix(addr);
        let prefix = match prefix_text {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| CidrError::Prefix(s.to_owned(), max))?,
        };
        let cidr = Self::new_truncating(addr, prefix);
        if cidr.addr != addr {
            return Err(CidrError::HostBits(s.to_owned(), cidr));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().to_string(), "10.1.2.3/32");
        assert_eq!("fd00::/64".parse::<Cidr>().unwrap().to_string(), "fd00::/64");
        assert_eq!("::1".parse::<Cidr>().unwrap().prefix(), 128);
        let e = "10.1.2.3/8".parse::<Cidr>().unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
        assert!("10.0.0.0/33".parse::<Cidr>().unwrap_err().to_string().contains("10.0.0.0/33"));
        assert!("nope/8".parse::<Cidr>().unwrap_err().to_string().contains("nope/8"));
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
    }

    #[test]
    fn containment() {
        let c: Cidr = "10.96.0.0/12".parse().unwrap();
        assert!(c.contains("10.96.0.10".parse().unwrap()));
        assert!(c.contains("10.111.255.255".parse().unwrap()));
        assert!(!c.contains("10.112.0.0".parse().unwrap()));
        assert!(!c.contains("::ffff:10.96.0.10".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
    }

    proptest! {
        #[test]
        fn display_round_trips(v4 in any::<u32>(), v6 in any::<u128>(), p4 in 0u8..=32, p6 in 0u8..=128) {
            for c in [Cidr::new_truncating(IpAddr::V4(v4.into()), p4), Cidr::new_truncating(IpAddr::V6(v6.into()), p6)] {
                prop_assert_eq!(c.to_string().parse::<Cidr>().unwrap(), c);
                prop_assert!(c.contains(c.addr()));
            }
        }

        #[test]
        fn never_panics(s in ".{0,60}") {
            let _ = s.parse::<Cidr>();
        }
    }
}
