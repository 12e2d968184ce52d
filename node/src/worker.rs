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

use skiff_raft_store::model::Principal;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skiff_client::api::{
    ApiError, ClientCommand, Command, CommandResult, FnMode, FunctionVersion, NodeId, RequestId,
    RunStatus, Task, TaskId, TaskResult, TaskState, WarmReport,
};
use skiff_raft_store::functions::{
    DataGrant, FunctionId, Heartbeat, StageSpec, LOG_BYTES_MAX, OUTPUT_BYTES_MAX, STAGES_MAX,
};
use skiff_sandbox::{
    ExitStatus, Policy, PoolConfig, PoolKey, PoolMode, SandboxError, SandboxSpec, Tier, WarmPool,
    WarmSandbox,
};
use tokio::sync::{Notify, Semaphore};

use crate::code_cache::{CodeCache, CodeLease};
use crate::config::WorkerSettings;
use crate::data_service::{self, DataAccess, DataSocket, KvBackend};
use crate::peer::{ReadOp, ReadResult};
use crate::server::Node;

/// Most data sockets a node keeps bound; past it unused ones are closed first.
pub const DATA_SOCKETS_MAX: usize = 1024;
/// How long a worker waits for a code archive to reach its applied state.
const CODE_WAIT: Duration = Duration::from_secs(10);
/// The read recorded when a run's data-service reads did not all fit in the access log.
const INCOMPLETE_READS: &str = "(reads not fully tracked)";
/// How long a worker keeps retrying to report a completion.
const REPORT_DEADLINE: Duration = Duration::from_secs(120);

/// Most stderr bytes of one stage kept in a successful pipeline's log (the log as a whole is
/// still bounded by `LOG_BYTES_MAX`), so one chatty stage cannot push the others out.
const STAGE_LOG_BYTES_MAX: usize = LOG_BYTES_MAX / STAGES_MAX;

/// Which socket: function name, identity, version, and the stage index for a staged
/// function.
type SocketKey = (String, FunctionId, u64, Option<usize>);

/// What a run or a prepared sandbox uses and must outlive it: the unpacked code and the data
/// socket bound into it.
#[derive(Clone)]
struct Leases {
    _code: CodeLease,
    _socket: Option<Arc<DataSocket>>,
}

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
    request_client: u64,
    request_seq: AtomicU64,
}

impl Worker {
    pub fn new(id: NodeId, settings: WorkerSettings) -> Self {
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
            request_client: rand::random(),
            request_seq: AtomicU64::new(0),
        }
    }

    /// A fresh request id for a command this node proposes itself.
    pub fn next_request_id(&self) -> RequestId {
        RequestId {
            client: self.request_client,
            seq: self.request_seq.fetch_add(1, Ordering::Relaxed),
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

    /// A lease on the unpacked code of `digest`, unpacking it on first use.
    async fn code_dir(&self, node: &Node, digest: &str) -> Result<CodeLease, String> {
        self.code
            .lease(digest, || async {
                let deadline = Instant::now() + CODE_WAIT;
                loop {
                    if let Some(a) = node.0.store.read(|sm| sm.sched().code_archive(digest)) {
                        return Ok(a);
                    }
                    if Instant::now() > deadline {
                        return Err(format!("code {digest} is not in this node's state"));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await
    }

    /// The sandbox a function version runs in, and what it uses.
    async fn sandbox_spec(
        &self,
        node: &Node,
        fv: &FunctionVersion,
    ) -> Result<(SandboxSpec, Leases), String> {
        let tier: Tier = fv.spec.tier.parse().map_err(|e| format!("{e}"))?;
        let policy = function_policy(&fv.spec)?;
        let code = self.code_dir(node, &fv.spec.code_digest).await?;
        let mut spec =
            SandboxSpec::with_policy(tier, &policy, code.dir()).map_err(|e| e.to_string())?;
        spec.env = fv.spec.env.clone();
        let mut socket = None;
        if !fv.spec.data.is_empty() {
            let s = self.data_socket(node, fv, None, &fv.spec.data).await?;
            spec.data_socket = Some(s.path().to_path_buf());
            spec.helper_binary = self.helper_binary.clone();
            socket = Some(s);
        }
        let leases = Leases {
            _code: code,
            _socket: socket,
        };
        Ok((spec, leases))
    }

    /// The sandbox of stage `index` of a staged function version, given the time left of the
    /// pipeline: the stage's tier narrowed by its policy, the function's memory and that time;
    /// its own environment, and a data socket limited to its own grant (none without one).
    async fn stage_sandbox_spec(
        &self,
        node: &Node,
        fv: &FunctionVersion,
        index: usize,
        code: &Path,
        remaining_ms: u64,
    ) -> Result<(SandboxSpec, Option<Arc<DataSocket>>), String> {
        let stage = &fv.spec.stages[index];
        let tier: Tier = stage.tier.parse().map_err(|e| format!("{e}"))?;
        let policy = stage_policy(&fv.spec, stage, tier, remaining_ms)?;
        let mut spec = SandboxSpec::with_policy(tier, &policy, code).map_err(|e| e.to_string())?;
        spec.env = stage.env.clone();
        let mut socket = None;
        if !stage.data.is_empty() {
            let s = self.data_socket(node, fv, Some(index), &stage.data).await?;
            spec.data_socket = Some(s.path().to_path_buf());
            spec.helper_binary = self.helper_binary.clone();
            socket = Some(s);
        }
        Ok((spec, socket))
    }

    /// The data-service socket of a function version (or of one of its stages) serving
    /// `grant`, bound on first use.
    async fn data_socket(
        &self,
        node: &Node,
        fv: &FunctionVersion,
        stage: Option<usize>,
        grant: &DataGrant,
    ) -> Result<Arc<DataSocket>, String> {
        let key = (fv.spec.name.clone(), fv.function_id, fv.version, stage);
        let mut sockets = self.data_sockets.lock().await;
        if let Some(s) = sockets.get(&key) {
            return Ok(s.clone());
        }
        if sockets.len() >= DATA_SOCKETS_MAX {
            // Unused sockets go first; they are bound again when next needed.
            sockets.retain(|_, s| Arc::strong_count(s) > 1);
            if sockets.len() >= DATA_SOCKETS_MAX {
                return Err(format!(
                    "this node serves {DATA_SOCKETS_MAX} data sockets, all in use"
                ));
            }
        }
        let dir = self
            .settings
            .code_cache_dir
            .with_file_name("sock")
            .join(format!("node-{}-{}", self.id, std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
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
        let backend: Arc<dyn KvBackend> = Arc::new(NodeKv(node.clone()));
        let socket = data_service::bind(&path, access, backend)
            .await
            .map_err(|e| format!("binding the data socket {}: {e}", path.display()))?;
        let socket = Arc::new(socket);
        sockets.insert(key, socket.clone());
        Ok(socket)
    }

    /// How many idle sandboxes of `fv` this node should hold: its share of the function's
    /// min-warm over the live nodes, and at least one after a recent use.
    fn warm_target(&self, node: &Node, fv: &FunctionVersion, used: bool) -> usize {
        let min_warm = fv.spec.min_warm as usize;
        let share = node.0.store.read(|sm| {
            let live = sm.sched().live_nodes(sm.last_time_ms());
            match live.iter().position(|n| *n == self.id) {
                Some(rank) if !live.is_empty() => {
                    min_warm / live.len() + usize::from(rank < min_warm % live.len())
                }
                _ => 0,
            }
        });
        share.max(usize::from(used && self.settings.keep_warm_after_use))
    }

    /// Starts pre-warming sandboxes of `fv` up to `target` (in the background).
    fn replenish(
        self: &Arc<Self>,
        spec: SandboxSpec,
        leases: &Leases,
        fv: &FunctionVersion,
        target: usize,
    ) {
        let key = Self::key(fv);
        let have =
            self.pool.idle_count(&key) + lock(&self.prewarming).get(&key).copied().unwrap_or(0);
        if have >= target {
            return;
        }
        let argv = match fv.spec.mode {
            FnMode::Exec => None,
            FnMode::Serve => Some(fv.spec.entry.clone()),
        };
        for _ in have..target {
            *lock(&self.prewarming).entry(key.clone()).or_default() += 1;
            let w = self.clone();
            let (key, spec, argv) = (key.clone(), spec.clone(), argv.clone());
            let leases = leases.clone();
            tokio::spawn(async move {
                let result = w.pool.prewarm(key.clone(), spec, argv).await;
                if let Some(n) = lock(&w.prewarming).get_mut(&key) {
                    *n = n.saturating_sub(1);
                }
                match result {
                    Ok(true) => w.hold_for_warm(&key, leases),
                    Ok(false) => tracing::debug!(function = %key.function, "warm pool full"),
                    Err(error) => {
                        tracing::warn!(function = %key.function, %error, "pre-warm failed")
                    }
                }
                w.warmed.notify_waiters();
                w.pool_changed.notify_one();
            });
        }
    }

    /// Keeps what the idle warm sandboxes of `key` use while they wait.
    fn hold_for_warm(&self, key: &PoolKey, leases: Leases) {
        lock(&self.warm_leases).entry(key.clone()).or_insert(leases);
    }

    /// Releases what the applied state no longer needs: warm sandboxes of function versions
    /// it no longer holds (a removed function, a version past the kept ones, or a function
    /// made again under the same name: another identity), data sockets no run or warm
    /// sandbox uses unless they serve a function's latest version, and unpacked code no
    /// kept version refers to.
    pub async fn sweep(&self, node: &Node) {
        type Ident = (String, FunctionId, u64);
        let (live, latest, wanted) = node.0.store.read(|sm| {
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

    /// An idle warm sandbox for `key`, waiting up to the cold-start wait for one being
    /// prepared rather than cold-starting another (exec mode; serve mode: `claim_serve`).
    async fn take_warm(&self, key: &PoolKey) -> Option<WarmSandbox> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.cold_start_wait_ms);
        loop {
            let notified = self.warmed.notified();
            if let Some(s) = self.pool.acquire(key) {
                self.pool_changed.notify_one();
                return Some(s);
            }
            if lock(&self.prewarming).get(key).copied().unwrap_or(0) == 0 {
                return None;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// A serve-mode sandbox for one request: an idle one, or (after waiting up to the
    /// cold-start wait for one in use or being prepared to come back) `None`, meaning the
    /// caller starts one. Either way the caller is counted busy for `key`, decided under one
    /// lock, so requests arriving together do not all cold-start: one does, the others wait
    /// for its sandbox.
    async fn claim_serve(&self, key: &PoolKey) -> Option<WarmSandbox> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.cold_start_wait_ms);
        loop {
            let notified = self.warmed.notified();
            {
                let mut busy = lock(&self.busy);
                if let Some(s) = self.pool.acquire(key) {
                    *busy.entry(key.clone()).or_default() += 1;
                    self.pool_changed.notify_one();
                    return Some(s);
                }
                let pending = lock(&self.prewarming).get(key).copied().unwrap_or(0)
                    + busy.get(key).copied().unwrap_or(0);
                if pending == 0 || tokio::time::Instant::now() >= deadline {
                    *busy.entry(key.clone()).or_default() += 1;
                    return None;
                }
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// Runs one attempt and returns its result (never fails: errors become failed results)
    /// and the keys it read through the data service with the versions it saw.
    async fn execute(
        self: &Arc<Self>,
        node: &Node,
        task: &Task,
        fv: &FunctionVersion,
    ) -> (TaskResult, Vec<(String, u64)>) {
        if fv.spec.is_staged() {
            return self.execute_stages(node, task, fv).await;
        }
        let (spec, leases) = match self.sandbox_spec(node, fv).await {
            Ok(s) => s,
            Err(e) => {
                return (
                    self.failed(format!("cannot prepare the sandbox: {e}")),
                    Vec::new(),
                )
            }
        };
        let key = Self::key(fv);
        let argv = fv.spec.entry.clone();
        let started = Instant::now();
        let result = match fv.spec.mode {
            FnMode::Exec => {
                let warm = self.take_warm(&key).await;
                let was_warm = warm.is_some();
                let outcome = match warm {
                    Some(WarmSandbox::Exec(sb)) => sb.run(&argv, &task.payload).await,
                    Some(WarmSandbox::Serve(sb)) => {
                        // A serve sandbox under an exec key cannot happen; discard it.
                        drop(tokio::task::spawn_blocking(move || sb.shutdown()));
                        skiff_sandbox::run(&spec, &argv, &task.payload).await
                    }
                    None => skiff_sandbox::run(&spec, &argv, &task.payload).await,
                };
                let uid = outcome.as_ref().ok().map(|o| o.host_uid);
                (self.exec_result(outcome, was_warm, started), uid)
            }
            FnMode::Serve => self.serve(&spec, &leases, key, &argv, task, started).await,
        };
        let (result, uid) = result;
        let reads = match uid {
            Some(uid) => self.take_reads(fv, None, uid).await,
            None => Vec::new(),
        };
        let target = self.warm_target(node, fv, true);
        self.replenish(spec, &leases, fv, target);
        (result, reads)
    }

    /// The reads a run (the sandbox running as `uid`) made through the data service. When
    /// the log could not hold them all, a marker read no state can match makes sure the run's
    /// result is never reused as an idempotent hit.
    async fn take_reads(
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

    /// Runs the stages of a staged function one after the other, each in a fresh sandbox of
    /// its own: the payload into the first, each stage's stdout into the next, the last one's
    /// stdout as the result. The pipeline stops at the first stage that fails, and the result
    /// names it and carries its stderr as the log. Every stage's reads through its own data
    /// socket are returned, for the idempotency ledger.
    async fn execute_stages(
        &self,
        node: &Node,
        task: &Task,
        fv: &FunctionVersion,
    ) -> (TaskResult, Vec<(String, u64)>) {
        let started = Instant::now();
        let code = match self.code_dir(node, &fv.spec.code_digest).await {
            Ok(c) => c,
            Err(e) => {
                return (
                    self.failed(format!("cannot prepare the sandbox: {e}")),
                    Vec::new(),
                )
            }
        };
        let stages = &fv.spec.stages;
        let mut input = task.payload.clone();
        let mut reads: Vec<(String, u64)> = Vec::new();
        let mut log: Vec<u8> = Vec::new();
        let mut cpu = Duration::ZERO;
        let mut peak_memory_bytes = 0u64;
        // Whether the last stage's output was cut by its sandbox.
        let mut cut = false;
        for (index, stage) in stages.iter().enumerate() {
            let label = stage_label(index, stages.len(), stage);
            let elapsed_ms = started.elapsed().as_millis() as u64;
            let remaining_ms = fv.spec.timeout_ms.saturating_sub(elapsed_ms);
            // Ends the pipeline at this stage, with its log and the reads made so far.
            macro_rules! end {
                ($status:expr, $exit_code:expr, $error:expr, $log:expr) => {
                    return (
                        TaskResult {
                            status: $status,
                            node: self.id,
                            exit_code: $exit_code,
                            output: Vec::new(),
                            log: tail($log, LOG_BYTES_MAX),
                            error: Some(truncate_text($error)),
                            warm: false,
                            wall_ms: started.elapsed().as_millis() as u64,
                            cpu_ms: cpu.as_millis() as u64,
                            peak_memory_bytes,
                        },
                        bounded_reads(reads),
                    )
                };
            }
            if remaining_ms == 0 {
                end!(
                    RunStatus::TimedOut,
                    None,
                    format!("{label} timed out: the function's timeout passed before it started"),
                    &[]
                );
            }
            let (spec, _socket) = match self
                .stage_sandbox_spec(node, fv, index, code.dir(), remaining_ms)
                .await
            {
                Ok(s) => s,
                Err(e) => end!(
                    RunStatus::Failed,
                    None,
                    format!("{label}: cannot prepare the sandbox: {e}"),
                    &[]
                ),
            };
            let stdout_bytes_max = spec.limits.stdout_bytes_max;
            let o = match skiff_sandbox::run(&spec, &stage.entry, &input).await {
                Ok(o) => o,
                Err(e) => end!(
                    RunStatus::Failed,
                    None,
                    format!("{label}: sandbox error: {e}"),
                    &[]
                ),
            };
            let stage_reads = self.take_reads(fv, Some(index), o.host_uid).await;
            reads.extend(stage_reads);
            cpu += o.cpu;
            peak_memory_bytes = peak_memory_bytes.max(o.peak_memory_bytes);
            let last = index + 1 == stages.len();
            let failure = match o.status {
                // A cut intermediate output would hand the next stage a different input than
                // the one this stage produced; the last stage's fails the task like a plain
                // function's (below).
                ExitStatus::Exited(0) if o.stdout_truncated && !last => Some((
                    RunStatus::Failed,
                    Some(0),
                    format!(
                        "{label} failed: its output is over its limit of {stdout_bytes_max} bytes"
                    ),
                )),
                ExitStatus::Exited(0) => None,
                ExitStatus::Exited(c) => Some((
                    RunStatus::Failed,
                    Some(c),
                    format!("{label} failed: exit status {c}"),
                )),
                ExitStatus::Signaled(sig) => Some((
                    RunStatus::Failed,
                    None,
                    format!("{label} failed: killed by signal {sig}"),
                )),
                ExitStatus::TimedOut => {
                    Some((RunStatus::TimedOut, None, format!("{label} timed out")))
                }
                ExitStatus::OutOfMemory => Some((
                    RunStatus::Failed,
                    None,
                    format!("{label} failed: out of memory"),
                )),
            };
            if let Some((status, exit_code, error)) = failure {
                end!(status, exit_code, error, &o.stderr);
            }
            if !o.stderr.is_empty() {
                log.extend_from_slice(format!("[{label}]\n").as_bytes());
                log.extend_from_slice(&tail(&o.stderr, STAGE_LOG_BYTES_MAX));
                if !log.ends_with(b"\n") {
                    log.push(b'\n');
                }
            }
            input = o.stdout;
            if last {
                cut = o.stdout_truncated;
            }
        }
        let over = output_over_limit(input.len(), cut);
        input.truncate(OUTPUT_BYTES_MAX);
        let result = TaskResult {
            status: if over.is_some() {
                RunStatus::Failed
            } else {
                RunStatus::Succeeded
            },
            node: self.id,
            exit_code: Some(0),
            output: input,
            log: tail(&log, LOG_BYTES_MAX),
            error: over,
            warm: false,
            wall_ms: started.elapsed().as_millis() as u64,
            cpu_ms: cpu.as_millis() as u64,
            peak_memory_bytes,
        };
        (result, bounded_reads(reads))
    }

    async fn serve(
        &self,
        spec: &SandboxSpec,
        leases: &Leases,
        key: PoolKey,
        argv: &[String],
        task: &Task,
        started: Instant,
    ) -> (TaskResult, Option<u32>) {
        if task.payload.contains(&b'\n') {
            return (
                self.failed("a serve-mode payload must be one line (compact JSON)".into()),
                None,
            );
        }
        let taken = self.claim_serve(&key).await;
        let result = self
            .serve_on(spec, leases, key.clone(), argv, task, started, taken)
            .await;
        if let Some(n) = lock(&self.busy).get_mut(&key) {
            *n = n.saturating_sub(1);
        }
        // A sandbox of this key is back in the pool (or gone): waiting requests look again.
        self.warmed.notify_waiters();
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve_on(
        &self,
        spec: &SandboxSpec,
        leases: &Leases,
        key: PoolKey,
        argv: &[String],
        task: &Task,
        started: Instant,
        taken: Option<WarmSandbox>,
    ) -> (TaskResult, Option<u32>) {
        let (sandbox, warm) = match taken {
            Some(WarmSandbox::Serve(sb)) => (sb, true),
            other => {
                if let Some(WarmSandbox::Exec(sb)) = other {
                    drop(sb);
                }
                let pool = self.pool.clone();
                let (spec, argv, k) = (spec.clone(), argv.to_vec(), key.clone());
                match tokio::task::spawn_blocking(move || pool.start_serve(k, &spec, &argv)).await {
                    Ok(Ok(sb)) => (sb, false),
                    Ok(Err(e)) => {
                        return (self.failed(format!("cannot start the function: {e}")), None)
                    }
                    Err(e) => {
                        return (self.failed(format!("cannot start the function: {e}")), None)
                    }
                }
            }
        };
        let memory = sandbox.memory_bytes();
        let uid = Some(sandbox.host_uid());
        let (sandbox, response) = sandbox.request(task.payload.clone()).await;
        let log = tail(sandbox.log(), LOG_BYTES_MAX);
        if sandbox.is_alive() {
            self.hold_for_warm(&key, leases.clone());
            self.pool.release(key, sandbox);
            self.pool_changed.notify_one();
        } else {
            drop(tokio::task::spawn_blocking(move || sandbox.shutdown()));
        }
        let wall_ms = started.elapsed().as_millis() as u64;
        let result = match response {
            Ok(mut line) => {
                // The sandbox refuses a line over the stdout limit; the result's bound may be
                // smaller.
                let over = output_over_limit(line.len(), false);
                line.truncate(OUTPUT_BYTES_MAX);
                TaskResult {
                    status: if over.is_some() {
                        RunStatus::Failed
                    } else {
                        RunStatus::Succeeded
                    },
                    node: self.id,
                    exit_code: None,
                    output: line,
                    log,
                    error: over,
                    warm,
                    wall_ms,
                    cpu_ms: 0,
                    peak_memory_bytes: memory,
                }
            }
            Err(e) => {
                let text = e.to_string();
                let status = if text.contains("timed out") {
                    RunStatus::TimedOut
                } else {
                    RunStatus::Failed
                };
                TaskResult {
                    status,
                    node: self.id,
                    exit_code: None,
                    output: Vec::new(),
                    log,
                    error: Some(truncate_text(text)),
                    warm,
                    wall_ms,
                    cpu_ms: 0,
                    peak_memory_bytes: memory,
                }
            }
        };
        (result, uid)
    }

    fn exec_result(
        &self,
        outcome: Result<skiff_sandbox::RunOutcome, SandboxError>,
        warm: bool,
        started: Instant,
    ) -> TaskResult {
        let o = match outcome {
            Ok(o) => o,
            Err(e) => {
                let mut r = self.failed(format!("sandbox error: {e}"));
                r.warm = warm;
                r.wall_ms = started.elapsed().as_millis() as u64;
                return r;
            }
        };
        let (status, exit_code, error) = match o.status {
            ExitStatus::Exited(0) => (RunStatus::Succeeded, Some(0), None),
            ExitStatus::Exited(c) => (RunStatus::Failed, Some(c), Some(format!("exit status {c}"))),
            ExitStatus::Signaled(s) => (
                RunStatus::Failed,
                None,
                Some(format!("killed by signal {s}")),
            ),
            ExitStatus::TimedOut => (RunStatus::TimedOut, None, Some("timed out".to_string())),
            ExitStatus::OutOfMemory => (RunStatus::Failed, None, Some("out of memory".to_string())),
        };
        let (status, error) = match output_over_limit(o.stdout.len(), o.stdout_truncated) {
            Some(over) if status == RunStatus::Succeeded => (RunStatus::Failed, Some(over)),
            _ => (status, error),
        };
        let mut output = o.stdout;
        output.truncate(OUTPUT_BYTES_MAX);
        TaskResult {
            status,
            node: self.id,
            exit_code,
            output,
            log: tail(&o.stderr, LOG_BYTES_MAX),
            error,
            warm,
            wall_ms: o.wall.as_millis() as u64,
            cpu_ms: o.cpu.as_millis() as u64,
            peak_memory_bytes: o.peak_memory_bytes,
        }
    }

    fn failed(&self, error: String) -> TaskResult {
        TaskResult {
            status: RunStatus::Failed,
            node: self.id,
            exit_code: None,
            output: Vec::new(),
            log: Vec::new(),
            error: Some(truncate_text(error)),
            warm: false,
            wall_ms: 0,
            cpu_ms: 0,
            peak_memory_bytes: 0,
        }
    }

    /// This node's heartbeat as of now.
    fn heartbeat(&self) -> Heartbeat {
        self.pool.expire_idle();
        let stats = self.pool.stats();
        let warm = self
            .pool
            .idle_by_key()
            .into_iter()
            .map(|(k, idle)| WarmReport {
                function: k.function,
                version: k.version,
                idle: u32::try_from(idle).unwrap_or(u32::MAX),
            })
            .take(skiff_raft_store::functions::HEARTBEAT_ENTRIES_MAX)
            .collect();
        let running = lock(&self.started)
            .iter()
            .map(|(t, k)| (*t, *k))
            .take(skiff_raft_store::functions::HEARTBEAT_ENTRIES_MAX)
            .collect();
        Heartbeat {
            node: self.id,
            slots: self.settings.slots,
            memory_budget_bytes: self.settings.memory_budget_bytes,
            warm_memory_bytes: stats.memory_bytes,
            warm,
            running,
        }
    }
}

/// Runs `task` of `fv` on this node if this process has not started it under its token yet,
/// then reports the result through the log.
pub async fn run_task(node: Node, task: Task, fv: FunctionVersion) {
    let w = node.0.worker.clone();
    if !w.claim(task.id, task.token) {
        return;
    }
    let Ok(_permit) = w.slots.clone().acquire_owned().await else {
        return;
    };
    let request = task
        .request_id
        .map_or_else(|| "-".to_string(), |r| r.to_string());
    tracing::debug!(
        request_id = %request,
        task = task.id,
        token = task.token,
        function = %fv.spec.name,
        version = fv.version,
        "sandbox run starts"
    );
    let (result, reads) = w.execute(&node, &task, &fv).await;
    tracing::debug!(
        request_id = %request,
        task = task.id,
        status = ?result.status,
        warm = result.warm,
        wall_ms = result.wall_ms,
        "sandbox run ends"
    );
    node.0
        .metrics
        .invocation(&fv.spec.name, result.status, result.warm, result.wall_ms);
    report(&node, task.id, task.token, result, reads).await;
}

/// Proposes the completion, retrying while the cluster has no leader.
async fn report(
    node: &Node,
    task: TaskId,
    token: u64,
    result: TaskResult,
    reads: Vec<(String, u64)>,
) {
    let command = ClientCommand {
        request_id: node.0.worker.next_request_id(),
        command: Command::Complete {
            task,
            token,
            result: Box::new(result),
            reads,
        },
    };
    let deadline = Instant::now() + REPORT_DEADLINE;
    let mut backoff = Duration::from_millis(20);
    loop {
        match node.write(Principal::Node, vec![command.clone()]).await {
            Ok(results) => {
                if let Some(CommandResult::Rejected { reason }) = results.first() {
                    tracing::info!(task, token, %reason, "completion refused");
                }
                return;
            }
            Err(e) if retryable(&e) && Instant::now() < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(e) => {
                tracing::warn!(task, token, error = %e, "cannot report a completion; the task will be reassigned");
                return;
            }
        }
    }
}

fn retryable(e: &ApiError) -> bool {
    e.is_retryable()
}

/// Background loops of the worker: heartbeats (with warm-pool reports and min-warm
/// upkeep) and reconciliation with the applied state. They end when `node` is dropped
/// elsewhere and the Raft handle stops.
pub fn start_loops(node: &Node) {
    if !node.0.worker.settings.enabled {
        return;
    }
    let n = node.clone();
    tokio::spawn(async move { heartbeat_loop(n).await });
    let n = node.clone();
    tokio::spawn(async move { reconcile_loop(n).await });
}

async fn heartbeat_loop(node: Node) {
    let w = node.0.worker.clone();
    let interval = Duration::from_millis(w.settings.heartbeat_interval_ms);
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = w.pool_changed.notified() => {
                // Batch the changes of a burst into one report.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if node.stopping() {
            return;
        }
        w.sweep(&node).await;
        let hb = w.heartbeat();
        let command = ClientCommand {
            request_id: w.next_request_id(),
            command: Command::Heartbeat(Box::new(hb)),
        };
        if let Err(e) = node.write(Principal::Node, vec![command]).await {
            tracing::debug!(error = %e, "heartbeat not recorded");
        }
        keep_min_warm(&node).await;
    }
}

/// Pre-warms this node's share of every function's min-warm.
async fn keep_min_warm(node: &Node) {
    let w = node.0.worker.clone();
    let wanted: Vec<FunctionVersion> = node.0.store.read(|sm| {
        sm.sched()
            .functions()
            .filter_map(|f| f.latest().cloned())
            .filter(|v| v.spec.min_warm > 0)
            .collect()
    });
    for fv in wanted {
        let target = w.warm_target(node, &fv, false);
        if target == 0 || w.pool.idle_count(&Worker::key(&fv)) >= target {
            continue;
        }
        match w.sandbox_spec(node, &fv).await {
            Ok((spec, leases)) => w.replenish(spec, &leases, &fv, target),
            Err(error) => tracing::warn!(function = %fv.spec.name, %error, "cannot pre-warm"),
        }
    }
}

/// A task this node should run, with its function version if that still exists.
type Pending = (Task, Option<FunctionVersion>);

async fn reconcile_loop(node: Node) {
    let w = node.0.worker.clone();
    let mut metrics = node.0.raft.metrics();
    loop {
        tokio::select! {
            r = metrics.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if node.stopping() {
            return;
        }
        let todo: Vec<Pending> = node.0.store.read(|sm| {
            let sched = sm.sched();
            let mut started = lock(&w.started);
            // Forget a started (task, token) only once this node's state has moved past it:
            // finished, reassigned, or purged. A task dispatched before this node applied its
            // submission is not in the state yet and must stay claimed.
            started.retain(|id, token| match sched.task(*id) {
                Some(t) => {
                    t.token == *token
                        && t.node == Some(w.id)
                        && matches!(t.state, TaskState::Assigned | TaskState::Running)
                }
                None => *id > sched.last_task_id(),
            });
            sched
                .tasks_on(w.id)
                .into_iter()
                .filter(|t| started.get(&t.id) != Some(&t.token))
                .filter(|t| matches!(t.state, TaskState::Assigned | TaskState::Running))
                .map(|t| {
                    let fv = sched
                        .function(&t.function)
                        .and_then(|f| f.version(t.version))
                        .cloned();
                    (t.clone(), fv)
                })
                .collect()
        });
        for (task, fv) in todo {
            let n = node.clone();
            match fv {
                Some(fv) => {
                    tokio::spawn(run_task(n, task, fv));
                }
                None => {
                    if w.claim(task.id, task.token) {
                        let r = w.failed(format!(
                            "function {} version {} no longer exists",
                            task.function, task.version
                        ));
                        tokio::spawn(async move {
                            report(&n, task.id, task.token, r, Vec::new()).await
                        });
                    }
                }
            }
        }
        // Bound the rate of scans under a stream of applies.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The sandbox policy of a function: its own policy narrowed further by its memory and
/// timeout settings.
pub fn function_policy(spec: &skiff_client::api::FunctionSpec) -> Result<Policy, String> {
    let mut policy = match &spec.policy {
        Some(text) => Policy::from_toml(text).map_err(|e| format!("bad policy: {e}"))?,
        None => Policy::default(),
    };
    policy.memory_bytes_max = Some(
        policy
            .memory_bytes_max
            .map_or(spec.memory_bytes, |m| m.min(spec.memory_bytes)),
    );
    policy.timeout_ms = Some(
        policy
            .timeout_ms
            .map_or(spec.timeout_ms, |t| t.min(spec.timeout_ms)),
    );
    Ok(policy)
}

/// The sandbox policy of one stage: its own policy narrowed further by the function's memory
/// and by `remaining_ms`, what is left of the function's timeout for the rest of the pipeline.
/// Those two are the function's, for every stage, so a stage whose tier allows less keeps its
/// tier's ceiling instead (an untrusted stage of a pipeline with 30 s in all still stops at
/// its tier's 10 s); only the stage's own policy can be refused for widening its tier.
pub fn stage_policy(
    spec: &skiff_client::api::FunctionSpec,
    stage: &StageSpec,
    tier: Tier,
    remaining_ms: u64,
) -> Result<Policy, String> {
    let mut policy = match &stage.policy {
        Some(text) => Policy::from_toml(text).map_err(|e| format!("bad policy: {e}"))?,
        None => Policy::default(),
    };
    let ceiling = tier.limits();
    policy.memory_bytes_max = Some(match policy.memory_bytes_max {
        Some(m) => m.min(spec.memory_bytes),
        None => spec.memory_bytes.min(ceiling.memory_bytes_max),
    });
    policy.timeout_ms = Some(match policy.timeout_ms {
        Some(t) => t.min(remaining_ms),
        None => remaining_ms.min(ceiling.timeout_ms),
    });
    Ok(policy)
}

/// Checks at deploy time that a function's tier and policy resolve to valid limits (for a
/// staged function: every stage's tier and policy, naming the stage that fails).
pub fn check_function_sandbox(spec: &skiff_client::api::FunctionSpec) -> Result<(), String> {
    for (index, stage) in spec.stages.iter().enumerate() {
        let label = stage_label(index, spec.stages.len(), stage);
        let tier: Tier = stage.tier.parse().map_err(|e| format!("{label}: {e}"))?;
        let policy = stage_policy(spec, stage, tier, spec.timeout_ms)
            .map_err(|e| format!("{label}: {e}"))?;
        policy.resolve(tier).map_err(|e| format!("{label}: {e}"))?;
        // The stage's own policy alone, so a field it widens is refused even where the
        // function's memory or timeout would have narrowed it back.
        if let Some(text) = &stage.policy {
            let own = Policy::from_toml(text).map_err(|e| format!("{label}: bad policy: {e}"))?;
            own.resolve(tier).map_err(|e| format!("{label}: {e}"))?;
        }
    }
    if spec.is_staged() {
        return Ok(());
    }
    let tier: Tier = spec.tier.parse().map_err(|e| format!("{e}"))?;
    skiff_raft_store::functions::check_tier_ceiling(spec)?;
    let policy = function_policy(spec)?;
    policy.resolve(tier).map_err(|e| e.to_string())?;
    Ok(())
}

/// How errors and logs name a stage: `stage 2 of 3 (store)`.
fn stage_label(index: usize, count: usize, stage: &StageSpec) -> String {
    format!("stage {} of {count} ({})", index + 1, stage.name)
}

/// The reads of all stages of a run within what one completion may carry; past it, the marker
/// read keeps the run's result from ever being reused, as for a plain run's overflow.
fn bounded_reads(mut reads: Vec<(String, u64)>) -> Vec<(String, u64)> {
    let max = skiff_raft_store::functions::TRACKED_READS_MAX;
    if reads.len() > max {
        reads.truncate(max - 1);
        reads.push((INCOMPLETE_READS.to_string(), u64::MAX));
    }
    reads
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

/// The cluster's key-value store as the data service sees it: linearizable reads and
/// writes through the log, like any client's.
struct NodeKv(Node);

impl NodeKv {
    /// One write for a function, with a fresh request id, retried across a leader change.
    fn write_command(
        &self,
        command: Command,
    ) -> futures::future::BoxFuture<'static, Result<CommandResult, String>> {
        let node = self.0.clone();
        Box::pin(async move {
            let command = ClientCommand {
                request_id: node.0.worker.next_request_id(),
                command,
            };
            first_result(write_retrying(&node, command).await)
        })
    }
}

impl KvBackend for NodeKv {
    fn refused(&self, reason: &'static str) {
        self.0 .0.metrics.rejected(reason);
    }

    fn get(
        &self,
        key: String,
    ) -> futures::future::BoxFuture<'static, Result<Option<skiff_client::api::KvEntry>, String>>
    {
        let node = self.0.clone();
        Box::pin(async move {
            match node
                .read(
                    ReadOp::Get { key },
                    skiff_client::api::ReadConsistency::Linearizable,
                )
                .await
                .map_err(|e| e.to_string())?
            {
                ReadResult::Get(e) => Ok(e),
                _ => Err("unexpected answer to a get".into()),
            }
        })
    }

    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        expect_version: Option<u64>,
    ) -> futures::future::BoxFuture<'static, Result<CommandResult, String>> {
        self.write_command(Command::KvPut {
            key,
            value,
            expect_version,
        })
    }

    fn delete(
        &self,
        key: String,
        expect_version: Option<u64>,
    ) -> futures::future::BoxFuture<'static, Result<CommandResult, String>> {
        self.write_command(Command::KvDelete {
            key,
            expect_version,
        })
    }

    fn list(
        &self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> futures::future::BoxFuture<'static, Result<skiff_client::api::KvPage, String>> {
        let node = self.0.clone();
        Box::pin(async move {
            let op = ReadOp::List {
                prefix,
                start_after,
                limit,
            };
            match read_retrying(&node, op).await.map_err(|e| e.to_string())? {
                ReadResult::List(p) => Ok(p),
                _ => Err("unexpected answer to a list".into()),
            }
        })
    }
}

/// How long a data-service call keeps retrying while the cluster has no leader.
const DATA_RETRY_WINDOW: Duration = Duration::from_secs(10);

/// A write for a function, retried (same request id, so applied once) across a leader
/// change within [`DATA_RETRY_WINDOW`].
async fn write_retrying(
    node: &Node,
    command: ClientCommand,
) -> Result<Vec<CommandResult>, ApiError> {
    let deadline = Instant::now() + DATA_RETRY_WINDOW;
    let mut backoff = Duration::from_millis(20);
    loop {
        match node.write(Principal::Node, vec![command.clone()]).await {
            Err(e) if e.is_retryable() && Instant::now() + backoff < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

/// A read for a function, retried across a leader change within [`DATA_RETRY_WINDOW`].
async fn read_retrying(node: &Node, op: ReadOp) -> Result<ReadResult, ApiError> {
    let deadline = Instant::now() + DATA_RETRY_WINDOW;
    let mut backoff = Duration::from_millis(20);
    loop {
        match node
            .read(op.clone(), skiff_client::api::ReadConsistency::Linearizable)
            .await
        {
            Err(e) if e.is_retryable() && Instant::now() + backoff < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

fn first_result(r: Result<Vec<CommandResult>, ApiError>) -> Result<CommandResult, String> {
    r.map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| "no result".to_string())
}

fn tail(bytes: &[u8], max: usize) -> Vec<u8> {
    bytes[bytes.len().saturating_sub(max)..].to_vec()
}

fn truncate_text(mut s: String) -> String {
    if s.len() > LOG_BYTES_MAX {
        let mut cut = LOG_BYTES_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map update; a panic cannot leave it half done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a run that exited well still failed because its output was cut, if it was: by its
/// sandbox (over the tier's or policy's `stdout_bytes_max`, `sandbox_cut`) or by the bound of
/// a task result ([`OUTPUT_BYTES_MAX`]). A cut output is never passed off as the whole
/// result of a successful task; the kept part stays in the result's output.
fn output_over_limit(len: usize, sandbox_cut: bool) -> Option<String> {
    let kept = len.min(OUTPUT_BYTES_MAX);
    if sandbox_cut {
        Some(format!(
            "output over the sandbox's stdout limit (stdout_bytes_max of its tier or policy): \
             cut after {len} bytes; the first {kept} bytes are kept"
        ))
    } else if len > OUTPUT_BYTES_MAX {
        Some(format!(
            "output of {len} bytes is over the limit of a task result ({OUTPUT_BYTES_MAX} \
             bytes); the first {kept} bytes are kept"
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tier_ceilings_clients_default_within_are_the_sandboxs() {
        for tier in Tier::ALL {
            let limits = tier.limits();
            let c = skiff_raft_store::functions::tier_ceiling(tier.as_str())
                .expect("every sandbox tier has a ceiling");
            assert_eq!(
                (c.memory_bytes_max, c.timeout_ms_max),
                (limits.memory_bytes_max, limits.timeout_ms),
                "{tier}"
            );
        }
    }
}
