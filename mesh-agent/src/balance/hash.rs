//! Stable hashing for consistent-hash balancers.
//!
//! Ring positions and Maglev permutations must not depend on the process (std's
//! `RandomState` is seeded per process), or every agent restart would remap every key.
//! FNV-1a over the bytes followed by a 64-bit finalizer gives stable, well-spread values.

use std::net::{IpAddr, SocketAddr};

use crate::resilience::random::mix64;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        state ^= u64::from(*b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// A stable 64-bit hash of `bytes`, for turning a header or cookie value into the
/// [`PickContext::hash_key`](super::PickContext::hash_key).
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    mix64(fnv1a(FNV_OFFSET, bytes))
}

/// A stable hash of a client address (the `source_address` hash key).
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

/// A stable hash of an endpoint address combined with a small integer (a virtual node
/// number or a Maglev seed).
pub(crate) fn hash_endpoint(addr: &SocketAddr, salt: u64) -> u64 {
    let state = match addr.ip() {
        IpAddr::V4(v4) => fnv1a(FNV_OFFSET, &v4.octets()),
        IpAddr::V6(v6) => fnv1a(FNV_OFFSET, &v6.octets()),
    };
    let state = fnv1a(state, &addr.port().to_le_bytes());
    mix64(fnv1a(state, &salt.to_le_bytes()))
}

/// Spreads a caller-supplied key, so that keys differing in a few low bits (sequential
/// user ids) land far apart on the ring.
pub(crate) fn spread_key(key: u64) -> u64 {
    mix64(key ^ 0x5851_f42d_4c95_7f2d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_across_processes() {
        // Fixed expected values: a change here remaps every consistent-hash key.
        assert_eq!(hash_bytes(b"user-42"), 0x7a15_96f0_e94b_5793);
        assert_ne!(hash_bytes(b"user-42"), hash_bytes(b"user-43"));
        let a: SocketAddr = "10.0.0.1:8080".parse().expect("addr");
        let b: SocketAddr = "10.0.0.1:8081".parse().expect("addr");
        assert_ne!(hash_endpoint(&a, 0), hash_endpoint(&a, 1));
        assert_ne!(hash_endpoint(&a, 0), hash_endpoint(&b, 0));
    }
}
