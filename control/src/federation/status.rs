//! What each peer link is doing, for the admin endpoint's `/federation` and
//! `meshctl status`: the import sources write it, the admin endpoint reads it.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::config::FederationConfig;

/// A link's state in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// No answer yet, right or wrong.
    Pending,
    /// The last call succeeded.
    Ok,
    /// The last call failed (the last good import is kept).
    Error,
}

/// One peer as `/federation` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerStatus {
    pub name: String,
    pub trust_domain: String,
    pub url: String,
    pub state: LinkState,
    pub last_success_unix: Option<u64>,
    pub last_error: Option<String>,
    pub imported_services: usize,
    /// The peer's roots agents currently trust.
    pub roots: usize,
    pub gateways: Vec<String>,
}

/// `/federation` as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FederationStatus {
    pub cluster: String,
    pub trust_domain: String,
    pub gateways: Vec<String>,
    pub peers: Vec<PeerStatus>,
}

/// The shared board: one entry per configured peer, in the file's order.
#[derive(Debug)]
pub struct Board {
    status: Mutex<FederationStatus>,
}

impl Board {
    /// Every peer pending.
    pub fn new(config: &FederationConfig) -> Arc<Board> {
        let peers = config
            .peers
            .iter()
            .map(|p| PeerStatus {
                name: p.name.clone(),
                trust_domain: p.trust_domain.clone(),
                url: p.url.clone(),
                state: LinkState::Pending,
                last_success_unix: None,
                last_error: None,
                imported_services: 0,
                roots: 0,
                gateways: Vec::new(),
            })
            .collect();
        Arc::new(Board {
            status: Mutex::new(FederationStatus {
                cluster: config.cluster.clone(),
                trust_domain: config.trust_domain.clone(),
                gateways: config.gateways.clone(),
                peers,
            }),
        })
    }

    /// Changes peer `name`'s entry.
    pub fn update(&self, name: &str, f: impl FnOnce(&mut PeerStatus)) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(peer) = status.peers.iter_mut().find(|p| p.name == name) {
            f(peer);
        }
    }

    /// A copy of the whole board.
    pub fn snapshot(&self) -> FederationStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
