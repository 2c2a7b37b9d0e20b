//! Kubernetes annotation parsing (`control::registry::kubernetes::annotations`): a
//! Service's `mesh.dev/*` policy annotations and a Pod's `inject`/`weight`.
//!
//! Input: annotations as text, one `key=value` per line (split at the first `=`).
//!
//! Asserts, beyond "no panic": every problem names the object; a policy comes back
//! exactly when a policy annotation is present; the policy, printed back as
//! annotations, parses to the same policy without problems; agents accept it; a pod
//! weight reported without a problem is the number written; durations print back as
//! milliseconds to the same value.
#![no_main]

use std::collections::BTreeMap;

use control::registry::kubernetes::annotations::{self as a, Problems};
use libfuzzer_sys::fuzz_target;
use mesh_agent::balance::service::ServicePolicy;
use mesh_api as api;

const SERVICE: &str = "service fuzz/web";
const POD: &str = "pod fuzz/web-0";

/// Every annotation a Service's policy is read from.
const POLICY_ANNOTATIONS: [&str; 15] = [
    a::LB_ALGORITHM,
    a::HASH_HEADER,
    a::HASH_COOKIE,
    a::HASH_SOURCE_ADDRESS,
    a::VIRTUAL_NODES,
    a::SLOW_START,
    a::LOCALITY_AWARE,
    a::RETRIES,
    a::RETRY_ON,
    a::PER_TRY_TIMEOUT,
    a::CONNECT_TIMEOUT,
    a::REQUEST_TIMEOUT,
    a::IDLE_TIMEOUT,
    a::ALLOWED_PRINCIPALS,
    a::MTLS,
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let annotations: BTreeMap<String, String> =
        text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();

    let mut problems = Problems::default();
    let policy = a::service_policy(SERVICE, &annotations, &mut problems);
    for p in problems.into_vec() {
        assert!(p.starts_with(&format!("{SERVICE}: ")), "{p}");
    }
    let has_policy = POLICY_ANNOTATIONS.iter().any(|k| annotations.contains_key(*k));
    assert_eq!(policy.is_some(), has_policy);
    if let Some(policy) = policy {
        ServicePolicy::from_api(Some(&policy))
            .unwrap_or_else(|e| panic!("agents refuse the policy annotations give: {e}"));
        let printed = render(&policy);
        let mut problems = Problems::default();
        let reparsed = a::service_policy(SERVICE, &printed, &mut problems).unwrap_or_default();
        assert!(problems.is_empty(), "{printed:?}: {problems:?}");
        assert_eq!(reparsed, policy, "printed as {printed:?}");
    }

    let mut problems = Problems::default();
    let pod = a::pod_settings(POD, &annotations, &mut problems);
    let problems = problems.into_vec();
    for p in &problems {
        assert!(p.starts_with(&format!("{POD}: ")), "{p}");
    }
    let weight_problem = format!("{POD}: annotation {}=", a::WEIGHT);
    match annotations.get(a::WEIGHT) {
        Some(w) if !problems.iter().any(|p| p.starts_with(&weight_problem)) => {
            assert_eq!(Ok(pod.weight), w.trim().parse())
        }
        Some(_) => assert_eq!(pod.weight, 1, "a bad weight falls back to 1"),
        None => assert_eq!(pod.weight, 1),
    }

    for v in annotations.values() {
        if let Some(d) = a::parse_duration(v) {
            assert_eq!(a::parse_duration(&format!("{}ms", d.as_millis())), Some(d), "{v:?}");
        }
    }
});

/// The annotations that say what `policy` says.
fn render(policy: &api::Policy) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        out.insert(k.to_owned(), v);
    };
    let ms = |v: u32| format!("{v}ms");
    if let Some(lb) = &policy.load_balancer {
        let algorithm = match lb.algorithm() {
            api::Algorithm::RoundRobin => "round-robin",
            api::Algorithm::LeastRequest => "least-request",
            api::Algorithm::WeightedRoundRobin => "weighted-round-robin",
            api::Algorithm::RingHash => "ring-hash",
            api::Algorithm::Maglev => "maglev",
            api::Algorithm::Random => "random",
        };
        put(a::LB_ALGORITHM, algorithm.into());
        match lb.hash_key.as_ref().and_then(|k| k.source.as_ref()) {
            Some(api::hash_key::Source::Header(h)) => put(a::HASH_HEADER, h.clone()),
            Some(api::hash_key::Source::Cookie(c)) => put(a::HASH_COOKIE, c.clone()),
            Some(api::hash_key::Source::SourceAddress(b)) => put(a::HASH_SOURCE_ADDRESS, b.to_string()),
            None => {}
        }
        put(a::VIRTUAL_NODES, lb.virtual_nodes.to_string());
        put(a::SLOW_START, ms(lb.slow_start_ms));
        put(a::LOCALITY_AWARE, lb.locality_aware.to_string());
    }
    if let Some(r) = &policy.retries {
        put(a::RETRIES, r.attempts.to_string());
        put(a::RETRY_ON, r.retry_on.join(","));
        put(a::PER_TRY_TIMEOUT, ms(r.per_try_timeout_ms));
    }
    if let Some(t) = &policy.timeouts {
        put(a::CONNECT_TIMEOUT, ms(t.connect_ms));
        put(a::REQUEST_TIMEOUT, ms(t.request_ms));
        put(a::IDLE_TIMEOUT, ms(t.idle_ms));
    }
    for rule in &policy.authorization {
        let principals = if rule.principals.is_empty() { "*".to_owned() } else { rule.principals.join(",") };
        put(a::ALLOWED_PRINCIPALS, principals);
    }
    match policy.mtls() {
        api::MtlsMode::Unspecified => {}
        api::MtlsMode::Strict => put(a::MTLS, "strict".into()),
        api::MtlsMode::Permissive => put(a::MTLS, "permissive".into()),
    }
    out
}
