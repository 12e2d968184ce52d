//! Durability, failover, catch-up, deduplication and input checks on real clusters.

use std::time::{Duration, Instant};

use skiff_client::api::{
    ApiError, ClientApiClient, ClientCommand, Command, CommandResult, ReadConsistency, RequestId,
    CLIENT_FRAME_BYTES_MAX,
};
use skiff_client::transport;
use skiff_client::{Client, ClientConfig, ClientError};
use skiff_raft_store::model::{NodeId, VALUE_BYTES_MAX};

use crate::harness::TestCluster;

/// Snapshots every 100 entries and keeps only 10 behind them, so that a node down for a few
/// hundred writes can only be caught up by a snapshot.
const SMALL_LOG: &str = "[raft]\nsnapshot_logs_since_last = 100\nlogs_kept_after_snapshot = 10\n";

async fn raw_client(cluster: &TestCluster, id: u64) -> ClientApiClient {
    let stream = transport::dial_client(
        &cluster.node(id).addr,
        Some(&cluster.token),
        Some(&cluster.tls()),
    )
    .await
    .expect("dial");
    ClientApiClient::new(
        tarpc::client::Config::default(),
        transport::framed(stream, CLIENT_FRAME_BYTES_MAX),
    )
    .spawn()
}

fn ctx() -> tarpc::context::Context {
    let mut c = tarpc::context::current();
    c.deadline = Instant::now() + Duration::from_secs(10);
    c
}

/// Reads `key` from node `id`'s own applied state, retrying until it has `want` or time runs out.
async fn wait_local(cluster: &TestCluster, id: NodeId, key: &str, want: &[u8]) {
    let client = cluster.client_for(&[id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(e)) = client.get_with(key, ReadConsistency::Local).await {
            if e.value == want {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {id} did not catch up to {key} within 30 s; its log:\n{}",
            cluster.log_of(id)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_loses_no_acknowledged_write_and_rejoins() {
    let mut cluster = TestCluster::start(3, "").await;
    let client = cluster.client();
    let mut acked = Vec::new();
    for i in 0..200u32 {
        let key = format!("k/{i:04}");
        let v = client
            .put(&key, i.to_string().into_bytes())
            .await
            .expect("write before the kill");
        acked.push((key, v));
    }

    let old = cluster.wait_leader(&cluster.ids()).await;
    cluster.kill(old);
    let survivors: Vec<NodeId> = cluster.ids().into_iter().filter(|id| *id != old).collect();
    let new = cluster.wait_leader(&survivors).await;
    assert_ne!(new, old, "a killed node cannot be the leader");

    let client = cluster.client_for(&survivors);
    for (i, (key, version)) in acked.iter().enumerate() {
        let e = client
            .get(key)
            .await
            .expect("read")
            .expect("acknowledged key present");
        assert_eq!(e.value, i.to_string().into_bytes(), "{key}");
        assert_eq!(e.version, *version, "{key}");
    }
    for i in 0..50u32 {
        client
            .put(&format!("after/{i}"), b"x".to_vec())
            .await
            .expect("write after failover");
    }

    cluster.spawn(old);
    wait_local(&cluster, old, "after/49", b"x").await;
    let status = cluster.status(&survivors).await;
    assert_eq!(status.nodes.len(), 3);
    assert!(status.nodes.iter().all(|n| n.reachable), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_behind_a_purged_log_catches_up_by_snapshot() {
    let mut cluster = TestCluster::start(3, SMALL_LOG).await;
    let leader = cluster.wait_leader(&cluster.ids()).await;
    let follower = cluster
        .ids()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let client = cluster.client();
    client.put("before", b"1".to_vec()).await.expect("write");
    wait_local(&cluster, follower, "before", b"1").await;
    let behind = cluster
        .status(&[leader])
        .await
        .nodes
        .iter()
        .find(|n| n.id == follower)
        .and_then(|n| n.last_applied)
        .expect("follower applied index");

    cluster.kill(follower);
    let others: Vec<NodeId> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != follower)
        .collect();
    let client = cluster.client_for(&others);
    for i in 0..400u32 {
        client
            .put(&format!("s/{i:04}"), vec![b'v'; 100])
            .await
            .expect("write while a follower is down");
    }
    // The leader's log no longer holds what the follower is missing.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = cluster.status(&others).await;
        if s.purged_index.unwrap_or(0) > behind + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the log was not purged: {s:?}");
        client.put("nudge", b"n".to_vec()).await.expect("write");
    }

    cluster.spawn(follower);
    wait_local(&cluster, follower, "s/0399", &[b'v'; 100]).await;
    let page = cluster
        .client_for(&[follower])
        .list("s/", None, 1000)
        .await
        .expect("list through the restarted node");
    assert_eq!(page.entries.len(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_write_is_applied_once() {
    let cluster = TestCluster::start(3, "").await;
    let raw = raw_client(&cluster, 2).await;
    let id = RequestId { client: 42, seq: 1 };
    let put = |value: &str| {
        vec![ClientCommand {
            request_id: id,
            command: Command::KvPut {
                key: "once".into(),
                value: value.as_bytes().to_vec(),
                expect_version: None,
            },
        }]
    };
    let first = raw
        .write(ctx(), put("a").into())
        .await
        .expect("rpc")
        .expect("write");
    let again = raw
        .write(ctx(), put("a").into())
        .await
        .expect("rpc")
        .expect("write");
    assert_eq!(first, again, "a retry returns the first result");
    // Even a retry that (wrongly) changed its payload changes nothing.
    let third = raw
        .write(ctx(), put("b").into())
        .await
        .expect("rpc")
        .expect("write");
    assert_eq!(first, third);

    let client = cluster.client();
    let e = client.get("once").await.expect("read").expect("present");
    assert_eq!(e.value, b"a");
    let CommandResult::Put { version } = first[0] else {
        panic!("unexpected result {first:?}");
    };
    assert_eq!(e.version, version);
    // The next write gets the next revision: the retries did not consume any.
    let next = client.put("other", b"x".to_vec()).await.expect("write");
    assert_eq!(next, version + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let cluster = TestCluster::start(3, "").await;
    let client = cluster.client();
    let v1 = client.put("cas", b"one".to_vec()).await.expect("write");

    // A value over the limit: refused by the client library...
    let err = client
        .put("big", vec![0; VALUE_BYTES_MAX + 1])
        .await
        .expect_err("too large");
    assert!(matches!(err, ClientError::Invalid(_)), "{err}");
    // ...and by the node when a client skips the check.
    let raw = raw_client(&cluster, 1).await;
    let res = raw
        .write(
            ctx(),
            vec![ClientCommand {
                request_id: RequestId { client: 7, seq: 1 },
                command: Command::KvPut {
                    key: "big".into(),
                    value: vec![0; VALUE_BYTES_MAX + 1],
                    expect_version: None,
                },
            }]
            .into(),
        )
        .await
        .expect("rpc");
    assert!(
        matches!(&res, Err(ApiError::InvalidArgument(m)) if m.contains("limit")),
        "{res:?}"
    );
    assert!(client.get("big").await.expect("read").is_none());

    // A stale compare-and-set.
    client.put("cas", b"two".to_vec()).await.expect("write");
    let err = client
        .put_if("cas", b"three".to_vec(), Some(v1))
        .await
        .expect_err("stale version");
    assert!(
        matches!(err, ClientError::Conflict { current, .. } if current > v1),
        "{err}"
    );
    assert_eq!(
        client
            .get("cas")
            .await
            .expect("read")
            .expect("present")
            .value,
        b"two"
    );

    // A malformed endpoint.
    for bad in ["127.0.0.1", "localhost:notaport", ":7001"] {
        let err = Client::new(ClientConfig::new(vec![bad.into()]))
            .err()
            .expect(bad);
        assert!(
            matches!(err, ClientError::InvalidEndpoint(_)),
            "{bad}: {err}"
        );
    }

    // An unknown node id.
    let err = client
        .cluster_remove_node(99)
        .await
        .expect_err("unknown node");
    assert!(
        matches!(&err, ClientError::Api(ApiError::NotFound(m)) if m.contains("99")),
        "{err}"
    );

    // A node that would dial itself: node 4 "at" node 1's address.
    let err = client
        .cluster_add_node(4, &cluster.node(1).addr)
        .await
        .expect_err("address of an existing node");
    assert!(
        matches!(&err, ClientError::Api(ApiError::FailedPrecondition(m)) if m.contains("node 1")),
        "{err}"
    );

    // Nothing above changed the membership.
    let status = cluster.status(&[1]).await;
    assert_eq!(status.nodes.len(), 3, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_added_as_learner_then_voter_and_removed() {
    let mut cluster = TestCluster::start(3, "").await;
    let client = cluster.client();
    client.put("m", b"1".to_vec()).await.expect("write");

    // A fourth process, not yet a member.
    let addr = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("port")
            .local_addr()
            .expect("addr")
            .port()
    );
    cluster.nodes.push(crate::harness::TestNode {
        id: 4,
        addr: addr.clone(),
        metrics_addr: format!("127.0.0.1:{}", crate::harness::free_port()),
        data_dir: cluster.dir.path().join("node-4"),
        child: None,
    });
    cluster.spawn(4);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "node 4 did not start listening");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Wrong id for that address: refused before anything changes.
    let err = client
        .cluster_add_node(5, &addr)
        .await
        .expect_err("wrong id");
    assert!(err.to_string().contains("node 4"), "{err}");

    client.cluster_add_node(4, &addr).await.expect("add node 4");
    wait_local(&cluster, 4, "m", b"1").await;
    let status = cluster.status(&[1]).await;
    let n4 = status
        .nodes
        .iter()
        .find(|n| n.id == 4)
        .expect("node 4 listed");
    assert_eq!(n4.role, skiff_client::api::MemberRole::Voter);

    client.cluster_remove_node(4).await.expect("remove node 4");
    let status = cluster.status(&[1]).await;
    assert!(status.nodes.iter().all(|n| n.id != 4), "{status:?}");
    client
        .put("m", b"2".to_vec())
        .await
        .expect("write after removal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let cluster = TestCluster::start(3, "log_format = \"json\"\n").await;
    cluster
        .client()
        .put("logged", b"x".to_vec())
        .await
        .expect("put");
    for id in cluster.ids() {
        let log = cluster.log_of(id);
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "node {id} logged nothing");
        let mut own = 0;
        for line in lines {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("node {id}: not JSON ({e}): {line}"));
            assert!(value["level"].is_string(), "no level: {line}");
            assert!(value["timestamp"].is_string(), "no timestamp: {line}");
            assert!(value["fields"].is_object(), "no fields: {line}");
            let target = value["target"].as_str().expect("a target");
            if target.starts_with("skiff") && value["fields"]["message"].is_string() {
                own += 1;
            }
        }
        assert!(
            own > 0,
            "node {id} has no message of its own in the JSON log"
        );
    }
}

/// Writes `key/0..count` one after another through `client`, recording each outcome and how
/// long the slowest one took.
async fn write_steadily(client: Client, prefix: &str, count: u32) -> (Vec<String>, Duration) {
    let mut failures = Vec::new();
    let mut slowest = Duration::ZERO;
    for i in 0..count {
        let started = Instant::now();
        if let Err(e) = client.put(&format!("{prefix}/{i}"), vec![1]).await {
            failures.push(format!("{prefix}/{i}: {e}"));
        }
        slowest = slowest.max(started.elapsed());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (failures, slowest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_hands_over_to_a_caught_up_voter_first() {
    let mut cluster = TestCluster::start(3, "").await;
    let ids = cluster.ids();
    let writer = tokio::spawn(write_steadily(cluster.client(), "ho", 300));
    // A leader of longer than a lease (election_timeout_max) grants its successor's vote at
    // once; a younger one makes the successor wait for its own election timer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut attempt = 0;
    let (leader, stopped, log) = loop {
        attempt += 1;
        let leader = cluster.wait_leader(&ids).await;
        let sigterm = Instant::now();
        cluster.terminate(leader);
        let stopped = sigterm.elapsed();
        let log = cluster.log_of(leader);
        if log.contains("leadership handed over") {
            break (leader, stopped, log);
        }
        let hand = log
            .lines()
            .filter(|l| l.contains("hand") || l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            !log.contains("leadership not handed over"),
            "the stopping leader failed to hand over: {hand}"
        );
        // It was no longer the leader when the signal came (an election in between, on a
        // busy machine), so it had nothing to hand over: bring it back and try again.
        assert!(attempt < 3, "no handover in {attempt} attempts: {hand}");
        cluster.spawn(leader);
        cluster.wait_leader(&ids).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let others: Vec<NodeId> = ids.iter().copied().filter(|&i| i != leader).collect();
    let next = cluster.wait_leader(&others).await;
    let (failures, slowest) = writer.await.expect("writer");
    // Nothing acknowledged is lost and no write failed across the handover.
    assert!(failures.is_empty(), "{failures:?}");
    let client = cluster.client_for(&others);
    for i in (0..300).step_by(37) {
        assert!(client
            .get(&format!("ho/{i}"))
            .await
            .expect("read")
            .is_some());
    }
    let line = log
        .lines()
        .find(|l| l.contains("leadership handed over"))
        .unwrap_or_default();
    eprintln!(
        "handover from node {leader} to node {next}: SIGTERM to exit {stopped:?}; slowest write {slowest:?}; {line}"
    );

    // The node comes back as a follower; the cluster keeps its leader.
    cluster.spawn(leader);
    let again = cluster.wait_leader(&ids).await;
    assert_ne!(
        again, leader,
        "a restarted node does not take leadership back by itself"
    );

    // For comparison (printed, not asserted): the same load across a leader that crashes.
    let writer = tokio::spawn(write_steadily(cluster.client(), "crash", 300));
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill(again);
    let rest: Vec<NodeId> = ids.iter().copied().filter(|&i| i != again).collect();
    cluster.wait_leader(&rest).await;
    let (failures, crash_slowest) = writer.await.expect("writer");
    eprintln!(
        "crash of leader {again}: slowest write {crash_slowest:?} ({} failed after retries); \
         handover/crash = {:.2}",
        failures.len(),
        slowest.as_secs_f64() / crash_slowest.as_secs_f64()
    );
}
