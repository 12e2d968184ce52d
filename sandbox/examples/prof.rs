fn main() {
    let spec =
        skiff_sandbox::SandboxSpec::new(skiff_sandbox::Tier::Untrusted, std::env::temp_dir());
    for _ in 0..5 {
        let t0 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros();
        let out = skiff_sandbox::run_blocking(&spec, &["/bin/true".to_string()], b"").unwrap();
        let t1 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros();
        let mut prev = t0;
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            let mut p = line.splitn(3, ' ');
            p.next();
            let t: u128 = p.next().unwrap().parse().unwrap();
            print!("{}:{} ", p.next().unwrap(), t - prev);
            prev = t;
        }
        println!("end:{} total {}", t1 - prev, t1 - t0);
    }
}
