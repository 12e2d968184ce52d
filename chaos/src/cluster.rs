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
//! - every wait is bounded ([`NODE_START_TIMEOUT`], [`CLUSTER_READY_TIMEOUT`],
//!   [`MEMBERSHIP_CALL_TIMEOUT`]);
//! - a node is a *slot* (its address, directory, proxies) holding one Raft node id at a time.
//!   A slot's node leaves the membership only by a confirmed removal; only then is its data
//!   wiped, and it comes back under a **new** id (openraft: never reuse a node id after wiping
//!   its data). Every id a slot may take is in every config's `dial_overrides` from the start,
//!   so a re-added node is reached through the proxies like the others;
//! - every client the harness uses is built by [`client_for`] or [`Cluster::admin_client`]
//!   (one place, [`build_client`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use skiff_client::api::MemberRole;
use skiff_client::tls::TlsConnector;
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
/// Longest a membership change (remove, or add: the learner catches up first) may take.
pub const MEMBERSHIP_CALL_TIMEOUT: Duration = Duration::from_secs(90);
/// Node ids one slot can take in a run: its first, then one more per re-add after a wipe.
pub const INCARNATIONS_MAX: u64 = 16;
/// Attempts at confirming an uncertain removal, and at re-adding a node.
const MEMBERSHIP_ATTEMPTS_MAX: u32 = 3;
/// Deadline of one status read during membership changes.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

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

/// The Raft id of a slot's `incarnation`-th node in a cluster of `nodes` slots: slot `s` has
/// `s`, `s + n`, `s + 2n`, ... so ids never collide and are never reused.
pub fn raft_id(slot: NodeId, incarnation: u64, nodes: usize) -> NodeId {
    slot + incarnation * nodes as u64
}

/// One node slot: its addresses, files, current Raft id and process (if running).
#[derive(Debug)]
pub struct Node {
    /// The slot number (1..=n): faults, proxies and reports name nodes by it.
    pub id: NodeId,
    /// The Raft node id the slot's process runs as now.
    pub raft_id: NodeId,
    /// How many times the slot was wiped and re-added (its id is [`raft_id`] of this).
    pub incarnation: u64,
    /// Removed from the membership and wiped; waiting to be re-added under a new id.
    pub removed: bool,
    /// An add of `raft_id` failed without a clear answer: the id may be a learner or a voter.
    /// The node is stopped, its data kept, until [`Cluster::ensure_members`] finds out.
    unsure: bool,
    /// A re-add under a new id is starting the slot.
    rejoining: bool,
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

    /// Forgets the process if it has exited on its own (a node exits when its Raft core
    /// stops); returns how it ended.
    fn reap_exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        self.paused = false;
        Some(status)
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
    /// The cluster's CA and the certificate of every node id a slot may take.
    tls_dir: PathBuf,
    /// The directory every node reads stream sources from (its `[sources] roots`).
    sources_dir: PathBuf,
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
        // Mutual TLS as in production: one CA, a certificate for every id a slot may take.
        let tls_dir = dir.join("tls");
        let all_ids: Vec<NodeId> = ids
            .iter()
            .flat_map(|&b| (0..INCARNATIONS_MAX).map(move |k| raft_id(b, k, n)))
            .collect();
        make_certs(skiffd, &tls_dir, &all_ids).await?;
        let endpoints: Vec<String> = addrs.values().map(|a| a.to_string()).collect();
        remember_ca(&endpoints, &tls_dir.join("ca.pem"))?;
        // The only directory the nodes read files from for callers: stream sources. Beside
        // the node and TLS directories, never holding them (a node refuses such a root).
        let sources_dir = dir.join("sources");
        std::fs::create_dir_all(&sources_dir)
            .map_err(io_err(format!("create {}", sources_dir.display())))?;
        let sources_dir = sources_dir
            .canonicalize()
            .map_err(io_err(format!("resolve {}", sources_dir.display())))?;
        let mut nodes = Vec::new();
        for &id in &ids {
            let node_dir = dir.join(format!("node{id}"));
            let data_dir = node_dir.join("data");
            std::fs::create_dir_all(&data_dir)
                .map_err(io_err(format!("create {}", data_dir.display())))?;
            let config = node_dir.join("node.toml");
            // Every id the other slots may ever take, so re-added nodes cross proxies too.
            let overrides: Vec<String> = ids
                .iter()
                .filter(|&&b| b != id)
                .flat_map(|&b| (0..INCARNATIONS_MAX).map(move |k| (raft_id(b, k, n), (id, b))))
                .map(|(rid, link)| format!("\"{rid}\" = \"{}\"", proxies[&link]))
                .collect();
            let text = format!(
                "# written by skiff-chaos: every peer is dialed through its link's fault proxy\n\
                 [raft]\n\
                 heartbeat_interval_ms = {}\n\
                 election_timeout_min_ms = {}\n\
                 election_timeout_max_ms = {}\n\
                 snapshot_logs_since_last = {}\n\
                 logs_kept_after_snapshot = {}\n\n\
                 [sources]\n\
                 roots = [{:?}]\n\n\
                 [dial_overrides]\n{}\n",
                timing.heartbeat_interval_ms,
                timing.election_timeout_min_ms,
                timing.election_timeout_max_ms,
                timing.snapshot_logs_since_last,
                timing.logs_kept_after_snapshot,
                sources_dir.to_string_lossy(),
                overrides.join("\n"),
            );
            std::fs::write(&config, text).map_err(io_err(format!("write {}", config.display())))?;
            nodes.push(Node {
                id,
                raft_id: id,
                incarnation: 0,
                removed: false,
                unsure: false,
                rejoining: false,
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
            tls_dir,
            sources_dir,
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

    /// A client of the whole cluster for membership changes: one attempt may wait
    /// [`MEMBERSHIP_CALL_TIMEOUT`], since an add waits for the learner to catch up.
    pub fn admin_client(&self) -> Result<Client, ChaosError> {
        build_client(self.endpoints(), Deadlines::Admin)
    }

    /// [`Cluster::admin_client`] without slot `slot`: a node being re-added is not a member
    /// yet and would only answer that it knows no leader.
    fn admin_client_without(&self, slot: NodeId) -> Result<Client, ChaosError> {
        let endpoints: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.id != slot)
            .map(|n| n.addr.to_string())
            .collect();
        if endpoints.is_empty() {
            return self.admin_client();
        }
        build_client(endpoints, Deadlines::Admin)
    }

    /// A client that talks to node `id` only (for local reads and probes).
    pub fn node_client(&self, id: NodeId) -> Result<Client, ChaosError> {
        client_for(vec![self.node(id)?.addr.to_string()])
    }

    /// The directory the nodes read stream sources from.
    pub fn sources_dir(&self) -> &Path {
        &self.sources_dir
    }

    /// Starts (or restarts) node `id` from its data directory and waits until it listens.
    pub async fn start_node(&mut self, id: NodeId) -> Result<(), ChaosError> {
        let skiffd = self.skiffd.clone();
        let tls_dir = self.tls_dir.clone();
        let node = self.node_mut(id)?;
        if let Some(status) = node.reap_exited() {
            tracing::warn!(%status, "node {id} had exited on its own");
        }
        if node.child.is_some() {
            return Ok(());
        }
        // A removed slot's data is wiped: starting it under its old id would reuse the id.
        // Only a re-add (a new id) starts it; `rejoin` clears `removed` first.
        if node.removed && !node.unsure && !node.rejoining {
            tracing::info!("slot {id} is removed; it starts only when re-added");
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(io_err(format!("open {}", node.log.display())))?;
        let mut cmd = Command::new(&skiffd);
        cmd.arg("--id")
            .arg(node.raft_id.to_string())
            .arg("--listen")
            .arg(node.addr.to_string())
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--config")
            .arg(&node.config)
            .arg("--tls-ca")
            .arg(tls_dir.join("ca.pem"))
            .arg("--tls-cert")
            .arg(tls_dir.join(format!("node-{}.pem", node.raft_id)))
            .arg("--tls-key")
            .arg(tls_dir.join(format!("node-{}.key", node.raft_id)))
            .arg("--exit-with-parent")
            .arg(std::process::id().to_string())
            // openraft's own account of its core stopping is at info level.
            .env(
                "SKIFF_LOG",
                "info,tarpc=warn,openraft=warn,openraft::raft::raft_inner=info",
            )
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

    /// Heals faults: network faults off, paused nodes resumed, dead nodes restarted. Removed
    /// nodes (and nodes a failed add left unsure) are re-added by [`Cluster::ensure_members`].
    pub async fn heal(&mut self) -> Result<(), ChaosError> {
        self.faults.heal();
        for id in self.ids() {
            if let Some(status) = self.node_mut(id)?.reap_exited() {
                // As a supervisor would: start it again from its data.
                tracing::warn!(%status, "node {id} had exited on its own; restarting it");
            }
            if self.node(id)?.is_paused() {
                self.resume_node(id)?;
            }
            if !self.node(id)?.is_running() && !self.node(id)?.removed {
                self.start_node(id).await?;
            }
        }
        Ok(())
    }

    /// Makes sure every slot's node is a voter (after heal, before the final checks), re-adding
    /// any that is not (each slot within [`CLUSTER_READY_TIMEOUT`]); returns the slots' ids.
    pub async fn ensure_members(&mut self) -> Result<Vec<NodeId>, ChaosError> {
        for id in self.ids() {
            self.ensure_voter(id).await?;
        }
        Ok(self.nodes.iter().map(|n| n.raft_id).collect())
    }

    /// The slot of the current leader, asked with a short deadline; `None` if no node knows
    /// one (or the leader is no slot's current node).
    pub async fn leader(&self) -> Option<NodeId> {
        let client = self.client().ok()?;
        let status = tokio::time::timeout(Duration::from_secs(3), client.cluster_status()).await;
        let leader = status.ok()?.ok()?.leader?;
        self.nodes
            .iter()
            .find(|n| n.raft_id == leader)
            .map(|n| n.id)
    }

    /// The membership as the leader sees it, asked of each slot in turn (a follower forwards
    /// the question to the leader; a node that is not a member yet answers for itself, so an
    /// answer counts only when the leader gave it).
    async fn membership(&self) -> Option<Membership> {
        for id in self.ids() {
            let Ok(client) = self.node_client(id) else {
                continue;
            };
            let Ok(Ok(s)) = tokio::time::timeout(STATUS_TIMEOUT, client.cluster_status()).await
            else {
                continue;
            };
            let Some(leader) = s.leader.filter(|l| *l == s.answered_by) else {
                continue;
            };
            let mut m = Membership {
                leader,
                term: s.term,
                voters: Vec::new(),
                learners: Vec::new(),
            };
            for n in &s.nodes {
                match n.role {
                    MemberRole::Voter => m.voters.push(n.id),
                    MemberRole::Learner => m.learners.push(n.id),
                }
            }
            return Some(m);
        }
        None
    }

    /// Whether node `raft_id` is certainly out of the committed membership: the leader does
    /// not list it, a write is then committed, and the same leader in the same term still
    /// does not list it. The leader's membership is the last one in its log; a write it
    /// commits in its term commits every entry before it, so the removal is committed.
    async fn removal_committed(&self, admin: &Client, raft_id: NodeId) -> bool {
        // Bounded by MEMBERSHIP_ATTEMPTS_MAX.
        for _ in 0..MEMBERSHIP_ATTEMPTS_MAX {
            let Some(before) = self.membership().await else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            if before.contains(raft_id) {
                return false;
            }
            let write = tokio::time::timeout(
                STATUS_TIMEOUT,
                admin.put("chaos-probe", b"membership".to_vec()),
            )
            .await;
            if !matches!(write, Ok(Ok(_))) {
                continue;
            }
            if let Some(after) = self.membership().await {
                if after.leader == before.leader
                    && after.term == before.term
                    && !after.contains(raft_id)
                {
                    return true;
                }
            }
        }
        false
    }

    /// Removes slot `slot`'s node from the membership the way an operator does
    /// (`cluster remove-node`), then stops it and wipes its data. Refused (nothing changes)
    /// when it would leave fewer voters than a quorum of the full cluster, or when the
    /// removal cannot be confirmed as committed: a wiped voter is lost data.
    pub async fn remove_member(&mut self, slot: NodeId) -> Result<Removal, ChaosError> {
        let n = self.nodes.len();
        let raft_id = self.node(slot)?.raft_id;
        let admin = self.admin_client()?;
        let mut asked = None;
        // Bounded by MEMBERSHIP_ATTEMPTS_MAX: a leader may be settling after the last fault.
        for _ in 0..MEMBERSHIP_ATTEMPTS_MAX {
            asked = self.membership().await;
            if asked.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let Some(m) = asked else {
            return Ok(Removal::Refused("no leader to ask".into()));
        };
        if !m.voters.contains(&raft_id) {
            return Ok(Removal::Refused(format!("node {raft_id} is not a voter")));
        }
        let quorum = n / 2 + 1;
        if m.voters.len() - 1 < quorum {
            return Ok(Removal::Refused(format!(
                "removing node {raft_id} would leave {} voters, fewer than a quorum of {quorum}",
                m.voters.len() - 1
            )));
        }
        let call =
            tokio::time::timeout(MEMBERSHIP_CALL_TIMEOUT, admin.cluster_remove_node(raft_id)).await;
        let committed = match call {
            // The leader answers only once the new membership is committed.
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::info!("removing node {raft_id}: {e}; checking the membership");
                self.removal_committed(&admin, raft_id).await
            }
            Err(_) => {
                tracing::info!("removing node {raft_id}: no answer; checking the membership");
                self.removal_committed(&admin, raft_id).await
            }
        };
        if !committed {
            return Ok(Removal::Refused(format!(
                "the removal of node {raft_id} is not confirmed; it stays as it is"
            )));
        }
        self.kill_node(slot).await?;
        self.wipe(slot)?;
        Ok(Removal::Removed(raft_id))
    }

    /// Deletes slot `slot`'s data (its process must be stopped) and marks it for a re-add.
    fn wipe(&mut self, slot: NodeId) -> Result<(), ChaosError> {
        let node = self.node_mut(slot)?;
        if node.is_running() {
            return Err(ChaosError::Cluster(format!(
                "refusing to wipe slot {slot}: its node is running"
            )));
        }
        std::fs::remove_dir_all(&node.data_dir)
            .map_err(io_err(format!("wipe {}", node.data_dir.display())))?;
        std::fs::create_dir_all(&node.data_dir)
            .map_err(io_err(format!("create {}", node.data_dir.display())))?;
        node.removed = true;
        node.unsure = false;
        Ok(())
    }

    /// Re-adds a removed slot under a new id (`cluster add-node`): starts a fresh node on its
    /// wiped directory and adds it (learner, then voter). Returns the new id, or why not.
    /// Gives up (the node stopped, "unsure") once `within` has passed.
    pub async fn rejoin(
        &mut self,
        slot: NodeId,
        within: Duration,
    ) -> Result<Result<NodeId, String>, ChaosError> {
        let give_up = tokio::time::Instant::now() + within;
        let n = self.nodes.len();
        let node = self.node_mut(slot)?;
        if !node.removed {
            return Ok(Ok(node.raft_id));
        }
        if node.unsure || node.is_running() {
            return Err(ChaosError::Cluster(format!(
                "slot {slot} is not wiped and stopped; it cannot take a new id"
            )));
        }
        if node.incarnation + 1 >= INCARNATIONS_MAX {
            return Err(ChaosError::Cluster(format!(
                "slot {slot} used all its {INCARNATIONS_MAX} node ids"
            )));
        }
        node.incarnation += 1;
        node.raft_id = raft_id(slot, node.incarnation, n);
        let (new_id, addr) = (node.raft_id, node.addr.to_string());
        node.rejoining = true;
        let started = self.start_node(slot).await;
        self.node_mut(slot)?.rejoining = false;
        started?;
        let admin = self.admin_client_without(slot)?;
        let mut last = String::new();
        // Bounded by MEMBERSHIP_ATTEMPTS_MAX and `within`.
        for _ in 0..MEMBERSHIP_ATTEMPTS_MAX {
            let left = give_up.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let add = tokio::time::timeout(
                left.min(MEMBERSHIP_CALL_TIMEOUT),
                admin.cluster_add_node(new_id, &addr),
            )
            .await;
            match add {
                Ok(Ok(())) => {
                    self.node_mut(slot)?.removed = false;
                    return Ok(Ok(new_id));
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "no answer".into(),
            }
            // A retried add after one that worked is refused as "already a member".
            if self
                .membership()
                .await
                .is_some_and(|m| m.voters.contains(&new_id))
            {
                self.node_mut(slot)?.removed = false;
                return Ok(Ok(new_id));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Stopped, not wiped: the add may still have gone through; heal finds out.
        self.kill_node(slot).await?;
        self.node_mut(slot)?.unsure = true;
        Ok(Err(format!("adding node {new_id} failed: {last}")))
    }

    /// Makes slot `slot`'s node a voter again: a removed slot is re-added; a node left a
    /// learner or outside the membership by a failed add is removed if listed (a learner
    /// holds no quorum, so wiping it loses nothing), wiped, and re-added under a new id.
    async fn ensure_voter(&mut self, slot: NodeId) -> Result<(), ChaosError> {
        let mut last = String::from("no attempt");
        let deadline = tokio::time::Instant::now() + CLUSTER_READY_TIMEOUT;
        let mut rejoins = 0;
        // Bounded by the deadline and MEMBERSHIP_ATTEMPTS_MAX re-adds.
        while rejoins < MEMBERSHIP_ATTEMPTS_MAX && tokio::time::Instant::now() < deadline {
            let admin = self.admin_client_without(slot)?;
            let (raft_id, removed, unsure) = {
                let n = self.node(slot)?;
                (n.raft_id, n.removed, n.unsure)
            };
            if !removed || unsure {
                let Some(m) = self.membership().await else {
                    last = "no leader".into();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                };
                if m.voters.contains(&raft_id) {
                    self.start_node(slot).await?;
                    let node = self.node_mut(slot)?;
                    node.removed = false;
                    node.unsure = false;
                    return Ok(());
                }
                if m.learners.contains(&raft_id) {
                    let call = tokio::time::timeout(
                        MEMBERSHIP_CALL_TIMEOUT,
                        admin.cluster_remove_node(raft_id),
                    )
                    .await;
                    if !matches!(call, Ok(Ok(()))) && !self.removal_committed(&admin, raft_id).await
                    {
                        last = format!("learner {raft_id} could not be removed");
                        continue;
                    }
                }
                self.kill_node(slot).await?;
                self.wipe(slot)?;
            }
            rejoins += 1;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.rejoin(slot, left.max(Duration::from_secs(1))).await? {
                Ok(id) => {
                    tracing::info!("heal: slot {slot} is node {id} again, a voter");
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(ChaosError::Cluster(format!(
            "slot {slot} could not be made a voter again: {last}"
        )))
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

/// The CA of each cluster this process started, by client endpoint (as [`TOKENS`]).
static CAS: std::sync::Mutex<BTreeMap<String, TlsConnector>> =
    std::sync::Mutex::new(BTreeMap::new());

fn remember_ca(endpoints: &[String], ca: &Path) -> Result<(), ChaosError> {
    let tls = TlsConnector::client(ca)
        .map_err(|e| ChaosError::Cluster(format!("the cluster CA: {e}")))?;
    let mut cas = CAS.lock().expect("CA registry lock poisoned by a panic");
    for e in endpoints {
        cas.insert(e.clone(), tls.clone());
    }
    Ok(())
}

/// Runs `skiffd certs` for `ids` (hosts: 127.0.0.1, where nodes and proxies listen).
async fn make_certs(skiffd: &Path, dir: &Path, ids: &[NodeId]) -> Result<(), ChaosError> {
    let mut cmd = Command::new(skiffd);
    cmd.arg("certs").arg("--dir").arg(dir);
    for id in ids {
        cmd.arg("--node").arg(format!("{id}=127.0.0.1"));
    }
    let out = cmd
        .output()
        .await
        .map_err(io_err(format!("run {} certs", skiffd.display())))?;
    if !out.status.success() {
        return Err(ChaosError::Cluster(format!(
            "skiffd certs failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The membership as a leader sees it.
#[derive(Debug, Clone)]
struct Membership {
    leader: NodeId,
    term: u64,
    voters: Vec<NodeId>,
    learners: Vec<NodeId>,
}

impl Membership {
    fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }
}

/// What [`Cluster::remove_member`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// This node id left the membership (committed); its slot is stopped and wiped.
    Removed(NodeId),
    /// Nothing changed, for this reason.
    Refused(String),
}

/// Deadlines of a harness client.
#[derive(Debug, Clone, Copy)]
pub enum Deadlines {
    /// Few attempts and short deadlines, so that an operation under a fault ends (as
    /// unknown) instead of hanging.
    Workload,
    /// Membership changes: one attempt may take [`MEMBERSHIP_CALL_TIMEOUT`].
    Admin,
}

/// Client settings for the workload; see [`Deadlines::Workload`].
pub fn client_for(endpoints: Vec<String>) -> Result<Client, ChaosError> {
    build_client(endpoints, Deadlines::Workload)
}

/// Builds every client the harness uses (the one place that knows how a client is made).
pub fn build_client(endpoints: Vec<String>, deadlines: Deadlines) -> Result<Client, ChaosError> {
    // The token of the cluster any of these endpoints belongs to (a re-added node's endpoint
    // may be new; the others are not).
    let token = {
        let tokens = TOKENS
            .lock()
            .expect("token registry lock poisoned by a panic");
        endpoints.iter().find_map(|e| tokens.get(e).cloned())
    };
    let tls = {
        let cas = CAS.lock().expect("CA registry lock poisoned by a panic");
        endpoints.iter().find_map(|e| cas.get(e).cloned())
    };
    let mut config = ClientConfig::new(endpoints);
    config.token = token;
    config.tls = tls;
    match deadlines {
        Deadlines::Workload => {
            config.attempts_max = 4;
            config.backoff_initial = Duration::from_millis(50);
            config.backoff_max = Duration::from_millis(400);
            config.rpc_timeout = Duration::from_millis(2000);
        }
        Deadlines::Admin => {
            config.attempts_max = 3;
            config.backoff_initial = Duration::from_millis(200);
            config.backoff_max = Duration::from_secs(1);
            config.rpc_timeout = MEMBERSHIP_CALL_TIMEOUT;
        }
    }
    Client::new(config).map_err(|e| ChaosError::Cluster(format!("cannot build a client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ids_never_collide_or_repeat() {
        let mut seen = std::collections::BTreeSet::new();
        for slot in 1..=5 {
            for k in 0..INCARNATIONS_MAX {
                assert!(
                    seen.insert(raft_id(slot, k, 5)),
                    "slot {slot} incarnation {k}"
                );
            }
        }
        assert_eq!(raft_id(2, 0, 3), 2, "the first id of a slot is its number");
    }

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
