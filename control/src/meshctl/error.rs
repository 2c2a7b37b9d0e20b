//! meshctl's errors: each says what failed, where, and what to try.

use std::fmt;

/// Which component a call went to; decides the hint in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The control plane's admin endpoint (`--control-admin`).
    ControlAdmin,
    /// A node agent's admin endpoint (`--agent`).
    Agent,
    /// A node agent's admin socket (`meshctl agent --agent-socket`).
    AgentSocket,
}

impl Target {
    /// What to check or pass when this component cannot be reached.
    pub fn hint(self) -> &'static str {
        match self {
            Self::ControlAdmin => {
                "is mesh-control running with its --admin-addr reachable from here? pass \
                 --control-admin URL (or MESHCTL_CONTROL_ADMIN); in Kubernetes: \
                 kubectl -n mesh-system port-forward deploy/mesh-control 15011"
            }
            Self::Agent => {
                "is mesh-agent running there with that --admin-addr? pass --agent URL (repeatable, \
                 or MESHCTL_AGENTS=url,url)"
            }
            Self::AgentSocket => {
                "is mesh-agent running on this node with that --admin-socket? pass --agent-socket PATH \
                 (or MESHCTL_AGENT_SOCKET); only root may use the socket"
            }
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ControlAdmin => "control plane's admin endpoint",
            Self::Agent => "agent",
            Self::AgentSocket => "agent's admin socket",
        })
    }
}

/// Why a meshctl command failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshctlError {
    /// Nothing answered (refused, timed out, unknown host).
    #[error("cannot reach the {target} at {url}: {reason} — {}", target.hint())]
    Unreachable { target: Target, url: String, reason: String },
    /// It answered, but not with success.
    #[error("the {target} at {url} answered {path} with {status}: {body}")]
    Status { target: Target, url: String, path: String, status: String, body: String },
    /// It answered with JSON meshctl cannot read.
    #[error(
        "the {target} at {url} sent {path} in a form meshctl cannot read ({reason}); \
         is meshctl the same version as the mesh?"
    )]
    Decode { target: Target, url: String, path: String, reason: String },
    /// A URL flag that is not `http://host:port`.
    #[error("{flag} {value:?} is not a URL like http://127.0.0.1:15000: {reason}")]
    BadUrl { flag: &'static str, value: String, reason: String },
    /// `install --apply` stopped at an object the API server refused or never saw.
    #[error("patch {object}: {reason} ({applied} of {total} objects were applied before it)")]
    Apply { object: String, reason: String, applied: usize, total: usize },
    /// A command argument that cannot be used.
    #[error("{0}")]
    Usage(String),
}

impl MeshctlError {
    /// Whether nothing answered at all (as opposed to a bad answer).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// A short reason for a failed connection, from the deepest I/O error in `err`'s chain.
pub fn connect_reason(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut last = err.to_string();
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io_reason(io);
        }
        last = e.to_string();
        current = e.source();
    }
    last
}

/// Plain words for the I/O errors a connection attempt gives.
pub fn io_reason(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "connection refused".into(),
        K::TimedOut => "no answer (timed out)".into(),
        K::ConnectionReset => "connection reset".into(),
        K::HostUnreachable | K::NetworkUnreachable => "no route to host".into(),
        K::NotFound => "no such socket".into(),
        K::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_says_what_to_do() {
        let e = MeshctlError::Unreachable {
            target: Target::ControlAdmin,
            url: "http://127.0.0.1:15011".into(),
            reason: io_reason(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        };
        let s = e.to_string();
        assert!(
            s.starts_with("cannot reach the control plane's admin endpoint at http://127.0.0.1:15011: connection refused — is mesh-control running with its --admin-addr reachable from here? pass --control-admin"),
            "{s}"
        );
    }

    #[test]
    fn reason_comes_from_the_io_error_in_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(connect_reason(&e), "connection refused");
    }
}
