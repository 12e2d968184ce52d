//! The data service: a Unix socket through which a sandboxed function reads and writes the
//! cluster's key-value store, restricted to the key prefixes its policy grants.
//!
//! The node binds one socket per function run ([`bind`]) and hands its path to the sandbox,
//! which mounts it at `/run/skiff/data.sock`. The protocol is one JSON object per line each way
//! (`docs/data-service.md`), simple enough for a shell helper (`skiff-data`) or a few lines of
//! any language. The store itself is behind [`KvBackend`], so the protocol and the access rules
//! are tested without a cluster.
//!
//! Invariants:
//! - every request is checked against the function's [`DataAccess`] before it reaches the
//!   backend; a key outside the grant is never read, written or listed, and a backend answer
//!   naming a key the request did not ask for is refused rather than passed on;
//! - every request line gets exactly one response line, in order; a connection serves one
//!   request at a time;
//! - everything is bounded: request line bytes ([`REQUEST_LINE_BYTES_MAX`]), concurrent
//!   connections ([`CONNECTIONS_MAX`]), list page entries and bytes, the wait for the backend
//!   and for a slow reader, and the access log ([`ACCESS_RECORDS_MAX`], overflow counted);
//! - dropping the [`DataSocket`] stops the accept loop and every connection and removes the
//!   socket file.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use skiff_raft_store::model::{
    validate_key, CommandResult, InvalidCommand, KvEntry, KvPage, KEY_BYTES_MAX, VALUE_BYTES_MAX,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::{JoinHandle, JoinSet};

mod node_kv;

pub use node_kv::NodeKv;

/// Longest request line, without its newline: a value at [`VALUE_BYTES_MAX`] whose JSON
/// escaping at most doubles it (base64 adds a third), plus room for the key and the fields.
pub const REQUEST_LINE_BYTES_MAX: usize = 2 * VALUE_BYTES_MAX + 64 * 1024;
/// Most connections served at once on one socket; more are answered with an error and closed.
pub const CONNECTIONS_MAX: usize = 16;
/// Most records an [`AccessLog`] keeps; later ones are only counted.
pub const ACCESS_RECORDS_MAX: usize = 4096;
/// Most entries one list response carries (also the default `limit`).
pub const LIST_ENTRIES_MAX: u32 = 100;
/// Encoded entries past which a list page is cut short (with `next` set); a page always holds
/// at least one entry, so a large value cannot stall a listing.
pub const LIST_PAGE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// How long one request waits for the backend before it fails as `unavailable`.
pub const BACKEND_TIMEOUT_MS: u64 = 10_000;
/// How long a response may wait for the client to read it before the connection is closed.
pub const RESPONSE_WRITE_TIMEOUT_MS: u64 = 10_000;

/// The keys one function may touch, as prefixes.
///
/// A key is readable if it starts with any read or write prefix, and writable if it starts
/// with a write prefix. A prefix may be listed only if it itself starts with a readable prefix,
/// so a listing never shows a key that could not be read. Empty lists allow nothing; the empty
/// string as a prefix allows every key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataAccess {
    pub read_prefixes: Vec<String>,
    pub write_prefixes: Vec<String>,
}

impl DataAccess {
    /// Whether `key` may be read.
    pub fn can_read(&self, key: &str) -> bool {
        self.read_prefixes
            .iter()
            .chain(&self.write_prefixes)
            .any(|p| key.starts_with(p.as_str()))
    }

    /// Whether `key` may be written or deleted.
    pub fn can_write(&self, key: &str) -> bool {
        self.write_prefixes
            .iter()
            .any(|p| key.starts_with(p.as_str()))
    }

    /// Whether the keys starting with `prefix` may be listed.
    pub fn can_list(&self, prefix: &str) -> bool {
        self.can_read(prefix)
    }

    /// What the grant allows, in words, for denial messages.
    fn describe(&self) -> String {
        fn quoted(prefixes: &[&String]) -> String {
            let quoted: Vec<String> = prefixes.iter().map(|p| format!("{p:?}")).collect();
            quoted.join(", ")
        }
        let readable: Vec<&String> = self
            .read_prefixes
            .iter()
            .chain(&self.write_prefixes)
            .collect();
        let writable: Vec<&String> = self.write_prefixes.iter().collect();
        if readable.is_empty() {
            return "this function has no access to the store".to_string();
        }
        let writes = if writable.is_empty() {
            "write no key".to_string()
        } else {
            format!("write keys starting with {}", quoted(&writable))
        };
        format!(
            "this function may read keys starting with {} and {writes}",
            quoted(&readable)
        )
    }
}

/// The store as the data service sees it. The node implements it over its Raft state machine;
/// [`MemoryBackend`] implements it in memory.
///
/// `Err` is for the store being unreachable or failing (no leader, timeout, shutdown); business
/// outcomes — a conflict, a missing key, an invalid command — are `Ok` [`CommandResult`]s.
pub trait KvBackend: Send + Sync + 'static {
    fn get(&self, key: String) -> BoxFuture<'static, Result<Option<KvEntry>, String>>;
    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        expect_version: Option<u64>,
    ) -> BoxFuture<'static, Result<CommandResult, String>>;
    fn delete(
        &self,
        key: String,
        expect_version: Option<u64>,
    ) -> BoxFuture<'static, Result<CommandResult, String>>;
    fn list(
        &self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> BoxFuture<'static, Result<KvPage, String>>;
    /// Told of every request the service refused as the function's fault (a key its grant
    /// does not cover: `data_denied`; a malformed or oversize request: `data_invalid`), so
    /// the node can count it.
    fn refused(&self, _reason: &'static str) {}
}

/// An unreplicated [`KvBackend`]: one ordered map behind a mutex, with versions drawn from one
/// revision counter as the replicated store does. For tests and single-process tools.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    state: Arc<Mutex<MemoryState>>,
}

#[derive(Debug, Default)]
struct MemoryState {
    revision: u64,
    entries: BTreeMap<String, KvEntry>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut MemoryState) -> T) -> T {
        // A panic while holding the lock cannot leave the map half-updated: every change below
        // is a single insert or remove.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }
}

impl KvBackend for MemoryBackend {
    fn get(&self, key: String) -> BoxFuture<'static, Result<Option<KvEntry>, String>> {
        let entry = self.with_state(|s| s.entries.get(&key).cloned());
        Box::pin(async move { Ok(entry) })
    }

    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        expect_version: Option<u64>,
    ) -> BoxFuture<'static, Result<CommandResult, String>> {
        let result = self.with_state(|s| {
            if let Err(e) = validate_key(&key) {
                return CommandResult::Invalid(e);
            }
            if value.len() > VALUE_BYTES_MAX {
                return CommandResult::Invalid(InvalidCommand::ValueTooLarge {
                    bytes: value.len(),
                    max: VALUE_BYTES_MAX,
                });
            }
            let current = s.entries.get(&key);
            let current_version = current.map_or(0, |e| e.version);
            if expect_version.is_some_and(|v| v != current_version) {
                return CommandResult::Conflict {
                    current: current_version,
                };
            }
            s.revision += 1;
            let version = s.revision;
            let create_version = current.map_or(version, |e| e.create_version);
            s.entries.insert(
                key.clone(),
                KvEntry {
                    key,
                    value,
                    version,
                    create_version,
                },
            );
            CommandResult::Put { version }
        });
        Box::pin(async move { Ok(result) })
    }

    fn delete(
        &self,
        key: String,
        expect_version: Option<u64>,
    ) -> BoxFuture<'static, Result<CommandResult, String>> {
        let result = self.with_state(|s| {
            let current_version = s.entries.get(&key).map_or(0, |e| e.version);
            if expect_version.is_some_and(|v| v != current_version) {
                return CommandResult::Conflict {
                    current: current_version,
                };
            }
            match s.entries.remove(&key) {
                Some(entry) => {
                    s.revision += 1;
                    CommandResult::Deleted {
                        version: entry.version,
                    }
                }
                None => CommandResult::NotFound,
            }
        });
        Box::pin(async move { Ok(result) })
    }

    fn list(
        &self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> BoxFuture<'static, Result<KvPage, String>> {
        let page = self.with_state(|s| {
            let limit = limit as usize;
            let mut entries: Vec<KvEntry> = s
                .entries
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter(|(k, _)| start_after.as_ref().is_none_or(|after| *k > after))
                .take(limit + 1)
                .map(|(_, e)| e.clone())
                .collect();
            let next = if entries.len() > limit {
                entries.truncate(limit);
                entries.last().map(|e| e.key.clone())
            } else {
                None
            };
            KvPage {
                entries,
                next,
                revision: s.revision,
            }
        });
        Box::pin(async move { Ok(page) })
    }
}

/// The kind of one access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccessOp {
    Get,
    Put,
    Delete,
    List,
}

impl fmt::Display for AccessOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessOp::Get => "get",
            AccessOp::Put => "put",
            AccessOp::Delete => "delete",
            AccessOp::List => "list",
        })
    }
}

/// One access a function made, or tried to make, through the data service.
///
/// Recorded: every denied request (`allowed: false`, `version: 0`) and every request the
/// backend answered. Not recorded: malformed requests and requests the backend failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRecord {
    pub op: AccessOp,
    /// The key; for [`AccessOp::List`], the prefix.
    pub key: String,
    /// The version seen or written, 0 for an absent key: for a get, the version read; for a
    /// put, the version written; for a delete, the version the key had; for a put or delete
    /// that conflicted, the version found; for a list, the store's revision when the page was
    /// read.
    pub version: u64,
    pub allowed: bool,
}

/// The accesses of one run, in the order they were made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accesses {
    /// The first [`ACCESS_RECORDS_MAX`] records.
    pub records: Vec<AccessRecord>,
    /// Records that did not fit; when non-zero, `records` is incomplete.
    pub dropped: u64,
}

/// Most distinct peers (sandboxes, by host uid) an [`AccessLog`] keeps records for; accesses
/// of further peers are only counted.
pub const ACCESS_PEERS_MAX: usize = 1024;

tokio::task_local! {
    /// The host uid of the process on the other end of the connection being served.
    static PEER_UID: Option<u32>;
}

/// A bounded log of the accesses made through one [`DataSocket`], kept per peer: every
/// sandbox runs as its own host uid, so a run's accesses are those of its uid.
#[derive(Debug)]
pub struct AccessLog {
    records_max: usize,
    inner: Mutex<std::collections::HashMap<Option<u32>, Accesses>>,
}

impl AccessLog {
    fn new(records_max: usize) -> Self {
        Self {
            records_max,
            inner: Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn record(&self, record: AccessRecord) {
        let uid = PEER_UID.try_with(|u| *u).ok().flatten();
        let mut inner = self.lock();
        let peer = if inner.contains_key(&uid) || inner.len() < ACCESS_PEERS_MAX {
            uid
        } else {
            None
        };
        let accesses = inner.entry(peer).or_default();
        if peer == uid && accesses.records.len() < self.records_max {
            accesses.records.push(record);
        } else {
            accesses.dropped += 1;
        }
    }

    /// Takes every access logged so far (all peers), leaving the log empty.
    pub fn take(&self) -> Accesses {
        let mut all = Accesses::default();
        for (_, a) in self.lock().drain() {
            all.records.extend(a.records);
            all.dropped += a.dropped;
        }
        all
    }

    /// Takes the accesses made by processes running as host uid `uid`.
    pub fn take_for(&self, uid: u32) -> Accesses {
        self.lock().remove(&Some(uid)).unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Option<u32>, Accesses>> {
        // Each change under the lock is a single push or counter bump: a poisoned log is whole.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A listening data socket. Dropping it stops the service and removes the socket file.
#[derive(Debug)]
pub struct DataSocket {
    path: PathBuf,
    access_log: Arc<AccessLog>,
    task: JoinHandle<()>,
}

impl DataSocket {
    /// The socket's path on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log of the accesses made through this socket.
    pub fn access_log(&self) -> Arc<AccessLog> {
        self.access_log.clone()
    }
}

impl Drop for DataSocket {
    fn drop(&mut self) {
        // The accept loop owns the connections (a JoinSet): aborting it aborts them too.
        self.task.abort();
        if let Err(error) = std::fs::remove_file(&self.path) {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), %error, "cannot remove data socket");
            }
        }
    }
}

/// Binds the data socket at `path` for a function with `access`, and serves it until the
/// returned [`DataSocket`] is dropped. Must be called inside a tokio runtime.
///
/// A socket file left at `path` by an earlier run is removed; any other kind of file there is
/// an error. Only sandboxes may connect: the socket is `root:G` mode 0660 and the directory
/// holding it (which must hold data sockets only) `root:G` mode 0710, where G is the group
/// every sandbox runs as (`skiff_sandbox::host_id_range().group()`), an id no local account
/// has. A local user can neither reach the socket nor connect to it; a sandbox, whatever its
/// uid, connects through its group. Every directory above the socket's must be traversable
/// (`o+x`) by the sandbox's uid. Run by a user other than root (tests), the socket and its
/// directory keep their owner and group: only that user connects.
pub async fn bind(
    path: &Path,
    access: DataAccess,
    backend: Arc<dyn KvBackend>,
) -> io::Result<DataSocket> {
    let context = |what: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot {what} data socket {}: {e}", path.display()),
        )
    };
    match tokio::fs::symlink_metadata(path).await {
        Ok(meta) if meta.file_type().is_socket() => tokio::fs::remove_file(path)
            .await
            .map_err(|e| context("remove the stale", e))?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "cannot bind data socket {}: a file that is not a socket is in the way",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(context("inspect", e)),
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    restrict_to_sandboxes(dir, 0o710).map_err(|e| context("restrict the directory of", e))?;
    let listener = UnixListener::bind(path).map_err(|e| context("bind", e))?;
    restrict_to_sandboxes(path, 0o660).map_err(|e| context("restrict", e))?;
    let access_log = Arc::new(AccessLog::new(ACCESS_RECORDS_MAX));
    let service = Arc::new(Service {
        access,
        backend,
        log: access_log.clone(),
    });
    let task = tokio::spawn(accept_loop(listener, service));
    Ok(DataSocket {
        path: path.to_path_buf(),
        access_log,
        task,
    })
}

/// Gives `path` to root and the sandboxes' group (when run as root) with `mode`.
fn restrict_to_sandboxes(path: &Path, mode: u32) -> io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        let group = skiff_sandbox::host_id_range().group();
        std::os::unix::fs::chown(path, Some(0), Some(group))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

async fn accept_loop(listener: UnixListener, service: Arc<Service>) {
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: wait and keep serving.
                tracing::warn!(%error, "data socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while let Some(done) = connections.try_join_next() {
            if let Err(error) = done {
                tracing::warn!(%error, "data connection task failed");
            }
        }
        if connections.len() >= CONNECTIONS_MAX {
            let reply = Reply::error(&RequestError::Unavailable(format!(
                "too many connections: at most {CONNECTIONS_MAX} at once"
            )));
            // Best effort: a fresh socket's buffer takes one short line without blocking.
            let _ = stream.try_write(&reply.to_line());
            continue;
        }
        let service = service.clone();
        connections.spawn(async move {
            if let Err(error) = serve_connection(stream, &service).await {
                tracing::debug!(%error, "data connection closed");
            }
        });
    }
}

async fn serve_connection(stream: UnixStream, service: &Service) -> io::Result<()> {
    let uid = stream.peer_cred().ok().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(REQUEST_LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if read == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && line.len() > REQUEST_LINE_BYTES_MAX {
            let reply = service.refusal(&RequestError::Invalid(format!(
                "request line is longer than {REQUEST_LINE_BYTES_MAX} bytes; closing"
            )));
            send(&mut write, &reply).await?;
            return Ok(());
        }
        // A last line without its newline (the client shut down its side) is still a request.
        let reply = PEER_UID.scope(uid, service.handle(&line)).await;
        send(&mut write, &reply).await?;
    }
}

async fn send(write: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> io::Result<()> {
    let line = reply.to_line();
    tokio::time::timeout(
        Duration::from_millis(RESPONSE_WRITE_TIMEOUT_MS),
        write.write_all(&line),
    )
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client did not read its response within {RESPONSE_WRITE_TIMEOUT_MS} ms"),
        )
    })?
}

/// Why a request failed; each variant is one wire error code.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("{op} of {key:?} denied: {allowed}")]
    Denied {
        op: AccessOp,
        key: String,
        allowed: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{key:?} is at version {current}, not the expected {expected}")]
    Conflict {
        key: String,
        current: u64,
        expected: u64,
    },
    #[error("{key:?} does not exist")]
    NotFound { key: String },
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

impl RequestError {
    fn code(&self) -> ErrorCode {
        match self {
            RequestError::Denied { .. } => ErrorCode::Denied,
            RequestError::Invalid(_) => ErrorCode::Invalid,
            RequestError::Conflict { .. } => ErrorCode::Conflict,
            RequestError::NotFound { .. } => ErrorCode::NotFound,
            RequestError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum ErrorCode {
    Denied,
    Invalid,
    Conflict,
    Unavailable,
    NotFound,
}

/// One request line. Unknown fields are refused, so a misspelled `expect_version` cannot turn
/// a conditional write into an unconditional one.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum WireRequest {
    Get {
        key: String,
    },
    Put {
        key: String,
        value: Option<String>,
        value_b64: Option<String>,
        expect_version: Option<u64>,
    },
    Delete {
        key: String,
        expect_version: Option<u64>,
    },
    List {
        prefix: String,
        start_after: Option<String>,
        limit: Option<u32>,
    },
}

/// One response line: `ok` and the fields of the answer; absent fields are left out.
#[derive(Debug, Default, Serialize)]
struct Reply {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    found: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entries: Option<Vec<WireEntry>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    current: Option<u64>,
}

impl Reply {
    fn ok() -> Self {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }

    fn error(error: &RequestError) -> Self {
        Reply {
            ok: false,
            error: Some(error.to_string()),
            code: Some(error.code()),
            current: match error {
                RequestError::Conflict { current, .. } => Some(*current),
                _ => None,
            },
            ..Reply::default()
        }
    }

    fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self)
            .expect("a reply is strings, numbers and booleans: it always serializes");
        line.push(b'\n');
        line
    }
}

#[derive(Debug, Serialize)]
struct WireEntry {
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_b64: Option<String>,
    version: u64,
}

/// A value as it goes on the wire: `value` when it is UTF-8, `value_b64` otherwise.
fn encode_value(value: Vec<u8>) -> (Option<String>, Option<String>) {
    match String::from_utf8(value) {
        Ok(text) => (Some(text), None),
        Err(e) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
        ),
    }
}

/// Counts the bytes written through it, to size list pages without building them twice.
struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn encoded_bytes(entry: &WireEntry) -> usize {
    let mut counter = ByteCounter(0);
    serde_json::to_writer(&mut counter, entry)
        .expect("an entry is strings and a number: it always serializes");
    counter.0
}

/// The state one socket's connections share.
struct Service {
    access: DataAccess,
    backend: Arc<dyn KvBackend>,
    log: Arc<AccessLog>,
}

impl Service {
    async fn handle(&self, line: &[u8]) -> Reply {
        let request = match serde_json::from_slice::<WireRequest>(line) {
            Ok(request) => request,
            Err(e) => {
                return self.refusal(&RequestError::Invalid(format!("malformed request: {e}")))
            }
        };
        self.execute(request)
            .await
            .unwrap_or_else(|e| self.refusal(&e))
    }

    /// The reply to a failed request; a refusal of the function's input is also counted.
    fn refusal(&self, e: &RequestError) -> Reply {
        match e {
            RequestError::Denied { .. } => self.backend.refused("data_denied"),
            RequestError::Invalid(_) => self.backend.refused("data_invalid"),
            _ => {}
        }
        Reply::error(e)
    }

    async fn execute(&self, request: WireRequest) -> Result<Reply, RequestError> {
        match request {
            WireRequest::Get { key } => self.get(key).await,
            WireRequest::Put {
                key,
                value,
                value_b64,
                expect_version,
            } => {
                let value = decode_put_value(value, value_b64)?;
                self.put(key, value, expect_version).await
            }
            WireRequest::Delete {
                key,
                expect_version,
            } => self.delete(key, expect_version).await,
            WireRequest::List {
                prefix,
                start_after,
                limit,
            } => self.list(prefix, start_after, limit).await,
        }
    }

    fn log(&self, op: AccessOp, key: &str, version: u64, allowed: bool) {
        self.log.record(AccessRecord {
            op,
            key: key.to_string(),
            version,
            allowed,
        });
    }

    /// Refuses (and logs) an access outside the grant.
    fn check(&self, op: AccessOp, key: &str) -> Result<(), RequestError> {
        let allowed = match op {
            AccessOp::Get => self.access.can_read(key),
            AccessOp::List => self.access.can_list(key),
            AccessOp::Put | AccessOp::Delete => self.access.can_write(key),
        };
        if allowed {
            return Ok(());
        }
        self.log(op, key, 0, false);
        Err(RequestError::Denied {
            op,
            key: key.to_string(),
            allowed: self.access.describe(),
        })
    }

    async fn get(&self, key: String) -> Result<Reply, RequestError> {
        validate_key(&key).map_err(invalid)?;
        self.check(AccessOp::Get, &key)?;
        let entry = call_backend(self.backend.get(key.clone())).await?;
        match entry {
            None => {
                self.log(AccessOp::Get, &key, 0, true);
                Ok(Reply {
                    found: Some(false),
                    ..Reply::ok()
                })
            }
            Some(entry) => {
                if entry.key != key {
                    return Err(backend_broke(format!(
                        "asked for {key:?}, it answered {:?}",
                        entry.key
                    )));
                }
                self.log(AccessOp::Get, &key, entry.version, true);
                let (value, value_b64) = encode_value(entry.value);
                Ok(Reply {
                    found: Some(true),
                    value,
                    value_b64,
                    version: Some(entry.version),
                    ..Reply::ok()
                })
            }
        }
    }

    async fn put(
        &self,
        key: String,
        value: Vec<u8>,
        expect_version: Option<u64>,
    ) -> Result<Reply, RequestError> {
        validate_key(&key).map_err(invalid)?;
        if value.len() > VALUE_BYTES_MAX {
            return Err(invalid(InvalidCommand::ValueTooLarge {
                bytes: value.len(),
                max: VALUE_BYTES_MAX,
            }));
        }
        self.check(AccessOp::Put, &key)?;
        let result = call_backend(self.backend.put(key.clone(), value, expect_version)).await?;
        match result {
            CommandResult::Put { version } => {
                self.log(AccessOp::Put, &key, version, true);
                Ok(Reply {
                    version: Some(version),
                    ..Reply::ok()
                })
            }
            CommandResult::Conflict { current } => {
                self.log(AccessOp::Put, &key, current, true);
                Err(RequestError::Conflict {
                    key,
                    current,
                    expected: expect_version.unwrap_or_default(),
                })
            }
            CommandResult::Invalid(e) => Err(invalid(e)),
            other => Err(backend_broke(format!("answered {other:?} to a put"))),
        }
    }

    async fn delete(
        &self,
        key: String,
        expect_version: Option<u64>,
    ) -> Result<Reply, RequestError> {
        validate_key(&key).map_err(invalid)?;
        self.check(AccessOp::Delete, &key)?;
        let result = call_backend(self.backend.delete(key.clone(), expect_version)).await?;
        match result {
            CommandResult::Deleted { version } => {
                self.log(AccessOp::Delete, &key, version, true);
                Ok(Reply {
                    version: Some(version),
                    ..Reply::ok()
                })
            }
            CommandResult::NotFound => {
                self.log(AccessOp::Delete, &key, 0, true);
                Err(RequestError::NotFound { key })
            }
            CommandResult::Conflict { current } => {
                self.log(AccessOp::Delete, &key, current, true);
                Err(RequestError::Conflict {
                    key,
                    current,
                    expected: expect_version.unwrap_or_default(),
                })
            }
            CommandResult::Invalid(e) => Err(invalid(e)),
            other => Err(backend_broke(format!("answered {other:?} to a delete"))),
        }
    }

    async fn list(
        &self,
        prefix: String,
        start_after: Option<String>,
        limit: Option<u32>,
    ) -> Result<Reply, RequestError> {
        if prefix.len() > KEY_BYTES_MAX
            || start_after
                .as_ref()
                .is_some_and(|s| s.len() > KEY_BYTES_MAX)
        {
            return Err(RequestError::Invalid(format!(
                "prefix and start_after are limited to {KEY_BYTES_MAX} bytes"
            )));
        }
        self.check(AccessOp::List, &prefix)?;
        let limit = limit.unwrap_or(LIST_ENTRIES_MAX).clamp(1, LIST_ENTRIES_MAX);
        let page = call_backend(self.backend.list(prefix.clone(), start_after, limit)).await?;
        if let Some(stray) = page.entries.iter().find(|e| !e.key.starts_with(&prefix)) {
            return Err(backend_broke(format!(
                "listed {:?} under the prefix {prefix:?}",
                stray.key
            )));
        }
        self.log(AccessOp::List, &prefix, page.revision, true);
        let total = page.entries.len();
        let mut entries = Vec::with_capacity(total);
        let mut bytes = 0;
        for entry in page.entries {
            let key = entry.key;
            let (value, value_b64) = encode_value(entry.value);
            let wire = WireEntry {
                key,
                value,
                value_b64,
                version: entry.version,
            };
            bytes += encoded_bytes(&wire);
            if bytes > LIST_PAGE_BYTES_MAX && !entries.is_empty() {
                break;
            }
            entries.push(wire);
        }
        let next = if entries.len() < total {
            entries.last().map(|e| e.key.clone())
        } else {
            page.next
        };
        Ok(Reply {
            entries: Some(entries),
            next,
            ..Reply::ok()
        })
    }
}

fn invalid(e: InvalidCommand) -> RequestError {
    RequestError::Invalid(e.to_string())
}

/// A backend answer that breaks its contract: a bug in the node, reported to the function as
/// the store being unavailable rather than passed on.
fn backend_broke(detail: String) -> RequestError {
    tracing::error!(%detail, "data service backend broke its contract");
    RequestError::Unavailable(format!("the store answered wrongly ({detail})"))
}

async fn call_backend<T>(call: BoxFuture<'static, Result<T, String>>) -> Result<T, RequestError> {
    match tokio::time::timeout(Duration::from_millis(BACKEND_TIMEOUT_MS), call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(RequestError::Unavailable(e)),
        Err(_) => Err(RequestError::Unavailable(format!(
            "no answer within {BACKEND_TIMEOUT_MS} ms"
        ))),
    }
}

fn decode_put_value(
    value: Option<String>,
    value_b64: Option<String>,
) -> Result<Vec<u8>, RequestError> {
    match (value, value_b64) {
        (Some(text), None) => Ok(text.into_bytes()),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| RequestError::Invalid(format!("value_b64 is not standard base64: {e}"))),
        _ => Err(RequestError::Invalid(
            "a put needs exactly one of value and value_b64".to_string(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    fn access(read: &[&str], write: &[&str]) -> DataAccess {
        DataAccess {
            read_prefixes: read.iter().map(|s| s.to_string()).collect(),
            write_prefixes: write.iter().map(|s| s.to_string()).collect(),
        }
    }

    struct Conn {
        reader: BufReader<tokio::net::unix::OwnedReadHalf>,
        writer: tokio::net::unix::OwnedWriteHalf,
    }

    impl Conn {
        async fn open(path: &Path) -> Conn {
            let stream = UnixStream::connect(path).await.expect("connect");
            let (read, writer) = stream.into_split();
            Conn {
                reader: BufReader::new(read),
                writer,
            }
        }

        async fn send_raw(&mut self, bytes: &[u8]) {
            self.writer.write_all(bytes).await.expect("write request");
        }

        async fn recv(&mut self) -> Option<Value> {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.expect("read reply");
            if n == 0 {
                return None;
            }
            assert!(line.ends_with('\n'), "reply without newline: {line:?}");
            Some(serde_json::from_str(&line).expect("reply is JSON"))
        }

        async fn call(&mut self, request: Value) -> Value {
            let mut line = serde_json::to_vec(&request).expect("json");
            line.push(b'\n');
            self.send_raw(&line).await;
            self.recv().await.expect("a reply")
        }
    }

    async fn serve(access: DataAccess) -> (tempfile::TempDir, DataSocket) {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = bind(
            &dir.path().join("data.sock"),
            access,
            Arc::new(MemoryBackend::new()),
        )
        .await
        .expect("bind");
        (dir, socket)
    }

    #[test]
    fn access_rules_follow_the_prefixes() {
        let a = access(&["public/"], &["fn/a/"]);
        assert!(a.can_read("public/x"));
        assert!(a.can_read("fn/a/x"), "a write prefix is readable too");
        assert!(!a.can_read("fn/b/x"));
        assert!(a.can_write("fn/a/x"));
        assert!(!a.can_write("public/x"));
        assert!(a.can_list("public/"));
        assert!(a.can_list("fn/a/sub"));
        assert!(!a.can_list("fn/"), "listing fn/ would show fn/b/");
        assert!(!a.can_list(""));
        let none = DataAccess::default();
        assert!(!none.can_read("x") && !none.can_write("x") && !none.can_list(""));
        assert!(access(&[""], &[]).can_list(""));
        assert_eq!(none.describe(), "this function has no access to the store");
        assert_eq!(
            a.describe(),
            r#"this function may read keys starting with "public/", "fn/a/" and write keys starting with "fn/a/""#
        );
    }

    #[tokio::test]
    async fn get_put_list_delete_round_trip() {
        let (_dir, socket) = serve(access(&[], &["app/"])).await;
        let mut c = Conn::open(socket.path()).await;

        let r = c.call(json!({"op": "get", "key": "app/a"})).await;
        assert_eq!(r, json!({"ok": true, "found": false}));

        let r = c
            .call(json!({"op": "put", "key": "app/a", "value": "one"}))
            .await;
        assert_eq!(r, json!({"ok": true, "version": 1}));
        let r = c
            .call(json!({"op": "put", "key": "app/b", "value_b64": "AP8=", "expect_version": 0}))
            .await;
        assert_eq!(r, json!({"ok": true, "version": 2}));

        let r = c.call(json!({"op": "get", "key": "app/a"})).await;
        assert_eq!(
            r,
            json!({"ok": true, "found": true, "value": "one", "version": 1})
        );
        // Binary values come back as base64.
        let r = c.call(json!({"op": "get", "key": "app/b"})).await;
        assert_eq!(
            r,
            json!({"ok": true, "found": true, "value_b64": "AP8=", "version": 2})
        );

        let r = c
            .call(json!({"op": "put", "key": "app/a", "value": "two", "expect_version": 5}))
            .await;
        assert_eq!(r["ok"], false);
        assert_eq!(r["code"], "conflict");
        assert_eq!(r["current"], 1);
        assert_eq!(r["error"], r#""app/a" is at version 1, not the expected 5"#);

        let r = c
            .call(json!({"op": "list", "prefix": "app/", "limit": 1}))
            .await;
        assert_eq!(
            r,
            json!({"ok": true, "entries": [{"key": "app/a", "value": "one", "version": 1}], "next": "app/a"})
        );
        let r = c
            .call(json!({"op": "list", "prefix": "app/", "start_after": "app/a"}))
            .await;
        assert_eq!(
            r,
            json!({"ok": true, "entries": [{"key": "app/b", "value_b64": "AP8=", "version": 2}]})
        );

        let r = c
            .call(json!({"op": "delete", "key": "app/a", "expect_version": 1}))
            .await;
        assert_eq!(r, json!({"ok": true, "version": 1}));
        let r = c.call(json!({"op": "delete", "key": "app/a"})).await;
        assert_eq!(r["code"], "not_found");
        assert_eq!(r["error"], r#""app/a" does not exist"#);
        let r = c.call(json!({"op": "get", "key": "app/a"})).await;
        assert_eq!(r, json!({"ok": true, "found": false}));
    }

    #[tokio::test]
    async fn accesses_outside_the_grant_are_denied_and_logged() {
        let (_dir, socket) = serve(access(&["shared/"], &["own/"])).await;
        let mut c = Conn::open(socket.path()).await;

        let r = c.call(json!({"op": "get", "key": "secret/x"})).await;
        assert_eq!(r["ok"], false);
        assert_eq!(r["code"], "denied");
        assert_eq!(
            r["error"],
            r#"get of "secret/x" denied: this function may read keys starting with "shared/", "own/" and write keys starting with "own/""#
        );
        let r = c
            .call(json!({"op": "put", "key": "shared/x", "value": "v"}))
            .await;
        assert_eq!(r["code"], "denied");
        assert!(r["error"]
            .as_str()
            .expect("message")
            .starts_with(r#"put of "shared/x" denied"#));
        let r = c.call(json!({"op": "delete", "key": "shared/x"})).await;
        assert_eq!(r["code"], "denied");
        let r = c.call(json!({"op": "list", "prefix": ""})).await;
        assert_eq!(r["code"], "denied");

        // Allowed accesses still work on the same connection.
        let r = c
            .call(json!({"op": "put", "key": "own/x", "value": "v"}))
            .await;
        assert_eq!(r, json!({"ok": true, "version": 1}));
        let r = c.call(json!({"op": "get", "key": "shared/y"})).await;
        assert_eq!(r, json!({"ok": true, "found": false}));
        let r = c.call(json!({"op": "list", "prefix": "own/"})).await;
        assert_eq!(r["entries"][0]["key"], "own/x");

        let record = |op, key: &str, version, allowed| AccessRecord {
            op,
            key: key.to_string(),
            version,
            allowed,
        };
        let taken = socket.access_log().take();
        assert_eq!(taken.dropped, 0);
        assert_eq!(
            taken.records,
            vec![
                record(AccessOp::Get, "secret/x", 0, false),
                record(AccessOp::Put, "shared/x", 0, false),
                record(AccessOp::Delete, "shared/x", 0, false),
                record(AccessOp::List, "", 0, false),
                record(AccessOp::Put, "own/x", 1, true),
                record(AccessOp::Get, "shared/y", 0, true),
                record(AccessOp::List, "own/", 1, true),
            ]
        );
        assert_eq!(socket.access_log().take(), Accesses::default());
    }

    #[tokio::test]
    async fn malformed_lines_get_an_error_and_the_connection_stays_usable() {
        let (_dir, socket) = serve(access(&["a/"], &[])).await;
        let mut c = Conn::open(socket.path()).await;
        for bad in [
            &b"not json\n"[..],
            b"{\"op\":\"get\"}\n",
            b"{\"op\":\"rename\",\"key\":\"a/x\"}\n",
            b"{\"op\":\"put\",\"key\":\"a/x\",\"value\":\"v\",\"expected_version\":1}\n",
            b"\xff\xfe\n",
            b"\n",
        ] {
            c.send_raw(bad).await;
            let r = c.recv().await.expect("a reply");
            assert_eq!(r["ok"], false, "{bad:?}");
            assert_eq!(r["code"], "invalid", "{bad:?}");
            assert!(
                r["error"]
                    .as_str()
                    .expect("message")
                    .starts_with("malformed request: "),
                "{r}"
            );
        }
        // Well-formed but invalid: the key is checked, and a put needs one value field.
        let r = c.call(json!({"op": "get", "key": ""})).await;
        assert_eq!(r["code"], "invalid");
        assert_eq!(r["error"], "key is empty");
        let r = c
            .call(json!({"op": "put", "key": "a/x", "value": "v", "value_b64": "dg=="}))
            .await;
        assert_eq!(r["error"], "a put needs exactly one of value and value_b64");
        let r = c
            .call(json!({"op": "put", "key": "a/x", "value_b64": "not base64!"}))
            .await;
        assert_eq!(r["code"], "invalid");
        let r = c.call(json!({"op": "get", "key": "a/x"})).await;
        assert_eq!(r, json!({"ok": true, "found": false}));
    }

    #[tokio::test]
    async fn an_overlong_line_is_refused_and_the_connection_closed() {
        let (_dir, socket) = serve(access(&[""], &[""])).await;
        // A value at the limit fits in one line.
        let mut c = Conn::open(socket.path()).await;
        let value = "v".repeat(VALUE_BYTES_MAX);
        let r = c
            .call(json!({"op": "put", "key": "big", "value": value}))
            .await;
        assert_eq!(r, json!({"ok": true, "version": 1}));
        let r = c
            .call(json!({"op": "put", "key": "big", "value": format!("{value}v")}))
            .await;
        assert_eq!(r["code"], "invalid");
        assert_eq!(r["error"], "value is 1048577 bytes, the limit is 1048576");

        let mut c = Conn::open(socket.path()).await;
        let writer = tokio::spawn(async move {
            let line = vec![b' '; REQUEST_LINE_BYTES_MAX + 10];
            // The server may close before reading everything: a failed write is expected.
            let _ = c.writer.write_all(&line).await;
            c.reader
        });
        let mut reader = writer.await.expect("writer task");
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("read reply");
        let r: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(r["code"], "invalid");
        assert_eq!(
            r["error"],
            format!("request line is longer than {REQUEST_LINE_BYTES_MAX} bytes; closing")
        );
        // Then the end: the server closed with our unread bytes queued, which Linux reports as
        // a reset once the reply has been read.
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(n) => assert_eq!(n, 0, "{line:?}"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        }
    }

    #[tokio::test]
    async fn the_access_log_keeps_its_bound_and_counts_the_rest() {
        let (_dir, socket) = serve(access(&["k/"], &[])).await;
        let extra = 5;
        let total = ACCESS_RECORDS_MAX + extra;
        let stream = UnixStream::connect(socket.path()).await.expect("connect");
        let (read, mut write) = stream.into_split();
        let sender = tokio::spawn(async move {
            for i in 0..total {
                let line = format!("{{\"op\":\"get\",\"key\":\"k/{i}\"}}\n");
                write.write_all(line.as_bytes()).await.expect("write");
            }
            write
        });
        let mut lines = BufReader::new(read).lines();
        for _ in 0..total {
            let line = lines.next_line().await.expect("read").expect("a reply");
            assert_eq!(line, r#"{"ok":true,"found":false}"#);
        }
        let _write = sender.await.expect("sender");
        let taken = socket.access_log().take();
        assert_eq!(taken.records.len(), ACCESS_RECORDS_MAX);
        assert_eq!(taken.dropped, extra as u64);
        assert_eq!(taken.records[0].key, "k/0");
        assert_eq!(
            taken.records[ACCESS_RECORDS_MAX - 1].key,
            format!("k/{}", ACCESS_RECORDS_MAX - 1)
        );
    }

    #[tokio::test]
    async fn large_list_pages_are_cut_by_bytes_with_a_next_key() {
        let (_dir, socket) = serve(access(&[], &["l/"])).await;
        let mut c = Conn::open(socket.path()).await;
        let value = "x".repeat(VALUE_BYTES_MAX);
        for i in 0..6 {
            let r = c
                .call(json!({"op": "put", "key": format!("l/{i}"), "value": value}))
                .await;
            assert_eq!(r["ok"], true);
        }
        let mut seen = Vec::new();
        let mut start_after: Option<String> = None;
        loop {
            let r = c
                .call(json!({"op": "list", "prefix": "l/", "start_after": start_after}))
                .await;
            let entries = r["entries"].as_array().expect("entries");
            assert!(
                !entries.is_empty() && entries.len() <= 4,
                "{}",
                entries.len()
            );
            seen.extend(
                entries
                    .iter()
                    .map(|e| e["key"].as_str().expect("key").to_string()),
            );
            match r.get("next").and_then(Value::as_str) {
                Some(next) => start_after = Some(next.to_string()),
                None => break,
            }
        }
        let want: Vec<String> = (0..6).map(|i| format!("l/{i}")).collect();
        assert_eq!(seen, want);
    }

    #[tokio::test]
    async fn connections_past_the_bound_are_refused_with_a_reason() {
        let (_dir, socket) = serve(access(&["k/"], &[])).await;
        let mut open = Vec::new();
        for _ in 0..CONNECTIONS_MAX {
            let mut c = Conn::open(socket.path()).await;
            // A round trip proves the connection is being served.
            let r = c.call(json!({"op": "get", "key": "k/x"})).await;
            assert_eq!(r["ok"], true);
            open.push(c);
        }
        let mut refused = Conn::open(socket.path()).await;
        let r = refused.recv().await.expect("a refusal");
        assert_eq!(r["code"], "unavailable");
        assert_eq!(
            r["error"],
            format!(
                "the store is unavailable: too many connections: at most {CONNECTIONS_MAX} at once"
            )
        );
        assert!(refused.recv().await.is_none());
        // Closing one frees a slot; the server notices the close asynchronously, so a new
        // connection may be refused a few times first.
        drop(open.pop());
        let mut again = false;
        for _ in 0..100 {
            let mut c = Conn::open(socket.path()).await;
            // A refused connection may already be closed: the write may fail, the read tells.
            let _ = c
                .writer
                .write_all(b"{\"op\":\"get\",\"key\":\"k/x\"}\n")
                .await;
            if c.recv().await.is_some_and(|r| r["ok"] == true) {
                again = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(again, "a slot was freed");
    }

    #[tokio::test]
    async fn binding_replaces_a_stale_socket_and_dropping_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data.sock");
        let stale = std::os::unix::net::UnixListener::bind(&path).expect("stale socket");
        drop(stale);
        let socket = bind(&path, DataAccess::default(), Arc::new(MemoryBackend::new()))
            .await
            .expect("bind over a stale socket");
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660);
        let dir_meta = std::fs::metadata(dir.path()).expect("directory");
        assert_eq!(dir_meta.permissions().mode() & 0o777, 0o710);
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::MetadataExt;
            let group = skiff_sandbox::host_id_range().group();
            let meta = std::fs::metadata(&path).expect("socket");
            assert_eq!((meta.uid(), meta.gid()), (0, group));
            assert_eq!((dir_meta.uid(), dir_meta.gid()), (0, group));
        }
        drop(socket);
        assert!(!path.exists());

        std::fs::write(&path, b"not a socket").expect("write");
        let err = bind(&path, DataAccess::default(), Arc::new(MemoryBackend::new()))
            .await
            .expect_err("a regular file is in the way");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).expect("still there"), b"not a socket");
    }

    #[tokio::test]
    async fn a_failing_backend_is_unavailable_and_not_logged() {
        struct Down;
        impl KvBackend for Down {
            fn get(&self, _: String) -> BoxFuture<'static, Result<Option<KvEntry>, String>> {
                Box::pin(async { Err("no leader".to_string()) })
            }
            fn put(
                &self,
                _: String,
                _: Vec<u8>,
                _: Option<u64>,
            ) -> BoxFuture<'static, Result<CommandResult, String>> {
                Box::pin(async { Err("no leader".to_string()) })
            }
            fn delete(
                &self,
                _: String,
                _: Option<u64>,
            ) -> BoxFuture<'static, Result<CommandResult, String>> {
                Box::pin(async { Err("no leader".to_string()) })
            }
            fn list(
                &self,
                _: String,
                _: Option<String>,
                _: u32,
            ) -> BoxFuture<'static, Result<KvPage, String>> {
                // A broken backend that lists outside the prefix must not leak the key.
                Box::pin(async {
                    Ok(KvPage {
                        entries: vec![KvEntry {
                            key: "other/secret".to_string(),
                            value: b"s".to_vec(),
                            version: 1,
                            create_version: 1,
                        }],
                        next: None,
                        revision: 1,
                    })
                })
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = bind(
            &dir.path().join("d.sock"),
            access(&[""], &[""]),
            Arc::new(Down),
        )
        .await
        .expect("bind");
        let mut c = Conn::open(socket.path()).await;
        let r = c.call(json!({"op": "get", "key": "x"})).await;
        assert_eq!(r["code"], "unavailable");
        assert_eq!(r["error"], "the store is unavailable: no leader");
        let r = c.call(json!({"op": "list", "prefix": "mine"})).await;
        assert_eq!(r["code"], "unavailable");
        assert!(!r.to_string().contains("\"s\""), "{r}");
        assert_eq!(socket.access_log().take(), Accesses::default());
    }

    #[test]
    fn the_access_log_bound_holds_without_a_socket() {
        let log = AccessLog::new(2);
        for i in 0..5 {
            log.record(AccessRecord {
                op: AccessOp::Get,
                key: format!("k{i}"),
                version: i,
                allowed: true,
            });
        }
        let taken = log.take();
        assert_eq!(taken.records.len(), 2);
        assert_eq!(taken.records[1].key, "k1");
        assert_eq!(taken.dropped, 3);
        assert_eq!(log.take(), Accesses::default());
    }
}
