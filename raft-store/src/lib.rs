//! skiff-raft-store: the replicated state machine of skiff and its RocksDB storage.
//!
//! Raft (openraft) orders log entries; this crate stores the log durably, applies committed
//! entries to a deterministic state machine, and persists that state and its snapshots.
//!
//! Invariants:
//! - apply is a pure function of (state, entry): it never reads the clock or an RNG;
//! - business outcomes (CAS conflict, not found, invalid command) go into the response; a
//!   `StorageError` means the disk failed or holds garbage, and stops Raft on this node;
//! - an append and a vote are acknowledged only once synced to disk;
//! - openraft generics are named only in [`types`].
//!
//! # Layout
//! The data model comes from `skiff-proto`, which clients share without any storage
//! dependency; it is re-exported here under its old paths:
//! - [`ids`]: identifiers and key bounds; a leaf that imports nothing else of the model.
//! - [`functions`], [`streams`], [`tokens`]: the data of functions and tasks, stream jobs and
//!   bearer tokens (types, limits, validation, hashing); they import only [`ids`] (and
//!   `streams` the function limits).
//! - [`model`]: commands, responses and key-value types, built on the modules above.
//!
//! The rest is this crate's own and needs `storage`:
//! - [`types`] (feature `storage`): the openraft type configuration and aliases.
//! - [`apply`] (feature `storage`): the in-memory state and the pure apply function.
//! - [`sched`] (feature `storage`): the scheduler part of apply (functions, code, tasks,
//!   placement, the idempotency ledger, streams), with its invariant check.
//! - [`token_table`] (feature `storage`): the replicated token table and its apply.
//! - [`log_store`] (feature `storage`): the Raft log on RocksDB.
//! - [`state_machine`] (feature `storage`): the state machine on RocksDB, reads and snapshots.
//! - [`backup`] (feature `storage`): restoring a backup (an exported state) into a new cluster.
//! - `db` (private): the shared RocksDB instance, its column families and value encoding.
//!
//! On disk, one RocksDB directory (see [`open`]) holds five column families, all values
//! bincode with fixed-width integers:
//!
//! | column family | key                         | value                                   |
//! |---------------|-----------------------------|-----------------------------------------|
//! | `logs`        | index, `u64` big-endian     | log entry                               |
//! | `meta`        | `vote`, `last_purged`, `committed`, `format` | vote, log ids, layout version (`u32` BE) |
//! | `sm_kv`       | key bytes                   | `KvEntry`                               |
//! | `sm_dedup`    | principal (0: the node, else a token id), client, seq (`u64` BE each) | `DedupRecord` (time, command kind, result) |
//! | `sm_meta`     | `revision`, `last_time_ms`, `last_applied`, `last_membership`, `snapshot_meta`, `snapshot_data` | scalars, ids, the current snapshot |

#![forbid(unsafe_code)]

// The data model lives in `skiff-proto`, shared with clients; its old paths stay.
pub use skiff_proto::{functions, ids, model, streams, tokens};

#[cfg(feature = "storage")]
pub mod sched;

#[cfg(feature = "storage")]
pub mod apply;
#[cfg(feature = "storage")]
pub mod backup;
#[cfg(feature = "storage")]
mod db;
#[cfg(feature = "storage")]
pub mod log_store;
#[cfg(feature = "storage")]
pub mod state_machine;
#[cfg(feature = "storage")]
pub mod token_table;
#[cfg(feature = "storage")]
pub mod types;

#[cfg(feature = "storage")]
pub use storage::*;

#[cfg(feature = "storage")]
mod storage {
    use std::path::{Path, PathBuf};

    pub use crate::apply::StateMachineData;
    pub use crate::log_store::LogStore;
    pub use crate::state_machine::StateMachineStore;
    pub use crate::types::{Raft, TypeConfig};

    /// Why the store could not be opened.
    #[derive(Debug, thiserror::Error)]
    pub enum StoreError {
        #[error("cannot open rocksdb at {path}")]
        Open {
            path: PathBuf,
            #[source]
            source: rocksdb::Error,
        },
        #[error("cannot read the {what} from {path}")]
        Read {
            path: PathBuf,
            what: &'static str,
            #[source]
            source: rocksdb::Error,
        },
        #[error("cannot write the {what} to {path}")]
        Write {
            path: PathBuf,
            what: &'static str,
            #[source]
            source: rocksdb::Error,
        },
        #[error("corrupt {what} in {path}")]
        Decode {
            path: PathBuf,
            what: &'static str,
            #[source]
            source: bincode::Error,
        },
        #[error("state machine in {path} breaks an invariant")]
        Invalid {
            path: PathBuf,
            #[source]
            source: crate::apply::InvalidImage,
        },
        #[error(
            "{path} holds store format {found}, this build reads format {expected}: back the \
             cluster up with the build that wrote it (`skiff cluster backup`) and restore the \
             backup into new data directories with this one (`skiffd restore`)"
        )]
        Format {
            path: PathBuf,
            found: u32,
            expected: u32,
        },
    }

    /// Opens the store in `dir`, creating it if missing: one RocksDB instance with every
    /// column family, shared by the returned log store and state machine. The state machine
    /// is loaded into memory before this returns.
    ///
    /// Two processes cannot open the same directory: RocksDB's lock file refuses the second.
    pub async fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
        let db = crate::db::open_db(dir)?;
        let log_store = LogStore::new(db.clone());
        let state_machine = StateMachineStore::load(db, dir)?;
        Ok((log_store, state_machine))
    }
}
