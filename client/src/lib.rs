//! skiff-client: the Rust client library of a skiff cluster, and the `skiff` command line.
//!
//! # Layout
//! - [`api`], [`transport`], [`tls`]: the wire, shared with the nodes; re-exported from
//!   `skiff-proto`, which holds them so that neither side needs the other's dependencies;
//! - [`client`]: [`Client`], the typed async client (any endpoint, leader following, bounded
//!   retries, request ids on every write and invocation, chunked code upload);
//! - [`deploy`]: preparing a deploy on the client: deterministic code archives, `skiff.toml`
//!   manifests, size and duration parsing;
//! - [`bench`](mod@bench): the bounded closed-loop load driver behind `skiff bench`;
//! - [`cli`]: the `skiff` commands; `src/bin/skiff.rs` only parses and calls [`cli::run`].
#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod deploy;

pub use skiff_proto::{api, tls, transport};

pub use client::{Client, ClientConfig, ClientError, InvokeOptions};
