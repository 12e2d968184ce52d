//! skiff-client: the Rust client library of a skiff cluster, and the `skiff` command line.
//!
//! # Layout
//! - [`api`]: the client RPC service ([`api::ClientApi`]) and the types it carries;
//! - [`transport`]: framing shared with the nodes (service preamble, bounded frames);
//! - [`client`]: [`Client`], the typed async client (any endpoint, leader following, bounded
//!   retries, request ids on every write and invocation, chunked code upload);
//! - [`deploy`]: preparing a deploy on the client: deterministic code archives, `skiff.toml`
//!   manifests, size and duration parsing;
//! - [`cli`]: the `skiff` commands; `src/bin/skiff.rs` only parses and calls [`cli::run`].
#![forbid(unsafe_code)]

pub mod api;
pub mod bench;
pub mod cli;
pub mod client;
pub mod deploy;
pub mod tls;
pub mod transport;

pub use client::{Client, ClientConfig, ClientError, InvokeOptions};
