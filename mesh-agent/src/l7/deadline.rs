//! A time limit that may not be set, without doubling the future it wraps.
//!
//! `match limit { Some(l) => timeout(l, fut).await, None => fut.await }` keeps room
//! for `fut` twice in the enclosing async fn's state (once bare, once inside
//! `Timeout`), and a request's future is moved whole on every spawn and box: the
//! proxy's per-request future was ~20 KB in release for that reason. [`within`]
//! holds the future once and boxes the timer only when there is a limit.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

/// Runs `fut`, giving up after `limit` if there is one: `Err(limit)` then.
pub fn within<F: Future>(limit: Option<Duration>, fut: F) -> Within<F> {
    Within { fut, sleep: limit.map(|l| (l, Box::pin(tokio::time::sleep(l)))) }
}

pin_project_lite::pin_project! {
    /// The future of [`within`].
    #[derive(Debug)]
    #[must_use = "futures do nothing unless awaited"]
    pub struct Within<F> {
        #[pin]
        fut: F,
        sleep: Option<(Duration, Pin<Box<Sleep>>)>,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Result<F::Output, Duration>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        match this.sleep {
            Some((limit, sleep)) => sleep.as_mut().poll(cx).map(|()| Err(*limit)),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_limit_cuts_a_slow_future_and_none_lets_it_finish() {
        let slow = || tokio::time::sleep(Duration::from_secs(5));
        assert_eq!(within(Some(Duration::from_secs(1)), slow()).await, Err(Duration::from_secs(1)));
        assert_eq!(within(None, slow()).await, Ok(()));
        assert_eq!(within(Some(Duration::from_secs(9)), async { 7 }).await, Ok(7));
    }

    #[test]
    fn the_wrapper_is_barely_larger_than_the_future() {
        let fut = async { [0u8; 4096] };
        let size = std::mem::size_of_val(&fut);
        assert!(std::mem::size_of_val(&within(None, fut)) <= size + 32);
    }
}
