//! Observability building blocks: Prometheus [`metrics`] with bounded [`labels`],
//! a non-blocking structured [`access_log`], and W3C [`trace`] context propagation.
//!
//! Each is usable on its own; the data path records through them, the admin server
//! renders the metrics.

pub mod access_log;
pub mod labels;
pub mod metrics;
pub mod trace;
