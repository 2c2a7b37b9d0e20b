//! The trust bundle: the roots peers' certificates must chain to.
//!
//! Shared by every verifier the agent builds and swapped as a whole, so a root
//! rotation reaches the next handshake without rebuilding TLS configurations
//! or restarting.
//!
//! Besides the local trust domain's roots it holds the roots of each federated
//! trust domain (`Snapshot.federated`). A peer's chain is checked only against the
//! roots of the trust domain its SPIFFE ID names: a federated cluster's CA can
//! vouch for its own workloads, never for this cluster's or a third one's.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_api::spiffe::validate_trust_domain;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use super::error::IdentityError;
use super::verified::VerifiedChains;

/// Roots of one snapshot of the bundle, with the chain verifier built over them.
#[derive(Debug)]
pub(crate) struct TrustSnapshot {
    pub roots: Arc<RootCertStore>,
    /// Chain + client-EKU checks for incoming connections.
    pub client_chain: Arc<dyn ClientCertVerifier>,
    pub ders: Vec<CertificateDer<'static>>,
    /// Client chains (of incoming connections) verified against these roots.
    pub client_verified: VerifiedChains,
    /// Server chains (of outgoing connections) verified against these roots.
    pub server_verified: VerifiedChains,
}

/// The current roots of the local trust domain.
#[derive(Debug)]
pub struct TrustBundle {
    trust_domain: String,
    current: ArcSwap<TrustSnapshot>,
    /// Federated trust domains -> their roots; empty without federation.
    federated: ArcSwap<HashMap<String, Arc<TrustSnapshot>>>,
}

impl TrustBundle {
    /// A bundle for `trust_domain` holding `roots` (DER).
    pub fn new(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<TrustBundle>, IdentityError> {
        validate_trust_domain(trust_domain)?;
        let snapshot = snapshot(roots)?;
        Ok(Arc::new(TrustBundle {
            trust_domain: trust_domain.to_owned(),
            current: ArcSwap::from_pointee(snapshot),
            federated: ArcSwap::default(),
        }))
    }

    /// A bundle for `trust_domain` from PEM roots (each string may hold several).
    pub fn from_pem(trust_domain: &str, roots_pem: &[String]) -> Result<Arc<TrustBundle>, IdentityError> {
        TrustBundle::new(trust_domain, parse_pem_certs(roots_pem)?)
    }

    /// The trust domain every peer must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Replaces the roots; handshakes starting after this use the new ones. An empty or
    /// unusable set is refused and the old roots stay.
    pub fn replace(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), IdentityError> {
        self.current.store(Arc::new(snapshot(roots)?));
        Ok(())
    }

    /// [`TrustBundle::replace`] from PEM.
    pub fn replace_pem(&self, roots_pem: &[String]) -> Result<(), IdentityError> {
        self.replace(parse_pem_certs(roots_pem)?)
    }

    /// The current roots (DER).
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().ders.clone()
    }

    pub(crate) fn snapshot(&self) -> Arc<TrustSnapshot> {
        self.current.load_full()
    }

    pub(crate) fn install(&self, snapshot: Arc<TrustSnapshot>) {
        self.current.store(snapshot);
    }

    /// The roots a peer claiming `trust_domain` must chain to: the local ones, a
    /// federated domain's, or none (a domain this mesh does not federate with).
    pub(crate) fn snapshot_for(&self, trust_domain: &str) -> Option<Arc<TrustSnapshot>> {
        if trust_domain == self.trust_domain {
            return Some(self.snapshot());
        }
        self.federated.load().get(trust_domain).cloned()
    }

    /// Replaces the federated trust domains with `domains` (trust domain, PEM roots).
    /// A domain whose roots do not parse, or that names the local trust domain, is
    /// left out and reported; a domain whose roots did not change keeps its snapshot
    /// (and the chains already verified against it). Returns the problems.
    pub fn set_federated<'a>(
        &self,
        domains: impl IntoIterator<Item = (&'a str, &'a [String])>,
    ) -> Vec<String> {
        let old = self.federated.load();
        let mut next = HashMap::new();
        let mut problems = Vec::new();
        for (domain, pems) in domains {
            if domain == self.trust_domain {
                problems.push(format!("federated trust domain {domain:?} is the local one; ignored"));
                continue;
            }
            if let Err(e) = validate_trust_domain(domain) {
                problems.push(format!("federated trust domain {domain:?}: {e}"));
                continue;
            }
            let roots = match parse_pem_certs(pems) {
                Ok(roots) => roots,
                Err(e) => {
                    problems.push(format!("federated trust domain {domain}: {e}"));
                    continue;
                }
            };
            if let Some(same) = old.get(domain).filter(|s| s.ders == roots) {
                next.insert(domain.to_owned(), same.clone());
                continue;
            }
            match snapshot(roots) {
                Ok(s) => {
                    next.insert(domain.to_owned(), Arc::new(s));
                }
                Err(e) => problems.push(format!("federated trust domain {domain}: {e}")),
            }
        }
        self.federated.store(Arc::new(next));
        problems
    }

    /// The federated trust domains currently trusted, sorted.
    pub fn federated_domains(&self) -> Vec<String> {
        let mut domains: Vec<String> = self.federated.load().keys().cloned().collect();
        domains.sort();
        domains
    }
}

/// Builds a snapshot from `roots`, refusing an empty or unparsable set.
pub(crate) fn snapshot(roots: Vec<CertificateDer<'static>>) -> Result<TrustSnapshot, IdentityError> {
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 || added != roots.len() {
        return Err(IdentityError::EmptyTrustBundle);
    }
    let roots_store = Arc::new(store);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_chain = WebPkiClientVerifier::builder_with_provider(roots_store.clone(), provider)
        .build()
        .map_err(|e| IdentityError::Tls(rustls::Error::General(e.to_string())))?;
    Ok(TrustSnapshot {
        roots: roots_store,
        client_chain,
        ders: roots,
        client_verified: VerifiedChains::default(),
        server_verified: VerifiedChains::default(),
    })
}

/// Every certificate in `pems`, in order.
pub(crate) fn parse_pem_certs(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let mut certs = Vec::new();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            certs.push(cert.map_err(|e| IdentityError::Pem(e.to_string()))?);
        }
    }
    Ok(certs)
}
