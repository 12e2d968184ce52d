//! The daemon: the one part that knows every other. It opens the store, starts Raft, builds the
//! [`Replica`] and the services on it, serves clients and peers on one port, and stops on the
//! shutdown signal.
//!
//! Start: TLS files, host ids, the data directory and the sources roots are checked before
//! anything is opened; then the store, Raft, the batcher, the worker and the background loops.
//!
//! Stop (after a leader's handover, see [`crate::handover`]): the [`Background`] owner gives
//! its shutdown signal and waits, at most [`STOP_TASKS_TIMEOUT`], for every loop and connection
//! it owns to end (aborting the rest); the idle warm sandboxes are removed; then Raft shuts
//! down, and the store closes when the last handle drops.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use skiff_client::transport::{TlsAcceptor, TlsConnector};
use skiff_raft_store::types::Raft;
use tokio::net::TcpListener;

use crate::background::Background;
use crate::batcher::Batcher;
use crate::config::NodeConfig;
use crate::invoke::{Invoker, RunLocal};
use crate::listener::Listener;
use crate::metrics::Metrics;
use crate::peer::{Network, PeerPool};
use crate::replica::{self, Replica};
use crate::worker::Worker;
use crate::NodeError;

/// Longest a stopping node waits for its background tasks to heed the shutdown signal before
/// it aborts them.
pub const STOP_TASKS_TIMEOUT: Duration = Duration::from_secs(2);

/// A started node: its replica, the services built on it and the tasks it owns.
pub struct Node {
    config: NodeConfig,
    replica: Replica,
    invoker: Invoker,
    worker: Arc<Worker>,
    /// The TLS side of the listener (`None`: plaintext, no TLS files configured).
    tls: Option<TlsAcceptor>,
    background: Background,
}

/// Runs a node until `shutdown` resolves, then stops Raft and closes the store.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    let listener = bind(&config.listen).await?;
    let metrics_listener = match &config.metrics_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let node = start(config).await?;
    if let Some(l) = metrics_listener {
        node.serve_metrics(l);
    }
    node.serve(listener);
    tracing::info!(id = node.replica.id(), listen = %node.config.listen, "node started");
    let core = raft_core_stopped(node.replica.raft().clone());
    tokio::pin!(core);
    tokio::select! {
        () = shutdown => tracing::info!("shutdown requested"),
        why = &mut core => return Err(core_died(why)),
    }
    // Still accepting: the voter taking over may have to dial this node for its vote.
    let election_max = Duration::from_millis(node.config.raft.election_timeout_max_ms);
    let handover = tokio::select! {
        h = crate::handover::hand_over(&node.replica, election_max) => h,
        why = &mut core => return Err(core_died(why)),
    };
    match handover {
        crate::handover::Handover::NotNeeded => {}
        crate::handover::Handover::Done { to, elapsed } => {
            tracing::info!(
                to,
                elapsed_ms = elapsed.as_millis() as u64,
                "leadership handed over"
            )
        }
        crate::handover::Handover::Failed(why) => {
            tracing::warn!(%why, "leadership not handed over; the others will elect")
        }
    }
    stop(node).await
}

async fn bind(addr: &str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// Resolves, with the reason, once this node's Raft core has stopped. Before shutdown begins
/// that is fatal: a node without its core can neither vote nor serve, so it exits (for its
/// supervisor to restart it) instead of answering every call with an error.
async fn raft_core_stopped(raft: Raft) -> String {
    let mut m = raft.metrics();
    loop {
        if let Err(e) = &m.borrow_and_update().running_state {
            return e.to_string();
        }
        if m.changed().await.is_err() {
            return "its metrics channel closed".into();
        }
    }
}

fn core_died(why: String) -> NodeError {
    tracing::error!(%why, "the Raft core stopped; the node exits");
    NodeError::CoreStopped(why)
}

/// Opens the store and starts Raft and the background loops, without serving.
pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
    // First: a node refused for its transport settings touches nothing.
    let (acceptor, connector) = load_tls(&config.tls)?;
    if config.worker.enabled {
        // Before anything else: a range a local user may own or delegate is refused.
        config.sandbox.host_ids.check_host()?;
        skiff_sandbox::set_host_id_range(config.sandbox.host_ids);
    }
    // The store holds every key, every function's environment and the token hashes: a
    // directory made here is the node user's alone.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&config.data_dir)
        .map_err(|source| NodeError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
    let sources = Arc::new(crate::sources::SourceRoots::open(
        &config.sources.roots,
        &config.protected_dirs(),
    )?);
    if !config.sources.roots.is_empty() {
        tracing::info!(roots = ?sources, "file sources are read beneath these roots only");
    }
    let (log_store, store) = skiff_raft_store::open(&config.data_dir.join("raft")).await?;
    let raft_config = Arc::new(config.openraft()?);
    let overrides = Arc::new(config.dial_override_map());
    let network = Network {
        self_id: config.id,
        frame_bytes_max: config.limits.peer_frame_bytes_max,
        overrides: overrides.clone(),
        tls: connector.clone(),
    };
    let raft = Raft::new(config.id, raft_config, network, log_store, store.clone())
        .await
        .map_err(|e| NodeError::Raft(Box::new(e)))?;
    let background = Background::new();
    let metrics = Arc::new(Metrics::new());
    let batcher = Batcher::start(
        raft.clone(),
        metrics.clone(),
        &background,
        crate::batcher::BatcherLimits {
            queue_max: config.limits.write_queue_max,
            in_flight_max: config.limits.writes_in_flight_max,
            entry_bytes_max: config.limits.entry_bytes_max,
        },
    );
    let peers = PeerPool::new(
        config.id,
        config.limits.peer_frame_bytes_max,
        overrides,
        connector,
    );
    let replica = Replica::new(replica::Parts {
        id: config.id,
        raft,
        store,
        batcher,
        peers,
        limits: config.limits.clone(),
        metrics,
        sources,
        shutdown: background.shutdown(),
    });
    let worker = Arc::new(Worker::new(
        config.id,
        config.worker.clone(),
        background.clone(),
    ));
    let run_local: RunLocal = {
        let (replica, worker, background) = (replica.clone(), worker.clone(), background.clone());
        Arc::new(move |task, function| {
            let run = crate::worker::run_task(replica.clone(), worker.clone(), task, function);
            background.spawn_until_shutdown(run);
        })
    };
    let invoker = Invoker::new(
        replica.clone(),
        run_local,
        config.worker.enabled,
        background.clone(),
    );
    crate::worker::start_loops(&replica, &worker);
    background.spawn(crate::streams::drive_loop(
        invoker.clone(),
        background.shutdown(),
    ));
    Ok(Node {
        config,
        replica,
        invoker,
        worker,
        tls: acceptor,
        background,
    })
}

impl Node {
    /// Serves clients and peers on `listener` (a task of the node's, until it stops).
    pub fn serve(&self, listener: TcpListener) {
        let serving = Listener::new(
            self.invoker.clone(),
            self.tls.clone(),
            self.config.tls.allow_plaintext_clients,
            self.background.clone(),
        );
        self.background
            .spawn(serving.accept_loop(listener, self.background.shutdown()));
    }

    /// Serves `GET /metrics` on `listener` (a task of the node's, until it stops).
    pub fn serve_metrics(&self, listener: TcpListener) {
        let (replica, worker) = (self.replica.clone(), self.worker.clone());
        let render = move || {
            let pool = worker.pool().stats();
            replica.metrics().warm_pool(pool.idle, pool.memory_bytes);
            replica
                .metrics()
                .render(replica.raft(), replica.batcher().queue_depth())
        };
        self.background.spawn(crate::metrics::serve(
            listener,
            render,
            self.background.shutdown(),
        ));
    }

    /// This node's replica.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }
}

/// The listener's and the dialer's TLS from the settings (validated: all three files, or
/// plaintext by choice). A file that cannot be read or used stops the node before it serves.
fn load_tls(
    tls: &crate::config::TlsSettings,
) -> Result<(Option<TlsAcceptor>, Option<TlsConnector>), NodeError> {
    let (Some(ca), Some(cert), Some(key)) = (&tls.ca, &tls.cert, &tls.key) else {
        if !tls.insecure_plaintext {
            return Err(NodeError::Config(crate::config::ConfigError::Invalid {
                field: "tls",
                message: crate::config::PLAINTEXT_REFUSED.to_string(),
            }));
        }
        tracing::warn!(
            "INSECURE: tls.insecure_plaintext is set and there are no TLS files: nothing is \
             encrypted, and ANY process that reaches this port is served as a peer (it can vote, \
             append log entries, forward writes and run any function); for a single test machine \
             only (make certificates with `skiffd certs` and set [tls])"
        );
        return Ok((None, None));
    };
    Ok((
        Some(TlsAcceptor::node(ca, cert, key)?),
        Some(TlsConnector::node(ca, cert, key)?),
    ))
}

/// Stops the node's background work, then Raft (no more votes or appends from this node), and
/// lets the store close.
pub async fn stop(node: Node) -> Result<(), NodeError> {
    shut_down(node).await.map(|_| ())
}

/// [`stop`], returning how many background tasks had to be aborted.
async fn shut_down(node: Node) -> Result<usize, NodeError> {
    let aborted = node.background.stop(STOP_TASKS_TIMEOUT).await;
    if aborted > 0 {
        tracing::warn!(
            aborted,
            bound_ms = STOP_TASKS_TIMEOUT.as_millis() as u64,
            "background tasks did not stop in time and were aborted"
        );
    }
    let worker = node.worker.clone();
    // Idle warm sandboxes are removed now, not when the last handle drops.
    let _ = tokio::task::spawn_blocking(move || worker.pool().clear()).await;
    node.replica
        .raft()
        .shutdown()
        .await
        .map_err(NodeError::RaftShutdown)?;
    tracing::info!(id = node.replica.id(), "node stopped");
    Ok(aborted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_config(dir: &std::path::Path) -> NodeConfig {
        let overrides = crate::config::Overrides {
            id: Some(1),
            listen: Some("127.0.0.1:1".into()),
            data_dir: Some(dir.join("data")),
            insecure_plaintext: Some(true),
            ..Default::default()
        };
        let mut config = NodeConfig::load(None, overrides).expect("config");
        config.worker.enabled = false;
        config
    }

    #[tokio::test]
    async fn a_stopped_raft_core_is_noticed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = start(test_config(dir.path())).await.expect("start");
        let raft = node.replica.raft().clone();
        // Running: not noticed.
        let early =
            tokio::time::timeout(Duration::from_millis(200), raft_core_stopped(raft.clone())).await;
        assert!(early.is_err(), "a running core is not reported as stopped");
        raft.shutdown().await.expect("shutdown");
        let why = tokio::time::timeout(Duration::from_secs(5), raft_core_stopped(raft))
            .await
            .expect("a stopped core is noticed at once");
        assert!(!why.is_empty());
    }

    /// Every loop of a serving node (accept, metrics, stream driver, batcher) and every
    /// connection it serves heeds the shutdown signal, and nothing it spawned outlives it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_node_leaves_no_task_running() {
        let runtime = tokio::runtime::Handle::current().metrics();
        let before = runtime.num_alive_tasks();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        // The worker's loops too, where this host allows sandboxes (they are not started).
        match config.sandbox.host_ids.check_host() {
            Ok(()) => {
                config.worker.enabled = true;
                config.worker.code_cache_dir = dir.path().join("code");
            }
            Err(e) => eprintln!("the worker stays off (its loops are not checked): {e}"),
        }
        let worker_loops = if config.worker.enabled { 2 } else { 0 };
        let node = start(config).await.expect("start");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let metrics_addr = metrics_listener.local_addr().expect("addr");
        node.serve(listener);
        node.serve_metrics(metrics_listener);
        // Open connections (one to each port, never finished) are tasks of the node too.
        let held = (
            tokio::net::TcpStream::connect(addr).await.expect("connect"),
            tokio::net::TcpStream::connect(metrics_addr)
                .await
                .expect("connect"),
        );
        let background = node.background.clone();
        let owned = tokio::time::timeout(Duration::from_secs(5), async {
            while background.live() < 5 + worker_loops {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(owned.is_ok(), "the loops and the connection are owned");
        let aborted = shut_down(node).await.expect("stop");
        assert_eq!(aborted, 0, "every owned task ended on the signal");
        assert_eq!(background.live(), 0);
        // And nothing of the node's runs outside the owner: the runtime is back to where it
        // was (Raft's own tasks end with its shutdown, a moment later).
        let settled = tokio::time::timeout(Duration::from_secs(5), async {
            while runtime.num_alive_tasks() > before {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            settled.is_ok(),
            "{} tasks still alive after stop, {before} before start",
            runtime.num_alive_tasks()
        );
        drop(held);
    }
}
