//! The life of one sandbox, from the parent's side: create it up to "ready, waiting for work"
//! ([`Prepared`]), hand it the work, collect its output within limits, report, clean up.
//!
//! Processes of a sandbox made ahead ([`Prepared::create`]): the node forks a *supervisor*
//! (stays in the host pid namespace, outside the sandbox's cgroup, waits for the init and
//! reports its exit status), which starts the *init* (pid 1 of the new pid namespace, sharing
//! the supervisor's memory until it execs), which joins the cgroup, builds the file system,
//! locks itself down and, once work arrives on its work pipe, execs the function. A run ends
//! at the supervisor's report of the init's exit; the supervisor is reaped and the cgroup
//! removed behind it (`cgroup::remove_behind`).
//!
//! A one-shot run ([`Prepared::start`]) has no supervisor: a *starter* sharing the node's
//! memory (the calling thread suspended) does the supervisor's steps and starts the init as
//! the node's own child; the command is made ready by the node, and the run ends at the
//! init's exit, seen on its pidfd.
//!
//! When the init dies, the kernel kills every other process of its pid namespace; on timeout
//! the parent kills the whole cgroup.
//!
//! Pipes (all close-on-exec in the parent): supervisor status (`E...` = setup error, `X` +
//! wait status at the end), work (parent → init: the command; EOF ends it), init status
//! (`R` = ready, `E...` = setup or exec error, EOF = exec succeeded), and stdin, stdout, stderr
//! of the function. A one-shot run has one status pipe for starter and init. The children
//! never wait for the parent during setup: they map their own ids.
//!
//! # Layout
//! - this file: [`Prepared`] made, started, handed its work and destroyed; the work frame and
//!   the status messages read back from the children;
//! - `children.rs`: the bodies of the supervisor, the starter and the init;
//! - `collect.rs`: a run collected to its [`RunOutcome`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::cgroup::Cgroup;
use crate::error::SandboxError;
use crate::policy::Limits;
use crate::setup::Plan;
use crate::sys::{self, CpuMask, ForkResult, PollWant};
use crate::{RunOutcome, SandboxSpec};

mod children;
mod collect;

use children::{supervisor_main, Starter};

/// Longest the setup may take before the sandbox is abandoned.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest encoded command line plus environment.
pub const WORK_BYTES_MAX: usize = 128 * 1024;
/// Where each sandbox's tmpfs root is mounted (inside its own mount namespace only).
const STAGING_ROOT: &str = "/run/skiff-sandbox/root";

static SANDBOX_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The host uid and gid of the next sandbox: the range's group, and the next uid of the range
/// (see `host_ids`).
fn next_host_ids() -> (u32, u32) {
    let range = crate::host_ids::host_id_range();
    let uids = range.uids();
    let n = SANDBOX_COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    // Spread node processes over the range so that two of them rarely collide.
    let uid = uids.start + (pid.wrapping_mul(7919).wrapping_add(n)) % uids.len() as u32;
    (uid, range.group())
}

fn staging_root() -> Result<&'static Path, SandboxError> {
    static ROOT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ROOT.get_or_init(|| {
        let path = PathBuf::from(STAGING_ROOT);
        std::fs::create_dir_all(&path)
            .map(|()| path)
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map(PathBuf::as_path)
    .map_err(|detail| SandboxError::BadPath {
        what: "staging root",
        path: PathBuf::from(STAGING_ROOT),
        source: io::Error::other(detail.clone()),
    })
}

/// The default `PATH` inside a sandbox.
const PATH_DEFAULT: &str = "/usr/local/bin:/usr/bin:/bin";
/// The default `PATH` inside a sandbox with a helper binary: the helper's directory comes last,
/// so it never shadows a system command.
const PATH_DEFAULT_WITH_HELPER: &str = "/usr/local/bin:/usr/bin:/bin:/run/skiff/bin";

/// The `PATH` a command in a sandbox for `spec` gets unless its environment sets one.
pub(crate) fn default_path(spec: &SandboxSpec) -> &'static str {
    if spec.helper_binary.is_some() {
        PATH_DEFAULT_WITH_HELPER
    } else {
        PATH_DEFAULT
    }
}

/// Encodes argv and environment for the init: `argc\0arg...\0envc\0k=v...\0`. The
/// environment is `env` over the defaults, with `path` as the default `PATH`.
pub(crate) fn encode_work(
    argv: &[String],
    path: &str,
    env: &[(String, String)],
) -> Result<Vec<u8>, SandboxError> {
    let invalid = |reason: String| SandboxError::InvalidCommand { reason };
    if argv.is_empty() {
        return Err(invalid("empty command".to_string()));
    }
    let mut merged: Vec<(String, String)> = vec![
        ("PATH".into(), path.into()),
        ("HOME".into(), "/tmp".into()),
        ("TMPDIR".into(), "/tmp".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    for (key, value) in env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(invalid(format!("bad environment variable {key:?}")));
        }
        merged.retain(|(k, _)| k != key);
        merged.push((key.clone(), value.clone()));
    }
    let mut frame = Vec::new();
    frame.extend_from_slice(argv.len().to_string().as_bytes());
    frame.push(0);
    for arg in argv {
        if arg.contains('\0') {
            return Err(invalid("argument contains NUL".to_string()));
        }
        frame.extend_from_slice(arg.as_bytes());
        frame.push(0);
    }
    frame.extend_from_slice(merged.len().to_string().as_bytes());
    frame.push(0);
    for (key, value) in &merged {
        frame.extend_from_slice(format!("{key}={value}").as_bytes());
        frame.push(0);
    }
    if frame.len() > WORK_BYTES_MAX {
        return Err(invalid(format!(
            "command and environment take {} bytes, more than {WORK_BYTES_MAX}",
            frame.len()
        )));
    }
    Ok(frame)
}

fn parse_report(msg: &[u8]) -> SandboxError {
    let text = String::from_utf8_lossy(msg.strip_prefix(b"E").unwrap_or(msg));
    let mut parts = text.trim_end_matches('\n').splitn(3, '\t');
    let step = parts.next().unwrap_or("unknown").to_string();
    let errno = parts
        .next()
        .and_then(|e| e.parse().ok())
        .unwrap_or(libc::EIO);
    let path = parts.next().filter(|p| !p.is_empty()).map(PathBuf::from);
    SandboxError::Setup {
        step,
        path,
        source: io::Error::from_raw_os_error(errno),
    }
}

/// What both ways of starting a sandbox make before any child exists.
struct Groundwork {
    host_id: u32,
    in_setup: crate::cgroup::StartInSetup,
    cgroup: Cgroup,
    plan: Plan,
    netns: Option<std::os::fd::OwnedFd>,
}

impl Groundwork {
    fn lay(spec: &SandboxSpec) -> Result<Self, SandboxError> {
        let filters = crate::seccomp::filters()?;
        let staging = staging_root()?;
        let (host_id, host_gid) = next_host_ids();
        let in_setup = crate::cgroup::StartInSetup::begin();
        let cgroup = Cgroup::create(&spec.limits)?;
        let mut plan = Plan::build(
            spec,
            cgroup.join_files(),
            (host_id, host_gid),
            staging,
            filters,
        )?;
        let netns = if spec.limits.tier.host_network() {
            None
        } else {
            crate::netns::take()
        };
        if netns.is_some() {
            plan.join_network_namespace_ahead();
        }
        Ok(Self {
            host_id,
            in_setup,
            cgroup,
            plan,
            netns,
        })
    }

    /// The children's fds from 3, in order: `first` (the supervisor's status, work, init
    /// status), the cgroup's join files (from `JOIN_FDS_FIRST`), then the network namespace if
    /// one was made ahead.
    fn control(&self, first: [i32; 3]) -> Vec<i32> {
        let mut control = first.to_vec();
        control.extend(self.cgroup.join_fds());
        control.extend(self.netns.as_ref().map(AsRawFd::as_raw_fd));
        debug_assert_eq!(
            control.len(),
            3 + self.plan.cgroup_join_files.len() + usize::from(self.netns.is_some())
        );
        control
    }
}

/// Everything the starter and the init of a one-shot run wrote to their status pipe, read
/// once every writer is gone: an error line from either, or nothing (the init's
/// parent-alive byte left out).
fn read_start_report(status_r: OwnedFd) -> Result<Vec<u8>, SandboxError> {
    let mut report = Vec::new();
    File::from(status_r)
        .read_to_end(&mut report)
        .map_err(|e| SandboxError::syscall("read", e))?;
    Ok(report
        .strip_prefix(sys::PARENT_ALIVE_BYTE)
        .unwrap_or(&report)
        .to_vec())
}

/// A pipe, both ends close-on-exec (see `sys::pipe`).
fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    sys::pipe().map_err(|e| SandboxError::syscall("pipe2", e))
}

fn remaining_ms(deadline: Instant) -> i32 {
    let left = deadline.saturating_duration_since(Instant::now());
    // Round up so a poll never spins with a zero timeout before the deadline.
    i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
}

/// Reads one status message: a single letter (`U`, `R`), an error line (`E...\n`), or EOF
/// (returned as an empty vector).
fn read_message(file: &mut File, deadline: Instant) -> Result<Vec<u8>, SandboxError> {
    let mut msg = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        if Instant::now() >= deadline {
            return Err(SandboxError::Protocol {
                detail: format!("setup took longer than {SETUP_TIMEOUT:?}"),
            });
        }
        let ready = sys::poll_fds(
            &[(file.as_raw_fd(), PollWant::Read)],
            remaining_ms(deadline),
        )
        .map_err(|e| SandboxError::syscall("poll", e))?;
        if !ready[0] {
            continue;
        }
        let n = file
            .read(&mut buf)
            .map_err(|e| SandboxError::syscall("read", e))?;
        if n == 0 {
            return Ok(msg);
        }
        msg.extend_from_slice(&buf[..n]);
        match msg[0] {
            b'E' if msg.contains(&b'\n') => return Ok(msg),
            b'E' => continue,
            _ => return Ok(msg),
        }
    }
}

/// Who tells the parent that a run has ended.
#[derive(Debug)]
enum Watch {
    /// The supervisor (sandboxes made ahead): its `X` report carries the init's wait status.
    Supervisor { pid: i32, status: File },
    /// The init itself, a child of this process (one-shot runs, see [`Prepared::start`]): its
    /// pidfd turns readable when it has exited. `starter` is the exited starter, still to be
    /// reaped (off the run's path).
    Init {
        pid: i32,
        pidfd: OwnedFd,
        starter: Option<i32>,
    },
}

/// A sandbox whose setup is complete, blocked waiting for its work (or, from
/// [`Prepared::start`], already running it).
#[derive(Debug)]
pub(crate) struct Prepared {
    watch: Watch,
    /// The host uid (and gid) the sandbox's root maps to: unique per sandbox.
    pub(crate) host_id: u32,
    pub(crate) cgroup: Cgroup,
    pub(crate) limits: Limits,
    work: Option<File>,
    init_status: Option<File>,
    /// Bytes the init sent after its `R` (an exec error may follow it in the same read).
    init_pending: Vec<u8>,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    reaped: bool,
    /// Kept until the supervisor is gone: its copy of this process shares the plan's pages, so
    /// freeing the plan while it lives costs a copy-on-write fault per page touched.
    plan: Option<Plan>,
    /// The sandbox's mount namespace, held open by a one-shot run so that its teardown (an RCU
    /// grace period) happens after the run, not in the init's exit before its parent learns
    /// of it.
    mount_namespace: Option<File>,
}

impl Prepared {
    /// Creates a sandbox for `spec` and waits until it is ready for work.
    pub(crate) fn create(spec: &SandboxSpec) -> Result<Self, SandboxError> {
        let ground = Groundwork::lay(spec)?;
        let (sup_status_r, sup_status_w) = pipe()?;
        let (work_r, work_w) = pipe()?;
        let (init_status_r, init_status_w) = pipe()?;
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let parent_pid = i32::try_from(std::process::id()).expect("pids fit in i32");
        // Everything the parent keeps is made before the fork, for the same reason as `plan`.
        let limits = spec.limits.clone();
        let control = ground.control([
            sup_status_w.as_raw_fd(),
            work_r.as_raw_fd(),
            init_status_w.as_raw_fd(),
        ]);
        let Groundwork {
            host_id,
            in_setup,
            mut cgroup,
            plan,
            netns,
        } = ground;
        let pin = Pin::current_cpu();
        let pid = match sys::fork().map_err(|e| SandboxError::syscall("fork", e))? {
            ForkResult::Child => supervisor_main(
                &plan,
                parent_pid,
                [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
                &control,
                pin.original,
            ),
            ForkResult::Parent(pid) => pid,
        };
        cgroup.close_join_fds();
        drop((
            sup_status_w,
            work_r,
            init_status_w,
            in_r,
            out_w,
            err_w,
            netns,
        ));
        let mut prepared = Prepared {
            watch: Watch::Supervisor {
                pid,
                status: File::from(sup_status_r),
            },
            host_id,
            cgroup,
            limits,
            work: Some(File::from(work_w)),
            init_status: Some(File::from(init_status_r)),
            init_pending: Vec::new(),
            stdin: Some(File::from(in_w)),
            stdout: Some(File::from(out_r)),
            stderr: Some(File::from(err_r)),
            reaped: false,
            plan: Some(plan),
            mount_namespace: None,
        };
        prepared.handshake()?;
        drop(in_setup);
        drop(pin);
        Ok(prepared)
    }

    /// Starts `frame` (see [`encode_work`]) in a new sandbox for one run, without a supervisor:
    /// a *starter* sharing this process's memory, while the calling thread is suspended, does
    /// the supervisor's steps and starts the init as this process's own child, sharing the
    /// memory as well; the init builds the sandbox and execs the command, and the calling
    /// thread resumes at that exec (or at a failure). Nothing of this process's address space
    /// is copied, no supervisor is torn down, and the init's exit comes straight here.
    ///
    /// The calling thread cannot time the setup out while suspended; the setup only touches
    /// local files (the tier's binds, `/code`), and its own steps are bounded.
    ///
    /// Over a hundred lines on purpose: the order of its steps is what a start costs (signals
    /// blocked only around the clone, the stacks given back and the pin dropped before
    /// anything else, the start-in-setup mark held until the sandbox is whole, the child's
    /// ends of the pipes closed before the report is read); split up, each part would look
    /// free to reorder.
    pub(crate) fn start(spec: &SandboxSpec, frame: &[u8]) -> Result<Self, SandboxError> {
        let image = sys::ExecImage::new(frame).map_err(|_| SandboxError::InvalidCommand {
            reason: "malformed command frame".to_string(),
        })?;
        let ground = Groundwork::lay(spec)?;
        let (status_r, status_w) = pipe()?;
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let parent_pid = i32::try_from(std::process::id()).expect("pids fit in i32");
        let limits = spec.limits.clone();
        // The supervisor's layout, with the one status pipe in all three places: the starter
        // reports on its fd 3, the init on its fd 4 (fd 5 before `adopt_init_fds`); there is
        // no work pipe, the command is `image`.
        let status_fd = status_w.as_raw_fd();
        let control = ground.control([status_fd, status_fd, status_fd]);
        let init_pid = AtomicI32::new(0);
        let stack = || sys::ChildStack::take().map_err(|e| SandboxError::syscall("mmap", e));
        let (starter_stack, init_stack) = (stack()?, stack()?);
        let pin = Pin::current_cpu();
        let started = {
            // The children run this thread's signal handlers until the init resets them.
            let _blocked = sys::block_all_signals()
                .map_err(|e| SandboxError::syscall("pthread_sigmask", e))?;
            let starter = Starter {
                plan: &ground.plan,
                image: &image,
                parent_pid,
                stdio: [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
                control: &control,
                affinity: pin.original,
                init_pid: &init_pid,
                init_stack: &init_stack,
            };
            sys::spawn_sharing_memory(&mut || starter.main(), false, Some(&starter_stack))
        };
        // Both children are done with their stacks: the starter has exited, the init exec'd
        // or died.
        starter_stack.give_back();
        init_stack.give_back();
        drop(pin);
        let Groundwork {
            host_id,
            in_setup,
            mut cgroup,
            plan,
            netns,
        } = ground;
        cgroup.close_join_fds();
        drop((status_w, in_r, out_w, err_w, netns, image));
        let starter_pid = started.map_err(|e| SandboxError::syscall("clone", e))?;
        // Every writer is gone (the starter closed its fds before it exited, the init exec'd
        // or died): an error line from either, or nothing. The starter is reaped later: it
        // may still be finishing its exit.
        let report = read_start_report(status_r)?;
        let pid = init_pid.load(Ordering::Acquire);
        if pid <= 0 {
            let _ = sys::wait_pid(starter_pid);
            let mut cgroup = cgroup;
            cgroup.remove()?;
            return Err(if report.first() == Some(&b'E') {
                parse_report(&report)
            } else {
                SandboxError::Protocol {
                    detail: "the sandbox's starter exited without starting it".to_string(),
                }
            });
        }
        let pidfd = match sys::pidfd_open(pid) {
            Ok(pidfd) => pidfd,
            Err(error) => {
                // Without a pidfd the run cannot be watched: end it (the init is our child,
                // so its pid is its own until reaped).
                sys::kill_pid(pid);
                let _ = sys::wait_pid(pid);
                let _ = sys::wait_pid(starter_pid);
                let mut cgroup = cgroup;
                cgroup.remove()?;
                return Err(SandboxError::syscall("pidfd_open", error));
            }
        };
        // Best effort: if the command is already gone, its exit tore the namespace down.
        let mount_namespace = File::open(format!("/proc/{pid}/ns/mnt")).ok();
        let prepared = Prepared {
            watch: Watch::Init {
                pid,
                pidfd,
                starter: Some(starter_pid),
            },
            host_id,
            cgroup,
            limits,
            work: None,
            init_status: None,
            init_pending: Vec::new(),
            stdin: Some(File::from(in_w)),
            stdout: Some(File::from(out_r)),
            stderr: Some(File::from(err_r)),
            reaped: false,
            plan: Some(plan),
            mount_namespace,
        };
        drop(in_setup);
        if report.first() == Some(&b'E') {
            // The init failed in its setup or exec and is exiting; dropping reaps it.
            let error = parse_report(&report);
            drop(prepared);
            return Err(error);
        }
        Ok(prepared)
    }

    fn handshake(&mut self) -> Result<(), SandboxError> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let Watch::Supervisor {
            status: supervisor_status,
            ..
        } = &mut self.watch
        else {
            return Err(SandboxError::Protocol {
                detail: "no handshake with a sandbox started for one run".to_string(),
            });
        };
        let init_status = self.init_status.as_mut().expect("set at creation");
        let msg = read_message(init_status, deadline)?;
        match msg.first() {
            Some(b'R') => {
                self.init_pending = msg[1..].to_vec();
                Ok(())
            }
            Some(b'E') => Err(parse_report(&msg)),
            _ => {
                // The init never started: the supervisor says why.
                let sup = read_message(supervisor_status, deadline)?;
                if sup.first() == Some(&b'E') {
                    Err(parse_report(&sup))
                } else {
                    Err(SandboxError::Protocol {
                        detail: "init exited before it was ready".to_string(),
                    })
                }
            }
        }
    }

    /// Memory charged to this sandbox's cgroup now.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.cgroup.memory_current().unwrap_or(0)
    }

    /// Hands the work to the waiting init: one write and a close.
    pub(crate) fn hand_off(&mut self, frame: &[u8]) -> Result<(), SandboxError> {
        let mut work = self.work.take().ok_or_else(|| SandboxError::Protocol {
            detail: "work already handed off".to_string(),
        })?;
        work.write_all(frame)
            .map_err(|e| SandboxError::syscall("write", e))
    }

    /// Waits until the init has exec'd the command (its status pipe closes) or reports why not.
    pub(crate) fn await_exec(&mut self, deadline: Instant) -> Result<(), SandboxError> {
        let mut msg = std::mem::take(&mut self.init_pending);
        let Some(mut status) = self.init_status.take() else {
            return Ok(());
        };
        loop {
            if msg.contains(&b'\n') {
                return Err(parse_report(&msg));
            }
            let more = read_message(&mut status, deadline)?;
            if more.is_empty() {
                // EOF: the exec happened (or the init died, which the exit status tells).
                return Ok(());
            }
            msg.extend_from_slice(&more);
        }
    }

    fn reap(&mut self) -> Result<(), SandboxError> {
        if let Watch::Init { starter, .. } = &mut self.watch {
            if let Some(pid) = starter.take() {
                sys::wait_pid(pid).map_err(|e| SandboxError::syscall("waitpid", e))?;
            }
        }
        if !self.reaped {
            self.reaped = true;
            let pid = match &self.watch {
                Watch::Supervisor { pid, .. } | Watch::Init { pid, .. } => *pid,
            };
            sys::wait_pid(pid).map_err(|e| SandboxError::syscall("waitpid", e))?;
        }
        Ok(())
    }

    /// Takes the function's stdio for serve mode: (stdin, stdout, stderr).
    pub(crate) fn take_stdio(&mut self) -> Option<(File, File, File)> {
        Some((self.stdin.take()?, self.stdout.take()?, self.stderr.take()?))
    }

    /// Kills everything in the sandbox and removes its cgroup.
    pub(crate) fn destroy(mut self) -> Result<(), SandboxError> {
        self.destroy_inner()
    }

    fn destroy_inner(&mut self) -> Result<(), SandboxError> {
        self.work = None;
        self.cgroup.kill_all()?;
        self.reap()?;
        self.cgroup.remove()
    }

    pub(crate) fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.cgroup.dirs().to_vec()
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        if !self.reaped {
            if let Err(error) = self.destroy_inner() {
                tracing::warn!(%error, "sandbox cleanup failed");
            }
        }
    }
}

/// Keeps the calling thread on its current CPU while a sandbox is set up (see
/// `sys::pin_to_current_cpu`); restores the affinity on drop.
struct Pin {
    original: Option<CpuMask>,
}

impl Pin {
    fn current_cpu() -> Self {
        Self {
            original: sys::pin_to_current_cpu().ok(),
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Some(mask) = &self.original {
            let _ = sys::set_affinity(mask);
        }
    }
}

/// Creates a sandbox, runs `argv` in it with `stdin`, and cleans everything up.
pub(crate) fn run_blocking(
    spec: &SandboxSpec,
    argv: &[String],
    stdin: &[u8],
) -> Result<RunOutcome, SandboxError> {
    let frame = encode_work(argv, default_path(spec), &spec.env)?;
    let prepared = Prepared::start(spec, &frame)?;
    prepared.collect(stdin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_frame_encodes_argv_and_env() {
        let frame = encode_work(
            &["sh".to_string(), "-c".to_string(), "echo hi".to_string()],
            PATH_DEFAULT,
            &[
                ("A".to_string(), "1".to_string()),
                ("HOME".to_string(), "/x".to_string()),
            ],
        )
        .expect("valid");
        let parts: Vec<&[u8]> = frame.split(|b| *b == 0).collect();
        assert_eq!(parts[0], b"3");
        assert_eq!(parts[3], b"echo hi");
        assert_eq!(parts[4], b"5");
        assert!(parts.contains(&&b"HOME=/x"[..]));
        assert!(!parts.contains(&&b"HOME=/tmp"[..]));
        assert!(parts.contains(&&b"A=1"[..]));
    }

    #[test]
    fn the_helper_directory_comes_last_in_the_default_path() {
        assert_eq!(
            PATH_DEFAULT_WITH_HELPER,
            format!("{PATH_DEFAULT}:{}", crate::setup::HELPER_DIR)
        );
        let code = std::env::temp_dir();
        let mut spec = SandboxSpec::new(crate::Tier::Standard, code);
        assert_eq!(default_path(&spec), PATH_DEFAULT);
        spec.helper_binary = Some(PathBuf::from("/bin/true"));
        let frame = encode_work(&["true".to_string()], default_path(&spec), &[]).expect("valid");
        let parts: Vec<&[u8]> = frame.split(|b| *b == 0).collect();
        assert!(parts.contains(&&b"PATH=/usr/local/bin:/usr/bin:/bin:/run/skiff/bin"[..]));
        // A PATH the caller sets wins, helper or not.
        let env = [("PATH".to_string(), "/code".to_string())];
        let frame = encode_work(&["true".to_string()], default_path(&spec), &env).expect("valid");
        let parts: Vec<&[u8]> = frame.split(|b| *b == 0).collect();
        assert!(parts.contains(&&b"PATH=/code"[..]));
        assert!(!parts.iter().any(|p| p.starts_with(b"PATH=/usr")));
    }

    #[test]
    fn bad_commands_are_refused() {
        assert!(encode_work(&[], PATH_DEFAULT, &[]).is_err());
        assert!(encode_work(&["a\0b".to_string()], PATH_DEFAULT, &[]).is_err());
        assert!(encode_work(
            &["a".to_string()],
            PATH_DEFAULT,
            &[("A=B".to_string(), String::new())]
        )
        .is_err());
        assert!(encode_work(&["a".repeat(WORK_BYTES_MAX + 1)], PATH_DEFAULT, &[]).is_err());
    }

    #[test]
    fn setup_reports_round_trip() {
        let msg = b"Ebind mount\t13\t/etc/x\n";
        match parse_report(msg) {
            SandboxError::Setup { step, path, source } => {
                assert_eq!(step, "bind mount");
                assert_eq!(path, Some(PathBuf::from("/etc/x")));
                assert_eq!(source.raw_os_error(), Some(13));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
