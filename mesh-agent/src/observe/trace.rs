//! W3C Trace Context propagation (`traceparent`, `tracestate`) and request ids.
//!
//! The agent is one hop in the trace: it continues the trace a request arrived with,
//! or starts one when the header is missing or malformed (a malformed header is
//! treated exactly as a missing one, as the W3C recommendation says), and gives the
//! outbound request a new parent id so that the agent's hop is a span of its own.
//! `tracestate` is carried unchanged when it is well formed and at most 512 bytes.
//! `x-request-id` is kept when it is sane and generated otherwise, so every request
//! in the access log can be found in the applications' logs. B3 headers (`b3`,
//! `x-b3-*`) are never read or written: they pass through untouched. gRPC metadata
//! are HTTP/2 headers, so the same code serves gRPC.

use std::fmt;

use http::{HeaderMap, HeaderValue, header::HeaderName};
use serde::{Serialize, Serializer};

/// The W3C `traceparent` header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The W3C `tracestate` header.
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
/// The request id header used by Envoy-based meshes and many applications.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// `tracestate` longer than this is dropped rather than forwarded (the W3C
/// recommendation's limit for what a vendor must propagate).
pub const MAX_TRACESTATE: usize = 512;
/// `x-request-id` longer than this is replaced.
pub const MAX_REQUEST_ID: usize = 128;
/// The most list members a `tracestate` may hold.
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// Length of a version 00 `traceparent`: `vv-<32 hex>-<16 hex>-ff`.
const TRACEPARENT_LEN: usize = 55;

/// The sampled flag of `trace-flags`.
pub const FLAG_SAMPLED: u8 = 0x01;
/// Flags of traces the agent starts: sampled, so that applications behind the mesh
/// record spans for requests that entered it without a trace.
pub const NEW_TRACE_FLAGS: u8 = FLAG_SAMPLED;

const HEX: &[u8; 16] = b"0123456789abcdef";

fn encode_hex(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0x0f)];
    }
}

/// Lowercase hex only, as the W3C grammar (HEXDIGLC) requires.
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn decode_hex<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

/// A 16-byte trace id; never all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

impl TraceId {
    /// A random, non-zero trace id.
    pub fn random() -> Self {
        loop {
            let v = fastrand::u128(..);
            if v != 0 {
                return Self(v.to_be_bytes());
            }
        }
    }

    /// Parses 32 lowercase hex digits; `None` if malformed or all zeros.
    pub fn from_hex(hex: &[u8]) -> Option<Self> {
        decode_hex::<16>(hex).filter(|b| b != &[0; 16]).map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    fn write_hex(&self, out: &mut [u8]) {
        encode_hex(&self.0, out);
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 32];
        self.write_hex(&mut buf);
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

/// Serialises as 32 hex digits, the form tracing back ends search for.
impl Serialize for TraceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An 8-byte span (parent) id; never all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

impl SpanId {
    /// A random, non-zero span id.
    pub fn random() -> Self {
        loop {
            let v = fastrand::u64(..);
            if v != 0 {
                return Self(v.to_be_bytes());
            }
        }
    }

    /// Parses 16 lowercase hex digits; `None` if malformed or all zeros.
    pub fn from_hex(hex: &[u8]) -> Option<Self> {
        decode_hex::<8>(hex).filter(|b| b != &[0; 8]).map(Self)
    }

    pub fn as_bytes(&self) -> &[u8; 8] {
        &self.0
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 16];
        encode_hex(&self.0, &mut buf);
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

/// Whether the trace came with the request or was started here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A valid `traceparent` arrived; the trace continues.
    Propagated,
    /// None (or a malformed one) arrived; a new trace was started.
    Generated,
}

/// The trace context of one request at one hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: TraceId,
    parent_id: SpanId,
    flags: u8,
    tracestate: Option<HeaderValue>,
    request_id: HeaderValue,
}

impl TraceContext {
    /// Reads the context a request arrived with; starts a new trace when there is
    /// none or it is malformed. Never fails and never panics, whatever the bytes.
    pub fn from_headers(headers: &HeaderMap) -> (Self, Origin) {
        let request_id = request_id(headers).unwrap_or_else(new_request_id);
        match traceparent(headers) {
            Some((trace_id, parent_id, flags)) => {
                let tracestate = tracestate(headers);
                (Self { trace_id, parent_id, flags, tracestate, request_id }, Origin::Propagated)
            }
            None => {
                let root = Self {
                    trace_id: TraceId::random(),
                    parent_id: SpanId::random(),
                    flags: NEW_TRACE_FLAGS,
                    tracestate: None,
                    request_id,
                };
                (root, Origin::Generated)
            }
        }
    }

    /// The context for the next hop: the same trace, flags, state and request id,
    /// with a new parent id (this hop's span).
    pub fn child(&self) -> Self {
        Self { parent_id: SpanId::random(), ..self.clone() }
    }

    /// Writes `traceparent`, `tracestate` and `x-request-id`, replacing whatever the
    /// map held for them; every other header (B3 included) is left alone.
    ///
    /// `traceparent` and `x-request-id` differ on every request, so they are marked
    /// never-indexed for HPACK: an HTTP/2 encoder sends them literally instead of
    /// inserting each into its dynamic table, where they would only evict the
    /// headers that do repeat (`:authority`, `user-agent`, `content-type`) and cost
    /// both ends a table insert per request. HTTP/1 ignores the mark.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let mut parent = self.traceparent();
        parent.set_sensitive(true);
        headers.insert(TRACEPARENT.clone(), parent);
        match &self.tracestate {
            Some(state) => {
                headers.insert(TRACESTATE.clone(), state.clone());
            }
            None => {
                headers.remove(&TRACESTATE);
            }
        }
        let mut id = self.request_id.clone();
        id.set_sensitive(true);
        headers.insert(X_REQUEST_ID.clone(), id);
    }

    /// The `traceparent` value for this context (always version 00).
    pub fn traceparent(&self) -> HeaderValue {
        let mut buf = [b'-'; TRACEPARENT_LEN];
        buf[0..2].copy_from_slice(b"00");
        self.trace_id.write_hex(&mut buf[3..35]);
        encode_hex(&self.parent_id.0, &mut buf[36..52]);
        encode_hex(&[self.flags], &mut buf[53..55]);
        HeaderValue::from_bytes(&buf).expect("hex digits and dashes are a valid header value")
    }

    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The span id the next hop sees as its parent.
    pub fn parent_id(&self) -> SpanId {
        self.parent_id
    }

    pub fn flags(&self) -> u8 {
        self.flags
    }

    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// Sets or clears the sampled flag: for a trace the agent starts, the span
    /// exporter's sampling decision.
    pub fn set_sampled(&mut self, sampled: bool) {
        self.flags = if sampled { self.flags | FLAG_SAMPLED } else { self.flags & !FLAG_SAMPLED };
    }

    pub fn tracestate(&self) -> Option<&HeaderValue> {
        self.tracestate.as_ref()
    }

    /// The request id, for the access log.
    pub fn request_id(&self) -> &str {
        // Only visible ASCII is ever stored (checked or generated).
        self.request_id.to_str().unwrap_or_default()
    }
}

/// The single, valid `traceparent`, or `None`. Several headers are ambiguous and so
/// invalid.
fn traceparent(headers: &HeaderMap) -> Option<(TraceId, SpanId, u8)> {
    let mut values = headers.get_all(&TRACEPARENT).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    parse_traceparent(value.as_bytes())
}

/// Parses `version-traceid-parentid-flags`. Version 00 must be exactly 55 bytes;
/// a later version may append fields after a dash, which are ignored (the W3C rule
/// for forward compatibility); version ff is invalid.
fn parse_traceparent(raw: &[u8]) -> Option<(TraceId, SpanId, u8)> {
    let v = raw.trim_ascii();
    if v.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = decode_hex::<1>(&v[0..2])?[0];
    match version {
        0 if v.len() != TRACEPARENT_LEN => return None,
        0xff => return None,
        _ if v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-' => return None,
        _ => {}
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = TraceId::from_hex(&v[3..35])?;
    let parent_id = SpanId::from_hex(&v[36..52])?;
    let flags = decode_hex::<1>(&v[53..55])?[0];
    Some((trace_id, parent_id, flags))
}

/// The `tracestate` to forward: all its header lines joined, if well formed and
/// at most [`MAX_TRACESTATE`] bytes.
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(&TRACESTATE).iter();
    let first = values.next()?;
    let joined = match values.next() {
        None => first.clone(),
        Some(second) => {
            let mut buf = Vec::with_capacity(MAX_TRACESTATE);
            for v in [first, second].into_iter().chain(values) {
                if !buf.is_empty() {
                    buf.push(b',');
                }
                buf.extend_from_slice(v.as_bytes());
                if buf.len() > MAX_TRACESTATE {
                    return None;
                }
            }
            HeaderValue::from_bytes(&buf).ok()?
        }
    };
    (joined.len() <= MAX_TRACESTATE && valid_tracestate(joined.as_bytes())).then_some(joined)
}

/// `list-member *( OWS "," OWS list-member )`, empty members allowed, at most 32
/// non-empty members with distinct keys.
fn valid_tracestate(v: &[u8]) -> bool {
    let mut keys: [&[u8]; MAX_TRACESTATE_MEMBERS] = [&[]; MAX_TRACESTATE_MEMBERS];
    let mut count = 0;
    for member in v.split(|&b| b == b',') {
        let member = member.trim_ascii();
        if member.is_empty() {
            continue;
        }
        let Some(eq) = member.iter().position(|&b| b == b'=') else {
            return false;
        };
        let (key, value) = (&member[..eq], &member[eq + 1..]);
        if !valid_key(key) || !valid_value(value) || count == MAX_TRACESTATE_MEMBERS {
            return false;
        }
        if keys[..count].contains(&key) {
            return false;
        }
        keys[count] = key;
        count += 1;
    }
    true
}

fn key_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'*' | b'/')
}

/// `simple-key` (lcalpha, then up to 255 key chars) or `tenant@system`
/// (tenant: lcalpha/digit then up to 240; system: lcalpha then up to 13).
fn valid_key(key: &[u8]) -> bool {
    let part = |p: &[u8], first_digit_ok: bool, max: usize| {
        matches!(p.first(), Some(&c) if c.is_ascii_lowercase() || (first_digit_ok && c.is_ascii_digit()))
            && p.len() <= max
            && p.iter().all(|&b| key_char(b))
    };
    match key.iter().position(|&b| b == b'@') {
        None => part(key, false, 256),
        Some(at) => part(&key[..at], true, 241) && part(&key[at + 1..], false, 14),
    }
}

/// Up to 256 printable ASCII characters except `,` and `=`, not ending in a space.
fn valid_value(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= 256
        && value.last() != Some(&b' ')
        && value.iter().all(|&b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
}

/// The single, sane `x-request-id`: printable ASCII, 1..=128 bytes.
fn request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let b = value.as_bytes();
    let sane = !b.is_empty()
        && b.len() <= MAX_REQUEST_ID
        && b.iter().all(|&c| (0x20..=0x7e).contains(&c))
        && b.first() != Some(&b' ')
        && b.last() != Some(&b' ');
    sane.then(|| value.clone())
}

/// A random (version 4) UUID in its usual text form.
fn new_request_id() -> HeaderValue {
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    encode_hex(&bytes[0..4], &mut out[0..8]);
    encode_hex(&bytes[4..6], &mut out[9..13]);
    encode_hex(&bytes[6..8], &mut out[14..18]);
    encode_hex(&bytes[8..10], &mut out[19..23]);
    encode_hex(&bytes[10..16], &mut out[24..36]);
    HeaderValue::from_bytes(&out).expect("hex digits and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        map
    }

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_parent_id() {
        let (ctx, origin) = TraceContext::from_headers(&headers(&[("traceparent", PARENT)]));
        assert_eq!(origin, Origin::Propagated);
        assert_eq!(ctx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent_id().to_string(), "00f067aa0ba902b7");
        assert!(ctx.sampled());
        let child = ctx.child();
        let mut out = HeaderMap::new();
        child.apply(&mut out);
        let tp = out.get(&TRACEPARENT).expect("traceparent").to_str().expect("ascii");
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{tp}");
        assert!(tp.ends_with("-01"), "{tp}");
        assert_ne!(&tp[36..52], "00f067aa0ba902b7");
        assert_eq!(tp.len(), 55);
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0z",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            let (ctx, origin) =
                TraceContext::from_headers(&headers(&[("traceparent", bad), ("tracestate", "a=b")]));
            assert_eq!(origin, Origin::Generated, "{bad:?}");
            assert_ne!(ctx.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736", "{bad:?}");
            assert_eq!(ctx.flags(), NEW_TRACE_FLAGS);
            // tracestate belongs to the trace it came with: dropped with it.
            assert!(ctx.tracestate().is_none(), "{bad:?}");
        }
        let (_, origin) =
            TraceContext::from_headers(&headers(&[("traceparent", PARENT), ("traceparent", PARENT)]));
        assert_eq!(origin, Origin::Generated, "two traceparent headers are ambiguous");
    }

    #[test]
    fn future_versions_are_read_and_forwarded_as_version_00() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-what-the-future-holds";
        let (ctx, origin) = TraceContext::from_headers(&headers(&[("traceparent", v)]));
        assert_eq!(origin, Origin::Propagated);
        assert_eq!(ctx.flags(), 0x03);
        assert_eq!(ctx.traceparent(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03");
    }

    #[test]
    fn missing_traceparent_generates_a_sampled_root() {
        let (ctx, origin) = TraceContext::from_headers(&HeaderMap::new());
        assert_eq!(origin, Origin::Generated);
        assert!(ctx.sampled());
        let (other, _) = TraceContext::from_headers(&HeaderMap::new());
        assert_ne!(ctx.trace_id(), other.trace_id());
        let (parsed, origin) = TraceContext::from_headers(&headers(&[(
            "traceparent",
            ctx.traceparent().to_str().expect("ascii"),
        )]));
        assert_eq!(origin, Origin::Propagated);
        assert_eq!(parsed.trace_id(), ctx.trace_id());
    }

    #[test]
    fn tracestate_is_kept_as_is_when_valid_and_bounded() {
        let state = "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7,tenant@vendor=x";
        let (ctx, _) =
            TraceContext::from_headers(&headers(&[("traceparent", PARENT), ("tracestate", state)]));
        assert_eq!(ctx.tracestate().map(|v| v.as_bytes()), Some(state.as_bytes()));
        let mut out = headers(&[("tracestate", "stale=1")]);
        ctx.child().apply(&mut out);
        assert_eq!(out.get_all(&TRACESTATE).iter().collect::<Vec<_>>(), [state]);

        let (ctx, _) = TraceContext::from_headers(&headers(&[
            ("traceparent", PARENT),
            ("tracestate", "a=1"),
            ("tracestate", "b=2"),
        ]));
        assert_eq!(ctx.tracestate().map(|v| v.as_bytes()), Some(&b"a=1,b=2"[..]));

        let long = (0..30).map(|i| format!("k{i:02}={}", "v".repeat(15))).collect::<Vec<_>>().join(",");
        assert!(long.len() > MAX_TRACESTATE);
        let too_many = (0..33).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
        for bad in
            [long.as_str(), &too_many, "noequals", "Upper=1", "a=1,a=2", "a=b=c", "a=", "9a=1", "a=x\ty"]
        {
            let (ctx, origin) =
                TraceContext::from_headers(&headers(&[("traceparent", PARENT), ("tracestate", bad)]));
            assert_eq!(origin, Origin::Propagated);
            assert!(ctx.tracestate().is_none(), "{bad:?} kept");
            let mut out = headers(&[("tracestate", bad)]);
            ctx.apply(&mut out);
            assert!(out.get(&TRACESTATE).is_none(), "{bad:?} forwarded");
        }
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_generated_otherwise() {
        let (ctx, _) = TraceContext::from_headers(&headers(&[("x-request-id", "abc-123 xyz")]));
        assert_eq!(ctx.request_id(), "abc-123 xyz");
        for bad in ["x".repeat(129), String::new()] {
            let mut map = HeaderMap::new();
            map.insert(&X_REQUEST_ID, HeaderValue::from_str(&bad).expect("value"));
            let (ctx, _) = TraceContext::from_headers(&map);
            assert_ne!(ctx.request_id(), bad);
            assert_uuid(ctx.request_id());
        }
        let mut map = HeaderMap::new();
        map.insert(&X_REQUEST_ID, HeaderValue::from_bytes(b"caf\xc3\xa9").expect("obs-text value"));
        assert_uuid(TraceContext::from_headers(&map).0.request_id());
        let (ctx, _) = TraceContext::from_headers(&HeaderMap::new());
        assert_uuid(ctx.request_id());
        let mut out = HeaderMap::new();
        ctx.child().apply(&mut out);
        assert_eq!(out.get(&X_REQUEST_ID).expect("x-request-id"), ctx.request_id());
        // Unique per request: never-indexed, so HTTP/2 does not churn its HPACK table.
        assert!(out[&X_REQUEST_ID].is_sensitive());
        assert!(out[&TRACEPARENT].is_sensitive());
    }

    fn assert_uuid(id: &str) {
        let b = id.as_bytes();
        assert_eq!(b.len(), 36, "{id}");
        assert!([8, 13, 18, 23].iter().all(|&i| b[i] == b'-'), "{id}");
        assert_eq!(b[14], b'4', "version 4: {id}");
        assert!(matches!(b[19], b'8' | b'9' | b'a' | b'b'), "variant: {id}");
    }

    #[test]
    fn b3_headers_pass_through_untouched() {
        let b3 = [
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ];
        let mut map = headers(&b3);
        let before = map.clone();
        let (ctx, _) = TraceContext::from_headers(&map);
        ctx.child().apply(&mut map);
        for (k, _) in b3 {
            assert_eq!(
                map.get_all(k).iter().collect::<Vec<_>>(),
                before.get_all(k).iter().collect::<Vec<_>>()
            );
        }
    }

    fn hex_id(n: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<u8>(), n)
            .prop_filter("not all zero", |b| b.iter().any(|&x| x != 0))
            .prop_map(|b| b.iter().map(|x| format!("{x:02x}")).collect())
    }

    proptest! {
        #[test]
        fn arbitrary_header_bytes_never_panic(
            tp in proptest::collection::vec(any::<u8>(), 0..80),
            ts in proptest::collection::vec(any::<u8>(), 0..600),
            rid in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut map = HeaderMap::new();
            for (name, bytes) in [(&TRACEPARENT, &tp), (&TRACESTATE, &ts), (&X_REQUEST_ID, &rid)] {
                if let Ok(v) = HeaderValue::from_bytes(bytes) {
                    map.insert(name, v);
                }
            }
            let (ctx, origin) = TraceContext::from_headers(&map);
            if origin == Origin::Propagated {
                let hex = ctx.trace_id().to_string();
                prop_assert!(tp.windows(32).any(|w| w == hex.as_bytes()));
            }
            let mut out = map.clone();
            ctx.child().apply(&mut out);
            prop_assert!(out.get(&TRACESTATE).is_none_or(|v| v.len() <= MAX_TRACESTATE));
            prop_assert!(ctx.request_id().len() <= MAX_REQUEST_ID);
        }

        #[test]
        fn a_valid_parent_keeps_its_trace_id_with_a_new_parent_id(
            trace in hex_id(16),
            parent in hex_id(8),
            flags in any::<u8>(),
        ) {
            let tp = format!("00-{trace}-{parent}-{flags:02x}");
            let (ctx, origin) = TraceContext::from_headers(&headers(&[("traceparent", &tp)]));
            prop_assert_eq!(origin, Origin::Propagated);
            prop_assert_eq!(ctx.traceparent(), tp.as_str());
            let child = ctx.child();
            prop_assert_eq!(child.trace_id().to_string(), trace);
            prop_assert_ne!(child.parent_id().to_string(), parent);
            prop_assert_eq!(child.flags(), flags);
            let mut out = HeaderMap::new();
            child.apply(&mut out);
            let (next, origin) = TraceContext::from_headers(&out);
            prop_assert_eq!(origin, Origin::Propagated);
            prop_assert_eq!(next, child);
        }
    }
}
