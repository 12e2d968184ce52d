//! The warm pool: sandboxes created ahead, fully set up (namespaces, cgroup, mounts, Landlock,
//! seccomp) and blocked on their work pipe, so an invocation costs a pipe write.
//!
//! - **Exec mode**: the work (argv) makes the waiting init exec the command. One use, then the
//!   sandbox is discarded.
//! - **Serve mode**: the init execs a long-lived function process at pre-warm time. Requests
//!   go to it one per line, and it is reused, but only for the same [`PoolKey`] (function
//!   identity and version).
//!
//! Serve-mode framing (what the function process sees): each request is one line on stdin —
//! a JSON value serialised without raw newlines, terminated by `\n`; the process answers each
//! request, in order, with exactly one line on stdout — a JSON value terminated by `\n`. The
//! pool neither parses nor rewrites the JSON; it refuses a request containing `\n`, and treats
//! a response longer than `stdout_bytes_max`, an exit, or the timeout as the end of that
//! process (it is killed and not reused). Stderr is kept as a bounded log.
//!
//! Accounting: every idle sandbox's cgroup memory is counted against `memory_budget_bytes`;
//! pre-warming stops at `size_max` sandboxes or at the budget, and `expire_idle` discards
//! sandboxes idle for longer than `idle_expiry`.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::SandboxError;
use crate::process::{default_path, encode_work, Prepared};
use crate::sys::{self, PollWant};
use crate::{RunOutcome, SandboxSpec};

/// Sizes and lifetimes of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Most idle sandboxes kept, over all keys.
    pub size_max: usize,
    /// An idle sandbox older than this is discarded by [`WarmPool::expire_idle`] and never
    /// handed out.
    pub idle_expiry: Duration,
    /// Most memory (sum of the idle sandboxes' cgroup usage) the pool may hold.
    pub memory_budget_bytes: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            size_max: 16,
            idle_expiry: Duration::from_secs(300),
            memory_budget_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Exec or serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolMode {
    Exec,
    Serve,
}

/// What a warm sandbox may be used for: one function version, in one mode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub function: String,
    /// The function's identity, never reused: a function removed and created again under the
    /// same name gets a new one, so its versions never match the old function's sandboxes.
    pub function_id: u64,
    pub version: u64,
    pub mode: PoolMode,
}

/// Counters of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    pub idle: usize,
    pub memory_bytes: u64,
}

struct Entry {
    sandbox: WarmSandbox,
    idle_since: Instant,
    memory_bytes: u64,
}

#[derive(Default)]
struct Inner {
    idle: HashMap<PoolKey, VecDeque<Entry>>,
    count: usize,
    memory_bytes: u64,
}

/// A pool of prepared sandboxes, keyed by function version and mode.
pub struct WarmPool {
    config: PoolConfig,
    inner: Mutex<Inner>,
    creator: Creator,
}

/// The thread that forks every sandbox meant to outlive the call that made it.
///
/// A sandbox's supervisor gets the parent-death signal when the *thread* that forked it
/// exits, not the process: a sandbox forked on a short-lived worker thread (tokio's blocking
/// pool retires idle threads after seconds) would be killed while it waits in the pool. So
/// warm and serve-mode sandboxes are forked here, on one thread that lives as long as the pool.
struct Creator {
    jobs: Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

impl Creator {
    fn new() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        std::thread::Builder::new()
            .name("sandbox-creator".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("the sandbox creator thread starts");
        Creator {
            jobs: Mutex::new(tx),
        }
    }

    /// Runs `f` on the creator thread and waits for its result.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, SandboxError> + Send + 'static,
    ) -> Result<T, SandboxError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = tx.send(f());
        });
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job);
        if sent.is_err() {
            return Err(SandboxError::Worker {
                detail: "the sandbox creator thread is gone".into(),
            });
        }
        rx.recv().unwrap_or_else(|_| {
            Err(SandboxError::Worker {
                detail: "the sandbox creator thread stopped".into(),
            })
        })
    }
}

/// A sandbox taken from the pool.
#[derive(Debug)]
pub enum WarmSandbox {
    Exec(ExecSandbox),
    Serve(ServeSandbox),
}

impl WarmPool {
    pub fn new(config: PoolConfig) -> Self {
        Self {
            config,
            inner: Mutex::new(Inner::default()),
            creator: Creator::new(),
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every update is one step).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_room(&self) -> bool {
        let inner = self.lock();
        inner.count < self.config.size_max && inner.memory_bytes < self.config.memory_budget_bytes
    }

    /// Creates one sandbox ahead for `key` (blocking; see [`WarmPool::prewarm`]). Returns
    /// `false` when the pool is full or the new sandbox would break the memory budget.
    pub fn prewarm_blocking(
        &self,
        key: PoolKey,
        spec: &SandboxSpec,
        serve_argv: Option<&[String]>,
    ) -> Result<bool, SandboxError> {
        if !self.has_room() {
            return Ok(false);
        }
        let sandbox = match key.mode {
            PoolMode::Exec => {
                let spec = spec.clone();
                WarmSandbox::Exec(self.creator.run(move || ExecSandbox::create(&spec))?)
            }
            PoolMode::Serve => {
                let argv = serve_argv.ok_or_else(|| SandboxError::InvalidCommand {
                    reason: "serve mode needs the function's command".to_string(),
                })?;
                WarmSandbox::Serve(self.start_serve(key.clone(), spec, argv)?)
            }
        };
        let memory_bytes = sandbox.memory_bytes();
        let mut inner = self.lock();
        if inner.count >= self.config.size_max
            || inner.memory_bytes + memory_bytes > self.config.memory_budget_bytes
        {
            drop(inner);
            sandbox.discard();
            return Ok(false);
        }
        inner.count += 1;
        inner.memory_bytes += memory_bytes;
        inner.idle.entry(key).or_default().push_back(Entry {
            sandbox,
            idle_since: Instant::now(),
            memory_bytes,
        });
        Ok(true)
    }

    /// [`WarmPool::prewarm_blocking`] on tokio's blocking pool.
    pub async fn prewarm(
        self: &std::sync::Arc<Self>,
        key: PoolKey,
        spec: SandboxSpec,
        serve_argv: Option<Vec<String>>,
    ) -> Result<bool, SandboxError> {
        let pool = std::sync::Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            pool.prewarm_blocking(key, &spec, serve_argv.as_deref())
        })
        .await
        .map_err(|e| SandboxError::Worker {
            detail: e.to_string(),
        })?
    }

    /// Takes an idle sandbox for `key`, if one is warm and not expired. Never blocks on the
    /// kernel: the hand-off is the caller's next step.
    pub fn acquire(&self, key: &PoolKey) -> Option<WarmSandbox> {
        let mut expired = Vec::new();
        let found = {
            let mut inner = self.lock();
            let mut found = None;
            let mut taken = Vec::new();
            if let Some(queue) = inner.idle.get_mut(key) {
                while let Some(entry) = queue.pop_front() {
                    taken.push(entry.memory_bytes);
                    if entry.idle_since.elapsed() > self.config.idle_expiry {
                        expired.push(entry.sandbox);
                        continue;
                    }
                    found = Some(entry.sandbox);
                    break;
                }
            }
            for memory in taken {
                inner.count -= 1;
                inner.memory_bytes -= memory;
            }
            found
        };
        for sandbox in expired {
            sandbox.discard();
        }
        found
    }

    /// Gives a serve-mode sandbox back for reuse by the same key. A dead one is discarded.
    pub fn release(&self, key: PoolKey, sandbox: ServeSandbox) {
        if !sandbox.is_alive() || key.mode != PoolMode::Serve || key != sandbox.key {
            sandbox.discard();
            return;
        }
        let memory_bytes = sandbox.prepared.memory_bytes();
        let mut inner = self.lock();
        if inner.count >= self.config.size_max
            || inner.memory_bytes + memory_bytes > self.config.memory_budget_bytes
        {
            drop(inner);
            sandbox.discard();
            return;
        }
        inner.count += 1;
        inner.memory_bytes += memory_bytes;
        inner.idle.entry(key).or_default().push_back(Entry {
            sandbox: WarmSandbox::Serve(sandbox),
            idle_since: Instant::now(),
            memory_bytes,
        });
    }

    /// Discards sandboxes idle for longer than the expiry; returns how many.
    pub fn expire_idle(&self) -> usize {
        let expired: Vec<WarmSandbox> = {
            let mut inner = self.lock();
            let expiry = self.config.idle_expiry;
            let mut out = Vec::new();
            let mut freed = (0usize, 0u64);
            for queue in inner.idle.values_mut() {
                let (keep, old): (VecDeque<Entry>, VecDeque<Entry>) = queue
                    .drain(..)
                    .partition(|e| e.idle_since.elapsed() <= expiry);
                *queue = keep;
                for entry in old {
                    freed.0 += 1;
                    freed.1 += entry.memory_bytes;
                    out.push(entry.sandbox);
                }
            }
            inner.count -= freed.0;
            inner.memory_bytes -= freed.1;
            inner.idle.retain(|_, q| !q.is_empty());
            out
        };
        let n = expired.len();
        for sandbox in expired {
            sandbox.discard();
        }
        n
    }

    /// Discards every idle sandbox whose key `stale` says is no longer wanted (a removed
    /// function or version); returns how many.
    pub fn discard_where(&self, mut stale: impl FnMut(&PoolKey) -> bool) -> usize {
        let gone: Vec<WarmSandbox> = {
            let mut inner = self.lock();
            let keys: Vec<PoolKey> = inner.idle.keys().filter(|k| stale(k)).cloned().collect();
            let mut out = Vec::new();
            for key in keys {
                for entry in inner.idle.remove(&key).into_iter().flatten() {
                    inner.count -= 1;
                    inner.memory_bytes -= entry.memory_bytes;
                    out.push(entry.sandbox);
                }
            }
            out
        };
        let n = gone.len();
        for sandbox in gone {
            sandbox.discard();
        }
        n
    }

    /// Discards every idle sandbox.
    pub fn clear(&self) {
        let all: Vec<WarmSandbox> = {
            let mut inner = self.lock();
            inner.count = 0;
            inner.memory_bytes = 0;
            inner
                .idle
                .drain()
                .flat_map(|(_, q)| q.into_iter().map(|e| e.sandbox))
                .collect()
        };
        for sandbox in all {
            sandbox.discard();
        }
    }

    /// Idle sandboxes for `key` (expired ones included until the next expiry pass).
    pub fn idle_count(&self, key: &PoolKey) -> usize {
        self.lock().idle.get(key).map_or(0, VecDeque::len)
    }

    /// Idle sandboxes per key, in no particular order.
    pub fn idle_by_key(&self) -> Vec<(PoolKey, usize)> {
        self.lock()
            .idle
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(k, q)| (k.clone(), q.len()))
            .collect()
    }

    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats {
            idle: inner.count,
            memory_bytes: inner.memory_bytes,
        }
    }
}

impl Drop for WarmPool {
    fn drop(&mut self) {
        self.clear();
    }
}

impl WarmSandbox {
    fn memory_bytes(&self) -> u64 {
        match self {
            WarmSandbox::Exec(s) => s.prepared.memory_bytes(),
            WarmSandbox::Serve(s) => s.prepared.memory_bytes(),
        }
    }

    fn discard(self) {
        let result = match self {
            WarmSandbox::Exec(s) => s.prepared.destroy(),
            WarmSandbox::Serve(s) => s.prepared.destroy(),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "discarding a warm sandbox failed");
        }
    }
}

/// A prepared sandbox waiting for one command.
#[derive(Debug)]
pub struct ExecSandbox {
    prepared: Prepared,
    path: &'static str,
    env: Vec<(String, String)>,
}

impl ExecSandbox {
    /// Creates a sandbox and waits until it is ready (blocking). The sandbox dies when the
    /// calling *thread* exits (parent-death signal): for one that must outlive the thread,
    /// use [`WarmPool::prewarm_blocking`].
    pub fn create(spec: &SandboxSpec) -> Result<Self, SandboxError> {
        Ok(Self {
            prepared: Prepared::create(spec)?,
            path: default_path(spec),
            env: spec.env.clone(),
        })
    }

    /// Memory charged to the sandbox's cgroup now.
    pub fn memory_bytes(&self) -> u64 {
        self.prepared.memory_bytes()
    }

    /// The sandbox's cgroup directories (one per hierarchy); gone once it is finished.
    pub fn cgroup_dirs(&self) -> Vec<std::path::PathBuf> {
        self.prepared.cgroup_dirs()
    }

    /// Hands the command to the waiting sandbox (the warm hand-off: one pipe write); the
    /// sandbox then execs it. Finish with [`ExecSandbox::finish`].
    pub fn hand_off(&mut self, argv: &[String]) -> Result<(), SandboxError> {
        let frame = encode_work(argv, self.path, &self.env)?;
        self.prepared.hand_off(&frame)
    }

    /// Waits until the sandbox has exec'd the handed-off command (or says why it could not).
    pub fn wait_started(&mut self) -> Result<(), SandboxError> {
        self.prepared
            .await_exec(Instant::now() + Duration::from_secs(10))
    }

    /// Feeds `stdin`, collects the outcome, cleans up.
    pub fn finish(self, stdin: &[u8]) -> Result<RunOutcome, SandboxError> {
        self.prepared.collect(stdin)
    }

    /// Hand-off and finish in one call (blocking).
    pub fn run_blocking(
        mut self,
        argv: &[String],
        stdin: &[u8],
    ) -> Result<RunOutcome, SandboxError> {
        self.hand_off(argv)?;
        self.finish(stdin)
    }

    /// [`ExecSandbox::run_blocking`] on tokio's blocking pool.
    pub async fn run(self, argv: &[String], stdin: &[u8]) -> Result<RunOutcome, SandboxError> {
        let argv = argv.to_vec();
        let stdin = stdin.to_vec();
        tokio::task::spawn_blocking(move || self.run_blocking(&argv, &stdin))
            .await
            .map_err(|e| SandboxError::Worker {
                detail: e.to_string(),
            })?
    }
}

/// A long-lived function process answering one JSON line per request line.
#[derive(Debug)]
pub struct ServeSandbox {
    prepared: Prepared,
    key: PoolKey,
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    pending: Vec<u8>,
    log: Vec<u8>,
    alive: bool,
}

impl ServeSandbox {
    /// Creates a sandbox and starts `argv` in it as the serving process (blocking). The
    /// sandbox dies when the calling *thread* exits (parent-death signal): for one that must
    /// outlive the thread, use [`WarmPool::start_serve`].
    pub fn start(spec: &SandboxSpec, argv: &[String]) -> Result<Self, SandboxError> {
        Self::start_keyed(spec, argv, None)
    }

    fn start_keyed(
        spec: &SandboxSpec,
        argv: &[String],
        key: Option<PoolKey>,
    ) -> Result<Self, SandboxError> {
        let frame = encode_work(argv, default_path(spec), &spec.env)?;
        let mut prepared = Prepared::create(spec)?;
        prepared.hand_off(&frame)?;
        prepared.await_exec(Instant::now() + Duration::from_secs(10))?;
        let (stdin, stdout, stderr) = prepared.take_stdio().ok_or_else(|| SandboxError::Serve {
            detail: "stdio already taken".to_string(),
        })?;
        for f in [&stdin, &stdout, &stderr] {
            sys::set_nonblocking(f.as_raw_fd()).map_err(|e| SandboxError::syscall("fcntl", e))?;
        }
        Ok(Self {
            prepared,
            key: key.unwrap_or(PoolKey {
                function: String::new(),
                function_id: 0,
                version: 0,
                mode: PoolMode::Serve,
            }),
            stdin: Some(stdin),
            stdout: Some(stdout),
            stderr: Some(stderr),
            pending: Vec::new(),
            log: Vec::new(),
            alive: true,
        })
    }

    /// Sets the key this process may be reused for.
    pub fn with_key(mut self, key: PoolKey) -> Self {
        self.key = key;
        self
    }

    pub fn key(&self) -> &PoolKey {
        &self.key
    }

    pub fn is_alive(&self) -> bool {
        self.alive
    }

    /// The last `stderr_bytes_max` bytes the process wrote to stderr.
    pub fn log(&self) -> &[u8] {
        &self.log
    }

    fn fail(&mut self, detail: String) -> SandboxError {
        self.alive = false;
        self.stdin = None;
        if let Err(error) = self.prepared.cgroup.kill_all() {
            tracing::warn!(%error, "killing a serve-mode sandbox failed");
        }
        SandboxError::Serve { detail }
    }

    fn drain_stderr(&mut self, buf: &mut [u8]) {
        let Some(f) = self.stderr.as_mut() else {
            return;
        };
        loop {
            match f.read(buf) {
                Ok(0) => {
                    self.stderr = None;
                    return;
                }
                Ok(n) => {
                    self.log.extend_from_slice(&buf[..n]);
                    let max = usize::try_from(self.prepared.limits.stderr_bytes_max)
                        .unwrap_or(usize::MAX);
                    if self.log.len() > max {
                        let cut = self.log.len() - max;
                        self.log.drain(..cut);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.stderr = None;
                    return;
                }
            }
        }
    }

    /// Sends one request line and returns the response line (without its `\n`). On timeout,
    /// exit or protocol error the process is killed and the sandbox is no longer alive.
    pub fn request_blocking(&mut self, request: &[u8]) -> Result<Vec<u8>, SandboxError> {
        if !self.alive {
            return Err(SandboxError::Serve {
                detail: "the function process is gone".to_string(),
            });
        }
        if request.contains(&b'\n') {
            return Err(SandboxError::InvalidCommand {
                reason: "a serve-mode request must be a single line".to_string(),
            });
        }
        let timeout = Duration::from_millis(self.prepared.limits.timeout_ms);
        let deadline = Instant::now() + timeout;
        let limit = usize::try_from(self.prepared.limits.stdout_bytes_max).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(request.len() + 1);
        out.extend_from_slice(request);
        out.push(b'\n');
        let mut written = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=pos).collect();
                line.pop();
                return Ok(line);
            }
            if self.pending.len() > limit {
                return Err(self.fail(format!("response longer than {limit} bytes")));
            }
            if Instant::now() >= deadline {
                return Err(self.fail(format!("request timed out after {timeout:?}")));
            }
            let stdout_fd = match &self.stdout {
                Some(f) => f.as_raw_fd(),
                None => return Err(self.fail("the function process closed stdout".to_string())),
            };
            let mut fds = vec![(stdout_fd, PollWant::Read)];
            if let Some(f) = &self.stderr {
                fds.push((f.as_raw_fd(), PollWant::Read));
            }
            let stdin_slot = if written < out.len() {
                match &self.stdin {
                    Some(f) => {
                        fds.push((f.as_raw_fd(), PollWant::Write));
                        Some(fds.len() - 1)
                    }
                    None => return Err(self.fail("stdin closed".to_string())),
                }
            } else {
                None
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
            let ready = sys::poll_fds(&fds, ms).map_err(|e| SandboxError::syscall("poll", e))?;
            if let Some(slot) = stdin_slot {
                if ready[slot] {
                    let f = self.stdin.as_mut().expect("polled");
                    match f.write(&out[written..]) {
                        Ok(n) => written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(self.fail(format!("writing the request: {e}"))),
                    }
                }
            }
            if fds.len() > 1 && self.stderr.is_some() && ready[1] {
                self.drain_stderr(&mut buf);
            }
            if ready[0] {
                let f = self.stdout.as_mut().expect("polled");
                match f.read(&mut buf) {
                    Ok(0) => return Err(self.fail("the function process exited".to_string())),
                    Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(self.fail(format!("reading the response: {e}"))),
                }
            }
        }
    }

    /// [`ServeSandbox::request_blocking`] on tokio's blocking pool; gives the sandbox back.
    pub async fn request(mut self, request: Vec<u8>) -> (Self, Result<Vec<u8>, SandboxError>) {
        match tokio::task::spawn_blocking(move || {
            let result = self.request_blocking(&request);
            (self, result)
        })
        .await
        {
            Ok(pair) => pair,
            // The closure only panics on a bug; carry that panic to the caller.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Memory charged to the sandbox's cgroup now.
    pub fn memory_bytes(&self) -> u64 {
        self.prepared.memory_bytes()
    }

    /// The host uid the sandbox runs as (unique per sandbox).
    pub fn host_uid(&self) -> u32 {
        self.prepared.host_id
    }

    fn discard(self) {
        WarmSandbox::Serve(self).discard();
    }

    /// Stops the process and removes the sandbox.
    pub fn shutdown(self) -> Result<(), SandboxError> {
        self.prepared.destroy()
    }
}

impl WarmPool {
    /// Starts a serve-mode sandbox for `key` outside the pool (the first request of a cold
    /// function), to be [`WarmPool::release`]d after use.
    pub fn start_serve(
        &self,
        key: PoolKey,
        spec: &SandboxSpec,
        argv: &[String],
    ) -> Result<ServeSandbox, SandboxError> {
        let (spec, argv) = (spec.clone(), argv.to_vec());
        self.creator
            .run(move || ServeSandbox::start_keyed(&spec, &argv, Some(key)))
    }
}
