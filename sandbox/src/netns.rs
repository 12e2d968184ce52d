//! Network namespaces made ahead of time, so that creating one is off a sandbox's start.
//!
//! Creating a network namespace is the dearest step of a cold start below the trusted tier
//! (≈ 1 ms here: the kernel runs every network subsystem's per-namespace setup). A thread of
//! the node makes a few ahead and keeps them open; a sandbox's starter or supervisor joins one with
//! `setns` before it leaves the host's credentials, instead of creating its own with `unshare`.
//!
//! Invariants:
//! - A namespace serves one sandbox and is never reused: once handed out, the pool drops its
//!   last reference, so the namespace dies with the sandbox. Nothing one function did to its
//!   network (sockets, ports in TIME_WAIT) can reach another.
//! - The namespaces belong to the host's user namespace, so root inside a sandbox (root of its
//!   own user namespace only) holds no capability over them: it cannot configure interfaces,
//!   routes or sysctls — less than in a namespace of its own, where seccomp alone (no netlink
//!   socket) stops that. Like a new namespace, it holds only a loopback device that is down.
//! - When the pool is empty (a burst, or the process may not create namespaces) the sandbox
//!   makes its own as before: the pool only ever saves time, never changes what runs.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::sys;

/// Namespaces kept ready by default.
pub const NETNS_POOL_SIZE_DEFAULT: usize = 4;
/// The largest pool [`set_netns_pool_size`] accepts.
pub const NETNS_POOL_SIZE_MAX: usize = 64;
/// Pause after a failed creation before the next try (a process without the privilege fails
/// every time; it must not spin).
const RETRY_PAUSE: Duration = Duration::from_secs(5);

static TARGET: AtomicUsize = AtomicUsize::new(NETNS_POOL_SIZE_DEFAULT);

/// Sets how many network namespaces the process keeps ready (0 turns the pool off; clamped to
/// [`NETNS_POOL_SIZE_MAX`]). Takes effect at the next hand-out; namespaces already made beyond
/// a smaller size are handed out before new ones are made.
pub fn set_netns_pool_size(size: usize) {
    TARGET.store(size.min(NETNS_POOL_SIZE_MAX), Ordering::Relaxed);
    pool().wake.notify_one();
}

struct Pool {
    ready: Mutex<VecDeque<OwnedFd>>,
    /// Signalled when a namespace is taken (the maker may make another).
    wake: Condvar,
    maker: OnceLock<()>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        ready: Mutex::new(VecDeque::new()),
        wake: Condvar::new(),
        maker: OnceLock::new(),
    })
}

/// A ready network namespace, or `None` (pool off, empty, or not yet started). Starts the
/// maker thread on first use.
pub(crate) fn take() -> Option<OwnedFd> {
    if TARGET.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let shared = pool();
    shared.maker.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("skiff-netns".to_string())
            .spawn(|| make_forever(pool()));
        if let Err(error) = spawned {
            tracing::warn!(%error, "network namespace pool not started");
        }
    });
    let taken = shared
        .ready
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .pop_front();
    shared.wake.notify_one();
    taken
}

/// How many namespaces are ready now.
pub fn netns_pool_ready() -> usize {
    pool()
        .ready
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .len()
}

/// The maker thread: keeps the pool at its size. It lives in the namespace it made last and
/// does nothing else, so no socket or process of the node ever lands in one of them.
fn make_forever(pool: &Pool) {
    // A namespace takes most of a millisecond of CPU to make: behind the starts, not in front.
    sys::lower_to_background_priority();
    loop {
        {
            let mut ready = pool
                .ready
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            while ready.len() >= TARGET.load(Ordering::Relaxed) {
                ready = pool
                    .wake
                    .wait(ready)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        }
        match sys::new_network_namespace() {
            Ok(fd) => pool
                .ready
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push_back(fd),
            Err(error) => {
                tracing::debug!(%error, "network namespace not made ahead");
                std::thread::sleep(RETRY_PAUSE);
            }
        }
    }
}
