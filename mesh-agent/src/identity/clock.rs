//! Time as the identity code sees it, injectable so tests control it.
//!
//! Certificate lifetimes are wall-clock times, renewals are sleeps. [`TokioClock`]
//! ties both to tokio's clock: wall time is a fixed starting point plus tokio's
//! elapsed time, so a test with paused tokio time moves certificate validity,
//! renewal timers and TLS verification together without sleeping for real.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::UnixTime;

/// A source of wall time and of sleeps.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current wall time.
    fn now(&self) -> SystemTime;

    /// Completes after `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Wall time anchored at creation and advanced by tokio's clock.
///
/// In production this is wall time as of start plus monotonic time since, which keeps
/// renewal timers immune to wall-clock steps; with `tokio::time::pause` it follows the
/// paused clock.
#[derive(Debug, Clone)]
pub struct TokioClock {
    wall_start: SystemTime,
    tokio_start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading the real wall time now.
    pub fn new() -> TokioClock {
        TokioClock::starting_at(SystemTime::now())
    }

    /// A clock that reads `wall_start` now and advances with tokio's clock.
    pub fn starting_at(wall_start: SystemTime) -> TokioClock {
        TokioClock { wall_start, tokio_start: tokio::time::Instant::now() }
    }
}

impl Default for TokioClock {
    fn default() -> TokioClock {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall_start + self.tokio_start.elapsed()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// Lets rustls check certificate validity against a [`Clock`] rather than the system time.
#[derive(Debug)]
pub(crate) struct RustlsTime(pub Arc<dyn Clock>);

impl rustls::time_provider::TimeProvider for RustlsTime {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(self.0.now().duration_since(SystemTime::UNIX_EPOCH).ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_paused_tokio_time() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let clock = TokioClock::starting_at(start);
        assert_eq!(clock.now(), start);
        clock.sleep(Duration::from_secs(3600)).await;
        assert_eq!(clock.now(), start + Duration::from_secs(3600));
    }
}
