//! skiff-node: the `skiffd` daemon — Raft over tarpc, the client service, group commit, and the
//! local development cluster.
//!
//! # Layout
//! From the bottom up (a module uses only modules above it in this list, and none uses
//! [`daemon`]; `tests/it/layers.rs` checks that the imports have no cycle):
//! - [`sources`]: the files the node opens for callers (stream sources, file dependencies),
//!   confined to the operator's roots;
//! - [`config`]: the TOML configuration, flag overrides and validation;
//! - [`background`]: the owner of every background task, and the shutdown signal they watch;
//! - [`connections`]: admission of connections (in total and per source address) and the
//!   idle clock of client connections;
//! - [`metrics`]: Prometheus metrics and the `/metrics` endpoint;
//! - [`backup`]: backups of the state and their restore into a new cluster;
//! - [`peer`]: the node-to-node protocol (`PeerApi`, forwarded operations) and the Raft
//!   network and connection pool built on it;
//! - [`batcher`]: group commit — many client commands per log entry;
//! - [`read_index`]: one leadership confirmation shared by concurrent linearizable reads;
//! - [`policy`]: the sandbox policy of a function and of its stages, checked at deploy;
//! - [`replica`]: the [`replica::Replica`] handle — leader, write, read, applied state, waits,
//!   request ids — that every part below acts through;
//! - [`code_cache`]: unpacked code archives (unpacked relative to directory descriptors),
//!   leased while in use, removed when no function version refers to them;
//! - [`data_service`]: the Unix socket through which a sandboxed function reaches the
//!   key-value store, limited to its key prefixes (`skiff-data` is its shell client);
//! - [`worker`]: runs assigned tasks in sandboxes, warm pools, heartbeats, reconciliation;
//! - [`invoke`]: the invocation path (submit through the leader, dispatch, wait);
//! - [`streams`]: stream jobs — the leader's driver reading sources from the replicated
//!   cursor, the source readers, start/cancel/redrive;
//! - [`auth`]: client sessions: the token a connection presented, checked with its role on
//!   every call;
//! - [`admin`]: status, `cluster init`, membership changes, tokens;
//! - [`handover`]: a stopping leader hands leadership to a caught-up voter first;
//! - [`client_service`]: the client service (`ClientApi`), one per client connection;
//! - [`peer_service`]: the peer service (`PeerApi`): Raft RPCs, forwarded calls, dispatch;
//! - [`listener`]: accept, TLS, the preamble, and which service a connection gets;
//! - [`daemon`]: [`daemon::run`] starts a node and serves clients and peers on one port until
//!   its shutdown future resolves (binaries and tests call it the same way);
//! - [`certs`]: `skiffd certs` — the cluster CA and the node certificates of mutual TLS;
//! - [`dev`]: `skiffd dev`, a local multi-process cluster in one command.
//!
//! Invariants: a node never dials itself; every queue is bounded; writes reach the log only
//! through the leader's batcher; reads that claim linearizability are confirmed by a quorum.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod background;
pub mod backup;
pub mod batcher;
pub mod certs;
pub mod client_service;
pub mod code_cache;
pub mod config;
pub mod connections;
pub mod daemon;
pub mod data_service;
pub mod dev;
pub mod handover;
pub mod invoke;
pub mod listener;
pub mod metrics;
pub mod peer;
pub mod peer_service;
pub mod policy;
pub mod read_index;
pub mod replica;
pub mod sources;
pub mod streams;
pub mod worker;

use std::path::PathBuf;

/// Errors that stop a node from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("storage: {0}")]
    Store(#[from] skiff_raft_store::StoreError),
    /// Boxed: openraft's error is large, and this enum travels through every start-up path.
    #[error("raft: {0}")]
    Raft(#[source] Box<openraft::error::Fatal<skiff_client::api::NodeId>>),
    /// The Raft core stopped while the node was serving; the reason as its metrics told it.
    #[error("raft: the Raft core stopped: {0}")]
    CoreStopped(String),
    #[error("raft: shutdown: {0}")]
    RaftShutdown(#[source] tokio::task::JoinError),
    #[error("dev cluster: {0}")]
    Dev(String),
    #[error(transparent)]
    HostIds(#[from] skiff_sandbox::HostIdError),
    #[error("sources root {0}")]
    Sources(#[from] sources::RootError),
    #[error("TLS: {0}")]
    Tls(#[from] skiff_client::tls::TlsError),
}
