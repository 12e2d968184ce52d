//! The RocksDB instance shared by the log store and the state machine: column families, value
//! encoding and the mapping of RocksDB and codec failures to [`StorageError`].
//!
//! Invariants:
//! - one RocksDB instance holds every column family, so all writes share one write-ahead log:
//!   a synced write (log append, vote) also makes every earlier unsynced write durable, which
//!   is what lets state machine applies skip the sync (see [`crate::state_machine`]);
//! - every value is bincode with fixed-width integers; decoding is bounded by the input
//!   length, so a corrupt length prefix is an error, never a huge allocation.

use std::path::Path;
use std::sync::Arc;

use bincode::Options as _;
use openraft::{AnyError, ErrorSubject, ErrorVerb};
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::{NodeId, StorageError, StorageIOError};
use crate::StoreError;

/// Log entries, keyed by big-endian index so key order is log order.
pub(crate) const CF_LOGS: &str = "logs";
/// Log store metadata: vote, last purged log id, committed log id, format version.
pub(crate) const CF_META: &str = "meta";
/// State machine keys: key bytes -> `KvEntry`.
pub(crate) const CF_SM_KV: &str = "sm_kv";
/// State machine deduplication records: big-endian (principal, client, seq) -> `DedupRecord`.
pub(crate) const CF_SM_DEDUP: &str = "sm_dedup";
/// State machine scalars, applied log id and membership, and the current snapshot.
pub(crate) const CF_SM_META: &str = "sm_meta";
/// Scheduler objects (functions, code chunks, tasks, nodes): tagged key -> bincode value.
pub(crate) const CF_SM_OBJ: &str = "sm_obj";

const COLUMN_FAMILIES: [&str; 6] = [
    CF_LOGS,
    CF_META,
    CF_SM_KV,
    CF_SM_DEDUP,
    CF_SM_META,
    CF_SM_OBJ,
];

/// Version of the on-disk layout; bump it on any incompatible change. Version 3: log entries
/// carry each command's principal, and deduplication records are keyed by it (a version 2
/// directory is refused; its backup restores, see `state_machine::decode_snapshot`).
pub(crate) const FORMAT_VERSION: u32 = 3;
const KEY_FORMAT: &[u8] = b"format";

/// Opens (creating if missing) the database with every column family, and checks that the
/// directory holds a layout this build understands.
pub(crate) fn open_db(dir: &Path) -> Result<Arc<DB>, StoreError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let descriptors = COLUMN_FAMILIES
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
    let db =
        DB::open_cf_descriptors(&options, dir, descriptors).map_err(|source| StoreError::Open {
            path: dir.to_path_buf(),
            source,
        })?;

    let read_error = |source| StoreError::Read {
        path: dir.to_path_buf(),
        what: "format version",
        source,
    };
    let meta = cf(&db, CF_META);
    match db.get_cf(meta, KEY_FORMAT).map_err(read_error)? {
        None => {
            let mut sync = rocksdb::WriteOptions::default();
            sync.set_sync(true);
            db.put_cf_opt(meta, KEY_FORMAT, FORMAT_VERSION.to_be_bytes(), &sync)
                .map_err(|source| StoreError::Write {
                    path: dir.to_path_buf(),
                    what: "format version",
                    source,
                })?;
        }
        Some(bytes) => {
            let found = <[u8; 4]>::try_from(bytes.as_slice())
                .map(u32::from_be_bytes)
                .unwrap_or(0);
            if found != FORMAT_VERSION {
                return Err(StoreError::Format {
                    path: dir.to_path_buf(),
                    found,
                    expected: FORMAT_VERSION,
                });
            }
        }
    }
    Ok(Arc::new(db))
}

/// The handle of a column family that [`open_db`] created.
pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    db.cf_handle(name)
        .expect("open_db creates every column family before any store uses it")
}

/// Write options for writes that must be on stable storage before they are acknowledged.
pub(crate) fn sync_write() -> rocksdb::WriteOptions {
    let mut options = rocksdb::WriteOptions::default();
    options.set_sync(true);
    options
}

fn codec() -> impl bincode::Options {
    bincode::DefaultOptions::new().with_fixint_encoding()
}

pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, bincode::Error> {
    codec().serialize(value)
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::Error> {
    codec().with_limit(bytes.len() as u64).deserialize(bytes)
}

/// A storage error about `subject`, caused by `source`.
pub(crate) fn storage_error<E>(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    source: &E,
) -> StorageError
where
    E: std::error::Error + 'static,
{
    StorageIOError::new(subject, verb, AnyError::new(source)).into()
}

/// A storage error without an underlying error value: a broken invariant found on disk or in
/// received data, or a limit exceeded.
pub(crate) fn storage_failure(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    message: String,
) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::error(message)).into()
}
