//! The HTTP/1.x request-line and HTTP/2 preface sniffers (`mesh_agent::sniff`,
//! `sniff/http.rs`), and the dispatch between them and TLS.
//!
//! Input: two bytes saying where to cut a prefix and how big the reads are, then the
//! bytes a client sends.
//!
//! Asserts, beyond "no panic": the sniffer holds only a prefix of what it was given,
//! within its cap; a decision on a prefix holds for the whole; read sizes do not
//! change the answer; HTTP/1 is reported only for a well-formed request line whose
//! method and version are the ones reported, and HTTP/2 only for the exact preface.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::sniff::Protocol;
use mesh_fuzz::check_sniffer;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let [cut, chunk, ref input @ ..] = *data else { return };
    match check_sniffer(input, cut, chunk) {
        Protocol::Http2 => assert!(input.starts_with(H2_PREFACE)),
        Protocol::Http1(info) => {
            let start = input.iter().position(|&b| b != b'\r' && b != b'\n').expect("a request line");
            let line = &input[start..];
            let end = line.iter().position(|&b| b == b'\n').expect("a whole request line");
            let line = line[..end].strip_suffix(b"\r").unwrap_or(&line[..end]);
            let (method, rest) = line.split_at(info.method.len());
            assert_eq!(method, info.method.as_bytes());
            assert!(info.method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_'));
            assert!(info.minor_version <= 1, "HTTP/1.{}", info.minor_version);
            let version = format!(" HTTP/1.{}", info.minor_version);
            assert!(rest.starts_with(b" ") && rest.ends_with(version.as_bytes()), "{line:?}");
            // The request target sits between the two spaces and has none of its own.
            let target = &rest[1..rest.len() - version.len()];
            assert!(!target.is_empty() && !target.contains(&b' '), "{line:?}");
        }
        Protocol::Tls(_) => assert_eq!(input.first(), Some(&0x16)),
        Protocol::Opaque(_) => {}
    }
});
