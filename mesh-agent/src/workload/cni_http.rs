//! The CNI routes of the agent's unix socket: [`handle`] turns one HTTP request
//! (`POST /cni/v1/{add,del,check}`, JSON body) into a call on [`CniPods`] and its
//! answer into a response. It takes any request body type, so the socket's server
//! mounts it as it is: route every path under [`PATH_PREFIX`](super::cni::PATH_PREFIX) here.
//!
//! Every refusal has a [`CniError`] body, which the plugin relays to the runtime;
//! the status is for people reading with curl.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use serde::{Serialize, de::DeserializeOwned};

use super::cni::{
    ADD_PATH, CHECK_PATH, CniError, CniPods, DEL_PATH, MAX_BODY_BYTES, PodAnnounce, PodRelease, PodSink, code,
};

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value)
        .unwrap_or_else(|e| format!("{{\"code\":103,\"msg\":\"{e}\"}}").into_bytes());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

/// The HTTP status that goes with a refusal's code.
pub fn status_of(e: &CniError) -> StatusCode {
    match e.code {
        code::INCOMPATIBLE_VERSION | code::INVALID_ENV | code::DECODE | code::INVALID_CONFIG => {
            StatusCode::BAD_REQUEST
        }
        code::POD_UNKNOWN => StatusCode::UNPROCESSABLE_ENTITY,
        code::CONFLICT => StatusCode::CONFLICT,
        code::NOT_SERVED => StatusCode::NOT_FOUND,
        code::TRY_AGAIN_LATER | code::LIMIT => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn refusal(e: &CniError) -> Response<Full<Bytes>> {
    json(status_of(e), e)
}

async fn decode<T: DeserializeOwned, B>(body: B) -> Result<T, CniError>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bytes = match Limited::new(body, MAX_BODY_BYTES).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            return Err(CniError::new(
                code::DECODE,
                format!("reading the request: {e} (at most {MAX_BODY_BYTES} bytes)"),
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        CniError::new(code::DECODE, format!("the request is not valid JSON for this route: {e}"))
    })
}

/// Answers one request on the CNI routes.
pub async fn handle<S, B>(pods: &CniPods<S>, req: Request<B>) -> Response<Full<Bytes>>
where
    S: PodSink,
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_owned();
    if !matches!(path.as_str(), ADD_PATH | DEL_PATH | CHECK_PATH) {
        let e = CniError::new(
            code::AGENT_PROTOCOL,
            format!(
                "{path}: not a CNI route of this agent ({ADD_PATH}, {DEL_PATH}, {CHECK_PATH}; is mesh-cni newer than the agent?)"
            ),
        );
        return json(StatusCode::NOT_FOUND, &e);
    }
    if req.method() != Method::POST {
        let e = CniError::new(code::AGENT_PROTOCOL, format!("{path} takes POST, not {}", req.method()));
        return json(StatusCode::METHOD_NOT_ALLOWED, &e);
    }
    let body = req.into_body();
    let result = match path.as_str() {
        ADD_PATH => match decode::<PodAnnounce, _>(body).await {
            Ok(pod) => pods.add(pod).await.map(|s| json(StatusCode::OK, &s)),
            Err(e) => Err(e),
        },
        CHECK_PATH => match decode::<PodAnnounce, _>(body).await {
            Ok(pod) => pods.check(pod).await.map(|s| json(StatusCode::OK, &s)),
            Err(e) => Err(e),
        },
        _ => match decode::<PodRelease, _>(body).await {
            Ok(release) => pods.remove(release).await.map(|()| json(StatusCode::OK, &serde_json::json!({}))),
            Err(e) => Err(e),
        },
    };
    result.unwrap_or_else(|e| {
        tracing::warn!(path, code = e.code, error = %e, "CNI request refused");
        refusal(&e)
    })
}
