//! The certificate authority: its signing key (a root, or an intermediate under
//! a user's root) and the issuance of workload certificates.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, validate_trust_domain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::csr;
use super::error::{CaError, SignError};
use super::store::{CaKeyMaterial, CaStore};

/// Certificates are dated this far back so that peers whose clocks lag a little still
/// accept them.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Lifetime of a workload certificate when the request names none.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest workload certificate lifetime by default.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Lifetime of a generated root.
pub const DEFAULT_ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of a generated intermediate.
pub const DEFAULT_INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Whether the CA is its own root or an intermediate under a root the user keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaMode {
    /// Generate (once) and use a self-signed root.
    SelfSignedRoot,
    /// Generate (once) an intermediate signed by this root and issue with it. The root key
    /// is only read when a new intermediate is needed.
    Intermediate {
        /// PEM certificate of the user's root.
        root_cert: PathBuf,
        /// PEM (PKCS#8) key of the user's root.
        root_key: PathBuf,
    },
}

/// How the CA runs.
#[derive(Debug, Clone)]
pub struct CaConfig {
    /// The SPIFFE trust domain of every identity issued.
    pub trust_domain: String,
    /// Lifetime of a workload certificate when the request names none.
    pub default_ttl: Duration,
    /// Longest lifetime issued, whatever the request asks for.
    pub max_ttl: Duration,
    /// Root or intermediate.
    pub mode: CaMode,
    /// Lifetime of a generated root.
    pub root_validity: Duration,
    /// Lifetime of a generated intermediate (never beyond its root).
    pub intermediate_validity: Duration,
}

impl Default for CaConfig {
    fn default() -> CaConfig {
        CaConfig {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            default_ttl: DEFAULT_TTL,
            max_ttl: DEFAULT_MAX_TTL,
            mode: CaMode::SelfSignedRoot,
            root_validity: DEFAULT_ROOT_VALIDITY,
            intermediate_validity: DEFAULT_INTERMEDIATE_VALIDITY,
        }
    }
}

/// A certificate the CA issued, with what a workload needs to use and check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// PEM certificates: the leaf first, then intermediates (none in root mode).
    pub chain_pem: Vec<String>,
    /// PEM roots that verify the chain.
    pub trust_bundle_pem: Vec<String>,
    /// After a root rotation, the certificates chaining the newer roots to older ones.
    pub cross_signed_pem: Vec<String>,
    /// Start of validity (already backdated).
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The signing certificate and key in use.
pub(super) struct SigningKey {
    pub(super) issuer: Issuer<'static, KeyPair>,
    pub(super) not_after: SystemTime,
}

/// The mesh's certificate authority. Cheap to share behind an `Arc`; signing takes `&self`.
pub struct Ca {
    pub(super) trust_domain: String,
    default_ttl: Duration,
    max_ttl: Duration,
    pub(super) signing: SigningKey,
    /// Intermediates sent after every leaf.
    intermediates_pem: Vec<String>,
    /// The current root first, then the previous roots a rotation left trusted.
    roots_pem: Vec<String>,
    /// After a rotation: the current root signed by the previous one(s), sent after every
    /// leaf too, so that a peer still anchored on an older root can verify it.
    cross_signed_pem: Vec<String>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("intermediates", &self.intermediates_pem.len())
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads the CA's key material from `store`, creating and saving it on first start.
    ///
    /// In root mode the same root comes back on every start. In intermediate mode a stored
    /// intermediate is reused while it was issued by the configured root, belongs to the
    /// configured trust domain and outlives the longest certificate it may issue;
    /// otherwise a new one is made.
    pub async fn open(config: CaConfig, store: &dyn CaStore) -> Result<Ca, CaError> {
        validate_trust_domain(&config.trust_domain)?;
        if config.default_ttl.is_zero() || config.default_ttl > config.max_ttl {
            return Err(CaError::Lifetimes(format!(
                "default {:?} must be above zero and at most the maximum {:?}",
                config.default_ttl, config.max_ttl
            )));
        }
        let td = config.trust_domain.as_str();
        let now = SystemTime::now();
        let (material, intermediates_pem, roots_pem, cross_signed_pem) = match &config.mode {
            CaMode::SelfSignedRoot => {
                let material = match store.load().await? {
                    Some(material) => material,
                    None => {
                        let generated = generate_root(td, now, config.root_validity)?;
                        let stored = store.create(generated.clone()).await?;
                        if stored == generated {
                            tracing::info!(store = %store.describe(), "generated a new root CA");
                        } else {
                            tracing::info!(store = %store.describe(), "another instance created the root CA first; using it");
                        }
                        stored
                    }
                };
                let rotated = super::rotation::published(&material, now);
                let mut roots = vec![material.cert_pem.clone()];
                roots.extend(rotated.previous_roots);
                (material, vec![], roots, rotated.cross_signed)
            }
            CaMode::Intermediate { root_cert, root_key } => {
                let root_pem = read(root_cert)?;
                let root_der = parse_pem_cert(&root_pem, "root certificate")?;
                let root = parse_cert(&root_der, "root certificate")?;
                require_ca(&root, "root certificate")?;
                let loaded = store.load().await?;
                let stored_nothing = loaded.is_none();
                let reusable = match loaded {
                    Some(material) => match check_intermediate(&material, &root, td, now, config.max_ttl) {
                        Ok(()) => Some(material),
                        Err(reason) => {
                            tracing::warn!(store = %store.describe(), %reason, "replacing the intermediate CA");
                            None
                        }
                    },
                    None => None,
                };
                let material = match reusable {
                    Some(material) => material,
                    None => {
                        let key_pem = read(root_key)?;
                        let material = generate_intermediate(td, now, &config, &root_pem, &root, &key_pem)?;
                        let stored = if stored_nothing {
                            // Like the root: a replica starting alongside may have won.
                            store.create(material.clone()).await?
                        } else {
                            store.save(material.clone()).await?;
                            material.clone()
                        };
                        if stored == material {
                            tracing::info!(store = %store.describe(), "generated a new intermediate CA");
                        } else {
                            check_intermediate(&stored, &root, td, now, config.max_ttl).map_err(
                                |reason| CaError::BadMaterial {
                                    what: "intermediate CA stored by another instance".into(),
                                    reason,
                                },
                            )?;
                            tracing::info!(store = %store.describe(), "another instance created the intermediate CA first; using it");
                        }
                        stored
                    }
                };
                let roots = vec![pem_encode(&root_der)];
                let intermediates = vec![material.cert_pem.clone()];
                (material, intermediates, roots, vec![])
            }
        };
        let signing = load_signing_key(&material, td)?;
        Ok(Ca {
            trust_domain: config.trust_domain,
            default_ttl: config.default_ttl,
            max_ttl: config.max_ttl,
            signing,
            intermediates_pem,
            roots_pem,
            cross_signed_pem,
        })
    }

    /// The trust domain of every identity this CA issues.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The PEM roots agents must trust.
    pub fn trust_bundle_pem(&self) -> &[String] {
        &self.roots_pem
    }

    /// After a root rotation, the certificates that chain the current root to the
    /// previous ones (empty otherwise). Agents accept a new root only through these.
    pub fn cross_signed_pem(&self) -> &[String] {
        &self.cross_signed_pem
    }

    /// What follows a leaf this CA signed: intermediates, then cross-signed roots.
    pub(super) fn chain_after_leaf(&self) -> impl Iterator<Item = &String> {
        self.intermediates_pem.iter().chain(&self.cross_signed_pem)
    }

    /// The latest instant a certificate this CA signs may be valid until.
    pub(super) fn signing_not_after(&self) -> SystemTime {
        self.signing.not_after
    }

    /// Signs `csr_pem` for `expected`, valid for `ttl` (default when `None` or zero,
    /// capped at the maximum and at the CA's own expiry).
    pub fn sign(
        &self,
        csr_pem: &str,
        expected: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<IssuedCertificate, SignError> {
        self.sign_at(csr_pem, expected, ttl, SystemTime::now())
    }

    /// [`Ca::sign`] as if the time were `now`, for callers that control the clock.
    pub fn sign_at(
        &self,
        csr_pem: &str,
        expected: &SpiffeId,
        ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<IssuedCertificate, SignError> {
        if expected.trust_domain() != self.trust_domain {
            return Err(SignError::ForeignTrustDomain {
                requested: expected.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let checked = csr::check(csr_pem, expected)?;
        let ttl = ttl.filter(|t| !t.is_zero()).unwrap_or(self.default_ttl).min(self.max_ttl);
        let not_before = whole_seconds(now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH));
        let not_after = whole_seconds(later(now, ttl)).min(self.signing.not_after);

        let mut params = CertificateParams::default();
        // An empty subject makes rcgen mark the SAN critical, as X.509 requires.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![uri_san(&expected.to_string())?];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;

        let public_key = rcgen::SubjectPublicKeyInfo::from_der(&checked.spki_der)?;
        let leaf = params.signed_by(&public_key, &self.signing.issuer)?;
        let mut chain_pem = vec![leaf.pem()];
        chain_pem.extend(self.chain_after_leaf().cloned());
        Ok(IssuedCertificate {
            chain_pem,
            trust_bundle_pem: self.roots_pem.clone(),
            cross_signed_pem: self.cross_signed_pem.clone(),
            not_before,
            not_after,
        })
    }
}

/// The common name of the first root; rotated roots add their creation time, so that
/// the roots a rotation leaves side by side are told apart by name.
pub(super) const ROOT_NAME: &str = "mesh root CA";

fn generate_root(td: &str, now: SystemTime, validity: Duration) -> Result<CaKeyMaterial, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(td, ROOT_NAME, BasicConstraints::Unconstrained, now, later(now, validity))?;
    let cert = params.self_signed(&key)?;
    Ok(CaKeyMaterial { cert_pem: cert.pem(), key_pem: key.serialize_pem(), ..Default::default() })
}

fn generate_intermediate(
    td: &str,
    now: SystemTime,
    config: &CaConfig,
    root_pem: &str,
    root: &X509Certificate<'_>,
    root_key_pem: &str,
) -> Result<CaKeyMaterial, CaError> {
    let bad_key = |reason: String| CaError::BadMaterial { what: "root key".into(), reason };
    let root_key = KeyPair::from_pem(root_key_pem).map_err(|e| bad_key(e.to_string()))?;
    if root_key.public_key_raw() != &*root.public_key().subject_public_key.data {
        return Err(bad_key("does not match the root certificate".into()));
    }
    let root_issuer = Issuer::from_ca_cert_pem(root_pem, root_key)
        .map_err(|e| CaError::BadMaterial { what: "root certificate".into(), reason: e.to_string() })?;
    let not_after = later(now, config.intermediate_validity).min(cert_not_after(root));
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(td, "mesh intermediate CA", BasicConstraints::Constrained(0), now, not_after)?;
    let cert = params.signed_by(&key, &root_issuer)?;
    Ok(CaKeyMaterial { cert_pem: cert.pem(), key_pem: key.serialize_pem(), ..Default::default() })
}

pub(super) fn ca_params(
    td: &str,
    name: &str,
    constraints: BasicConstraints,
    now: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td);
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    // The trust domain rides along as a URI SAN so a restart can tell which domain a
    // stored CA was made for.
    params.subject_alt_names = vec![uri_san(&format!("spiffe://{td}"))?];
    params.is_ca = IsCa::Ca(constraints);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = whole_seconds(now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH)).into();
    params.not_after = whole_seconds(not_after).into();
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Why a stored intermediate cannot be reused (`Err` carries the reason for the log).
fn check_intermediate(
    material: &CaKeyMaterial,
    root: &X509Certificate<'_>,
    td: &str,
    now: SystemTime,
    max_ttl: Duration,
) -> Result<(), String> {
    let der = parse_pem_cert(&material.cert_pem, "stored intermediate").map_err(|e| e.to_string())?;
    let cert = parse_cert(&der, "stored intermediate").map_err(|e| e.to_string())?;
    cert.verify_signature(Some(root.public_key()))
        .map_err(|_| "it was not issued by the configured root".to_owned())?;
    if cert_not_after(&cert) < later(now, max_ttl) {
        return Err("it expires before the longest certificate it could issue".into());
    }
    load_signing_key(material, td).map(|_| ()).map_err(|e| e.to_string())
}

/// Parses stored material and checks it is a CA for `td` whose key matches.
pub(super) fn load_signing_key(material: &CaKeyMaterial, td: &str) -> Result<SigningKey, CaError> {
    let what = "stored CA certificate";
    let der = parse_pem_cert(&material.cert_pem, what)?;
    let cert = parse_cert(&der, what)?;
    require_ca(&cert, what)?;
    let stored_td =
        cert_trust_domain(&cert).ok_or_else(|| bad(what, "has no spiffe://<trust-domain> URI SAN".into()))?;
    if stored_td != td {
        return Err(CaError::TrustDomainMismatch { stored: stored_td, configured: td.to_owned() });
    }
    let key = KeyPair::from_pem(&material.key_pem).map_err(|e| bad("stored CA key", e.to_string()))?;
    if key.public_key_raw() != &*cert.public_key().subject_public_key.data {
        return Err(bad("stored CA key", "does not match the stored CA certificate".into()));
    }
    let not_after = cert_not_after(&cert);
    let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).map_err(|e| bad(what, e.to_string()))?;
    Ok(SigningKey { issuer, not_after })
}

pub(super) fn bad(what: &str, reason: String) -> CaError {
    CaError::BadMaterial { what: what.to_owned(), reason }
}

fn read(path: &PathBuf) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::ReadRoot { path: path.clone(), source })
}

pub(super) fn parse_pem_cert(pem: &str, what: &str) -> Result<Vec<u8>, CaError> {
    let (_, block) =
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| bad(what, e.to_string()))?;
    if block.label != "CERTIFICATE" {
        return Err(bad(what, format!("found a {:?} PEM block, not a CERTIFICATE", block.label)));
    }
    Ok(block.contents)
}

pub(super) fn parse_cert<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, CaError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(what, e.to_string()))?;
    Ok(cert)
}

pub(super) fn require_ca(cert: &X509Certificate<'_>, what: &str) -> Result<(), CaError> {
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => Ok(()),
        _ => Err(bad(what, "is not a CA certificate (basicConstraints CA:TRUE missing)".into())),
    }
}

pub(super) fn cert_not_after(cert: &X509Certificate<'_>) -> SystemTime {
    let secs = cert.validity().not_after.timestamp();
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

pub(super) fn cert_trust_domain(cert: &X509Certificate<'_>) -> Option<String> {
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => {
            uri.strip_prefix("spiffe://").filter(|td| !td.contains('/')).map(str::to_owned)
        }
        _ => None,
    })
}

pub(super) fn uri_san(uri: &str) -> Result<SanType, rcgen::Error> {
    Ok(SanType::URI(uri.try_into()?))
}

/// PEM with LF line endings, as rcgen writes them (so the same certificate is the
/// same text whichever way it was made).
pub(super) fn pem_encode(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der), config)
}

/// `t + d`, saturating at the last instant X.509 can express (9999-12-31T23:59:59Z).
pub(super) fn later(t: SystemTime, d: Duration) -> SystemTime {
    let last = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    t.checked_add(d).map_or(last, |t| t.min(last))
}

/// X.509 carries seconds only; rounding here keeps reported times equal to the certificate's.
pub(super) fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// 128 bits from the system CSPRNG, top bit clear (a positive INTEGER), second bit set
/// (constant 16-byte encoding): unpredictable serials as RFC 5280 and CA/B ask.
pub(super) fn random_serial() -> SerialNumber {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    // The system generator failing is not recoverable; a time-derived fallback keeps the
    // serial unique even then.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        bytes = nanos.to_be_bytes();
    }
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}
