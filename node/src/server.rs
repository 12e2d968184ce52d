//! The worker's view of the node while it is still written against `Node`: the replica's
//! applied state, Raft's metrics, the node's metrics and its worker, and writes and reads
//! through the replica. Nothing else uses it.

use std::sync::Arc;

use skiff_client::api::{ApiError, ClientCommand, CommandResult, ReadConsistency};
use skiff_raft_store::model::Principal;
use skiff_raft_store::types::Raft;
use skiff_raft_store::StateMachineStore;

use crate::metrics::Metrics;
use crate::peer::{ReadOp, ReadResult};
use crate::replica::Replica;
use crate::worker::Worker;

pub struct NodeInner {
    pub store: StateMachineStore,
    pub raft: Raft,
    pub metrics: Arc<Metrics>,
    pub worker: Arc<Worker>,
    replica: Replica,
}

/// A cheap handle on what the worker uses of the node.
#[derive(Clone)]
pub struct Node(pub Arc<NodeInner>);

impl Node {
    pub fn new(replica: Replica, worker: Arc<Worker>) -> Node {
        Node(Arc::new(NodeInner {
            store: replica.store().clone(),
            raft: replica.raft().clone(),
            metrics: replica.metrics().clone(),
            worker,
            replica,
        }))
    }

    pub fn stopping(&self) -> bool {
        self.0.replica.stopping()
    }

    pub async fn write(
        &self,
        principal: Principal,
        commands: Vec<ClientCommand>,
    ) -> Result<Vec<CommandResult>, ApiError> {
        self.0.replica.write(principal, commands).await
    }

    pub async fn read(
        &self,
        op: ReadOp,
        consistency: ReadConsistency,
    ) -> Result<ReadResult, ApiError> {
        self.0.replica.read(op, consistency).await
    }
}
