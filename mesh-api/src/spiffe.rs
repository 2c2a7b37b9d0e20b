//! Workload identities as SPIFFE IDs: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! The CA (control plane) and the agents (which request certificates and check
//! peers) must agree byte for byte on what an identity looks like, so the one
//! parser lives here, in the crate both sides already share.

use std::fmt;
use std::str::FromStr;

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";
/// The SPIFFE specification caps an ID at 2048 bytes.
const MAX_ID_LEN: usize = 2048;
/// The SPIFFE specification caps a trust domain at 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a workload SPIFFE ID of this mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The ID does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID (it must start with spiffe://)")]
    NotSpiffe(String),
    /// The ID is longer than the specification allows.
    #[error("SPIFFE ID is {0} bytes long, more than the 2048 allowed")]
    TooLong(usize),
    /// The trust domain is empty, too long, or has characters outside `[a-z0-9._-]`.
    #[error("invalid trust domain {0:?}: use 1-255 characters from a-z, 0-9, '.', '-', '_'")]
    InvalidTrustDomain(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("SPIFFE ID path {0:?} is not of the form /ns/<namespace>/sa/<service-account>")]
    NotWorkloadPath(String),
    /// A namespace or service account segment is empty, `.`/`..`, or has characters
    /// outside `[A-Za-z0-9._-]`.
    #[error("invalid {what} {value:?}: use characters from A-Z, a-z, 0-9, '.', '-', '_'")]
    InvalidSegment {
        /// "namespace" or "service account".
        what: &'static str,
        /// The offending value.
        value: String,
    },
}

/// The identity of a workload: its trust domain, Kubernetes namespace and service account.
///
/// Construct it with [`SpiffeId::new`] or parse it with [`str::parse`]; both validate, so a
/// value of this type always formats to a well-formed SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds the identity of `service_account` in `namespace` under `trust_domain`.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        validate_segment("namespace", namespace)?;
        validate_segment("service account", service_account)?;
        let id = SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let len = id.to_string().len();
        if len > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(len));
        }
        Ok(id)
    }

    /// The trust domain (`cluster.local` by default).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The workload's Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The workload's service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`; no query, fragment, port or trailing slash.
    fn from_str(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong(s.len()));
        }
        let rest = s.strip_prefix(SCHEME).ok_or_else(|| SpiffeIdError::NotSpiffe(s.to_owned()))?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(trust_domain)?;
        let mut parts = path.split('/');
        // The path starts with '/', so the first split piece is empty.
        let (Some(""), Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SpiffeIdError::NotWorkloadPath(path.to_owned()));
        };
        SpiffeId::new(trust_domain, namespace, service_account)
    }
}

/// Checks a trust domain name as the SPIFFE specification defines it (lowercase letters,
/// digits, '.', '-', '_'; 1-255 bytes).
pub fn validate_trust_domain(trust_domain: &str) -> Result<(), SpiffeIdError> {
    let ok = !trust_domain.is_empty()
        && trust_domain.len() <= MAX_TRUST_DOMAIN_LEN
        && trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
    if ok { Ok(()) } else { Err(SpiffeIdError::InvalidTrustDomain(trust_domain.to_owned())) }
}

fn validate_segment(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    let ok = !value.is_empty()
        && value != "."
        && value != ".."
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok { Ok(()) } else { Err(SpiffeIdError::InvalidSegment { what, value: value.to_owned() }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart-v2".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "cart-v2");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart-v2");
        assert_eq!(SpiffeId::new("cluster.local", "shop", "cart-v2").unwrap(), id);
    }

    #[test]
    fn refuses_ids_that_are_not_workload_ids() {
        let cases = [
            ("https://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://Cluster.local/ns/a/sa/b", "upper-case trust domain"),
            ("spiffe://cluster.local:443/ns/a/sa/b", "port"),
            ("spiffe://user@cluster.local/ns/a/sa/b", "userinfo"),
            ("spiffe:///ns/a/sa/b", "empty trust domain"),
            ("spiffe://cluster.local", "no path"),
            ("spiffe://cluster.local/ns/a/sa/b/", "trailing slash"),
            ("spiffe://cluster.local/ns/a/sa/b/c", "extra segment"),
            ("spiffe://cluster.local/ns/a/sa", "missing sa"),
            ("spiffe://cluster.local/sa/b/ns/a", "swapped"),
            ("spiffe://cluster.local/ns//sa/b", "empty namespace"),
            ("spiffe://cluster.local/ns/../sa/b", "dot-dot"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
            ("spiffe://cluster.local/ns/a/sa/b#f", "fragment"),
            ("spiffe://cluster.local/ns/a%20b/sa/b", "percent-encoding"),
        ];
        for (input, why) in cases {
            assert!(input.parse::<SpiffeId>().is_err(), "{why}: {input} was accepted");
        }
    }

    #[test]
    fn refuses_overlong_ids() {
        let long = "a".repeat(MAX_ID_LEN);
        let err = format!("spiffe://td/ns/{long}/sa/b").parse::<SpiffeId>().unwrap_err();
        assert!(matches!(err, SpiffeIdError::TooLong(_)));
        assert!(SpiffeId::new("td", &long, "b").is_err());
    }
}
