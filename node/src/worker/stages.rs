//! A staged function: its stages run one after the other, each in a fresh sandbox with its
//! own policy, environment and data grant, stdout piped into the next stage's stdin.
//!
//! Invariants: a stage starts only within what is left of the function's timeout; a cut
//! intermediate output fails the pipeline rather than feed the next stage a different input;
//! the log keeps at most [`STAGE_LOG_BYTES_MAX`] of each stage.

use std::path::Path;
use std::time::{Duration, Instant};

use skiff_client::api::{FunctionVersion, NodeId, RunStatus, Task, TaskResult};
use skiff_raft_store::functions::{LOG_BYTES_MAX, OUTPUT_BYTES_MAX, STAGES_MAX};
use skiff_sandbox::{ExitStatus, RunOutcome};

use super::output::{bounded_reads, output_over_limit, tail, truncate_text};
use super::Worker;
use crate::policy::stage_label;
use crate::replica::Replica;

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
        node: &Replica,
        task: &Task,
        fv: &FunctionVersion,
    ) -> (TaskResult, Vec<(String, u64)>) {
        let mut pipeline = Pipeline::new();
        let code = match self.code_dir(node, &fv.spec.code_digest).await {
            Ok(c) => c,
            Err(e) => {
                return (
                    self.failed(format!("cannot prepare the sandbox: {e}")),
                    Vec::new(),
                )
            }
        };
        let mut input = task.payload.clone();
        // Whether the last stage's output was cut by its sandbox.
        let mut cut = false;
        for index in 0..fv.spec.stages.len() {
            let o = match self
                .run_stage(node, fv, index, code.dir(), &input, &mut pipeline)
                .await
            {
                Ok(o) => o,
                Err(end) => return pipeline.end(self.id, end),
            };
            input = o.stdout;
            cut = o.stdout_truncated;
        }
        pipeline.finish(self.id, input, cut)
    }

    /// Runs stage `index` on `input` within what is left of the function's timeout, adding
    /// its reads, CPU time, memory and stderr to `pipeline`; its outcome if it succeeded, or
    /// how the pipeline ends at it.
    async fn run_stage(
        &self,
        node: &Replica,
        fv: &FunctionVersion,
        index: usize,
        code: &Path,
        input: &[u8],
        pipeline: &mut Pipeline,
    ) -> Result<RunOutcome, StageEnd> {
        let stages = &fv.spec.stages;
        let stage = &stages[index];
        let label = stage_label(index, stages.len(), stage);
        let elapsed_ms = pipeline.started.elapsed().as_millis() as u64;
        let remaining_ms = fv.spec.timeout_ms.saturating_sub(elapsed_ms);
        if remaining_ms == 0 {
            return Err(StageEnd::before_run(
                RunStatus::TimedOut,
                format!("{label} timed out: the function's timeout passed before it started"),
            ));
        }
        // The socket stays bound until the stage's reads are taken.
        let (spec, _socket) = self
            .stage_sandbox_spec(node, fv, index, code, remaining_ms)
            .await
            .map_err(|e| {
                StageEnd::before_run(
                    RunStatus::Failed,
                    format!("{label}: cannot prepare the sandbox: {e}"),
                )
            })?;
        let stdout_bytes_max = spec.limits.stdout_bytes_max;
        let o = skiff_sandbox::run(&spec, &stage.entry, input)
            .await
            .map_err(|e| {
                StageEnd::before_run(RunStatus::Failed, format!("{label}: sandbox error: {e}"))
            })?;
        let stage_reads = self.take_reads(fv, Some(index), o.host_uid).await;
        pipeline.reads.extend(stage_reads);
        pipeline.cpu += o.cpu;
        pipeline.peak_memory_bytes = pipeline.peak_memory_bytes.max(o.peak_memory_bytes);
        let last = index + 1 == stages.len();
        if let Some((status, exit_code, error)) = stage_failure(&label, &o, last, stdout_bytes_max)
        {
            return Err(StageEnd {
                status,
                exit_code,
                error,
                log: o.stderr,
            });
        }
        pipeline.keep_log(&label, &o.stderr);
        Ok(o)
    }
}

/// What a pipeline has gathered so far: when it started, the reads of its stages, the
/// stderr they left, and their CPU time and peak memory.
struct Pipeline {
    started: Instant,
    reads: Vec<(String, u64)>,
    log: Vec<u8>,
    cpu: Duration,
    peak_memory_bytes: u64,
}

/// How a pipeline ends at a stage that did not succeed: the task's status, exit code and
/// error, and that stage's stderr as the log.
struct StageEnd {
    status: RunStatus,
    exit_code: Option<i32>,
    error: String,
    log: Vec<u8>,
}

impl StageEnd {
    /// The end at a stage that never ran: no exit code, no log.
    fn before_run(status: RunStatus, error: String) -> Self {
        StageEnd {
            status,
            exit_code: None,
            error,
            log: Vec::new(),
        }
    }
}

impl Pipeline {
    fn new() -> Self {
        Pipeline {
            started: Instant::now(),
            reads: Vec::new(),
            log: Vec::new(),
            cpu: Duration::ZERO,
            peak_memory_bytes: 0,
        }
    }

    /// Keeps the tail of a successful stage's stderr in the pipeline's log, under its label.
    fn keep_log(&mut self, label: &str, stderr: &[u8]) {
        if stderr.is_empty() {
            return;
        }
        self.log
            .extend_from_slice(format!("[{label}]\n").as_bytes());
        self.log
            .extend_from_slice(&tail(stderr, STAGE_LOG_BYTES_MAX));
        if !self.log.ends_with(b"\n") {
            self.log.push(b'\n');
        }
    }

    /// The result of a pipeline that ended at a stage, with the reads made so far.
    fn end(self, node: NodeId, end: StageEnd) -> (TaskResult, Vec<(String, u64)>) {
        let result = TaskResult {
            status: end.status,
            node,
            exit_code: end.exit_code,
            output: Vec::new(),
            log: tail(&end.log, LOG_BYTES_MAX),
            error: Some(truncate_text(end.error)),
            warm: false,
            wall_ms: self.started.elapsed().as_millis() as u64,
            cpu_ms: self.cpu.as_millis() as u64,
            peak_memory_bytes: self.peak_memory_bytes,
        };
        (result, bounded_reads(self.reads))
    }

    /// The result of a pipeline whose every stage succeeded: the last stage's output (`cut`
    /// if its sandbox cut it), failed if that output is over a limit.
    fn finish(
        self,
        node: NodeId,
        mut output: Vec<u8>,
        cut: bool,
    ) -> (TaskResult, Vec<(String, u64)>) {
        let over = output_over_limit(output.len(), cut);
        output.truncate(OUTPUT_BYTES_MAX);
        let result = TaskResult {
            status: if over.is_some() {
                RunStatus::Failed
            } else {
                RunStatus::Succeeded
            },
            node,
            exit_code: Some(0),
            output,
            log: tail(&self.log, LOG_BYTES_MAX),
            error: over,
            warm: false,
            wall_ms: self.started.elapsed().as_millis() as u64,
            cpu_ms: self.cpu.as_millis() as u64,
            peak_memory_bytes: self.peak_memory_bytes,
        };
        (result, bounded_reads(self.reads))
    }
}

/// How a stage that ran ends the pipeline, if it does: the task's status, exit code and
/// error.
fn stage_failure(
    label: &str,
    o: &RunOutcome,
    last: bool,
    stdout_bytes_max: u64,
) -> Option<(RunStatus, Option<i32>, String)> {
    match o.status {
        // A cut intermediate output would hand the next stage a different input than the one
        // this stage produced; the last stage's fails the task like a plain function's (in
        // `Pipeline::finish`).
        ExitStatus::Exited(0) if o.stdout_truncated && !last => Some((
            RunStatus::Failed,
            Some(0),
            format!("{label} failed: its output is over its limit of {stdout_bytes_max} bytes"),
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
        ExitStatus::TimedOut => Some((RunStatus::TimedOut, None, format!("{label} timed out"))),
        ExitStatus::OutOfMemory => Some((
            RunStatus::Failed,
            None,
            format!("{label} failed: out of memory"),
        )),
    }
}
