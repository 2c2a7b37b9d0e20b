//! Mesh annotations on Services and Pods, parsed leniently.
//!
//! Annotations are typed by hand by operators, so a bad value must never take a
//! service off the mesh: each annotation is parsed on its own, a bad one is
//! reported (naming the object, the annotation and the value) and skipped, and
//! the rest of the policy still applies.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_api as api;

/// Prefix shared by every annotation the mesh reads.
pub const PREFIX: &str = "mesh.dev/";

/// Service: load-balancing algorithm.
pub const LB_ALGORITHM: &str = "mesh.dev/lb-algorithm";
/// Service: hash on this request header (ring-hash, maglev).
pub const HASH_HEADER: &str = "mesh.dev/hash-header";
/// Service: hash on this cookie (ring-hash, maglev).
pub const HASH_COOKIE: &str = "mesh.dev/hash-cookie";
/// Service: hash on the client address (ring-hash, maglev), "true" or "false".
pub const HASH_SOURCE_ADDRESS: &str = "mesh.dev/hash-source-address";
/// Service: ring-hash virtual nodes per endpoint.
pub const VIRTUAL_NODES: &str = "mesh.dev/virtual-nodes";
/// Service: slow-start window for new endpoints (duration such as "30s").
pub const SLOW_START: &str = "mesh.dev/slow-start";
/// Service: prefer endpoints in the caller's zone, "true" or "false".
pub const LOCALITY_AWARE: &str = "mesh.dev/locality-aware";
/// Service: total attempts per request including the first.
pub const RETRIES: &str = "mesh.dev/retries";
/// Service: comma-separated retry conditions.
pub const RETRY_ON: &str = "mesh.dev/retry-on";
/// Service: timeout of each attempt (duration).
pub const PER_TRY_TIMEOUT: &str = "mesh.dev/per-try-timeout";
/// Service: connect timeout (duration).
pub const CONNECT_TIMEOUT: &str = "mesh.dev/connect-timeout";
/// Service: whole-request timeout (duration).
pub const REQUEST_TIMEOUT: &str = "mesh.dev/request-timeout";
/// Service: idle connection timeout (duration).
pub const IDLE_TIMEOUT: &str = "mesh.dev/idle-timeout";
/// Service: comma-separated SPIFFE IDs allowed to call the service ("*" for any
/// authenticated peer).
pub const ALLOWED_PRINCIPALS: &str = "mesh.dev/allowed-principals";
/// Service: "strict" (plaintext to its pods is refused) or "permissive" (accepted as
/// the principal "unauthenticated"); absent: the mesh-wide default. A value that is
/// neither is reported and taken as strict: a mistyped "strict" must not open the
/// service.
pub const MTLS: &str = "mesh.dev/mtls";
/// Service: "true" offers the service to federated clusters (`mesh-control
/// --federation`); absent or "false": it stays in this cluster. Read apart from the
/// policy annotations, so an exported service without them keeps the defaults.
pub const EXPORT: &str = "mesh.dev/export";
/// Pod: "false" keeps the pod outside the mesh (plain traffic, no agent hop).
pub const INJECT: &str = "mesh.dev/inject";
/// Pod: relative weight of the pod's endpoints (0 = never selected).
pub const WEIGHT: &str = "mesh.dev/weight";

const SERVICE_ANNOTATIONS: &[&str] = &[
    LB_ALGORITHM,
    HASH_HEADER,
    HASH_COOKIE,
    HASH_SOURCE_ADDRESS,
    VIRTUAL_NODES,
    SLOW_START,
    LOCALITY_AWARE,
    RETRIES,
    RETRY_ON,
    PER_TRY_TIMEOUT,
    CONNECT_TIMEOUT,
    REQUEST_TIMEOUT,
    IDLE_TIMEOUT,
    ALLOWED_PRINCIPALS,
    MTLS,
];

const RETRY_CONDITIONS: &[&str] = &["connect-failure", "reset", "503", "unavailable"];

/// Longest value of a mesh annotation read (a principal list of a few dozen SPIFFE
/// IDs fits); a longer one is reported and ignored, never parsed.
pub const MAX_VALUE_BYTES: usize = 4096;

/// The first characters of a value too long to quote whole in a problem report.
fn preview(value: &str) -> String {
    let end = value.char_indices().nth(64).map_or(value.len(), |(i, _)| i);
    format!("{}... ({} bytes)", &value[..end], value.len())
}

/// Mesh annotations among `keys` whose values are over [`MAX_VALUE_BYTES`], each
/// reported; the caller ignores them.
fn oversized<'a>(
    object: &str,
    annotations: &'a BTreeMap<String, String>,
    keys: &[&str],
    problems: &mut Problems,
) -> Vec<&'a str> {
    let mut over = Vec::new();
    for (key, value) in
        annotations.iter().filter(|(k, v)| keys.contains(&k.as_str()) && v.len() > MAX_VALUE_BYTES)
    {
        problems.annotation(
            object,
            key,
            &preview(value),
            format_args!("longer than {MAX_VALUE_BYTES} bytes"),
        );
        over.push(key.as_str());
    }
    over
}

/// Collects the problems found while mapping, each naming the object and the field.
#[derive(Debug, Default)]
pub struct Problems(std::collections::BTreeSet<String>);

impl Problems {
    /// Records that `annotation` on `object` ("service ns/name") has a bad `value`.
    pub fn annotation(&mut self, object: &str, annotation: &str, value: &str, why: impl std::fmt::Display) {
        self.0.insert(format!("{object}: annotation {annotation}={value:?}: {why}; ignored"));
    }

    /// Records any other problem with `object`.
    pub fn other(&mut self, object: &str, what: impl std::fmt::Display) {
        self.0.insert(format!("{object}: {what}"));
    }

    /// The problems, sorted and without duplicates.
    pub fn into_vec(self) -> Vec<String> {
        self.0.into_iter().collect()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The policy a Service's annotations ask for; `None` when it has none, so the
/// agent's defaults apply.
pub fn service_policy(
    object: &str,
    annotations: &BTreeMap<String, String>,
    problems: &mut Problems,
) -> Option<api::Policy> {
    let mut seen_any = false;
    for key in annotations.keys().filter(|k| k.starts_with(PREFIX)) {
        if SERVICE_ANNOTATIONS.contains(&key.as_str()) {
            seen_any = true;
        } else if key != INJECT && key != WEIGHT && key != EXPORT {
            problems.other(object, format_args!("unknown annotation {key}; ignored"));
        }
    }
    if !seen_any {
        return None;
    }
    let over = oversized(object, annotations, SERVICE_ANNOTATIONS, problems);
    let get = |key: &str| {
        (!over.contains(&key))
            .then(|| annotations.get(key).map(|v| (key.to_owned(), v.trim().to_owned())))
            .flatten()
    };
    let mut policy = api::Policy::default();

    let mut lb = api::LoadBalancer::default();
    let mut lb_set = false;
    if let Some((key, v)) = get(LB_ALGORITHM) {
        match algorithm(&v) {
            Some(a) => {
                lb.algorithm = a as i32;
                lb_set = true;
            }
            None => problems.annotation(
                object,
                &key,
                &v,
                "not one of round-robin, least-request, weighted-round-robin, ring-hash, maglev, random",
            ),
        }
    }
    let mut hash_sources = Vec::new();
    if let Some((key, v)) = get(HASH_HEADER) {
        if is_header_name(&v) {
            hash_sources.push((key, api::hash_key::Source::Header(v.to_ascii_lowercase())));
        } else {
            problems.annotation(object, &key, &v, "not an HTTP header name");
        }
    }
    if let Some((key, v)) = get(HASH_COOKIE) {
        if is_cookie_name(&v) {
            hash_sources.push((key, api::hash_key::Source::Cookie(v)));
        } else {
            problems.annotation(object, &key, &v, "not a cookie name");
        }
    }
    if let Some((key, v)) = get(HASH_SOURCE_ADDRESS) {
        match parse_bool(&v) {
            Some(true) => hash_sources.push((key, api::hash_key::Source::SourceAddress(true))),
            Some(false) => {}
            None => problems.annotation(object, &key, &v, "not true or false"),
        }
    }
    match hash_sources.len() {
        0 => {}
        1 => {
            if let Some((_, source)) = hash_sources.pop() {
                lb.hash_key = Some(api::HashKey { source: Some(source) });
                lb_set = true;
            }
        }
        _ => {
            let keys: Vec<_> = hash_sources.iter().map(|(k, _)| k.as_str()).collect();
            problems.other(
                object,
                format_args!("only one hash key may be set, found {}; all ignored", keys.join(", ")),
            );
        }
    }
    if let Some((key, v)) = get(VIRTUAL_NODES) {
        match v.parse::<u32>() {
            Ok(n) if n <= api::limits::MAX_VIRTUAL_NODES => {
                lb.virtual_nodes = n;
                lb_set = true;
            }
            Ok(_) => problems.annotation(
                object,
                &key,
                &v,
                format_args!("more than {} virtual nodes per endpoint", api::limits::MAX_VIRTUAL_NODES),
            ),
            Err(_) => problems.annotation(object, &key, &v, "not a whole number"),
        }
    }
    if let Some(ms) = duration_ms(&get, SLOW_START, object, problems) {
        lb.slow_start_ms = ms;
        lb_set = true;
    }
    if let Some((key, v)) = get(LOCALITY_AWARE) {
        match parse_bool(&v) {
            Some(b) => {
                lb.locality_aware = b;
                lb_set = true;
            }
            None => problems.annotation(object, &key, &v, "not true or false"),
        }
    }
    if lb_set {
        policy.load_balancer = Some(lb);
    }

    let mut retries = api::RetryPolicy::default();
    let mut retries_set = false;
    if let Some((key, v)) = get(RETRIES) {
        match v.parse::<u32>() {
            Ok(n) => {
                retries.attempts = n;
                retries_set = true;
            }
            Err(_) => problems.annotation(object, &key, &v, "not a whole number of attempts"),
        }
    }
    if let Some((key, v)) = get(RETRY_ON) {
        let conditions: Vec<String> =
            v.split(',').map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect();
        match conditions.iter().find(|c| !RETRY_CONDITIONS.contains(&c.as_str())) {
            Some(bad) => problems.annotation(
                object,
                &key,
                &v,
                format_args!("{bad:?} is not one of {}", RETRY_CONDITIONS.join(", ")),
            ),
            None => {
                retries.retry_on = conditions;
                retries_set = true;
            }
        }
    }
    if let Some(ms) = duration_ms(&get, PER_TRY_TIMEOUT, object, problems) {
        retries.per_try_timeout_ms = ms;
        retries_set = true;
    }
    if retries_set {
        policy.retries = Some(retries);
    }

    let mut timeouts = api::Timeouts::default();
    let mut timeouts_set = false;
    for (key, field) in [
        (CONNECT_TIMEOUT, &mut timeouts.connect_ms),
        (REQUEST_TIMEOUT, &mut timeouts.request_ms),
        (IDLE_TIMEOUT, &mut timeouts.idle_ms),
    ] {
        if let Some(ms) = duration_ms(&get, key, object, problems) {
            *field = ms;
            timeouts_set = true;
        }
    }
    if timeouts_set {
        policy.timeouts = Some(timeouts);
    }

    if let Some((key, v)) = get(ALLOWED_PRINCIPALS) {
        let principals: Vec<String> =
            v.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect();
        match principals.iter().find(|p| !(p.starts_with("spiffe://") || p.as_str() == "*")) {
            Some(bad) => problems.annotation(
                object,
                &key,
                &v,
                format_args!("{bad:?} is not a SPIFFE ID (spiffe://trust-domain/ns/N/sa/SA) or \"*\""),
            ),
            None if principals.is_empty() => problems.annotation(object, &key, &v, "no principal given"),
            None => {
                // "*" stays "*": any authenticated peer. (No principals at all would also
                // admit plaintext callers under permissive mTLS.)
                policy.authorization.push(api::AuthorizationRule { principals, ..Default::default() });
            }
        }
    }
    if let Some((key, v)) = get(MTLS) {
        policy.mtls = match v.as_str() {
            "strict" => api::MtlsMode::Strict,
            "permissive" => api::MtlsMode::Permissive,
            _ => {
                problems.other(
                    object,
                    format_args!("annotation {key}={v:?}: not strict or permissive; taken as strict"),
                );
                api::MtlsMode::Strict
            }
        } as i32;
    }
    Some(policy)
}

/// What a Pod's annotations say about its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodSettings {
    /// Whether traffic to the pod goes through its node's agent.
    pub meshed: bool,
    /// Relative weight of the pod's endpoints.
    pub weight: u32,
}

/// Reads `mesh.dev/inject` and `mesh.dev/weight` from a Pod; bad values are
/// reported and the defaults (meshed, weight 1) used.
pub fn pod_settings(
    object: &str,
    annotations: &BTreeMap<String, String>,
    problems: &mut Problems,
) -> PodSettings {
    let mut settings = PodSettings { meshed: true, weight: 1 };
    if !oversized(object, annotations, &[INJECT, WEIGHT], problems).is_empty() {
        return settings;
    }
    if let Some(v) = annotations.get(INJECT) {
        match parse_bool(v.trim()) {
            Some(b) => settings.meshed = b,
            None => problems.annotation(object, INJECT, v, "not true or false"),
        }
    }
    if let Some(v) = annotations.get(WEIGHT) {
        match v.trim().parse::<u32>() {
            Ok(w) => settings.weight = w,
            Err(_) => problems.annotation(object, WEIGHT, v, "not a whole number"),
        }
    }
    settings
}

/// Whether a Service's `mesh.dev/export` offers it to federated clusters; a bad
/// value is reported and taken as "false" (exporting is never the mistake's result).
pub fn exported(object: &str, annotations: &BTreeMap<String, String>, problems: &mut Problems) -> bool {
    if !oversized(object, annotations, &[EXPORT], problems).is_empty() {
        return false;
    }
    let Some(v) = annotations.get(EXPORT) else { return false };
    match parse_bool(v.trim()) {
        Some(b) => b,
        None => {
            problems.annotation(object, EXPORT, v, "not true or false");
            false
        }
    }
}

fn duration_ms(
    get: &impl Fn(&str) -> Option<(String, String)>,
    key: &str,
    object: &str,
    problems: &mut Problems,
) -> Option<u32> {
    let (key, v) = get(key)?;
    match parse_duration(&v).map(|d| u32::try_from(d.as_millis())) {
        Some(Ok(ms)) => Some(ms),
        Some(Err(_)) => {
            problems.annotation(object, &key, &v, "too long");
            None
        }
        None => {
            problems.annotation(object, &key, &v, "not a duration such as 250ms, 5s, 2m or 1h");
            None
        }
    }
}

fn algorithm(v: &str) -> Option<api::Algorithm> {
    Some(match v {
        "round-robin" => api::Algorithm::RoundRobin,
        "least-request" => api::Algorithm::LeastRequest,
        "weighted-round-robin" => api::Algorithm::WeightedRoundRobin,
        "ring-hash" => api::Algorithm::RingHash,
        "maglev" => api::Algorithm::Maglev,
        "random" => api::Algorithm::Random,
        _ => return None,
    })
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Parses a whole number followed by a unit: ms, s, m or h ("250ms", "5s").
pub fn parse_duration(v: &str) -> Option<Duration> {
    let split = v.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = v.split_at(split);
    let n: u64 = number.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1_000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

/// RFC 9110 token characters.
fn is_header_name(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_cookie_name(v: &str) -> bool {
    is_header_name(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn no_mesh_annotations_means_default_policy() {
        let mut problems = Problems::default();
        let a = annotations(&[("kubectl.kubernetes.io/last-applied-configuration", "{}")]);
        assert_eq!(service_policy("service default/web", &a, &mut problems), None);
        assert!(problems.is_empty());
    }

    #[test]
    fn oversized_values_are_reported_by_name_and_ignored() {
        let mut problems = Problems::default();
        let huge = "spiffe://td/ns/a/sa/b,".repeat(1 << 16);
        let a = annotations(&[
            (VIRTUAL_NODES, "4294967295"),
            (ALLOWED_PRINCIPALS, &huge),
            (LB_ALGORITHM, "ring-hash"),
        ]);
        let p = service_policy("service shop/cart", &a, &mut problems).expect("the rest still applies");
        let lb = p.load_balancer.expect("lb");
        assert_eq!(
            (lb.algorithm, lb.virtual_nodes),
            (api::Algorithm::RingHash as i32, 0),
            "the default ring size"
        );
        assert!(p.authorization.is_empty(), "the oversized principal list is not parsed");
        let problems = problems.into_vec();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains(ALLOWED_PRINCIPALS)
                && p.contains("longer than 4096 bytes")
                && p.len() < 400),
            "named, and not quoted whole: {problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains(VIRTUAL_NODES) && p.contains("more than 4096 virtual nodes")),
            "{problems:?}"
        );
        let mut problems = Problems::default();
        let pod =
            pod_settings("pod shop/cart-1", &annotations(&[(WEIGHT, &"9".repeat(5000))]), &mut problems);
        assert_eq!(pod, PodSettings { meshed: true, weight: 1 });
        assert!(problems.into_vec()[0].contains(WEIGHT));
    }

    #[test]
    fn parses_every_service_annotation() {
        let mut problems = Problems::default();
        let a = annotations(&[
            (LB_ALGORITHM, "ring-hash"),
            (HASH_HEADER, "X-User"),
            (VIRTUAL_NODES, "300"),
            (SLOW_START, "30s"),
            (LOCALITY_AWARE, "true"),
            (RETRIES, "3"),
            (RETRY_ON, "connect-failure, 503"),
            (PER_TRY_TIMEOUT, "250ms"),
            (CONNECT_TIMEOUT, "2s"),
            (REQUEST_TIMEOUT, "1m"),
            (IDLE_TIMEOUT, "1h"),
            (ALLOWED_PRINCIPALS, "spiffe://td/ns/a/sa/b,spiffe://td/ns/c/sa/d"),
            (MTLS, "strict"),
        ]);
        let p = service_policy("service default/web", &a, &mut problems).expect("policy");
        assert_eq!(p.mtls(), api::MtlsMode::Strict);
        assert!(problems.is_empty(), "{problems:?}");
        let lb = p.load_balancer.expect("lb");
        assert_eq!(lb.algorithm, api::Algorithm::RingHash as i32);
        assert_eq!(lb.hash_key.and_then(|h| h.source), Some(api::hash_key::Source::Header("x-user".into())));
        assert_eq!((lb.virtual_nodes, lb.slow_start_ms, lb.locality_aware), (300, 30_000, true));
        let r = p.retries.expect("retries");
        assert_eq!((r.attempts, r.per_try_timeout_ms), (3, 250));
        assert_eq!(r.retry_on, vec!["connect-failure".to_string(), "503".to_string()]);
        let t = p.timeouts.expect("timeouts");
        assert_eq!((t.connect_ms, t.request_ms, t.idle_ms), (2_000, 60_000, 3_600_000));
        assert_eq!(p.authorization.len(), 1);
        assert_eq!(p.authorization[0].principals.len(), 2);
    }

    #[test]
    fn mtls_and_any_authenticated_peer() {
        let mut problems = Problems::default();
        let a = annotations(&[(MTLS, "permissive"), (ALLOWED_PRINCIPALS, "*")]);
        let p = service_policy("service default/web", &a, &mut problems).expect("policy");
        assert_eq!(p.mtls(), api::MtlsMode::Permissive);
        // "*" is kept: no principals would also admit unauthenticated callers.
        assert_eq!(p.authorization[0].principals, vec!["*".to_string()]);
        assert!(problems.is_empty(), "{problems:?}");

        let a = annotations(&[(MTLS, "Strict ")]);
        let p = service_policy("service default/web", &a, &mut problems).expect("policy");
        assert_eq!(p.mtls(), api::MtlsMode::Strict, "a value that is not exact fails closed");
        let problems = problems.into_vec();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].contains("annotation mesh.dev/mtls=\"Strict\": not strict or permissive"),
            "{problems:?}"
        );
        let a = annotations(&[]);
        assert_eq!(service_policy("service default/web", &a, &mut Problems::default()), None, "default");
    }

    #[test]
    fn bad_values_are_reported_by_name_and_the_rest_applies() {
        let mut problems = Problems::default();
        let a = annotations(&[
            (LB_ALGORITHM, "fastest"),
            (RETRIES, "three"),
            (REQUEST_TIMEOUT, "5 seconds"),
            (CONNECT_TIMEOUT, "1s"),
            ("mesh.dev/lb-algoritm", "maglev"),
        ]);
        let p = service_policy("service default/web", &a, &mut problems).expect("policy");
        assert_eq!(p.load_balancer, None, "bad algorithm falls back to the default");
        assert_eq!(p.retries, None);
        assert_eq!(p.timeouts.map(|t| (t.connect_ms, t.request_ms)), Some((1_000, 0)));
        let problems = problems.into_vec();
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("service default/web")
            && p.contains("mesh.dev/lb-algorithm=\"fastest\"")));
        assert!(problems.iter().any(|p| p.contains("mesh.dev/retries=\"three\"")));
        assert!(problems.iter().any(|p| p.contains("mesh.dev/request-timeout=\"5 seconds\"")));
        assert!(problems.iter().any(|p| p.contains("unknown annotation mesh.dev/lb-algoritm")));
    }

    #[test]
    fn two_hash_keys_are_refused() {
        let mut problems = Problems::default();
        let a = annotations(&[(LB_ALGORITHM, "maglev"), (HASH_HEADER, "x-a"), (HASH_COOKIE, "session")]);
        let p = service_policy("service default/web", &a, &mut problems).expect("policy");
        assert_eq!(p.load_balancer.and_then(|lb| lb.hash_key), None);
        assert_eq!(problems.into_vec().len(), 1);
    }

    #[test]
    fn export_is_read_apart_from_the_policy_and_a_bad_value_exports_nothing() {
        let mut problems = Problems::default();
        let set = annotations(&[(EXPORT, "true")]);
        assert!(exported("service a/b", &set, &mut problems));
        assert_eq!(service_policy("service a/b", &set, &mut problems), None, "no policy annotation");
        assert!(!exported("service a/b", &annotations(&[]), &mut problems));
        assert!(problems.is_empty(), "{problems:?}");
        assert!(!exported("service a/b", &annotations(&[(EXPORT, "yes")]), &mut problems));
        assert!(problems.into_vec()[0].contains("mesh.dev/export=\"yes\": not true or false"));
    }

    #[test]
    fn pod_settings_default_and_override() {
        let mut problems = Problems::default();
        let none = pod_settings("pod a/b", &BTreeMap::new(), &mut problems);
        assert_eq!(none, PodSettings { meshed: true, weight: 1 });
        let set = pod_settings("pod a/b", &annotations(&[(INJECT, "false"), (WEIGHT, "5")]), &mut problems);
        assert_eq!(set, PodSettings { meshed: false, weight: 5 });
        assert!(problems.is_empty());
        let bad = pod_settings("pod a/b", &annotations(&[(INJECT, "no"), (WEIGHT, "-1")]), &mut problems);
        assert_eq!(bad, PodSettings { meshed: true, weight: 1 });
        assert_eq!(problems.into_vec().len(), 2);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["", "5", "s", "5 s", "1.5s", "-1s", "5d", "99999999999999999999s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
