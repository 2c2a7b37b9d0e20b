//! Keeping the agent's resident memory close to what it uses.
//!
//! The agent allocates through mimalloc (see `main.rs`). Two of its defaults
//! cost an idle agent resident memory that it does not use. Measured on the
//! agent in release, idle, with a 6.18 kernel whose THP setting is `madvise`:
//!
//! - **Transparent huge pages.** mimalloc asks for huge pages on its arenas, so
//!   the first touch anywhere in a 2 MiB region makes all of it resident. An
//!   agent's heap is a few MiB spread over many such regions. In iptables mode
//!   huge pages cost 8 MiB of an idle agent's RSS (18.2 MiB with them, 9.9 MiB
//!   without). A heap this small gains nothing measurable from fewer TLB misses.
//! - **Freed memory returned late.** Loading the eBPF object parses the kernel's
//!   BTF, a burst of about 16 MiB that is freed at once. mimalloc hands freed
//!   pages back to the kernel only later, when the thread that freed them
//!   allocates again or exits. The blocking thread that loaded the programs does
//!   neither until the runtime retires it about 10 s later, so until then an
//!   eBPF-mode agent sat at 43.6 MiB. With both fixes it idles at 11.5 MiB.
//!
//! [`keep_small`] switches off huge pages for the process; [`return_freed`] is
//! called after such a burst.
//!
//! The same holds for the runtime's threads after a load: a worker that served a
//! burst of connections and then waits for the next event holds the pages it freed
//! until it allocates again. [`on_park`] hands them back when a thread goes idle,
//! at most every [`COLLECT_EVERY`], and [`wake_periodically`] makes sure an idle
//! runtime's thread parks again after that long.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often, at most, an idle runtime thread hands back what it freed.
pub const COLLECT_EVERY: Duration = Duration::from_secs(5);

/// Switches off transparent huge pages for this process: for its allocator and
/// everything else, and whether the kernel's setting is `always` or `madvise`.
/// The kernel checks the setting when a page is first touched, so it must come
/// before the heap's first pages: the agent binary calls it from a constructor
/// (see `main.rs`), and by `main` mimalloc has already touched its first 4 MiB.
/// The setting is inherited by the commands the agent runs (`iptables`), which
/// are short-lived and small.
///
/// Returns 0 or the `errno` of the failure. It allocates nothing, so it is safe
/// to run before the Rust runtime is up.
pub extern "C" fn keep_small() -> i32 {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// Hands memory freed on the calling thread back to the kernel now, and purges
/// what the allocator still holds for delayed return. Call it on a thread that has
/// just freed a large burst and will then sit idle. Outside the agent binary,
/// which has another global allocator, it touches only mimalloc's own empty
/// state.
pub fn return_freed() {
    // SAFETY: mi_collect has no preconditions. `force` also purges the pages of
    // every arena that are waiting out the purge delay.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// For a runtime's `on_thread_park`: the thread is about to wait for work. If it
/// has not collected within [`COLLECT_EVERY`], its freed pages go back to the
/// allocator's arenas and those whose purge delay has passed back to the kernel.
/// Under load a worker parks often and this costs one clock read per park; the
/// collection itself (a walk of the thread's pages) runs at most every 5 s.
pub fn on_park() {
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    LAST.with(|last| {
        let now = Instant::now();
        if last.get().is_none_or(|at| now.duration_since(at) >= COLLECT_EVERY) {
            last.set(Some(now));
            // SAFETY: mi_collect has no preconditions; without `force` it does only
            // the thread's own pages and the purges that are due.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    });
}

/// Wakes the runtime it runs on every [`COLLECT_EVERY`], so a thread that went idle
/// right after a burst (having collected shortly before it) parks once more when a
/// collection is due, and [`on_park`] then runs it. Spawn it once per runtime; with
/// several workers, the one that runs it collects on each tick and the others when
/// they next park.
pub async fn wake_periodically() {
    let mut tick = tokio::time::interval(COLLECT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keep_small_switches_huge_pages_off_for_the_process() {
        assert_eq!(super::keep_small(), 0);
        // SAFETY: integer arguments only.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1, "PR_GET_THP_DISABLE after keep_small");
    }
}
