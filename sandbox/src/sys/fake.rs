//! A recording fake of the setup seam: every call is appended to a log, so tests can check the
//! order of the setup without privileges. A step can be made to fail.

use std::path::Path;

use seccompiler::BpfProgram;

use super::{LandlockRules, Namespaces, Rlimit, StepError, StepResult, Syscalls, TmpfsFlags};

#[derive(Debug, Default)]
pub(crate) struct RecordingSys {
    pub calls: Vec<String>,
    /// The first call whose name starts with this fails with EPERM.
    pub fail_on: Option<&'static str>,
    /// Plays a kernel without `subset=pid` for `/proc` (before 5.8): a full `/proc` instead.
    pub proc_subset_unknown: bool,
}

#[cfg_attr(not(test), allow(dead_code))]
impl RecordingSys {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn record(&mut self, call: String) -> StepResult {
        let fail = self.fail_on.is_some_and(|prefix| call.starts_with(prefix));
        self.calls.push(call);
        if fail {
            self.fail_on = None;
            return Err(StepError::new("fake", None, libc::EPERM));
        }
        Ok(())
    }

    /// Index of the first call starting with `prefix`.
    pub(crate) fn position(&self, prefix: &str) -> Option<usize> {
        self.calls.iter().position(|c| c.starts_with(prefix))
    }

    /// Index of the last call starting with `prefix`.
    pub(crate) fn last_position(&self, prefix: &str) -> Option<usize> {
        self.calls.iter().rposition(|c| c.starts_with(prefix))
    }
}

impl Syscalls for RecordingSys {
    fn set_parent_death_signal(&mut self) -> StepResult {
        self.record("pdeathsig".into())
    }
    fn drop_supplementary_groups(&mut self) -> StepResult {
        self.record("setgroups".into())
    }
    fn join_cgroup(&mut self, fd: i32, join_file: &Path) -> StepResult {
        self.record(format!("join_cgroup {fd} {}", join_file.display()))
    }
    fn set_host_ids(&mut self, uid: u32, gid: u32) -> StepResult {
        self.record(format!("set_host_ids {uid}:{gid}"))
    }
    fn enter_network_namespace(&mut self, fd: i32) -> StepResult {
        self.record(format!("setns_net {fd}"))
    }
    fn unshare(&mut self, namespaces: Namespaces) -> StepResult {
        self.record(format!("unshare {:#x}", namespaces.0))
    }
    fn write_own_id_maps(&mut self, uid: u32, gid: u32) -> StepResult {
        self.record(format!("id_maps {uid}:{gid}"))
    }
    fn become_root(&mut self) -> StepResult {
        self.record("become_root".into())
    }
    fn make_mounts_private(&mut self) -> StepResult {
        self.record("mounts_private".into())
    }
    fn mount_tmpfs(&mut self, target: &Path, data: &str, flags: TmpfsFlags) -> StepResult {
        self.record(format!(
            "tmpfs {} {data} ro={} noexec={}",
            target.display(),
            flags.read_only,
            flags.no_exec
        ))
    }
    fn make_dir(&mut self, path: &Path) -> StepResult {
        self.record(format!("mkdir {}", path.display()))
    }
    fn make_file(&mut self, path: &Path, _contents: &[u8]) -> StepResult {
        self.record(format!("file {}", path.display()))
    }
    fn make_symlink(&mut self, target: &Path, link: &Path) -> StepResult {
        self.record(format!(
            "symlink {} -> {}",
            link.display(),
            target.display()
        ))
    }
    fn bind_mount(&mut self, source: &Path, target: &Path, read_only: bool) -> StepResult {
        self.record(format!(
            "bind {} {} ro={read_only}",
            source.display(),
            target.display()
        ))
    }
    fn bind_mount_exact(&mut self, source: &Path, target: &Path) -> StepResult {
        self.record(format!(
            "bind {} {} exact",
            source.display(),
            target.display()
        ))
    }
    fn mount_proc(&mut self, target: &Path, pid_only: bool) -> Result<bool, StepError> {
        let pid_only = pid_only && !self.proc_subset_unknown;
        self.record(format!("proc {} pid_only={pid_only}", target.display()))?;
        Ok(pid_only)
    }
    fn make_tree_read_only(&mut self, target: &Path) -> StepResult {
        self.record(format!("read_only_tree {}", target.display()))
    }
    fn pivot_root(&mut self, new_root: &Path) -> StepResult {
        self.record(format!("pivot_root {}", new_root.display()))
    }
    fn set_hostname(&mut self, name: &str) -> StepResult {
        self.record(format!("hostname {name}"))
    }
    fn set_rlimit(&mut self, resource: Rlimit, value: u64) -> StepResult {
        self.record(format!("rlimit {resource:?} {value}"))
    }
    fn new_session(&mut self) -> StepResult {
        self.record("setsid".into())
    }
    fn reset_signals(&mut self) -> StepResult {
        self.record("reset_signals".into())
    }
    fn close_fds_from(&mut self, first: i32) -> StepResult {
        self.record(format!("close_fds {first}"))
    }
    fn set_no_new_privs(&mut self) -> StepResult {
        self.record("no_new_privs".into())
    }
    fn drop_capabilities(&mut self) -> StepResult {
        self.record("drop_caps".into())
    }
    fn landlock(&mut self, rules: &LandlockRules) -> StepResult {
        self.record(format!(
            "landlock rx={} rw={} ports={:?}",
            rules.read_exec.len(),
            rules.read_write.len(),
            rules.tcp_connect_ports
        ))
    }
    fn seccomp(&mut self, filters: &[BpfProgram]) -> StepResult {
        self.record(format!("seccomp {}", filters.len()))
    }
}
