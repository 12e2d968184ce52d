//! The data model of the replicated state machine: what a log entry carries and what applying
//! it answers.
//!
//! This module has no storage dependency so that clients can share the types. Everything here
//! is plain data; the behaviour lives in [`crate::apply`] (when the `storage` feature is on).
//!
//! Invariants:
//! - one log entry carries one [`Request`], a *group* of client commands stamped by the leader
//!   with the time and order they are applied in (group commit);
//! - every command carries a [`RequestId`] chosen by the client; a command whose id was already
//!   applied inside the deduplication window is answered with the stored result and changes
//!   nothing, so a retried write is applied once;
//! - versions are revisions of one counter shared by the whole key space: every successful
//!   write bumps it by one and the written key takes the new value as its version, so a version
//!   never repeats, even across delete and re-create.

use serde::{Deserialize, Serialize};

/// Identifies a node of the cluster. Never reused after a node's data is wiped.
pub type NodeId = u64;

/// Largest key, in bytes.
pub const KEY_BYTES_MAX: usize = 1024;
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

/// A client-chosen id that makes a write idempotent under retries.
///
/// Clients draw `client` at random once per process and count `seq` up per write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId {
    pub client: u64,
    pub seq: u64,
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}-{}", self.client, self.seq)
    }
}

/// The payload of one normal log entry: a group of client commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Wall-clock milliseconds since the Unix epoch, stamped by the leader. `apply` uses this
    /// (never its own clock) for anything time-dependent, e.g. deduplication expiry.
    pub time_ms: u64,
    pub commands: Vec<ClientCommand>,
}

/// One client command with the id that deduplicates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientCommand {
    pub request_id: RequestId,
    pub command: Command,
}

/// A state change a client asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Write `value` under `key`. With `expect_version`, only if the key's current version is
    /// exactly that (`Some(0)`: only if the key does not exist).
    KvPut {
        key: String,
        value: Vec<u8>,
        expect_version: Option<u64>,
    },
    /// Delete `key`. With `expect_version`, only if the key's current version is exactly that.
    KvDelete {
        key: String,
        expect_version: Option<u64>,
    },
}

impl Command {
    /// Checks sizes and formats. `apply` re-checks (a log entry is input too) and turns a
    /// violation into [`CommandResult::Invalid`].
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
        }
    }
}

/// Checks a key: non-empty, at most [`KEY_BYTES_MAX`] bytes, no control characters.
pub fn validate_key(key: &str) -> Result<(), InvalidCommand> {
    if key.is_empty() {
        return Err(InvalidCommand::EmptyKey);
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(InvalidCommand::KeyTooLarge {
            bytes: key.len(),
            max: KEY_BYTES_MAX,
        });
    }
    if key.chars().any(char::is_control) {
        return Err(InvalidCommand::KeyHasControlChar);
    }
    Ok(())
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
    /// Delete of a key that does not exist (and no version was expected).
    NotFound,
    /// `expect_version` did not match; `current` is the key's version (0: absent).
    Conflict { current: u64 },
    /// The command was malformed; nothing changed.
    Invalid(InvalidCommand),
}

/// One key with its value and version, as the state machine holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
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
