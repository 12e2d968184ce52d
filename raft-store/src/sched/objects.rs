//! The scheduler's persisted objects: their keys (a tag byte, then the object's id), the
//! value encoding, loading a state from its objects and writing back what a command changed.
//!
//! Invariants:
//! - every object is bincode with fixed-width integers under a key whose lower-case tag names
//!   its kind; the token table's upper-case tags never meet these;
//! - [`Sched::from_objects`] refuses an image whose keys and values disagree or whose ids lie
//!   past the counters that gave them, and rebuilds every derived index the same way apply
//!   keeps it;
//! - [`Sched::take_changes`] writes exactly the objects touched since the last call, so the
//!   disk after an entry equals [`Sched::objects`] of the state after it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bincode::Options as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{assignment_deadline, Sched};
use crate::functions::{
    CodeBlob, FunctionRecord, FunctionSpec, FunctionVersion, LedgerEntry, NodeRecord, Task, TaskId,
    TaskState,
};
use crate::model::NodeId;
use crate::streams::{FailedItem, StreamId, StreamJob, WindowEntry};

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

/// A persisted object that changed during the current command.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum ObjKey {
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

pub(super) fn prefixed(tag: u8, rest: &[u8]) -> Vec<u8> {
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

/// One persisted object change: `None` deletes the key.
pub type ObjChange = (Vec<u8>, Option<Vec<u8>>);

impl Sched {
    /// Rebuilds the state from its persisted objects, as of state-machine time `now`.
    pub fn from_objects(
        objects: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        now: u64,
    ) -> Result<Self, String> {
        let mut s = Sched::default();
        for (key, value) in objects {
            s.load_object(&key, value)?;
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
        TaskIndexes::of(&s.tasks, s.meta.next_task, now)?.install(&mut s);
        Ok(s)
    }

    /// Decodes one persisted object into the state, checking it sits under its own key.
    // About 100 lines on purpose: one arm per object tag, so the whole on-disk layout of the
    // scheduler reads in one match beside the tags.
    fn load_object(&mut self, key: &[u8], value: Vec<u8>) -> Result<(), String> {
        let (&tag, rest) = key.split_first().ok_or("empty object key")?;
        let text = || String::from_utf8(rest.to_vec()).map_err(|_| "object key not UTF-8");
        let id = || -> Result<u64, String> {
            Ok(u64::from_be_bytes(
                rest.try_into().map_err(|_| "object id not 8 bytes")?,
            ))
        };
        match tag {
            OBJ_META => self.meta = dec(&value, "scheduler meta")?,
            OBJ_FUNCTION_META => self.next_function = dec(&value, "function meta")?,
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
                if self.functions.insert(name.clone(), f).is_some() {
                    return Err(format!("function {name:?} stored twice"));
                }
            }
            OBJ_CODE => {
                let c: CodeBlob = dec(&value, "code blob")?;
                if c.digest != text()? {
                    return Err(format!("code blob {} under another key", c.digest));
                }
                self.code.insert(c.digest.clone(), c);
            }
            OBJ_CHUNK => {
                if rest.len() < 4 {
                    return Err("short chunk key".into());
                }
                let (digest, index) = rest.split_at(rest.len() - 4);
                let digest = String::from_utf8(digest.to_vec()).map_err(|_| "chunk key")?;
                let index = u32::from_be_bytes(index.try_into().map_err(|_| "chunk key")?);
                self.code_bytes += value.len() as u64;
                self.chunks.insert((digest, index), Arc::new(value));
            }
            OBJ_TASK => {
                let t: Task = dec(&value, "task")?;
                if t.id != id()? {
                    return Err(format!("task {} under another key", t.id));
                }
                self.tasks.insert(t.id, t);
            }
            OBJ_NODE => {
                let n: NodeRecord = dec(&value, "node")?;
                if n.id != id()? {
                    return Err(format!("node {} under another key", n.id));
                }
                self.nodes.insert(n.id, n);
            }
            OBJ_LEDGER => {
                let e: LedgerEntry = dec(&value, "ledger entry")?;
                if e.key != text()? {
                    return Err(format!("ledger entry {} under another key", e.key));
                }
                if e.done {
                    self.ledger_order.insert((e.recorded_ms, e.key.clone()));
                    self.ledger_bytes += e.bytes();
                }
                self.ledger.insert(e.key.clone(), e);
            }
            OBJ_STREAM_META => self.next_stream = dec(&value, "stream meta")?,
            OBJ_STREAM => {
                let j: StreamJob = dec(&value, "stream job")?;
                if j.id != id()? || !j.window.is_empty() || !j.failed_items.is_empty() {
                    return Err(format!("stream {} under another key", j.id));
                }
                self.streams.insert(j.id, j);
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
                    self.windows.insert((job, index), w);
                } else {
                    let f: FailedItem = dec(&value, "stream failed item")?;
                    if f.index != index {
                        return Err(format!("stream {job} failed item under another key"));
                    }
                    self.failed_items.insert((job, index), f);
                }
            }
            other => return Err(format!("unknown object tag {other:#04x}")),
        }
        Ok(())
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

    pub(super) fn touch(&mut self, key: ObjKey) {
        self.dirty.insert(key);
    }
}

/// The indexes apply keeps over the tasks, as the tasks alone determine them at time `now`.
/// Loading installs them; [`Sched::check`] compares them with the ones apply kept.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct TaskIndexes {
    pub(super) queues: BTreeMap<String, BTreeSet<(u64, TaskId)>>,
    pub(super) delayed: BTreeSet<(u64, TaskId)>,
    pub(super) active: BTreeMap<String, u32>,
    pub(super) by_node: BTreeMap<NodeId, BTreeSet<TaskId>>,
    pub(super) node_memory: BTreeMap<NodeId, u64>,
    pub(super) deadlines: BTreeSet<(u64, TaskId)>,
    pub(super) finished: BTreeSet<(u64, TaskId)>,
    pub(super) task_bytes: u64,
}

impl TaskIndexes {
    /// Derives the indexes, refusing a task whose id lies past `next_task` (the last given)
    /// or whose state lacks what it implies (a node when placed, a time when finished).
    pub(super) fn of(
        tasks: &BTreeMap<TaskId, Task>,
        next_task: u64,
        now: u64,
    ) -> Result<TaskIndexes, String> {
        let mut ix = TaskIndexes::default();
        for (&id, task) in tasks {
            if id == 0 || id > next_task {
                return Err(format!("task {id} past the last id given"));
            }
            ix.task_bytes += task.bytes();
            match task.state {
                TaskState::Queued => {
                    if task.not_before_ms > now {
                        ix.delayed.insert((task.not_before_ms, id));
                    } else {
                        let f = task.function.clone();
                        ix.queues.entry(f).or_default().insert((task.queue_seq, id));
                    }
                }
                TaskState::Assigned | TaskState::Running => {
                    let node = task.node.ok_or(format!("task {id} assigned to no node"))?;
                    let (f, mem, deadline) = (
                        task.function.clone(),
                        task.memory_bytes,
                        assignment_deadline(task),
                    );
                    *ix.active.entry(f).or_default() += 1;
                    ix.by_node.entry(node).or_default().insert(id);
                    *ix.node_memory.entry(node).or_default() += mem;
                    ix.deadlines.insert((deadline, id));
                }
                _ => {
                    let at = task
                        .finished_ms
                        .ok_or(format!("task {id} finished at no time"))?;
                    ix.finished.insert((at, id));
                }
            }
        }
        Ok(ix)
    }

    /// The indexes `s` keeps now, for comparison with derived ones.
    pub(super) fn kept_by(s: &Sched) -> TaskIndexes {
        TaskIndexes {
            queues: s.queues.clone(),
            delayed: s.delayed.clone(),
            active: s.active.clone(),
            by_node: s.by_node.clone(),
            node_memory: s.node_memory.clone(),
            deadlines: s.deadlines.clone(),
            finished: s.finished.clone(),
            task_bytes: s.task_bytes,
        }
    }

    /// Drops what carries no information (an empty queue, a node with no load), which apply
    /// may leave behind until the next placement and loading never makes.
    pub(super) fn normalized(mut self) -> TaskIndexes {
        self.queues.retain(|_, q| !q.is_empty());
        self.active.retain(|_, n| *n > 0);
        self.by_node.retain(|_, t| !t.is_empty());
        self.node_memory.retain(|_, m| *m > 0);
        self
    }

    fn install(self, s: &mut Sched) {
        s.queues = self.queues;
        s.delayed = self.delayed;
        s.active = self.active;
        s.by_node = self.by_node;
        s.node_memory = self.node_memory;
        s.deadlines = self.deadlines;
        s.finished = self.finished;
        s.task_bytes = self.task_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;
    use crate::sched::testing::*;
    use crate::sched::*;

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
}
