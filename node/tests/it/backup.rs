//! Backup of a running cluster and its restore into a fresh one (`skiffd restore`).

use std::collections::BTreeMap;
use std::process::Command as Process;
use std::time::{Duration, Instant};

use skiff_client::api::{FnMode, NodeId, TaskState};

use crate::functions::{
    archive, deploy, invoke, is_root, output, rpc, rpc_as, spec, wait_workers, CONFIG,
};
use crate::harness::{free_ports, node_tls_args, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_into_a_new_cluster_gives_the_same_state() {
    let old = TestCluster::start(3, CONFIG).await;
    let client = old.client();
    for i in 0..200 {
        client
            .put(&format!("k/{i:03}"), format!("v{i}").into_bytes())
            .await
            .expect("put");
    }
    client.put("k/007", b"changed".to_vec()).await.expect("put");
    let leader = old.wait_leader(&old.ids()).await;
    let c = rpc(&old, leader).await;
    let token = old.token.clone();
    let code = archive(&[("echo.sh", 0o755, "#!/bin/sh\nprintf 'got:'; cat\n")]);
    deploy(
        &c,
        spec("echo", &["/bin/sh", "/code/echo.sh"], FnMode::Exec),
        &code,
    )
    .await;

    // The backup holds the whole state, token hashes included: never without an admin token.
    let anonymous = old.client_with(&old.ids(), None);
    assert!(matches!(
        anonymous.backup(|_, _| {}).await,
        Err(skiff_client::ClientError::Api(
            skiff_client::api::ApiError::Unauthenticated(_)
        ))
    ));
    let mut progress = Vec::new();
    let backup = client
        .backup(|done, total| progress.push((done, total)))
        .await
        .expect("backup");
    assert!(backup.covers_index > 0);
    assert_eq!(
        progress.last().map(|p| p.0),
        Some(backup.bytes.len() as u64)
    );
    let before = client.list_all("k/", 1000).await.expect("list");
    assert_eq!(before.len(), 200);
    // Written after the backup: not in it.
    client.put("late", b"x".to_vec()).await.expect("put");
    drop(old);

    // A new cluster on new ports and new ids, every member restored from the file.
    let root = tempfile::tempdir().expect("tempdir");
    let file = root.path().join("cluster.backup");
    std::fs::write(&file, &backup.bytes).expect("write backup");
    let ports = free_ports(3);
    let members: BTreeMap<NodeId, String> = (0..3)
        .map(|i| (11 + i as NodeId, format!("127.0.0.1:{}", ports[i])))
        .collect();
    let member_list = members
        .iter()
        .map(|(id, addr)| format!("{id}={addr}"))
        .collect::<Vec<_>>()
        .join(",");
    let exe = env!("CARGO_BIN_EXE_skiffd");
    let config = root.path().join("node.toml");
    std::fs::write(&config, CONFIG).expect("config");
    let restore = |id: NodeId, data: &std::path::Path| {
        Process::new(exe)
            .args([
                "restore",
                "--id",
                &id.to_string(),
                "--members",
                &member_list,
            ])
            .arg("--backup")
            .arg(&file)
            .arg("--data-dir")
            .arg(data)
            .output()
            .expect("run skiffd restore")
    };
    // The new cluster has its own CA.
    let tls_dir = root.path().join("tls");
    let mut children = Vec::new();
    for (id, addr) in &members {
        let data = root.path().join(format!("node-{id}"));
        let restored = restore(*id, &data);
        assert!(
            restored.status.success(),
            "restore of node {id}: {}",
            String::from_utf8_lossy(&restored.stderr)
        );
        // A second restore into the same directory is refused and changes nothing.
        let again = restore(*id, &data);
        assert!(!again.status.success());
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("not empty"),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );
        let log = std::fs::File::create(root.path().join(format!("node-{id}.log"))).expect("log");
        children.push(
            Process::new(exe)
                .args(["--id", &id.to_string(), "--listen", addr])
                .arg("--data-dir")
                .arg(&data)
                .arg("--config")
                .arg(&config)
                .args(node_tls_args(&tls_dir, *id))
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("start skiffd"),
        );
    }
    let _kill = KillOnDrop(children);

    let endpoints: Vec<String> = members.values().cloned().collect();
    let mut cfg = skiff_client::ClientConfig::new(endpoints.clone());
    cfg.rpc_timeout = Duration::from_secs(5);
    cfg.attempts_max = 40;
    // The restored state holds the old cluster's tokens.
    cfg.token = Some(token.clone());
    let tls = skiff_client::tls::TlsConnector::client(&tls_dir.join("ca.pem")).expect("CA");
    cfg.tls = Some(tls.clone());
    let restored = skiff_client::Client::new(cfg).expect("client");
    // The members elect a leader by themselves: no init.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        match restored.cluster_status().await {
            Ok(s) if s.leader.is_some_and(|l| members.contains_key(&l)) => break s,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("no leader in the restored cluster: {other:?}"),
        }
    };
    assert_eq!(status.nodes.len(), 3);
    assert!(status.last_applied >= backup.covers_index);

    let after = restored.list_all("k/", 1000).await.expect("list");
    assert_eq!(after, before, "the restored keys differ");
    assert!(restored.get("late").await.expect("get").is_none());
    assert!(restored.function("echo").await.expect("fn").is_some());
    // And it goes on: writes are accepted, versions continue from the restored ones.
    let version = restored.put("k/007", b"again".to_vec()).await.expect("put");
    let previous = before
        .iter()
        .find(|e| e.key == "k/007")
        .expect("k/007")
        .version;
    assert!(version > previous);

    if is_root() {
        // The restored code runs on the new cluster's workers.
        let leader = status.leader.expect("leader");
        let c = rpc_as(&tls, &members[&leader], Some(&token)).await;
        wait_workers(&c, 3).await;
        let task = invoke(&c, "echo", b"hi", true).await;
        assert_eq!(task.state, TaskState::Succeeded, "{task:?}");
        assert_eq!(output(&task), "got:hi");
    } else {
        eprintln!("skipping the invocation after restore: sandboxes need root");
    }
}

struct KillOnDrop(Vec<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
