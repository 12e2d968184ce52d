//! The real kernel calls: [`RealSys`] for the setup steps, and the process plumbing (fork,
//! pipes, poll, wait, exec) the parent and the children use.
//!
//! Children run these after `fork()` of a possibly multi-threaded parent (glibc's `fork()`
//! resets its malloc locks in the child, so allocating there is safe), or in the node's own
//! memory as a one-shot run's starter and init (see [`spawn_sharing_memory`] for what that
//! asks of them: in short, free what they allocate, cache nothing, block signals until the
//! handlers are reset). Nothing here takes a lock another thread could hold (no tracing, no
//! stdio), and the credential calls are raw syscalls.

use std::ffi::{CStr, CString};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use seccompiler::BpfProgram;

use super::{LandlockRules, Namespaces, Rlimit, StepError, StepResult, Syscalls, TmpfsFlags};

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

/// `mount(2)` with optional arguments.
fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> libc::c_int {
    let ptr = |s: Option<&CStr>| s.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is either null (allowed by mount(2) for these arguments) or a
    // NUL-terminated string that outlives the call.
    unsafe {
        libc::mount(
            ptr(source),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    }
}

/// Mount flags of `path` that a read-only remount must keep (a user namespace may not clear
/// locked flags such as nosuid, nodev, noexec and the atime mode).
fn preserved_mount_flags(path: &CStr) -> Result<libc::c_ulong, i32> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `st` points to writable memory of the right size.
    let ret = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if ret == -1 {
        return Err(errno());
    }
    // SAFETY: statvfs returned 0, so it filled the structure.
    let st = unsafe { st.assume_init() };
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    Ok(flags)
}

// The credential calls go to the kernel directly. glibc's wrappers of setresuid, setresgid
// and setgroups, in a process it believes multi-threaded, signal every thread to change its
// credentials too; a child that shares the node's memory (see `spawn_sharing_memory`) would
// see the node's threads as its own. The raw calls change the calling task only, which is
// what a single-threaded child wants as well.

fn raw_setresuid(id: u32) -> libc::c_int {
    // SAFETY: setresuid takes three ids and touches no memory.
    unsafe { libc::syscall(libc::SYS_setresuid, id, id, id) as libc::c_int }
}

fn raw_setresgid(id: u32) -> libc::c_int {
    // SAFETY: setresgid takes three ids and touches no memory.
    unsafe { libc::syscall(libc::SYS_setresgid, id, id, id) as libc::c_int }
}

fn raw_setgroups_none() -> libc::c_int {
    // SAFETY: a zero-length list with a null pointer is valid for setgroups(2).
    unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) as libc::c_int }
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

/// One starter's turn at the node memory's dumpable flag, from its first credential change
/// to its id maps opened (the kernel gives a non-dumpable process's `/proc` files to the
/// host's root, and every credential change makes a process non-dumpable; the flag belongs
/// to the memory, which all starters share with the node).
///
/// A spin lock with a bounded wait, not a mutex: a starter killed during its turn (nothing
/// in the node kills one) must not stop every later start; after [`IdMapTurn::WAIT_MAX`] the
/// waiter takes the turn over (and gives it back as any holder does), and a starter whose map
/// then fails to open because the slow holder was still in its window sets the flag again
/// and retries ([`ID_MAP_OPEN_TRIES`]); past that, a reported setup error.
struct IdMapTurn;

static ID_MAP_TURN_TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How often a starter's id map is opened again after a starter without its turn cleared the
/// dumpable flag under it.
const ID_MAP_OPEN_TRIES: u32 = 8;

impl IdMapTurn {
    /// Long enough for a holder preempted on a loaded machine; a killed one (nothing in the
    /// node kills a starter) costs the next start this wait once, which then takes its turn.
    const WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(100);

    fn take() -> Self {
        use std::sync::atomic::Ordering;
        let start = std::time::Instant::now();
        loop {
            if ID_MAP_TURN_TAKEN
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return IdMapTurn;
            }
            if start.elapsed() >= Self::WAIT_MAX {
                // Taken over: the flag stays set, and this turn's end clears it.
                return IdMapTurn;
            }
            // SAFETY: sched_yield takes no arguments.
            unsafe { libc::sched_yield() };
        }
    }
}

impl Drop for IdMapTurn {
    fn drop(&mut self) {
        ID_MAP_TURN_TAKEN.store(false, std::sync::atomic::Ordering::Release);
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

// Landlock's ABI (include/uapi/linux/landlock.h), called directly: the crate's compatibility
// layer costs two extra stats and an ABI query per rule set, in every start.
mod ll {
    pub const EXECUTE: u64 = 1 << 0;
    pub const WRITE_FILE: u64 = 1 << 1;
    pub const READ_FILE: u64 = 1 << 2;
    pub const READ_DIR: u64 = 1 << 3;
    /// `REMOVE_DIR` through `MAKE_SYM`: every right of ABI 1.
    pub const ALL_V1: u64 = (1 << 13) - 1;
    pub const REFER: u64 = 1 << 13;
    pub const TRUNCATE: u64 = 1 << 14;
    pub const IOCTL_DEV: u64 = 1 << 15;
    pub const BIND_TCP: u64 = 1 << 0;
    pub const CONNECT_TCP: u64 = 1 << 1;
    pub const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    pub const SCOPE_SIGNAL: u64 = 1 << 1;
    pub const RULE_PATH_BENEATH: libc::c_int = 1;
    pub const RULE_NET_PORT: libc::c_int = 2;
    pub const CREATE_RULESET_VERSION: u32 = 1 << 0;

    #[repr(C)]
    pub struct RulesetAttr {
        pub handled_access_fs: u64,
        pub handled_access_net: u64,
        pub scoped: u64,
    }

    #[repr(C, packed)]
    pub struct PathBeneathAttr {
        pub allowed_access: u64,
        pub parent_fd: i32,
    }

    #[repr(C)]
    pub struct NetPortAttr {
        pub allowed_access: u64,
        pub port: u64,
    }

    /// Every file-system right the kernel of `abi` knows.
    pub fn fs_all(abi: u32) -> u64 {
        let mut all = if abi >= 1 { ALL_V1 } else { 0 };
        if abi >= 2 {
            all |= REFER;
        }
        if abi >= 3 {
            all |= TRUNCATE;
        }
        if abi >= 5 {
            all |= IOCTL_DEV;
        }
        all
    }

    /// The rights that apply to a file (the others are about directories).
    pub const FILE_ONLY: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;

    /// The uapi structs a rule is made of (`add_rule` takes nothing else).
    pub trait RuleAttr {}
    impl RuleAttr for PathBeneathAttr {}
    impl RuleAttr for NetPortAttr {}

    /// `landlock_add_rule` of `rule` to `ruleset`: 0, or -1 with errno set.
    pub fn add_rule<R: RuleAttr>(
        ruleset: &std::os::fd::OwnedFd,
        rule_type: libc::c_int,
        rule: &R,
    ) -> libc::c_long {
        use std::os::fd::AsRawFd;
        // SAFETY: `rule` is one of the rule attribute structs of the uapi (`RuleAttr`), and
        // callers pass the rule type that names it; the kernel only reads it; the ruleset fd
        // is open (and so is a path rule's parent fd, held by the caller).
        unsafe {
            libc::syscall(
                libc::SYS_landlock_add_rule,
                ruleset.as_raw_fd(),
                rule_type,
                rule as *const R,
                0u32,
            )
        }
    }
}

/// The kernel's Landlock ABI version, 0 without Landlock. Asked once per process, by the node
/// (never by a child sharing its memory: the answer is cached).
pub(crate) fn landlock_abi() -> u32 {
    static ABI: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ABI.get_or_init(|| {
        // SAFETY: with a null attribute, size 0 and the VERSION flag, the call only returns
        // the ABI version.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<ll::RulesetAttr>(),
                0usize,
                ll::CREATE_RULESET_VERSION,
            )
        };
        u32::try_from(ret).unwrap_or(0)
    })
}

/// Enforces `rules` with what the kernel's ABI offers (file system from ABI 1, TCP ports from
/// 4, abstract socket and signal scoping from 6); without Landlock at all, nothing.
fn apply_landlock(rules: &LandlockRules) -> StepResult {
    let abi = rules.abi;
    if abi == 0 {
        return Ok(());
    }
    let fail = |step: &'static str, path: Option<&Path>| StepError::new(step, path, errno());
    let fs_all = ll::fs_all(abi);
    let attr = ll::RulesetAttr {
        handled_access_fs: fs_all,
        handled_access_net: if abi >= 4 {
            ll::BIND_TCP | ll::CONNECT_TCP
        } else {
            0
        },
        scoped: if abi >= 6 {
            ll::SCOPE_ABSTRACT_UNIX_SOCKET | ll::SCOPE_SIGNAL
        } else {
            0
        },
    };
    // SAFETY: `attr` is a valid ruleset_attr of the size passed (fields an older kernel does
    // not know are zero, which it accepts); the kernel only reads it.
    let ruleset = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const ll::RulesetAttr,
            std::mem::size_of::<ll::RulesetAttr>(),
            0u32,
        )
    };
    if ruleset < 0 {
        return Err(fail("landlock", None));
    }
    // SAFETY: the kernel just made this fd, owned by nobody else; closed when dropped.
    let ruleset = unsafe { OwnedFd::from_raw_fd(ruleset as RawFd) };
    let read = ll::READ_FILE | ll::READ_DIR;
    let sets: [(&Vec<std::path::PathBuf>, u64); 5] = [
        (&rules.read_exec, read | ll::EXECUTE),
        (&rules.read, read),
        (&rules.read_write, fs_all),
        (
            &rules.devices,
            ll::READ_FILE | ll::WRITE_FILE | ll::TRUNCATE | ll::READ_DIR,
        ),
        (&rules.list, ll::READ_DIR),
    ];
    for (paths, access) in sets {
        for path in paths {
            let cpath = cpath(path, "landlock open")?;
            // SAFETY: `cpath` is NUL-terminated; O_PATH opens without reading anything.
            let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(fail("landlock open", Some(path)));
            }
            // SAFETY: the fd was just opened and is owned here alone; closed when dropped.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
            // SAFETY: `st` is writable and of the size fstat fills.
            if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
                return Err(fail("landlock open", Some(path)));
            }
            // SAFETY: fstat succeeded and filled `st`.
            let is_dir = unsafe { st.assume_init() }.st_mode & libc::S_IFMT == libc::S_IFDIR;
            // Directory-only rights cannot be granted on a file; none the kernel lacks.
            let mut allowed = access & fs_all;
            if !is_dir {
                allowed &= ll::FILE_ONLY;
            }
            if allowed == 0 {
                continue;
            }
            let rule = ll::PathBeneathAttr {
                allowed_access: allowed,
                parent_fd: fd.as_raw_fd(),
            };
            if ll::add_rule(&ruleset, ll::RULE_PATH_BENEATH, &rule) != 0 {
                return Err(fail("landlock", Some(path)));
            }
        }
    }
    if abi >= 4 {
        for port in &rules.tcp_connect_ports {
            let rule = ll::NetPortAttr {
                allowed_access: ll::CONNECT_TCP,
                port: u64::from(*port),
            };
            if ll::add_rule(&ruleset, ll::RULE_NET_PORT, &rule) != 0 {
                return Err(fail("landlock", None));
            }
        }
    }
    // no_new_privs is set by the step before.
    // SAFETY: restrict_self takes the ruleset fd and flags.
    let ret = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) };
    if ret != 0 {
        return Err(fail("landlock", None));
    }
    Ok(())
}

fn close_range_from(first: i32) -> Result<(), i32> {
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

pub(crate) enum ForkResult {
    Parent(i32),
    Child,
}

/// `fork()`.
///
/// The child must only run code that is sound in a copy of a multi-threaded process (see the
/// module comment) and must end with [`exit_now`] or an exec.
pub(crate) fn fork() -> io::Result<ForkResult> {
    // SAFETY: the callers uphold the contract above: the child touches no lock another thread
    // may hold and never returns into the caller's stack frames beyond its own entry point.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()),
        0 => Ok(ForkResult::Child),
        pid => Ok(ForkResult::Parent(pid)),
    }
}

/// Stack of a child started by [`spawn_sharing_memory`]; only the pages it touches are ever
/// backed.
const SHARED_CHILD_STACK_BYTES: usize = 1 << 20;
const GUARD_BYTES: usize = 64 << 10;
/// Stacks kept for the next starts (see [`ChildStack::take`]).
const STACKS_KEPT_MAX: usize = 8;

/// A stack for a child that shares this process's memory: a private anonymous mapping with a
/// guard below it.
pub(crate) struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is owned by this value alone; moving it between threads moves that
// ownership, nothing else refers to it.
unsafe impl Send for ChildStack {}

static STACKS: std::sync::Mutex<Vec<ChildStack>> = std::sync::Mutex::new(Vec::new());

impl ChildStack {
    /// Maps a new stack.
    pub(crate) fn new() -> io::Result<Self> {
        let len = SHARED_CHILD_STACK_BYTES + GUARD_BYTES;
        // SAFETY: an anonymous private mapping at an address the kernel picks; no existing
        // memory is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // A stack overflow faults on the guard instead of writing into other memory.
        // SAFETY: the lowest GUARD_BYTES of the mapping just made.
        unsafe { libc::mprotect(base, GUARD_BYTES, libc::PROT_NONE) };
        Ok(Self { base, len })
    }

    /// A stack a finished start gave back, or a new one. In a process with many threads, each
    /// mapping made or removed interrupts every CPU running one of them (to flush its view of
    /// the memory): kept stacks cost nothing per start, and their pages are already backed.
    pub(crate) fn take() -> io::Result<Self> {
        let kept = STACKS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        kept.map_or_else(Self::new, Ok)
    }

    /// Gives the stack back for a later start (unmapped when enough are kept). Only once the
    /// child that ran on it has exec'd or exited.
    pub(crate) fn give_back(self) {
        let mut kept = STACKS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if kept.len() < STACKS_KEPT_MAX {
            kept.push(self);
        }
    }

    fn top(&self) -> *mut libc::c_void {
        // SAFETY: in bounds of the mapping; x86_64 stacks grow down from its end (16-aligned).
        unsafe { self.base.cast::<u8>().add(self.len) }.cast::<libc::c_void>()
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, used by no child any more (see `give_back`).
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Starts `child` in a new process that shares this one's memory (`CLONE_VM`) on `stack` (a
/// fresh one when `None`), and suspends the caller until the child has exec'd or exited
/// (`CLONE_VFORK`); returns the child's pid. Everything else (fds, signal handlers,
/// credentials, namespaces, seccomp, Landlock) is the child's own copy, as after `fork`.
///
/// With `sibling`, the child is the caller's parent's child (`CLONE_PARENT`): its exit goes
/// to the caller's parent, which waits for it.
///
/// What it saves against `fork`: copying the page tables of the whole address space, the
/// copy-on-write faults of every page the child writes, and tearing the copy down at the
/// child's exec. The rules are vfork's, plus one for a multi-threaded caller: `child` must end
/// with an exec or [`exit_now`], never return; it may use the caller's thread-local state
/// (the caller is suspended); and in a multi-threaded caller, the other threads keep running
/// in the shared memory, so `child` may touch only what the caller owns and the allocator
/// (whose locks are real locks between them), must free before it execs or exits everything
/// it allocates (its leftovers would stay in the caller's heap), must not fill any
/// process-wide cache (a cached fd would name the child's fd in the caller), must take no
/// lock another thread could hold when it is killed, and must run with every signal blocked
/// until it has reset the handlers (they are the caller's, and would run on the caller's
/// data).
pub(crate) fn spawn_sharing_memory(
    child: &mut dyn FnMut() -> i32,
    sibling: bool,
    stack: Option<&ChildStack>,
) -> io::Result<i32> {
    extern "C" fn trampoline(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the `&mut &mut dyn FnMut` passed to clone below; the caller is
        // suspended, so the closure is not used by anyone else while the child runs.
        let child = unsafe { &mut *arg.cast::<&mut dyn FnMut() -> i32>() };
        let code = child();
        exit_now(code)
    }
    let fresh;
    let stack = match stack {
        Some(stack) => stack,
        None => {
            fresh = ChildStack::new()?;
            &fresh
        }
    };
    let mut child: &mut dyn FnMut() -> i32 = child;
    let arg = (&mut child as *mut &mut dyn FnMut() -> i32).cast::<libc::c_void>();
    // SAFETY: `trampoline` never returns into the caller's frames (it exits); the stack is a
    // mapping of its own that nothing else runs on; `arg` lives until clone returns, which
    // with CLONE_VFORK is after the child has exec'd or exited and so stopped using it.
    let pid = unsafe {
        libc::clone(
            trampoline,
            stack.top(),
            libc::CLONE_VM
                | libc::CLONE_VFORK
                | if sibling { libc::CLONE_PARENT } else { 0 }
                | libc::SIGCHLD,
            arg,
        )
    };
    if pid == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pid)
    }
}

/// Every signal blocked on the calling thread until dropped (then the previous mask is back).
pub(crate) struct SignalsBlocked {
    previous: libc::sigset_t,
}

/// Blocks every signal on the calling thread (glibc keeps its own two unblocked).
pub(crate) fn block_all_signals() -> io::Result<SignalsBlocked> {
    let mut all = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    let mut previous = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initialises the set it is given.
    unsafe { libc::sigfillset(all.as_mut_ptr()) };
    // SAFETY: `all` is initialised; `previous` is writable and filled on success.
    let ret =
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), previous.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(SignalsBlocked {
        // SAFETY: pthread_sigmask succeeded, so it filled `previous`.
        previous: unsafe { previous.assume_init() },
    })
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: `previous` is the mask pthread_sigmask gave back; a null old-set is allowed.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) };
    }
}

/// A command ready to exec: every string and pointer array made ahead, so the exec allocates
/// nothing (a child sharing the node's memory must leave nothing behind in its heap).
pub(crate) struct ExecImage {
    /// Paths to try, in order (the program itself if it has a slash, else the system dirs).
    candidates: Vec<CString>,
    program: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    // The strings the pointer arrays point into.
    _args: Vec<CString>,
    _env: Vec<CString>,
}

impl ExecImage {
    /// Decodes a work frame (see `process::encode_work`); `EINVAL` if it is malformed.
    pub(crate) fn new(frame: &[u8]) -> Result<Self, i32> {
        let mut parts = frame.split(|b| *b == 0);
        let count = |p: Option<&[u8]>| {
            p.and_then(|s| std::str::from_utf8(s).ok())
                .and_then(|s| s.parse::<usize>().ok())
        };
        let strings = |n: usize, parts: &mut dyn Iterator<Item = &[u8]>| {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(
                    CString::new(parts.next().ok_or(libc::EINVAL)?).map_err(|_| libc::EINVAL)?,
                );
            }
            Ok::<_, i32>(out)
        };
        let argc = count(parts.next()).ok_or(libc::EINVAL)?;
        let args = strings(argc, &mut parts)?;
        let envc = count(parts.next()).ok_or(libc::EINVAL)?;
        let env = strings(envc, &mut parts)?;
        let program = args.first().cloned().ok_or(libc::EINVAL)?;
        let candidates = if program.as_bytes().contains(&b'/') {
            vec![program.clone()]
        } else {
            ["/usr/local/bin/", "/usr/bin/", "/bin/"]
                .iter()
                .filter_map(|dir| CString::new([dir.as_bytes(), program.as_bytes()].concat()).ok())
                .collect()
        };
        let pointers = |strings: &[CString]| -> Vec<*const libc::c_char> {
            strings
                .iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        Ok(Self {
            candidates,
            program,
            argv: pointers(&args),
            envp: pointers(&env),
            _args: args,
            _env: env,
        })
    }

    /// The command's first word, as given.
    pub(crate) fn program(&self) -> &CStr {
        &self.program
    }

    /// Execs the command; returns only on failure, with the errno. Allocates nothing.
    pub(crate) fn exec(&self) -> i32 {
        let mut last = libc::ENOENT;
        for candidate in &self.candidates {
            // SAFETY: `candidate` is NUL-terminated and both pointer arrays are null-terminated
            // arrays of pointers into CStrings that `self` keeps alive past the call.
            unsafe { libc::execve(candidate.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()) };
            last = errno();
            if last != libc::ENOENT {
                break;
            }
        }
        last
    }
}

/// An fd that becomes readable when process `pid` has exited (`pidfd_open`).
pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Ends the process without running destructors or atexit handlers (a forked child must not
/// flush the parent's buffers).
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and is async-signal-safe.
    unsafe { libc::_exit(code) }
}

/// Registers `handler` to run at a normal process exit (`exit(3)`, a return from `main`);
/// false if libc has no room for it.
pub(crate) fn at_exit(handler: extern "C" fn()) -> bool {
    // SAFETY: `handler` is a plain function that lives as long as the program; atexit only
    // stores the pointer.
    unsafe { libc::atexit(handler) == 0 }
}

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

/// Waits for `pid` and returns its raw wait status.
pub(crate) fn wait_pid(pid: i32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let ret = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if ret == pid {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// SIGKILL, ignoring a process that is already gone.
pub(crate) fn kill_pid(pid: i32) {
    if pid > 0 {
        // SAFETY: kill takes integers; a stale pid at worst yields ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
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

/// Decodes a work frame (see `process::encode_work`) and execs it; returns only on failure,
/// with the errno and the program that failed.
pub(crate) fn exec_work(frame: &[u8]) -> (i32, Vec<u8>) {
    match ExecImage::new(frame) {
        Ok(image) => (image.exec(), image.program().to_bytes().to_vec()),
        Err(errno) => (errno, Vec::new()),
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

/// A thread's CPU affinity.
#[derive(Clone, Copy)]
pub(crate) struct CpuMask(libc::cpu_set_t);

impl std::fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CpuMask")
    }
}

/// Pins the calling thread to the CPU it is running on and returns its previous affinity.
///
/// Children forked meanwhile inherit the pin, so the setup handshake (parent ↔ supervisor ↔
/// init) ping-pongs on one CPU instead of waking an idle one for every message, which costs
/// hundreds of microseconds per wake-up on virtual machines.
pub(crate) fn pin_to_current_cpu() -> io::Result<CpuMask> {
    let mut old = std::mem::MaybeUninit::<libc::cpu_set_t>::zeroed();
    // SAFETY: `old` is a writable cpu_set_t of the size passed.
    let ret = unsafe {
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), old.as_mut_ptr())
    };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, then filled by sched_getaffinity.
    let old = unsafe { old.assume_init() };
    // SAFETY: sched_getcpu takes no arguments.
    let cpu = unsafe { libc::sched_getcpu() };
    if cpu < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut pinned: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` comes from sched_getcpu, so it is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu as usize, &mut pinned) };
    set_affinity(&CpuMask(pinned))?;
    Ok(CpuMask(old))
}

/// Moves the calling thread to `SCHED_IDLE`: it runs only when nothing else wants the CPU.
/// Best effort (lowering one's own priority needs no privilege).
pub(crate) fn lower_to_idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is the caller.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
}

/// Gives the calling thread the lowest nice value (19): it still gets an idle CPU at once and
/// a small share of a busy one, but a start's setup and command come first. Best effort
/// (raising one's own nice value needs no privilege).
pub(crate) fn lower_to_background_priority() {
    // SAFETY: setpriority takes integers; on Linux PRIO_PROCESS with 0 is the calling thread.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
}

/// Sets the calling thread's affinity.
pub(crate) fn set_affinity(mask: &CpuMask) -> io::Result<()> {
    // SAFETY: `mask.0` is a valid cpu_set_t of the size passed.
    let ret =
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mask.0) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bind of a checked real path binds that object or nothing: once a directory on the way
    /// is swapped for a symlink (as a race between the check and the bind would), the bind
    /// fails instead of following it. Runs in a thread of its own mount namespace.
    #[test]
    fn an_exact_bind_refuses_a_path_that_gained_a_symlink() {
        // SAFETY: geteuid takes no arguments.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping: mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let checked = dir.path().join("checked");
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&checked).expect("mkdir");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        std::fs::write(checked.join("file"), "checked").expect("write");
        std::fs::write(elsewhere.join("file"), "elsewhere").expect("write");
        let target = dir.path().join("target");
        std::fs::write(&target, "").expect("write");
        let source = checked.join("file");
        let result = std::thread::spawn(move || {
            // SAFETY: unshare takes flags only; a mount namespace is per thread here.
            let ret = unsafe { libc::unshare(libc::CLONE_NEWNS) };
            assert_eq!(ret, 0, "unshare: {}", io::Error::last_os_error());
            let mut sys = RealSys::new(None, false);
            sys.make_mounts_private().expect("private");
            sys.bind_mount_exact(&source, &target)
                .expect("a real path binds");
            let first = std::fs::read_to_string(&target).expect("read");
            // The check saw `checked`; now it leads elsewhere.
            std::fs::rename(&checked, checked.with_extension("old")).expect("rename");
            std::os::unix::fs::symlink(&elsewhere, &checked).expect("symlink");
            let second = sys.bind_mount_exact(&source, &target);
            let now = std::fs::read_to_string(&target).expect("read");
            (first, second, now)
        })
        .join()
        .expect("thread");
        assert_eq!(result.0, "checked");
        let err = result.1.expect_err("a symlink on the way is refused");
        assert_eq!(err.errno, libc::ELOOP);
        assert_eq!(result.2, "checked", "nothing else was bound");
    }
}
