//! Backups: the whole state of a cluster as one file, and the restore of that file into the data
//! directories of a new cluster.
//!
//! A backup is a state machine image in the snapshot format (magic header, bincode, SHA-256
//! trailer; see [`crate::state_machine`]), taken from the applied state of a leader after it
//! confirmed its leadership, so it holds every write acknowledged before the backup began.
//!
//! A restore writes, into a fresh data directory, that state as the node's state machine and
//! snapshot at the log id the backup covers, with the *new* cluster's membership, and marks the
//! log purged up to that id. Every member of the new cluster is restored from the same file
//! with the same member list, so they start with identical state and log position and elect a
//! leader among themselves: no `cluster init` (a restored node is already initialized). Node ids
//! of the old cluster that appear in the state (workers that ran tasks) are just old workers
//! whose leases expire.
//!
//! Invariants: a restore never touches a directory that holds anything (so a node's old data
//! and its node id cannot be mixed with a restored state); a backup whose checksum, encoding or
//! state invariants fail is refused before anything is written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use openraft::storage::RaftLogStorage;

use crate::types::{BasicNode, LogId, Membership, NodeId};

/// Why a restore did nothing.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("data directory {0} is not empty: restore only into a new directory")]
    NotEmpty(PathBuf),
    #[error("cannot read data directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the member list is empty")]
    NoMembers,
    #[error("node {0} is not in the member list")]
    NotAMember(NodeId),
    #[error("bad backup: {0}")]
    BadBackup(String),
    #[error(transparent)]
    Store(#[from] crate::StoreError),
    #[error("cannot write the restored log position: {0}")]
    Log(String),
}

/// Restores `backup` into the new, empty data directory `dir` of node `id`, a member of the
/// new cluster `members` (id -> address, every member a voter). Returns the log id the
/// restored state covers.
pub async fn restore(
    dir: &Path,
    id: NodeId,
    members: &BTreeMap<NodeId, String>,
    backup: &[u8],
) -> Result<LogId, RestoreError> {
    if members.is_empty() {
        return Err(RestoreError::NoMembers);
    }
    if !members.contains_key(&id) {
        return Err(RestoreError::NotAMember(id));
    }
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(RestoreError::NotEmpty(dir.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(RestoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })
        }
    }
    let voters: BTreeSet<NodeId> = members.keys().copied().collect();
    let nodes: BTreeMap<NodeId, BasicNode> = members
        .iter()
        .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
        .collect();
    let membership = Membership::new(vec![voters], nodes);
    let (mut log_store, state_machine) = crate::open(dir).await?;
    let restored = state_machine.install_backup(backup, membership);
    let last = match restored {
        Ok(last) => last,
        Err(detail) => {
            drop((log_store, state_machine));
            // Nothing of the bad backup may stay behind: the directory was empty before.
            let _ = std::fs::remove_dir_all(dir);
            return Err(RestoreError::BadBackup(detail));
        }
    };
    // The log starts after the restored state: everything up to it counts as purged, so Raft
    // takes the state machine's snapshot as the base of the log.
    log_store
        .purge(last)
        .await
        .map_err(|e| RestoreError::Log(e.to_string()))?;
    Ok(last)
}
