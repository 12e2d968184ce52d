//! The history of a run: every operation the workload (and the final reads) issued, with the
//! time it was invoked, the time it completed, and its outcome.
//!
//! Invariants:
//! - times are nanoseconds on one monotonic clock (the [`Recorder`]'s start), so real-time
//!   order between operations of different workers is meaningful;
//! - an operation is recorded at invocation, before its request is sent, and completed at
//!   most once; an operation never completed (the run ended first) counts as unknown;
//! - an outcome is [`Outcome::Unknown`] whenever the operation may have taken effect (a
//!   timeout, a lost connection, any error after a write was sent); [`Outcome::Fail`] only
//!   when it certainly did not. Treating a timeout as a failure would make the checker unsound.
//! - every value a write stores is unique in the run ([`value_for`]), so a read names the one
//!   write it observed.

use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Index of an operation in its history.
pub type OpId = usize;

/// The process (worker) number the final reads after heal are recorded under.
pub const FINAL_READER: u32 = u32::MAX;

/// What an operation asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum OpKind {
    /// Unconditional write.
    Put { key: String, value: String },
    /// Write only if the key's version is `expect_version` (0: only if absent).
    Cas {
        key: String,
        value: String,
        expect_version: u64,
    },
    /// Linearizable read.
    Get { key: String },
    /// Unconditional delete.
    Delete { key: String },
}

impl OpKind {
    pub fn key(&self) -> &str {
        match self {
            OpKind::Put { key, .. }
            | OpKind::Cas { key, .. }
            | OpKind::Get { key }
            | OpKind::Delete { key } => key,
        }
    }

    /// The value this operation writes, if it is a write of a value.
    pub fn written_value(&self) -> Option<&str> {
        match self {
            OpKind::Put { value, .. } | OpKind::Cas { value, .. } => Some(value),
            OpKind::Get { .. } | OpKind::Delete { .. } => None,
        }
    }

    pub fn is_read(&self) -> bool {
        matches!(self, OpKind::Get { .. })
    }
}

/// A value a read returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadValue {
    pub value: String,
    pub version: u64,
}

/// What a completed operation answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum OpResult {
    /// A put or a successful CAS: the key now holds the value at `version`.
    Written { version: u64 },
    /// A CAS refused: the key's version was `current` (0: absent).
    Conflict { current: u64 },
    /// A delete that removed the key, which was at `version`.
    Deleted { version: u64 },
    /// A delete of an absent key.
    NotFound,
    /// A read: the value and version, or absent.
    Read { found: Option<ReadValue> },
}

/// How an operation ended. `R` is the answer of the operation's kind: [`OpResult`] for the
/// key-value workload, [`crate::calls::CallResult`] for invocations and streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "detail", rename_all = "snake_case")]
pub enum Outcome<R = OpResult> {
    /// Completed with an answer.
    Ok(R),
    /// Certainly did not take effect.
    Fail(String),
    /// May have taken effect, at any time after its invocation.
    Unknown(String),
}

/// One operation of the history: what it asked (`K`) and how it ended (answers `R`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op<K = OpKind, R = OpResult> {
    pub id: OpId,
    /// The worker that issued it ([`FINAL_READER`] for the reads after heal).
    pub process: u32,
    pub kind: K,
    /// Nanoseconds since the start of the run when the request was about to be sent.
    pub invoke_ns: u64,
    /// Nanoseconds since the start when the answer (or the error) arrived.
    pub complete_ns: Option<u64>,
    /// `None` while in progress; read as unknown by the checkers.
    pub outcome: Option<Outcome<R>>,
}

impl<K, R> Op<K, R> {
    /// The answer, if the operation completed with one.
    pub fn ok(&self) -> Option<&R> {
        match &self.outcome {
            Some(Outcome::Ok(r)) => Some(r),
            _ => None,
        }
    }

    /// Whether it may have taken effect without the workload knowing (unknown or never
    /// completed).
    pub fn is_unknown(&self) -> bool {
        matches!(self.outcome, Some(Outcome::Unknown(_)) | None)
    }

    pub fn is_fail(&self) -> bool {
        matches!(self.outcome, Some(Outcome::Fail(_)))
    }
}

/// The unique value a write operation stores: the worker and the operation id.
pub fn value_for(process: u32, id: OpId) -> String {
    format!("p{process}-o{id}")
}

/// Collects the history of a run; shared by all workers.
#[derive(Debug)]
pub struct Recorder<K = OpKind, R = OpResult> {
    start: Instant,
    ops: Mutex<Vec<Op<K, R>>>,
    ops_max: usize,
}

impl<K: Clone, R: Clone> Recorder<K, R> {
    /// A recorder that refuses operations past `ops_max`, so a run's memory is bounded.
    pub fn new(ops_max: usize) -> Recorder<K, R> {
        Self::starting_at(Instant::now(), ops_max)
    }

    /// When this recorder's clock started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// A recorder whose clock starts at `start`, so that two histories of one run (the
    /// key-value one and the invocation one) share a time line.
    pub fn starting_at(start: Instant, ops_max: usize) -> Recorder<K, R> {
        Recorder {
            start,
            ops: Mutex::new(Vec::new()),
            ops_max,
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records the invocation of an operation built from its own id (so a write's value can
    /// name it); returns its id and a copy of what it asks, or `None` once the history is full.
    pub fn invoke(&self, process: u32, make: impl FnOnce(OpId) -> K) -> Option<(OpId, K)> {
        let mut ops = self
            .ops
            .lock()
            .expect("history lock is never poisoned: no panics inside");
        if ops.len() >= self.ops_max {
            return None;
        }
        let id = ops.len();
        let kind = make(id);
        ops.push(Op {
            id,
            process,
            kind: kind.clone(),
            invoke_ns: self.now_ns(),
            complete_ns: None,
            outcome: None,
        });
        Some((id, kind))
    }

    /// Records how operation `id` ended. Completing an operation twice is a harness bug.
    pub fn complete(&self, id: OpId, outcome: Outcome<R>) {
        let now = self.now_ns();
        let mut ops = self
            .ops
            .lock()
            .expect("history lock is never poisoned: no panics inside");
        let op = ops
            .get_mut(id)
            .expect("operation ids come from invoke on this recorder");
        assert!(op.outcome.is_none(), "operation {id} completed twice");
        op.complete_ns = Some(now);
        op.outcome = Some(outcome);
    }

    /// Number of operations invoked so far.
    pub fn len(&self) -> usize {
        self.ops
            .lock()
            .expect("history lock is never poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the history as it stands.
    pub fn snapshot(&self) -> Vec<Op<K, R>> {
        self.ops
            .lock()
            .expect("history lock is never poisoned")
            .clone()
    }
}

/// One line describing an operation for a report: id, worker, call, outcome and times.
pub fn describe(op: &Op) -> String {
    let call = match &op.kind {
        OpKind::Put { key, value } => format!("put({key:?}, {value:?})"),
        OpKind::Cas {
            key,
            value,
            expect_version,
        } => format!("cas({key:?}, expect v{expect_version}, {value:?})"),
        OpKind::Get { key } => format!("get({key:?})"),
        OpKind::Delete { key } => format!("delete({key:?})"),
    };
    let outcome = match &op.outcome {
        Some(Outcome::Ok(OpResult::Written { version })) => format!("ok v{version}"),
        Some(Outcome::Ok(OpResult::Conflict { current })) => {
            format!("conflict (current v{current})")
        }
        Some(Outcome::Ok(OpResult::Deleted { version })) => format!("deleted v{version}"),
        Some(Outcome::Ok(OpResult::NotFound)) => "not found".to_string(),
        Some(Outcome::Ok(OpResult::Read { found: None })) => "read absent".to_string(),
        Some(Outcome::Ok(OpResult::Read { found: Some(r) })) => {
            format!("read {:?} v{}", r.value, r.version)
        }
        Some(Outcome::Fail(e)) => format!("fail ({e})"),
        Some(Outcome::Unknown(e)) => format!("unknown ({e})"),
        None => "unknown (never completed)".to_string(),
    };
    let secs = |ns: u64| ns as f64 / 1e9;
    let done = op
        .complete_ns
        .map_or_else(|| "?".to_string(), |c| format!("{:.3}s", secs(c)));
    let who = if op.process == FINAL_READER {
        "final".to_string()
    } else {
        format!("p{}", op.process)
    };
    format!(
        "#{} {who} {call} -> {outcome} [{:.3}s..{done}]",
        op.id,
        secs(op.invoke_ns)
    )
}

/// Counts of a history by outcome, for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub ops: usize,
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    pub reads: usize,
    pub writes: usize,
}

impl Counts {
    pub fn of(history: &[Op]) -> Counts {
        let mut c = Counts {
            ops: history.len(),
            ..Counts::default()
        };
        for op in history {
            if op.kind.is_read() {
                c.reads += 1;
            } else {
                c.writes += 1;
            }
            match &op.outcome {
                Some(Outcome::Ok(_)) => c.ok += 1,
                Some(Outcome::Fail(_)) => c.fail += 1,
                Some(Outcome::Unknown(_)) | None => c.unknown += 1,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_orders_and_bounds_operations() {
        let r = Recorder::new(2);
        let a = r
            .invoke(1, |id| OpKind::Put {
                key: "k".into(),
                value: value_for(1, id),
            })
            .expect("room for one")
            .0;
        let b = r
            .invoke(2, |_| OpKind::Get { key: "k".into() })
            .expect("room for two")
            .0;
        assert!(r.invoke(3, |_| OpKind::Get { key: "k".into() }).is_none());
        r.complete(b, Outcome::Fail("refused".into()));
        let h = r.snapshot();
        assert_eq!(h[a].kind.written_value(), Some("p1-o0"));
        assert!(h[a].is_unknown(), "never completed counts as unknown");
        assert!(h[b].is_fail());
        assert!(h[b].complete_ns >= Some(h[b].invoke_ns));
        let c = Counts::of(&h);
        assert_eq!(
            (c.ops, c.unknown, c.fail, c.reads, c.writes),
            (2, 1, 1, 1, 1)
        );
    }

    #[test]
    fn ops_round_trip_through_json() {
        let op = Op {
            id: 3,
            process: 1,
            kind: OpKind::Cas {
                key: "k".into(),
                value: "v".into(),
                expect_version: 4,
            },
            invoke_ns: 10,
            complete_ns: Some(20),
            outcome: Some(Outcome::Ok(OpResult::Conflict { current: 5 })),
        };
        let text = serde_json::to_string(&op).expect("serializes");
        let back: Op = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, op);
    }
}
