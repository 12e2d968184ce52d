//! The bodies of a sandbox's children, run after `fork` or in the node's memory (see
//! `sys::spawn_sharing_memory` for what that asks of them): the supervisor, the starter of a
//! one-shot run, and the init in both kinds; and the setup error report they write to their
//! status pipe (read back by `parse_report`).

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use super::WORK_BYTES_MAX;
use crate::setup::{self, Plan};
use crate::sys::{self, CpuMask, RealSys, StepError};

fn report(fd: i32, error: &StepError) {
    let path = error
        .path
        .as_ref()
        .map(|p| p.as_os_str().as_encoded_bytes().to_vec())
        .unwrap_or_default();
    let mut msg = format!("E{}\t{}\t", error.step, error.errno).into_bytes();
    msg.extend(path.iter().map(|b| if *b == b'\n' { b' ' } else { *b }));
    msg.push(b'\n');
    let _ = sys::write_fd(fd, &msg);
}

/// Body of the supervisor child. Never returns.
pub(super) fn supervisor_main(
    plan: &Plan,
    parent_pid: i32,
    stdio: [i32; 3],
    control: &[i32],
    affinity: Option<CpuMask>,
) -> ! {
    if sys::adopt_fds(stdio, control).is_err() {
        sys::exit_now(120);
    }
    let mut real = RealSys::new(Some(parent_pid), false);
    if let Err(e) = setup::supervisor(&mut real, plan) {
        report(3, &e);
        sys::exit_now(121);
    }
    // The init shares the supervisor's memory until it execs (the supervisor waits for it
    // anyway): no copy of the node's page tables, no copy-on-write faults in the init, no
    // copy to tear down at its exec. Everything else of the init is its own.
    let mut init = || -> i32 { init_main(plan, affinity) };
    match sys::spawn_sharing_memory(&mut init, false, None) {
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(0);
            report(3, &StepError::new("start init", None, errno));
            sys::exit_now(122);
        }
        Ok(init_pid) => {
            // Everything but its status pipe (3) is the init's.
            let joins = i32::try_from(plan.cgroup_join_files.len()).expect("a few hierarchies");
            for fd in [0, 1, 2]
                .into_iter()
                .chain(4..setup::JOIN_FDS_FIRST + joins)
            {
                sys::close_fd(fd);
            }
            // The init has exec'd the function (or died): the setup's ping-pong is over, and
            // the function may run on any CPU, so the wake-up at its end need not cross to
            // this one.
            if let Some(mask) = affinity {
                let _ = sys::set_affinity(&mask);
            }
            let status = sys::wait_pid(init_pid).unwrap_or(255 << 8);
            let mut msg = vec![b'X'];
            msg.extend_from_slice(&status.to_le_bytes());
            let _ = sys::write_fd(3, &msg);
            // What is left (tearing down this copy of the node's address space and the
            // sandbox's namespaces) is nobody's wait: it must not take the CPU from the node's
            // next start.
            sys::lower_to_idle_priority();
            sys::exit_now(0);
        }
    }
}

/// What the starter of a one-shot run (see [`Prepared::start`]) works from: all of it owned by
/// the suspended calling thread.
pub(super) struct Starter<'a> {
    pub(super) plan: &'a Plan,
    pub(super) image: &'a sys::ExecImage,
    pub(super) parent_pid: i32,
    pub(super) stdio: [i32; 3],
    pub(super) control: &'a [i32],
    pub(super) affinity: Option<CpuMask>,
    /// Where the starter leaves the init's pid for the calling thread.
    pub(super) init_pid: &'a AtomicI32,
    pub(super) init_stack: &'a sys::ChildStack,
}

impl Starter<'_> {
    /// Body of the starter: the supervisor's steps, then the init as a sibling (a child of the
    /// node), then exit with the code returned. Runs in the node's memory while the calling
    /// thread is suspended: it allocates only what it frees.
    pub(super) fn main(&self) -> i32 {
        if sys::adopt_fds(self.stdio, self.control).is_err() {
            return 120;
        }
        let mut real = RealSys::new(Some(self.parent_pid), true);
        let steps = setup::supervisor(&mut real, self.plan);
        // Gives the turn back on a failure too.
        drop(real);
        if let Err(e) = steps {
            report(3, &e);
            return 121;
        }
        let mut init = || -> i32 { init_exec_main(self.plan, self.image, self.affinity) };
        let code = match sys::spawn_sharing_memory(&mut init, true, Some(self.init_stack)) {
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(0);
                report(3, &StepError::new("start init", None, errno));
                122
            }
            Ok(pid) => {
                self.init_pid.store(pid, Ordering::Release);
                0
            }
        };
        // The calling thread resumes while this process is still exiting, and reads the status
        // pipe at once: this copy must be closed by then.
        sys::close_fds_from(0);
        code
    }
}

/// Body of the init of a one-shot run: the setup, then the exec of `image`. In the node's
/// memory like the starter; returns (to exit) only on failure.
fn init_exec_main(plan: &Plan, image: &sys::ExecImage, affinity: Option<CpuMask>) -> i32 {
    if sys::adopt_init_fds(plan.cgroup_join_files.len()).is_err() {
        return 123;
    }
    let mut real = RealSys::new(None, false);
    // Its parent is the node: if the node is already gone, the write fails and the init stops
    // before it runs anything without a parent to time it out.
    real.parent_alive_fd = Some(4);
    if let Err(e) = setup::init(&mut real, plan) {
        report(4, &e);
        return 124;
    }
    // The setup's ping-pong is over: the function gets every CPU the node had.
    if let Some(mask) = affinity {
        let _ = sys::set_affinity(&mask);
    }
    let errno = image.exec();
    let program = Path::new(std::ffi::OsStr::from_bytes(image.program().to_bytes()));
    report(4, &StepError::new("exec", Some(program), errno));
    127
}

/// Body of the init (pid 1 of the sandbox). Never returns.
fn init_main(plan: &Plan, affinity: Option<CpuMask>) -> ! {
    if sys::adopt_init_fds(plan.cgroup_join_files.len()).is_err() {
        sys::exit_now(123);
    }
    let mut real = RealSys::new(None, false);
    if let Err(e) = setup::init(&mut real, plan) {
        report(4, &e);
        sys::exit_now(124);
    }
    if sys::write_fd(4, b"R").is_err() {
        sys::exit_now(125);
    }
    // The setup's ping-pong is over: the function gets every CPU the node had, and a warm
    // sandbox waits for its work free to wake on an idle CPU rather than on the one the
    // hand-off runs on (where it would take the CPU from the thread handing off until its
    // exec).
    if let Some(mask) = affinity {
        let _ = sys::set_affinity(&mask);
    }
    let mut frame = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sys::read_fd(3, &mut buf) {
            Ok(0) => break,
            Ok(n) if frame.len() + n <= WORK_BYTES_MAX => frame.extend_from_slice(&buf[..n]),
            // Oversized work or a read error: the parent is gone or broken.
            _ => sys::exit_now(126),
        }
    }
    if frame.is_empty() {
        // Discarded without work (pool shrinking, node shutting down).
        sys::exit_now(0);
    }
    let (errno, program) = sys::exec_work(&frame);
    let program = PathBuf::from(String::from_utf8_lossy(&program).into_owned());
    report(4, &StepError::new("exec", Some(&program), errno));
    sys::exit_now(127);
}
