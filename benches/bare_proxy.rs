//! The floor under rempart's ingress: a reverse proxy with the same
//! building blocks (hyper 1.x server and client, one current-thread tokio
//! runtime per core sharing the port with `SO_REUSEPORT`, mimalloc) and
//! nothing else: no policy, no audit, no metrics, no header rewriting, one
//! upstream connection per client connection (no pool to look up).
//!
//! It answers "how close to nginx can a hyper-based proxy get on this
//! machine at all", so that rempart's own costs (policy, audit, input)
//! can be told apart from the HTTP machinery's (docs/performance.md,
//! session 10). Built by `cargo bench --bench bare_proxy --no-run`, which
//! prints the executable's path; run as
//!
//!   BARE_PROXY_LISTEN=127.0.0.1:18090 BARE_PROXY_UPSTREAM=127.0.0.1:18081 \
//!       target/release/deps/bare_proxy-<hash>
//!
//! and load it with wrk as benches/load.sh does. Each of these, set to 1,
//! adds one thing rempart does, to price it alone:
//! - `B_AUTO`: hyper-util's HTTP/1 + HTTP/2 connection (rempart's);
//! - `B_TIMER`: a header-read timeout (hyper arms a timer per request);
//! - `B_TIMEOUT`: a response timeout around the upstream call;
//! - `B_SPAWN`: a task per request, as rempart spawns;
//! - `B_HEADERS`: hop-by-hop stripping, X-Forwarded-*/X-Real-IP, and a
//!   decision-id response header.
//!
//! Without both addresses it prints this and exits 0, so that `cargo bench`
//! passes over it.

use std::net::SocketAddr;

use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let (Ok(listen), Ok(upstream)) = (
        std::env::var("BARE_PROXY_LISTEN"),
        std::env::var("BARE_PROXY_UPSTREAM"),
    ) else {
        println!("bare_proxy: set BARE_PROXY_LISTEN and BARE_PROXY_UPSTREAM (host:port) to run it");
        return;
    };
    let mut addr: SocketAddr = listen.parse().expect("BARE_PROXY_LISTEN: host:port");
    let upstream: SocketAddr = upstream.parse().expect("BARE_PROXY_UPSTREAM: host:port");
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let extras = Extras::from_env();
    let mut threads = Vec::new();
    for _ in 0..workers {
        let listener = bind(addr).expect("bind");
        addr = listener.local_addr().expect("local address");
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, serve(listener, upstream, extras));
        }));
    }
    println!("bare_proxy: {workers} workers on {addr}, upstream {upstream}");
    for t in threads {
        let _ = t.join();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

async fn serve(listener: std::net::TcpListener, upstream: SocketAddr, extras: Extras) {
    let listener = TcpListener::from_std(listener).expect("listener");
    loop {
        let Ok((client, peer)) = listener.accept().await else {
            continue;
        };
        tokio::task::spawn_local(async move {
            let _ = client.set_nodelay(true);
            let Ok(up) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = up.set_nodelay(true);
            let Ok((sender, conn)) = hyper::client::conn::http1::Builder::new()
                .writev(false)
                .handshake(TokioIo::new(up))
                .await
            else {
                return;
            };
            tokio::task::spawn_local(conn);
            // HTTP/1.1 on both sides: one request at a time, so the
            // sender is taken for each request and put back.
            let sender: std::sync::Arc<
                std::sync::Mutex<Option<SendRequest<hyper::body::Incoming>>>,
            > = std::sync::Arc::new(std::sync::Mutex::new(Some(sender)));
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let sender = std::sync::Arc::clone(&sender);
                let fut = async move {
                    let Some(mut s) = sender.lock().unwrap().take() else {
                        return Err("no upstream connection");
                    };
                    if s.ready().await.is_err() {
                        return Err("upstream connection closed");
                    }
                    let mut req = req;
                    if extras.headers {
                        let h = req.headers_mut();
                        strip_hop_by_hop(h);
                        h.insert(
                            "x-forwarded-for",
                            http::HeaderValue::from_str(&peer.ip().to_string()).unwrap(),
                        );
                        h.insert("x-forwarded-proto", http::HeaderValue::from_static("http"));
                        h.insert(
                            "x-real-ip",
                            http::HeaderValue::from_str(&peer.ip().to_string()).unwrap(),
                        );
                        h.remove(http::header::FORWARDED);
                    }
                    let resp = if extras.timeout {
                        match tokio::time::timeout(
                            std::time::Duration::from_secs(30),
                            s.send_request(req),
                        )
                        .await
                        {
                            Ok(r) => r,
                            Err(_) => return Err("timeout"),
                        }
                    } else {
                        s.send_request(req).await
                    };
                    *sender.lock().unwrap() = Some(s);
                    let mut resp = resp.map_err(|_| "upstream exchange failed")?;
                    if extras.headers {
                        let h = resp.headers_mut();
                        strip_hop_by_hop(h);
                        h.insert(
                            "x-rempart-decision-id",
                            http::HeaderValue::from_str(&format!("{:032x}", 12345u128)).unwrap(),
                        );
                    }
                    Ok(resp)
                };
                async move {
                    if extras.spawn {
                        tokio::task::spawn_local(Box::pin(fut))
                            .await
                            .unwrap_or(Err("join"))
                    } else {
                        fut.await
                    }
                }
            });
            if extras.auto {
                let mut b = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                b.http1().writev(false).keep_alive(true);
                if extras.timer {
                    b.http1()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(10));
                }
                let _ = b.serve_connection(TokioIo::new(client), service).await;
                return;
            }
            let mut b = hyper::server::conn::http1::Builder::new();
            b.writev(false).keep_alive(true);
            if extras.timer {
                b.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10));
            }
            let _ = b.serve_connection(TokioIo::new(client), service).await;
        });
    }
}

/// The `B_*` switches, read once at start (not per request: the floor
/// must not pay for its own knobs).
#[derive(Clone, Copy)]
struct Extras {
    auto: bool,
    timer: bool,
    timeout: bool,
    spawn: bool,
    headers: bool,
}

impl Extras {
    fn from_env() -> Extras {
        let on = |name: &str| std::env::var(name).is_ok_and(|v| v == "1");
        Extras {
            auto: on("B_AUTO"),
            timer: on("B_TIMER"),
            timeout: on("B_TIMEOUT"),
            spawn: on("B_SPAWN"),
            headers: on("B_HEADERS"),
        }
    }
}

/// As a proxy must (a hashed removal per name, as a naive proxy does).
fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    use http::header::*;
    for name in [
        CONNECTION,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
        TE,
        TRAILER,
        TRANSFER_ENCODING,
        UPGRADE,
    ] {
        h.remove(name);
    }
}
