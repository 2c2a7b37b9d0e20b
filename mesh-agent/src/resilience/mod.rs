//! Resilience policies the proxy applies around each upstream request: per-endpoint
//! circuit breakers ([`breaker`]), passive outlier ejection ([`outlier`]), retries with
//! backoff and a budget ([`retry`]) and per-client rate limiting ([`rate_limit`]).
//!
//! Everything here is pure logic over an injectable [`clock::Clock`] and
//! [`random::RandomSource`]: no I/O, no sleeping. Each policy is built from its
//! `mesh_api` message with defaults for zero fields, so the control plane only sends what
//! it wants to change; invalid values give a [`ConfigError`] the agent can NACK with.

pub mod breaker;
pub mod clock;
pub mod outcome;
pub mod outlier;
pub mod random;
pub mod rate_limit;
pub mod replay;
pub mod retry;

/// A resilience policy from the control plane that cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A share that must lie in `0..=1` does not.
    #[error("{field} must be between 0 and 1, got {value}")]
    InvalidRatio {
        /// The policy field, as named in the proto.
        field: &'static str,
        /// The value received.
        value: f64,
    },
    /// A retry condition this agent does not know.
    #[error("unknown retry_on condition {0:?} (expected connect-failure, reset, 503 or unavailable)")]
    UnknownRetryCondition(String),
}

/// Accepts `value` when it is a share in `0..=1`.
pub(crate) fn check_ratio(field: &'static str, value: f64) -> Result<f64, ConfigError> {
    if (0.0..=1.0).contains(&value) { Ok(value) } else { Err(ConfigError::InvalidRatio { field, value }) }
}
