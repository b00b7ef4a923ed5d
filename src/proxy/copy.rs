//! One direction of a proxied connection as a small poll-driven state machine: bytes
//! from `from` to `to` until EOF.
//!
//! Hand-written with `poll_read_ready`/`poll_write_ready` rather than async fns: an
//! async copy loop per direction costs ~500 bytes of future state per direction per
//! connection (readiness futures with waiter nodes, nested write futures), which idle
//! WebSockets would hold forever. This keeps a direction at a few dozen bytes.
//!
//! On Linux, once a direction shows bulk traffic (one read fills a whole 64 KiB buffer,
//! HAProxy's "splice-auto" idea), its bytes go socket -> pipe -> socket with `splice(2)`,
//! never entering user space. Before that, or when no pipe can be had, they go through a
//! buffer. Either way the
//! pipe or buffer is borrowed from a per-thread pool only while bytes move and returned
//! as soon as the source has nothing more to give, so an idle connection holds neither.

use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// The source sent FIN; it was passed on as shutdown(write) to the sink.
    Eof,
    /// Reading the source failed: the source is gone (reset); end everything now.
    ReadFailed,
    /// Writing the sink failed: the sink is gone; the other direction will see it too.
    WriteFailed,
}

/// What a direction holds while bytes move.
enum Carrier {
    /// Nothing: idle, or between bursts.
    None,
    #[cfg(target_os = "linux")]
    Pipe(super::pipes::Pipe),
    /// A pooled buffer and the unwritten range `start..end` in it.
    Buf {
        buf: Box<[u8]>,
        start: usize,
        end: usize,
    },
}

/// One direction's state.
pub(super) struct Direction {
    carrier: Carrier,
    /// Set once a read filled a whole buffer: from then on this direction splices.
    /// Small messages (WebSocket frames) stay on plain read/write, which costs the same
    /// syscalls and less kernel work than moving page references through a pipe.
    bulk: bool,
    end: Option<End>,
    /// Bytes delivered to the sink.
    pub moved: u64,
}

impl Direction {
    pub fn new() -> Direction {
        Direction {
            carrier: Carrier::None,
            bulk: false,
            end: None,
            moved: 0,
        }
    }

    /// Moves what can be moved now. Ready once the direction has ended; Pending when
    /// waiting for the source (carrier returned to its pool) or the sink (carrier kept:
    /// it holds bytes). Adds delivered bytes to `live` and sets `progressed`.
    pub fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        live: &AtomicU64,
        progressed: &mut bool,
    ) -> Poll<End> {
        if let Some(end) = self.end {
            return Poll::Ready(end);
        }
        let end = loop {
            if self.pending() > 0 {
                match self.flush(cx, to, live) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => continue,
                    Poll::Ready(Ok(_)) => {
                        *progressed = true;
                        continue;
                    }
                    Poll::Ready(Err(_)) => break End::WriteFailed,
                }
            }
            match from.poll_read_ready(cx) {
                Poll::Pending => {
                    self.release();
                    return Poll::Pending;
                }
                Poll::Ready(Err(_)) => break End::ReadFailed,
                Poll::Ready(Ok(())) => {}
            }
            match self.fill(from) {
                Ok(0) => break pass_eof(to),
                Ok(_) => *progressed = true,
                // try_io/try_read cleared the readiness: poll_read_ready registers us.
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(_) => break End::ReadFailed,
            }
        };
        self.release();
        self.end = Some(end);
        Poll::Ready(end)
    }

    /// Bytes read but not yet written.
    pub fn pending(&self) -> usize {
        match &self.carrier {
            Carrier::None => 0,
            #[cfg(target_os = "linux")]
            Carrier::Pipe(p) => p.queued(),
            Carrier::Buf { start, end, .. } => end - start,
        }
    }

    /// Reads what the source has into the carrier (borrowing one if needed).
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        if matches!(self.carrier, Carrier::None) {
            self.carrier = borrow(self.bulk);
        }
        match &mut self.carrier {
            #[cfg(target_os = "linux")]
            Carrier::Pipe(p) => {
                let n = from.try_io(Interest::READABLE, || zero_copy::socket_to_pipe(from, p))?;
                p.filled(n);
                Ok(n)
            }
            Carrier::Buf { buf, start, end } => {
                let n = from.try_read(buf)?;
                self.bulk |= n == buf.len();
                (*start, *end) = (0, n);
                Ok(n)
            }
            Carrier::None => unreachable!("a carrier was just borrowed"),
        }
    }

    /// Writes pending bytes; Ready(Ok(n)) with what was written (0: readiness was stale).
    fn flush(
        &mut self,
        cx: &mut Context<'_>,
        to: &TcpStream,
        live: &AtomicU64,
    ) -> Poll<io::Result<usize>> {
        ready!(to.poll_write_ready(cx))?;
        let wrote = match &mut self.carrier {
            #[cfg(target_os = "linux")]
            Carrier::Pipe(p) => to
                .try_io(Interest::WRITABLE, || zero_copy::pipe_to_socket(p, to))
                .inspect(|&n| p.drained(n)),
            Carrier::Buf { buf, start, end } => {
                to.try_write(&buf[*start..*end]).inspect(|&n| *start += n)
            }
            Carrier::None => Ok(0),
        };
        match wrote {
            Ok(n) => {
                self.moved += n as u64;
                live.fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(Ok(n))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                Poll::Ready(Ok(0))
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Returns the carrier to its pool (a pipe still holding bytes is closed instead).
    fn release(&mut self) {
        match std::mem::replace(&mut self.carrier, Carrier::None) {
            Carrier::None => {}
            #[cfg(target_os = "linux")]
            Carrier::Pipe(p) => super::pipes::give(p),
            Carrier::Buf { buf, .. } => buffers::give(buf),
        }
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        self.release();
    }
}

fn borrow(bulk: bool) -> Carrier {
    #[cfg(target_os = "linux")]
    if bulk {
        if let Some(p) = super::pipes::take() {
            return Carrier::Pipe(p);
        }
    }
    Carrier::Buf {
        buf: buffers::take(),
        start: 0,
        end: 0,
    }
}

/// Passes the source's EOF on to the sink.
fn pass_eof(to: &TcpStream) -> End {
    match SockRef::from(to).shutdown(Shutdown::Write) {
        // ENOTCONN: the sink is already fully closed; nothing to tell it.
        Err(e) if e.kind() != ErrorKind::NotConnected => End::WriteFailed,
        _ => End::Eof,
    }
}

#[cfg(target_os = "linux")]
mod zero_copy {
    use std::io;
    use std::os::fd::AsFd;

    use nix::fcntl::{SpliceFFlags, splice};
    use tokio::net::TcpStream;

    use super::super::pipes::Pipe;

    fn flags() -> SpliceFFlags {
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
    }

    /// The pipe is empty whenever this is called (we drain before reading again), so
    /// EAGAIN means "socket empty", never "pipe full".
    pub fn socket_to_pipe(from: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
        splice(
            from.as_fd(),
            None,
            pipe.write_end(),
            None,
            pipe.capacity(),
            flags(),
        )
        .map_err(io::Error::from)
    }

    pub fn pipe_to_socket(pipe: &Pipe, to: &TcpStream) -> io::Result<usize> {
        splice(
            pipe.read_end(),
            None,
            to.as_fd(),
            None,
            pipe.queued(),
            flags(),
        )
        .map_err(io::Error::from)
    }
}

/// A small per-thread pool of copy buffers for the buffered path. Tasks may migrate
/// between threads; a buffer simply returns to whichever thread's pool finishes with it.
mod buffers {
    use std::cell::RefCell;

    pub const BUF_SIZE: usize = 64 * 1024;
    const KEEP: usize = 32;

    thread_local! {
        static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take() -> Box<[u8]> {
        FREE.with(|f| f.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUF_SIZE].into_boxed_slice())
    }

    pub fn give(buf: Box<[u8]>) {
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(buf);
            }
        });
    }
}
