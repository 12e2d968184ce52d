//! The state machine on RocksDB: [`StateMachineStore`] implements openraft's
//! `RaftStateMachine` and `RaftSnapshotBuilder`, and serves reads to the node.
//!
//! The state lives twice: in memory ([`StateMachineData`], what reads and apply use) and in
//! the column families `sm_kv`, `sm_dedup` and `sm_meta` (what a restart loads).
//!
//! Invariants:
//! - one `apply` call writes the effects of all its entries, the last applied log id and the
//!   last membership in ONE `WriteBatch`, so the disk never holds effects without the log id
//!   that produced them, or the reverse;
//! - that batch is not synced, on purpose: the log is durable and Raft re-applies every entry
//!   after the last applied id that reached disk, and apply is deterministic, so a lost tail
//!   of applies is recomputed exactly. All column families share one write-ahead log, so the
//!   next synced log write (append, vote, purge) makes earlier applies durable too; in
//!   particular the log is never purged past state that could still be lost;
//! - snapshot install replaces the whole state, on disk and in memory, in one synced batch;
//!   the current snapshot (meta and data) is kept in `sm_meta` so it survives restarts;
//! - snapshot data is framed with a magic header and a SHA-256 trailer, and every invariant
//!   of the decoded state is checked before it replaces anything: garbage is a
//!   `StorageError`, never a panic.

// openraft's `StorageError` is large, and it is the error type the storage traits demand;
// boxing it in private helpers would only add an allocation on the error path.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder};
use rocksdb::{IteratorMode, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use serde_bytes::ByteBuf;

use crate::apply::{DedupKey, DedupRecord, Mutation, StateMachineData};
use crate::db::{
    cf, decode, encode, storage_error, storage_failure, sync_write, CF_SM_DEDUP, CF_SM_KV,
    CF_SM_META, CF_SM_OBJ,
};
use crate::model::{CommandResult, KvEntry, KvPage, Principal, RequestId, Response};
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::StoreError;

/// Largest snapshot built or accepted for install, in bytes. The whole snapshot is held in
/// memory (openraft's `Cursor<Vec<u8>>` snapshot data) and stored as one RocksDB value, whose
/// hard limit is 4 GiB, so this bounds both. It is therefore also the bound on the size of the
/// whole state.
pub const SNAPSHOT_BYTES_MAX: usize = 2 << 30;

const KEY_REVISION: &[u8] = b"revision";
const KEY_LAST_TIME_MS: &[u8] = b"last_time_ms";
const KEY_LAST_APPLIED: &[u8] = b"last_applied";
const KEY_LAST_MEMBERSHIP: &[u8] = b"last_membership";
const KEY_SNAPSHOT_META: &[u8] = b"snapshot_meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"snapshot_data";

/// First bytes of every snapshot this build writes; the last byte is the format version.
/// Version 3 keys deduplication records by (principal, request id) and records the command's
/// kind; version 2 (before) is still read, without its deduplication records (see
/// [`decode_snapshot`]).
const SNAPSHOT_MAGIC: &[u8; 8] = b"skiffsn\x03";
/// The header of a version 2 snapshot or backup.
const SNAPSHOT_MAGIC_V2: &[u8; 8] = b"skiffsn\x02";
const SNAPSHOT_CHECKSUM_BYTES: usize = 32;

/// The replicated state machine, persisted in RocksDB. Cheap to clone: clones share the state,
/// so the node keeps one for reads while Raft owns another.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    state: RwLock<Applied>,
    /// Serializes writers of the current snapshot (build and install).
    snapshot_lock: Mutex<()>,
    /// Makes snapshot ids unique within this process.
    snapshot_seq: AtomicU64,
}

/// The in-memory state and what Raft needs to know about it.
struct Applied {
    data: StateMachineData,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("path", &self.inner.db.path())
            .field("applied", &self.applied())
            .finish()
    }
}

/// The snapshot payload, as written by `build_snapshot`.
#[derive(Serialize)]
struct SnapshotImageRef<'a> {
    last_applied: Option<LogId>,
    last_membership: &'a StoredMembership,
    revision: u64,
    last_time_ms: u64,
    kv: Vec<&'a KvEntry>,
    dedup: Vec<(&'a DedupKey, &'a DedupRecord)>,
    objects: Vec<(ByteBuf, ByteBuf)>,
}

/// The snapshot payload, as read back; same encoding as [`SnapshotImageRef`].
#[derive(Deserialize)]
struct SnapshotImage {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    revision: u64,
    last_time_ms: u64,
    kv: Vec<KvEntry>,
    dedup: Vec<(DedupKey, DedupRecord)>,
    objects: Vec<(ByteBuf, ByteBuf)>,
}

/// A version 2 snapshot payload: deduplication records keyed by request id alone, without
/// the command's kind.
#[derive(Deserialize)]
struct SnapshotImageV2 {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    revision: u64,
    last_time_ms: u64,
    kv: Vec<KvEntry>,
    dedup: Vec<(RequestId, DedupRecordV2)>,
    objects: Vec<(ByteBuf, ByteBuf)>,
}

#[derive(Deserialize)]
#[allow(dead_code)] // Decoded to be skipped: the encoding is not self-describing.
struct DedupRecordV2 {
    time_ms: u64,
    result: CommandResult,
}

impl From<SnapshotImageV2> for SnapshotImage {
    /// Its deduplication records are dropped: they do not say whose request they answer, and
    /// an id must never answer another caller. They only matter for the retries of the last
    /// minutes before the backup, which the restored cluster (new members, new leader) does
    /// not see anyway.
    fn from(v2: SnapshotImageV2) -> SnapshotImage {
        if !v2.dedup.is_empty() {
            tracing::info!(
                records = v2.dedup.len(),
                "format 2 snapshot: its deduplication records are dropped"
            );
        }
        SnapshotImage {
            last_applied: v2.last_applied,
            last_membership: v2.last_membership,
            revision: v2.revision,
            last_time_ms: v2.last_time_ms,
            kv: v2.kv,
            dedup: Vec::new(),
            objects: v2.objects,
        }
    }
}

fn encode_snapshot(
    data: &StateMachineData,
    last_applied: Option<LogId>,
    last_membership: &StoredMembership,
) -> Result<Vec<u8>, bincode::Error> {
    let image = SnapshotImageRef {
        last_applied,
        last_membership,
        revision: data.revision(),
        last_time_ms: data.last_time_ms(),
        kv: data.iter().collect(),
        dedup: data.dedup_iter().collect(),
        objects: data
            .objects()
            .into_iter()
            .map(|(k, v)| (ByteBuf::from(k), ByteBuf::from(v)))
            .collect(),
    };
    let mut bytes = SNAPSHOT_MAGIC.to_vec();
    bytes.extend(encode(&image)?);
    let checksum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&checksum);
    Ok(bytes)
}

/// Checks framing, checksum and encoding; the caller checks the state's invariants.
fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotImage, String> {
    if bytes.len() > SNAPSHOT_BYTES_MAX {
        return Err(format!(
            "snapshot is {} bytes, the limit is {SNAPSHOT_BYTES_MAX}",
            bytes.len()
        ));
    }
    let v2 = bytes.starts_with(SNAPSHOT_MAGIC_V2);
    if bytes.len() < SNAPSHOT_MAGIC.len() + SNAPSHOT_CHECKSUM_BYTES
        || !(bytes.starts_with(SNAPSHOT_MAGIC) || v2)
    {
        return Err("not a skiff snapshot (bad header)".to_string());
    }
    let (framed, checksum) = bytes.split_at(bytes.len() - SNAPSHOT_CHECKSUM_BYTES);
    if Sha256::digest(framed).as_slice() != checksum {
        return Err("snapshot checksum mismatch".to_string());
    }
    let body = &framed[SNAPSHOT_MAGIC.len()..];
    let undecodable = |e: bincode::Error| format!("snapshot does not decode: {e}");
    if v2 {
        return decode::<SnapshotImageV2>(body)
            .map(SnapshotImage::from)
            .map_err(undecodable);
    }
    decode(body).map_err(undecodable)
}

/// The `sm_dedup` key of a record: principal, client and sequence number, big-endian.
fn dedup_key(key: &DedupKey) -> [u8; 24] {
    let mut bytes = [0; 24];
    bytes[..8].copy_from_slice(&key.principal.as_u64().to_be_bytes());
    bytes[8..16].copy_from_slice(&key.id.client.to_be_bytes());
    bytes[16..].copy_from_slice(&key.id.seq.to_be_bytes());
    bytes
}

fn dedup_id(bytes: &[u8]) -> Option<DedupKey> {
    if bytes.len() != 24 {
        return None;
    }
    let word = |i: usize| u64::from_be_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    Some(DedupKey {
        principal: Principal::from_u64(word(0)),
        id: RequestId {
            client: word(8),
            seq: word(16),
        },
    })
}

/// Adds one mutation to `batch`.
fn persist_mutation(
    db: &DB,
    batch: &mut WriteBatch,
    mutation: &Mutation,
) -> Result<(), bincode::Error> {
    match mutation {
        Mutation::KvPut(entry) => {
            batch.put_cf(cf(db, CF_SM_KV), entry.key.as_bytes(), encode(entry)?)
        }
        Mutation::KvDelete(key) => batch.delete_cf(cf(db, CF_SM_KV), key.as_bytes()),
        Mutation::DedupPut { key, record } => {
            batch.put_cf(cf(db, CF_SM_DEDUP), dedup_key(key), encode(record)?)
        }
        Mutation::DedupDelete(key) => batch.delete_cf(cf(db, CF_SM_DEDUP), dedup_key(key)),
        Mutation::Obj { key, value } => match value {
            Some(v) => batch.put_cf(cf(db, CF_SM_OBJ), key, v),
            None => batch.delete_cf(cf(db, CF_SM_OBJ), key),
        },
        Mutation::Meta {
            revision,
            last_time_ms,
        } => {
            batch.put_cf(cf(db, CF_SM_META), KEY_REVISION, encode(revision)?);
            batch.put_cf(cf(db, CF_SM_META), KEY_LAST_TIME_MS, encode(last_time_ms)?);
        }
    }
    Ok(())
}

fn sm_write_error(e: &impl std::error::Error) -> StorageError {
    storage_failure(ErrorSubject::StateMachine, ErrorVerb::Write, e.to_string())
}

/// Reads the whole persisted state machine from its column families, checking invariants.
fn read_applied(db: &DB, path: &Path) -> Result<Applied, StoreError> {
    let read_error = |what: &'static str| {
        move |source| StoreError::Read {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let decode_error = |what: &'static str| {
        move |source| StoreError::Decode {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let invalid = |message: String| StoreError::Invalid {
        path: path.to_path_buf(),
        source: crate::apply::InvalidImage(message),
    };

    let meta = cf(db, CF_SM_META);
    let get_meta = |key: &[u8], what: &'static str| -> Result<Option<Vec<u8>>, StoreError> {
        db.get_cf(meta, key).map_err(read_error(what))
    };
    let revision: u64 = match get_meta(KEY_REVISION, "revision")? {
        Some(bytes) => decode(&bytes).map_err(decode_error("revision"))?,
        None => 0,
    };
    let last_time_ms: u64 = match get_meta(KEY_LAST_TIME_MS, "last time")? {
        Some(bytes) => decode(&bytes).map_err(decode_error("last time"))?,
        None => 0,
    };
    let last_applied: Option<LogId> = match get_meta(KEY_LAST_APPLIED, "last applied")? {
        Some(bytes) => decode(&bytes).map_err(decode_error("last applied"))?,
        None => None,
    };
    let last_membership: StoredMembership = match get_meta(KEY_LAST_MEMBERSHIP, "last membership")?
    {
        Some(bytes) => decode(&bytes).map_err(decode_error("last membership"))?,
        None => StoredMembership::default(),
    };

    let mut kv = Vec::new();
    for item in db.iterator_cf(cf(db, CF_SM_KV), IteratorMode::Start) {
        let (key, value) = item.map_err(read_error("key-value entry"))?;
        let entry: KvEntry = decode(&value).map_err(decode_error("key-value entry"))?;
        if entry.key.as_bytes() != &*key {
            return Err(invalid(format!(
                "entry for {:?} stored under another key",
                entry.key
            )));
        }
        kv.push(entry);
    }
    let mut dedup = Vec::new();
    for item in db.iterator_cf(cf(db, CF_SM_DEDUP), IteratorMode::Start) {
        let (key, value) = item.map_err(read_error("deduplication record"))?;
        let id = dedup_id(&key)
            .ok_or_else(|| invalid(format!("deduplication key of {} bytes", key.len())))?;
        let record: DedupRecord = decode(&value).map_err(decode_error("deduplication record"))?;
        dedup.push((id, record));
    }
    let mut objects = Vec::new();
    for item in db.iterator_cf(cf(db, CF_SM_OBJ), IteratorMode::Start) {
        let (key, value) = item.map_err(read_error("scheduler object"))?;
        objects.push((key.to_vec(), value.to_vec()));
    }
    let data = StateMachineData::from_parts(kv, dedup, objects, revision, last_time_ms).map_err(
        |source| StoreError::Invalid {
            path: path.to_path_buf(),
            source,
        },
    )?;
    Ok(Applied {
        data,
        last_applied,
        last_membership,
    })
}

impl StateMachineStore {
    /// Loads the state persisted in `db` (empty if none).
    pub(crate) fn load(db: Arc<DB>, path: &Path) -> Result<Self, StoreError> {
        let applied = read_applied(&db, path)?;
        tracing::info!(
            path = %path.display(),
            applied = ?applied.last_applied,
            revision = applied.data.revision(),
            keys = applied.data.len(),
            "loaded state machine"
        );
        Ok(StateMachineStore {
            inner: Arc::new(Inner {
                db,
                state: RwLock::new(applied),
                snapshot_lock: Mutex::new(()),
                snapshot_seq: AtomicU64::new(0),
            }),
        })
    }

    fn state(&self) -> RwLockReadGuard<'_, Applied> {
        self.inner
            .state
            .read()
            .expect("state machine lock poisoned by a panic during apply")
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, Applied> {
        self.inner
            .state
            .write()
            .expect("state machine lock poisoned by a panic during apply")
    }

    fn snapshot_guard(&self) -> MutexGuard<'_, ()> {
        self.inner
            .snapshot_lock
            .lock()
            .expect("snapshot lock poisoned by a panic while storing a snapshot")
    }

    fn db(&self) -> &DB {
        &self.inner.db
    }

    /// Runs `f` on the current state. Keep `f` short: apply waits while it runs.
    pub fn read<R>(&self, f: impl FnOnce(&StateMachineData) -> R) -> R {
        f(&self.state().data)
    }

    /// The entry under `key`, if any.
    pub fn get(&self, key: &str) -> Option<KvEntry> {
        self.read(|data| data.get(key).cloned())
    }

    /// One page of keys under `prefix`; see [`StateMachineData::list`].
    pub fn list(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> KvPage {
        self.read(|data| data.list(prefix, start_after, limit))
    }

    /// The revision of the last successful write.
    pub fn revision(&self) -> u64 {
        self.read(StateMachineData::revision)
    }

    /// The digest of the key-value contents; see [`StateMachineData::digest`].
    pub fn digest(&self) -> String {
        self.read(StateMachineData::digest)
    }

    /// The id of the last log entry applied (or covered by an installed snapshot).
    pub fn applied(&self) -> Option<LogId> {
        self.state().last_applied
    }

    /// The last membership applied.
    pub fn membership(&self) -> StoredMembership {
        self.state().last_membership.clone()
    }

    /// Applies `entries` in memory and persists their effects in one batch. If that fails,
    /// the in-memory state is reloaded from disk, so reads never see effects the disk lacks
    /// (the error still stops Raft).
    fn apply_entries(
        &self,
        entries: impl Iterator<Item = Entry>,
    ) -> Result<Vec<Response>, StorageError> {
        let mut state = self.state_mut();
        let result = self.apply_to(&mut state, entries);
        if let Err(error) = &result {
            tracing::error!(%error, "apply failed; reloading the state machine from disk");
            match read_applied(self.db(), self.db().path()) {
                Ok(on_disk) => *state = on_disk,
                Err(reload_error) => {
                    tracing::error!(%reload_error, "cannot reload the state machine");
                }
            }
        }
        result
    }

    fn apply_to(
        &self,
        state: &mut Applied,
        entries: impl Iterator<Item = Entry>,
    ) -> Result<Vec<Response>, StorageError> {
        let db = self.db();
        let meta_cf = cf(db, CF_SM_META);
        let mut batch = WriteBatch::default();
        let mut responses = Vec::new();
        let mut membership_changed = false;
        let mut any = false;
        for entry in entries {
            if state
                .last_applied
                .is_some_and(|last| entry.log_id.index <= last.index)
            {
                return Err(storage_failure(
                    ErrorSubject::Apply(entry.log_id),
                    ErrorVerb::Write,
                    format!(
                        "entry {} applied after {:?}: applies must go forward",
                        entry.log_id, state.last_applied
                    ),
                ));
            }
            match entry.payload {
                EntryPayload::Blank => responses.push(Response::default()),
                EntryPayload::Normal(request) => {
                    let (response, mutations) = state.data.apply_request(&request);
                    for mutation in &mutations {
                        persist_mutation(db, &mut batch, mutation)
                            .map_err(|e| sm_write_error(&e))?;
                    }
                    responses.push(response);
                }
                EntryPayload::Membership(membership) => {
                    state.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                    membership_changed = true;
                    responses.push(Response::default());
                }
            }
            state.last_applied = Some(entry.log_id);
            any = true;
        }
        if !any {
            return Ok(responses);
        }
        batch.put_cf(
            meta_cf,
            KEY_LAST_APPLIED,
            encode(&state.last_applied).map_err(|e| sm_write_error(&e))?,
        );
        if membership_changed {
            batch.put_cf(
                meta_cf,
                KEY_LAST_MEMBERSHIP,
                encode(&state.last_membership).map_err(|e| sm_write_error(&e))?,
            );
        }
        // Not synced: see the module documentation.
        db.write(batch)
            .map_err(|e| storage_error(ErrorSubject::StateMachine, ErrorVerb::Write, &e))?;
        Ok(responses)
    }

    /// Stores `meta` and `data` as the current snapshot unless a newer one is stored.
    fn store_snapshot(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), StorageError> {
        let _guard = self.snapshot_guard();
        let subject = || ErrorSubject::Snapshot(Some(meta.signature()));
        if let Some(stored) = self.stored_snapshot_meta()? {
            if stored.last_log_id > meta.last_log_id {
                return Ok(());
            }
        }
        let meta_cf = cf(self.db(), CF_SM_META);
        let mut batch = WriteBatch::default();
        batch.put_cf(
            meta_cf,
            KEY_SNAPSHOT_META,
            encode(meta).map_err(|e| storage_error(subject(), ErrorVerb::Write, &e))?,
        );
        batch.put_cf(meta_cf, KEY_SNAPSHOT_DATA, data);
        self.db()
            .write_opt(batch, &sync_write())
            .map_err(|e| storage_error(subject(), ErrorVerb::Write, &e))
    }

    fn stored_snapshot_meta(&self) -> Result<Option<SnapshotMeta>, StorageError> {
        let bytes = self
            .db()
            .get_cf(cf(self.db(), CF_SM_META), KEY_SNAPSHOT_META)
            .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, &e))?;
        bytes
            .map(|bytes| decode(&bytes))
            .transpose()
            .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, &e))
    }

    /// The applied state encoded in the snapshot format, and what it covers.
    fn encode_state(&self) -> Result<(Option<LogId>, StoredMembership, Vec<u8>), StorageError> {
        // A consistent copy, taken under the lock; encoding happens without it so apply is
        // held up only for the copy.
        let (data, last_applied, last_membership) = {
            let state = self.state();
            (
                state.data.clone(),
                state.last_applied,
                state.last_membership.clone(),
            )
        };
        let bytes = encode_snapshot(&data, last_applied, &last_membership)
            .map_err(|e| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Write, &e))?;
        Ok((last_applied, last_membership, bytes))
    }

    fn build(&self) -> Result<Snapshot, StorageError> {
        let (last_applied, last_membership, bytes) = self.encode_state()?;
        if bytes.len() > SNAPSHOT_BYTES_MAX {
            return Err(storage_failure(
                ErrorSubject::Snapshot(None),
                ErrorVerb::Write,
                format!(
                    "state of {} bytes exceeds the snapshot limit of {SNAPSHOT_BYTES_MAX}",
                    bytes.len()
                ),
            ));
        }
        let seq = self.inner.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(log_id) => format!("{log_id}-{seq}"),
            None => format!("empty-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        self.store_snapshot(&meta, &bytes)?;
        tracing::info!(%meta, bytes = bytes.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }

    /// The whole applied state in the snapshot format (framed, checksummed), without storing
    /// it as the current snapshot: a backup. Returns the log id it covers.
    pub fn export(&self) -> Result<(Option<LogId>, Vec<u8>), StorageError> {
        let (last_applied, _, bytes) = self.encode_state()?;
        Ok((last_applied, bytes))
    }

    /// Installs a backup made by [`Self::export`] (on any cluster) as this store's state, at
    /// the log id it covers, with `membership` instead of the one it was made under. For a
    /// fresh store only (the caller checks); the image is checked like a received snapshot.
    pub(crate) fn install_backup(
        &self,
        image: &[u8],
        membership: crate::types::Membership,
    ) -> Result<LogId, String> {
        let mut decoded = decode_snapshot(image)?;
        let Some(last) = decoded.last_applied else {
            return Err("the backup holds an empty state (nothing was ever applied)".to_string());
        };
        decoded.last_membership = StoredMembership::new(Some(last), membership);
        let data = StateMachineData::from_parts(
            decoded.kv,
            decoded.dedup,
            decoded
                .objects
                .into_iter()
                .map(|(k, v)| (k.into_vec(), v.into_vec())),
            decoded.revision,
            decoded.last_time_ms,
        )
        .map_err(|e| format!("the backup's state breaks an invariant: {e}"))?;
        let bytes = encode_snapshot(&data, Some(last), &decoded.last_membership)
            .map_err(|e| format!("cannot encode the restored state: {e}"))?;
        let meta = SnapshotMeta {
            last_log_id: Some(last),
            last_membership: decoded.last_membership,
            snapshot_id: format!("{last}-restored"),
        };
        self.install(&meta, bytes).map_err(|e| e.to_string())?;
        Ok(last)
    }

    fn install(&self, meta: &SnapshotMeta, bytes: Vec<u8>) -> Result<(), StorageError> {
        let subject = || ErrorSubject::Snapshot(Some(meta.signature()));
        let reject = |message: String| storage_failure(subject(), ErrorVerb::Read, message);
        let image = decode_snapshot(&bytes).map_err(reject)?;
        if image.last_applied != meta.last_log_id || image.last_membership != meta.last_membership {
            return Err(reject(format!(
                "snapshot holds state at {:?}, its meta says {:?}",
                image.last_applied, meta.last_log_id
            )));
        }
        let data = StateMachineData::from_parts(
            image.kv,
            image.dedup,
            image
                .objects
                .into_iter()
                .map(|(k, v)| (k.into_vec(), v.into_vec())),
            image.revision,
            image.last_time_ms,
        )
        .map_err(|e| reject(e.to_string()))?;

        let _snapshot_guard = self.snapshot_guard();
        let mut state = self.state_mut();
        let db = self.db();
        let write_error =
            |e: &dyn std::fmt::Display| storage_failure(subject(), ErrorVerb::Write, e.to_string());
        let mut batch = WriteBatch::default();
        for name in [CF_SM_KV, CF_SM_DEDUP, CF_SM_OBJ] {
            clear_column_family(db, name, &mut batch)
                .map_err(|e| storage_error(subject(), ErrorVerb::Delete, &e))?;
        }
        let (kv_cf, dedup_cf, meta_cf) =
            (cf(db, CF_SM_KV), cf(db, CF_SM_DEDUP), cf(db, CF_SM_META));
        for entry in data.iter() {
            batch.put_cf(
                kv_cf,
                entry.key.as_bytes(),
                encode(entry).map_err(|e| write_error(&e))?,
            );
        }
        let obj_cf = cf(db, CF_SM_OBJ);
        for (key, value) in data.objects() {
            batch.put_cf(obj_cf, key, value);
        }
        for (id, record) in data.dedup_iter() {
            batch.put_cf(
                dedup_cf,
                dedup_key(id),
                encode(record).map_err(|e| write_error(&e))?,
            );
        }
        let scalars: [(&[u8], Vec<u8>); 5] = [
            (
                KEY_REVISION,
                encode(&data.revision()).map_err(|e| write_error(&e))?,
            ),
            (
                KEY_LAST_TIME_MS,
                encode(&data.last_time_ms()).map_err(|e| write_error(&e))?,
            ),
            (
                KEY_LAST_APPLIED,
                encode(&meta.last_log_id).map_err(|e| write_error(&e))?,
            ),
            (
                KEY_LAST_MEMBERSHIP,
                encode(&meta.last_membership).map_err(|e| write_error(&e))?,
            ),
            (
                KEY_SNAPSHOT_META,
                encode(meta).map_err(|e| write_error(&e))?,
            ),
        ];
        for (key, value) in scalars {
            batch.put_cf(meta_cf, key, value);
        }
        batch.put_cf(meta_cf, KEY_SNAPSHOT_DATA, &bytes);
        db.write_opt(batch, &sync_write())
            .map_err(|e| storage_error(subject(), ErrorVerb::Write, &e))?;
        *state = Applied {
            data,
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
        };
        tracing::info!(%meta, bytes = bytes.len(), "installed snapshot");
        Ok(())
    }

    fn current_snapshot(&self) -> Result<Option<Snapshot>, StorageError> {
        let _guard = self.snapshot_guard();
        let Some(meta) = self.stored_snapshot_meta()? else {
            return Ok(None);
        };
        let data = self
            .db()
            .get_cf(cf(self.db(), CF_SM_META), KEY_SNAPSHOT_DATA)
            .map_err(|e| {
                storage_error(
                    ErrorSubject::Snapshot(Some(meta.signature())),
                    ErrorVerb::Read,
                    &e,
                )
            })?;
        let Some(data) = data else {
            return Err(storage_failure(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                "snapshot meta stored without its data".to_string(),
            ));
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// Adds to `batch` the deletion of every key of column family `name`.
fn clear_column_family(db: &DB, name: &str, batch: &mut WriteBatch) -> Result<(), rocksdb::Error> {
    let handle = cf(db, name);
    let first = db
        .iterator_cf(handle, IteratorMode::Start)
        .next()
        .transpose()?;
    let last = db
        .iterator_cf(handle, IteratorMode::End)
        .next()
        .transpose()?;
    if let (Some((first, _)), Some((last, _))) = (first, last) {
        // The range end is exclusive: delete the last key on its own.
        batch.delete_range_cf(handle, &first, &last);
        batch.delete_cf(handle, &last);
    }
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        self.build()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let state = self.state();
        Ok((state.last_applied, state.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.apply_entries(entries.into_iter())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        self.install(meta, snapshot.into_inner())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        self.current_snapshot()
    }
}
