//! The admin API's route table: which method and path run which handler, in one
//! place per surface (the read-only TCP port, the privileged unix socket), with the
//! 404 and 405 answers for everything else.
//!
//! Handlers get the request with its body already read (bounded by
//! [`MAX_BODY_BYTES`]), so a route that takes a JSON body (as CNI requests will) needs
//! nothing more from the server, and handlers are tested with plain requests.

use std::{future::Future, pin::Pin, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, header};

/// A response body of the admin API.
pub type Body = Full<Bytes>;

/// Largest request body the admin servers read; bigger ones are answered 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

type BoxedFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;
type Handler<S> = Arc<dyn Fn(Arc<S>, Request<Bytes>) -> BoxedFuture + Send + Sync>;

struct Route<S> {
    method: Method,
    path: &'static str,
    handler: Handler<S>,
}

/// Routes of one admin surface over state `S`.
pub struct Router<S> {
    routes: Vec<Route<S>>,
    /// Appended to 404 and 405 answers (e.g. where the other routes are served).
    note: &'static str,
}

impl<S: Send + Sync + 'static> Default for Router<S> {
    fn default() -> Self {
        Router { routes: Vec::new(), note: "" }
    }
}

impl<S: Send + Sync + 'static> Router<S> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `method path` served by `handler`. One handler per method and path: a
    /// second registration is a programming error.
    ///
    /// # Panics
    /// If `method path` is already routed.
    pub fn route<F, Fut>(mut self, method: Method, path: &'static str, handler: F) -> Self
    where
        F: Fn(Arc<S>, Request<Bytes>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        assert!(
            !self.routes.iter().any(|r| r.method == method && r.path == path),
            "admin route {method} {path} registered twice"
        );
        let handler: Handler<S> = Arc::new(move |state, req| Box::pin(handler(state, req)));
        self.routes.push(Route { method, path, handler });
        self
    }

    /// Says, in 404 and 405 answers, where other routes are (e.g. the socket).
    pub fn note(mut self, note: &'static str) -> Self {
        self.note = note;
        self
    }

    /// Every `(method, path)` served here, in registration order.
    pub fn routes(&self) -> impl Iterator<Item = (&Method, &'static str)> {
        self.routes.iter().map(|r| (&r.method, r.path))
    }

    /// Whether `method path` is served here.
    pub fn serves(&self, method: &Method, path: &str) -> bool {
        self.routes.iter().any(|r| r.method == method && r.path == path)
    }

    /// Runs the handler of `req`'s method and path; 405 (with `Allow`) when the path
    /// is served with other methods only, 404 when not at all.
    pub async fn dispatch(&self, state: Arc<S>, req: Request<Bytes>) -> Response<Body> {
        let path = req.uri().path();
        if let Some(route) = self.routes.iter().find(|r| r.method == req.method() && r.path == path) {
            return (route.handler)(state, req).await;
        }
        let allowed: Vec<&str> =
            self.routes.iter().filter(|r| r.path == path).map(|r| r.method.as_str()).collect();
        if allowed.is_empty() {
            let mut paths: Vec<&str> = Vec::new();
            for r in &self.routes {
                if !paths.contains(&r.path) {
                    paths.push(r.path);
                }
            }
            return text(
                StatusCode::NOT_FOUND,
                format!("not found; served here: {}{}\n", paths.join(" "), self.note),
            );
        }
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} {path}: only {} here{}\n", req.method(), allowed.join(", "), self.note),
        );
        if let Ok(v) = header::HeaderValue::from_str(&allowed.join(", ")) {
            resp.headers_mut().insert(header::ALLOW, v);
        }
        resp
    }
}

/// A `text/plain` answer.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    r
}

/// An `application/json` answer (pretty, newline-terminated).
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("serialising: {e}\n")),
    }
}

/// The value of query parameter `name`, decoded.
pub fn query_param<B>(req: &Request<B>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn router() -> Router<()> {
        Router::new()
            .route(Method::GET, "/a", |_, _| async { text(StatusCode::OK, "a") })
            .route(Method::POST, "/b", |_, req: Request<Bytes>| async move {
                text(StatusCode::OK, req.into_body())
            })
            .note("; see elsewhere")
    }

    async fn call(
        r: &Router<()>,
        method: Method,
        path: &str,
        body: &'static str,
    ) -> (StatusCode, String, Option<String>) {
        let req =
            Request::builder().method(method).uri(path).body(Bytes::from_static(body.as_bytes())).unwrap();
        let resp = r.dispatch(Arc::new(()), req).await;
        let allow = resp.headers().get(header::ALLOW).map(|v| v.to_str().unwrap().to_owned());
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned(), allow)
    }

    #[tokio::test]
    async fn routes_by_method_and_path_and_answers_404_and_405_otherwise() {
        let r = router();
        assert_eq!(call(&r, Method::GET, "/a?x=1", "").await.0, StatusCode::OK);
        assert_eq!(call(&r, Method::POST, "/b", "payload").await.1, "payload", "the handler gets the body");
        let (status, body, allow) = call(&r, Method::POST, "/a", "").await;
        assert_eq!((status, allow.as_deref()), (StatusCode::METHOD_NOT_ALLOWED, Some("GET")));
        assert!(body.contains("; see elsewhere"), "{body}");
        let (status, body, _) = call(&r, Method::POST, "/nothing", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("/a /b") && body.contains("; see elsewhere"), "{body}");
        assert!(r.serves(&Method::POST, "/b") && !r.serves(&Method::GET, "/b"));
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_route_is_registered_once() {
        let _ = router().route(Method::GET, "/a", |_, _| async { text(StatusCode::OK, "") });
    }
}
