//! The handle a pick returns: one request's claim on one endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use super::endpoint::Endpoint;
use crate::resilience::breaker::Admission;
use crate::resilience::outcome::Outcome;

/// One request's claim on an endpoint.
///
/// Holding it counts the request in the endpoint's in-flight counter (which
/// least-request balancing reads); dropping it, on any path (success, error, a
/// cancelled future), gives the count back. [`PickGuard::report`] also tells the
/// endpoint's circuit breaker and outlier detection how the request went; a guard
/// dropped without a report is a request that ended without a verdict and counts for
/// neither (a half-open probe slot is handed back).
#[derive(Debug)]
#[must_use = "dropping the guard ends the request at once"]
pub struct PickGuard {
    endpoint: Arc<Endpoint>,
    admission: Admission,
    reported: bool,
}

impl PickGuard {
    pub(crate) fn new(endpoint: Arc<Endpoint>, admission: Admission) -> Self {
        PickGuard { endpoint, admission, reported: false }
    }

    /// The chosen endpoint.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Where to connect.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr()
    }

    /// Whether this request is a circuit-breaker probe (the endpoint is on trial).
    pub fn is_probe(&self) -> bool {
        self.admission.is_probe()
    }

    /// Reports how the request ended to the endpoint's breaker and outlier detection,
    /// and ends the request. An ejection this outcome causes is counted for the
    /// endpoint's service here, once: the detector decides it under its lock.
    pub fn report(mut self, outcome: Outcome) {
        self.reported = true;
        self.endpoint.breaker().record(self.admission, outcome.is_failure());
        let set = &self.endpoint.set;
        if set.outlier.record(self.endpoint.outlier(), outcome).is_some() {
            crate::observe::metrics::outlier_ejection(&set.service, self.endpoint.addr());
        }
    }
}

impl Drop for PickGuard {
    fn drop(&mut self) {
        if !self.reported {
            self.endpoint.breaker().release(self.admission);
        }
        self.endpoint.end_request();
    }
}
