//! The gRPC `Certificates` service: authenticate the node, authorize the
//! identity, then sign. Nothing is signed unless both checks pass.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use mesh_api::certificates_server::{Certificates, CertificatesServer};
use mesh_api::spiffe::SpiffeId;
use mesh_api::{SignRequest, SignResponse, TrustBundleRequest, TrustBundleResponse};
use tonic::{Request, Response, Status};

use super::auth::{IdentityAuthorizer, NodeAuthenticator, authenticate_request};
use super::authority::Ca;

/// How many certificates were issued and how many requests were refused (for any
/// reason: credentials, authorization, or a bad CSR) since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignCounts {
    /// Certificates signed.
    pub issued: u64,
    /// Sign requests refused.
    pub refused: u64,
}

#[derive(Debug, Default)]
struct Counters {
    issued: AtomicU64,
    refused: AtomicU64,
}

/// Implements `mesh.v1.Certificates`. Clones share the CA and the counters, so keep a
/// clone to read [`CertificatesService::counts`] after handing one to the server.
#[derive(Clone)]
pub struct CertificatesService {
    ca: Arc<Ca>,
    authenticator: Arc<dyn NodeAuthenticator>,
    authorizer: Arc<dyn IdentityAuthorizer>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for CertificatesService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificatesService").field("ca", &self.ca).field("counters", &self.counters).finish()
    }
}

impl CertificatesService {
    /// A service signing with `ca` for nodes `authenticator` recognises, for identities
    /// `authorizer` grants them.
    pub fn new(
        ca: Arc<Ca>,
        authenticator: Arc<dyn NodeAuthenticator>,
        authorizer: Arc<dyn IdentityAuthorizer>,
    ) -> CertificatesService {
        CertificatesService { ca, authenticator, authorizer, counters: Arc::default() }
    }

    /// The tonic server wrapping this service, ready for `Server::add_service`.
    pub fn into_server(self) -> CertificatesServer<CertificatesService> {
        CertificatesServer::new(self)
    }

    /// Issued and refused counts so far.
    pub fn counts(&self) -> SignCounts {
        SignCounts {
            issued: self.counters.issued.load(Ordering::Relaxed),
            refused: self.counters.refused.load(Ordering::Relaxed),
        }
    }

    /// The node name behind the request's bearer token.
    async fn authenticate<T>(&self, request: &Request<T>) -> Result<String, Status> {
        authenticate_request(self.authenticator.as_ref(), request).await
    }

    async fn sign_checked(&self, request: Request<SignRequest>) -> Result<SignResponse, Status> {
        let node = self.authenticate(&request).await?;
        let req = request.into_inner();
        if req.node != node {
            return Err(Status::permission_denied(format!(
                "the credential belongs to node {node:?}, the request names {:?}",
                req.node
            )));
        }
        let id = SpiffeId::new(self.ca.trust_domain(), &req.namespace, &req.service_account)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !self.authorizer.may_request(&node, &req.namespace, &req.service_account) {
            return Err(Status::permission_denied(format!("node {node:?} may not request {id}")));
        }
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds.into()));
        let issued = self.ca.sign(&req.csr_pem, &id, ttl)?;
        let not_after = issued.not_after.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        tracing::info!(%node, identity = %id, not_after, "issued certificate");
        Ok(SignResponse {
            cert_chain_pem: issued.chain_pem,
            trust_bundle_pem: issued.trust_bundle_pem,
            cross_signed_pem: issued.cross_signed_pem,
            not_after: i64::try_from(not_after).unwrap_or(i64::MAX),
        })
    }
}

#[tonic::async_trait]
impl Certificates for CertificatesService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        match self.sign_checked(request).await {
            Ok(response) => {
                self.counters.issued.fetch_add(1, Ordering::Relaxed);
                crate::metrics::certificate_request(true);
                Ok(Response::new(response))
            }
            Err(status) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                crate::metrics::certificate_request(false);
                tracing::warn!(code = ?status.code(), reason = status.message(), "refused to sign");
                Err(status)
            }
        }
    }

    async fn trust_bundle(
        &self,
        request: Request<TrustBundleRequest>,
    ) -> Result<Response<TrustBundleResponse>, Status> {
        self.authenticate(&request).await?;
        Ok(Response::new(TrustBundleResponse {
            trust_domain: self.ca.trust_domain().to_owned(),
            roots_pem: self.ca.trust_bundle_pem().to_vec(),
            cross_signed_pem: self.ca.cross_signed_pem().to_vec(),
        }))
    }
}
