//! The worker's background loops: heartbeats (with warm-pool reports and min-warm upkeep)
//! and reconciliation of the tasks this node's applied state assigns to it. Both are tasks of
//! the node's background owner and end on its shutdown signal, as do the runs and reports
//! they start.

use std::sync::Arc;
use std::time::Duration;

use skiff_client::api::{ClientCommand, Command, FunctionVersion, Task, TaskState};
use skiff_raft_store::model::Principal;

use super::report::report;
use super::run::run_task;
use super::{lock, Worker};
use crate::background::Shutdown;
use crate::replica::Replica;

/// How long a heartbeat waits after a pool change, so a burst of changes makes one report.
const POOL_CHANGE_BATCH: Duration = Duration::from_millis(50);
/// How often the reconcile loop scans when nothing is applied.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// Pause after each scan: bounds the rate of scans under a stream of applies.
const RECONCILE_PAUSE: Duration = Duration::from_millis(2);

/// Starts the background loops of the worker, as tasks of its background owner: heartbeats
/// (with warm-pool reports and min-warm upkeep) and reconciliation with the applied state.
pub fn start_loops(node: &Replica, worker: &Arc<Worker>) {
    if !worker.settings.enabled {
        return;
    }
    let background = &worker.background;
    background.spawn(heartbeat_loop(
        node.clone(),
        worker.clone(),
        background.shutdown(),
    ));
    background.spawn(reconcile_loop(
        node.clone(),
        worker.clone(),
        background.shutdown(),
    ));
}

async fn heartbeat_loop(node: Replica, w: Arc<Worker>, mut shutdown: Shutdown) {
    let interval = Duration::from_millis(w.settings.heartbeat_interval_ms);
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = w.pool_changed.notified() => {
                // Batch the changes of a burst into one report.
                tokio::time::sleep(POOL_CHANGE_BATCH).await;
            }
            () = shutdown.wait() => return,
        }
        tokio::select! {
            () = heartbeat(&node, &w) => {}
            () = shutdown.wait() => return,
        }
    }
}

/// One round of the heartbeat loop: release what the state no longer needs, report, and
/// pre-warm.
async fn heartbeat(node: &Replica, w: &Arc<Worker>) {
    w.sweep(node).await;
    let hb = w.heartbeat();
    let command = ClientCommand {
        request_id: node.next_request_id(),
        command: Command::Heartbeat(Box::new(hb)),
    };
    if let Err(e) = node.write(Principal::Node, vec![command]).await {
        tracing::debug!(error = %e, "heartbeat not recorded");
    }
    keep_min_warm(node, w).await;
}

/// Pre-warms this node's share of every function's min-warm.
async fn keep_min_warm(node: &Replica, w: &Arc<Worker>) {
    let wanted: Vec<FunctionVersion> = node.state(|sm| {
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

async fn reconcile_loop(node: Replica, w: Arc<Worker>, mut shutdown: Shutdown) {
    let mut changes = node.changes();
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            () = shutdown.wait() => return,
        }
        let todo: Vec<Pending> = node.state(|sm| {
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
                    w.background
                        .spawn_until_shutdown(run_task(n, w.clone(), task, fv));
                }
                None => {
                    if w.claim(task.id, task.token) {
                        let r = w.failed(format!(
                            "function {} version {} no longer exists",
                            task.function, task.version
                        ));
                        w.background.spawn_until_shutdown(async move {
                            report(&n, task.id, task.token, r, Vec::new()).await
                        });
                    }
                }
            }
        }
        tokio::time::sleep(RECONCILE_PAUSE).await;
    }
}
