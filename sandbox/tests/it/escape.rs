//! The escape suite: one probe per tier tries every attack and prints what stopped it; each
//! line is checked against the specific errno (or result) the layers must produce.

use std::collections::BTreeMap;
use std::net::TcpListener;

use skiff_sandbox::Tier;

use crate::{can_sandbox, code_dir, py, spec, text};

const PROBE: &str = r#"
import ctypes, errno, fcntl, os, socket, sys, termios
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}
def name(e):
    return errno.errorcode.get(e, str(e))
def attempt(key, f):
    try:
        r = f()
        out[key] = "OK" if r is None else r
    except OSError as e:
        out[key] = name(e.errno)
def sc(key, nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    out[key] = "OK" if r >= 0 else name(ctypes.get_errno())
    return r

attempt("read_shadow", lambda: open("/etc/shadow").read() and None)
attempt("list_root", lambda: os.listdir("/root") and None)
attempt("write_code", lambda: open("/code/new", "w").close())
attempt("write_usr", lambda: open("/usr/new", "w").close())
attempt("write_rootfs", lambda: open("/new", "w").close())
attempt("append_passwd", lambda: open("/etc/passwd", "a").close())
attempt("write_tmp", lambda: open("/tmp/ok", "w").write("ok") and None)
attempt("read_kcore", lambda: "EMPTY" if open("/proc/kcore", "rb").read(16) == b"" else "DATA")
attempt("read_proc_keys", lambda: "EMPTY" if open("/proc/keys", "rb").read(16) == b"" else "DATA")
attempt("read_timer_list", lambda: "EMPTY" if open("/proc/timer_list", "rb").read(16) == b"" else "DATA")
attempt("list_proc_sys", lambda: os.listdir("/proc/sys") and None)
attempt("list_sys_firmware", lambda: os.listdir("/sys/firmware") and None)
attempt("symlink_file_escape", lambda: open("/code/escape_file").read() and None)
attempt("symlink_dir_escape", lambda: os.listdir("/code/escape_dir") and None)
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
out["visible_pids"] = ",".join(map(str, pids))
attempt("kill_node", lambda: os.kill(int(os.environ["NODE_PID"]), 9))
attempt("kill_supervisor_view", lambda: os.kill(os.getppid(), 0) if os.getppid() != 0 else "NO_PARENT")
sc("ptrace_traceme", 101, 0, 0, 0, 0)
sc("mount_tmpfs", 165, b"none", b"/tmp", b"tmpfs", 0, None)
sc("unshare_user", 272, 0x10000000)
sc("unshare_net", 272, 0x40000000)
sc("setns", 308, 0, 0)
r = sc("clone_newuser", 56, 0x10000000 | 17, 0, 0, 0, 0)
if r == 0:
    os._exit(0)
sc("keyctl", 250, 0, -3, 0)
sc("bpf", 321, 0, 0, 0)
sc("perf_event_open", 298, 0, 0, 0, 0, 0)
sc("userfaultfd", 323, 0)
params = ctypes.create_string_buffer(120)
sc("io_uring_setup", 425, 1, params)
sc("process_vm_readv", 310, 1, 0, 0, 0, 0, 0)
attempt("tiocsti", lambda: fcntl.ioctl(0, termios.TIOCSTI, b"x") and None)
attempt("connect_forbidden", lambda: socket.create_connection(("127.0.0.1", int(os.environ["FORBIDDEN_PORT"])), timeout=3).close())
attempt("bind_port", lambda: socket.socket().bind(("127.0.0.1", 0)))
attempt("bind_any", lambda: socket.socket().bind(("0.0.0.0", 8080)))
attempt("udp_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
attempt("netlink_socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close())
forbidden = ("127.0.0.1", int(os.environ["FORBIDDEN_PORT"]))
def via(family, kind, proto, action):
    s = socket.socket(family, kind, proto)
    try:
        s.settimeout(3)
        action(s)
    finally:
        s.close()
MPTCP = 262
SOCK_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
attempt("mptcp_connect", lambda: via(socket.AF_INET, socket.SOCK_STREAM, MPTCP, lambda s: s.connect(forbidden)))
attempt("mptcp6_socket", lambda: via(socket.AF_INET6, socket.SOCK_STREAM, MPTCP, lambda s: None))
attempt("mptcp_flags_socket", lambda: via(socket.AF_INET, socket.SOCK_STREAM | SOCK_FLAGS, MPTCP, lambda s: None))
attempt("mptcp_listen", lambda: via(socket.AF_INET, socket.SOCK_STREAM, MPTCP, lambda s: (s.bind(("127.0.0.1", 0)), s.listen())))
attempt("sctp_stream_socket", lambda: via(socket.AF_INET, socket.SOCK_STREAM, 132, lambda s: None))
attempt("sctp_seqpacket_socket", lambda: via(socket.AF_INET, socket.SOCK_SEQPACKET, 132, lambda s: None))
attempt("raw_socket", lambda: via(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP, lambda s: None))
attempt("packet_socket", lambda: via(17, socket.SOCK_RAW, 0, lambda s: None))
attempt("inet_socketpair", lambda: [s.close() for s in socket.socketpair(socket.AF_INET, socket.SOCK_STREAM)] and None)
attempt("tcp_explicit_socket", lambda: via(socket.AF_INET6, socket.SOCK_STREAM | SOCK_FLAGS, socket.IPPROTO_TCP, lambda s: None))
attempt("unix_socketpair", lambda: [s.close() for s in socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)] and None)
attempt("fastopen_sendto", lambda: via(socket.AF_INET, socket.SOCK_STREAM, 0, lambda s: s.sendto(b"x", socket.MSG_FASTOPEN, forbidden) and None))
attempt("fastopen_sendmsg", lambda: via(socket.AF_INET, socket.SOCK_STREAM, 0, lambda s: s.sendmsg([b"x"], [], socket.MSG_FASTOPEN, forbidden) and None))
attempt("fastopen_connect_option", lambda: via(socket.AF_INET, socket.SOCK_STREAM, 0, lambda s: (s.setsockopt(socket.IPPROTO_TCP, 30, 1), s.connect(forbidden))))
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
out["cap_eff"] = status["CapEff"].strip()
out["cap_bnd"] = status["CapBnd"].strip()
out["no_new_privs"] = status["NoNewPrivs"].strip()
out["seccomp"] = status["Seccomp"].strip()
out["uid"] = str(os.getuid())
out["hostname"] = socket.gethostname()
for k, v in out.items():
    print(k, v)
"#;

/// Expected result of every probe line, at every tier.
fn expected(tier: Tier) -> BTreeMap<&'static str, &'static str> {
    let mut e = BTreeMap::from([
        ("read_shadow", "ENOENT"),
        ("list_root", "ENOENT"),
        ("write_code", "EROFS"),
        ("write_usr", "EROFS"),
        ("write_rootfs", "EROFS"),
        ("append_passwd", "EROFS"),
        ("write_tmp", "OK"),
        // Below the trusted tier /proc holds only the process directories (subset=pid):
        // the kernel's files are absent. The trusted tier's full /proc masks them with
        // /dev/null (kcore only where the kernel has it; this one is built without).
        (
            "read_kcore",
            if tier.full_proc() && std::path::Path::new("/proc/kcore").exists() {
                "EMPTY"
            } else {
                "ENOENT"
            },
        ),
        (
            "read_proc_keys",
            if tier.full_proc() { "EMPTY" } else { "ENOENT" },
        ),
        (
            "read_timer_list",
            if tier.full_proc() { "EMPTY" } else { "ENOENT" },
        ),
        // Bound read-only in a full /proc; absent from a pid-only one.
        (
            "list_proc_sys",
            if tier.full_proc() { "OK" } else { "ENOENT" },
        ),
        ("list_sys_firmware", "ENOENT"),
        ("symlink_file_escape", "ENOENT"),
        ("symlink_dir_escape", "ENOENT"),
        // Only the probe itself (pid 1) exists in its pid namespace.
        ("visible_pids", "1"),
        ("kill_node", "ESRCH"),
        ("kill_supervisor_view", "NO_PARENT"),
        ("ptrace_traceme", "EPERM"),
        ("mount_tmpfs", "EPERM"),
        ("unshare_user", "EPERM"),
        ("unshare_net", "EPERM"),
        ("setns", "EPERM"),
        ("clone_newuser", "EPERM"),
        ("keyctl", "EPERM"),
        ("bpf", "EPERM"),
        ("perf_event_open", "EPERM"),
        ("userfaultfd", "EPERM"),
        ("io_uring_setup", "EPERM"),
        ("process_vm_readv", "EPERM"),
        ("tiocsti", "EPERM"),
        // Landlock refuses TCP connect and bind to any port not listed.
        ("connect_forbidden", "EACCES"),
        ("bind_port", "EACCES"),
        ("bind_any", "EACCES"),
        // seccomp: IPv4/IPv6 sockets must be TCP; netlink is not allowed at all.
        ("udp_socket", "EPERM"),
        ("netlink_socket", "EPERM"),
        // seccomp: a stream socket of IPv4/IPv6 must be plain TCP (protocol 0 or
        // IPPROTO_TCP), whatever its flags: Landlock's port rules cover only TCP, so MPTCP
        // (which would connect to and listen on any port) and SCTP are refused at creation.
        ("mptcp_connect", "EPERM"),
        ("mptcp6_socket", "EPERM"),
        ("mptcp_flags_socket", "EPERM"),
        ("mptcp_listen", "EPERM"),
        ("sctp_stream_socket", "EPERM"),
        ("sctp_seqpacket_socket", "EPERM"),
        ("raw_socket", "EPERM"),
        ("packet_socket", "EPERM"),
        ("inet_socketpair", "EPERM"),
        ("tcp_explicit_socket", "OK"),
        ("unix_socketpair", "OK"),
        // seccomp: MSG_FASTOPEN on sendto/sendmsg (a connect without connect()) is refused;
        // a connect after TCP_FASTOPEN_CONNECT is still a connect, refused by Landlock.
        ("fastopen_sendto", "EPERM"),
        ("fastopen_sendmsg", "EPERM"),
        ("fastopen_connect_option", "EACCES"),
        ("cap_eff", "0000000000000000"),
        ("cap_bnd", "0000000000000000"),
        ("no_new_privs", "1"),
        ("seccomp", "2"),
        ("uid", "0"),
        ("hostname", "sandbox"),
    ]);
    if tier == Tier::Trusted {
        // Same answer, from Landlock alone: the trusted tier shares the host network.
        e.insert("connect_forbidden", "EACCES");
    }
    e
}

#[test]
fn every_escape_fails_with_its_specific_error_at_every_tier() {
    if !can_sandbox() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let code = code_dir(&[]);
    std::os::unix::fs::symlink("/etc/shadow", code.path().join("escape_file")).expect("symlink");
    std::os::unix::fs::symlink("/root", code.path().join("escape_dir")).expect("symlink");
    for tier in Tier::ALL {
        let mut spec = spec(tier, code.path(), "");
        spec.env = vec![
            ("NODE_PID".into(), std::process::id().to_string()),
            ("FORBIDDEN_PORT".into(), port.to_string()),
        ];
        let out = py(&spec, PROBE, b"");
        let stdout = text(&out.stdout);
        assert!(
            out.stderr.is_empty(),
            "{tier}: probe crashed: {}",
            text(&out.stderr)
        );
        let got: BTreeMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once(' ')).collect();
        for (key, want) in expected(tier) {
            assert_eq!(
                got.get(key).copied(),
                Some(want),
                "{tier}: attack {key}\n{stdout}"
            );
        }
    }
    // The node is alive (we are it), and nothing connected to the forbidden listener.
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(listener.accept().is_err());
}

#[test]
fn the_host_uid_outside_is_unprivileged() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    let spec = spec(Tier::Untrusted, code.path(), "");
    let out = py(
        &spec,
        "print(open('/proc/self/uid_map').read().split())\n\
         print(open('/proc/self/gid_map').read().split())",
        b"",
    );
    let stdout = text(&out.stdout);
    let range = skiff_sandbox::host_id_range();
    let mut lines = stdout.lines();
    for want in [range.uids(), range.group()..range.group() + 1] {
        // ['0', '<host id>', '1']: root inside is one unprivileged id outside, in the range.
        let line = lines.next().unwrap_or_else(|| panic!("maps: {stdout}"));
        let host: u32 = line
            .split('\'')
            .nth(3)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("map: {stdout}"));
        assert!(want.contains(&host), "{host} not in {want:?}: {stdout}");
        assert!(line.contains("'1'"), "{stdout}");
    }
}

/// Links under `/usr/lib` (a prefix every tier may read) that lead out of it, removed on drop.
struct UsrTrap {
    dir: std::path::PathBuf,
}

impl UsrTrap {
    /// `mid` -> `outside` (absolute), `rel` -> `outside` (relative), `end` -> `outside`,
    /// `inside` -> `/usr/share/common-licenses` (stays within the tier).
    fn new(outside: &std::path::Path) -> Self {
        use std::os::unix::fs::symlink;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::path::PathBuf::from(format!("/usr/lib/skiff-escape-{}-{n}", std::process::id()));
        std::fs::create_dir(&dir).expect("mkdir under /usr/lib");
        let trap = Self { dir };
        symlink(outside, trap.dir.join("mid")).expect("symlink");
        let up = "../".repeat(trap.dir.components().count() - 1);
        let relative = format!(
            "{up}{}",
            outside.display().to_string().trim_start_matches('/')
        );
        symlink(relative, trap.dir.join("rel")).expect("symlink");
        symlink(outside, trap.dir.join("end")).expect("symlink");
        symlink("/usr/share/common-licenses", trap.dir.join("inside")).expect("symlink");
        trap
    }

    fn path(&self, rest: &str) -> String {
        self.dir.join(rest).display().to_string()
    }
}

impl Drop for UsrTrap {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A policy with just enough of `/usr` for `cat`, plus `extra`; no path holds `/usr/lib` whole.
fn cat_policy(extra: &str) -> String {
    format!(
        "readable_paths = [\"/usr/bin\", \"/usr/lib/x86_64-linux-gnu\", \"/usr/lib64\", \
         \"/usr/lib/aarch64-linux-gnu\", \"/lib\", \"/lib64\", \"/bin\", \"/etc/ld.so.cache\", \
         \"{extra}\"]"
    )
}

#[test]
fn a_readable_path_is_checked_and_bound_at_its_real_path() {
    if !can_sandbox() {
        return;
    }
    // Readable by anyone but outside every tier's paths: only the check keeps it out.
    let outside = code_dir(&[("secret.txt", "top secret\n")]);
    let trap = UsrTrap::new(outside.path());
    let code = code_dir(&[]);
    for tier in Tier::ALL {
        // A symlink among the directories, absolute or relative: refused at the start, naming
        // the path and where it leads.
        for via in ["mid", "rel"] {
            let path = trap.path(&format!("{via}/secret.txt"));
            let sandbox = spec(tier, code.path(), &cat_policy(&path));
            let argv = crate::argv(&["/bin/cat", &path]);
            match skiff_sandbox::run_blocking(&sandbox, &argv, b"") {
                Err(e @ skiff_sandbox::SandboxError::Policy(_)) => {
                    let message = format!("{e}: {}", std::error::Error::source(&e).expect("why"));
                    assert!(message.contains(&path), "{tier}: {message}");
                    assert!(
                        message.contains(&outside.path().display().to_string()),
                        "{tier}: {message}"
                    );
                }
                other => panic!("{tier}: {via}: the secret was reachable: {other:?}"),
            }
        }
        // A symlink as the last component is recreated, and leads nowhere inside.
        let path = trap.path("end");
        let sandbox = spec(tier, code.path(), &cat_policy(&path));
        let out = crate::sh(&sandbox, &format!("cat {path}/secret.txt"), b"");
        assert!(out.stdout.is_empty(), "{tier}: {}", text(&out.stdout));
        assert!(
            text(&out.stderr).contains("No such file"),
            "{tier}: {}",
            text(&out.stderr)
        );
        // A symlink that stays within the tier: bound at the real path.
        let path = trap.path("inside/GPL-3");
        let sandbox = spec(tier, code.path(), &cat_policy(&path));
        let out = crate::sh(&sandbox, "head -c 42 /usr/share/common-licenses/GPL-3", b"");
        let want = std::fs::read("/usr/share/common-licenses/GPL-3").expect("host file");
        assert_eq!(out.stdout, want[..42], "{tier}: {}", text(&out.stderr));
    }
    // `..` after a symlink never gets this far.
    let policy = skiff_sandbox::Policy::from_toml(&format!(
        "readable_paths = [\"{}\"]",
        trap.path("mid/../../../etc")
    ))
    .expect("parses");
    assert!(policy.resolve(Tier::Untrusted).is_err());
}
