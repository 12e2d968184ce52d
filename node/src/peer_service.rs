//! The peer service (`PeerApi`): Raft's RPCs from the other nodes, the client calls they
//! forward to this node as leader, probes, campaigns for a handover, and task dispatch.
//!
//! Invariants:
//! - a Raft RPC, campaign or dispatch names the node it is meant for; one addressed to
//!   another id is refused before Raft sees it;
//! - a forwarded call is answered only by the leader: a node that no longer leads answers
//!   with a hint instead of forwarding again, so requests cannot loop.
//!
//! Only nodes of the cluster reach this service: the listener serves it to connections with a
//! node certificate (see [`crate::listener`]).

use openraft::error::RaftError;
use skiff_client::api::{
    ApiError, ClientCommand, CommandResult, FunctionVersion, InvokeRequest, NodeId, Task,
};
use skiff_raft_store::model::Principal;
use tarpc::context::Context;

use crate::admin;
use crate::invoke::Invoker;
use crate::peer::{
    AdminOp, AdminResult, PeerApi, PeerRefusal, Probe, ReadOp, ReadResult, StreamOp, StreamReply,
};
use crate::replica::Replica;
use crate::streams;

/// The peer service of one connection.
#[derive(Clone)]
pub struct PeerService {
    invoker: Invoker,
}

impl PeerService {
    pub fn new(invoker: Invoker) -> PeerService {
        PeerService { invoker }
    }

    fn replica(&self) -> &Replica {
        self.invoker.replica()
    }

    /// Refuses a call made for another node.
    fn check_target(&self, target: NodeId) -> Result<(), PeerRefusal> {
        let me = self.replica().id();
        if target != me {
            return Err(PeerRefusal::WrongNode {
                expected: target,
                actual: me,
            });
        }
        Ok(())
    }

    /// Refuses a forwarded call on a node that no longer leads, with who leads now.
    async fn leader_only(&self) -> Result<(), ApiError> {
        if !self.replica().is_leader().await {
            return Err(self.replica().not_leader_hint());
        }
        Ok(())
    }
}

impl PeerApi for PeerService {
    async fn append(
        self,
        _: Context,
        target: NodeId,
        req: openraft::raft::AppendEntriesRequest<skiff_raft_store::types::TypeConfig>,
    ) -> Result<Result<openraft::raft::AppendEntriesResponse<NodeId>, RaftError<NodeId>>, PeerRefusal>
    {
        self.check_target(target)?;
        Ok(self.replica().raft().append_entries(req).await)
    }

    async fn vote(
        self,
        _: Context,
        target: NodeId,
        req: openraft::raft::VoteRequest<NodeId>,
    ) -> Result<Result<openraft::raft::VoteResponse<NodeId>, RaftError<NodeId>>, PeerRefusal> {
        self.check_target(target)?;
        Ok(self.replica().raft().vote(req).await)
    }

    async fn snapshot(
        self,
        _: Context,
        target: NodeId,
        req: openraft::raft::InstallSnapshotRequest<skiff_raft_store::types::TypeConfig>,
    ) -> Result<
        Result<
            openraft::raft::InstallSnapshotResponse<NodeId>,
            RaftError<NodeId, openraft::error::InstallSnapshotError>,
        >,
        PeerRefusal,
    > {
        self.check_target(target)?;
        Ok(self.replica().raft().install_snapshot(req).await)
    }

    async fn forward_write(
        self,
        _: Context,
        principal: Principal,
        commands: Vec<ClientCommand>,
    ) -> Result<Vec<CommandResult>, ApiError> {
        self.replica().write_on_leader(principal, commands).await
    }

    async fn forward_read(self, _: Context, op: ReadOp) -> Result<ReadResult, ApiError> {
        self.leader_only().await?;
        self.replica().read_on_leader(op).await
    }

    async fn forward_admin(self, _: Context, op: AdminOp) -> Result<AdminResult, ApiError> {
        self.leader_only().await?;
        admin::admin_on_leader(self.replica(), op).await
    }

    async fn probe(self, _: Context) -> Probe {
        admin::own_probe(self.replica())
    }

    async fn campaign(self, _: Context, target: NodeId) -> Result<(), PeerRefusal> {
        self.check_target(target)?;
        if self.replica().stopping() {
            return Err(PeerRefusal::ShuttingDown);
        }
        tracing::info!(
            id = self.replica().id(),
            "asked to campaign: the leader is handing over"
        );
        self.replica()
            .raft()
            .trigger()
            .elect()
            .await
            .map_err(|_| PeerRefusal::ShuttingDown)
    }

    async fn forward_invoke(
        self,
        _: Context,
        principal: Principal,
        req: InvokeRequest,
    ) -> Result<Task, ApiError> {
        self.leader_only().await?;
        self.invoker.invoke_on_leader(principal, req).await
    }

    async fn forward_stream(
        self,
        _: Context,
        principal: Principal,
        op: StreamOp,
    ) -> Result<StreamReply, ApiError> {
        self.leader_only().await?;
        streams::request_on_leader(&self.invoker, principal, op).await
    }

    async fn dispatch(
        self,
        _: Context,
        target: NodeId,
        task: Task,
        function: FunctionVersion,
    ) -> Result<(), PeerRefusal> {
        self.check_target(target)?;
        self.invoker.run_dispatched(task, function);
        Ok(())
    }
}
