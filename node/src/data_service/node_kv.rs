//! The data service's backend on a node: the replicated key-value store, read and written
//! through the log like any client's, retried across a leader change within
//! [`DATA_RETRY_WINDOW`].

use std::time::{Duration, Instant};

use skiff_client::api::{ApiError, ClientCommand, Command, CommandResult};
use skiff_raft_store::model::Principal;

use super::KvBackend;
use crate::peer::{ReadOp, ReadResult};
use crate::replica::Replica;

/// The cluster's key-value store as the data service sees it: linearizable reads and
/// writes through the log, like any client's.
pub struct NodeKv(Replica);

impl NodeKv {
    pub fn new(node: Replica) -> Self {
        NodeKv(node)
    }
}

impl NodeKv {
    /// One write for a function, with a fresh request id, retried across a leader change.
    fn write_command(
        &self,
        command: Command,
    ) -> futures::future::BoxFuture<'static, Result<CommandResult, String>> {
        let node = self.0.clone();
        Box::pin(async move {
            let command = ClientCommand {
                request_id: node.next_request_id(),
                command,
            };
            first_result(write_retrying(&node, command).await)
        })
    }
}

impl KvBackend for NodeKv {
    fn refused(&self, reason: &'static str) {
        self.0.metrics().rejected(reason);
    }

    fn get(
        &self,
        key: String,
    ) -> futures::future::BoxFuture<'static, Result<Option<skiff_client::api::KvEntry>, String>>
    {
        let node = self.0.clone();
        Box::pin(async move {
            match node
                .read(
                    ReadOp::Get { key },
                    skiff_client::api::ReadConsistency::Linearizable,
                )
                .await
                .map_err(|e| e.to_string())?
            {
                ReadResult::Get(e) => Ok(e),
                _ => Err("unexpected answer to a get".into()),
            }
        })
    }

    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        expect_version: Option<u64>,
    ) -> futures::future::BoxFuture<'static, Result<CommandResult, String>> {
        self.write_command(Command::KvPut {
            key,
            value,
            expect_version,
        })
    }

    fn delete(
        &self,
        key: String,
        expect_version: Option<u64>,
    ) -> futures::future::BoxFuture<'static, Result<CommandResult, String>> {
        self.write_command(Command::KvDelete {
            key,
            expect_version,
        })
    }

    fn list(
        &self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> futures::future::BoxFuture<'static, Result<skiff_client::api::KvPage, String>> {
        let node = self.0.clone();
        Box::pin(async move {
            let op = ReadOp::List {
                prefix,
                start_after,
                limit,
            };
            match read_retrying(&node, op).await.map_err(|e| e.to_string())? {
                ReadResult::List(p) => Ok(p),
                _ => Err("unexpected answer to a list".into()),
            }
        })
    }
}

/// How long a data-service call keeps retrying while the cluster has no leader.
const DATA_RETRY_WINDOW: Duration = Duration::from_secs(10);
/// The first pause between retries of a data-service call; it doubles up to
/// [`DATA_BACKOFF_MAX`].
const DATA_BACKOFF_FIRST: Duration = Duration::from_millis(20);
/// The longest pause between retries of a data-service call.
const DATA_BACKOFF_MAX: Duration = Duration::from_millis(500);

/// A write for a function, retried (same request id, so applied once) across a leader
/// change within [`DATA_RETRY_WINDOW`].
async fn write_retrying(
    node: &Replica,
    command: ClientCommand,
) -> Result<Vec<CommandResult>, ApiError> {
    let deadline = Instant::now() + DATA_RETRY_WINDOW;
    let mut backoff = DATA_BACKOFF_FIRST;
    loop {
        match node.write(Principal::Node, vec![command.clone()]).await {
            Err(e) if e.is_retryable() && Instant::now() + backoff < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(DATA_BACKOFF_MAX);
            }
            other => return other,
        }
    }
}

/// A read for a function, retried across a leader change within [`DATA_RETRY_WINDOW`].
async fn read_retrying(node: &Replica, op: ReadOp) -> Result<ReadResult, ApiError> {
    let deadline = Instant::now() + DATA_RETRY_WINDOW;
    let mut backoff = DATA_BACKOFF_FIRST;
    loop {
        match node
            .read(op.clone(), skiff_client::api::ReadConsistency::Linearizable)
            .await
        {
            Err(e) if e.is_retryable() && Instant::now() + backoff < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(DATA_BACKOFF_MAX);
            }
            other => return other,
        }
    }
}

fn first_result(r: Result<Vec<CommandResult>, ApiError>) -> Result<CommandResult, String> {
    r.map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| "no result".to_string())
}
