//! Label values that keep metric cardinality bounded.
//!
//! Every label value recorded by [`super::metrics`] goes through this module, so the
//! number of series a scrape returns depends on the mesh's configuration (services,
//! workloads, identities the control plane knows) and never on what clients send:
//! methods fold into a fixed list, status codes into the numbers HTTP and gRPC
//! define, and names that the control plane did not give us become `unknown`.

use std::{fmt, sync::Arc, sync::LazyLock};

use metrics::SharedString;

/// The label value for anything whose name is not known to the mesh.
pub const UNKNOWN: &str = "unknown";
/// The label value for a method or status outside the known set.
pub const OTHER: &str = "other";

/// The longest name accepted as a label value; DNS names are at most 253 bytes, and
/// SPIFFE IDs of the mesh (`spiffe://<td>/ns/<ns>/sa/<sa>`) fit well within the limit.
const MAX_NAME: usize = 253;

/// HTTP methods recorded as themselves; anything else becomes [`OTHER`].
const METHODS: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

/// The `method` label for an HTTP method: one of the standard methods, else `other`.
pub fn method(m: &http::Method) -> &'static str {
    method_str(m.as_str())
}

/// The `method` label for a method seen as text (e.g. by the HTTP/1 sniffer). Methods
/// are case-sensitive (RFC 9110), so `get` is `other`.
pub fn method_str(m: &str) -> &'static str {
    METHODS.iter().find(|&&known| known == m).copied().unwrap_or(OTHER)
}

/// Decimal strings for 100..=599, made once so recording a status allocates nothing.
static STATUS_CODES: LazyLock<Vec<String>> = LazyLock::new(|| (100..600u16).map(|c| c.to_string()).collect());

/// The `response_code` label: the status number for 100..=599, `0` when no response
/// was received (as Istio reports it), `other` for anything out of range.
pub fn response_code(code: Option<u16>) -> &'static str {
    match code {
        None => "0",
        Some(c @ 100..=599) => STATUS_CODES.get(usize::from(c - 100)).map_or(OTHER, String::as_str),
        Some(_) => OTHER,
    }
}

/// gRPC status codes 0..=16 as text.
const GRPC_CODES: [&str; 17] =
    ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];

/// The `grpc_status` label: the code for 0..=16, empty for a non-gRPC request (an
/// empty value is what Prometheus treats as "label absent"), `other` for anything else.
pub fn grpc_status(code: Option<u32>) -> &'static str {
    match code {
        None => "",
        Some(c) => usize::try_from(c).ok().and_then(|i| GRPC_CODES.get(i)).copied().unwrap_or(OTHER),
    }
}

/// A service, workload or identity name the mesh knows, as a label value.
///
/// Build it only from the control plane's snapshot (the service an original
/// destination resolved to, the workload an address belongs to, a verified peer
/// identity) — never from request paths, Host headers or addresses outside the mesh;
/// those are [`MeshName::unknown`]. Names that do not look like names (empty, too
/// long, control characters, spaces, quotes) also become `unknown`, so a bad registry
/// entry cannot break the exposition format either. Cloning is a reference-count bump,
/// so a connection can build its labels once and reuse them for every request.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct MeshName(Option<Arc<str>>);

impl MeshName {
    /// The name, if it is a plausible name; otherwise `unknown`.
    pub fn known(name: &str) -> Self {
        if is_plausible_name(name) { Self(Some(Arc::from(name))) } else { Self::unknown() }
    }

    /// A name the mesh could not determine.
    pub const fn unknown() -> Self {
        Self(None)
    }

    /// `known` for `Some`, `unknown` for `None`.
    pub fn from_option(name: Option<&str>) -> Self {
        name.map_or_else(Self::unknown, Self::known)
    }

    /// The label value.
    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or(UNKNOWN)
    }

    /// Whether the name is `unknown`.
    pub fn is_unknown(&self) -> bool {
        self.0.is_none()
    }

    pub(crate) fn shared(&self) -> SharedString {
        match &self.0 {
            Some(name) => SharedString::from_shared(name.clone()),
            None => SharedString::const_str(UNKNOWN),
        }
    }
}

impl Default for MeshName {
    fn default() -> Self {
        Self::unknown()
    }
}

impl fmt::Debug for MeshName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Serialises as the label value, so access log records show the same names as metrics.
impl serde::Serialize for MeshName {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for MeshName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_plausible_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~/:@%+=".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_methods_are_kept_and_others_fold() {
        assert_eq!(method(&http::Method::GET), "GET");
        assert_eq!(method(&http::Method::PATCH), "PATCH");
        assert_eq!(method_str("DELETE"), "DELETE");
        let custom = http::Method::from_bytes(b"PROPFIND").expect("valid token");
        assert_eq!(method(&custom), OTHER);
        assert_eq!(method_str("get"), OTHER);
        assert_eq!(method_str(""), OTHER);
    }

    #[test]
    fn status_codes_are_numbers_within_range() {
        assert_eq!(response_code(Some(200)), "200");
        assert_eq!(response_code(Some(100)), "100");
        assert_eq!(response_code(Some(599)), "599");
        assert_eq!(response_code(Some(600)), OTHER);
        assert_eq!(response_code(Some(99)), OTHER);
        assert_eq!(response_code(None), "0");
        assert_eq!(grpc_status(Some(0)), "0");
        assert_eq!(grpc_status(Some(16)), "16");
        assert_eq!(grpc_status(Some(17)), OTHER);
        assert_eq!(grpc_status(Some(u32::MAX)), OTHER);
        assert_eq!(grpc_status(None), "");
    }

    #[test]
    fn names_that_are_not_names_become_unknown() {
        assert_eq!(
            MeshName::known("reviews.default.svc.cluster.local").as_str(),
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(MeshName::known("spiffe://td/ns/a/sa/b").as_str(), "spiffe://td/ns/a/sa/b");
        assert!(MeshName::known("").is_unknown());
        assert!(MeshName::known("a b").is_unknown());
        assert!(MeshName::known("x\"}\n").is_unknown());
        assert!(MeshName::known(&"a".repeat(254)).is_unknown());
        assert_eq!(MeshName::from_option(None).as_str(), UNKNOWN);
        assert_eq!(MeshName::default().to_string(), UNKNOWN);
    }
}
