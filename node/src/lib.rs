//! skiff-node: the `skiffd` daemon — Raft over tarpc, the client service, group commit, and the
//! local development cluster.
//!
//! # Layout
//! - [`config`]: the TOML configuration, flag overrides and validation;
//! - [`connections`]: admission of connections (in total and per source address) and the
//!   idle clock of client connections;
//! - [`server`]: [`server::run`] starts a node and serves clients and peers on one port until
//!   its shutdown future resolves (binaries and tests call it the same way);
//! - [`auth`]: client sessions: the token a connection presented, checked with its role on
//!   every call;
//! - [`peer`]: the node-to-node service (Raft RPCs, forwarding to the leader) and the Raft
//!   network built on it;
//! - [`certs`]: `skiffd certs` — the cluster CA and the node certificates of mutual TLS;
//! - [`backup`]: backups of the state and their restore into a new cluster;
//! - [`handover`]: a stopping leader hands leadership to a caught-up voter first;
//! - [`batcher`]: group commit — many client commands per log entry;
//! - [`dev`]: `skiffd dev`, a local multi-process cluster in one command;
//! - [`metrics`]: Prometheus metrics and the `/metrics` endpoint;
//! - [`invoke`]: the invocation path (submit through the leader, dispatch, wait);
//! - [`worker`]: runs assigned tasks in sandboxes, warm pools, heartbeats, reconciliation;
//! - [`policy`]: the sandbox policy of a function and of its stages, checked at deploy;
//! - [`code_cache`]: unpacked code archives (unpacked relative to directory descriptors),
//!   leased while in use, removed when no function version refers to them;
//! - [`read_index`]: one leadership confirmation shared by concurrent linearizable reads;
//! - [`streams`]: stream jobs — the leader's driver reading sources from the replicated
//!   cursor, the source readers, start/cancel/redrive;
//! - [`sources`]: the files the node opens for callers (stream sources, file dependencies),
//!   confined to the operator's roots;
//! - [`data_service`]: the Unix socket through which a sandboxed function reaches the
//!   key-value store, limited to its key prefixes (`skiff-data` is its shell client).
//!
//! Invariants: a node never dials itself; every queue is bounded; writes reach the log only
//! through the leader's batcher; reads that claim linearizability are confirmed by a quorum.
#![forbid(unsafe_code)]

pub mod auth;
pub mod backup;
pub mod batcher;
pub mod certs;
pub mod code_cache;
pub mod config;
pub mod connections;
pub mod data_service;
pub mod dev;
pub mod handover;
pub mod invoke;
pub mod metrics;
pub mod peer;
pub mod policy;
pub mod read_index;
pub mod server;
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
    Store(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("dev cluster: {0}")]
    Dev(String),
    #[error(transparent)]
    HostIds(#[from] skiff_sandbox::HostIdError),
    #[error("sources root {0}")]
    Sources(#[from] sources::RootError),
    #[error("TLS: {0}")]
    Tls(#[from] skiff_client::tls::TlsError),
}
