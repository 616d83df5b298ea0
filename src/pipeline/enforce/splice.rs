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
//! 32 KiB or more waiting at once (a bulk transfer, not an API call) asks
//! the [`PipeBudget`] for a 1 MiB pipe (`/proc/sys/fs/pipe-max-size` if
//! smaller), and gives it back after a run of small fills or when the
//! tunnel closes. Fewer, larger splices cut rempart's CPU per byte by about
//! a third and raise a loopback tunnel's throughput by about 40 %
//! (docs/performance.md). The budget exists because pipe pages count
//! against a per-user quota (`/proc/sys/fs/pipe-user-pages-soft`, 64 MiB by
//! default) shared with every process of the same user; past it, every new
//! pipe of that user gets two pages. So only `[egress] tunnel_pipe_budget`
//! bytes of large pipes exist at once.
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

/// Size of a grown pipe: 1 MiB, or `/proc/sys/fs/pipe-max-size` when
/// that is smaller (the most an unprivileged process may set).
const LARGE_PIPE: usize = 1 << 20;

/// A fill of this much at once means the source had that much waiting: a
/// bulk transfer, not an API call or a trickle. Half the default pipe, not
/// all of it: a pipe holds 16 buffers, and socket pages are not always
/// full ones.
const GROW_AT: usize = 32 << 10;

/// Smaller fills in a row after which a grown pipe goes back to its first
/// size and gives its room back (a tunnel kept open after its burst).
const SHRINK_AFTER: u32 = 8;

/// The bytes of large pipes that the tunnels of this process may hold at
/// once, shared by every worker.
#[derive(Debug)]
pub struct PipeBudget {
    limit: usize,
    used: AtomicUsize,
    /// Size asked for a grown pipe.
    large: usize,
}

/// Why a pipe was not grown.
#[derive(Debug, PartialEq, Eq)]
enum NotGrown {
    /// The budget has no room now; it may later.
    NoRoom,
    /// The kernel refused (the user's pipe quota): no use asking again.
    Refused,
}

impl PipeBudget {
    /// A budget of `limit` bytes; 0 keeps every pipe at the kernel's
    /// default size.
    pub fn new(limit: u64) -> PipeBudget {
        let large = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .map_or(LARGE_PIPE, |max| max.min(LARGE_PIPE));
        if limit > 0 && limit < large as u64 {
            tracing::warn!(
                "[egress] tunnel_pipe_budget ({limit} bytes) is smaller than one large pipe ({large} bytes): no tunnel pipe will grow"
            );
        }
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
    /// returns the grant that gives the room back when dropped. Not grown,
    /// the pipe keeps its size, which is still correct, only slower.
    fn grow<Fd: AsFd>(&self, pipe: Fd) -> Result<Grant<'_>, NotGrown> {
        let size = self.large;
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(size).filter(|&after| after <= self.limit)
            })
            .map_err(|_| NotGrown::NoRoom)?;
        let grant = Grant { budget: self };
        // `pipe-max-size` is a power of two of pages, so the kernel sets
        // exactly `size`: what the grant holds is what the quota counts.
        fcntl_setpipe_size(pipe, size).map_err(|_| NotGrown::Refused)?;
        Ok(grant)
    }
}

/// How one direction's pipe is sized: grown for a burst while the budget
/// has room, given back after [`SHRINK_AFTER`] small fills in a row, or
/// when the tunnel closes.
struct Sizing<'b> {
    budget: &'b PipeBudget,
    /// The pipe's size as created.
    first: usize,
    grant: Option<Grant<'b>>,
    small_fills: u32,
    /// The kernel refused to grow this pipe once.
    refused: bool,
}

impl<'b> Sizing<'b> {
    fn new(budget: &'b PipeBudget) -> Self {
        Sizing {
            budget,
            first: 0,
            grant: None,
            small_fills: 0,
            refused: false,
        }
    }

    /// After each fill of `filled` bytes into `pipe` (which then holds
    /// just those, less than the first size when shrinking).
    fn after_fill<Fd: AsFd>(&mut self, pipe: Fd, filled: usize) {
        if self.grant.is_none() {
            if filled >= GROW_AT && !self.refused && self.budget.large > self.first {
                match self.budget.grow(pipe) {
                    Ok(grant) => {
                        self.grant = Some(grant);
                        self.small_fills = 0;
                    }
                    Err(NotGrown::Refused) => self.refused = true,
                    Err(NotGrown::NoRoom) => {}
                }
            }
        } else if filled < GROW_AT {
            self.small_fills += 1;
            if self.small_fills >= SHRINK_AFTER {
                self.small_fills = 0;
                if fcntl_setpipe_size(pipe, self.first).is_ok() {
                    self.grant = None;
                }
            }
        } else {
            self.small_fills = 0;
        }
    }
}

/// Room for one large pipe taken from a [`PipeBudget`], given back when
/// dropped.
struct Grant<'b> {
    budget: &'b PipeBudget,
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        self.budget
            .used
            .fetch_sub(self.budget.large, Ordering::AcqRel);
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
    let mut sizing = Sizing::new(budget);
    let (pipe_out, pipe_in) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    sizing.first = fcntl_getpipe_size(&pipe_in).unwrap_or(usize::MAX);
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
        sizing.after_fill(&pipe_in, filled);
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
        assert_eq!(budget.grow(&pipe).err(), Some(NotGrown::NoRoom));
        assert_eq!(fcntl_getpipe_size(&pipe).unwrap(), default);

        // Room for exactly one large pipe.
        let one = PipeBudget::new(PipeBudget::new(0).large as u64);
        let (_o1, p1) = pipe_with(PipeFlags::CLOEXEC).unwrap();
        let (_o2, p2) = pipe_with(PipeFlags::CLOEXEC).unwrap();
        let g1 = one.grow(&p1).expect("room for the first");
        assert_eq!(fcntl_getpipe_size(&p1).unwrap(), one.large);
        assert!(one.large > default);
        assert_eq!(one.used(), one.large);
        assert_eq!(one.grow(&p2).err(), Some(NotGrown::NoRoom));
        assert_eq!(fcntl_getpipe_size(&p2).unwrap(), default);
        drop(g1);
        assert_eq!(one.used(), 0);
        let _g2 = one.grow(&p2).expect("room once the first is given back");
        assert_eq!(fcntl_getpipe_size(&p2).unwrap(), one.large);
    }

    #[test]
    fn a_pipe_grows_for_a_burst_and_shrinks_after_small_fills_in_a_row() {
        let budget = PipeBudget::new(PipeBudget::new(0).large as u64);
        let (_out, pipe) = pipe_with(PipeFlags::CLOEXEC).unwrap();
        let first = fcntl_getpipe_size(&pipe).unwrap();
        let mut sizing = Sizing::new(&budget);
        sizing.first = first;
        sizing.after_fill(&pipe, GROW_AT - 1);
        assert_eq!(budget.used(), 0, "a small fill grows nothing");
        sizing.after_fill(&pipe, GROW_AT);
        assert_eq!(fcntl_getpipe_size(&pipe).unwrap(), budget.large);
        assert_eq!(budget.used(), budget.large);
        // A burst in between starts the count of small fills again.
        for _ in 1..SHRINK_AFTER {
            sizing.after_fill(&pipe, 100);
        }
        sizing.after_fill(&pipe, GROW_AT);
        for _ in 1..SHRINK_AFTER {
            sizing.after_fill(&pipe, 100);
        }
        assert_eq!(budget.used(), budget.large, "still grown");
        sizing.after_fill(&pipe, 100);
        assert_eq!(fcntl_getpipe_size(&pipe).unwrap(), first);
        assert_eq!(budget.used(), 0, "the room is given back");
        // And it grows again for the next burst.
        sizing.after_fill(&pipe, 1 << 20);
        assert_eq!(budget.used(), budget.large);
        drop(sizing);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_pipe_already_as_large_is_not_grown() {
        let budget = PipeBudget::new(16 << 20);
        let (_out, pipe) = pipe_with(PipeFlags::CLOEXEC).unwrap();
        let mut sizing = Sizing::new(&budget);
        sizing.first = budget.large;
        sizing.after_fill(&pipe, 1 << 20);
        assert_eq!(budget.used(), 0);
    }
}
