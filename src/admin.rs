//! The admin listener: `/metrics`, `/healthz`, `/readyz`. Kept apart from
//! the ingress port so that it can stay on loopback or a private network.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::metrics::Metrics;
use crate::policy::PolicyStore;

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub policies: Arc<PolicyStore>,
    pub upstream: String,
    /// False once shutdown began: load balancers should stop sending.
    pub ready: AtomicBool,
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render(),
        ),
        "/healthz" => respond(
            StatusCode::OK,
            "application/json",
            br#"{"status":"alive"}"#.to_vec(),
        ),
        "/readyz" => {
            let set = state.policies.current();
            let ready = state.ready.load(Ordering::Relaxed);
            let body = serde_json::json!({
                "status": if ready { "ready" } else { "draining" },
                "policy_revision": set.revision,
                "policy_source": set.origin,
                "upstream": state.upstream,
            });
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(status, "application/json", body.to_string().into_bytes())
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "application/json",
            br#"{"error":"not_found"}"#.to_vec(),
        ),
    }
}

/// Serves until its event loop is dropped, which happens only after the
/// ingress workers have drained: `/readyz` answers 503 during the drain.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<AdminState>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = route(&state, &req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
