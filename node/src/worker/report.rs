//! What the worker tells the cluster through the log: its heartbeat (slots, memory, warm
//! sandboxes, running tasks) and the completion of each run.
//!
//! Invariants: a heartbeat carries at most `HEARTBEAT_ENTRIES_MAX` entries per list; a
//! completion is retried (same request id, so applied once) for at most
//! [`REPORT_DEADLINE`], after which the task is left to be reassigned.

use std::time::{Duration, Instant};

use skiff_client::api::{
    ApiError, ClientCommand, Command, CommandResult, TaskId, TaskResult, WarmReport,
};
use skiff_raft_store::functions::Heartbeat;
use skiff_raft_store::model::Principal;

use super::{lock, Worker};
use crate::replica::Replica;

/// How long a worker keeps retrying to report a completion.
const REPORT_DEADLINE: Duration = Duration::from_secs(120);
/// The first pause between attempts to report a completion; it doubles up to
/// [`REPORT_BACKOFF_MAX`].
const REPORT_BACKOFF_FIRST: Duration = Duration::from_millis(20);
/// The longest pause between attempts to report a completion.
const REPORT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl Worker {
    /// This node's heartbeat as of now.
    pub(super) fn heartbeat(&self) -> Heartbeat {
        self.pool.expire_idle();
        let stats = self.pool.stats();
        let warm = self
            .pool
            .idle_by_key()
            .into_iter()
            .map(|(k, idle)| WarmReport {
                function: k.function,
                version: k.version,
                idle: u32::try_from(idle).unwrap_or(u32::MAX),
            })
            .take(skiff_raft_store::functions::HEARTBEAT_ENTRIES_MAX)
            .collect();
        let running = lock(&self.started)
            .iter()
            .map(|(t, k)| (*t, *k))
            .take(skiff_raft_store::functions::HEARTBEAT_ENTRIES_MAX)
            .collect();
        Heartbeat {
            node: self.id,
            slots: self.settings.slots,
            memory_budget_bytes: self.settings.memory_budget_bytes,
            warm_memory_bytes: stats.memory_bytes,
            warm,
            running,
        }
    }
}

/// Proposes the completion, retrying while the cluster has no leader.
pub(super) async fn report(
    node: &Replica,
    task: TaskId,
    token: u64,
    result: TaskResult,
    reads: Vec<(String, u64)>,
) {
    let command = ClientCommand {
        request_id: node.next_request_id(),
        command: Command::Complete {
            task,
            token,
            result: Box::new(result),
            reads,
        },
    };
    let deadline = Instant::now() + REPORT_DEADLINE;
    let mut backoff = REPORT_BACKOFF_FIRST;
    loop {
        match node.write(Principal::Node, vec![command.clone()]).await {
            Ok(results) => {
                if let Some(CommandResult::Rejected { reason }) = results.first() {
                    tracing::info!(task, token, %reason, "completion refused");
                }
                return;
            }
            Err(e) if retryable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(REPORT_BACKOFF_MAX);
            }
            Err(e) => {
                tracing::warn!(task, token, error = %e, "cannot report a completion; the task will be reassigned");
                return;
            }
        }
    }
}

fn retryable(e: &ApiError) -> bool {
    e.is_retryable()
}
