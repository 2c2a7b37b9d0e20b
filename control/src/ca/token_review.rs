//! Agents authenticated by their Kubernetes service-account token.
//!
//! Each agent pod mounts a projected token for the control plane's audience and
//! presents it as its bearer token. The control plane asks the API server about
//! it with a TokenReview and accepts it only when it is valid for that audience,
//! belongs to the agents' service account, and is bound to a pod on a node: the
//! node's name (`extra["authentication.kubernetes.io/node-name"]`, Kubernetes
//! 1.30+) is the node the agent may request certificates for.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};

use super::auth::{AuthError, AuthFuture, NodeAuthenticator};

/// The extra field of a pod-bound token naming the pod's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// How long an accepted token is trusted without asking again.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);

/// At most this many accepted tokens are remembered (one per agent in practice).
pub const DEFAULT_CACHE_CAPACITY: usize = 4096;

/// How long a refused token is answered without asking again: a caller retrying a
/// bad token (or many) in a loop costs the API server one review per token per
/// this period, not one per attempt.
pub const DEFAULT_NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(10);

/// Settings of a [`TokenReviewAuthenticator`].
#[derive(Debug, Clone)]
pub struct TokenReviewConfig {
    /// The audience the token must be valid for (the projected token's `audience`).
    pub audience: String,
    /// The agents' service account namespace.
    pub namespace: String,
    /// The agents' service account name.
    pub service_account: String,
    /// How long an accepted token is remembered. A deleted agent pod's token keeps
    /// working for at most this long.
    pub cache_ttl: Duration,
    /// How many accepted tokens are remembered at most (refused ones too, apart).
    pub cache_capacity: usize,
    /// How long a refused token is remembered. A token that becomes valid (a pod
    /// just bound) is accepted after at most this long.
    pub negative_cache_ttl: Duration,
}

impl TokenReviewConfig {
    /// Settings for agents running as `namespace/service_account` with tokens for `audience`.
    pub fn new(audience: &str, namespace: &str, service_account: &str) -> TokenReviewConfig {
        TokenReviewConfig {
            audience: audience.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            cache_ttl: DEFAULT_CACHE_TTL,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            negative_cache_ttl: DEFAULT_NEGATIVE_CACHE_TTL,
        }
    }

    /// Parses `NAMESPACE/NAME` (the `--agent-service-account` value).
    pub fn parse_service_account(value: &str) -> Result<(String, String), String> {
        match value.split_once('/') {
            Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') && !ns.contains(':') => {
                Ok((ns.to_owned(), sa.to_owned()))
            }
            _ => Err(format!("{value:?} is not NAMESPACE/SERVICE_ACCOUNT")),
        }
    }

    /// The username the API server reports for the agents' service account.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.service_account)
    }
}

/// Authenticates agents with a TokenReview per (uncached) token.
///
/// Needs `create` on `tokenreviews.authentication.k8s.io`. Accepted tokens are cached
/// by their SHA-256 for [`TokenReviewConfig::cache_ttl`], so certificate renewals do not
/// each cost an API call; refused ones for [`TokenReviewConfig::negative_cache_ttl`], so
/// a caller hammering with bad tokens cannot turn each attempt into an API call. An
/// API server that could not be asked is never cached.
pub struct TokenReviewAuthenticator {
    api: Api<TokenReview>,
    config: TokenReviewConfig,
    username: String,
    accepted: TtlCache<String>,
    /// The refusal's reason; `None` for a plain invalid token.
    refused: TtlCache<Option<String>>,
}

/// Answers by token digest, each for a time, at most `capacity` of them.
struct TtlCache<V> {
    entries: Mutex<HashMap<[u8; 32], (V, Instant)>>,
    ttl: Duration,
    capacity: usize,
}

impl<V: Clone> TtlCache<V> {
    fn new(ttl: Duration, capacity: usize) -> Self {
        TtlCache { entries: Mutex::new(HashMap::new()), ttl, capacity }
    }

    fn get(&self, key: &[u8; 32]) -> Option<V> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match entries.get(key) {
            Some((value, expires)) if *expires > Instant::now() => Some(value.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&self, key: [u8; 32], value: V) {
        if self.capacity == 0 || self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity {
            entries.retain(|_, (_, expires)| *expires > now);
        }
        if entries.len() >= self.capacity {
            // Still full of live entries: forget the one closest to expiry.
            if let Some(oldest) = entries.iter().min_by_key(|(_, (_, expires))| *expires).map(|(k, _)| *k) {
                entries.remove(&oldest);
            }
        }
        entries.insert(key, (value, now + self.ttl));
    }
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator").field("config", &self.config).finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// An authenticator asking the API server behind `client`.
    pub fn new(client: Client, config: TokenReviewConfig) -> TokenReviewAuthenticator {
        TokenReviewAuthenticator {
            api: Api::all(client),
            username: config.username(),
            accepted: TtlCache::new(config.cache_ttl, config.cache_capacity),
            refused: TtlCache::new(config.negative_cache_ttl, config.cache_capacity),
            config,
        }
    }

    async fn review(&self, token: &str) -> Result<String, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.config.audience.clone()]),
            },
            ..Default::default()
        };
        let answer = self.api.create(&PostParams::default(), &review).await.map_err(|e| {
            let reason = match &e {
                kube::Error::Api(status) if status.is_forbidden() => format!(
                    "TokenReview forbidden: the control plane's service account needs RBAC verb \"create\" on \
                     tokenreviews.authentication.k8s.io ({})",
                    status.message
                ),
                other => format!("TokenReview failed: {other}"),
            };
            AuthError::Unavailable(reason)
        })?;
        self.node_of(answer.status.unwrap_or_default())
    }

    /// The node an answered review grants, or why it does not.
    fn node_of(&self, status: TokenReviewStatus) -> Result<String, AuthError> {
        if status.authenticated != Some(true) {
            let detail = status.error.filter(|e| !e.is_empty());
            return Err(match detail {
                Some(error) => AuthError::Refused(format!("the token is not valid: {error}")),
                None => AuthError::InvalidToken,
            });
        }
        // An audience-aware API server returns the audiences the token is valid for.
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.config.audience) {
            return Err(AuthError::Refused(format!(
                "the token is not valid for audience {:?} (valid for {audiences:?})",
                self.config.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            return Err(AuthError::Refused(format!(
                "the token belongs to {username:?}, not to the agents' service account {:?}",
                self.username
            )));
        }
        let node = user
            .extra
            .unwrap_or_default()
            .remove(NODE_NAME_EXTRA)
            .and_then(|names| names.into_iter().next())
            .filter(|n| !n.is_empty());
        node.ok_or_else(|| {
            AuthError::Refused(format!(
                "the token of {username:?} names no node (extra[{NODE_NAME_EXTRA:?}]): present a projected \
                 service-account token bound to the agent's pod (Kubernetes 1.30 or later)"
            ))
        })
    }
}

impl NodeAuthenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            if token.is_empty() {
                return Err(AuthError::InvalidToken);
            }
            let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
            let mut key = [0u8; 32];
            key.copy_from_slice(digest.as_ref());
            if let Some(node) = self.accepted.get(&key) {
                return Ok(node);
            }
            if let Some(refusal) = self.refused.get(&key) {
                return Err(refusal.map_or(AuthError::InvalidToken, AuthError::Refused));
            }
            match self.review(token).await {
                Ok(node) => {
                    self.accepted.insert(key, node.clone());
                    Ok(node)
                }
                Err(AuthError::InvalidToken) => {
                    self.refused.insert(key, None);
                    Err(AuthError::InvalidToken)
                }
                Err(AuthError::Refused(reason)) => {
                    self.refused.insert(key, Some(reason.clone()));
                    Err(AuthError::Refused(reason))
                }
                // Unavailable (ask again next time) and the rest are not the token's doing.
                Err(other) => Err(other),
            }
        })
    }
}
