//! Transport security: a process without the cluster's trust gets nothing from it.
//!
//! Every node serves TLS only; the peer service (votes, appends, forwarded reads and writes,
//! which take no token) needs a certificate signed by the cluster CA. The control cases
//! (a real node certificate, the real CA) show the refusals are not the test's own doing.

use std::time::{Duration, Instant};

use openraft::raft::VoteRequest;
use openraft::Vote;
use skiff_client::api::NodeId;
use skiff_client::tls::TlsConnector;
use skiff_client::{Client, ClientConfig};
use skiff_node::certs::node_files;
use skiff_node::peer::{self, ReadOp};

use crate::functions::scrape;
use crate::harness::{free_port, node_tls_args, TestCluster};

const PEER_FRAME: usize = 64 * 1024 * 1024;

fn ctx() -> tarpc::context::Context {
    peer::deadline(Duration::from_secs(3))
}

/// The value of `rejected_inputs` for `reason` in a node's metrics (0 if never counted).
pub(crate) async fn rejected(cluster: &TestCluster, id: NodeId, reason: &str) -> f64 {
    let text = scrape(&cluster.node(id).metrics_addr).await;
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .filter(|l| l.contains("rejected_inputs") && l.contains(&label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_node_without_a_valid_certificate_cannot_join_vote_or_read() {
    let cluster = TestCluster::start(3, "").await;
    let client = cluster.client();
    client
        .put("secret", b"s3cret".to_vec())
        .await
        .expect("write");
    let before = cluster.status(&[1]).await;
    let leader = before.leader.expect("leader");
    let target = cluster.node(leader).addr.clone();
    let ca = cluster.tls_dir().join("ca.pem");

    // A rogue with a CA of its own: a certificate for the same hosts, not signed by ours. It
    // trusts the cluster's CA (a public file), so only the node's check can stop it.
    let rogue_dir = cluster.dir.path().join("rogue-tls");
    let rogue_args = node_tls_args(&rogue_dir, 4);
    let (_, rogue_cert, rogue_key) = node_files(&rogue_dir, 4);
    let foreign = TlsConnector::node(&ca, &rogue_cert, &rogue_key).expect("rogue connector");
    let anonymous = TlsConnector::client(&ca).expect("client connector");
    let (_, cert1, key1) = node_files(&cluster.tls_dir(), 1);
    let member = TlsConnector::node(&ca, &cert1, &key1).expect("node 1's connector");

    // Control: with a member's certificate the peer service answers.
    let real = peer::connect(&target, PEER_FRAME, Some(&member))
        .await
        .expect("a member connects");
    let probe = real.probe(ctx()).await.expect("a member is answered");
    assert_eq!(probe.id, leader);

    let refused_before = rejected(&cluster, leader, "peer_without_certificate").await;
    let handshakes_before = rejected(&cluster, leader, "tls_handshake").await;
    let vote = VoteRequest::new(Vote::new(before.term + 100, 4), None);
    let read = ReadOp::Get {
        key: "secret".into(),
    };
    for (who, tls) in [
        ("a foreign certificate", Some(&foreign)),
        ("no certificate", Some(&anonymous)),
        ("plaintext", None),
    ] {
        // The dial itself may already fail (the handshake); if it does not, every call must.
        let Ok(c) = peer::connect(&target, PEER_FRAME, tls).await else {
            continue;
        };
        assert!(
            c.vote(ctx(), leader, vote.clone()).await.is_err(),
            "{who}: a vote got an answer"
        );
        assert!(
            c.forward_read(ctx(), read.clone()).await.is_err(),
            "{who}: a forwarded read got an answer"
        );
        assert!(
            c.probe(ctx()).await.is_err(),
            "{who}: a probe got an answer"
        );
    }
    // Each refusal was counted: the certificate-less peer by name, the other two as failed
    // handshakes (the foreign certificate, and plaintext bytes that are no TLS hello).
    assert!(rejected(&cluster, leader, "peer_without_certificate").await >= refused_before + 1.0);
    assert!(rejected(&cluster, leader, "tls_handshake").await >= handshakes_before + 2.0);

    // The rogue vote changed nothing: same leader, same term.
    let after = cluster.status(&[1]).await;
    assert_eq!(after.leader, Some(leader));
    assert_eq!(after.term, before.term);

    // A rogue node process cannot join: the leader cannot verify it, so the add is refused
    // and the membership stays as it was.
    let rogue_addr = format!("127.0.0.1:{}", free_port());
    let data = cluster.dir.path().join("rogue-data");
    let log = std::fs::File::create(cluster.dir.path().join("rogue.log")).expect("log");
    let mut rogue = std::process::Command::new(env!("CARGO_BIN_EXE_skiffd"))
        .args(["--id", "4", "--listen", &rogue_addr])
        .arg("--data-dir")
        .arg(&data)
        .args(rogue_args)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the rogue");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&rogue_addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "the rogue did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let err = client
        .cluster_add_node(4, &rogue_addr)
        .await
        .expect_err("a node the CA did not sign must not join");
    let status = cluster.status(&[1]).await;
    assert_eq!(status.nodes.len(), 3, "{status:?}");
    assert!(status.nodes.iter().all(|n| n.id != 4), "{err}: {status:?}");
    let _ = rogue.kill();
    let _ = rogue.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_needs_the_cluster_ca_and_refuses_a_node_it_cannot_verify() {
    let cluster = TestCluster::start(1, "").await;
    let addr = cluster.node(1).addr.clone();
    let config = |tls: Option<TlsConnector>| {
        let mut c = ClientConfig::new(vec![addr.clone()]).with_token(&cluster.token);
        c.attempts_max = 2;
        c.rpc_timeout = Duration::from_secs(3);
        c.tls = tls;
        Client::new(c).expect("client")
    };
    // Control: the cluster's CA.
    config(Some(cluster.tls()))
        .cluster_status()
        .await
        .expect("a client trusting the cluster CA is answered");
    // Plaintext: the node only speaks TLS; the token never leaves the client unencrypted.
    assert!(config(None).cluster_status().await.is_err());
    // Another CA: the client refuses the node (a stand-in at the node's address would get
    // no token either).
    let other = cluster.dir.path().join("other-tls");
    node_tls_args(&other, 9);
    let foreign = TlsConnector::client(&other.join("ca.pem")).expect("other CA");
    let err = config(Some(foreign))
        .cluster_status()
        .await
        .expect_err("an unverifiable node must be refused");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "the error says why: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_if_allowed_but_never_plaintext_peers() {
    // As `skiffd dev` runs its loopback nodes.
    let cluster = TestCluster::start(1, "[tls]\nallow_plaintext_clients = true\n").await;
    let addr = cluster.node(1).addr.clone();
    let mut plain = ClientConfig::new(vec![addr.clone()]).with_token(&cluster.token);
    plain.attempts_max = 2;
    let plain = Client::new(plain).expect("client");
    plain
        .put("p", b"1".to_vec())
        .await
        .expect("a plaintext client is served");
    cluster
        .client()
        .get("p")
        .await
        .expect("and a TLS client too")
        .expect("present");
    let refused = rejected(&cluster, 1, "peer_without_certificate").await;
    let c = peer::connect(&addr, PEER_FRAME, None)
        .await
        .expect("tcp connects");
    assert!(
        c.probe(ctx()).await.is_err(),
        "a plaintext peer gets nothing"
    );
    assert_eq!(
        rejected(&cluster, 1, "peer_without_certificate").await,
        refused + 1.0
    );
}
