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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bincode::Options as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::functions::{
    chunk_count, CacheOutcome, CodeBlob, Dependency, DependencyState, FunctionRecord, FunctionSpec,
    FunctionVersion, Heartbeat, Idempotency, IdempotencyInput, LedgerEntry, MissReason, NodeRecord,
    RunStatus, SchedStats, Task, TaskFilter, TaskId, TaskResult, TaskState, ACTIVE_TASKS_MAX,
    ASSIGNMENT_GRACE_MS, CODE_BLOBS_MAX, CODE_TOTAL_BYTES_MAX, CODE_UNREFERENCED_TTL_MS,
    FINISHED_TASKS_MAX, FUNCTIONS_MAX, LEDGER_BYTES_MAX, LEDGER_ENTRIES_MAX, NODE_FORGET_MS,
    NODE_LEASE_MS, RESULT_RETENTION_MS, RETRY_BACKOFF_MS_MAX, TASK_BYTES_MAX, TRACKED_READS_MAX,
    VERSIONS_KEPT,
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

const OBJ_META: u8 = b'm';
/// A function record with its identity.
const OBJ_FUNCTION: u8 = b'i';
/// A function record as stored before functions had identities: read (as identity 0), and
/// deleted whenever the function is written again under [`OBJ_FUNCTION`].
const OBJ_FUNCTION_LEGACY: u8 = b'f';
/// The last function identity given.
const OBJ_FUNCTION_META: u8 = b'g';
const OBJ_CODE: u8 = b'c';
const OBJ_CHUNK: u8 = b'k';
const OBJ_TASK: u8 = b't';
const OBJ_NODE: u8 = b'n';
const OBJ_LEDGER: u8 = b'l';
const OBJ_STREAM_META: u8 = b'r';
const OBJ_STREAM: u8 = b's';
const OBJ_STREAM_WINDOW: u8 = b'w';
const OBJ_STREAM_FAILED: u8 = b'x';

mod streams;

/// Scalars of the scheduler, persisted as one object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct SchedMeta {
    /// The last task id given (ids start at 1).
    next_task: u64,
    next_token: u64,
    next_seq: u64,
    last_gc_ms: u64,
}

/// A persisted object that changed during the current command.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum ObjKey {
    Meta,
    Function(String),
    FunctionMeta,
    Code(String),
    Chunk(String, u32),
    Task(TaskId),
    Node(NodeId),
    Ledger(String),
    StreamMeta,
    Stream(StreamId),
    /// A stream's invocation in flight, by the index of its first item.
    Window(StreamId, u64),
    /// A stream's failed item, by its index.
    Failed(StreamId, u64),
}

impl ObjKey {
    fn encode(&self) -> Vec<u8> {
        match self {
            ObjKey::Meta => vec![OBJ_META],
            ObjKey::Function(name) => prefixed(OBJ_FUNCTION, name.as_bytes()),
            ObjKey::FunctionMeta => vec![OBJ_FUNCTION_META],
            ObjKey::Code(digest) => prefixed(OBJ_CODE, digest.as_bytes()),
            ObjKey::Chunk(digest, index) => {
                let mut k = prefixed(OBJ_CHUNK, digest.as_bytes());
                k.extend_from_slice(&index.to_be_bytes());
                k
            }
            ObjKey::Task(id) => prefixed(OBJ_TASK, &id.to_be_bytes()),
            ObjKey::Node(id) => prefixed(OBJ_NODE, &id.to_be_bytes()),
            ObjKey::Ledger(key) => prefixed(OBJ_LEDGER, key.as_bytes()),
            ObjKey::StreamMeta => vec![OBJ_STREAM_META],
            ObjKey::Stream(id) => prefixed(OBJ_STREAM, &id.to_be_bytes()),
            ObjKey::Window(id, first) => pair_key(OBJ_STREAM_WINDOW, *id, *first),
            ObjKey::Failed(id, index) => pair_key(OBJ_STREAM_FAILED, *id, *index),
        }
    }
}

fn prefixed(tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(rest.len() + 1);
    k.push(tag);
    k.extend_from_slice(rest);
    k
}

fn pair_key(tag: u8, a: u64, b: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(tag);
    k.extend_from_slice(&a.to_be_bytes());
    k.extend_from_slice(&b.to_be_bytes());
    k
}

/// [`FunctionRecord`] as stored under [`OBJ_FUNCTION_LEGACY`].
#[derive(Serialize, Deserialize)]
struct LegacyFunctionRecord {
    name: String,
    versions: Vec<LegacyFunctionVersion>,
    latest: u64,
    created_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct LegacyFunctionVersion {
    version: u64,
    spec: FunctionSpec,
    deployed_ms: u64,
}

impl From<LegacyFunctionRecord> for FunctionRecord {
    fn from(r: LegacyFunctionRecord) -> Self {
        FunctionRecord {
            name: r.name,
            id: 0,
            versions: r
                .versions
                .into_iter()
                .map(|v| FunctionVersion {
                    version: v.version,
                    function_id: 0,
                    spec: v.spec,
                    deployed_ms: v.deployed_ms,
                })
                .collect(),
            latest: r.latest,
            created_ms: r.created_ms,
        }
    }
}

fn codec() -> impl bincode::Options {
    bincode::DefaultOptions::new().with_fixint_encoding()
}

fn enc<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing plain data structs into a Vec cannot fail.
    codec()
        .serialize(value)
        .expect("scheduler objects always serialize")
}

fn dec<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    codec()
        .with_limit(bytes.len() as u64)
        .deserialize(bytes)
        .map_err(|e| format!("{what} does not decode: {e}"))
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

/// One persisted object change: `None` deletes the key.
pub type ObjChange = (Vec<u8>, Option<Vec<u8>>);

impl Sched {
    // ----- loading, persistence, digests -------------------------------------------------

    /// Rebuilds the state from its persisted objects, as of state-machine time `now`.
    pub fn from_objects(
        objects: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        now: u64,
    ) -> Result<Self, String> {
        let mut s = Sched::default();
        for (key, value) in objects {
            let (&tag, rest) = key.split_first().ok_or("empty object key")?;
            let text = || String::from_utf8(rest.to_vec()).map_err(|_| "object key not UTF-8");
            let id = || -> Result<u64, String> {
                Ok(u64::from_be_bytes(
                    rest.try_into().map_err(|_| "object id not 8 bytes")?,
                ))
            };
            match tag {
                OBJ_META => s.meta = dec(&value, "scheduler meta")?,
                OBJ_FUNCTION_META => s.next_function = dec(&value, "function meta")?,
                OBJ_FUNCTION | OBJ_FUNCTION_LEGACY => {
                    let f: FunctionRecord = if tag == OBJ_FUNCTION {
                        dec(&value, "function")?
                    } else {
                        dec::<LegacyFunctionRecord>(&value, "function")?.into()
                    };
                    if f.name != text()? {
                        return Err(format!("function {:?} under another key", f.name));
                    }
                    if f.versions.iter().any(|v| v.function_id != f.id) {
                        return Err(format!("function {:?} holds another's version", f.name));
                    }
                    let name = f.name.clone();
                    if s.functions.insert(name.clone(), f).is_some() {
                        return Err(format!("function {name:?} stored twice"));
                    }
                }
                OBJ_CODE => {
                    let c: CodeBlob = dec(&value, "code blob")?;
                    if c.digest != text()? {
                        return Err(format!("code blob {} under another key", c.digest));
                    }
                    s.code.insert(c.digest.clone(), c);
                }
                OBJ_CHUNK => {
                    if rest.len() < 4 {
                        return Err("short chunk key".into());
                    }
                    let (digest, index) = rest.split_at(rest.len() - 4);
                    let digest = String::from_utf8(digest.to_vec()).map_err(|_| "chunk key")?;
                    let index = u32::from_be_bytes(index.try_into().map_err(|_| "chunk key")?);
                    s.code_bytes += value.len() as u64;
                    s.chunks.insert((digest, index), Arc::new(value));
                }
                OBJ_TASK => {
                    let t: Task = dec(&value, "task")?;
                    if t.id != id()? {
                        return Err(format!("task {} under another key", t.id));
                    }
                    s.tasks.insert(t.id, t);
                }
                OBJ_NODE => {
                    let n: NodeRecord = dec(&value, "node")?;
                    if n.id != id()? {
                        return Err(format!("node {} under another key", n.id));
                    }
                    s.nodes.insert(n.id, n);
                }
                OBJ_LEDGER => {
                    let e: LedgerEntry = dec(&value, "ledger entry")?;
                    if e.key != text()? {
                        return Err(format!("ledger entry {} under another key", e.key));
                    }
                    if e.done {
                        s.ledger_order.insert((e.recorded_ms, e.key.clone()));
                        s.ledger_bytes += e.bytes();
                    }
                    s.ledger.insert(e.key.clone(), e);
                }
                OBJ_STREAM_META => s.next_stream = dec(&value, "stream meta")?,
                OBJ_STREAM => {
                    let j: StreamJob = dec(&value, "stream job")?;
                    if j.id != id()? || !j.window.is_empty() || !j.failed_items.is_empty() {
                        return Err(format!("stream {} under another key", j.id));
                    }
                    s.streams.insert(j.id, j);
                }
                OBJ_STREAM_WINDOW | OBJ_STREAM_FAILED => {
                    if rest.len() != 16 {
                        return Err("stream entry key not 16 bytes".into());
                    }
                    let job = u64::from_be_bytes(rest[..8].try_into().map_err(|_| "key")?);
                    let index = u64::from_be_bytes(rest[8..].try_into().map_err(|_| "key")?);
                    if tag == OBJ_STREAM_WINDOW {
                        let w: WindowEntry = dec(&value, "stream window entry")?;
                        if w.items.first().map(|i| i.index) != Some(index) {
                            return Err(format!("stream {job} window entry under another key"));
                        }
                        s.windows.insert((job, index), w);
                    } else {
                        let f: FailedItem = dec(&value, "stream failed item")?;
                        if f.index != index {
                            return Err(format!("stream {job} failed item under another key"));
                        }
                        s.failed_items.insert((job, index), f);
                    }
                }
                other => return Err(format!("unknown object tag {other:#04x}")),
            }
        }
        for ((digest, _), _) in s.chunks.iter() {
            if !s.code.contains_key(digest) {
                return Err(format!("chunk of unknown code blob {digest}"));
            }
        }
        if let Some(f) = s.functions.values().find(|f| f.id > s.next_function) {
            return Err(format!(
                "function {:?} has identity {} past the last one given",
                f.name, f.id
            ));
        }
        s.rebuild_stream_index()?;
        let ids: Vec<TaskId> = s.tasks.keys().copied().collect();
        for id in ids {
            if id == 0 || id > s.meta.next_task {
                return Err(format!("task {id} past the last id given"));
            }
            let task = &s.tasks[&id];
            s.task_bytes += task.bytes();
            match task.state {
                TaskState::Queued => {
                    if task.not_before_ms > now {
                        s.delayed.insert((task.not_before_ms, id));
                    } else {
                        let f = task.function.clone();
                        s.queues.entry(f).or_default().insert((task.queue_seq, id));
                    }
                }
                TaskState::Assigned | TaskState::Running => {
                    let node = task.node.ok_or(format!("task {id} assigned to no node"))?;
                    let (f, mem, deadline) = (
                        task.function.clone(),
                        task.memory_bytes,
                        assignment_deadline(task),
                    );
                    *s.active.entry(f).or_default() += 1;
                    s.by_node.entry(node).or_default().insert(id);
                    *s.node_memory.entry(node).or_default() += mem;
                    s.deadlines.insert((deadline, id));
                }
                _ => {
                    let at = task
                        .finished_ms
                        .ok_or(format!("task {id} finished at no time"))?;
                    s.finished.insert((at, id));
                }
            }
        }
        Ok(s)
    }

    /// Every persisted object, in key order.
    pub fn objects(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        out.push((ObjKey::Meta.encode(), enc(&self.meta)));
        if self.next_function > 0 {
            out.push((ObjKey::FunctionMeta.encode(), enc(&self.next_function)));
        }
        for (name, f) in &self.functions {
            out.push((ObjKey::Function(name.clone()).encode(), enc(f)));
        }
        for (digest, c) in &self.code {
            out.push((ObjKey::Code(digest.clone()).encode(), enc(c)));
        }
        for ((digest, index), bytes) in &self.chunks {
            out.push((
                ObjKey::Chunk(digest.clone(), *index).encode(),
                bytes.to_vec(),
            ));
        }
        for (id, t) in &self.tasks {
            out.push((ObjKey::Task(*id).encode(), enc(t)));
        }
        for (id, n) in &self.nodes {
            out.push((ObjKey::Node(*id).encode(), enc(n)));
        }
        for (key, e) in &self.ledger {
            out.push((ObjKey::Ledger(key.clone()).encode(), enc(e)));
        }
        if self.next_stream > 0 {
            out.push((ObjKey::StreamMeta.encode(), enc(&self.next_stream)));
        }
        for (id, j) in &self.streams {
            out.push((ObjKey::Stream(*id).encode(), enc(j)));
        }
        for ((id, first), w) in &self.windows {
            out.push((ObjKey::Window(*id, *first).encode(), enc(w)));
        }
        for ((id, index), f) in &self.failed_items {
            out.push((ObjKey::Failed(*id, *index).encode(), enc(f)));
        }
        out.sort();
        out
    }

    /// Feeds every persisted object into `hasher`.
    pub fn hash_into(&self, hasher: &mut Sha256) {
        for (k, v) in self.objects() {
            hasher.update((k.len() as u64).to_be_bytes());
            hasher.update(&k);
            hasher.update((v.len() as u64).to_be_bytes());
            hasher.update(&v);
        }
    }

    /// The objects changed since the last call, encoded: put or delete.
    pub fn take_changes(&mut self) -> Vec<ObjChange> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut legacy = Vec::new();
        let mut changes: Vec<ObjChange> = dirty
            .into_iter()
            .map(|key| {
                let value = match &key {
                    ObjKey::Meta => Some(enc(&self.meta)),
                    ObjKey::FunctionMeta => Some(enc(&self.next_function)),
                    ObjKey::Function(n) => {
                        // A record read from the layout without identities goes with its
                        // first write (a delete of a key that is not there costs nothing).
                        legacy.push((prefixed(OBJ_FUNCTION_LEGACY, n.as_bytes()), None));
                        self.functions.get(n).map(enc)
                    }
                    ObjKey::Code(d) => self.code.get(d).map(enc),
                    ObjKey::Chunk(d, i) => self.chunks.get(&(d.clone(), *i)).map(|b| b.to_vec()),
                    ObjKey::Task(id) => self.tasks.get(id).map(enc),
                    ObjKey::Node(id) => self.nodes.get(id).map(enc),
                    ObjKey::Ledger(k) => self.ledger.get(k).map(enc),
                    ObjKey::StreamMeta => Some(enc(&self.next_stream)),
                    ObjKey::Stream(id) => self.streams.get(id).map(enc),
                    ObjKey::Window(id, first) => self.windows.get(&(*id, *first)).map(enc),
                    ObjKey::Failed(id, index) => self.failed_items.get(&(*id, *index)).map(enc),
                };
                (key.encode(), value)
            })
            .collect();
        changes.extend(legacy);
        changes
    }

    fn touch(&mut self, key: ObjKey) {
        self.dirty.insert(key);
    }

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

    /// Tasks assigned to or running on `node`.
    pub fn tasks_on(&self, node: NodeId) -> Vec<&Task> {
        self.by_node
            .get(&node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tasks.get(id))
            .collect()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    /// Nodes whose lease is valid at `now`, in id order.
    pub fn live_nodes(&self, now: u64) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| is_live(n, now))
            .map(|n| n.id)
            .collect()
    }

    /// Tasks assigned or running on `node`.
    pub fn load_of(&self, node: NodeId) -> usize {
        self.by_node.get(&node).map_or(0, BTreeSet::len)
    }

    pub fn code_blob(&self, digest: &str) -> Option<&CodeBlob> {
        self.code.get(digest)
    }

    /// The whole archive of a complete code blob.
    pub fn code_archive(&self, digest: &str) -> Option<Vec<u8>> {
        let blob = self.code.get(digest).filter(|b| b.complete)?;
        let mut out = Vec::with_capacity(usize::try_from(blob.total_bytes).ok()?);
        for i in 0..blob.chunks {
            out.extend_from_slice(self.chunks.get(&(digest.to_string(), i))?);
        }
        Some(out)
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

    /// Stores one code chunk.
    pub fn code_chunk(
        &mut self,
        now: u64,
        digest: &str,
        total_bytes: u64,
        index: u32,
        bytes: &[u8],
    ) -> CommandResult {
        let chunks = chunk_count(total_bytes);
        match self.code.get(digest) {
            Some(blob) if blob.complete => return CommandResult::ChunkStored { complete: true },
            Some(blob) if blob.total_bytes != total_bytes => {
                return rejected(format!(
                    "code {digest} is being uploaded with {} bytes, not {total_bytes}",
                    blob.total_bytes
                ))
            }
            Some(_) => {}
            None => {
                if self.code.len() >= CODE_BLOBS_MAX {
                    return rejected(format!("the cluster holds {CODE_BLOBS_MAX} code archives"));
                }
                if self.code_bytes + total_bytes > CODE_TOTAL_BYTES_MAX {
                    return rejected(format!(
                        "the cluster's code store is full ({} of {CODE_TOTAL_BYTES_MAX} bytes); remove unused functions",
                        self.code_bytes
                    ));
                }
                self.code.insert(
                    digest.to_string(),
                    CodeBlob {
                        digest: digest.to_string(),
                        total_bytes,
                        chunks,
                        received: 0,
                        complete: false,
                        created_ms: now,
                    },
                );
            }
        }
        let key = (digest.to_string(), index);
        if !self.chunks.contains_key(&key) {
            self.code_bytes += bytes.len() as u64;
            self.chunks.insert(key, Arc::new(bytes.to_vec()));
            self.touch(ObjKey::Chunk(digest.to_string(), index));
            if let Some(blob) = self.code.get_mut(digest) {
                blob.received += 1;
            }
        }
        self.touch(ObjKey::Code(digest.to_string()));
        let blob = &self.code[digest];
        if blob.received < blob.chunks {
            return CommandResult::ChunkStored { complete: false };
        }
        let mut hasher = Sha256::new();
        for i in 0..blob.chunks {
            hasher.update(
                &**self
                    .chunks
                    .get(&(digest.to_string(), i))
                    .expect("all received"),
            );
        }
        if hex::encode(hasher.finalize()) != digest.to_ascii_lowercase() {
            self.drop_code(digest);
            return rejected(format!(
                "the uploaded code does not match its digest {digest}; upload it again"
            ));
        }
        if let Some(blob) = self.code.get_mut(digest) {
            blob.complete = true;
        }
        CommandResult::ChunkStored { complete: true }
    }

    fn drop_code(&mut self, digest: &str) {
        let Some(blob) = self.code.remove(digest) else {
            return;
        };
        self.touch(ObjKey::Code(digest.to_string()));
        for i in 0..blob.chunks {
            if let Some(bytes) = self.chunks.remove(&(digest.to_string(), i)) {
                self.code_bytes -= bytes.len() as u64;
                self.touch(ObjKey::Chunk(digest.to_string(), i));
            }
        }
    }

    /// Makes a new version of `spec.name`.
    pub fn deploy(&mut self, now: u64, spec: &FunctionSpec) -> CommandResult {
        if !self.code.get(&spec.code_digest).is_some_and(|b| b.complete) {
            return rejected(format!(
                "code {} is not uploaded (or its upload is incomplete)",
                spec.code_digest
            ));
        }
        if !self.functions.contains_key(&spec.name) && self.functions.len() >= FUNCTIONS_MAX {
            return rejected(format!("the cluster holds {FUNCTIONS_MAX} functions"));
        }
        if !self.functions.contains_key(&spec.name) {
            self.next_function += 1;
            self.touch(ObjKey::FunctionMeta);
            let record = FunctionRecord {
                name: spec.name.clone(),
                id: self.next_function,
                versions: Vec::new(),
                latest: 0,
                created_ms: now,
            };
            self.functions.insert(spec.name.clone(), record);
        }
        let record = self
            .functions
            .get_mut(&spec.name)
            .expect("the function exists or was just made");
        let version = record.latest + 1;
        record.versions.push(FunctionVersion {
            version,
            function_id: record.id,
            spec: spec.clone(),
            deployed_ms: now,
        });
        record.latest = version;
        while record.versions.len() > VERSIONS_KEPT {
            record.versions.remove(0);
        }
        self.touch(ObjKey::Function(spec.name.clone()));
        CommandResult::Deployed { version }
    }

    /// Removes a function: every task of it not finished fails (a task names its function
    /// by name and version, which a function made later under the same name reuses, so none
    /// may outlive the removal), its ledger entries go, and no node is counted warm for it.
    pub fn remove(&mut self, now: u64, name: &str) -> CommandResult {
        if self.functions.remove(name).is_none() {
            return rejected(format!("function {name} does not exist"));
        }
        self.touch(ObjKey::Function(name.to_string()));
        let placed: Vec<TaskId> = self
            .by_node
            .values()
            .flatten()
            .filter(|id| self.tasks.get(id).is_some_and(|t| t.function == name))
            .copied()
            .collect();
        for id in placed {
            self.release(id);
            let result = failure_result("the function was removed");
            self.finish(id, TaskState::Failed, Some(result), now);
        }
        // A stream names its function by name and version too: it ends with its function
        // rather than feed its items to a function made later under the same name.
        let streams: Vec<StreamId> = self
            .streams
            .values()
            .filter(|j| j.function == name && j.state == crate::streams::StreamState::Running)
            .map(|j| j.id)
            .collect();
        for id in streams {
            let reason = format!("function {name} was removed");
            self.end_stream(id, crate::streams::StreamState::Failed, Some(reason), now);
        }
        for n in self.nodes.values_mut() {
            if n.warm.iter().any(|w| w.function == name) {
                n.warm.retain(|w| w.function != name);
                self.dirty.insert(ObjKey::Node(n.id));
            }
        }
        let mut queued: Vec<TaskId> = self
            .queues
            .remove(name)
            .into_iter()
            .flatten()
            .map(|(_, id)| id)
            .collect();
        let delayed: Vec<(u64, TaskId)> = self
            .delayed
            .iter()
            .filter(|(_, id)| self.tasks.get(id).is_some_and(|t| t.function == name))
            .copied()
            .collect();
        for entry in delayed {
            self.delayed.remove(&entry);
            queued.push(entry.1);
        }
        for id in queued {
            let result = failure_result("the function was removed");
            self.finish(id, TaskState::Failed, Some(result), now);
        }
        let keys: Vec<String> = self
            .ledger
            .values()
            .filter(|e| e.function == name)
            .map(|e| e.key.clone())
            .collect();
        for k in keys {
            self.ledger_remove(&k);
        }
        CommandResult::Removed
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
        let mut cache = None;
        let mut ledger = None;
        if let Some(idem) = &spec.idempotency {
            let input = idempotency.cloned().unwrap_or_default();
            let payload_hash = hex::encode(Sha256::digest(payload));
            let key = ledger_key(function, input.key.as_deref(), &payload_hash);
            let deps = match dependency_states(idem, &input, kv) {
                Ok(d) => d,
                Err(reason) => return rejected(reason),
            };
            let reason = match self.ledger.get(&key) {
                None => MissReason::FirstRun,
                Some(e) if !e.done => {
                    if self
                        .tasks
                        .get(&e.task)
                        .is_some_and(|t| !t.state.is_finished())
                    {
                        return CommandResult::Submitted {
                            task: e.task,
                            node: None,
                            token: 0,
                            cache: Some(CacheOutcome::Joined { task: e.task }),
                        };
                    }
                    MissReason::PreviousRunLost
                }
                Some(e) => match decide(e, idem, version, &payload_hash, &deps, kv, now) {
                    None => return self.answer_from_ledger(now, &key, payload, sync),
                    Some(reason) => reason,
                },
            };
            cache = Some(CacheOutcome::Miss { reason });
            ledger = Some((key, payload_hash, deps));
        }
        if self.tasks.len() - self.finished.len() >= ACTIVE_TASKS_MAX {
            return CommandResult::Throttled {
                reason: format!("the cluster has {ACTIVE_TASKS_MAX} unfinished tasks"),
            };
        }
        let new_bytes = (payload.len() + function.len() + 256) as u64;
        while self.task_bytes + new_bytes > TASK_BYTES_MAX {
            let Some(&(_, id)) = self.finished.first() else {
                break;
            };
            self.purge(id);
        }
        if self.task_bytes + new_bytes > TASK_BYTES_MAX {
            return CommandResult::Throttled {
                reason: "the cluster's task store is full".into(),
            };
        }
        let active = self.active.get(function).copied().unwrap_or(0);
        let queued = self.queues.get(function).map_or(0, BTreeSet::len);
        let can_run = active < spec.max_concurrency && queued == 0;
        if queue_bound && !can_run && queued >= spec.queue_max as usize {
            return CommandResult::Throttled {
                reason: format!(
                    "function {function} runs {active} of at most {} and {queued} wait (queue bound {})",
                    spec.max_concurrency, spec.queue_max
                ),
            };
        }
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
            cache: cache.clone(),
            ledger_key: ledger.as_ref().map(|(k, _, _)| k.clone()),
            request_id: None,
        };
        self.task_bytes += task.bytes();
        self.tasks.insert(id, task);
        self.touch(ObjKey::Task(id));
        self.touch(ObjKey::Meta);
        if let Some((key, payload_hash, dependencies)) = ledger {
            self.ledger_remove(&key);
            let entry = LedgerEntry {
                key: key.clone(),
                function: function.to_string(),
                version,
                payload_hash,
                task: id,
                done: false,
                succeeded: false,
                dependencies,
                result: None,
                recorded_ms: now,
            };
            self.ledger.insert(key.clone(), entry);
            self.touch(ObjKey::Ledger(key));
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

    /// A read-only hit check: the ledger entry that would answer this invocation right now,
    /// if any (the same decision [`Sched::submit`] makes, without changing anything). A
    /// leader that has confirmed its leadership may answer a hit from this without a log
    /// entry; everything else goes through `submit`.
    pub fn cached(
        &self,
        now: u64,
        function: &str,
        version: Option<u64>,
        payload: &[u8],
        idempotency: Option<&IdempotencyInput>,
        kv: &BTreeMap<String, KvEntry>,
    ) -> Option<&LedgerEntry> {
        let record = self.functions.get(function)?;
        let version = version.unwrap_or(record.latest);
        let idem = record.version(version)?.spec.idempotency.as_ref()?;
        let input = idempotency.cloned().unwrap_or_default();
        let payload_hash = hex::encode(Sha256::digest(payload));
        let key = ledger_key(function, input.key.as_deref(), &payload_hash);
        let deps = dependency_states(idem, &input, kv).ok()?;
        let e = self.ledger.get(&key)?;
        if !e.done {
            return None;
        }
        match decide(e, idem, version, &payload_hash, &deps, kv, now) {
            None => Some(e),
            Some(_) => None,
        }
    }

    /// A finished task carrying the ledger's result, without running anything.
    fn answer_from_ledger(
        &mut self,
        now: u64,
        key: &str,
        payload: &[u8],
        sync: bool,
    ) -> CommandResult {
        let e = self.ledger[key].clone();
        self.meta.next_task += 1;
        let id = self.meta.next_task;
        self.touch(ObjKey::Meta);
        let state = if e.succeeded {
            TaskState::Succeeded
        } else {
            TaskState::Failed
        };
        let source = CacheOutcome::Hit {
            source_task: e.task,
        };
        let task = Task {
            id,
            function: e.function.clone(),
            version: e.version,
            payload: payload.to_vec(),
            sync,
            state,
            attempts: 0,
            failures: 0,
            node: None,
            token: 0,
            submitted_ms: now,
            assigned_ms: None,
            started_ms: None,
            finished_ms: Some(now),
            not_before_ms: now,
            queue_seq: 0,
            memory_bytes: 0,
            timeout_ms: 0,
            result: e.result.clone(),
            dead_letter: false,
            cache: Some(source.clone()),
            ledger_key: None,
            request_id: None,
        };
        self.task_bytes += task.bytes();
        self.tasks.insert(id, task);
        self.finished.insert((now, id));
        self.touch(ObjKey::Task(id));
        CommandResult::Submitted {
            task: id,
            node: None,
            token: 0,
            cache: Some(source),
        }
    }

    /// Forgets the finished ledger entries of `function`.
    pub fn purge_cache(&mut self, name: &str) -> CommandResult {
        if !self.functions.contains_key(name) {
            return rejected(format!("function {name} does not exist"));
        }
        let keys: Vec<String> = self
            .ledger
            .values()
            .filter(|e| e.function == name && e.done)
            .map(|e| e.key.clone())
            .collect();
        for k in &keys {
            self.ledger_remove(k);
        }
        CommandResult::Purged {
            entries: keys.len() as u64,
        }
    }

    fn ledger_remove(&mut self, key: &str) {
        if let Some(e) = self.ledger.remove(key) {
            if e.done {
                self.ledger_order.remove(&(e.recorded_ms, e.key.clone()));
                self.ledger_bytes -= e.bytes();
            }
            self.touch(ObjKey::Ledger(key.to_string()));
        }
    }

    /// Records the end of a ledger run (at the task's final state).
    fn ledger_finish(&mut self, id: TaskId, now: u64) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let Some(key) = task.ledger_key.clone() else {
            return;
        };
        let succeeded = task.state == TaskState::Succeeded;
        let result = task.result.clone();
        let cache_failures = self
            .functions
            .get(&task.function)
            .and_then(|f| f.version(task.version))
            .and_then(|v| v.spec.idempotency.as_ref())
            .is_some_and(|i| i.cache_failures);
        let Some(e) = self.ledger.get_mut(&key) else {
            return;
        };
        if e.task != id || e.done {
            return;
        }
        e.done = true;
        e.succeeded = succeeded;
        e.result = if succeeded || cache_failures {
            result
        } else {
            None
        };
        e.recorded_ms = now;
        let bytes = e.bytes();
        self.ledger_order.insert((now, key.clone()));
        self.ledger_bytes += bytes;
        self.touch(ObjKey::Ledger(key));
        while self.ledger_order.len() > LEDGER_ENTRIES_MAX || self.ledger_bytes > LEDGER_BYTES_MAX {
            let Some((_, oldest)) = self.ledger_order.first().cloned() else {
                break;
            };
            self.ledger_remove(&oldest);
        }
    }

    /// Records a worker's report and places what its capacity allows.
    pub fn heartbeat(&mut self, now: u64, hb: &Heartbeat) -> CommandResult {
        let mut warm = hb.warm.clone();
        warm.sort_by(|a, b| (&a.function, a.version).cmp(&(&b.function, b.version)));
        warm.dedup_by(|a, b| a.function == b.function && a.version == b.version);
        // A report made before the node saw a removal names what no longer exists.
        warm.retain(|w| {
            w.idle > 0
                && self
                    .functions
                    .get(&w.function)
                    .is_some_and(|f| f.version(w.version).is_some())
        });
        let record = NodeRecord {
            id: hb.node,
            last_heartbeat_ms: now,
            slots: hb.slots.clamp(1, 10_000),
            memory_budget_bytes: hb.memory_budget_bytes,
            warm_memory_bytes: hb.warm_memory_bytes,
            warm,
        };
        self.nodes.insert(hb.node, record);
        self.touch(ObjKey::Node(hb.node));
        for &(id, token) in &hb.running {
            if let Some(t) = self.tasks.get_mut(&id) {
                if t.state == TaskState::Assigned && t.token == token && t.node == Some(hb.node) {
                    t.state = TaskState::Running;
                    t.started_ms = Some(now);
                    self.dirty.insert(ObjKey::Task(id));
                }
            }
        }
        self.fill(now);
        CommandResult::Accepted
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

    /// Adds a finished run's tracked reads to its ledger entry.
    fn record_reads(&mut self, id: TaskId, reads: &[(String, u64)]) {
        let Some(key) = self.tasks.get(&id).and_then(|t| t.ledger_key.clone()) else {
            return;
        };
        let track = self
            .ledger
            .get(&key)
            .and_then(|e| self.functions.get(&e.function)?.version(e.version))
            .and_then(|v| v.spec.idempotency.as_ref())
            .is_some_and(|i| i.track_reads);
        let Some(e) = self.ledger.get_mut(&key) else {
            return;
        };
        if !track || e.task != id || !e.done || reads.is_empty() {
            return;
        }
        let before = e.bytes();
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for (k, v) in reads.iter().take(TRACKED_READS_MAX) {
            // The first version a run saw of a key is the one its result depends on.
            if seen.insert(k) {
                e.dependencies.push(DependencyState::Read {
                    key: k.clone(),
                    version: *v,
                });
            }
        }
        let after = e.bytes();
        self.ledger_bytes = self.ledger_bytes - before + after;
        self.touch(ObjKey::Ledger(key));
    }

    /// The ledger, for reads.
    pub fn ledger_entries(&self, function: &str) -> Vec<&LedgerEntry> {
        self.ledger
            .values()
            .filter(|e| e.function == function)
            .collect()
    }

    // ----- internals ---------------------------------------------------------------------

    fn next_seq(&mut self) -> u64 {
        self.meta.next_seq += 1;
        self.touch(ObjKey::Meta);
        self.meta.next_seq
    }

    /// A live node with a free slot and memory for task `id`: one with an idle warm sandbox
    /// of its function version first, then the least loaded.
    fn choose_node(&self, id: TaskId, now: u64) -> Option<NodeId> {
        let task = self.tasks.get(&id)?;
        let mut best: Option<((bool, u64, u64), NodeId)> = None;
        for n in self.nodes.values() {
            if !is_live(n, now) {
                continue;
            }
            let load = self.load_of(n.id) as u64;
            if load >= u64::from(n.slots) {
                continue;
            }
            let used = self.node_memory.get(&n.id).copied().unwrap_or(0) + n.warm_memory_bytes;
            if load > 0 && used + task.memory_bytes > n.memory_budget_bytes {
                continue;
            }
            let warm = n.warm_idle(&task.function, task.version) > 0;
            let spread = (n.id ^ id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let key = (!warm, load * 1_000_000 / u64::from(n.slots), spread);
            if best.as_ref().is_none_or(|(k, _)| key < *k) {
                best = Some((key, n.id));
            }
        }
        best.map(|(_, n)| n)
    }

    fn assign(&mut self, id: TaskId, node: NodeId, now: u64) -> u64 {
        self.meta.next_token += 1;
        let token = self.meta.next_token;
        self.touch(ObjKey::Meta);
        let task = self.tasks.get_mut(&id).expect("assigning a known task");
        task.state = TaskState::Assigned;
        task.node = Some(node);
        task.token = token;
        task.attempts += 1;
        task.assigned_ms = Some(now);
        task.started_ms = None;
        let (function, version, memory) = (task.function.clone(), task.version, task.memory_bytes);
        let deadline = assignment_deadline(task);
        self.dirty.insert(ObjKey::Task(id));
        *self.active.entry(function.clone()).or_default() += 1;
        self.by_node.entry(node).or_default().insert(id);
        *self.node_memory.entry(node).or_default() += memory;
        self.deadlines.insert((deadline, id));
        if let Some(n) = self.nodes.get_mut(&node) {
            if let Some(w) = n
                .warm
                .iter_mut()
                .find(|w| w.function == function && w.version == version && w.idle > 0)
            {
                w.idle -= 1;
                n.warm.retain(|w| w.idle > 0);
                self.dirty.insert(ObjKey::Node(node));
            }
        }
        token
    }

    /// Undoes the assignment bookkeeping of an assigned or running task.
    fn release(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        if !matches!(task.state, TaskState::Assigned | TaskState::Running) {
            return;
        }
        let (function, memory, deadline) = (
            task.function.clone(),
            task.memory_bytes,
            assignment_deadline(task),
        );
        if let Some(node) = task.node {
            if let Some(set) = self.by_node.get_mut(&node) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_node.remove(&node);
                }
            }
            if let Some(m) = self.node_memory.get_mut(&node) {
                *m = m.saturating_sub(memory);
                if *m == 0 {
                    self.node_memory.remove(&node);
                }
            }
        }
        if let Some(a) = self.active.get_mut(&function) {
            *a = a.saturating_sub(1);
            if *a == 0 {
                self.active.remove(&function);
            }
        }
        self.deadlines.remove(&(deadline, id));
    }

    /// Puts a released task back in its queue, not before `not_before`.
    fn requeue(&mut self, id: TaskId, not_before: u64, now: u64) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.state = TaskState::Queued;
        task.node = None;
        task.not_before_ms = not_before;
        let entry = (task.queue_seq, id);
        let function = task.function.clone();
        self.dirty.insert(ObjKey::Task(id));
        if not_before > now {
            self.delayed.insert((not_before, id));
        } else {
            self.queues.entry(function).or_default().insert(entry);
        }
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

    /// Places queued tasks while their functions have free concurrency and a node has room.
    fn fill(&mut self, now: u64) {
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            let max = self
                .functions
                .get(&name)
                .and_then(FunctionRecord::latest)
                .map_or(0, |v| v.spec.max_concurrency);
            loop {
                let active = self.active.get(&name).copied().unwrap_or(0);
                let Some(&(seq, id)) = self.queues.get(&name).and_then(BTreeSet::first) else {
                    break;
                };
                if !self.functions.contains_key(&name) {
                    self.queues.get_mut(&name).map(|q| q.remove(&(seq, id)));
                    self.finish(
                        id,
                        TaskState::Failed,
                        Some(failure_result("the function was removed")),
                        now,
                    );
                    continue;
                }
                if active >= max {
                    break;
                }
                let Some(node) = self.choose_node(id, now) else {
                    break;
                };
                self.queues.get_mut(&name).map(|q| q.remove(&(seq, id)));
                self.assign(id, node, now);
            }
            if self.queues.get(&name).is_some_and(BTreeSet::is_empty) {
                self.queues.remove(&name);
            }
        }
    }
}

/// The ledger key: function name and explicit key, or function name and payload hash.
fn ledger_key(function: &str, explicit: Option<&str>, payload_hash: &str) -> String {
    let mut h = Sha256::new();
    h.update(function.as_bytes());
    h.update([0]);
    match explicit {
        Some(k) => {
            h.update(b"key\0");
            h.update(k.as_bytes());
        }
        None => {
            h.update(b"payload\0");
            h.update(payload_hash.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// The current state of an invocation's dependencies: declared keys and prefixes from the
/// replicated store, files as hashed by the receiving node, caller tokens.
fn dependency_states(
    idem: &Idempotency,
    input: &IdempotencyInput,
    kv: &BTreeMap<String, KvEntry>,
) -> Result<Vec<DependencyState>, String> {
    let mut out = Vec::new();
    for d in &idem.dependencies {
        out.push(match d {
            Dependency::Kv(key) => DependencyState::Kv {
                key: key.clone(),
                version: kv.get(key).map_or(0, |e| e.version),
            },
            Dependency::KvPrefix(prefix) => {
                let mut h = Sha256::new();
                for (k, e) in kv
                    .range::<str, _>((
                        std::ops::Bound::Included(prefix.as_str()),
                        std::ops::Bound::Unbounded,
                    ))
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                {
                    h.update(k.as_bytes());
                    h.update([0]);
                    h.update(e.version.to_be_bytes());
                }
                DependencyState::KvPrefix {
                    prefix: prefix.clone(),
                    digest: hex::encode(h.finalize()),
                }
            }
            Dependency::File(path) => {
                let hash = input
                    .files
                    .iter()
                    .find(|(p, _)| p == path)
                    .map(|(_, h)| h.clone())
                    .ok_or_else(|| {
                        format!("file dependency {path} was not hashed by the receiving node")
                    })?;
                DependencyState::File {
                    path: path.clone(),
                    hash,
                }
            }
        });
    }
    let mut tokens = input.tokens.clone();
    tokens.sort();
    tokens.dedup_by(|a, b| a.0 == b.0);
    for (name, value) in tokens {
        out.push(DependencyState::Token { name, value });
    }
    Ok(out)
}

/// `None` when the ledger entry answers the invocation; otherwise why the function runs.
fn decide(
    e: &LedgerEntry,
    idem: &Idempotency,
    version: u64,
    payload_hash: &str,
    deps: &[DependencyState],
    kv: &BTreeMap<String, KvEntry>,
    now: u64,
) -> Option<MissReason> {
    if !e.succeeded && (!idem.cache_failures || e.result.is_none()) {
        return Some(MissReason::PreviousRunFailed);
    }
    if e.recorded_ms.saturating_add(idem.ttl_ms) <= now {
        return Some(MissReason::Expired);
    }
    if e.version != version {
        return Some(MissReason::CodeChanged {
            was: e.version,
            now: version,
        });
    }
    if e.payload_hash != payload_hash {
        return Some(MissReason::PayloadChanged);
    }
    let recorded: Vec<&DependencyState> = e
        .dependencies
        .iter()
        .filter(|d| !matches!(d, DependencyState::Read { .. }))
        .collect();
    for d in &recorded {
        let now_state = deps.iter().find(|c| c.name() == d.name());
        if now_state != Some(*d) {
            return Some(MissReason::DependencyChanged {
                dependency: d.name(),
                was: d.state(),
                now: now_state.map_or("absent".into(), |c| c.state()),
            });
        }
    }
    for c in deps {
        if !recorded.iter().any(|d| d.name() == c.name()) {
            return Some(MissReason::DependencyChanged {
                dependency: c.name(),
                was: "absent".into(),
                now: c.state(),
            });
        }
    }
    for d in &e.dependencies {
        if let DependencyState::Read { key, version } = d {
            let current = kv.get(key).map_or(0, |e| e.version);
            if current != *version {
                let now_state = DependencyState::Read {
                    key: key.clone(),
                    version: current,
                };
                return Some(MissReason::DependencyChanged {
                    dependency: d.name(),
                    was: d.state(),
                    now: now_state.state(),
                });
            }
        }
    }
    None
}

fn is_live(n: &NodeRecord, now: u64) -> bool {
    n.last_heartbeat_ms.saturating_add(NODE_LEASE_MS) > now
}

fn assignment_deadline(task: &Task) -> u64 {
    task.assigned_ms
        .unwrap_or(task.submitted_ms)
        .saturating_add(task.timeout_ms)
        .saturating_add(ASSIGNMENT_GRACE_MS)
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
    use crate::functions::{DataGrant, FnMode, WarmReport};
    use crate::model::KvEntry;

    fn upload(s: &mut Sched, now: u64, code: &[u8]) -> String {
        let digest = hex::encode(Sha256::digest(code));
        let total = code.len() as u64;
        for (i, chunk) in code.chunks(CODE_CHUNK_BYTES_FOR_TEST).enumerate() {
            let r = s.code_chunk(now, &digest, total, i as u32, chunk);
            assert!(matches!(r, CommandResult::ChunkStored { .. }), "{r:?}");
        }
        digest
    }

    const CODE_CHUNK_BYTES_FOR_TEST: usize = crate::functions::CODE_CHUNK_BYTES;

    fn spec(name: &str, digest: &str, max_concurrency: u32, queue_max: u32) -> FunctionSpec {
        FunctionSpec {
            name: name.into(),
            code_digest: digest.into(),
            entry: vec!["sh".into(), "main.sh".into()],
            mode: FnMode::Exec,
            tier: "standard".into(),
            policy: None,
            memory_bytes: 64 << 20,
            timeout_ms: 1_000,
            max_concurrency,
            queue_max,
            min_warm: 0,
            max_attempts: 3,
            retry_backoff_ms: 100,
            data: DataGrant::default(),
            env: vec![],
            idempotency: None,
            stages: Vec::new(),
        }
    }

    fn hb(node: NodeId, warm: Vec<WarmReport>) -> Heartbeat {
        Heartbeat {
            node,
            slots: 8,
            memory_budget_bytes: 1 << 30,
            warm_memory_bytes: 0,
            warm,
            running: vec![],
        }
    }

    fn result(status: RunStatus) -> TaskResult {
        TaskResult {
            status,
            node: 1,
            exit_code: Some(0),
            output: b"out".to_vec(),
            log: vec![],
            error: None,
            warm: false,
            wall_ms: 1,
            cpu_ms: 1,
            peak_memory_bytes: 1,
        }
    }

    fn submitted(r: CommandResult) -> (TaskId, Option<NodeId>, u64) {
        match r {
            CommandResult::Submitted {
                task, node, token, ..
            } => (task, node, token),
            other => panic!("not submitted: {other:?}"),
        }
    }

    /// Reloading from the persisted objects gives the same state.
    fn assert_reloads(s: &mut Sched, now: u64) {
        s.take_changes();
        let copy = Sched::from_objects(s.objects(), now).expect("valid image");
        assert_eq!(&copy, s);
    }

    fn cluster() -> (Sched, String) {
        let mut s = Sched::default();
        let digest = upload(&mut s, 1, b"echo hi");
        assert_eq!(
            s.deploy(1, &spec("f", &digest, 2, 2)),
            CommandResult::Deployed { version: 1 }
        );
        s.heartbeat(1, &hb(1, vec![]));
        s.heartbeat(1, &hb(2, vec![]));
        (s, digest)
    }

    #[test]
    fn code_must_match_its_digest_and_be_complete() {
        let mut s = Sched::default();
        let code = vec![7u8; CODE_CHUNK_BYTES_FOR_TEST + 10];
        let digest = hex::encode(Sha256::digest(&code));
        let r = s.code_chunk(
            1,
            &digest,
            code.len() as u64,
            0,
            &code[..CODE_CHUNK_BYTES_FOR_TEST],
        );
        assert_eq!(r, CommandResult::ChunkStored { complete: false });
        assert!(matches!(
            s.deploy(1, &spec("f", &digest, 1, 1)),
            CommandResult::Rejected { .. }
        ));
        let r = s.code_chunk(
            1,
            &digest,
            code.len() as u64,
            1,
            &code[CODE_CHUNK_BYTES_FOR_TEST..],
        );
        assert_eq!(r, CommandResult::ChunkStored { complete: true });
        assert_eq!(s.code_archive(&digest).as_deref(), Some(&code[..]));
        // A wrong archive under a digest is refused and leaves nothing behind.
        let bad = "0".repeat(64);
        assert!(matches!(
            s.code_chunk(1, &bad, 3, 0, b"abc"),
            CommandResult::Rejected { .. }
        ));
        assert!(s.code_blob(&bad).is_none());
        assert_reloads(&mut s, 1);
    }

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
    fn concurrency_queue_and_throttle() {
        let (mut s, _) = cluster();
        let a = submitted(s.submit(2, "f", None, b"1", false, None, &BTreeMap::new()));
        let b = submitted(s.submit(2, "f", None, b"2", false, None, &BTreeMap::new()));
        assert!(a.1.is_some() && b.1.is_some());
        let c = submitted(s.submit(2, "f", None, b"3", false, None, &BTreeMap::new()));
        let d = submitted(s.submit(2, "f", None, b"4", false, None, &BTreeMap::new()));
        assert_eq!((c.1, d.1), (None, None));
        assert!(matches!(
            s.submit(2, "f", None, b"5", false, None, &BTreeMap::new()),
            CommandResult::Throttled { .. }
        ));
        // A completion frees a slot: the oldest queued task is placed.
        assert_eq!(
            s.complete(3, a.0, a.2, &result(RunStatus::Succeeded), &[]),
            CommandResult::Accepted
        );
        assert_eq!(s.task(c.0).map(|t| t.state), Some(TaskState::Assigned));
        assert_eq!(s.task(d.0).map(|t| t.state), Some(TaskState::Queued));
        assert_eq!(s.task(a.0).map(|t| t.state), Some(TaskState::Succeeded));
        assert_reloads(&mut s, 3);
    }

    #[test]
    fn warm_node_is_preferred_and_claimed() {
        let (mut s, _) = cluster();
        let warm = vec![WarmReport {
            function: "f".into(),
            version: 1,
            idle: 1,
        }];
        s.heartbeat(2, &hb(2, warm));
        let a = submitted(s.submit(3, "f", None, b"", true, None, &BTreeMap::new()));
        assert_eq!(a.1, Some(2));
        // The one warm sandbox is claimed: the next goes by load, to node 1.
        let b = submitted(s.submit(3, "f", None, b"", true, None, &BTreeMap::new()));
        assert_eq!(b.1, Some(1));
        assert_reloads(&mut s, 3);
    }

    #[test]
    fn silent_node_loses_its_tasks_and_stale_tokens_are_refused() {
        let (mut s, _) = cluster();
        let a = submitted(s.submit(2, "f", None, b"", true, None, &BTreeMap::new()));
        let first = a.1.expect("placed");
        let other = if first == 1 { 2 } else { 1 };
        // Only the other node keeps heartbeating.
        s.heartbeat(NODE_LEASE_MS, &hb(other, vec![]));
        s.tick(NODE_LEASE_MS + 2);
        let t = s.task(a.0).expect("task").clone();
        assert_eq!(
            (t.state, t.node, t.attempts),
            (TaskState::Assigned, Some(other), 2)
        );
        assert!(t.token > a.2);
        let late = s.complete(
            NODE_LEASE_MS + 3,
            a.0,
            a.2,
            &result(RunStatus::Succeeded),
            &[],
        );
        assert!(matches!(late, CommandResult::Rejected { .. }), "{late:?}");
        assert_eq!(
            s.complete(
                NODE_LEASE_MS + 3,
                a.0,
                t.token,
                &result(RunStatus::Succeeded),
                &[]
            ),
            CommandResult::Accepted
        );
        assert_reloads(&mut s, NODE_LEASE_MS + 3);
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

    #[test]
    fn removing_a_function_fails_its_queue_and_collects_its_code() {
        let (mut s, digest) = cluster();
        let mut ids = vec![];
        for _ in 0..4 {
            ids.push(submitted(s.submit(2, "f", None, b"", false, None, &BTreeMap::new())).0);
        }
        let token = s.task(ids[0]).map(|t| t.token).expect("assigned");
        assert_eq!(s.remove(3, "f"), CommandResult::Removed);
        assert_eq!(s.task(ids[3]).map(|t| t.state), Some(TaskState::Failed));
        // Placed tasks fail too: none outlives its function, and its slot is free.
        assert_eq!(s.task(ids[0]).map(|t| t.state), Some(TaskState::Failed));
        assert_eq!(s.stats().tasks_active, 0);
        assert!(s.tasks_on(1).is_empty() && s.tasks_on(2).is_empty());
        // Its late completion is refused.
        assert!(matches!(
            s.complete(4, ids[0], token, &result(RunStatus::Succeeded), &[]),
            CommandResult::Rejected { .. }
        ));
        s.tick(3 + CODE_UNREFERENCED_TTL_MS + GC_INTERVAL_MS);
        assert!(s.code_blob(&digest).is_none());
        assert_reloads(&mut s, 3 + CODE_UNREFERENCED_TTL_MS + GC_INTERVAL_MS);
    }

    #[test]
    fn a_function_made_again_after_removal_has_a_new_identity() {
        let (mut s, digest) = cluster();
        let first = s.function("f").map(|f| f.id).expect("f");
        assert_eq!(first, 1);
        let job = start_stream(&mut s, 2, None);
        s.heartbeat(
            2,
            &hb(
                1,
                vec![WarmReport {
                    function: "f".into(),
                    version: 1,
                    idle: 1,
                }],
            ),
        );
        assert_eq!(
            s.nodes().find(|n| n.id == 1).map(|n| n.warm_idle("f", 1)),
            Some(1)
        );
        assert_eq!(s.remove(3, "f"), CommandResult::Removed);
        assert_eq!(
            s.nodes().find(|n| n.id == 1).map(|n| n.warm_idle("f", 1)),
            Some(0),
            "no node counts warm for a removed function"
        );
        let j = s.stream(job).expect("job");
        assert_eq!(
            (j.state, j.reason.as_deref()),
            (StreamState::Failed, Some("function f was removed")),
            "a stream ends with its function"
        );
        assert_eq!(
            s.deploy(4, &spec("f", &digest, 2, 2)),
            CommandResult::Deployed { version: 1 }
        );
        let again = s.function("f").expect("f").clone();
        assert_eq!((again.id, again.latest), (2, 1));
        assert_eq!(again.versions[0].function_id, 2);
        // A late report of the old function's sandboxes, applied after the new deploy, only
        // claims versions that exist; the node's pool keys by identity either way.
        s.deploy(5, &spec("g", &digest, 2, 2));
        assert_eq!(s.function("g").map(|f| f.id), Some(3));
        s.remove(6, "g");
        s.heartbeat(
            7,
            &hb(
                1,
                vec![WarmReport {
                    function: "g".into(),
                    version: 1,
                    idle: 1,
                }],
            ),
        );
        assert_eq!(
            s.nodes().find(|n| n.id == 1).map(|n| n.warm_idle("g", 1)),
            Some(0)
        );
        assert_reloads(&mut s, 7);
        // The counter is persisted: a reloaded state does not give 2 or 3 again.
        let mut copy = Sched::from_objects(s.objects(), 7).expect("valid image");
        copy.deploy(8, &spec("h", &digest, 2, 2));
        assert_eq!(copy.function("h").map(|f| f.id), Some(4));
    }

    #[test]
    fn a_function_stored_without_identity_loads_and_is_rewritten() {
        let (mut s, digest) = cluster();
        s.take_changes();
        let old_spec = spec("old", &digest, 2, 2);
        let legacy = LegacyFunctionRecord {
            name: "old".into(),
            versions: vec![LegacyFunctionVersion {
                version: 3,
                spec: old_spec.clone(),
                deployed_ms: 1,
            }],
            latest: 3,
            created_ms: 1,
        };
        let mut objects = s.objects();
        objects.push((prefixed(OBJ_FUNCTION_LEGACY, b"old"), enc(&legacy)));
        let mut loaded = Sched::from_objects(objects, 1).expect("the old layout loads");
        let old = loaded.function("old").expect("old").clone();
        assert_eq!((old.id, old.latest, old.versions[0].function_id), (0, 3, 0));
        assert_eq!(old.versions[0].spec, old_spec);
        // Its next write puts it in the new layout and deletes the old key.
        assert_eq!(
            loaded.deploy(2, &old_spec),
            CommandResult::Deployed { version: 4 }
        );
        let changes = loaded.take_changes();
        assert!(changes.contains(&(prefixed(OBJ_FUNCTION_LEGACY, b"old"), None)));
        assert!(changes
            .iter()
            .any(|(k, v)| *k == prefixed(OBJ_FUNCTION, b"old") && v.is_some()));
        // Removed and made again, it gets a fresh identity, not 0.
        loaded.remove(3, "old");
        loaded.deploy(4, &old_spec);
        assert_eq!(loaded.function("old").map(|f| f.id), Some(2));
        assert_reloads(&mut loaded, 4);
    }

    fn kv_with(entries: &[(&str, u64)]) -> BTreeMap<String, KvEntry> {
        entries
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    KvEntry {
                        key: k.to_string(),
                        value: vec![],
                        version: *v,
                        create_version: *v,
                    },
                )
            })
            .collect()
    }

    fn idem_cluster(deps: Vec<Dependency>, track_reads: bool) -> Sched {
        let mut s = Sched::default();
        let digest = upload(&mut s, 1, b"code");
        let mut sp = spec("i", &digest, 10, 10);
        sp.idempotency = Some(Idempotency {
            dependencies: deps,
            ttl_ms: 10_000,
            cache_failures: false,
            track_reads,
        });
        s.deploy(1, &sp);
        s.heartbeat(1, &hb(1, vec![]));
        s
    }

    fn cache_of(r: &CommandResult) -> CacheOutcome {
        match r {
            CommandResult::Submitted { cache, .. } => cache.clone().expect("idempotent"),
            other => panic!("not submitted: {other:?}"),
        }
    }

    fn sub(
        s: &mut Sched,
        now: u64,
        payload: &[u8],
        kv: &BTreeMap<String, KvEntry>,
    ) -> CommandResult {
        s.submit(now, "i", None, payload, true, None, kv)
    }

    #[test]
    fn idempotent_hit_join_and_misses_with_reasons() {
        let mut s = idem_cluster(vec![Dependency::Kv("a".into())], true);
        let kv = kv_with(&[("a", 1), ("r", 5)]);
        let first = sub(&mut s, 2, b"p", &kv);
        assert_eq!(
            cache_of(&first),
            CacheOutcome::Miss {
                reason: MissReason::FirstRun
            }
        );
        let (id, _, token) = submitted(first);
        // An identical call while it runs joins it.
        let joined = sub(&mut s, 3, b"p", &kv);
        assert_eq!(cache_of(&joined), CacheOutcome::Joined { task: id });
        assert_eq!(submitted(joined).0, id);
        let reads = vec![("r".to_string(), 5)];
        s.complete(4, id, token, &result(RunStatus::Succeeded), &reads);
        // Same inputs: a hit, answered by a finished task with the recorded output.
        let hit = sub(&mut s, 5, b"p", &kv);
        assert_eq!(cache_of(&hit), CacheOutcome::Hit { source_task: id });
        let hit_task = s.task(submitted(hit).0).expect("task").clone();
        assert_eq!(hit_task.state, TaskState::Succeeded);
        assert_eq!(hit_task.result.expect("result").output, b"out");
        assert_eq!(s.stats().tasks_active, 0, "nothing runs on a hit");
        // A declared dependency changed.
        let kv2 = kv_with(&[("a", 2), ("r", 5)]);
        match cache_of(&sub(&mut s, 6, b"p", &kv2)) {
            CacheOutcome::Miss {
                reason: MissReason::DependencyChanged { dependency, .. },
            } => {
                assert_eq!(dependency, "kv:a")
            }
            other => panic!("{other:?}"),
        }
        assert_reloads(&mut s, 6);
    }

    #[test]
    fn tracked_reads_payload_code_and_ttl_misses() {
        let mut s = idem_cluster(vec![], true);
        let kv = kv_with(&[("r", 5)]);
        let (id, _, token) = submitted(sub(&mut s, 2, b"p", &kv));
        s.complete(
            3,
            id,
            token,
            &result(RunStatus::Succeeded),
            &[("r".into(), 5)],
        );
        // A tracked read's key changed: exactly one new run.
        let kv2 = kv_with(&[("r", 6)]);
        let r = sub(&mut s, 4, b"p", &kv2);
        assert!(matches!(
            cache_of(&r),
            CacheOutcome::Miss { reason: MissReason::DependencyChanged { ref dependency, .. } } if dependency == "read:r"
        ));
        let (id2, _, token2) = submitted(r);
        s.complete(
            5,
            id2,
            token2,
            &result(RunStatus::Succeeded),
            &[("r".into(), 6)],
        );
        assert!(matches!(
            cache_of(&sub(&mut s, 6, b"p", &kv2)),
            CacheOutcome::Hit { .. }
        ));
        // Another payload is another ledger key: a first run.
        assert_eq!(
            cache_of(&sub(&mut s, 6, b"q", &kv2)),
            CacheOutcome::Miss {
                reason: MissReason::FirstRun
            }
        );
        // With an explicit key, a different payload is "payload changed".
        let input = IdempotencyInput {
            key: Some("k".into()),
            ..Default::default()
        };
        let (t, _, tok) = submitted(s.submit(7, "i", None, b"x", true, Some(&input), &kv2));
        s.complete(7, t, tok, &result(RunStatus::Succeeded), &[]);
        let r = s.submit(8, "i", None, b"y", true, Some(&input), &kv2);
        assert_eq!(
            cache_of(&r),
            CacheOutcome::Miss {
                reason: MissReason::PayloadChanged
            }
        );
        // New code version.
        let digest = s.functions["i"]
            .latest()
            .expect("v")
            .spec
            .code_digest
            .clone();
        let mut sp = s.functions["i"].latest().expect("v").spec.clone();
        sp.code_digest = digest;
        s.deploy(9, &sp);
        assert_eq!(
            cache_of(&sub(&mut s, 10, b"p", &kv2)),
            CacheOutcome::Miss {
                reason: MissReason::CodeChanged { was: 1, now: 2 }
            }
        );
        // Past the TTL.
        let mut s = idem_cluster(vec![], false);
        let (id, _, token) = submitted(sub(&mut s, 2, b"p", &kv));
        s.complete(3, id, token, &result(RunStatus::Succeeded), &[]);
        assert_eq!(
            cache_of(&sub(&mut s, 3 + 10_000, b"p", &kv)),
            CacheOutcome::Miss {
                reason: MissReason::Expired
            }
        );
    }

    #[test]
    fn failed_runs_are_not_cached_and_purge_forgets() {
        let mut s = idem_cluster(vec![], false);
        let kv = BTreeMap::new();
        let (id, _, token) = submitted(sub(&mut s, 2, b"p", &kv));
        s.complete(3, id, token, &result(RunStatus::Failed), &[]);
        assert_eq!(
            cache_of(&sub(&mut s, 4, b"p", &kv)),
            CacheOutcome::Miss {
                reason: MissReason::PreviousRunFailed
            }
        );
        let (id, _, token) = submitted(sub(&mut s, 5, b"z", &kv));
        s.complete(6, id, token, &result(RunStatus::Succeeded), &[]);
        assert_eq!(s.purge_cache("i"), CommandResult::Purged { entries: 1 });
        assert_eq!(
            cache_of(&sub(&mut s, 7, b"z", &kv)),
            CacheOutcome::Miss {
                reason: MissReason::FirstRun
            }
        );
        assert_reloads(&mut s, 7);
    }

    // ----- streams -------------------------------------------------------------------------

    use crate::streams::{
        StreamItem, StreamOptions, StreamSource, StreamStartRequest, StreamState,
    };

    fn start_stream(s: &mut Sched, batch: u32, results: Option<&str>) -> u64 {
        let req = StreamStartRequest {
            function: "f".into(),
            source: StreamSource::Jsonl {
                path: "/data/x.jsonl".into(),
            },
            options: StreamOptions {
                max_concurrency: 10,
                batch,
                max_attempts: 2,
                retry_backoff_ms: 100,
                results_prefix: results.map(String::from),
                ..StreamOptions::default()
            },
        };
        match s.stream_start(2, 0, &req) {
            CommandResult::StreamStarted { job } => job,
            other => panic!("{other:?}"),
        }
    }

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
