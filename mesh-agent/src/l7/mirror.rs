//! Mirrored requests: a copy of a request a route selects, sent to the route's
//! mirror backend, its answer read and dropped.
//!
//! A mirror must never slow or fail the caller, so the copy is spawned on its own
//! task after the original's body is in hand, bounded three ways: copies in flight
//! across the agent ([`MAX_IN_FLIGHT`]; beyond it a copy is dropped and counted),
//! each copy's time ([`MIRROR_TIMEOUT`]), and its body (only requests whose body
//! is empty or was held whole, at most `REPLAY_BUFFER`, are copied). As Istio does,
//! the copy's authority gets `-shadow` appended, so the mirror target can tell
//! copies from real traffic in its logs.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;
use tracing::debug;

use super::pool::{Body, Version};
use crate::listener::ProxyContext;
use crate::observe::labels::MeshName;
use crate::routing::Backend;

/// Mirrored copies in flight across the agent, at most.
pub const MAX_IN_FLIGHT: usize = 256;

/// A mirrored copy gets this long for its answer (and its body).
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

static IN_FLIGHT: Semaphore = Semaphore::const_new(MAX_IN_FLIGHT);

/// What a copy is made from: the original request's head and its held body.
pub struct Copy<'a> {
    pub parts: &'a http::request::Parts,
    pub body: Bytes,
    pub version: Version,
    pub hash_key: Option<u64>,
}

/// Sends a copy of the request to `backend` on its own task; returns at once.
pub fn spawn(ctx: &Arc<ProxyContext>, service: &MeshName, route: &str, backend: &Backend, copy: Copy<'_>) {
    let count = |outcome| crate::observe::metrics::mirrored(service, route, outcome);
    let Ok((target, balancer)) = &backend.target else {
        return count("dropped");
    };
    let Ok(permit) = IN_FLIGHT.try_acquire() else {
        return count("dropped");
    };
    let Some(guard) = balancer
        .pick(&crate::balance::PickContext { hash_key: copy.hash_key, locality: ctx.locality.as_ref() })
    else {
        return count("failed");
    };
    let endpoint = guard.addr();
    let dial = super::outbound::dial_for(target, endpoint);
    let req = shadow_request(copy.parts, copy.body);
    let (ctx, service, route, version) = (ctx.clone(), service.clone(), route.to_owned(), copy.version);
    tokio::spawn(async move {
        let _permit = permit;
        let _guard = guard;
        let send = async {
            let resp = ctx
                .upstreams
                .send_with_idle(endpoint, &dial, version, ctx.connect_timeout, None, req)
                .await
                .map_err(|e| e.to_string())?;
            // Read (and drop) the answer, so the pooled connection can be reused.
            resp.into_body().collect().await.map_err(|e| e.to_string()).map(drop)
        };
        let outcome = match tokio::time::timeout(MIRROR_TIMEOUT, send).await {
            Ok(Ok(())) => "sent",
            Ok(Err(e)) => {
                debug!(%endpoint, error = %e, "mirrored request failed");
                "failed"
            }
            Err(_) => {
                debug!(%endpoint, "mirrored request timed out");
                "failed"
            }
        };
        crate::observe::metrics::mirrored(&service, &route, outcome);
    });
}

/// The copy: same method, target and headers, the authority marked `-shadow`.
fn shadow_request(parts: &http::request::Parts, body: Bytes) -> Request<Body> {
    let mut req = Request::new(Full::new(body).map_err(|never| match never {}).boxed_unsync());
    *req.method_mut() = parts.method.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    let mut uri = parts.uri.clone().into_parts();
    if let Some(authority) = &uri.authority
        && let Ok(shadow) = shadow_authority(authority.as_str()).parse()
    {
        uri.authority = Some(shadow);
    }
    *req.uri_mut() = http::Uri::from_parts(uri).unwrap_or_else(|_| parts.uri.clone());
    if let Some(host) = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok())
        && let Ok(v) = HeaderValue::from_str(&shadow_authority(host))
    {
        req.headers_mut().insert(header::HOST, v);
    }
    req
}

/// `web:8080` -> `web-shadow:8080`; `web` -> `web-shadow`. An IPv6 literal has no
/// name to mark and is kept as it is.
fn shadow_authority(authority: &str) -> String {
    if authority.starts_with('[') {
        return authority.to_owned();
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{host}-shadow:{port}")
        }
        _ => format!("{authority}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_is_marked_shadow_and_keeps_the_rest() {
        assert_eq!(shadow_authority("web"), "web-shadow");
        assert_eq!(shadow_authority("web.shop:8080"), "web.shop-shadow:8080");
        assert_eq!(shadow_authority("10.0.0.1:80"), "10.0.0.1-shadow:80");
        assert_eq!(shadow_authority("[::1]:80"), "[::1]:80");
        let (mut parts, ()) = Request::builder()
            .method("POST")
            .uri("http://web:80/orders?id=1")
            .header("host", "web:80")
            .header("x-user", "ann")
            .body(())
            .expect("request")
            .into_parts();
        parts.version = http::Version::HTTP_11;
        let copy = shadow_request(&parts, Bytes::from_static(b"{}"));
        assert_eq!(copy.method(), "POST");
        assert_eq!(copy.uri().to_string(), "http://web-shadow:80/orders?id=1");
        assert_eq!(copy.headers()["host"], "web-shadow:80");
        assert_eq!(copy.headers()["x-user"], "ann");
    }
}
