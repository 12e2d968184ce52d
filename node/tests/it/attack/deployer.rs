//! A deployer: may deploy and remove functions and start streams, never reach the host as the
//! node's user, other deployers' secrets beyond its role, or paths the operator did not open.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use skiff_client::api::{DataGrant, FnMode, FunctionSpec, Role, Task, TaskState};
use skiff_client::{Client, ClientError};

use crate::functions::{archive, is_root, spec, CONFIG};
use crate::harness::TestCluster;
use crate::require_root;

/// One raw tar entry, its path written into the header as it is: what `tar::Builder` (and
/// the `skiff` command line) refuse to make.
struct Raw<'a> {
    path: &'a str,
    kind: tar::EntryType,
    data: &'a [u8],
    link: Option<&'a str>,
    mode: u32,
}

fn raw_file<'a>(path: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw {
        path,
        kind: tar::EntryType::Regular,
        data,
        link: None,
        mode: 0o755,
    }
}

fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let mut h = tar::Header::new_old();
        {
            let old = h.as_old_mut();
            old.name[..e.path.len()].copy_from_slice(e.path.as_bytes());
            if let Some(l) = e.link {
                old.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
        }
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(e.mode);
        h.set_mtime(0);
        if matches!(e.kind, tar::EntryType::Char) {
            let _ = h.set_device_major(1);
            let _ = h.set_device_minor(3);
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(e.data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn mode_and_content(path: &Path) -> (u32, Vec<u8>) {
    let meta = std::fs::symlink_metadata(path).expect("stat the host file");
    (
        meta.permissions().mode() & 0o7777,
        std::fs::read(path).expect("read the host file"),
    )
}

/// A deployer's client and the admin's.
async fn deployer(cluster: &TestCluster) -> Client {
    let made = cluster
        .client()
        .token_create(Role::Deployer, Some("deployer".into()))
        .await
        .expect("make a deployer token");
    cluster.client_with(&cluster.ids(), Some(made.secret))
}

async fn invoke_sync(c: &Client, name: &str, payload: &[u8]) -> Task {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.invoke(name, None, payload.to_vec(), true).await {
            Ok(t) => return t,
            Err(e) if Instant::now() < deadline => {
                eprintln!("invoke {name}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("invoke {name}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_archive_never_changes_a_host_file() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let as_deployer = deployer(&cluster).await;
    let host = tempfile::tempdir().expect("tempdir");
    let victim = host.path().join("victim");
    std::fs::write(&victim, b"host secret\n").expect("write");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let before = mode_and_content(&victim);
    let abs = victim.to_str().expect("utf-8 path").to_string();
    let dir = host.path().to_str().expect("utf-8 path").to_string();
    // Deep enough to climb out of any code cache directory to `/`.
    let climb = format!("{}{}", "../".repeat(16), abs.trim_start_matches('/'));
    let main = raw_file("main.sh", b"echo ran\n");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "absolute",
            raw_tar(&[main.clone_entry(), raw_file(&abs, b"pwned\n")]),
            "absolute path",
        ),
        (
            "dotdot",
            raw_tar(&[main.clone_entry(), raw_file(&climb, b"pwned\n")]),
            "..",
        ),
        (
            "symlink",
            raw_tar(&[
                main.clone_entry(),
                Raw {
                    kind: tar::EntryType::Symlink,
                    link: Some(&dir),
                    ..raw_file("out", b"")
                },
                raw_file("out/victim", b"pwned\n"),
            ]),
            "not a regular file",
        ),
        (
            "hardlink",
            raw_tar(&[
                main.clone_entry(),
                Raw {
                    kind: tar::EntryType::Link,
                    link: Some("/etc/shadow"),
                    ..raw_file("shadow", b"")
                },
            ]),
            "not a regular file",
        ),
        (
            "hardlink-victim",
            raw_tar(&[
                main.clone_entry(),
                Raw {
                    kind: tar::EntryType::Link,
                    link: Some(&abs),
                    ..raw_file("v", b"")
                },
            ]),
            "not a regular file",
        ),
        (
            "chardev",
            raw_tar(&[
                main.clone_entry(),
                Raw {
                    kind: tar::EntryType::Char,
                    ..raw_file("null", b"")
                },
            ]),
            "not a regular file",
        ),
        (
            "duplicate",
            raw_tar(&[main.clone_entry(), raw_file("main.sh", b"echo other\n")]),
            "appears twice",
        ),
    ];
    let shadow_before = std::fs::symlink_metadata("/etc/shadow")
        .ok()
        .map(|m| m.permissions().mode());
    for (name, code, reason) in cases {
        // The library uploads what it is given: the checks the command line makes before an
        // upload are not what protects the node.
        let digest = as_deployer
            .upload_code(&code, |_, _| {})
            .await
            .expect("upload");
        let fname = format!("evil-{name}");
        let deployed = as_deployer
            .deploy(FunctionSpec {
                code_digest: digest,
                ..spec(&fname, &["/bin/sh", "main.sh"], FnMode::Exec)
            })
            .await;
        match deployed {
            Err(e) => {
                // Refused by the node that received the deploy, naming the entry's fault.
                let text = e.to_string();
                assert!(text.contains(reason), "{name}: {reason:?} not in {text:?}");
            }
            Ok(_) => {
                // That node did not hold the archive yet: the unpack refuses it instead.
                let task = invoke_sync(&as_deployer, &fname, b"").await;
                assert_eq!(task.state, TaskState::Failed, "{name}: {task:?}");
                let error = task.result.and_then(|r| r.error).unwrap_or_default();
                assert!(
                    error.contains("refused code archive") && error.contains(reason),
                    "{name}: {reason:?} not in {error:?}"
                );
            }
        }
        assert_eq!(
            mode_and_content(&victim),
            before,
            "{name}: the host file changed"
        );
    }
    let shadow_after = std::fs::symlink_metadata("/etc/shadow")
        .ok()
        .map(|m| m.permissions().mode());
    assert_eq!(shadow_before, shadow_after, "/etc/shadow changed mode");
}

impl Raw<'_> {
    fn clone_entry(&self) -> Raw<'_> {
        Raw {
            path: self.path,
            kind: self.kind,
            data: self.data,
            link: self.link,
            mode: self.mode,
        }
    }
}

/// The runs of `name` until one has run on every node, at most `runs`.
async fn runs_on_every_node(c: &Client, name: &str, runs: usize) -> Vec<Task> {
    let mut out = Vec::new();
    let mut nodes = std::collections::BTreeSet::new();
    for i in 0..runs {
        let t = invoke_sync(c, name, format!("{i}").as_bytes()).await;
        if let Some(r) = &t.result {
            nodes.insert(r.node);
        }
        out.push(t);
        if nodes.len() == 3 && out.len() >= 6 {
            break;
        }
    }
    out
}

/// Waits until every node reports an idle warm sandbox of `name` version 1.
async fn warm_everywhere(c: &Client, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let w = c.workers().await.expect("workers");
        if w.nodes.len() == 3 && w.nodes.iter().all(|n| n.warm_idle(name, 1) > 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no warm sandbox of {name} on every node: {:?}",
            w.nodes
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn output(t: &Task) -> String {
    let r = t.result.as_ref().expect("a finished task has a result");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    String::from_utf8_lossy(&r.output).into_owned()
}

/// An admin's function with a secret, warm on every node; the deployer removes it and makes
/// a function of the same name that prints its environment. No run of the new function may
/// happen in the old sandboxes.
async fn made_again_after_removal(tier: &str, entry: &[&str], code: Vec<u8>) {
    let cluster = TestCluster::start(3, CONFIG).await;
    let admin = cluster.client();
    let as_deployer = deployer(&cluster).await;
    let secret = format!("admin-secret-{}", rand::random::<u64>());
    let digest = admin.upload_code(&code, |_, _| {}).await.expect("upload");
    admin
        .deploy(FunctionSpec {
            code_digest: digest.clone(),
            tier: tier.into(),
            env: vec![("SECRET".into(), secret.clone())],
            min_warm: 3,
            ..spec("report", entry, FnMode::Exec)
        })
        .await
        .expect("admin deploys");
    for t in runs_on_every_node(&admin, "report", 9).await {
        assert!(!output(&t).is_empty());
    }
    warm_everywhere(&admin, "report").await;

    as_deployer
        .remove_function("report")
        .await
        .expect("the deployer removes it");
    let digest = as_deployer
        .upload_code(&code, |_, _| {})
        .await
        .expect("upload");
    let version = as_deployer
        .deploy(FunctionSpec {
            code_digest: digest,
            env: vec![("SECRET".into(), "mine".into())],
            ..spec("report", &["/usr/bin/env"], FnMode::Exec)
        })
        .await
        .expect("the deployer deploys the same name");
    assert_eq!(version, 1, "versions count from 1 again");
    let runs = runs_on_every_node(&as_deployer, "report", 12).await;
    assert!(
        !runs[0].result.as_ref().expect("result").warm,
        "the first run of the new function is cold: {:?}",
        runs[0]
    );
    for t in &runs {
        let out = output(t);
        assert!(
            !out.contains(&secret),
            "the new function saw the old function's secret (warm: {:?}): {out}",
            t.result.as_ref().map(|r| r.warm)
        );
        assert!(out.contains("SECRET=mine"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_made_again_after_removal_never_runs_in_the_old_trusted_sandbox() {
    require_root!();
    let code = archive(&[("main.sh", 0o755, "echo \"secret is $SECRET\"\n")]);
    made_again_after_removal("trusted", &["/bin/sh", "main.sh"], code).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_made_again_with_the_same_tier_and_entry_never_sees_the_old_env() {
    require_root!();
    let code = archive(&[("main.sh", 0o755, "echo unused\n")]);
    made_again_after_removal("standard", &["/usr/bin/env"], code).await;
}

/// Every path under `root` (depth first), for finding what a node left behind.
fn all_paths(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        for item in read.flatten() {
            let p = item.path();
            if item.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_function_releases_its_code_and_data_sockets_on_every_node() {
    require_root!();
    // The nodes' code cache (and the socket directory next to it) in a directory of this test.
    let base = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let code_dir = base.path().join("code");
    let config = format!(
        "{CONFIG}code_cache_dir = {:?}\n",
        code_dir.to_str().expect("utf-8")
    );
    let cluster = TestCluster::start(3, &config).await;
    let as_deployer = deployer(&cluster).await;
    // Content of this test only, so its digest is too.
    let marker = rand::random::<u64>();
    let code = archive(&[("main.sh", 0o755, &format!("echo {marker}\n"))]);
    let digest = as_deployer
        .upload_code(&code, |_, _| {})
        .await
        .expect("upload");
    as_deployer
        .deploy(FunctionSpec {
            code_digest: digest.clone(),
            data: DataGrant {
                read_prefixes: vec!["in/".into()],
                write_prefixes: vec![],
            },
            ..spec("held", &["/bin/sh", "main.sh"], FnMode::Exec)
        })
        .await
        .expect("deploy");
    runs_on_every_node(&as_deployer, "held", 12).await;
    let left = || {
        all_paths(base.path())
            .into_iter()
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name == digest || (name.starts_with("held-") && name.ends_with(".sock"))
            })
            .collect::<Vec<_>>()
    };
    let held = left();
    assert!(
        held.iter().any(|p| p.ends_with(&digest)),
        "the code is unpacked: {held:?}"
    );
    assert!(
        held.iter()
            .any(|p| p.extension().is_some_and(|e| e == "sock")),
        "a data socket is bound: {held:?}"
    );
    as_deployer.remove_function("held").await.expect("remove");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = left();
        if now.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still there 20 s after the removal: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let e = as_deployer
        .invoke("held", None, Vec::new(), true)
        .await
        .expect_err("removed");
    assert!(
        matches!(
            e,
            ClientError::Rejected { .. } | ClientError::FunctionNotFound { .. }
        ) || e.to_string().contains("held"),
        "{e}"
    );
}
