use skiff_sandbox::*;
#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let spec = SandboxSpec::new(Tier::Untrusted, dir.path());
    let out = run_blocking(&spec, &["sh".into(), "-c".into(), "id; cat; ls /; cat /proc/self/status | grep -E 'Cap|Seccomp|NoNew'; python3 -c 'print(1+1)'".into()], b"hello\n");
    println!("{out:#?}");
    let out = out.unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    println!("{}", String::from_utf8_lossy(&out.stderr));
}
