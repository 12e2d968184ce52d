//! Processes: `fork`, the clone that shares the node's memory (and the stacks it runs on),
//! signal masks, exec without allocating, pidfds, wait and kill, and the exit that runs no
//! destructors.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use super::errno;

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

/// Decodes a work frame (see `process::encode_work`) and execs it; returns only on failure,
/// with the errno and the program that failed.
pub(crate) fn exec_work(frame: &[u8]) -> (i32, Vec<u8>) {
    match ExecImage::new(frame) {
        Ok(image) => (image.exec(), image.program().to_bytes().to_vec()),
        Err(errno) => (errno, Vec::new()),
    }
}
