//! Stream jobs inside the scheduler: start, advance (the cursor moves in the same apply that
//! creates the items' tasks), completion of the items' tasks, retries, the failure budget,
//! cancel and redrive. See [`crate::streams`] for the model and its invariants.
//!
//! An item's invocation is an ordinary asynchronous task (placement, concurrency, fencing,
//! re-issue on node loss), retried by the stream's options. When it finishes, its items are
//! done: succeeded (their results go to the job's result keys) or failed (into the bounded
//! failed list). An item's task finishes once (fencing), so an item counts once, however
//! many times it ran.

use std::collections::BTreeMap;

use super::{failure_result, rejected, ObjKey, Sched};
use crate::functions::{TaskId, TaskState, ACTIVE_TASKS_MAX, PAYLOAD_BYTES_MAX, TASK_BYTES_MAX};
use crate::model::{CommandResult, KvEntry};
use crate::streams::{
    result_key, FailedItem, KvCursor, StreamCounters, StreamId, StreamItem, StreamJob,
    StreamSource, StreamStartRequest, StreamState, WindowEntry, WindowItem, STREAMS_MAX,
    STREAM_ERROR_BYTES_MAX, STREAM_FAILED_BYTES_MAX, STREAM_FAILED_KEPT_MAX,
};

/// The payload of one invocation: the item itself, or (batching) a JSON array of items.
fn batch_payload(items: &[&[u8]], batched: bool) -> Vec<u8> {
    if !batched {
        return items.first().map(|i| i.to_vec()).unwrap_or_default();
    }
    let mut out = Vec::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 2);
    out.push(b'[');
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.push(b']');
    out
}

/// Item `n` of a payload made by [`batch_payload`], from the items' lengths.
fn item_of(payload: &[u8], items: &[WindowItem], n: usize, batched: bool) -> Option<Vec<u8>> {
    if !batched {
        return Some(payload.to_vec());
    }
    let start = 1 + items[..n]
        .iter()
        .map(|i| i.bytes as usize + 1)
        .sum::<usize>();
    let end = start + items.get(n)?.bytes as usize;
    payload.get(start..end).map(<[u8]>::to_vec)
}

/// Splits a successful output into one result per item: the output itself, or (batching) the
/// elements of the JSON array it must be.
fn split_results(output: &[u8], count: usize, batched: bool) -> Result<Vec<Vec<u8>>, String> {
    if !batched {
        return Ok(vec![output.to_vec()]);
    }
    let values: Vec<serde_json::Value> = serde_json::from_slice(output)
        .map_err(|e| format!("a batch's output must be a JSON array of {count} results: {e}"))?;
    if values.len() != count {
        return Err(format!(
            "a batch of {count} items answered with {} results",
            values.len()
        ));
    }
    Ok(values
        .iter()
        .map(|v| serde_json::to_vec(v).expect("JSON values serialize"))
        .collect())
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Whether `to` is at or past `from` for this kind of source (offsets compare as numbers,
/// keys and file names as strings); equal only when nothing was read.
fn moves_forward(source: &StreamSource, from: &str, to: &str, items: usize) -> bool {
    let ahead = match source {
        StreamSource::Jsonl { .. } | StreamSource::Csv { .. } => {
            let parse = |c: &str| {
                if c.is_empty() {
                    Some(0)
                } else {
                    c.parse::<u64>().ok()
                }
            };
            match (parse(from), parse(to)) {
                (Some(f), Some(t)) => t.cmp(&f),
                _ => return false,
            }
        }
        // Key order, then (follow mode) revision order: a revision cursor is after every key.
        StreamSource::Kv { .. } => match (KvCursor::parse(from), KvCursor::parse(to)) {
            (Some(f), Some(t)) => t.cmp(&f),
            _ => return false,
        },
        StreamSource::Dir { .. } => to.cmp(from),
    };
    match ahead {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Equal => items == 0,
        std::cmp::Ordering::Less => false,
    }
}

impl Sched {
    /// Rebuilds the task → stream index and checks the stream objects agree.
    pub(super) fn rebuild_stream_index(&mut self) -> Result<(), String> {
        let mut running: BTreeMap<StreamId, u64> = BTreeMap::new();
        for ((job, first), w) in &self.windows {
            if !self.streams.contains_key(job) {
                return Err(format!("window entry of unknown stream {job}"));
            }
            self.stream_tasks
                .entry(w.task)
                .or_default()
                .push((*job, *first));
            *running.entry(*job).or_default() += w.items.len() as u64;
        }
        for (job, _) in self.failed_items.keys() {
            if !self.streams.contains_key(job) {
                return Err(format!("failed item of unknown stream {job}"));
            }
        }
        for (id, j) in &self.streams {
            if *id == 0 || *id > self.next_stream {
                return Err(format!("stream {id} past the last id given"));
            }
            let in_window = running.get(id).copied().unwrap_or(0);
            if j.counters.running != in_window {
                return Err(format!(
                    "stream {id} counts {} items running, its window holds {in_window}",
                    j.counters.running
                ));
            }
        }
        Ok(())
    }

    /// The result writes produced since the last call.
    pub fn take_kv_puts(&mut self) -> Vec<(String, Vec<u8>)> {
        std::mem::take(&mut self.kv_out)
    }

    // ----- reads -------------------------------------------------------------------------

    /// A job with its window and its kept failed items.
    pub fn stream(&self, id: StreamId) -> Option<StreamJob> {
        let mut job = self.streams.get(&id)?.clone();
        job.window = self
            .windows
            .range((id, 0)..=(id, u64::MAX))
            .map(|(_, w)| w.clone())
            .collect();
        job.failed_items = self
            .failed_items
            .range((id, 0)..=(id, u64::MAX))
            .map(|(_, f)| f.clone())
            .collect();
        Some(job)
    }

    /// Every job, without windows and failed items, in id order.
    pub fn streams(&self) -> impl Iterator<Item = &StreamJob> {
        self.streams.values()
    }

    /// Jobs whose driver should read more: running and not exhausted.
    pub fn streams_to_drive(&self) -> Vec<&StreamJob> {
        self.streams
            .values()
            .filter(|j| j.state == StreamState::Running && !j.exhausted)
            .collect()
    }

    // ----- commands ----------------------------------------------------------------------

    /// Starts a job at the function's latest version; `revision` is the store's now.
    pub fn stream_start(
        &mut self,
        now: u64,
        revision: u64,
        request: &StreamStartRequest,
    ) -> CommandResult {
        let Some(version) = self.functions.get(&request.function).map(|f| f.latest) else {
            return rejected(format!("function {} does not exist", request.function));
        };
        if self.streams.len() >= STREAMS_MAX {
            let oldest = self
                .streams
                .values()
                .filter(|j| j.state.is_finished())
                .min_by_key(|j| (j.finished_ms, j.id))
                .map(|j| j.id);
            match oldest {
                Some(id) => self.forget_stream(id),
                None => {
                    return rejected(format!("the cluster runs {STREAMS_MAX} stream jobs"));
                }
            }
        }
        self.next_stream += 1;
        let id = self.next_stream;
        self.touch(ObjKey::StreamMeta);
        let job = StreamJob {
            id,
            function: request.function.clone(),
            version,
            source: request.source.clone(),
            start_revision: revision,
            options: request.options.clone(),
            state: StreamState::Running,
            reason: None,
            counters: StreamCounters::default(),
            cursor: String::new(),
            next_item: 0,
            exhausted: false,
            window: Vec::new(),
            failed_items: Vec::new(),
            created_ms: now,
            finished_ms: None,
        };
        self.streams.insert(id, job);
        self.touch(ObjKey::Stream(id));
        CommandResult::StreamStarted { job: id }
    }

    fn forget_stream(&mut self, id: StreamId) {
        self.streams.remove(&id);
        self.touch(ObjKey::Stream(id));
        let windows: Vec<(StreamId, u64)> = self
            .windows
            .range((id, 0)..=(id, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in windows {
            if let Some(w) = self.windows.remove(&k) {
                if let Some(refs) = self.stream_tasks.get_mut(&w.task) {
                    refs.retain(|r| *r != k);
                    if refs.is_empty() {
                        self.stream_tasks.remove(&w.task);
                    }
                }
            }
            self.touch(ObjKey::Window(k.0, k.1));
        }
        let failed: Vec<(StreamId, u64)> = self
            .failed_items
            .range((id, 0)..=(id, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in failed {
            self.failed_items.remove(&k);
            self.touch(ObjKey::Failed(k.0, k.1));
        }
    }

    /// Moves a job's cursor and creates its items' tasks, all or nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn stream_advance(
        &mut self,
        now: u64,
        id: StreamId,
        from_cursor: &str,
        to_cursor: &str,
        first_item: u64,
        items: &[StreamItem],
        exhausted: bool,
        kv: &BTreeMap<String, KvEntry>,
    ) -> CommandResult {
        let Some(job) = self.streams.get(&id) else {
            return rejected(format!("stream {id} does not exist"));
        };
        if job.state != StreamState::Running {
            return rejected(format!("stream {id} is {}", job.state.as_str()));
        }
        if job.exhausted {
            return rejected(format!("stream {id} has read its whole source"));
        }
        if job.cursor != from_cursor || job.next_item != first_item {
            return rejected(format!(
                "stale stream advance: stream {id} is at cursor {:?} (item {}), not {from_cursor:?} (item {first_item})",
                job.cursor, job.next_item
            ));
        }
        if !moves_forward(&job.source, from_cursor, to_cursor, items.len()) {
            return rejected(format!(
                "stream {id}: cursor {to_cursor:?} is not after {from_cursor:?}"
            ));
        }
        let good = items
            .iter()
            .filter(|i| matches!(i, StreamItem::Ok(_)))
            .count() as u64;
        if job.counters.running + good > u64::from(job.options.max_concurrency) {
            return rejected(format!(
                "stream {id}: {good} more items would pass its max concurrency of {}",
                job.options.max_concurrency
            ));
        }
        let (function, version) = (job.function.clone(), job.version);
        let batched = job.options.batch > 1;
        let batch = job.options.batch as usize;
        if self
            .functions
            .get(&function)
            .and_then(|f| f.version(version))
            .is_none()
        {
            let reason = format!("function {function} version {version} no longer exists");
            self.end_stream(id, StreamState::Failed, Some(reason.clone()), now);
            return rejected(reason);
        }
        let payloads: Vec<(u64, &[u8])> = items
            .iter()
            .enumerate()
            .filter_map(|(n, i)| match i {
                StreamItem::Ok(b) => Some((first_item + n as u64, b.as_slice())),
                StreamItem::Bad(_) => None,
            })
            .collect();
        let chunks = chunk_items(&payloads, batch, batched);
        if let Some(refusal) = self.room_for(&chunks, &function) {
            return refusal;
        }
        // Everything below succeeds: the cursor moves with the tasks.
        let job = self.streams.get_mut(&id).expect("checked above");
        job.cursor = to_cursor.to_string();
        job.next_item = first_item + items.len() as u64;
        // A following kv job never runs out: it ends when cancelled.
        let follows = matches!(job.source, StreamSource::Kv { follow: true, .. });
        job.exhausted = exhausted && !follows;
        job.counters.enqueued += items.len() as u64;
        if job.exhausted {
            job.counters.total = Some(job.next_item);
        }
        self.touch(ObjKey::Stream(id));
        for (n, item) in items.iter().enumerate() {
            if let StreamItem::Bad(error) = item {
                self.item_failed(id, first_item + n as u64, None, error.clone());
            }
        }
        let tasks = self.enqueue_chunks(now, id, &function, version, chunks, batched, kv);
        self.check_stream_end(id, now);
        CommandResult::StreamAdvanced { tasks }
    }

    /// `None` if the cluster can take these invocations now, else the refusal.
    fn room_for(&mut self, chunks: &[Vec<(u64, &[u8])>], function: &str) -> Option<CommandResult> {
        let active = self.tasks.len() - self.finished.len();
        if active + chunks.len() > ACTIVE_TASKS_MAX {
            return Some(CommandResult::Throttled {
                reason: format!("the cluster has {ACTIVE_TASKS_MAX} unfinished tasks"),
            });
        }
        let new_bytes: u64 = chunks
            .iter()
            .map(|c| {
                (c.iter().map(|(_, b)| b.len() + 1).sum::<usize>() + function.len() + 258) as u64
            })
            .sum();
        while self.task_bytes + new_bytes > TASK_BYTES_MAX {
            let Some(&(_, oldest)) = self.finished.first() else {
                break;
            };
            self.purge(oldest);
        }
        if self.task_bytes + new_bytes > TASK_BYTES_MAX {
            return Some(CommandResult::Throttled {
                reason: "the cluster's task store is full".into(),
            });
        }
        None
    }

    /// Creates one task per chunk and records it in the job's window.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_chunks(
        &mut self,
        now: u64,
        id: StreamId,
        function: &str,
        version: u64,
        chunks: Vec<Vec<(u64, &[u8])>>,
        batched: bool,
        kv: &BTreeMap<String, KvEntry>,
    ) -> Vec<TaskId> {
        let mut tasks = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let bytes: Vec<&[u8]> = chunk.iter().map(|(_, b)| *b).collect();
            let payload = batch_payload(&bytes, batched);
            let window_items: Vec<WindowItem> = chunk
                .iter()
                .map(|(index, b)| WindowItem {
                    index: *index,
                    bytes: u32::try_from(b.len()).expect("items are at most a payload"),
                })
                .collect();
            let first = window_items[0].index;
            let count = window_items.len() as u64;
            let r = self.submit_inner(
                now,
                function,
                Some(version),
                &payload,
                false,
                None,
                kv,
                false,
            );
            let (task, hit) = match r {
                CommandResult::Submitted { task, cache, .. } => (
                    task,
                    matches!(cache, Some(crate::functions::CacheOutcome::Hit { .. })),
                ),
                other => {
                    // `room_for` checked every bound a submission can hit; the function
                    // exists. Fail the items rather than lose them.
                    let error = format!("the invocation was refused: {other:?}");
                    for (n, item) in window_items.iter().enumerate() {
                        let p = item_of(&payload, &window_items, n, batched);
                        self.item_failed(id, item.index, p, error.clone());
                    }
                    continue;
                }
            };
            tasks.push(task);
            self.windows.insert(
                (id, first),
                WindowEntry {
                    task,
                    items: window_items,
                },
            );
            self.touch(ObjKey::Window(id, first));
            self.stream_tasks.entry(task).or_default().push((id, first));
            if let Some(job) = self.streams.get_mut(&id) {
                job.counters.running += count;
                if hit {
                    job.counters.idempotent_hits += count;
                }
            }
            if self.tasks.get(&task).is_some_and(|t| t.state.is_finished()) {
                // Answered from the idempotency ledger: done already.
                self.stream_task_finished(task, now);
            }
        }
        tasks
    }

    /// A stream task's attempt failed and will be retried.
    pub(super) fn stream_task_retried(&mut self, task: TaskId) {
        let refs = self.stream_tasks.get(&task).cloned().unwrap_or_default();
        for (id, first) in refs {
            let count = self.windows.get(&(id, first)).map_or(0, |w| w.items.len());
            if let Some(job) = self.streams.get_mut(&id) {
                job.counters.retried += count as u64;
                self.dirty.insert(ObjKey::Stream(id));
            }
        }
    }

    /// A task reached its final state: its stream items are done.
    pub(super) fn stream_task_finished(&mut self, task_id: TaskId, now: u64) {
        let Some(refs) = self.stream_tasks.remove(&task_id) else {
            return;
        };
        let Some(task) = self.tasks.get(&task_id) else {
            return;
        };
        let succeeded = task.state == TaskState::Succeeded;
        let payload = task.payload.clone();
        let output = task
            .result
            .as_ref()
            .map(|r| r.output.clone())
            .unwrap_or_default();
        let error = task.result.as_ref().map_or_else(
            || format!("the invocation ended {}", task.state.as_str()),
            |r| {
                let mut e = r.error.clone().unwrap_or_else(|| match r.exit_code {
                    Some(code) => format!("exit code {code}"),
                    None => format!("the invocation ended {}", task.state.as_str()),
                });
                let log = String::from_utf8_lossy(&r.log);
                let tail = log.trim_end();
                if !tail.is_empty() {
                    let start = tail.len().saturating_sub(256);
                    let start = (start..tail.len())
                        .find(|i| tail.is_char_boundary(*i))
                        .unwrap_or(tail.len());
                    e.push_str(": ");
                    e.push_str(&tail[start..]);
                }
                e
            },
        );
        // Runs lost with their node (neither a failure nor the final run): at-least-once.
        let lost = u64::from(task.attempts.saturating_sub(task.failures + 1));
        for (id, first) in refs {
            let Some(entry) = self.windows.remove(&(id, first)) else {
                continue;
            };
            self.touch(ObjKey::Window(id, first));
            let Some(job) = self.streams.get_mut(&id) else {
                continue;
            };
            self.dirty.insert(ObjKey::Stream(id));
            let count = entry.items.len();
            let batched = job.options.batch > 1;
            job.counters.running -= count as u64;
            job.counters.duplicates += lost * count as u64;
            let outcome = if succeeded {
                split_results(&output, count, batched)
            } else {
                Err(error.clone())
            };
            match outcome {
                Ok(results) => {
                    job.counters.succeeded += count as u64;
                    if let Some(prefix) = job.options.results_prefix.clone() {
                        for (item, result) in entry.items.iter().zip(results) {
                            self.kv_out.push((result_key(&prefix, item.index), result));
                        }
                    }
                }
                Err(error) => {
                    for (n, item) in entry.items.iter().enumerate() {
                        let p = item_of(&payload, &entry.items, n, batched);
                        self.item_failed(id, item.index, p, error.clone());
                    }
                }
            }
            self.check_stream_end(id, now);
        }
    }

    /// Counts an item failed for good and keeps it (within the bounds) for redrive.
    fn item_failed(&mut self, id: StreamId, index: u64, payload: Option<Vec<u8>>, error: String) {
        let (kept, bytes) = self
            .failed_items
            .range((id, 0)..=(id, u64::MAX))
            .fold((0usize, 0usize), |(n, b), (_, f)| {
                (n + 1, b + f.payload.as_ref().map_or(0, Vec::len))
            });
        let Some(job) = self.streams.get_mut(&id) else {
            return;
        };
        job.counters.failed += 1;
        self.dirty.insert(ObjKey::Stream(id));
        let size = payload.as_ref().map_or(0, Vec::len);
        if kept >= STREAM_FAILED_KEPT_MAX || bytes + size > STREAM_FAILED_BYTES_MAX {
            job.counters.failed_dropped += 1;
            return;
        }
        let item = FailedItem {
            index,
            payload,
            error: truncate(error, STREAM_ERROR_BYTES_MAX),
        };
        self.failed_items.insert((id, index), item);
        self.touch(ObjKey::Failed(id, index));
    }

    /// Whether a job's failures exceed what it tolerates; `at_end` once the total is known.
    fn over_budget(job: &StreamJob, at_end: bool) -> bool {
        let c = &job.counters;
        let by_count = job.options.tolerated_failure_count.map(|n| c.failed > n);
        let by_pct = match (job.options.tolerated_failure_pct, c.total) {
            (Some(pct), Some(total)) if at_end => {
                Some(u128::from(c.failed) * 100 > u128::from(pct) * u128::from(total))
            }
            _ => None,
        };
        match (by_count, by_pct) {
            (None, None) => at_end && c.failed > 0,
            (Some(a), Some(b)) => a || b,
            (Some(a), None) => a,
            (None, Some(b)) => b,
        }
    }

    /// Ends a running job that spent its failure budget, or that read everything and has
    /// nothing in flight.
    fn check_stream_end(&mut self, id: StreamId, now: u64) {
        let Some(job) = self.streams.get(&id) else {
            return;
        };
        if job.state != StreamState::Running {
            return;
        }
        let done = job.exhausted && job.counters.running == 0;
        if Self::over_budget(job, done) {
            let reason = format!(
                "{} items failed{}",
                job.counters.failed,
                job.counters
                    .total
                    .map(|t| format!(" of {t}"))
                    .unwrap_or_default()
            );
            self.end_stream(id, StreamState::Failed, Some(reason), now);
        } else if done {
            self.end_stream(id, StreamState::Succeeded, None, now);
        }
    }

    pub(super) fn end_stream(
        &mut self,
        id: StreamId,
        state: StreamState,
        reason: Option<String>,
        now: u64,
    ) {
        if let Some(job) = self.streams.get_mut(&id) {
            job.state = state;
            job.reason = reason;
            job.finished_ms = Some(now);
            self.dirty.insert(ObjKey::Stream(id));
        }
    }

    /// Cancels a running job: no more items are read; its queued invocations fail.
    pub fn stream_cancel(&mut self, now: u64, id: StreamId) -> CommandResult {
        let Some(job) = self.streams.get(&id) else {
            return rejected(format!("stream {id} does not exist"));
        };
        if job.state != StreamState::Running {
            return rejected(format!("stream {id} is {}", job.state.as_str()));
        }
        self.end_stream(id, StreamState::Cancelled, Some("cancelled".into()), now);
        let queued: Vec<TaskId> = self
            .windows
            .range((id, 0)..=(id, u64::MAX))
            .map(|(_, w)| w.task)
            .filter(|t| {
                self.tasks
                    .get(t)
                    .is_some_and(|t| t.state == TaskState::Queued)
                    && self.stream_tasks.get(t).is_some_and(|r| r.len() == 1)
            })
            .collect();
        for task in queued {
            self.finish(
                task,
                TaskState::Failed,
                Some(failure_result("the stream was cancelled")),
                now,
            );
        }
        CommandResult::Accepted
    }

    /// Puts a job's kept failed items back in flight (at most its max concurrency at once,
    /// with the function's latest version) and the job back to running.
    pub fn stream_redrive(
        &mut self,
        now: u64,
        id: StreamId,
        kv: &BTreeMap<String, KvEntry>,
    ) -> CommandResult {
        let Some(job) = self.streams.get(&id) else {
            return rejected(format!("stream {id} does not exist"));
        };
        let Some(version) = self.functions.get(&job.function).map(|f| f.latest) else {
            return rejected(format!("function {} does not exist", job.function));
        };
        let room = u64::from(job.options.max_concurrency).saturating_sub(job.counters.running);
        let (function, batched, batch) = (
            job.function.clone(),
            job.options.batch > 1,
            job.options.batch as usize,
        );
        let taken: Vec<FailedItem> = self
            .failed_items
            .range((id, 0)..=(id, u64::MAX))
            .map(|(_, f)| f)
            .filter(|f| f.payload.is_some())
            .take(usize::try_from(room).unwrap_or(usize::MAX))
            .cloned()
            .collect();
        let payloads: Vec<(u64, &[u8])> = taken
            .iter()
            .map(|f| (f.index, f.payload.as_deref().unwrap_or_default()))
            .collect();
        let chunks = chunk_items(&payloads, batch, batched);
        if let Some(refusal) = self.room_for(&chunks, &function) {
            return refusal;
        }
        for f in &taken {
            self.failed_items.remove(&(id, f.index));
            self.touch(ObjKey::Failed(id, f.index));
        }
        let job = self.streams.get_mut(&id).expect("checked above");
        job.version = version;
        job.counters.failed -= taken.len() as u64;
        job.state = StreamState::Running;
        job.reason = None;
        job.finished_ms = None;
        self.touch(ObjKey::Stream(id));
        let tasks = self.enqueue_chunks(now, id, &function, version, chunks, batched, kv);
        self.check_stream_end(id, now);
        CommandResult::StreamRedriven {
            items: taken.len() as u64,
            tasks,
        }
    }
}

/// Groups items into invocations: at most `batch` items and one payload's bytes each.
fn chunk_items<'a>(
    items: &[(u64, &'a [u8])],
    batch: usize,
    batched: bool,
) -> Vec<Vec<(u64, &'a [u8])>> {
    let mut out: Vec<Vec<(u64, &[u8])>> = Vec::new();
    let mut bytes = 0usize;
    for &(index, item) in items {
        let fits = out.last().is_some_and(|c| {
            batched && c.len() < batch && bytes + item.len() < PAYLOAD_BYTES_MAX - 2
        });
        if !fits {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += item.len() + 1;
        out.last_mut().expect("pushed above").push((index, item));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::*;
    use crate::sched::testing::*;
    use crate::sched::*;

    use crate::streams::{StreamItem, StreamState};

    fn items(texts: &[&str]) -> Vec<StreamItem> {
        texts
            .iter()
            .map(|t| StreamItem::Ok(t.as_bytes().to_vec()))
            .collect()
    }

    fn advanced(r: CommandResult) -> Vec<TaskId> {
        match r {
            CommandResult::StreamAdvanced { tasks } => tasks,
            other => panic!("not advanced: {other:?}"),
        }
    }

    fn ok_with(output: &str) -> TaskResult {
        TaskResult {
            output: output.as_bytes().to_vec(),
            ..result(RunStatus::Succeeded)
        }
    }

    fn complete_task(s: &mut Sched, now: u64, id: TaskId, r: &TaskResult) {
        let token = s.task(id).expect("task").token;
        assert_eq!(s.complete(now, id, token, r, &[]), CommandResult::Accepted);
    }

    #[test]
    fn stream_cursor_moves_with_its_tasks_and_never_back() {
        let (mut s, _) = cluster();
        let kv = BTreeMap::new();
        let job = start_stream(&mut s, 1, Some("out/"));
        let tasks =
            advanced(s.stream_advance(3, job, "", "12", 0, &items(&["1", "2"]), false, &kv));
        assert_eq!(tasks.len(), 2);
        let j = s.stream(job).expect("job");
        assert_eq!(
            (j.cursor.as_str(), j.next_item, j.counters.running),
            ("12", 2, 2)
        );
        assert_eq!(j.window.len(), 2);
        // A duplicate of the same advance (a stale driver) is refused and changes nothing.
        let stale = s.stream_advance(3, job, "", "12", 0, &items(&["1", "2"]), false, &kv);
        assert!(matches!(stale, CommandResult::Rejected { .. }), "{stale:?}");
        // So is a cursor that goes back, or stays put while items are claimed.
        for to in ["5", "12"] {
            let back = s.stream_advance(3, job, "12", to, 2, &items(&["3"]), false, &kv);
            assert!(matches!(back, CommandResult::Rejected { .. }), "{back:?}");
        }
        assert_eq!(s.stats().tasks_active, 2);
        assert_eq!(s.stream(job).expect("job").cursor, "12");
        assert_reloads(&mut s, 3);
        // Completions write each item's result; the exhausted source then ends the job.
        complete_task(&mut s, 4, tasks[0], &ok_with("\"a\""));
        complete_task(&mut s, 4, tasks[1], &ok_with("\"b\""));
        let puts = s.take_kv_puts();
        assert_eq!(
            puts,
            vec![
                ("out/000000000000".to_string(), b"\"a\"".to_vec()),
                ("out/000000000001".to_string(), b"\"b\"".to_vec())
            ]
        );
        assert_eq!(s.stream(job).expect("job").state, StreamState::Running);
        advanced(s.stream_advance(5, job, "12", "12", 2, &[], true, &kv));
        let j = s.stream(job).expect("job");
        assert_eq!(
            (j.state, j.counters.succeeded, j.counters.total),
            (StreamState::Succeeded, 2, Some(2))
        );
        let late = s.stream_advance(6, job, "12", "20", 2, &items(&["x"]), true, &kv);
        assert!(matches!(late, CommandResult::Rejected { .. }));
        assert_reloads(&mut s, 6);
    }

    #[test]
    fn stream_batches_retry_fail_and_redrive_with_a_new_version() {
        let (mut s, digest) = cluster();
        let kv = BTreeMap::new();
        let job = start_stream(&mut s, 2, Some("r/"));
        let mut its = items(&["{\"n\":1}", "2", "3"]);
        its.push(StreamItem::Bad("line 4 is not JSON".into()));
        let tasks = advanced(s.stream_advance(3, job, "", "40", 0, &its, true, &kv));
        assert_eq!(tasks.len(), 2, "items 0-1 and 2 in two invocations");
        assert_eq!(s.task(tasks[0]).expect("t").payload, b"[{\"n\":1},2]");
        assert_eq!(s.task(tasks[1]).expect("t").payload, b"[3]");
        complete_task(&mut s, 4, tasks[0], &ok_with("[10, {\"x\":2}]"));
        assert_eq!(
            s.take_kv_puts(),
            vec![
                ("r/000000000000".to_string(), b"10".to_vec()),
                ("r/000000000001".to_string(), b"{\"x\":2}".to_vec())
            ]
        );
        // The second batch fails, is retried after the back-off, fails again: failed.
        complete_task(&mut s, 5, tasks[1], &result(RunStatus::Failed));
        assert_eq!(s.stream(job).expect("job").counters.retried, 1);
        s.heartbeat(200, &hb(1, vec![]));
        s.heartbeat(200, &hb(2, vec![]));
        s.tick(200);
        complete_task(&mut s, 201, tasks[1], &result(RunStatus::Failed));
        let j = s.stream(job).expect("job");
        assert_eq!(j.state, StreamState::Failed);
        assert_eq!((j.counters.succeeded, j.counters.failed), (2, 2));
        let failed: Vec<(u64, Option<Vec<u8>>)> = j
            .failed_items
            .iter()
            .map(|f| (f.index, f.payload.clone()))
            .collect();
        assert_eq!(failed, vec![(2, Some(b"3".to_vec())), (3, None)]);
        assert_reloads(&mut s, 201);
        // A fix, then redrive: the kept payload runs again with the new version.
        assert_eq!(
            s.deploy(202, &spec("f", &digest, 2, 2)),
            CommandResult::Deployed { version: 2 }
        );
        let tasks = match s.stream_redrive(203, job, &kv) {
            CommandResult::StreamRedriven { items: 1, tasks } => tasks,
            other => panic!("{other:?}"),
        };
        assert_eq!(s.task(tasks[0]).map(|t| t.version), Some(2));
        assert_eq!(s.stream(job).expect("job").state, StreamState::Running);
        complete_task(&mut s, 204, tasks[0], &ok_with("[30]"));
        let j = s.stream(job).expect("job");
        // The unreadable item stays failed: the job fails, with one failure left.
        assert_eq!(
            (j.state, j.counters.succeeded, j.counters.failed),
            (StreamState::Failed, 3, 1)
        );
        assert_eq!(s.take_kv_puts().len(), 1);
        assert_reloads(&mut s, 204);
    }

    #[test]
    fn stream_items_of_a_lost_node_run_again_and_count_once() {
        let (mut s, _) = cluster();
        let kv = BTreeMap::new();
        let mut job_req = start_stream(&mut s, 1, None);
        let tasks = advanced(s.stream_advance(3, job_req, "", "1", 0, &items(&["1"]), true, &kv));
        let first = s.task(tasks[0]).and_then(|t| t.node).expect("placed");
        let other = if first == 1 { 2 } else { 1 };
        s.heartbeat(NODE_LEASE_MS, &hb(other, vec![]));
        s.tick(NODE_LEASE_MS + 2);
        assert_eq!(s.task(tasks[0]).and_then(|t| t.node), Some(other));
        complete_task(&mut s, NODE_LEASE_MS + 3, tasks[0], &ok_with("1"));
        let j = s.stream(job_req).expect("job");
        assert_eq!(
            (j.state, j.counters.succeeded, j.counters.duplicates),
            (StreamState::Succeeded, 1, 1)
        );
        assert_reloads(&mut s, NODE_LEASE_MS + 3);
        // A tolerated failure count ends the job as soon as it is passed; cancel stops one.
        job_req = start_stream(&mut s, 1, None);
        assert_eq!(
            s.stream_cancel(NODE_LEASE_MS + 4, job_req),
            CommandResult::Accepted
        );
        let refused = s.stream_advance(
            NODE_LEASE_MS + 5,
            job_req,
            "",
            "1",
            0,
            &items(&["1"]),
            true,
            &kv,
        );
        assert!(matches!(refused, CommandResult::Rejected { .. }));
        assert_eq!(
            s.stream(job_req).map(|j| j.state),
            Some(StreamState::Cancelled)
        );
        assert_reloads(&mut s, NODE_LEASE_MS + 5);
    }
}
