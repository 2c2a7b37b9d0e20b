//! One HTTP/1.1 request to the node agent over its unix socket, synchronous and
//! bounded: a deadline for the whole exchange and a cap on the answer's size. The
//! plugin makes one call per process, so a connection per call is all it needs.

use std::{
    io::{ErrorKind, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::contract::MAX_BODY_BYTES;

/// Why a call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens at the socket (no file, or refused): the agent is not running.
    #[error("node agent unreachable at {}: {source} (is mesh-agent running on this node?)", socket.display())]
    Unreachable { socket: PathBuf, source: std::io::Error },
    #[error("node agent at {} gave no answer within {timeout:?}", socket.display())]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("talking to the node agent at {}: {source}", socket.display())]
    Io { socket: PathBuf, source: std::io::Error },
    #[error("node agent at {} answered something that is not HTTP/1.1: {reason}", socket.display())]
    Protocol { socket: PathBuf, reason: String },
}

impl ClientError {
    /// True when nothing was listening, so the agent cannot hold state for the pod.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// An answer: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// POSTs `body` (JSON) to `path` on the agent at `socket` and waits at most `timeout`.
pub fn post(socket: &Path, path: &str, body: &[u8], timeout: Duration) -> Result<Answer, ClientError> {
    let deadline = Instant::now() + timeout;
    let io = |source: std::io::Error| {
        if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
            ClientError::Timeout { socket: socket.to_owned(), timeout }
        } else {
            ClientError::Io { socket: socket.to_owned(), source }
        }
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
            ClientError::Unreachable { socket: socket.to_owned(), source }
        }
        _ => ClientError::Io { socket: socket.to_owned(), source },
    })?;
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ClientError::Timeout { socket: socket.to_owned(), timeout })
    };
    stream.set_write_timeout(Some(remaining()?)).map_err(io)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: mesh-agent\r\nUser-Agent: mesh-cni/{}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    // Read until the agent closes (Connection: close) or the answer is complete,
    // never past the deadline or the size cap.
    let limit = MAX_BODY_BYTES + 16 * 1024;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(answer) =
            parse(&buf).map_err(|reason| ClientError::Protocol { socket: socket.to_owned(), reason })?
        {
            return Ok(answer);
        }
        stream.set_read_timeout(Some(remaining()?)).map_err(io)?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(io(e)),
        };
        if n == 0 {
            return Err(ClientError::Protocol {
                socket: socket.to_owned(),
                reason: format!("connection closed after {} bytes, before a complete answer", buf.len()),
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > limit {
            return Err(ClientError::Protocol {
                socket: socket.to_owned(),
                reason: format!("answer larger than {limit} bytes"),
            });
        }
    }
}

/// A complete answer in `buf`, `None` while more bytes are needed.
fn parse(buf: &[u8]) -> Result<Option<Answer>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf).map_err(|e| e.to_string())? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = resp.code.unwrap_or_default();
    let mut length = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked answers are not expected from the agent".into());
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or("bad Content-Length")?;
            if n > MAX_BODY_BYTES {
                return Err(format!("body of {n} bytes, at most {MAX_BODY_BYTES}"));
            }
            length = Some(n);
        }
    }
    let length = length.ok_or("no Content-Length")?;
    let body = &buf[head_len..];
    if body.len() < length {
        return Ok(None);
    }
    Ok(Some(Answer { status, body: body[..length].to_vec() }))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A one-shot server: reads the request head, answers `reply` (or nothing).
    fn serve(reply: Option<&'static str>) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 1024];
            while !req.ends_with(b"}") {
                let n = s.read(&mut chunk).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&chunk[..n]);
            }
            match reply {
                Some(r) => s.write_all(r.as_bytes()).unwrap(),
                // Hold the connection open past the client's deadline.
                None => std::thread::sleep(Duration::from_millis(800)),
            }
            String::from_utf8(req).unwrap()
        });
        (dir, path, handle)
    }

    #[test]
    fn posts_json_and_reads_the_answer() {
        let (_d, path, server) =
            serve(Some("HTTP/1.1 409 Conflict\r\ncontent-length: 11\r\n\r\n{\"code\":1}x"));
        let a = post(&path, "/cni/v1/add", b"{\"a\":1}", Duration::from_secs(5)).unwrap();
        assert_eq!(a, Answer { status: 409, body: b"{\"code\":1}x".to_vec() });
        let req = server.join().unwrap();
        assert!(req.starts_with("POST /cni/v1/add HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Content-Length: 7\r\n") && req.ends_with("\r\n\r\n{\"a\":1}"), "{req}");
    }

    #[test]
    fn no_listener_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let e = post(&dir.path().join("none.sock"), "/", b"{}", Duration::from_secs(1)).unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("is mesh-agent running"), "{e}");
        // A socket file whose server is gone refuses.
        let path = dir.path().join("gone.sock");
        drop(UnixListener::bind(&path).unwrap());
        assert!(post(&path, "/", b"{}", Duration::from_secs(1)).unwrap_err().is_unreachable());
    }

    #[test]
    fn a_silent_agent_times_out_within_the_deadline() {
        let (_d, path, server) = serve(None);
        let start = Instant::now();
        let e = post(&path, "/", b"{}", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
        assert!(start.elapsed() < Duration::from_millis(700), "{:?}", start.elapsed());
        server.join().unwrap();
    }

    #[test]
    fn malformed_answers_are_protocol_errors() {
        for reply in [
            "garbage\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        ] {
            let (_d, path, server) = serve(Some(reply));
            let e = post(&path, "/", b"{}", Duration::from_secs(2)).unwrap_err();
            assert!(matches!(e, ClientError::Protocol { .. }), "{reply:?}: {e}");
            server.join().unwrap();
        }
    }
}
