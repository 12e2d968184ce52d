//! skiff-sandbox: runs function code isolated from the host and from other functions.
//!
//! Every sandbox gets, in this order: new user (root inside = an unprivileged host uid), pid,
//! mount, ipc, uts and cgroup namespaces, and a network namespace below the trusted tier; its
//! own cgroup (memory, pids, CPU quota; v2 or v1, detected at run time); a tmpfs root holding
//! read-only binds of the host paths its tier allows, `/code` read-only, a size-limited `/tmp`,
//! a minimal `/dev` and a fresh `/proc` (below the trusted tier only the process directories,
//! `subset=pid`; at the trusted tier a full one with sensitive files masked), entered with
//! `pivot_root`
//! and the old root detached; rlimits, a new session, the parent-death signal, inherited fds
//! closed; `no_new_privs` and no capability; Landlock file-system, TCP and scope rules; a
//! seccomp allowlist stricter than Docker's default. The security model is in
//! `docs/security.md`.
//!
//! # Layout
//! - [`policy`]: tiers (presets) and policies (TOML) that narrow them into [`Limits`].
//! - `alternatives`: Debian's `/etc/alternatives`, as links to what a sandbox binds.
//! - `setup`: the plan of a sandbox and the order of its setup steps, driven through the
//!   `sys::Syscalls` seam (a recording fake unit-tests the order without root).
//! - `sys`: the only module with `unsafe` and raw syscalls.
//! - [`cgroup`]: cgroup v1/v2 detection, limits, counters, kill and removal; cgroups made ahead
//!   and removed behind by a thread of the node.
//! - `seccomp`: the seccomp filter (compiled by its own binary-search compiler, `seccomp::bpf`).
//! - [`host_ids`]: the range of host uids and gids sandboxes run as, checked against the
//!   host's subordinate ids.
//! - `netns`: network namespaces made ahead by a thread of the node, joined by sandboxes.
//! - `process`: the parent's side of one sandbox (fork, handshake, hand-off, output, cleanup).
//! - [`pool`]: the warm pool (exec and serve modes).
//!
//! # Invariants
//! - Every cgroup a run uses is removed once its processes are dead: before the run returns,
//!   or, after a normal end, by the node's cgroup thread right after (or on drop); every mount
//!   lives in the sandbox's own mount namespace and disappears with it.
//! - A resolved [`Limits`] is never wider than its tier.
//! - Setup errors from the children come back as [`SandboxError::Setup`] with the step, the
//!   path and the errno; the children never panic across the fork.

#![deny(unsafe_code)]

mod alternatives;
pub mod cgroup;
mod error;
pub mod host_ids;
mod netns;
pub mod policy;
pub mod pool;
mod process;
mod seccomp;
mod setup;
#[allow(unsafe_code)]
mod sys;

use std::path::PathBuf;
use std::time::Duration;

pub use cgroup::{
    cgroup_pool_ready, set_cgroup_pool_size, CGROUP_POOL_SIZE_DEFAULT, CGROUP_POOL_SIZE_MAX,
};
pub use error::{PolicyError, SandboxError};
pub use host_ids::{host_id_range, set_host_id_range, HostIdError, HostIdRange};
pub use netns::{
    netns_pool_ready, set_netns_pool_size, NETNS_POOL_SIZE_DEFAULT, NETNS_POOL_SIZE_MAX,
};
pub use policy::{Limits, Policy, Tier, UnknownTier};
pub use pool::{
    ExecSandbox, PoolConfig, PoolKey, PoolMode, PoolStats, ServeSandbox, WarmPool, WarmSandbox,
};
pub use process::WORK_BYTES_MAX;
pub use seccomp::DENIED as SECCOMP_DENIED_SYSCALLS;
pub use setup::{DATA_SOCKET_PATH, HELPER_BINARY_PATH, HELPER_DIR};

/// What to isolate and how: the tier, its resolved limits, the function's code, the optional
/// data-service socket (bound at [`DATA_SOCKET_PATH`] inside) and the optional helper binary
/// (bound at [`HELPER_BINARY_PATH`] inside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSpec {
    pub tier: Tier,
    pub limits: Limits,
    /// Host directory bound read-only at `/code`. It must be readable by others (mode
    /// `o+rx`): inside, root is an unprivileged host uid.
    pub code_dir: PathBuf,
    pub data_socket: Option<PathBuf>,
    /// Host file bound read-only and executable at [`HELPER_BINARY_PATH`] (the data service's
    /// `skiff-data` client). Like the code directory, it and every directory above it must be
    /// readable and executable by others. When set, the default `PATH` ends with
    /// [`HELPER_DIR`].
    pub helper_binary: Option<PathBuf>,
    /// Extra environment variables; `PATH`, `HOME=/tmp`, `TMPDIR=/tmp`, `LANG=C.UTF-8` are set
    /// unless overridden here.
    pub env: Vec<(String, String)>,
}

impl SandboxSpec {
    /// A spec with the tier's preset limits and nothing else.
    pub fn new(tier: Tier, code_dir: impl Into<PathBuf>) -> Self {
        Self {
            tier,
            limits: tier.limits(),
            code_dir: code_dir.into(),
            data_socket: None,
            helper_binary: None,
            env: Vec::new(),
        }
    }

    /// A spec with the tier narrowed by `policy`.
    pub fn with_policy(
        tier: Tier,
        policy: &Policy,
        code_dir: impl Into<PathBuf>,
    ) -> Result<Self, PolicyError> {
        Ok(Self {
            limits: policy.resolve(tier)?,
            ..Self::new(tier, code_dir)
        })
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The command exited with this code.
    Exited(i32),
    /// The command was killed by this signal (not by us for a limit).
    Signaled(i32),
    /// The wall-clock timeout passed; the whole cgroup was killed.
    TimedOut,
    /// The memory limit was hit and the kernel's OOM killer killed a process of the sandbox.
    OutOfMemory,
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// From hand-off to the end of the command.
    pub wall: Duration,
    /// CPU time of every process of the sandbox, from the cgroup.
    pub cpu: Duration,
    /// Peak memory of the sandbox's cgroup (including the tmpfs pages of `/tmp`).
    pub peak_memory_bytes: u64,
    /// The host uid the sandbox ran as (unique per sandbox): the peer credentials of its
    /// connections to host sockets such as the data service.
    pub host_uid: u32,
}

/// Runs `argv` once in a new sandbox with `stdin` as its input; creates and removes the
/// sandbox around it. The blocking work runs on tokio's blocking pool.
pub async fn run(
    spec: &SandboxSpec,
    argv: &[String],
    stdin: &[u8],
) -> Result<RunOutcome, SandboxError> {
    let spec = spec.clone();
    let argv = argv.to_vec();
    let stdin = stdin.to_vec();
    tokio::task::spawn_blocking(move || process::run_blocking(&spec, &argv, &stdin))
        .await
        .map_err(|e| SandboxError::Worker {
            detail: e.to_string(),
        })?
}

/// [`run`] without async, for callers that have their own thread.
pub fn run_blocking(
    spec: &SandboxSpec,
    argv: &[String],
    stdin: &[u8],
) -> Result<RunOutcome, SandboxError> {
    process::run_blocking(spec, argv, stdin)
}
