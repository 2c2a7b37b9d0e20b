//! How one request to an endpoint ended, in the terms breakers, outlier detection and
//! retries care about.

/// Why a request to an endpoint failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The connection to the endpoint could not be established (refused, unreachable,
    /// TLS handshake failed). The request never reached the application, so it is always
    /// safe to retry.
    ConnectFailure,
    /// The connection was reset or closed before a complete response.
    Reset,
    /// No response within the per-try (or request) timeout.
    Timeout,
    /// The endpoint answered with an HTTP 5xx status.
    HttpStatus(u16),
    /// A gRPC response with status UNAVAILABLE (14).
    GrpcUnavailable,
}

/// The result of one request to one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The endpoint did its job (any non-5xx HTTP status counts: a 404 is the
    /// application's answer, not the endpoint's failure).
    Success,
    /// The endpoint failed.
    Failure(FailureKind),
}

/// gRPC's UNAVAILABLE status code.
pub const GRPC_UNAVAILABLE: i32 = 14;

impl Outcome {
    /// Classifies an HTTP response status: 5xx is a failure, anything else a success.
    pub fn from_http_status(status: u16) -> Self {
        if (500..600).contains(&status) {
            Outcome::Failure(FailureKind::HttpStatus(status))
        } else {
            Outcome::Success
        }
    }

    /// Classifies a gRPC status code: UNAVAILABLE is the endpoint's failure; other codes
    /// are the application's answer.
    pub fn from_grpc_status(code: i32) -> Self {
        if code == GRPC_UNAVAILABLE {
            Outcome::Failure(FailureKind::GrpcUnavailable)
        } else {
            Outcome::Success
        }
    }

    /// Whether this outcome counts as a failure.
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failure(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_5xx_and_grpc_unavailable_are_failures() {
        assert_eq!(Outcome::from_http_status(200), Outcome::Success);
        assert_eq!(Outcome::from_http_status(404), Outcome::Success);
        assert_eq!(Outcome::from_http_status(503), Outcome::Failure(FailureKind::HttpStatus(503)));
        assert!(Outcome::from_http_status(500).is_failure());
        assert_eq!(Outcome::from_grpc_status(14), Outcome::Failure(FailureKind::GrpcUnavailable));
        assert_eq!(Outcome::from_grpc_status(5), Outcome::Success);
    }
}
