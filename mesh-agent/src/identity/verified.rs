//! Chains already found to lead to a root of one snapshot of the trust bundle.
//!
//! Checking a peer's chain costs an ECDSA verification per link: with the
//! handshake's own signature check, the largest share of a receiving agent's CPU in
//! a handshake (`benches/handshake.rs`). An agent meets the same few peer
//! certificates thousands of times between renewals, and a chain that led to a root
//! once leads there again: the signatures over the same bytes do not change. So a
//! verified chain is remembered by the SHA-256 of its exact bytes, with the window
//! in which every certificate of it is valid, and is not walked again while the
//! handshake's time is inside that window.
//!
//! What still runs at every handshake: the check that the peer holds the leaf's key
//! (its handshake signature), the validity window, and the SPIFFE checks. The cache
//! belongs to one [`super::trust::TrustSnapshot`], so replacing the roots (a rotation,
//! a removed CA) starts from an empty one. Any other chain, even one naming the same
//! identity, has other bytes and is verified in full.

use std::collections::HashMap;
use std::sync::Mutex;

use rustls::pki_types::{CertificateDer, UnixTime};

/// Chains remembered per snapshot and usage; when full, the cache starts over
/// (a node meets far fewer live peer certificates than this).
const MAX_CHAINS: usize = 4096;

/// The SHA-256 of a chain's certificates, each prefixed by its length.
pub(crate) type ChainKey = [u8; 32];

/// Chains verified against one snapshot for one usage (client or server
/// authentication), with their validity windows in Unix seconds.
#[derive(Debug, Default)]
pub(crate) struct VerifiedChains {
    chains: Mutex<HashMap<ChainKey, Window>>,
}

/// When every certificate of a chain is valid: `not_before <= now <= not_after`, the
/// bounds webpki applies.
#[derive(Debug, Clone, Copy)]
struct Window {
    not_before: u64,
    not_after: u64,
}

impl VerifiedChains {
    /// The key of the chain `end_entity` then `intermediates`.
    pub fn key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> ChainKey {
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        for cert in std::iter::once(end_entity).chain(intermediates) {
            digest.update(&(cert.len() as u64).to_be_bytes());
            digest.update(cert);
        }
        let mut key = [0; 32];
        key.copy_from_slice(digest.finish().as_ref());
        key
    }

    /// Whether `key`'s chain was verified and every certificate of it is valid `now`.
    pub fn contains(&self, key: &ChainKey, now: UnixTime) -> bool {
        let now = now.as_secs();
        self.lock().get(key).is_some_and(|w| w.not_before <= now && now <= w.not_after)
    }

    /// Remembers `key`, whose chain has just been verified. A chain whose validity
    /// cannot be read is not remembered (it is verified in full each time).
    pub fn insert(
        &self,
        key: ChainKey,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) {
        let Some(window) = window(std::iter::once(end_entity).chain(intermediates)) else { return };
        let mut chains = self.lock();
        if chains.len() >= MAX_CHAINS {
            chains.clear();
        }
        chains.insert(key, window);
    }

    /// How many chains are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChainKey, Window>> {
        // Nothing panics while holding it; a poisoned map is still a valid map.
        self.chains.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The intersection of the certificates' validity periods; `None` if one does not
/// parse or the periods do not meet.
fn window<'a>(certs: impl Iterator<Item = &'a CertificateDer<'a>>) -> Option<Window> {
    let mut window = Window { not_before: 0, not_after: u64::MAX };
    for cert in certs {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
        let validity = parsed.validity();
        window.not_before =
            window.not_before.max(u64::try_from(validity.not_before.timestamp()).unwrap_or(0));
        window.not_after = window.not_after.min(u64::try_from(validity.not_after.timestamp()).ok()?);
    }
    (window.not_before <= window.not_after).then_some(window)
}
