//! The only place that talks to the kernel directly: every `unsafe` block and raw syscall of
//! the crate is in this module, each with a `// SAFETY:` comment.
//!
//! [`Syscalls`] is the seam in front of the setup: `setup.rs` drives it in the order the
//! isolation needs, [`linux::RealSys`] performs the calls, and [`fake::RecordingSys`] records
//! them so the order is unit-tested without root.

use std::path::{Path, PathBuf};

use seccompiler::BpfProgram;

pub(crate) mod fake;
pub(crate) mod linux;

pub(crate) use linux::{
    adopt_fds, adopt_init_fds, at_exit, block_all_signals, close_fd, close_fds_from, exec_work,
    exit_now, fork, kill_pid, landlock_abi, lower_to_background_priority, lower_to_idle_priority,
    new_network_namespace, pidfd_open, pin_to_current_cpu, pipe, poll_fds, read_fd,
    read_into_spare, set_affinity, set_nonblocking, spawn_sharing_memory, wait_pid, write_fd,
    ChildStack, CpuMask, ExecImage, ForkResult, PollWant, RealSys, PARENT_ALIVE_BYTE,
};

/// A failed setup step, as reported from the child to the parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepError {
    pub step: &'static str,
    pub path: Option<PathBuf>,
    pub errno: i32,
}

impl StepError {
    pub(crate) fn new(step: &'static str, path: Option<&Path>, errno: i32) -> Self {
        Self {
            step,
            path: path.map(Path::to_path_buf),
            errno,
        }
    }
}

pub(crate) type StepResult = Result<(), StepError>;

/// Namespaces to create, as `CLONE_NEW*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Namespaces(pub i32);

impl Namespaces {
    pub(crate) const USER: i32 = libc::CLONE_NEWUSER;
    pub(crate) const PID: i32 = libc::CLONE_NEWPID;
    pub(crate) const MOUNT: i32 = libc::CLONE_NEWNS;
    pub(crate) const NET: i32 = libc::CLONE_NEWNET;
    pub(crate) const IPC: i32 = libc::CLONE_NEWIPC;
    pub(crate) const UTS: i32 = libc::CLONE_NEWUTS;
    pub(crate) const CGROUP: i32 = libc::CLONE_NEWCGROUP;

    pub(crate) fn contains(self, flag: i32) -> bool {
        self.0 & flag == flag
    }
}

/// Resource limits set with `setrlimit` (soft = hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rlimit {
    OpenFiles,
    CoreBytes,
}

/// Options of a tmpfs mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TmpfsFlags {
    pub read_only: bool,
    pub no_exec: bool,
}

/// What Landlock allows, by path inside the sandbox and by TCP port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LandlockRules {
    /// The kernel's Landlock ABI version (0: none), asked by the node: what can be enforced.
    pub abi: u32,
    /// Read files, list directories, execute.
    pub read_exec: Vec<PathBuf>,
    /// Read files and list directories.
    pub read: Vec<PathBuf>,
    /// Everything, including creating and removing.
    pub read_write: Vec<PathBuf>,
    /// Device files: read, write, truncate (a directory: every file beneath, and listing it).
    pub devices: Vec<PathBuf>,
    /// Directories that may be listed (not their contents read).
    pub list: Vec<PathBuf>,
    pub tcp_connect_ports: Vec<u16>,
}

/// The syscalls the sandbox setup makes, in the vocabulary of the setup.
pub(crate) trait Syscalls {
    // Supervisor (outside the new pid namespace).
    fn set_parent_death_signal(&mut self) -> StepResult;
    fn drop_supplementary_groups(&mut self) -> StepResult;
    /// Joins a cgroup by writing "0" into its join file `join_file`, open at `fd` (opened by
    /// the node as root), then closes it.
    fn join_cgroup(&mut self, fd: i32, join_file: &Path) -> StepResult;
    /// Becomes the unprivileged host `uid` and `gid` (while still in the host's namespace).
    fn set_host_ids(&mut self, uid: u32, gid: u32) -> StepResult;
    /// Joins the network namespace open at `fd` (one the node created ahead), then closes it.
    fn enter_network_namespace(&mut self, fd: i32) -> StepResult;
    fn unshare(&mut self, namespaces: Namespaces) -> StepResult;
    /// Maps root of the new user namespace to the host `uid` and `gid` (its own ids, which an
    /// unprivileged process may map for itself) with `setgroups` denied.
    fn write_own_id_maps(&mut self, uid: u32, gid: u32) -> StepResult;
    /// Takes uid and gid 0 of the new user namespace (the mapped unprivileged host ids).
    fn become_root(&mut self) -> StepResult;

    // Init of the sandbox (pid 1 of the new pid namespace).
    fn make_mounts_private(&mut self) -> StepResult;
    fn mount_tmpfs(&mut self, target: &Path, data: &str, flags: TmpfsFlags) -> StepResult;
    fn make_dir(&mut self, path: &Path) -> StepResult;
    fn make_file(&mut self, path: &Path, contents: &[u8]) -> StepResult;
    fn make_symlink(&mut self, target: &Path, link: &Path) -> StepResult;
    fn bind_mount(&mut self, source: &Path, target: &Path, read_only: bool) -> StepResult;
    /// Binds `source`, which must be reached without following any symlink (`openat2` with
    /// `RESOLVE_NO_SYMLINKS`), at `target`: the object bound is the one whose real path was
    /// checked, even if a directory on the way was replaced by a symlink since.
    fn bind_mount_exact(&mut self, source: &Path, target: &Path) -> StepResult;
    /// Mounts a fresh `/proc`; with `pid_only`, `subset=pid` if the kernel knows it (≥ 5.8).
    /// Returns whether the mount holds only the process directories.
    fn mount_proc(&mut self, target: &Path, pid_only: bool) -> Result<bool, StepError>;
    /// Makes the mount at `target` and every mount below it read-only (`mount_setattr`).
    fn make_tree_read_only(&mut self, target: &Path) -> StepResult;
    /// `pivot_root` into `new_root` and detach the old root.
    fn pivot_root(&mut self, new_root: &Path) -> StepResult;
    fn set_hostname(&mut self, name: &str) -> StepResult;
    fn set_rlimit(&mut self, resource: Rlimit, value: u64) -> StepResult;
    fn new_session(&mut self) -> StepResult;
    fn reset_signals(&mut self) -> StepResult;
    /// Closes every fd from `first` up.
    fn close_fds_from(&mut self, first: i32) -> StepResult;
    fn set_no_new_privs(&mut self) -> StepResult;
    fn drop_capabilities(&mut self) -> StepResult;
    fn landlock(&mut self, rules: &LandlockRules) -> StepResult;
    fn seccomp(&mut self, filters: &[BpfProgram]) -> StepResult;
}
