//! Collecting a run: stdin fed, stdout and stderr kept up to their limits, the end of the run
//! watched for within its timeout, the cgroup's counters read, the outcome decoded.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::{parse_report, remaining_ms, Prepared, Watch};
use crate::error::SandboxError;
use crate::sys::{self, PollWant};
use crate::{ExitStatus, RunOutcome};

const READ_CHUNK_BYTES: usize = 64 * 1024;

impl Prepared {
    /// Runs the handed-off command to its end: feeds stdin, collects output within limits,
    /// enforces the wall-clock timeout, reads the cgroup counters and removes the cgroup.
    pub(crate) fn collect(mut self, stdin: &[u8]) -> Result<RunOutcome, SandboxError> {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(self.limits.timeout_ms);
        let mut run = self.collection(stdin)?;
        let timed_out = self.follow(&mut run, deadline)?;
        if timed_out {
            self.cgroup.kill_all()?;
        }
        let wall = start.elapsed();
        self.outcome(run, timed_out, wall)
    }

    /// What the collection of a run starts from: the sandbox's stdio and status pipes, taken
    /// over, and stdin to feed (non-blocking, none if empty).
    fn collection<'a>(&mut self, stdin: &'a [u8]) -> Result<Collection<'a>, SandboxError> {
        let mut stdin_file = self.stdin.take();
        if let Some(f) = &stdin_file {
            sys::set_nonblocking(f.as_raw_fd()).map_err(|e| SandboxError::syscall("fcntl", e))?;
        }
        if stdin.is_empty() {
            stdin_file = None;
        }
        Ok(Collection {
            stdin,
            stdin_file,
            stdin_pos: 0,
            stdout: Capture::new(self.stdout.take(), self.limits.stdout_bytes_max),
            stderr: Capture::new(self.stderr.take(), self.limits.stderr_bytes_max),
            init_status: self.init_status.take(),
            init_msg: std::mem::take(&mut self.init_pending),
            sup_msg: Vec::new(),
            watching: !self.reaped,
            init_exit: None,
            scratch: Vec::new(),
            status_buf: [0u8; 512],
        })
    }

    /// Polls the run's pipes (and its watch) until the run has ended and its output is all
    /// read, or `deadline` passes; true if it passed.
    fn follow(
        &mut self,
        run: &mut Collection<'_>,
        deadline: Instant,
    ) -> Result<bool, SandboxError> {
        loop {
            if !run.watching && run.stdout.file.is_none() && run.stderr.file.is_none() {
                return Ok(false);
            }
            if Instant::now() >= deadline {
                return Ok(true);
            }
            let (fds, slots) = self.poll_set(run);
            let ready = sys::poll_fds(&fds, remaining_ms(deadline))
                .map_err(|e| SandboxError::syscall("poll", e))?;
            for (slot, ready) in slots.into_iter().zip(ready) {
                if ready {
                    self.on_ready(run, slot)?;
                }
            }
        }
    }

    /// The fds to poll, each with the slot it serves.
    fn poll_set(&self, run: &Collection<'_>) -> (Vec<(RawFd, PollWant)>, Vec<Slot>) {
        let mut fds = Vec::with_capacity(5);
        let mut slots = Vec::with_capacity(5);
        if let Some(f) = &run.stdin_file {
            fds.push((f.as_raw_fd(), PollWant::Write));
            slots.push(Slot::Stdin);
        }
        if let Some(f) = &run.stdout.file {
            fds.push((f.as_raw_fd(), PollWant::Read));
            slots.push(Slot::Stdout);
        }
        if let Some(f) = &run.stderr.file {
            fds.push((f.as_raw_fd(), PollWant::Read));
            slots.push(Slot::Stderr);
        }
        if let Some(f) = &run.init_status {
            fds.push((f.as_raw_fd(), PollWant::Read));
            slots.push(Slot::InitStatus);
        }
        if run.watching {
            let fd = match &self.watch {
                Watch::Supervisor { status, .. } => status.as_raw_fd(),
                Watch::Init { pidfd, .. } => pidfd.as_raw_fd(),
            };
            fds.push((fd, PollWant::Read));
            slots.push(Slot::Watch);
        }
        (fds, slots)
    }

    /// Serves one ready fd of the run.
    fn on_ready(&mut self, run: &mut Collection<'_>, slot: Slot) -> Result<(), SandboxError> {
        match slot {
            Slot::Stdin => {
                let f = run.stdin_file.as_mut().expect("polled");
                match f.write(&run.stdin[run.stdin_pos..]) {
                    Ok(n) => run.stdin_pos += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // EPIPE: the function stopped reading; the rest is dropped.
                    Err(_) => run.stdin_pos = run.stdin.len(),
                }
                if run.stdin_pos >= run.stdin.len() {
                    run.stdin_file = None;
                }
            }
            Slot::Stdout => run.stdout.read(&mut run.scratch),
            Slot::Stderr => run.stderr.read(&mut run.scratch),
            Slot::InitStatus => {
                let f = run.init_status.as_mut().expect("polled");
                match f.read(&mut run.status_buf) {
                    Ok(0) | Err(_) => run.init_status = None,
                    Ok(n) => run.init_msg.extend_from_slice(&run.status_buf[..n]),
                }
            }
            Slot::Watch => match &mut self.watch {
                Watch::Supervisor { status, .. } => match status.read(&mut run.status_buf) {
                    Ok(0) | Err(_) => run.watching = false,
                    Ok(n) => {
                        run.sup_msg.extend_from_slice(&run.status_buf[..n]);
                        // The init's exit status: the sandbox's processes are all gone (its
                        // pid namespace died with it). The supervisor's own exit is not
                        // waited for here.
                        if exit_report(&run.sup_msg).is_some() {
                            run.watching = false;
                        }
                    }
                },
                Watch::Init { pid, .. } => {
                    // It has exited: the wait returns at once, and only reaps it.
                    let raw =
                        sys::wait_pid(*pid).map_err(|e| SandboxError::syscall("waitpid", e))?;
                    self.reaped = true;
                    run.init_exit = Some(raw);
                    run.watching = false;
                }
            },
        }
        Ok(())
    }

    /// The outcome of a run that ended (or `timed_out`, its cgroup killed) after `wall`: the
    /// cgroup's final counters, its removal (off the run's path when the end was reported),
    /// and the exit decoded.
    fn outcome(
        &mut self,
        run: Collection<'_>,
        timed_out: bool,
        wall: Duration,
    ) -> Result<RunOutcome, SandboxError> {
        let reported = exit_report(&run.sup_msg)
            .or(run.init_exit)
            .filter(|_| !timed_out);
        let stats = if reported.is_some() {
            // Nothing of the sandbox runs any more (at most the supervisor, with nothing left
            // to do): the counters are final, and reaping the supervisor, dropping the mount
            // namespace and removing the cgroup happen off the run's path.
            let stats = self.cgroup.stats()?;
            let supervisor = match &mut self.watch {
                Watch::Supervisor { pid, .. } if !self.reaped => Some(*pid),
                Watch::Init { starter, .. } => starter.take(),
                Watch::Supervisor { .. } => None,
            };
            self.reaped = true;
            crate::cgroup::remove_behind(
                supervisor,
                self.cgroup.take(),
                Box::new((self.plan.take(), self.mount_namespace.take())),
            );
            stats
        } else {
            self.reap()?;
            let stats = self.cgroup.stats()?;
            self.cgroup.remove()?;
            stats
        };
        if run.init_msg.first() == Some(&b'E') {
            return Err(parse_report(&run.init_msg));
        }
        let status = if timed_out {
            ExitStatus::TimedOut
        } else if stats.oom_kills > 0 {
            ExitStatus::OutOfMemory
        } else if let Some(raw) = reported {
            decode_wait_status(raw)
        } else {
            // The supervisor died without reporting: only a kill from outside does that.
            ExitStatus::Signaled(libc::SIGKILL)
        };
        Ok(RunOutcome {
            status,
            stdout: run.stdout.data,
            stderr: run.stderr.data,
            stdout_truncated: run.stdout.truncated,
            stderr_truncated: run.stderr.truncated,
            wall,
            cpu: stats.cpu,
            peak_memory_bytes: stats.peak_memory_bytes,
            host_uid: self.host_id,
        })
    }
}

/// The state of one run's collection.
struct Collection<'a> {
    stdin: &'a [u8],
    /// The function's stdin while some of `stdin` is still to be written.
    stdin_file: Option<File>,
    stdin_pos: usize,
    stdout: Capture,
    stderr: Capture,
    init_status: Option<File>,
    init_msg: Vec<u8>,
    sup_msg: Vec<u8>,
    /// Whether the end of the run is still to come (the supervisor's report or the init's
    /// exit).
    watching: bool,
    init_exit: Option<i32>,
    /// Output goes straight into the kept bytes; this is only for output past a limit, made
    /// when first needed (zeroing it at every start wrote 16 pages that the supervisor's copy
    /// of this process shares, each a copy-on-write fault).
    scratch: Vec<u8>,
    status_buf: [u8; 512],
}

enum Slot {
    Stdin,
    Stdout,
    Stderr,
    InitStatus,
    Watch,
}

/// Output kept up to a byte limit; the rest is read and dropped so the writer never blocks.
struct Capture {
    file: Option<File>,
    data: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Capture {
    fn new(file: Option<File>, limit: u64) -> Self {
        Self {
            file,
            data: Vec::new(),
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            truncated: false,
        }
    }

    /// One read: into the kept bytes while there is room, else into `scratch` (made on first
    /// use) and dropped, which marks the output truncated.
    fn read(&mut self, scratch: &mut Vec<u8>) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let room = self.limit.saturating_sub(self.data.len());
        let got = if room > 0 {
            sys::read_into_spare(file.as_raw_fd(), &mut self.data, room.min(READ_CHUNK_BYTES))
        } else {
            if scratch.is_empty() {
                scratch.resize(READ_CHUNK_BYTES, 0);
            }
            let got = sys::read_fd(file.as_raw_fd(), scratch);
            if matches!(got, Ok(n) if n > 0) {
                self.truncated = true;
            }
            got
        };
        if matches!(got, Ok(0) | Err(_)) {
            self.file = None;
        }
    }
}

/// The init's raw wait status from the supervisor's `X` report, once all of it has arrived.
fn exit_report(msg: &[u8]) -> Option<i32> {
    match msg {
        [b'X', a, b, c, d, ..] => Some(i32::from_le_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

fn decode_wait_status(raw: i32) -> ExitStatus {
    if libc::WIFEXITED(raw) {
        ExitStatus::Exited(libc::WEXITSTATUS(raw))
    } else if libc::WIFSIGNALED(raw) {
        ExitStatus::Signaled(libc::WTERMSIG(raw))
    } else {
        ExitStatus::Signaled(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_decode() {
        assert_eq!(decode_wait_status(3 << 8), ExitStatus::Exited(3));
        assert_eq!(decode_wait_status(9), ExitStatus::Signaled(9));
    }
}
