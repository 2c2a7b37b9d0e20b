//! Whether a request meets a route's match: path (exact, segment prefix, regex),
//! method, headers and query parameters, all compiled once per snapshot.
//!
//! The path is matched in the canonical form the receiving agent's authorization
//! also uses (`authz::path::normalize`), so `/v2/../v1/x` is routed as `/v1/x`, the
//! path the workload is then served; a path that cannot be normalised matches no
//! path condition.

use http::HeaderMap;
use mesh_api as api;
use mesh_api::routes::RouteError;
use regex::Regex;

/// An exact, prefix or regex condition on a string.
#[derive(Debug)]
pub enum ValueMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl ValueMatch {
    fn compile(field: &str, m: &api::StringMatch) -> Result<Self, RouteError> {
        use api::string_match::Kind;
        Ok(match &m.kind {
            Some(Kind::Exact(s)) => ValueMatch::Exact(s.clone()),
            Some(Kind::Prefix(s)) => ValueMatch::Prefix(s.clone()),
            Some(Kind::Regex(r)) => ValueMatch::Regex(
                mesh_api::routes::compile_regex(r)
                    .map_err(|message| RouteError { field: format!("{field}.regex"), message })?,
            ),
            None => {
                return Err(RouteError {
                    field: field.into(),
                    message: "set one of exact, prefix, regex".into(),
                });
            }
        })
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(s) => v == s,
            ValueMatch::Prefix(s) => v.starts_with(s.as_str()),
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// A path condition; a prefix matches whole segments (`/api` matches `/api` and
/// `/api/x`, not `/apix`), as Gateway API's `PathPrefix` does.
#[derive(Debug)]
pub enum PathMatch {
    Exact(String),
    /// Without its trailing `/` (except the root itself).
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    fn compile(field: &str, m: &api::StringMatch) -> Result<Self, RouteError> {
        Ok(match ValueMatch::compile(field, m)? {
            ValueMatch::Exact(s) => PathMatch::Exact(s),
            ValueMatch::Prefix(s) => {
                let trimmed = s.trim_end_matches('/');
                PathMatch::Prefix(if trimmed.is_empty() { "/".into() } else { trimmed.into() })
            }
            ValueMatch::Regex(r) => PathMatch::Regex(r),
        })
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(s) => path == s,
            PathMatch::Prefix(p) if p == "/" => path.starts_with('/'),
            PathMatch::Prefix(p) => {
                path.strip_prefix(p.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

/// One of a route's matches: every condition present must hold.
#[derive(Debug, Default)]
pub struct Match {
    path: Option<PathMatch>,
    method: Option<http::Method>,
    headers: Vec<(http::HeaderName, Option<ValueMatch>)>,
    query: Vec<(String, Option<ValueMatch>)>,
}

/// What a match reads from a request, computed once per request.
pub struct RequestView<'a> {
    /// The normalised path; `None` when the path cannot be normalised.
    pub path: Option<&'a str>,
    pub method: &'a http::Method,
    pub headers: &'a HeaderMap,
    /// The raw query (without `?`), or empty.
    pub query: &'a str,
}

impl Match {
    pub fn compile(at: &str, m: &api::RouteMatch) -> Result<Self, RouteError> {
        let path = m.path.as_ref().map(|p| PathMatch::compile(&format!("{at}.path"), p)).transpose()?;
        let method = if m.method.is_empty() {
            None
        } else {
            Some(http::Method::from_bytes(m.method.as_bytes()).map_err(|_| RouteError {
                field: format!("{at}.method"),
                message: format!("{:?} is not a method", m.method),
            })?)
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for (k, h) in m.headers.iter().enumerate() {
            let field = format!("{at}.headers[{k}]");
            let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| RouteError {
                field: format!("{field}.name"),
                message: format!("{:?} is not a header name", h.name),
            })?;
            let value =
                h.value.as_ref().map(|v| ValueMatch::compile(&format!("{field}.value"), v)).transpose()?;
            headers.push((name, value));
        }
        let mut query = Vec::with_capacity(m.query_params.len());
        for (k, q) in m.query_params.iter().enumerate() {
            let field = format!("{at}.query_params[{k}].value");
            let value = q.value.as_ref().map(|v| ValueMatch::compile(&field, v)).transpose()?;
            query.push((q.name.clone(), value));
        }
        Ok(Match { path, method, headers, query })
    }

    /// Whether the match reads the path (only then is it normalised).
    pub fn needs_path(&self) -> bool {
        self.path.is_some()
    }

    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        if let Some(p) = &self.path
            && !req.path.is_some_and(|path| p.matches(path))
        {
            return false;
        }
        if let Some(m) = &self.method
            && m != req.method
        {
            return false;
        }
        let header_ok = |(name, value): &(http::HeaderName, Option<ValueMatch>)| {
            let mut values = req.headers.get_all(name).iter();
            match value {
                None => values.next().is_some(),
                Some(v) => values.any(|h| h.to_str().is_ok_and(|s| v.matches(s))),
            }
        };
        if !self.headers.iter().all(header_ok) {
            return false;
        }
        self.query.iter().all(|(name, value)| {
            let mut found = query_values(req.query, name);
            match value {
                None => found.next().is_some(),
                Some(v) => found.any(|s| v.matches(&s)),
            }
        })
    }
}

/// The values of `name` in `query` (`a=1&b=2`), percent-decoded (`+` as a space);
/// a value that does not decode to UTF-8 is skipped.
fn query_values<'q>(query: &'q str, name: &'q str) -> impl Iterator<Item = String> + 'q {
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k)? == name).then(|| decode(v)).flatten()
    })
}

fn decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hi = (bytes[i + 1] as char).to_digit(16)?;
                let lo = (bytes[i + 2] as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use api::string_match::Kind;

    fn sm(kind: Kind) -> Option<api::StringMatch> {
        Some(api::StringMatch { kind: Some(kind) })
    }

    fn view<'a>(
        path: &'a str,
        method: &'a http::Method,
        headers: &'a HeaderMap,
        query: &'a str,
    ) -> RequestView<'a> {
        RequestView { path: Some(path), method, headers, query }
    }

    #[test]
    fn path_prefixes_match_whole_segments() {
        let m = Match::compile(
            "m",
            &api::RouteMatch { path: sm(Kind::Prefix("/api/".into())), ..Default::default() },
        )
        .unwrap();
        let (get, h) = (http::Method::GET, HeaderMap::new());
        for (path, want) in
            [("/api", true), ("/api/", true), ("/api/x", true), ("/apix", false), ("/", false)]
        {
            assert_eq!(m.matches(&view(path, &get, &h, "")), want, "{path}");
        }
        let root = Match::compile(
            "m",
            &api::RouteMatch { path: sm(Kind::Prefix("/".into())), ..Default::default() },
        )
        .unwrap();
        assert!(root.matches(&view("/anything", &get, &h, "")));
        // A path that could not be normalised matches no path condition.
        assert!(!root.matches(&RequestView { path: None, method: &get, headers: &h, query: "" }));
    }

    #[test]
    fn method_headers_and_query_must_all_hold() {
        let m = Match::compile(
            "m",
            &api::RouteMatch {
                method: "POST".into(),
                headers: vec![
                    api::NamedMatch { name: "x-canary".into(), value: sm(Kind::Exact("1".into())) },
                    api::NamedMatch { name: "x-user".into(), value: sm(Kind::Regex("[a-z]+-[0-9]+".into())) },
                ],
                query_params: vec![api::NamedMatch {
                    name: "tier".into(),
                    value: sm(Kind::Exact("gold plus".into())),
                }],
                ..Default::default()
            },
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-canary", "1".parse().unwrap());
        h.append("x-user", "nope".parse().unwrap());
        h.append("x-user", "ann-42".parse().unwrap());
        let post = http::Method::POST;
        assert!(m.matches(&view("/", &post, &h, "a=1&tier=gold+plus")));
        assert!(m.matches(&view("/", &post, &h, "tier=gold%20plus")));
        assert!(!m.matches(&view("/", &post, &h, "tier=gold")));
        assert!(!m.matches(&view("/", &http::Method::GET, &h, "tier=gold+plus")));
        h.insert("x-canary", "0".parse().unwrap());
        assert!(!m.matches(&view("/", &post, &h, "tier=gold+plus")));
    }

    #[test]
    fn a_name_without_value_asks_only_for_presence() {
        let m = Match::compile(
            "m",
            &api::RouteMatch {
                headers: vec![api::NamedMatch { name: "x-debug".into(), value: None }],
                query_params: vec![api::NamedMatch { name: "trace".into(), value: None }],
                ..Default::default()
            },
        )
        .unwrap();
        let mut h = HeaderMap::new();
        let get = http::Method::GET;
        assert!(!m.matches(&view("/", &get, &h, "trace")));
        h.insert("x-debug", "".parse().unwrap());
        assert!(m.matches(&view("/", &get, &h, "trace")));
        assert!(!m.matches(&view("/", &get, &h, "tracer=1")));
    }

    #[test]
    fn query_decoding_refuses_nothing_it_cannot_read() {
        assert_eq!(decode("a%2Fb+c").as_deref(), Some("a/b c"));
        assert_eq!(decode("%").as_deref(), Some("%"));
        assert_eq!(decode("%4").as_deref(), Some("%4"));
        assert_eq!(decode("%zz"), None);
        assert_eq!(decode("%ff"), None);
    }
}
