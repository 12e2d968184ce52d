//! The scheduler part of the state machine: functions, code, the task queue, placement and
//! worker nodes. Like [`crate::apply`], a pure function of (state, command, time): placement
//! is decided here, inside apply, so every replica agrees on where each task runs.
//!
//! Invariants:
//! - every field not persisted as an object (`queues`, `delayed`, `active`, `by_node`,
//!   `node_memory`, `deadlines`, `finished`, byte counters) is derived from the persisted
//!   objects and the state machine's time, and [`Sched::from_objects`] rebuilds it the same;
//! - a task is in exactly one of: a function queue (queued, due), `delayed` (queued, not
//!   before a later time), `by_node` (assigned or running), `finished`;
//! - a function never has more than `max_concurrency` tasks assigned or running;
//! - fencing tokens strictly increase; a completion is accepted only with the current token;
//! - every collection has a bound (see [`crate::functions`]); past it a command is refused.
//!
//! [`Sched::check`] asserts these on a whole state: apply runs it after every entry in debug
//! builds, and the property tests after every command.
//!
//! The parts live beside this file: `objects` (persisted objects, loading, changes), `code`
//! (code chunks, deploys, removal), `placement` (nodes, assignment, fencing), `ledger`
//! (idempotency), `streams` (stream jobs), `check` (the invariants). This file keeps the
//! state, the task lifecycle (submit, complete, retry, finish, retention) and the tick.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::functions::{
    CodeBlob, FunctionRecord, FunctionSpec, IdempotencyInput, LedgerEntry, NodeRecord, RunStatus,
    SchedStats, Task, TaskFilter, TaskId, TaskResult, TaskState, ACTIVE_TASKS_MAX,
    CODE_UNREFERENCED_TTL_MS, FINISHED_TASKS_MAX, NODE_FORGET_MS, RESULT_RETENTION_MS,
    RETRY_BACKOFF_MS_MAX, TASK_BYTES_MAX,
};
use crate::model::{CommandResult, KvEntry, NodeId};
use crate::streams::{FailedItem, StreamId, StreamJob, WindowEntry};

/// How often (in state-machine time) unreferenced code and silent nodes are collected.
const GC_INTERVAL_MS: u64 = 10_000;
/// Most tasks one listing returns.
pub const TASK_LIST_MAX: usize = 1000;
/// Most bytes of tasks (payloads, outputs, logs) one listing returns, so a page fits in a
/// client frame.
pub const TASK_LIST_BYTES_MAX: u64 = 4 * 1024 * 1024;

mod check;
mod code;
mod ledger;
mod objects;
mod placement;
mod streams;
#[cfg(test)]
mod testing;

pub use check::Broken;
use ledger::{LedgerCall, LedgerRun};
pub use objects::ObjChange;
use objects::ObjKey;
use placement::{assignment_deadline, is_live};

/// Scalars of the scheduler, persisted as one object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SchedMeta {
    /// The last task id given (ids start at 1).
    next_task: u64,
    next_token: u64,
    next_seq: u64,
    last_gc_ms: u64,
}

/// The scheduler state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sched {
    meta: SchedMeta,
    /// The last function identity given (identities start at 1; 0 marks functions created
    /// before identities existed).
    next_function: u64,
    functions: BTreeMap<String, FunctionRecord>,
    code: BTreeMap<String, CodeBlob>,
    chunks: BTreeMap<(String, u32), Arc<Vec<u8>>>,
    tasks: BTreeMap<TaskId, Task>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    ledger: BTreeMap<String, LedgerEntry>,
    /// The last stream id given (ids start at 1).
    next_stream: u64,
    /// Stream jobs, with `window` and `failed_items` always empty: those live in the two
    /// maps below, one persisted object per entry, so a completion rewrites only small objects.
    streams: BTreeMap<StreamId, StreamJob>,
    windows: BTreeMap<(StreamId, u64), WindowEntry>,
    failed_items: BTreeMap<(StreamId, u64), FailedItem>,
    // Derived.
    /// Which stream invocations each task carries (several when idempotent runs are joined).
    stream_tasks: BTreeMap<TaskId, Vec<(StreamId, u64)>>,
    /// Result writes to the key-value store produced by the command being applied; taken by
    /// the caller ([`Sched::take_kv_puts`]) before the command's result, never persisted.
    kv_out: Vec<(String, Vec<u8>)>,
    /// `(recorded_ms, key)` of every finished ledger entry: the eviction order.
    ledger_order: BTreeSet<(u64, String)>,
    ledger_bytes: u64,
    queues: BTreeMap<String, BTreeSet<(u64, TaskId)>>,
    delayed: BTreeSet<(u64, TaskId)>,
    active: BTreeMap<String, u32>,
    by_node: BTreeMap<NodeId, BTreeSet<TaskId>>,
    node_memory: BTreeMap<NodeId, u64>,
    deadlines: BTreeSet<(u64, TaskId)>,
    finished: BTreeSet<(u64, TaskId)>,
    code_bytes: u64,
    task_bytes: u64,
    /// Objects changed by the command being applied; emptied by [`Sched::take_changes`].
    dirty: BTreeSet<ObjKey>,
}

impl Sched {
    // ----- reads -------------------------------------------------------------------------

    pub fn function(&self, name: &str) -> Option<&FunctionRecord> {
        self.functions.get(name)
    }

    pub fn functions(&self) -> impl Iterator<Item = &FunctionRecord> {
        self.functions.values()
    }

    /// The last task id given (0: none yet).
    pub fn last_task_id(&self) -> TaskId {
        self.meta.next_task
    }

    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.get(&id)
    }

    /// Tasks matching `filter` with ids above `after`, at most `limit` (≤ [`TASK_LIST_MAX`])
    /// and at most [`TASK_LIST_BYTES_MAX`] of payloads and results (always at least one).
    pub fn list_tasks(&self, filter: &TaskFilter, after: TaskId, limit: usize) -> Vec<Task> {
        let limit = limit.clamp(1, TASK_LIST_MAX);
        let mut bytes = 0u64;
        let mut out = Vec::new();
        for t in self
            .tasks
            .range(after.saturating_add(1)..)
            .map(|(_, t)| t)
            .filter(|t| filter.matches(t))
        {
            bytes += t.bytes();
            if out.len() >= limit || (!out.is_empty() && bytes > TASK_LIST_BYTES_MAX) {
                break;
            }
            out.push(t.clone());
        }
        out
    }

    pub fn stats(&self) -> SchedStats {
        SchedStats {
            functions: self.functions.len(),
            tasks_active: self.tasks.len() - self.finished.len(),
            tasks_queued: self.queues.values().map(BTreeSet::len).sum::<usize>()
                + self.delayed.len(),
            tasks_finished: self.finished.len(),
            code_blobs: self.code.len(),
            code_bytes: self.code_bytes,
            task_bytes: self.task_bytes,
        }
    }

    // ----- commands ----------------------------------------------------------------------

    /// Time-driven work, run once per applied entry before its commands: due retries,
    /// tasks of silent nodes, overdue assignments, retention, garbage collection.
    pub fn tick(&mut self, now: u64) {
        let mut changed = false;
        while let Some(&(at, id)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            if let Some(t) = self.tasks.get(&id) {
                let entry = (t.queue_seq, id);
                self.queues
                    .entry(t.function.clone())
                    .or_default()
                    .insert(entry);
                changed = true;
            }
        }
        let lost: Vec<NodeId> = self
            .by_node
            .iter()
            .filter(|(n, tasks)| {
                !tasks.is_empty() && !self.nodes.get(n).is_some_and(|r| is_live(r, now))
            })
            .map(|(n, _)| *n)
            .collect();
        for node in lost {
            let ids: Vec<TaskId> = self
                .by_node
                .get(&node)
                .into_iter()
                .flatten()
                .copied()
                .collect();
            for id in ids {
                self.release(id);
                self.requeue(id, now, now);
                changed = true;
            }
        }
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            self.release(id);
            let result = TaskResult {
                status: RunStatus::TimedOut,
                node: self.tasks.get(&id).and_then(|t| t.node).unwrap_or(0),
                exit_code: None,
                output: Vec::new(),
                log: Vec::new(),
                error: Some("the node did not report the end of the attempt in time".into()),
                warm: false,
                wall_ms: 0,
                cpu_ms: 0,
                peak_memory_bytes: 0,
            };
            self.attempt_failed(id, result, now);
            changed = true;
        }
        self.purge_finished(now);
        if now >= self.meta.last_gc_ms.saturating_add(GC_INTERVAL_MS) {
            self.meta.last_gc_ms = now;
            self.touch(ObjKey::Meta);
            self.collect_garbage(now);
        }
        if changed {
            self.fill(now);
        }
    }

    /// Queues an invocation and places it at once when a slot and a node are free.
    /// [`Sched::submit`], recording the invocation's request id on the task it makes.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_request(
        &mut self,
        request_id: crate::model::RequestId,
        now: u64,
        function: &str,
        version: Option<u64>,
        payload: &[u8],
        sync: bool,
        idempotency: Option<&IdempotencyInput>,
        kv: &BTreeMap<String, KvEntry>,
    ) -> CommandResult {
        let result = self.submit(now, function, version, payload, sync, idempotency, kv);
        if let CommandResult::Submitted { task, .. } = &result {
            if let Some(t) = self.tasks.get_mut(task) {
                if t.request_id.is_none() && t.submitted_ms == now {
                    t.request_id = Some(request_id);
                    self.dirty.insert(ObjKey::Task(*task));
                }
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        now: u64,
        function: &str,
        version: Option<u64>,
        payload: &[u8],
        sync: bool,
        idempotency: Option<&IdempotencyInput>,
        kv: &BTreeMap<String, KvEntry>,
    ) -> CommandResult {
        self.submit_inner(now, function, version, payload, sync, idempotency, kv, true)
    }

    /// [`Sched::submit`]; without `queue_bound`, the function's `queue_max` does not apply
    /// (a stream's own max concurrency bounds what it queues).
    #[allow(clippy::too_many_arguments)]
    fn submit_inner(
        &mut self,
        now: u64,
        function: &str,
        version: Option<u64>,
        payload: &[u8],
        sync: bool,
        idempotency: Option<&IdempotencyInput>,
        kv: &BTreeMap<String, KvEntry>,
        queue_bound: bool,
    ) -> CommandResult {
        let Some(record) = self.functions.get(function) else {
            return rejected(format!("function {function} does not exist"));
        };
        let version = match version {
            None => record.latest,
            Some(v) => match record.version(v) {
                Some(_) => v,
                None => {
                    return rejected(format!("function {function} has no version {v}"));
                }
            },
        };
        let Some(spec) = record.version(version).map(|v| v.spec.clone()) else {
            return rejected(format!("function {function} has no version {version}"));
        };
        // Idempotent functions: join a running identical invocation, answer from the ledger,
        // or run and record why.
        let run = match &spec.idempotency {
            None => None,
            Some(idem) => {
                let call = LedgerCall {
                    function,
                    version,
                    payload,
                    sync,
                    input: idempotency,
                };
                match self.ledger_lookup(now, &call, idem, kv) {
                    Ok(run) => Some(run),
                    Err(answer) => return answer,
                }
            }
        };
        if let Some(throttled) = self.admit(function, payload, &spec, queue_bound) {
            return throttled;
        }
        let active = self.active.get(function).copied().unwrap_or(0);
        let queued = self.queues.get(function).map_or(0, BTreeSet::len);
        let can_run = active < spec.max_concurrency && queued == 0;
        let cache = run.as_ref().map(|r| r.cache.clone());
        let (id, seq) = self.new_task(now, function, version, payload, sync, &spec, run.as_ref());
        if let Some(run) = run {
            self.ledger_start(now, function, version, id, run);
        }
        if can_run {
            if let Some(node) = self.choose_node(id, now) {
                let token = self.assign(id, node, now);
                return CommandResult::Submitted {
                    task: id,
                    node: Some(node),
                    token,
                    cache,
                };
            }
        }
        self.queues
            .entry(function.to_string())
            .or_default()
            .insert((seq, id));
        CommandResult::Submitted {
            task: id,
            node: None,
            token: 0,
            cache,
        }
    }

    /// Throttles an invocation the cluster has no room for: too many unfinished tasks, the
    /// task store full (after purging what finished), or (with `queue_bound`) the function's
    /// queue full. Purges finished tasks to make room.
    fn admit(
        &mut self,
        function: &str,
        payload: &[u8],
        spec: &FunctionSpec,
        queue_bound: bool,
    ) -> Option<CommandResult> {
        if self.tasks.len() - self.finished.len() >= ACTIVE_TASKS_MAX {
            return Some(CommandResult::Throttled {
                reason: format!("the cluster has {ACTIVE_TASKS_MAX} unfinished tasks"),
            });
        }
        let new_bytes = (payload.len() + function.len() + 256) as u64;
        while self.task_bytes + new_bytes > TASK_BYTES_MAX {
            let Some(&(_, id)) = self.finished.first() else {
                break;
            };
            self.purge(id);
        }
        if self.task_bytes + new_bytes > TASK_BYTES_MAX {
            return Some(CommandResult::Throttled {
                reason: "the cluster's task store is full".into(),
            });
        }
        let active = self.active.get(function).copied().unwrap_or(0);
        let queued = self.queues.get(function).map_or(0, BTreeSet::len);
        let can_run = active < spec.max_concurrency && queued == 0;
        if queue_bound && !can_run && queued >= spec.queue_max as usize {
            return Some(CommandResult::Throttled {
                reason: format!(
                    "function {function} runs {active} of at most {} and {queued} wait (queue bound {})",
                    spec.max_concurrency, spec.queue_max
                ),
            });
        }
        None
    }

    /// Makes a queued task of `spec` (not yet in any queue); answers its id and queue place.
    #[allow(clippy::too_many_arguments)]
    fn new_task(
        &mut self,
        now: u64,
        function: &str,
        version: u64,
        payload: &[u8],
        sync: bool,
        spec: &FunctionSpec,
        run: Option<&LedgerRun>,
    ) -> (TaskId, u64) {
        self.meta.next_task += 1;
        let id = self.meta.next_task;
        let seq = self.next_seq();
        let task = Task {
            id,
            function: function.to_string(),
            version,
            payload: payload.to_vec(),
            sync,
            state: TaskState::Queued,
            attempts: 0,
            failures: 0,
            node: None,
            token: 0,
            submitted_ms: now,
            assigned_ms: None,
            started_ms: None,
            finished_ms: None,
            not_before_ms: now,
            queue_seq: seq,
            memory_bytes: spec.memory_bytes,
            timeout_ms: spec.timeout_ms,
            result: None,
            dead_letter: false,
            cache: run.map(|r| r.cache.clone()),
            ledger_key: run.map(|r| r.key().to_string()),
            request_id: None,
        };
        self.task_bytes += task.bytes();
        self.tasks.insert(id, task);
        self.touch(ObjKey::Task(id));
        self.touch(ObjKey::Meta);
        (id, seq)
    }

    /// Records the end of an attempt made under `token`.
    pub fn complete(
        &mut self,
        now: u64,
        id: TaskId,
        token: u64,
        result: &TaskResult,
        reads: &[(String, u64)],
    ) -> CommandResult {
        let Some(task) = self.tasks.get(&id) else {
            return rejected(format!("task {id} does not exist (or was purged)"));
        };
        if task.state.is_finished() {
            return rejected(format!("task {id} already finished"));
        }
        if !matches!(task.state, TaskState::Assigned | TaskState::Running) || task.token != token {
            return rejected(format!(
                "stale fencing token {token} for task {id} (current {})",
                task.token
            ));
        }
        self.release(id);
        if let Some(t) = self.tasks.get_mut(&id) {
            // A run shorter than a heartbeat is never seen running: its start is its end
            // minus its duration.
            if t.started_ms.is_none() {
                t.started_ms = Some(now.saturating_sub(result.wall_ms));
            }
        }
        match result.status {
            RunStatus::Succeeded => {
                self.finish(id, TaskState::Succeeded, Some(result.clone()), now);
            }
            RunStatus::Failed | RunStatus::TimedOut => {
                self.attempt_failed(id, result.clone(), now);
            }
        }
        self.record_reads(id, reads);
        self.fill(now);
        CommandResult::Accepted
    }

    // ----- internals ---------------------------------------------------------------------

    fn next_seq(&mut self) -> u64 {
        self.meta.next_seq += 1;
        self.touch(ObjKey::Meta);
        self.meta.next_seq
    }

    /// A released task's attempt failed: retry after a back-off, or finish it.
    fn attempt_failed(&mut self, id: TaskId, result: TaskResult, now: u64) {
        let stream = self
            .stream_tasks
            .get(&id)
            .and_then(|refs| refs.first())
            .and_then(|(job, _)| self.streams.get(job))
            .map(|job| (job.options.max_attempts, job.options.retry_backoff_ms));
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.failures += 1;
        let (max_attempts, backoff) = match stream {
            // A stream's items retry by the stream's options, not the function's.
            Some(options) => options,
            None => self
                .functions
                .get(&task.function)
                .and_then(|f| f.version(task.version))
                .map_or((1, 0), |v| (v.spec.max_attempts, v.spec.retry_backoff_ms)),
        };
        let state = match result.status {
            RunStatus::TimedOut => TaskState::TimedOut,
            _ => TaskState::Failed,
        };
        if !task.sync && task.failures < max_attempts {
            let shift = (task.failures - 1).min(20);
            let delay = backoff.saturating_mul(1 << shift).min(RETRY_BACKOFF_MS_MAX);
            self.task_bytes -= task.bytes();
            task.result = Some(result);
            self.task_bytes += task.bytes();
            self.requeue(id, now + delay, now);
            self.stream_task_retried(id);
        } else {
            let dead = !task.sync;
            task.dead_letter = dead;
            self.finish(id, state, Some(result), now);
        }
    }

    /// Moves a released (or queued) task to a finished state.
    fn finish(&mut self, id: TaskId, state: TaskState, result: Option<TaskResult>, now: u64) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        if task.state == TaskState::Queued {
            if let Some(q) = self.queues.get_mut(&task.function) {
                q.remove(&(task.queue_seq, id));
            }
            self.delayed.remove(&(task.not_before_ms, id));
        }
        self.task_bytes -= task.bytes();
        task.state = state;
        task.finished_ms = Some(now);
        if result.is_some() {
            task.result = result;
        }
        self.task_bytes += task.bytes();
        self.finished.insert((now, id));
        self.dirty.insert(ObjKey::Task(id));
        self.ledger_finish(id, now);
        self.stream_task_finished(id, now);
    }

    fn purge(&mut self, id: TaskId) {
        if let Some(task) = self.tasks.remove(&id) {
            self.task_bytes -= task.bytes();
            if let Some(at) = task.finished_ms {
                self.finished.remove(&(at, id));
            }
            self.touch(ObjKey::Task(id));
        }
    }

    fn purge_finished(&mut self, now: u64) {
        while let Some(&(at, id)) = self.finished.first() {
            let expired = at.saturating_add(RESULT_RETENTION_MS) <= now;
            if !expired
                && self.finished.len() <= FINISHED_TASKS_MAX
                && self.task_bytes <= TASK_BYTES_MAX
            {
                break;
            }
            self.purge(id);
        }
    }

    fn collect_garbage(&mut self, now: u64) {
        let referenced: BTreeSet<&str> = self
            .functions
            .values()
            .flat_map(|f| f.versions.iter().map(|v| v.spec.code_digest.as_str()))
            .collect();
        let unused: Vec<String> = self
            .code
            .values()
            .filter(|b| {
                !referenced.contains(b.digest.as_str())
                    && b.created_ms.saturating_add(CODE_UNREFERENCED_TTL_MS) <= now
            })
            .map(|b| b.digest.clone())
            .collect();
        for digest in unused {
            self.drop_code(&digest);
        }
        let forgotten: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| {
                n.last_heartbeat_ms.saturating_add(NODE_FORGET_MS) <= now
                    && !self.by_node.contains_key(&n.id)
            })
            .map(|n| n.id)
            .collect();
        for id in forgotten {
            self.nodes.remove(&id);
            self.touch(ObjKey::Node(id));
        }
        let expired: Vec<String> = self
            .ledger_order
            .iter()
            .filter(|(at, key)| {
                let ttl = self
                    .ledger
                    .get(key)
                    .and_then(|e| self.functions.get(&e.function)?.version(e.version))
                    .and_then(|v| v.spec.idempotency.as_ref())
                    .map_or(0, |i| i.ttl_ms);
                at.saturating_add(ttl) <= now
            })
            .map(|(_, k)| k.clone())
            .collect();
        for k in expired {
            self.ledger_remove(&k);
        }
    }
}

fn rejected(reason: String) -> CommandResult {
    CommandResult::Rejected { reason }
}

fn failure_result(error: &str) -> TaskResult {
    TaskResult {
        status: RunStatus::Failed,
        node: 0,
        exit_code: None,
        output: Vec::new(),
        log: Vec::new(),
        error: Some(error.to_string()),
        warm: false,
        wall_ms: 0,
        cpu_ms: 0,
        peak_memory_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::testing::*;

    #[test]
    fn unknown_function_is_refused_at_submit() {
        let (mut s, _) = cluster();
        assert!(matches!(
            s.submit(2, "nope", None, b"", true, None, &BTreeMap::new()),
            CommandResult::Rejected { .. }
        ));
        assert!(matches!(
            s.submit(2, "f", Some(9), b"", false, None, &BTreeMap::new()),
            CommandResult::Rejected { .. }
        ));
        assert_eq!(s.stats().tasks_active, 0);
    }

    #[test]
    fn async_failures_retry_with_backoff_then_dead_letter() {
        let (mut s, _) = cluster();
        let (id, _, mut token) =
            submitted(s.submit(2, "f", None, b"", false, None, &BTreeMap::new()));
        let mut now = 2;
        for attempt in 1..=3u32 {
            s.heartbeat(now, &hb(1, vec![]));
            s.heartbeat(now, &hb(2, vec![]));
            let t = s.task(id).expect("task").clone();
            assert_eq!((t.state, t.attempts), (TaskState::Assigned, attempt));
            token = if attempt == 1 { token } else { t.token };
            s.complete(now, id, token, &result(RunStatus::Failed), &[]);
            if attempt < 3 {
                assert_eq!(s.task(id).map(|t| t.state), Some(TaskState::Queued));
                // Not before the back-off.
                s.tick(now + 1);
                assert_eq!(s.task(id).map(|t| t.state), Some(TaskState::Queued));
                now += 100 << (attempt - 1);
                s.tick(now);
            }
        }
        let t = s.task(id).expect("task");
        assert_eq!(
            (t.state, t.dead_letter, t.failures),
            (TaskState::Failed, true, 3)
        );
        let dead = s.list_tasks(
            &TaskFilter {
                dead_letter: true,
                ..TaskFilter::default()
            },
            0,
            10,
        );
        assert_eq!(dead.len(), 1);
        assert_reloads(&mut s, now);
    }

    #[test]
    fn sync_failures_are_not_retried_and_results_expire() {
        let (mut s, _) = cluster();
        let (id, _, token) = submitted(s.submit(2, "f", None, b"", true, None, &BTreeMap::new()));
        s.complete(3, id, token, &result(RunStatus::Failed), &[]);
        let t = s.task(id).expect("task");
        assert_eq!((t.state, t.dead_letter), (TaskState::Failed, false));
        s.tick(3 + RESULT_RETENTION_MS);
        assert!(s.task(id).is_none());
        assert_reloads(&mut s, 3 + RESULT_RETENTION_MS);
    }
}
