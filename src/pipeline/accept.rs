//! Stage 1, **accept**: take connections and requests, give each request an
//! id, and describe it for the policy.
//!
//! Each worker thread runs its own single-threaded event loop with its own
//! listening socket on the shared port (`SO_REUSEPORT`): the kernel spreads
//! connections across workers and no request ever crosses threads. HTTP/1.1
//! and HTTP/2 (prior knowledge, or ALPN `h2` over TLS) are served on the
//! same port. With `[server.tls]` every ingress connection first completes
//! a TLS handshake (bounded by `header_read_timeout`); one that fails, e.g.
//! a client without a required certificate, is counted and closed before
//! any request is read.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use percent_encoding::percent_decode_str;
use tokio::sync::watch;
// One stream type for plain and TLS egress connections, so that one
// hyper connection type serves both.
use tokio_util::either::Either;

mod head_timer;
pub mod target;

use super::egress::EgressGateway;
use super::enforce::ProxyBody;
use super::Gateway;
use crate::input::{RequestId, RequestInfo, Text};
use crate::metrics::{Metrics, Refusal};
use crate::policy::RequestReads;
use http::Response;

/// What the connection tells about every request on it.
#[derive(Debug, Clone)]
pub struct Connection {
    pub peer: SocketAddr,
    /// `peer`'s address as policies and the CRM see it (IPv4-mapped IPv6
    /// as plain IPv4), rendered once per connection rather than through
    /// the formatter for the input, the audit record and X-Forwarded-For
    /// of every request on it.
    pub peer_ip: http::HeaderValue,
    pub local: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client certificate verified during the handshake (mTLS).
    pub client_cert: Option<Arc<crate::tls::ClientCert>>,
    /// Where `peer` is, looked up by the first request and kept for the
    /// others (see [`crate::pipeline::locate::PeerLocation`]).
    pub peer_location: Arc<crate::pipeline::locate::PeerLocation>,
}

impl Connection {
    /// A plain (not TLS) connection from `peer`, accepted on `local`.
    pub fn new(peer: SocketAddr, local: SocketAddr) -> Connection {
        let text = crate::input::ip_string(peer.ip());
        Connection {
            peer,
            // An address's text is always a valid header value.
            peer_ip: http::HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
                .unwrap_or_else(|_| http::HeaderValue::from_static("")),
            local,
            tls: false,
            client_cert: None,
            peer_location: Arc::default(),
        }
    }

    /// [`Self::peer_ip`] as text.
    pub fn peer_ip_str(&self) -> &str {
        self.peer_ip.to_str().unwrap_or_default()
    }
}

/// Binds `count` sockets to `addr` with `SO_REUSEPORT`. With port 0 the
/// first socket picks the port and the others join it.
pub fn bind_workers(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let l = bind_one(addr).with_context(|| format!("cannot listen on {addr}"))?;
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Runs one worker's ingress accept loop until `shutdown` turns true, then
/// lets open connections finish their requests for at most `drain`.
pub async fn serve(
    listener: std::net::TcpListener,
    gateway: Arc<Gateway>,
    shutdown: watch::Receiver<bool>,
    header_read_timeout: Duration,
    drain: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> anyhow::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(head_timer::HeadTimer::default())
        .header_read_timeout(header_read_timeout)
        // Head and (small) body in one buffer and one write: measured ahead
        // of vectored writes (docs/performance.md, session 10).
        .writev(false)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let metrics = Arc::clone(&gateway.metrics);
    accept_loop(
        listener,
        shutdown,
        drain,
        metrics,
        header_read_timeout,
        move |stream, conn, watcher| {
            let gateway = Arc::clone(&gateway);
            let builder = builder.clone();
            let tls = tls.clone();
            async move {
                let Some(acceptor) = tls else {
                    let served = builder
                        .serve_connection(TokioIo::new(stream), ingress_service(gateway, conn))
                        .into_owned();
                    return watcher.watch(served).await;
                };
                let metrics = Arc::clone(&gateway.metrics);
                let Some((tls_stream, conn)) =
                    handshake(&acceptor, stream, conn, header_read_timeout, &metrics).await
                else {
                    return Ok(());
                };
                let served = builder
                    .serve_connection(TokioIo::new(tls_stream), ingress_service(gateway, conn))
                    .into_owned();
                watcher.watch(served).await
            }
        },
        |_, _| {},
        |_| {},
    )
    .await?;
    Ok(())
}

/// Completes the TLS handshake of an accepted connection, bounded by
/// `timeout`, and notes the verified client certificate (mTLS). A failed
/// handshake, e.g. a client without a required certificate, is counted
/// and logged, and the connection closed: `None`.
async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    conn: Connection,
    timeout: Duration,
    metrics: &Metrics,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    Connection,
)> {
    let peer = conn.peer;
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let client_cert = tls_stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(crate::tls::describe_client_cert)
                .map(Arc::new);
            let conn = Connection {
                tls: true,
                client_cert,
                ..conn
            };
            Some((tls_stream, conn))
        }
        Ok(Err(e)) => {
            let reason = crate::tls::handshake_failure_reason(&e);
            metrics.tls_handshake_failure(reason).inc();
            tracing::info!(%peer, reason, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            metrics.tls_handshake_failure("timeout").inc();
            tracing::info!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// The request service of one ingress connection.
fn ingress_service(
    gateway: Arc<Gateway>,
    conn: Connection,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
       + Send
       + 'static {
    service_fn(move |req| {
        let gw = Arc::clone(&gateway);
        let conn = conn.clone();
        async move {
            // Each request runs in its own task: if the client hangs up
            // while the upstream works, hyper drops this future but the
            // task goes on, so the request the CRM received still gets
            // its audit record and metrics.
            //
            // The request's future is a few KiB (the input document, the
            // upstream call): boxed once here, the task moves a pointer
            // rather than copying the whole state as it is spawned.
            let handled = tokio::spawn(Box::pin(async move { gw.handle(req, conn).await }));
            Ok::<_, Infallible>(settle(handled.await))
        }
    })
}

/// The client side of an egress connection, as a tunnel gets it back from
/// hyper's upgrade.
pub type EgressIo =
    TokioIo<Either<tokio::net::TcpStream, tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>;

/// Runs one worker's egress (forward proxy) accept loop: HTTP/1.1 only,
/// with upgrades for `CONNECT` tunnels and a bounded request head; over
/// TLS first when `[egress.tls]` is set (an HTTPS proxy, whose client
/// certificate may name the workload).
pub async fn serve_egress(
    listener: std::net::TcpListener,
    gateway: Arc<EgressGateway>,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> anyhow::Result<()> {
    // hyper's own HTTP/1 connection rather than hyper-util's `auto` one,
    // which wraps the socket in a private type: a tunnel takes its client
    // socket back from the upgrade (see `EgressGateway::spawn_tunnel`).
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(head_timer::HeadTimer::default())
        .header_read_timeout(gateway.limits.header_read_timeout)
        .max_buf_size(gateway.limits.max_header_bytes)
        .keep_alive(true);
    let metrics = Arc::clone(&gateway.metrics);
    let gw_for_drain = Arc::clone(&gateway);
    let first_byte = gateway.limits.header_read_timeout;
    let stop = shutdown.clone();
    let drain_deadline = accept_loop(
        listener,
        shutdown,
        drain,
        metrics,
        first_byte,
        move |stream, conn, watcher| {
            let gw = Arc::clone(&gateway);
            let builder = builder.clone();
            let tls = tls.clone();
            let mut stop = stop.clone();
            async move {
                let (stream, conn) = match tls {
                    None => (Either::Left(stream), conn),
                    Some(acceptor) => {
                        match handshake(&acceptor, stream, conn, first_byte, &gw.metrics).await {
                            Some((s, conn)) => (Either::Right(s), conn),
                            None => return Ok(()),
                        }
                    }
                };
                let service = service_fn(move |req| {
                    let gw = Arc::clone(&gw);
                    let conn = conn.clone();
                    async move {
                        // Boxed, as on the ingress: the task moves a pointer,
                        // not the request's whole state.
                        let handled =
                            tokio::spawn(Box::pin(async move { gw.handle(req, conn).await }));
                        Ok::<_, Infallible>(settle(handled.await))
                    }
                });
                let io: EgressIo = TokioIo::new(stream);
                let served = builder.serve_connection(io, service).with_upgrades();
                tokio::pin!(served);
                // hyper-util's watcher only takes its own connection types:
                // the drain waits for this connection as long as `watcher`
                // lives, and the graceful stop is asked here.
                let ended = tokio::select! {
                    r = served.as_mut() => r,
                    // (The guard wait_for returns is not Send: drop it here.)
                    Ok(()) = async { stop.wait_for(|stop| *stop).await.map(drop) } => {
                        served.as_mut().graceful_shutdown();
                        served.await
                    }
                };
                drop(watcher);
                ended.map_err(Into::into)
            }
        },
        count_egress_connection_error,
        |m| m.egress.refusal(Refusal::HeaderTimeout).inc(),
    )
    .await?;
    // Tunnels outlive their HTTP connection: they may run until the end of
    // the same drain period, then are cut (with a closing record each), so
    // the whole drain stays within drain_timeout (plus CUT_GRACE for the
    // cut tunnels' records).
    gw_for_drain.wait_for_tunnels(drain_deadline).await;
    Ok(())
}

/// Counts what made an egress client connection fail before a request
/// could be handled (hyper answers 431 or 400 itself, or just closes).
fn count_egress_connection_error(e: &(dyn std::error::Error + 'static), metrics: &Metrics) {
    let Some(e) = e.downcast_ref::<hyper::Error>() else {
        return;
    };
    let refusal = if e.is_parse_too_large() {
        Refusal::HeaderTooLarge
    } else if e.is_timeout() {
        Refusal::HeaderTimeout
    } else if e.is_parse() || e.is_incomplete_message() {
        Refusal::Malformed
    } else {
        return;
    };
    metrics.egress.refusal(refusal).inc();
}

fn settle(handled: Result<Response<ProxyBody>, tokio::task::JoinError>) -> Response<ProxyBody> {
    match handled {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!("request task failed: {e}");
            super::enforce::internal_error()
        }
    }
}

type ConnError = Box<dyn std::error::Error + Send + Sync>;

/// The accept loop shared by the ingress and egress listeners: accepts
/// until `shutdown`, serves each connection with `serve_conn`, and on
/// shutdown lets open connections finish their requests for at most
/// `drain`. Returns when the drain ends: the deadline it had.
///
/// A client that sends no byte within `first_byte_timeout` is dropped
/// before any HTTP machinery runs (hyper's header timeout only starts with
/// the first byte of a request), and `on_silent` counts it.
#[allow(clippy::too_many_arguments)]
async fn accept_loop<Fut, F, E>(
    listener: std::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    metrics: Arc<Metrics>,
    first_byte_timeout: Duration,
    serve_conn: F,
    on_error: E,
    on_silent: fn(&Metrics),
) -> anyhow::Result<tokio::time::Instant>
where
    F: Fn(tokio::net::TcpStream, Connection, Watcher) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), ConnError>> + Send + 'static,
    E: Fn(&(dyn std::error::Error + 'static), &Metrics) + Copy + Send + 'static,
{
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let local = listener.local_addr()?;
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let serve_conn = serve_conn.clone();
        let watcher = graceful.watcher();
        let metrics = Arc::clone(&metrics);
        metrics.connections_open.inc();
        tokio::spawn(async move {
            // peek, not readable(): a fresh socket may report readiness
            // before any byte arrived.
            let mut first = [0u8; 1];
            let spoke = tokio::time::timeout(first_byte_timeout, stream.peek(&mut first)).await;
            if spoke.is_ok() {
                let conn = Connection::new(peer, local);
                // serve_conn registers the connection with the watcher
                // (after its TLS handshake, if any).
                if let Err(e) = serve_conn(stream, conn, watcher).await {
                    on_error(&*e, &metrics);
                    tracing::debug!(%peer, "connection ended: {e}");
                }
            } else {
                on_silent(&metrics);
                tracing::debug!(%peer, "client sent nothing; closed");
            }
            metrics.connections_open.dec();
        });
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + drain;
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached with connections still open");
    }
    Ok(deadline)
}

/// Describes a request for the policy: decoded path and query, lower-case
/// headers with credentials redacted; query and headers only as far as
/// `read` says the policy set reads them (else left empty).
pub fn describe(
    parts: &http::request::Parts,
    id: RequestId,
    conn: &Connection,
    redact: &[http::HeaderName],
    read: RequestReads,
) -> RequestInfo {
    let (host, port) = host_and_port(parts, conn);
    let raw_path = parts.uri.path();
    let segments = raw_path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decoded)
        .collect();
    let path = percent_decoded(raw_path);
    // Query and headers only when the policy set reads them: nothing else
    // looks at them (the audit record keeps neither), and copying every
    // header's value is most of what describing a browser's request costs.
    let mut query: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if let Some(q) = parts.uri.query().filter(|_| read.query) {
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            query
                .entry(k.into_owned())
                .or_default()
                .push(v.into_owned());
        }
    }
    let mut headers: BTreeMap<crate::input::Name, String> = BTreeMap::new();
    for (name, value) in parts.headers.iter().filter(|_| read.headers) {
        let shown = if redact.contains(name) {
            "[redacted]".to_string()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        headers
            .entry(header_key(name))
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&shown);
            })
            .or_insert(shown);
    }
    RequestInfo {
        id,
        method: method_name(&parts.method),
        scheme: if conn.tls { "https" } else { "http" }.into(),
        host,
        port,
        path,
        segments,
        query,
        headers,
        protocol: protocol_name(parts.version).into(),
    }
}

/// A header's name as the policy sees it: a constant for the headers most
/// requests carry, so that describing them allocates only their values.
fn header_key(name: &http::HeaderName) -> crate::input::Name {
    match COMMON_HEADERS.iter().find(|(known, _)| known == name) {
        Some((_, key)) => (*key).into(),
        None => name.as_str().to_string().into(),
    }
}

/// See [`header_key`]; each name is spelled as `HeaderName::as_str` does
/// (a unit test holds them to it).
const COMMON_HEADERS: [(http::HeaderName, &str); 18] = {
    use http::header::*;
    [
        (HOST, "host"),
        (USER_AGENT, "user-agent"),
        (ACCEPT, "accept"),
        (ACCEPT_ENCODING, "accept-encoding"),
        (ACCEPT_LANGUAGE, "accept-language"),
        (AUTHORIZATION, "authorization"),
        (CACHE_CONTROL, "cache-control"),
        (CONNECTION, "connection"),
        (CONTENT_LENGTH, "content-length"),
        (CONTENT_TYPE, "content-type"),
        (COOKIE, "cookie"),
        (ORIGIN, "origin"),
        (PRAGMA, "pragma"),
        (REFERER, "referer"),
        (TE, "te"),
        (UPGRADE_INSECURE_REQUESTS, "upgrade-insecure-requests"),
        (IF_NONE_MATCH, "if-none-match"),
        (IF_MODIFIED_SINCE, "if-modified-since"),
    ]
};

/// The method as the policy sees it: a constant for the standard ones.
fn method_name(m: &http::Method) -> crate::input::Name {
    use http::Method;
    let known = match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => return m.as_str().to_string().into(),
    };
    known.into()
}

/// Describes an egress request for the policy: as [`describe`], with the
/// canonical destination as host and port, and the scheme of the leg to
/// the destination: `http` (plain proxy request, even when the client
/// reached the proxy over TLS) or `tunnel` (`CONNECT`, whose content
/// rempart does not see).
pub fn describe_egress(
    parts: &http::request::Parts,
    id: RequestId,
    conn: &Connection,
    redact: &[http::HeaderName],
    target: &target::Target,
    read: RequestReads,
) -> RequestInfo {
    let mut info = describe(parts, id, conn, redact, read);
    info.host = compact_str::ToCompactString::to_compact_string(&target.host);
    info.port = target.port;
    if parts.method == http::Method::CONNECT {
        info.scheme = "tunnel".into();
        info.path = Text::default();
        info.segments.clear();
    } else {
        info.scheme = "http".into();
    }
    info
}

pub fn protocol_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// Why an ingress request is refused before the policy sees it, if it is:
/// the host it is for must be unambiguous, since the policy, the audit
/// record and the CRM must all read the same one. RFC 9112 §3.2 asks a
/// server to answer 400 to more than one `Host`, to an invalid one, and to
/// an HTTP/1.1 request without one; a `Host` that differs from the request
/// target's authority (absolute form, or HTTP/2's `:authority`) is refused
/// too (RFC 9113 §8.3.1). The reason never repeats what the client sent.
pub fn ambiguous_host(parts: &http::request::Parts) -> Option<&'static str> {
    let mut hosts = parts.headers.get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some("more than one Host header");
    }
    let authority = parts.uri.authority().map(http::uri::Authority::as_str);
    let Some(host) = host else {
        return (authority.is_none() && parts.version == http::Version::HTTP_11)
            .then_some("no Host header (HTTP/1.1 requires one)");
    };
    let host = host.as_bytes();
    // uri-host [":" port]: a name, an IPv4 address or a bracketed IPv6
    // literal (no user information, path or space). Empty only suits a
    // target without an authority, which a reverse proxy never serves.
    let valid = |b: &u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(b);
    if host.is_empty() || !host.iter().all(valid) {
        return Some("invalid Host header");
    }
    match authority {
        Some(a) if !a.as_bytes().eq_ignore_ascii_case(host) && !same_place(&parts.uri, host) => {
            Some("Host header does not match the request target's authority")
        }
        _ => None,
    }
}

/// Whether `host` names the same host and port as `uri`'s authority,
/// written differently (`crm.example.eu` for `crm.example.eu:443` in an
/// `https` target).
fn same_place(uri: &http::Uri, host: &[u8]) -> bool {
    let (Some(target), Ok(host)) = (uri.authority(), http::uri::Authority::try_from(host)) else {
        return false;
    };
    let default = if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
        443
    } else {
        80
    };
    target.host().eq_ignore_ascii_case(host.host())
        && target.port_u16().unwrap_or(default) == host.port_u16().unwrap_or(default)
}

/// The host the client asked for (Host header, or the HTTP/2 authority),
/// lower-cased and without port; the port defaults to the listener's.
fn host_and_port(parts: &http::request::Parts, conn: &Connection) -> (Text, u16) {
    let default_port = conn.local.port();
    let header = parts.headers.get(http::header::HOST);
    if let Some((host, port)) = header.and_then(|h| plain_authority(h.as_bytes())) {
        return (host_text(host), port.unwrap_or(default_port));
    }
    let authority = header
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok())
        .or_else(|| parts.uri.authority().cloned());
    match authority {
        Some(a) => (host_text(a.host()), a.port_u16().unwrap_or(default_port)),
        None => (Text::default(), default_port),
    }
}

/// A host as the policy sees it: brackets and a trailing dot removed,
/// lower-case.
fn host_text(host: &str) -> Text {
    let mut text = Text::from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.'),
    );
    text.as_mut_str().make_ascii_lowercase();
    text
}

/// `name[:port]` made only of letters, digits, dots and hyphens, as nearly
/// every `Host` header is: split where it stands. Parsing it into an
/// `Authority` copies it, on every request; anything else (an IPv6
/// literal, user information, an odd port) still goes that way, and a test
/// holds the two to the same answers.
fn plain_authority(b: &[u8]) -> Option<(&str, Option<u16>)> {
    let (name, port) = match b.iter().position(|&c| c == b':') {
        Some(i) => (&b[..i], Some(&b[i + 1..])),
        None => (b, None),
    };
    if name.is_empty()
        || !name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'-')
    {
        return None;
    }
    let port = match port {
        None => None,
        Some(p) if (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit) => {
            Some(std::str::from_utf8(p).ok()?.parse::<u16>().ok()?)
        }
        Some(_) => return None,
    };
    Some((std::str::from_utf8(name).ok()?, port))
}

/// A path or a segment, percent-decoded (invalid UTF-8 replaced).
fn percent_decoded(raw: &str) -> Text {
    match percent_decode_str(raw).decode_utf8_lossy() {
        std::borrow::Cow::Borrowed(s) => Text::from(s),
        std::borrow::Cow::Owned(s) => Text::from(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_is_ambiguous_when_repeated_invalid_missing_or_elsewhere() {
        let parts = |version, uri: &str, hosts: &[&str]| {
            let mut b = http::Request::builder().version(version).uri(uri);
            for h in hosts {
                b = b.header(http::header::HOST, *h);
            }
            b.body(()).unwrap().into_parts().0
        };
        use http::Version as V;
        let ok = [
            parts(V::HTTP_11, "/a", &["crm.example.eu:8443"]),
            parts(V::HTTP_11, "/a", &["[2001:db8::1]:8080"]),
            parts(V::HTTP_10, "/a", &[]),
            parts(V::HTTP_2, "https://crm.example.eu/a", &[]),
            parts(
                V::HTTP_2,
                "https://crm.example.eu/a",
                &["CRM.example.eu:443"],
            ),
            parts(
                V::HTTP_11,
                "http://crm.example.eu:80/a",
                &["crm.example.eu"],
            ),
        ];
        for p in &ok {
            assert_eq!(ambiguous_host(p), None, "{p:?}");
        }
        let refused = [
            (parts(V::HTTP_11, "/a", &["a", "b"]), "more than one"),
            (parts(V::HTTP_2, "/a", &["a", "a"]), "more than one"),
            (parts(V::HTTP_11, "/a", &[]), "no Host"),
            (parts(V::HTTP_11, "/a", &[""]), "invalid"),
            (parts(V::HTTP_11, "/a", &["u@crm"]), "invalid"),
            (parts(V::HTTP_11, "/a", &["crm/x"]), "invalid"),
            (
                parts(
                    V::HTTP_2,
                    "https://crm.example.eu/a",
                    &["crm.example.eu:80"],
                ),
                "does not match",
            ),
            (
                parts(V::HTTP_11, "http://a.example/x", &["b.example"]),
                "does not match",
            ),
        ];
        for (p, why) in &refused {
            let got = ambiguous_host(p).unwrap_or_else(|| panic!("{p:?} accepted"));
            assert!(got.contains(why), "{p:?}: {got}");
        }
    }

    fn loopback_connection() -> Connection {
        Connection::new(
            "127.0.0.1:5000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
        )
    }

    #[test]
    fn describes_path_query_and_headers() {
        let req = http::Request::builder()
            .method("GET")
            .uri("/api/Contacts/a%20b?q=1&q=2&x=%C3%A9")
            .header("Host", "CRM.example.eu:8443")
            .header("Authorization", "Bearer secret")
            .header("Accept", "a")
            .header("Accept", "b")
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        let conn = loopback_connection();
        let d = describe(
            &parts,
            RequestId::from("id1").unwrap(),
            &conn,
            &[http::header::AUTHORIZATION],
            RequestReads::ALL,
        );
        assert_eq!(d.host, "crm.example.eu");
        assert_eq!(d.port, 8443);
        assert_eq!(d.path, "/api/Contacts/a b");
        assert_eq!(d.segments.as_slice(), ["api", "Contacts", "a b"]);
        assert_eq!(d.query["q"], vec!["1", "2"]);
        assert_eq!(d.query["x"], vec!["é"]);
        assert_eq!(d.headers["authorization"], "[redacted]");
        assert_eq!(d.headers["accept"], "a, b");
        assert_eq!(d.protocol, "HTTP/1.1");
    }

    #[test]
    fn a_plain_host_header_is_split_as_an_authority_would_be() {
        let hosts = [
            "crm.example.eu",
            "crm.example.eu:8443",
            "CRM.Example.EU.",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65535",
            "127.0.0.1:65536",
            "127.0.0.1:099",
            "a-b.c",
            "host:",
            ":80",
            "",
            "[2001:db8::1]:8080",
            "[2001:db8::1]",
            "user@crm.example.eu:80",
            "crm.example.eu:80:81",
            "crm_example.eu",
            "crm.example.eu:8a",
            "crm.example.eu:123456",
            "é.example.eu",
        ];
        let mut split = 0;
        for host in hosts {
            let parsed = host.parse::<http::uri::Authority>().ok();
            // Whatever is split here parses, to the same host and port.
            if let Some((name, port)) = plain_authority(host.as_bytes()) {
                split += 1;
                let a = parsed.unwrap_or_else(|| panic!("{host:?} split but not an authority"));
                assert_eq!(name, a.host(), "{host:?}");
                assert_eq!(port, a.port_u16(), "{host:?}");
            }
        }
        assert_eq!(split, 8, "the plain forms are split without a parse");
        // Through the request: the fallback gives the same description.
        for (host, want) in [
            ("CRM.Example.EU.:8443", ("crm.example.eu", 8443)),
            ("[2001:DB8::1]:8080", ("2001:db8::1", 8080)),
            ("crm.example.eu", ("crm.example.eu", 8080)),
        ] {
            let req = http::Request::builder()
                .uri("/a")
                .header("Host", host)
                .body(())
                .unwrap();
            let (parts, _) = req.into_parts();
            let (h, p) = host_and_port(&parts, &loopback_connection());
            assert_eq!((h.as_str(), p), want, "{host:?}");
        }
    }

    #[test]
    fn leaves_out_the_query_and_headers_a_policy_set_does_not_read() {
        let req = http::Request::builder()
            .uri("/api/contacts/1?q=1")
            .header("Host", "crm.example.eu")
            .header("Cookie", "session=abc")
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        let conn = loopback_connection();
        let describe_reading = |headers, query| {
            describe(
                &parts,
                RequestId::from("id1").unwrap(),
                &conn,
                &[],
                RequestReads { headers, query },
            )
        };
        let neither = describe_reading(false, false);
        assert!(neither.headers.is_empty() && neither.query.is_empty());
        // What is always described stays, whatever is read.
        assert_eq!(neither.host, "crm.example.eu");
        assert_eq!(neither.segments.as_slice(), ["api", "contacts", "1"]);
        let headers = describe_reading(true, false);
        assert_eq!(headers.headers["cookie"], "session=abc");
        assert!(headers.query.is_empty());
        let query = describe_reading(false, true);
        assert!(query.headers.is_empty());
        assert_eq!(query.query["q"], vec!["1"]);
    }

    #[test]
    fn common_header_keys_are_the_names_themselves() {
        for (name, key) in &COMMON_HEADERS {
            assert_eq!(name.as_str(), *key);
            assert!(matches!(header_key(name), std::borrow::Cow::Borrowed(k) if k == *key));
        }
        let custom = http::HeaderName::from_static("x-tenant");
        assert_eq!(header_key(&custom), "x-tenant");
        for m in ["GET", "POST", "DELETE", "PROPFIND"] {
            let method = http::Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(method_name(&method), m);
        }
    }
}
