//! Observability building blocks: Prometheus [`metrics`] with bounded [`labels`],
//! per-edge traffic summaries for the control plane's dashboard ([`edges`]),
//! a non-blocking structured [`access_log`], W3C [`trace`] context propagation and
//! OTLP [`spans`] export, and the [`limits`] the agent enforces (each hit counted
//! and logged, throttled).
//!
//! Each is usable on its own; the data path hands its finished records to
//! [`Records`], which feeds the access log and the span exporter; the admin server
//! renders the metrics.

pub mod access_log;
pub mod edges;
pub mod expiry;
pub mod labels;
pub mod limits;
pub mod metrics;
pub mod spans;
pub mod trace;

use access_log::{AccessLog, AccessRecord};
use spans::Spans;

/// Where finished request and connection records go: the access log (when on) and,
/// for HTTP requests of sampled traces, the span exporter (when on). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Records {
    pub access_log: Option<AccessLog>,
    pub spans: Option<Spans>,
}

impl Records {
    /// Whether anything reads records at all (access log or span export on).
    pub fn is_on(&self) -> bool {
        self.access_log.is_some() || self.spans.is_some()
    }

    /// Whether a TCP connection's record is read by anyone.
    pub fn wants_tcp(&self) -> bool {
        self.access_log.is_some()
    }

    /// Whether an HTTP request's record is read by anyone, given whether its
    /// trace is sampled.
    pub fn wants_http(&self, sampled: bool) -> bool {
        self.access_log.is_some() || (sampled && self.spans.is_some())
    }

    /// Whether the hop of a request whose trace is `sampled` becomes a span.
    pub fn exports_span(&self, sampled: bool) -> bool {
        sampled && self.spans.is_some()
    }

    /// Hands a finished record to the span exporter (if it carries span ids) and
    /// the access log. Never blocks.
    pub fn emit(&self, record: AccessRecord) {
        match (&self.spans, &self.access_log) {
            (Some(spans), Some(log)) if record.span.is_some() => {
                spans.export(record.clone());
                log.log(record);
            }
            (Some(spans), None) if record.span.is_some() => spans.export(record),
            (_, Some(log)) => {
                log.log(record);
            }
            _ => {}
        }
    }
}
