//! The upstream connection pool, seen from a real upstream that counts the
//! connections it accepts and the ones that close: kept-alive connections
//! are reused after a complete exchange (fixed-length and chunked
//! answers), a connection whose answer was abandoned is closed, idle ones
//! close after `pool_idle_timeout`, `pool_max_idle = 0` keeps none, an
//! upstream that closes its connections after every answer costs no
//! request, and concurrent clients need no more upstream connections than
//! there are of them.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Rempart;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy)]
enum Answer {
    /// `content-length` answer, connection kept.
    Fixed,
    /// `transfer-encoding: chunked` answer, connection kept.
    Chunked,
    /// A `content-length` answer, then the connection closes without a
    /// `Connection: close` (what an upstream's keep-alive timeout does).
    FixedThenClose,
    /// Announces 1000 bytes, sends 10, then waits for the peer to leave.
    Stalled,
}

/// A hand-written HTTP/1.1 upstream: every request it reads gets `answer`.
struct CountingUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CountingUpstream {
    async fn start(answer: Answer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (a, c, r) = (accepted.clone(), closed.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (c, r) = (c.clone(), r.clone());
                tokio::spawn(async move {
                    serve(stream, answer, &r).await;
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        CountingUpstream {
            addr,
            accepted,
            closed,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until `n` connections have closed.
    async fn wait_closed(&self, n: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.closed() >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.closed() >= n
    }
}

/// Reads requests (heads only: the tests send no bodies) and answers
/// each, until the peer closes or the answer says to stop.
async fn serve(mut stream: TcpStream, answer: Answer, requests: &AtomicUsize) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..end);
        requests.fetch_add(1, Ordering::SeqCst);
        let reply: &[u8] = match answer {
            Answer::Fixed | Answer::FixedThenClose => {
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
            }
            Answer::Chunked => {
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\no\r\n1\r\nk\r\n0\r\n\r\n"
            }
            Answer::Stalled => b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789",
        };
        if stream.write_all(reply).await.is_err() {
            return;
        }
        match answer {
            Answer::FixedThenClose => return,
            Answer::Stalled => {
                // Wait for the peer to go away (read gives 0 or an error).
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        return;
                    }
                }
                return;
            }
            Answer::Fixed | Answer::Chunked => {}
        }
    }
}

fn start_rempart(upstream: &CountingUpstream, extra_toml: &str) -> (tempfile::TempDir, Rempart) {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("[upstream]\nurl = \"{}\"\n{extra_toml}", upstream.url());
    let rp = Rempart::with_config(dir.path(), "rempart.toml", &toml).unwrap();
    (dir, rp)
}

/// `n` requests one after the other over one client connection (so one
/// rempart worker), each body read to the end; returns the bodies.
async fn sequential(rp: &Rempart, n: usize) -> Vec<Bytes> {
    let client = common::client();
    let mut bodies = Vec::new();
    for i in 0..n {
        let req = http::Request::get(rp.url(&format!("/api/contacts/{i}")))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        bodies.push(resp.into_body().collect().await.unwrap().to_bytes());
    }
    bodies
}

#[tokio::test]
async fn a_connection_is_reused_after_a_complete_exchange() {
    for answer in [Answer::Fixed, Answer::Chunked] {
        let up = CountingUpstream::start(answer).await;
        let (_dir, rp) = start_rempart(&up, "");
        let bodies = sequential(&rp, 20).await;
        assert!(bodies.iter().all(|b| &b[..] == b"ok"), "{bodies:?}");
        assert_eq!(up.requests.load(Ordering::SeqCst), 20);
        assert_eq!(
            up.accepted(),
            1,
            "20 requests in a row from one client should share one upstream connection"
        );
        assert_eq!(up.closed(), 0);
    }
}

#[tokio::test]
async fn an_upstream_that_closes_after_every_answer_costs_no_request() {
    let up = CountingUpstream::start(Answer::FixedThenClose).await;
    let (_dir, rp) = start_rempart(&up, "");
    let bodies = sequential(&rp, 30).await;
    assert_eq!(bodies.len(), 30);
    assert_eq!(up.requests.load(Ordering::SeqCst), 30);
    assert_eq!(up.accepted(), 30, "a closed connection is never reused");
    assert_eq!(
        rp.metric(r#"rempart_upstream_errors_total{kind="protocol"}"#)
            .await,
        0.0
    );
}

#[tokio::test]
async fn an_abandoned_answer_closes_its_upstream_connection() {
    let up = CountingUpstream::start(Answer::Stalled).await;
    let (_dir, rp) = start_rempart(&up, "");
    let mut client = TcpStream::connect(rp.addr).await.unwrap();
    client
        .write_all(b"GET /api/contacts/1 HTTP/1.1\r\nhost: crm.example\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = client.read(&mut head).await.unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head[..n])
    );
    assert_eq!(
        up.closed(),
        0,
        "the upstream connection is open while the answer streams"
    );
    drop(client);
    assert!(
        up.wait_closed(1, Duration::from_secs(10)).await,
        "rempart kept the connection of an abandoned answer"
    );
}

#[tokio::test]
async fn idle_connections_close_after_pool_idle_timeout() {
    let up = CountingUpstream::start(Answer::Fixed).await;
    let (_dir, rp) = start_rempart(&up, "pool_idle_timeout = \"1s\"\n");
    let used = Instant::now();
    sequential(&rp, 3).await;
    assert_eq!(up.accepted(), 1);
    assert!(
        up.wait_closed(1, Duration::from_secs(10)).await,
        "an idle connection outlived pool_idle_timeout"
    );
    assert!(
        used.elapsed() >= Duration::from_secs(1),
        "closed before it was idle for pool_idle_timeout"
    );
    // And the next request opens a new one.
    sequential(&rp, 1).await;
    assert_eq!(up.accepted(), 2);
}

#[tokio::test]
async fn pool_max_idle_zero_keeps_no_connection() {
    let up = CountingUpstream::start(Answer::Fixed).await;
    let (_dir, rp) = start_rempart(&up, "pool_max_idle = 0\n");
    sequential(&rp, 5).await;
    assert_eq!(up.accepted(), 5);
    assert!(up.wait_closed(5, Duration::from_secs(10)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_need_no_more_upstream_connections_than_there_are_clients() {
    // A connection handed back a moment ago may not be ready for the next
    // request yet; the pool must take another idle one rather than dial.
    const CLIENTS: usize = 16;
    const EACH: usize = 100;
    let up = CountingUpstream::start(Answer::Fixed).await;
    let (_dir, rp) = start_rempart(&up, "");
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        // Exactly one connection to rempart per client.
        clients.push(tokio::spawn(one_connection(rp.addr, EACH)));
    }
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), CLIENTS * EACH);
    assert!(
        up.accepted() <= CLIENTS,
        "{} upstream connections for {CLIENTS} clients",
        up.accepted()
    );
}

/// `n` requests one after the other over one TCP connection to `addr`,
/// each answer read to its end (`content-length`) and checked.
async fn one_connection(addr: SocketAddr, n: usize) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for i in 0..n {
        s.write_all(format!("GET /api/contacts/{i} HTTP/1.1\r\nhost: crm\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let k = s.read(&mut chunk).await.unwrap();
            assert!(k > 0, "rempart closed the connection at request {i}");
            buf.extend_from_slice(&chunk[..k]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "request {i}: {head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .expect("a content-length")
            .trim()
            .parse()
            .unwrap();
        while buf.len() < head_end + length {
            let k = s.read(&mut chunk).await.unwrap();
            assert!(k > 0, "rempart closed the connection in answer {i}");
            buf.extend_from_slice(&chunk[..k]);
        }
        assert_eq!(&buf[head_end..head_end + length], b"ok");
        buf.drain(..head_end + length);
    }
}
