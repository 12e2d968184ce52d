//! A real cluster of `skiffd` processes on loopback, every node-to-node link routed through
//! its own fault proxy ([`crate::proxy`]), with the process faults the nemesis uses: kill -9,
//! SIGSTOP/SIGCONT, restart from the data directory.
//!
//! Invariants:
//! - all addresses are on 127.0.0.1; clients dial nodes directly, nodes dial each other only
//!   through proxies (each node's config has `dial_overrides` for every peer);
//! - a node's data directory outlives its process, so a restart recovers from disk;
//! - every child is started with `--exit-with-parent`, and killed on drop, so no node outlives
//!   the harness;
//! - every wait is bounded ([`NODE_START_TIMEOUT`], [`CLUSTER_READY_TIMEOUT`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use skiff_client::{Client, ClientConfig};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::proxy::{self, FaultTable, NodeId};
use crate::ChaosError;

/// How long a started node may take to accept connections.
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a new cluster may take to elect a leader and accept a first write.
pub const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Raft timing the harness gives its nodes, in milliseconds. Snapshots are taken often so that
/// restarted and partitioned nodes are caught up by snapshot as well as by log.
#[derive(Debug, Clone, Copy)]
pub struct RaftTiming {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_logs_since_last: u64,
    pub logs_kept_after_snapshot: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 800,
            election_timeout_max_ms: 1600,
            snapshot_logs_since_last: 500,
            logs_kept_after_snapshot: 100,
        }
    }
}

/// Where to find `skiffd`: `explicit`, else `$SKIFFD`, else next to the current executable
/// (`target/debug/deps/x` or `target/debug/x` → `target/debug/skiffd`), else
/// `$CARGO_MANIFEST_DIR/../target/debug/skiffd`.
pub fn find_skiffd(explicit: Option<&Path>) -> Result<PathBuf, ChaosError> {
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    // An explicit path (flag, then $SKIFFD) is the only candidate: a wrong one is an error,
    // not a reason to pick up some other build.
    if let Some(p) = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("SKIFFD").map(PathBuf::from))
    {
        candidates.push(p);
    } else {
        if let Ok(exe) = std::env::current_exe() {
            if let Some(dir) = exe.parent() {
                candidates.push(dir.join("skiffd"));
                if dir.file_name().is_some_and(|n| n == "deps") {
                    if let Some(up) = dir.parent() {
                        candidates.push(up.join("skiffd"));
                    }
                }
            }
        }
        if let Some(manifest) = std::env::var_os("CARGO_MANIFEST_DIR") {
            candidates.push(PathBuf::from(manifest).join("../target/debug/skiffd"));
        }
        candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/skiffd"));
    }
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
        tried.push(c.display().to_string());
    }
    Err(ChaosError::SkiffdNotFound {
        tried: tried.join(", "),
    })
}

/// One node: its addresses, files, and process (if running).
#[derive(Debug)]
pub struct Node {
    pub id: NodeId,
    /// The address it listens on; clients and the membership use it.
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    paused: bool,
    starts: u32,
}

impl Node {
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    fn pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .and_then(|p| i32::try_from(p).ok())
            .map(Pid::from_raw)
    }
}

/// A running cluster and its proxies.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub faults: FaultTable,
    skiffd: PathBuf,
    shutdown: watch::Sender<bool>,
}

/// Takes a free loopback port by binding port 0 and letting it go. Another process could take
/// it in between; on loopback in a test run that is rare and shows up as a failed start.
fn free_port() -> Result<SocketAddr, ChaosError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| ChaosError::Io {
        what: "find a free port on 127.0.0.1".into(),
        source,
    })?;
    l.local_addr().map_err(|source| ChaosError::Io {
        what: "read a bound port".into(),
        source,
    })
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ChaosError {
    let what = what.into();
    move |source| ChaosError::Io { what, source }
}

impl Cluster {
    /// Starts `n` nodes under `dir` with proxies on every link, initializes the cluster, and
    /// waits until it accepts a write.
    pub async fn start(
        skiffd: &Path,
        dir: &Path,
        n: usize,
        timing: RaftTiming,
        seed: u64,
    ) -> Result<Cluster, ChaosError> {
        let ids: Vec<NodeId> = (1..=n as u64).collect();
        let faults = FaultTable::new(&ids);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut addrs = BTreeMap::new();
        for &id in &ids {
            addrs.insert(id, free_port()?);
        }
        // Proxy of link a -> b, by (a, b).
        let mut proxies = BTreeMap::new();
        for &a in &ids {
            for &b in &ids {
                if a == b {
                    continue;
                }
                let listener = proxy::bind_link().await?;
                let p = proxy::spawn_link(
                    listener,
                    a,
                    b,
                    addrs[&b],
                    faults.clone(),
                    seed,
                    shutdown_rx.clone(),
                )?;
                proxies.insert((a, b), p.listen);
            }
        }
        let mut nodes = Vec::new();
        for &id in &ids {
            let node_dir = dir.join(format!("node{id}"));
            let data_dir = node_dir.join("data");
            std::fs::create_dir_all(&data_dir)
                .map_err(io_err(format!("create {}", data_dir.display())))?;
            let config = node_dir.join("node.toml");
            let overrides: Vec<String> = ids
                .iter()
                .filter(|&&b| b != id)
                .map(|b| format!("\"{b}\" = \"{}\"", proxies[&(id, *b)]))
                .collect();
            let text = format!(
                "# written by skiff-chaos: every peer is dialed through its link's fault proxy\n\
                 [raft]\n\
                 heartbeat_interval_ms = {}\n\
                 election_timeout_min_ms = {}\n\
                 election_timeout_max_ms = {}\n\
                 snapshot_logs_since_last = {}\n\
                 logs_kept_after_snapshot = {}\n\n\
                 [dial_overrides]\n{}\n",
                timing.heartbeat_interval_ms,
                timing.election_timeout_min_ms,
                timing.election_timeout_max_ms,
                timing.snapshot_logs_since_last,
                timing.logs_kept_after_snapshot,
                overrides.join("\n"),
            );
            std::fs::write(&config, text).map_err(io_err(format!("write {}", config.display())))?;
            nodes.push(Node {
                id,
                addr: addrs[&id],
                data_dir,
                config,
                log: node_dir.join("skiffd.log"),
                child: None,
                paused: false,
                starts: 0,
            });
        }
        let mut cluster = Cluster {
            nodes,
            faults,
            skiffd: skiffd.to_path_buf(),
            shutdown,
        };
        for &id in &ids {
            cluster.start_node(id).await?;
        }
        let client = cluster.client()?;
        let members: BTreeMap<u64, String> =
            addrs.iter().map(|(id, a)| (*id, a.to_string())).collect();
        // The client's retries of init carry the same admin secret, so a retry after a lost
        // answer still returns the token; without it no client could do anything.
        let admin = client
            .cluster_init(members)
            .await
            .map_err(|e| ChaosError::Cluster(format!("cluster init failed: {e}")))?;
        remember_token(&cluster.endpoints(), &admin.secret);
        cluster.wait_writable(CLUSTER_READY_TIMEOUT).await?;
        Ok(cluster)
    }

    fn node(&self, id: NodeId) -> Result<&Node, ChaosError> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| ChaosError::Cluster(format!("no node {id}")))
    }

    fn node_mut(&mut self, id: NodeId) -> Result<&mut Node, ChaosError> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| ChaosError::Cluster(format!("no node {id}")))
    }

    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Client endpoints of every node, `host:port`.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr.to_string()).collect()
    }

    /// A client of the whole cluster with short deadlines, for the harness itself.
    pub fn client(&self) -> Result<Client, ChaosError> {
        client_for(self.endpoints())
    }

    /// A client that talks to node `id` only (for local reads and probes).
    pub fn node_client(&self, id: NodeId) -> Result<Client, ChaosError> {
        client_for(vec![self.node(id)?.addr.to_string()])
    }

    /// Starts (or restarts) node `id` from its data directory and waits until it listens.
    pub async fn start_node(&mut self, id: NodeId) -> Result<(), ChaosError> {
        let skiffd = self.skiffd.clone();
        let node = self.node_mut(id)?;
        if node.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(io_err(format!("open {}", node.log.display())))?;
        let mut cmd = Command::new(&skiffd);
        cmd.arg("--id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(node.addr.to_string())
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--config")
            .arg(&node.config)
            .arg("--exit-with-parent")
            .arg(std::process::id().to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(io_err(format!("start {} for node {id}", skiffd.display())))?;
        node.child = Some(child);
        node.paused = false;
        node.starts += 1;
        let addr = node.addr;
        let deadline = tokio::time::Instant::now() + NODE_START_TIMEOUT;
        // Bounded by the deadline: probe until the node accepts TCP connections.
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            let node = self.node_mut(id)?;
            if let Some(child) = node.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    node.child = None;
                    return Err(ChaosError::Cluster(format!(
                        "node {id} exited at start with {status}; see {}",
                        node.log.display()
                    )));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ChaosError::Cluster(format!(
                    "node {id} did not listen on {addr} within {NODE_START_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// kill -9 node `id` and reap it. Its data directory stays.
    pub async fn kill_node(&mut self, id: NodeId) -> Result<(), ChaosError> {
        let node = self.node_mut(id)?;
        let Some(mut child) = node.child.take() else {
            return Ok(());
        };
        node.paused = false;
        // SIGKILL also ends a stopped process.
        let _ = child.start_kill();
        let _ = child.wait().await;
        Ok(())
    }

    /// SIGSTOP node `id` (it stays in memory, frozen, with its connections open).
    pub fn pause_node(&mut self, id: NodeId) -> Result<(), ChaosError> {
        let node = self.node_mut(id)?;
        if let Some(pid) = node.pid() {
            kill(pid, Signal::SIGSTOP).map_err(|e| ChaosError::Signal {
                node: id,
                signal: "SIGSTOP",
                source: e,
            })?;
            node.paused = true;
        }
        Ok(())
    }

    /// SIGCONT node `id`.
    pub fn resume_node(&mut self, id: NodeId) -> Result<(), ChaosError> {
        let node = self.node_mut(id)?;
        if let Some(pid) = node.pid() {
            kill(pid, Signal::SIGCONT).map_err(|e| ChaosError::Signal {
                node: id,
                signal: "SIGCONT",
                source: e,
            })?;
        }
        node.paused = false;
        Ok(())
    }

    /// Heals everything: network faults off, paused nodes resumed, dead nodes restarted.
    pub async fn heal(&mut self) -> Result<(), ChaosError> {
        self.faults.heal();
        for id in self.ids() {
            if self.node(id)?.is_paused() {
                self.resume_node(id)?;
            }
            if !self.node(id)?.is_running() {
                self.start_node(id).await?;
            }
        }
        Ok(())
    }

    /// The current leader, asked with a short deadline; `None` if no node knows one.
    pub async fn leader(&self) -> Option<NodeId> {
        let client = self.client().ok()?;
        let status = tokio::time::timeout(Duration::from_secs(3), client.cluster_status()).await;
        status.ok()?.ok()?.leader
    }

    /// Waits until a write succeeds; returns how long it took.
    pub async fn wait_writable(&self, timeout: Duration) -> Result<Duration, ChaosError> {
        let client = self.client()?;
        let start = tokio::time::Instant::now();
        let mut last = String::from("no attempt");
        // Bounded by `timeout`.
        while start.elapsed() < timeout {
            let put = tokio::time::timeout(
                Duration::from_secs(5),
                client.put("chaos-probe", b"ready".to_vec()),
            )
            .await;
            match put {
                Ok(Ok(_)) => return Ok(start.elapsed()),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "timed out".into(),
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        Err(ChaosError::Cluster(format!(
            "the cluster accepted no write within {timeout:?}: {last}"
        )))
    }

    /// Stops every node (resuming paused ones so they can die cleanly) and the proxies.
    pub async fn stop(&mut self) {
        let _ = self.shutdown.send(true);
        for id in self.ids() {
            let _ = self.resume_node(id);
            let _ = self.kill_node(id).await;
        }
    }

    /// How many times each node was started (1 + restarts).
    pub fn starts(&self) -> BTreeMap<NodeId, u32> {
        self.nodes.iter().map(|n| (n.id, n.starts)).collect()
    }
}

/// The admin token of each cluster this process initialized, by client endpoint, so that
/// every client [`client_for`] builds presents it without its callers passing it along.
static TOKENS: std::sync::Mutex<BTreeMap<String, String>> = std::sync::Mutex::new(BTreeMap::new());

fn remember_token(endpoints: &[String], secret: &str) {
    let mut tokens = TOKENS
        .lock()
        .expect("token registry lock poisoned by a panic");
    for e in endpoints {
        tokens.insert(e.clone(), secret.to_string());
    }
}

/// Client settings for the harness: few attempts and short deadlines, so that an operation
/// under a fault ends (as unknown) instead of hanging.
pub fn client_for(endpoints: Vec<String>) -> Result<Client, ChaosError> {
    let token = endpoints.first().and_then(|e| {
        TOKENS
            .lock()
            .expect("token registry lock poisoned by a panic")
            .get(e)
            .cloned()
    });
    let mut config = ClientConfig::new(endpoints);
    config.token = token;
    config.attempts_max = 4;
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(400);
    config.rpc_timeout = Duration::from_millis(2000);
    Client::new(config).map_err(|e| ChaosError::Cluster(format!("cannot build a client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_skiffd_path_must_exist() {
        let err = find_skiffd(Some(Path::new("/nonexistent/skiffd"))).expect_err("missing");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/skiffd"), "{msg}");
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = dir.path().join("skiffd");
        std::fs::write(&fake, b"").expect("write");
        assert_eq!(find_skiffd(Some(&fake)).expect("found"), fake);
    }
}
