//! Stream jobs during the run: one job at a time over a fresh JSONL file of
//! [`ITEMS_PER_JOB`] items (`{"j":J,"i":I}`, one per line), run by the echo function in
//! batches with each item's result written under the job's own prefix; the next job starts
//! when one ends, until the run's deadline. Starts are recorded in the call history. After
//! heal, [`settle`] waits for every started job to end (redriving a failed one once, as an
//! operator would) and reads its results for [`crate::checker::calls::stream_items`].
//!
//! Invariants: at most [`JOBS_MAX`] jobs; every wait is bounded by the run's deadline or the
//! settle bound; the file a job reads is never changed after its start.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use skiff_client::api::{StreamOptions, StreamSource, StreamState};
use skiff_client::Client;
use tokio::time::Instant;

use crate::calls::{error_outcome, CallKind, CallRecorder, CallResult};
use crate::history::Outcome;
use crate::workload::{ERROR_PAUSE, OP_TIMEOUT};
use crate::{cluster, invocations, ChaosError};

/// Items in each job's file.
pub const ITEMS_PER_JOB: u64 = 500;
/// Items per invocation (the echo function answers a batch's array with itself).
pub const BATCH: u32 = 4;
/// Items in flight per job.
pub const MAX_CONCURRENCY: u32 = 16;
/// Most jobs one run starts.
pub const JOBS_MAX: u64 = 32;
/// Attempts of each batch before its items count as failed.
const MAX_ATTEMPTS: u32 = 5;
/// Pause between two looks at a running job.
const POLL: Duration = Duration::from_millis(500);
/// Most results listed per job (a correct job has exactly [`ITEMS_PER_JOB`]).
const RESULTS_LISTED_MAX: usize = ITEMS_PER_JOB as usize + 100;
/// The process number stream starts are recorded under.
pub const PROCESS: u32 = crate::calls::PROCESS_BASE + 900;

/// The text of item `i` of job `j`, exactly as its line and its expected result.
pub fn item(j: u64, i: u64) -> String {
    format!("{{\"j\":{j},\"i\":{i}}}")
}

/// A job the cluster acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The job's id.
    pub job: u64,
    /// Its number in this run (names its file and its items).
    pub seq: u64,
    pub items: u64,
    pub results_prefix: String,
}

/// What a job looked like after heal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub started: Started,
    /// Its state, if it could be read.
    pub state: Option<StreamState>,
    /// `total` once the source was exhausted.
    pub total: Option<u64>,
    pub succeeded: u64,
    pub failed: u64,
    /// Item index → result, as read from the result sink.
    pub results: BTreeMap<u64, String>,
    /// The results could not be listed.
    pub results_unread: bool,
}

fn write_items(dir: &Path, seq: u64) -> Result<PathBuf, ChaosError> {
    let path = dir.join(format!("stream-{seq}.jsonl"));
    let io = |source| ChaosError::Io {
        what: format!("write {}", path.display()),
        source,
    };
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io)?);
    for i in 0..ITEMS_PER_JOB {
        writeln!(f, "{}", item(seq, i)).map_err(io)?;
    }
    f.flush().map_err(io)?;
    Ok(path)
}

/// Starts jobs one after another until `deadline`; returns the acknowledged ones. `dir` must
/// be the nodes' sources root (absolute): the leader reads the file beneath its root, and
/// every node runs on this machine.
pub async fn run(
    endpoints: Vec<String>,
    dir: PathBuf,
    prefix: String,
    recorder: Arc<CallRecorder>,
    deadline: Instant,
) -> Result<Vec<Started>, ChaosError> {
    let client = cluster::client_for(endpoints)?;
    let mut started = Vec::new();
    // Bounded by JOBS_MAX and the deadline.
    for seq in 0..JOBS_MAX {
        if Instant::now() >= deadline {
            break;
        }
        let path = write_items(&dir, seq)?;
        let results_prefix = format!("{prefix}/{seq}/");
        let Some((id, _)) = recorder.invoke(PROCESS, |_| CallKind::StreamStart {
            path: path.display().to_string(),
            items: ITEMS_PER_JOB,
            results_prefix: results_prefix.clone(),
        }) else {
            break;
        };
        let options = StreamOptions {
            max_concurrency: MAX_CONCURRENCY,
            batch: BATCH,
            max_attempts: MAX_ATTEMPTS,
            retry_backoff_ms: 200,
            results_prefix: Some(results_prefix.clone()),
            ..StreamOptions::default()
        };
        let source = StreamSource::Jsonl {
            path: path.display().to_string(),
        };
        let start = client.stream_start(invocations::FUNCTION, source, options);
        let outcome = match tokio::time::timeout(OP_TIMEOUT, start).await {
            Ok(Ok(job)) => Outcome::Ok(CallResult::StreamStarted { job }),
            Ok(Err(e)) => error_outcome(e),
            Err(_) => Outcome::Unknown(format!("no answer within {OP_TIMEOUT:?}")),
        };
        let job = match &outcome {
            Outcome::Ok(CallResult::StreamStarted { job }) => Some(*job),
            _ => None,
        };
        recorder.complete(id, outcome);
        let Some(job) = job else {
            tokio::time::sleep(ERROR_PAUSE).await;
            continue;
        };
        started.push(Started {
            job,
            seq,
            items: ITEMS_PER_JOB,
            results_prefix,
        });
        // Wait (bounded by the deadline) for it to end before the next one.
        while Instant::now() < deadline {
            if let Ok(Ok(Some(j))) = tokio::time::timeout(OP_TIMEOUT, client.stream(job)).await {
                if j.state.is_finished() {
                    break;
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(started)
}

/// After heal: waits up to `within` for every job to end, redrives a failed job once (a
/// batch can fail for good when its node is lost mid-run too often), then reads each job's
/// counters and results.
pub async fn settle(client: &Client, jobs: &[Started], within: Duration) -> Vec<Settled> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    for s in jobs {
        let mut redriven = false;
        let mut last = None;
        // Bounded by the deadline.
        while Instant::now() < deadline {
            match tokio::time::timeout(OP_TIMEOUT, client.stream(s.job)).await {
                Ok(Ok(Some(j))) if j.state == StreamState::Failed && !redriven => {
                    tracing::info!("stream job {} failed ({:?}); redriving it", s.job, j.reason);
                    redriven = true;
                    let _ = tokio::time::timeout(OP_TIMEOUT, client.stream_redrive(s.job)).await;
                }
                Ok(Ok(Some(j))) if j.state.is_finished() => {
                    last = Some(j);
                    break;
                }
                Ok(Ok(Some(j))) => last = Some(j),
                _ => {}
            }
            tokio::time::sleep(POLL).await;
        }
        let listed = tokio::time::timeout(
            OP_TIMEOUT,
            client.list_all(&s.results_prefix, RESULTS_LISTED_MAX),
        )
        .await;
        let (results, results_unread) = match listed {
            Ok(Ok(entries)) => (
                entries
                    .into_iter()
                    .filter_map(|e| {
                        let index = e.key.strip_prefix(&s.results_prefix)?.parse().ok()?;
                        Some((index, String::from_utf8_lossy(&e.value).into_owned()))
                    })
                    .collect(),
                false,
            ),
            _ => (BTreeMap::new(), true),
        };
        out.push(Settled {
            started: s.clone(),
            state: last.as_ref().map(|j| j.state),
            total: last.as_ref().and_then(|j| j.counters.total),
            succeeded: last.as_ref().map_or(0, |j| j.counters.succeeded),
            failed: last.as_ref().map_or(0, |j| j.counters.failed),
            results,
            results_unread,
        });
    }
    out
}
