//! The node: opens the store, starts Raft, serves clients and peers on one port, and stops on
//! the shutdown signal.
//!
//! Request path of a write: client → any node's [`ClientApi::write`] → (if that node is not the
//! leader) [`PeerApi::forward_write`] on the leader → [`Batcher`] → one log entry → replicated
//! and applied → results back along the same path.
//!
//! Reads marked linearizable are served by the leader after it confirms its leadership with a
//! quorum (`ensure_linearizable`, shared by concurrent reads through [`crate::read_index`];
//! it also waits until the state machine has applied
//! everything committed before the read); followers forward them.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use openraft::error::{CheckIsLeaderError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use skiff_client::api::{
    ApiError, BackupChunk, ClientApi, ClientCommand, ClusterStatus, Command, CommandResult,
    CreatedToken, FunctionRecord, FunctionVersion, InvokeRequest, KvEntry, KvPage, MemberRole,
    NodeId, NodeStatus, ReadConsistency, RequestId, Role, StreamId, StreamJob, StreamStartRequest,
    Task, TaskFilter, TaskId, TokenId, TokenInfo, Workers, INIT_MEMBERS_MAX,
};
use skiff_client::transport::{self, Conn, Service, TlsAcceptor, TlsConnector};
use skiff_raft_store::functions::validate_function_name;
use skiff_raft_store::model::{validate_key, Principal, KEY_BYTES_MAX, LIST_LIMIT_MAX};
use skiff_raft_store::tokens::{token_hash, validate_secret, validate_token_name};
use skiff_raft_store::types::Raft;
use skiff_raft_store::StateMachineStore;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use crate::auth::Session;
use crate::batcher::{self, Batcher};
use crate::config::NodeConfig;
use crate::connections::{Admission, Admitted, IdleClock};
use crate::metrics::Metrics;
use crate::peer::{
    self, AdminOp, AdminResult, Network, PeerApi, PeerPool, PeerRefusal, Probe, ReadOp, ReadResult,
    StreamOp, StreamReply,
};
use crate::worker::Worker;
use crate::NodeError;

/// How long a node without a known leader waits for one before answering `NoLeader`.
const LEADER_WAIT: Duration = Duration::from_secs(3);
/// Deadline of a reachability probe in `cluster status`.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long `cluster init` keeps proposing the bootstrap token while the first leader is
/// being elected.
const INIT_BOOTSTRAP_WAIT: Duration = Duration::from_secs(10);
/// How long a new connection may take to send its service byte (and a client its token).
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `cluster init` on a fresh node may spend probing the other members, in all.
const INIT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// State shared by every request handler of one node.
pub struct NodeInner {
    pub id: NodeId,
    pub config: NodeConfig,
    pub raft: Raft,
    pub store: StateMachineStore,
    pub batcher: Batcher,
    pub peers: PeerPool,
    pub metrics: Arc<Metrics>,
    pub worker: Arc<Worker>,
    /// Shared leadership confirmations for linearizable reads.
    pub read_index: crate::read_index::ReadIndex,
    /// Set once shutdown begins; background loops stop.
    pub stopping: std::sync::atomic::AtomicBool,
    /// The backup being downloaded from this node (as leader), if any.
    pub exports: crate::backup::Exports,
    /// The TLS side of the listener (`None`: plaintext, no TLS files configured).
    pub tls: Option<TlsAcceptor>,
    /// The directories callers' file sources and file dependencies are read from.
    pub sources: Arc<crate::sources::SourceRoots>,
}

impl NodeInner {
    /// Whether this node runs tasks.
    pub fn worker_enabled(&self) -> bool {
        self.config.worker.enabled
    }
}

/// A cheap handle on the node's shared state.
#[derive(Clone)]
pub struct Node(pub Arc<NodeInner>);

/// Runs a node until `shutdown` resolves, then stops Raft and closes the store.
pub async fn run(config: NodeConfig, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(|source| NodeError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
    let metrics_listener = match &config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Bind {
                    addr: addr.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let node = start(config).await?;
    if let Some(l) = metrics_listener {
        let n = node.clone();
        tokio::spawn(crate::metrics::serve(l, move || {
            let pool = n.0.worker.pool().stats();
            n.0.metrics.warm_pool(pool.idle, pool.memory_bytes);
            n.0.metrics.render(&n.0.raft, n.0.batcher.queue_depth())
        }));
    }
    tracing::info!(id = node.0.id, listen = %node.0.config.listen, "node started");
    let accept = accept_loop(node.clone(), listener);
    tokio::pin!(accept);
    let core = raft_core_stopped(node.0.raft.clone());
    tokio::pin!(core);
    tokio::select! {
        () = shutdown => tracing::info!("shutdown requested"),
        r = &mut accept => r?,
        why = &mut core => return Err(core_died(why)),
    }
    // Still accepting: the voter taking over may have to dial this node for its vote.
    let handover = tokio::select! {
        h = crate::handover::hand_over(&node) => h,
        r = &mut accept => return r,
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
    NodeError::Raft(format!("the Raft core stopped: {why}"))
}

/// Opens the store and starts Raft, without serving.
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
    let (log_store, store) = skiff_raft_store::open(&config.data_dir.join("raft"))
        .await
        .map_err(|e| NodeError::Store(e.to_string()))?;
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
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    let metrics = Arc::new(Metrics::new());
    let batcher = Batcher::start(
        raft.clone(),
        metrics.clone(),
        config.limits.write_queue_max,
        config.limits.writes_in_flight_max,
        config.limits.entry_bytes_max,
    );
    let peers = PeerPool::new(
        config.id,
        config.limits.peer_frame_bytes_max,
        overrides,
        connector,
    );
    let worker = Arc::new(Worker::new(config.id, config.worker.clone()));
    let node = Node(Arc::new(NodeInner {
        id: config.id,
        config,
        raft,
        store,
        batcher,
        peers,
        metrics,
        worker,
        read_index: Default::default(),
        stopping: std::sync::atomic::AtomicBool::new(false),
        exports: crate::backup::Exports::default(),
        tls: acceptor,
        sources,
    }));
    crate::worker::start_loops(&node);
    crate::streams::start_driver(&node);
    Ok(node)
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

/// Stops Raft (no more votes or appends from this node) and lets the store close.
pub async fn stop(node: Node) -> Result<(), NodeError> {
    node.0
        .stopping
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let pool_node = node.clone();
    // Idle warm sandboxes are removed now, not when the last handle drops.
    let _ = tokio::task::spawn_blocking(move || pool_node.0.worker.pool().clear()).await;
    node.0
        .raft
        .shutdown()
        .await
        .map_err(|e| NodeError::Raft(format!("shutdown: {e}")))?;
    tracing::info!(id = node.0.id, "node stopped");
    Ok(())
}

async fn accept_loop(node: Node, listener: TcpListener) -> Result<(), NodeError> {
    let limits = &node.0.config.limits;
    let admission = Admission::new(limits.connections_max, limits.connections_per_address_max);
    loop {
        let (stream, peer_addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: wait and keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut admitted = match admission.admit(peer_addr.ip()) {
            Ok(a) => a,
            Err(refused) => {
                // Counted, and logged at debug only: a flood must not flood the log too.
                node.0.metrics.rejected(refused.reason());
                tracing::debug!(%peer_addr, %refused, "connection refused");
                continue;
            }
        };
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(node, stream, peer_addr, &mut admitted).await {
                tracing::debug!(%peer_addr, error = %e, "connection closed");
            }
            drop(admitted);
        });
    }
}

async fn serve_connection(
    node: Node,
    tcp: tokio::net::TcpStream,
    peer_addr: std::net::SocketAddr,
    admitted: &mut Admitted,
) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut stream = match &node.0.tls {
        Some(tls)
            if !(node.0.config.tls.allow_plaintext_clients && starts_plaintext(&tcp).await) =>
        {
            tls.accept(tcp).await.inspect_err(|_| {
                // Plaintext connections, certificates the CA did not sign, scanners.
                node.0.metrics.rejected("tls_handshake");
            })?
        }
        // A plaintext connection gets the client service only: `peer_verified` is false.
        _ => Conn::Plain(tcp),
    };
    let metrics = node.0.metrics.clone();
    let refused = |reason: &'static str| {
        let metrics = metrics.clone();
        move |e: std::io::Error| {
            metrics.rejected(reason);
            e
        }
    };
    let mut first = [0u8; 1];
    tokio::time::timeout(PREAMBLE_TIMEOUT, stream.read_exact(&mut first))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no service byte"))
        .map_err(refused("handshake_timeout"))??;
    let limits = &node.0.config.limits;
    let per_conn = limits.requests_per_connection_max;
    match Service::from_preamble(first[0]) {
        Some(Service::Client) => {
            let token = tokio::time::timeout(PREAMBLE_TIMEOUT, transport::read_token(&mut stream))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no token byte"))
                .map_err(refused("handshake_timeout"))?
                .map_err(refused("bad_token_handshake"))?;
            let session = Session::new(node.clone(), token);
            // A connection without an active token can do nothing but `cluster_init`: it gets
            // small frames, so that what a stranger can make the node decode stays small.
            let frame_bytes_max = if session.token_is_active().await {
                limits.client_frame_bytes_max
            } else {
                UNAUTHENTICATED_FRAME_BYTES_MAX
            };
            let t = transport::framed(stream, frame_bytes_max)
                .inspect(count_bad_frames(metrics.clone()));
            // A request in progress (a sync invocation, a long wait) keeps the connection
            // open; no request for `client_idle_timeout_ms` closes it, so idle connections
            // cannot hold slots of `connections_max` for ever.
            let clock = Arc::new(IdleClock::default());
            let serving = BaseChannel::with_defaults(t)
                .max_concurrent_requests(per_conn)
                .execute(ClientApi::serve(session))
                .for_each_concurrent(per_conn, |fut| {
                    let busy = clock.busy();
                    async move {
                        fut.await;
                        drop(busy);
                    }
                });
            let idle = Duration::from_millis(limits.client_idle_timeout_ms);
            tokio::select! {
                () = serving => {}
                () = clock.idle_for(idle) => {
                    metrics.rejected("client_idle_timeout");
                    tracing::debug!(%peer_addr, "idle client connection closed");
                }
            }
        }
        Some(Service::Peer) => {
            if node.0.tls.is_some() && !stream.peer_verified() {
                // Votes, appends and forwarded reads are for nodes of this cluster only.
                node.0.metrics.rejected("peer_without_certificate");
                tracing::warn!(%peer_addr, "peer connection without a node certificate refused");
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "peer service without a node certificate",
                ));
            }
            if stream.peer_verified() {
                // A node of this cluster: it does not compete with its address's clients.
                admitted.leave_address_count();
            }
            let t = transport::framed(stream, limits.peer_frame_bytes_max)
                .inspect(count_bad_frames(metrics.clone()));
            BaseChannel::with_defaults(t)
                .max_concurrent_requests(per_conn)
                .execute(PeerApi::serve(node))
                .for_each_concurrent(per_conn, |fut| fut)
                .await;
        }
        None => {
            metrics.rejected("unknown_service");
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown service byte {:#04x}", first[0]),
            ));
        }
    }
    Ok(())
}

/// Largest frame on a client connection whose token is not active (or absent): room for a
/// `cluster_init` and the refusals of everything else.
pub const UNAUTHENTICATED_FRAME_BYTES_MAX: usize = 64 * 1024;

/// Whether a new connection starts with a service byte rather than a TLS record (whose first
/// byte is 22, a handshake); waits at most [`PREAMBLE_TIMEOUT`] for that byte.
async fn starts_plaintext(tcp: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(PREAMBLE_TIMEOUT, tcp.peek(&mut first)).await,
        Ok(Ok(1)) if Service::from_preamble(first[0]).is_some()
    )
}

/// Counts a request frame the connection could not take: over the frame limit, or not a
/// request at all (both end the connection; a closed or reset one is not counted).
fn count_bad_frames<T>(metrics: Arc<Metrics>) -> impl FnMut(&std::io::Result<T>) {
    move |item| {
        if let Err(e) = item {
            // The transport wraps the codec's error in one of kind `Other`.
            let kind = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<std::io::Error>())
                .map_or(e.kind(), std::io::Error::kind);
            if kind == std::io::ErrorKind::InvalidData {
                metrics.rejected(if e.to_string().contains("frame size too big") {
                    "frame_too_large"
                } else {
                    "undecodable_request"
                });
            }
        }
    }
}

impl Node {
    /// Whether shutdown has begun.
    pub fn stopping(&self) -> bool {
        self.0.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.0.config.limits.request_timeout_ms)
    }

    /// The current leader and its address, waiting up to [`LEADER_WAIT`] for one to appear.
    pub(crate) async fn leader(&self) -> Result<(NodeId, String), ApiError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut metrics = self.0.raft.metrics();
        loop {
            {
                let m = metrics.borrow_and_update();
                if let Some(l) = m.current_leader {
                    if let Some(n) = m.membership_config.membership().get_node(&l) {
                        return Ok((l, n.addr.clone()));
                    }
                }
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    return Err(ApiError::NoLeader {
                        leader: None,
                        leader_addr: None,
                    })
                }
            }
        }
    }

    pub(crate) async fn peer(
        &self,
        id: NodeId,
        addr: &str,
    ) -> Result<peer::PeerApiClient, ApiError> {
        self.0.peers.get(id, addr).await.map_err(|e| {
            tracing::debug!(leader = id, %addr, error = %e, "cannot reach the leader");
            ApiError::NoLeader {
                leader: Some(id),
                leader_addr: Some(addr.to_string()),
            }
        })
    }

    pub(crate) fn forward_failed(
        &self,
        leader: NodeId,
        addr: &str,
        e: tarpc::client::RpcError,
    ) -> ApiError {
        match e {
            tarpc::client::RpcError::DeadlineExceeded => ApiError::Timeout(format!(
                "leader node {leader} at {addr} did not answer in time"
            )),
            _ => ApiError::NoLeader {
                leader: Some(leader),
                leader_addr: Some(addr.to_string()),
            },
        }
    }

    /// Validates commands at the edge; a refusal is counted and changes nothing.
    fn validate(&self, commands: &[ClientCommand]) -> Result<(), ApiError> {
        for c in commands {
            if let Err(e) = c.command.validate() {
                return Err(ApiError::InvalidArgument(e.to_string()));
            }
            if let Command::FnDeploy { spec } = &c.command {
                if let Err(e) = crate::policy::check_function_sandbox(spec) {
                    return Err(ApiError::InvalidArgument(format!(
                        "function {}: {e}",
                        spec.name
                    )));
                }
                // The archive as this node holds it, when it does (an upload just made may not
                // have reached a follower yet): refused here with its bad entry, and in any
                // case again by every node that unpacks it.
                let archive = self
                    .0
                    .store
                    .read(|sm| sm.sched().code_archive(&spec.code_digest));
                if let Some(archive) = archive {
                    if let Err(e) = skiff_client::deploy::check_archive(&archive) {
                        return Err(ApiError::InvalidArgument(format!(
                            "function {}: code {}: {e}",
                            spec.name, spec.code_digest
                        )));
                    }
                }
                self.check_file_dependencies(spec)?;
            }
        }
        Ok(())
    }

    /// Refuses a function whose `file:` dependencies are not regular files beneath this
    /// node's sources roots (checked without opening them; each invocation checks again on
    /// the node that receives it).
    fn check_file_dependencies(
        &self,
        spec: &skiff_client::api::FunctionSpec,
    ) -> Result<(), ApiError> {
        let files = spec.idempotency.iter().flat_map(|i| &i.dependencies);
        for d in files {
            if let skiff_raft_store::functions::Dependency::File(path) = d {
                self.0.sources.check_file(path).map_err(|e| {
                    ApiError::InvalidArgument(format!(
                        "function {}: file dependency: {e}",
                        spec.name
                    ))
                })?;
            }
        }
        Ok(())
    }

    /// Refuses commands only nodes may send (heartbeats, completions) or that have their
    /// own call (submissions go through `invoke`).
    fn client_commands_only(&self, commands: &[ClientCommand]) -> Result<(), ApiError> {
        if commands.iter().any(|c| !c.command.is_client_command()) {
            return Err(ApiError::InvalidArgument(
                "heartbeats, completions and submissions cannot be sent with write (use invoke)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Proposes `commands`, sent by `principal` (authenticated by the caller), through the
    /// leader.
    pub(crate) async fn write(
        &self,
        principal: Principal,
        commands: Vec<ClientCommand>,
    ) -> Result<Vec<CommandResult>, ApiError> {
        self.validate(&commands)?;
        let (leader, addr) = self.leader().await?;
        if leader == self.0.id {
            return self.0.batcher.submit(principal, commands).await;
        }
        let p = self.peer(leader, &addr).await?;
        match p
            .forward_write(peer::deadline(self.timeout()), principal, commands)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.0.peers.forget(leader).await;
                Err(self.forward_failed(leader, &addr, e))
            }
        }
    }

    pub(crate) async fn read(
        &self,
        op: ReadOp,
        consistency: ReadConsistency,
    ) -> Result<ReadResult, ApiError> {
        match &op {
            ReadOp::Get { key } => {
                validate_key(key).map_err(|e| ApiError::InvalidArgument(e.to_string()))?
            }
            ReadOp::List {
                prefix,
                start_after,
                ..
            } => {
                if prefix.len() > KEY_BYTES_MAX
                    || start_after
                        .as_ref()
                        .is_some_and(|s| s.len() > KEY_BYTES_MAX)
                {
                    return Err(ApiError::InvalidArgument(format!(
                        "prefix and start_after are limited to {KEY_BYTES_MAX} bytes"
                    )));
                }
            }
            ReadOp::Function { name } => {
                validate_function_name(name).map_err(ApiError::InvalidArgument)?
            }
            ReadOp::Tasks { filter, .. } => {
                if let Some(f) = &filter.function {
                    validate_function_name(f).map_err(ApiError::InvalidArgument)?
                }
            }
            ReadOp::Task { .. }
            | ReadOp::Functions
            | ReadOp::Workers
            | ReadOp::Stream { .. }
            | ReadOp::Streams
            | ReadOp::Tokens => {}
            ReadOp::Backup { .. } => {
                if consistency == ReadConsistency::Local {
                    return Err(ApiError::InvalidArgument(
                        "a backup is always read from the leader".to_string(),
                    ));
                }
            }
        }
        if consistency == ReadConsistency::Local {
            return Ok(self.read_local(op));
        }
        let (leader, addr) = self.leader().await?;
        if leader == self.0.id {
            return self.read_on_leader(op).await;
        }
        let p = self.peer(leader, &addr).await?;
        match p.forward_read(peer::deadline(self.timeout()), op).await {
            Ok(r) => r,
            Err(e) => {
                self.0.peers.forget(leader).await;
                Err(self.forward_failed(leader, &addr, e))
            }
        }
    }

    async fn read_on_leader(&self, op: ReadOp) -> Result<ReadResult, ApiError> {
        if let ReadOp::Backup {
            export: Some(id),
            offset,
        } = op
        {
            // Later chunks of an export taken after a confirmation: no new round.
            return self
                .0
                .exports
                .chunk(id, offset)
                .map(|c| ReadResult::Backup(Box::new(c)))
                .map_err(ApiError::FailedPrecondition);
        }
        match self.0.read_index.barrier(&self.0.raft).await {
            Ok(_) if matches!(op, ReadOp::Backup { .. }) => self.start_backup().await,
            Ok(_) => Ok(self.read_local(op)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ApiError::NoLeader {
                    leader: f.leader_id,
                    leader_addr: f.leader_node.map(|n| n.addr),
                })
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                tracing::debug!(error = %q, "read refused: no quorum");
                Err(ApiError::NoLeader {
                    leader: None,
                    leader_addr: None,
                })
            }
            Err(RaftError::Fatal(f)) => Err(batcher::fatal_error(&f)),
        }
    }

    /// Exports the applied state (after the caller's leadership confirmation, so it holds
    /// every acknowledged write) and returns the first chunk.
    async fn start_backup(&self) -> Result<ReadResult, ApiError> {
        let store = self.0.store.clone();
        // The storage error is turned into text on the blocking thread: openraft's error type
        // is large, and only its message goes to the client.
        let (covers, bytes) =
            tokio::task::spawn_blocking(move || store.export().map_err(|e| e.to_string()))
                .await
                .map_err(|e| ApiError::Internal(format!("backup export: {e}")))?
                .map_err(|e| ApiError::Internal(format!("backup export: {e}")))?;
        let covers_index = covers.map_or(0, |id| id.index);
        tracing::info!(covers_index, bytes = bytes.len(), "backup exported");
        Ok(ReadResult::Backup(Box::new(
            self.0.exports.start(covers_index, bytes),
        )))
    }

    fn read_local(&self, op: ReadOp) -> ReadResult {
        match op {
            ReadOp::Get { key } => ReadResult::Get(self.0.store.read(|sm| sm.get(&key).cloned())),
            ReadOp::List {
                prefix,
                start_after,
                limit,
            } => ReadResult::List(self.0.store.read(|sm| {
                sm.list(
                    &prefix,
                    start_after.as_deref(),
                    limit.clamp(1, LIST_LIMIT_MAX),
                )
            })),
            ReadOp::Task { id } => ReadResult::Task(
                self.0
                    .store
                    .read(|sm| sm.sched().task(id).cloned().map(Box::new)),
            ),
            ReadOp::Tasks {
                filter,
                after,
                limit,
            } => ReadResult::Tasks(
                self.0
                    .store
                    .read(|sm| sm.sched().list_tasks(&filter, after, limit as usize)),
            ),
            ReadOp::Function { name } => ReadResult::Function(
                self.0
                    .store
                    .read(|sm| sm.sched().function(&name).cloned().map(Box::new)),
            ),
            ReadOp::Functions => ReadResult::Functions(self.0.store.read(|sm| {
                sm.sched()
                    .functions()
                    .map(|f| FunctionRecord {
                        versions: f.latest().cloned().into_iter().collect(),
                        ..f.clone()
                    })
                    .collect()
            })),
            ReadOp::Stream { id } => ReadResult::Stream(
                self.0
                    .store
                    .read(|sm| Node::stream_view(sm, id).map(Box::new)),
            ),
            ReadOp::Streams => ReadResult::Streams(
                self.0
                    .store
                    .read(|sm| sm.sched().streams().cloned().collect()),
            ),
            ReadOp::Backup { export, offset } => {
                // Only reached on a follower's local read, which `read` refuses.
                ReadResult::Backup(Box::new(crate::backup::BackupChunk {
                    export_id: export.unwrap_or(0),
                    covers_index: 0,
                    total_bytes: 0,
                    sha256: String::new(),
                    offset,
                    bytes: Vec::new(),
                }))
            }
            ReadOp::Tokens => ReadResult::Tokens(
                self.0
                    .store
                    .read(|sm| sm.tokens().list().cloned().collect()),
            ),
            ReadOp::Workers => ReadResult::Workers(self.0.store.read(|sm| {
                let s = sm.sched();
                Workers {
                    nodes: s.nodes().cloned().collect(),
                    load: s
                        .nodes()
                        .map(|n| (n.id, u32::try_from(s.load_of(n.id)).unwrap_or(u32::MAX)))
                        .collect(),
                    stats: s.stats(),
                    now_ms: sm.last_time_ms(),
                }
            })),
        }
    }

    async fn admin(&self, op: AdminOp) -> Result<AdminResult, ApiError> {
        let leader = match self.leader().await {
            Ok(l) => Some(l),
            Err(e) if matches!(op, AdminOp::Status) => {
                tracing::debug!(error = %e, "status without a leader");
                None
            }
            Err(e) => return Err(e),
        };
        match leader {
            Some((leader, _)) if leader == self.0.id => self.admin_on_leader(op).await,
            Some((leader, addr)) => {
                let p = self.peer(leader, &addr).await?;
                let mut ctx = peer::deadline(self.timeout());
                if matches!(op, AdminOp::AddNode { .. }) {
                    ctx = peer::deadline(Duration::from_secs(60));
                }
                match p.forward_admin(ctx, op.clone()).await {
                    Ok(r) => r,
                    Err(e) => {
                        self.0.peers.forget(leader).await;
                        if matches!(op, AdminOp::Status) {
                            return Ok(AdminResult::Status(self.status().await));
                        }
                        Err(self.forward_failed(leader, &addr, e))
                    }
                }
            }
            None => Ok(AdminResult::Status(self.status().await)),
        }
    }

    async fn admin_on_leader(&self, op: AdminOp) -> Result<AdminResult, ApiError> {
        let raft = &self.0.raft;
        match op {
            AdminOp::Status => Ok(AdminResult::Status(self.status().await)),
            AdminOp::AddNode { id, addr } => {
                if id == 0 {
                    return Err(ApiError::InvalidArgument("node id 0 is reserved".into()));
                }
                transport::parse_endpoint(&addr).map_err(ApiError::InvalidArgument)?;
                let membership = raft.metrics().borrow().membership_config.clone();
                for (nid, n) in membership.membership().nodes() {
                    if *nid == id {
                        return Err(ApiError::FailedPrecondition(format!(
                            "node {id} is already a member (at {})",
                            n.addr
                        )));
                    }
                    if n.addr == addr {
                        return Err(ApiError::FailedPrecondition(format!(
                            "address {addr} already belongs to node {nid}"
                        )));
                    }
                }
                // The new node must answer as `id` before it joins: this catches a wrong
                // address (including one of this node's own) before the membership changes.
                let probe = self.probe(id, &addr).await.ok_or_else(|| {
                    ApiError::FailedPrecondition(format!("node {id} at {addr} is not reachable"))
                })?;
                if probe.id != id {
                    return Err(ApiError::FailedPrecondition(format!(
                        "{addr} answers as node {}, not node {id}",
                        probe.id
                    )));
                }
                raft.add_learner(id, BasicNode { addr }, true)
                    .await
                    .map_err(batcher::write_error)?;
                let mut voters: std::collections::BTreeSet<NodeId> = raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .collect();
                voters.insert(id);
                raft.change_membership(voters, false)
                    .await
                    .map_err(batcher::write_error)?;
                Ok(AdminResult::Done)
            }
            AdminOp::RemoveNode { id } => {
                let membership = raft.metrics().borrow().membership_config.clone();
                let m = membership.membership();
                if m.get_node(&id).is_none() {
                    return Err(ApiError::NotFound(format!("node {id} is not a member")));
                }
                let is_voter = m.voter_ids().any(|v| v == id);
                if is_voter && m.voter_ids().count() == 1 {
                    return Err(ApiError::FailedPrecondition(format!(
                        "node {id} is the last voter"
                    )));
                }
                let change = if is_voter {
                    ChangeMembers::RemoveVoters([id].into_iter().collect())
                } else {
                    ChangeMembers::RemoveNodes([id].into_iter().collect())
                };
                raft.change_membership(change, false)
                    .await
                    .map_err(batcher::write_error)?;
                if is_voter {
                    // Also forget its address, so it is no longer replicated to.
                    let still_member = raft
                        .metrics()
                        .borrow()
                        .membership_config
                        .membership()
                        .get_node(&id)
                        .is_some();
                    if still_member {
                        raft.change_membership(
                            ChangeMembers::RemoveNodes([id].into_iter().collect()),
                            false,
                        )
                        .await
                        .map_err(batcher::write_error)?;
                    }
                }
                Ok(AdminResult::Done)
            }
        }
    }

    async fn probe(&self, id: NodeId, addr: &str) -> Option<Probe> {
        let p = self.0.peers.get(id, addr).await.ok()?;
        match p.probe(peer::deadline(PROBE_TIMEOUT)).await {
            Ok(probe) => Some(probe),
            Err(_) => {
                self.0.peers.forget(id).await;
                None
            }
        }
    }

    fn own_probe(&self) -> Probe {
        Probe {
            id: self.0.id,
            last_applied: self.0.raft.metrics().borrow().last_applied.map(|l| l.index),
        }
    }

    /// This node's view of the cluster, with every member probed.
    async fn status(&self) -> ClusterStatus {
        let m = self.0.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        let last_log = m.last_log_index.unwrap_or(0);
        let members: Vec<(NodeId, String)> = membership
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let probes = futures::future::join_all(members.iter().map(|(id, addr)| async move {
            if *id == self.0.id {
                Some(self.own_probe())
            } else {
                self.probe(*id, addr).await
            }
        }))
        .await;
        let nodes = members
            .into_iter()
            .zip(probes)
            .map(|((id, addr), probe)| {
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id))
                    .map(|l| l.map(|l| l.index).unwrap_or(0));
                NodeStatus {
                    id,
                    addr,
                    role: if voters.contains(&id) {
                        MemberRole::Voter
                    } else {
                        MemberRole::Learner
                    },
                    reachable: probe.is_some(),
                    matched,
                    lag: matched.map(|x| last_log.saturating_sub(x)),
                    last_applied: probe.and_then(|p| p.last_applied),
                }
            })
            .collect();
        ClusterStatus {
            answered_by: self.0.id,
            leader: m.current_leader,
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log,
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            nodes,
        }
    }

    /// Initializes the cluster with `members` and makes `admin_secret` its first admin
    /// token.
    ///
    /// A caller needs no token, so everything here is bounded before the node does any work
    /// for it: an initialized node answers from its own state, without dialing anyone (it
    /// succeeds only for a retry of the call that made the first token — same secret — or on
    /// a cluster initialized without one); a fresh node takes at most [`INIT_MEMBERS_MAX`]
    /// members and probes them at once, on connections of their own (never the peer pool's),
    /// for at most [`INIT_PROBE_TIMEOUT`] in all.
    async fn init(
        &self,
        members: BTreeMap<NodeId, String>,
        admin_secret: &str,
    ) -> Result<TokenInfo, ApiError> {
        validate_secret(admin_secret)
            .map_err(|e| ApiError::InvalidArgument(format!("admin token: {e}")))?;
        let hash = token_hash(admin_secret);
        let initialized = self
            .0
            .raft
            .is_initialized()
            .await
            .map_err(|f| batcher::fatal_error(&f))?;
        if initialized {
            return self.bootstrap(hash, false).await;
        }
        if members.len() > INIT_MEMBERS_MAX {
            return Err(ApiError::InvalidArgument(format!(
                "{} members; a cluster starts with at most {INIT_MEMBERS_MAX} \
                 (add more with `cluster add-node`)",
                members.len()
            )));
        }
        if members.is_empty() {
            return Err(ApiError::InvalidArgument("no members given".into()));
        }
        if !members.contains_key(&self.0.id) {
            return Err(ApiError::InvalidArgument(format!(
                "the members must include the node receiving the request (node {})",
                self.0.id
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (id, addr) in &members {
            if *id == 0 {
                return Err(ApiError::InvalidArgument("node id 0 is reserved".into()));
            }
            transport::parse_endpoint(addr).map_err(ApiError::InvalidArgument)?;
            if !seen.insert(addr.clone()) {
                return Err(ApiError::InvalidArgument(format!(
                    "address {addr} is listed twice"
                )));
            }
        }
        // Each other member must answer as the id it is listed under.
        let deadline = tokio::time::Instant::now() + INIT_PROBE_TIMEOUT;
        let others = members.iter().filter(|(id, _)| **id != self.0.id);
        let probes = futures::future::join_all(others.map(|(id, addr)| async move {
            let probe = tokio::time::timeout_at(deadline, async {
                let c = self.0.peers.connect_unpooled(*id, addr).await.ok()?;
                c.probe(peer::deadline(PROBE_TIMEOUT)).await.ok()
            })
            .await;
            (*id, addr, probe.ok().flatten())
        }))
        .await;
        for (id, addr, probe) in probes {
            match probe {
                Some(p) if p.id == id => {}
                Some(p) => {
                    return Err(ApiError::InvalidArgument(format!(
                        "{addr} answers as node {}, not node {id}",
                        p.id
                    )))
                }
                None => {
                    return Err(ApiError::FailedPrecondition(format!(
                        "node {id} at {addr} is not reachable"
                    )))
                }
            }
        }
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .into_iter()
            .map(|(id, addr)| (id, BasicNode { addr }))
            .collect();
        let fresh = match self.0.raft.initialize(nodes).await {
            Ok(()) => true,
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => false,
            Err(RaftError::APIError(InitializeError::NotInMembers(e))) => {
                return Err(ApiError::InvalidArgument(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => return Err(batcher::fatal_error(&f)),
        };
        self.bootstrap(hash, fresh).await
    }

    /// Makes the first admin token (of hash `hash`) on a cluster just initialized (`fresh`)
    /// or already initialized.
    async fn bootstrap(&self, hash: String, fresh: bool) -> Result<TokenInfo, ApiError> {
        // An initialized cluster that already has other tokens refuses here, from this
        // node's applied state, so that a caller without a token cannot make log entries.
        // (A node behind on its log falls through; the log's answer is the same.)
        let refused_here = !fresh
            && self.0.store.read(|sm| {
                let tokens = sm.tokens();
                !tokens.is_empty() && tokens.by_hash(&hash).is_none()
            });
        if refused_here {
            return Err(ApiError::FailedPrecondition(
                "the cluster is already initialized".into(),
            ));
        }
        let bootstrap = Command::TokenCreate {
            role: Role::Admin,
            name: Some("bootstrap".into()),
            hash,
            bootstrap: true,
        };
        // The first leader is being elected: retry while there is none, within the bound.
        let deadline = tokio::time::Instant::now() + INIT_BOOTSTRAP_WAIT;
        let result = loop {
            let command = ClientCommand {
                request_id: node_request_id(),
                command: bootstrap.clone(),
            };
            match self.write(Principal::Node, vec![command]).await {
                Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "bootstrap token: waiting for a leader");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other?,
            }
        };
        match result.as_slice() {
            [CommandResult::TokenCreated { token }] => {
                tracing::info!(
                    token = token.id,
                    fresh,
                    "cluster initialized with its first admin token"
                );
                Ok(token.clone())
            }
            [CommandResult::Rejected { .. }] => Err(ApiError::FailedPrecondition(
                "the cluster is already initialized".into(),
            )),
            other => Err(ApiError::Internal(format!(
                "the bootstrap token was answered with {other:?}"
            ))),
        }
    }

    /// Makes a token: draws its secret here, so that only the hash enters the log.
    pub(crate) async fn token_create(
        &self,
        role: Role,
        name: Option<String>,
    ) -> Result<CreatedToken, ApiError> {
        if let Some(name) = &name {
            validate_token_name(name).map_err(ApiError::InvalidArgument)?;
        }
        let secret = skiff_client::client::new_token_secret();
        // A fresh request id per call, not the client's: a retried call draws a new secret,
        // and an id of the first attempt would answer with the first attempt's token, whose
        // secret this call does not hold.
        let command = ClientCommand {
            request_id: node_request_id(),
            command: Command::TokenCreate {
                role,
                name,
                hash: token_hash(&secret),
                bootstrap: false,
            },
        };
        match self.write(Principal::Node, vec![command]).await?.as_slice() {
            [CommandResult::TokenCreated { token }] => {
                tracing::info!(token = token.id, role = %token.role, "token created");
                Ok(CreatedToken {
                    token: token.clone(),
                    secret,
                })
            }
            [CommandResult::Rejected { reason }] => {
                Err(ApiError::FailedPrecondition(reason.clone()))
            }
            other => Err(ApiError::Internal(format!(
                "a token create was answered with {other:?}"
            ))),
        }
    }

    /// Revokes a token (idempotent under the client's request id).
    pub(crate) async fn token_revoke(
        &self,
        principal: Principal,
        request_id: RequestId,
        id: TokenId,
    ) -> Result<TokenInfo, ApiError> {
        let command = ClientCommand {
            request_id,
            command: Command::TokenRevoke { id },
        };
        match self.write(principal, vec![command]).await?.as_slice() {
            [CommandResult::TokenRevoked { token }] => {
                tracing::info!(token = token.id, "token revoked");
                Ok(token.clone())
            }
            [CommandResult::NotFound] => Err(ApiError::NotFound(format!("token {id}"))),
            [CommandResult::Rejected { reason }] => {
                Err(ApiError::FailedPrecondition(reason.clone()))
            }
            other => Err(ApiError::Internal(format!(
                "a token revoke was answered with {other:?}"
            ))),
        }
    }

    fn check_target(&self, target: NodeId) -> Result<(), PeerRefusal> {
        if target != self.0.id {
            return Err(PeerRefusal::WrongNode {
                expected: target,
                actual: self.0.id,
            });
        }
        Ok(())
    }
}

/// Every call first checks the connection's token ([`Session::allow`]); the role each call
/// needs is the table in docs/security.md.
/// The `rejected_inputs` reason of a refused client call, if it is a refusal of the input (not
/// of the moment: overload, no leader and timeouts are counted elsewhere or not at all).
fn refusal_reason(e: &ApiError) -> Option<&'static str> {
    match e {
        ApiError::InvalidArgument(_) => Some("invalid_argument"),
        ApiError::Unauthenticated(_) => Some("unauthenticated"),
        ApiError::PermissionDenied(_) => Some("permission_denied"),
        _ => None,
    }
}

impl Session {
    /// Every client call's answer passes here: a refused input is counted once, on the node
    /// that answered, whichever check refused it.
    fn counted<T>(&self, answer: Result<T, ApiError>) -> Result<T, ApiError> {
        if let Err(Some(reason)) = answer.as_ref().map_err(refusal_reason) {
            self.0.metrics.rejected(reason);
        }
        answer
    }
}

impl ClientApi for Session {
    async fn write(
        self,
        _: Context,
        commands: skiff_client::api::Commands,
    ) -> Result<Vec<CommandResult>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let commands = commands.into_inner();
                let token = self.allow_write(&commands).await?;
                self.client_commands_only(&commands)?;
                Node::write(&self, Principal::Token(token.id), commands).await
            }
            .await,
        )
    }

    async fn kv_get(
        self,
        _: Context,
        key: String,
        read: ReadConsistency,
    ) -> Result<Option<KvEntry>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Invoker, "reading a key").await?;
                match self.read(ReadOp::Get { key }, read).await? {
                    ReadResult::Get(e) => Ok(e),
                    _ => Err(ApiError::Internal(
                        "a get was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn kv_list(
        self,
        _: Context,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
        read: ReadConsistency,
    ) -> Result<KvPage, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Invoker, "listing keys").await?;
                match self
                    .read(
                        ReadOp::List {
                            prefix,
                            start_after,
                            limit,
                        },
                        read,
                    )
                    .await?
                {
                    ReadResult::List(p) => Ok(p),
                    _ => Err(ApiError::Internal(
                        "a list was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn cluster_init(
        self,
        _: Context,
        members: BTreeMap<NodeId, String>,
        admin_token: String,
    ) -> Result<TokenInfo, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                // No token needed: on a fresh cluster there is none yet. Once the cluster has
                // tokens the bootstrap inside is refused, so this gives nothing away.
                self.init(members, &admin_token).await
            }
            .await,
        )
    }

    async fn cluster_add_node(self, _: Context, id: NodeId, addr: String) -> Result<(), ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Admin, "adding a node").await?;
                self.admin(AdminOp::AddNode { id, addr }).await.map(|_| ())
            }
            .await,
        )
    }

    async fn cluster_remove_node(self, _: Context, id: NodeId) -> Result<(), ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Admin, "removing a node").await?;
                self.admin(AdminOp::RemoveNode { id }).await.map(|_| ())
            }
            .await,
        )
    }

    async fn cluster_status(self, _: Context) -> Result<ClusterStatus, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Invoker, "cluster status").await?;
                match self.admin(AdminOp::Status).await? {
                    AdminResult::Status(s) => Ok(s),
                    AdminResult::Done => Err(ApiError::Internal(
                        "status answered without a status".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn invoke(self, _: Context, req: InvokeRequest) -> Result<Task, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self.allow(Role::Invoker, "invoking a function").await?;
                Node::invoke(&self, Principal::Token(token.id), req).await
            }
            .await,
        )
    }

    async fn task_get(
        self,
        _: Context,
        id: TaskId,
        read: ReadConsistency,
    ) -> Result<Option<Task>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Invoker, "reading a task").await?;
                match self.read(ReadOp::Task { id }, read).await? {
                    ReadResult::Task(t) => Ok(t.map(|t| *t)),
                    _ => Err(ApiError::Internal(
                        "a task read was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn task_list(
        self,
        _: Context,
        filter: TaskFilter,
        after: TaskId,
        limit: u32,
        read: ReadConsistency,
    ) -> Result<Vec<Task>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Invoker, "listing tasks").await?;
                let op = ReadOp::Tasks {
                    filter,
                    after,
                    limit,
                };
                match self.read(op, read).await? {
                    ReadResult::Tasks(t) => Ok(t),
                    _ => Err(ApiError::Internal(
                        "a task list was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn fn_get(
        self,
        _: Context,
        name: String,
        read: ReadConsistency,
    ) -> Result<Option<FunctionRecord>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self.allow(Role::Invoker, "reading a function").await?;
                match self.read(ReadOp::Function { name }, read).await? {
                    ReadResult::Function(f) => Ok(f.map(|f| crate::auth::function_for(&token, *f))),
                    _ => Err(ApiError::Internal(
                        "a function read was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn fn_list(
        self,
        _: Context,
        read: ReadConsistency,
    ) -> Result<Vec<FunctionRecord>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self.allow(Role::Invoker, "listing functions").await?;
                match self.read(ReadOp::Functions, read).await? {
                    ReadResult::Functions(f) => Ok(f
                        .into_iter()
                        .map(|f| crate::auth::function_for(&token, f))
                        .collect()),
                    _ => Err(ApiError::Internal(
                        "a function list was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn stream_start(
        self,
        _: Context,
        request_id: RequestId,
        req: StreamStartRequest,
    ) -> Result<StreamId, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self.allow(Role::Deployer, "starting a stream").await?;
                let op = StreamOp::Start { request_id, req };
                match self.stream_op(Principal::Token(token.id), op).await? {
                    StreamReply::Started(id) => Ok(id),
                    other => Err(ApiError::Internal(format!(
                        "a stream start was answered with {other:?}"
                    ))),
                }
            }
            .await,
        )
    }

    async fn stream_get(
        self,
        _: Context,
        id: StreamId,
        read: ReadConsistency,
    ) -> Result<Option<StreamJob>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Invoker, "reading a stream").await?;
                Node::stream_get(&self, id, read).await
            }
            .await,
        )
    }

    async fn stream_list(
        self,
        _: Context,
        read: ReadConsistency,
    ) -> Result<Vec<StreamJob>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Invoker, "listing streams").await?;
                Node::stream_list(&self, read).await
            }
            .await,
        )
    }

    async fn stream_cancel(
        self,
        _: Context,
        request_id: RequestId,
        id: StreamId,
    ) -> Result<(), ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self.allow(Role::Deployer, "cancelling a stream").await?;
                let op = StreamOp::Cancel { request_id, id };
                self.stream_op(Principal::Token(token.id), op)
                    .await
                    .map(|_| ())
            }
            .await,
        )
    }

    async fn stream_redrive(
        self,
        _: Context,
        request_id: RequestId,
        id: StreamId,
    ) -> Result<u64, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self.allow(Role::Deployer, "redriving a stream").await?;
                let op = StreamOp::Redrive { request_id, id };
                match self.stream_op(Principal::Token(token.id), op).await? {
                    StreamReply::Redriven(n) => Ok(n),
                    other => Err(ApiError::Internal(format!(
                        "a stream redrive was answered with {other:?}"
                    ))),
                }
            }
            .await,
        )
    }

    async fn backup_chunk(
        self,
        _: Context,
        export: Option<u64>,
        offset: u64,
    ) -> Result<BackupChunk, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                // The whole state, token hashes included: admins only.
                self.allow(Role::Admin, "a backup").await?;
                let op = ReadOp::Backup { export, offset };
                match self.read(op, ReadConsistency::Linearizable).await? {
                    ReadResult::Backup(chunk) => Ok(*chunk),
                    _ => Err(ApiError::Internal(
                        "a backup read was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn workers(self, _: Context, read: ReadConsistency) -> Result<Workers, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Invoker, "reading the workers").await?;
                match self.read(ReadOp::Workers, read).await? {
                    ReadResult::Workers(w) => Ok(w),
                    _ => Err(ApiError::Internal(
                        "a workers read was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn token_create(
        self,
        _: Context,
        role: Role,
        name: Option<String>,
    ) -> Result<CreatedToken, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Admin, "creating a token").await?;
                Node::token_create(&self, role, name).await
            }
            .await,
        )
    }

    async fn token_list(
        self,
        _: Context,
        read: ReadConsistency,
    ) -> Result<Vec<TokenInfo>, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                self.allow(Role::Admin, "listing tokens").await?;
                match self.read(ReadOp::Tokens, read).await? {
                    ReadResult::Tokens(t) => Ok(t),
                    _ => Err(ApiError::Internal(
                        "a token list was answered with another read".into(),
                    )),
                }
            }
            .await,
        )
    }

    async fn token_revoke(
        self,
        _: Context,
        request_id: RequestId,
        id: TokenId,
    ) -> Result<TokenInfo, ApiError> {
        let counter = self.clone();
        counter.counted(
            async move {
                let token = self.allow(Role::Admin, "revoking a token").await?;
                Node::token_revoke(&self, Principal::Token(token.id), request_id, id).await
            }
            .await,
        )
    }
}

impl PeerApi for Node {
    async fn append(
        self,
        _: Context,
        target: NodeId,
        req: openraft::raft::AppendEntriesRequest<skiff_raft_store::types::TypeConfig>,
    ) -> Result<Result<openraft::raft::AppendEntriesResponse<NodeId>, RaftError<NodeId>>, PeerRefusal>
    {
        self.check_target(target)?;
        Ok(self.0.raft.append_entries(req).await)
    }

    async fn vote(
        self,
        _: Context,
        target: NodeId,
        req: openraft::raft::VoteRequest<NodeId>,
    ) -> Result<Result<openraft::raft::VoteResponse<NodeId>, RaftError<NodeId>>, PeerRefusal> {
        self.check_target(target)?;
        Ok(self.0.raft.vote(req).await)
    }

    async fn snapshot(
        self,
        _: Context,
        target: NodeId,
        req: openraft::raft::InstallSnapshotRequest<skiff_raft_store::types::TypeConfig>,
    ) -> Result<
        Result<
            openraft::raft::InstallSnapshotResponse<NodeId>,
            RaftError<NodeId, openraft::error::InstallSnapshotError>,
        >,
        PeerRefusal,
    > {
        self.check_target(target)?;
        Ok(self.0.raft.install_snapshot(req).await)
    }

    async fn forward_write(
        self,
        _: Context,
        principal: Principal,
        commands: Vec<ClientCommand>,
    ) -> Result<Vec<CommandResult>, ApiError> {
        self.validate(&commands)?;
        // Forwarding goes one hop only: a node that is no longer the leader answers with a
        // hint instead of forwarding again, so requests cannot loop.
        if self.0.raft.current_leader().await != Some(self.0.id) {
            return Err(self.not_leader_hint());
        }
        self.0.batcher.submit(principal, commands).await
    }

    async fn forward_read(self, _: Context, op: ReadOp) -> Result<ReadResult, ApiError> {
        if self.0.raft.current_leader().await != Some(self.0.id) {
            return Err(self.not_leader_hint());
        }
        self.read_on_leader(op).await
    }

    async fn forward_admin(self, _: Context, op: AdminOp) -> Result<AdminResult, ApiError> {
        if self.0.raft.current_leader().await != Some(self.0.id) {
            return Err(self.not_leader_hint());
        }
        self.admin_on_leader(op).await
    }

    async fn probe(self, _: Context) -> Probe {
        self.own_probe()
    }

    async fn campaign(self, _: Context, target: NodeId) -> Result<(), PeerRefusal> {
        self.check_target(target)?;
        if self.stopping() {
            return Err(PeerRefusal::ShuttingDown);
        }
        tracing::info!(
            id = self.0.id,
            "asked to campaign: the leader is handing over"
        );
        self.0
            .raft
            .trigger()
            .elect()
            .await
            .map_err(|_| PeerRefusal::ShuttingDown)
    }

    async fn forward_invoke(
        self,
        _: Context,
        principal: Principal,
        req: InvokeRequest,
    ) -> Result<Task, ApiError> {
        if self.0.raft.current_leader().await != Some(self.0.id) {
            return Err(self.not_leader_hint());
        }
        self.invoke_on_leader(principal, req).await
    }

    async fn forward_stream(
        self,
        _: Context,
        principal: Principal,
        op: StreamOp,
    ) -> Result<StreamReply, ApiError> {
        if self.0.raft.current_leader().await != Some(self.0.id) {
            return Err(self.not_leader_hint());
        }
        self.stream_op_on_leader(principal, op).await
    }

    async fn dispatch(
        self,
        _: Context,
        target: NodeId,
        task: Task,
        function: FunctionVersion,
    ) -> Result<(), PeerRefusal> {
        self.check_target(target)?;
        if task.node == Some(self.0.id) && self.0.worker_enabled() {
            tokio::spawn(crate::worker::run_task(self.clone(), task, function));
        }
        Ok(())
    }
}

/// A request id for a command the node itself makes on a client's behalf: random, so that it
/// meets no client's.
fn node_request_id() -> RequestId {
    RequestId {
        client: rand::random(),
        seq: 1,
    }
}

impl Node {
    fn not_leader_hint(&self) -> ApiError {
        let m = self.0.raft.metrics().borrow().clone();
        let addr = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
        });
        ApiError::NoLeader {
            leader: m.current_leader.filter(|_| m.state != ServerState::Leader),
            leader_addr: addr.filter(|_| m.state != ServerState::Leader),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stopped_raft_core_is_noticed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let overrides = crate::config::Overrides {
            id: Some(1),
            listen: Some("127.0.0.1:1".into()),
            data_dir: Some(dir.path().join("data")),
            insecure_plaintext: Some(true),
            ..Default::default()
        };
        let mut config = NodeConfig::load(None, overrides).expect("config");
        config.worker.enabled = false;
        let node = start(config).await.expect("start");
        let raft = node.0.raft.clone();
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
}
