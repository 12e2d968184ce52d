//! The Raft log on RocksDB: [`LogStore`] implements openraft's `RaftLogStorage` (storage v2).
//!
//! Column family `logs` maps a big-endian `u64` index to a bincode [`Entry`]; `meta` holds
//! the vote, the last purged log id and the committed log id.
//!
//! Invariants:
//! - an append is acknowledged to Raft (`LogFlushed::log_io_completed`) only after the whole
//!   batch of entries is synced to disk, and a vote is saved with a synced write: Raft's
//!   safety assumes both survive power loss. (Feature `unsafe-ack-before-sync` breaks the
//!   first on purpose; see below.)
//! - `last_purged` is made durable before any entry is deleted, so after a crash the store
//!   never looks like it has a hole at the front of the log without knowing why;
//! - an entry read back sits under the key of its own index.
//!
//! Blocking RocksDB calls run on the calling task, like openraft's own stores: Raft calls its
//! log store from one task, one operation at a time.

// openraft's `StorageError` is large, and it is the error type the storage traits demand;
// boxing it in private helpers would only add an allocation on the error path.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader};
use rocksdb::{Direction, IteratorMode, WriteBatch, DB};

use crate::db::{cf, decode, encode, storage_error, storage_failure, sync_write, CF_LOGS, CF_META};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

const KEY_VOTE: &[u8] = b"vote";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_COMMITTED: &[u8] = b"committed";

/// The durable Raft log. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.db.path())
            .finish()
    }
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

/// Write options for appends. Synced unless the deliberately broken test feature is on.
fn append_write_options() -> rocksdb::WriteOptions {
    #[cfg(not(feature = "unsafe-ack-before-sync"))]
    {
        sync_write()
    }
    // DELIBERATELY BROKEN (test-only feature): no sync and no write-ahead log, so the entries
    // live only in the memtable when Raft is told they are durable. A process crash, not only
    // a power cut, then loses acknowledged entries, which the chaos checker must detect.
    #[cfg(feature = "unsafe-ack-before-sync")]
    {
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(false);
        options.disable_wal(true);
        options
    }
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        LogStore { db }
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        subject: ErrorSubject<u64>,
    ) -> Result<Option<T>, StorageError> {
        let bytes = self
            .db
            .get_cf(cf(&self.db, CF_META), key)
            .map_err(|e| storage_error(subject.clone(), ErrorVerb::Read, &e))?;
        match bytes {
            None => Ok(None),
            Some(bytes) => decode(&bytes)
                .map(Some)
                .map_err(|e| storage_error(subject, ErrorVerb::Read, &e)),
        }
    }

    fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
        subject: ErrorSubject<u64>,
        sync: bool,
    ) -> Result<(), StorageError> {
        let bytes =
            encode(value).map_err(|e| storage_error(subject.clone(), ErrorVerb::Write, &e))?;
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(sync);
        self.db
            .put_cf_opt(cf(&self.db, CF_META), key, bytes, &options)
            .map_err(|e| storage_error(subject, ErrorVerb::Write, &e))
    }

    /// The last purged log id, if any entry was ever purged.
    pub fn last_purged(&self) -> Result<Option<LogId>, StorageError> {
        self.get_meta(KEY_LAST_PURGED, ErrorSubject::Logs)
    }

    /// The id of the last entry in the log (not counting purged ones).
    fn last_entry_id(&self) -> Result<Option<LogId>, StorageError> {
        let last = self
            .db
            .iterator_cf(cf(&self.db, CF_LOGS), IteratorMode::End)
            .next()
            .transpose()
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?;
        match last {
            None => Ok(None),
            Some((key, value)) => {
                let entry = decode_entry(&key, &value)?;
                Ok(Some(entry.log_id))
            }
        }
    }

    fn read_entries<RB: RangeBounds<u64>>(&self, range: RB) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(start) => *start,
            Bound::Excluded(start) => match start.checked_add(1) {
                Some(start) => start,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let start_key = index_key(start);
        let iter = self.db.iterator_cf(
            cf(&self.db, CF_LOGS),
            IteratorMode::From(&start_key, Direction::Forward),
        );
        let mut entries = Vec::new();
        for item in iter {
            let (key, value) =
                item.map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Read, &e))?;
            let entry = decode_entry(&key, &value)?;
            if !range.contains(&entry.log_id.index) {
                break;
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn write(
        &self,
        batch: WriteBatch,
        options: &rocksdb::WriteOptions,
    ) -> Result<(), StorageError> {
        self.db
            .write_opt(batch, options)
            .map_err(|e| storage_error(ErrorSubject::Logs, ErrorVerb::Write, &e))
    }
}

/// Decodes the entry stored under `key`, checking that it is the entry of that index.
fn decode_entry(key: &[u8], value: &[u8]) -> Result<Entry, StorageError> {
    let index = key_index(key).ok_or_else(|| {
        storage_failure(
            ErrorSubject::Logs,
            ErrorVerb::Read,
            format!("log key of {} bytes, expected 8", key.len()),
        )
    })?;
    let entry: Entry = decode(value)
        .map_err(|e| storage_error(ErrorSubject::LogIndex(index), ErrorVerb::Read, &e))?;
    if entry.log_id.index != index {
        return Err(storage_failure(
            ErrorSubject::LogIndex(index),
            ErrorVerb::Read,
            format!("entry {} stored under index {index}", entry.log_id),
        ));
    }
    Ok(entry)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.read_entries(range)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.last_purged()?;
        // After a crash inside `purge` entries up to `last_purged` may remain: take the larger.
        let last_log_id = std::cmp::max(self.last_entry_id()?, last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote, ErrorSubject::Vote, true)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE, ErrorSubject::Vote)
    }

    /// Not synced: the committed id is only a hint that lets a restarted node re-apply
    /// entries before hearing from the leader; losing the latest one is harmless.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta(KEY_COMMITTED, &committed, ErrorSubject::Store, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .get_meta::<Option<LogId>>(KEY_COMMITTED, ErrorSubject::Store)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let logs = cf(&self.db, CF_LOGS);
        let mut batch = WriteBatch::default();
        let mut previous: Option<u64> = None;
        for entry in entries {
            let index = entry.log_id.index;
            if let Some(previous) = previous {
                if index != previous + 1 {
                    return Err(storage_failure(
                        ErrorSubject::Log(entry.log_id),
                        ErrorVerb::Write,
                        format!("append is not contiguous: {index} after {previous}"),
                    ));
                }
            }
            previous = Some(index);
            let bytes = encode(&entry).map_err(|e| {
                storage_error(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, &e)
            })?;
            batch.put_cf(logs, index_key(index), bytes);
        }
        match self.write(batch, &append_write_options()) {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(error) => {
                callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
                Err(error)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating log");
        let logs = cf(&self.db, CF_LOGS);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(logs, index_key(log_id.index), index_key(u64::MAX));
        batch.delete_cf(logs, index_key(u64::MAX));
        self.write(batch, &sync_write())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging log");
        if let Some(purged) = self.last_purged()? {
            if purged >= log_id {
                return Ok(());
            }
        }
        // First make the new front of the log durable, then delete: a crash in between leaves
        // extra entries that are simply never read, never a hole Raft does not know about.
        self.put_meta(KEY_LAST_PURGED, &log_id, ErrorSubject::Logs, true)?;
        let logs = cf(&self.db, CF_LOGS);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(logs, index_key(0), index_key(log_id.index));
        batch.delete_cf(logs, index_key(log_id.index));
        self.write(batch, &sync_write())
    }
}
