//! Recognising a TLS ClientHello and pulling out what routing needs (SNI, ALPN).
//!
//! The parser walks the record layer and the handshake message in place: the
//! handshake bytes are read straight out of the caller's buffer across record
//! boundaries, so a ClientHello split over several records (large post-quantum key
//! shares, or a client that fragments on purpose) needs no reassembly copy.
//!
//! Every length is checked against the length that encloses it (record, handshake
//! message, vector) as soon as it is read, not against the bytes received so far.
//! That way a corrupt length is rejected immediately, while an honest ClientHello
//! that has only partly arrived is simply "incomplete".

use super::{Detection, MAX_SNIFF_BYTES, OpaqueReason, Protocol, TlsInfo};

/// TLS record content type of handshake records (RFC 8446 §5.1).
pub(super) const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
/// Handshake message type of a ClientHello (RFC 8446 §4).
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
/// Bytes in a record header: type, legacy version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;
/// Largest plaintext record payload a peer may send (2^14, RFC 8446 §5.1).
pub(super) const MAX_RECORD_PAYLOAD: usize = 1 << 14;
/// Bytes in a handshake message header: type, length (3).
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Highest minor version byte seen in record headers: SSL 3.0 (0) to TLS 1.3 (4).
const MAX_RECORD_MINOR_VERSION: u8 = 0x04;
/// Length of the ClientHello random.
const RANDOM_LEN: usize = 32;
/// Longest legacy session id (RFC 8446 §4.1.2).
const MAX_SESSION_ID_LEN: usize = 32;
/// `server_name` extension (RFC 6066 §3).
const EXT_SERVER_NAME: u16 = 0x0000;
/// `application_layer_protocol_negotiation` extension (RFC 7301).
const EXT_ALPN: u16 = 0x0010;
/// The only `NameType` defined for `server_name`.
const NAME_TYPE_HOST_NAME: u8 = 0x00;

/// Why the ClientHello parse stopped short of a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The bytes so far are a valid prefix; more are needed.
    Incomplete,
    /// The bytes cannot be the start of a ClientHello.
    Malformed,
    /// A valid-looking ClientHello that cannot fit in [`MAX_SNIFF_BYTES`].
    TooLarge,
}

/// Classifies a buffer whose first byte is [`CONTENT_TYPE_HANDSHAKE`].
pub(super) fn detect(buf: &[u8]) -> Detection {
    match parse_client_hello(buf) {
        Ok(info) => Detection::Done(Protocol::Tls(info)),
        Err(Stop::Incomplete) => Detection::NeedMore,
        Err(Stop::Malformed) => Detection::Done(Protocol::Opaque(OpaqueReason::Unrecognized)),
        Err(Stop::TooLarge) => Detection::Done(Protocol::Opaque(OpaqueReason::TooLarge)),
    }
}

/// Parses the first handshake message in `buf`, which must be a complete ClientHello.
fn parse_client_hello(buf: &[u8]) -> Result<TlsInfo, Stop> {
    let mut reader = HandshakeReader::new(buf);
    let mut header = Bounded { reader: &mut reader, end: HANDSHAKE_HEADER_LEN };
    if header.u8()? != HANDSHAKE_CLIENT_HELLO {
        return Err(Stop::Malformed);
    }
    let len = header.u24()?;
    if !fits_sniff_buffer(len) {
        return Err(Stop::TooLarge);
    }
    let mut body = Bounded { reader: &mut reader, end: HANDSHAKE_HEADER_LEN.saturating_add(len) };
    let info = parse_client_hello_body(&mut body)?;
    body.finish()?;
    Ok(info)
}

/// Whether a handshake message with a `len`-byte body can arrive within
/// [`MAX_SNIFF_BYTES`], framed in full-size records (the most compact framing).
/// A message that cannot is rejected up front instead of buffering until the cap.
fn fits_sniff_buffer(len: usize) -> bool {
    let message = len.saturating_add(HANDSHAKE_HEADER_LEN);
    let records = message.div_ceil(MAX_RECORD_PAYLOAD);
    let framed = message.saturating_add(records.saturating_mul(RECORD_HEADER_LEN));
    framed <= MAX_SNIFF_BYTES
}

/// The ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2).
fn parse_client_hello_body(body: &mut Bounded<'_, '_>) -> Result<TlsInfo, Stop> {
    // legacy_version: every SSL 3.0+ hello has major version 3.
    if body.u16()? >> 8 != 0x03 {
        return Err(Stop::Malformed);
    }
    body.skip(RANDOM_LEN)?;

    let session_id_len = usize::from(body.u8()?);
    if session_id_len > MAX_SESSION_ID_LEN {
        return Err(Stop::Malformed);
    }
    body.skip(session_id_len)?;

    let cipher_suites_len = usize::from(body.u16()?);
    if cipher_suites_len < 2 || cipher_suites_len % 2 != 0 {
        return Err(Stop::Malformed);
    }
    body.skip(cipher_suites_len)?;

    let compression_methods_len = usize::from(body.u8()?);
    if compression_methods_len < 1 {
        return Err(Stop::Malformed);
    }
    body.skip(compression_methods_len)?;

    let mut info = TlsInfo::default();
    // Before TLS 1.3 the extensions block is optional.
    if body.remaining() == 0 {
        return Ok(info);
    }

    let mut extensions = body.nested_u16()?;
    let mut seen_server_name = false;
    let mut seen_alpn = false;
    while extensions.remaining() > 0 {
        let ext_type = extensions.u16()?;
        let mut data = extensions.nested_u16()?;
        match ext_type {
            // Duplicates are forbidden (RFC 8446 §4.2); refusing them keeps the
            // name we route on the same one a TLS server would act on.
            EXT_SERVER_NAME if seen_server_name => return Err(Stop::Malformed),
            EXT_ALPN if seen_alpn => return Err(Stop::Malformed),
            EXT_SERVER_NAME => {
                seen_server_name = true;
                info.sni = parse_server_name(&mut data)?;
            }
            EXT_ALPN => {
                seen_alpn = true;
                info.alpn = parse_alpn(&mut data)?;
            }
            _ => data.skip_rest()?,
        }
        data.finish()?;
    }
    extensions.finish()?;
    Ok(info)
}

/// `ServerNameList` (RFC 6066 §3): returns the `host_name` entry, if usable.
///
/// A host name that is not printable ASCII is not a DNS name any server could
/// match; it is dropped (`None`) rather than turned into a lossy string that might
/// accidentally match a route.
fn parse_server_name(data: &mut Bounded<'_, '_>) -> Result<Option<String>, Stop> {
    let mut list = data.nested_u16()?;
    if list.remaining() == 0 {
        return Err(Stop::Malformed);
    }
    let mut host_name = None;
    let mut seen_host_name = false;
    while list.remaining() > 0 {
        let name_type = list.u8()?;
        let len = usize::from(list.u16()?);
        if name_type != NAME_TYPE_HOST_NAME {
            list.skip(len)?;
            continue;
        }
        // At most one name per type; an empty name is not a name.
        if seen_host_name || len == 0 {
            return Err(Stop::Malformed);
        }
        seen_host_name = true;
        let name = list.bytes(len)?;
        if name.iter().all(u8::is_ascii_graphic) {
            host_name = String::from_utf8(name).ok();
        }
    }
    list.finish()?;
    Ok(host_name)
}

/// `ProtocolNameList` (RFC 7301 §3.1), in the client's order of preference.
fn parse_alpn(data: &mut Bounded<'_, '_>) -> Result<Vec<String>, Stop> {
    let mut list = data.nested_u16()?;
    if list.remaining() == 0 {
        return Err(Stop::Malformed);
    }
    let mut protocols = Vec::new();
    while list.remaining() > 0 {
        let len = usize::from(list.u8()?);
        if len == 0 {
            return Err(Stop::Malformed);
        }
        let name = list.bytes(len)?;
        let name = match String::from_utf8(name) {
            Ok(name) => name,
            Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
        };
        protocols.push(name);
    }
    list.finish()?;
    Ok(protocols)
}

/// Reads the handshake byte stream carried by consecutive handshake records,
/// straight out of the receive buffer.
struct HandshakeReader<'a> {
    buf: &'a [u8],
    /// Index in `buf` of the next unread byte (payload or record header).
    pos: usize,
    /// Payload bytes of the current record not read yet; 0 means a record
    /// header comes next.
    record_left: usize,
    /// Handshake bytes read so far, across records.
    offset: usize,
}

impl<'a> HandshakeReader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0, record_left: 0, offset: 0 }
    }

    /// Returns the next 1..=`max` handshake bytes that are contiguous in `buf`,
    /// crossing into the next record when the current one is used up.
    fn chunk(&mut self, max: usize) -> Result<&'a [u8], Stop> {
        if self.record_left == 0 {
            let rest = self.buf.get(self.pos..).unwrap_or_default();
            self.record_left = record_payload_len(rest)?;
            self.pos = self.pos.saturating_add(RECORD_HEADER_LEN);
        }
        let available = self.buf.len().saturating_sub(self.pos);
        let n = max.min(self.record_left).min(available);
        if n == 0 {
            return Err(Stop::Incomplete);
        }
        let end = self.pos.saturating_add(n);
        let chunk = self.buf.get(self.pos..end).ok_or(Stop::Incomplete)?;
        self.pos = end;
        self.record_left = self.record_left.saturating_sub(n);
        self.offset = self.offset.saturating_add(n);
        Ok(chunk)
    }
}

/// Validates the record header at the start of `rest` and returns its payload
/// length. Each header byte is judged as soon as it is present, so `[0x16]` and
/// `[0x16, 0x03]` are incomplete while `[0x16, 0x03, 0x09]` is already malformed.
fn record_payload_len(rest: &[u8]) -> Result<usize, Stop> {
    let byte = |i: usize| rest.get(i).copied().ok_or(Stop::Incomplete);
    // A ClientHello never shares its records with other content types, so an
    // alert or application data record in the middle means this is not TLS.
    if byte(0)? != CONTENT_TYPE_HANDSHAKE || byte(1)? != 0x03 {
        return Err(Stop::Malformed);
    }
    if byte(2)? > MAX_RECORD_MINOR_VERSION {
        return Err(Stop::Malformed);
    }
    let len = usize::from(u16::from_be_bytes([byte(3)?, byte(4)?]));
    // Empty handshake fragments and oversized records are both forbidden
    // (RFC 8446 §5.1); either would let a peer make us buffer for nothing.
    if len == 0 || len > MAX_RECORD_PAYLOAD {
        return Err(Stop::Malformed);
    }
    Ok(len)
}

/// A window `[reader.offset, end)` of the handshake stream that a vector or
/// message occupies. Reads past `end` are malformed, whatever has arrived.
struct Bounded<'r, 'a> {
    reader: &'r mut HandshakeReader<'a>,
    /// Handshake stream offset one past the last byte of this window.
    end: usize,
}

impl<'a> Bounded<'_, 'a> {
    fn remaining(&self) -> usize {
        self.end.saturating_sub(self.reader.offset)
    }

    /// Fails with [`Stop::Malformed`] unless `n` more bytes lie within the window.
    fn claim(&self, n: usize) -> Result<(), Stop> {
        if n > self.remaining() {
            return Err(Stop::Malformed);
        }
        Ok(())
    }

    /// Feeds the next `n` bytes of the window to `sink`, chunk by chunk.
    fn read(&mut self, n: usize, mut sink: impl FnMut(&'a [u8])) -> Result<(), Stop> {
        self.claim(n)?;
        let mut left = n;
        while left > 0 {
            let chunk = self.reader.chunk(left)?;
            left = left.saturating_sub(chunk.len());
            sink(chunk);
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Stop> {
        let mut out = [0u8; N];
        let mut filled = 0;
        self.read(N, |chunk| {
            for (dst, src) in out.iter_mut().skip(filled).zip(chunk) {
                *dst = *src;
            }
            filled = filled.saturating_add(chunk.len());
        })?;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, Stop> {
        let [b] = self.array::<1>()?;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, Stop> {
        Ok(u16::from_be_bytes(self.array::<2>()?))
    }

    fn u24(&mut self) -> Result<usize, Stop> {
        let [a, b, c] = self.array::<3>()?;
        Ok(usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c))
    }

    fn skip(&mut self, n: usize) -> Result<(), Stop> {
        self.read(n, |_| {})
    }

    fn skip_rest(&mut self) -> Result<(), Stop> {
        self.skip(self.remaining())
    }

    /// Copies out the next `n` bytes (only for values we return to the caller).
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, Stop> {
        self.claim(n)?;
        let mut out = Vec::with_capacity(n);
        self.read(n, |chunk| out.extend_from_slice(chunk))?;
        Ok(out)
    }

    /// Reads a 16-bit length and returns the window of the vector it prefixes.
    fn nested_u16(&mut self) -> Result<Bounded<'_, 'a>, Stop> {
        let len = usize::from(self.u16()?);
        self.claim(len)?;
        Ok(Bounded { end: self.reader.offset.saturating_add(len), reader: &mut *self.reader })
    }

    /// Checks that the window was consumed exactly: trailing bytes inside a
    /// vector mean the lengths disagree.
    fn finish(self) -> Result<(), Stop> {
        if self.remaining() != 0 {
            return Err(Stop::Malformed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    const SNI: &str = "svc.example.test";
    const ALPN: &[&str] = &["h2", "http/1.1"];

    /// A ClientHello as rustls writes it: a single handshake record.
    fn rustls_client_hello(server_name: &str, alpn: &[&str], enable_sni: bool) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            // Nothing is ever verified: only the first flight is produced.
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        config.enable_sni = enable_sni;
        let name =
            rustls::pki_types::ServerName::try_from(server_name).expect("valid server name").to_owned();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("writing to a Vec");
        }
        out
    }

    /// Handshake bytes of a single-record hello.
    fn payload(record: &[u8]) -> &[u8] {
        &record[RECORD_HEADER_LEN..]
    }

    fn record(content_type: u8, minor: u8, payload: &[u8]) -> Vec<u8> {
        let len = u16::try_from(payload.len()).expect("test record fits u16");
        let mut out = vec![content_type, 0x03, minor];
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// Frames handshake bytes into records, cutting at the given offsets.
    fn frame_at(handshake: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain([&handshake.len()]) {
            if cut > start {
                out.extend(record(CONTENT_TYPE_HANDSHAKE, 0x03, &handshake[start..cut]));
                start = cut;
            }
        }
        out
    }

    /// Frames handshake bytes into records of at most `fragment` payload bytes.
    fn frame(handshake: &[u8], fragment: usize) -> Vec<u8> {
        let cuts: Vec<usize> = (fragment..handshake.len()).step_by(fragment).collect();
        frame_at(handshake, &cuts)
    }

    fn u16_vec(body: &[u8]) -> Vec<u8> {
        let len = u16::try_from(body.len()).expect("fits u16");
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    fn extension(ext_type: u16, data: &[u8]) -> Vec<u8> {
        let mut out = ext_type.to_be_bytes().to_vec();
        out.extend(u16_vec(data));
        out
    }

    fn sni_extension(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![NAME_TYPE_HOST_NAME];
        entry.extend(u16_vec(name));
        extension(EXT_SERVER_NAME, &u16_vec(&entry))
    }

    fn alpn_extension(protocols: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protocols {
            list.push(u8::try_from(p.len()).expect("fits u8"));
            list.extend_from_slice(p);
        }
        extension(EXT_ALPN, &u16_vec(&list))
    }

    /// A hand-built ClientHello handshake message (no record framing) with the
    /// given extensions block (`None`: no extensions at all).
    fn hand_hello(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([0xab; RANDOM_LEN]);
        body.push(32);
        body.extend([0xcd; 32]);
        body.extend(u16_vec(&[0x13, 0x01, 0x13, 0x02]));
        body.extend([1, 0]);
        if let Some(extensions) = extensions {
            body.extend(u16_vec(extensions));
        }
        let len = u32::try_from(body.len()).expect("fits u32").to_be_bytes();
        let mut out = vec![HANDSHAKE_CLIENT_HELLO, len[1], len[2], len[3]];
        out.extend(body);
        out
    }

    fn tls(sni: Option<&str>, alpn: &[&str]) -> Detection {
        Detection::Done(Protocol::Tls(TlsInfo {
            sni: sni.map(str::to_owned),
            alpn: alpn.iter().map(|p| (*p).to_owned()).collect(),
        }))
    }

    const UNRECOGNIZED: Detection = Detection::Done(Protocol::Opaque(OpaqueReason::Unrecognized));

    #[test]
    fn rustls_hello_with_sni_and_alpn() {
        let hello = rustls_client_hello(SNI, ALPN, true);
        assert_eq!(detect(&hello), tls(Some(SNI), ALPN));
    }

    #[test]
    fn rustls_hello_to_ip_address_has_no_sni() {
        let hello = rustls_client_hello("10.1.2.3", ALPN, true);
        assert_eq!(detect(&hello), tls(None, ALPN));
    }

    #[test]
    fn rustls_hello_with_sni_disabled_and_no_alpn() {
        let hello = rustls_client_hello(SNI, &[], false);
        assert_eq!(detect(&hello), tls(None, &[]));
    }

    #[test]
    fn every_strict_prefix_needs_more() {
        let hello = rustls_client_hello(SNI, ALPN, true);
        for end in 1..hello.len() {
            assert_eq!(detect(&hello[..end]), Detection::NeedMore, "prefix of {end} bytes");
        }
        assert_eq!(detect(&hello), tls(Some(SNI), ALPN));
    }

    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let mut hello = rustls_client_hello(SNI, ALPN, true);
        // A middlebox-compatibility ChangeCipherSpec, then early data.
        hello.extend(record(0x14, 0x03, &[0x01]));
        hello.extend(record(0x17, 0x03, b"early"));
        assert_eq!(detect(&hello), tls(Some(SNI), ALPN));
    }

    #[test]
    fn hello_split_across_two_records_is_reassembled() {
        let hello = rustls_client_hello(SNI, ALPN, true);
        let handshake = payload(&hello);
        let split = frame_at(handshake, &[handshake.len() / 2]);
        assert_eq!(split.len(), hello.len() + RECORD_HEADER_LEN);
        for end in 1..split.len() {
            assert_eq!(detect(&split[..end]), Detection::NeedMore, "prefix of {end} bytes");
        }
        assert_eq!(detect(&split), tls(Some(SNI), ALPN));
    }

    #[test]
    fn hello_in_one_byte_records_is_reassembled() {
        let hello = rustls_client_hello(SNI, ALPN, true);
        assert_eq!(detect(&frame(payload(&hello), 1)), tls(Some(SNI), ALPN));
    }

    #[test]
    fn hello_larger_than_one_record_is_reassembled() {
        // Like a hello carrying several post-quantum key shares: past 16 KiB.
        let mut extensions = sni_extension(SNI.as_bytes());
        extensions.extend(extension(0x0033, &[0x11; 20_000]));
        extensions.extend(alpn_extension(&[b"h2"]));
        let handshake = hand_hello(Some(&extensions));
        let framed = frame(&handshake, MAX_RECORD_PAYLOAD);
        assert!(framed.len() <= MAX_SNIFF_BYTES);
        assert_eq!(detect(&framed[..MAX_RECORD_PAYLOAD + 100]), Detection::NeedMore);
        assert_eq!(detect(&framed), tls(Some(SNI), &["h2"]));
    }

    #[test]
    fn hello_without_extensions() {
        let handshake = hand_hello(None);
        assert_eq!(detect(&frame(&handshake, 512)), tls(None, &[]));
    }

    #[test]
    fn record_header_prefixes_wait_and_wrong_headers_fail_fast() {
        assert_eq!(detect(&[0x16]), Detection::NeedMore);
        assert_eq!(detect(&[0x16, 0x03]), Detection::NeedMore);
        assert_eq!(detect(&[0x16, 0x03, 0x01]), Detection::NeedMore);
        assert_eq!(detect(&[0x16, 0x03, 0x01, 0x02]), Detection::NeedMore);
        assert_eq!(detect(&[0x16, 0x02]), UNRECOGNIZED);
        assert_eq!(detect(&[0x16, 0x03, 0x05]), UNRECOGNIZED);
        // Zero-length and oversized records.
        assert_eq!(detect(&[0x16, 0x03, 0x01, 0x00, 0x00]), UNRECOGNIZED);
        assert_eq!(detect(&[0x16, 0x03, 0x01, 0x40, 0x01]), UNRECOGNIZED);
    }

    #[test]
    fn other_handshake_messages_are_unrecognized() {
        let mut handshake = hand_hello(None);
        handshake[0] = 0x02; // ServerHello
        assert_eq!(detect(&frame(&handshake, 512)), UNRECOGNIZED);
    }

    #[test]
    fn non_handshake_record_mid_hello_is_unrecognized() {
        let hello = rustls_client_hello(SNI, ALPN, true);
        let handshake = payload(&hello);
        let (first, second) = handshake.split_at(40);
        let mut bytes = record(CONTENT_TYPE_HANDSHAKE, 0x01, first);
        bytes.extend(record(0x17, 0x03, second));
        assert_eq!(detect(&bytes), UNRECOGNIZED);
        // Rejected as soon as the offending header byte arrives.
        assert_eq!(detect(&bytes[..first.len() + RECORD_HEADER_LEN + 1]), UNRECOGNIZED);
    }

    #[test]
    fn handshake_too_large_for_the_sniff_buffer() {
        let bytes = record(CONTENT_TYPE_HANDSHAKE, 0x01, &[HANDSHAKE_CLIENT_HELLO, 0xff, 0xff, 0xff]);
        assert_eq!(detect(&bytes), Detection::Done(Protocol::Opaque(OpaqueReason::TooLarge)));
    }

    /// Offsets of the length fields inside a single-record rustls hello.
    fn length_field_offsets(hello: &[u8]) -> Vec<usize> {
        let session_id = RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + 2 + RANDOM_LEN;
        let cipher_suites = session_id + 1 + usize::from(hello[session_id]);
        let suites_len = usize::from(u16::from_be_bytes([hello[cipher_suites], hello[cipher_suites + 1]]));
        let compression = cipher_suites + 2 + suites_len;
        let extensions = compression + 1 + usize::from(hello[compression]);
        // server_name: type(2) len(2) list_len(2) name_type(1) name_len(2) name
        let name = hello.windows(SNI.len()).position(|w| w == SNI.as_bytes()).expect("hello carries the SNI");
        let mut offsets = vec![
            6,
            7,
            8,
            session_id,
            cipher_suites,
            cipher_suites + 1,
            compression,
            extensions,
            extensions + 1,
        ];
        offsets.extend([name - 7, name - 6, name - 5, name - 4, name - 2, name - 1]);
        offsets
    }

    /// A corrupted length never yields a name or protocol list that was not in the
    /// hello. It may still yield TLS: a shorter cipher-suite list whose next byte,
    /// read as the compression-methods length, skips exactly to the extensions is a
    /// different but well-formed ClientHello (seen with rustls's TLS 1.2 suites:
    /// suites length 2, then 0x13 = 19 compression bytes).
    #[test]
    fn corrupted_length_fields_never_yield_a_wrong_name() {
        let hello = rustls_client_hello(SNI, ALPN, true);
        let Detection::Done(Protocol::Tls(original)) = detect(&hello) else {
            panic!("the intact hello parses");
        };
        for field in length_field_offsets(&hello) {
            for value in [0x00, 0x01, 0x02, 0x7f, 0xfe, 0xff] {
                let mut bad = hello.clone();
                if bad[field] == value {
                    continue;
                }
                bad[field] = value;
                match detect(&bad) {
                    Detection::NeedMore | Detection::Done(Protocol::Opaque(_)) => {}
                    Detection::Done(Protocol::Tls(info)) => {
                        assert_eq!(info, original, "byte {field} = {value:#x}")
                    }
                    other => panic!("byte {field} = {value:#x}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn corrupted_record_length() {
        let hello = rustls_client_hello(SNI, ALPN, true);
        let len = hello.len() - RECORD_HEADER_LEN;
        for new_len in [0, 1, 40, len - 1, len + 1, MAX_RECORD_PAYLOAD, MAX_RECORD_PAYLOAD + 1, 0xffff] {
            let mut bad = hello.clone();
            bad[3..5].copy_from_slice(&u16::try_from(new_len).expect("fits").to_be_bytes());
            let got = detect(&bad);
            if (len..=MAX_RECORD_PAYLOAD).contains(&new_len) {
                // The whole hello is there; what else the record would carry is
                // later handshake data, the TLS server's business.
                assert_eq!(got, tls(Some(SNI), ALPN), "record length {new_len}");
            } else {
                // Too short: the next "record header" is hello bytes.
                assert!(
                    matches!(got, Detection::NeedMore | Detection::Done(Protocol::Opaque(_))),
                    "record length {new_len}: {got:?}"
                );
            }
        }
    }

    #[test]
    fn inconsistent_vectors_are_unrecognized() {
        // An extension claiming more than the extensions block holds.
        let mut extensions = sni_extension(SNI.as_bytes());
        extensions[3] += 1;
        assert_eq!(detect(&frame(&hand_hello(Some(&extensions)), 512)), UNRECOGNIZED);
        // Trailing bytes after the last extension.
        let mut extensions = sni_extension(SNI.as_bytes());
        extensions.push(0);
        assert_eq!(detect(&frame(&hand_hello(Some(&extensions)), 512)), UNRECOGNIZED);
        // Empty ALPN name, empty host name.
        let extensions = alpn_extension(&[b""]);
        assert_eq!(detect(&frame(&hand_hello(Some(&extensions)), 512)), UNRECOGNIZED);
        let extensions = sni_extension(b"");
        assert_eq!(detect(&frame(&hand_hello(Some(&extensions)), 512)), UNRECOGNIZED);
    }

    #[test]
    fn duplicate_sni_or_alpn_is_unrecognized() {
        let mut extensions = sni_extension(b"a.test");
        extensions.extend(sni_extension(b"b.test"));
        assert_eq!(detect(&frame(&hand_hello(Some(&extensions)), 512)), UNRECOGNIZED);
        let mut extensions = alpn_extension(&[b"h2"]);
        extensions.extend(alpn_extension(&[b"http/1.1"]));
        assert_eq!(detect(&frame(&hand_hello(Some(&extensions)), 512)), UNRECOGNIZED);
    }

    #[test]
    fn odd_names_are_dropped_or_made_lossy() {
        let mut extensions = sni_extension(b"bad host\xff");
        extensions.extend(alpn_extension(&[b"h2", b"x\xffy"]));
        assert_eq!(detect(&frame(&hand_hello(Some(&extensions)), 512)), tls(None, &["h2", "x\u{fffd}y"]));
    }

    proptest! {
        #[test]
        fn any_record_framing_gives_the_same_answer(
            cuts in proptest::collection::vec(1usize..600, 0..8),
        ) {
            let hello = rustls_client_hello(SNI, ALPN, true);
            let handshake = payload(&hello);
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c < handshake.len()).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let framed = frame_at(handshake, &cuts);
            prop_assert_eq!(detect(&framed), tls(Some(SNI), ALPN));
            for end in [1, framed.len() / 3, framed.len() - 1] {
                prop_assert_eq!(detect(&framed[..end]), Detection::NeedMore);
            }
        }

        #[test]
        fn corrupting_any_byte_never_panics(
            index in any::<proptest::sample::Index>(),
            value in any::<u8>(),
            truncate in any::<proptest::sample::Index>(),
        ) {
            let mut hello = rustls_client_hello(SNI, ALPN, true);
            let i = index.index(hello.len());
            hello[i] = value;
            let end = truncate.index(hello.len() + 1);
            let _ = detect(&hello[..end]);
            let _ = detect(&hello);
        }
    }
}
