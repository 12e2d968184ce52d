//! Integration test of skiff-chaos against real `skiffd` processes: a short run with every
//! fault kind must end valid. `skiffd` is found like the binary finds it (`$SKIFFD`, next to
//! the test executable, `$CARGO_MANIFEST_DIR/../target/debug/skiffd`); if it is missing the
//! test fails and says how to build it.

use std::time::Duration;

use skiff_chaos::checker::Status;
use skiff_chaos::nemesis::FaultKind;
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
    assert_eq!(report.verdict.status, Status::Valid, "\n{text}");
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
