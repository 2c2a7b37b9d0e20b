//! The live service graph on the admin port (`meshctl dashboard` prints its URL):
//! agents send edge reports on their discovery stream ([`board`] keeps them),
//! [`graph`] turns them into the page's JSON, and the page itself is one embedded
//! HTML file (vanilla JS, inline SVG), so it works offline and without Prometheus.
//!
//! | path | |
//! |---|---|
//! | `/dashboard` | the page (`?service=ns/name`: that service's page) |
//! | `/dashboard/graph.json` | nodes and edges with rates over the last 10 s |
//! | `/dashboard/service.json?name=ns/name` | RED series, endpoints, routes |

pub mod board;
pub mod graph;
#[cfg(test)]
mod tests;

pub use board::Board;

/// The page: no external assets, so it needs no internet access.
pub const PAGE: &str = include_str!("dashboard.html");

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Marks the agent's data for removal (after the grace period) when dropped, so
/// however a discovery stream ends its reports are let go.
pub struct StreamGuard {
    pub board: Board,
    pub node: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.board.stream_ended(&self.node, now_ms());
    }
}
