//! The data model of stream jobs: a data set (keys under a prefix, lines of a JSONL or CSV
//! file, files of a directory) turned into task calls, at least one per item. Plain data
//! shared with clients; the behaviour is in `skiff_raft_store::sched`, the reading of sources
//! in the node's driver.
//!
//! A job's life: `Running` (the leader's driver reads items from the `cursor` and proposes
//! `StreamAdvance`, which moves the cursor and creates the items' tasks in one log entry) →
//! `Succeeded` | `Failed` once the source is exhausted and nothing is in flight (or `Failed`
//! early when the failure budget is spent); `Cancelled` on request. `StreamRedrive` puts the
//! failed items back in flight and the job back to `Running`.
//!
//! Invariants:
//! - the cursor only moves forward, and only by a `StreamAdvance` whose `from_cursor` is the
//!   current cursor, in the same entry that enqueues the items read between the two, so an
//!   item can be re-issued (at least once) but never skipped or enqueued twice by a driver;
//! - every item index is in at most one of: the in-flight window, the failed list, done;
//! - the window, the failed list and the number of jobs are bounded.

use serde::{Deserialize, Serialize};

pub use crate::ids::StreamId;
use crate::ids::{TaskId, KEY_BYTES_MAX};

/// Most stream jobs the cluster keeps (running and finished); past it the oldest finished
/// job is forgotten, and a start is refused when all are running.
pub const STREAMS_MAX: usize = 256;
/// Most items of one job in flight (its max concurrency is at most this).
pub const STREAM_WINDOW_MAX: u32 = 10_000;
/// Most items per invocation.
pub const STREAM_BATCH_MAX: u32 = 1_000;
/// Most failed items one job keeps (with their payloads, for redrive); more are counted.
pub const STREAM_FAILED_KEPT_MAX: usize = 1_000;
/// Most payload bytes of failed items one job keeps.
pub const STREAM_FAILED_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most items one `StreamAdvance` carries.
pub const STREAM_ADVANCE_ITEMS_MAX: usize = 10_000;
/// Most item bytes one `StreamAdvance` carries (one log entry stays small).
pub const STREAM_ADVANCE_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Longest cursor (a byte offset, a key or a file name).
pub const STREAM_CURSOR_BYTES_MAX: usize = 4096;
/// Longest source path or prefix.
pub const STREAM_SOURCE_BYTES_MAX: usize = 4096;
/// Longest error text kept for a failed item.
pub const STREAM_ERROR_BYTES_MAX: usize = 1024;
/// Digits of the item index in a result key (`PREFIX` + zero-padded index).
pub const STREAM_RESULT_INDEX_DIGITS: usize = 12;

/// Where a job's items come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamSource {
    /// Keys under a prefix that existed when the job started (create revision at most the
    /// store's revision then), in key order; item `{"key": K, "value": V}`. With `follow`,
    /// then every key written under the prefix after the start, in revision order, until the
    /// job is cancelled.
    Kv {
        prefix: String,
        #[serde(default)]
        follow: bool,
    },
    /// One item per non-blank line of a file; each line must be one JSON value.
    Jsonl { path: String },
    /// One item per record after the header line; item: a JSON object header → field.
    Csv { path: String },
    /// One item per regular file of a directory, in name order; item
    /// `{"path": NAME, "content": TEXT}`.
    Dir { path: String },
}

impl StreamSource {
    /// The source as written on the command line (`jsonl:/data/x.jsonl`).
    pub fn spec(&self) -> String {
        match self {
            StreamSource::Kv {
                prefix,
                follow: false,
            } => format!("kv:{prefix}"),
            StreamSource::Kv {
                prefix,
                follow: true,
            } => format!("kv:{prefix} (follow)"),
            StreamSource::Jsonl { path } => format!("jsonl:{path}"),
            StreamSource::Csv { path } => format!("csv:{path}"),
            StreamSource::Dir { path } => format!("dir:{path}"),
        }
    }

    /// Checks sizes and forms (file sources need an absolute path).
    pub fn validate(&self) -> Result<(), String> {
        let text = match self {
            StreamSource::Kv { prefix, .. } => prefix,
            StreamSource::Jsonl { path }
            | StreamSource::Csv { path }
            | StreamSource::Dir { path } => {
                if !path.starts_with('/') {
                    return Err(format!(
                        "source path {path:?} must be absolute (it is read by the leader)"
                    ));
                }
                path
            }
        };
        if text.len() > STREAM_SOURCE_BYTES_MAX || text.contains('\0') {
            return Err(format!(
                "source is limited to {STREAM_SOURCE_BYTES_MAX} bytes without NUL"
            ));
        }
        Ok(())
    }
}

/// Marks a kv cursor of the follow phase: the revision up to which every write under the
/// prefix has been enqueued. Keys cannot hold control characters, so no key cursor starts
/// with it.
pub const FOLLOW_CURSOR_MARK: char = '\u{1}';

/// A kv source's cursor: a key (the start-time snapshot, in key order) or, in follow mode
/// after the snapshot, a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KvCursor<'a> {
    Key(&'a str),
    Revision(u64),
}

impl<'a> KvCursor<'a> {
    pub fn parse(cursor: &'a str) -> Option<KvCursor<'a>> {
        match cursor.strip_prefix(FOLLOW_CURSOR_MARK) {
            Some(rev) => rev.parse().ok().map(KvCursor::Revision),
            None => Some(KvCursor::Key(cursor)),
        }
    }

    /// The cursor of the follow phase at `revision`.
    pub fn revision(revision: u64) -> String {
        format!("{FOLLOW_CURSOR_MARK}{revision}")
    }
}

impl std::str::FromStr for StreamSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            format!("bad source {s:?}: use kv:PREFIX, jsonl:PATH, csv:PATH or dir:PATH")
        })?;
        let source = match kind {
            "kv" => StreamSource::Kv {
                prefix: rest.to_string(),
                follow: false,
            },
            "jsonl" => StreamSource::Jsonl {
                path: rest.to_string(),
            },
            "csv" => StreamSource::Csv {
                path: rest.to_string(),
            },
            "dir" => StreamSource::Dir {
                path: rest.to_string(),
            },
            other => {
                return Err(format!(
                    "unknown source kind {other:?}: use kv:PREFIX, jsonl:PATH, csv:PATH or dir:PATH"
                ))
            }
        };
        source.validate()?;
        Ok(source)
    }
}

/// How a job runs its items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Most items in flight (enqueued, not finished) at once.
    pub max_concurrency: u32,
    /// Items per invocation; above 1 the payload is a JSON array of items and the function
    /// answers with a JSON array of as many results, in order.
    pub batch: u32,
    /// Attempts of each invocation before its items count as failed.
    pub max_attempts: u32,
    /// Back-off before the second attempt; doubled for each further one.
    pub retry_backoff_ms: u64,
    /// The job succeeds if at most this percentage of its items failed.
    pub tolerated_failure_pct: Option<u32>,
    /// The job succeeds if at most this many items failed (checked as they fail: past it the
    /// job fails at once).
    pub tolerated_failure_count: Option<u64>,
    /// Each item's result is written under `PREFIX` + its zero-padded index.
    pub results_prefix: Option<String>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            max_concurrency: 100,
            batch: 1,
            max_attempts: 3,
            retry_backoff_ms: 200,
            tolerated_failure_pct: None,
            tolerated_failure_count: None,
            results_prefix: None,
        }
    }
}

impl StreamOptions {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrency == 0 || self.max_concurrency > STREAM_WINDOW_MAX {
            return Err(format!(
                "max concurrency must be between 1 and {STREAM_WINDOW_MAX} items"
            ));
        }
        if self.batch == 0 || self.batch > STREAM_BATCH_MAX {
            return Err(format!("batch must be between 1 and {STREAM_BATCH_MAX}"));
        }
        if self.max_attempts == 0 || self.max_attempts > crate::functions::ATTEMPTS_MAX {
            return Err(format!(
                "max attempts must be between 1 and {}",
                crate::functions::ATTEMPTS_MAX
            ));
        }
        if self.retry_backoff_ms > crate::functions::RETRY_BACKOFF_MS_MAX {
            return Err("the retry back-off is at most 10 minutes".into());
        }
        if self.tolerated_failure_pct.is_some_and(|p| p > 100) {
            return Err("the tolerated failure percentage is at most 100".into());
        }
        if let Some(p) = &self.results_prefix {
            let room = KEY_BYTES_MAX - STREAM_RESULT_INDEX_DIGITS;
            if p.is_empty() || p.len() > room || p.chars().any(char::is_control) {
                return Err(format!(
                    "the results prefix must be 1 to {room} bytes without control characters"
                ));
            }
        }
        Ok(())
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StreamState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl StreamState {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamState::Running => "running",
            StreamState::Succeeded => "succeeded",
            StreamState::Failed => "failed",
            StreamState::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        self != StreamState::Running
    }
}

/// Progress of a job, in items.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCounters {
    /// Items in the data set, once the source is exhausted.
    pub total: Option<u64>,
    /// Items read from the source (enqueued or refused as malformed).
    pub enqueued: u64,
    /// Items in flight now.
    pub running: u64,
    pub succeeded: u64,
    /// Items that failed for good (malformed, or every attempt failed). Redrive lowers it.
    pub failed: u64,
    /// Item attempts retried after a failure.
    pub retried: u64,
    /// Item runs repeated because their node was lost (at-least-once): a second run, whose
    /// outcome counts once.
    pub duplicates: u64,
    /// Items answered from an idempotent function's ledger without running.
    pub idempotent_hits: u64,
    /// Failed items not kept in the failed list (past its bound): they cannot be redriven.
    pub failed_dropped: u64,
}

/// One item of an invocation in flight: its index and the length of its JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowItem {
    pub index: u64,
    pub bytes: u32,
}

/// One invocation in flight: the task and the items it carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowEntry {
    pub task: TaskId,
    pub items: Vec<WindowItem>,
}

/// An item that failed for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedItem {
    pub index: u64,
    /// The item's JSON text, to redrive it; `None` for an item that could not be read.
    pub payload: Option<Vec<u8>>,
    pub error: String,
}

/// One item read by the driver: its JSON text, or why it could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamItem {
    Ok(Vec<u8>),
    Bad(String),
}

impl StreamItem {
    pub fn bytes(&self) -> usize {
        match self {
            StreamItem::Ok(b) => b.len(),
            StreamItem::Bad(e) => e.len(),
        }
    }
}

/// A stream job as the state machine holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamJob {
    pub id: StreamId,
    pub function: String,
    /// The function version the items run (the latest at start; a redrive moves it to the
    /// latest then).
    pub version: u64,
    pub source: StreamSource,
    /// For a `kv:` source: the store's revision at start; keys created after it are not
    /// items of this job.
    pub start_revision: u64,
    pub options: StreamOptions,
    pub state: StreamState,
    /// Why the job failed or was cancelled.
    pub reason: Option<String>,
    pub counters: StreamCounters,
    /// Opaque source position: a byte offset (jsonl, csv), the last key (kv) or the last
    /// file name (dir) read. Empty: the start.
    pub cursor: String,
    /// The index the next item read gets.
    pub next_item: u64,
    /// The source has no more items after `cursor`.
    pub exhausted: bool,
    /// Invocations in flight, by the index of their first item.
    pub window: Vec<WindowEntry>,
    pub failed_items: Vec<FailedItem>,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
}

impl StreamJob {
    /// Items in flight.
    pub fn in_flight(&self) -> u64 {
        self.window.iter().map(|w| w.items.len() as u64).sum()
    }

    /// The result key of item `index`, when the job has a results prefix.
    pub fn result_key(&self, index: u64) -> Option<String> {
        self.options
            .results_prefix
            .as_ref()
            .map(|p| result_key(p, index))
    }
}

/// `prefix` + `index` zero-padded to [`STREAM_RESULT_INDEX_DIGITS`] digits.
pub fn result_key(prefix: &str, index: u64) -> String {
    format!(
        "{prefix}{index:0width$}",
        width = STREAM_RESULT_INDEX_DIGITS
    )
}

/// What a client asks for to start a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStartRequest {
    pub function: String,
    pub source: StreamSource,
    pub options: StreamOptions,
}
