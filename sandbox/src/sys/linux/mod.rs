//! The real kernel calls: [`RealSys`] for the setup steps, and the process plumbing (fork,
//! pipes, poll, wait, exec) the parent and the children use.
//!
//! Children run these after `fork()` of a possibly multi-threaded parent (glibc's `fork()`
//! resets its malloc locks in the child, so allocating there is safe), or in the node's own
//! memory as a one-shot run's starter and init (see [`spawn_sharing_memory`] for what that
//! asks of them: in short, free what they allocate, cache nothing, block signals until the
//! handlers are reset). Nothing here takes a lock another thread could hold (no tracing, no
//! stdio), and the credential calls are raw syscalls.
//!
//! # Layout
//! - this file: [`RealSys`], the setup seam's real implementation, and the helpers its
//!   steps share;
//! - `mounts.rs`: mounts, the read-only tree, `pivot_root`;
//! - `creds.rs`: credentials and id maps (raw syscalls), capabilities;
//! - `ns.rs`: namespaces, the hostname, cgroup joins;
//! - `landlock.rs`: Landlock rule sets; `seccomp.rs`: attaching the seccomp filters;
//! - `spawn.rs`: processes: fork, the clone that shares the node's memory and its stacks,
//!   signal masks, exec, wait and kill;
//! - `fds.rs`: the fd plumbing of the children: pipes, fd layouts, reads, writes, poll;
//! - `cpu.rs`: CPU affinity and scheduling priority.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use seccompiler::BpfProgram;

use super::{LandlockRules, Namespaces, Rlimit, StepError, StepResult, Syscalls, TmpfsFlags};

mod cpu;
mod creds;
mod fds;
mod landlock;
mod mounts;
mod ns;
mod seccomp;
mod spawn;

pub(crate) use cpu::{
    lower_to_background_priority, lower_to_idle_priority, pin_to_current_cpu, set_affinity, CpuMask,
};
pub(crate) use fds::{
    adopt_fds, adopt_init_fds, close_fd, close_fds_from, pipe, poll_fds, read_fd, read_into_spare,
    set_nonblocking, write_fd, PollWant,
};
pub(crate) use landlock::landlock_abi;
pub(crate) use ns::new_network_namespace;
pub(crate) use spawn::{
    at_exit, block_all_signals, exec_work, exit_now, fork, kill_pid, pidfd_open,
    spawn_sharing_memory, wait_pid, ChildStack, ExecImage, ForkResult,
};

use creds::{raw_setresgid, raw_setresuid, IdMapTurn};
use fds::close_range_from;
use landlock::apply_landlock;

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn io_errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn cpath(path: &Path, step: &'static str) -> Result<CString, StepError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| StepError::new(step, Some(path), libc::EINVAL))
}

fn check(ret: libc::c_int, step: &'static str, path: Option<&Path>) -> StepResult {
    if ret == -1 {
        Err(StepError::new(step, path, errno()))
    } else {
        Ok(())
    }
}

/// What a one-shot run's init writes to its status pipe to check its parent is alive (the
/// parent skips it; an error report starts with `E`).
pub(crate) const PARENT_ALIVE_BYTE: &[u8] = b"P";

/// The real implementation of the setup seam.
pub(crate) struct RealSys {
    /// The pid the parent-death check expects from `getppid()`; `None` inside a new pid
    /// namespace, where the parent is invisible.
    pub parent_pid: Option<i32>,
    /// Whether this process shares the node's memory (a one-shot run's starter): its
    /// credential changes then reset the dumpable flag of the node's memory, which every
    /// starter needs set while it opens its id maps, so they take turns ([`IdMapTurn`]).
    pub shares_node_memory: bool,
    /// A pipe only the parent reads (a one-shot run's status pipe): the parent-death check of
    /// an init whose parent is outside its pid namespace writes a byte to it, which fails
    /// (EPIPE) once the parent is gone.
    pub parent_alive_fd: Option<RawFd>,
    turn: Option<IdMapTurn>,
}

impl RealSys {
    pub(crate) fn new(parent_pid: Option<i32>, shares_node_memory: bool) -> Self {
        Self {
            parent_pid,
            shares_node_memory,
            parent_alive_fd: None,
            turn: None,
        }
    }
}

impl Syscalls for RealSys {
    fn set_parent_death_signal(&mut self) -> StepResult {
        // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory.
        let ret = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
        check(ret, "prctl(PR_SET_PDEATHSIG)", None)?;
        if let Some(expected) = self.parent_pid {
            // SAFETY: getppid has no arguments and cannot fail.
            if unsafe { libc::getppid() } != expected {
                // The parent died before the signal was armed.
                return Err(StepError::new("parent alive check", None, libc::ESRCH));
            }
        }
        if let Some(fd) = self.parent_alive_fd {
            // SIGPIPE is blocked here (a one-shot run's init): a dead reader is EPIPE.
            write_fd(fd, PARENT_ALIVE_BYTE)
                .map_err(|errno| StepError::new("parent alive check", None, errno))?;
        }
        Ok(())
    }

    fn drop_supplementary_groups(&mut self) -> StepResult {
        creds::drop_supplementary_groups()
    }

    fn join_cgroup(&mut self, fd: i32, join_file: &Path) -> StepResult {
        ns::join_cgroup(fd, join_file)
    }

    fn enter_network_namespace(&mut self, fd: i32) -> StepResult {
        ns::enter_network_namespace(fd)
    }

    fn unshare(&mut self, namespaces: Namespaces) -> StepResult {
        ns::unshare(namespaces)
    }

    fn set_host_ids(&mut self, uid: u32, gid: u32) -> StepResult {
        if self.shares_node_memory {
            self.turn = Some(IdMapTurn::take());
        }
        check(raw_setresgid(gid), "setresgid(host)", None)?;
        check(raw_setresuid(uid), "setresuid(host)", None)
    }

    fn write_own_id_maps(&mut self, uid: u32, gid: u32) -> StepResult {
        creds::write_own_id_maps(uid, gid, self.shares_node_memory)?;
        // Dumpable again, and no credential change of ours is left (taking uid 0 inside keeps
        // the same host ids): the next starter may go.
        self.turn = None;
        Ok(())
    }

    fn become_root(&mut self) -> StepResult {
        creds::become_root()
    }

    fn make_mounts_private(&mut self) -> StepResult {
        mounts::make_mounts_private()
    }

    fn mount_tmpfs(&mut self, target: &Path, data: &str, flags: TmpfsFlags) -> StepResult {
        mounts::mount_tmpfs(target, data, flags)
    }

    fn make_dir(&mut self, path: &Path) -> StepResult {
        mounts::make_dir(path)
    }

    fn make_file(&mut self, path: &Path, contents: &[u8]) -> StepResult {
        mounts::make_file(path, contents)
    }

    fn make_symlink(&mut self, target: &Path, link: &Path) -> StepResult {
        mounts::make_symlink(target, link)
    }

    fn bind_mount(&mut self, source: &Path, target: &Path, read_only: bool) -> StepResult {
        mounts::bind_mount(source, target, read_only)
    }

    fn bind_mount_exact(&mut self, source: &Path, target: &Path) -> StepResult {
        mounts::bind_mount_exact(source, target)
    }

    fn mount_proc(&mut self, target: &Path, pid_only: bool) -> Result<bool, StepError> {
        mounts::mount_proc(target, pid_only)
    }

    fn make_tree_read_only(&mut self, target: &Path) -> StepResult {
        mounts::make_tree_read_only(target)
    }

    fn pivot_root(&mut self, new_root: &Path) -> StepResult {
        mounts::pivot_root(new_root)
    }

    fn set_hostname(&mut self, name: &str) -> StepResult {
        ns::set_hostname(name)
    }

    fn set_rlimit(&mut self, resource: Rlimit, value: u64) -> StepResult {
        let (res, step) = match resource {
            Rlimit::OpenFiles => (libc::RLIMIT_NOFILE, "setrlimit(NOFILE)"),
            Rlimit::CoreBytes => (libc::RLIMIT_CORE, "setrlimit(CORE)"),
        };
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `limit` is a valid rlimit that outlives the call.
        check(unsafe { libc::setrlimit(res, &limit) }, step, None)
    }

    fn new_session(&mut self) -> StepResult {
        // SAFETY: setsid has no arguments.
        let ret = unsafe { libc::setsid() };
        check(ret, "setsid", None)
    }

    fn reset_signals(&mut self) -> StepResult {
        for sig in 1..libc::SIGRTMIN() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            // SAFETY: SIG_DFL is a valid disposition for every catchable signal; the error for
            // signals reserved by libc is harmless and ignored.
            unsafe { libc::signal(sig, libc::SIG_DFL) };
        }
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set it is given.
        unsafe { libc::sigemptyset(set.as_mut_ptr()) };
        // SAFETY: `set` was initialised above; a null old-set pointer is allowed.
        let ret =
            unsafe { libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) };
        check(ret, "sigprocmask", None)
    }

    fn close_fds_from(&mut self, first: i32) -> StepResult {
        close_range_from(first).map_err(|e| StepError::new("close_range", None, e))
    }

    fn set_no_new_privs(&mut self) -> StepResult {
        creds::set_no_new_privs()
    }

    fn drop_capabilities(&mut self) -> StepResult {
        creds::drop_capabilities()
    }

    fn landlock(&mut self, rules: &LandlockRules) -> StepResult {
        apply_landlock(rules)
    }

    fn seccomp(&mut self, filters: &[BpfProgram]) -> StepResult {
        seccomp::seccomp(filters)
    }
}
