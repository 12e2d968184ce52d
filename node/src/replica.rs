//! The replica handle: this node's share of the replicated state — its Raft, its applied
//! state, the leader's batcher and the links to the other nodes — and the operations every
//! part of the node needs on it: who leads, write, read (linearizable or local), a read of
//! the applied state, a wait for applied changes, request ids for the node's own commands.
//!
//! Request path of a write: client → any node's `ClientApi::write` → (if that node is not the
//! leader) `PeerApi::forward_write` on the leader → [`Batcher`] → one log entry → replicated
//! and applied → results back along the same path.
//!
//! Reads marked linearizable are served by the leader after it confirms its leadership with a
//! quorum (`ensure_linearizable`, shared by concurrent reads through [`crate::read_index`]; it
//! also waits until the state machine has applied everything committed before the read);
//! followers forward them.
//!
//! Invariants:
//! - every field is private: the other parts of the node act through these methods, so that
//!   writes reach the log only through the leader's batcher and linearizable reads only after
//!   a confirmation;
//! - a forwarded call goes one hop: the leader answers it or says who leads;
//! - the node's own commands (heartbeats, completions, the data service's writes, tokens, the
//!   stream driver's advances) draw their request ids from one allocator, so no two of them
//!   meet in the deduplication table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::ServerState;
use skiff_client::api::{
    ApiError, ClientCommand, Command, CommandResult, FunctionRecord, NodeId, ReadConsistency,
    RequestId, StreamId, StreamJob, Workers,
};
use skiff_raft_store::functions::validate_function_name;
use skiff_raft_store::model::{validate_key, Principal, KEY_BYTES_MAX, LIST_LIMIT_MAX};
use skiff_raft_store::types::Raft;
use skiff_raft_store::{StateMachineData, StateMachineStore};

use crate::background::Shutdown;
use crate::backup::Exports;
use crate::batcher::{self, Batcher};
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::peer::{self, PeerPool, ReadOp, ReadResult};
use crate::read_index::ReadIndex;
use crate::sources::SourceRoots;

/// How long a node without a known leader waits for one before answering `NoLeader`.
const LEADER_WAIT: Duration = Duration::from_secs(3);
/// Bytes of a failed item's payload shown by `stream_get` (the rest stays in the state).
const FAILED_PAYLOAD_SHOWN_BYTES: usize = 1024;

/// The parts a replica is made of (built by the daemon).
pub struct Parts {
    pub id: NodeId,
    pub raft: Raft,
    pub store: StateMachineStore,
    pub batcher: Batcher,
    pub peers: PeerPool,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub sources: Arc<SourceRoots>,
    pub shutdown: Shutdown,
}

struct Inner {
    id: NodeId,
    raft: Raft,
    store: StateMachineStore,
    batcher: Batcher,
    peers: PeerPool,
    /// Shared leadership confirmations for linearizable reads.
    read_index: ReadIndex,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// The directories callers' file sources and file dependencies are read from.
    sources: Arc<SourceRoots>,
    /// The backup being downloaded from this node (as leader), if any.
    exports: Exports,
    /// Given once the node stops.
    shutdown: Shutdown,
    /// The client half of the node's own request ids: random per process.
    request_client: u64,
    request_seq: AtomicU64,
}

/// A cheap handle on this node's replica.
#[derive(Clone)]
pub struct Replica(Arc<Inner>);

/// Why a wait for the applied state ended without what it waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WaitEnded {
    #[error("out of time")]
    TimedOut,
    #[error("raft stopped")]
    Stopped,
}

/// Wakes whenever Raft's view changes: an entry applied, a leader or a membership change.
pub struct Changes(
    tokio::sync::watch::Receiver<openraft::RaftMetrics<NodeId, openraft::BasicNode>>,
);

impl Changes {
    /// Resolves at the next change; `Err` once Raft has stopped.
    pub async fn changed(&mut self) -> Result<(), WaitEnded> {
        self.0.changed().await.map_err(|_| WaitEnded::Stopped)
    }

    /// Whether this node leads now (its own view, no confirmation), marking the view seen.
    pub fn leads(&mut self, me: NodeId) -> bool {
        let m = self.0.borrow_and_update();
        m.current_leader == Some(me) && m.state == ServerState::Leader
    }
}

impl Replica {
    pub fn new(parts: Parts) -> Replica {
        Replica(Arc::new(Inner {
            id: parts.id,
            raft: parts.raft,
            store: parts.store,
            batcher: parts.batcher,
            peers: parts.peers,
            read_index: ReadIndex::default(),
            limits: parts.limits,
            metrics: parts.metrics,
            sources: parts.sources,
            exports: Exports::default(),
            shutdown: parts.shutdown,
            request_client: rand::random(),
            request_seq: AtomicU64::new(1),
        }))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.0.id
    }

    /// The Raft handle, for the parts that act on consensus itself: the peer service (votes,
    /// appends), membership changes, leader handover, and the daemon (metrics, stop).
    pub fn raft(&self) -> &Raft {
        &self.0.raft
    }

    /// The leader's batcher, for the parts that propose on the leader itself (the invocation
    /// path, stream requests and the stream driver) and for the handover's pause.
    pub fn batcher(&self) -> &Batcher {
        &self.0.batcher
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }

    pub fn limits(&self) -> &Limits {
        &self.0.limits
    }

    pub fn sources(&self) -> &Arc<SourceRoots> {
        &self.0.sources
    }

    pub fn peers(&self) -> &PeerPool {
        &self.0.peers
    }

    /// Whether shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.0.shutdown.is_set()
    }

    /// A view of the node's shutdown signal.
    pub fn shutdown(&self) -> Shutdown {
        self.0.shutdown.clone()
    }

    /// A fresh request id for a command the node makes itself (or on a client's behalf): a
    /// random client id per process, counted up, so it meets no client's and none of its own.
    pub fn next_request_id(&self) -> RequestId {
        RequestId {
            client: self.0.request_client,
            seq: self.0.request_seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Reads this node's applied state (no confirmation: it may be behind the leader's).
    pub fn state<T>(&self, f: impl FnOnce(&StateMachineData) -> T) -> T {
        self.0.store.read(f)
    }

    /// A watch on Raft's view, for loops that wake on every change.
    pub fn changes(&self) -> Changes {
        Changes(self.0.raft.metrics())
    }

    /// Waits until `check` finds what it looks for, looking again after every change of
    /// Raft's view (an entry applied, a leader elected), until `deadline`.
    pub async fn wait_until<T>(
        &self,
        deadline: tokio::time::Instant,
        mut check: impl FnMut(&Replica) -> Option<T>,
    ) -> Result<T, WaitEnded> {
        let mut changes = self.changes();
        loop {
            if let Some(found) = check(self) {
                return Ok(found);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(WaitEnded::TimedOut),
            }
        }
    }

    /// The address of member `id` in the current membership.
    pub fn member_addr(&self, id: NodeId) -> Option<String> {
        self.0
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// The leader in this node's view, if it knows one (no wait, no confirmation).
    pub fn current_leader(&self) -> Option<NodeId> {
        self.0.raft.metrics().borrow().current_leader
    }

    /// How long a call to another node may take.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.0.limits.request_timeout_ms)
    }

    /// Whether this node is the leader in its own view (as a forwarded call checks).
    pub async fn is_leader(&self) -> bool {
        self.0.raft.current_leader().await == Some(self.0.id)
    }

    /// The current leader and its address, waiting up to `LEADER_WAIT` for one to appear.
    pub async fn leader(&self) -> Result<(NodeId, String), ApiError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let known = |r: &Replica| {
            let raft = r.0.raft.metrics();
            let m = raft.borrow();
            let l = m.current_leader?;
            let n = m.membership_config.membership().get_node(&l)?;
            Some((l, n.addr.clone()))
        };
        self.wait_until(deadline, known)
            .await
            .map_err(|_| ApiError::NoLeader {
                leader: None,
                leader_addr: None,
            })
    }

    /// What a node that is no longer the leader answers a forwarded call with.
    pub fn not_leader_hint(&self) -> ApiError {
        let m = self.0.raft.metrics().borrow().clone();
        let addr = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        });
        ApiError::NoLeader {
            leader: m.current_leader.filter(|_| m.state != ServerState::Leader),
            leader_addr: addr.filter(|_| m.state != ServerState::Leader),
        }
    }

    /// A client of the peer service of `id` (the leader, as the callers use it).
    pub async fn peer(&self, id: NodeId, addr: &str) -> Result<peer::PeerApiClient, ApiError> {
        self.0.peers.get(id, addr).await.map_err(|e| {
            tracing::debug!(leader = id, %addr, error = %e, "cannot reach the leader");
            ApiError::NoLeader {
                leader: Some(id),
                leader_addr: Some(addr.to_string()),
            }
        })
    }

    /// Forgets the connection to `leader`, whose forwarded call failed with `e`, and says so
    /// to the client.
    pub async fn forward_failed(
        &self,
        leader: NodeId,
        addr: &str,
        e: tarpc::client::RpcError,
    ) -> ApiError {
        self.0.peers.forget(leader).await;
        match e {
            tarpc::client::RpcError::DeadlineExceeded => ApiError::Timeout(format!(
                "leader node {leader} at {addr} did not answer in time"
            )),
            _ => ApiError::NoLeader {
                leader: Some(leader),
                leader_addr: Some(addr.to_string()),
            },
        }
    }

    /// Validates commands at the edge; a refusal is counted and changes nothing.
    fn validate(&self, commands: &[ClientCommand]) -> Result<(), ApiError> {
        for c in commands {
            if let Err(e) = c.command.validate() {
                return Err(ApiError::InvalidArgument(e.to_string()));
            }
            if let Command::FnDeploy { spec } = &c.command {
                if let Err(e) = crate::policy::check_function_sandbox(spec) {
                    return Err(ApiError::InvalidArgument(format!(
                        "function {}: {e}",
                        spec.name
                    )));
                }
                // The archive as this node holds it, when it does (an upload just made may not
                // have reached a follower yet): refused here with its bad entry, and in any
                // case again by every node that unpacks it.
                let archive = self.state(|sm| sm.sched().code_archive(&spec.code_digest));
                if let Some(archive) = archive {
                    if let Err(e) = skiff_client::deploy::check_archive(&archive) {
                        return Err(ApiError::InvalidArgument(format!(
                            "function {}: code {}: {e}",
                            spec.name, spec.code_digest
                        )));
                    }
                }
                self.check_file_dependencies(spec)?;
            }
        }
        Ok(())
    }

    /// Refuses a function whose `file:` dependencies are not regular files beneath this
    /// node's sources roots (checked without opening them; each invocation checks again on
    /// the node that receives it).
    fn check_file_dependencies(
        &self,
        spec: &skiff_client::api::FunctionSpec,
    ) -> Result<(), ApiError> {
        let files = spec.idempotency.iter().flat_map(|i| &i.dependencies);
        for d in files {
            if let skiff_raft_store::functions::Dependency::File(path) = d {
                self.0.sources.check_file(path).map_err(|e| {
                    ApiError::InvalidArgument(format!(
                        "function {}: file dependency: {e}",
                        spec.name
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Proposes `commands`, sent by `principal` (authenticated by the caller), through the
    /// leader.
    pub async fn write(
        &self,
        principal: Principal,
        commands: Vec<ClientCommand>,
    ) -> Result<Vec<CommandResult>, ApiError> {
        self.validate(&commands)?;
        let (leader, addr) = self.leader().await?;
        if leader == self.0.id {
            return self.0.batcher.submit(principal, commands).await;
        }
        let p = self.peer(leader, &addr).await?;
        match p
            .forward_write(peer::deadline(self.timeout()), principal, commands)
            .await
        {
            Ok(r) => r,
            Err(e) => Err(self.forward_failed(leader, &addr, e).await),
        }
    }

    /// The leader's side of [`Replica::write`], for a write forwarded to it: validated again
    /// (the sender is another node, but the commands are a client's).
    pub async fn write_on_leader(
        &self,
        principal: Principal,
        commands: Vec<ClientCommand>,
    ) -> Result<Vec<CommandResult>, ApiError> {
        self.validate(&commands)?;
        // Forwarding goes one hop only: a node that is no longer the leader answers with a
        // hint instead of forwarding again, so requests cannot loop.
        if !self.is_leader().await {
            return Err(self.not_leader_hint());
        }
        self.0.batcher.submit(principal, commands).await
    }

    /// A read at `consistency`: local reads from this node's applied state, the others from
    /// the leader after a leadership confirmation.
    pub async fn read(
        &self,
        op: ReadOp,
        consistency: ReadConsistency,
    ) -> Result<ReadResult, ApiError> {
        check_read(&op, consistency)?;
        if consistency == ReadConsistency::Local {
            return Ok(self.read_local(op));
        }
        let (leader, addr) = self.leader().await?;
        if leader == self.0.id {
            return self.read_on_leader(op).await;
        }
        let p = self.peer(leader, &addr).await?;
        match p.forward_read(peer::deadline(self.timeout()), op).await {
            Ok(r) => r,
            Err(e) => Err(self.forward_failed(leader, &addr, e).await),
        }
    }

    /// Waits until a leadership confirmation that started after this call has completed:
    /// from then on this node's applied state holds every write acknowledged before the call.
    pub async fn confirm_leadership(
        &self,
    ) -> Result<(), RaftError<NodeId, CheckIsLeaderError<NodeId, openraft::BasicNode>>> {
        self.0.read_index.barrier(&self.0.raft).await
    }

    /// The leader's side of [`Replica::read`].
    pub async fn read_on_leader(&self, op: ReadOp) -> Result<ReadResult, ApiError> {
        if let ReadOp::Backup {
            export: Some(id),
            offset,
        } = op
        {
            // Later chunks of an export taken after a confirmation: no new round.
            return self
                .0
                .exports
                .chunk(id, offset)
                .map(|c| ReadResult::Backup(Box::new(c)))
                .map_err(ApiError::FailedPrecondition);
        }
        match self.confirm_leadership().await {
            Ok(_) if matches!(op, ReadOp::Backup { .. }) => self.start_backup().await,
            Ok(_) => Ok(self.read_local(op)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ApiError::NoLeader {
                    leader: f.leader_id,
                    leader_addr: f.leader_node.map(|n| n.addr),
                })
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                tracing::debug!(error = %q, "read refused: no quorum");
                Err(ApiError::NoLeader {
                    leader: None,
                    leader_addr: None,
                })
            }
            Err(RaftError::Fatal(f)) => Err(batcher::fatal_error(&f)),
        }
    }

    /// Exports the applied state (after the caller's leadership confirmation, so it holds
    /// every acknowledged write) and returns the first chunk.
    async fn start_backup(&self) -> Result<ReadResult, ApiError> {
        let store = self.0.store.clone();
        // The storage error is turned into text on the blocking thread: openraft's error type
        // is large, and only its message goes to the client.
        let (covers, bytes) =
            tokio::task::spawn_blocking(move || store.export().map_err(|e| e.to_string()))
                .await
                .map_err(|e| ApiError::Internal(format!("backup export: {e}")))?
                .map_err(|e| ApiError::Internal(format!("backup export: {e}")))?;
        let covers_index = covers.map_or(0, |id| id.index);
        tracing::info!(covers_index, bytes = bytes.len(), "backup exported");
        Ok(ReadResult::Backup(Box::new(
            self.0.exports.start(covers_index, bytes),
        )))
    }

    /// Answers `op` from this node's applied state.
    pub fn read_local(&self, op: ReadOp) -> ReadResult {
        match op {
            ReadOp::Get { key } => ReadResult::Get(self.state(|sm| sm.get(&key).cloned())),
            ReadOp::List {
                prefix,
                start_after,
                limit,
            } => ReadResult::List(self.state(|sm| {
                sm.list(
                    &prefix,
                    start_after.as_deref(),
                    limit.clamp(1, LIST_LIMIT_MAX),
                )
            })),
            ReadOp::Task { id } => {
                ReadResult::Task(self.state(|sm| sm.sched().task(id).cloned().map(Box::new)))
            }
            ReadOp::Tasks {
                filter,
                after,
                limit,
            } => ReadResult::Tasks(
                self.state(|sm| sm.sched().list_tasks(&filter, after, limit as usize)),
            ),
            ReadOp::Function { name } => ReadResult::Function(
                self.state(|sm| sm.sched().function(&name).cloned().map(Box::new)),
            ),
            ReadOp::Functions => ReadResult::Functions(self.state(|sm| {
                sm.sched()
                    .functions()
                    .map(|f| FunctionRecord {
                        versions: f.latest().cloned().into_iter().collect(),
                        ..f.clone()
                    })
                    .collect()
            })),
            ReadOp::Stream { id } => {
                ReadResult::Stream(self.state(|sm| stream_view(sm, id).map(Box::new)))
            }
            ReadOp::Streams => {
                ReadResult::Streams(self.state(|sm| sm.sched().streams().cloned().collect()))
            }
            ReadOp::Backup { export, offset } => {
                // Only reached on a follower's local read, which `read` refuses.
                ReadResult::Backup(Box::new(crate::backup::BackupChunk {
                    export_id: export.unwrap_or(0),
                    covers_index: 0,
                    total_bytes: 0,
                    sha256: String::new(),
                    offset,
                    bytes: Vec::new(),
                }))
            }
            ReadOp::Tokens => {
                ReadResult::Tokens(self.state(|sm| sm.tokens().list().cloned().collect()))
            }
            ReadOp::Workers => ReadResult::Workers(self.state(|sm| {
                let s = sm.sched();
                Workers {
                    nodes: s.nodes().cloned().collect(),
                    load: s
                        .nodes()
                        .map(|n| (n.id, u32::try_from(s.load_of(n.id)).unwrap_or(u32::MAX)))
                        .collect(),
                    stats: s.stats(),
                    now_ms: sm.last_time_ms(),
                }
            })),
        }
    }
}

/// Refuses a read whose arguments are out of bounds, before it is forwarded or answered.
fn check_read(op: &ReadOp, consistency: ReadConsistency) -> Result<(), ApiError> {
    match op {
        ReadOp::Get { key } => {
            validate_key(key).map_err(|e| ApiError::InvalidArgument(e.to_string()))?
        }
        ReadOp::List {
            prefix,
            start_after,
            ..
        } => {
            if prefix.len() > KEY_BYTES_MAX
                || start_after
                    .as_ref()
                    .is_some_and(|s| s.len() > KEY_BYTES_MAX)
            {
                return Err(ApiError::InvalidArgument(format!(
                    "prefix and start_after are limited to {KEY_BYTES_MAX} bytes"
                )));
            }
        }
        ReadOp::Function { name } => {
            validate_function_name(name).map_err(ApiError::InvalidArgument)?
        }
        ReadOp::Tasks { filter, .. } => {
            if let Some(f) = &filter.function {
                validate_function_name(f).map_err(ApiError::InvalidArgument)?
            }
        }
        ReadOp::Task { .. }
        | ReadOp::Functions
        | ReadOp::Workers
        | ReadOp::Stream { .. }
        | ReadOp::Streams
        | ReadOp::Tokens => {}
        ReadOp::Backup { .. } => {
            if consistency == ReadConsistency::Local {
                return Err(ApiError::InvalidArgument(
                    "a backup is always read from the leader".to_string(),
                ));
            }
        }
    }
    Ok(())
}

/// A stream job for a client: failed items' payloads shortened to fit a frame.
pub fn stream_view(sm: &StateMachineData, id: StreamId) -> Option<StreamJob> {
    let mut job = sm.sched().stream(id)?;
    for f in &mut job.failed_items {
        if let Some(p) = &mut f.payload {
            p.truncate(FAILED_PAYLOAD_SHOWN_BYTES);
        }
    }
    Some(job)
}
