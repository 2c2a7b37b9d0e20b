//! The CA's private key encrypted at rest.
//!
//! Whoever reads the CA's key can mint any identity in the mesh, so the key need not
//! sit in clear in the CA directory or the Kubernetes Secret (where etcd backups,
//! `kubectl get secret -o yaml` and anyone with `get` on secrets see it).
//! [`SealedStore`] wraps any [`CaStore`]: it encrypts the key with AES-256-GCM
//! (`ring`, the workspace's crypto provider) under a key-encryption key the operator
//! keeps elsewhere (a file from another Secret or a KMS-backed volume, or an
//! environment variable), and decrypts it on load. Certificates stay in clear: they
//! are public.
//!
//! The stored form is PEM-armoured (`MESH SEALED CA KEY`): a version tag, the id of
//! the key-encryption key (the first 8 bytes of its SHA-256), a random nonce, then
//! the ciphertext and tag; the version and key id are authenticated as associated
//! data. Rotation: give the new key as current and the old one as previous; on load,
//! a key sealed under a previous key (or stored in clear) is sealed again under the
//! current one and saved back, so the old key can then be retired.

use std::sync::Arc;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::store::{CaKeyMaterial, CaStore, StoreError, StoreFuture};

/// PEM label of a sealed key.
pub const SEALED_LABEL: &str = "MESH SEALED CA KEY";
/// Format version, first bytes of the sealed payload.
const MAGIC: &[u8; 4] = b"MSK1";
/// Bytes of a key id.
const KEY_ID_LEN: usize = 8;
/// Bytes of a key-encryption key (AES-256).
pub const KEY_LEN: usize = 32;

/// Why a key could not be used, or a sealed key opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A key-encryption key is not 32 bytes of base64.
    #[error("{what}: {reason} (expected 32 random bytes in base64, e.g. `openssl rand -base64 32`)")]
    BadKey {
        /// Where the key came from (a flag and file, or the environment variable).
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The stored key is sealed under a key that was not given.
    #[error(
        "the CA key is encrypted under key {key_id}, which is neither the current key-encryption key nor a previous one \
         (--ca-key-encryption-key-file / MESH_CA_KEY_ENCRYPTION_KEY, --ca-key-previous-encryption-key-file)"
    )]
    UnknownKey {
        /// Hex id of the key it was sealed under.
        key_id: String,
    },
    /// The stored key is sealed but no key-encryption key was given at all.
    #[error(
        "the CA key is encrypted (under key {key_id}) and no key-encryption key was given: pass \
         --ca-key-encryption-key-file or set MESH_CA_KEY_ENCRYPTION_KEY"
    )]
    NoKey {
        /// Hex id of the key it was sealed under.
        key_id: String,
    },
    /// The sealed key does not decrypt: altered, truncated, or not ours.
    #[error("the sealed CA key does not open under key {key_id}: {reason}")]
    Corrupt {
        /// Hex id of the key tried.
        key_id: String,
        /// What failed.
        reason: String,
    },
}

/// One AES-256-GCM key-encryption key and its id.
pub struct SealingKey {
    id: [u8; KEY_ID_LEN],
    key: LessSafeKey,
}

impl std::fmt::Debug for SealingKey {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealingKey").field("id", &self.id_hex()).finish_non_exhaustive()
    }
}

impl SealingKey {
    /// A key from its base64 text (surrounding whitespace ignored); `what` names its
    /// source in errors.
    pub fn from_base64(text: &str, what: &str) -> Result<Self, SealError> {
        use base64::Engine;
        let bad = |reason: String| SealError::BadKey { what: what.to_owned(), reason };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| bad(format!("not base64: {e}")))?;
        Self::from_bytes(&bytes).map_err(|reason| bad(reason.to_owned()))
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, &'static str> {
        if bytes.len() != KEY_LEN {
            return Err("not 32 bytes");
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| "rejected by AES-256-GCM")?;
        Ok(Self { id, key: LessSafeKey::new(key) })
    }

    /// The key's id in hex, as errors and logs show it.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key-encryption keys: the one to seal with, and older ones still accepted.
#[derive(Debug, Default)]
pub struct Sealer {
    current: Option<SealingKey>,
    previous: Vec<SealingKey>,
}

/// What [`Sealer::open`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    /// The key in clear (PKCS#8 PEM).
    pub key_pem: String,
    /// Whether it should be saved again: stored in clear or under another key while a
    /// current key is given, or sealed while none is (encryption being turned off).
    pub reseal: bool,
}

impl Sealer {
    /// Seals with `current` (none: store in clear), opens under it or any of `previous`.
    pub fn new(current: Option<SealingKey>, previous: Vec<SealingKey>) -> Self {
        Self { current, previous }
    }

    /// Whether anything is configured (otherwise the store is used unwrapped).
    pub fn is_configured(&self) -> bool {
        self.current.is_some() || !self.previous.is_empty()
    }

    /// The current key's id, for logs.
    pub fn current_id(&self) -> Option<String> {
        self.current.as_ref().map(SealingKey::id_hex)
    }

    /// `key_pem` sealed under the current key, or unchanged without one.
    pub fn seal(&self, key_pem: &str) -> String {
        let Some(key) = &self.current else { return key_pem.to_owned() };
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).expect("the system random source works");
        let mut aad = Vec::with_capacity(MAGIC.len() + KEY_ID_LEN);
        aad.extend_from_slice(MAGIC);
        aad.extend_from_slice(&key.id);
        let mut sealed = key_pem.as_bytes().to_vec();
        key.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut sealed)
            .expect("AES-GCM seals a CA key (far below its length limit)");
        let mut payload = aad;
        payload.extend_from_slice(&nonce);
        payload.extend_from_slice(&sealed);
        pem::encode(&pem::Pem::new(SEALED_LABEL, payload))
    }

    /// The key in clear from what the store held: sealed (under the current or a
    /// previous key) or in clear.
    pub fn open(&self, stored: &str) -> Result<Opened, SealError> {
        let Some(sealed) = sealed_payload(stored) else {
            return Ok(Opened { key_pem: stored.to_owned(), reseal: self.current.is_some() });
        };
        let header = MAGIC.len() + KEY_ID_LEN;
        if sealed.len() < header + NONCE_LEN + AES_256_GCM.tag_len() || &sealed[..MAGIC.len()] != MAGIC {
            let key_id = sealed.get(MAGIC.len()..header).map(hex).unwrap_or_default();
            return Err(SealError::Corrupt { key_id, reason: "truncated or of an unknown version".into() });
        }
        let id = &sealed[MAGIC.len()..header];
        let key_id = hex(id);
        let key = self.current.iter().chain(&self.previous).find(|k| k.id == id);
        let Some(key) = key else {
            return Err(if self.is_configured() {
                SealError::UnknownKey { key_id }
            } else {
                SealError::NoKey { key_id }
            });
        };
        let nonce: [u8; NONCE_LEN] = sealed[header..header + NONCE_LEN].try_into().expect("length checked");
        let mut body = sealed[header + NONCE_LEN..].to_vec();
        let clear = key
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&sealed[..header]), &mut body)
            .map_err(|_| SealError::Corrupt {
                key_id: key_id.clone(),
                reason: "authentication failed".into(),
            })?;
        let key_pem = String::from_utf8(clear.to_vec())
            .map_err(|_| SealError::Corrupt { key_id: key_id.clone(), reason: "not text".into() })?;
        let under_current = self.current.as_ref().is_some_and(|c| c.id == id);
        Ok(Opened { key_pem, reseal: !under_current })
    }
}

/// The payload of a sealed key, or `None` when `stored` is not one (a key in clear).
fn sealed_payload(stored: &str) -> Option<Vec<u8>> {
    if !stored.contains(SEALED_LABEL) {
        return None;
    }
    // Armour that names our label but does not parse is corrupt, not a key in clear.
    Some(
        pem::parse(stored)
            .ok()
            .filter(|p| p.tag() == SEALED_LABEL)
            .map(|p| p.into_contents())
            .unwrap_or_default(),
    )
}

/// A [`CaStore`] whose private key is sealed by a [`Sealer`] before it reaches the
/// inner store, and opened after it leaves it. A key found in clear, or under a
/// previous key, is saved back under the current one on load.
pub struct SealedStore {
    inner: Box<dyn CaStore>,
    sealer: Arc<Sealer>,
}

impl SealedStore {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn CaStore>, sealer: Sealer) -> Self {
        Self { inner, sealer: Arc::new(sealer) }
    }

    fn sealed(&self, mut material: CaKeyMaterial) -> CaKeyMaterial {
        material.key_pem = self.sealer.seal(&material.key_pem);
        material
    }

    fn opened(&self, mut material: CaKeyMaterial) -> Result<(CaKeyMaterial, bool), StoreError> {
        let opened = self
            .sealer
            .open(&material.key_pem)
            .map_err(|e| StoreError::Sealed { store: self.inner.describe(), reason: e.to_string() })?;
        material.key_pem = opened.key_pem;
        Ok((material, opened.reseal))
    }
}

impl CaStore for SealedStore {
    fn describe(&self) -> String {
        match self.sealer.current_id() {
            Some(id) => format!("{} (key encrypted under {id})", self.inner.describe()),
            None => self.inner.describe(),
        }
    }

    fn load(&self) -> StoreFuture<'_, Option<CaKeyMaterial>> {
        Box::pin(async move {
            let Some(stored) = self.inner.load().await? else { return Ok(None) };
            let (material, reseal) = self.opened(stored)?;
            if reseal {
                self.inner.save(self.sealed(material.clone())).await?;
                match self.sealer.current_id() {
                    Some(id) => tracing::info!(store = %self.inner.describe(), key_id = %id,
                        "CA key encrypted at rest under the current key-encryption key"),
                    None => tracing::warn!(store = %self.inner.describe(),
                        "CA key stored in clear: no current key-encryption key was given"),
                }
            }
            Ok(Some(material))
        })
    }

    fn save(&self, material: CaKeyMaterial) -> StoreFuture<'_, ()> {
        Box::pin(async move { self.inner.save(self.sealed(material)).await })
    }

    fn create(&self, material: CaKeyMaterial) -> StoreFuture<'_, CaKeyMaterial> {
        Box::pin(async move {
            let stored = self.inner.create(self.sealed(material)).await?;
            Ok(self.opened(stored)?.0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::FileStore;

    fn key(byte: u8) -> SealingKey {
        SealingKey::from_bytes(&[byte; KEY_LEN]).unwrap()
    }

    const PEM: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";

    #[test]
    fn a_sealed_key_opens_under_its_key_only_and_shows_no_clear_text() {
        let sealer = Sealer::new(Some(key(1)), vec![]);
        let sealed = sealer.seal(PEM);
        assert!(sealed.contains(SEALED_LABEL) && !sealed.contains("MIGHAgEA"), "{sealed}");
        assert_eq!(sealer.open(&sealed).unwrap(), Opened { key_pem: PEM.into(), reseal: false });
        // Two seals of the same key differ (fresh nonce).
        assert_ne!(sealed, sealer.seal(PEM));

        let other = Sealer::new(Some(key(2)), vec![]);
        assert!(matches!(other.open(&sealed), Err(SealError::UnknownKey { .. })));
        let none = Sealer::default();
        let err = none.open(&sealed).unwrap_err();
        assert!(matches!(err, SealError::NoKey { .. }));
        assert!(err.to_string().contains("MESH_CA_KEY_ENCRYPTION_KEY"), "{err}");
    }

    #[test]
    fn an_altered_or_truncated_sealed_key_is_refused() {
        let sealer = Sealer::new(Some(key(1)), vec![]);
        let payload = pem::parse(sealer.seal(PEM)).unwrap().into_contents();
        for (what, bytes) in [
            ("a flipped ciphertext bit", {
                let mut b = payload.clone();
                *b.last_mut().unwrap() ^= 1;
                b
            }),
            ("a changed version", {
                let mut b = payload.clone();
                b[3] = b'2';
                b
            }),
            ("truncated", payload[..20].to_vec()),
        ] {
            let armoured = pem::encode(&pem::Pem::new(SEALED_LABEL, bytes));
            assert!(matches!(sealer.open(&armoured), Err(SealError::Corrupt { .. })), "{what}");
        }
        let garbled = format!("-----BEGIN {SEALED_LABEL}-----\n!!!\n-----END {SEALED_LABEL}-----\n");
        assert!(matches!(sealer.open(&garbled), Err(SealError::Corrupt { .. })));
    }

    #[test]
    fn rotation_opens_under_a_previous_key_and_asks_for_a_reseal() {
        let old = Sealer::new(Some(key(1)), vec![]).seal(PEM);
        let rotated = Sealer::new(Some(key(2)), vec![key(1)]);
        assert_eq!(rotated.open(&old).unwrap(), Opened { key_pem: PEM.into(), reseal: true });
        // A key in clear with a current key: sealed on the next save.
        assert_eq!(rotated.open(PEM).unwrap(), Opened { key_pem: PEM.into(), reseal: true });
        // Encryption turned off: the previous key opens it, and it is saved in clear.
        let off = Sealer::new(None, vec![key(1)]);
        assert_eq!(off.open(&old).unwrap(), Opened { key_pem: PEM.into(), reseal: true });
        assert_eq!(off.seal(PEM), PEM);
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64() {
        use base64::Engine;
        let good = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(SealingKey::from_base64(&format!("{good}\n"), "test").is_ok());
        for bad in ["not base64!", &base64::engine::general_purpose::STANDARD.encode([7u8; 16])] {
            let err = SealingKey::from_base64(bad, "--ca-key-encryption-key-file k").unwrap_err();
            assert!(err.to_string().contains("--ca-key-encryption-key-file k"), "{err}");
        }
    }

    fn material() -> CaKeyMaterial {
        CaKeyMaterial { cert_pem: "CERT".into(), key_pem: PEM.into(), ..Default::default() }
    }

    #[tokio::test]
    async fn the_file_store_holds_the_key_sealed_and_a_clear_one_is_sealed_on_load() {
        let dir = tempfile::tempdir().unwrap();
        // An existing CA stored in clear, then encryption turned on.
        FileStore::new(dir.path()).save(material()).await.unwrap();
        let store = SealedStore::new(Box::new(FileStore::new(dir.path())), Sealer::new(Some(key(1)), vec![]));
        assert_eq!(store.load().await.unwrap(), Some(material()));
        let on_disk = std::fs::read_to_string(dir.path().join(crate::ca::KEY_FILE)).unwrap();
        assert!(on_disk.contains(SEALED_LABEL) && !on_disk.contains("MIGHAgEA"), "{on_disk}");

        // Without the key the file store's content is unreadable as a key.
        let bare = SealedStore::new(Box::new(FileStore::new(dir.path())), Sealer::default());
        let err = bare.load().await.unwrap_err().to_string();
        assert!(err.contains("encrypted") && err.contains(&key(1).id_hex()), "{err}");

        // Rotation: the new key seals it on load; the old key alone no longer opens it.
        let rotated =
            SealedStore::new(Box::new(FileStore::new(dir.path())), Sealer::new(Some(key(2)), vec![key(1)]));
        assert_eq!(rotated.load().await.unwrap(), Some(material()));
        let old_only =
            SealedStore::new(Box::new(FileStore::new(dir.path())), Sealer::new(Some(key(1)), vec![]));
        assert!(old_only.load().await.is_err());
        let new_only =
            SealedStore::new(Box::new(FileStore::new(dir.path())), Sealer::new(Some(key(2)), vec![]));
        assert_eq!(new_only.load().await.unwrap(), Some(material()));
    }
}
