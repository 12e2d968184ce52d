//! Sandbox start, side by side in one run: skiff cold start at each tier, the warm path, and
//! the peers `bwrap --unshare-all --die-with-parent` and `crun run`, all running `/bin/true`
//! with read-only binds of the same host paths.
//!
//! Run as root: `cargo bench -p skiff-sandbox --bench start`. Results go in
//! `docs/benchmarks.md` (section "Sandbox").
//!
//! The warm hand-off (one pipe write, ~µs) is timed with a plain loop printed before the
//! criterion groups: criterion sizes its iteration counts by the measured time, so timing a
//! step that needs a fresh sandbox per iteration would make it build ~10^5 sandboxes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion};
use skiff_sandbox::{run_blocking, ExecSandbox, ExitStatus, SandboxSpec, Tier};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
}

fn true_argv() -> Vec<String> {
    vec!["/bin/true".to_string()]
}

fn bwrap_command(code: &Path) -> Command {
    let mut cmd = Command::new("bwrap");
    cmd.args([
        "--unshare-all",
        "--die-with-parent",
        "--ro-bind",
        "/usr",
        "/usr",
    ]);
    for (link, target) in [
        ("/bin", "usr/bin"),
        ("/lib", "usr/lib"),
        ("/lib64", "usr/lib64"),
        ("/sbin", "usr/sbin"),
    ] {
        cmd.args(["--symlink", target, link]);
    }
    cmd.args(["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]);
    cmd.arg("--ro-bind").arg(code).arg("/code");
    cmd.args([
        "--tmpfs",
        "/tmp",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "/bin/true",
    ]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// An OCI bundle equivalent to the untrusted tier: user (root → one unprivileged uid), pid,
/// net, ipc, uts, mount and cgroup namespaces; read-only root with `/usr` bound read-only and
/// the merged-/usr symlinks; tmpfs `/tmp` and `/dev`; fresh `/proc` with crun's default masks.
fn crun_bundle(code: &Path) -> tempfile::TempDir {
    let bundle = tempfile::tempdir().expect("bundle dir");
    let rootfs = bundle.path().join("rootfs");
    for dir in ["usr", "proc", "dev", "tmp", "code", "etc"] {
        std::fs::create_dir_all(rootfs.join(dir)).expect("rootfs dirs");
    }
    std::fs::write(rootfs.join("etc/ld.so.cache"), b"").expect("ld.so.cache mount point");
    for (link, target) in [
        ("bin", "usr/bin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
        ("sbin", "usr/sbin"),
    ] {
        std::os::unix::fs::symlink(target, rootfs.join(link)).expect("symlink");
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bundle.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let config = format!(
        r#"{{
  "ociVersion": "1.0.0",
  "process": {{
    "terminal": false, "user": {{"uid": 0, "gid": 0}}, "args": ["/bin/true"],
    "env": ["PATH=/usr/bin:/bin"], "cwd": "/", "noNewPrivileges": true,
    "capabilities": {{"bounding": [], "effective": [], "permitted": []}},
    "rlimits": [{{"type": "RLIMIT_NOFILE", "hard": 256, "soft": 256}}]
  }},
  "root": {{"path": "rootfs", "readonly": true}},
  "hostname": "sandbox",
  "mounts": [
    {{"destination": "/proc", "type": "proc", "source": "proc"}},
    {{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755", "size=64k"]}},
    {{"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]}},
    {{"destination": "/etc/ld.so.cache", "type": "bind", "source": "/etc/ld.so.cache", "options": ["bind", "ro"]}},
    {{"destination": "/code", "type": "bind", "source": "{code}", "options": ["rbind", "ro"]}},
    {{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=16m"]}}
  ],
  "linux": {{
    "uidMappings": [{{"containerID": 0, "hostID": 200000, "size": 1}}],
    "gidMappings": [{{"containerID": 0, "hostID": 200000, "size": 1}}],
    "namespaces": [{{"type": "pid"}}, {{"type": "network"}}, {{"type": "ipc"}}, {{"type": "uts"}},
                   {{"type": "mount"}}, {{"type": "user"}}, {{"type": "cgroup"}}],
    "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                    "/proc/timer_list", "/proc/sched_debug", "/proc/scsi"],
    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"]
  }}
}}"#,
        code = code.display()
    );
    std::fs::write(bundle.path().join("config.json"), config).expect("config.json");
    bundle
}

/// crun 1.8 refuses a v1/v2 hybrid whose unified tree has any controller (hugetlb here). The
/// bench thread gets its own mount namespace without the unified mount, so crun (run with
/// `--cgroup-manager=disabled`) sees plain v1. Our own sandboxes are unaffected.
fn hide_unified_cgroup_from_crun() -> bool {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use nix::sched::{unshare, CloneFlags};
    if unshare(CloneFlags::CLONE_NEWNS).is_err() {
        return false;
    }
    if mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .is_err()
    {
        return false;
    }
    let unified = Path::new("/sys/fs/cgroup/unified");
    !unified.exists() || umount2(unified, MntFlags::MNT_DETACH).is_ok()
}

fn status_ok(mut cmd: Command) -> bool {
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn warm_numbers(code: &Path) {
    let spec = SandboxSpec::new(Tier::Untrusted, code);
    let argv = true_argv();
    let samples = 300;
    let mut handoff = Vec::with_capacity(samples);
    let mut to_exec = Vec::with_capacity(samples);
    for _ in 0..samples {
        let mut sandbox = ExecSandbox::create(&spec).expect("warm sandbox");
        let t = Instant::now();
        sandbox.hand_off(&argv).expect("hand-off");
        handoff.push(t.elapsed());
        sandbox.wait_started().expect("exec");
        to_exec.push(t.elapsed());
        let out = sandbox.finish(b"").expect("finish");
        assert_eq!(out.status, ExitStatus::Exited(0));
    }
    handoff.sort();
    to_exec.sort();
    println!(
        "warm hand-off (acquire→work written), {samples} samples: median {:?}, p90 {:?}, p99 {:?}",
        percentile(&handoff, 0.5),
        percentile(&handoff, 0.9),
        percentile(&handoff, 0.99)
    );
    println!(
        "warm hand-off → execve done (/bin/true started): median {:?}, p90 {:?}",
        percentile(&to_exec, 0.5),
        percentile(&to_exec, 0.9)
    );
    for tier in Tier::ALL {
        let spec = SandboxSpec::new(tier, code);
        let sandboxes: Vec<ExecSandbox> = (0..8)
            .map(|_| ExecSandbox::create(&spec).expect("warm sandbox"))
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let mut mem: Vec<u64> = sandboxes.iter().map(ExecSandbox::memory_bytes).collect();
        mem.sort();
        let mut pss: Vec<u64> = sandboxes.iter().map(pss_bytes).collect();
        pss.sort();
        println!(
            "idle warm sandbox memory ({tier}): cgroup charge median {} KiB (max {} KiB); PSS of its address spaces median {} KiB (max {} KiB)",
            mem[mem.len() / 2] / 1024,
            mem[mem.len() - 1] / 1024,
            pss[pss.len() / 2] / 1024,
            pss[pss.len() - 1] / 1024
        );
    }
}

/// Proportional set size of every address space in the sandbox's cgroup: what the host really
/// spends on it, including the pages still shared copy-on-write with the node (which the cgroup
/// does not charge to the sandbox). An idle sandbox's init shares the supervisor's address space
/// (until its exec), and both report it: each distinct rollup is counted once.
fn pss_bytes(sandbox: &ExecSandbox) -> u64 {
    let Some(dir) = sandbox.cgroup_dirs().into_iter().next() else {
        return 0;
    };
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    let rollups: std::collections::BTreeSet<String> = procs
        .lines()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .collect();
    rollups
        .into_iter()
        .filter_map(|rollup| {
            rollup
                .lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .sum()
}

fn main() {
    if !is_root() {
        eprintln!("skipping sandbox benches: they need root");
        return;
    }
    let code_holder = tempfile::tempdir().expect("code dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(code_holder.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    let code: PathBuf = code_holder.path().to_path_buf();

    // Sanity: each contender really runs /bin/true.
    for tier in Tier::ALL {
        let out =
            run_blocking(&SandboxSpec::new(tier, &code), &true_argv(), b"").expect("skiff runs");
        assert_eq!(out.status, ExitStatus::Exited(0));
    }
    let have_bwrap = status_ok(bwrap_command(&code));
    if !have_bwrap {
        eprintln!("bwrap missing or failing: apt-get install bubblewrap");
    }

    warm_numbers(&code);
    // The warm numbers made and dropped 324 sandboxes: let their clean-up (cgroups removed by
    // the cgroup thread, network namespaces torn down by the kernel's workqueue) finish before
    // the timed groups, so the first group does not pay for it and bwrap, measured later, not.
    let settle = Instant::now() + Duration::from_secs(10);
    while skiff_sandbox::cgroup::removals_pending() > 0 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(2));

    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    {
        let mut group = c.benchmark_group("start");
        for tier in Tier::ALL {
            let spec = SandboxSpec::new(tier, &code);
            group.bench_function(format!("skiff_cold_{tier}"), |b| {
                b.iter(|| run_blocking(&spec, &true_argv(), b"").expect("runs"))
            });
        }
        // The same cold start with every network namespace created on the start's path, as
        // when a burst has emptied the pool of namespaces made ahead.
        let spec = SandboxSpec::new(Tier::Untrusted, &code);
        skiff_sandbox::set_netns_pool_size(0);
        group.bench_function("skiff_cold_untrusted_netns_pool_off", |b| {
            b.iter(|| run_blocking(&spec, &true_argv(), b"").expect("runs"))
        });
        skiff_sandbox::set_netns_pool_size(skiff_sandbox::NETNS_POOL_SIZE_DEFAULT);
        group.bench_function("skiff_warm_run_untrusted", |b| {
            b.iter_batched(
                || ExecSandbox::create(&spec).expect("warm sandbox"),
                |sandbox| sandbox.run_blocking(&true_argv(), b"").expect("runs"),
                BatchSize::PerIteration,
            )
        });
        if have_bwrap {
            group.bench_function("bwrap", |b| {
                b.iter(|| assert!(status_ok(bwrap_command(&code))))
            });
        }
        let bundle = crun_bundle(&code);
        let crun_ok = hide_unified_cgroup_from_crun() && {
            let mut cmd = crun_command(bundle.path(), 0);
            cmd.stderr(Stdio::inherit());
            status_ok(cmd)
        };
        if crun_ok {
            let mut n = 1u64;
            group.bench_function("crun", |b| {
                b.iter(|| {
                    n += 1;
                    assert!(status_ok(crun_command(bundle.path(), n)))
                })
            });
        } else {
            eprintln!("crun missing or failing: apt-get install crun");
        }
        group.finish();
    }
    c.final_summary();
}

fn crun_command(bundle: &Path, n: u64) -> Command {
    let mut cmd = Command::new("crun");
    cmd.args(["--cgroup-manager=disabled", "run", "-b"]);
    cmd.arg(bundle);
    cmd.arg(format!("skiff-bench-{}-{n}", std::process::id()));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}
