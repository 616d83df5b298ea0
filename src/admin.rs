//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/report`. Kept
//! apart from the ingress port so that it can stay on loopback or a
//! private network.

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
    /// What `/report` reads.
    pub report: ReportState,
}

/// The live sovereignty report's sources: the running configuration, geo
/// data and (through [`AdminState::policies`]) policy set.
pub struct ReportState {
    pub config: Arc<crate::config::Config>,
    pub geo: Arc<crate::geo::GeoStore>,
}

/// `/report`: the sovereignty report over the live trail's last
/// `[report] window`, at most `[report] max_records` decisions. JSON when
/// `?format=json` or the client accepts JSON and not HTML; HTML otherwise;
/// `?format=markdown` too.
async fn report(state: Arc<AdminState>, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let query = req.uri().query().unwrap_or("");
    let asked = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "format")
        .map(|(_, v)| v.into_owned());
    let accept = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = match asked.as_deref() {
        Some(f @ ("json" | "html" | "markdown")) => f.to_string(),
        Some(other) => {
            return respond(
                StatusCode::BAD_REQUEST,
                "application/json",
                serde_json::json!({"error": "bad_format", "message": format!("format {other:?}: say json, html or markdown")})
                    .to_string()
                    .into_bytes(),
            )
        }
        None if accept.contains("application/json") && !accept.contains("text/html") => {
            "json".to_string()
        }
        None => "html".to_string(),
    };
    let built = tokio::task::spawn_blocking(move || {
        let cfg = &state.report.config;
        let now = std::time::SystemTime::now();
        let since = now
            .checked_sub(cfg.report.window.0)
            .unwrap_or(std::time::UNIX_EPOCH);
        let facts = cfg
            .report
            .facts
            .as_deref()
            .map(crate::report::facts::Facts::from_file)
            .transpose()?;
        let files = crate::report::live_files(&cfg.audit.path, since)?;
        let set = state.policies.current();
        let geo = state.report.geo.current();
        crate::report::generate(crate::report::Sources {
            config: Some(cfg),
            policies: Some(&set),
            geo: &geo,
            facts: facts.as_ref(),
            files,
            filter: crate::audit::query::Filter {
                since: Some(since),
                ..Default::default()
            },
            max_records: Some(cfg.report.max_records),
            now,
        })
    })
    .await;
    match built {
        Ok(Ok(r)) => match format.as_str() {
            "json" => respond(
                StatusCode::OK,
                "application/json",
                crate::report::render::json(&r).into_bytes(),
            ),
            "markdown" => respond(
                StatusCode::OK,
                "text/markdown; charset=utf-8",
                crate::report::render::markdown(&r).into_bytes(),
            ),
            _ => respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                crate::report::render::html(&r).into_bytes(),
            ),
        },
        Ok(Err(e)) => {
            tracing::warn!("/report: {e:#}");
            respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "application/json",
                serde_json::json!({"error": "report_failed", "message": format!("{e:#}")})
                    .to_string()
                    .into_bytes(),
            )
        }
        Err(e) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "application/json",
            serde_json::json!({"error": "report_failed", "message": e.to_string()})
                .to_string()
                .into_bytes(),
        ),
    }
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
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = Arc::clone(&state);
                async move {
                    let r = if req.uri().path() == "/report" {
                        report(state, &req).await
                    } else {
                        route(&state, &req)
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
