//! Namespaces.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;

/// Moves the calling thread into a new network namespace and returns an fd that keeps the
/// namespace alive. Only for a thread that does nothing else: every later socket it opens, and
/// every process it forks, would live in that namespace.
pub(crate) fn new_network_namespace() -> io::Result<OwnedFd> {
    // SAFETY: unshare takes flags only; CLONE_NEWNET affects the calling thread alone.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == -1 {
        return Err(io::Error::last_os_error());
    }
    let file = File::open("/proc/thread-self/ns/net")?;
    Ok(OwnedFd::from(file))
}
