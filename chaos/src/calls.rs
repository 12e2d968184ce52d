//! The function part of the recorded workload: synchronous invocations of the echo function,
//! invocations of an idempotent function with a declared `kv:` dependency that the workload
//! sometimes changes, and (see [`crate::streams`]) stream job starts. Every call is recorded
//! in a [`CallRecorder`] as invoke, then ok / fail / unknown, like the key-value operations.
//!
//! The idempotent function makes its effect observable: every run writes one marker key
//! `EFFECT_PREFIX/<payload>/<dependency value>/<random run id>` through the data service and
//! answers `<payload> <dependency value> <run id>`, so after heal the checker can count runs
//! per (payload, dependency state) and tie each marker to the task that reported it
//! ([`crate::checker::calls`]). Dependency values are unique in the run, so a value names one
//! version of the key.
//!
//! Invariants: every loop is bounded by the run's deadline and [`CALLS_PER_WORKER_MAX`];
//! every call by [`CALL_TIMEOUT`]; a call whose answer did not arrive is unknown, never
//! failed.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use skiff_client::api::{
    ApiError, CacheOutcome, DataGrant, Dependency, FnMode, FunctionSpec, Idempotency, Task,
    TaskState,
};
use skiff_client::{Client, ClientError};
use tokio::time::Instant;

use crate::history::{Op, Outcome, Recorder};
use crate::workload::ERROR_PAUSE;
use crate::{cluster, invocations, ChaosError};

/// The idempotent function.
pub const IDEMPOTENT_FUNCTION: &str = "chaos-once";
/// Its declared dependency (`kv:` key); the workload rewrites it now and then.
pub const DEPENDENCY_KEY: &str = "chaos-once/dep";
/// Where its runs write their markers.
pub const EFFECT_PREFIX: &str = "chaos-once/fx/";
/// Distinct payloads of idempotent calls: few, so that calls repeat and hits happen, and
/// concurrent identical calls meet.
pub const IDEMPOTENT_PAYLOADS: u32 = 4;
/// Longest one call may take before it is recorded as unknown (a sync call waits for the
/// run, which may wait for a sandbox or for a reassignment after a node loss).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Workers making synchronous calls of the echo function.
pub const SYNC_WORKERS: u32 = 1;
/// Workers calling the idempotent function (and rewriting its dependency).
pub const IDEMPOTENT_WORKERS: u32 = 2;
/// Most calls one worker makes.
pub const CALLS_PER_WORKER_MAX: u32 = 2_000;
/// Percentage of an idempotent worker's operations that rewrite the dependency.
const DEPENDENCY_WRITE_PCT: u32 = 6;
/// Mean pause between two calls of one worker, in milliseconds.
const THINK_MS_MEAN: u64 = 40;
/// First worker number of the call workers in the history (the kv workers count from 0).
pub const PROCESS_BASE: u32 = 1_000;

/// What a call asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum CallKind {
    /// A synchronous invocation of the echo function; a success answers the payload.
    Sync { payload: String },
    /// A synchronous invocation of the idempotent function.
    Idempotent { payload: String },
    /// A write of the idempotent function's dependency key.
    SetDependency { value: String },
    /// The start of a stream job over `items` lines of a JSONL file, results under
    /// `results_prefix`.
    StreamStart {
        path: String,
        items: u64,
        results_prefix: String,
    },
}

/// What a completed call answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum CallResult {
    /// The invocation's task succeeded with this output.
    Succeeded {
        task: u64,
        output: String,
        cache: Option<CacheOutcome>,
    },
    /// The dependency now holds the value at `version`.
    Written { version: u64 },
    /// The stream job `job` was created.
    StreamStarted { job: u64 },
}

/// One recorded call.
pub type CallOp = Op<CallKind, CallResult>;
/// The recorder of calls.
pub type CallRecorder = Recorder<CallKind, CallResult>;

/// The idempotent function: reads its dependency, writes its marker, answers what it did.
/// The run id comes from the kernel's random source, so two runs never share a marker.
const ONCE_SCRIPT: &str = "p=$(cat)\n\
d=$(skiff-data get chaos-once/dep 2>/dev/null) || d=none\n\
r=$(od -An -N8 -tx8 /dev/urandom | tr -d ' \\n')\n\
skiff-data put \"chaos-once/fx/$p/$d/$r\" 1 >/dev/null || exit 7\n\
printf '%s %s %s' \"$p\" \"$d\" \"$r\"\n";

/// Deploys the idempotent function (exec mode, declared dependency, reads tracked).
pub async fn deploy(client: &Client) -> Result<(), ChaosError> {
    let digest = invocations::upload(client, "once.sh", ONCE_SCRIPT).await?;
    client
        .deploy(FunctionSpec {
            name: IDEMPOTENT_FUNCTION.into(),
            code_digest: digest,
            entry: vec!["/bin/sh".into(), "once.sh".into()],
            mode: FnMode::Exec,
            tier: "standard".into(),
            policy: None,
            memory_bytes: 64 << 20,
            timeout_ms: 10_000,
            max_concurrency: 16,
            queue_max: 1_000,
            min_warm: 1,
            max_attempts: 3,
            retry_backoff_ms: 200,
            data: DataGrant {
                read_prefixes: vec![DEPENDENCY_KEY.into()],
                write_prefixes: vec![EFFECT_PREFIX.into()],
            },
            env: Vec::new(),
            stages: Vec::new(),
            idempotency: Some(Idempotency {
                dependencies: vec![Dependency::Kv(DEPENDENCY_KEY.into())],
                // Longer than any run: a rerun at an unchanged dependency is never "expired".
                ttl_ms: 3_600_000,
                cache_failures: false,
                track_reads: true,
            }),
        })
        .await
        .map_err(|e| ChaosError::Cluster(format!("deploying {IDEMPOTENT_FUNCTION}: {e}")))?;
    Ok(())
}

/// Runs the sync and idempotent workers until `deadline`.
pub async fn run(
    endpoints: Vec<String>,
    recorder: Arc<CallRecorder>,
    seed: u64,
    deadline: Instant,
) -> Result<(), ChaosError> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..SYNC_WORKERS + IDEMPOTENT_WORKERS {
        let mut eps = endpoints.clone();
        let shift = w as usize % eps.len().max(1);
        eps.rotate_left(shift);
        let client = cluster::client_for(eps)?;
        let rng = StdRng::seed_from_u64(seed.wrapping_add(0xca11 + u64::from(w)));
        let idempotent = w >= SYNC_WORKERS;
        tasks.spawn(worker(
            PROCESS_BASE + w,
            idempotent,
            client,
            Arc::clone(&recorder),
            rng,
            deadline,
        ));
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| ChaosError::Cluster(format!("a call worker panicked: {e}")))?;
    }
    Ok(())
}

async fn worker(
    process: u32,
    idempotent: bool,
    client: Client,
    recorder: Arc<CallRecorder>,
    mut rng: StdRng,
    deadline: Instant,
) {
    // Bounded by the deadline, CALLS_PER_WORKER_MAX and the recorder's capacity.
    for _ in 0..CALLS_PER_WORKER_MAX {
        if Instant::now() >= deadline {
            return;
        }
        let roll = rng.gen_range(0..100);
        let pick = rng.gen_range(0..IDEMPOTENT_PAYLOADS);
        let Some((id, kind)) = recorder.invoke(process, |id| {
            if !idempotent {
                CallKind::Sync {
                    payload: format!("{{\"p\":{process},\"o\":{id}}}"),
                }
            } else if roll < DEPENDENCY_WRITE_PCT {
                CallKind::SetDependency {
                    value: format!("d{id}"),
                }
            } else {
                CallKind::Idempotent {
                    payload: format!("q{pick}"),
                }
            }
        }) else {
            return;
        };
        let outcome = match tokio::time::timeout(CALL_TIMEOUT, execute(&client, &kind)).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Unknown(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        let failed = !matches!(outcome, Outcome::Ok(_));
        recorder.complete(id, outcome);
        let pause = Duration::from_millis(rng.gen_range(0..=2 * THINK_MS_MEAN));
        tokio::time::sleep(if failed { pause + ERROR_PAUSE } else { pause }).await;
    }
}

/// Runs one call (not stream starts: see [`crate::streams`]) and classifies its answer.
pub async fn execute(client: &Client, kind: &CallKind) -> Outcome<CallResult> {
    match kind {
        CallKind::Sync { payload } => invoked(
            client
                .invoke(
                    invocations::FUNCTION,
                    None,
                    payload.clone().into_bytes(),
                    true,
                )
                .await,
        ),
        CallKind::Idempotent { payload } => invoked(
            client
                .invoke(
                    IDEMPOTENT_FUNCTION,
                    None,
                    payload.clone().into_bytes(),
                    true,
                )
                .await,
        ),
        CallKind::SetDependency { value } => {
            match client.put(DEPENDENCY_KEY, value.clone().into_bytes()).await {
                Ok(version) => Outcome::Ok(CallResult::Written { version }),
                Err(e) => error_outcome(e),
            }
        }
        CallKind::StreamStart { .. } => {
            Outcome::Fail("stream starts are run by the stream driver".into())
        }
    }
}

/// The outcome of a sync invocation's answer: a succeeded task is ok; a finished failed one
/// is fail (the cluster answered that it failed); an unfinished one is unknown.
pub fn invoked(answer: Result<Task, ClientError>) -> Outcome<CallResult> {
    match answer {
        Ok(t) if t.state == TaskState::Succeeded => {
            let output = t
                .result
                .as_ref()
                .map(|r| r.output.clone())
                .unwrap_or_default();
            Outcome::Ok(CallResult::Succeeded {
                task: t.id,
                output: String::from_utf8_lossy(&output).into_owned(),
                cache: t.cache,
            })
        }
        Ok(t) if t.state.is_finished() => Outcome::Fail(format!(
            "task {} ended {}: {}",
            t.id,
            t.state.as_str(),
            t.result
                .as_ref()
                .and_then(|r| r.error.clone())
                .unwrap_or_default()
        )),
        Ok(t) => Outcome::Unknown(format!("task {} answered {}", t.id, t.state.as_str())),
        Err(e) => error_outcome(e),
    }
}

/// An error is fail only when the call certainly did nothing (refused before it was queued);
/// anything else may follow an attempt that was applied, so it is unknown.
pub fn error_outcome(e: ClientError) -> Outcome<CallResult> {
    match e {
        ClientError::Invalid(_)
        | ClientError::NoEndpoints
        | ClientError::InvalidEndpoint(_)
        | ClientError::FunctionNotFound { .. }
        | ClientError::Api(ApiError::Throttled(_))
        | ClientError::Api(ApiError::InvalidArgument(_)) => Outcome::Fail(e.to_string()),
        other => Outcome::Unknown(other.to_string()),
    }
}

/// One line describing a call for a report.
pub fn describe(op: &CallOp) -> String {
    let call = match &op.kind {
        CallKind::Sync { payload } => format!("invoke-sync({payload})"),
        CallKind::Idempotent { payload } => format!("invoke-idempotent({payload})"),
        CallKind::SetDependency { value } => format!("set-dependency({value:?})"),
        CallKind::StreamStart { items, .. } => format!("stream-start({items} items)"),
    };
    let outcome = match &op.outcome {
        Some(Outcome::Ok(CallResult::Succeeded {
            task,
            output,
            cache,
        })) => {
            let cache = match cache {
                Some(CacheOutcome::Hit { source_task }) => format!(" hit of task {source_task}"),
                Some(CacheOutcome::Joined { task }) => format!(" joined task {task}"),
                Some(CacheOutcome::Miss { reason }) => format!(" miss: {reason}"),
                None => String::new(),
            };
            format!("task {task} ok {output:?}{cache}")
        }
        Some(Outcome::Ok(CallResult::Written { version })) => format!("ok v{version}"),
        Some(Outcome::Ok(CallResult::StreamStarted { job })) => format!("job {job}"),
        Some(Outcome::Fail(e)) => format!("fail ({e})"),
        Some(Outcome::Unknown(e)) => format!("unknown ({e})"),
        None => "unknown (never completed)".to_string(),
    };
    let secs = |ns: u64| ns as f64 / 1e9;
    let done = op
        .complete_ns
        .map_or_else(|| "?".to_string(), |c| format!("{:.3}s", secs(c)));
    format!(
        "#{} c{} {call} -> {outcome} [{:.3}s..{done}]",
        op.id,
        op.process,
        secs(op.invoke_ns)
    )
}

/// Counts of a call history by outcome and kind, for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallCounts {
    pub calls: usize,
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
    pub sync: usize,
    pub idempotent: usize,
    pub dependency_writes: usize,
    pub stream_starts: usize,
}

impl CallCounts {
    pub fn of(history: &[CallOp]) -> CallCounts {
        let mut c = CallCounts {
            calls: history.len(),
            ..CallCounts::default()
        };
        for op in history {
            match op.kind {
                CallKind::Sync { .. } => c.sync += 1,
                CallKind::Idempotent { .. } => c.idempotent += 1,
                CallKind::SetDependency { .. } => c.dependency_writes += 1,
                CallKind::StreamStart { .. } => c.stream_starts += 1,
            }
            match &op.outcome {
                Some(Outcome::Ok(_)) => c.ok += 1,
                Some(Outcome::Fail(_)) => c.fail += 1,
                Some(Outcome::Unknown(_)) | None => c.unknown += 1,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_unknown_and_refusals_fail() {
        let t = ClientError::Api(ApiError::Timeout("t".into()));
        assert!(matches!(error_outcome(t), Outcome::Unknown(_)));
        let lost = ClientError::Api(ApiError::NoLeader {
            leader: None,
            leader_addr: None,
        });
        assert!(matches!(error_outcome(lost), Outcome::Unknown(_)));
        let throttled = ClientError::Api(ApiError::Throttled("queue full".into()));
        assert!(matches!(error_outcome(throttled), Outcome::Fail(_)));
    }
}
