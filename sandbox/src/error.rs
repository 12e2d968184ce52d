//! Errors of the sandbox crate: one enum for running sandboxes, one for policies.
//!
//! Every variant carries what an operator needs to act: the path, the syscall or setup step,
//! the cgroup directory, and the underlying source.

use std::io;
use std::path::PathBuf;

use crate::policy::Tier;

/// A policy that cannot be applied to its tier.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The policy text is not valid TOML or has unknown fields.
    #[error("invalid policy file")]
    Parse(#[source] toml::de::Error),
    /// A numeric limit is above what the tier allows.
    #[error("policy widens tier {tier}: {field} = {requested} exceeds the tier's {ceiling}")]
    Widens {
        tier: Tier,
        field: &'static str,
        requested: u64,
        ceiling: u64,
    },
    /// A path is outside every path of the same kind the tier allows.
    #[error("policy widens tier {tier}: {kind} path {path} is not within the tier's {kind} paths")]
    PathNotAllowed {
        tier: Tier,
        kind: &'static str,
        path: PathBuf,
    },
    /// A path within the tier's as written resolves, through a symlink among its
    /// directories, to a real path outside them.
    #[error("policy widens tier {tier}: readable path {} resolves to {}, which is not within the tier's readable paths", path.display(), real.display())]
    RealPathNotAllowed {
        tier: Tier,
        path: PathBuf,
        real: PathBuf,
    },
    /// The tier allows no outgoing TCP connection at all.
    #[error("policy widens tier {tier}: the tier allows no TCP connect port, the policy asks for {ports:?}")]
    PortsNotAllowed { tier: Tier, ports: Vec<u16> },
    /// A value that makes no sense whatever the tier (zero memory, relative path).
    #[error("invalid policy: {field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

/// Why a sandbox could not be created, run or cleaned up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The policy could not be resolved against its tier.
    #[error("sandbox policy rejected")]
    Policy(#[from] PolicyError),
    /// A syscall made by the node process itself (fork, pipe, poll, wait) failed.
    #[error("{syscall} failed")]
    Syscall {
        syscall: &'static str,
        #[source]
        source: io::Error,
    },
    /// A step of the setup inside the sandbox failed, reported by the child before it exited.
    #[error("sandbox setup step {step} failed{}", path.as_ref().map(|p| format!(" on {}", p.display())).unwrap_or_default())]
    Setup {
        step: String,
        path: Option<PathBuf>,
        #[source]
        source: io::Error,
    },
    /// The child died or broke the setup protocol without saying why.
    #[error("sandbox child broke the setup protocol: {detail}")]
    Protocol { detail: String },
    /// Creating, configuring, reading or removing a cgroup failed.
    #[error("cgroup operation {op} failed in {}", dir.display())]
    Cgroup {
        op: &'static str,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No usable cgroup hierarchy with the memory, pids and cpu controllers.
    #[error("no usable cgroup hierarchy: {detail}")]
    CgroupUnavailable { detail: String },
    /// Writing the uid/gid maps of the child's user namespace failed.
    #[error("writing {} failed", path.display())]
    IdMap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The seccomp filter could not be compiled.
    #[error("seccomp filter could not be built")]
    Seccomp(#[source] seccompiler::BackendError),
    /// The command line or environment is malformed (empty, interior NUL, too large).
    #[error("invalid command: {reason}")]
    InvalidCommand { reason: String },
    /// A path handed to the sandbox does not exist or is not usable.
    #[error("{what} {} is not usable", path.display())]
    BadPath {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The blocking worker thread panicked or was cancelled.
    #[error("sandbox worker thread failed: {detail}")]
    Worker { detail: String },
    /// The serve-mode process misbehaved (closed stdout, line too long, timed out).
    #[error("serve-mode function process failed: {detail}")]
    Serve { detail: String },
}

impl SandboxError {
    pub(crate) fn syscall(syscall: &'static str, source: impl Into<io::Error>) -> Self {
        Self::Syscall {
            syscall,
            source: source.into(),
        }
    }
}
