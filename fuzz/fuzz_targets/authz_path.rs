//! Per-request authorization on the receiving agent (`mesh_agent::authz`): allow
//! rules against the peer, the method and the request target's path, the path taken
//! from the request target as hyper parses it and normalised (`authz::path`) as the
//! receiving agent does before matching and forwarding.
//!
//! Input, as text lines: the peer, the method, the request target, then one rule per
//! line: `principals|methods|path prefixes`, each a comma-separated list (empty for
//! none). The last rule is also tried on its own and added to the others.
//!
//! Asserts, beyond "no panic": normalising is idempotent and leaves no doubled slash
//! and no dot segment; a path that does not normalise is refused whatever the rules;
//! otherwise no rules allow everything, a rule without conditions allows everything,
//! adding a rule to others never takes an allow away, methods compare without regard
//! to case, a rule naming only principals admits exactly those; for a path and a
//! prefix that need no normalisation (plain segments) a prefix rule allows exactly
//! the paths under it, segment by segment (`/api` never covers `/api-internal`).
//! A peer outside the local trust domain (`cluster.local`) is a federated caller:
//! no rules, a rule without principals and `*` admit it never; only its exact ID or
//! `spiffe://<its domain>/*` does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::authz::{HttpRule, Principal, path};

fn list(field: &str) -> Vec<String> {
    if field.is_empty() { Vec::new() } else { field.split(',').map(str::to_owned).collect() }
}

fn rule(line: &str) -> HttpRule {
    let mut fields = line.splitn(3, '|');
    let mut next = || list(fields.next().unwrap_or_default());
    HttpRule { principals: next(), methods: next(), path_prefixes: next() }
}

/// The trust domain the agent under test serves.
const LOCAL: &str = "cluster.local";

/// Whether `peer` is a caller of the local trust domain (else a federated one).
fn is_local(peer: &str) -> bool {
    peer.strip_prefix("spiffe://").and_then(|r| r.split_once('/')).is_some_and(|(d, _)| d == LOCAL)
}

/// Whether a principal entry names the federated `peer`: its ID or its domain's `/*`.
fn names_federated(p: &str, peer: &str) -> bool {
    let domain = peer.strip_prefix("spiffe://").and_then(|r| r.split_once('/')).map(|(d, _)| d);
    p == peer || domain.is_some_and(|d| !d.is_empty() && p == format!("spiffe://{d}/*"))
}

/// The agent's decision for one request to one service's rules: the path as hyper
/// gives it to the proxy, normalised first (refused when it does not normalise).
fn verdict(rules: &[HttpRule], peer: &str, method: &str, uri: &http::Uri) -> bool {
    let Ok(normalised) = path::normalize(uri.path()) else { return false };
    let caller = Principal::Authenticated(peer);
    (rules.is_empty() && is_local(peer)) || rules.iter().any(|r| r.allows(caller, LOCAL, method, &normalised))
}

/// As the agent builds a rule from the snapshot: prefixes normalised.
fn built(r: HttpRule) -> HttpRule {
    let api = mesh_api::AuthorizationRule {
        principals: r.principals,
        methods: r.methods,
        path_prefixes: r.path_prefixes,
    };
    HttpRule::from_api(&api)
}

/// Segments of unreserved characters only, single slashes, no dot segments: a path
/// every normalisation leaves as it is.
fn plain(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains("//")
        && path
            .split('/')
            .skip(1)
            .all(|seg| seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let (Some(peer), Some(method), Some(target)) = (lines.next(), lines.next(), lines.next()) else { return };
    let Ok(uri) = target.parse::<http::Uri>() else { return };
    let mut rules: Vec<HttpRule> = lines.map(|l| built(rule(l))).collect();
    let extra = rules.pop().unwrap_or_default();
    let verdict_now = verdict(&rules, peer, method, &uri);

    let Ok(normalised) = path::normalize(uri.path()) else {
        assert!(!verdict(&[], peer, method, &uri), "a path that does not normalise was allowed");
        return;
    };
    assert_eq!(path::normalize(&normalised).as_deref(), Ok(normalised.as_str()), "normalising twice changed it");
    assert!(!normalised.contains("//"), "{normalised:?} keeps a doubled slash");
    assert!(
        !normalised.split('/').any(|seg| seg == "." || seg == ".."),
        "{normalised:?} keeps a dot segment"
    );

    let local = is_local(peer);
    assert_eq!(verdict(&[], peer, method, &uri), local, "no rules allow every local caller, no federated one");
    assert_eq!(
        verdict(&[HttpRule::default()], peer, method, &uri),
        local,
        "an empty rule allows every local caller, no federated one"
    );

    let mut more = rules.clone();
    more.push(extra.clone());
    // (No rules at all is the one list that allows everything by itself.)
    if verdict_now && !rules.is_empty() {
        assert!(verdict(&more, peer, method, &uri), "adding a rule took an allow away");
    }

    let upper = method.to_ascii_uppercase();
    let lower = method.to_ascii_lowercase();
    assert_eq!(verdict(&rules, peer, &upper, &uri), verdict_now, "method case changed the verdict");
    assert_eq!(verdict(&rules, peer, &lower, &uri), verdict_now, "method case changed the verdict");

    let principals = HttpRule { principals: extra.principals.clone(), ..Default::default() };
    let named = match local {
        true => extra.principals.is_empty() || extra.principals.iter().any(|p| p == "*" || p == peer),
        false => extra.principals.iter().any(|p| names_federated(p, peer)),
    };
    assert_eq!(verdict(&[principals], peer, method, &uri), named, "principals {:?}", extra.principals);

    let path = uri.path();
    for prefix in extra.path_prefixes.iter().filter(|p| plain(p)) {
        if plain(path) {
            let rule = HttpRule { path_prefixes: vec![prefix.clone()], ..Default::default() };
            let under = match prefix.ends_with('/') {
                true => path.starts_with(prefix.as_str()),
                false => path == prefix.as_str() || path.starts_with(&format!("{prefix}/")),
            };
            assert_eq!(verdict(&[rule], peer, method, &uri), under && local, "{prefix:?} and {path:?}");
        }
    }
});
