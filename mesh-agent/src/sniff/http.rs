//! Recognising plaintext HTTP: the HTTP/2 prior-knowledge preface and HTTP/1.x
//! request lines.
//!
//! Only the request line decides HTTP/1: headers are the HTTP server's business,
//! and deciding on the line alone means the answer cannot change as more bytes
//! arrive (a decision on a prefix holds for every extension of it).

use super::{Detection, Http1Info, OpaqueReason, Protocol};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub(super) const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest request line (with any leading empty lines and the line ending) we
/// wait for. Servers commonly refuse longer ones (nginx's default is 8 KiB), so a
/// client that sends more without a line break is not worth buffering for.
pub(super) const MAX_REQUEST_LINE: usize = 8 * 1024;

/// Longest method we accept. Registered methods are at most 17 bytes
/// (`UPDATEREDIRECTREF`); the bound lets binary or other text protocols fail after a
/// few bytes instead of after [`MAX_REQUEST_LINE`].
const MAX_METHOD_LEN: usize = 32;

/// Classifies a buffer that does not start like TLS.
pub(super) fn detect(buf: &[u8]) -> Detection {
    if let Some(detection) = detect_h2_preface(buf) {
        return detection;
    }
    detect_http1(buf)
}

/// `None` once `buf` has diverged from the preface; otherwise `Http2` or a wait.
fn detect_h2_preface(buf: &[u8]) -> Option<Detection> {
    if !buf.iter().zip(H2_PREFACE).all(|(got, want)| got == want) {
        return None;
    }
    Some(if buf.len() >= H2_PREFACE.len() { Detection::Done(Protocol::Http2) } else { Detection::NeedMore })
}

const UNRECOGNIZED: Detection = Detection::Done(Protocol::Opaque(OpaqueReason::Unrecognized));

/// `METHOD SP request-target SP HTTP/1.x CRLF` (RFC 9112 §3).
fn detect_http1(buf: &[u8]) -> Detection {
    // RFC 9112 §2.2: servers ignore empty lines before the request line.
    let line_start = buf.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(buf.len());
    let line = buf.get(line_start..).unwrap_or_default();
    if !plausible_method(line) {
        return UNRECOGNIZED;
    }

    let window = buf.get(..MAX_REQUEST_LINE).unwrap_or(buf);
    // Neither the method nor the request target may contain a line feed, so the
    // first one after `line_start` ends the request line.
    let line_end = window
        .iter()
        .skip(line_start)
        .position(|&b| b == b'\n')
        .map(|i| line_start.saturating_add(i).saturating_add(1));
    let candidate = match line_end {
        Some(end) => window.get(..end).unwrap_or(window),
        None => window,
    };

    // No header slots: we hand httparse at most the request line, so it either
    // fails on it or reports "partial" once it wants headers.
    let mut request = httparse::Request::new(&mut []);
    let parsed = request.parse(candidate);
    match (parsed, request.method, request.version) {
        // Partial after a whole line means the line parsed; TooManyHeaders cannot
        // happen without header bytes but would equally mean the line was fine.
        (
            Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders),
            Some(method),
            Some(minor_version),
        ) if line_end.is_some() => {
            Detection::Done(Protocol::Http1(Http1Info { method: method.to_owned(), minor_version }))
        }
        // A valid prefix of a request line.
        (Ok(httparse::Status::Partial), _, _) if line_end.is_none() => {
            if buf.len() >= MAX_REQUEST_LINE {
                Detection::Done(Protocol::Opaque(OpaqueReason::TooLarge))
            } else {
                Detection::NeedMore
            }
        }
        _ => UNRECOGNIZED,
    }
}

/// Whether `line` starts with what could be (a prefix of) a method followed by a
/// space.
///
/// Methods are case-sensitive and every registered one is upper-case letters and
/// `-`; anything else (lower case, binary, digits) is much more likely another
/// protocol, and rejecting it here decides on the first byte.
fn plausible_method(line: &[u8]) -> bool {
    for (i, &b) in line.iter().enumerate() {
        match b {
            b' ' => return i > 0,
            b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD_LEN => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn http1(method: &str, minor_version: u8) -> Detection {
        Detection::Done(Protocol::Http1(Http1Info { method: method.to_owned(), minor_version }))
    }

    const TOO_LARGE: Detection = Detection::Done(Protocol::Opaque(OpaqueReason::TooLarge));

    #[test]
    fn get_request() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), http1("GET", 1));
    }

    #[test]
    fn request_line_alone_decides() {
        assert_eq!(detect(b"POST /x HTTP/1.0\r\n"), http1("POST", 0));
        assert_eq!(detect(b"OPTIONS * HTTP/1.1\r\n"), http1("OPTIONS", 1));
        assert_eq!(detect(b"CONNECT a:443 HTTP/1.1\n"), http1("CONNECT", 1));
        assert_eq!(detect(b"\r\nDELETE /y?z HTTP/1.1\r\n"), http1("DELETE", 1));
        // Headers past the line do not matter, even malformed or many of them.
        assert_eq!(detect(b"GET / HTTP/1.1\r\n\x00\x01\r\n"), http1("GET", 1));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend(format!("X-{i}: y\r\n").as_bytes());
        }
        assert_eq!(detect(&many), http1("GET", 1));
    }

    #[test]
    fn every_prefix_needs_more_until_the_line_ends() {
        let request = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n";
        let line_len = b"GET /index.html HTTP/1.1\r\n".len();
        for end in 1..line_len {
            assert_eq!(detect(&request[..end]), Detection::NeedMore, "prefix of {end} bytes");
        }
        for end in line_len..=request.len() {
            assert_eq!(detect(&request[..end]), http1("GET", 1), "prefix of {end} bytes");
        }
    }

    #[test]
    fn not_http1() {
        for bytes in [
            &b"get / http/1.1\r\n"[..],
            b"get / HTTP/1.1\r\n",
            b"GET / http/1.1\r\n",
            b"GET / HTTP/1.2\r\n",
            b"GET / HTTP/2\r\n",
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/1.1 \r\n",
            b"GET /\r\n",
            b"GET\r\n",
            b" GET / HTTP/1.1\r\n",
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
            b"*1\r\n$4\r\nPING\r\n",
            b"\r\x00",
        ] {
            assert_eq!(detect(bytes), UNRECOGNIZED, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn garbage_is_rejected_on_the_first_byte() {
        for first in [0x00u8, 0x05, b'a', b'1', b'{', 0x80, 0xff] {
            assert_eq!(detect(&[first]), UNRECOGNIZED, "{first:#x}");
        }
        assert_eq!(detect(b"G"), Detection::NeedMore);
        assert_eq!(detect(b"GET"), Detection::NeedMore);
        assert_eq!(detect(b"GET /"), Detection::NeedMore);
        assert_eq!(detect(b"GET / HTTP/1.1"), Detection::NeedMore);
        assert_eq!(detect(b"GET / HTTP/1.1\r"), Detection::NeedMore);
        assert_eq!(detect(b"\r\n"), Detection::NeedMore);
    }

    #[test]
    fn long_method_is_rejected_early() {
        let mut method = vec![b'A'; MAX_METHOD_LEN];
        assert_eq!(detect(&method), Detection::NeedMore);
        method.push(b'A');
        assert_eq!(detect(&method), UNRECOGNIZED);
    }

    #[test]
    fn request_line_too_large() {
        let mut line = b"GET /".to_vec();
        line.resize(9 * 1024, b'a');
        assert_eq!(detect(&line), TOO_LARGE);
        assert_eq!(detect(&line[..MAX_REQUEST_LINE]), TOO_LARGE);
        assert_eq!(detect(&line[..MAX_REQUEST_LINE - 1]), Detection::NeedMore);
        // Still too large once its line ending finally arrives.
        line.extend(b" HTTP/1.1\r\n");
        assert_eq!(detect(&line), TOO_LARGE);
    }

    #[test]
    fn request_line_just_under_the_cap() {
        let suffix = b" HTTP/1.1\r\n";
        let mut line = b"GET /".to_vec();
        line.resize(MAX_REQUEST_LINE - suffix.len(), b'a');
        line.extend(suffix);
        assert_eq!(line.len(), MAX_REQUEST_LINE);
        assert_eq!(detect(&line), http1("GET", 1));
    }

    #[test]
    fn h2_preface_and_its_prefixes() {
        for end in 1..H2_PREFACE.len() {
            assert_eq!(detect(&H2_PREFACE[..end]), Detection::NeedMore, "prefix of {end} bytes");
        }
        assert_eq!(detect(H2_PREFACE), Detection::Done(Protocol::Http2));
        let mut with_settings = H2_PREFACE.to_vec();
        with_settings.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(detect(&with_settings), Detection::Done(Protocol::Http2));
    }

    #[test]
    fn diverging_from_the_preface_falls_back_to_http1() {
        assert_eq!(detect(b"PRI * HTTP/2.1\r\n"), UNRECOGNIZED);
        assert_eq!(detect(b"PRI * HTTP/1.1\r\n"), http1("PRI", 1));
        assert_eq!(detect(b"PRIX"), Detection::NeedMore);
    }

    proptest! {
        #[test]
        fn request_lines_are_recognised(
            method in "[A-Z][A-Z-]{0,15}",
            target in "/[!-~]{0,64}",
            minor in 0u8..=1,
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            // The preface is matched first; `PRI * HTTP/1.x` is still HTTP/1.
            let mut bytes = format!("{method} {target} HTTP/1.{minor}\r\n").into_bytes();
            let line_len = bytes.len();
            bytes.extend(tail);
            for end in 1..line_len {
                prop_assert_eq!(detect(&bytes[..end]), Detection::NeedMore);
            }
            prop_assert_eq!(detect(&bytes), http1(&method, minor));
        }
    }
}
