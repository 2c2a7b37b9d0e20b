//! Request paths as authorization sees them, and as the workload then gets them.
//!
//! A path prefix rule is only as good as the agreement between what the agent
//! matches and what the workload serves: `/public/../secret` must not pass a
//! `/public/` rule and then be served as `/secret`. So, as Envoy's `normalize_path`
//! and `merge_slashes` do, the receiving agent rewrites every request path to one
//! canonical form *before* matching, and forwards that form, never the raw one:
//!
//! - percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded
//!   (`%2e` is `.`, `%7E` is `~`), every other escape is kept, in upper case;
//!   bytes outside ASCII are escaped the same way, so both spellings compare equal;
//! - runs of `/` are merged into one;
//! - dot segments are removed (RFC 3986 §5.2.4), never above the root.
//!
//! Forms different servers read differently are refused instead of guessed at
//! ([`PathError`], answered 400): an encoded `/` or `\` (`%2F`, `%5C`), a raw
//! `\`, a malformed escape (`%`, `%G0`, `%2`), an escaped control character
//! (`%00`), escapes that do not decode to UTF-8 (overlong forms such as
//! `%C0%AE`), and a dot segment carrying `;` parameters (`..;`), which servlet
//! containers strip before resolving dots.
//!
//! The query is neither normalised nor matched; `*` (the asterisk form of
//! `OPTIONS *`) stays `*` and matches no path prefix.

use std::fmt::Write as _;

/// Why a request path is refused rather than normalised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target is not a path")]
    NotAPath,
    #[error("encoded {0} in the path")]
    EncodedSeparator(&'static str),
    #[error("backslash in the path")]
    Backslash,
    #[error("malformed percent-escape in the path")]
    BadEscape,
    #[error("control character in the path")]
    Control,
    #[error("percent-escapes in the path do not decode to UTF-8")]
    NotUtf8,
    #[error("dot segment with parameters in the path")]
    DotWithParams,
}

/// Unreserved characters (RFC 3986 §2.3): an escape of one means the character.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The canonical form of `path` (a request path without its query), or why it is
/// refused. See the module documentation for the rules.
pub fn normalize(path: &str) -> Result<String, PathError> {
    if path == "*" {
        return Ok(path.to_owned());
    }
    if path.is_empty() {
        return Ok("/".to_owned());
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAPath);
    }
    let decoded = decode_unreserved(path.as_bytes())?;
    remove_dot_segments(&decoded)
}

/// Step one: escapes of unreserved characters decoded, other escapes upper-cased,
/// non-ASCII bytes escaped, the refused forms refused. Checks that everything the
/// escapes stand for is UTF-8.
fn decode_unreserved(bytes: &[u8]) -> Result<String, PathError> {
    let mut out = String::with_capacity(bytes.len());
    // What the path means once every escape is decoded, only to check it is UTF-8.
    let mut meaning = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) =
                    (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
                else {
                    return Err(PathError::BadEscape);
                };
                let v = hi << 4 | lo;
                match v {
                    b'/' => return Err(PathError::EncodedSeparator("slash (%2F)")),
                    b'\\' => return Err(PathError::EncodedSeparator("backslash (%5C)")),
                    0..=0x1f | 0x7f => return Err(PathError::Control),
                    v if is_unreserved(v) => out.push(v as char),
                    v => {
                        let _ = write!(out, "%{v:02X}");
                    }
                }
                meaning.push(v);
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::Control),
            0x80.. => {
                let _ = write!(out, "%{b:02X}");
                meaning.push(b);
                i += 1;
            }
            _ => {
                out.push(b as char);
                meaning.push(b);
                i += 1;
            }
        }
    }
    if std::str::from_utf8(&meaning).is_err() {
        return Err(PathError::NotUtf8);
    }
    Ok(out)
}

/// Step two: duplicate slashes merged and dot segments removed (RFC 3986 §5.2.4);
/// `path` starts with `/`. A segment that ends in `.` or `..` keeps the trailing
/// slash (`/a/b/..` is `/a/`).
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    // Empty segments come from `//` (merged) and from a trailing `/`.
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    for (i, segment) in segments.into_iter().enumerate() {
        let bare = segment.split(';').next().unwrap_or_default();
        if bare != segment && (bare == "." || bare == "..") {
            return Err(PathError::DotWithParams);
        }
        match segment {
            "" => trailing_slash = i == last,
            "." => trailing_slash = i == last,
            ".." => {
                kept.pop();
                trailing_slash = i == last;
            }
            s => {
                kept.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    Ok(out)
}

/// Whether a path prefix rule covers a normalised `path`: whole segments only. `/api`
/// matches `/api` and `/api/x` but not `/api-internal`; a prefix ending in `/`
/// (`/public/`) matches what is below it (and itself).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each tricky path and what authorization sees (or why it is refused). The same
    /// table drives the end-to-end test against nginx (tests/tests/enforce.rs).
    #[test]
    fn tricky_paths_normalise_or_are_refused() {
        use PathError::*;
        let table: &[(&str, Result<&str, PathError>)] = &[
            ("/public/a", Ok("/public/a")),
            ("", Ok("/")),
            ("/public/../secret", Ok("/secret")),
            ("/public/./a", Ok("/public/a")),
            ("/public/a/..", Ok("/public/")),
            ("/public/..", Ok("/")),
            ("/../../secret", Ok("/secret")),
            ("/public/%2e%2e/secret", Ok("/secret")),
            ("/public/%2E%2e/secret", Ok("/secret")),
            ("/public/.%2e/secret", Ok("/secret")),
            ("/public/%2e/a", Ok("/public/a")),
            ("//public//a", Ok("/public/a")),
            ("/public//..//secret", Ok("/secret")),
            ("/%70ublic/a", Ok("/public/a")),
            ("/public/%7ea", Ok("/public/~a")),
            ("/public/a%3bb", Ok("/public/a%3Bb")),
            ("/public/a%3Fb", Ok("/public/a%3Fb")),
            ("/public/%252e%252e/secret", Ok("/public/%252e%252e/secret")),
            ("/public/a;x=1", Ok("/public/a;x=1")),
            ("/public/x;/../../secret", Ok("/secret")),
            ("/public/caf%c3%a9", Ok("/public/caf%C3%A9")),
            ("/public/caf\u{e9}", Ok("/public/caf%C3%A9")),
            ("*", Ok("*")),
            ("/public/..;/secret", Err(DotWithParams)),
            ("/public/.;x/a", Err(DotWithParams)),
            ("/public/%2e%2e;/secret", Err(DotWithParams)),
            ("/public%2F..%2Fsecret", Err(EncodedSeparator("slash (%2F)"))),
            ("/public/%2f", Err(EncodedSeparator("slash (%2F)"))),
            ("/public/..%5Csecret", Err(EncodedSeparator("backslash (%5C)"))),
            ("/public/..\\secret", Err(Backslash)),
            ("/public/%", Err(BadEscape)),
            ("/public/%2", Err(BadEscape)),
            ("/public/%G0", Err(BadEscape)),
            ("/public/%00", Err(Control)),
            ("/public/%c0%ae%c0%ae/secret", Err(NotUtf8)),
            ("/public/%ff", Err(NotUtf8)),
            ("public/a", Err(NotAPath)),
        ];
        for (raw, want) in table {
            let got = normalize(raw);
            assert_eq!(got.as_deref().map_err(Clone::clone), want.clone(), "{raw:?}");
            // Normal forms are fixed points: normalising twice changes nothing.
            if let Ok(once) = &got {
                assert_eq!(normalize(once).as_deref(), Ok(once.as_str()), "{raw:?} twice");
            }
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        for (prefix, path, matches) in [
            ("/api", "/api", true),
            ("/api", "/api/x", true),
            ("/api", "/api-internal", false),
            ("/api", "/apix/y", false),
            ("/api", "/", false),
            ("/public/", "/public/", true),
            ("/public/", "/public/a/b", true),
            ("/public/", "/public", false),
            ("/public/", "/publicity", false),
            ("/", "/anything", true),
            ("/api", "*", false),
        ] {
            assert_eq!(prefix_matches(prefix, path), matches, "{prefix} vs {path}");
        }
    }
}
