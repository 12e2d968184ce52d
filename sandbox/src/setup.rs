//! The setup of a sandbox: what to build ([`Plan`], computed in the parent) and the order in
//! which to build it ([`supervisor`] and [`init`], run in the children through the
//! [`Syscalls`] seam).
//!
//! Order, and why:
//! 1. supervisor (or a one-shot run's starter): supplementary groups dropped (impossible once
//!    `setgroups` is denied), the network namespace made ahead joined while still privileged,
//!    switch to the sandbox's unprivileged host uid/gid, `unshare` of every namespace but the
//!    cgroup one, parent-death signal (credential changes clear it, so after them), then the
//!    process maps root inside to its own host ids — what any unprivileged process may do, so
//!    no round trip to the parent is needed — and takes uid/gid 0 inside.
//! 2. init (pid 1 of the new pid namespace, so the fresh `/proc` is its own; it shares the
//!    supervisor's memory, or a one-shot run's node's, until its exec): parent-death signal,
//!    into the cgroup (first, so that it alone counts against the limits: the join files were
//!    opened by the node as root, and the kernel checks a join against the opener), then the
//!    cgroup namespace (whose root becomes this cgroup) → mounts private, tmpfs root with the
//!    read-only binds, `/code`, `/tmp`, `/dev`, `/proc` (pid-only below the trusted tier, else
//!    masked), root read-only, `pivot_root` + detach → hostname, rlimits, new session, default
//!    signals, inherited fds closed → `no_new_privs`, capabilities dropped → Landlock →
//!    seccomp, last, because every earlier step needs syscalls it denies.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use seccompiler::BpfProgram;

use crate::error::{PolicyError, SandboxError};
use crate::sys::{LandlockRules, Namespaces, Rlimit, StepResult, Syscalls, TmpfsFlags};
use crate::SandboxSpec;

/// Where the data socket appears inside the sandbox.
pub const DATA_SOCKET_PATH: &str = "/run/skiff/data.sock";
/// The directory of the helper binary inside the sandbox (last in the default `PATH`).
pub const HELPER_DIR: &str = "/run/skiff/bin";
/// Where the helper binary appears inside the sandbox.
pub const HELPER_BINARY_PATH: &str = "/run/skiff/bin/skiff-data";
/// Files masked with `/dev/null` in a full fresh `/proc` (as Docker does): the trusted tier's,
/// or any tier's on a kernel that refuses `subset=pid`.
const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "latency_stats",
    "sysrq-trigger",
    "kallsyms",
    "kmsg",
    "config.gz",
];
/// Directories of `/proc` hidden under an empty read-only tmpfs.
const PROC_MASKED_DIRS: &[&str] = &["acpi", "scsi", "asound", "firmware", "driver"];
/// Directories of `/proc` made read-only.
const PROC_READ_ONLY: &[&str] = &["sys", "bus", "fs", "irq"];
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];
const ETC_PASSWD: &[u8] =
    b"root:x:0:0:root:/tmp:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const ETC_GROUP: &[u8] = b"root:x:0:\nnogroup:x:65534:\n";
const ETC_HOSTS: &[u8] = b"127.0.0.1 localhost sandbox\n::1 localhost sandbox\n";
const ETC_NSSWITCH: &[u8] = b"passwd: files\ngroup: files\nhosts: files dns\n";
pub(crate) const HOSTNAME: &str = "sandbox";
/// fds the init keeps until exec: 0..=2 stdio, 3 work, 4 status.
pub(crate) const INIT_FDS_KEPT: i32 = 5;
/// Where the supervisor (or starter) finds the cgroup's join files, open (after stdio and its
/// three pipes), to pass them on to the init; a network namespace made ahead follows them (see
/// [`Plan::netns_fd`]).
pub(crate) const JOIN_FDS_FIRST: i32 = 6;
/// Where the init finds the join files (moved down by `sys::adopt_init_fds`).
pub(crate) const INIT_JOIN_FDS_FIRST: i32 = INIT_FDS_KEPT;

/// One step of building the root file system (paths are already under the staging root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootOp {
    Dir(PathBuf),
    File(PathBuf, &'static [u8]),
    Symlink {
        target: PathBuf,
        link: PathBuf,
    },
    Bind {
        source: PathBuf,
        target: PathBuf,
        read_only: bool,
    },
    /// A bind of a real path (no symlink in it), refused if one has appeared since.
    BindExact {
        source: PathBuf,
        target: PathBuf,
    },
    Tmpfs {
        target: PathBuf,
        data: String,
        flags: TmpfsFlags,
    },
    /// A fresh `/proc`; with `pid_only`, mounted `subset=pid` when the kernel allows it (only
    /// the process directories, `self` and `thread-self`: nothing of the host to mask).
    Proc {
        target: PathBuf,
        pid_only: bool,
    },
    /// A mask over part of `/proc`, applied only when the `/proc` mounted is a full one.
    ProcMask(Box<RootOp>),
    /// The mount at this path and every mount below it made read-only, in one call.
    ReadOnlyTree(PathBuf),
}

/// Everything the children need, computed before the fork.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub namespaces: Namespaces,
    /// Join the network namespace open at [`Plan::netns_fd`] (made ahead by the node) instead of
    /// creating one.
    pub join_network_namespace: bool,
    pub cgroup_join_files: Vec<PathBuf>,
    /// Host uid that root inside maps to.
    pub host_id: u32,
    /// Host gid that root inside maps to.
    pub host_gid: u32,
    pub staging_root: PathBuf,
    pub root_ops: Vec<RootOp>,
    pub rlimits: Vec<(Rlimit, u64)>,
    pub landlock: LandlockRules,
    pub filters: &'static [BpfProgram],
}

/// Which of the masked entries the host's `/proc` has (the fresh one has the same), looked up
/// once per process: the kernel's `/proc` does not grow entries at run time.
struct HostProc {
    masked_files: Vec<&'static str>,
    masked_dirs: Vec<&'static str>,
    read_only_dirs: Vec<&'static str>,
}

fn host_proc() -> &'static HostProc {
    static HOST: OnceLock<HostProc> = OnceLock::new();
    HOST.get_or_init(|| {
        let proc_dir = Path::new("/proc");
        let present = |names: &[&'static str], dir: bool| -> Vec<&'static str> {
            names
                .iter()
                .copied()
                .filter(|name| {
                    let path = proc_dir.join(name);
                    if dir {
                        path.is_dir()
                    } else {
                        path.exists()
                    }
                })
                .collect()
        };
        HostProc {
            masked_files: present(PROC_MASKED_FILES, false),
            masked_dirs: present(PROC_MASKED_DIRS, true),
            read_only_dirs: present(PROC_READ_ONLY, true),
        }
    })
}

/// `path` with every symlink among its directories resolved; the last component is kept as
/// it is (a symlink there is recreated, not followed).
fn real_dirs(path: &Path) -> io::Result<PathBuf> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => Ok(fs::canonicalize(parent)?.join(name)),
        _ => Ok(path.to_path_buf()),
    }
}

/// Whether the real path `real` is within what `tier` allows to read: beneath one of its
/// preset paths, taken both as written with its directories resolved (`/lib` itself, a link)
/// and fully resolved (`/lib` -> `/usr/lib`). Resolved once per process and tier.
fn within_tier(tier: crate::policy::Tier, real: &Path) -> bool {
    static ROOTS: OnceLock<Vec<(crate::policy::Tier, Vec<PathBuf>)>> = OnceLock::new();
    let roots = ROOTS.get_or_init(|| {
        crate::policy::Tier::ALL
            .iter()
            .map(|tier| {
                let mut roots = Vec::new();
                for base in tier.limits().readable_paths {
                    roots.extend(real_dirs(&base).ok());
                    roots.extend(fs::canonicalize(&base).ok());
                }
                (*tier, roots)
            })
            .collect()
    });
    roots
        .iter()
        .find(|(t, _)| *t == tier)
        .is_some_and(|(_, roots)| roots.iter().any(|root| real.starts_with(root)))
}

fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

impl Plan {
    pub(crate) fn build(
        spec: &SandboxSpec,
        cgroup_join_files: Vec<PathBuf>,
        (host_id, host_gid): (u32, u32),
        staging_root: &Path,
        filters: &'static [BpfProgram],
    ) -> Result<Self, SandboxError> {
        let limits = &spec.limits;
        let root = staging_root;
        let mut ops = vec![RootOp::Tmpfs {
            target: root.to_path_buf(),
            data: "size=1m,nr_inodes=4096,mode=755".to_string(),
            flags: TmpfsFlags {
                read_only: false,
                no_exec: false,
            },
        }];
        let mut landlock = LandlockRules {
            abi: crate::sys::landlock_abi(),
            list: vec![PathBuf::from("/")],
            read: vec![PathBuf::from("/etc"), PathBuf::from("/proc")],
            ..LandlockRules::default()
        };

        // /etc: our own minimal files, never the host's (no shadow, no host users).
        ops.push(RootOp::Dir(under(root, Path::new("/etc"))));
        for (name, contents) in [
            ("passwd", ETC_PASSWD),
            ("group", ETC_GROUP),
            ("hosts", ETC_HOSTS),
            ("nsswitch.conf", ETC_NSSWITCH),
        ] {
            ops.push(RootOp::File(
                under(root, &Path::new("/etc").join(name)),
                contents,
            ));
        }

        // Every readable path is resolved to its real path and checked against the tier there:
        // a symlink among its directories (`/usr/lib/ssl/private` -> `/etc/ssl/private`)
        // would otherwise bind what the tier never allows. What is bound is the real path,
        // reached again without following any symlink (`RootOp::BindExact`), so a directory
        // swapped for a symlink after this check fails the setup instead.
        let mut readable = Vec::with_capacity(limits.readable_paths.len());
        for path in &limits.readable_paths {
            let bad_path = |source| SandboxError::BadPath {
                what: "readable path",
                path: path.clone(),
                source,
            };
            let real = match real_dirs(path) {
                Ok(real) => real,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(bad_path(e)),
            };
            let meta = match fs::symlink_metadata(&real) {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(bad_path(e)),
            };
            if !within_tier(limits.tier, &real) {
                return Err(SandboxError::Policy(PolicyError::RealPathNotAllowed {
                    tier: limits.tier,
                    path: path.clone(),
                    real,
                }));
            }
            readable.push((real, meta));
        }
        // Sorted, a path lies right after the one it is beneath: bound once, through the
        // outermost.
        readable.sort_by(|a, b| a.0.cmp(&b.0));
        let mut bound: Vec<PathBuf> = Vec::new();
        for (real, meta) in readable {
            if bound.last().is_some_and(|b| real.starts_with(b)) {
                continue;
            }
            let inside = under(root, &real);
            if let Some(parent) = inside.parent() {
                ops.push(RootOp::Dir(parent.to_path_buf()));
            }
            if meta.file_type().is_symlink() {
                // Debian's merged /usr: /bin -> usr/bin. Recreate the link: it resolves inside
                // the sandbox, to what is bound on its own (or to nothing).
                let target = fs::read_link(&real).map_err(|source| SandboxError::BadPath {
                    what: "readable path",
                    path: real.clone(),
                    source,
                })?;
                ops.push(RootOp::Symlink {
                    target,
                    link: inside,
                });
                continue;
            }
            if meta.is_dir() {
                ops.push(RootOp::Dir(inside.clone()));
            } else {
                ops.push(RootOp::File(inside.clone(), b""));
            }
            // Read-only with the whole root (`ReadOnlyTree`).
            ops.push(RootOp::BindExact {
                source: real.clone(),
                target: inside,
            });
            landlock.read_exec.push(real.clone());
            bound.push(real);
        }

        // Debian's alternatives (`/usr/bin/awk` -> `/etc/alternatives/awk` -> `/usr/bin/mawk`):
        // the links whose real targets are bound, and only those, in a directory made once.
        if let Some(view) = crate::alternatives::view(&bound) {
            let inside = under(root, Path::new(crate::alternatives::ALTERNATIVES_DIR));
            ops.push(RootOp::Dir(inside.clone()));
            ops.push(RootOp::Bind {
                source: view,
                target: inside,
                // Read-only with the whole root (`ReadOnlyTree`).
                read_only: false,
            });
        }

        let code_meta = fs::metadata(&spec.code_dir).map_err(|source| SandboxError::BadPath {
            what: "code directory",
            path: spec.code_dir.clone(),
            source,
        })?;
        if !code_meta.is_dir() {
            return Err(SandboxError::BadPath {
                what: "code directory",
                path: spec.code_dir.clone(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let code_inside = under(root, Path::new("/code"));
        ops.push(RootOp::Dir(code_inside.clone()));
        ops.push(RootOp::Bind {
            source: spec.code_dir.clone(),
            target: code_inside,
            // Read-only with the whole root (`ReadOnlyTree`).
            read_only: false,
        });
        landlock.read_exec.push(PathBuf::from("/code"));

        if let Some(socket) = &spec.data_socket {
            fs::symlink_metadata(socket).map_err(|source| SandboxError::BadPath {
                what: "data socket",
                path: socket.clone(),
                source,
            })?;
            let inside = under(root, Path::new(DATA_SOCKET_PATH));
            ops.push(RootOp::Dir(under(root, Path::new("/run/skiff"))));
            ops.push(RootOp::File(inside.clone(), b""));
            ops.push(RootOp::Bind {
                source: socket.clone(),
                target: inside,
                // Read-only with the whole root (`ReadOnlyTree`).
                read_only: false,
            });
        }

        if let Some(helper) = &spec.helper_binary {
            let meta = fs::metadata(helper).map_err(|source| SandboxError::BadPath {
                what: "helper binary",
                path: helper.clone(),
                source,
            })?;
            if !meta.is_file() {
                return Err(SandboxError::BadPath {
                    what: "helper binary",
                    path: helper.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
                });
            }
            let inside = under(root, Path::new(HELPER_BINARY_PATH));
            ops.push(RootOp::Dir(under(root, Path::new(HELPER_DIR))));
            ops.push(RootOp::File(inside.clone(), b""));
            ops.push(RootOp::Bind {
                source: helper.clone(),
                target: inside,
                // Read-only with the whole root (`ReadOnlyTree`).
                read_only: false,
            });
            // Landlock rules are opened after pivot_root: the path inside.
            landlock.read_exec.push(PathBuf::from(HELPER_BINARY_PATH));
        }

        // Mounted after the root is made read-only (with every mount under it so far): the
        // sandbox's own writable or fresh file systems.
        let mut after = Vec::new();
        let tmp = under(root, Path::new("/tmp"));
        ops.push(RootOp::Dir(tmp.clone()));
        after.push(RootOp::Tmpfs {
            target: tmp,
            data: format!("size={},mode=1777", limits.tmp_bytes_max),
            flags: TmpfsFlags {
                read_only: !limits.tmp_writable(),
                no_exec: false,
            },
        });
        landlock
            .read_write
            .extend(limits.writable_paths.iter().cloned());
        landlock.read.push(PathBuf::from("/tmp"));

        let dev = under(root, Path::new("/dev"));
        ops.push(RootOp::Dir(dev.clone()));
        ops.push(RootOp::Tmpfs {
            target: dev.clone(),
            data: "size=64k,nr_inodes=64,mode=755".to_string(),
            flags: TmpfsFlags {
                read_only: false,
                no_exec: true,
            },
        });
        for name in DEVICES {
            let host = Path::new("/dev").join(name);
            let inside = dev.join(name);
            ops.push(RootOp::File(inside.clone(), b""));
            ops.push(RootOp::Bind {
                source: host.clone(),
                target: inside,
                read_only: false,
            });
        }
        for (name, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            ops.push(RootOp::Symlink {
                target: PathBuf::from(target),
                link: dev.join(name),
            });
        }
        // One rule for the directory: it holds only these devices and the links, read-only.
        landlock.devices.push(PathBuf::from("/dev"));

        let proc_dir = under(root, Path::new("/proc"));
        ops.push(RootOp::Dir(proc_dir.clone()));
        after.push(RootOp::Proc {
            target: proc_dir.clone(),
            pid_only: !limits.tier.full_proc(),
        });
        let host = host_proc();
        for name in &host.masked_files {
            after.push(RootOp::ProcMask(Box::new(RootOp::Bind {
                source: dev.join("null"),
                target: proc_dir.join(name),
                read_only: false,
            })));
        }
        for name in &host.masked_dirs {
            after.push(RootOp::ProcMask(Box::new(RootOp::Tmpfs {
                target: proc_dir.join(name),
                data: "size=0,mode=555".to_string(),
                flags: TmpfsFlags {
                    read_only: true,
                    no_exec: true,
                },
            })));
        }
        for name in &host.read_only_dirs {
            let path = proc_dir.join(name);
            after.push(RootOp::ProcMask(Box::new(RootOp::Bind {
                source: path.clone(),
                target: path,
                read_only: true,
            })));
        }
        // One call for the root, its binds and `/dev` (whose device nodes stay writable: a
        // read-only mount refuses writes to files, not to devices).
        ops.push(RootOp::ReadOnlyTree(root.to_path_buf()));
        ops.extend(after);
        // The root exists (it is the first mount); a directory made twice costs a failed
        // mkdir and a stat in the init each time.
        let mut dirs_made = std::collections::HashSet::new();
        ops.retain(|op| match op {
            RootOp::Dir(path) => path.as_path() != root && dirs_made.insert(path.clone()),
            _ => true,
        });

        let mut namespaces = Namespaces::USER
            | Namespaces::PID
            | Namespaces::MOUNT
            | Namespaces::IPC
            | Namespaces::UTS
            | Namespaces::CGROUP;
        if !limits.tier.host_network() {
            namespaces |= Namespaces::NET;
        }
        landlock.tcp_connect_ports = limits.tcp_connect_ports.clone();

        Ok(Plan {
            namespaces: Namespaces(namespaces),
            join_network_namespace: false,
            cgroup_join_files,
            host_id,
            host_gid,
            staging_root: root.to_path_buf(),
            root_ops: ops,
            rlimits: vec![
                (Rlimit::OpenFiles, limits.open_files_max),
                (Rlimit::CoreBytes, 0),
            ],
            landlock,
            filters,
        })
    }
}

impl Plan {
    /// Where the supervisor finds a network namespace made ahead: after the join files.
    pub(crate) fn netns_fd(&self) -> i32 {
        JOIN_FDS_FIRST + i32::try_from(self.cgroup_join_files.len()).expect("a few hierarchies")
    }

    /// Takes the network namespace from [`Plan::netns_fd`] instead of creating one. Only for a plan
    /// that has a network namespace of its own (below the trusted tier).
    pub(crate) fn join_network_namespace_ahead(&mut self) {
        debug_assert!(self.namespaces.0 & Namespaces::NET != 0);
        self.namespaces = Namespaces(self.namespaces.0 & !Namespaces::NET);
        self.join_network_namespace = true;
    }
}

/// Steps of the supervisor, up to (not including) the start of the init.
pub(crate) fn supervisor(sys: &mut impl Syscalls, plan: &Plan) -> StepResult {
    sys.drop_supplementary_groups()?;
    // setns needs the host's root (the namespace belongs to the host's user namespace), so
    // before the host ids are dropped.
    if plan.join_network_namespace {
        sys.enter_network_namespace(plan.netns_fd())?;
    }
    sys.set_host_ids(plan.host_id, plan.host_gid)?;
    // The cgroup namespace is the init's, made once it is in the cgroup.
    sys.unshare(Namespaces(plan.namespaces.0 & !Namespaces::CGROUP))?;
    // Credential changes clear the parent-death signal: arm it after the last of them.
    sys.set_parent_death_signal()?;
    sys.write_own_id_maps(plan.host_id, plan.host_gid)?;
    sys.become_root()
}

/// Steps of the init, up to the point where it waits for work.
pub(crate) fn init(sys: &mut impl Syscalls, plan: &Plan) -> StepResult {
    sys.set_parent_death_signal()?;
    for (fd, file) in (INIT_JOIN_FDS_FIRST..).zip(&plan.cgroup_join_files) {
        sys.join_cgroup(fd, file)?;
    }
    if plan.namespaces.contains(Namespaces::CGROUP) {
        sys.unshare(Namespaces(Namespaces::CGROUP))?;
    }
    sys.make_mounts_private()?;
    let mut proc_is_pid_only = false;
    for op in &plan.root_ops {
        match op {
            RootOp::ProcMask(_) if proc_is_pid_only => {}
            RootOp::ProcMask(mask) => root_op(sys, mask)?,
            RootOp::Proc { target, pid_only } => {
                proc_is_pid_only = sys.mount_proc(target, *pid_only)?;
            }
            op => root_op(sys, op)?,
        }
    }
    sys.pivot_root(&plan.staging_root)?;
    sys.set_hostname(HOSTNAME)?;
    for (resource, value) in &plan.rlimits {
        sys.set_rlimit(*resource, *value)?;
    }
    sys.new_session()?;
    sys.reset_signals()?;
    sys.close_fds_from(INIT_FDS_KEPT)?;
    sys.set_no_new_privs()?;
    sys.drop_capabilities()?;
    sys.landlock(&plan.landlock)?;
    sys.seccomp(plan.filters)
}

/// One step of building the root that needs no state of the setup.
fn root_op(sys: &mut impl Syscalls, op: &RootOp) -> StepResult {
    match op {
        RootOp::Dir(path) => sys.make_dir(path),
        RootOp::File(path, contents) => sys.make_file(path, contents),
        RootOp::Symlink { target, link } => sys.make_symlink(target, link),
        RootOp::Bind {
            source,
            target,
            read_only,
        } => sys.bind_mount(source, target, *read_only),
        RootOp::BindExact { source, target } => sys.bind_mount_exact(source, target),
        RootOp::Tmpfs {
            target,
            data,
            flags,
        } => sys.mount_tmpfs(target, data, *flags),
        RootOp::Proc { target, pid_only } => sys.mount_proc(target, *pid_only).map(drop),
        RootOp::ProcMask(mask) => root_op(sys, mask),
        RootOp::ReadOnlyTree(path) => sys.make_tree_read_only(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Tier;
    use crate::sys::fake::RecordingSys;

    fn plan(tier: Tier) -> Plan {
        let code = std::env::temp_dir();
        let spec = SandboxSpec::new(tier, code);
        Plan::build(
            &spec,
            vec![PathBuf::from("/cg/memory/x/tasks")],
            (100_007, 100_000),
            Path::new("/staging"),
            crate::seccomp::filters().expect("filters compile"),
        )
        .expect("plan builds")
    }

    fn pos(sys: &RecordingSys, prefix: &str) -> usize {
        sys.position(prefix)
            .unwrap_or_else(|| panic!("no call {prefix} in {:#?}", sys.calls))
    }

    #[test]
    fn supervisor_unshares_after_dropping_ids_and_maps_before_root() {
        let plan = plan(Tier::Untrusted);
        let mut sys = RecordingSys::new();
        supervisor(&mut sys, &plan).expect("fake succeeds");
        assert_eq!(pos(&sys, "setgroups"), 0);
        // The supervisor stays out of the sandbox's cgroup: only the init's processes count.
        assert!(sys.position("join_cgroup").is_none());
        assert!(pos(&sys, "set_host_ids") < pos(&sys, "unshare"));
        let unshare = &sys.calls[pos(&sys, "unshare")];
        let flags =
            i32::from_str_radix(unshare.trim_start_matches("unshare 0x"), 16).expect("hex flags");
        assert_eq!(flags & Namespaces::CGROUP, 0, "{unshare}");
        assert_ne!(flags & Namespaces::USER, 0, "{unshare}");
        // Every credential change is over before the parent-death signal is armed.
        assert!(pos(&sys, "unshare") < pos(&sys, "pdeathsig"));
        assert!(pos(&sys, "pdeathsig") < pos(&sys, "id_maps 100007"));
        assert!(pos(&sys, "id_maps") < pos(&sys, "become_root"));
        assert_eq!(sys.calls.last().map(String::as_str), Some("become_root"));
    }

    #[test]
    fn a_network_namespace_made_ahead_is_joined_while_privileged() {
        let mut plan = plan(Tier::Untrusted);
        plan.join_network_namespace_ahead();
        assert!(!plan.namespaces.contains(Namespaces::NET));
        let mut sys = RecordingSys::new();
        supervisor(&mut sys, &plan).expect("fake succeeds");
        assert_eq!(pos(&sys, "setns_net 7"), 1);
        assert!(pos(&sys, "setns_net") < pos(&sys, "set_host_ids"));
        let unshare = &sys.calls[pos(&sys, "unshare")];
        let flags =
            i32::from_str_radix(unshare.trim_start_matches("unshare 0x"), 16).expect("hex flags");
        assert_eq!(flags & Namespaces::NET, 0, "{unshare}");
        // Without one, nothing is joined and the namespace is created.
        let plan = super::tests::plan(Tier::Untrusted);
        let mut sys = RecordingSys::new();
        supervisor(&mut sys, &plan).expect("fake succeeds");
        assert!(sys.position("setns_net").is_none());
    }

    #[test]
    fn init_order_ends_with_landlock_then_seccomp() {
        let plan = plan(Tier::Standard);
        let mut sys = RecordingSys::new();
        init(&mut sys, &plan).expect("fake succeeds");
        let pivot = pos(&sys, "pivot_root");
        // Into the cgroup first, then its namespace, then the mounts.
        assert_eq!(pos(&sys, "pdeathsig"), 0);
        assert_eq!(pos(&sys, "join_cgroup 5 /cg/memory/x/tasks"), 1);
        assert_eq!(
            sys.calls[2],
            format!("unshare {:#x}", Namespaces::CGROUP),
            "{:#?}",
            sys.calls
        );
        assert!(pos(&sys, "unshare") < pos(&sys, "mounts_private"));
        assert!(pos(&sys, "mounts_private") < pos(&sys, "tmpfs /staging "));
        assert!(pos(&sys, "proc /staging/proc") < pivot);
        // The root and its binds are made read-only in one call, after everything was created
        // in them; /tmp and /proc are mounted after that, then the pivot.
        let read_only = pos(&sys, "read_only_tree /staging");
        assert_eq!(sys.position("read_only_tree"), Some(read_only));
        assert!(sys.last_position("mkdir").expect("mkdirs") < read_only);
        assert!(sys.last_position("bind ").expect("binds") < read_only);
        assert!(read_only < pos(&sys, "tmpfs /staging/tmp "));
        assert!(read_only < pos(&sys, "proc /staging/proc"));
        assert!(pivot < pos(&sys, "rlimit"));
        assert!(pos(&sys, "setsid") < pos(&sys, "close_fds 5"));
        assert!(pos(&sys, "close_fds") < pos(&sys, "no_new_privs"));
        assert!(pos(&sys, "no_new_privs") < pos(&sys, "drop_caps"));
        assert!(pos(&sys, "drop_caps") < pos(&sys, "landlock"));
        assert_eq!(sys.calls.last().map(String::as_str), Some("seccomp 1"));
        // /code is bound (read-only with the root), /etc/shadow never.
        let code = sys
            .calls
            .iter()
            .position(|c| c.starts_with("bind ") && c.contains("/staging/code "))
            .expect("code bound");
        assert!(code < read_only);
        assert!(!sys.calls.iter().any(|c| c.contains("shadow")));
    }

    #[test]
    fn the_helper_binary_is_bound_under_the_read_only_root_and_executable() {
        let code = std::env::temp_dir();
        let helper = std::env::current_exe().expect("the test binary is a file");
        let mut spec = SandboxSpec::new(Tier::Untrusted, code);
        spec.helper_binary = Some(helper.clone());
        let plan = Plan::build(
            &spec,
            Vec::new(),
            (100_007, 100_000),
            Path::new("/staging"),
            crate::seccomp::filters().expect("filters compile"),
        )
        .expect("plan builds");
        let target = PathBuf::from("/staging/run/skiff/bin/skiff-data");
        let bind = plan
            .root_ops
            .iter()
            .position(|op| {
                *op == RootOp::Bind {
                    source: helper.clone(),
                    target: target.clone(),
                    read_only: false,
                }
            })
            .expect("helper bound");
        let read_only = plan
            .root_ops
            .iter()
            .position(|op| *op == RootOp::ReadOnlyTree(PathBuf::from("/staging")))
            .expect("the root made read-only");
        assert!(bind < read_only);
        let file = plan
            .root_ops
            .iter()
            .position(|op| matches!(op, RootOp::File(p, _) if *p == target))
            .expect("mount point created");
        assert!(file < bind);
        assert!(plan
            .landlock
            .read_exec
            .contains(&PathBuf::from(HELPER_BINARY_PATH)));

        spec.helper_binary = Some(std::env::temp_dir());
        let err = Plan::build(
            &spec,
            Vec::new(),
            (100_007, 100_000),
            Path::new("/staging"),
            crate::seccomp::filters().expect("filters compile"),
        )
        .expect_err("a directory is not a helper binary");
        assert!(err.to_string().contains("helper binary"), "{err}");
    }

    #[test]
    fn proc_is_pid_only_below_trusted_and_masked_when_full() {
        let masks = |sys: &RecordingSys| {
            sys.calls
                .iter()
                .filter(|c| c.contains("/staging/proc/"))
                .count()
        };
        for tier in Tier::ALL {
            let plan = plan(tier);
            let mut sys = RecordingSys::new();
            init(&mut sys, &plan).expect("fake succeeds");
            let full = tier.full_proc();
            assert!(
                sys.position(&format!("proc /staging/proc pid_only={}", !full))
                    .is_some(),
                "{tier}: {:#?}",
                sys.calls
            );
            let planned = plan
                .root_ops
                .iter()
                .filter(|op| matches!(op, RootOp::ProcMask(_)))
                .count();
            if full {
                assert_eq!(masks(&sys), planned, "{tier}: every mask applied");
            } else {
                assert_eq!(
                    masks(&sys),
                    0,
                    "{tier}: nothing to mask in a pid-only /proc"
                );
            }
            // A kernel without subset=pid gets the full /proc, masked, at every tier.
            let mut sys = RecordingSys {
                proc_subset_unknown: true,
                ..RecordingSys::default()
            };
            init(&mut sys, &plan).expect("fake succeeds");
            assert!(sys.position("proc /staging/proc pid_only=false").is_some());
            assert_eq!(masks(&sys), planned, "{tier}: masked as before");
        }
    }

    #[test]
    fn no_directory_is_made_twice() {
        let plan = plan(Tier::Standard);
        let dirs: Vec<&PathBuf> = plan
            .root_ops
            .iter()
            .filter_map(|op| match op {
                RootOp::Dir(path) => Some(path),
                _ => None,
            })
            .collect();
        let unique: std::collections::HashSet<&PathBuf> = dirs.iter().copied().collect();
        assert_eq!(dirs.len(), unique.len(), "{dirs:#?}");
        assert!(!dirs.contains(&&PathBuf::from("/staging")));
    }

    #[test]
    fn a_failing_step_stops_the_setup() {
        let plan = plan(Tier::Untrusted);
        let mut sys = RecordingSys {
            fail_on: Some("pivot_root"),
            ..RecordingSys::default()
        };
        let err = init(&mut sys, &plan).expect_err("pivot fails");
        assert_eq!(err.errno, libc::EPERM);
        assert!(sys.calls.last().expect("calls").starts_with("pivot_root"));
        assert!(sys.position("seccomp").is_none());
        assert!(sys.position("landlock").is_none());
    }

    #[test]
    fn only_trusted_keeps_the_host_network() {
        for tier in Tier::ALL {
            let plan = plan(tier);
            assert_eq!(
                plan.namespaces.contains(Namespaces::NET),
                !tier.host_network()
            );
            for ns in [
                Namespaces::USER,
                Namespaces::PID,
                Namespaces::MOUNT,
                Namespaces::IPC,
                Namespaces::UTS,
                Namespaces::CGROUP,
            ] {
                assert!(plan.namespaces.contains(ns));
            }
        }
    }
}
