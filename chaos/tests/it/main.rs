//! Integration test of skiff-chaos against real `skiffd` processes: a short run with every
//! fault kind must end valid. `skiffd` is found like the binary finds it (`$SKIFFD`, next to
//! the test executable, `$CARGO_MANIFEST_DIR/../target/debug/skiffd`); if it is missing the
//! test fails and says how to build it.

use std::time::Duration;

use skiff_chaos::checker::Status;
use skiff_chaos::nemesis::FaultKind;
use skiff_chaos::{run, RunOptions};

/// Seed of the CI scenario; its schedule is printed by the run.
const CI_SEED: u64 = 20_240_601;
/// Length of the CI scenario's workload and nemesis (the whole test is about a minute).
const CI_DURATION: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_run_under_every_fault_is_valid() {
    let skiffd = skiff_chaos::cluster::find_skiffd(None)
        .unwrap_or_else(|e| panic!("this test needs the skiffd binary: {e}"));
    let mut opts = RunOptions::new(CI_SEED, CI_DURATION);
    opts.skiffd = Some(skiffd);
    opts.faults = FaultKind::ALL.to_vec();
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
