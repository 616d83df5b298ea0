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
//! A pipe starts at the kernel's default 64 KiB. A direction that finds
//! 32 KiB or more waiting at once (a bulk transfer, not an API call) asks the [`PipeBudget`] for a pipe of
//! `/proc/sys/fs/pipe-max-size` (1 MiB by default): fewer, larger splices
//! cut rempart's CPU per byte by about a third and raise a loopback
//! tunnel's throughput by about 40 % (docs/performance.md). The budget
//! exists because pipe pages count against a per-user quota
//! (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB by default) shared with
//! every process of the same user; past it, every new pipe of that user
//! gets two pages. So only `[egress] tunnel_pipe_budget` bytes of large
//! pipes exist at once, and a direction that gets none keeps its 64 KiB.
//!
//! All of it is safe code: `rustix` wraps the syscalls, and tokio's
//! readiness (`readable`/`try_io`) drives them, so the sockets stay
//! registered with tokio and a `WouldBlock` clears their readiness as a
//! read would.

use std::io;

use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fd::AsFd;
use rustix::pipe::{
    fcntl_getpipe_size, fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags,
};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::tunnel::{Progress, Way};

/// Bytes asked of each `splice` from the source; a request larger than
/// the pipe's room is cut to what fits.
const CHUNK: usize = 1 << 20;

/// Size of a grown pipe when `/proc/sys/fs/pipe-max-size` cannot be read.
const LARGE_PIPE: usize = 1 << 20;

/// The bytes of large pipes that the tunnels of this process may hold at
/// once, shared by every worker.
#[derive(Debug)]
pub struct PipeBudget {
    limit: usize,
    used: AtomicUsize,
    /// Size asked for a grown pipe: the largest an unprivileged process
    /// may set.
    large: usize,
}

impl PipeBudget {
    /// A budget of `limit` bytes; 0 keeps every pipe at the kernel's
    /// default size.
    pub fn new(limit: u64) -> PipeBudget {
        let large = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(LARGE_PIPE);
        PipeBudget {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            used: AtomicUsize::new(0),
            large,
        }
    }

    /// Bytes of large pipes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Grows `pipe` to a large pipe if the budget has room for it, and
    /// returns the grant that gives the room back when dropped. `None`
    /// when the budget is spent or the kernel refuses (the user's pipe
    /// quota is reached): the pipe keeps its size, which is still correct,
    /// only slower.
    fn grow<Fd: AsFd>(&self, pipe: Fd) -> Option<Grant<'_>> {
        let size = self.large;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(size).filter(|&after| after <= self.limit)
            })
            .ok()?;
        let grant = Grant { budget: self, size };
        // The kernel may round up to a power of two of pages; what it
        // counts against the quota is what it set, close to `size`.
        fcntl_setpipe_size(pipe, size).ok()?;
        Some(grant)
    }
}

/// Room taken from a [`PipeBudget`], given back when dropped.
struct Grant<'b> {
    budget: &'b PipeBudget,
    size: usize,
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.size, Ordering::AcqRel);
    }
}

/// Moves bytes from `from` to `to` until `from` ends, then passes the
/// half-close on (`shutdown(SHUT_WR)` on `to`), as `copy_bidirectional`
/// does.
pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    progress: &Progress,
    way: Way,
    budget: &PipeBudget,
) -> io::Result<()> {
    // Declared before the pipe, so dropped after it: the room goes back
    // once the pipe is closed.
    let mut _grant = None;
    let (pipe_out, pipe_in) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    // A fill of half the default pipe at once (32 KiB) means the source
    // had that much waiting: a bulk transfer, not an API call or a trickle.
    // Half, not all: a pipe holds 16 buffers, and socket pages are not
    // always full ones. 0 once growing was tried.
    let mut grow_at = fcntl_getpipe_size(&pipe_in).unwrap_or(0) / 2;
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
        if grow_at != 0 && filled >= grow_at {
            // Worth a larger pipe if there is room; asked once per
            // direction.
            grow_at = 0;
            _grant = budget.grow(&pipe_in);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_grows_pipes_while_it_has_room_and_takes_it_back() {
        let budget = PipeBudget::new(0);
        let (_out, pipe) = pipe_with(PipeFlags::CLOEXEC).unwrap();
        let default = fcntl_getpipe_size(&pipe).unwrap();
        assert!(budget.grow(&pipe).is_none(), "a zero budget grows nothing");
        assert_eq!(fcntl_getpipe_size(&pipe).unwrap(), default);

        // Room for exactly one large pipe.
        let one = PipeBudget::new(PipeBudget::new(0).large as u64);
        let (_o1, p1) = pipe_with(PipeFlags::CLOEXEC).unwrap();
        let (_o2, p2) = pipe_with(PipeFlags::CLOEXEC).unwrap();
        let g1 = one.grow(&p1).expect("room for the first");
        assert_eq!(fcntl_getpipe_size(&p1).unwrap(), one.large);
        assert!(one.large > default);
        assert_eq!(one.used(), one.large);
        assert!(one.grow(&p2).is_none(), "no room for the second");
        assert_eq!(fcntl_getpipe_size(&p2).unwrap(), default);
        drop(g1);
        assert_eq!(one.used(), 0);
        let _g2 = one.grow(&p2).expect("room once the first is given back");
        assert_eq!(fcntl_getpipe_size(&p2).unwrap(), one.large);
    }
}
