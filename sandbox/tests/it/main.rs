//! Integration tests of skiff-sandbox: real sandboxes, so they need root (they say so and skip
//! otherwise). Escape attempts assert the specific errno or outcome that stops them, at every
//! tier where they must fail; positive runs assert exact output.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_sandbox::{
    run, run_blocking, ExecSandbox, ExitStatus, Policy, PoolConfig, PoolKey, PoolMode, RunOutcome,
    SandboxError, SandboxSpec, Tier, WarmPool, WarmSandbox,
};

mod escape;
mod pool;

/// Whether the process can create sandboxes; prints why not.
pub fn can_sandbox() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    if !root {
        eprintln!("skipping: sandbox tests need root (uid mapping, cgroups, mounts)");
        return false;
    }
    if !Path::new("/proc/self/ns/user").exists() {
        eprintln!("skipping: kernel without user namespaces");
        return false;
    }
    true
}

/// A code directory readable by the sandbox's unprivileged uid, with `files`.
pub fn code_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for (name, contents) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write code file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    dir
}

pub fn spec(tier: Tier, code: &Path, policy: &str) -> SandboxSpec {
    let policy = Policy::from_toml(policy).expect("test policy parses");
    SandboxSpec::with_policy(tier, &policy, code).expect("test policy narrows the tier")
}

pub fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub fn sh(spec: &SandboxSpec, script: &str, stdin: &[u8]) -> RunOutcome {
    run_blocking(spec, &argv(&["/bin/sh", "-c", script]), stdin).expect("sandbox runs")
}

pub fn py(spec: &SandboxSpec, script: &str, stdin: &[u8]) -> RunOutcome {
    run_blocking(spec, &argv(&["/usr/bin/python3", "-c", script]), stdin).expect("sandbox runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits (at most 5 s, else fails) until the cgroup thread has reaped every finished
/// sandbox's supervisor and removed its cgroup: a normal run leaves both to it.
pub fn await_removals() {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while skiff_sandbox::cgroup::removals_pending() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "removals still pending after 5 s: {}",
            skiff_sandbox::cgroup::removals_pending()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every process whose parent is this test process and that is a zombie.
fn our_zombies() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command (which may hold spaces) start after the last ')'.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] == "Z" && fields[1] == me {
            out.push(pid);
        }
    }
    out
}

#[test]
fn sh_and_python_run_at_every_tier_with_exact_io() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[(
        "main.py",
        "import sys, json\nreq = json.load(sys.stdin)\nprint(json.dumps({'sum': sum(req['xs']), 'who': req['who']}))\n",
    )]);
    for tier in Tier::ALL {
        let spec = spec(tier, code.path(), "");
        let out = sh(&spec, "cat; printf 'tier-done'", b"payload \x00\xff line\n");
        assert_eq!(
            out.status,
            ExitStatus::Exited(0),
            "{tier}: {}",
            text(&out.stderr)
        );
        assert_eq!(out.stdout, b"payload \x00\xff line\ntier-done");
        assert!(out.stderr.is_empty());
        assert!(!out.stdout_truncated);
        assert!(out.peak_memory_bytes > 0);

        let out = run_blocking(
            &spec,
            &argv(&["python3", "/code/main.py"]),
            br#"{"xs": [1, 2, 39], "who": "caf\u00e9"}"#,
        )
        .expect("sandbox runs");
        assert_eq!(
            out.status,
            ExitStatus::Exited(0),
            "{tier}: {}",
            text(&out.stderr)
        );
        assert_eq!(
            text(&out.stdout),
            "{\"sum\": 42, \"who\": \"caf\\u00e9\"}\n"
        );
        assert!(
            out.cpu > Duration::ZERO,
            "{tier}: cpu time read from the cgroup"
        );
    }
}

#[tokio::test]
async fn async_run_reports_exit_code_and_stderr() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    let spec = spec(Tier::Standard, code.path(), "");
    let out = run(&spec, &argv(&["sh", "-c", "echo oops >&2; exit 3"]), b"")
        .await
        .expect("sandbox runs");
    assert_eq!(out.status, ExitStatus::Exited(3));
    assert_eq!(out.stderr, b"oops\n");
    assert!(out.stdout.is_empty());
    let out = run(&spec, &argv(&["sh", "-c", "kill -TERM $$; sleep 5"]), b"")
        .await
        .expect("sandbox runs");
    // pid 1 ignores signals it has no handler for, so the shell (pid 1) survives its own
    // SIGTERM and only the sleep ends; a child shell dies of it.
    assert_eq!(out.status, ExitStatus::Exited(0));
    let out = run(
        &spec,
        &argv(&["sh", "-c", "sh -c 'kill -TERM $$'; echo $?"]),
        b"",
    )
    .await
    .expect("sandbox runs");
    assert_eq!(text(&out.stdout), "143\n");
}

#[test]
fn output_beyond_the_limit_is_truncated_and_drained() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    let spec = spec(
        Tier::Untrusted,
        code.path(),
        "stdout_bytes_max = 1000\nstderr_bytes_max = 10",
    );
    let out = sh(
        &spec,
        "head -c 1000000 /dev/zero; echo 0123456789abcdef >&2; echo done >&2",
        b"",
    );
    assert_eq!(out.status, ExitStatus::Exited(0));
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.stdout_truncated);
    assert_eq!(out.stderr, b"0123456789");
    assert!(out.stderr_truncated);
}

#[test]
fn large_stdin_is_delivered_whole() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    let spec = spec(Tier::Untrusted, code.path(), "");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let out = sh(&spec, "wc -c", &payload);
    assert_eq!(text(&out.stdout).trim(), "300000");
}

#[test]
fn a_missing_program_is_a_setup_error_naming_exec() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    let spec = spec(Tier::Untrusted, code.path(), "");
    let err = run_blocking(&spec, &argv(&["/code/nope"]), b"").expect_err("no such program");
    match err {
        SandboxError::Setup { step, path, source } => {
            assert_eq!(step, "exec");
            assert_eq!(path, Some(PathBuf::from("/code/nope")));
            assert_eq!(source.raw_os_error(), Some(libc_enoent()));
        }
        other => panic!("unexpected error {other:?}"),
    }
}

fn libc_enoent() -> i32 {
    2
}

#[test]
fn widening_policies_are_refused_before_anything_runs() {
    let policy = Policy::from_toml("pids_max = 100000").expect("parses");
    let err = SandboxSpec::with_policy(Tier::Untrusted, &policy, "/tmp").expect_err("wider");
    assert!(err.to_string().contains("pids_max"), "{err}");
    let policy = Policy::from_toml("tcp_connect_ports = [22]").expect("parses");
    assert!(SandboxSpec::with_policy(Tier::Untrusted, &policy, "/tmp").is_err());
    assert!(SandboxSpec::with_policy(Tier::Trusted, &policy, "/tmp").is_ok());
}

#[test]
fn every_cgroup_mount_and_process_is_gone_after_a_timeout() {
    if !can_sandbox() {
        return;
    }
    let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let code = code_dir(&[]);
    let spec = spec(Tier::Standard, code.path(), "timeout_ms = 400");
    let sandbox = ExecSandbox::create(&spec).expect("sandbox");
    let dirs = sandbox.cgroup_dirs();
    assert!(!dirs.is_empty() && dirs.iter().all(|d| d.exists()));
    let out = sandbox
        .run_blocking(
            &argv(&[
                "sh",
                "-c",
                "sleep 100 & sleep 100 & (sleep 100 &) ; sleep 100",
            ]),
            b"",
        )
        .expect("runs");
    assert_eq!(out.status, ExitStatus::TimedOut);
    assert!(out.wall >= Duration::from_millis(400));
    assert!(
        out.wall < Duration::from_secs(10),
        "killed on time: {:?}",
        out.wall
    );
    for dir in &dirs {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    assert!(our_zombies().is_empty(), "zombies: {:?}", our_zombies());
    let mounts_after = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert_eq!(mounts_before.lines().count(), mounts_after.lines().count());
}

#[test]
fn a_finished_run_leaves_its_cleanup_to_the_cgroup_thread_which_does_it_at_once() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    let spec = spec(Tier::Untrusted, code.path(), "");
    for _ in 0..3 {
        let sandbox = ExecSandbox::create(&spec).expect("sandbox");
        let dirs = sandbox.cgroup_dirs();
        assert!(!dirs.is_empty() && dirs.iter().all(|d| d.exists()));
        let out = sandbox
            .run_blocking(&argv(&["sh", "-c", "echo done"]), b"")
            .expect("runs");
        assert_eq!(out.status, ExitStatus::Exited(0));
        assert_eq!(out.stdout, b"done\n");
        await_removals();
        for dir in &dirs {
            assert!(!dir.exists(), "cgroup {} left behind", dir.display());
        }
        assert!(our_zombies().is_empty(), "zombies: {:?}", our_zombies());
    }
    // Made ahead: fresh cgroups wait, none of them one a sandbox has used.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while skiff_sandbox::cgroup_pool_ready() < skiff_sandbox::CGROUP_POOL_SIZE_DEFAULT {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let a = ExecSandbox::create(&spec).expect("sandbox");
    let b = ExecSandbox::create(&spec).expect("sandbox");
    let (dirs_a, dirs_b) = (a.cgroup_dirs(), b.cgroup_dirs());
    assert!(dirs_a.iter().all(|d| !dirs_b.contains(d)));
    for dir in dirs_a.iter().chain(&dirs_b) {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).expect("procs");
        // The init of its own sandbox, nobody else (its supervisor stays outside).
        assert_eq!(procs.lines().count(), 1, "{}: {procs}", dir.display());
    }
    drop((a, b));
    // A cgroup made ahead holds the previous sandbox's limits; every sandbox gets its own.
    let limit_file = |sandbox: &ExecSandbox| -> Option<u64> {
        sandbox.cgroup_dirs().iter().find_map(|d| {
            std::fs::read_to_string(d.join("memory.limit_in_bytes"))
                .or_else(|_| std::fs::read_to_string(d.join("memory.max")))
                .ok()
                .and_then(|t| t.trim().parse().ok())
        })
    };
    let small = spec_with(
        Tier::Untrusted,
        code.path(),
        "memory_bytes_max = 67108864
pids_max = 9",
    );
    for (want_memory, spec) in [
        (256u64 << 20, &spec),
        (64 << 20, &small),
        (64 << 20, &small),
        (256 << 20, &spec),
    ] {
        let sandbox = ExecSandbox::create(spec).expect("sandbox");
        assert_eq!(limit_file(&sandbox), Some(want_memory));
        let pids = sandbox
            .cgroup_dirs()
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join("pids.max")).ok());
        // Exactly the policy's: the supervisor is not in the cgroup.
        let want_pids = spec.limits.pids_max;
        assert_eq!(
            pids.map(|p| p.trim().to_string()),
            Some(want_pids.to_string())
        );
        // The pool refills in the background with these limits.
        std::thread::sleep(Duration::from_millis(20));
    }
    // Turned off, the pool removes what it kept ready.
    skiff_sandbox::set_cgroup_pool_size(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while skiff_sandbox::cgroup_pool_ready() > 0 {
        assert!(std::time::Instant::now() < deadline, "ready cgroups kept");
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = sh(&spec, "echo still runs", b"");
    assert_eq!(out.stdout, b"still runs\n");
    skiff_sandbox::set_cgroup_pool_size(skiff_sandbox::CGROUP_POOL_SIZE_DEFAULT);
}

#[test]
fn spinning_past_the_wall_clock_is_killed_on_time() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    for tier in Tier::ALL {
        let spec = spec(tier, code.path(), "timeout_ms = 300");
        let out = py(&spec, "while True: pass", b"");
        assert_eq!(out.status, ExitStatus::TimedOut, "{tier}");
        assert!(out.wall < Duration::from_secs(10), "{tier}: {:?}", out.wall);
    }
}

#[test]
fn the_cpu_quota_holds() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    for tier in Tier::ALL {
        let spec = spec(tier, code.path(), "cpu_millis_max = 200");
        let out = py(
            &spec,
            "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 1.0: pass",
            b"",
        );
        assert_eq!(out.status, ExitStatus::Exited(0), "{tier}");
        let share = out.cpu.as_secs_f64() / out.wall.as_secs_f64();
        // A fifth of a core, with room for scheduling noise; unthrottled it would be ~1.0.
        assert!(
            share < 0.5,
            "{tier}: cpu {:?} over wall {:?}",
            out.cpu,
            out.wall
        );
    }
}

#[test]
fn allocating_past_the_memory_limit_is_reported_as_oom() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    for tier in Tier::ALL {
        let spec = spec(tier, code.path(), "memory_bytes_max = 67108864");
        let out = py(&spec, "x = 'x' * (512 * 1024 * 1024)\nprint(len(x))", b"");
        assert_eq!(
            out.status,
            ExitStatus::OutOfMemory,
            "{tier}: {}",
            text(&out.stderr)
        );
        assert!(out.stdout.is_empty());
        assert!(out.peak_memory_bytes <= 67108864 + 4096, "{tier}");
    }
}

#[test]
fn filling_tmp_stops_at_its_size() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    for tier in Tier::ALL {
        let spec = spec(tier, code.path(), "tmp_bytes_max = 4194304");
        let out = py(
            &spec,
            "import errno\nn = 0\ntry:\n    with open('/tmp/fill', 'wb') as f:\n        while True:\n            f.write(b'x' * 65536); f.flush(); n += 65536\nexcept OSError as e:\n    print(errno.errorcode[e.errno], n)",
            b"",
        );
        let stdout = text(&out.stdout);
        let mut words = stdout.split_whitespace();
        assert_eq!(
            words.next(),
            Some("ENOSPC"),
            "{tier}: {stdout} {}",
            text(&out.stderr)
        );
        let written: u64 = words.next().and_then(|n| n.parse().ok()).expect("count");
        assert!(written <= 4194304, "{tier}: wrote {written}");
    }
}

#[test]
fn a_fork_bomb_hits_the_pids_limit_and_the_host_stays_responsive() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    for tier in Tier::ALL {
        let spec = spec(tier, code.path(), "pids_max = 16\ntimeout_ms = 5000");
        let out = py(
            &spec,
            "import os, time, errno\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(60); os._exit(0)\n        n += 1\nexcept OSError as e:\n    print(errno.errorcode[e.errno], n)",
            b"",
        );
        let stdout = text(&out.stdout);
        let mut words = stdout.split_whitespace();
        assert_eq!(
            words.next(),
            Some("EAGAIN"),
            "{tier}: {stdout} {}",
            text(&out.stderr)
        );
        let forked: u32 = words.next().and_then(|n| n.parse().ok()).expect("count");
        assert!(forked < 16, "{tier}: forked {forked}");
        // The classic shell bomb, stopped by the timeout, leaves nothing behind.
        let spec = spec_with(tier, code.path(), "pids_max = 16\ntimeout_ms = 500");
        let out = sh(&spec, "b() { b | b & }; b", b"");
        assert!(
            matches!(out.status, ExitStatus::TimedOut | ExitStatus::Exited(_)),
            "{tier}: {:?}",
            out.status
        );
        // The host still forks and runs sandboxes.
        let out = sh(&spec_with(tier, code.path(), ""), "echo alive", b"");
        assert_eq!(out.stdout, b"alive\n");
    }
    await_removals();
    assert!(our_zombies().is_empty());
}

fn spec_with(tier: Tier, code: &Path, policy: &str) -> SandboxSpec {
    spec(tier, code, policy)
}

#[test]
fn trusted_reaches_an_allowed_loopback_port_and_no_other() {
    if !can_sandbox() {
        return;
    }
    let allowed = TcpListener::bind("127.0.0.1:0").expect("listener");
    let forbidden = TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = allowed.local_addr().expect("addr").port();
    let other = forbidden.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = allowed.accept().expect("accept");
        let mut buf = [0u8; 4];
        conn.read_exact(&mut buf).expect("read");
        conn.write_all(&[buf.as_slice(), b"-pong"].concat())
            .expect("write");
    });
    let code = code_dir(&[]);
    let spec = spec(
        Tier::Trusted,
        code.path(),
        &format!("tcp_connect_ports = [{port}]"),
    );
    let script = format!(
        "import socket, errno\ns = socket.create_connection(('127.0.0.1', {port}), timeout=5)\ns.sendall(b'ping')\nprint(s.recv(100).decode())\ntry:\n    socket.create_connection(('127.0.0.1', {other}), timeout=5)\n    print('connected')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])"
    );
    let out = py(&spec, &script, b"");
    assert_eq!(
        text(&out.stdout),
        "ping-pong\nEACCES\n",
        "{}",
        text(&out.stderr)
    );
    server.join().expect("server thread");
    drop(forbidden);
}

#[test]
fn the_data_socket_is_reachable_at_its_fixed_path() {
    if !can_sandbox() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = dir.path().join("data.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 3];
        conn.read_exact(&mut buf).expect("read");
        conn.write_all(b"value").expect("write");
    });
    let code = code_dir(&[]);
    let mut spec = spec(Tier::Untrusted, code.path(), "");
    spec.data_socket = Some(socket);
    let out = py(
        &spec,
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect('/run/skiff/data.sock')\ns.sendall(b'get')\nprint(s.recv(100).decode())",
        b"",
    );
    assert_eq!(text(&out.stdout), "value\n", "{}", text(&out.stderr));
    server.join().expect("server thread");
}

#[test]
fn the_helper_binary_runs_from_the_path_and_cannot_be_changed() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    for tier in Tier::ALL {
        let mut spec = spec(tier, code.path(), "");
        // Any small host binary will do: what is tested is the bind, not the client.
        spec.helper_binary = Some(PathBuf::from("/bin/true"));
        let out = sh(
            &spec,
            "skiff-data && echo ran; echo \"$PATH\"; \
             (echo x > /run/skiff/bin/skiff-data) 2>&1 | grep -o 'Read-only file system'",
            b"",
        );
        assert_eq!(
            text(&out.stdout),
            "ran\n/usr/local/bin:/usr/bin:/bin:/run/skiff/bin\nRead-only file system\n",
            "{tier}: {}",
            text(&out.stderr)
        );
        assert_eq!(out.status, ExitStatus::Exited(0), "{tier}");
    }
    // Without a helper, nothing is at its path and the default PATH does not name its directory.
    let spec = spec(Tier::Untrusted, code.path(), "");
    let out = sh(
        &spec,
        "echo \"$PATH\"; test -e /run/skiff/bin/skiff-data || echo absent",
        b"",
    );
    assert_eq!(text(&out.stdout), "/usr/local/bin:/usr/bin:/bin\nabsent\n");
}

#[test]
fn policies_shape_the_sandbox() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    // Without /usr readable, there is no shell to run.
    let spec = spec(
        Tier::Standard,
        code.path(),
        "readable_paths = [\"/etc/ssl\"]",
    );
    let err = run_blocking(&spec, &argv(&["/bin/sh", "-c", "true"]), b"").expect_err("no /bin");
    assert!(
        matches!(err, SandboxError::Setup { ref step, .. } if step == "exec"),
        "{err:?}"
    );
    // With no writable path, /tmp is read-only.
    let spec = spec_with(Tier::Standard, code.path(), "writable_paths = []");
    let out = sh(&spec, "echo x > /tmp/x", b"");
    assert_eq!(out.status, ExitStatus::Exited(2));
    assert!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn tiers_parse_and_print() {
    let tiers: BTreeMap<&str, Tier> = Tier::ALL.iter().map(|t| (t.as_str(), *t)).collect();
    assert_eq!(tiers.len(), 3);
    assert_eq!("trusted".parse::<Tier>().expect("parses"), Tier::Trusted);
    assert!("admin".parse::<Tier>().is_err());
}

#[test]
fn warm_pool_types_are_usable_from_outside() {
    let pool = WarmPool::new(PoolConfig::default());
    let key = PoolKey {
        function: "f".into(),
        function_id: 1,
        version: 1,
        mode: PoolMode::Exec,
    };
    let none: Option<WarmSandbox> = pool.acquire(&key);
    assert!(none.is_none());
    assert_eq!(pool.stats().idle, 0);
}

const DIE_HELPER_ENV: &str = "SKIFF_SANDBOX_DIE_WITH_NODE_HELPER";

/// Whether `pid` is gone (or a zombie nobody has reaped yet: dead all the same).
fn process_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn sandboxes_die_with_the_node_and_their_cgroups_are_swept() {
    if std::env::var_os(DIE_HELPER_ENV).is_some() {
        // Helper mode: play a node that starts a long sandbox and is then killed.
        let code = code_dir(&[]);
        let spec = spec(Tier::Untrusted, code.path(), "");
        let mut sandbox = ExecSandbox::create(&spec).expect("sandbox");
        sandbox
            .hand_off(&argv(&["sleep", "100"]))
            .expect("hand-off");
        sandbox.wait_started().expect("started");
        let dir = sandbox
            .cgroup_dirs()
            .into_iter()
            .next()
            .expect("a cgroup dir");
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).expect("procs");
        let mut pids: Vec<String> = procs.split_whitespace().map(String::from).collect();
        // The supervisor is outside the cgroup: the function's parent.
        let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0])).expect("status");
        let parent = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .map(|p| p.trim().to_string())
            .expect("a parent");
        pids.push(parent);
        println!("PIDS {}", pids.join(","));
        println!("CGROUP {}", dir.display());
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    if !can_sandbox() {
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let mut helper = std::process::Command::new(exe)
        .args([
            "sandboxes_die_with_the_node_and_their_cgroups_are_swept",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(DIE_HELPER_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("helper node");
    let stdout = helper.stdout.take().expect("piped");
    let mut pids = Vec::new();
    let mut cgroup = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.expect("helper output");
        // The harness prints "test NAME ... " without a newline before the test's own output.
        if let Some((_, list)) = line.split_once("PIDS ") {
            pids = list
                .split(',')
                .filter_map(|p| p.parse::<i32>().ok())
                .collect();
        }
        if let Some((_, dir)) = line.split_once("CGROUP ") {
            cgroup = Some(PathBuf::from(dir));
            break;
        }
    }
    let cgroup = cgroup.expect("the helper reported its sandbox");
    assert!(pids.len() >= 2, "function and supervisor: {pids:?}");
    let helper_pid = i32::try_from(helper.id()).expect("pid");
    assert!(!pids.contains(&helper_pid), "{pids:?}");
    assert!(pids.iter().all(|p| !process_dead(*p)));
    // Detect the layout now (its first use sweeps), while the helper is alive and so spared.
    skiff_sandbox::cgroup::layout().expect("cgroup layout");
    assert!(cgroup.exists());
    helper.kill().expect("kill the helper node");
    helper.wait().expect("reap the helper node");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !pids.iter().all(|p| process_dead(*p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "sandbox processes outlived their node: {pids:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The dead node could not remove its cgroup; the next node's sweep does.
    assert!(cgroup.exists());
    let swept = skiff_sandbox::cgroup::sweep_stale().expect("sweep");
    assert!(swept >= 1);
    assert!(!cgroup.exists(), "{} left behind", cgroup.display());
}

/// The network namespace `readlink /proc/self/ns/net` names inside a sandbox of `tier`.
fn net_namespace_inside(sandbox: ExecSandbox) -> String {
    let out = sandbox
        .run_blocking(&argv(&["/bin/sh", "-c", "readlink /proc/self/ns/net"]), b"")
        .expect("sandbox runs");
    assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

#[test]
fn each_sandbox_gets_a_network_namespace_of_its_own_made_ahead_or_not() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    let host = std::fs::read_link("/proc/self/ns/net")
        .expect("host namespace")
        .to_string_lossy()
        .into_owned();
    let untrusted = SandboxSpec::new(Tier::Untrusted, code.path());
    // The first start sets the maker going; wait (bounded) until namespaces are ready so the
    // sandboxes below join ones made ahead.
    run_blocking(&untrusted, &argv(&["/bin/true"]), b"").expect("runs");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while skiff_sandbox::netns_pool_ready() < skiff_sandbox::NETNS_POOL_SIZE_DEFAULT {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut seen = std::collections::BTreeSet::new();
    for pool_on in [true, false] {
        if !pool_on {
            skiff_sandbox::set_netns_pool_size(0);
        }
        // Alive at the same time, so no namespace (or its number) can be recycled among them.
        let sandboxes: Vec<ExecSandbox> = (0..6)
            .map(|_| ExecSandbox::create(&untrusted).expect("sandbox"))
            .collect();
        for sandbox in sandboxes {
            let inside = net_namespace_inside(sandbox);
            assert!(inside.starts_with("net:["), "{inside}");
            assert_ne!(inside, host, "a sandbox shares the host's network");
            assert!(seen.insert(inside.clone()), "{inside} served two sandboxes");
        }
        seen.clear();
    }
    // Only the trusted tier keeps the host's network.
    let trusted =
        ExecSandbox::create(&SandboxSpec::new(Tier::Trusted, code.path())).expect("sandbox");
    assert_eq!(net_namespace_inside(trusted), host);
}

#[test]
fn one_shot_runs_started_at_once_from_many_threads_all_run() {
    if !can_sandbox() {
        return;
    }
    // Each start's helper shares this process's memory for a moment, and their id maps need
    // the memory's dumpable flag, which their credential changes reset: they take turns.
    let code = code_dir(&[]);
    let spec = spec(Tier::Untrusted, code.path(), "");
    std::thread::scope(|scope| {
        let runners: Vec<_> = (0..4)
            .map(|t| {
                let spec = &spec;
                scope.spawn(move || {
                    for i in 0..50 {
                        let out = sh(spec, "read x; echo \"$x\"", format!("{t}-{i}\n").as_bytes());
                        assert_eq!(out.status, ExitStatus::Exited(0), "{}", text(&out.stderr));
                        assert_eq!(text(&out.stdout), format!("{t}-{i}\n"));
                    }
                })
            })
            .collect();
        for runner in runners {
            runner.join().expect("runner");
        }
    });
    await_removals();
    assert!(our_zombies().is_empty(), "zombies: {:?}", our_zombies());
}

/// The heap bytes this process holds, counted by [`LiveBytes`], the test binary's allocator.
fn heap_in_use() -> usize {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

static LIVE_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The system allocator, counting the live bytes of the whole process, whoever allocates: a
/// one-shot run's starter and init run in this process's memory and call it too.
struct LiveBytes;

#[global_allocator]
static ALLOCATOR: LiveBytes = LiveBytes;

// SAFETY: every method hands its arguments unchanged to `System` and returns what `System`
// returned; the counting is one atomic add or subtract, which never allocates.
unsafe impl std::alloc::GlobalAlloc for LiveBytes {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which is `System`'s.
        let ptr = unsafe { std::alloc::System.alloc(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn one_shot_runs_leave_nothing_in_the_node_heap() {
    if !can_sandbox() {
        return;
    }
    // A one-shot run's starter and init allocate in this process's heap (they share its
    // memory): whatever they did not free before their exec or exit would stay here for good.
    let code = code_dir(&[]);
    let spec = spec(Tier::Untrusted, code.path(), "");
    let round = |n: usize| {
        for i in 0..n {
            let out = sh(&spec, "cat", format!("{i}").as_bytes());
            assert_eq!(text(&out.stdout), format!("{i}"));
            // A failed exec and a failed setup report from inside the sandbox, and so
            // allocate there.
            assert!(run_blocking(&spec, &argv(&["/code/missing"]), b"").is_err());
        }
        await_removals();
    };
    // After a first round the pools hold what they keep; from then on every run gives back
    // what it took (a leak of the command frame alone would be about 100 bytes a run).
    round(50);
    let before = heap_in_use();
    round(400);
    let after = heap_in_use();
    let runs = 800;
    assert!(
        after < before + 16 * 1024,
        "heap in use grew from {before} to {after} bytes over {runs} one-shot runs"
    );
}

#[test]
fn alternatives_work_at_every_tier_and_only_within_its_paths() {
    if !can_sandbox() {
        return;
    }
    if std::fs::canonicalize("/etc/alternatives/awk").is_err() {
        eprintln!("skipping: this host has no awk alternative");
        return;
    }
    let code = code_dir(&[]);
    let dangling = "for f in /etc/alternatives/*; do \
                    if [ -L \"$f\" ] && [ ! -e \"$f\" ]; then echo \"dangling $f\"; fi; done; \
                    [ -e /etc/alternatives/awk ] && echo awk-linked; echo done";
    for tier in Tier::ALL {
        let spec = spec(tier, code.path(), "");
        let out = sh(&spec, "awk 'BEGIN { print 6 * 7 }'", b"");
        assert_eq!(text(&out.stdout), "42\n", "{tier}: {}", text(&out.stderr));
        assert_eq!(out.status, ExitStatus::Exited(0));
        // Every link there leads to something the sandbox has.
        let out = sh(&spec, dangling, b"");
        assert_eq!(
            text(&out.stdout),
            "awk-linked\ndone\n",
            "{tier}: {}",
            text(&out.stderr)
        );
    }
    // Narrowed so that awk's target is not readable: no link to it, none dangling.
    let spec = spec(
        Tier::Untrusted,
        code.path(),
        "readable_paths = [\"/usr/bin/dash\", \"/usr/lib/x86_64-linux-gnu\", \"/usr/lib64\", \
         \"/usr/lib/aarch64-linux-gnu\", \"/lib\", \"/lib64\", \"/bin\", \"/etc/ld.so.cache\"]",
    );
    let out =
        run_blocking(&spec, &argv(&["/usr/bin/dash", "-c", dangling]), b"").expect("sandbox runs");
    assert_eq!(text(&out.stdout), "done\n", "{}", text(&out.stderr));
}
