//! The data model of idempotent functions: what a function declares it depends on, what an
//! invocation adds, the ledger entry a run leaves, and why an invocation hit or ran. Plain
//! data; the decisions are in `skiff_raft_store::sched` (the ledger part of the scheduler).
//!
//! Invariants:
//! - a ledger entry records the dependency states at its run's start, then the keys the run
//!   read (when tracked), so a hit is decided from the entry and the current state alone;
//! - every list and text here has a bound named below; past it a spec or an invocation is
//!   refused before it reaches the log.

use serde::{Deserialize, Serialize};

use super::TaskResult;
use crate::ids::TaskId;

/// Most declared dependencies of an idempotent function.
pub const DEPENDENCIES_MAX: usize = 64;
/// Longest cache lifetime of an idempotent result.
pub const IDEMPOTENCY_TTL_MS_MAX: u64 = 30 * 24 * 60 * 60 * 1000;
/// Most ledger entries the cluster keeps; past it the least recently recorded go first.
pub const LEDGER_ENTRIES_MAX: usize = 100_000;
/// Most bytes of cached results in the ledger.
pub const LEDGER_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Longest explicit idempotency key, caller token name or value.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;
/// Most caller tokens and file hashes on one invocation.
pub const INVOCATION_DEPS_MAX: usize = 32;
/// Most automatically tracked reads recorded for one run.
pub const TRACKED_READS_MAX: usize = 4096;

/// How an idempotent function decides whether a run can be skipped.
///
/// An invocation is a **hit** when a completed run with the same ledger key (function and
/// explicit idempotency key, or function and payload hash) exists, ran the same code version
/// with the same payload, finished less than `ttl_ms` ago, and every dependency recorded for it
/// is still in the same state: declared keys and prefixes at the same versions, files with the
/// same content hash, caller tokens equal, and every key the run read through the data service
/// (when `track_reads`) at the version it saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    pub dependencies: Vec<Dependency>,
    pub ttl_ms: u64,
    /// Cache failed runs too (by default a failed run is run again).
    pub cache_failures: bool,
    /// Record every data-service read of a run as a dependency.
    pub track_reads: bool,
}

/// A declared dependency of an idempotent function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dependency {
    /// A key of the store, by version (`kv:KEY`).
    Kv(String),
    /// Every key under a prefix, by keys and versions (`kv:PREFIX*`).
    KvPrefix(String),
    /// A file's content, hashed by the node that receives the invocation (`file:/PATH`).
    File(String),
}

impl std::str::FromStr for Dependency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("kv:") {
            if let Some(prefix) = rest.strip_suffix('*') {
                return Ok(Dependency::KvPrefix(prefix.to_string()));
            }
            if rest.is_empty() {
                return Err("kv: needs a key".into());
            }
            return Ok(Dependency::Kv(rest.to_string()));
        }
        if let Some(path) = s.strip_prefix("file:") {
            if !path.starts_with('/') {
                return Err(format!("file dependency {path:?} must be an absolute path"));
            }
            return Ok(Dependency::File(path.to_string()));
        }
        Err(format!(
            "bad dependency {s:?}: use kv:KEY, kv:PREFIX* or file:/PATH"
        ))
    }
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dependency::Kv(k) => write!(f, "kv:{k}"),
            Dependency::KvPrefix(p) => write!(f, "kv:{p}*"),
            Dependency::File(p) => write!(f, "file:{p}"),
        }
    }
}

/// What an invocation adds to an idempotent function's inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyInput {
    /// Replaces the payload hash in the ledger key.
    pub key: Option<String>,
    /// Caller-supplied version tokens (e.g. an ETag), by name.
    pub tokens: Vec<(String, String)>,
    /// Content hashes of the function's file dependencies, computed by the receiving node.
    pub files: Vec<(String, String)>,
}

/// The state of one dependency when a run started (or, for reads, when it read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DependencyState {
    Kv { key: String, version: u64 },
    KvPrefix { prefix: String, digest: String },
    File { path: String, hash: String },
    Token { name: String, value: String },
    Read { key: String, version: u64 },
}

impl DependencyState {
    /// The dependency's name, e.g. `kv:a`, `file:/x`, `token:etag`, `read:b`.
    pub fn name(&self) -> String {
        match self {
            DependencyState::Kv { key, .. } => format!("kv:{key}"),
            DependencyState::KvPrefix { prefix, .. } => format!("kv:{prefix}*"),
            DependencyState::File { path, .. } => format!("file:{path}"),
            DependencyState::Token { name, .. } => format!("token:{name}"),
            DependencyState::Read { key, .. } => format!("read:{key}"),
        }
    }

    /// The recorded state as text (a version or a hash).
    pub fn state(&self) -> String {
        match self {
            DependencyState::Kv { version, .. } | DependencyState::Read { version, .. } => {
                if *version == 0 {
                    "absent".into()
                } else {
                    format!("version {version}")
                }
            }
            DependencyState::KvPrefix { digest, .. } => {
                format!("digest {}", &digest[..12.min(digest.len())])
            }
            DependencyState::File { hash, .. } => format!("sha256 {}", &hash[..12.min(hash.len())]),
            DependencyState::Token { value, .. } => format!("{value:?}"),
        }
    }
}

/// Whether an invocation of an idempotent function ran, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheOutcome {
    /// Answered from the ledger without running: the result of `source_task`.
    Hit { source_task: TaskId },
    /// An identical invocation was running: this one waits for its result.
    Joined { task: TaskId },
    /// The function runs, because of `reason`.
    Miss { reason: MissReason },
}

/// Why an idempotent invocation runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MissReason {
    FirstRun,
    CodeChanged {
        was: u64,
        now: u64,
    },
    PayloadChanged,
    DependencyChanged {
        dependency: String,
        was: String,
        now: String,
    },
    Expired,
    PreviousRunFailed,
    PreviousRunLost,
}

impl std::fmt::Display for MissReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MissReason::FirstRun => f.write_str("first run"),
            MissReason::CodeChanged { was, now } => {
                write!(f, "code version changed ({was} -> {now})")
            }
            MissReason::PayloadChanged => f.write_str("payload changed"),
            MissReason::DependencyChanged {
                dependency,
                was,
                now,
            } => write!(f, "dependency {dependency} changed ({was} -> {now})"),
            MissReason::Expired => f.write_str("cached result expired"),
            MissReason::PreviousRunFailed => f.write_str("previous run failed"),
            MissReason::PreviousRunLost => f.write_str("previous run was lost"),
        }
    }
}

/// One idempotency ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// SHA-256 (hex) of the function name and the explicit key or payload hash.
    pub key: String,
    pub function: String,
    pub version: u64,
    pub payload_hash: String,
    /// The run that produced (or is producing) the entry.
    pub task: TaskId,
    /// Running while `task` is unfinished; then done.
    pub done: bool,
    pub succeeded: bool,
    /// Dependency states at the run's start, then the run's tracked reads.
    pub dependencies: Vec<DependencyState>,
    pub result: Option<TaskResult>,
    pub recorded_ms: u64,
}

impl LedgerEntry {
    pub fn bytes(&self) -> u64 {
        let result = self
            .result
            .as_ref()
            .map_or(0, |r| r.output.len() + r.log.len());
        (result + self.dependencies.len() * 64 + 256) as u64
    }
}
