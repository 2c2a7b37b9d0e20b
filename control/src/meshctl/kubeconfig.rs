//! The cluster meshctl talks to for `check --pre` and `install --apply`: the
//! kubeconfig (`KUBECONFIG`, else `~/.kube/config`) or, inside a pod, the
//! in-cluster service-account credentials, as kubectl finds them.
//!
//! One place builds the client so both commands agree on which cluster they mean,
//! and so errors can name the API server's URL (a `kube::Client` does not keep it).

use kube::{Client, Config};

use super::error::MeshctlError;

/// A client for one cluster, with the API server's URL for messages.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    pub server: String,
}

impl Cluster {
    /// The cluster of the kubeconfig or the in-cluster credentials; `command` is
    /// named in the error when there is neither.
    pub async fn infer(command: &str) -> Result<Cluster, MeshctlError> {
        let config = Config::infer().await.map_err(|e| {
            MeshctlError::Usage(format!(
                "{command} needs a cluster: no usable kubeconfig ({e}); point KUBECONFIG at one \
                 (or create ~/.kube/config), or run meshctl in a pod with a service account"
            ))
        })?;
        Cluster::from_config(config, command)
    }

    /// A client for `config` (tests pass one pointing at the fake API server).
    pub fn from_config(config: Config, command: &str) -> Result<Cluster, MeshctlError> {
        let server = config.cluster_url.to_string().trim_end_matches('/').to_owned();
        let client = Client::try_from(config).map_err(|e| {
            MeshctlError::Usage(format!(
                "{command}: cannot build a client for the API server at {server}: {e}"
            ))
        })?;
        Ok(Cluster { client, server })
    }
}
