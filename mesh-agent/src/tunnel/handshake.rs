//! Where the tunnel port's TLS handshakes run.
//!
//! A server handshake costs the agent a key exchange and a signature (a few hundred
//! microseconds of CPU), before the peer has proved anything. On the data path's
//! worker, a flood of handshakes would take that time from established traffic;
//! a [`HandshakeRuntime`] runs them on threads of their own instead. The connection
//! travels there and back as a [`TunnelIo`]: its socket is moved from one runtime's
//! reactor to the other's ([`TunnelIo::rebind`]) with the TLS state untouched, so
//! once established it is served by the data path's worker like any other.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// A tunnel connection's socket, movable between runtimes.
#[derive(Debug)]
pub struct TunnelIo {
    /// `None` only inside [`TunnelIo::rebind`].
    tcp: Option<TcpStream>,
}

impl TunnelIo {
    pub fn new(tcp: TcpStream) -> TunnelIo {
        TunnelIo { tcp: Some(tcp) }
    }

    /// The socket.
    pub fn get_ref(&self) -> &TcpStream {
        self.tcp.as_ref().expect("a TunnelIo always holds its socket outside rebind")
    }

    /// Registers the socket with the reactor of the runtime this is called on (it
    /// was made or last rebound on another). Call it before polling the stream on
    /// this runtime.
    pub fn rebind(&mut self) -> io::Result<()> {
        let Some(tcp) = self.tcp.take() else {
            return Err(io::Error::other("tunnel socket lost in an earlier rebind"));
        };
        let std = tcp.into_std()?;
        self.tcp = Some(TcpStream::from_std(std)?);
        Ok(())
    }

    fn pinned(self: Pin<&mut Self>) -> io::Result<Pin<&mut TcpStream>> {
        match self.get_mut().tcp.as_mut() {
            Some(tcp) => Ok(Pin::new(tcp)),
            None => Err(io::Error::other("tunnel socket lost in an earlier rebind")),
        }
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.pinned() {
            Ok(tcp) => tcp.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.pinned() {
            Ok(tcp) => tcp.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.pinned() {
            Ok(tcp) => tcp.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.pinned() {
            Ok(tcp) => tcp.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.pinned() {
            Ok(tcp) => tcp.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// Threads (a runtime of their own) that run tunnel TLS handshakes.
#[derive(Debug)]
pub struct HandshakeRuntime {
    runtime: Option<tokio::runtime::Runtime>,
}

impl HandshakeRuntime {
    /// A runtime with `threads` workers named `mesh-handshake`, each `nice` steps
    /// below the agent's CPU priority (0 keeps it). A higher nice value lets established traffic
    /// take the CPU first while a flood keeps the handshake threads busy: the
    /// scheduler weighs a nice-10 thread at about a tenth of a nice-0 one, so
    /// handshakes still progress under full load, and use all the CPU that is idle.
    pub fn new(threads: usize, nice: i32) -> io::Result<HandshakeRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("mesh-handshake")
            // A flood's burst of handshake state is handed back once it is over.
            .on_thread_park(crate::memory::on_park)
            .on_thread_start(move || {
                if nice != 0
                    && let Err(e) = lower_this_thread(nice)
                {
                    tracing::warn!(nice, error = %e, "handshake thread keeps the agent's CPU priority");
                }
            })
            .enable_all()
            .build()?;
        runtime.spawn(crate::memory::wake_periodically());
        Ok(HandshakeRuntime { runtime: Some(runtime) })
    }

    /// Runs a tunnel listener's accept loop on this runtime; `false` if it has
    /// stopped. The loop registers its listener when first polled, so it is this
    /// runtime's reactor that wakes it.
    pub fn spawn_acceptor<F>(&self, acceptor: F) -> bool
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let Some(runtime) = self.runtime.as_ref() else { return false };
        runtime.spawn(acceptor);
        true
    }

    /// Runs `handshake` over `tcp` on this runtime and hands the result back rebound
    /// to the caller's runtime: `handshake` gets the socket registered here, and
    /// whatever [`TunnelIo`] it returns (inside a TLS stream) is rebound by `rebind`.
    pub async fn run<F, Fut, T>(&self, tcp: TcpStream, handshake: F) -> io::Result<T>
    where
        F: FnOnce(TunnelIo) -> Fut + Send + 'static,
        Fut: Future<Output = io::Result<T>> + Send + 'static,
        T: Rebind + Send + 'static,
    {
        let runtime = self.runtime.as_ref().ok_or_else(|| io::Error::other("handshake runtime stopped"))?;
        let std = tcp.into_std()?;
        let task = runtime.spawn(async move {
            let io = TunnelIo::new(TcpStream::from_std(std)?);
            handshake(io).await
        });
        let mut done = task.await.map_err(|e| io::Error::other(format!("handshake task: {e}")))??;
        done.rebind()?;
        Ok(done)
    }
}

impl Drop for HandshakeRuntime {
    fn drop(&mut self) {
        // Handshakes still under way are dropped (their peers see the connection close).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Raises the calling thread's nice value by `by` (to at most 19). Linux keeps nice
/// per thread, so the agent's other threads are left as they are; raising it needs
/// no privilege.
fn lower_this_thread(by: i32) -> io::Result<()> {
    // SAFETY: gettid, getpriority and setpriority take plain integers and touch no
    // memory of ours; errno is read right after the call that may set it.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        // -1 is a valid nice value: only errno tells a failure apart.
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if now == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::setpriority(libc::PRIO_PROCESS, tid, (now + by).min(19)) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// What a handshake on a [`HandshakeRuntime`] returns: it holds the [`TunnelIo`]
/// to rebind.
pub trait Rebind {
    fn rebind(&mut self) -> io::Result<()>;
}

impl Rebind for TunnelIo {
    fn rebind(&mut self) -> io::Result<()> {
        TunnelIo::rebind(self)
    }
}

impl<T: Rebind> Rebind for tokio_rustls::server::TlsStream<T> {
    fn rebind(&mut self) -> io::Result<()> {
        self.get_mut().0.rebind()
    }
}

impl<A: Send, T: Rebind> Rebind for (A, T) {
    fn rebind(&mut self) -> io::Result<()> {
        self.1.rebind()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn this_thread_nice() -> i32 {
        // SAFETY: plain integers in and out.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[tokio::test]
    async fn handshake_threads_run_at_their_nice_value_and_the_callers_keep_theirs() {
        let before = this_thread_nice();
        let pool = HandshakeRuntime::new(2, 7).unwrap();
        let rt = pool.runtime.as_ref().unwrap();
        let on_pool = rt.spawn(async { this_thread_nice() }).await.unwrap();
        let blocking = rt.spawn_blocking(this_thread_nice).await.unwrap();
        assert_eq!(on_pool, (before + 7).min(19), "a handshake worker's nice value");
        assert_eq!(blocking, (before + 7).min(19), "a handshake blocking thread's nice value");
        assert_eq!(this_thread_nice(), before, "the caller's thread is left as it was");
    }

    #[tokio::test]
    async fn a_socket_moved_to_the_handshake_runtime_and_back_keeps_its_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"hello").await.unwrap();
            let mut back = [0u8; 5];
            c.read_exact(&mut back).await.unwrap();
            c.write_all(b" again").await.unwrap();
            back
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let pool = HandshakeRuntime::new(1, 0).unwrap();
        let main_thread = std::thread::current().id();
        let (thread, mut io) = pool
            .run(tcp, |mut io| async move {
                let mut first = [0u8; 5];
                io.read_exact(&mut first).await?;
                assert_eq!(&first, b"hello");
                io.write_all(b"world").await?;
                Ok((std::thread::current().id(), io))
            })
            .await
            .unwrap();
        assert_ne!(thread, main_thread, "the handshake ran on the handshake runtime's thread");
        let mut rest = [0u8; 6];
        io.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" again", "the rebound socket reads on this runtime");
        assert_eq!(&client.await.unwrap(), b"world");
    }
}
