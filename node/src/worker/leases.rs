//! What runs and warm sandboxes hold while they use it — the unpacked code of a function
//! version and the data socket bound into its sandbox — and its release once the applied
//! state no longer needs it.
//!
//! Invariants: at most [`DATA_SOCKETS_MAX`] data sockets are bound, and a socket some run or
//! warm sandbox holds is never closed; unpacked code is leased, so the cache never removes
//! what is in use.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use skiff_client::api::FunctionVersion;
use skiff_raft_store::functions::{DataGrant, FunctionId};
use skiff_sandbox::PoolKey;

use super::output::INCOMPLETE_READS;
use super::{lock, Worker};
use crate::code_cache::CodeLease;
use crate::data_service::{self, DataAccess, DataSocket, KvBackend, NodeKv};
use crate::replica::Replica;

/// Most data sockets a node keeps bound; past it unused ones are closed first.
pub const DATA_SOCKETS_MAX: usize = 1024;
/// How long a worker waits for a code archive to reach its applied state.
const CODE_WAIT: Duration = Duration::from_secs(10);
/// How often a run waiting for its code looks at the applied state again.
const CODE_POLL: Duration = Duration::from_millis(50);

/// The code cache could not lease a function's code: a bad digest, an archive not in this
/// node's state within [`CODE_WAIT`], a full cache or an archive that does not unpack (the
/// cache's own words).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct CodeError(String);

/// Why a data socket could not be had for a sandbox.
#[derive(Debug, thiserror::Error)]
pub(super) enum DataSocketError {
    #[error("this node serves {} data sockets, all in use", DATA_SOCKETS_MAX)]
    Full,
    #[error("creating {}: {source}", .dir.display())]
    CreateDir { dir: PathBuf, source: io::Error },
    #[error("binding the data socket {}: {source}", .path.display())]
    Bind { path: PathBuf, source: io::Error },
}

/// Which socket: function name, identity, version, and the stage index for a staged
/// function.
pub(super) type SocketKey = (String, FunctionId, u64, Option<usize>);

/// What a run or a prepared sandbox uses and must outlive it: the unpacked code and the data
/// socket bound into it.
#[derive(Clone)]
pub(super) struct Leases {
    pub(super) _code: CodeLease,
    pub(super) _socket: Option<Arc<DataSocket>>,
}

impl Worker {
    /// A lease on the unpacked code of `digest`, unpacking it on first use.
    pub(super) async fn code_dir(
        &self,
        node: &Replica,
        digest: &str,
    ) -> Result<CodeLease, CodeError> {
        self.code
            .lease(digest, || async {
                let deadline = Instant::now() + CODE_WAIT;
                loop {
                    if let Some(a) = node.state(|sm| sm.sched().code_archive(digest)) {
                        return Ok(a);
                    }
                    if Instant::now() > deadline {
                        return Err(format!("code {digest} is not in this node's state"));
                    }
                    tokio::time::sleep(CODE_POLL).await;
                }
            })
            .await
            .map_err(CodeError)
    }

    /// The data-service socket of a function version (or of one of its stages) serving
    /// `grant`, bound on first use.
    pub(super) async fn data_socket(
        &self,
        node: &Replica,
        fv: &FunctionVersion,
        stage: Option<usize>,
        grant: &DataGrant,
    ) -> Result<Arc<DataSocket>, DataSocketError> {
        let key = (fv.spec.name.clone(), fv.function_id, fv.version, stage);
        let mut sockets = self.data_sockets.lock().await;
        if let Some(s) = sockets.get(&key) {
            return Ok(s.clone());
        }
        if sockets.len() >= DATA_SOCKETS_MAX {
            // Unused sockets go first; they are bound again when next needed.
            sockets.retain(|_, s| Arc::strong_count(s) > 1);
            if sockets.len() >= DATA_SOCKETS_MAX {
                return Err(DataSocketError::Full);
            }
        }
        let dir = self
            .settings
            .code_cache_dir
            .with_file_name("sock")
            .join(format!("node-{}-{}", self.id, std::process::id()));
        if let Err(source) = std::fs::create_dir_all(&dir) {
            return Err(DataSocketError::CreateDir { dir, source });
        }
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
        }
        let file = match stage {
            None => format!("{}-{}-{}.sock", fv.spec.name, fv.function_id, fv.version),
            Some(i) => format!(
                "{}-{}-{}-stage{}.sock",
                fv.spec.name,
                fv.function_id,
                fv.version,
                i + 1
            ),
        };
        let path = dir.join(file);
        let access = DataAccess {
            read_prefixes: grant.read_prefixes.clone(),
            write_prefixes: grant.write_prefixes.clone(),
        };
        let backend: Arc<dyn KvBackend> = Arc::new(NodeKv::new(node.clone()));
        let socket = data_service::bind(&path, access, backend)
            .await
            .map_err(|source| DataSocketError::Bind {
                path: path.clone(),
                source,
            })?;
        let socket = Arc::new(socket);
        sockets.insert(key, socket.clone());
        Ok(socket)
    }

    /// The reads a run (the sandbox running as `uid`) made through the data service. When
    /// the log could not hold them all, a marker read no state can match makes sure the run's
    /// result is never reused as an idempotent hit.
    pub(super) async fn take_reads(
        &self,
        fv: &FunctionVersion,
        stage: Option<usize>,
        uid: u32,
    ) -> Vec<(String, u64)> {
        let socket = self
            .data_sockets
            .lock()
            .await
            .get(&(fv.spec.name.clone(), fv.function_id, fv.version, stage))
            .cloned();
        let Some(socket) = socket else {
            return Vec::new();
        };
        let accesses = socket.access_log().take_for(uid);
        let mut reads: Vec<(String, u64)> = accesses
            .records
            .into_iter()
            .filter(|r| r.allowed && r.op == crate::data_service::AccessOp::Get)
            .map(|r| (r.key, r.version))
            .collect();
        if accesses.dropped > 0 {
            reads.push((INCOMPLETE_READS.to_string(), u64::MAX));
        }
        reads.truncate(skiff_raft_store::functions::TRACKED_READS_MAX);
        reads
    }

    /// Keeps what the idle warm sandboxes of `key` use while they wait.
    pub(super) fn hold_for_warm(&self, key: &PoolKey, leases: Leases) {
        lock(&self.warm_leases).entry(key.clone()).or_insert(leases);
    }

    /// Releases what the applied state no longer needs: warm sandboxes of function versions
    /// it no longer holds (a removed function, a version past the kept ones, or a function
    /// made again under the same name: another identity), data sockets no run or warm
    /// sandbox uses unless they serve a function's latest version, and unpacked code no
    /// kept version refers to.
    pub async fn sweep(&self, node: &Replica) {
        type Ident = (String, FunctionId, u64);
        let (live, latest, wanted) = node.state(|sm| {
            let mut live: std::collections::HashSet<Ident> = Default::default();
            let mut latest: std::collections::HashSet<Ident> = Default::default();
            let mut wanted: std::collections::HashSet<String> = Default::default();
            for f in sm.sched().functions() {
                for v in &f.versions {
                    live.insert((f.name.clone(), f.id, v.version));
                    wanted.insert(v.spec.code_digest.clone());
                }
                latest.insert((f.name.clone(), f.id, f.latest));
            }
            (live, latest, wanted)
        });
        let ident = |k: &PoolKey| (k.function.clone(), k.function_id, k.version);
        let dropped = self.pool.discard_where(|k| !live.contains(&ident(k)));
        if dropped > 0 {
            tracing::debug!(
                dropped,
                "warm sandboxes of removed function versions discarded"
            );
            self.pool_changed.notify_one();
        }
        lock(&self.warm_leases).retain(|k, _| self.pool.idle_count(k) > 0);
        lock(&self.prewarming).retain(|_, n| *n > 0);
        lock(&self.busy).retain(|_, n| *n > 0);
        self.data_sockets
            .lock()
            .await
            .retain(|(name, id, version, _), s| {
                Arc::strong_count(s) > 1 || latest.contains(&(name.clone(), *id, *version))
            });
        let removed = self.code.sweep(&wanted);
        if !removed.is_empty() {
            tracing::debug!(count = removed.len(), "unused code removed from the cache");
        }
    }
}
