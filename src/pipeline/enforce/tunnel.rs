//! Part of **enforce** for the egress proxy: carry a `CONNECT` tunnel's
//! bytes both ways once it was allowed and connected.
//!
//! The copy is tokio's `copy_bidirectional` (back-pressure comes from
//! awaiting each write before reading more) with 64 KiB buffers; each side
//! is wrapped in a counter so that the bytes carried are known however the
//! tunnel ends, and the activity stamp drives the idle timeout.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

// tokio's clock, so that the timeouts can be tested with a paused clock.
use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const BUFFER: usize = 64 * 1024;

/// How a tunnel ended, as the audit record says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Both sides finished (the usual end: one side closes, the other
    /// follows).
    Completed,
    IdleTimeout,
    MaxDuration,
    Error,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Completed => "completed",
            Closed::IdleTimeout => "idle_timeout",
            Closed::MaxDuration => "max_duration",
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

/// Copies between `client` and `destination` until both are done, no byte
/// moved for `idle`, or `max` elapsed.
pub async fn carry<C, D>(client: C, destination: D, idle: Duration, max: Duration) -> Carried
where
    C: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let activity = Arc::new(Activity(AtomicU64::new(0)));
    let mut client = Counted::new(client, Arc::clone(&activity), started);
    let mut destination = Counted::new(destination, Arc::clone(&activity), started);
    let deadline = started + max;
    let closed = {
        let copy =
            tokio::io::copy_bidirectional_with_sizes(&mut client, &mut destination, BUFFER, BUFFER);
        tokio::pin!(copy);
        loop {
            let idle_at = activity.last(started) + idle;
            tokio::select! {
                r = &mut copy => break match r {
                    Ok(_) => Closed::Completed,
                    Err(_) => Closed::Error,
                },
                _ = tokio::time::sleep_until(deadline) => break Closed::MaxDuration,
                _ = tokio::time::sleep_until(idle_at) => {
                    if activity.last(started) + idle <= Instant::now() {
                        break Closed::IdleTimeout;
                    }
                }
            }
        }
    };
    Carried {
        // Bytes read from the client went to the destination, and back.
        to_destination: client.read,
        from_destination: destination.read,
        duration: started.elapsed(),
        closed,
    }
}

/// The time of the last byte moved, as nanoseconds since the tunnel began.
struct Activity(AtomicU64);

impl Activity {
    fn touch(&self, started: Instant) {
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.store(ns, Ordering::Relaxed);
    }

    fn last(&self, started: Instant) -> Instant {
        started + Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

/// A stream that counts the bytes read from it and stamps activity.
struct Counted<S> {
    inner: S,
    read: u64,
    activity: Arc<Activity>,
    started: Instant,
}

impl<S> Counted<S> {
    fn new(inner: S, activity: Arc<Activity>, started: Instant) -> Self {
        Counted {
            inner,
            read: 0,
            activity,
            started,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
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
            this.read += n as u64;
            this.activity.touch(this.started);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
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

    #[tokio::test(start_paused = true)]
    async fn idle_and_max_duration_close_the_tunnel() {
        let (client, _cp) = tokio::io::duplex(64);
        let (dest, _dp) = tokio::io::duplex(64);
        let c = carry(
            client,
            dest,
            Duration::from_secs(1),
            Duration::from_secs(60),
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
        let c = carry(client, dest, Duration::from_secs(1), Duration::from_secs(5)).await;
        assert_eq!(c.closed, Closed::MaxDuration);
        assert!(c.to_destination >= 5, "{c:?}");
        chatter.abort();
    }
}
