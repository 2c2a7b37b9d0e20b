//! Root rotation: a new root that agents anchored on the old one accept.
//!
//! `mesh-control rotate-root` replaces the stored root with a new one, keeps the old
//! root in the trust bundle (the previous roots), and adds a certificate of the new
//! root (same subject, same key) signed by the old one: the cross-signed
//! certificate. An agent accepts a root it does not know yet only when such a
//! certificate chains it to a root it already trusts (its out-of-band anchor, or a
//! root accepted that way before), so whoever answers in the control plane's place
//! cannot plant a root. Workload and serving certificates carry the cross-signed
//! certificate after their leaf, so a peer that still trusts only the old root
//! verifies them too, and the rotation never breaks mutual TLS.
//!
//! The old root is retired once every certificate it issued has expired and the
//! agents' anchors name the new root: remove `ca-previous.pem` (the Secret's key of
//! that name) and restart the control plane.

use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, Issuer, KeyPair};
use x509_parser::certificate::X509Certificate;

use super::authority::{
    ROOT_NAME, bad, ca_params, cert_not_after, later, load_signing_key, parse_cert, parse_pem_cert,
    pem_encode, random_serial,
};
use super::error::CaError;
use super::store::{CaKeyMaterial, CaStore};

/// What a rotation left for the trust bundle, as the CA publishes it.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Published {
    /// Previous roots still valid (PEM, one certificate each).
    pub previous_roots: Vec<String>,
    /// Cross-signed certificates of the current or a previous root (PEM, one each).
    pub cross_signed: Vec<String>,
}

/// The previous roots and cross-signed certificates of `material` worth publishing at
/// `now`: expired ones, copies of the current root and certificates for keys that are
/// no longer any root's are left out (and logged), so a crash half-way through a
/// rotation or a hand-edited file cannot publish something that fits nothing.
pub(super) fn published(material: &CaKeyMaterial, now: SystemTime) -> Published {
    let mut out = Published::default();
    let Ok(current_der) = parse_pem_cert(&material.cert_pem, "CA certificate") else { return out };
    let Ok(current) = parse_cert(&current_der, "CA certificate") else { return out };
    let mut keys = vec![current.public_key().raw.to_vec()];
    for der in pem_blocks(&material.previous_roots_pem, "previous root") {
        if der == current_der {
            continue;
        }
        match usable(&der, now) {
            Ok(cert) => {
                keys.push(cert.public_key().raw.to_vec());
                out.previous_roots.push(pem_encode(&der));
            }
            Err(reason) => tracing::warn!(%reason, "previous root left out of the trust bundle"),
        }
    }
    for der in pem_blocks(&material.cross_signed_pem, "cross-signed certificate") {
        match usable(&der, now) {
            Ok(cert) if keys.iter().any(|k| k.as_slice() == cert.public_key().raw) => {
                out.cross_signed.push(pem_encode(&der));
            }
            Ok(_) => tracing::warn!("cross-signed certificate left out: it certifies none of the roots"),
            Err(reason) => tracing::warn!(%reason, "cross-signed certificate left out"),
        }
    }
    out
}

/// A parsed CA certificate valid at `now`, or why not.
fn usable(der: &[u8], now: SystemTime) -> Result<X509Certificate<'_>, String> {
    let cert = parse_cert(der, "certificate").map_err(|e| e.to_string())?;
    if !matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
        return Err(format!("{} is not a CA certificate", cert.subject()));
    }
    if cert_not_after(&cert) < now {
        return Err(format!("{} has expired", cert.subject()));
    }
    Ok(cert)
}

/// The DER of every CERTIFICATE block in `text`; a block that does not parse is logged.
fn pem_blocks(text: &str, what: &str) -> Vec<Vec<u8>> {
    match pem::parse_many(text) {
        Ok(blocks) => {
            blocks.into_iter().filter(|b| b.tag() == "CERTIFICATE").map(|b| b.into_contents()).collect()
        }
        Err(e) => {
            tracing::warn!(error = %e, "{what}s are not PEM; ignored");
            Vec::new()
        }
    }
}

/// `material` with a new self-signed root for `trust_domain` valid for `validity` from
/// `now`, the old root among the previous roots, and the new root cross-signed by the
/// old one. Only a self-signed root rotates this way: in intermediate mode the
/// operator's root is changed with `--ca-root-cert`.
pub fn rotate_root(
    material: &CaKeyMaterial,
    trust_domain: &str,
    now: SystemTime,
    validity: Duration,
) -> Result<CaKeyMaterial, CaError> {
    load_signing_key(material, trust_domain)?;
    let old_der = parse_pem_cert(&material.cert_pem, "stored CA certificate")?;
    let old = parse_cert(&old_der, "stored CA certificate")?;
    if old.subject() != old.issuer() || old.verify_signature(None).is_err() {
        return Err(CaError::Rotation(
            "the stored CA is an intermediate, not a self-signed root: rotate the root it was issued \
             under and pass it with --ca-root-cert/--ca-root-key instead"
                .into(),
        ));
    }
    let old_key = KeyPair::from_pem(&material.key_pem).map_err(|e| bad("stored CA key", e.to_string()))?;
    let old_issuer = Issuer::from_ca_cert_pem(&material.cert_pem, old_key)
        .map_err(|e| bad("stored CA certificate", e.to_string()))?;

    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let name = format!("{ROOT_NAME} {secs}");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params =
        ca_params(trust_domain, &name, BasicConstraints::Unconstrained, now, later(now, validity))?;
    let root = params.self_signed(&key)?;
    // The same subject and key, vouched for by the old root: valid no longer than the
    // old root itself, since nothing chains through it afterwards.
    params.serial_number = Some(random_serial());
    let old_not_after = cert_not_after(&old);
    if old_not_after < later(now, validity) {
        params.not_after = old_not_after.into();
    }
    let cross = params.signed_by(&key, &old_issuer)?;

    let before = published(material, now);
    let mut previous = vec![pem_encode(&old_der)];
    previous.extend(before.previous_roots);
    let mut cross_signed = vec![cross.pem()];
    cross_signed.extend(before.cross_signed);
    Ok(CaKeyMaterial {
        cert_pem: root.pem(),
        key_pem: key.serialize_pem(),
        previous_roots_pem: previous.concat(),
        cross_signed_pem: cross_signed.concat(),
    })
}

/// Rotates the root kept in `store` (see [`rotate_root`]) and saves the result; the
/// control plane uses the new root from its next start.
pub async fn rotate(
    store: &dyn CaStore,
    trust_domain: &str,
    validity: Duration,
) -> Result<CaKeyMaterial, CaError> {
    let Some(material) = store.load().await? else {
        return Err(CaError::Rotation(format!("{} holds no CA to rotate", store.describe())));
    };
    let rotated = rotate_root(&material, trust_domain, SystemTime::now(), validity)?;
    store.save(rotated.clone()).await?;
    Ok(rotated)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, UnixTime};
    use rustls::server::ParsedCertificate;

    use super::*;
    use crate::ca::{Ca, CaConfig, FileStore, SpiffeId};

    const TD: &str = "cluster.local";
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from(parse_pem_cert(pem, "test").unwrap())
    }

    /// Whether `chain` (leaf first) verifies against `roots` alone.
    fn verifies(chain: &[String], roots: &[&str]) -> bool {
        let mut store = rustls::RootCertStore::empty();
        for r in roots {
            store.add(der(r)).unwrap();
        }
        let leaf = der(&chain[0]);
        let intermediates: Vec<_> = chain[1..].iter().map(|c| der(c)).collect();
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &ParsedCertificate::try_from(&leaf).unwrap(),
            &store,
            &intermediates,
            UnixTime::now(),
            algorithms.all,
        )
        .is_ok()
    }

    async fn issue(dir: &std::path::Path) -> (Arc<Ca>, Vec<String>) {
        let ca = Arc::new(Ca::open(CaConfig::default(), &FileStore::new(dir)).await.unwrap());
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let id = SpiffeId::new(TD, "shop", "cart").unwrap();
        let mut csr = rcgen::CertificateParams::default();
        csr.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
        let csr = csr.serialize_request(&key).unwrap().pem().unwrap();
        let issued = ca.sign(&csr, &id, None).unwrap();
        (ca, issued.chain_pem)
    }

    #[tokio::test]
    async fn a_rotated_root_is_trusted_through_the_old_one_and_certificates_verify_under_both() {
        let dir = tempfile::tempdir().unwrap();
        let (before, old_chain) = issue(dir.path()).await;
        let old_root = before.trust_bundle_pem()[0].clone();

        let rotated = rotate(&FileStore::new(dir.path()), TD, YEAR).await.unwrap();
        let (after, new_chain) = issue(dir.path()).await;
        let new_root = after.trust_bundle_pem()[0].clone();
        assert_ne!(new_root, old_root);
        assert_eq!(
            after.trust_bundle_pem(),
            [new_root.clone(), old_root.clone()],
            "new root first, old kept"
        );
        assert_eq!(after.cross_signed_pem().len(), 1);
        assert_eq!(rotated.cert_pem, new_root);

        // A peer that has not learnt the new root yet still verifies new certificates
        // (the leaf carries the cross-signed root), and old ones keep verifying.
        assert_eq!(new_chain.len(), 2, "leaf then the cross-signed root");
        assert!(verifies(&new_chain, &[&old_root]), "old root alone");
        assert!(verifies(&new_chain, &[&new_root]), "new root alone");
        assert!(verifies(&old_chain, &[&new_root, &old_root]));
        assert!(!verifies(&old_chain, &[&new_root]), "the new root does not vouch for the old one's leaves");

        // The cross-signed certificate is the new root's subject and key, issued by the old root.
        let cross_der = parse_pem_cert(&after.cross_signed_pem()[0], "cross").unwrap();
        let cross = parse_cert(&cross_der, "cross").unwrap();
        let new_der = parse_pem_cert(&new_root, "new").unwrap();
        let new = parse_cert(&new_der, "new").unwrap();
        let old_der = parse_pem_cert(&old_root, "old").unwrap();
        let old = parse_cert(&old_der, "old").unwrap();
        assert_eq!(cross.subject(), new.subject());
        assert_eq!(cross.public_key().raw, new.public_key().raw);
        assert!(cross.verify_signature(Some(old.public_key())).is_ok());
        assert_ne!(new.subject(), old.subject(), "roots side by side are told apart by name");
    }

    #[tokio::test]
    async fn a_second_rotation_keeps_every_root_and_its_cross_signature() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = issue(dir.path()).await;
        let root1 = first.trust_bundle_pem()[0].clone();
        rotate(&FileStore::new(dir.path()), TD, YEAR).await.unwrap();
        rotate(&FileStore::new(dir.path()), TD, YEAR).await.unwrap();
        let (ca, chain) = issue(dir.path()).await;
        assert_eq!(ca.trust_bundle_pem().len(), 3);
        assert_eq!(ca.trust_bundle_pem()[2], root1);
        assert_eq!(ca.cross_signed_pem().len(), 2);
        assert!(verifies(&chain, &[&root1]), "two rotations behind still verifies, through both crosses");
    }

    #[tokio::test]
    async fn only_a_stored_self_signed_root_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let err = rotate(&FileStore::new(dir.path()), TD, YEAR).await.unwrap_err();
        assert!(err.to_string().contains("holds no CA to rotate"), "{err}");

        // An intermediate's material (issued by a root) is refused, naming what to do.
        let (ca, _) = issue(dir.path()).await;
        let root_pem = ca.trust_bundle_pem()[0].clone();
        let material = FileStore::new(dir.path()).load().await.unwrap().unwrap();
        let root_key = KeyPair::from_pem(&material.key_pem).unwrap();
        let issuer = Issuer::from_ca_cert_pem(&root_pem, root_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let now = SystemTime::now();
        let params =
            ca_params(TD, "mesh intermediate CA", BasicConstraints::Constrained(0), now, later(now, YEAR))
                .unwrap();
        let intermediate = CaKeyMaterial {
            cert_pem: params.signed_by(&key, &issuer).unwrap().pem(),
            key_pem: key.serialize_pem(),
            ..Default::default()
        };
        let err = rotate_root(&intermediate, TD, now, YEAR).unwrap_err();
        assert!(err.to_string().contains("--ca-root-cert"), "{err}");

        // Another trust domain's root is not rotated into this one.
        let err = rotate_root(&material, "other.example", now, YEAR).unwrap_err();
        assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn leftovers_that_fit_no_root_are_not_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        issue(dir.path()).await;
        let rotated = rotate(&store, TD, YEAR).await.unwrap();
        let now = SystemTime::now();
        assert_eq!(published(&rotated, now).previous_roots.len(), 1);

        // A crash after the rotation's files but before the new root: the old root sees
        // itself among the previous roots and a cross certificate for a key it lacks.
        let other = tempfile::tempdir().unwrap();
        issue(other.path()).await;
        let unrelated = FileStore::new(other.path()).load().await.unwrap().unwrap();
        let half = CaKeyMaterial {
            previous_roots_pem: unrelated.cert_pem.clone(),
            cross_signed_pem: rotated.cross_signed_pem.clone(),
            ..unrelated.clone()
        };
        assert_eq!(published(&half, now), Published::default());

        // Past the old root's end, neither it nor its cross-signature is published.
        let late = now + 20 * YEAR;
        assert_eq!(published(&rotated, late), Published::default());
    }
}
