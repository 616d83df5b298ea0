//! Stage 6, **enforce**: carry out the ruling. Either answer the client
//! directly (403, 503) or forward the request to the upstream over a pooled
//! keep-alive connection and stream the answer back (502/504 when the
//! upstream fails). Bodies are streamed both ways, never buffered whole.

mod pool;
#[cfg(target_os = "linux")]
mod splice;
pub mod tunnel;

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};

pub use pool::PooledBody;
use pool::{Dialer, Pool, PoolError};

use crate::config::{UpstreamConfig, UpstreamUrl};
use crate::metrics::{Metrics, UpstreamError};
use crate::policy::Reason;

pub const DECISION_ID: HeaderName = HeaderName::from_static("x-rempart-decision-id");

/// The body of every response rempart sends: the upstream's, streamed, or
/// one of rempart's own small JSON bodies.
pub enum ProxyBody {
    Upstream(PooledBody),
    /// An egress destination's answer, its bytes counted as they pass.
    Metered(Metered),
    Full(Option<Bytes>),
}

/// A streamed body whose data bytes are added to a counter as they pass
/// (egress plain requests: bytes to and from the destination).
pub struct Metered {
    inner: Incoming,
    counter: prometheus::IntCounter,
}

impl Metered {
    pub fn new(inner: Incoming, counter: prometheus::IntCounter) -> Self {
        Metered { inner, counter }
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.counter.inc_by(data.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Metered(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Metered(b) => b.is_end_stream(),
            ProxyBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Metered(b) => b.size_hint(),
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// The body sent upstream: the client's, streamed, or — after the classify
/// stage inspected its beginning — the frames already read, then the rest
/// of the client's body, then the error that interrupted reading if any.
pub enum RequestBody {
    Streaming(Incoming),
    Replay {
        frames: std::collections::VecDeque<Frame<Bytes>>,
        rest: Option<Incoming>,
        error: Option<BoxError>,
    },
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Streaming(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestBody::Replay {
                frames,
                rest,
                error,
            } => {
                if let Some(f) = frames.pop_front() {
                    return Poll::Ready(Some(Ok(f)));
                }
                if let Some(e) = error.take() {
                    return Poll::Ready(Some(Err(e)));
                }
                match rest {
                    Some(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streaming(b) => b.is_end_stream(),
            RequestBody::Replay {
                frames,
                rest,
                error,
            } => {
                frames.is_empty()
                    && error.is_none()
                    && rest.as_ref().is_none_or(Body::is_end_stream)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streaming(b) => b.size_hint(),
            RequestBody::Replay { frames, rest, .. } => {
                let buffered: u64 = frames
                    .iter()
                    .filter_map(Frame::data_ref)
                    .map(|d| d.len() as u64)
                    .sum();
                match rest {
                    None => SizeHint::with_exact(buffered),
                    Some(b) => {
                        let inner = b.size_hint();
                        let mut hint = SizeHint::new();
                        hint.set_lower(inner.lower().saturating_add(buffered));
                        if let Some(upper) = inner.upper() {
                            hint.set_upper(upper.saturating_add(buffered));
                        }
                        hint
                    }
                }
            }
        }
    }
}

/// A JSON answer from rempart itself.
pub fn json_response(
    status: StatusCode,
    decision_id: &str,
    body: serde_json::Value,
) -> Response<ProxyBody> {
    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let mut resp = Response::new(ProxyBody::Full(Some(bytes)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(decision_id) {
        h.insert(DECISION_ID, v);
    }
    resp
}

/// A request task failed unexpectedly (a bug): answer without details.
pub fn internal_error() -> Response<ProxyBody> {
    json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "",
        serde_json::json!({"error": "internal_error"}),
    )
}

/// A malformed request, refused before the policy: `code` (its reason's
/// code) and `message` say why.
pub fn bad_request(decision_id: &str, code: &str, message: &str) -> Response<ProxyBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        decision_id,
        serde_json::json!({"error": code, "decision_id": decision_id, "message": message}),
    )
}

pub fn forbidden(decision_id: &str, reasons: &[Reason]) -> Response<ProxyBody> {
    json_response(
        StatusCode::FORBIDDEN,
        decision_id,
        serde_json::json!({"error": "forbidden", "decision_id": decision_id, "reasons": reasons}),
    )
}

/// A denial shaped by an OPA-Envoy decision: its `http_status` (403 by
/// default), its `headers`, and its `body` (else rempart's JSON denial).
pub fn envoy_denial(
    decision_id: &str,
    over: &crate::policy::envoy::ResponseOverride,
    reasons: &[Reason],
) -> Response<ProxyBody> {
    let status = over
        .http_status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::FORBIDDEN);
    let mut resp = match &over.body {
        Some(body) => {
            let mut resp = Response::new(ProxyBody::Full(Some(Bytes::from(body.clone()))));
            resp.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            resp
        }
        None => forbidden(decision_id, reasons),
    };
    *resp.status_mut() = status;
    crate::policy::envoy::add_headers(&over.headers, resp.headers_mut());
    resp
}

pub fn policy_unavailable(decision_id: &str) -> Response<ProxyBody> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        decision_id,
        serde_json::json!({
            "error": "policy_unavailable",
            "decision_id": decision_id,
            "message": "the access policy could not be evaluated; the request was refused"
        }),
    )
}

/// Sync durability mode: the request's record could not be made durable,
/// so the request is refused (or its response withheld) rather than served
/// unaudited.
/// `decision.error` of a request refused because its record could not be
/// made durable (sync mode).
pub const AUDIT_UNAVAILABLE: &str =
    "audit trail unavailable (durability = sync): the decision's record could not be written";

pub fn audit_unavailable(decision_id: &str, status: u16) -> Response<ProxyBody> {
    json_response(
        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        decision_id,
        serde_json::json!({
            "error": "audit_unavailable",
            "decision_id": decision_id,
            "message": "the audit trail cannot be written; the request was refused"
        }),
    )
}

/// The upstream connection pool of one worker.
pub struct Upstream {
    pool: Arc<Pool>,
    url: UpstreamUrl,
    response_timeout: Duration,
    preserve_host: bool,
}

/// What came back from the upstream.
pub enum Forwarded {
    Response(Response<PooledBody>),
    Failed {
        kind: UpstreamError,
        message: String,
    },
}

impl Upstream {
    /// The pool connects to `ip` (resolved and located once at start),
    /// never to what the name resolves to later; for an `https://` URL the
    /// certificate is checked against the URL's host, which is also sent
    /// as SNI. `tls` is the client configuration from `[upstream.tls]`.
    pub fn new(
        cfg: &UpstreamConfig,
        url: UpstreamUrl,
        ip: std::net::IpAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let tls = if url.is_https() {
            let host = url
                .authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            let server_name =
                rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
                    anyhow::anyhow!("upstream host {host:?} is not a valid TLS server name: {e}")
                })?;
            // The pool speaks HTTP/1.1 only: offer nothing else by ALPN.
            let mut config = (*tls).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some((
                tokio_rustls::TlsConnector::from(Arc::new(config)),
                server_name,
            ))
        } else {
            None
        };
        let dialer = Dialer {
            addr: std::net::SocketAddr::new(ip, url.port()),
            connect_timeout: cfg.connect_timeout.0,
            tls,
        };
        Ok(Upstream {
            pool: Pool::new(dialer, cfg.pool_max_idle, cfg.pool_idle_timeout.0),
            url,
            response_timeout: cfg.response_timeout.0,
            preserve_host: cfg.preserve_host,
        })
    }

    /// Sends the request upstream and waits (bounded) for the response head.
    pub async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: RequestBody,
        peer_ip: &HeaderValue,
        client_tls: bool,
        metrics: &Metrics,
    ) -> Forwarded {
        // HTTP/2 clients send the authority in the URI, not in a Host header.
        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        // Origin form (`/path?query`): the connection already goes to the
        // upstream. An HTTP/1.1 request is usually in that form already.
        let origin_form = parts.uri.scheme().is_none() && parts.uri.authority().is_none();
        if !(origin_form && self.url.prefix.is_empty()) {
            let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let uri = format!("{}{}", self.url.prefix, path_and_query);
            parts.uri = match uri.parse() {
                Ok(u) => u,
                Err(e) => {
                    return Forwarded::Failed {
                        kind: UpstreamError::Protocol,
                        message: format!("cannot build upstream URI: {e}"),
                    }
                }
            };
        }
        strip_hop_by_hop(&mut parts.headers);
        set_forwarded(
            &mut parts.headers,
            peer_ip,
            client_tls,
            original_host.as_ref(),
        );
        let host = match (&original_host, self.preserve_host) {
            (Some(h), true) => Some(h.clone()),
            _ => HeaderValue::from_str(self.url.authority.as_str()).ok(),
        };
        if let Some(h) = host {
            parts.headers.insert(header::HOST, h);
        }
        parts.version = http::Version::HTTP_11;
        let req = http::Request::from_parts(parts, body);

        let started = Instant::now();
        let result = tokio::time::timeout(self.response_timeout, self.pool.send(req)).await;
        metrics.observe_upstream(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(mut resp)) => {
                strip_hop_by_hop(resp.headers_mut());
                Forwarded::Response(resp)
            }
            Ok(Err(e)) => Forwarded::Failed {
                kind: match e {
                    PoolError::Connect(_) => UpstreamError::Connect,
                    PoolError::Exchange(_) => UpstreamError::Protocol,
                },
                message: e.to_string(),
            },
            Err(_) => Forwarded::Failed {
                kind: UpstreamError::Timeout,
                message: format!(
                    "no response head within {}",
                    humantime::format_duration(self.response_timeout)
                ),
            },
        }
    }
}

// Named once: a name given as a string is parsed again on every call.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Sets `X-Forwarded-For` (appending the peer), `-Proto` and `-Host`.
/// Earlier `X-Forwarded-For` entries come from the client and prove nothing;
/// the last one is the address rempart saw.
fn set_forwarded(
    headers: &mut HeaderMap,
    peer_ip: &HeaderValue,
    client_tls: bool,
    host: Option<&HeaderValue>,
) {
    // One lookup for the read and the write: the name is hashed once.
    match headers.entry(X_FORWARDED_FOR) {
        http::header::Entry::Occupied(mut entry) => {
            let appended = match entry.get().to_str() {
                Ok(prev) if !prev.trim().is_empty() => {
                    let peer = peer_ip.to_str().unwrap_or_default();
                    // From owned bytes: checked, not copied again.
                    HeaderValue::from_maybe_shared(Bytes::from(format!("{prev}, {peer}"))).ok()
                }
                _ => Some(peer_ip.clone()),
            };
            if let Some(v) = appended {
                entry.insert(v);
            }
        }
        http::header::Entry::Vacant(entry) => {
            entry.insert(peer_ip.clone());
        }
    }
    let proto = if client_tls { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    // Other client-supplied address headers would be believed by the CRM:
    // replace X-Real-IP with the peer, drop Forwarded.
    headers.insert(X_REAL_IP, peer_ip.clone());
    headers.remove(header::FORWARDED);
    match host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST, h.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

const HOP_BY_HOP_LEN: usize = 9;

/// The connection-scoped headers (RFC 9110 §7.6.1), with the two
/// non-standard ones still seen in the wild.
static HOP_BY_HOP: [HeaderName; HOP_BY_HOP_LEN] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes connection-scoped headers, including those the `Connection`
/// header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Runs on every request and response. Most carry none of them, or
    // only `Connection`: one pass over the few headers present finds
    // which are there, and only those are then looked up by hash to be
    // removed (nine removals per message cost more than the pass).
    let mut present = [false; HOP_BY_HOP_LEN];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // `present[0]` is `Connection` (see `HOP_BY_HOP`).
    let named: Vec<HeaderName> = if present[0] {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // `keep-alive` (nearly every HTTP/1.1 answer's) is removed
            // below when present: naming it again would allocate a header
            // name per request.
            .filter(|n| {
                !HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(n))
            })
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let listed = HOP_BY_HOP
        .iter()
        .zip(present)
        .filter_map(|(name, here)| here.then_some(name));
    for name in named.iter().chain(listed) {
        headers.remove(name);
    }
}

/// The client-facing answer when the upstream gave none.
pub fn upstream_failure(decision_id: &str, kind: UpstreamError) -> Response<ProxyBody> {
    let (status, error, message) = match kind {
        UpstreamError::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "gateway_timeout",
            "the upstream did not answer in time",
        ),
        UpstreamError::Connect => (
            StatusCode::BAD_GATEWAY,
            "bad_gateway",
            "the upstream could not be reached",
        ),
        UpstreamError::Protocol => (
            StatusCode::BAD_GATEWAY,
            "bad_gateway",
            "the upstream connection failed",
        ),
    };
    json_response(
        status,
        decision_id,
        serde_json::json!({"error": error, "decision_id": decision_id, "message": message}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_named_by_connection_are_removed_whatever_their_case() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Keep-Alive , X-Secret-Hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));

        // Each one alone is found, the non-standard ones included.
        for name in [
            "proxy-connection",
            "keep-alive",
            "upgrade",
            "proxy-authorization",
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-kept", "1".parse().unwrap());
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "x".parse().unwrap(),
            );
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"], "{name}");
        }
        // A header is only hop-by-hop when `Connection` names it.
        let mut h = HeaderMap::new();
        h.insert("x-secret-hop", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.contains_key("x-secret-hop"));
    }

    #[test]
    fn forwarded_headers_append_the_peer() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.1".parse().unwrap());
        h.insert("x-forwarded-host", "forged".parse().unwrap());
        h.insert("x-real-ip", "203.0.113.1".parse().unwrap());
        h.insert("forwarded", "for=203.0.113.1".parse().unwrap());
        let conn = crate::pipeline::accept::Connection::new(
            "[::ffff:10.0.0.2]:4000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
        );
        set_forwarded(&mut h, &conn.peer_ip, false, None);
        assert_eq!(h["x-forwarded-for"], "203.0.113.1, 10.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h["x-real-ip"], "10.0.0.2");
        assert!(!h.contains_key("forwarded"));

        // No earlier entry, a blank one, or several: the peer alone, or
        // appended to the first, and one header either way.
        let peer = &conn.peer_ip;
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, peer, true, Some(&"crm.example.eu".parse().unwrap()));
        assert_eq!(h["x-forwarded-for"], "10.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "crm.example.eu");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", " ".parse().unwrap());
        set_forwarded(&mut h, peer, false, None);
        assert_eq!(h["x-forwarded-for"], "10.0.0.2");
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "203.0.113.1".parse().unwrap());
        h.append("x-forwarded-for", "198.51.100.2".parse().unwrap());
        set_forwarded(&mut h, peer, false, None);
        let all: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["203.0.113.1, 10.0.0.2"]);
    }

    #[test]
    fn only_the_hop_by_hop_headers_present_are_removed() {
        // `Connection: close` alone, as many answers carry it.
        let mut h = HeaderMap::new();
        h.insert("connection", "close".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["content-type"]);
        // Named by `Connection` but absent: nothing else goes.
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-gone".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
        // Several values of one hop-by-hop header all go.
        let mut h = HeaderMap::new();
        h.append("te", "trailers".parse().unwrap());
        h.append("te", "gzip".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"]);
    }
}
