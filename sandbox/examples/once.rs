//! Runs one command in a sandbox and prints the outcome: `once TIER CODE_DIR CMD...`.
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
