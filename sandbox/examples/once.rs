//! Runs one command in a sandbox and prints the outcome: `once TIER CODE_DIR CMD...`.
//! `ONCE_REPEAT=N` runs it N times; `ONCE_NETNS_POOL=N` and `ONCE_CGROUP_POOL=N` set the
//! sizes of the pools made ahead (0 turns one off).
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
    let spec = skiff_sandbox::SandboxSpec::new(tier, code);
    let n: usize = std::env::var("ONCE_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for _ in 0..n {
        let t = std::time::Instant::now();
        let out = skiff_sandbox::run_blocking(&spec, &argv, b"").expect("run");
        println!("{:?} in {:?}", out.status, t.elapsed());
    }
}
