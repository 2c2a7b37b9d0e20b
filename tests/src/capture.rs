//! A packet capture on a test host's `eth0`: every frame, raw, to look for bytes
//! that must never cross the wire in plaintext.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::Host;

/// A running capture; [`Capture::stop`] returns what it saw.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<u8>>,
}

impl Capture {
    /// Starts capturing every frame on `host`'s eth0 (an AF_PACKET socket in its
    /// namespace); returns once the socket is bound, so nothing sent after is missed.
    pub fn start(host: &Host) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = host.spawn_in(move || {
            // SAFETY: plain socket(2)/bind(2)/setsockopt(2)/recv(2) calls on a socket
            // this function owns; buffers are valid for the lengths passed.
            unsafe {
                let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
                assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
                let fd = OwnedFd::from_raw_fd(fd);
                let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto as u16;
                sll.sll_ifindex = ifindex as i32;
                let rc = libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind eth0: {}", std::io::Error::last_os_error());
                let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                let _ = ready_tx.send(());
                let mut all = Vec::new();
                let mut buf = vec![0u8; 65536];
                while !stop2.load(Ordering::SeqCst) {
                    let n = libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n > 0 {
                        all.extend_from_slice(&buf[..n as usize]);
                    }
                }
                all
            }
        })?;
        ready_rx.recv_timeout(Duration::from_secs(5)).context("capture did not start")?;
        Ok(Self { stop, thread })
    }

    /// Stops and returns every frame's bytes, concatenated.
    pub fn stop(self) -> Vec<u8> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("capture thread")
    }
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// [`Capture::start`] as a stop flag and the thread that returns the bytes (set the
/// flag, then join), for tests that hold the two apart.
///
/// # Panics
/// If the capture cannot start.
pub fn capture(host: &Host) -> (Arc<AtomicBool>, JoinHandle<Vec<u8>>) {
    let c = Capture::start(host).expect("packet capture starts");
    (c.stop, c.thread)
}
