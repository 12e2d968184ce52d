//! A stranger on the network: no token, no client certificate, or only the ability to open TCP
//! connections to a node's port.
//!
//! Without TLS files any process that reaches the port would be served as a peer (votes,
//! appends, forwarded writes, dispatch of any function version): a node only runs so when the
//! operator says so explicitly. That a TLS node refuses a peer without a node certificate is
//! `tls::a_rogue_node_without_a_valid_certificate_cannot_join_vote_or_read`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::free_port;

/// Starts `skiffd` without TLS files, with `extra` flags and environment; returns the child
/// and where its output goes.
fn plaintext_node(
    dir: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, std::path::PathBuf, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let log = dir.join(format!("node-{}.log", addr.replace([':', '.'], "-")));
    let out = std::fs::File::create(&log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_skiffd"))
        .args(["--id", "1", "--listen", &addr])
        .arg("--data-dir")
        .arg(dir.join(format!("data-{}", addr.replace([':', '.'], "-"))))
        .args(extra)
        .envs(env.iter().copied())
        .env("SKIFF_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().expect("clone")))
        .stderr(Stdio::from(out))
        .spawn()
        .expect("start skiffd");
    (child, log, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_tls_files_starts_only_when_told_it_is_insecure() {
    let dir = tempfile::tempdir().expect("tempdir");

    // Neither TLS files nor the flag: the node refuses to start and says how to fix it.
    let (mut child, log, addr) = plaintext_node(dir.path(), &[], &[]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "a node without TLS files and without --insecure-plaintext kept running \
                 (serving peers in plaintext at {addr}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("skiffd certs") && text.contains("--insecure-plaintext"),
        "the refusal says how to make certificates or pass the flag: {text}"
    );
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "nothing listens at {addr}"
    );

    // With the flag, or its environment variable: it starts, and says loudly what it means.
    for (flags, env) in [
        (&["--insecure-plaintext"][..], &[][..]),
        (&[][..], &[("SKIFFD_INSECURE_PLAINTEXT", "true")][..]),
    ] {
        let (mut child, log, addr) = plaintext_node(dir.path(), flags, env);
        let deadline = Instant::now() + Duration::from_secs(30);
        let started = || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("node started"));
        while std::net::TcpStream::connect(&addr).is_err() || !started() {
            if let Some(status) = child.try_wait().expect("wait") {
                panic!(
                    "{flags:?} {env:?}: exited ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{flags:?} {env:?}: not listening"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let text = std::fs::read_to_string(&log).expect("log");
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            text.contains("INSECURE") && text.contains("ANY process"),
            "{flags:?} {env:?}: no warning at start: {text}"
        );
    }

    // The flag with TLS files is a contradiction, refused.
    let (mut child, log, _) = plaintext_node(
        dir.path(),
        &[
            "--insecure-plaintext",
            "--tls-ca",
            "/nonexistent/ca.pem",
            "--tls-cert",
            "/nonexistent/n.pem",
            "--tls-key",
            "/nonexistent/n.key",
        ],
        &[],
    );
    let status = child.wait().expect("wait");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        !status.success() && text.contains("tls.insecure_plaintext"),
        "{text}"
    );
}
