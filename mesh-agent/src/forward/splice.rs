//! Zero-copy for one direction of the plaintext relay ([`super::relay`]):
//! `splice(2)` from the source socket into a pipe, then from the pipe into the
//! destination socket, so a bulk transfer's bytes never cross into user space.
//!
//! Why: through the userspace copy, bulk through one agent ran at 0.59x of direct
//! in eBPF mode and 0.49x in iptables mode (`cargo xtask bench intercept`): each
//! 64 KiB costs a copy out of the kernel and one back in. ztunnel measured 12 to
//! 36 Gbit/s on a plaintext hop with splice (PR #170).
//!
//! Why not for every connection: a pipe costs two file descriptors, and pages
//! while it holds bytes. Most relayed connections are request and response, where a
//! pipe buys nothing. So the relay starts with its small userspace buffer and hands a
//! direction over only once it shows bulk (a read filled the largest buffer). Pipes
//! come from a budget ([`Pipes`]) fitted at start-up to the descriptors that
//! `--max-connections` leaves free (an eighth of them when `RLIMIT_NOFILE` is what
//! bounds the connections, see [`crate::limits::fit_to_nofile`]), so pipes never
//! take the descriptors an accept needs. A direction that finds the budget spent, or its pipe refused (`EMFILE`,
//! `ENFILE`, `ENOMEM`), keeps copying: splice is an optimisation, never a reason to
//! fail a connection. Memory: a pipe holds pages only while bytes are in flight, at
//! most [`PIPE_SIZE`] per spliced direction (the userspace copy held 64 KiB), beside
//! the socket buffers either way, which the kernel already lets grow to megabytes.
//!
//! Readiness comes from tokio (`async_io`, i.e. `readable()`/`writable()` with
//! `try_io`), and every splice is nonblocking (`SPLICE_F_NONBLOCK`, both pipe ends
//! `O_NONBLOCK`). The pipe is filled only when empty, so `EAGAIN` from
//! socket → pipe means the socket has nothing to read (its read readiness is
//! cleared); it is drained before the next fill, so `EAGAIN` from pipe → socket
//! means the socket's send buffer is full (the direction waits for writability).
//! No call blocks and nothing spins.
//!
//! A write to a socket the peer reset raises `SIGPIPE`, as `write(2)` would; Rust
//! programs ignore it, so it comes back as `EPIPE`.

use std::{
    io,
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use nix::{
    fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};
use tracing::debug;

use super::idle::Activity;

/// Pipe size asked for (`F_SETPIPE_SZ`): 64 pages per splice where the default
/// pipe holds 16, so a bulk direction makes a quarter of the calls. Bounded by
/// `/proc/sys/fs/pipe-max-size`; if refused (the user's pipe pages are spent), the
/// default size works too.
pub const PIPE_SIZE: usize = 256 * 1024;

/// A pipe's size when the kernel will not say (Linux's default).
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

/// Pipes for splicing when no budget could be computed (the file-descriptor limit
/// unknown): a few hundred bulk directions; past them, connections copy.
pub const FALLBACK_BUDGET: usize = 256;

/// Directions of plaintext relays that asked for a pipe, by `outcome`: `spliced`
/// (they splice), `budget_spent` or `refused` (the kernel gave no pipe; both keep
/// copying). An operator whose relays stay on copies sees why here.
pub const SPLICE_DIRECTIONS_TOTAL: &str = "mesh_splice_directions_total";

/// Registers the help text (with the other metrics' descriptions).
pub fn describe() {
    metrics::describe_counter!(
        SPLICE_DIRECTIONS_TOTAL,
        metrics::Unit::Count,
        "Bulk directions of plaintext relays that asked for a splice(2) pipe, by outcome (spliced, budget_spent, refused)."
    );
}

fn directions(outcome: &'static str) {
    metrics::counter!(SPLICE_DIRECTIONS_TOTAL, "outcome" => outcome).increment(1);
}

/// The pipes spliced directions may hold, shared by all relays (cloning shares the
/// budget). [`Pipes::off`] (`--splice off`) never hands one out.
#[derive(Clone, Debug, Default)]
pub struct Pipes {
    budget: Option<Arc<Budget>>,
}

#[derive(Debug)]
struct Budget {
    max: usize,
    in_use: AtomicUsize,
    /// Pipes handed out since start: directions that went to splice.
    taken: AtomicU64,
    /// The size each pipe asks for.
    size: usize,
    /// Creates a pipe of about the given size: its read and write ends and its
    /// actual size (a seam for the tests of the fallback).
    open: fn(usize) -> io::Result<(OwnedFd, OwnedFd, usize)>,
}

impl Pipes {
    /// No splicing: every relay copies.
    pub fn off() -> Self {
        Self::default()
    }

    /// Splicing with at most `max` pipes open at once (one per spliced direction).
    pub fn new(max: usize) -> Self {
        Self::with_open(max, open)
    }

    /// [`Pipes::new`] with `open` creating the pipes (the tests refuse them).
    pub(super) fn with_open(max: usize, open: fn(usize) -> io::Result<(OwnedFd, OwnedFd, usize)>) -> Self {
        let size = PIPE_SIZE.min(pipe_max_size().unwrap_or(PIPE_SIZE));
        Pipes {
            budget: Some(Arc::new(Budget {
                max,
                in_use: AtomicUsize::new(0),
                taken: AtomicU64::new(0),
                size,
                open,
            })),
        }
    }

    /// Whether relays may splice at all.
    pub fn is_on(&self) -> bool {
        self.budget.as_ref().is_some_and(|b| b.max > 0)
    }

    /// At most this many pipes open at once.
    pub fn max(&self) -> usize {
        self.budget.as_ref().map_or(0, |b| b.max)
    }

    /// Pipes open now (directions being spliced).
    pub fn in_use(&self) -> usize {
        self.budget.as_ref().map_or(0, |b| b.in_use.load(Ordering::Relaxed))
    }

    /// Pipes handed out since start (directions that went to splice).
    pub fn taken(&self) -> u64 {
        self.budget.as_ref().map_or(0, |b| b.taken.load(Ordering::Relaxed))
    }

    /// A pipe for one direction, or `None` (splicing off, the budget spent, or the
    /// kernel refused one): the caller keeps copying.
    pub(super) fn take(&self) -> Option<Pipe> {
        let budget = self.budget.as_ref()?;
        if budget
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < budget.max).then_some(n + 1))
            .is_err()
        {
            directions("budget_spent");
            return None;
        }
        match (budget.open)(budget.size) {
            Ok((read, write, size)) => {
                budget.taken.fetch_add(1, Ordering::Relaxed);
                directions("spliced");
                Some(Pipe { read, write, size, budget: budget.clone() })
            }
            Err(e) => {
                budget.in_use.fetch_sub(1, Ordering::AcqRel);
                directions("refused");
                debug!(error = %e, "no pipe for splice(2); the relay keeps copying");
                None
            }
        }
    }
}

/// One direction's pipe; its place in the budget is given back on drop.
#[derive(Debug)]
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe holds at most: what one splice into it asks for.
    size: usize,
    budget: Arc<Budget>,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.budget.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Creates a nonblocking pipe and asks for `size`.
fn open(size: usize) -> io::Result<(OwnedFd, OwnedFd, usize)> {
    let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let asked = i32::try_from(size).unwrap_or(i32::MAX);
    let size = fcntl(&write, FcntlArg::F_SETPIPE_SZ(asked))
        .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
        .ok()
        .and_then(|s| usize::try_from(s).ok())
        .filter(|&s| s > 0)
        .unwrap_or(DEFAULT_PIPE_SIZE);
    Ok((read, write, size))
}

/// `/proc/sys/fs/pipe-max-size`: the largest size an unprivileged `F_SETPIPE_SZ` gets.
fn pipe_max_size() -> Option<usize> {
    std::fs::read_to_string("/proc/sys/fs/pipe-max-size").ok()?.trim().parse().ok()
}

/// What ended a spliced direction, by the socket it came from.
#[derive(Debug, thiserror::Error)]
pub(super) enum Error {
    /// Reading the source failed (a reset, for one).
    #[error(transparent)]
    Read(io::Error),
    /// Writing the destination failed.
    #[error(transparent)]
    Write(io::Error),
}

/// Moves `from` to `to` through `pipe` until `from` reads EOF, then returns with the
/// pipe empty (the caller shuts `to` down, as after a copy). Every byte written is
/// added to `counter`, and every move marks `activity` (the idle timeout).
///
/// Dropped midway (the other direction failed, or the relay went idle), the bytes in
/// the pipe are lost with it, as a copy's buffer would be: the relay is ending.
pub(super) async fn copy(
    from: &TcpStream,
    to: &TcpStream,
    pipe: Pipe,
    counter: &mut u64,
    activity: &Activity,
) -> Result<(), Error> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    loop {
        // The pipe is empty: EAGAIN can only be the socket's.
        let n = from
            .async_io(Interest::READABLE, || Ok(splice(from, None, &pipe.write, None, pipe.size, flags)?))
            .await
            .map_err(Error::Read)?;
        if n == 0 {
            return Ok(());
        }
        activity.mark();
        let mut held = n;
        while held > 0 {
            // The pipe holds bytes: EAGAIN can only be the socket's.
            let sent = to
                .async_io(Interest::WRITABLE, || Ok(splice(&pipe.read, None, to, None, held, flags)?))
                .await
                .map_err(Error::Write)?;
            if sent == 0 {
                return Err(Error::Write(io::ErrorKind::WriteZero.into()));
            }
            held -= sent;
            *counter += sent as u64;
            activity.mark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(_: usize) -> io::Result<(OwnedFd, OwnedFd, usize)> {
        Err(io::Error::from_raw_os_error(libc::EMFILE))
    }

    #[test]
    fn the_budget_bounds_the_pipes_and_a_dropped_pipe_gives_its_place_back() {
        let pipes = Pipes::new(2);
        let a = pipes.take().expect("a pipe");
        let b = pipes.take().expect("a second pipe");
        assert!(pipes.take().is_none(), "the budget is spent");
        assert_eq!(pipes.in_use(), 2);
        assert!(a.size >= DEFAULT_PIPE_SIZE.min(PIPE_SIZE), "size {}", a.size);
        drop(a);
        assert_eq!(pipes.in_use(), 1);
        let _c = pipes.take().expect("a dropped pipe's place is free again");
        drop(b);
        assert_eq!(pipes.in_use(), 1);
    }

    #[test]
    fn off_and_refused_pipes_hand_out_nothing_and_hold_no_place() {
        assert!(Pipes::off().take().is_none());
        assert!(!Pipes::off().is_on());
        assert!(!Pipes::new(0).is_on());
        let pipes = Pipes::with_open(4, refused);
        assert!(pipes.is_on());
        for _ in 0..10 {
            assert!(pipes.take().is_none());
        }
        assert_eq!(pipes.in_use(), 0, "a refused pipe gives its place back");
    }

    #[test]
    fn each_request_for_a_pipe_is_counted_by_outcome() {
        let (recorder, handle) = crate::observe::metrics::build(None).expect("recorder");
        metrics::with_local_recorder(&recorder, || {
            describe();
            let pipes = Pipes::new(1);
            let _held = pipes.take().expect("a pipe");
            assert!(pipes.take().is_none());
            assert!(Pipes::with_open(1, refused).take().is_none());
        });
        let text = handle.render();
        for outcome in ["spliced", "budget_spent", "refused"] {
            let line = format!("{SPLICE_DIRECTIONS_TOTAL}{{outcome=\"{outcome}\"}} 1");
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn pipes_are_nonblocking_and_close_on_exec() {
        let (read, write, _) = open(PIPE_SIZE).unwrap();
        for fd in [&read, &write] {
            let fl = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
            assert!(fl.contains(OFlag::O_NONBLOCK));
            let fd_flags = fcntl(fd, FcntlArg::F_GETFD).unwrap();
            assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        }
    }
}
