//! Shared read barriers: many concurrent linearizable reads confirm leadership with one
//! quorum round instead of one round each.
//!
//! A read is linearizable once a leadership confirmation that *started after the read
//! arrived* has completed (that round also waits until everything committed before it is
//! applied). Rounds run one at a time; a read that arrives while a round is running waits for
//! the next one, and every read waiting when a round starts is covered by it.
//!
//! Invariant: a read returns only after a round whose id is greater than the last round id
//! started when the read arrived has succeeded.

use std::sync::atomic::{AtomicU64, Ordering};

use openraft::error::{CheckIsLeaderError, RaftError};
use skiff_client::api::NodeId;
use skiff_raft_store::types::Raft;
use tokio::sync::Mutex;

/// Coalesces leadership confirmations.
#[derive(Default)]
pub struct ReadIndex {
    /// Id of the last round started.
    started: AtomicU64,
    /// Id of the last round that succeeded; held while a round runs.
    done: Mutex<u64>,
}

impl ReadIndex {
    /// Waits until a round that started after this call has confirmed leadership.
    pub async fn barrier(
        &self,
        raft: &Raft,
    ) -> Result<(), RaftError<NodeId, CheckIsLeaderError<NodeId, openraft::BasicNode>>> {
        let arrival = self.started.load(Ordering::SeqCst);
        let mut done = self.done.lock().await;
        if *done > arrival {
            return Ok(());
        }
        let id = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        raft.ensure_linearizable().await?;
        *done = id;
        Ok(())
    }
}
