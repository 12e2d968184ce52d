//! The accesses a function made, or tried to make, through one socket: kept per peer (each
//! sandbox runs as its own host uid), bounded in records and peers, the overflow counted.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// The kind of one access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessOp {
    Get,
    Put,
    Delete,
    List,
}

impl fmt::Display for AccessOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessOp::Get => "get",
            AccessOp::Put => "put",
            AccessOp::Delete => "delete",
            AccessOp::List => "list",
        })
    }
}

/// One access a function made, or tried to make, through the data service.
///
/// Recorded: every denied request (`allowed: false`, `version: 0`) and every request the
/// backend answered. Not recorded: malformed requests and requests the backend failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRecord {
    pub op: AccessOp,
    /// The key; for [`AccessOp::List`], the prefix.
    pub key: String,
    /// The version seen or written, 0 for an absent key: for a get, the version read; for a
    /// put, the version written; for a delete, the version the key had; for a put or delete
    /// that conflicted, the version found; for a list, the store's revision when the page was
    /// read.
    pub version: u64,
    pub allowed: bool,
}

/// The accesses of one run, in the order they were made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accesses {
    /// The first [`ACCESS_RECORDS_MAX`](super::ACCESS_RECORDS_MAX) records.
    pub records: Vec<AccessRecord>,
    /// Records that did not fit; when non-zero, `records` is incomplete.
    pub dropped: u64,
}

/// Most distinct peers (sandboxes, by host uid) an [`AccessLog`] keeps records for; accesses
/// of further peers are only counted.
pub const ACCESS_PEERS_MAX: usize = 1024;

tokio::task_local! {
    /// The host uid of the process on the other end of the connection being served.
    pub(super) static PEER_UID: Option<u32>;
}

/// A bounded log of the accesses made through one [`DataSocket`](super::DataSocket), kept per peer: every
/// sandbox runs as its own host uid, so a run's accesses are those of its uid.
#[derive(Debug)]
pub struct AccessLog {
    records_max: usize,
    inner: Mutex<HashMap<Option<u32>, Accesses>>,
}

impl AccessLog {
    pub(super) fn new(records_max: usize) -> Self {
        Self {
            records_max,
            inner: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn record(&self, record: AccessRecord) {
        let uid = PEER_UID.try_with(|u| *u).ok().flatten();
        let mut inner = self.lock();
        let peer = if inner.contains_key(&uid) || inner.len() < ACCESS_PEERS_MAX {
            uid
        } else {
            None
        };
        let accesses = inner.entry(peer).or_default();
        if peer == uid && accesses.records.len() < self.records_max {
            accesses.records.push(record);
        } else {
            accesses.dropped += 1;
        }
    }

    /// Takes every access logged so far (all peers), leaving the log empty.
    pub fn take(&self) -> Accesses {
        let mut all = Accesses::default();
        for (_, a) in self.lock().drain() {
            all.records.extend(a.records);
            all.dropped += a.dropped;
        }
        all
    }

    /// Takes the accesses made by processes running as host uid `uid`.
    pub fn take_for(&self, uid: u32) -> Accesses {
        self.lock().remove(&Some(uid)).unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Option<u32>, Accesses>> {
        // Each change under the lock is a single push or counter bump: a poisoned log is whole.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_log_bound_holds_without_a_socket() {
        let log = AccessLog::new(2);
        for i in 0..5 {
            log.record(AccessRecord {
                op: AccessOp::Get,
                key: format!("k{i}"),
                version: i,
                allowed: true,
            });
        }
        let taken = log.take();
        assert_eq!(taken.records.len(), 2);
        assert_eq!(taken.records[1].key, "k1");
        assert_eq!(taken.dropped, 3);
        assert_eq!(log.take(), Accesses::default());
    }
}
