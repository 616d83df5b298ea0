//! Part of **enforce** for the egress proxy: carry a `CONNECT` tunnel's
//! bytes both ways once it was allowed and connected.
//!
//! Two ways to carry, with the same accounting and timeouts:
//! - [`carry_tcp`] (Linux, the client on plain TCP): `splice(2)` moves the
//!   bytes socket → pipe → socket inside the kernel, so they are never
//!   copied into rempart (see [`super::splice`]);
//! - [`carry`] (any stream: a client on TLS, other systems): tokio's
//!   `copy_bidirectional` with 64 KiB buffers, back-pressure coming from
//!   awaiting each write before reading more.
//!
//! Either way the bytes carried are known however the tunnel ends, and the
//! time of the last byte drives the idle timeout. At shutdown the egress
//! proxy cancels `cut` when its drain ends, so that a tunnel still open
//! then ends here too, with its bytes counted and a closing record.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

// tokio's clock, so that the timeouts can be tested with a paused clock.
use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

#[cfg(target_os = "linux")]
pub use super::splice::PipeBudget;

/// Without `splice(2)` a tunnel copies through buffers of its own: there
/// are no pipes to budget.
#[cfg(not(target_os = "linux"))]
#[derive(Debug)]
pub struct PipeBudget;

#[cfg(not(target_os = "linux"))]
impl PipeBudget {
    pub fn new(_limit: u64) -> PipeBudget {
        PipeBudget
    }

    pub fn used(&self) -> usize {
        0
    }
}

const BUFFER: usize = 64 * 1024;

/// How a tunnel ended, as the audit record says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Both sides finished (the usual end: one side closes, the other
    /// follows).
    Completed,
    IdleTimeout,
    MaxDuration,
    /// rempart shut down and `[server] drain_timeout` ended with the
    /// tunnel still open.
    Shutdown,
    Error,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Completed => "completed",
            Closed::IdleTimeout => "idle_timeout",
            Closed::MaxDuration => "max_duration",
            Closed::Shutdown => "shutdown",
            Closed::Error => "error",
        }
    }
}

/// What a tunnel carried.
#[derive(Debug, Clone, Copy)]
pub struct Carried {
    pub to_destination: u64,
    pub from_destination: u64,
    pub duration: Duration,
    pub closed: Closed,
}

/// Bytes moved each way so far, and when the last one moved. Shared by
/// reference between the two directions of one tunnel (one task).
pub(super) struct Progress {
    started: Instant,
    to_destination: AtomicU64,
    from_destination: AtomicU64,
    /// Nanoseconds since `started` of the last byte moved.
    last: AtomicU64,
}

/// Which way bytes went.
#[derive(Debug, Clone, Copy)]
pub(super) enum Way {
    ToDestination,
    FromDestination,
}

impl Progress {
    fn new() -> Self {
        Progress {
            started: Instant::now(),
            to_destination: AtomicU64::new(0),
            from_destination: AtomicU64::new(0),
            last: AtomicU64::new(0),
        }
    }

    pub(super) fn moved(&self, way: Way, n: usize) {
        let counter = match way {
            Way::ToDestination => &self.to_destination,
            Way::FromDestination => &self.from_destination,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        let ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.store(ns, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.started + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }

    /// Runs `transfer` until it ends, no byte moved for `idle`, `max`
    /// elapsed, or `cut` is cancelled.
    async fn supervise<F>(
        &self,
        transfer: F,
        idle: Duration,
        max: Duration,
        cut: CancellationToken,
    ) -> Carried
    where
        F: std::future::Future<Output = io::Result<()>>,
    {
        let deadline = self.started + max;
        tokio::pin!(transfer);
        let closed = loop {
            let idle_at = self.last_activity() + idle;
            tokio::select! {
                r = &mut transfer => break match r {
                    Ok(()) => Closed::Completed,
                    Err(_) => Closed::Error,
                },
                _ = tokio::time::sleep_until(deadline) => break Closed::MaxDuration,
                () = cut.cancelled() => break Closed::Shutdown,
                _ = tokio::time::sleep_until(idle_at) => {
                    if self.last_activity() + idle <= Instant::now() {
                        break Closed::IdleTimeout;
                    }
                }
            }
        };
        Carried {
            to_destination: self.to_destination.load(Ordering::Relaxed),
            from_destination: self.from_destination.load(Ordering::Relaxed),
            duration: self.started.elapsed(),
            closed,
        }
    }
}

/// Copies between `client` and `destination` until both are done, no byte
/// moved for `idle`, `max` elapsed, or `cut` is cancelled.
pub async fn carry<C, D>(
    client: C,
    destination: D,
    idle: Duration,
    max: Duration,
    cut: CancellationToken,
) -> Carried
where
    C: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    let progress = Progress::new();
    // Bytes read from the client go to the destination, and back.
    let mut client = Counted::new(client, &progress, Way::ToDestination);
    let mut destination = Counted::new(destination, &progress, Way::FromDestination);
    let copy = async {
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut destination, BUFFER, BUFFER)
            .await
            .map(|_| ())
    };
    progress.supervise(copy, idle, max, cut).await
}

/// As [`carry`], for a client and a destination both on plain TCP: the
/// bytes stay in the kernel (`splice(2)`).
#[cfg(target_os = "linux")]
pub async fn carry_tcp(
    client: tokio::net::TcpStream,
    destination: tokio::net::TcpStream,
    idle: Duration,
    max: Duration,
    cut: CancellationToken,
    pipes: &super::splice::PipeBudget,
) -> Carried {
    let progress = Progress::new();
    let both = async {
        tokio::try_join!(
            super::splice::one_way(&client, &destination, &progress, Way::ToDestination, pipes),
            super::splice::one_way(
                &destination,
                &client,
                &progress,
                Way::FromDestination,
                pipes
            ),
        )
        .map(|_| ())
    };
    progress.supervise(both, idle, max, cut).await
}

/// A stream that counts the bytes read from it.
struct Counted<'p, S> {
    inner: S,
    progress: &'p Progress,
    way: Way,
}

impl<'p, S> Counted<'p, S> {
    fn new(inner: S, progress: &'p Progress, way: Way) -> Self {
        Counted {
            inner,
            progress,
            way,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.progress.moved(this.way, n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn carries_both_ways_and_counts() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (dest, mut dest_peer) = tokio::io::duplex(1024);
        let tunnel = tokio::spawn(carry(
            client,
            dest,
            Duration::from_secs(5),
            Duration::from_secs(5),
            CancellationToken::new(),
        ));
        client_peer.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        dest_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        dest_peer.write_all(b"world!").await.unwrap();
        let mut buf = [0u8; 6];
        client_peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"world!");
        drop(client_peer);
        drop(dest_peer);
        let c = tunnel.await.unwrap();
        assert_eq!((c.to_destination, c.from_destination), (5, 6));
        assert_eq!(c.closed, Closed::Completed);
    }

    /// Two connected loopback TCP sockets.
    #[cfg(target_os = "linux")]
    async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Carries 8 MiB up and 5 MiB down at once through a spliced tunnel
    /// and checks every byte; returns the most bytes of large pipes that
    /// `pipes` held while the destination was still reading.
    #[cfg(target_os = "linux")]
    async fn splice_large_transfer(pipes: Arc<PipeBudget>) -> usize {
        let (mut client_peer, client) = tcp_pair().await;
        let (dest, mut dest_peer) = tcp_pair().await;
        let held = Arc::clone(&pipes);
        let tunnel = tokio::spawn(async move {
            carry_tcp(
                client,
                dest,
                Duration::from_secs(10),
                Duration::from_secs(60),
                CancellationToken::new(),
                &pipes,
            )
            .await
        });
        // Each a pattern that shows any lost, doubled or reordered chunk.
        let up: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..5 << 20).map(|i: u32| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let dest_side = tokio::spawn(async move {
            let (mut r, mut w) = dest_peer.split();
            let (got, sent) = tokio::join!(
                async {
                    // Until the last byte is read here the tunnel is open,
                    // so what the budget holds now is this tunnel's.
                    let (mut got, mut most_held) = (Vec::new(), 0);
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = r.read(&mut buf).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        most_held = most_held.max(held.used());
                    }
                    (got, most_held)
                },
                async {
                    w.write_all(&down2).await.unwrap();
                    w.shutdown().await.unwrap();
                }
            );
            let () = sent;
            got
        });
        let (mut r, mut w) = client_peer.split();
        let (got, ()) = tokio::join!(
            async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got
            },
            async {
                w.write_all(&up2).await.unwrap();
                // Half-close: the destination sees the end of the upload
                // while its download still flows.
                w.shutdown().await.unwrap();
            }
        );
        assert!(got == down, "download differs ({} bytes)", got.len());
        let (at_dest, most_held) = dest_side.await.unwrap();
        assert!(at_dest == up, "upload differs ({} bytes)", at_dest.len());
        let c = tunnel.await.unwrap();
        assert_eq!(c.closed, Closed::Completed);
        assert_eq!(
            (c.to_destination, c.from_destination),
            (up.len() as u64, down.len() as u64)
        );
        most_held
    }

    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splice_carries_large_transfers_both_ways_and_half_closes() {
        // Pipes kept at the kernel's default size.
        let none = Arc::new(PipeBudget::new(0));
        assert_eq!(splice_large_transfer(Arc::clone(&none)).await, 0);
        // Pipes grown for the bulk transfer, and the room given back.
        let room = Arc::new(PipeBudget::new(16 << 20));
        let most_held = splice_large_transfer(Arc::clone(&room)).await;
        assert!(most_held > 0, "a bulk transfer should grow its pipes");
        assert!(most_held <= 16 << 20);
        assert_eq!(room.used(), 0, "a closed tunnel gives its pipes' room back");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn splice_tunnel_closes_when_idle() {
        let (_client_peer, client) = tcp_pair().await;
        let (dest, _dest_peer) = tcp_pair().await;
        let c = carry_tcp(
            client,
            dest,
            Duration::from_millis(200),
            Duration::from_secs(30),
            CancellationToken::new(),
            &PipeBudget::new(16 << 20),
        )
        .await;
        assert_eq!(c.closed, Closed::IdleTimeout);
        assert_eq!((c.to_destination, c.from_destination), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_max_duration_close_the_tunnel() {
        let (client, _cp) = tokio::io::duplex(64);
        let (dest, _dp) = tokio::io::duplex(64);
        let c = carry(
            client,
            dest,
            Duration::from_secs(1),
            Duration::from_secs(60),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(c.closed, Closed::IdleTimeout);
        let (client, mut cp) = tokio::io::duplex(64);
        let (dest, mut dp) = tokio::io::duplex(64);
        let chatter = tokio::spawn(async move {
            let mut b = [0u8; 1];
            loop {
                if cp.write_all(b"x").await.is_err() || dp.read_exact(&mut b).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let c = carry(
            client,
            dest,
            Duration::from_secs(1),
            Duration::from_secs(5),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(c.closed, Closed::MaxDuration);
        assert!(c.to_destination >= 5, "{c:?}");
        chatter.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_closes_a_busy_tunnel_with_its_bytes_counted() {
        let (client, mut cp) = tokio::io::duplex(64);
        let (dest, mut dp) = tokio::io::duplex(64);
        let cut = CancellationToken::new();
        let tunnel = tokio::spawn(carry(
            client,
            dest,
            Duration::from_secs(60),
            Duration::from_secs(3600),
            cut.clone(),
        ));
        cp.write_all(b"abc").await.unwrap();
        let mut b = [0u8; 3];
        dp.read_exact(&mut b).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!tunnel.is_finished(), "ended before the cut");
        cut.cancel();
        let c = tunnel.await.unwrap();
        assert_eq!(c.closed, Closed::Shutdown);
        assert_eq!(c.closed.as_str(), "shutdown");
        assert_eq!((c.to_destination, c.from_destination), (3, 0));
    }
}
