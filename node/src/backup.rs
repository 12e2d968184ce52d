//! Backups of a cluster's state and their restore into a new cluster.
//!
//! `skiff cluster backup FILE` asks the leader for an export of its applied state, taken after
//! it confirmed its leadership (so every acknowledged write is in it), and downloads it in
//! chunks. `skiffd restore --backup FILE --id N --data-dir DIR --members ...` writes it into the
//! new, empty data directory of each member of a new cluster (see
//! [`skiff_raft_store::backup`]); started, the members elect a leader among themselves.

use std::collections::BTreeMap;
use std::path::Path;

use skiff_raft_store::model::NodeId;

/// The largest backup file `restore` reads, in bytes (the snapshot bound).
pub const BACKUP_BYTES_MAX: u64 = skiff_raft_store::state_machine::SNAPSHOT_BYTES_MAX as u64;

/// Why a restore did nothing.
#[derive(Debug, thiserror::Error)]
pub enum RestoreFileError {
    #[error("cannot read backup {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("backup {path} is {bytes} bytes, more than the {BACKUP_BYTES_MAX} a state may take")]
    TooLarge {
        path: std::path::PathBuf,
        bytes: u64,
    },
    #[error(transparent)]
    Restore(#[from] skiff_raft_store::backup::RestoreError),
}

/// Restores the backup file at `backup` into node `id`'s new data directory `data_dir` (the
/// directory `skiffd --data-dir` takes) as a member of `members`. Returns the log index the
/// restored state covers.
pub async fn restore_file(
    backup: &Path,
    id: NodeId,
    data_dir: &Path,
    members: &BTreeMap<NodeId, String>,
) -> Result<u64, RestoreFileError> {
    let read_error = |source| RestoreFileError::Read {
        path: backup.to_path_buf(),
        source,
    };
    let bytes = std::fs::metadata(backup).map_err(read_error)?.len();
    if bytes > BACKUP_BYTES_MAX {
        return Err(RestoreFileError::TooLarge {
            path: backup.to_path_buf(),
            bytes,
        });
    }
    let image = std::fs::read(backup).map_err(read_error)?;
    // The same layout as a node's own: the store lives in DATA_DIR/raft.
    let last =
        skiff_raft_store::backup::restore(&data_dir.join("raft"), id, members, &image).await?;
    Ok(last.index)
}

/// Bytes per backup chunk: well inside the client and peer frame limits.
pub const BACKUP_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// How long an export stays in memory after its last chunk was read.
const EXPORT_IDLE_MS: u64 = 10 * 60 * 1000;

/// The leader's one export in progress: the whole image in memory (bounded by the snapshot
/// limit), served in chunks. A new backup replaces it; a reader of the old one is told so and
/// starts again.
#[derive(Default)]
pub struct Exports {
    current: std::sync::Mutex<Option<Export>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Export {
    id: u64,
    covers_index: u64,
    sha256: String,
    bytes: std::sync::Arc<Vec<u8>>,
    last_read: std::time::Instant,
}

impl Exports {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Export>> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a new export (replacing any other) and returns its first chunk.
    pub fn start(&self, covers_index: u64, bytes: Vec<u8>) -> BackupChunk {
        use sha2::Digest;
        let id = 1 + self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let export = Export {
            id,
            covers_index,
            sha256: hex::encode(sha2::Sha256::digest(&bytes)),
            bytes: std::sync::Arc::new(bytes),
            last_read: std::time::Instant::now(),
        };
        let chunk = export.chunk(0);
        *self.lock() = Some(export);
        chunk
    }

    /// The chunk of export `id` at `offset`, or why not.
    pub fn chunk(&self, id: u64, offset: u64) -> Result<BackupChunk, String> {
        let mut current = self.lock();
        let idle = std::time::Duration::from_millis(EXPORT_IDLE_MS);
        if current
            .as_ref()
            .is_some_and(|e| e.last_read.elapsed() > idle)
        {
            *current = None;
        }
        match current.as_mut() {
            Some(export) if export.id == id => {
                if offset > export.bytes.len() as u64 {
                    return Err(format!(
                        "offset {offset} is past the end of the backup ({} bytes)",
                        export.bytes.len()
                    ));
                }
                export.last_read = std::time::Instant::now();
                Ok(export.chunk(offset))
            }
            _ => Err(format!(
                "backup {id} is gone (replaced by a newer backup, expired, or the leader \
                 changed): start again"
            )),
        }
    }
}

impl Export {
    fn chunk(&self, offset: u64) -> BackupChunk {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        let end = (start + BACKUP_CHUNK_BYTES).min(self.bytes.len());
        BackupChunk {
            export_id: self.id,
            covers_index: self.covers_index,
            total_bytes: self.bytes.len() as u64,
            sha256: self.sha256.clone(),
            offset: start as u64,
            bytes: self.bytes[start..end].to_vec(),
        }
    }
}

pub use skiff_client::api::BackupChunk;
