//! Credentials: the raw credential syscalls, the id maps of a new user namespace (and the
//! turns starters sharing the node's memory take at its dumpable flag while they open them),
//! supplementary groups, capabilities and `no_new_privs`.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;

use super::{check, errno, io_errno};
use crate::sys::{StepError, StepResult};

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

fn raw_setgroups_none() -> libc::c_int {
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
const ID_MAP_OPEN_TRIES: u32 = 8;

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

/// [`Syscalls::drop_supplementary_groups`](crate::sys::Syscalls::drop_supplementary_groups) on the real kernel.
pub(super) fn drop_supplementary_groups() -> StepResult {
    check(raw_setgroups_none(), "setgroups", None)
}

/// [`Syscalls::become_root`](crate::sys::Syscalls::become_root) on the real kernel.
pub(super) fn become_root() -> StepResult {
    check(raw_setresgid(0), "setresgid", None)?;
    check(raw_setresuid(0), "setresuid", None)
}

/// [`Syscalls::set_no_new_privs`](crate::sys::Syscalls::set_no_new_privs) on the real kernel.
pub(super) fn set_no_new_privs() -> StepResult {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let ret = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(ret, "prctl(PR_SET_NO_NEW_PRIVS)", None)
}

/// [`Syscalls::drop_capabilities`](crate::sys::Syscalls::drop_capabilities) on the real kernel.
pub(super) fn drop_capabilities() -> StepResult {
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

/// [`Syscalls::write_own_id_maps`](crate::sys::Syscalls::write_own_id_maps) on the real
/// kernel; `shares_node_memory` as in [`RealSys`](super::RealSys).
pub(super) fn write_own_id_maps(uid: u32, gid: u32, shares_node_memory: bool) -> StepResult {
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
                    if shares_node_memory
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
    Ok(())
}
