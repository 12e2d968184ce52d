//! The worker's background loops: heartbeats (with warm-pool reports and min-warm upkeep)
//! and reconciliation of the tasks this node's applied state assigns to it.

use std::time::Duration;

use skiff_client::api::{ClientCommand, Command, FunctionVersion, Task, TaskState};
use skiff_raft_store::model::Principal;

use super::report::report;
use super::run::run_task;
use super::{lock, Worker};
use crate::server::Node;

/// Background loops of the worker: heartbeats (with warm-pool reports and min-warm
/// upkeep) and reconciliation with the applied state. They end when `node` is dropped
/// elsewhere and the Raft handle stops.
pub fn start_loops(node: &Node) {
    if !node.0.worker.settings.enabled {
        return;
    }
    let n = node.clone();
    tokio::spawn(async move { heartbeat_loop(n).await });
    let n = node.clone();
    tokio::spawn(async move { reconcile_loop(n).await });
}

async fn heartbeat_loop(node: Node) {
    let w = node.0.worker.clone();
    let interval = Duration::from_millis(w.settings.heartbeat_interval_ms);
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = w.pool_changed.notified() => {
                // Batch the changes of a burst into one report.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if node.stopping() {
            return;
        }
        w.sweep(&node).await;
        let hb = w.heartbeat();
        let command = ClientCommand {
            request_id: w.next_request_id(),
            command: Command::Heartbeat(Box::new(hb)),
        };
        if let Err(e) = node.write(Principal::Node, vec![command]).await {
            tracing::debug!(error = %e, "heartbeat not recorded");
        }
        keep_min_warm(&node).await;
    }
}

/// Pre-warms this node's share of every function's min-warm.
async fn keep_min_warm(node: &Node) {
    let w = node.0.worker.clone();
    let wanted: Vec<FunctionVersion> = node.0.store.read(|sm| {
        sm.sched()
            .functions()
            .filter_map(|f| f.latest().cloned())
            .filter(|v| v.spec.min_warm > 0)
            .collect()
    });
    for fv in wanted {
        let target = w.warm_target(node, &fv, false);
        if target == 0 || w.pool.idle_count(&Worker::key(&fv)) >= target {
            continue;
        }
        match w.sandbox_spec(node, &fv).await {
            Ok((spec, leases)) => w.replenish(spec, &leases, &fv, target),
            Err(error) => tracing::warn!(function = %fv.spec.name, %error, "cannot pre-warm"),
        }
    }
}

/// A task this node should run, with its function version if that still exists.
type Pending = (Task, Option<FunctionVersion>);

async fn reconcile_loop(node: Node) {
    let w = node.0.worker.clone();
    let mut metrics = node.0.raft.metrics();
    loop {
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if node.stopping() {
            return;
        }
        let todo: Vec<Pending> = node.0.store.read(|sm| {
            let sched = sm.sched();
            let mut started = lock(&w.started);
            // Forget a started (task, token) only once this node's state has moved past it:
            // finished, reassigned, or purged. A task dispatched before this node applied its
            // submission is not in the state yet and must stay claimed.
            started.retain(|id, token| match sched.task(*id) {
                Some(t) => {
                    t.token == *token
                        && t.node == Some(w.id)
                        && matches!(t.state, TaskState::Assigned | TaskState::Running)
                }
                None => *id > sched.last_task_id(),
            });
            sched
                .tasks_on(w.id)
                .into_iter()
                .filter(|t| started.get(&t.id) != Some(&t.token))
                .filter(|t| matches!(t.state, TaskState::Assigned | TaskState::Running))
                .map(|t| {
                    let fv = sched
                        .function(&t.function)
                        .and_then(|f| f.version(t.version))
                        .cloned();
                    (t.clone(), fv)
                })
                .collect()
        });
        for (task, fv) in todo {
            let n = node.clone();
            match fv {
                Some(fv) => {
                    tokio::spawn(run_task(n, task, fv));
                }
                None => {
                    if w.claim(task.id, task.token) {
                        let r = w.failed(format!(
                            "function {} version {} no longer exists",
                            task.function, task.version
                        ));
                        tokio::spawn(async move {
                            report(&n, task.id, task.token, r, Vec::new()).await
                        });
                    }
                }
            }
        }
        // Bound the rate of scans under a stream of applies.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
