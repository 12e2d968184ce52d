//! skiff-chaos: fault-injection testing of a real skiff cluster.
//!
//! A run starts `skiffd` processes on loopback with a fault proxy on every node-to-node link,
//! drives a recorded kv workload (and, as root, a function workload: async, sync and
//! idempotent invocations, dependency changes, stream jobs) while a seeded nemesis injects
//! network, process and membership faults, heals, and checks the histories: linearizability
//! per key, no acknowledged write lost, equal replicas, writes accepted soon after heal,
//! every acknowledged invocation completed, sync answers carry their own output, at most one
//! effect per unchanged idempotent run, every stream item has its result. The verdict is
//! valid, invalid (with the violating operations) or unknown.
//!
//! # Layout
//! - [`proxy`]: the per-link TCP proxies and the per-flow fault table;
//! - [`cluster`]: the `skiffd` processes, their configs, kill -9 / SIGSTOP / restart,
//!   membership removal (wipe) and re-add under a new id; every client is built here;
//! - [`nemesis`]: the seeded fault schedule and its execution;
//! - [`workload`]: the kv workers and how an answer becomes ok / fail / unknown;
//! - [`invocations`]: asynchronous invocations and their completion check;
//! - [`calls`]: sync and idempotent invocations and dependency changes, recorded;
//! - [`streams`]: stream jobs over JSONL files during the run, settled after heal;
//! - [`history`]: the recorded operations;
//! - [`checker`]: the checks and the verdict ([`checker::linear`] is the linearizability search,
//!   [`checker::calls`] the function workload's checks);
//! - [`run`](mod@run): one run from start to [`Report`]; `src/bin/skiff-chaos.rs` only parses
//!   flags and calls [`run()`].
//!
//! Invariants: all traffic stays on 127.0.0.1; every loop is bounded in count and time; the
//! same seed gives the same fault schedule; an operation that may have taken effect is never
//! recorded as failed.
#![forbid(unsafe_code)]

pub mod calls;
pub mod checker;
pub mod cluster;
pub mod history;
pub mod invocations;
pub mod nemesis;
pub mod proxy;
pub mod run;
pub mod streams;
pub mod workload;

pub use run::{run, Report, RunOptions};

/// Why the harness could not do its job (distinct from the cluster failing a check).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error(
        "skiffd not found (tried: {tried}); build it with `cargo build -p skiff-node`, or pass \
         --skiffd PATH or set SKIFFD"
    )]
    SkiffdNotFound { tried: String },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot send {signal} to node {node}: {source}")]
    Signal {
        node: u64,
        signal: &'static str,
        source: nix::errno::Errno,
    },
    #[error("{0}")]
    Cluster(String),
    #[error("invalid options: {0}")]
    Options(String),
    #[error("cannot serialize the report: {0}")]
    Serialize(#[from] serde_json::Error),
}
