//! One worker's keep-alive connections to the CRM.
//!
//! There is one upstream address, resolved at start, and each worker
//! thread has its own pool, so this is much less than a general HTTP
//! client: a stack of idle HTTP/1.1 connections, most recently used on
//! top. A connection goes back on the stack only after a complete
//! exchange: its response body was read to the end (see [`PooledBody`]).
//! One whose body was abandoned is closed, as HTTP/1.1 cannot abort a
//! response and keep the connection.
//!
//! Why not hyper-util's general client: on this path it cost about one
//! microsecond of CPU per request (its pool key hashing and locking,
//! checkout and connect futures, and a task spawned per request to notice
//! when the connection becomes idle), a few percent of what rempart
//! spends on a request.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::RequestBody;

/// Why a request got no response from the pool.
#[derive(Debug)]
pub enum PoolError {
    /// No connection could be opened (TCP or TLS): nothing was sent.
    Connect(String),
    /// The connection failed once the request was on its way, or the
    /// answer was not HTTP.
    Exchange(hyper::Error),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Connect(m) => f.write_str(m),
            PoolError::Exchange(e) => {
                write!(f, "{e}")?;
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
        }
    }
}

/// How to open a connection to the upstream.
pub struct Dialer {
    pub addr: std::net::SocketAddr,
    pub connect_timeout: Duration,
    /// For an `https://` upstream: the client configuration (offering
    /// only `http/1.1` by ALPN) and the name checked in its certificate.
    pub tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Dialer {
    /// A TCP connection (and TLS session), with the HTTP/1.1 connection
    /// task spawned on the current worker.
    async fn dial(&self) -> Result<SendRequest<RequestBody>, PoolError> {
        let tcp =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(PoolError::Connect(format!(
                        "cannot connect to {}: {e}",
                        self.addr
                    )))
                }
                Err(_) => {
                    return Err(PoolError::Connect(format!(
                        "cannot connect to {}: no answer within {}",
                        self.addr,
                        humantime::format_duration(self.connect_timeout)
                    )))
                }
            };
        // Small requests and answers go out at once, not after an ACK.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp).await,
            Some((connector, name)) => {
                let tls = tokio::time::timeout(
                    self.connect_timeout,
                    connector.connect(name.clone(), tcp),
                )
                .await;
                match tls {
                    Ok(Ok(stream)) => handshake(stream).await,
                    Ok(Err(e)) => Err(PoolError::Connect(format!(
                        "TLS with {} failed: {e}",
                        self.addr
                    ))),
                    Err(_) => Err(PoolError::Connect(format!(
                        "TLS with {}: no handshake within {}",
                        self.addr,
                        humantime::format_duration(self.connect_timeout)
                    ))),
                }
            }
        }
    }
}

async fn handshake<S>(stream: S) -> Result<SendRequest<RequestBody>, PoolError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // One buffer, one write per request, as on the client side (accept.rs).
    let (sender, connection) = http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| PoolError::Connect(format!("HTTP/1.1 set-up failed: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("upstream connection closed: {e}");
        }
    });
    Ok(sender)
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

pub struct Pool {
    dialer: Dialer,
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Set once the task that closes connections idle for too long runs.
    sweeping: std::sync::atomic::AtomicBool,
}

impl Pool {
    pub fn new(dialer: Dialer, max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Pool {
            dialer,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            sweeping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Sends `req` over an idle connection, or a new one, and returns the
    /// response head; its body hands the connection back when read to
    /// the end.
    ///
    /// A request that an idle connection could not take (the CRM closed
    /// it meanwhile, and hyper hands the request back unsent) goes to the
    /// next connection; a request that may have been sent is never sent
    /// twice.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, PoolError> {
        while let Some(mut sender) = self.take_idle() {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.lease(resp, sender)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(PoolError::Exchange(e.into_error())),
                },
            }
        }
        // Boxed: a TLS handshake's state is kilobytes, and held inline it
        // would make every request's future (moved as the request is
        // spawned) that much larger, though a new connection is rare.
        let mut sender = Box::pin(self.dialer.dial()).await?;
        match sender.send_request(req).await {
            Ok(resp) => Ok(self.lease(resp, sender)),
            Err(e) => Err(PoolError::Exchange(e)),
        }
    }

    fn lease(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: SendRequest<RequestBody>,
    ) -> Response<PooledBody> {
        resp.map(|body| PooledBody {
            body,
            ended: false,
            lease: Some((sender, Arc::downgrade(self))),
        })
    }

    /// The most recently used idle connection that is ready for a request.
    fn take_idle(self: &Arc<Self>) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(Idle { sender, since }) = idle.pop() {
            if sender.is_closed() || since.elapsed() >= self.idle_timeout {
                continue;
            }
            if sender.is_ready() {
                return Some(sender);
            }
            // Still winding down its last exchange (rare: the next request
            // usually comes a round trip later): back on the stack once
            // ready, without holding up this request.
            let pool = Arc::downgrade(self);
            let mut sender = sender;
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    if let Some(pool) = pool.upgrade() {
                        pool.put_back(sender);
                    }
                }
            });
        }
        None
    }

    fn put_back(self: &Arc<Self>, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        if idle.len() >= self.max_idle {
            return;
        }
        idle.push(Idle {
            sender,
            since: Instant::now(),
        });
        drop(idle);
        if !self
            .sweeping
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tokio::spawn(sweep(Arc::downgrade(self), self.idle_timeout));
        }
    }
}

/// Closes connections left idle longer than `idle_timeout`, so that a
/// quiet worker does not hold them open; ends with the pool.
async fn sweep(pool: Weak<Pool>, idle_timeout: Duration) {
    let every = (idle_timeout / 2).max(Duration::from_millis(500));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        if let Ok(mut idle) = pool.idle.lock() {
            idle.retain(|i| !i.sender.is_closed() && i.since.elapsed() < idle_timeout);
        };
    }
}

/// The upstream's response body. Read to the end, it hands its connection
/// back to the pool when dropped; dropped earlier, the connection closes.
pub struct PooledBody {
    body: Incoming,
    /// The body said it had no more frames (a chunked body's end is only
    /// known this way).
    ended: bool,
    lease: Option<(SendRequest<RequestBody>, Weak<Pool>)>,
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if !(self.ended || self.body.is_end_stream()) {
            return;
        }
        if let Some((sender, pool)) = self.lease.take() {
            if let Some(pool) = pool.upgrade() {
                pool.put_back(sender);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
