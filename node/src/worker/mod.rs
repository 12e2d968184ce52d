//! The worker side of a node: runs the tasks the state machine assigned to this node in
//! sandboxes, keeps warm pools, and reports back through the log.
//!
//! A task reaches the worker two ways: the leader's `dispatch` right after the submission
//! commits (fast path), and the reconcile loop that scans the tasks this node's applied state
//! assigns to it (slow path: after a leader change, a restart, or a task placed from a queue).
//! Both go through `Worker::claim`, so one (task, token) pair runs at most once per process.
//!
//! Invariants:
//! - a task runs only under the token of its assignment, and its completion carries that
//!   token; the state machine refuses a completion with an older one;
//! - every warm sandbox is in the sandbox crate's pool, whose size and memory are bounded;
//!   the memory of idle sandboxes is reported in heartbeats and counted against this node;
//! - code archives are unpacked once per digest into the node's code cache
//!   ([`crate::code_cache`]: fd-relative, atomic, leased while in use);
//! - everything kept for a function version (warm sandboxes, data sockets) is keyed by the
//!   function's identity as well as its name and version, so a function removed and made
//!   again under the same name never meets what was kept for the old one; and it is released
//!   once the applied state no longer needs it ([`Worker::sweep`], every heartbeat).
//!
//! # Layout
//! - this file: the [`Worker`] type, its state and its lifecycle;
//! - `acquire.rs`: the sandbox a function version runs in, warm sandboxes taken, claimed and
//!   replenished;
//! - `run.rs`: the run path of one task, exec and serve mode; `stages.rs`: a staged function;
//! - `output.rs`: a run's outcome turned into a bounded task result;
//! - `leases.rs`: what runs and warm sandboxes hold (unpacked code, data sockets) and its
//!   release;
//! - `report.rs`: heartbeats and completions proposed through the log;
//! - `loops.rs`: the background loops (heartbeat, reconciliation), tasks of the node's
//!   [`Background`] owner that end on its shutdown signal.

mod acquire;
mod leases;
mod loops;
mod output;
mod report;
mod run;
mod stages;

pub use leases::DATA_SOCKETS_MAX;
pub use loops::start_loops;
pub use run::run_task;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_client::api::{FnMode, FunctionVersion, NodeId, TaskId};
use skiff_sandbox::{PoolConfig, PoolKey, PoolMode, WarmPool};
use tokio::sync::{Notify, Semaphore};

use crate::background::Background;
use crate::code_cache::CodeCache;
use crate::config::WorkerSettings;
use crate::data_service::DataSocket;

use leases::{Leases, SocketKey};

/// The worker of one node.
pub struct Worker {
    id: NodeId,
    settings: WorkerSettings,
    pool: Arc<WarmPool>,
    /// (task, token) pairs this process has started; see the module invariants.
    started: Mutex<HashMap<TaskId, u64>>,
    slots: Arc<Semaphore>,
    /// Signalled when the pool changes, so a heartbeat goes out soon.
    pool_changed: Notify,
    /// Signalled when a pre-warm finishes.
    warmed: Notify,
    prewarming: Mutex<HashMap<PoolKey, usize>>,
    /// Serve-mode sandboxes in use (or starting) per key: each comes back to the pool soon,
    /// so a new request may wait for one instead of cold-starting another.
    busy: Mutex<HashMap<PoolKey, usize>>,
    code: CodeCache,
    /// Data-service sockets, one per sandbox kind that has a data grant: a plain function
    /// version, or one stage of a staged one; at most [`DATA_SOCKETS_MAX`]. A socket is in
    /// use while more than this map holds its `Arc`.
    data_sockets: tokio::sync::Mutex<HashMap<SocketKey, Arc<DataSocket>>>,
    /// What the idle warm sandboxes of each key use (their code and data socket), held so
    /// neither goes while they wait.
    warm_leases: Mutex<HashMap<PoolKey, Leases>>,
    /// The `skiff-data` helper bound into sandboxes, if found.
    helper_binary: Option<PathBuf>,
    /// The node's owner of background work: runs, pre-warms and the loops are its tasks.
    background: Background,
}

impl Worker {
    pub fn new(id: NodeId, settings: WorkerSettings, background: Background) -> Self {
        let pool = WarmPool::new(PoolConfig {
            size_max: settings.warm_pool_max,
            idle_expiry: Duration::from_millis(settings.warm_idle_expiry_ms),
            memory_budget_bytes: settings.warm_memory_budget_bytes,
        });
        let code = CodeCache::new(&settings.code_cache_dir, id);
        Worker {
            id,
            slots: Arc::new(Semaphore::new(settings.slots as usize)),
            settings,
            pool: Arc::new(pool),
            started: Mutex::new(HashMap::new()),
            pool_changed: Notify::new(),
            warmed: Notify::new(),
            prewarming: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashMap::new()),
            code,
            data_sockets: tokio::sync::Mutex::new(HashMap::new()),
            warm_leases: Mutex::new(HashMap::new()),
            helper_binary: find_helper(),
            background,
        }
    }

    pub fn pool(&self) -> &WarmPool {
        &self.pool
    }

    /// Marks (task, token) as started here; false if it already was.
    fn claim(&self, task: TaskId, token: u64) -> bool {
        let mut started = lock(&self.started);
        if started.get(&task) == Some(&token) {
            return false;
        }
        started.insert(task, token);
        true
    }

    fn key(fv: &FunctionVersion) -> PoolKey {
        PoolKey {
            function: fv.spec.name.clone(),
            function_id: fv.function_id,
            version: fv.version,
            mode: match fv.spec.mode {
                FnMode::Exec => PoolMode::Exec,
                FnMode::Serve => PoolMode::Serve,
            },
        }
    }
}

/// The `skiff-data` helper next to this executable (as `cargo build` and packages place
/// it), or `SKIFF_DATA_HELPER`.
fn find_helper() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SKIFF_DATA_HELPER") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    // Test binaries live one level down, in `deps/`.
    [dir.join("skiff-data"), dir.join("../skiff-data")]
        .into_iter()
        .find(|p| p.is_file())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map update; a panic cannot leave it half done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
