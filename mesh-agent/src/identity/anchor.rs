//! The trust anchor: what the agent trusts before the control plane says anything.
//!
//! The agent is given the mesh CA's root out of band (`--control-plane-ca`, on
//! Kubernetes a ConfigMap the control plane publishes through the API server). It
//! verifies the control plane's TLS certificate against it ([`TrustAnchor::verifier`]),
//! and it accepts a trust bundle from the control plane only when the anchor vouches
//! for every root in it ([`TrustAnchor::accept`]): a root is trusted when it is an
//! anchor or a root accepted before, or when the bundle carries a cross-signed
//! certificate (the root's subject and key, issued by a trusted root) that chains
//! it to one. That is how a root rotation reaches agents; a bundle with any other
//! root is refused whole, and the error names the anchor.
//!
//! The anchor file is read again at every bundle check, so an anchor updated in
//! place (a ConfigMap after a rotation) takes effect without a restart; a file that
//! became unreadable keeps the last good anchors.
//!
//! Only with `--insecure-control-plane` and no anchor file is the first bundle
//! taken as it comes (trust on first use), said in a warning; later bundles are
//! still held to the roots accepted then.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, OtherError, SignatureScheme};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// Why the anchor could not be loaded, or refused what it was shown.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// The anchor file cannot be used.
    #[error("--control-plane-ca {path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// A bundle root the anchor does not vouch for.
    #[error(
        "trust bundle refused: root {root} is not vouched for by the trust anchor {anchor} \
         (it is no anchor, no root trusted before, and no cross-signed certificate in the bundle \
         chains it to one)"
    )]
    Unvouched { root: String, anchor: String },
    /// The bundle is of another trust domain than the anchor's.
    #[error("trust bundle refused: trust domain {got:?} is not {expected:?} of the trust anchor {anchor}")]
    TrustDomain { got: String, expected: String, anchor: String },
    /// The bundle holds nothing usable.
    #[error("trust bundle refused: {0}")]
    Malformed(String),
    /// The control plane's certificate does not chain to the anchor.
    #[error("the control plane's certificate does not verify against the trust anchor {anchor}: {reason}")]
    Untrusted { anchor: String, reason: String },
}

/// Where the anchors come from.
#[derive(Debug, Clone)]
enum Source {
    File(PathBuf),
    /// `--insecure-control-plane` without `--control-plane-ca`.
    FirstUse,
}

/// A trusted root, parsed enough to vouch and to be named in errors.
#[derive(Debug, Clone)]
struct Root {
    der: CertificateDer<'static>,
    /// "CN=mesh root CA, O=cluster.local (sha256 3f2a...)".
    name: String,
}

#[derive(Debug)]
struct State {
    anchors: Vec<Root>,
    /// Roots accepted from bundles (the current trust bundle).
    accepted: Vec<Root>,
    /// From the anchors' `spiffe://<trust-domain>` URI SAN, when they carry one.
    trust_domain: Option<String>,
    /// Chain and name checks for the control plane, over anchors and accepted roots.
    verifier: Option<Arc<WebPkiServerVerifier>>,
}

/// The agent's trust anchor; see the module documentation. Shared by the control
/// channel's TLS verifier and the trust-bundle checks.
#[derive(Debug)]
pub struct TrustAnchor {
    source: Source,
    state: ArcSwap<State>,
}

impl TrustAnchor {
    /// Anchors from the PEM file `path` (`--control-plane-ca`): at least one certificate.
    pub fn from_file(path: &Path) -> Result<Arc<TrustAnchor>, AnchorError> {
        let anchors = read_anchors(path)?;
        let state = State::new(anchors, Vec::new());
        Ok(Arc::new(TrustAnchor {
            source: Source::File(path.to_owned()),
            state: ArcSwap::from_pointee(state),
        }))
    }

    /// No anchor: the first bundle is taken as it comes (insecure mode only).
    pub fn first_use() -> Arc<TrustAnchor> {
        Arc::new(TrustAnchor {
            source: Source::FirstUse,
            state: ArcSwap::from_pointee(State::new(vec![], vec![])),
        })
    }

    /// The anchor as errors and logs name it: the flag, the file and each root.
    pub fn describe(&self) -> String {
        let state = self.state.load();
        match &self.source {
            Source::File(path) => {
                let names: Vec<&str> = state.anchors.iter().map(|r| r.name.as_str()).collect();
                format!("--control-plane-ca {} [{}]", path.display(), names.join("; "))
            }
            Source::FirstUse if state.accepted.is_empty() => "(none: --insecure-control-plane)".to_owned(),
            Source::FirstUse => {
                let names: Vec<&str> = state.accepted.iter().map(|r| r.name.as_str()).collect();
                format!("(taken on first use: {})", names.join("; "))
            }
        }
    }

    /// The trust domain the anchors name, if they name one.
    pub fn trust_domain(&self) -> Option<String> {
        self.state.load().trust_domain.clone()
    }

    /// The roots currently trusted for the mesh: the last accepted bundle.
    pub fn accepted(&self) -> Vec<CertificateDer<'static>> {
        self.state.load().accepted.iter().map(|r| r.der.clone()).collect()
    }

    /// Checks a trust bundle the control plane sent (`roots_pem`, `cross_signed_pem`,
    /// for `trust_domain`) and, when the anchor vouches for every root, makes it the
    /// trusted set and returns its roots. On refusal nothing changes.
    pub fn accept(
        &self,
        trust_domain: &str,
        roots_pem: &[String],
        cross_signed_pem: &[String],
    ) -> Result<Vec<CertificateDer<'static>>, AnchorError> {
        self.reload();
        let state = self.state.load_full();
        if let Some(expected) = &state.trust_domain
            && expected != trust_domain
        {
            return Err(AnchorError::TrustDomain {
                got: trust_domain.to_owned(),
                expected: expected.clone(),
                anchor: self.describe(),
            });
        }
        let roots = parse_all(roots_pem)?;
        if roots.is_empty() {
            return Err(AnchorError::Malformed("no root certificate".into()));
        }
        let cross = parse_all(cross_signed_pem)?;
        let first_use = matches!(self.source, Source::FirstUse) && state.accepted.is_empty();
        if first_use {
            tracing::warn!(
                roots = roots.len(),
                "taking the control plane's trust bundle on first use: --insecure-control-plane without \
                 --control-plane-ca; later bundles must be vouched for by these roots"
            );
        } else {
            let trusted: Vec<CertificateDer<'static>> =
                state.anchors.iter().chain(&state.accepted).map(|r| r.der.clone()).collect();
            if let Err(root) = vouch(&trusted, &roots, &cross, UnixTime::now()) {
                return Err(AnchorError::Unvouched { root, anchor: self.describe() });
            }
        }
        let accepted: Vec<Root> =
            roots.iter().map(|der| Root { der: der.clone(), name: name_of(der) }).collect();
        let changed = accepted.iter().map(|r| &r.der).ne(state.accepted.iter().map(|r| &r.der));
        if changed {
            tracing::info!(roots = accepted.len(), names = ?accepted.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
                anchor = %self.describe(), "trust bundle accepted: every root is vouched for by the anchor");
        }
        self.state.store(Arc::new(State::new(state.anchors.clone(), accepted)));
        Ok(roots)
    }

    /// Re-reads the anchor file; a file that cannot be used keeps the last anchors.
    fn reload(&self) {
        let Source::File(path) = &self.source else { return };
        let state = self.state.load_full();
        match read_anchors(path) {
            Ok(anchors) if anchors.iter().map(|r| &r.der).eq(state.anchors.iter().map(|r| &r.der)) => {}
            Ok(anchors) => {
                tracing::info!(anchor = %path.display(), roots = anchors.len(), "trust anchor file changed");
                self.state.store(Arc::new(State::new(anchors, state.accepted.clone())));
            }
            Err(e) => tracing::warn!(error = %e, "keeping the last trust anchors"),
        }
    }

    /// The TLS verifier of the control plane's certificate: it must chain to an anchor
    /// (or a root the anchor vouched for) and name the host dialled.
    pub fn verifier(self: &Arc<Self>) -> Arc<dyn ServerCertVerifier> {
        Arc::new(ControlPlaneVerifier { anchor: self.clone() })
    }
}

impl State {
    fn new(anchors: Vec<Root>, accepted: Vec<Root>) -> State {
        let trust_domain = anchors.iter().find_map(|r| trust_domain_of(&r.der));
        let mut store = RootCertStore::empty();
        store.add_parsable_certificates(anchors.iter().chain(&accepted).map(|r| r.der.clone()));
        let verifier = (!store.is_empty())
            .then(|| {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider).build().ok()
            })
            .flatten();
        State { anchors, accepted, trust_domain, verifier }
    }
}

fn read_anchors(path: &Path) -> Result<Vec<Root>, AnchorError> {
    let bad = |reason: String| AnchorError::File { path: path.to_owned(), reason };
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut anchors = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&text) {
        let der = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| bad(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(bad(format!("{} is not a CA certificate", parsed.subject())));
        }
        anchors.push(Root { name: name_of(&der), der });
    }
    if anchors.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    Ok(anchors)
}

fn parse_all(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, AnchorError> {
    let mut out = Vec::new();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let der = cert.map_err(|e| AnchorError::Malformed(e.to_string()))?;
            x509_parser::parse_x509_certificate(&der).map_err(|e| AnchorError::Malformed(e.to_string()))?;
            out.push(der);
        }
    }
    Ok(out)
}

/// "CN=..., O=... (sha256 1a2b3c4d...)": a root's subject and the start of its fingerprint.
fn name_of(der: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let fingerprint: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, cert)) => format!("{} (sha256 {fingerprint}...)", cert.subject()),
        Err(_) => format!("(unparsable) sha256 {fingerprint}..."),
    }
}

fn trust_domain_of(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => {
            uri.strip_prefix("spiffe://").filter(|td| !td.contains('/')).map(str::to_owned)
        }
        _ => None,
    })
}

/// Whether `trusted` vouches for every root of `roots`, given the cross-signed
/// certificates `cross`: `Err` names the first root it does not vouch for. A root is
/// vouched for when it is trusted, or when a CA certificate of `cross` valid at `now`
/// has its subject and key and was signed by a root already vouched for; roots
/// vouched for this way vouch in turn (a chain of rotations).
fn vouch<'a>(
    trusted: &'a [CertificateDer<'a>],
    roots: &'a [CertificateDer<'a>],
    cross: &'a [CertificateDer<'a>],
    now: UnixTime,
) -> Result<(), String> {
    fn parse<'a>(der: &'a CertificateDer<'a>) -> Option<X509Certificate<'a>> {
        x509_parser::parse_x509_certificate(der).ok().map(|(_, c)| c)
    }
    let now = x509_parser::time::ASN1Time::from_timestamp(i64::try_from(now.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_else(|_| x509_parser::time::ASN1Time::now());
    let cross: Vec<X509Certificate<'a>> =
        cross.iter().filter_map(parse).filter(|c| c.is_ca() && c.validity().is_valid_at(now)).collect();
    let mut vouchers: Vec<X509Certificate<'a>> = trusted.iter().filter_map(parse).collect();
    let mut pending: Vec<&'a CertificateDer<'a>> = Vec::new();
    for root in roots {
        if trusted.iter().any(|t| t.as_ref() == root.as_ref()) {
            continue;
        }
        pending.push(root);
    }
    loop {
        let before = pending.len();
        pending.retain(|root| {
            let Some(r) = parse(root) else { return true };
            let vouched = r.is_ca()
                && cross.iter().any(|c| {
                    c.subject() == r.subject()
                        && c.public_key().raw == r.public_key().raw
                        && vouchers.iter().any(|v| {
                            c.issuer() == v.subject() && c.verify_signature(Some(v.public_key())).is_ok()
                        })
                });
            if vouched {
                vouchers.push(r);
            }
            !vouched
        });
        if pending.is_empty() {
            return Ok(());
        }
        if pending.len() == before {
            return Err(name_of(pending[0]));
        }
    }
}

/// Verifies the control plane's certificate against the anchor's current roots and
/// names the anchor when it does not.
#[derive(Debug)]
struct ControlPlaneVerifier {
    anchor: Arc<TrustAnchor>,
}

impl ControlPlaneVerifier {
    fn inner(&self) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        self.anchor.state.load().verifier.clone().ok_or_else(|| {
            self.untrusted("no anchor to verify the control plane against (pass --control-plane-ca)".into())
        })
    }

    fn untrusted(&self, reason: String) -> rustls::Error {
        rustls::Error::Other(OtherError(Arc::new(AnchorError::Untrusted {
            anchor: self.anchor.describe(),
            reason,
        })))
    }
}

impl ServerCertVerifier for ControlPlaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner()?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .map_err(|e| self.untrusted(format!("{e} (presented: {})", name_of(end_entity))))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
#[path = "anchor_tests.rs"]
mod tests;
