//! Who may ask the CA for what: node authentication and identity authorization.
//!
//! Agents present a node credential (`authorization: Bearer <token>`); an
//! authenticator turns it into a node name, and an authorizer decides whether
//! that node may hold a given workload identity (in the real mesh: whether it
//! hosts a pod running as that service account). Tokens come from a bootstrap
//! file ([`TokenFileAuthenticator`]) or are Kubernetes service-account tokens
//! checked by TokenReview ([`TokenReviewAuthenticator`](super::TokenReviewAuthenticator));
//! [`FirstOf`] accepts either.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use tonic::{Request, Status};

/// The future a [`NodeAuthenticator`] returns: the authenticated node's name.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<String, AuthError>> + Send + 'a>>;

/// Turns a bearer token into the name of the node it was issued to. Async because a
/// Kubernetes TokenReview is a network call.
pub trait NodeAuthenticator: Send + Sync + 'static {
    /// The node `token` belongs to, or [`AuthError::InvalidToken`].
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a>;
}

/// Decides whether a node may request a workload identity.
pub trait IdentityAuthorizer: Send + Sync + 'static {
    /// Whether `node` may obtain a certificate for `service_account` in `namespace`.
    fn may_request(&self, node: &str, namespace: &str, service_account: &str) -> bool;
}

/// Why a caller could not be authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token is unknown (or empty).
    #[error("invalid node token")]
    InvalidToken,
    /// The token was recognised as a credential but may not be used here (wrong service
    /// account, no node name, ...): the reason is told to the caller.
    #[error("{0}")]
    Refused(String),
    /// The verifier could not be asked (the Kubernetes API failed): the caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// The credential source itself is broken: the caller is not at fault.
    #[error("token file {path}: {reason}")]
    TokenFile {
        /// The token file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// Bootstrap tokens for local mode: a file of `<token> <node-name>` lines (`#` starts a
/// comment line). The file is read on every call, so adding or revoking a node takes
/// effect at once without a restart; it is small and calls are rare (one per certificate).
#[derive(Debug, Clone)]
pub struct TokenFileAuthenticator {
    path: PathBuf,
}

impl TokenFileAuthenticator {
    /// An authenticator reading `path` on every call.
    pub fn new(path: impl Into<PathBuf>) -> TokenFileAuthenticator {
        TokenFileAuthenticator { path: path.into() }
    }

    /// The node of `token` in `contents`. Every line is compared in constant time, so the
    /// time taken does not reveal how much of a token matched.
    fn lookup(&self, contents: &str, token: &str) -> Result<String, AuthError> {
        let mut node = None;
        for (n, line) in contents.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(known), Some(name), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(AuthError::TokenFile {
                    path: self.path.clone(),
                    reason: format!("line {} is not \"<token> <node-name>\"", n + 1),
                });
            };
            if constant_time_eq(known.as_bytes(), token.as_bytes()) && node.is_none() {
                node = Some(name.to_owned());
            }
        }
        node.ok_or(AuthError::InvalidToken)
    }
}

impl NodeAuthenticator for TokenFileAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            if token.is_empty() {
                return Err(AuthError::InvalidToken);
            }
            let contents = tokio::fs::read_to_string(&self.path)
                .await
                .map_err(|e| AuthError::TokenFile { path: self.path.clone(), reason: e.to_string() })?;
            self.lookup(&contents, token)
        })
    }
}

/// Tries several authenticators in order and accepts the first that knows the token
/// (bootstrap tokens and TokenReview side by side). When all fail, the most telling
/// error wins: a refusal with a reason, then an unavailable verifier, then "invalid".
pub struct FirstOf {
    authenticators: Vec<std::sync::Arc<dyn NodeAuthenticator>>,
}

impl FirstOf {
    /// An authenticator trying `authenticators` in order.
    pub fn new(authenticators: Vec<std::sync::Arc<dyn NodeAuthenticator>>) -> FirstOf {
        FirstOf { authenticators }
    }
}

impl NodeAuthenticator for FirstOf {
    fn authenticate<'a>(&'a self, token: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let rank = |e: &AuthError| match e {
                AuthError::Refused(_) => 3,
                AuthError::Unavailable(_) | AuthError::TokenFile { .. } => 2,
                AuthError::InvalidToken => 1,
            };
            let mut worst = AuthError::InvalidToken;
            for authenticator in &self.authenticators {
                match authenticator.authenticate(token).await {
                    Ok(node) => return Ok(node),
                    Err(e) if rank(&e) > rank(&worst) => worst = e,
                    Err(_) => {}
                }
            }
            Err(worst)
        })
    }
}

/// The node behind `request`'s `authorization: Bearer <token>`, as every authenticated
/// call of the control plane (certificates, discovery) needs it; the error is the status
/// the caller gets: `Unauthenticated` for a missing or refused credential, `Unavailable`
/// when the verifier cannot be asked.
pub async fn authenticate_request<T>(
    authenticator: &dyn NodeAuthenticator,
    request: &Request<T>,
) -> Result<String, Status> {
    let token = bearer_token(request)?;
    authenticator.authenticate(token).await.map_err(|e| match e {
        AuthError::InvalidToken => Status::unauthenticated("invalid node token"),
        AuthError::Refused(reason) => Status::unauthenticated(reason),
        AuthError::Unavailable(reason) => {
            tracing::error!(%reason, "cannot verify node credentials");
            Status::unavailable("cannot verify the node token now; retry later")
        }
        AuthError::TokenFile { .. } => {
            tracing::error!(error = %e, "node credentials unavailable");
            Status::unavailable("node credentials unavailable")
        }
    })
}

/// The token of `authorization: Bearer <token>` (scheme case-insensitive).
pub(crate) fn bearer_token<T>(request: &Request<T>) -> Result<&str, Status> {
    let missing = || {
        Status::unauthenticated(
            "missing \"authorization: Bearer <token>\" metadata: the node's credential is required",
        )
    };
    let value = request.metadata().get("authorization").ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| missing())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(missing());
    }
    Ok(token.trim())
}

/// Whether two secrets are equal, in time that depends on their length only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fixed list of (node, namespace, service account) grants, for tests and local setups.
#[derive(Debug, Clone, Default)]
pub struct StaticAuthorizer {
    grants: HashSet<(String, String, String)>,
}

impl StaticAuthorizer {
    /// An authorizer that allows nothing.
    pub fn new() -> StaticAuthorizer {
        StaticAuthorizer::default()
    }

    /// Also lets `node` request `service_account` in `namespace`.
    pub fn allow(mut self, node: &str, namespace: &str, service_account: &str) -> StaticAuthorizer {
        self.grants.insert((node.to_owned(), namespace.to_owned(), service_account.to_owned()));
        self
    }
}

impl IdentityAuthorizer for StaticAuthorizer {
    fn may_request(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.grants.contains(&(node.to_owned(), namespace.to_owned(), service_account.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn token_file_maps_tokens_to_nodes_and_follows_edits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# bootstrap tokens\n\ns3cret-a node-a\ns3cret-b  node-b\n").unwrap();
        let auth = TokenFileAuthenticator::new(&path);
        assert_eq!(auth.authenticate("s3cret-a").await.unwrap(), "node-a");
        assert_eq!(auth.authenticate("s3cret-b").await.unwrap(), "node-b");
        for bad in ["", "s3cret", "s3cret-a ", "node-a", "# bootstrap"] {
            assert!(matches!(auth.authenticate(bad).await, Err(AuthError::InvalidToken)), "{bad:?}");
        }

        // Revoking node-a and adding node-c needs no restart.
        std::fs::write(&path, "s3cret-b node-b\ns3cret-c node-c\n").unwrap();
        assert!(matches!(auth.authenticate("s3cret-a").await, Err(AuthError::InvalidToken)));
        assert_eq!(auth.authenticate("s3cret-c").await.unwrap(), "node-c");
    }

    #[tokio::test]
    async fn a_broken_token_file_is_reported_not_treated_as_a_bad_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let auth = TokenFileAuthenticator::new(&path);
        assert!(matches!(auth.authenticate("t").await, Err(AuthError::TokenFile { .. })));
        std::fs::write(&path, "t node-a\nlonely-token\n").unwrap();
        let err = auth.authenticate("t").await.unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn static_authorizer_allows_only_its_grants() {
        let authz = StaticAuthorizer::new().allow("node-a", "shop", "cart");
        assert!(authz.may_request("node-a", "shop", "cart"));
        assert!(!authz.may_request("node-b", "shop", "cart"));
        assert!(!authz.may_request("node-a", "shop", "payments"));
        assert!(!authz.may_request("node-a", "bank", "cart"));
    }
}
