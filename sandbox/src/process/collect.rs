//! Collecting a run: stdin fed, stdout and stderr kept up to their limits, the end of the run
//! watched for within its timeout, the cgroup's counters read, the outcome decoded.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
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
        let mut stdin_file = self.stdin.take();
        if let Some(f) = &stdin_file {
            sys::set_nonblocking(f.as_raw_fd()).map_err(|e| SandboxError::syscall("fcntl", e))?;
        }
        if stdin.is_empty() {
            stdin_file = None;
        }
        let mut stdin_pos = 0;
        let mut stdout = Capture::new(self.stdout.take(), self.limits.stdout_bytes_max);
        let mut stderr = Capture::new(self.stderr.take(), self.limits.stderr_bytes_max);
        let mut init_status = self.init_status.take();
        let mut init_msg = std::mem::take(&mut self.init_pending);
        let mut sup_msg = Vec::new();
        // Whether the end of the run is still to come (the supervisor's report or the init's
        // exit).
        let mut watching = !self.reaped;
        let mut init_exit: Option<i32> = None;
        let mut timed_out = false;
        // Output goes straight into the kept bytes; this is only for output past a limit,
        // made when first needed (zeroing it at every start wrote 16 pages that the
        // supervisor's copy of this process shares, each a copy-on-write fault).
        let mut scratch = Vec::new();
        let mut status_buf = [0u8; 512];
        loop {
            if !watching && stdout.file.is_none() && stderr.file.is_none() {
                break;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
            let mut fds = Vec::with_capacity(5);
            let mut slots = Vec::with_capacity(5);
            if let Some(f) = &stdin_file {
                fds.push((f.as_raw_fd(), PollWant::Write));
                slots.push(Slot::Stdin);
            }
            if let Some(f) = &stdout.file {
                fds.push((f.as_raw_fd(), PollWant::Read));
                slots.push(Slot::Stdout);
            }
            if let Some(f) = &stderr.file {
                fds.push((f.as_raw_fd(), PollWant::Read));
                slots.push(Slot::Stderr);
            }
            if let Some(f) = &init_status {
                fds.push((f.as_raw_fd(), PollWant::Read));
                slots.push(Slot::InitStatus);
            }
            if watching {
                let fd = match &self.watch {
                    Watch::Supervisor { status, .. } => status.as_raw_fd(),
                    Watch::Init { pidfd, .. } => pidfd.as_raw_fd(),
                };
                fds.push((fd, PollWant::Read));
                slots.push(Slot::Watch);
            }
            let ready = sys::poll_fds(&fds, remaining_ms(deadline))
                .map_err(|e| SandboxError::syscall("poll", e))?;
            for (slot, ready) in slots.into_iter().zip(ready) {
                if !ready {
                    continue;
                }
                match slot {
                    Slot::Stdin => {
                        let f = stdin_file.as_mut().expect("polled");
                        match f.write(&stdin[stdin_pos..]) {
                            Ok(n) => stdin_pos += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                            // EPIPE: the function stopped reading; the rest is dropped.
                            Err(_) => stdin_pos = stdin.len(),
                        }
                        if stdin_pos >= stdin.len() {
                            stdin_file = None;
                        }
                    }
                    Slot::Stdout => stdout.read(&mut scratch),
                    Slot::Stderr => stderr.read(&mut scratch),
                    Slot::InitStatus => {
                        let f = init_status.as_mut().expect("polled");
                        match f.read(&mut status_buf) {
                            Ok(0) | Err(_) => init_status = None,
                            Ok(n) => init_msg.extend_from_slice(&status_buf[..n]),
                        }
                    }
                    Slot::Watch => match &mut self.watch {
                        Watch::Supervisor { status, .. } => match status.read(&mut status_buf) {
                            Ok(0) | Err(_) => watching = false,
                            Ok(n) => {
                                sup_msg.extend_from_slice(&status_buf[..n]);
                                // The init's exit status: the sandbox's processes are all gone
                                // (its pid namespace died with it). The supervisor's own exit
                                // is not waited for here.
                                if exit_report(&sup_msg).is_some() {
                                    watching = false;
                                }
                            }
                        },
                        Watch::Init { pid, .. } => {
                            // It has exited: the wait returns at once, and only reaps it.
                            let raw = sys::wait_pid(*pid)
                                .map_err(|e| SandboxError::syscall("waitpid", e))?;
                            self.reaped = true;
                            init_exit = Some(raw);
                            watching = false;
                        }
                    },
                }
            }
        }
        if timed_out {
            self.cgroup.kill_all()?;
        }
        let wall = start.elapsed();
        let reported = exit_report(&sup_msg).or(init_exit).filter(|_| !timed_out);
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
        if init_msg.first() == Some(&b'E') {
            return Err(parse_report(&init_msg));
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
            stdout: stdout.data,
            stderr: stderr.data,
            stdout_truncated: stdout.truncated,
            stderr_truncated: stderr.truncated,
            wall,
            cpu: stats.cpu,
            peak_memory_bytes: stats.peak_memory_bytes,
            host_uid: self.host_id,
        })
    }
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
