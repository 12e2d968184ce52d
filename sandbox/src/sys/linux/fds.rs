//! The fd plumbing of the node and its children: pipes, the fixed fd layouts of a sandbox's
//! processes, reads and writes retried on EINTR, poll, non-blocking mode.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use super::errno;

pub(super) fn close_range_from(first: i32) -> Result<(), i32> {
    // SAFETY: close_range takes integers; closing fds this process owns is its own business.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, u32::MAX, 0) };
    if ret == -1 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// Closes every fd from `first` on (best effort).
pub(crate) fn close_fds_from(first: RawFd) {
    let _ = close_range_from(first);
}

/// A pipe with both ends close-on-exec: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Moves `stdio` onto fds 0..=2 and `control` onto 3.. (in order), without close-on-exec on
/// the stdio ones, and closes everything else (fds leaked from other threads' sandboxes).
pub(crate) fn adopt_fds(stdio: [RawFd; 3], control: &[RawFd]) -> Result<(), i32> {
    let all: Vec<RawFd> = stdio.iter().chain(control).copied().collect();
    let max = all.iter().copied().max().unwrap_or(0);
    let base = (max + 1).max(all.len() as RawFd);
    // First copy everything above every source and every target, so no dup2 below clobbers an
    // fd that is still to be moved.
    let mut temps = Vec::with_capacity(all.len());
    for fd in &all {
        // SAFETY: F_DUPFD_CLOEXEC on an fd we own, returning a new fd we then own.
        let new = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, base) };
        if new == -1 {
            return Err(errno());
        }
        temps.push(new);
    }
    for (target, temp) in temps.iter().enumerate() {
        let target = target as RawFd;
        // SAFETY: both are valid fd numbers; dup2 replaces `target` atomically.
        if unsafe { libc::dup2(*temp, target) } == -1 {
            return Err(errno());
        }
        if target > 2 {
            // SAFETY: F_SETFD on an fd we just created.
            unsafe { libc::fcntl(target, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
    close_range_from(all.len() as i32)
}

/// In the init process: the supervisor's layout (0..=2 stdio, 3 its status, 4 work, 5 init
/// status, 6.. the `joins` cgroup join files) becomes 0..=2 stdio, 3 work, 4 status, 5.. the
/// join files; everything after them is closed.
pub(crate) fn adopt_init_fds(joins: usize) -> Result<(), i32> {
    let joins = RawFd::try_from(joins).map_err(|_| libc::EINVAL)?;
    // Each move goes one down, in increasing order: every target has already been moved from.
    for from in 4..6 + joins {
        let to = from - 1;
        // SAFETY: `from` is open (placed by adopt_fds); dup2 replaces `to`.
        if unsafe { libc::dup2(from, to) } == -1 {
            return Err(errno());
        }
        // SAFETY: F_SETFD on an fd we own.
        unsafe { libc::fcntl(to, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    close_range_from(5 + joins)
}

pub(crate) fn close_fd(fd: RawFd) {
    // SAFETY: the caller owns `fd` (a raw fd of the fixed child layout) and never uses it again.
    unsafe { libc::close(fd) };
}

/// `write(2)` of the whole buffer, retrying on EINTR; returns the errno on failure.
pub(crate) fn write_fd(fd: RawFd, mut buf: &[u8]) -> Result<(), i32> {
    while !buf.is_empty() {
        // SAFETY: pointer and length describe `buf`.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n == -1 {
            let e = errno();
            if e == libc::EINTR {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// `read(2)` once, retrying on EINTR.
pub(crate) fn read_fd(fd: RawFd, buf: &mut [u8]) -> Result<usize, i32> {
    loop {
        // SAFETY: pointer and length describe `buf`, which is writable.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// `read(2)` once, retrying on EINTR, into the spare capacity of `buf` (at most `max` bytes,
/// reserved first), appending what was read. Nothing is zeroed: the pages of `buf` are written
/// only as data arrives.
pub(crate) fn read_into_spare(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> Result<usize, i32> {
    buf.reserve(max);
    loop {
        let spare = buf.spare_capacity_mut();
        let len = spare.len().min(max);
        // SAFETY: pointer and length describe writable spare capacity of `buf`; read(2) writes
        // at most `len` bytes there.
        let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), len) };
        if n >= 0 {
            let n = n as usize;
            // SAFETY: read(2) initialised the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n) };
            return Ok(n);
        }
        let e = errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PollWant {
    Read,
    Write,
}

/// `poll(2)` on `fds`; returns which are ready (readable, writable, or hung up).
pub(crate) fn poll_fds(fds: &[(RawFd, PollWant)], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, want)| libc::pollfd {
            fd: *fd,
            events: match want {
                PollWant::Read => libc::POLLIN,
                PollWant::Write => libc::POLLOUT,
            },
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures.
        let ret = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        if ret >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Sets `O_NONBLOCK` on an fd the caller owns.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an open fd touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
