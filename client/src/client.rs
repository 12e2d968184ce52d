//! The typed async client: talks to any node, follows the leader, retries a bounded number of
//! times with back-off, and gives every write a request id so that a retried write is applied
//! once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tarpc::client::RpcError;
use tarpc::context;
use tokio::sync::Mutex;

use crate::api::{
    ApiError, ClientApiClient, ClientCommand, ClusterStatus, Command, CommandResult, KvEntry,
    KvPage, NodeId, ReadConsistency, RequestId, CLIENT_FRAME_BYTES_MAX,
};
use crate::transport::{self, Service};
use skiff_raft_store::model::InvalidCommand;

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given (use --endpoints or SKIFF_ENDPOINTS)")]
    NoEndpoints,
    #[error("invalid endpoint: {0}")]
    InvalidEndpoint(String),
    #[error("could not reach the cluster at {endpoints} after {attempts} attempts: {last}")]
    Unreachable {
        endpoints: String,
        attempts: u32,
        last: String,
    },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("version conflict on {key:?}: its current version is {current}")]
    Conflict { key: String, current: u64 },
    #[error("key {key:?} not found")]
    NotFound { key: String },
    #[error("invalid command: {0}")]
    Invalid(#[from] InvalidCommand),
    #[error("unexpected answer from the cluster: {0}")]
    Protocol(String),
}

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of any nodes of the cluster.
    pub endpoints: Vec<String>,
    /// Attempts per call, including the first.
    pub attempts_max: u32,
    /// First pause between attempts; doubles each time up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Deadline of one attempt.
    pub rpc_timeout: Duration,
}

impl ClientConfig {
    pub fn new(endpoints: Vec<String>) -> ClientConfig {
        ClientConfig {
            endpoints,
            attempts_max: 8,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            rpc_timeout: Duration::from_secs(10),
        }
    }
}

/// A connection-managing client of a skiff cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    /// Known endpoints: the configured ones, plus leaders learned from hints.
    endpoints: Mutex<Vec<Endpoint>>,
    /// Index into `endpoints` of the node to try first.
    preferred: AtomicUsize,
    client_id: u64,
    seq: AtomicU64,
}

struct Endpoint {
    addr: String,
    conn: Option<ClientApiClient>,
}

/// Most endpoints a client remembers (configured plus learned), so hints cannot grow it.
const ENDPOINTS_MAX: usize = 64;

impl Client {
    /// Builds a client. Endpoints are checked here; connections open lazily.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        for e in &config.endpoints {
            transport::parse_endpoint(e).map_err(ClientError::InvalidEndpoint)?;
        }
        let endpoints = config
            .endpoints
            .iter()
            .take(ENDPOINTS_MAX)
            .map(|addr| Endpoint {
                addr: addr.clone(),
                conn: None,
            })
            .collect();
        Ok(Client {
            inner: Arc::new(Inner {
                config,
                endpoints: Mutex::new(endpoints),
                preferred: AtomicUsize::new(0),
                client_id: rand::random(),
                seq: AtomicU64::new(1),
            }),
        })
    }

    /// Parses a comma-separated endpoint list, as `SKIFF_ENDPOINTS` holds it.
    pub fn from_endpoint_list(list: &str) -> Result<Client, ClientError> {
        let endpoints: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        Client::new(ClientConfig::new(endpoints))
    }

    /// A fresh request id for one write.
    pub fn next_request_id(&self) -> RequestId {
        RequestId {
            client: self.inner.client_id,
            seq: self.inner.seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Applies commands as one group; each gets its own request id. Retries keep the ids, so
    /// a command is applied at most once even if an attempt's answer was lost.
    pub async fn execute(&self, commands: Vec<Command>) -> Result<Vec<CommandResult>, ClientError> {
        for c in &commands {
            c.validate()?;
        }
        let commands: Vec<ClientCommand> = commands
            .into_iter()
            .map(|command| ClientCommand {
                request_id: self.next_request_id(),
                command,
            })
            .collect();
        let n = commands.len();
        let results = self
            .call(|c, ctx| {
                let commands = commands.clone();
                async move { c.write(ctx, commands).await }
            })
            .await?;
        if results.len() != n {
            return Err(ClientError::Protocol(format!(
                "{} results for {n} commands",
                results.len()
            )));
        }
        Ok(results)
    }

    async fn execute_one(&self, command: Command) -> Result<CommandResult, ClientError> {
        let mut results = self.execute(vec![command]).await?;
        results
            .pop()
            .ok_or_else(|| ClientError::Protocol("no result".into()))
    }

    /// Writes `value` under `key`; returns the new version.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, ClientError> {
        self.put_if(key, value, None).await
    }

    /// Writes `value` under `key` only if its version is `expect_version` (`Some(0)`: absent).
    pub async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expect_version: Option<u64>,
    ) -> Result<u64, ClientError> {
        let result = self
            .execute_one(Command::KvPut {
                key: key.to_string(),
                value,
                expect_version,
            })
            .await?;
        match result {
            CommandResult::Put { version } => Ok(version),
            other => Err(unexpected(key, other)),
        }
    }

    /// Deletes `key`; returns the version it had.
    pub async fn delete(&self, key: &str, expect_version: Option<u64>) -> Result<u64, ClientError> {
        let result = self
            .execute_one(Command::KvDelete {
                key: key.to_string(),
                expect_version,
            })
            .await?;
        match result {
            CommandResult::Deleted { version } => Ok(version),
            other => Err(unexpected(key, other)),
        }
    }

    /// Reads `key` (linearizable).
    pub async fn get(&self, key: &str) -> Result<Option<KvEntry>, ClientError> {
        self.get_with(key, ReadConsistency::Linearizable).await
    }

    pub async fn get_with(
        &self,
        key: &str,
        read: ReadConsistency,
    ) -> Result<Option<KvEntry>, ClientError> {
        skiff_raft_store::model::validate_key(key)?;
        let key = key.to_string();
        self.call(|c, ctx| {
            let key = key.clone();
            async move { c.kv_get(ctx, key, read).await }
        })
        .await
    }

    /// One page of keys under `prefix` (linearizable).
    pub async fn list(
        &self,
        prefix: &str,
        start_after: Option<String>,
        limit: u32,
    ) -> Result<KvPage, ClientError> {
        let prefix = prefix.to_string();
        self.call(|c, ctx| {
            let prefix = prefix.clone();
            let start_after = start_after.clone();
            async move {
                c.kv_list(
                    ctx,
                    prefix,
                    start_after,
                    limit,
                    ReadConsistency::Linearizable,
                )
                .await
            }
        })
        .await
    }

    /// Every key under `prefix`, page by page, up to `max_entries`.
    pub async fn list_all(
        &self,
        prefix: &str,
        max_entries: usize,
    ) -> Result<Vec<KvEntry>, ClientError> {
        let mut out = Vec::new();
        let mut start_after = None;
        loop {
            let page = self
                .list(prefix, start_after, skiff_raft_store::model::LIST_LIMIT_MAX)
                .await?;
            out.extend(page.entries);
            if out.len() >= max_entries {
                out.truncate(max_entries);
                return Ok(out);
            }
            match page.next {
                Some(next) => start_after = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// Initializes a new cluster. Only the first call on a fresh cluster succeeds.
    pub async fn cluster_init(&self, members: BTreeMap<NodeId, String>) -> Result<(), ClientError> {
        for addr in members.values() {
            transport::parse_endpoint(addr).map_err(ClientError::InvalidEndpoint)?;
        }
        self.call(|c, ctx| {
            let members = members.clone();
            async move { c.cluster_init(ctx, members).await }
        })
        .await
    }

    pub async fn cluster_add_node(&self, id: NodeId, addr: &str) -> Result<(), ClientError> {
        transport::parse_endpoint(addr).map_err(ClientError::InvalidEndpoint)?;
        let addr = addr.to_string();
        self.call(|c, mut ctx| {
            let addr = addr.clone();
            // Adding waits for the learner to catch up, which can take longer than a write.
            ctx.deadline = Instant::now() + Duration::from_secs(60);
            async move { c.cluster_add_node(ctx, id, addr).await }
        })
        .await
    }

    pub async fn cluster_remove_node(&self, id: NodeId) -> Result<(), ClientError> {
        self.call(|c, ctx| async move { c.cluster_remove_node(ctx, id).await })
            .await
    }

    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        self.call(|c, ctx| async move { c.cluster_status(ctx).await })
            .await
    }

    /// Runs one RPC with bounded retries: a transport failure moves to the next endpoint; a
    /// retryable [`ApiError`] waits and tries again, following a leader hint if there is one.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(ClientApiClient, context::Context) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, ApiError>, RpcError>>,
    {
        let cfg = &self.inner.config;
        let mut backoff = cfg.backoff_initial;
        let mut last = String::from("no attempt made");
        for attempt in 1..=cfg.attempts_max {
            let idx = self.inner.preferred.load(Ordering::Relaxed);
            let (idx, conn) = match self.connection(idx).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    self.rotate(idx).await;
                    if attempt < cfg.attempts_max {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(cfg.backoff_max);
                    }
                    continue;
                }
            };
            let mut ctx = context::current();
            ctx.deadline = Instant::now() + cfg.rpc_timeout;
            match f(conn, ctx).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if e.is_retryable() && attempt < cfg.attempts_max => {
                    last = e.to_string();
                    if let ApiError::NoLeader {
                        leader_addr: Some(addr),
                        ..
                    } = &e
                    {
                        self.prefer(addr).await;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(cfg.backoff_max);
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => {
                    last = format!("{}: {e}", self.addr_of(idx).await);
                    self.drop_connection(idx).await;
                    self.rotate(idx).await;
                    if attempt < cfg.attempts_max {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(cfg.backoff_max);
                    }
                }
            }
        }
        Err(ClientError::Unreachable {
            endpoints: cfg.endpoints.join(","),
            attempts: cfg.attempts_max,
            last,
        })
    }

    async fn connection(&self, idx: usize) -> Result<(usize, ClientApiClient), String> {
        let mut eps = self.inner.endpoints.lock().await;
        let idx = idx % eps.len();
        let ep = &mut eps[idx];
        if let Some(conn) = &ep.conn {
            return Ok((idx, conn.clone()));
        }
        let stream = transport::dial(&ep.addr, Service::Client)
            .await
            .map_err(|e| format!("{}: {e}", ep.addr))?;
        let transport = transport::framed(stream, CLIENT_FRAME_BYTES_MAX);
        let conn = ClientApiClient::new(tarpc::client::Config::default(), transport).spawn();
        ep.conn = Some(conn.clone());
        Ok((idx, conn))
    }

    async fn addr_of(&self, idx: usize) -> String {
        let eps = self.inner.endpoints.lock().await;
        eps[idx % eps.len()].addr.clone()
    }

    async fn drop_connection(&self, idx: usize) {
        let mut eps = self.inner.endpoints.lock().await;
        let n = eps.len();
        eps[idx % n].conn = None;
    }

    async fn rotate(&self, failed: usize) {
        let n = self.inner.endpoints.lock().await.len();
        let _ = self.inner.preferred.compare_exchange(
            failed,
            (failed + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Makes `addr` the first endpoint tried, remembering it if it is new.
    async fn prefer(&self, addr: &str) {
        if transport::parse_endpoint(addr).is_err() {
            return;
        }
        let mut eps = self.inner.endpoints.lock().await;
        let idx = match eps.iter().position(|e| e.addr == addr) {
            Some(i) => i,
            None if eps.len() < ENDPOINTS_MAX => {
                eps.push(Endpoint {
                    addr: addr.to_string(),
                    conn: None,
                });
                eps.len() - 1
            }
            None => return,
        };
        self.inner.preferred.store(idx, Ordering::Relaxed);
    }
}

fn unexpected(key: &str, result: CommandResult) -> ClientError {
    match result {
        CommandResult::Conflict { current } => ClientError::Conflict {
            key: key.to_string(),
            current,
        },
        CommandResult::NotFound => ClientError::NotFound {
            key: key.to_string(),
        },
        CommandResult::Invalid(e) => ClientError::Invalid(e),
        other => ClientError::Protocol(format!("unexpected result {other:?}")),
    }
}
