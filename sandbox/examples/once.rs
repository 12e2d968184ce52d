//! Runs one command in a sandbox and prints the outcome: `once TIER CODE_DIR CMD...`.
//! `ONCE_REPEAT=N` runs it N times; `ONCE_NETNS_POOL=N` and `ONCE_CGROUP_POOL=N` set the
//! sizes of the pools made ahead (0 turns one off); `ONCE_HEAP_MB=N` first fills N MiB of
//! this process's heap (a node's size); `ONCE_MADE_AHEAD=1` creates each sandbox the way the
//! warm pool does (a forked supervisor) and runs the command in it at once.
fn main() {
    let mut args = std::env::args().skip(1);
    let tier: skiff_sandbox::Tier = args
        .next()
        .unwrap_or_else(|| "untrusted".into())
        .parse()
        .expect("tier");
    let code = args.next().unwrap_or_else(|| "/tmp".into());
    let argv: Vec<String> = args.collect();
    let argv = if argv.is_empty() {
        vec!["/bin/true".to_string()]
    } else {
        argv
    };
    let size = |var: &str| std::env::var(var).ok().and_then(|v| v.parse().ok());
    if let Some(n) = size("ONCE_NETNS_POOL") {
        skiff_sandbox::set_netns_pool_size(n);
    }
    if let Some(n) = size("ONCE_CGROUP_POOL") {
        skiff_sandbox::set_cgroup_pool_size(n);
    }
    let heap: Vec<u8> = vec![1; size("ONCE_HEAP_MB").unwrap_or(0) << 20];
    let made_ahead = std::env::var_os("ONCE_MADE_AHEAD").is_some();
    let spec = skiff_sandbox::SandboxSpec::new(tier, code);
    let n: usize = std::env::var("ONCE_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for _ in 0..n {
        let t = std::time::Instant::now();
        let out = if made_ahead {
            skiff_sandbox::ExecSandbox::create(&spec)
                .and_then(|sandbox| sandbox.run_blocking(&argv, b""))
        } else {
            skiff_sandbox::run_blocking(&spec, &argv, b"")
        }
        .expect("run");
        println!("{:?} in {:?}", out.status, t.elapsed());
    }
    drop(heap);
}
