//! Part of **enforce** for the egress proxy, on Linux: one direction of a
//! plain-TCP tunnel moved with `splice(2)`.
//!
//! A tunnel is rempart's busiest byte path (a CRM's uploads, exports and
//! mail go through it) and rempart never looks inside it (no TLS
//! interception). Copying each byte into user space and out again costs
//! two copies and two syscalls per buffer; `splice` moves the socket's
//! pages into a pipe and from the pipe into the other socket, so the bytes
//! stay in the kernel. The pipe is this direction's own, which is what
//! gives back-pressure: nothing more is read from the source until the
//! pipe has been written out to the destination.
//!
//! All of it is safe code: `rustix` wraps the syscalls, and tokio's
//! readiness (`readable`/`try_io`) drives them, so the sockets stay
//! registered with tokio and a `WouldBlock` clears their readiness as a
//! read would.

use std::io;

use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::tunnel::{Progress, Way};

/// Bytes asked of each `splice` from the source: the pipe holds 64 KiB by
/// default (16 pages), and a larger request is cut to what fits.
///
/// The pipe keeps the kernel's default size: a larger one was no faster
/// here, and would count against the user's pipe-page quota
/// (`/proc/sys/fs/pipe-user-pages-soft`), past which every new pipe gets a
/// single page.
const CHUNK: usize = 1 << 20;

/// Moves bytes from `from` to `to` until `from` ends, then passes the
/// half-close on (`shutdown(SHUT_WR)` on `to`), as `copy_bidirectional`
/// does.
pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    progress: &Progress,
    way: Way,
) -> io::Result<()> {
    let (pipe_out, pipe_in) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    loop {
        // The pipe is empty here: fill it from the source.
        let filled = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe_in, None, CHUNK, flags).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            // The source finished sending. The destination may already be
            // gone (the other direction's error says so).
            let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            return Ok(());
        }
        // Empty it into the destination before reading more.
        let mut left = filled;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe_out, None, to, None, left, flags).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    left -= n;
                    progress.moved(way, n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
