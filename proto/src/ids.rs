//! Identifiers and key bounds shared by every part of the data model: the one module the
//! others build on, so it imports nothing else of the crate.
//!
//! Invariants:
//! - every id here is given by a replicated counter (or, for [`RequestId`], chosen by a
//!   client) and never reused;
//! - a key is valid anywhere in the model only if [`check_key`] accepts it.

use serde::{Deserialize, Serialize};

/// Identifies a node of the cluster. Never reused after a node's data is wiped.
pub type NodeId = u64;
/// Identifies a task, unique in the cluster, never reused.
pub type TaskId = u64;
/// A function's identity: given when the function is created (in apply, from a counter
/// every replica keeps alike) and never given again, so a function removed and created anew
/// under the same name has another one even though its versions count from 1 again. Nodes key
/// everything they keep for a function version (warm sandboxes, data sockets) by it.
/// 0 is a function created before identities existed.
pub type FunctionId = u64;
/// Identifies a stream job, unique in the cluster, never reused.
pub type StreamId = u64;
/// Identifies a token; never reused.
pub type TokenId = u64;

/// Largest key, in bytes.
pub const KEY_BYTES_MAX: usize = 1024;

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

/// Why a key is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is empty")]
    Empty,
    #[error("key is {bytes} bytes, the limit is {max}")]
    TooLarge { bytes: usize, max: usize },
    #[error("key contains a control character")]
    ControlChar,
}

/// Checks a key: non-empty, at most [`KEY_BYTES_MAX`] bytes, no control characters.
pub fn check_key(key: &str) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    if key.len() > KEY_BYTES_MAX {
        return Err(KeyError::TooLarge {
            bytes: key.len(),
            max: KEY_BYTES_MAX,
        });
    }
    if key.chars().any(char::is_control) {
        return Err(KeyError::ControlChar);
    }
    Ok(())
}

/// Checks a key prefix: at most [`KEY_BYTES_MAX`] bytes, no control characters (empty is
/// every key).
pub fn prefix_is_valid(prefix: &str) -> bool {
    prefix.len() <= KEY_BYTES_MAX && !prefix.chars().any(char::is_control)
}
