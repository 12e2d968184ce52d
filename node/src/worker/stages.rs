//! A staged function: its stages run one after the other, each in a fresh sandbox with its
//! own policy, environment and data grant, stdout piped into the next stage's stdin.
//!
//! Invariants: a stage starts only within what is left of the function's timeout; a cut
//! intermediate output fails the pipeline rather than feed the next stage a different input;
//! the log keeps at most [`STAGE_LOG_BYTES_MAX`] of each stage.

use std::time::{Duration, Instant};

use skiff_client::api::{FunctionVersion, RunStatus, Task, TaskResult};
use skiff_raft_store::functions::{LOG_BYTES_MAX, OUTPUT_BYTES_MAX, STAGES_MAX};
use skiff_sandbox::ExitStatus;

use super::output::{bounded_reads, output_over_limit, tail, truncate_text};
use super::Worker;
use crate::policy::stage_label;
use crate::server::Node;

/// Most stderr bytes of one stage kept in a successful pipeline's log (the log as a whole is
/// still bounded by `LOG_BYTES_MAX`), so one chatty stage cannot push the others out.
const STAGE_LOG_BYTES_MAX: usize = LOG_BYTES_MAX / STAGES_MAX;

impl Worker {
    /// Runs the stages of a staged function one after the other, each in a fresh sandbox of
    /// its own: the payload into the first, each stage's stdout into the next, the last one's
    /// stdout as the result. The pipeline stops at the first stage that fails, and the result
    /// names it and carries its stderr as the log. Every stage's reads through its own data
    /// socket are returned, for the idempotency ledger.
    pub(super) async fn execute_stages(
        &self,
        node: &Node,
        task: &Task,
        fv: &FunctionVersion,
    ) -> (TaskResult, Vec<(String, u64)>) {
        let started = Instant::now();
        let code = match self.code_dir(node, &fv.spec.code_digest).await {
            Ok(c) => c,
            Err(e) => {
                return (
                    self.failed(format!("cannot prepare the sandbox: {e}")),
                    Vec::new(),
                )
            }
        };
        let stages = &fv.spec.stages;
        let mut input = task.payload.clone();
        let mut reads: Vec<(String, u64)> = Vec::new();
        let mut log: Vec<u8> = Vec::new();
        let mut cpu = Duration::ZERO;
        let mut peak_memory_bytes = 0u64;
        // Whether the last stage's output was cut by its sandbox.
        let mut cut = false;
        for (index, stage) in stages.iter().enumerate() {
            let label = stage_label(index, stages.len(), stage);
            let elapsed_ms = started.elapsed().as_millis() as u64;
            let remaining_ms = fv.spec.timeout_ms.saturating_sub(elapsed_ms);
            // Ends the pipeline at this stage, with its log and the reads made so far.
            macro_rules! end {
                ($status:expr, $exit_code:expr, $error:expr, $log:expr) => {
                    return (
                        TaskResult {
                            status: $status,
                            node: self.id,
                            exit_code: $exit_code,
                            output: Vec::new(),
                            log: tail($log, LOG_BYTES_MAX),
                            error: Some(truncate_text($error)),
                            warm: false,
                            wall_ms: started.elapsed().as_millis() as u64,
                            cpu_ms: cpu.as_millis() as u64,
                            peak_memory_bytes,
                        },
                        bounded_reads(reads),
                    )
                };
            }
            if remaining_ms == 0 {
                end!(
                    RunStatus::TimedOut,
                    None,
                    format!("{label} timed out: the function's timeout passed before it started"),
                    &[]
                );
            }
            let (spec, _socket) = match self
                .stage_sandbox_spec(node, fv, index, code.dir(), remaining_ms)
                .await
            {
                Ok(s) => s,
                Err(e) => end!(
                    RunStatus::Failed,
                    None,
                    format!("{label}: cannot prepare the sandbox: {e}"),
                    &[]
                ),
            };
            let stdout_bytes_max = spec.limits.stdout_bytes_max;
            let o = match skiff_sandbox::run(&spec, &stage.entry, &input).await {
                Ok(o) => o,
                Err(e) => end!(
                    RunStatus::Failed,
                    None,
                    format!("{label}: sandbox error: {e}"),
                    &[]
                ),
            };
            let stage_reads = self.take_reads(fv, Some(index), o.host_uid).await;
            reads.extend(stage_reads);
            cpu += o.cpu;
            peak_memory_bytes = peak_memory_bytes.max(o.peak_memory_bytes);
            let last = index + 1 == stages.len();
            let failure = match o.status {
                // A cut intermediate output would hand the next stage a different input than
                // the one this stage produced; the last stage's fails the task like a plain
                // function's (below).
                ExitStatus::Exited(0) if o.stdout_truncated && !last => Some((
                    RunStatus::Failed,
                    Some(0),
                    format!(
                        "{label} failed: its output is over its limit of {stdout_bytes_max} bytes"
                    ),
                )),
                ExitStatus::Exited(0) => None,
                ExitStatus::Exited(c) => Some((
                    RunStatus::Failed,
                    Some(c),
                    format!("{label} failed: exit status {c}"),
                )),
                ExitStatus::Signaled(sig) => Some((
                    RunStatus::Failed,
                    None,
                    format!("{label} failed: killed by signal {sig}"),
                )),
                ExitStatus::TimedOut => {
                    Some((RunStatus::TimedOut, None, format!("{label} timed out")))
                }
                ExitStatus::OutOfMemory => Some((
                    RunStatus::Failed,
                    None,
                    format!("{label} failed: out of memory"),
                )),
            };
            if let Some((status, exit_code, error)) = failure {
                end!(status, exit_code, error, &o.stderr);
            }
            if !o.stderr.is_empty() {
                log.extend_from_slice(format!("[{label}]\n").as_bytes());
                log.extend_from_slice(&tail(&o.stderr, STAGE_LOG_BYTES_MAX));
                if !log.ends_with(b"\n") {
                    log.push(b'\n');
                }
            }
            input = o.stdout;
            if last {
                cut = o.stdout_truncated;
            }
        }
        let over = output_over_limit(input.len(), cut);
        input.truncate(OUTPUT_BYTES_MAX);
        let result = TaskResult {
            status: if over.is_some() {
                RunStatus::Failed
            } else {
                RunStatus::Succeeded
            },
            node: self.id,
            exit_code: Some(0),
            output: input,
            log: tail(&log, LOG_BYTES_MAX),
            error: over,
            warm: false,
            wall_ms: started.elapsed().as_millis() as u64,
            cpu_ms: cpu.as_millis() as u64,
            peak_memory_bytes,
        };
        (result, bounded_reads(reads))
    }
}
