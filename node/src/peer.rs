//! The node-to-node service: Raft RPCs, and forwarding of client requests to the leader.
//!
//! Invariants:
//! - every Raft RPC names the node it is meant for; a node refuses RPCs addressed to another id,
//!   so a wrong address in the membership (or a node dialing itself) is caught on the first
//!   call instead of corrupting the cluster;
//! - the Raft network never dials its own id;
//! - each RPC carries a deadline derived from openraft's `RPCOption`; a transport failure is
//!   reported to openraft as `Unreachable`, which makes it back off.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use skiff_client::api::{
    ApiError, ClientCommand, ClusterStatus, CommandResult, FunctionRecord, FunctionVersion,
    InvokeRequest, KvEntry, KvPage, NodeId, RequestId, StreamId, StreamJob, StreamStartRequest,
    Task, TaskFilter, TaskId, Workers,
};
use skiff_client::transport::{self, TlsConnector};
use skiff_raft_store::model::Principal;
use skiff_raft_store::types::TypeConfig;
use tarpc::context;
use tokio::sync::Mutex;

/// Why a peer refused an RPC before handing it to Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PeerRefusal {
    #[error("this is node {actual}, not node {expected}")]
    WrongNode { expected: NodeId, actual: NodeId },
    #[error("node is shutting down")]
    ShuttingDown,
}

/// A linearizable read forwarded to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadOp {
    Get {
        key: String,
    },
    List {
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    },
    Task {
        id: TaskId,
    },
    Tasks {
        filter: TaskFilter,
        after: TaskId,
        limit: u32,
    },
    Function {
        name: String,
    },
    Functions,
    Workers,
    Stream {
        id: StreamId,
    },
    Streams,
    /// A chunk of a backup; served by the leader only (see [`crate::backup`]).
    Backup {
        export: Option<u64>,
        offset: u64,
    },
    Tokens,
}

/// The answer to a [`ReadOp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadResult {
    Get(Option<KvEntry>),
    List(KvPage),
    Task(Option<Box<Task>>),
    Tasks(Vec<Task>),
    Function(Option<Box<FunctionRecord>>),
    Functions(Vec<FunctionRecord>),
    Workers(Workers),
    Stream(Option<Box<StreamJob>>),
    Streams(Vec<StreamJob>),
    Backup(Box<crate::backup::BackupChunk>),
    Tokens(Vec<skiff_raft_store::tokens::TokenInfo>),
}

/// A stream request forwarded to the leader (which reads the sources).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StreamOp {
    Start {
        request_id: RequestId,
        req: StreamStartRequest,
    },
    Cancel {
        request_id: RequestId,
        id: StreamId,
    },
    Redrive {
        request_id: RequestId,
        id: StreamId,
    },
}

/// The answer to a [`StreamOp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StreamReply {
    Started(StreamId),
    Cancelled,
    Redriven(u64),
}

/// A membership change forwarded to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminOp {
    AddNode { id: NodeId, addr: String },
    RemoveNode { id: NodeId },
    Status,
}

/// The answer to an [`AdminOp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminResult {
    Done,
    Status(ClusterStatus),
}

/// A node's own report, for status probes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    pub id: NodeId,
    pub last_applied: Option<u64>,
}

type RaftResult<T> = Result<Result<T, RaftError<NodeId>>, PeerRefusal>;

#[tarpc::service]
pub trait PeerApi {
    async fn append(
        target: NodeId,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> RaftResult<AppendEntriesResponse<NodeId>>;
    async fn vote(target: NodeId, req: VoteRequest<NodeId>) -> RaftResult<VoteResponse<NodeId>>;
    async fn snapshot(
        target: NodeId,
        req: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
        PeerRefusal,
    >;
    /// Commands of a client call the forwarding node authenticated as `principal`.
    async fn forward_write(
        principal: Principal,
        commands: Vec<ClientCommand>,
    ) -> Result<Vec<CommandResult>, ApiError>;
    async fn forward_read(op: ReadOp) -> Result<ReadResult, ApiError>;
    async fn forward_admin(op: AdminOp) -> Result<AdminResult, ApiError>;
    async fn probe() -> Probe;
    /// Start an election now (a stopping leader hands over to this node; see `handover`).
    async fn campaign(target: NodeId) -> Result<(), PeerRefusal>;
    /// Submits (and, with `wait`, waits for) an invocation on the leader.
    async fn forward_invoke(principal: Principal, req: InvokeRequest) -> Result<Task, ApiError>;
    /// A stream request, for the leader.
    async fn forward_stream(principal: Principal, op: StreamOp) -> Result<StreamReply, ApiError>;
    /// The leader's fast path: run this task, assigned to the target node under its token.
    /// The target also finds it in its applied state (the slow path); running it twice under
    /// one token is prevented on the target.
    async fn dispatch(
        target: NodeId,
        task: Task,
        function: FunctionVersion,
    ) -> Result<(), PeerRefusal>;
}

/// Opens a peer connection to `addr`, over mutual TLS when `tls` is given.
pub async fn connect(
    addr: &str,
    frame_bytes_max: usize,
    tls: Option<&TlsConnector>,
) -> std::io::Result<PeerApiClient> {
    let stream = transport::dial_peer(addr, tls).await?;
    let t = transport::framed(stream, frame_bytes_max);
    let mut config = tarpc::client::Config::default();
    config.max_in_flight_requests = 1024;
    Ok(PeerApiClient::new(config, t).spawn())
}

/// One peer's slot in the pool: the address its connection was made to, and the connection.
type PeerSlot = Arc<Mutex<Option<(String, PeerApiClient)>>>;

/// A cache of peer connections for forwarding and probes (Raft replication uses its own).
///
/// The map's lock is held only to find a peer's slot, never across a dial: a peer that does
/// not answer delays the calls to that peer alone. Concurrent dials to one peer wait on its
/// slot and share the one connection made; a dial is bounded by the transport's dial time.
pub struct PeerPool {
    self_id: NodeId,
    frame_bytes_max: usize,
    overrides: Arc<HashMap<NodeId, String>>,
    tls: Option<TlsConnector>,
    conns: std::sync::Mutex<HashMap<NodeId, PeerSlot>>,
}

impl PeerPool {
    pub fn new(
        self_id: NodeId,
        frame_bytes_max: usize,
        overrides: Arc<HashMap<NodeId, String>>,
        tls: Option<TlsConnector>,
    ) -> PeerPool {
        PeerPool {
            self_id,
            frame_bytes_max,
            overrides,
            tls,
            conns: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, id: NodeId) -> PeerSlot {
        let mut conns = self.conns.lock().expect("peer pool lock poisoned");
        conns.entry(id).or_default().clone()
    }

    /// A connection to node `id` at `addr`, reusing a cached one when the address matches.
    /// Callers pass ids and addresses of the membership (or its leader), so the pool holds
    /// at most one slot per member.
    pub async fn get(&self, id: NodeId, addr: &str) -> std::io::Result<PeerApiClient> {
        if id == self.self_id {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a node never dials itself",
            ));
        }
        let addr = self.overrides.get(&id).map(String::as_str).unwrap_or(addr);
        let slot = self.slot(id);
        let mut slot = slot.lock().await;
        if let Some((a, c)) = slot.as_ref() {
            if a == addr {
                return Ok(c.clone());
            }
        }
        let c = connect(addr, self.frame_bytes_max, self.tls.as_ref()).await?;
        *slot = Some((addr.to_string(), c.clone()));
        Ok(c)
    }

    /// A connection to node `id` at `addr` that the pool does not keep: for one-off probes
    /// of addresses that are not (yet) the membership's.
    pub async fn connect_unpooled(&self, id: NodeId, addr: &str) -> std::io::Result<PeerApiClient> {
        if id == self.self_id {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a node never dials itself",
            ));
        }
        let addr = self.overrides.get(&id).map(String::as_str).unwrap_or(addr);
        connect(addr, self.frame_bytes_max, self.tls.as_ref()).await
    }

    /// Forgets a connection that failed, so the next call dials again.
    pub async fn forget(&self, id: NodeId) {
        let slot = self
            .conns
            .lock()
            .expect("peer pool lock poisoned")
            .remove(&id);
        if let Some(slot) = slot {
            // A dial in progress on this slot finishes into the removed slot and is dropped.
            if let Ok(mut s) = slot.try_lock() {
                *s = None;
            }
        }
    }
}

/// A tarpc context whose deadline is `timeout` from now.
pub fn deadline(timeout: Duration) -> context::Context {
    let mut ctx = context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}

/// Builds Raft network clients, one per target.
pub struct Network {
    pub self_id: NodeId,
    pub frame_bytes_max: usize,
    /// Addresses dialed instead of the membership's, by node id.
    pub overrides: Arc<HashMap<NodeId, String>>,
    /// This node's TLS identity for dialing peers (`None`: plaintext cluster).
    pub tls: Option<TlsConnector>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerLink {
        PeerLink {
            self_id: self.self_id,
            target,
            addr: self
                .overrides
                .get(&target)
                .cloned()
                .unwrap_or_else(|| node.addr.clone()),
            frame_bytes_max: self.frame_bytes_max,
            tls: self.tls.clone(),
            conn: None,
            snapshot_conn: None,
        }
    }
}

/// The Raft connection to one peer. Snapshot chunks travel on their own connection so that a
/// large transfer does not delay heartbeats.
pub struct PeerLink {
    self_id: NodeId,
    target: NodeId,
    addr: String,
    frame_bytes_max: usize,
    tls: Option<TlsConnector>,
    conn: Option<PeerApiClient>,
    snapshot_conn: Option<PeerApiClient>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct LinkError(String);

impl PeerLink {
    async fn client(&mut self, for_snapshot: bool) -> Result<PeerApiClient, Unreachable> {
        if self.target == self.self_id {
            return Err(Unreachable::new(&LinkError(format!(
                "node {} must not dial itself",
                self.self_id
            ))));
        }
        let slot = if for_snapshot {
            &mut self.snapshot_conn
        } else {
            &mut self.conn
        };
        if let Some(c) = slot {
            return Ok(c.clone());
        }
        let c = connect(&self.addr, self.frame_bytes_max, self.tls.as_ref())
            .await
            .map_err(|e| {
                Unreachable::new(&LinkError(format!(
                    "node {} at {}: {e}",
                    self.target, self.addr
                )))
            })?;
        *slot = Some(c.clone());
        Ok(c)
    }

    fn transport_failed<E: std::error::Error>(
        &mut self,
        for_snapshot: bool,
        e: tarpc::client::RpcError,
    ) -> RPCError<NodeId, BasicNode, E> {
        if for_snapshot {
            self.snapshot_conn = None;
        } else {
            self.conn = None;
        }
        let err = LinkError(format!("node {} at {}: {e}", self.target, self.addr));
        match e {
            tarpc::client::RpcError::DeadlineExceeded => RPCError::Network(NetworkError::new(&err)),
            _ => RPCError::Unreachable(Unreachable::new(&err)),
        }
    }

    fn refused<E: std::error::Error>(&mut self, r: PeerRefusal) -> RPCError<NodeId, BasicNode, E> {
        // A peer that is someone else, or going away, is unreachable for this link.
        self.conn = None;
        self.snapshot_conn = None;
        RPCError::Unreachable(Unreachable::new(&LinkError(format!(
            "node {} at {}: {r}",
            self.target, self.addr
        ))))
    }
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let c = self.client(false).await.map_err(RPCError::Unreachable)?;
        match c
            .append(deadline(option.hard_ttl()), self.target, req)
            .await
        {
            Ok(Ok(Ok(resp))) => Ok(resp),
            Ok(Ok(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(Err(r)) => Err(self.refused(r)),
            Err(e) => Err(self.transport_failed(false, e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let c = self.client(true).await.map_err(RPCError::Unreachable)?;
        match c
            .snapshot(deadline(option.hard_ttl()), self.target, req)
            .await
        {
            Ok(Ok(Ok(resp))) => Ok(resp),
            Ok(Ok(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(Err(r)) => Err(self.refused(r)),
            Err(e) => Err(self.transport_failed(true, e)),
        }
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let c = self.client(false).await.map_err(RPCError::Unreachable)?;
        match c.vote(deadline(option.hard_ttl()), self.target, req).await {
            Ok(Ok(Ok(resp))) => Ok(resp),
            Ok(Ok(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Ok(Err(r)) => Err(self.refused(r)),
            Err(e) => Err(self.transport_failed(false, e)),
        }
    }
}

/// Shared handle type for the peer pool.
pub type SharedPeers = Arc<PeerPool>;
