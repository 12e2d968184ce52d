//! The typed async client: talks to any node, follows the leader, retries a bounded number of
//! times with back-off, and gives every write a request id so that a retried write is applied
//! once.
//!
//! Invariants:
//! - every call is bounded: at most `attempts_max` attempts, each with a deadline;
//! - a retried write or invocation carries the request id of its first attempt, so the
//!   cluster applies it once; an invocation is retried only while the cluster still remembers
//!   that id ([`INVOKE_RETRY_WINDOW`] inside the deduplication window), so a retry can never
//!   start a second task;
//! - a code upload holds at most [`UPLOAD_CHUNKS_IN_FLIGHT`] chunks in flight, one command
//!   (one log entry's worth) per chunk.
//!
//! This file holds the typed operations; `call.rs` holds how one call reaches a node (the
//! endpoints, their connections and the bounded retry loop).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::api::{
    ApiError, ClientCommand, ClusterStatus, Command, CommandResult, CreatedToken, FunctionRecord,
    FunctionSpec, InvokeRequest, KvEntry, KvPage, NodeId, ReadConsistency, RequestId, Role,
    StreamId, StreamJob, StreamOptions, StreamSource, StreamStartRequest, Task, TaskFilter, TaskId,
    TokenId, TokenInfo, Workers,
};
use crate::transport;
use skiff_proto::functions::{
    chunk_count, validate_function_name, CODE_BYTES_MAX, CODE_CHUNK_BYTES, PAYLOAD_BYTES_MAX,
    TIMEOUT_MS_MAX,
};
use skiff_proto::model::{InvalidCommand, DEDUP_WINDOW_MS};
use skiff_proto::tokens::new_token_secret;

use call::{Endpoint, ENDPOINTS_MAX};

mod call;

/// How many times [`Client::backup`] starts a backup that was interrupted.
pub const BACKUP_ATTEMPTS_MAX: u32 = 3;
/// The largest backup [`Client::backup`] accepts (the cluster's bound on its whole state).
pub const BACKUP_BYTES_MAX: u64 = 2 << 30;

/// A downloaded, checked backup (see [`Client::backup`]).
#[derive(Debug, Clone)]
pub struct Backup {
    /// The log index the state covers.
    pub covers_index: u64,
    /// SHA-256 of `bytes`, hex.
    pub sha256: String,
    pub bytes: Vec<u8>,
}

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given (use --endpoints or SKIFF_ENDPOINTS)")]
    NoEndpoints,
    #[error("invalid endpoint: {0}")]
    InvalidEndpoint(String),
    #[error("invalid token (check --token or SKIFF_TOKEN): {0}")]
    InvalidToken(String),
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
    #[error("function {name:?} not found")]
    FunctionNotFound { name: String },
    /// The cluster refused a well-formed command because of its state (code not uploaded,
    /// a bound reached, an upload that did not match its digest). Nothing changed.
    #[error("refused by the cluster: {reason}")]
    Rejected { reason: String },
    #[error("code archive of {bytes} bytes: it must be 1 byte to {max} bytes")]
    CodeSize { bytes: u64, max: u64 },
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
    /// The bearer token presented on every connection (`None`: none; only `cluster_init`
    /// works without one).
    pub token: Option<String>,
    /// TLS to the nodes, checked against the cluster CA (`None`: plaintext, for a cluster
    /// configured without TLS).
    pub tls: Option<crate::tls::TlsConnector>,
}

impl ClientConfig {
    pub fn new(endpoints: Vec<String>) -> ClientConfig {
        ClientConfig {
            endpoints,
            attempts_max: 8,
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            rpc_timeout: Duration::from_secs(10),
            token: None,
            tls: None,
        }
    }

    /// Parses a comma-separated endpoint list, as `SKIFF_ENDPOINTS` holds it.
    pub fn from_endpoint_list(list: &str) -> ClientConfig {
        let endpoints: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        ClientConfig::new(endpoints)
    }

    /// The same settings over TLS, trusting the cluster CA certificate in `ca` (PEM).
    pub fn with_ca(mut self, ca: &std::path::Path) -> Result<ClientConfig, crate::tls::TlsError> {
        self.tls = Some(crate::tls::TlsConnector::client(ca)?);
        Ok(self)
    }

    /// The same settings presenting `token`.
    pub fn with_token(mut self, token: impl Into<String>) -> ClientConfig {
        self.token = Some(token.into());
        self
    }
}

/// Inputs of an idempotent function's invocation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvokeOptions {
    /// Replaces the payload hash in the ledger key.
    pub idempotency_key: Option<String>,
    /// Caller-supplied version tokens (name, value).
    pub tokens: Vec<(String, String)>,
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

/// Code chunks uploaded at once: enough to keep the leader's batcher busy, few enough that an
/// upload does not crowd out other writes (each chunk is [`CODE_CHUNK_BYTES`]).
pub const UPLOAD_CHUNKS_IN_FLIGHT: usize = 4;

/// Deadline of one attempt of a synchronous invocation: the longest function timeout, the
/// node's 30 s margin for queueing and reporting, and 30 s more for forwarding.
pub const INVOKE_WAIT_DEADLINE: Duration = Duration::from_millis(TIMEOUT_MS_MAX + 60_000);

/// An invocation is retried only this long after its first attempt began: well inside the
/// cluster's deduplication window, so a retry always finds the task of the first attempt.
pub const INVOKE_RETRY_WINDOW: Duration = Duration::from_millis(DEDUP_WINDOW_MS - 60_000);

/// Tasks asked for per page by [`Client::tasks_all`]. Small, because a task carries its
/// payload and output and a page must fit in one frame.
pub const TASK_PAGE: u32 = 64;

impl Client {
    /// Builds a client. Endpoints are checked here; connections open lazily.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        for e in &config.endpoints {
            transport::parse_endpoint(e).map_err(ClientError::InvalidEndpoint)?;
        }
        if let Some(token) = &config.token {
            skiff_proto::tokens::validate_secret(token).map_err(ClientError::InvalidToken)?;
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
        let max = skiff_proto::model::COMMANDS_PER_ENTRY_MAX;
        if commands.len() > max {
            return Err(ClientError::Api(ApiError::InvalidArgument(format!(
                "{} commands in one call, the limit is {max}",
                commands.len()
            ))));
        }
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
                async move { c.write(ctx, commands.into()).await }
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
        skiff_proto::model::validate_key(key)?;
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
                .list(prefix, start_after, skiff_proto::model::LIST_LIMIT_MAX)
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

    /// Initializes a new cluster and returns its first admin token with the secret, which
    /// this call draws: retries carry the same secret, so a retried init whose first answer
    /// was lost still returns it. Only the call that initializes a cluster gets a token.
    pub async fn cluster_init(
        &self,
        members: BTreeMap<NodeId, String>,
    ) -> Result<CreatedToken, ClientError> {
        for addr in members.values() {
            transport::parse_endpoint(addr).map_err(ClientError::InvalidEndpoint)?;
        }
        if members.len() > crate::api::INIT_MEMBERS_MAX {
            return Err(InvalidCommand::Other(format!(
                "{} members; a cluster starts with at most {} (add more with `cluster add-node`)",
                members.len(),
                crate::api::INIT_MEMBERS_MAX
            ))
            .into());
        }
        let secret = new_token_secret();
        let token = self
            .call(|c, ctx| {
                let members = members.clone();
                let secret = secret.clone();
                async move { c.cluster_init(ctx, members, secret).await }
            })
            .await?;
        Ok(CreatedToken { token, secret })
    }

    /// Makes a token of `role`; the answer holds its secret, shown this once. A create
    /// whose answer was lost and retried may leave an extra token nobody holds (`token ls`
    /// shows it; revoke it).
    pub async fn token_create(
        &self,
        role: Role,
        name: Option<String>,
    ) -> Result<CreatedToken, ClientError> {
        if let Some(name) = &name {
            skiff_proto::tokens::validate_token_name(name).map_err(InvalidCommand::Other)?;
        }
        self.call(|c, ctx| {
            let name = name.clone();
            async move { c.token_create(ctx, role, name).await }
        })
        .await
    }

    /// Every token, revoked ones included (linearizable); never a secret.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>, ClientError> {
        self.call(|c, ctx| async move { c.token_list(ctx, ReadConsistency::Linearizable).await })
            .await
    }

    /// Revokes a token; revoking a revoked token succeeds and changes nothing.
    pub async fn token_revoke(&self, id: TokenId) -> Result<TokenInfo, ClientError> {
        let request_id = self.next_request_id();
        self.call(|c, ctx| async move { c.token_revoke(ctx, request_id, id).await })
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

    /// Uploads a code archive (a tar file) in [`CODE_CHUNK_BYTES`] chunks, at most
    /// [`UPLOAD_CHUNKS_IN_FLIGHT`] at a time, and returns its SHA-256 (hex), the digest a
    /// [`FunctionSpec`] names. `progress(done, total)` is called in bytes as chunks are stored.
    ///
    /// Uploading an archive the cluster already holds sends one chunk only: the first chunk
    /// goes alone, the cluster answers that the archive is complete, and the upload stops.
    pub async fn upload_code(
        &self,
        archive: &[u8],
        mut progress: impl FnMut(u64, u64),
    ) -> Result<String, ClientError> {
        let total = archive.len() as u64;
        if archive.is_empty() || total > CODE_BYTES_MAX {
            return Err(ClientError::CodeSize {
                bytes: total,
                max: CODE_BYTES_MAX,
            });
        }
        let digest = hex::encode(Sha256::digest(archive));
        let chunks = chunk_count(total);
        debug_assert_eq!(archive.chunks(CODE_CHUNK_BYTES).count(), chunks as usize);
        let command = |index: usize, bytes: &[u8]| Command::CodeChunk {
            digest: digest.clone(),
            total_bytes: total,
            index: index as u32,
            bytes: bytes.to_vec(),
        };
        let mut pieces = archive.chunks(CODE_CHUNK_BYTES).enumerate();
        // The first chunk goes alone: if the cluster already holds the archive it says so,
        // and nothing more is sent.
        let (_, first) = pieces
            .next()
            .expect("a non-empty archive has a first chunk");
        let mut done = 0u64;
        if chunk_stored(self.execute_one(command(0, first)).await?)? {
            progress(total, total);
            return Ok(digest);
        }
        done += first.len() as u64;
        progress(done, total);
        let mut stored = futures::stream::iter(pieces)
            .map(|(index, bytes)| {
                let c = command(index, bytes);
                let len = bytes.len() as u64;
                async move { (len, self.execute_one(c).await) }
            })
            .buffer_unordered(UPLOAD_CHUNKS_IN_FLIGHT);
        while let Some((len, result)) = stored.next().await {
            if chunk_stored(result?)? {
                progress(total, total);
                return Ok(digest.clone());
            }
            done += len;
            progress(done, total);
        }
        // Every chunk is stored but none completed the archive: the cluster dropped the
        // partial upload meanwhile (it expires unfinished uploads).
        Err(ClientError::Rejected {
            reason: format!("the upload of code {digest} did not complete; upload it again"),
        })
    }

    /// Deploys a new version of `spec.name` from code uploaded with [`Client::upload_code`];
    /// returns the version.
    pub async fn deploy(&self, spec: FunctionSpec) -> Result<u64, ClientError> {
        let name = spec.name.clone();
        let result = self
            .execute_one(Command::FnDeploy {
                spec: Box::new(spec),
            })
            .await?;
        match result {
            CommandResult::Deployed { version } => Ok(version),
            other => Err(function_result(&name, other)),
        }
    }

    /// Removes a function with all its versions; its queued tasks fail.
    pub async fn remove_function(&self, name: &str) -> Result<(), ClientError> {
        let result = self
            .execute_one(Command::FnRemove {
                name: name.to_string(),
            })
            .await?;
        match result {
            CommandResult::Removed => Ok(()),
            // The state machine refuses a removal only when the function does not exist.
            CommandResult::Rejected { .. } => Err(ClientError::FunctionNotFound {
                name: name.to_string(),
            }),
            other => Err(function_result(name, other)),
        }
    }

    /// A function with all its kept versions, if it exists.
    pub async fn function(&self, name: &str) -> Result<Option<FunctionRecord>, ClientError> {
        validate_function_name(name).map_err(InvalidCommand::Other)?;
        let name = name.to_string();
        self.call(|c, ctx| {
            let name = name.clone();
            async move { c.fn_get(ctx, name, ReadConsistency::Linearizable).await }
        })
        .await
    }

    /// Every function, each with its latest version only.
    pub async fn functions(&self) -> Result<Vec<FunctionRecord>, ClientError> {
        self.call(|c, ctx| async move { c.fn_list(ctx, ReadConsistency::Linearizable).await })
            .await
    }

    /// Invokes `function` at `version` (the latest if `None`). With `wait`, returns the
    /// finished task (succeeded, failed or timed out: look at its state); without, the task
    /// as soon as it is queued.
    ///
    /// One request id serves every attempt, so retries (of retryable errors only, within
    /// [`INVOKE_RETRY_WINDOW`]) never start a second task. A throttled invocation is not
    /// retried: it is the caller's call whether to back off.
    pub async fn invoke(
        &self,
        function: &str,
        version: Option<u64>,
        payload: Vec<u8>,
        wait: bool,
    ) -> Result<Task, ClientError> {
        self.invoke_with(function, version, payload, wait, InvokeOptions::default())
            .await
    }

    /// [`Client::invoke`] with the inputs of an idempotent function.
    pub async fn invoke_with(
        &self,
        function: &str,
        version: Option<u64>,
        payload: Vec<u8>,
        wait: bool,
        options: InvokeOptions,
    ) -> Result<Task, ClientError> {
        validate_function_name(function).map_err(InvalidCommand::Other)?;
        if payload.len() > PAYLOAD_BYTES_MAX {
            return Err(InvalidCommand::Other(format!(
                "payload is {} bytes, the limit is {PAYLOAD_BYTES_MAX}",
                payload.len()
            ))
            .into());
        }
        let req = InvokeRequest {
            request_id: self.next_request_id(),
            function: function.to_string(),
            version,
            payload,
            wait,
            idempotency_key: options.idempotency_key,
            tokens: options.tokens,
            files: Vec::new(),
        };
        let req = &req;
        let attempt_timeout = if wait {
            INVOKE_WAIT_DEADLINE
        } else {
            self.inner.config.rpc_timeout
        };
        let retry_until = Instant::now() + INVOKE_RETRY_WINDOW;
        self.call_within(attempt_timeout, Some(retry_until), |c, ctx| {
            let req = req.clone();
            async move { c.invoke(ctx, req).await }
        })
        .await
    }

    /// Forgets the cached results of an idempotent function; returns how many.
    pub async fn purge_cache(&self, name: &str) -> Result<u64, ClientError> {
        validate_function_name(name).map_err(InvalidCommand::Other)?;
        match self
            .execute_one(Command::FnPurgeCache {
                name: name.to_string(),
            })
            .await?
        {
            CommandResult::Purged { entries } => Ok(entries),
            CommandResult::Rejected { .. } => Err(ClientError::FunctionNotFound {
                name: name.to_string(),
            }),
            other => Err(ClientError::Protocol(format!(
                "purge-cache answered with {other:?}"
            ))),
        }
    }

    /// One task, if it exists (finished tasks are purged after their retention).
    pub async fn task(&self, id: TaskId) -> Result<Option<Task>, ClientError> {
        self.call(|c, ctx| async move { c.task_get(ctx, id, ReadConsistency::Linearizable).await })
            .await
    }

    /// Tasks matching `filter` with ids above `after`, in id order, at most `limit` (the
    /// server clamps it).
    pub async fn tasks(
        &self,
        filter: TaskFilter,
        after: TaskId,
        limit: u32,
    ) -> Result<Vec<Task>, ClientError> {
        self.call(|c, ctx| {
            let filter = filter.clone();
            async move {
                c.task_list(ctx, filter, after, limit, ReadConsistency::Linearizable)
                    .await
            }
        })
        .await
    }

    /// Every task matching `filter`, page by page in id order, up to `max_tasks`.
    pub async fn tasks_all(
        &self,
        filter: TaskFilter,
        max_tasks: usize,
    ) -> Result<Vec<Task>, ClientError> {
        let mut out: Vec<Task> = Vec::new();
        let mut after = 0;
        // Each page either ends the listing or adds at least one task, so this many pages
        // always suffice.
        for _ in 0..=max_tasks {
            if out.len() >= max_tasks {
                break;
            }
            let want = (max_tasks - out.len()).min(TASK_PAGE as usize) as u32;
            let page = self.tasks(filter.clone(), after, want).await?;
            let Some(last) = page.last() else {
                break;
            };
            if last.id <= after {
                return Err(ClientError::Protocol(format!(
                    "a task page after id {after} ended at id {}",
                    last.id
                )));
            }
            after = last.id;
            let short = (page.len() as u32) < want;
            out.extend(page);
            if short {
                break;
            }
        }
        out.truncate(max_tasks);
        Ok(out)
    }

    /// Downloads a backup of the cluster's whole state (every write acknowledged before the
    /// call began is in it) and checks it against the leader's SHA-256. `progress(done,
    /// total)` is called in bytes. A backup interrupted by a newer one or a leader change is
    /// started again, at most [`BACKUP_ATTEMPTS_MAX`] times.
    pub async fn backup(&self, mut progress: impl FnMut(u64, u64)) -> Result<Backup, ClientError> {
        use sha2::Digest;
        let mut attempt = 0;
        'attempts: loop {
            attempt += 1;
            let first = self
                .call(|c, ctx| async move { c.backup_chunk(ctx, None, 0).await })
                .await?;
            if first.total_bytes > BACKUP_BYTES_MAX {
                return Err(ClientError::Protocol(format!(
                    "a backup of {} bytes, more than {BACKUP_BYTES_MAX}",
                    first.total_bytes
                )));
            }
            let total = first.total_bytes;
            let (id, covers_index, sha256) = (first.export_id, first.covers_index, first.sha256);
            let mut bytes = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
            let mut chunk = first.bytes;
            loop {
                bytes.extend_from_slice(&chunk);
                let done = bytes.len() as u64;
                progress(done, total);
                if done >= total || chunk.is_empty() {
                    break;
                }
                let next = self
                    .call(|c, ctx| async move { c.backup_chunk(ctx, Some(id), done).await })
                    .await;
                match next {
                    Ok(next) if next.export_id == id && next.offset == done => chunk = next.bytes,
                    Ok(next) => {
                        return Err(ClientError::Protocol(format!(
                            "asked for backup {id} at {done}, got backup {} at {}",
                            next.export_id, next.offset
                        )))
                    }
                    Err(ClientError::Api(ApiError::FailedPrecondition(reason)))
                        if attempt < BACKUP_ATTEMPTS_MAX =>
                    {
                        tracing::info!(%reason, attempt, "backup interrupted; starting again");
                        continue 'attempts;
                    }
                    Err(e) => return Err(e),
                }
            }
            if bytes.len() as u64 != total || hex::encode(sha2::Sha256::digest(&bytes)) != sha256 {
                return Err(ClientError::Protocol(format!(
                    "the backup downloaded ({} bytes) does not match the leader's ({total} bytes, \
                     sha256 {sha256})",
                    bytes.len()
                )));
            }
            return Ok(Backup {
                covers_index,
                sha256,
                bytes,
            });
        }
    }

    /// Worker nodes as their heartbeats describe them, and scheduler counters (linearizable).
    pub async fn workers(&self) -> Result<Workers, ClientError> {
        self.workers_with(ReadConsistency::Linearizable).await
    }

    pub async fn workers_with(&self, read: ReadConsistency) -> Result<Workers, ClientError> {
        self.call(|c, ctx| async move { c.workers(ctx, read).await })
            .await
    }

    /// Starts a stream job: `function` over the items of `source`. The leader checks that
    /// the function exists and that it can read the source (its first record parses). One
    /// request id serves every attempt, so a retried start makes one job.
    pub async fn stream_start(
        &self,
        function: &str,
        source: StreamSource,
        options: StreamOptions,
    ) -> Result<StreamId, ClientError> {
        validate_function_name(function).map_err(InvalidCommand::Other)?;
        source.validate().map_err(InvalidCommand::Other)?;
        options.validate().map_err(InvalidCommand::Other)?;
        let req = StreamStartRequest {
            function: function.to_string(),
            source,
            options,
        };
        let request_id = self.next_request_id();
        let req = &req;
        let retry_until = Instant::now() + INVOKE_RETRY_WINDOW;
        self.call_within(
            self.inner.config.rpc_timeout,
            Some(retry_until),
            |c, ctx| {
                let req = req.clone();
                async move { c.stream_start(ctx, request_id, req).await }
            },
        )
        .await
    }

    /// One stream job (linearizable), if it exists.
    pub async fn stream(&self, id: StreamId) -> Result<Option<StreamJob>, ClientError> {
        self.call(
            |c, ctx| async move { c.stream_get(ctx, id, ReadConsistency::Linearizable).await },
        )
        .await
    }

    /// Every stream job, without windows and failed items.
    pub async fn streams(&self) -> Result<Vec<StreamJob>, ClientError> {
        self.call(|c, ctx| async move { c.stream_list(ctx, ReadConsistency::Linearizable).await })
            .await
    }

    /// Cancels a running stream job.
    pub async fn stream_cancel(&self, id: StreamId) -> Result<(), ClientError> {
        let request_id = self.next_request_id();
        self.call(|c, ctx| async move { c.stream_cancel(ctx, request_id, id).await })
            .await
    }

    /// Runs a stream job's failed items again; returns how many were put back in flight.
    pub async fn stream_redrive(&self, id: StreamId) -> Result<u64, ClientError> {
        let request_id = self.next_request_id();
        self.call(|c, ctx| async move { c.stream_redrive(ctx, request_id, id).await })
            .await
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

/// Whether a stored chunk completed its archive; an error if the chunk was refused.
fn chunk_stored(result: CommandResult) -> Result<bool, ClientError> {
    match result {
        CommandResult::ChunkStored { complete } => Ok(complete),
        CommandResult::Rejected { reason } => Err(ClientError::Rejected { reason }),
        CommandResult::Invalid(e) => Err(ClientError::Invalid(e)),
        other => Err(ClientError::Protocol(format!(
            "a code chunk was answered with {other:?}"
        ))),
    }
}

/// Maps a function command's result that is not its success onto an error.
fn function_result(name: &str, result: CommandResult) -> ClientError {
    match result {
        CommandResult::Rejected { reason } => ClientError::Rejected { reason },
        CommandResult::NotFound => ClientError::FunctionNotFound {
            name: name.to_string(),
        },
        CommandResult::Invalid(e) => ClientError::Invalid(e),
        other => ClientError::Protocol(format!("unexpected result {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    //! The client against an in-process fake of the client service: what it sends, not what a
    //! cluster does with it (node/tests covers that).
    use super::*;
    use crate::api::{ClientApi, TaskState, CLIENT_FRAME_BYTES_MAX};
    use futures::StreamExt;
    use std::sync::Mutex as StdMutex;
    use tarpc::context;
    use tarpc::server::{BaseChannel, Channel};
    use tokio::io::AsyncReadExt;

    #[derive(Default)]
    struct FakeState {
        /// Chunks of the archive being uploaded, by index.
        chunks: BTreeMap<u32, Vec<u8>>,
        /// Digests of complete archives.
        held: Vec<String>,
        chunk_commands: usize,
        deployed: Vec<FunctionSpec>,
        invoke_ids: Vec<RequestId>,
        /// Answers to the next invocations, first first; then success.
        invoke_errors: Vec<ApiError>,
        /// The image a backup serves, in chunks of `backup_chunk` bytes.
        backup_image: Vec<u8>,
        backup_chunk: usize,
        /// Exports started so far; the first one is superseded after its first chunk.
        backup_exports: u64,
    }

    #[derive(Clone, Default)]
    struct Fake(Arc<StdMutex<FakeState>>);

    impl Fake {
        fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
            self.0.lock().expect("fake state lock")
        }
    }

    fn task(id: TaskId, function: &str) -> Task {
        Task {
            id,
            function: function.to_string(),
            version: 1,
            payload: Vec::new(),
            sync: true,
            state: TaskState::Queued,
            attempts: 0,
            failures: 0,
            node: None,
            token: 0,
            submitted_ms: 0,
            assigned_ms: None,
            started_ms: None,
            finished_ms: None,
            not_before_ms: 0,
            queue_seq: 0,
            memory_bytes: 0,
            timeout_ms: 1000,
            result: None,
            dead_letter: false,
            cache: None,
            ledger_key: None,
            request_id: None,
        }
    }

    impl ClientApi for Fake {
        async fn write(
            self,
            _: context::Context,
            commands: crate::api::Commands,
        ) -> Result<Vec<CommandResult>, ApiError> {
            let mut st = self.state();
            let mut results = Vec::new();
            for c in commands.into_inner() {
                results.push(match c.command {
                    Command::CodeChunk {
                        digest,
                        total_bytes,
                        index,
                        bytes,
                    } => {
                        st.chunk_commands += 1;
                        if st.held.contains(&digest) {
                            CommandResult::ChunkStored { complete: true }
                        } else {
                            st.chunks.insert(index, bytes);
                            if st.chunks.len() as u32 == chunk_count(total_bytes) {
                                let all: Vec<u8> = std::mem::take(&mut st.chunks)
                                    .into_values()
                                    .flatten()
                                    .collect();
                                if hex::encode(Sha256::digest(&all)) == digest {
                                    st.held.push(digest);
                                    CommandResult::ChunkStored { complete: true }
                                } else {
                                    CommandResult::Rejected {
                                        reason: "digest mismatch".into(),
                                    }
                                }
                            } else {
                                CommandResult::ChunkStored { complete: false }
                            }
                        }
                    }
                    Command::FnDeploy { spec } => {
                        if st.held.contains(&spec.code_digest) {
                            st.deployed.push(*spec);
                            CommandResult::Deployed {
                                version: st.deployed.len() as u64,
                            }
                        } else {
                            CommandResult::Rejected {
                                reason: format!("code {} is not uploaded", spec.code_digest),
                            }
                        }
                    }
                    Command::FnRemove { name } => CommandResult::Rejected {
                        reason: format!("function {name} does not exist"),
                    },
                    other => panic!("unexpected command {other:?}"),
                });
            }
            Ok(results)
        }
        async fn kv_get(
            self,
            _: context::Context,
            _: String,
            _: ReadConsistency,
        ) -> Result<Option<KvEntry>, ApiError> {
            unimplemented!("not used by these tests")
        }
        async fn kv_list(
            self,
            _: context::Context,
            _: String,
            _: Option<String>,
            _: u32,
            _: ReadConsistency,
        ) -> Result<KvPage, ApiError> {
            unimplemented!("not used by these tests")
        }
        async fn cluster_init(
            self,
            _: context::Context,
            _: BTreeMap<NodeId, String>,
            _: String,
        ) -> Result<TokenInfo, ApiError> {
            unimplemented!("not used by these tests")
        }
        async fn cluster_add_node(
            self,
            _: context::Context,
            _: NodeId,
            _: String,
        ) -> Result<(), ApiError> {
            unimplemented!("not used by these tests")
        }
        async fn cluster_remove_node(self, _: context::Context, _: NodeId) -> Result<(), ApiError> {
            unimplemented!("not used by these tests")
        }
        async fn cluster_status(self, _: context::Context) -> Result<ClusterStatus, ApiError> {
            unimplemented!("not used by these tests")
        }
        async fn invoke(self, _: context::Context, req: InvokeRequest) -> Result<Task, ApiError> {
            let mut st = self.state();
            st.invoke_ids.push(req.request_id);
            if !st.invoke_errors.is_empty() {
                return Err(st.invoke_errors.remove(0));
            }
            Ok(task(st.invoke_ids.len() as u64, &req.function))
        }
        async fn task_get(
            self,
            _: context::Context,
            _: TaskId,
            _: ReadConsistency,
        ) -> Result<Option<Task>, ApiError> {
            unimplemented!("not used by these tests")
        }
        async fn task_list(
            self,
            _: context::Context,
            filter: TaskFilter,
            after: TaskId,
            limit: u32,
            _: ReadConsistency,
        ) -> Result<Vec<Task>, ApiError> {
            // 150 tasks, ids 1..=150, of which the even ones are "f"'s.
            Ok((after + 1..=150)
                .map(|id| task(id, if id % 2 == 0 { "f" } else { "g" }))
                .filter(|t| filter.matches(t))
                .take(limit as usize)
                .collect())
        }
        async fn fn_get(
            self,
            _: context::Context,
            _: String,
            _: ReadConsistency,
        ) -> Result<Option<FunctionRecord>, ApiError> {
            unimplemented!("not used by these tests")
        }
        async fn fn_list(
            self,
            _: context::Context,
            _: ReadConsistency,
        ) -> Result<Vec<FunctionRecord>, ApiError> {
            unimplemented!("not used by these tests")
        }
        async fn workers(
            self,
            _: context::Context,
            _: ReadConsistency,
        ) -> Result<Workers, ApiError> {
            unimplemented!("not used by these tests")
        }

        async fn stream_start(
            self,
            _: context::Context,
            _: RequestId,
            _: crate::api::StreamStartRequest,
        ) -> Result<crate::api::StreamId, ApiError> {
            Err(ApiError::Internal("not faked".into()))
        }

        async fn stream_get(
            self,
            _: context::Context,
            _: crate::api::StreamId,
            _: ReadConsistency,
        ) -> Result<Option<crate::api::StreamJob>, ApiError> {
            Ok(None)
        }

        async fn stream_list(
            self,
            _: context::Context,
            _: ReadConsistency,
        ) -> Result<Vec<crate::api::StreamJob>, ApiError> {
            Ok(vec![])
        }

        async fn stream_cancel(
            self,
            _: context::Context,
            _: RequestId,
            _: crate::api::StreamId,
        ) -> Result<(), ApiError> {
            Err(ApiError::Internal("not faked".into()))
        }

        async fn stream_redrive(
            self,
            _: context::Context,
            _: RequestId,
            _: crate::api::StreamId,
        ) -> Result<u64, ApiError> {
            Err(ApiError::Internal("not faked".into()))
        }

        async fn backup_chunk(
            self,
            _: context::Context,
            export: Option<u64>,
            offset: u64,
        ) -> Result<crate::api::BackupChunk, ApiError> {
            use sha2::Digest;
            let mut st = self.state();
            let id = match export {
                None => {
                    st.backup_exports += 1;
                    st.backup_exports
                }
                // A newer backup replaced the first one.
                Some(1) => return Err(ApiError::FailedPrecondition("backup 1 is gone".into())),
                Some(id) => id,
            };
            let start = (offset as usize).min(st.backup_image.len());
            let end = (start + st.backup_chunk).min(st.backup_image.len());
            Ok(crate::api::BackupChunk {
                export_id: id,
                covers_index: 42,
                total_bytes: st.backup_image.len() as u64,
                sha256: hex::encode(sha2::Sha256::digest(&st.backup_image)),
                offset: start as u64,
                bytes: st.backup_image[start..end].to_vec(),
            })
        }

        async fn token_create(
            self,
            _: context::Context,
            _: Role,
            _: Option<String>,
        ) -> Result<CreatedToken, ApiError> {
            Err(ApiError::Internal("not faked".into()))
        }

        async fn token_list(
            self,
            _: context::Context,
            _: ReadConsistency,
        ) -> Result<Vec<TokenInfo>, ApiError> {
            Err(ApiError::Internal("not faked".into()))
        }

        async fn token_revoke(
            self,
            _: context::Context,
            _: RequestId,
            _: TokenId,
        ) -> Result<TokenInfo, ApiError> {
            Err(ApiError::Internal("not faked".into()))
        }
    }

    #[tokio::test]
    async fn a_backup_is_downloaded_in_chunks_and_restarted_when_superseded() {
        let image: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let fake = Fake::default();
        {
            let mut st = fake.state();
            st.backup_image = image.clone();
            st.backup_chunk = 64;
        }
        let client = serve(fake.clone()).await;
        let mut calls = 0;
        let backup = client
            .backup(|done, total| {
                calls += 1;
                assert!(done <= total);
            })
            .await
            .expect("backup");
        assert_eq!(backup.bytes, image);
        assert_eq!(backup.covers_index, 42);
        // The first export was superseded after one chunk, the second one served all 16.
        assert_eq!(fake.state().backup_exports, 2);
        assert_eq!(calls, 1 + 16);
    }

    /// Serves `fake` on a loopback port; returns a client of it.
    async fn serve(fake: Fake) -> Client {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr").to_string();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let fake = fake.clone();
                tokio::spawn(async move {
                    let mut preamble = [0u8; 1];
                    if stream.read_exact(&mut preamble).await.is_err()
                        || transport::read_token(&mut stream).await.is_err()
                    {
                        return;
                    }
                    let t = transport::framed(stream, CLIENT_FRAME_BYTES_MAX);
                    BaseChannel::with_defaults(t)
                        .execute(fake.serve())
                        .for_each_concurrent(16, |f| f)
                        .await;
                });
            }
        });
        let mut config = ClientConfig::new(vec![addr]);
        config.backoff_initial = Duration::from_millis(1);
        config.backoff_max = Duration::from_millis(5);
        Client::new(config).expect("client")
    }

    fn archive(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn upload_sends_every_chunk_and_returns_the_digest() {
        let fake = Fake::default();
        let client = serve(fake.clone()).await;
        let bytes = archive(3 * CODE_CHUNK_BYTES + 100);
        let mut seen = Vec::new();
        let digest = client
            .upload_code(&bytes, |done, total| seen.push((done, total)))
            .await
            .expect("upload");
        assert_eq!(digest, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(fake.state().chunk_commands, 4);
        assert!(fake.state().held.contains(&digest));
        assert_eq!(seen.last(), Some(&(bytes.len() as u64, bytes.len() as u64)));
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");

        // The same archive again: one chunk goes, the cluster says it is complete.
        let again = client.upload_code(&bytes, |_, _| {}).await.expect("again");
        assert_eq!(again, digest);
        assert_eq!(fake.state().chunk_commands, 5);

        let version = client
            .deploy(FunctionSpec {
                name: "f".into(),
                code_digest: digest.clone(),
                entry: vec!["/code/run".into()],
                mode: crate::api::FnMode::Exec,
                tier: "standard".into(),
                policy: None,
                memory_bytes: 128 << 20,
                timeout_ms: 1000,
                max_concurrency: 1,
                queue_max: 1,
                min_warm: 0,
                max_attempts: 1,
                retry_backoff_ms: 0,
                data: Default::default(),
                env: Vec::new(),
                idempotency: None,
                stages: Vec::new(),
            })
            .await
            .expect("deploy");
        assert_eq!(version, 1);
        assert_eq!(fake.state().deployed[0].code_digest, digest);
    }

    #[tokio::test]
    async fn empty_and_oversized_code_is_refused_before_sending() {
        let fake = Fake::default();
        let client = serve(fake.clone()).await;
        let e = client.upload_code(&[], |_, _| {}).await.expect_err("empty");
        assert!(matches!(e, ClientError::CodeSize { bytes: 0, .. }), "{e}");
        let big = vec![0u8; CODE_BYTES_MAX as usize + 1];
        let e = client.upload_code(&big, |_, _| {}).await.expect_err("big");
        assert!(matches!(e, ClientError::CodeSize { .. }), "{e}");
        assert_eq!(fake.state().chunk_commands, 0);
    }

    #[tokio::test]
    async fn refusals_map_onto_client_errors() {
        let client = serve(Fake::default()).await;
        let e = client.remove_function("ghost").await.expect_err("absent");
        assert!(
            matches!(&e, ClientError::FunctionNotFound { name } if name == "ghost"),
            "{e}"
        );
        let e = client
            .deploy(FunctionSpec {
                name: "f".into(),
                code_digest: "ab".repeat(32),
                entry: vec!["x".into()],
                mode: crate::api::FnMode::Exec,
                tier: "standard".into(),
                policy: None,
                memory_bytes: 128 << 20,
                timeout_ms: 1000,
                max_concurrency: 1,
                queue_max: 1,
                min_warm: 0,
                max_attempts: 1,
                retry_backoff_ms: 0,
                data: Default::default(),
                env: Vec::new(),
                idempotency: None,
                stages: Vec::new(),
            })
            .await
            .expect_err("code not uploaded");
        assert!(
            matches!(&e, ClientError::Rejected { reason } if reason.contains("not uploaded")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_invocation_keeps_its_request_id_across_retries() {
        let fake = Fake::default();
        fake.state().invoke_errors = vec![
            ApiError::Timeout("t".into()),
            ApiError::NoLeader {
                leader: None,
                leader_addr: None,
            },
        ];
        let client = serve(fake.clone()).await;
        let t = client
            .invoke("f", None, b"p".to_vec(), true)
            .await
            .expect("third attempt succeeds");
        assert_eq!(t.function, "f");
        let ids = fake.state().invoke_ids.clone();
        assert_eq!(ids.len(), 3);
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");

        client
            .invoke("f", None, Vec::new(), false)
            .await
            .expect("second invocation");
        let ids = fake.state().invoke_ids.clone();
        assert_ne!(ids[3], ids[0], "a new invocation gets a new id");
    }

    #[tokio::test]
    async fn a_throttled_or_bad_invocation_is_not_retried() {
        let fake = Fake::default();
        fake.state().invoke_errors = vec![ApiError::Throttled("queue full".into())];
        let client = serve(fake.clone()).await;
        let e = client
            .invoke("f", None, Vec::new(), true)
            .await
            .expect_err("throttled");
        assert!(matches!(e, ClientError::Api(ApiError::Throttled(_))), "{e}");
        assert_eq!(fake.state().invoke_ids.len(), 1);

        let e = client
            .invoke("bad name", None, Vec::new(), true)
            .await
            .expect_err("name");
        assert!(matches!(e, ClientError::Invalid(_)), "{e}");
        let e = client
            .invoke("f", None, vec![0; PAYLOAD_BYTES_MAX + 1], true)
            .await
            .expect_err("payload");
        assert!(matches!(e, ClientError::Invalid(_)), "{e}");
        assert_eq!(fake.state().invoke_ids.len(), 1, "nothing sent");
    }

    #[tokio::test]
    async fn task_listing_pages_through_and_stops_at_the_bound() {
        let client = serve(Fake::default()).await;
        let only_f = TaskFilter {
            function: Some("f".into()),
            ..Default::default()
        };
        let all_f = client.tasks_all(only_f.clone(), 1000).await.expect("all");
        assert_eq!(all_f.len(), 75);
        assert!(all_f.windows(2).all(|w| w[0].id < w[1].id));
        assert!(all_f.iter().all(|t| t.function == "f"));
        let some = client
            .tasks_all(TaskFilter::default(), 70)
            .await
            .expect("some");
        assert_eq!(some.len(), 70);
        assert_eq!(some.last().map(|t| t.id), Some(70));
    }
}
