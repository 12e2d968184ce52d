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
//! - `ns.rs`: namespaces;
//! - `landlock.rs`: Landlock rule sets;
//! - `spawn.rs`: processes: fork, the clone that shares the node's memory and its stacks,
//!   signal masks, exec, wait and kill;
//! - `fds.rs`: the fd plumbing of the children: pipes, fd layouts, reads, writes, poll;
//! - `cpu.rs`: CPU affinity and scheduling priority.

use std::ffi::CString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use seccompiler::BpfProgram;

use super::{LandlockRules, Namespaces, Rlimit, StepError, StepResult, Syscalls, TmpfsFlags};

mod cpu;
mod creds;
mod fds;
mod landlock;
mod mounts;
mod ns;
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

use creds::{raw_setgroups_none, raw_setresgid, raw_setresuid, IdMapTurn, ID_MAP_OPEN_TRIES};
use fds::close_range_from;
use landlock::apply_landlock;
use mounts::{mount, preserved_mount_flags};

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
        check(raw_setgroups_none(), "setgroups", None)
    }

    fn join_cgroup(&mut self, fd: i32, join_file: &Path) -> StepResult {
        // Writing "0" moves the writing process itself, on v1 and v2 alike.
        let result = write_fd(fd, b"0")
            .map_err(|errno| StepError::new("join cgroup", Some(join_file), errno));
        close_fd(fd);
        result
    }

    fn enter_network_namespace(&mut self, fd: i32) -> StepResult {
        // SAFETY: setns takes an fd (inherited from the node, open in this process) and a flag.
        let ret = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
        let result = check(ret, "setns(network)", None);
        close_fd(fd);
        result
    }

    fn unshare(&mut self, namespaces: Namespaces) -> StepResult {
        // SAFETY: unshare takes flags only.
        let ret = unsafe { libc::unshare(namespaces.0) };
        check(ret, "unshare", None)
    }

    fn set_host_ids(&mut self, uid: u32, gid: u32) -> StepResult {
        if self.shares_node_memory {
            self.turn = Some(IdMapTurn::take());
        }
        check(raw_setresgid(gid), "setresgid(host)", None)?;
        check(raw_setresuid(uid), "setresuid(host)", None)
    }

    fn write_own_id_maps(&mut self, uid: u32, gid: u32) -> StepResult {
        // Gaining capabilities in the new namespace made the process non-dumpable, which gives
        // its /proc files to the host's root; dumpable, they are ours to write.
        let set_dumpable = || {
            // SAFETY: PR_SET_DUMPABLE takes an integer.
            let ret = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
            check(ret, "prctl(PR_SET_DUMPABLE)", None)
        };
        set_dumpable()?;
        for (file, contents) in [
            ("/proc/self/setgroups", "deny".to_string()),
            ("/proc/self/uid_map", format!("0 {uid} 1\n")),
            ("/proc/self/gid_map", format!("0 {gid} 1\n")),
        ] {
            let mut tries = 0;
            let opened = loop {
                match OpenOptions::new().write(true).open(file) {
                    // A starter that went ahead without its turn (the holder was too slow)
                    // made the shared memory non-dumpable again: set it back and retry.
                    Err(e)
                        if self.shares_node_memory
                            && e.kind() == io::ErrorKind::PermissionDenied
                            && tries < ID_MAP_OPEN_TRIES =>
                    {
                        tries += 1;
                        set_dumpable()?;
                        // SAFETY: sched_yield takes no arguments.
                        unsafe { libc::sched_yield() };
                    }
                    other => break other,
                }
            };
            opened
                .and_then(|mut f| f.write_all(contents.as_bytes()))
                .map_err(|e| StepError::new("write id map", Some(Path::new(file)), io_errno(&e)))?;
        }
        // Dumpable again, and no credential change of ours is left (taking uid 0 inside keeps
        // the same host ids): the next starter may go.
        self.turn = None;
        Ok(())
    }

    fn become_root(&mut self) -> StepResult {
        check(raw_setresgid(0), "setresgid", None)?;
        check(raw_setresuid(0), "setresuid", None)
    }

    fn make_mounts_private(&mut self) -> StepResult {
        let ret = mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None);
        check(ret, "make / private", Some(Path::new("/")))
    }

    fn mount_tmpfs(&mut self, target: &Path, data: &str, flags: TmpfsFlags) -> StepResult {
        let step = "mount tmpfs";
        let ctarget = cpath(target, step)?;
        let cdata =
            CString::new(data).map_err(|_| StepError::new(step, Some(target), libc::EINVAL))?;
        let mut ms = libc::MS_NOSUID | libc::MS_NODEV;
        if flags.read_only {
            ms |= libc::MS_RDONLY;
        }
        if flags.no_exec {
            ms |= libc::MS_NOEXEC;
        }
        let ret = mount(Some(c"tmpfs"), &ctarget, Some(c"tmpfs"), ms, Some(&cdata));
        check(ret, step, Some(target))
    }

    fn make_dir(&mut self, path: &Path) -> StepResult {
        DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .map_err(|e| StepError::new("mkdir", Some(path), io_errno(&e)))
    }

    fn make_file(&mut self, path: &Path, contents: &[u8]) -> StepResult {
        File::create(path)
            .and_then(|mut f| f.write_all(contents))
            .map_err(|e| StepError::new("create file", Some(path), io_errno(&e)))
    }

    fn make_symlink(&mut self, target: &Path, link: &Path) -> StepResult {
        std::os::unix::fs::symlink(target, link)
            .map_err(|e| StepError::new("symlink", Some(link), io_errno(&e)))
    }

    fn bind_mount(&mut self, source: &Path, target: &Path, read_only: bool) -> StepResult {
        let csource = cpath(source, "bind mount")?;
        let ctarget = cpath(target, "bind mount")?;
        // Recursive: a user namespace may not bind a mount without the mounts locked under it.
        let ret = mount(
            Some(&csource),
            &ctarget,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        );
        check(ret, "bind mount", Some(source))?;
        if read_only {
            let kept = preserved_mount_flags(&ctarget)
                .map_err(|e| StepError::new("statvfs", Some(target), e))?;
            let flags = libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | kept;
            let ret = mount(None, &ctarget, None, flags, None);
            check(ret, "remount bind read-only", Some(target))?;
        }
        Ok(())
    }

    fn bind_mount_exact(&mut self, source: &Path, target: &Path) -> StepResult {
        let csource = cpath(source, "open bind source")?;
        let ctarget = cpath(target, "bind mount")?;
        // SAFETY: open_how is plain integers, for which all zeros is valid (and asks for
        // nothing).
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
        how.resolve = libc::RESOLVE_NO_SYMLINKS;
        // SAFETY: the path is NUL-terminated and `how` is a valid open_how whose size is
        // passed; the returned fd is closed below.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                libc::AT_FDCWD,
                csource.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            return Err(StepError::new("open bind source", Some(source), errno()));
        }
        let fd = fd as libc::c_int;
        // The magic link names the object opened above, whatever the path names now.
        let via = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number");
        let ret = mount(
            Some(&via),
            &ctarget,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        );
        let result = check(ret, "bind mount", Some(source));
        // SAFETY: fd was opened above and is not used after this.
        unsafe { libc::close(fd) };
        result
    }

    fn mount_proc(&mut self, target: &Path, pid_only: bool) -> Result<bool, StepError> {
        let ctarget = cpath(target, "mount proc")?;
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if pid_only {
            let ret = mount(
                Some(c"proc"),
                &ctarget,
                Some(c"proc"),
                flags,
                Some(c"subset=pid"),
            );
            if ret == 0 {
                return Ok(true);
            }
            // A kernel before 5.8 does not know the option: a full /proc, masked instead.
            let e = errno();
            if e != libc::EINVAL {
                return Err(StepError::new("mount proc", Some(target), e));
            }
        }
        let ret = mount(Some(c"proc"), &ctarget, Some(c"proc"), flags, None);
        check(ret, "mount proc", Some(target)).map(|()| false)
    }

    fn make_tree_read_only(&mut self, target: &Path) -> StepResult {
        /// `struct mount_attr` of `mount_setattr(2)`.
        #[repr(C)]
        struct MountAttr {
            attr_set: u64,
            attr_clr: u64,
            propagation: u64,
            userns_fd: u64,
        }
        const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
        let ctarget = cpath(target, "make read-only")?;
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: `ctarget` is NUL-terminated and `attr` is a valid mount_attr whose size is
        // passed; the kernel only reads both.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                ctarget.as_ptr(),
                libc::AT_RECURSIVE,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        check(ret as libc::c_int, "make read-only", Some(target))
    }

    fn pivot_root(&mut self, new_root: &Path) -> StepResult {
        let croot = cpath(new_root, "pivot_root")?;
        // SAFETY: NUL-terminated path.
        let ret = unsafe { libc::chdir(croot.as_ptr()) };
        check(ret, "chdir new root", Some(new_root))?;
        // pivot_root(".", ".") stacks the old root on top of the new one, so no directory for
        // it is needed in the (read-only) new root; detaching "." then drops the old root.
        // SAFETY: both arguments are NUL-terminated strings.
        let ret = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
        check(ret as libc::c_int, "pivot_root", Some(new_root))?;
        // SAFETY: NUL-terminated path and a valid flag.
        let ret = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
        check(ret, "detach old root", None)?;
        // The function's working directory is its code; `/` if there is none.
        // SAFETY: NUL-terminated path.
        let ret = unsafe { libc::chdir(c"/code".as_ptr()) };
        if ret == 0 {
            return Ok(());
        }
        // SAFETY: NUL-terminated path.
        let ret = unsafe { libc::chdir(c"/".as_ptr()) };
        check(ret, "chdir /", None)
    }

    fn set_hostname(&mut self, name: &str) -> StepResult {
        // SAFETY: pointer and length describe `name`'s bytes.
        let ret = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
        check(ret, "sethostname", None)
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
        // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        check(ret, "prctl(PR_SET_NO_NEW_PRIVS)", None)
    }

    fn drop_capabilities(&mut self) -> StepResult {
        // Lock the "root has no special power" bits so no later exec as uid 0 regains
        // capabilities (SECBIT_NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED, NO_CAP_AMBIENT_RAISE,
        // each with its lock).
        const SECUREBITS: libc::c_ulong = 0b1110_1111;
        // SAFETY: PR_SET_SECUREBITS takes an integer.
        let ret = unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) };
        check(ret, "prctl(PR_SET_SECUREBITS)", None)?;
        for cap in 0..64 {
            // SAFETY: PR_CAPBSET_DROP takes an integer; EINVAL past the last capability is the
            // loop's end condition.
            let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
            if ret == -1 {
                let e = errno();
                if e == libc::EINVAL {
                    break;
                }
                return Err(StepError::new("prctl(PR_CAPBSET_DROP)", None, e));
            }
        }
        // SAFETY: integer arguments only.
        let ret = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        };
        check(ret, "prctl(PR_CAP_AMBIENT_CLEAR_ALL)", None)?;
        #[repr(C)]
        struct CapHeader {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct CapData {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        // SAFETY: header and the two data elements have the layout capset(2) expects for
        // version 3 and live across the call.
        let ret = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
        check(ret as libc::c_int, "capset", None)
    }

    fn landlock(&mut self, rules: &LandlockRules) -> StepResult {
        apply_landlock(rules)
    }

    fn seccomp(&mut self, filters: &[BpfProgram]) -> StepResult {
        for filter in filters {
            seccompiler::apply_filter(filter).map_err(|e| {
                let errno = match e {
                    seccompiler::Error::Seccomp(io) => io_errno(&io),
                    seccompiler::Error::Prctl(io) => io_errno(&io),
                    _ => libc::EINVAL,
                };
                StepError::new("seccomp", None, errno)
            })?;
        }
        Ok(())
    }
}
