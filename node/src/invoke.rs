//! The invocation path on the node that receives it.
//!
//! client → any node's `invoke` → (forwarded one hop to the leader) → a `Submit` command
//! through the batcher (placement is decided in apply) → the leader dispatches the task to
//! its node (fast path) → the worker runs it and proposes `Complete` → for a sync call, the
//! leader answers when its applied state shows the task finished.
//!
//! A retried invocation carries the same request id, so it finds the task the first try
//! made (the state machine's deduplication answers with the stored submission) and waits for
//! that task: one task per invocation, whatever the retries.

use std::sync::Arc;
use std::time::Duration;

use skiff_client::api::{
    ApiError, CacheOutcome, ClientCommand, Command, CommandResult, FunctionVersion, InvokeRequest,
    Task, TaskId, TaskState,
};
use skiff_raft_store::functions::{
    validate_function_name, Dependency, IdempotencyInput, PAYLOAD_BYTES_MAX, TIMEOUT_MS_MAX,
};

use skiff_raft_store::model::Principal;

use crate::background::Background;
use crate::peer;
use crate::replica::{Replica, WaitEnded};

/// Added to a function's timeout for the time a sync caller waits: queueing, start, report.
const WAIT_MARGIN: Duration = Duration::from_secs(30);

/// Starts a task on this node's worker without waiting for it (the daemon makes it: a run
/// spawned into the node's background owner).
pub type RunLocal = Arc<dyn Fn(Task, FunctionVersion) + Send + Sync>;

/// The invocation path of one node: its replica, and how to start a task on its own worker.
#[derive(Clone)]
pub struct Invoker {
    replica: Replica,
    run_local: RunLocal,
    /// Whether this node runs tasks (a task the leader dispatches here is run only then).
    worker_enabled: bool,
    background: Background,
}

impl Invoker {
    pub fn new(
        replica: Replica,
        run_local: RunLocal,
        worker_enabled: bool,
        background: Background,
    ) -> Invoker {
        Invoker {
            replica,
            run_local,
            worker_enabled,
            background,
        }
    }

    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// Runs a task the leader dispatched to this node, if this node runs tasks.
    pub fn run_dispatched(&self, task: Task, function: FunctionVersion) {
        if task.node == Some(self.replica.id()) && self.worker_enabled {
            (self.run_local)(task, function);
        }
    }

    /// Submits an invocation (through the leader) and, if asked, waits for its result.
    /// `principal` is the caller the receiving node authenticated: the request id is the
    /// caller's, deduplicated among its own commands only.
    pub async fn invoke(&self, principal: Principal, req: InvokeRequest) -> Result<Task, ApiError> {
        if let Err(e) = validate_function_name(&req.function) {
            return Err(ApiError::InvalidArgument(e));
        }
        if req.payload.len() > PAYLOAD_BYTES_MAX {
            return Err(ApiError::InvalidArgument(format!(
                "payload is {} bytes, the limit is {PAYLOAD_BYTES_MAX}",
                req.payload.len()
            )));
        }
        let mut req = req;
        req.files = self.hash_file_dependencies(&req).await?;
        let replica = &self.replica;
        let (leader, addr) = replica.leader().await?;
        if leader == replica.id() {
            return self.invoke_on_leader(principal, req).await;
        }
        let p = replica.peer(leader, &addr).await?;
        let wait = if req.wait {
            Duration::from_millis(TIMEOUT_MS_MAX) + WAIT_MARGIN
        } else {
            replica.timeout()
        };
        match p.forward_invoke(peer::deadline(wait), principal, req).await {
            Ok(r) => r,
            Err(e) => Err(replica.forward_failed(leader, &addr, e).await),
        }
    }

    /// Hashes the files an idempotent function depends on, as this node sees them: beneath
    /// this node's sources roots only, regular files only, from the hash cache when unchanged.
    async fn hash_file_dependencies(
        &self,
        req: &InvokeRequest,
    ) -> Result<Vec<(String, String)>, ApiError> {
        let paths: Vec<String> = self.replica.state(|sm| {
            let Some(f) = sm.sched().function(&req.function) else {
                return Vec::new();
            };
            let v = match req.version {
                Some(v) => f.version(v),
                None => f.latest(),
            };
            v.and_then(|v| v.spec.idempotency.as_ref())
                .map(|i| {
                    i.dependencies
                        .iter()
                        .filter_map(|d| match d {
                            Dependency::File(p) => Some(p.clone()),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        let mut out = Vec::with_capacity(paths.len());
        for path in paths {
            let (p, sources) = (path.clone(), self.replica.sources().clone());
            let hash = tokio::task::spawn_blocking(move || sources.file_hash(&p))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(|e| ApiError::FailedPrecondition(format!("file dependency: {e}")))?;
            out.push((path, hash));
        }
        Ok(out)
    }

    /// The leader's side of [`Invoker::invoke`].
    pub async fn invoke_on_leader(
        &self,
        principal: Principal,
        req: InvokeRequest,
    ) -> Result<Task, ApiError> {
        if let Some(hit) = self.cached_answer(&req).await {
            self.replica.metrics().idempotency(true);
            return Ok(hit);
        }
        let command = ClientCommand {
            request_id: req.request_id,
            command: Command::Submit {
                function: req.function.clone(),
                version: req.version,
                payload: req.payload,
                sync: req.wait,
                idempotency: Some(Box::new(IdempotencyInput {
                    key: req.idempotency_key,
                    tokens: req.tokens,
                    files: req.files,
                })),
            },
        };
        let result = self
            .replica
            .batcher()
            .submit(principal, vec![command])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::Internal("a submission got no result".into()))?;
        let (id, cache) = match result {
            CommandResult::Submitted { task, cache, .. } => {
                if let Some(c) = &cache {
                    self.replica
                        .metrics()
                        .idempotency(matches!(c, CacheOutcome::Hit { .. }));
                }
                (task, cache)
            }
            CommandResult::Throttled { reason } => {
                self.replica.metrics().throttled_invocation(&req.function);
                return Err(ApiError::Throttled(reason));
            }
            CommandResult::Rejected { reason } => {
                let exists = self.replica.state(|sm| {
                    sm.sched()
                        .function(&req.function)
                        .is_some_and(|f| req.version.is_none_or(|v| f.version(v).is_some()))
                });
                return Err(if exists {
                    ApiError::FailedPrecondition(reason)
                } else {
                    ApiError::NotFound(reason)
                });
            }
            CommandResult::Invalid(e) => return Err(ApiError::InvalidArgument(e.to_string())),
            other => {
                return Err(ApiError::Internal(format!(
                    "a submission was answered with {other:?}"
                )))
            }
        };
        tracing::debug!(
            request_id = %req.request_id,
            task = id,
            function = %req.function,
            cache = ?cache,
            "invocation submitted"
        );
        self.dispatch(id).await;
        let task = self.local_task(id)?;
        // A joined invocation reports that it joined, not the first caller's miss.
        let with_cache = |mut t: Task| {
            if cache.is_some() {
                t.cache = cache.clone();
            }
            t
        };
        if !req.wait || task.state.is_finished() {
            return Ok(with_cache(task));
        }
        let wait = Duration::from_millis(task.timeout_ms) + WAIT_MARGIN;
        self.wait_task(id, wait).await.map(with_cache)
    }

    /// A hit answered without a log entry: after confirming leadership (so this state holds
    /// everything committed before the call), the ledger already has a reusable result.
    /// The answer is the recorded run's task with this call's payload and a `Hit` marker.
    async fn cached_answer(&self, req: &InvokeRequest) -> Option<Task> {
        let idempotent = self.replica.state(|sm| {
            sm.sched()
                .function(&req.function)
                .and_then(|f| match req.version {
                    Some(v) => f.version(v),
                    None => f.latest(),
                })
                .is_some_and(|v| v.spec.idempotency.is_some())
        });
        if !idempotent || self.replica.confirm_leadership().await.is_err() {
            return None;
        }
        let input = IdempotencyInput {
            key: req.idempotency_key.clone(),
            tokens: req.tokens.clone(),
            files: req.files.clone(),
        };
        self.replica.state(|sm| {
            let e = sm.sched().cached(
                sm.last_time_ms(),
                &req.function,
                req.version,
                &req.payload,
                Some(&input),
                sm.kv_entries(),
            )?;
            let source = sm.sched().task(e.task).cloned();
            let mut t = source.unwrap_or_else(|| Task {
                id: e.task,
                function: e.function.clone(),
                version: e.version,
                payload: Vec::new(),
                sync: req.wait,
                state: if e.succeeded {
                    TaskState::Succeeded
                } else {
                    TaskState::Failed
                },
                attempts: 0,
                failures: 0,
                node: None,
                token: 0,
                submitted_ms: e.recorded_ms,
                assigned_ms: None,
                started_ms: None,
                finished_ms: Some(e.recorded_ms),
                not_before_ms: 0,
                queue_seq: 0,
                memory_bytes: 0,
                timeout_ms: 0,
                result: None,
                dead_letter: false,
                cache: None,
                ledger_key: None,
                request_id: None,
            });
            t.result = e.result.clone();
            t.payload = req.payload.clone();
            t.cache = Some(CacheOutcome::Hit {
                source_task: e.task,
            });
            Some(t)
        })
    }

    fn local_task(&self, id: TaskId) -> Result<Task, ApiError> {
        self.replica
            .state(|sm| sm.sched().task(id).cloned())
            .ok_or_else(|| ApiError::NotFound(format!("task {id} no longer exists (purged)")))
    }

    /// Sends an assigned task straight to its node (the fast path; the node's reconcile
    /// loop is the slow path). Never waits for the run.
    pub async fn dispatch(&self, id: TaskId) {
        let found = self.replica.state(|sm| {
            let task = sm.sched().task(id)?;
            if task.state != TaskState::Assigned {
                return None;
            }
            let fv = sm
                .sched()
                .function(&task.function)?
                .version(task.version)?
                .clone();
            Some((task.clone(), fv))
        });
        let Some((task, fv)) = found else {
            return;
        };
        let Some(node_id) = task.node else {
            return;
        };
        if node_id == self.replica.id() {
            (self.run_local)(task, fv);
            return;
        }
        let Some(addr) = self.replica.member_addr(node_id) else {
            // A worker outside the membership learns its tasks from its applied state.
            return;
        };
        let replica = self.replica.clone();
        self.background.spawn_until_shutdown(async move {
            match replica.peers().get(node_id, &addr).await {
                Ok(p) => {
                    let ctx = peer::deadline(replica.timeout());
                    if let Err(e) = p.dispatch(ctx, node_id, task, fv).await {
                        tracing::debug!(node = node_id, error = %e, "dispatch failed; the worker will find the task itself");
                        replica.peers().forget(node_id).await;
                    }
                }
                Err(e) => tracing::debug!(node = node_id, error = %e, "cannot reach a worker"),
            }
        });
    }

    /// Waits until task `id` is finished in this node's applied state.
    pub async fn wait_task(&self, id: TaskId, wait: Duration) -> Result<Task, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        let finished = |_: &Replica| match self.local_task(id) {
            Ok(task) if !task.state.is_finished() => None,
            other => Some(other),
        };
        match self.replica.wait_until(deadline, finished).await {
            Ok(task) => task,
            Err(WaitEnded::Stopped) => Err(ApiError::ShuttingDown),
            Err(WaitEnded::TimedOut) => Err(ApiError::Timeout(format!(
                "task {id} has not finished after {wait:?}; it goes on (see `skiff task show {id}`)"
            ))),
        }
    }
}
