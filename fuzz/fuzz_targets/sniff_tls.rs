//! The TLS ClientHello sniffer (`mesh_agent::sniff`, `sniff/tls.rs`).
//!
//! Input: a mode byte, two bytes saying where to cut a prefix and how big the reads
//! are, then
//! - mode even: the bytes a client sends (record layer and all), as is;
//! - mode odd: a handshake message and where to cut it into records: the target does
//!   the record framing, so the fuzzer spends its time inside the ClientHello.
//!
//! Asserts, beyond "no panic": the sniffer holds only a prefix of what it was given,
//! within its cap; a decision on a prefix holds for the whole; read sizes do not
//! change the answer; any record framing of the same handshake message gives the same
//! answer; a reported SNI is printable ASCII that the client really sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::sniff::{Detection, Protocol, detect};
use mesh_fuzz::check_sniffer;

const HANDSHAKE: u8 = 0x16;
const MAX_RECORD: usize = 1 << 14;

/// Frames `message` into handshake records of legacy version 3.`minor`, cut at
/// `cuts` and wherever a record would pass the 16 KiB limit.
fn frame(message: &[u8], minor: u8, cuts: &[usize]) -> Vec<u8> {
    let mut cuts: Vec<usize> = cuts.iter().copied().filter(|&c| c > 0 && c < message.len()).collect();
    cuts.extend((MAX_RECORD..message.len()).step_by(MAX_RECORD));
    cuts.push(message.len());
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::with_capacity(message.len() + 5 * cuts.len());
    let mut start = 0;
    for end in cuts {
        // Pieces longer than a record are split again at the record limit.
        while start < end {
            let piece = &message[start..end.min(start + MAX_RECORD)];
            out.extend([HANDSHAKE, 0x03, minor]);
            out.extend(u16::try_from(piece.len()).expect("at most a record").to_be_bytes());
            out.extend(piece);
            start += piece.len();
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [mode, cut, chunk, ref rest @ ..] = *data else { return };
    let input = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        // [cut count][minor][cut positions, u16 each][handshake message]
        let Some((&count, rest)) = rest.split_first() else { return };
        let Some((&minor, rest)) = rest.split_first() else { return };
        let count = usize::from(count % 8);
        if rest.len() < 2 * count {
            return;
        }
        let (positions, message) = rest.split_at(2 * count);
        let cuts: Vec<usize> =
            positions.chunks_exact(2).map(|p| usize::from(u16::from_be_bytes([p[0], p[1]]))).collect();
        let minor = minor % 5;
        let framed = frame(message, minor, &cuts);
        // The same message in as few records as possible: the same answer.
        if !message.is_empty() {
            assert_eq!(detect(&framed), detect(&frame(message, minor, &[])), "the answer depends on framing");
        }
        framed
    };
    let got = check_sniffer(&input, cut, chunk);
    if let Protocol::Tls(info) = &got {
        assert_eq!(input.first(), Some(&HANDSHAKE));
        if let Some(sni) = &info.sni {
            assert!(!sni.is_empty() && sni.bytes().all(|b| b.is_ascii_graphic()), "SNI {sni:?}");
            assert!(input.windows(sni.len()).any(|w| w == sni.as_bytes()) || spans_records(&input, sni));
        }
        assert!(info.alpn.iter().all(|p| !p.is_empty()), "empty ALPN name in {:?}", info.alpn);
    }
    if let Detection::Done(Protocol::Http1(_) | Protocol::Http2) = detect(&input) {
        assert_ne!(input.first(), Some(&HANDSHAKE), "a TLS record taken for HTTP");
    }
});

/// Whether `sni` is in the handshake bytes once record headers are taken out (a
/// client may cut a record in the middle of the name).
fn spans_records(input: &[u8], sni: &str) -> bool {
    let mut payload: Vec<u8> = Vec::new();
    let mut rest = input;
    while rest.len() >= 5 {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let end = (5 + len).min(rest.len());
        payload.extend(&rest[5..end]);
        rest = &rest[end..];
    }
    payload.windows(sni.len()).any(|w| w == sni.as_bytes())
}
