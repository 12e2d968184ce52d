//! One chaos run, start to verdict: start the cluster behind its proxies, run the workload and
//! the nemesis for the duration, heal, read everything back, check, stop.
//!
//! The run's files (node logs and data, `history.jsonl`, `report.json`) stay in its directory
//! when the directory was given or the verdict is not valid; a valid run in a temporary
//! directory removes it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skiff_client::api::{ReadConsistency, TaskFilter, TaskState};
use tokio::time::Instant;

use crate::calls::{self, CallCounts, CallOp, CallRecorder};
use crate::checker::{self, NodeView, Status, Verdict};
use crate::cluster::{self, Cluster, RaftTiming};
use crate::history::{describe, Counts, OpKind, Outcome, ReadValue, Recorder, FINAL_READER};
use crate::nemesis::{self, FaultKind, NemesisLog, Schedule};
use crate::workload::{self, WorkloadConfig};
use crate::ChaosError;
use crate::{invocations, streams};

/// Most operations one run records; the workload stops issuing past it.
pub const OPS_MAX: usize = 500_000;
/// Attempts at the final read of one key after heal.
pub const FINAL_READ_ATTEMPTS_MAX: u32 = 10;
/// How long the nodes may take to reach the same applied index after heal.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long acknowledged invocations may take to finish after heal (a task lost with a node
/// is reassigned after the node's lease).
pub const INVOCATIONS_SETTLE: Duration = Duration::from_secs(90);
/// How long stream jobs may take to end after heal.
pub const STREAMS_SETTLE: Duration = Duration::from_secs(90);
/// Most tasks of the idempotent function and markers listed after heal.
pub const IDEMPOTENT_LISTED_MAX: usize = 50_000;
/// Deadline of each listing after heal.
const LISTING_TIMEOUT: Duration = Duration::from_secs(30);
/// Most violations printed per check (all are in `report.json`).
const VIOLATIONS_SHOWN_MAX: usize = 5;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub seed: u64,
    pub duration: Duration,
    pub nodes: usize,
    /// Path of `skiffd`; found with [`cluster::find_skiffd`] when `None`.
    pub skiffd: Option<PathBuf>,
    /// Directory for the run's files; a temporary one when `None`.
    pub dir: Option<PathBuf>,
    pub faults: Vec<FaultKind>,
    pub workers: u32,
    /// See [`WorkloadConfig::unsafe_local_reads`].
    pub unsafe_local_reads: bool,
    /// Bound of the linearizability search per key, in steps.
    pub search_steps_max: u64,
    /// How soon after heal the cluster must accept a write.
    pub heal_write_bound: Duration,
    /// Also run the function workload (needs root on the nodes: sandboxes): asynchronous,
    /// synchronous and idempotent invocations, dependency changes and stream jobs, with their
    /// checks after heal.
    pub invocations: bool,
}

impl RunOptions {
    /// Defaults: three nodes, every fault kind, five workers.
    pub fn new(seed: u64, duration: Duration) -> RunOptions {
        RunOptions {
            seed,
            duration,
            nodes: 3,
            skiffd: None,
            dir: None,
            faults: FaultKind::ALL.to_vec(),
            workers: 5,
            unsafe_local_reads: false,
            search_steps_max: checker::linear::SEARCH_STEPS_MAX,
            heal_write_bound: Duration::from_secs(30),
            invocations: false,
        }
    }

    fn validate(&self) -> Result<(), ChaosError> {
        if !(1..=7).contains(&self.nodes) {
            return Err(ChaosError::Options(format!(
                "--nodes must be between 1 and 7, not {}",
                self.nodes
            )));
        }
        if self.duration < Duration::from_secs(5) {
            return Err(ChaosError::Options("--duration must be at least 5s".into()));
        }
        if self.workers == 0 || self.workers > 64 {
            return Err(ChaosError::Options(
                "workers must be between 1 and 64".into(),
            ));
        }
        Ok(())
    }
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub seed: u64,
    pub duration_ms: u64,
    pub nodes: usize,
    pub faults: Vec<FaultKind>,
    pub unsafe_local_reads: bool,
    pub skiffd: PathBuf,
    /// Where the run's files are, if kept.
    pub dir: Option<PathBuf>,
    pub schedule: Schedule,
    pub nemesis: NemesisLog,
    /// A nemesis step that failed (the run still healed and checked).
    pub nemesis_error: Option<String>,
    pub counts: Counts,
    /// Counts of the function workload's calls (with `invocations`).
    pub calls: Option<CallCounts>,
    pub node_starts: BTreeMap<u64, u32>,
    pub verdict: Verdict,
}

impl Report {
    /// The report as text for a terminal.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let faults: Vec<&str> = self.faults.iter().map(|f| f.name()).collect();
        out.push_str(&format!(
            "seed {} duration {:.0}s nodes {} faults {}{}\n",
            self.seed,
            self.duration_ms as f64 / 1000.0,
            self.nodes,
            faults.join(","),
            if self.unsafe_local_reads {
                " UNSAFE-LOCAL-READS"
            } else {
                ""
            }
        ));
        let c = &self.counts;
        out.push_str(&format!(
            "operations {} (ok {}, fail {}, unknown {}; reads {}, writes {}); node starts {:?}\n",
            c.ops, c.ok, c.fail, c.unknown, c.reads, c.writes, self.node_starts
        ));
        if let Some(c) = &self.calls {
            out.push_str(&format!(
                "calls {} (ok {}, fail {}, unknown {}; sync {}, idempotent {}, dependency \
                 writes {}, stream starts {})\n",
                c.calls,
                c.ok,
                c.fail,
                c.unknown,
                c.sync,
                c.idempotent,
                c.dependency_writes,
                c.stream_starts
            ));
        }
        for e in &self.nemesis.events {
            out.push_str(&format!("  nemesis {e}\n"));
        }
        if let Some(e) = &self.nemesis_error {
            out.push_str(&format!("nemesis error: {e}\n"));
        }
        for check in &self.verdict.checks {
            out.push_str(&format!(
                "  {:<22} {:<8} {}\n",
                check.name, check.status, check.summary
            ));
            for v in check.violations.iter().take(VIOLATIONS_SHOWN_MAX) {
                out.push_str(&format!("    key {:?}: {}\n", v.key, v.message));
                for op in &v.ops {
                    out.push_str(&format!("      {op}\n"));
                }
            }
            if check.violations.len() > VIOLATIONS_SHOWN_MAX {
                out.push_str(&format!(
                    "    ... and {} more in report.json\n",
                    check.violations.len() - VIOLATIONS_SHOWN_MAX
                ));
            }
        }
        if let Some(dir) = &self.dir {
            out.push_str(&format!("files: {}\n", dir.display()));
        }
        out.push_str(&format!("verdict: {}\n", self.verdict.status));
        out
    }
}

/// Runs one chaos run and returns its report. An `Err` means the harness could not run (no
/// `skiffd`, the cluster never started), not that the cluster misbehaved.
pub async fn run(opts: RunOptions) -> Result<Report, ChaosError> {
    opts.validate()?;
    let skiffd = cluster::find_skiffd(opts.skiffd.as_deref())?;
    let (dir, temp) = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|source| ChaosError::Io {
                what: format!("create {}", d.display()),
                source,
            })?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("skiff-chaos-")
                .tempdir()
                .map_err(|source| ChaosError::Io {
                    what: "create a temporary directory".into(),
                    source,
                })?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let schedule = Schedule::generate(opts.seed, opts.duration, opts.nodes, &opts.faults);
    tracing::info!(
        "seed {} duration {:?} nodes {} skiffd {} dir {}",
        opts.seed,
        opts.duration,
        opts.nodes,
        skiffd.display(),
        dir.display()
    );
    tracing::info!("schedule ({} steps):", schedule.steps.len());
    for line in schedule.lines() {
        tracing::info!("{line}");
    }

    let mut cluster =
        Cluster::start(&skiffd, &dir, opts.nodes, RaftTiming::default(), opts.seed).await?;
    let outcome = drive(&opts, &mut cluster, &schedule).await;
    let node_starts = cluster.starts();
    cluster.stop().await;
    let (history, call_history, nemesis_log, nemesis_error, verdict) = outcome?;

    let keep = opts.dir.is_some() || verdict.status != Status::Valid;
    let report = Report {
        seed: opts.seed,
        duration_ms: opts.duration.as_millis() as u64,
        nodes: opts.nodes,
        faults: opts.faults.clone(),
        unsafe_local_reads: opts.unsafe_local_reads,
        skiffd,
        dir: keep.then(|| dir.clone()),
        schedule,
        nemesis: nemesis_log,
        nemesis_error,
        counts: Counts::of(&history),
        calls: opts.invocations.then(|| CallCounts::of(&call_history)),
        node_starts,
        verdict,
    };
    write_files(&dir, &history, &call_history, &report)?;
    if keep {
        if let Some(t) = temp {
            let _ = t.keep();
        }
    }
    Ok(report)
}

type Driven = (
    Vec<crate::history::Op>,
    Vec<CallOp>,
    NemesisLog,
    Option<String>,
    Verdict,
);

async fn drive(
    opts: &RunOptions,
    cluster: &mut Cluster,
    schedule: &Schedule,
) -> Result<Driven, ChaosError> {
    let recorder: Arc<Recorder> = Arc::new(Recorder::new(OPS_MAX));
    let call_recorder = Arc::new(CallRecorder::starting_at(recorder.start(), OPS_MAX));
    let start = Instant::now();
    let config = WorkloadConfig {
        workers: opts.workers,
        keys_active: 4,
        ops_per_key: 150,
        think_ms_mean: 15,
        unsafe_local_reads: opts.unsafe_local_reads,
        key_prefix: format!("chaos/{:x}", opts.seed),
    };
    let invoking = if opts.invocations {
        let client = cluster.client()?;
        invocations::deploy(&client).await?;
        calls::deploy(&client).await?;
        let deadline = start + opts.duration;
        let stream_dir = cluster.sources_dir().to_path_buf();
        Some((
            tokio::spawn(invocations::run(cluster.endpoints(), deadline)),
            tokio::spawn(calls::run(
                cluster.endpoints(),
                Arc::clone(&call_recorder),
                opts.seed,
                deadline,
            )),
            tokio::spawn(streams::run(
                cluster.endpoints(),
                stream_dir,
                format!("chaos-stream/{:x}", opts.seed),
                Arc::clone(&call_recorder),
                deadline,
            )),
        ))
    } else {
        None
    };
    let load = tokio::spawn(workload::run(
        cluster.endpoints(),
        config,
        Arc::clone(&recorder),
        opts.seed,
        start + opts.duration,
    ));
    let (nemesis_log, nemesis_error) = match nemesis::run(cluster, schedule, start).await {
        Ok(log) => (log, None),
        Err(e) => {
            tracing::warn!("nemesis step failed: {e}");
            (NemesisLog::default(), Some(e.to_string()))
        }
    };
    load.await
        .map_err(|e| ChaosError::Cluster(format!("the workload panicked: {e}")))??;
    let panicked = |e| ChaosError::Cluster(format!("the invokers panicked: {e}"));
    let invoked = match invoking {
        Some((acked, calling, streaming)) => {
            let acked = acked.await.map_err(panicked)??;
            calling.await.map_err(panicked)??;
            let jobs = streaming.await.map_err(panicked)??;
            Some((acked, jobs))
        }
        None => None,
    };

    cluster.heal().await?;
    tracing::info!("healed at t={:.1}s", start.elapsed().as_secs_f64());
    let first_write = cluster.wait_writable(opts.heal_write_bound).await.ok();
    // After a membership fault every slot must be a voter again before the final reads.
    let membership = if opts.faults.contains(&FaultKind::Membership) {
        Some(cluster.ensure_members().await)
    } else {
        None
    };

    // Final linearizable reads of every key, recorded in the history.
    let keys: BTreeSet<String> = recorder
        .snapshot()
        .iter()
        .map(|op| op.kind.key().to_string())
        .collect();
    let client = cluster.client()?;
    for key in &keys {
        // Bounded by FINAL_READ_ATTEMPTS_MAX.
        for _ in 0..FINAL_READ_ATTEMPTS_MAX {
            let Some((id, kind)) =
                recorder.invoke(FINAL_READER, |_| OpKind::Get { key: key.clone() })
            else {
                break;
            };
            let outcome = tokio::time::timeout(
                workload::OP_TIMEOUT,
                workload::execute(&client, &kind, false),
            )
            .await
            .unwrap_or_else(|_| Outcome::Unknown("final read timed out".into()));
            let ok = matches!(outcome, Outcome::Ok(_));
            recorder.complete(id, outcome);
            if ok {
                break;
            }
        }
    }

    let (views, converged) = read_replicas(cluster, &keys).await;
    let history = recorder.snapshot();
    tracing::info!(
        "checking {} operations over {} keys",
        history.len(),
        keys.len()
    );
    let mut checks = vec![
        checker::linearizable(&history, opts.search_steps_max),
        checker::acknowledged_writes(&history),
        checker::replicas(&views, opts.nodes, converged),
        checker::availability(first_write, opts.heal_write_bound),
    ];
    match membership {
        Some(Ok(voters)) => checks.push(checker::CheckReport {
            name: "membership-restored".into(),
            status: Status::Valid,
            summary: format!("every slot's node is a voter again: {voters:?}"),
            violations: vec![],
        }),
        Some(Err(e)) => checks.push(checker::CheckReport {
            name: "membership-restored".into(),
            status: Status::Unknown,
            summary: format!("the harness could not make every node a voter again: {e}"),
            violations: vec![],
        }),
        None => {}
    }
    let call_history = call_recorder.snapshot();
    if let Some((acked, jobs)) = &invoked {
        checks.push(invocations::check(&client, acked, INVOCATIONS_SETTLE).await);
        checks.push(checker::calls::sync_outputs(&call_history));
        checks.push(idempotent_check(&client, &call_history).await);
        let settled = streams::settle(&client, jobs, STREAMS_SETTLE).await;
        checks.push(checker::calls::stream_items(&settled));
    }
    Ok((
        history,
        call_history,
        nemesis_log,
        nemesis_error,
        Verdict::of(checks),
    ))
}

/// Lists the idempotent function's succeeded tasks, then its markers (in that order: a run
/// writes its marker before it reports, so every listed task's marker is already there),
/// and checks them. The ok answers in the call history are added (a hit's task is not always
/// in the listing by function), each task once.
async fn idempotent_check(
    client: &skiff_client::Client,
    call_history: &[CallOp],
) -> checker::CheckReport {
    let filter = TaskFilter {
        function: Some(calls::IDEMPOTENT_FUNCTION.into()),
        state: Some(TaskState::Succeeded),
        dead_letter: false,
    };
    let tasks = tokio::time::timeout(
        LISTING_TIMEOUT,
        client.tasks_all(filter, IDEMPOTENT_LISTED_MAX),
    )
    .await;
    let markers = tokio::time::timeout(
        LISTING_TIMEOUT,
        client.list_all(calls::EFFECT_PREFIX, IDEMPOTENT_LISTED_MAX),
    )
    .await;
    let (runs, tasks_read) = match tasks {
        Ok(Ok(t)) => {
            let full = t.len() < IDEMPOTENT_LISTED_MAX;
            let runs = t
                .into_iter()
                .map(|t| checker::calls::RunRecord {
                    task: t.id,
                    payload: String::from_utf8_lossy(&t.payload).into_owned(),
                    output: t
                        .result
                        .as_ref()
                        .map(|r| String::from_utf8_lossy(&r.output).into_owned())
                        .unwrap_or_default(),
                    cache: t.cache,
                })
                .collect();
            (runs, full)
        }
        _ => (Vec::new(), false),
    };
    let (keys, markers_read) = match markers {
        Ok(Ok(m)) => {
            let full = m.len() < IDEMPOTENT_LISTED_MAX;
            (m.into_iter().map(|e| e.key).collect::<Vec<_>>(), full)
        }
        _ => (Vec::new(), false),
    };
    let mut runs: Vec<checker::calls::RunRecord> = runs;
    let listed: BTreeSet<u64> = runs.iter().map(|r| r.task).collect();
    for op in call_history {
        if let (
            calls::CallKind::Idempotent { payload },
            Some(calls::CallResult::Succeeded {
                task,
                output,
                cache,
            }),
        ) = (&op.kind, op.ok())
        {
            if !listed.contains(task) {
                runs.push(checker::calls::RunRecord {
                    task: *task,
                    payload: payload.clone(),
                    output: output.clone(),
                    cache: cache.clone(),
                });
            }
        }
    }
    runs.sort_by_key(|r| r.task);
    runs.dedup_by_key(|r| r.task);
    checker::calls::idempotent_effects(&runs, &keys, tasks_read && markers_read)
}

/// Waits until every node reports the same applied index, then reads `keys` from each node's
/// local state. Returns the views read and whether the indexes converged.
async fn read_replicas(
    cluster: &Cluster,
    keys: &BTreeSet<String>,
) -> (BTreeMap<u64, NodeView>, bool) {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let mut converged = false;
    let client = cluster.client().ok();
    // Bounded by CONVERGE_TIMEOUT.
    while let Some(client) = &client {
        if Instant::now() >= deadline {
            break;
        }
        let status = tokio::time::timeout(Duration::from_secs(3), client.cluster_status()).await;
        if let Ok(Ok(s)) = status {
            let applied: Vec<Option<u64>> = s.nodes.iter().map(|n| n.last_applied).collect();
            if applied.len() == cluster.nodes.len()
                && applied.iter().all(Option::is_some)
                && applied.windows(2).all(|w| w[0] == w[1])
            {
                converged = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut views = BTreeMap::new();
    'nodes: for id in cluster.ids() {
        let Ok(client) = cluster.node_client(id) else {
            continue;
        };
        let mut view = NodeView::new();
        for key in keys {
            let read = tokio::time::timeout(
                Duration::from_secs(5),
                client.get_with(key, ReadConsistency::Local),
            )
            .await;
            match read {
                Ok(Ok(found)) => {
                    view.insert(
                        key.clone(),
                        found.map(|e| ReadValue {
                            value: String::from_utf8_lossy(&e.value).into_owned(),
                            version: e.version,
                        }),
                    );
                }
                _ => {
                    tracing::warn!("could not read {key:?} locally on node {id}");
                    continue 'nodes;
                }
            }
        }
        views.insert(id, view);
    }
    (views, converged)
}

fn write_files(
    dir: &std::path::Path,
    history: &[crate::history::Op],
    call_history: &[CallOp],
    report: &Report,
) -> Result<(), ChaosError> {
    let io = |what: &str| {
        let what = format!("{what} in {}", dir.display());
        move |source| ChaosError::Io { what, source }
    };
    let mut lines = String::new();
    for op in history {
        lines.push_str(&serde_json::to_string(op)?);
        lines.push('\n');
    }
    std::fs::write(dir.join("history.jsonl"), lines).map_err(io("write history.jsonl"))?;
    let text: Vec<String> = history.iter().map(describe).collect();
    std::fs::write(dir.join("history.txt"), text.join("\n")).map_err(io("write history.txt"))?;
    if !call_history.is_empty() {
        let mut lines = String::new();
        for op in call_history {
            lines.push_str(&serde_json::to_string(op)?);
            lines.push('\n');
        }
        std::fs::write(dir.join("calls.jsonl"), lines).map_err(io("write calls.jsonl"))?;
        let text: Vec<String> = call_history.iter().map(calls::describe).collect();
        std::fs::write(dir.join("calls.txt"), text.join("\n")).map_err(io("write calls.txt"))?;
    }
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(dir.join("report.json"), json).map_err(io("write report.json"))?;
    Ok(())
}
