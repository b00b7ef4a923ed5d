//! One direction of a proxied connection: bytes from `from` to `to` until EOF.
//!
//! On Linux the bytes go socket -> pipe -> socket with `splice(2)`, never entering user
//! space. Otherwise, or when no pipe can be had, they go through a buffer. Either way the
//! pipe or buffer is borrowed from a per-thread pool only while bytes move and returned
//! when the source has nothing more to give, so an idle connection holds neither: 10k
//! idle WebSockets would otherwise pin 2 x 8 KiB each (what `copy_bidirectional` keeps).

use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::splice::End;

/// Copies `from` -> `to` until EOF (passed on as shutdown(write)) or an error. Waits for
/// readiness before borrowing a pipe or buffer.
pub(super) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    moved: [&AtomicU64; 2],
    activity: &AtomicU64,
    base: Instant,
) -> End {
    let progress = |n: usize| {
        activity.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
        for m in moved {
            m.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    loop {
        if from.readable().await.is_err() {
            return End::ReadFailed;
        }
        #[cfg(target_os = "linux")]
        let end = match super::pipes::take() {
            Some(mut pipe) => {
                let end = zero_copy::burst(from, to, &mut pipe, &progress).await;
                super::pipes::give(pipe);
                end
            }
            None => buffered_burst(from, to, &progress).await,
        };
        #[cfg(not(target_os = "linux"))]
        let end = buffered_burst(from, to, &progress).await;
        if let Some(end) = end {
            return end;
        }
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

/// Moves what `from` has now through a pooled buffer. `None`: drained, wait again.
async fn buffered_burst(
    from: &TcpStream,
    to: &TcpStream,
    progress: &impl Fn(usize),
) -> Option<End> {
    let mut buf = buffers::take();
    let end = loop {
        match from.try_read(&mut buf) {
            Ok(0) => break Some(pass_eof(to)),
            Ok(n) => {
                if write_all(to, &buf[..n]).await.is_err() {
                    break Some(End::WriteFailed);
                }
                progress(n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break None,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break Some(End::ReadFailed),
        }
    };
    buffers::give(buf);
    end
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
mod zero_copy {
    use std::io::{self, ErrorKind};
    use std::os::fd::AsFd;

    use nix::fcntl::{SpliceFFlags, splice};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::super::pipes::Pipe;
    use super::{End, pass_eof};

    fn flags() -> SpliceFFlags {
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
    }

    /// Moves what `from` has now with splice(2): socket -> pipe, then pipe -> socket until
    /// the pipe is empty again. `None`: drained, wait again. The pipe is always empty when
    /// this returns `None`, so an EAGAIN on the way in means "socket empty", never "pipe full".
    pub(super) async fn burst(
        from: &TcpStream,
        to: &TcpStream,
        pipe: &mut Pipe,
        progress: &impl Fn(usize),
    ) -> Option<End> {
        loop {
            // try_io clears tokio's readiness on EAGAIN, so the next readable() really waits.
            let read = from.try_io(Interest::READABLE, || {
                splice(
                    from.as_fd(),
                    None,
                    pipe.write_end(),
                    None,
                    pipe.capacity(),
                    flags(),
                )
                .map_err(io::Error::from)
            });
            match read {
                Ok(0) => return Some(pass_eof(to)),
                Ok(n) => {
                    pipe.filled(n);
                    if drain(pipe, to, progress).await.is_err() {
                        return Some(End::WriteFailed);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Some(End::ReadFailed),
            }
        }
    }

    async fn drain(pipe: &mut Pipe, to: &TcpStream, progress: &impl Fn(usize)) -> io::Result<()> {
        while pipe.queued() > 0 {
            to.writable().await?;
            let wrote = to.try_io(Interest::WRITABLE, || {
                splice(pipe.read_end(), None, to.as_fd(), None, pipe.queued(), flags())
                    .map_err(io::Error::from)
            });
            match wrote {
                Ok(n) => {
                    pipe.drained(n);
                    progress(n);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
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
