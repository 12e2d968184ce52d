//! Integration test of skiff-chaos against real `skiffd` processes: a short run with every
//! fault kind (and, as root, the function workload) must end valid; a removed node comes back
//! under a new id; stale local reads are found invalid. `skiffd` is found like the binary finds it (`$SKIFFD`, next to
//! the test executable, `$CARGO_MANIFEST_DIR/../target/debug/skiffd`); if it is missing the
//! test fails and says how to build it.

use std::time::Duration;

use skiff_chaos::checker::Status;
use skiff_chaos::nemesis::{Fault, FaultKind};
use skiff_chaos::{run, RunOptions};

/// Seed of the CI scenario; its schedule is printed by the run.
const CI_SEED: u64 = 20_240_605;
/// Length of the CI scenario's workload and nemesis (the whole test is about a minute).
const CI_DURATION: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_run_under_every_fault_is_valid() {
    let skiffd = skiff_chaos::cluster::find_skiffd(None)
        .unwrap_or_else(|e| panic!("this test needs the skiffd binary: {e}"));
    let mut opts = RunOptions::new(CI_SEED, CI_DURATION);
    opts.skiffd = Some(skiffd);
    opts.faults = FaultKind::ALL.to_vec();
    // Invocations run in sandboxes, which need root (CI runs as root).
    opts.invocations = nix::unistd::geteuid().is_root();
    if !opts.invocations {
        eprintln!("not root: the run checks the key-value workload only, no invocations");
    }
    let report = run(opts)
        .await
        .unwrap_or_else(|e| panic!("the harness could not run: {e}"));
    let text = report.render();
    println!("{text}");
    assert!(
        report.counts.ok > 100,
        "the workload must get work done between faults:\n{text}"
    );
    assert!(
        !report.schedule.steps.is_empty() && report.nemesis.events.len() >= 2,
        "the nemesis must inject faults:\n{text}"
    );
    assert!(
        report
            .schedule
            .steps
            .iter()
            .any(|s| matches!(s.fault, Fault::Membership { .. })),
        "the CI schedule must change the membership:\n{text}"
    );
    if let Some(calls) = &report.calls {
        assert!(
            calls.ok > 10,
            "the function workload must get work done:\n{text}"
        );
        for name in ["sync-outputs", "idempotent-effects", "stream-items"] {
            assert!(
                report.verdict.checks.iter().any(|c| c.name == name),
                "the {name} check must run:\n{text}"
            );
        }
    }
    assert_eq!(report.verdict.status, Status::Valid, "\n{text}");
}

/// A membership change the way the nemesis makes it: node 3 is removed (committed), stopped
/// and wiped; the cluster keeps accepting writes with two voters; the slot comes back as node
/// 6 (a new id), catches up by snapshot or log, and holds the writes made while it was out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_comes_back_under_a_new_id() {
    use skiff_chaos::cluster::{Cluster, RaftTiming, Removal};

    let skiffd = skiff_chaos::cluster::find_skiffd(None)
        .unwrap_or_else(|e| panic!("this test needs the skiffd binary: {e}"));
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut cluster = Cluster::start(&skiffd, dir.path(), 3, RaftTiming::default(), 2)
        .await
        .unwrap_or_else(|e| panic!("the cluster must start: {e}"));
    let removal = cluster.remove_member(3).await.expect("remove node 3");
    assert_eq!(removal, Removal::Removed(3));
    assert!(!cluster.nodes[2].is_running(), "a removed node is stopped");
    let data = std::fs::read_dir(&cluster.nodes[2].data_dir)
        .expect("data dir")
        .count();
    assert_eq!(data, 0, "a removed node's data is wiped");
    // A second removal would leave fewer voters than a quorum of three.
    let refused = cluster
        .remove_member(2)
        .await
        .expect("ask to remove node 2");
    assert!(matches!(refused, Removal::Refused(_)), "{refused:?}");

    let client = cluster.client().expect("client");
    let mut written = None;
    for _ in 0..20 {
        if let Ok(v) = client.put("while-out", b"yes".to_vec()).await {
            written = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    written.expect("two voters of three accept writes");

    let back = cluster
        .rejoin(3, Duration::from_secs(60))
        .await
        .expect("rejoin");
    assert_eq!(back, Ok(6), "slot 3's next id is 3 + 3");
    let voters = cluster.ensure_members().await.expect("every slot a voter");
    assert_eq!(voters, vec![1, 2, 6]);
    let local = cluster.node_client(3).expect("client of slot 3");
    let mut seen = false;
    for _ in 0..100 {
        let read = local
            .get_with("while-out", skiff_client::api::ReadConsistency::Local)
            .await;
        if read.is_ok_and(|e| e.is_some_and(|e| e.value == b"yes")) {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.stop().await;
    assert!(
        seen,
        "node 6 caught up with the write made while slot 3 was out"
    );
}

/// The checker must be able to fail on a real cluster's history: local reads from a node cut
/// off from the majority return a value older than an acknowledged write, and the
/// linearizability check must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_local_reads_from_an_isolated_node_are_found_invalid() {
    use skiff_chaos::checker;
    use skiff_chaos::cluster::{client_for, Cluster, RaftTiming};
    use skiff_chaos::history::{value_for, OpKind, Outcome, Recorder};
    use skiff_chaos::proxy::LinkFault;
    use skiff_chaos::workload::{execute, OP_TIMEOUT};

    let skiffd = skiff_chaos::cluster::find_skiffd(None)
        .unwrap_or_else(|e| panic!("this test needs the skiffd binary: {e}"));
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut cluster = Cluster::start(&skiffd, dir.path(), 3, RaftTiming::default(), 1)
        .await
        .unwrap_or_else(|e| panic!("the cluster must start: {e}"));
    let key = "stale/k";
    let recorder = Recorder::new(1000);
    let addrs = cluster.endpoints();
    let isolated = cluster.ids()[2];
    let local = client_for(vec![addrs[2].clone()]).expect("client of the isolated node");
    let majority = client_for(addrs[..2].to_vec()).expect("client of the majority");

    // Writes through the majority until one is acknowledged; returns its value.
    let write = |process: u32| {
        let recorder = &recorder;
        let majority = &majority;
        async move {
            for _ in 0..10 {
                let (id, kind) = recorder
                    .invoke(process, |id| OpKind::Put {
                        key: key.into(),
                        value: value_for(process, id),
                    })
                    .expect("room in the history");
                let outcome = tokio::time::timeout(OP_TIMEOUT, execute(majority, &kind, false))
                    .await
                    .unwrap_or_else(|_| Outcome::Unknown("timed out".into()));
                let ok = matches!(outcome, Outcome::Ok(_));
                recorder.complete(id, outcome);
                if ok {
                    return kind.written_value().map(String::from);
                }
            }
            None
        }
    };
    let first = write(0).await.expect("a first write is acknowledged");
    // Wait (bounded) until the soon-isolated node has applied the first write.
    let mut replicated = false;
    for _ in 0..100 {
        let read = local
            .get_with(key, skiff_client::api::ReadConsistency::Local)
            .await;
        if read.is_ok_and(|e| e.is_some_and(|e| e.value == first.as_bytes())) {
            replicated = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(replicated, "node {isolated} never applied the first write");

    for other in cluster.ids() {
        if other != isolated {
            cluster.faults.set(isolated, other, LinkFault::Blackhole);
            cluster.faults.set(other, isolated, LinkFault::Blackhole);
        }
    }
    write(1)
        .await
        .expect("the majority acknowledges a second write");
    let (id, kind) = recorder
        .invoke(2, |_| OpKind::Get { key: key.into() })
        .expect("room in the history");
    let outcome = execute(&local, &kind, true).await;
    recorder.complete(id, outcome);
    cluster.heal().await.expect("heal");
    cluster.stop().await;

    let history = recorder.snapshot();
    let report = checker::linearizable(&history, checker::linear::SEARCH_STEPS_MAX);
    let text: Vec<String> = history.iter().map(skiff_chaos::history::describe).collect();
    assert_eq!(
        report.status,
        checker::Status::Invalid,
        "a stale read must be caught: {report:?}\n{}",
        text.join("\n")
    );
}
