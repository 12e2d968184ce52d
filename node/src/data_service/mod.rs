//! The data service: a Unix socket through which a sandboxed function reads and writes the
//! cluster's key-value store, restricted to the key prefixes its policy grants.
//!
//! The node binds one socket per function run ([`bind`]) and hands its path to the sandbox,
//! which mounts it at `/run/skiff/data.sock`. The protocol is one JSON object per line each way
//! (`docs/data-service.md`), simple enough for a shell helper (`skiff-data`) or a few lines of
//! any language. The store itself is behind [`KvBackend`], so the protocol and the access rules
//! are tested without a cluster.
//!
//! Invariants:
//! - every request is checked against the function's [`DataAccess`] before it reaches the
//!   backend; a key outside the grant is never read, written or listed, and a backend answer
//!   naming a key the request did not ask for is refused rather than passed on;
//! - every request line gets exactly one response line, in order; a connection serves one
//!   request at a time;
//! - everything is bounded: request line bytes ([`REQUEST_LINE_BYTES_MAX`]), concurrent
//!   connections ([`CONNECTIONS_MAX`]), list page entries and bytes, the wait for the backend
//!   and for a slow reader, and the access log ([`ACCESS_RECORDS_MAX`], overflow counted);
//! - dropping the [`DataSocket`] stops the accept loop and every connection and removes the
//!   socket file.
//!
//! # Layout
//! - this file: the bounds of the service;
//! - `grant.rs`: [`DataAccess`], the key prefixes a function may read and write;
//! - `access_log.rs`: the bounded per-peer log of the accesses made through a socket;
//! - `backend.rs`: the [`KvBackend`] trait and its in-memory [`MemoryBackend`];
//!   `node_kv.rs`: [`NodeKv`], the backend on a node;
//! - `protocol.rs`: the wire: request and reply lines, error codes, value encoding;
//! - `service.rs`: one request checked against the grant, run on the backend, answered;
//! - `server.rs`: [`bind`] and [`DataSocket`]: the socket, its accept loop and connections.

use skiff_raft_store::model::VALUE_BYTES_MAX;

mod access_log;
mod backend;
mod grant;
mod node_kv;
mod protocol;
mod server;
mod service;

pub use access_log::{AccessLog, AccessOp, AccessRecord, Accesses, ACCESS_PEERS_MAX};
pub use backend::{KvBackend, MemoryBackend};
pub use grant::DataAccess;
pub use node_kv::NodeKv;
pub use server::{bind, DataSocket};

/// Longest request line, without its newline: a value at [`VALUE_BYTES_MAX`] whose JSON
/// escaping at most doubles it (base64 adds a third), plus room for the key and the fields.
pub const REQUEST_LINE_BYTES_MAX: usize = 2 * VALUE_BYTES_MAX + 64 * 1024;
/// Most connections served at once on one socket; more are answered with an error and closed.
pub const CONNECTIONS_MAX: usize = 16;
/// Most records an [`AccessLog`] keeps; later ones are only counted.
pub const ACCESS_RECORDS_MAX: usize = 4096;
/// Most entries one list response carries (also the default `limit`).
pub const LIST_ENTRIES_MAX: u32 = 100;
/// Encoded entries past which a list page is cut short (with `next` set); a page always holds
/// at least one entry, so a large value cannot stall a listing.
pub const LIST_PAGE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// How long one request waits for the backend before it fails as `unavailable`.
pub const BACKEND_TIMEOUT_MS: u64 = 10_000;
/// How long a response may wait for the client to read it before the connection is closed.
pub const RESPONSE_WRITE_TIMEOUT_MS: u64 = 10_000;
