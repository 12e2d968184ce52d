//! Credentials: the raw credential syscalls, and the turns starters sharing the node's memory
//! take at its dumpable flag while they open their id maps.

// The credential calls go to the kernel directly. glibc's wrappers of setresuid, setresgid
// and setgroups, in a process it believes multi-threaded, signal every thread to change its
// credentials too; a child that shares the node's memory (see `spawn_sharing_memory`) would
// see the node's threads as its own. The raw calls change the calling task only, which is
// what a single-threaded child wants as well.

pub(super) fn raw_setresuid(id: u32) -> libc::c_int {
    // SAFETY: setresuid takes three ids and touches no memory.
    unsafe { libc::syscall(libc::SYS_setresuid, id, id, id) as libc::c_int }
}

pub(super) fn raw_setresgid(id: u32) -> libc::c_int {
    // SAFETY: setresgid takes three ids and touches no memory.
    unsafe { libc::syscall(libc::SYS_setresgid, id, id, id) as libc::c_int }
}

pub(super) fn raw_setgroups_none() -> libc::c_int {
    // SAFETY: a zero-length list with a null pointer is valid for setgroups(2).
    unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) as libc::c_int }
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
pub(super) struct IdMapTurn;

static ID_MAP_TURN_TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How often a starter's id map is opened again after a starter without its turn cleared the
/// dumpable flag under it.
pub(super) const ID_MAP_OPEN_TRIES: u32 = 8;

impl IdMapTurn {
    /// Long enough for a holder preempted on a loaded machine; a killed one (nothing in the
    /// node kills a starter) costs the next start this wait once, which then takes its turn.
    const WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(100);

    pub(super) fn take() -> Self {
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
