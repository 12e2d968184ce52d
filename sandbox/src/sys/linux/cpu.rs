//! CPU affinity and scheduling priority of the calling thread.

use std::io;

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
