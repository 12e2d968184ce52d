//! The openraft type configuration of skiff and aliases for the openraft types other crates use.
//!
//! Invariant: this is the one module through which skiff names openraft generics. Other crates
//! use the aliases here (and the re-exported [`openraft`] crate for traits and plain types), so
//! moving to another openraft version touches this file and the storage impls, nothing else.

use std::io::Cursor;

use crate::model;

/// The openraft crate this store is built against, re-exported so that every crate of the
/// workspace uses exactly the same version.
pub use openraft;

pub use openraft::BasicNode;

/// A node id, as openraft sees it.
pub type NodeId = model::NodeId;

openraft::declare_raft_types!(
    /// The type configuration of skiff's Raft group: log entries carry a [`model::Request`],
    /// applying one answers a [`model::Response`].
    pub TypeConfig:
        D = model::Request,
        R = model::Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A Raft node of skiff.
pub type Raft = openraft::Raft<TypeConfig>;
/// Position of an entry in the log: leader term/node and index.
pub type LogId = openraft::LogId<NodeId>;
/// A vote: term, candidate and whether it is committed.
pub type Vote = openraft::Vote<NodeId>;
/// One log entry.
pub type Entry = openraft::Entry<TypeConfig>;
/// What a log entry carries: blank, a normal request or a membership change.
pub type EntryPayload = openraft::EntryPayload<TypeConfig>;
/// A cluster membership configuration.
pub type Membership = openraft::Membership<NodeId, BasicNode>;
/// A membership configuration and the id of the log entry that introduced it.
pub type StoredMembership = openraft::StoredMembership<NodeId, BasicNode>;
/// Describes a snapshot: the last log id it covers, membership and id.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
/// A snapshot: meta and the serialized state.
pub type Snapshot = openraft::Snapshot<TypeConfig>;
/// A storage failure; returning it stops Raft on this node.
pub type StorageError = openraft::StorageError<NodeId>;
/// The I/O part of a [`StorageError`].
pub type StorageIOError = openraft::StorageIOError<NodeId>;
/// Raft's observable state (role, term, leader, log indexes, membership).
pub type RaftMetrics = openraft::RaftMetrics<NodeId, BasicNode>;

/// Raft RPC messages, for the node's network layer.
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;
pub type ClientWriteResponse = openraft::raft::ClientWriteResponse<TypeConfig>;

/// Raft API errors.
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
pub type RPCError<E = openraft::error::Infallible> =
    openraft::error::RPCError<NodeId, BasicNode, E>;
pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, BasicNode>;
pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, BasicNode>;
pub type InitializeError = openraft::error::InitializeError<NodeId, BasicNode>;
pub type ForwardToLeader = openraft::error::ForwardToLeader<NodeId, BasicNode>;
pub use openraft::error::InstallSnapshotError;
