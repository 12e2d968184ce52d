//! The seccomp filter: an allowlist that is a subset of Docker's default profile, with argument
//! checks on `clone`, `socket`, `socketpair`, `sendto`/`sendmsg`/`sendmmsg`, `ioctl` and
//! `personality`.
//!
//! One filter is installed: it answers `clone3` with `ENOSYS` first, so that libc falls back
//! to `clone`, whose flags can be inspected (clone3 passes them in memory, out of seccomp's
//! reach); then the allowlist (which lists `clone3`, so on its own it would allow it) allows
//! the listed syscalls and answers everything else, `seccomp` itself included, with `EPERM`.
//! Two stacked filters would answer the same (the kernel keeps the most restrictive action),
//! but each attach costs ≈ 40 µs here whatever its size.
//!
//! Denied on purpose (absent from the allowlist), beyond what Docker already denies: io_uring,
//! ptrace, process_vm_*, unshare, setns, mount and the new mount API, pivot_root, chroot, bpf,
//! keyctl/add_key/request_key, perf_event_open, userfaultfd, fanotify, name_to_handle_at,
//! open_by_handle_at, seccomp itself, AIO, mknod, kcmp, pidfd_getfd, and every module, clock,
//! swap, reboot, quota and accounting call.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::BpfProgram;

use crate::error::SandboxError;
use bpf::{Action, Cmp, Cond, Rules, Width};

mod bpf;

/// Namespace flags that `clone` must not carry.
const CLONE_NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP
    | 0x80) as u64; // CLONE_NEWTIME

/// The protocols a stream socket of IPv4 or IPv6 may ask for: the default (TCP) and TCP.
const TCP_PROTOCOLS: [i32; 2] = [0, libc::IPPROTO_TCP];

/// Syscalls allowed without conditions.
const ALLOWED: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_access,
    libc::SYS_alarm,
    libc::SYS_arch_prctl,
    libc::SYS_bind,
    libc::SYS_brk,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_chdir,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_clock_getres,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_connect,
    libc::SYS_copy_file_range,
    libc::SYS_creat,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_epoll_create,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_epoll_wait,
    libc::SYS_eventfd,
    libc::SYS_eventfd2,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fork,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_futimesat,
    libc::SYS_getcpu,
    libc::SYS_getcwd,
    libc::SYS_getdents,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getgroups,
    libc::SYS_getitimer,
    libc::SYS_getpeername,
    libc::SYS_getpgid,
    libc::SYS_getpgrp,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getpriority,
    libc::SYS_getrandom,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_getrlimit,
    libc::SYS_get_robust_list,
    libc::SYS_getrusage,
    libc::SYS_getsid,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_getuid,
    libc::SYS_getxattr,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_rm_watch,
    libc::SYS_kill,
    libc::SYS_lchown,
    libc::SYS_lgetxattr,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_lseek,
    libc::SYS_lsetxattr,
    libc::SYS_lstat,
    libc::SYS_madvise,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_mincore,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_msync,
    libc::SYS_munlock,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_pause,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe,
    libc::SYS_pipe2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_prlimit64,
    libc::SYS_pselect6,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readahead,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_removexattr,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rmdir,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_getparam,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_yield,
    libc::SYS_select,
    libc::SYS_sendfile,
    libc::SYS_setitimer,
    libc::SYS_setpgid,
    libc::SYS_setpriority,
    libc::SYS_setrlimit,
    libc::SYS_set_robust_list,
    libc::SYS_setsid,
    libc::SYS_setsockopt,
    libc::SYS_set_tid_address,
    libc::SYS_setxattr,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd,
    libc::SYS_signalfd4,
    libc::SYS_splice,
    libc::SYS_stat,
    libc::SYS_statfs,
    libc::SYS_statx,
    libc::SYS_symlink,
    libc::SYS_symlinkat,
    libc::SYS_sync,
    libc::SYS_sync_file_range,
    libc::SYS_syncfs,
    libc::SYS_sysinfo,
    libc::SYS_tee,
    libc::SYS_tgkill,
    libc::SYS_time,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_times,
    libc::SYS_tkill,
    libc::SYS_truncate,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_utime,
    libc::SYS_utimensat,
    libc::SYS_utimes,
    libc::SYS_vfork,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_restrict_self,
    // Answered with ENOSYS by the first filter.
    libc::SYS_clone3,
];

/// Syscalls the sandbox must never reach; used by tests to check the allowlist.
pub const DENIED: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_bpf,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_kexec_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_seccomp,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_kcmp,
    libc::SYS_pidfd_getfd,
    libc::SYS_mknod,
];

fn cond(arg: u8, width: Width, cmp: Cmp) -> Cond {
    Cond { arg, width, cmp }
}

fn nr(syscall: i64) -> u32 {
    u32::try_from(syscall).expect("syscall numbers are small and positive")
}

fn audit_arch() -> u32 {
    if cfg!(target_arch = "aarch64") {
        AUDIT_ARCH_AARCH64
    } else {
        AUDIT_ARCH_X86_64
    }
}

const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
const AUDIT_ARCH_AARCH64: u32 = 183 | 0x8000_0000 | 0x4000_0000;

/// The allowlist: every listed syscall, with argument rules on a few; anything else `EPERM`.
fn allowlist_rules() -> Rules {
    let mut syscalls: BTreeMap<u32, Vec<Vec<Cond>>> =
        ALLOWED.iter().map(|n| (nr(*n), Vec::new())).collect();
    // clone: never with a namespace flag (no nested user namespace, no new pid namespace).
    syscalls.insert(
        nr(libc::SYS_clone),
        vec![vec![cond(
            0,
            Width::Qword,
            Cmp::MaskedEq {
                mask: CLONE_NAMESPACE_FLAGS,
                value: 0,
            },
        )]],
    );
    // socket: Unix sockets of any type; over IPv4 and IPv6 only plain TCP: a stream socket
    // (the mask strips SOCK_NONBLOCK and SOCK_CLOEXEC) whose protocol is 0 or IPPROTO_TCP.
    // Landlock's port rules cover TCP alone, so another stream protocol (MPTCP, SCTP) would
    // connect to and listen on any port; UDP, raw, packet, netlink, vsock... are refused too.
    let stream = Cmp::MaskedEq {
        mask: 0xf,
        value: libc::SOCK_STREAM as u64,
    };
    let mut socket_rules = vec![vec![cond(0, Width::Dword, Cmp::Eq(libc::AF_UNIX as u64))]];
    for family in [libc::AF_INET, libc::AF_INET6] {
        for protocol in TCP_PROTOCOLS {
            socket_rules.push(vec![
                cond(0, Width::Dword, Cmp::Eq(family as u64)),
                cond(1, Width::Dword, stream),
                cond(2, Width::Dword, Cmp::Eq(protocol as u64)),
            ]);
        }
    }
    syscalls.insert(nr(libc::SYS_socket), socket_rules);
    syscalls.insert(
        nr(libc::SYS_socketpair),
        vec![vec![cond(0, Width::Dword, Cmp::Eq(libc::AF_UNIX as u64))]],
    );
    // sendto, sendmsg, sendmmsg: never with MSG_FASTOPEN, which connects a TCP socket without
    // connect(). (A connect() after the TCP_FASTOPEN_CONNECT option is a connect, which
    // Landlock checks.)
    let no_fastopen = Cmp::MaskedEq {
        mask: libc::MSG_FASTOPEN as u64,
        value: 0,
    };
    for (syscall, flags_arg) in [
        (libc::SYS_sendto, 3),
        (libc::SYS_sendmsg, 2),
        (libc::SYS_sendmmsg, 3),
    ] {
        syscalls.insert(
            nr(syscall),
            vec![vec![cond(flags_arg, Width::Dword, no_fastopen)]],
        );
    }
    // ioctl: everything but faking terminal input (TIOCSTI) and the console multiplexer.
    syscalls.insert(
        nr(libc::SYS_ioctl),
        vec![vec![
            cond(1, Width::Dword, Cmp::Ne(libc::TIOCSTI)),
            cond(1, Width::Dword, Cmp::Ne(libc::TIOCLINUX)),
        ]],
    );
    // personality: the same values as Docker (query, Linux, Linux32, UNAME26).
    syscalls.insert(
        nr(libc::SYS_personality),
        [0u64, 0x0008, 0x0002_0000, 0x0002_0008, 0xffff_ffff]
            .into_iter()
            .map(|v| vec![cond(0, Width::Dword, Cmp::Eq(v))])
            .collect(),
    );
    Rules {
        syscalls,
        on_match: Action::Allow,
        on_mismatch: Action::Errno(libc::EPERM as u16),
        arch: audit_arch(),
    }
}

/// `clone3` answered with `ENOSYS`, everything else allowed (left to the allowlist): the
/// reference for the program's first answer, in tests.
#[cfg(test)]
fn clone3_rules() -> Rules {
    Rules {
        syscalls: BTreeMap::from([(nr(libc::SYS_clone3), Vec::new())]),
        on_match: Action::Errno(libc::ENOSYS as u16),
        on_mismatch: Action::Allow,
        arch: audit_arch(),
    }
}

fn compiled(rules: &Rules) -> Result<BpfProgram, SandboxError> {
    bpf::compile(rules).map_err(|e| SandboxError::Protocol {
        detail: format!("seccomp filter: {e}"),
    })
}

/// Runs the compiled programs on known syscalls before any sandbox gets them: a compiler bug
/// must fail every start with an error, never install a filter that allows what it should not.
fn check(filters: &[BpfProgram]) -> Result<(), SandboxError> {
    let [program] = filters else {
        return Err(SandboxError::Protocol {
            detail: format!("seccomp filter: {} programs, not 1", filters.len()),
        });
    };
    let arch = audit_arch();
    let answer =
        |program: &BpfProgram, syscall: i64| bpf::interpret(program, nr(syscall), arch, [0; 6]);
    let eperm = Some(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
    let mut wrong: Vec<i64> = DENIED
        .iter()
        .copied()
        .filter(|syscall| answer(program, *syscall) != eperm)
        .collect();
    let allow = Some(libc::SECCOMP_RET_ALLOW);
    wrong.extend(
        [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_execve,
            libc::SYS_exit_group,
        ]
        .into_iter()
        .filter(|syscall| answer(program, *syscall) != allow),
    );
    if answer(program, libc::SYS_clone3) != Some(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32) {
        wrong.push(libc::SYS_clone3);
    }
    // The argument rules that keep the network within Landlock's reach.
    let with_args = |syscall: i64, args: [u64; 6]| bpf::interpret(program, nr(syscall), arch, args);
    for (syscall, args, want) in network_answers() {
        if with_args(syscall, args) != Some(want) {
            wrong.push(syscall);
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(SandboxError::Protocol {
            detail: format!("seccomp filter answers syscalls {wrong:?} wrongly"),
        })
    }
}

/// Socket calls with the answer the filter must give: plain TCP allowed, whatever its flags;
/// MPTCP, SCTP, raw and packet sockets, and MSG_FASTOPEN sends refused.
fn network_answers() -> Vec<(i64, [u64; 6], u32)> {
    let allow = libc::SECCOMP_RET_ALLOW;
    let eperm = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let flags = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
    let stream = libc::SOCK_STREAM as u64;
    let socket = |family: i32, kind: u64, protocol: i32| {
        (
            libc::SYS_socket,
            [family as u64, kind, protocol as u64, 0, 0, 0],
        )
    };
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        for kind in [stream, stream | flags] {
            for protocol in TCP_PROTOCOLS {
                let (syscall, args) = socket(family, kind, protocol);
                out.push((syscall, args, allow));
            }
            for protocol in [libc::IPPROTO_MPTCP, libc::IPPROTO_SCTP, libc::IPPROTO_UDP] {
                let (syscall, args) = socket(family, kind, protocol);
                out.push((syscall, args, eperm));
            }
        }
        for (kind, protocol) in [
            (libc::SOCK_RAW, libc::IPPROTO_TCP),
            (libc::SOCK_DGRAM, 0),
            (libc::SOCK_SEQPACKET, libc::IPPROTO_SCTP),
        ] {
            let (syscall, args) = socket(family, kind as u64, protocol);
            out.push((syscall, args, eperm));
        }
        out.push((
            libc::SYS_socketpair,
            [family as u64, stream, 0, 0, 0, 0],
            eperm,
        ));
    }
    let (syscall, args) = socket(libc::AF_PACKET, libc::SOCK_RAW as u64, 0);
    out.push((syscall, args, eperm));
    let (syscall, args) = socket(libc::AF_UNIX, stream | flags, 0);
    out.push((syscall, args, allow));
    let fastopen = libc::MSG_FASTOPEN as u64;
    for (syscall, flags_arg) in [
        (libc::SYS_sendto, 3),
        (libc::SYS_sendmsg, 2),
        (libc::SYS_sendmmsg, 3),
    ] {
        let mut args = [0u64; 6];
        args[flags_arg] = libc::MSG_NOSIGNAL as u64;
        out.push((syscall, args, allow));
        args[flags_arg] |= fastopen;
        out.push((syscall, args, eperm));
    }
    out
}

/// The compiled filters, in the order they are installed. Built once per process.
pub(crate) fn filters() -> Result<&'static [BpfProgram], SandboxError> {
    static FILTERS: OnceLock<Result<Vec<BpfProgram>, String>> = OnceLock::new();
    FILTERS
        .get_or_init(|| {
            let build = || {
                let allowlist = compiled(&allowlist_rules())?;
                Ok::<_, SandboxError>(vec![bpf::errno_first(
                    &allowlist,
                    nr(libc::SYS_clone3),
                    libc::ENOSYS as u16,
                    audit_arch(),
                )])
            };
            build()
                .and_then(|filters| {
                    check(&filters)?;
                    Ok(filters)
                })
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map(Vec::as_slice)
        .map_err(|detail| SandboxError::Protocol {
            detail: detail.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile() {
        let filters = filters().expect("filters compile");
        assert_eq!(filters.len(), 1);
        assert!(filters[0].len() <= bpf::INSTRUCTIONS_MAX);
        let reference_len = reference(&allowlist_rules()).len();
        eprintln!(
            "filter: {} instructions (seccompiler's chain of the allowlist: {reference_len})",
            filters[0].len()
        );
    }

    /// The one program answers, for every syscall number and every argument value a rule
    /// names, what the two stacked filters it replaces answered: the most restrictive of
    /// `clone3 → ENOSYS` and the allowlist (both checked against seccompiler's programs).
    #[test]
    fn the_program_answers_like_the_two_stacked_filters() {
        let program = &filters().expect("filters compile")[0];
        let clone3 = compiled(&clone3_rules()).expect("compiles");
        let allowlist = compiled(&allowlist_rules()).expect("compiles");
        let arch = audit_arch();
        // The constants the rules name, in every argument position a rule checks.
        let mut args_tried = vec![[0u64; 6], [u64::MAX; 6]];
        for conds in allowlist_rules().syscalls.values().flatten() {
            for c in conds {
                let v = match c.cmp {
                    Cmp::Eq(v) | Cmp::Ne(v) => v,
                    Cmp::MaskedEq { value, .. } => value,
                };
                let mut args = [0u64; 6];
                args[usize::from(c.arg)] = v;
                args_tried.push(args);
            }
        }
        for nr in (0..600).chain([0x4000_0000, u32::MAX]) {
            for args in &args_tried {
                let first = bpf::interpret(&clone3, nr, arch, *args);
                let second = bpf::interpret(&allowlist, nr, arch, *args);
                // The kernel keeps the action that is smaller as a signed number (KILL_PROCESS
                // is negative, ALLOW the largest).
                let stacked = match (first, second) {
                    (Some(a), Some(b)) => Some((a as i32).min(b as i32) as u32),
                    _ => None,
                };
                assert_eq!(
                    bpf::interpret(program, nr, arch, *args),
                    stacked,
                    "syscall {nr} args {args:?}"
                );
            }
        }
        // Another architecture is killed, as before.
        assert_eq!(
            bpf::interpret(program, 0, arch ^ 1, [0; 6]),
            bpf::interpret(&allowlist, 0, arch ^ 1, [0; 6])
        );
    }

    /// The same rules through seccompiler's compiler, as the reference for the semantics.
    fn reference(rules: &Rules) -> BpfProgram {
        use seccompiler::{
            SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
            SeccompRule,
        };
        let action = |a: Action| match a {
            Action::Allow => SeccompAction::Allow,
            Action::Errno(e) => SeccompAction::Errno(u32::from(e)),
            Action::KillProcess => SeccompAction::KillProcess,
        };
        let map = rules
            .syscalls
            .iter()
            .map(|(nr, rules)| {
                let rules = rules
                    .iter()
                    .map(|conds| {
                        let conds = conds
                            .iter()
                            .map(|c| {
                                let len = match c.width {
                                    Width::Dword => SeccompCmpArgLen::Dword,
                                    Width::Qword => SeccompCmpArgLen::Qword,
                                };
                                let (op, v) = match c.cmp {
                                    Cmp::Eq(v) => (SeccompCmpOp::Eq, v),
                                    Cmp::Ne(v) => (SeccompCmpOp::Ne, v),
                                    Cmp::MaskedEq { mask, value } => {
                                        (SeccompCmpOp::MaskedEq(mask), value)
                                    }
                                };
                                SeccompCondition::new(c.arg, len, op, v).expect("valid")
                            })
                            .collect();
                        SeccompRule::new(conds).expect("valid")
                    })
                    .collect();
                (i64::from(*nr), rules)
            })
            .collect();
        let arch = std::env::consts::ARCH.try_into().expect("supported");
        SeccompFilter::new(map, action(rules.on_mismatch), action(rules.on_match), arch)
            .expect("valid")
            .try_into()
            .expect("compiles")
    }

    #[test]
    fn the_search_tree_answers_like_seccompilers_chain() {
        let arch = audit_arch();
        for rules in [allowlist_rules(), clone3_rules()] {
            let ours = bpf::compile(&rules).expect("compiles");
            let theirs = reference(&rules);
            assert!(
                ours.len() * 2 < theirs.len() || theirs.len() < 16,
                "{} instructions against {}",
                ours.len(),
                theirs.len()
            );
            // Every syscall number, each with argument values that hit every condition:
            // the constants the rules name, each with and without every flag bit.
            let mut values: Vec<u64> = vec![0, 1, u64::MAX, 0xffff_ffff, 1 << 32];
            for conds in rules.syscalls.values().flatten() {
                for c in conds {
                    let (v, m) = match c.cmp {
                        Cmp::Eq(v) | Cmp::Ne(v) => (v, 0),
                        Cmp::MaskedEq { mask, value } => (value, mask),
                    };
                    values.extend([v, v | (1 << 32), v ^ 1]);
                    values.extend((0..64).filter(|b| m & (1 << b) != 0).map(|b| v | (1 << b)));
                }
            }
            let second = [
                0,
                1,
                2,
                5,
                0x801,
                libc::TIOCSTI,
                libc::TIOCLINUX,
                libc::TCGETS,
            ];
            for nr in (0..600).chain([0x4000_0000, 0x4000_0001, u32::MAX]) {
                // Arguments only matter to the syscalls with conditions.
                let with_args = rules.syscalls.get(&nr).is_some_and(|r| !r.is_empty());
                let (first, second) = if with_args {
                    (&values[..], &second[..])
                } else {
                    (&values[..2], &second[..1])
                };
                for v0 in first {
                    for v1 in second.iter().copied() {
                        let args = [*v0, v1, 0, 0, 0, 0];
                        assert_eq!(
                            bpf::interpret(&ours, nr, arch, args),
                            bpf::interpret(&theirs, nr, arch, args),
                            "syscall {nr} args {args:x?}"
                        );
                    }
                }
            }
            assert_eq!(
                bpf::interpret(&ours, 0, 0x4000_0003, [0; 6]),
                Some(libc::SECCOMP_RET_KILL_PROCESS)
            );
        }
    }

    #[test]
    fn only_plain_tcp_and_no_fastopen_send_reach_the_network() {
        let program = &filters().expect("filters compile")[0];
        let arch = audit_arch();
        let answers = network_answers();
        assert!(answers.len() > 30);
        for (syscall, args, want) in answers {
            assert_eq!(
                bpf::interpret(program, nr(syscall), arch, args),
                Some(want),
                "syscall {syscall} args {args:x?}"
            );
        }
    }

    #[test]
    fn denied_syscalls_are_not_allowed() {
        for nr in DENIED {
            assert!(
                !ALLOWED.contains(nr),
                "syscall {nr} is both denied and allowed"
            );
            assert_ne!(*nr, libc::SYS_clone);
            assert_ne!(*nr, libc::SYS_socket);
        }
    }
}
