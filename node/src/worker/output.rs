//! A run's outcome turned into a task result within the bounds a completion may carry:
//! output, log and error text cut to their limits, reads bounded with a marker for the
//! overflow.
//!
//! Invariant: a cut output is never passed off as the whole result of a successful task.

use std::time::Instant;

use skiff_client::api::{RunStatus, TaskResult};
use skiff_raft_store::functions::{LOG_BYTES_MAX, OUTPUT_BYTES_MAX};
use skiff_sandbox::{ExitStatus, SandboxError};

use super::Worker;

/// The read recorded when a run's data-service reads did not all fit in the access log.
pub(super) const INCOMPLETE_READS: &str = "(reads not fully tracked)";

impl Worker {
    pub(super) fn exec_result(
        &self,
        outcome: Result<skiff_sandbox::RunOutcome, SandboxError>,
        warm: bool,
        started: Instant,
    ) -> TaskResult {
        let o = match outcome {
            Ok(o) => o,
            Err(e) => {
                let mut r = self.failed(format!("sandbox error: {e}"));
                r.warm = warm;
                r.wall_ms = started.elapsed().as_millis() as u64;
                return r;
            }
        };
        let (status, exit_code, error) = match o.status {
            ExitStatus::Exited(0) => (RunStatus::Succeeded, Some(0), None),
            ExitStatus::Exited(c) => (RunStatus::Failed, Some(c), Some(format!("exit status {c}"))),
            ExitStatus::Signaled(s) => (
                RunStatus::Failed,
                None,
                Some(format!("killed by signal {s}")),
            ),
            ExitStatus::TimedOut => (RunStatus::TimedOut, None, Some("timed out".to_string())),
            ExitStatus::OutOfMemory => (RunStatus::Failed, None, Some("out of memory".to_string())),
        };
        let (status, error) = match output_over_limit(o.stdout.len(), o.stdout_truncated) {
            Some(over) if status == RunStatus::Succeeded => (RunStatus::Failed, Some(over)),
            _ => (status, error),
        };
        let mut output = o.stdout;
        output.truncate(OUTPUT_BYTES_MAX);
        TaskResult {
            status,
            node: self.id,
            exit_code,
            output,
            log: tail(&o.stderr, LOG_BYTES_MAX),
            error,
            warm,
            wall_ms: o.wall.as_millis() as u64,
            cpu_ms: o.cpu.as_millis() as u64,
            peak_memory_bytes: o.peak_memory_bytes,
        }
    }

    pub(super) fn failed(&self, error: String) -> TaskResult {
        TaskResult {
            status: RunStatus::Failed,
            node: self.id,
            exit_code: None,
            output: Vec::new(),
            log: Vec::new(),
            error: Some(truncate_text(error)),
            warm: false,
            wall_ms: 0,
            cpu_ms: 0,
            peak_memory_bytes: 0,
        }
    }
}

/// The reads of all stages of a run within what one completion may carry; past it, the marker
/// read keeps the run's result from ever being reused, as for a plain run's overflow.
pub(super) fn bounded_reads(mut reads: Vec<(String, u64)>) -> Vec<(String, u64)> {
    let max = skiff_raft_store::functions::TRACKED_READS_MAX;
    if reads.len() > max {
        reads.truncate(max - 1);
        reads.push((INCOMPLETE_READS.to_string(), u64::MAX));
    }
    reads
}

pub(super) fn tail(bytes: &[u8], max: usize) -> Vec<u8> {
    bytes[bytes.len().saturating_sub(max)..].to_vec()
}

pub(super) fn truncate_text(mut s: String) -> String {
    if s.len() > LOG_BYTES_MAX {
        let mut cut = LOG_BYTES_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Why a run that exited well still failed because its output was cut, if it was: by its
/// sandbox (over the tier's or policy's `stdout_bytes_max`, `sandbox_cut`) or by the bound of
/// a task result ([`OUTPUT_BYTES_MAX`]). A cut output is never passed off as the whole
/// result of a successful task; the kept part stays in the result's output.
pub(super) fn output_over_limit(len: usize, sandbox_cut: bool) -> Option<String> {
    let kept = len.min(OUTPUT_BYTES_MAX);
    if sandbox_cut {
        Some(format!(
            "output over the sandbox's stdout limit (stdout_bytes_max of its tier or policy): \
             cut after {len} bytes; the first {kept} bytes are kept"
        ))
    } else if len > OUTPUT_BYTES_MAX {
        Some(format!(
            "output of {len} bytes is over the limit of a task result ({OUTPUT_BYTES_MAX} \
             bytes); the first {kept} bytes are kept"
        ))
    } else {
        None
    }
}
