//! The run path of one task: claimed once per (task, token), a slot taken, the sandbox
//! acquired, the function run in exec or serve mode, and the result reported.
//!
//! Invariant: a run never fails as a call; every error becomes a failed task result, so
//! every claimed task gets a completion.

use std::sync::Arc;
use std::time::Instant;

use skiff_client::api::{FnMode, FunctionVersion, RunStatus, Task, TaskResult};
use skiff_raft_store::functions::{LOG_BYTES_MAX, OUTPUT_BYTES_MAX};
use skiff_sandbox::{PoolKey, SandboxSpec, WarmSandbox};

use super::leases::Leases;
use super::output::{output_over_limit, tail, truncate_text};
use super::report::report;
use super::{lock, Worker};
use crate::replica::Replica;

impl Worker {
    /// Runs one attempt and returns its result (never fails: errors become failed results)
    /// and the keys it read through the data service with the versions it saw.
    pub(super) async fn execute(
        self: &Arc<Self>,
        node: &Replica,
        task: &Task,
        fv: &FunctionVersion,
    ) -> (TaskResult, Vec<(String, u64)>) {
        if fv.spec.is_staged() {
            return self.execute_stages(node, task, fv).await;
        }
        let (spec, leases) = match self.sandbox_spec(node, fv).await {
            Ok(s) => s,
            Err(e) => {
                return (
                    self.failed(format!("cannot prepare the sandbox: {e}")),
                    Vec::new(),
                )
            }
        };
        let key = Self::key(fv);
        let argv = fv.spec.entry.clone();
        let started = Instant::now();
        let result = match fv.spec.mode {
            FnMode::Exec => {
                let warm = self.take_warm(&key).await;
                let was_warm = warm.is_some();
                let outcome = match warm {
                    Some(WarmSandbox::Exec(sb)) => sb.run(&argv, &task.payload).await,
                    Some(WarmSandbox::Serve(sb)) => {
                        // A serve sandbox under an exec key cannot happen; discard it.
                        drop(tokio::task::spawn_blocking(move || sb.shutdown()));
                        skiff_sandbox::run(&spec, &argv, &task.payload).await
                    }
                    None => skiff_sandbox::run(&spec, &argv, &task.payload).await,
                };
                let uid = outcome.as_ref().ok().map(|o| o.host_uid);
                (self.exec_result(outcome, was_warm, started), uid)
            }
            FnMode::Serve => self.serve(&spec, &leases, key, &argv, task, started).await,
        };
        let (result, uid) = result;
        let reads = match uid {
            Some(uid) => self.take_reads(fv, None, uid).await,
            None => Vec::new(),
        };
        let target = self.warm_target(node, fv, true);
        self.replenish(spec, &leases, fv, target);
        (result, reads)
    }

    async fn serve(
        &self,
        spec: &SandboxSpec,
        leases: &Leases,
        key: PoolKey,
        argv: &[String],
        task: &Task,
        started: Instant,
    ) -> (TaskResult, Option<u32>) {
        if task.payload.contains(&b'\n') {
            return (
                self.failed("a serve-mode payload must be one line (compact JSON)".into()),
                None,
            );
        }
        let taken = self.claim_serve(&key).await;
        let result = self
            .serve_on(spec, leases, key.clone(), argv, task, started, taken)
            .await;
        if let Some(n) = lock(&self.busy).get_mut(&key) {
            *n = n.saturating_sub(1);
        }
        // A sandbox of this key is back in the pool (or gone): waiting requests look again.
        self.warmed.notify_waiters();
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve_on(
        &self,
        spec: &SandboxSpec,
        leases: &Leases,
        key: PoolKey,
        argv: &[String],
        task: &Task,
        started: Instant,
        taken: Option<WarmSandbox>,
    ) -> (TaskResult, Option<u32>) {
        let (sandbox, warm) = match taken {
            Some(WarmSandbox::Serve(sb)) => (sb, true),
            other => {
                if let Some(WarmSandbox::Exec(sb)) = other {
                    drop(sb);
                }
                let pool = self.pool.clone();
                let (spec, argv, k) = (spec.clone(), argv.to_vec(), key.clone());
                match tokio::task::spawn_blocking(move || pool.start_serve(k, &spec, &argv)).await {
                    Ok(Ok(sb)) => (sb, false),
                    Ok(Err(e)) => {
                        return (self.failed(format!("cannot start the function: {e}")), None)
                    }
                    Err(e) => {
                        return (self.failed(format!("cannot start the function: {e}")), None)
                    }
                }
            }
        };
        let memory = sandbox.memory_bytes();
        let uid = Some(sandbox.host_uid());
        let (sandbox, response) = sandbox.request(task.payload.clone()).await;
        let log = tail(sandbox.log(), LOG_BYTES_MAX);
        if sandbox.is_alive() {
            self.hold_for_warm(&key, leases.clone());
            self.pool.release(key, sandbox);
            self.pool_changed.notify_one();
        } else {
            drop(tokio::task::spawn_blocking(move || sandbox.shutdown()));
        }
        let wall_ms = started.elapsed().as_millis() as u64;
        let result = match response {
            Ok(mut line) => {
                // The sandbox refuses a line over the stdout limit; the result's bound may be
                // smaller.
                let over = output_over_limit(line.len(), false);
                line.truncate(OUTPUT_BYTES_MAX);
                TaskResult {
                    status: if over.is_some() {
                        RunStatus::Failed
                    } else {
                        RunStatus::Succeeded
                    },
                    node: self.id,
                    exit_code: None,
                    output: line,
                    log,
                    error: over,
                    warm,
                    wall_ms,
                    cpu_ms: 0,
                    peak_memory_bytes: memory,
                }
            }
            Err(e) => {
                let text = e.to_string();
                let status = if text.contains("timed out") {
                    RunStatus::TimedOut
                } else {
                    RunStatus::Failed
                };
                TaskResult {
                    status,
                    node: self.id,
                    exit_code: None,
                    output: Vec::new(),
                    log,
                    error: Some(truncate_text(text)),
                    warm,
                    wall_ms,
                    cpu_ms: 0,
                    peak_memory_bytes: memory,
                }
            }
        };
        (result, uid)
    }
}

/// Runs `task` of `fv` on this node if this process has not started it under its token yet,
/// then reports the result through the log.
pub async fn run_task(node: Replica, w: Arc<Worker>, task: Task, fv: FunctionVersion) {
    if !w.claim(task.id, task.token) {
        return;
    }
    let Ok(_permit) = w.slots.clone().acquire_owned().await else {
        return;
    };
    let request = task
        .request_id
        .map_or_else(|| "-".to_string(), |r| r.to_string());
    tracing::debug!(
        request_id = %request,
        task = task.id,
        token = task.token,
        function = %fv.spec.name,
        version = fv.version,
        "sandbox run starts"
    );
    let (result, reads) = w.execute(&node, &task, &fv).await;
    tracing::debug!(
        request_id = %request,
        task = task.id,
        status = ?result.status,
        warm = result.warm,
        wall_ms = result.wall_ms,
        "sandbox run ends"
    );
    node.metrics()
        .invocation(&fv.spec.name, result.status, result.warm, result.wall_ms);
    report(&node, task.id, task.token, result, reads).await;
}
