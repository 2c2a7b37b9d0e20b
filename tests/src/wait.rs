//! Waiting for conditions instead of sleeping.

use std::time::{Duration, Instant};

/// Polls `check` until it is true or `within` has passed; returns its last answer.
/// For a caller that explains a timeout better than [`eventually`] could.
pub fn wait_until(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    let mut interval = Duration::from_millis(5);
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}

/// Polls `check` until it returns `Some`, or panics after `within` with `what`.
/// The poll interval starts at 5 ms and backs off to 100 ms.
pub fn eventually<T>(within: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    let mut interval = Duration::from_millis(5);
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}
