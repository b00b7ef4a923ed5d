//! Pipes for splice(2), pooled per thread and capped process-wide: each costs two file
//! descriptors, which come out of the same budget as connections. A connection borrows
//! one only while bytes move; when none can be had, that burst is copied through a buffer.

use std::cell::RefCell;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::fcntl::OFlag;

/// Most pipes alive at once in the process (set at start from the fd limit).
static LIMIT: AtomicUsize = AtomicUsize::new(0);
/// Pipes alive now (pooled or borrowed).
static ALIVE: AtomicUsize = AtomicUsize::new(0);
/// Pipes kept idle per thread.
const KEEP: usize = 16;

thread_local! {
    static FREE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Sets how many pipes may exist; 0 turns zero-copy off (buffered copies only).
pub fn set_limit(n: usize) {
    LIMIT.store(n, Ordering::Relaxed);
}

/// A non-blocking pipe and how many bytes sit in it.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    len: usize,
    capacity: usize,
}

impl Pipe {
    fn new() -> Option<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).ok()?;
        let capacity = nix::fcntl::fcntl(&read, nix::fcntl::FcntlArg::F_GETPIPE_SZ)
            .map(|n| n as usize)
            .unwrap_or(64 * 1024);
        Some(Pipe {
            read,
            write,
            len: 0,
            capacity,
        })
    }

    pub fn read_end(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.read.as_fd()
    }

    pub fn write_end(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.write.as_fd()
    }

    pub fn queued(&self) -> usize {
        self.len
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn filled(&mut self, n: usize) {
        self.len += n;
    }

    pub fn drained(&mut self, n: usize) {
        self.len -= n;
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        ALIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A pipe from this thread's pool, or a new one while under the limit.
pub fn take() -> Option<Pipe> {
    if let Some(p) = FREE.with(|f| f.borrow_mut().pop()) {
        return Some(p);
    }
    if ALIVE.fetch_add(1, Ordering::Relaxed) >= LIMIT.load(Ordering::Relaxed) {
        ALIVE.fetch_sub(1, Ordering::Relaxed);
        return None;
    }
    let p = Pipe::new();
    if p.is_none() {
        ALIVE.fetch_sub(1, Ordering::Relaxed);
    }
    p
}

/// Returns a pipe to the pool; one still holding bytes (its connection failed midway)
/// is closed instead, as is any beyond what the pool keeps.
pub fn give(pipe: Pipe) {
    if pipe.len == 0 {
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(pipe);
            }
        });
    }
}
