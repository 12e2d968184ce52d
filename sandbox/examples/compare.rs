//! Quick interleaved comparison of skiff cold start and bwrap for /bin/true:
//! `compare N TIER [pool-off]` (`pool-off`: no network namespaces made ahead).
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let tier: skiff_sandbox::Tier = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "untrusted".into())
        .parse()
        .expect("tier");
    if std::env::args().nth(3).as_deref() == Some("pool-off") {
        skiff_sandbox::set_netns_pool_size(0);
    }
    let code = std::env::temp_dir();
    let spec = skiff_sandbox::SandboxSpec::new(tier, &code);
    let argv = vec!["/bin/true".to_string()];
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        skiff_sandbox::run_blocking(&spec, &argv, b"").expect("run");
        ours.push(t.elapsed());
        let t = Instant::now();
        let ok = Command::new("bwrap")
            .args([
                "--unshare-all",
                "--die-with-parent",
                "--ro-bind",
                "/usr",
                "/usr",
                "--symlink",
                "usr/bin",
                "/bin",
                "--symlink",
                "usr/lib",
                "/lib",
                "--symlink",
                "usr/lib64",
                "/lib64",
                "--tmpfs",
                "/tmp",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "/bin/true",
            ])
            .stdin(Stdio::null())
            .status()
            .expect("bwrap")
            .success();
        assert!(ok);
        theirs.push(t.elapsed());
    }
    let (a, b) = (median(ours), median(theirs));
    println!(
        "skiff {tier} median {a:?}, bwrap median {b:?}, ratio {:.2}",
        a.as_secs_f64() / b.as_secs_f64()
    );
}
