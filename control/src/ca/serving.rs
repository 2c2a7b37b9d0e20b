//! The control plane's own TLS serving certificate, issued by the mesh CA.
//!
//! Agents verify the control plane against the CA's root given to them out of band
//! (`--control-plane-ca`), so the certificate the gRPC listener presents is signed
//! here, for the names and addresses agents dial, with a key that never leaves the
//! process. The chain carries the same intermediates and cross-signed roots as
//! workload certificates, so an agent anchored on a root older than a rotation still
//! verifies it.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};

use super::authority::{BACKDATE, Ca, IssuedCertificate, later, random_serial, whole_seconds};
use super::error::SignError;

/// The DNS names and IP addresses a serving certificate is valid for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServingNames {
    /// DNS names (`mesh-control.mesh-system.svc`, the host name ...).
    pub dns: Vec<String>,
    /// IP addresses agents may dial.
    pub ips: Vec<IpAddr>,
}

impl ServingNames {
    /// Whether there is nothing to certify.
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty() && self.ips.is_empty()
    }
}

impl Ca {
    /// A serving certificate for `key` and `names`, valid for `ttl` from `now` (never past
    /// the CA's own end). The leaf is for server authentication only.
    pub fn issue_serving(
        &self,
        key: &KeyPair,
        names: &ServingNames,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate, SignError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.trust_domain());
        dn.push(DnType::CommonName, "mesh-control");
        params.distinguished_name = dn;
        let mut sans = Vec::with_capacity(names.dns.len() + names.ips.len());
        for name in &names.dns {
            sans.push(SanType::DnsName(name.as_str().try_into()?));
        }
        sans.extend(names.ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let not_before = whole_seconds(now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH));
        let not_after = whole_seconds(later(now, ttl)).min(self.signing_not_after());
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(key, &self.signing.issuer)?;
        let mut chain_pem = vec![leaf.pem()];
        chain_pem.extend(self.chain_after_leaf().cloned());
        Ok(IssuedCertificate {
            chain_pem,
            trust_bundle_pem: self.trust_bundle_pem().to_vec(),
            cross_signed_pem: self.cross_signed_pem().to_vec(),
            not_before,
            not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use x509_parser::extensions::GeneralName;

    use super::*;
    use crate::ca::{CaConfig, FileStore};

    #[tokio::test]
    async fn serving_certificates_name_what_agents_dial_and_only_serve() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::open(CaConfig::default(), &FileStore::new(dir.path())).await.unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let names = ServingNames {
            dns: vec!["mesh-control.mesh-system.svc".into()],
            ips: vec!["10.77.0.1".parse().unwrap(), "fd77::1".parse().unwrap()],
        };
        let now = SystemTime::now();
        let issued = ca.issue_serving(&key, &names, Duration::from_secs(3600), now).unwrap();
        assert_eq!(issued.chain_pem.len(), 1, "root mode: the leaf alone");
        let der = pem::parse(&issued.chain_pem[0]).unwrap().into_contents();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) => format!("{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names[0] == "mesh-control.mesh-system.svc", "{names:?}");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth, "a serving certificate is no client identity");
        assert!(!cert.is_ca());
        let lifetime = issued.not_after.duration_since(issued.not_before).unwrap();
        assert!(lifetime <= Duration::from_secs(3600) + BACKDATE, "{lifetime:?}");
    }
}
