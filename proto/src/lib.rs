//! skiff-proto: what both sides of a connection to a node share, so that a client needs
//! nothing of the node's storage: the data model of the replicated state machine, the client
//! RPC service, and the framing and TLS of a connection.
//!
//! Invariant: nothing here touches storage or the sandbox; the state machine's behaviour
//! (apply, the scheduler, the token table) is `skiff-raft-store`'s, which re-exports the model
//! modules under their old paths.
//!
//! # Layout
//! - [`ids`]: identifiers and key bounds; a leaf that imports nothing else of the model.
//! - [`functions`], [`streams`], [`tokens`]: the data of functions and tasks, stream jobs and
//!   bearer tokens (types, limits, validation, hashing, new secrets); they import only
//!   [`ids`] (and `streams` the function limits).
//! - [`model`]: commands, responses and key-value types, built on the modules above.
//! - [`api`]: the client RPC service ([`api::ClientApi`]) and the types it carries.
//! - [`transport`]: one port, two services: the service preamble, the bearer token, bounded
//!   bincode frames, endpoint parsing.
//! - [`tls`]: rustls on both sides: the client's connector checking nodes against the
//!   cluster CA, and the node's acceptor requiring a certificate from peers.
//! - [`membership`]: the `ID=HOST:PORT,...` member lists of `cluster init` and
//!   `skiffd restore`.
//! - [`files`]: bounded reads of the files either side is handed (PEM, manifests, code).
#![forbid(unsafe_code)]

pub mod api;
pub mod files;
pub mod functions;
pub mod ids;
pub mod membership;
pub mod model;
pub mod streams;
pub mod tls;
pub mod tokens;
pub mod transport;
