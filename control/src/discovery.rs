//! The discovery stream: one long-lived bidirectional gRPC stream per agent.
//!
//! The agent authenticates with its node's credential (the same bearer token as
//! for certificates), subscribes as that node, receives the current snapshot and
//! then every newer one, and answers each with an ACK or a NACK. Each response
//! carries the shared routing snapshot and the workloads placed on the agent's
//! own node, never another node's. The control plane records, per agent, what it
//! sent, what was applied and what was refused (and why), and serves that on its
//! admin endpoint; `Agents` answers a node about itself only. Agents' edge
//! reports on the same stream go to the dashboard's [`Board`].

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use mesh_api as api;
use mesh_api::discovery_server::Discovery;
use tokio::sync::{mpsc, watch};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

pub use crate::agent_book::AgentBook;
use crate::agent_book::now_secs;
use crate::{
    ca::{NodeAuthenticator, authenticate_request},
    dashboard::{Board, StreamGuard},
    snapshot::Versioned,
};

/// Longest agent version kept from a subscription: an agent's word, shown to
/// operators, so bounded.
const MAX_VERSION_LEN: usize = 64;

/// The tonic service.
#[derive(Clone)]
pub struct DiscoveryService {
    snapshots: watch::Receiver<Arc<Versioned>>,
    agents: AgentBook,
    /// Who is calling: every call must carry a node credential.
    authenticator: Arc<dyn NodeAuthenticator>,
    /// Where agents' edge reports go.
    board: Board,
}

impl DiscoveryService {
    pub fn new(
        snapshots: watch::Receiver<Arc<Versioned>>,
        agents: AgentBook,
        authenticator: Arc<dyn NodeAuthenticator>,
        board: Board,
    ) -> Self {
        Self { snapshots, agents, authenticator, board }
    }

    /// The calling node, or the refusal (counted and logged with the peer's address).
    async fn caller<T>(&self, request: &Request<T>, call: &str) -> Result<String, Status> {
        authenticate_request(self.authenticator.as_ref(), request).await.inspect_err(|status| {
            crate::metrics::discovery_refused();
            tracing::warn!(call, peer = ?request.remote_addr(), code = ?status.code(), reason = status.message(),
                "refused a discovery call");
        })
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<api::DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        request: Request<Streaming<api::DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request.remote_addr();
        // Before reading anything: an unauthenticated caller learns nothing.
        let node = self.caller(&request, "Stream").await?;
        let mut inbound = request.into_inner();
        let first = match inbound.message().await? {
            Some(api::DiscoveryRequest { kind: Some(api::discovery_request::Kind::Subscribe(s)) }) => s,
            Some(_) => return Err(Status::invalid_argument("the first message must be a Subscribe")),
            None => return Err(Status::cancelled("stream closed before Subscribe")),
        };
        if first.node != node {
            crate::metrics::discovery_refused();
            tracing::warn!(credential = %node, subscribe = %first.node, peer = ?peer,
                "refused a subscription for another node than the credential's");
            return Err(Status::permission_denied(format!(
                "the credential belongs to node {node:?}, the Subscribe names {:?}",
                first.node
            )));
        }
        tracing::info!(node = %node, peer = ?peer, have_version = first.have_version, mode = %first.mode, "agent subscribed");
        // An east-west gateway may run on a node that also has an agent, under the
        // same node credential (a pod-bound token names the node): it has its own
        // entry, so neither stream supersedes the other.
        let entry = book_entry(&node, &first.mode);
        // Bounded per node and in all (see `agent_book`); dropping the slot records
        // the disconnect however the stream ends.
        let slot = self
            .agents
            .open_stream(&entry, |a| {
                a.connected_at = now_secs();
                a.agent_address = advertised_address(&first.agent_address, peer);
                a.mode = first.mode.clone();
                a.agent_version = first.agent_version.chars().take(MAX_VERSION_LEN).collect();
                a.workloads = first.workloads.clone();
            })
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;

        // Responses go through a small bounded queue: a slow agent holds at most one
        // pending snapshot here, and a newer one replaces what it has not read yet
        // (the watch channel only ever yields the latest).
        let (tx, rx) = mpsc::channel::<Result<api::DiscoveryResponse, Status>>(1);
        let mut snapshots = self.snapshots.clone();
        let agents = self.agents.clone();
        let board = self.board.clone();
        tokio::spawn(async move {
            // However the stream ends, its reports go after the grace period.
            let _reports = StreamGuard { board: board.clone(), node: entry.clone() };
            let node = node.as_str();
            let mut sent = 0u64;
            snapshots.mark_changed();
            loop {
                tokio::select! {
                    () = slot.closed() => {
                        tracing::info!(node = %node, "stream closed: the node opened a newer one");
                        let _ = tx.try_send(Err(Status::aborted("superseded by a newer stream of this node")));
                        return;
                    }
                    changed = snapshots.changed() => {
                        if changed.is_err() { return }
                        let current = snapshots.borrow_and_update().clone();
                        // Never send a snapshot before every source finished its first
                        // load: a restarted control plane would otherwise wipe agents'
                        // routes with a partial view for a moment.
                        if !current.ready || current.version == 0 || current.version == sent {
                            continue;
                        }
                        sent = current.version;
                        agents.update(&entry, |a| a.sent_version = sent);
                        crate::metrics::snapshot_sent();
                        // The snapshot is a shared buffer (this clone is a reference count);
                        // only this node's workloads are added to it.
                        if tx.send(Ok(current.response_for(node))).await.is_err() { return }
                    }
                    msg = inbound.next() => match msg {
                        Some(Ok(api::DiscoveryRequest { kind: Some(api::discovery_request::Kind::Ack(a)) })) => {
                            tracing::debug!(node = %node, version = a.version, "ACK");
                            agents.update(&entry, |s| s.acked_version = a.version);
                            crate::metrics::snapshot_response(true);
                        }
                        Some(Ok(api::DiscoveryRequest { kind: Some(api::discovery_request::Kind::Nack(n)) })) => {
                            tracing::warn!(node = %node, version = n.version, reason = %n.reason, "agent refused a snapshot (NACK)");
                            crate::metrics::snapshot_response(false);
                            agents.update(&entry, |s| {
                                s.nacked_version = n.version;
                                s.nack_reason = n.reason.clone();
                            });
                        }
                        Some(Ok(api::DiscoveryRequest { kind: Some(api::discovery_request::Kind::EdgeReport(r)) })) => {
                            board.record(&entry, r, crate::dashboard::now_ms());
                        }
                        Some(Ok(_)) => tracing::debug!(node = %node, "ignoring unexpected message on a subscribed stream"),
                        Some(Err(e)) => {
                            tracing::debug!(node = %node, error = %e, "stream error");
                            return;
                        }
                        None => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn agents(
        &self,
        request: Request<api::AgentsRequest>,
    ) -> Result<Response<api::AgentsResponse>, Status> {
        let node = self.caller(&request, "Agents").await?;
        let current_version = self.snapshots.borrow().version;
        // A node learns about itself, not about the others (their addresses and
        // workloads): the whole book is the operator's, on the admin endpoint.
        let agents = self.agents.list().into_iter().filter(|a| a.node == node).collect();
        Ok(Response::new(api::AgentsResponse { agents, current_version }))
    }
}

/// The agent book's entry for a subscription: the node, or `NODE/gateway` for an
/// east-west gateway (`mesh-agent gateway` subscribes with mode `gateway`).
fn book_entry(node: &str, mode: &str) -> String {
    if mode == "gateway" { format!("{node}/gateway") } else { node.to_owned() }
}

/// The tunnel address an agent advertises: `:PORT` is completed with the address
/// its stream comes from; anything else is taken as given.
fn advertised_address(advertised: &str, peer: Option<std::net::SocketAddr>) -> String {
    match (advertised.strip_prefix(':').and_then(|p| p.parse::<u16>().ok()), peer) {
        (Some(port), Some(peer)) => std::net::SocketAddr::new(peer.ip().to_canonical(), port).to_string(),
        _ => advertised.to_owned(),
    }
}

#[cfg(test)]
mod advertised_tests {
    use super::advertised_address;

    #[test]
    fn a_gateway_has_its_own_entry_beside_its_nodes_agent() {
        assert_eq!(super::book_entry("node-1", "ebpf"), "node-1");
        assert_eq!(super::book_entry("node-1", "gateway"), "node-1/gateway");
    }

    #[test]
    fn a_bare_port_is_completed_with_the_streams_address() {
        let peer = Some("10.77.0.3:40000".parse().unwrap());
        assert_eq!(advertised_address(":15008", peer), "10.77.0.3:15008");
        let v6 = Some("[fd77::3]:40000".parse().unwrap());
        assert_eq!(advertised_address(":15008", v6), "[fd77::3]:15008");
        let mapped = Some("[::ffff:10.0.0.9]:1".parse().unwrap());
        assert_eq!(advertised_address(":15008", mapped), "10.0.0.9:15008");
        assert_eq!(advertised_address("192.0.2.1:15008", peer), "192.0.2.1:15008", "explicit addresses kept");
        assert_eq!(advertised_address("", peer), "", "no tunnel, nothing advertised");
        assert_eq!(advertised_address(":15008", None), ":15008");
    }
}
