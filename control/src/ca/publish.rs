//! The CA's public half in a Kubernetes ConfigMap: the trust anchor agents mount.
//!
//! Agents verify the control plane against a root they were given out of band, not
//! one the control plane hands them over the channel it is meant to protect. In a
//! cluster that root travels through the Kubernetes API: the control plane writes
//! its roots (the current one and any previous one a rotation left trusted) to a
//! ConfigMap, and the agent DaemonSet mounts it as the file `--control-plane-ca`
//! reads. Only public certificates are written; the key stays in its Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

/// The ConfigMap's data key holding the PEM roots (the agents' `--control-plane-ca` file).
pub const BUNDLE_KEY: &str = "ca.pem";

/// How often a write is retried after losing a race with another replica.
const ATTEMPTS: usize = 3;

/// Why the roots could not be published.
#[derive(Debug, thiserror::Error)]
#[error("ConfigMap {configmap}: {action}: {reason}")]
pub struct PublishError {
    /// `namespace/name` of the ConfigMap.
    pub configmap: String,
    /// What was being done ("get", "create", "update").
    pub action: &'static str,
    /// Why it failed, with the missing permission when the API server said 403.
    pub reason: String,
}

/// Writes the roots to the ConfigMap `namespace/name`. Needs `get` and `update` on it
/// and `create` on ConfigMaps in its namespace.
#[derive(Clone)]
pub struct ConfigMapPublisher {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
}

impl std::fmt::Debug for ConfigMapPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigMapPublisher").field("configmap", &self.configmap()).finish_non_exhaustive()
    }
}

impl ConfigMapPublisher {
    /// A publisher to `namespace/name` through `client`.
    pub fn new(client: Client, namespace: &str, name: &str) -> ConfigMapPublisher {
        ConfigMapPublisher {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// `namespace/name`.
    pub fn configmap(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn error(&self, action: &'static str, err: kube::Error) -> PublishError {
        let reason = match &err {
            kube::Error::Api(status) if status.is_forbidden() => format!(
                "forbidden: the control plane's service account needs RBAC verb {action:?} on configmaps \
                 in namespace {} ({})",
                self.namespace, status.message
            ),
            kube::Error::Api(status) => format!("{} {}: {}", status.code, status.reason, status.message),
            other => other.to_string(),
        };
        PublishError { configmap: self.configmap(), action, reason }
    }

    /// Makes the ConfigMap hold exactly `roots_pem` under [`BUNDLE_KEY`]: created when
    /// absent, updated (conditionally on the version read) when different, left alone
    /// when equal. Returns whether it wrote.
    pub async fn publish(&self, roots_pem: &str) -> Result<bool, PublishError> {
        for _ in 0..ATTEMPTS {
            let existing = self.api.get_opt(&self.name).await.map_err(|e| self.error("get", e))?;
            let result = match existing {
                Some(cm)
                    if cm.data.as_ref().and_then(|d| d.get(BUNDLE_KEY)).map(String::as_str)
                        == Some(roots_pem) =>
                {
                    return Ok(false);
                }
                Some(mut cm) => {
                    cm.data
                        .get_or_insert_with(BTreeMap::new)
                        .insert(BUNDLE_KEY.to_owned(), roots_pem.to_owned());
                    self.api.replace(&self.name, &PostParams::default(), &cm).await.map_err(|e| ("update", e))
                }
                None => self
                    .api
                    .create(&PostParams::default(), &self.new_configmap(roots_pem))
                    .await
                    .map_err(|e| ("create", e)),
            };
            match result {
                Ok(_) => return Ok(true),
                Err((_, kube::Error::Api(status))) if status.code == 409 => {
                    tracing::info!(configmap = %self.configmap(), "written by someone else meanwhile; re-reading it");
                }
                Err((action, e)) => return Err(self.error(action, e)),
            }
        }
        Err(PublishError {
            configmap: self.configmap(),
            action: "update",
            reason: format!("still conflicting after {ATTEMPTS} attempts (is something else writing it?)"),
        })
    }

    fn new_configmap(&self, roots_pem: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/name".to_owned(),
                    "mesh-control".to_owned(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(BUNDLE_KEY.to_owned(), roots_pem.to_owned())])),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::kubernetes::fake_api::FakeApi;

    #[tokio::test]
    async fn the_roots_are_created_then_updated_only_when_they_change() {
        let api = FakeApi::start().await;
        let publisher = ConfigMapPublisher::new(api.client(), "mesh-system", "mesh-ca-root");
        assert!(publisher.publish("ROOT A").await.unwrap(), "created");
        let cm = api.configmap("mesh-system", "mesh-ca-root").unwrap();
        assert_eq!(cm["data"][BUNDLE_KEY], "ROOT A");
        assert_eq!(cm["metadata"]["labels"]["app.kubernetes.io/name"], "mesh-control");

        assert!(!publisher.publish("ROOT A").await.unwrap(), "equal: no write");
        assert!(publisher.publish("ROOT B\nROOT A").await.unwrap(), "rotated: updated");
        assert_eq!(
            api.configmap("mesh-system", "mesh-ca-root").unwrap()["data"][BUNDLE_KEY],
            "ROOT B\nROOT A"
        );
    }
}
