//! The serving side of a link: `Federation.Exports` on the control plane's gRPC
//! listener answers a configured peer with what this cluster offers it.
//!
//! The caller names its cluster and sends that link's token; anything else is
//! refused (logged with the caller's address, never the token, and counted). The
//! answer is this cluster's name, trust domain, current roots and gateways, and
//! the services of the current snapshot marked `exported` that are this cluster's
//! own, each cut down to what another cluster may know: names, ports and meshed
//! endpoints (an identity and an agent address), without policy, routes, VIPs,
//! hostnames, health checks, or the endpoints' nodes, workloads and labels.

use std::{path::Path, sync::Arc};

use mesh_api as api;
use mesh_api::federation_server::{Federation, FederationServer};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::config::FederationConfig;
use crate::snapshot::Versioned;

/// Largest request accepted: a cluster name.
const MAX_REQUEST_BYTES: usize = 4 * 1024;
/// Longest token file read (a shared secret, not a document).
const MAX_TOKEN_BYTES: u64 = 4 * 1024;

/// The tonic service.
#[derive(Clone)]
pub struct ExportsService {
    config: Arc<FederationConfig>,
    /// This cluster's current roots (PEM), as `Certificates.TrustBundle` serves them.
    roots_pem: Arc<Vec<String>>,
    snapshots: watch::Receiver<Arc<Versioned>>,
}

impl ExportsService {
    pub fn new(
        config: Arc<FederationConfig>,
        roots_pem: Vec<String>,
        snapshots: watch::Receiver<Arc<Versioned>>,
    ) -> Self {
        Self { config, roots_pem: Arc::new(roots_pem), snapshots }
    }

    /// The server, with requests bounded and answers as large as an importer takes.
    pub fn into_server(self) -> FederationServer<ExportsService> {
        FederationServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(super::MAX_RESPONSE_BYTES)
    }

    /// Whether `request` carries the token of the link to the cluster it names.
    fn check<T>(&self, request: &Request<T>, cluster: &str) -> Result<(), Status> {
        let refuse = |reason: &'static str, status: Status| {
            crate::metrics::federation_refused(reason);
            // The name is the caller's word: shown bounded.
            let cluster: String = cluster.chars().take(64).collect();
            tracing::warn!(peer = ?request.remote_addr(), cluster, reason, "refused a federation call");
            status
        };
        let Ok(token) = crate::ca::bearer_token(request) else {
            return Err(refuse(
                "missing",
                Status::unauthenticated(
                    "missing \"authorization: Bearer <token>\": the link's token is required",
                ),
            ));
        };
        // One answer for an unknown cluster and a wrong token: callers do not learn
        // which cluster names are configured.
        let wrong = || Status::unauthenticated("not a federated cluster, or not its token");
        let Some(peer) = self.config.peer(cluster) else { return Err(refuse("unknown_cluster", wrong())) };
        let expected = match read_token(&peer.token_file) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(peer = %peer.name, file = %peer.token_file.display(), error = %e,
                    "cannot read the federation token file");
                return Err(refuse("token_file", Status::unavailable("the link's token cannot be read now")));
            }
        };
        if !crate::ca::constant_time_eq(expected.as_bytes(), token.as_bytes()) {
            return Err(refuse("wrong_token", wrong()));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Federation for ExportsService {
    async fn exports(
        &self,
        request: Request<api::ExportsRequest>,
    ) -> Result<Response<api::ExportsResponse>, Status> {
        self.check(&request, &request.get_ref().cluster)?;
        let current = self.snapshots.borrow().clone();
        Ok(Response::new(api::ExportsResponse {
            cluster: self.config.cluster.clone(),
            trust_domain: self.config.trust_domain.clone(),
            roots_pem: self.roots_pem.to_vec(),
            gateways: self.config.gateways.clone(),
            services: exported(&current.snapshot),
        }))
    }
}

/// The services of `snapshot` a peer receives: exported, this cluster's own, cut
/// down as the module says; at most [`super::MAX_SERVICES`] services and
/// [`super::MAX_ENDPOINTS`] endpoints (what an importer accepts).
pub fn exported(snapshot: &api::Snapshot) -> Vec<api::Service> {
    let mut endpoints_left = super::MAX_ENDPOINTS;
    snapshot
        .services
        .iter()
        .filter(|s| s.exported && s.cluster.is_empty())
        .take(super::MAX_SERVICES)
        .map(|s| {
            let endpoints: Vec<api::Endpoint> = s
                .endpoints
                .iter()
                .filter(|e| !e.identity.is_empty() && !e.agent_address.is_empty())
                .take(endpoints_left)
                .map(|e| api::Endpoint {
                    address: e.address.clone(),
                    port: e.port,
                    named_ports: e.named_ports.clone(),
                    weight: e.weight,
                    health: e.health,
                    health_reason: e.health_reason.clone(),
                    locality: e.locality.clone(),
                    identity: e.identity.clone(),
                    agent_address: e.agent_address.clone(),
                    ..Default::default()
                })
                .collect();
            endpoints_left -= endpoints.len();
            api::Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                ports: s.ports.clone(),
                endpoints,
                exported: true,
                ..Default::default()
            }
        })
        .collect()
}

/// A link's token from its file, trimmed; an empty file is an error (an empty
/// token would let anyone in).
pub fn read_token(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TOKEN_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_TOKEN_BYTES {
        return Err(format!("longer than {MAX_TOKEN_BYTES} bytes"));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err("empty".into());
    }
    Ok(token.to_owned())
}
