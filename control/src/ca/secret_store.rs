//! The CA's key material in a Kubernetes Secret, for a control plane running in
//! a cluster (possibly several replicas, none with a persistent disk).
//!
//! The Secret holds the same entries as [`FileStore`](super::FileStore)'s
//! directory: `ca.pem` and `ca-key.pem`, and after a root rotation
//! `ca-previous.pem` and `ca-cross.pem`. On first start nothing is stored and
//! the CA creates the Secret with a *create*, never a replace: when two replicas
//! start together only one create succeeds, and the other, told 409, re-reads the
//! Secret and uses the winner's root, so the mesh never has two roots.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use super::store::{
    CERT_FILE, CROSS_SIGNED_FILE, CaKeyMaterial, CaStore, KEY_FILE, PREVIOUS_ROOTS_FILE, StoreError,
    StoreFuture,
};

/// How often [`SecretStore::create`] re-reads after losing a race before giving up.
const CREATE_ATTEMPTS: usize = 3;

/// Stores the material in the Secret `namespace/name` (data keys `ca.pem`, `ca-key.pem`).
///
/// Needs `get` and `update` on that Secret and `create` on Secrets in its namespace
/// (Kubernetes cannot restrict `create` to one name). An existing Secret without
/// `ca.pem` (for example one declared empty in a manifest) counts as nothing stored
/// and is filled with an update conditional on its resource version.
#[derive(Clone)]
pub struct SecretStore {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretStore").field("secret", &self.secret()).finish_non_exhaustive()
    }
}

/// What a read of the Secret found.
enum Found {
    Absent,
    /// The Secret exists but holds no certificate yet (its resource version, to fill it).
    Empty(Box<Secret>),
    Material(CaKeyMaterial),
}

impl SecretStore {
    /// A store in the Secret `name` of `namespace`, through `client`.
    pub fn new(client: Client, namespace: &str, name: &str) -> SecretStore {
        SecretStore {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Parses `NAMESPACE/NAME` (the `--ca-secret` value) into its parts.
    pub fn parse_ref(value: &str) -> Result<(String, String), String> {
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        match value.split_once('/') {
            Some((ns, name)) if valid(ns) && valid(name) => Ok((ns.to_owned(), name.to_owned())),
            _ => Err(format!("{value:?} is not NAMESPACE/NAME (lowercase Kubernetes names)")),
        }
    }

    /// `namespace/name`, as errors and logs name the Secret.
    pub fn secret(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn api_error(&self, action: &'static str, err: kube::Error) -> StoreError {
        let reason = match &err {
            kube::Error::Api(status) if status.is_forbidden() => {
                let scope = if action == "create" {
                    format!("secrets in namespace {}", self.namespace)
                } else {
                    format!("the secret {:?} in namespace {}", self.name, self.namespace)
                };
                format!(
                    "forbidden: the control plane's service account needs RBAC verb {action:?} on {scope} ({})",
                    status.message
                )
            }
            kube::Error::Api(status) => format!("{} {}: {}", status.code, status.reason, status.message),
            other => other.to_string(),
        };
        StoreError::Kubernetes { secret: self.secret(), action, reason }
    }

    fn data_text(
        &self,
        data: &BTreeMap<String, ByteString>,
        key: &'static str,
    ) -> Result<Option<String>, StoreError> {
        let Some(bytes) = data.get(key) else { return Ok(None) };
        let text = String::from_utf8(bytes.0.clone()).map_err(|_| StoreError::SecretData {
            secret: self.secret(),
            key,
            reason: "not UTF-8 text (expected PEM)".into(),
        })?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(text))
    }

    async fn read(&self) -> Result<Found, StoreError> {
        let Some(secret) = self.api.get_opt(&self.name).await.map_err(|e| self.api_error("get", e))? else {
            return Ok(Found::Absent);
        };
        let empty = BTreeMap::new();
        let data = secret.data.as_ref().unwrap_or(&empty);
        match (self.data_text(data, CERT_FILE)?, self.data_text(data, KEY_FILE)?) {
            (Some(cert_pem), Some(key_pem)) => Ok(Found::Material(CaKeyMaterial {
                cert_pem,
                key_pem,
                previous_roots_pem: self.data_text(data, PREVIOUS_ROOTS_FILE)?.unwrap_or_default(),
                cross_signed_pem: self.data_text(data, CROSS_SIGNED_FILE)?.unwrap_or_default(),
            })),
            (Some(_), None) => Err(StoreError::SecretKeyMissing {
                secret: self.secret(),
                cert_key: CERT_FILE,
                key_key: KEY_FILE,
            }),
            // No certificate was ever published: whatever key is there is unused.
            (None, _) => Ok(Found::Empty(Box::new(secret))),
        }
    }

    fn with_material(mut secret: Secret, material: &CaKeyMaterial) -> Secret {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        data.insert(CERT_FILE.to_owned(), ByteString(material.cert_pem.clone().into_bytes()));
        data.insert(KEY_FILE.to_owned(), ByteString(material.key_pem.clone().into_bytes()));
        for (key, pem) in [
            (PREVIOUS_ROOTS_FILE, &material.previous_roots_pem),
            (CROSS_SIGNED_FILE, &material.cross_signed_pem),
        ] {
            if pem.trim().is_empty() {
                data.remove(key);
            } else {
                data.insert(key.to_owned(), ByteString(pem.clone().into_bytes()));
            }
        }
        secret.string_data = None;
        secret
    }

    fn new_secret(&self, material: &CaKeyMaterial) -> Secret {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/name".to_owned(),
                    "mesh-control".to_owned(),
                )])),
                ..Default::default()
            },
            type_: Some("Opaque".to_owned()),
            ..Default::default()
        };
        Self::with_material(secret, material)
    }

    /// Creates the Secret (`Ok(false)`: it exists already, created by someone else).
    async fn try_create(&self, material: &CaKeyMaterial) -> Result<bool, StoreError> {
        match self.api.create(&PostParams::default(), &self.new_secret(material)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(self.api_error("create", e)),
        }
    }

    /// Replaces `existing` if it was not changed since it was read (`Ok(false)`: it was).
    async fn try_update(&self, existing: Secret, material: &CaKeyMaterial) -> Result<bool, StoreError> {
        // The resource version read with `existing` makes this conditional.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &Self::with_material(existing, material))
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(e) => Err(self.api_error("update", e)),
        }
    }

    async fn create_material(&self, material: CaKeyMaterial) -> Result<CaKeyMaterial, StoreError> {
        for _ in 0..CREATE_ATTEMPTS {
            let written = match self.read().await? {
                Found::Material(stored) => return Ok(stored),
                Found::Absent => self.try_create(&material).await?,
                Found::Empty(existing) => self.try_update(*existing, &material).await?,
            };
            if written {
                return Ok(material);
            }
            tracing::info!(secret = %self.secret(), "another instance wrote the CA Secret first; re-reading it");
        }
        Err(StoreError::Kubernetes {
            secret: self.secret(),
            action: "create",
            reason: format!(
                "still conflicting after {CREATE_ATTEMPTS} attempts (is something else writing it?)"
            ),
        })
    }

    async fn save_material(&self, material: CaKeyMaterial) -> Result<(), StoreError> {
        let existing = self.api.get_opt(&self.name).await.map_err(|e| self.api_error("get", e))?;
        let written = match existing {
            None => self.try_create(&material).await?,
            Some(existing) => self.try_update(existing, &material).await?,
        };
        if written {
            Ok(())
        } else {
            Err(StoreError::Kubernetes {
                secret: self.secret(),
                action: "update",
                reason: "changed by someone else while being replaced; restart to re-read it".into(),
            })
        }
    }
}

impl CaStore for SecretStore {
    fn describe(&self) -> String {
        format!("Kubernetes Secret {}", self.secret())
    }

    fn load(&self) -> StoreFuture<'_, Option<CaKeyMaterial>> {
        Box::pin(async move {
            Ok(match self.read().await? {
                Found::Material(material) => Some(material),
                Found::Absent | Found::Empty(_) => None,
            })
        })
    }

    fn save(&self, material: CaKeyMaterial) -> StoreFuture<'_, ()> {
        Box::pin(self.save_material(material))
    }

    fn create(&self, material: CaKeyMaterial) -> StoreFuture<'_, CaKeyMaterial> {
        Box::pin(self.create_material(material))
    }
}
