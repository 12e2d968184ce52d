//! Namespaces (the node's network namespaces made ahead; a child unsharing and entering
//! them), the hostname of its UTS namespace, and joining a cgroup.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;

use super::{check, close_fd, write_fd};
use crate::sys::{Namespaces, StepError, StepResult};

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

/// [`Syscalls::join_cgroup`](crate::sys::Syscalls::join_cgroup) on the real kernel.
pub(super) fn join_cgroup(fd: i32, join_file: &Path) -> StepResult {
    // Writing "0" moves the writing process itself, on v1 and v2 alike.
    let result =
        write_fd(fd, b"0").map_err(|errno| StepError::new("join cgroup", Some(join_file), errno));
    close_fd(fd);
    result
}

/// [`Syscalls::enter_network_namespace`](crate::sys::Syscalls::enter_network_namespace) on the real kernel.
pub(super) fn enter_network_namespace(fd: i32) -> StepResult {
    // SAFETY: setns takes an fd (inherited from the node, open in this process) and a flag.
    let ret = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    let result = check(ret, "setns(network)", None);
    close_fd(fd);
    result
}

/// [`Syscalls::unshare`](crate::sys::Syscalls::unshare) on the real kernel.
pub(super) fn unshare(namespaces: Namespaces) -> StepResult {
    // SAFETY: unshare takes flags only.
    let ret = unsafe { libc::unshare(namespaces.0) };
    check(ret, "unshare", None)
}

/// [`Syscalls::set_hostname`](crate::sys::Syscalls::set_hostname) on the real kernel.
pub(super) fn set_hostname(name: &str) -> StepResult {
    // SAFETY: pointer and length describe `name`'s bytes.
    let ret = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    check(ret, "sethostname", None)
}
