//! The client-facing RPC service and the types it carries.
//!
//! Every node serves [`ClientApi`]; a node that is not the leader forwards writes and
//! linearizable reads to the leader itself, so a client may talk to any node. Errors are
//! values ([`ApiError`]) so that they cross the wire with their context.
//!
//! Every call but `cluster_init` needs a bearer token, presented once per connection (see
//! [`crate::transport`]) and checked on every call against the answering node's applied
//! token table; the role each call needs is in docs/security.md. A call without a valid
//! token gets [`ApiError::Unauthenticated`], one whose role is too low
//! [`ApiError::PermissionDenied`], and nothing else happens.

use std::collections::BTreeMap;

pub use crate::functions::{
    CacheOutcome, DataGrant, Dependency, FnMode, FunctionRecord, FunctionSpec, FunctionVersion,
    Idempotency, MissReason, NodeRecord, RunStatus, SchedStats, StageSpec, Task, TaskFilter,
    TaskId, TaskResult, TaskState, WarmReport,
};
pub use crate::model::{
    ClientCommand, Command, CommandResult, KvEntry, KvPage, NodeId, Principal, RequestId,
};
pub use crate::streams::{
    FailedItem, StreamCounters, StreamId, StreamJob, StreamOptions, StreamSource,
    StreamStartRequest, StreamState,
};
pub use crate::tokens::{Role, TokenId, TokenInfo};
use serde::{Deserialize, Serialize};

/// Largest frame either side accepts on a client connection, in bytes. A frame carries one
/// request or response; values are at most 1 MiB, so 8 MiB leaves room for a page of a listing.
pub const CLIENT_FRAME_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Most members one `cluster_init` may list. A cluster starts with its 3 or 5 voters; more
/// join with `cluster add-node`. The bound keeps what a caller without a token can make a
/// fresh node dial small.
pub const INIT_MEMBERS_MAX: usize = 9;

/// The service every node exposes to clients.
#[tarpc::service]
pub trait ClientApi {
    /// Applies a group of commands through the log (forwarded to the leader if needed) and
    /// returns one result per command, in order.
    async fn write(commands: Commands) -> Result<Vec<CommandResult>, ApiError>;
    /// Reads one key. `Linearizable` confirms leadership with a quorum first; `Local` reads
    /// the answering node's applied state (may be stale).
    async fn kv_get(key: String, read: ReadConsistency) -> Result<Option<KvEntry>, ApiError>;
    /// Lists keys under `prefix` after `start_after`, at most `limit` (clamped by the server).
    async fn kv_list(
        prefix: String,
        start_after: Option<String>,
        limit: u32,
        read: ReadConsistency,
    ) -> Result<KvPage, ApiError>;
    /// Initializes a new cluster with these members (id -> address) and makes `admin_token`
    /// (a secret the caller drew; only its hash is stored) its first admin token. Called
    /// once, on one node; needs no token. A retry with the same secret answers the same
    /// token; any other call on an initialized cluster is refused (`FailedPrecondition`).
    /// The caller draws the secret, unlike `token_create`, so that a retried init whose
    /// first answer was lost still ends with a token the caller holds.
    async fn cluster_init(
        members: BTreeMap<NodeId, String>,
        admin_token: String,
    ) -> Result<TokenInfo, ApiError>;
    /// Adds a node: first as a learner (it catches up), then as a voter.
    async fn cluster_add_node(id: NodeId, addr: String) -> Result<(), ApiError>;
    /// Removes a voter or learner from the membership.
    async fn cluster_remove_node(id: NodeId) -> Result<(), ApiError>;
    /// The cluster as the leader sees it (or this node, when there is no leader).
    async fn cluster_status() -> Result<ClusterStatus, ApiError>;
    /// Invokes a function. With `wait`, answers when the task has finished (or the wait
    /// timed out: `Timeout`, the task goes on); without, as soon as it is queued.
    async fn invoke(req: InvokeRequest) -> Result<Task, ApiError>;
    /// One task, if it exists (finished tasks are purged after their retention).
    async fn task_get(id: TaskId, read: ReadConsistency) -> Result<Option<Task>, ApiError>;
    /// Tasks matching `filter` with ids above `after`, in id order, at most `limit`.
    async fn task_list(
        filter: TaskFilter,
        after: TaskId,
        limit: u32,
        read: ReadConsistency,
    ) -> Result<Vec<Task>, ApiError>;
    /// A function with all its kept versions.
    async fn fn_get(
        name: String,
        read: ReadConsistency,
    ) -> Result<Option<FunctionRecord>, ApiError>;
    /// Every function, each with its latest version only.
    async fn fn_list(read: ReadConsistency) -> Result<Vec<FunctionRecord>, ApiError>;
    /// Worker nodes as their heartbeats describe them, and scheduler counters.
    async fn workers(read: ReadConsistency) -> Result<Workers, ApiError>;
    /// Starts a stream job. The leader checks the source first (it exists, is readable and
    /// its first record parses) and that the function exists.
    async fn stream_start(
        request_id: RequestId,
        req: StreamStartRequest,
    ) -> Result<StreamId, ApiError>;
    /// One stream job with its window and (the start of) its failed items' payloads.
    async fn stream_get(id: StreamId, read: ReadConsistency)
        -> Result<Option<StreamJob>, ApiError>;
    /// Every stream job, without windows and failed items, in id order.
    async fn stream_list(read: ReadConsistency) -> Result<Vec<StreamJob>, ApiError>;
    /// Cancels a running stream job.
    async fn stream_cancel(request_id: RequestId, id: StreamId) -> Result<(), ApiError>;
    /// Runs a stream job's failed items again (latest function version); returns how many.
    async fn stream_redrive(request_id: RequestId, id: StreamId) -> Result<u64, ApiError>;
    /// One chunk of a backup of the whole state. `export: None` starts a new backup (the
    /// leader confirms its leadership, exports its applied state and keeps it in memory) and
    /// returns its first chunk; then `Some(id)` with the next offset, until `total_bytes`.
    async fn backup_chunk(export: Option<u64>, offset: u64) -> Result<BackupChunk, ApiError>;
    /// Makes a token of `role`. The answering node draws the secret and returns it here,
    /// once; the cluster keeps only its hash.
    async fn token_create(role: Role, name: Option<String>) -> Result<CreatedToken, ApiError>;
    /// Every token (revoked ones included), never a secret or a hash.
    async fn token_list(read: ReadConsistency) -> Result<Vec<TokenInfo>, ApiError>;
    /// Revokes a token: every node refuses it once it has applied the revocation.
    async fn token_revoke(request_id: RequestId, id: TokenId) -> Result<TokenInfo, ApiError>;
}

/// A piece of a backup (see [`ClientApi::backup_chunk`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupChunk {
    pub export_id: u64,
    /// The log index the backup's state covers.
    pub covers_index: u64,
    pub total_bytes: u64,
    /// SHA-256 of the whole backup, hex.
    pub sha256: String,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// A new token and its secret, which is shown this once and never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    pub token: TokenInfo,
    pub secret: String,
}

/// An invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeRequest {
    /// Makes the submission idempotent under retries: the same id gets the same task.
    pub request_id: RequestId,
    pub function: String,
    /// `None`: the latest version.
    pub version: Option<u64>,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// Wait for the result (sync) or return once queued (async).
    pub wait: bool,
    /// For an idempotent function: a key that replaces the payload hash in the ledger key.
    pub idempotency_key: Option<String>,
    /// For an idempotent function: caller-supplied version tokens (name, value).
    pub tokens: Vec<(String, String)>,
    /// Filled by the node that receives the invocation: content hashes of the function's
    /// file dependencies. Whatever a client sends here is replaced.
    pub files: Vec<(String, String)>,
}

/// Worker nodes and scheduler counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workers {
    pub nodes: Vec<NodeRecord>,
    /// Tasks assigned or running per node.
    pub load: Vec<(NodeId, u32)>,
    pub stats: SchedStats,
    /// The state machine's time (leader stamps), to judge heartbeat ages.
    pub now_ms: u64,
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ReadConsistency {
    /// Reflects every write acknowledged before the read started.
    #[default]
    Linearizable,
    /// The answering node's applied state; may miss recent writes.
    Local,
}

/// An error a node returns to a client. Business outcomes of commands (conflict, not found) are
/// [`CommandResult`]s instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApiError {
    /// The node could not reach a leader; try another node or later.
    #[error("no leader is reachable{}", leader_hint(.leader, .leader_addr))]
    NoLeader {
        leader: Option<NodeId>,
        leader_addr: Option<String>,
    },
    /// The cluster did not answer in time; the outcome of a write is unknown.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The request was malformed; nothing changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A named thing (node, key) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is valid but the cluster's state does not allow it now.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The node is saturated (bounded queue full); retry after a pause.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The function's queue is full (or the cluster's task store): nothing was queued.
    #[error("throttled: {0}")]
    Throttled(String),
    /// The node is shutting down.
    #[error("node is shutting down")]
    ShuttingDown,
    /// The connection presented no token, or one no applied token matches (unknown or
    /// revoked); nothing was done.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token is valid but its role may not make this call; nothing was done.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// Anything else, with its message.
    #[error("internal error: {0}")]
    Internal(String),
}

fn leader_hint(leader: &Option<NodeId>, addr: &Option<String>) -> String {
    match (leader, addr) {
        (Some(id), Some(addr)) => format!(" (last known leader: node {id} at {addr})"),
        (Some(id), None) => format!(" (last known leader: node {id})"),
        _ => String::new(),
    }
}

impl ApiError {
    /// Whether retrying the same request (with the same request ids) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApiError::NoLeader { .. }
                | ApiError::Timeout(_)
                | ApiError::Overloaded(_)
                | ApiError::ShuttingDown
        )
    }
}

/// The cluster as one node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub answered_by: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    /// Index of the last log entry the answering node applied.
    pub last_applied: u64,
    /// Index of the last log entry in the answering node's log.
    pub last_log: u64,
    /// Last log index covered by the answering node's latest snapshot.
    pub snapshot_index: Option<u64>,
    /// Last log index the answering node purged from its log.
    pub purged_index: Option<u64>,
    pub nodes: Vec<NodeStatus>,
}

/// One member of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub addr: String,
    pub role: MemberRole,
    /// Whether the answering node reached it just now.
    pub reachable: bool,
    /// Last log index replicated to it (known on the leader only).
    pub matched: Option<u64>,
    /// How many entries it is behind the leader's last log index (leader only).
    pub lag: Option<u64>,
    /// Last applied index the node itself reported, if reachable.
    pub last_applied: Option<u64>,
}

/// A member's role in the membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberRole {
    Voter,
    Learner,
}

impl std::fmt::Display for MemberRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemberRole::Voter => "voter",
            MemberRole::Learner => "learner",
        })
    }
}

/// The commands of one `write`: at most [`crate::model::COMMANDS_PER_ENTRY_MAX`],
/// checked while the request is decoded, so that a frame of many tiny commands cannot make a
/// node hold millions of them before the call is looked at. On the wire it is a plain
/// sequence (the same bytes as a `Vec<ClientCommand>`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Commands(pub Vec<ClientCommand>);

impl Commands {
    pub fn into_inner(self) -> Vec<ClientCommand> {
        self.0
    }
}

impl From<Vec<ClientCommand>> for Commands {
    fn from(commands: Vec<ClientCommand>) -> Commands {
        Commands(commands)
    }
}

impl std::ops::Deref for Commands {
    type Target = [ClientCommand];

    fn deref(&self) -> &[ClientCommand] {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Commands {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Commands, D::Error> {
        use serde::de::{Error, SeqAccess, Visitor};
        const MAX: usize = crate::model::COMMANDS_PER_ENTRY_MAX;
        struct Bounded;
        impl<'de> Visitor<'de> for Bounded {
            type Value = Commands;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "a sequence of at most {MAX} commands")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Commands, A::Error> {
                let claimed = seq.size_hint().unwrap_or(0);
                if claimed > MAX {
                    return Err(A::Error::invalid_length(claimed, &self));
                }
                let mut commands = Vec::with_capacity(claimed);
                while let Some(c) = seq.next_element()? {
                    if commands.len() == MAX {
                        return Err(A::Error::invalid_length(MAX + 1, &self));
                    }
                    commands.push(c);
                }
                Ok(Commands(commands))
            }
        }
        d.deserialize_seq(Bounded)
    }
}

#[cfg(test)]
mod commands_tests {
    use super::*;

    fn put(i: usize) -> ClientCommand {
        ClientCommand {
            request_id: crate::model::RequestId {
                client: 1,
                seq: i as u64,
            },
            command: crate::model::Command::KvPut {
                key: format!("k{i}"),
                value: vec![],
                expect_version: None,
            },
        }
    }

    #[test]
    fn commands_are_a_plain_sequence_and_bounded_when_decoded() {
        const MAX: usize = crate::model::COMMANDS_PER_ENTRY_MAX;
        let some: Vec<ClientCommand> = (0..3).map(put).collect();
        let bytes = bincode::serialize(&Commands(some.clone())).expect("encode");
        assert_eq!(
            bytes,
            bincode::serialize(&some).expect("encode"),
            "same wire"
        );
        let back: Commands = bincode::deserialize(&bytes).expect("decode");
        assert_eq!(back.into_inner(), some);
        let at: Vec<ClientCommand> = (0..MAX).map(put).collect();
        let bytes = bincode::serialize(&at).expect("encode");
        assert!(
            bincode::deserialize::<Commands>(&bytes).is_ok(),
            "the limit itself"
        );
        let over: Vec<ClientCommand> = (0..=MAX).map(put).collect();
        let bytes = bincode::serialize(&over).expect("encode");
        let err = bincode::deserialize::<Commands>(&bytes).expect_err("one over");
        assert!(err.to_string().contains(&MAX.to_string()), "{err}");
    }
}
