//! The data model of the replicated state machine: what a log entry carries and what applying
//! it answers.
//!
//! This module has no storage dependency so that clients can share the types. Everything here
//! is plain data; the behaviour lives in `skiff_raft_store::apply`.
//!
//! Invariants:
//! - one log entry carries one [`Request`], a *group* of client commands stamped by the leader
//!   with the time and order they are applied in (group commit);
//! - every command carries a [`RequestId`] chosen by the client and the [`Principal`] the
//!   receiving node authenticated; a command whose (principal, id) was already applied inside
//!   the deduplication window is answered with the stored result and changes nothing, so a
//!   retried write is applied once; the same id from another principal is another command,
//!   and from the same principal with a command of another kind it is refused;
//! - versions are revisions of one counter shared by the whole key space: every successful
//!   write bumps it by one and the written key takes the new value as its version, so a version
//!   never repeats, even across delete and re-create.

use serde::{Deserialize, Serialize};

use crate::functions::{
    chunk_count, validate_function_name, validate_spec, CacheOutcome, FunctionSpec, Heartbeat,
    IdempotencyInput, TaskId, TaskResult, CODE_BYTES_MAX, CODE_CHUNK_BYTES, HEARTBEAT_ENTRIES_MAX,
    IDEMPOTENCY_KEY_BYTES_MAX, INVOCATION_DEPS_MAX, LOG_BYTES_MAX, OUTPUT_BYTES_MAX,
    PAYLOAD_BYTES_MAX, TRACKED_READS_MAX,
};
use crate::ids::{check_key, KeyError, TokenId};
pub use crate::ids::{NodeId, RequestId, KEY_BYTES_MAX};
use crate::streams::{
    StreamId, StreamItem, StreamStartRequest, STREAM_ADVANCE_BYTES_MAX, STREAM_ADVANCE_ITEMS_MAX,
    STREAM_CURSOR_BYTES_MAX, STREAM_ERROR_BYTES_MAX,
};
use crate::tokens::{validate_hash, validate_token_name, Role, TokenInfo};

/// Largest value, in bytes.
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
/// Most commands a leader puts into one log entry.
pub const COMMANDS_PER_ENTRY_MAX: usize = 4096;
/// Most entries one `kv ls` page returns.
pub const LIST_LIMIT_MAX: u32 = 1000;
/// How long the result of an applied command is remembered for deduplication.
pub const DEDUP_WINDOW_MS: u64 = 10 * 60 * 1000;
/// Most request ids remembered for deduplication; past this the oldest are forgotten first.
pub const DEDUP_ENTRIES_MAX: usize = 1_000_000;

/// The payload of one normal log entry: a group of client commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Wall-clock milliseconds since the Unix epoch, stamped by the leader. `apply` uses this
    /// (never its own clock) for anything time-dependent, e.g. deduplication expiry.
    pub time_ms: u64,
    pub commands: Vec<LoggedCommand>,
}

/// One client command with the id that deduplicates it, as a client sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCommand {
    pub request_id: RequestId,
    pub command: Command,
}

impl ClientCommand {
    /// This command as sent by `principal`, for the log.
    pub fn by(self, principal: Principal) -> LoggedCommand {
        LoggedCommand {
            principal,
            request_id: self.request_id,
            command: self.command,
        }
    }
}

/// Who sent a command, as the node that took the call authenticated it: the caller's token,
/// or the node itself (heartbeats, completions, stream advances, token creation). Never taken
/// from what a client sends: a client's request id is deduplicated only among the commands of
/// the same principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Principal {
    /// A node of the cluster, on its own behalf.
    Node,
    /// A client call authenticated with this token.
    Token(TokenId),
}

impl Principal {
    /// The principal as one number (token ids start at 1, so 0 is the node), for storage keys.
    pub fn as_u64(self) -> u64 {
        match self {
            Principal::Node => 0,
            Principal::Token(id) => id,
        }
    }

    /// The inverse of [`Principal::as_u64`].
    pub fn from_u64(n: u64) -> Principal {
        match n {
            0 => Principal::Node,
            id => Principal::Token(id),
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Node => f.write_str("the node"),
            Principal::Token(id) => write!(f, "token {id}"),
        }
    }
}

/// A command as the log carries it: with the principal the receiving node authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedCommand {
    pub principal: Principal,
    pub request_id: RequestId,
    pub command: Command,
}

/// What kind of command a request id was used for: a retry must be of the same kind to get
/// the stored result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CommandKind {
    KvPut,
    KvDelete,
    CodeChunk,
    FnDeploy,
    FnRemove,
    Submit,
    FnPurgeCache,
    Heartbeat,
    Complete,
    StreamStart,
    StreamAdvance,
    StreamCancel,
    StreamRedrive,
    TokenCreate,
    TokenRevoke,
}

impl CommandKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::KvPut => "key write",
            CommandKind::KvDelete => "key delete",
            CommandKind::CodeChunk => "code upload",
            CommandKind::FnDeploy => "deploy",
            CommandKind::FnRemove => "function removal",
            CommandKind::Submit => "invocation",
            CommandKind::FnPurgeCache => "cache purge",
            CommandKind::Heartbeat => "heartbeat",
            CommandKind::Complete => "completion",
            CommandKind::StreamStart => "stream start",
            CommandKind::StreamAdvance => "stream advance",
            CommandKind::StreamCancel => "stream cancel",
            CommandKind::StreamRedrive => "stream redrive",
            CommandKind::TokenCreate => "token create",
            CommandKind::TokenRevoke => "token revoke",
        }
    }
}

impl std::fmt::Display for CommandKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state change a client asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Write `value` under `key`. With `expect_version`, only if the key's current version is
    /// exactly that (`Some(0)`: only if the key does not exist).
    KvPut {
        key: String,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        expect_version: Option<u64>,
    },
    /// Delete `key`. With `expect_version`, only if the key's current version is exactly that.
    KvDelete {
        key: String,
        expect_version: Option<u64>,
    },
    /// Store one chunk of a code archive whose SHA-256 is `digest`. The blob is complete, and
    /// checked against its digest, when its last missing chunk arrives.
    CodeChunk {
        digest: String,
        total_bytes: u64,
        index: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// Make a new version of a function from an uploaded, complete code archive.
    FnDeploy { spec: Box<FunctionSpec> },
    /// Remove a function and all its versions; its queued tasks fail.
    FnRemove { name: String },
    /// Queue an invocation of `function` at `version` (latest if `None`).
    Submit {
        function: String,
        version: Option<u64>,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        sync: bool,
        /// Inputs for an idempotent function (ignored for others).
        idempotency: Option<Box<IdempotencyInput>>,
    },
    /// Forget the cached results of an idempotent function.
    FnPurgeCache { name: String },
    /// A worker's periodic report (liveness, capacity, warm pools, started tasks).
    Heartbeat(Box<Heartbeat>),
    /// The end of one attempt, reported by the node that ran it under `token`.
    Complete {
        task: TaskId,
        token: u64,
        result: Box<TaskResult>,
        /// Keys the run read through the data service, with the versions it saw.
        reads: Vec<(String, u64)>,
    },
    /// Start a stream job (the receiving node has checked that its source is readable).
    StreamStart { request: Box<StreamStartRequest> },
    /// Move a running job's cursor from `from_cursor` (which must be its cursor) to
    /// `to_cursor`, creating the tasks of the items read between the two; `exhausted` when
    /// the source has nothing after `to_cursor`. Proposed by the leader's stream driver.
    StreamAdvance {
        job: StreamId,
        from_cursor: String,
        to_cursor: String,
        /// The index of the first item (must be the job's next item index).
        first_item: u64,
        items: Vec<StreamItem>,
        exhausted: bool,
    },
    /// Stop a job: it reads no more items; its queued invocations fail (and can be redriven).
    StreamCancel { job: StreamId },
    /// Run a job's failed items again, with the function's latest version.
    StreamRedrive { job: StreamId },
    /// Make a token of `role`; `hash` is the SHA-256 of a secret the receiving node drew
    /// (the secret itself never enters the log). With `bootstrap`, only on a cluster that
    /// has no token yet (the first admin token, made by `cluster init`).
    TokenCreate {
        role: Role,
        name: Option<String>,
        hash: String,
        bootstrap: bool,
    },
    /// Revoke a token: from the entry on, no node accepts it.
    TokenRevoke { id: TokenId },
}

impl Command {
    /// The kind of this command, for the deduplication check.
    pub fn kind(&self) -> CommandKind {
        match self {
            Command::KvPut { .. } => CommandKind::KvPut,
            Command::KvDelete { .. } => CommandKind::KvDelete,
            Command::CodeChunk { .. } => CommandKind::CodeChunk,
            Command::FnDeploy { .. } => CommandKind::FnDeploy,
            Command::FnRemove { .. } => CommandKind::FnRemove,
            Command::Submit { .. } => CommandKind::Submit,
            Command::FnPurgeCache { .. } => CommandKind::FnPurgeCache,
            Command::Heartbeat(_) => CommandKind::Heartbeat,
            Command::Complete { .. } => CommandKind::Complete,
            Command::StreamStart { .. } => CommandKind::StreamStart,
            Command::StreamAdvance { .. } => CommandKind::StreamAdvance,
            Command::StreamCancel { .. } => CommandKind::StreamCancel,
            Command::StreamRedrive { .. } => CommandKind::StreamRedrive,
            Command::TokenCreate { .. } => CommandKind::TokenCreate,
            Command::TokenRevoke { .. } => CommandKind::TokenRevoke,
        }
    }

    /// Approximate encoded size, to keep log entries under a byte bound.
    pub fn approx_bytes(&self) -> usize {
        match self {
            Command::KvPut { key, value, .. } => key.len() + value.len(),
            Command::KvDelete { key, .. } => key.len(),
            Command::CodeChunk { digest, bytes, .. } => digest.len() + bytes.len(),
            Command::FnDeploy { spec } => {
                let sandbox = |entry: &[String],
                               policy: &Option<String>,
                               env: &[(String, String)],
                               data: &crate::functions::DataGrant| {
                    policy.as_ref().map_or(0, String::len)
                        + entry.iter().map(String::len).sum::<usize>()
                        + env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
                        + data
                            .read_prefixes
                            .iter()
                            .chain(&data.write_prefixes)
                            .map(String::len)
                            .sum::<usize>()
                };
                1024 + sandbox(&spec.entry, &spec.policy, &spec.env, &spec.data)
                    + spec
                        .stages
                        .iter()
                        .map(|s| 256 + sandbox(&s.entry, &s.policy, &s.env, &s.data))
                        .sum::<usize>()
            }
            Command::FnRemove { name } | Command::FnPurgeCache { name } => name.len(),
            Command::Submit {
                function,
                payload,
                idempotency,
                ..
            } => {
                function.len()
                    + payload.len()
                    + idempotency.as_ref().map_or(0, |i| {
                        i.key.as_ref().map_or(0, String::len)
                            + (i.tokens.len() + i.files.len()) * 2 * IDEMPOTENCY_KEY_BYTES_MAX
                    })
            }
            Command::Heartbeat(hb) => {
                64 + hb.warm.iter().map(|w| w.function.len() + 16).sum::<usize>()
                    + hb.running.len() * 16
            }
            Command::Complete { result, reads, .. } => {
                256 + reads.iter().map(|(k, _)| k.len() + 8).sum::<usize>()
                    + result.output.len()
                    + result.log.len()
                    + result.error.as_ref().map_or(0, String::len)
            }
            Command::StreamStart { request } => {
                512 + request.source.spec().len()
                    + request
                        .options
                        .results_prefix
                        .as_ref()
                        .map_or(0, String::len)
            }
            Command::StreamAdvance {
                from_cursor,
                to_cursor,
                items,
                ..
            } => {
                64 + from_cursor.len()
                    + to_cursor.len()
                    + items.iter().map(|i| i.bytes() + 8).sum::<usize>()
            }
            Command::StreamCancel { .. } | Command::StreamRedrive { .. } => 16,
            Command::TokenCreate { name, hash, .. } => {
                32 + hash.len() + name.as_ref().map_or(0, String::len)
            }
            Command::TokenRevoke { .. } => 16,
        }
    }

    /// Whether a client may send this command through the generic write call. Heartbeats and
    /// completions come from nodes only, submissions through `invoke`, and token commands
    /// through the token calls (the node draws the secret).
    pub fn is_client_command(&self) -> bool {
        matches!(
            self,
            Command::KvPut { .. }
                | Command::KvDelete { .. }
                | Command::CodeChunk { .. }
                | Command::FnDeploy { .. }
                | Command::FnRemove { .. }
                | Command::FnPurgeCache { .. }
        )
    }
}

impl Command {
    /// Checks sizes and formats. `apply` re-checks (a log entry is input too) and turns a
    /// violation into [`CommandResult::Invalid`].
    // Longer than 100 lines on purpose: one match arm per command, each its bounds, so every
    // command's limits read in one place and a new command cannot be added without its arm.
    pub fn validate(&self) -> Result<(), InvalidCommand> {
        match self {
            Command::KvPut { key, value, .. } => {
                validate_key(key)?;
                if value.len() > VALUE_BYTES_MAX {
                    return Err(InvalidCommand::ValueTooLarge {
                        bytes: value.len(),
                        max: VALUE_BYTES_MAX,
                    });
                }
                Ok(())
            }
            Command::KvDelete { key, .. } => validate_key(key),
            Command::CodeChunk {
                digest,
                total_bytes,
                index,
                bytes,
            } => {
                if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(InvalidCommand::Other(
                        "code digest must be 64 hex digits".into(),
                    ));
                }
                if *total_bytes == 0 || *total_bytes > CODE_BYTES_MAX {
                    return Err(InvalidCommand::Other(format!(
                        "code archive of {total_bytes} bytes: it must be 1 byte to {CODE_BYTES_MAX} bytes"
                    )));
                }
                let chunks = chunk_count(*total_bytes);
                if *index >= chunks {
                    return Err(InvalidCommand::Other(format!(
                        "chunk {index} of an archive of {chunks} chunks"
                    )));
                }
                let expected = if *index + 1 == chunks {
                    *total_bytes - u64::from(*index) * CODE_CHUNK_BYTES as u64
                } else {
                    CODE_CHUNK_BYTES as u64
                };
                if bytes.len() as u64 != expected {
                    return Err(InvalidCommand::Other(format!(
                        "chunk {index} is {} bytes, expected {expected}",
                        bytes.len()
                    )));
                }
                Ok(())
            }
            Command::FnDeploy { spec } => validate_spec(spec).map_err(InvalidCommand::Other),
            Command::FnRemove { name } | Command::FnPurgeCache { name } => {
                validate_function_name(name).map_err(InvalidCommand::Other)
            }
            Command::Submit {
                function,
                payload,
                idempotency,
                ..
            } => {
                validate_function_name(function).map_err(InvalidCommand::Other)?;
                if let Some(i) = idempotency {
                    let long = |s: &String| s.len() > IDEMPOTENCY_KEY_BYTES_MAX;
                    if i.key.as_ref().is_some_and(long)
                        || i.tokens.iter().any(|(n, v)| long(n) || long(v))
                        || i.files.iter().any(|(p, h)| p.len() > 4096 || long(h))
                        || i.tokens.len() > INVOCATION_DEPS_MAX
                        || i.files.len() > INVOCATION_DEPS_MAX
                    {
                        return Err(InvalidCommand::Other(format!(
                            "idempotency inputs: at most {INVOCATION_DEPS_MAX} tokens and files, keys and tokens up to {IDEMPOTENCY_KEY_BYTES_MAX} bytes"
                        )));
                    }
                }
                if payload.len() > PAYLOAD_BYTES_MAX {
                    return Err(InvalidCommand::Other(format!(
                        "payload is {} bytes, the limit is {PAYLOAD_BYTES_MAX}",
                        payload.len()
                    )));
                }
                Ok(())
            }
            Command::Heartbeat(hb) => {
                if hb.warm.len() > HEARTBEAT_ENTRIES_MAX || hb.running.len() > HEARTBEAT_ENTRIES_MAX
                {
                    return Err(InvalidCommand::Other(format!(
                        "a heartbeat lists at most {HEARTBEAT_ENTRIES_MAX} warm pools and tasks"
                    )));
                }
                Ok(())
            }
            Command::Complete { result, reads, .. } => {
                if reads.len() > TRACKED_READS_MAX {
                    return Err(InvalidCommand::Other(format!(
                        "at most {TRACKED_READS_MAX} tracked reads per run"
                    )));
                }
                if result.output.len() > OUTPUT_BYTES_MAX || result.log.len() > LOG_BYTES_MAX {
                    return Err(InvalidCommand::Other(format!(
                        "a result holds at most {OUTPUT_BYTES_MAX} bytes of output and {LOG_BYTES_MAX} of log"
                    )));
                }
                if result
                    .error
                    .as_ref()
                    .is_some_and(|e| e.len() > LOG_BYTES_MAX)
                {
                    return Err(InvalidCommand::Other("error text too long".into()));
                }
                Ok(())
            }
            Command::StreamStart { request } => {
                validate_function_name(&request.function).map_err(InvalidCommand::Other)?;
                request.source.validate().map_err(InvalidCommand::Other)?;
                request.options.validate().map_err(InvalidCommand::Other)
            }
            Command::StreamAdvance {
                from_cursor,
                to_cursor,
                items,
                ..
            } => {
                if from_cursor.len() > STREAM_CURSOR_BYTES_MAX
                    || to_cursor.len() > STREAM_CURSOR_BYTES_MAX
                {
                    return Err(InvalidCommand::Other(format!(
                        "a stream cursor is limited to {STREAM_CURSOR_BYTES_MAX} bytes"
                    )));
                }
                let bytes: usize = items.iter().map(StreamItem::bytes).sum();
                if items.len() > STREAM_ADVANCE_ITEMS_MAX
                    || bytes > STREAM_ADVANCE_BYTES_MAX + PAYLOAD_BYTES_MAX
                {
                    return Err(InvalidCommand::Other(format!(
                        "a stream advance carries at most {STREAM_ADVANCE_ITEMS_MAX} items and {STREAM_ADVANCE_BYTES_MAX} bytes"
                    )));
                }
                if items.iter().any(|i| match i {
                    StreamItem::Ok(b) => b.len() > PAYLOAD_BYTES_MAX - 2,
                    StreamItem::Bad(e) => e.len() > STREAM_ERROR_BYTES_MAX,
                }) {
                    return Err(InvalidCommand::Other(
                        "a stream item is larger than a payload".into(),
                    ));
                }
                Ok(())
            }
            Command::StreamCancel { .. } | Command::StreamRedrive { .. } => Ok(()),
            Command::TokenCreate {
                name,
                hash,
                bootstrap,
                role,
            } => {
                validate_hash(hash).map_err(InvalidCommand::Other)?;
                if let Some(name) = name {
                    validate_token_name(name).map_err(InvalidCommand::Other)?;
                }
                if *bootstrap && *role != Role::Admin {
                    return Err(InvalidCommand::Other(
                        "a bootstrap token is an admin token".into(),
                    ));
                }
                Ok(())
            }
            Command::TokenRevoke { .. } => Ok(()),
        }
    }
}

/// Checks a key: non-empty, at most [`KEY_BYTES_MAX`] bytes, no control characters.
pub fn validate_key(key: &str) -> Result<(), InvalidCommand> {
    check_key(key).map_err(InvalidCommand::from)
}

/// Why a command is refused before it changes anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum InvalidCommand {
    #[error("key is empty")]
    EmptyKey,
    #[error("key is {bytes} bytes, the limit is {max}")]
    KeyTooLarge { bytes: usize, max: usize },
    #[error("key contains a control character")]
    KeyHasControlChar,
    #[error("value is {bytes} bytes, the limit is {max}")]
    ValueTooLarge { bytes: usize, max: usize },
    #[error("{0}")]
    Other(String),
}

impl From<KeyError> for InvalidCommand {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Empty => InvalidCommand::EmptyKey,
            KeyError::TooLarge { bytes, max } => InvalidCommand::KeyTooLarge { bytes, max },
            KeyError::ControlChar => InvalidCommand::KeyHasControlChar,
        }
    }
}

/// The answer to one normal log entry: one result per command, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub results: Vec<CommandResult>,
}

/// The outcome of one command. Business outcomes (conflict, not found, invalid) live here; a
/// storage failure is never a `CommandResult`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// The key now holds the value, at `version`.
    Put { version: u64 },
    /// The key was deleted; it had been at `version`.
    Deleted { version: u64 },
    /// Delete of a key that does not exist (and no version was expected); revocation of a
    /// token that does not exist.
    NotFound,
    /// `expect_version` did not match; `current` is the key's version (0: absent).
    Conflict { current: u64 },
    /// The command was malformed; nothing changed.
    Invalid(InvalidCommand),
    /// A code chunk was stored; `complete` once the whole archive is in and checked.
    ChunkStored { complete: bool },
    /// A function version was made.
    Deployed { version: u64 },
    /// A function was removed.
    Removed,
    /// An invocation was queued as `task`; when placed at once, on `node` under `token`.
    /// For an idempotent function, `cache` says whether it runs, joined a running identical
    /// invocation (`task` is that one), or was answered from the ledger (`task` is finished).
    Submitted {
        task: TaskId,
        node: Option<NodeId>,
        token: u64,
        cache: Option<CacheOutcome>,
    },
    /// The cached results of a function were forgotten.
    Purged { entries: u64 },
    /// The invocation was refused because the function's queue (or the cluster's task
    /// store) is full; nothing was queued.
    Throttled { reason: String },
    /// A heartbeat or completion was taken into account; a stream job was cancelled.
    Accepted,
    /// A stream job was started.
    StreamStarted { job: StreamId },
    /// A stream's cursor moved; these tasks were created for its items.
    StreamAdvanced { tasks: Vec<TaskId> },
    /// A stream's failed items were put back in flight, in these tasks.
    StreamRedriven { items: u64, tasks: Vec<TaskId> },
    /// A token was made (or, for a retried bootstrap, already existed).
    TokenCreated { token: TokenInfo },
    /// A token is revoked (now, or already before).
    TokenRevoked { token: TokenInfo },
    /// The command was well formed but refused by the state: unknown function or version,
    /// incomplete code, stale fencing token, a bound reached. Nothing changed.
    Rejected { reason: String },
}

/// One key with its value and version, as the state machine holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision of the last write to this key.
    pub version: u64,
    /// Revision of the write that created this key (since it last did not exist).
    pub create_version: u64,
}

/// One page of a prefix listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvPage {
    pub entries: Vec<KvEntry>,
    /// Pass as `start_after` to get the next page; `None` when this page is the last.
    pub next: Option<String>,
    /// The state machine's revision when the page was read.
    pub revision: u64,
}
