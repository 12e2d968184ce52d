//! The invocation part of the workload: asynchronous invocations of an echo function while the
//! nemesis runs, and the check that every acknowledged one completed with its own result after
//! heal (nothing acknowledged is lost; at least once).
//!
//! Functions run in sandboxes, which need root: a run enables this part only when asked (the
//! CI scenario asks when it runs as root).
//!
//! Invariants: every loop is bounded by the run's deadline and [`INVOCATIONS_PER_WORKER_MAX`];
//! an invocation is acknowledged only when the cluster answered with its task id.

use std::time::Duration;

use skiff_client::api::{DataGrant, FnMode, FunctionSpec, TaskState};
use skiff_client::Client;
use tokio::time::Instant;

use crate::checker::{CheckReport, Status, Violation};
use crate::workload::{ERROR_PAUSE, OP_TIMEOUT};
use crate::{cluster, ChaosError};

/// The function the workload invokes.
pub const FUNCTION: &str = "chaos-echo";
/// Concurrent invokers.
pub const WORKERS: u32 = 2;
/// Most invocations one invoker submits.
pub const INVOCATIONS_PER_WORKER_MAX: u32 = 2_000;
/// Pause between two invocations of one invoker.
const THINK: Duration = Duration::from_millis(40);

/// An invocation the cluster acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub task: u64,
    pub payload: String,
}

/// Packs one shell script as a code archive and uploads it; returns the archive's digest.
pub async fn upload(client: &Client, name: &str, script: &str) -> Result<String, ChaosError> {
    let dir = tempfile::tempdir().map_err(|source| ChaosError::Io {
        what: "create a code directory".into(),
        source,
    })?;
    std::fs::write(dir.path().join(name), script).map_err(|source| ChaosError::Io {
        what: format!("write {name}"),
        source,
    })?;
    let archive = skiff_client::deploy::pack_directory(dir.path()).map_err(ChaosError::Cluster)?;
    client
        .upload_code(&archive, |_, _| {})
        .await
        .map_err(|e| ChaosError::Cluster(format!("uploading {name}: {e}")))
}

/// Deploys the echo function (serve mode: one line in, the same line out).
pub async fn deploy(client: &Client) -> Result<(), ChaosError> {
    let digest = upload(
        client,
        "echo.sh",
        "while IFS= read -r l; do printf '%s\\n' \"$l\"; done\n",
    )
    .await?;
    client
        .deploy(FunctionSpec {
            name: FUNCTION.into(),
            code_digest: digest,
            entry: vec!["/bin/sh".into(), "echo.sh".into()],
            mode: FnMode::Serve,
            tier: "standard".into(),
            policy: None,
            memory_bytes: 64 << 20,
            timeout_ms: 10_000,
            max_concurrency: 64,
            queue_max: 10_000,
            min_warm: 3,
            max_attempts: 5,
            retry_backoff_ms: 200,
            data: DataGrant::default(),
            env: Vec::new(),
            idempotency: None,
            stages: Vec::new(),
        })
        .await
        .map_err(|e| ChaosError::Cluster(format!("deploying the echo function: {e}")))?;
    Ok(())
}

/// Submits asynchronous invocations until `deadline`; returns the acknowledged ones.
pub async fn run(endpoints: Vec<String>, deadline: Instant) -> Result<Vec<Acked>, ChaosError> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let mut eps = endpoints.clone();
        let shift = w as usize % eps.len().max(1);
        eps.rotate_left(shift);
        let client = cluster::client_for(eps)?;
        tasks.spawn(async move {
            let mut acked = Vec::new();
            for n in 0..INVOCATIONS_PER_WORKER_MAX {
                if Instant::now() >= deadline {
                    break;
                }
                let payload = format!("{{\"w\":{w},\"n\":{n}}}");
                let call = client.invoke(FUNCTION, None, payload.clone().into_bytes(), false);
                match tokio::time::timeout(OP_TIMEOUT, call).await {
                    Ok(Ok(task)) => {
                        acked.push(Acked {
                            task: task.id,
                            payload,
                        });
                        tokio::time::sleep(THINK).await;
                    }
                    // Not acknowledged (refused, or no answer in time): nothing to check.
                    _ => tokio::time::sleep(ERROR_PAUSE).await,
                }
            }
            acked
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.map_err(|e| ChaosError::Cluster(format!("an invoker panicked: {e}")))?);
    }
    Ok(all)
}

/// After heal: every acknowledged invocation's task exists and succeeded with its own payload
/// as output. Waits up to `within` for the last ones to finish; any still running then makes
/// the check unknown.
pub async fn check(client: &Client, acked: &[Acked], within: Duration) -> CheckReport {
    let deadline = Instant::now() + within;
    let mut pending: Vec<&Acked> = acked.iter().collect();
    let mut violations = Vec::new();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for a in pending {
            match client.task(a.task).await {
                Ok(Some(t)) if t.state == TaskState::Succeeded => {
                    let out = t
                        .result
                        .as_ref()
                        .map(|r| r.output.clone())
                        .unwrap_or_default();
                    if out != a.payload.as_bytes() {
                        violations.push(Violation {
                            key: format!("task {}", a.task),
                            message: format!(
                                "acknowledged invocation {} answered {:?}",
                                a.payload,
                                String::from_utf8_lossy(&out)
                            ),
                            ops: vec![],
                        });
                    }
                }
                Ok(Some(t)) if t.state.is_finished() => violations.push(Violation {
                    key: format!("task {}", a.task),
                    message: format!(
                        "acknowledged invocation {} ended {}: {}",
                        a.payload,
                        t.state.as_str(),
                        t.result
                            .as_ref()
                            .and_then(|r| r.error.clone())
                            .unwrap_or_default()
                    ),
                    ops: vec![],
                }),
                Ok(None) => violations.push(Violation {
                    key: format!("task {}", a.task),
                    message: format!("acknowledged invocation {} is lost", a.payload),
                    ops: vec![],
                }),
                // Running, or the read failed: look again.
                _ => still.push(a),
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let status = if !violations.is_empty() {
        Status::Invalid
    } else if !pending.is_empty() {
        Status::Unknown
    } else {
        Status::Valid
    };
    CheckReport {
        name: "acknowledged invocations".into(),
        status,
        summary: format!(
            "{} acknowledged, {} violations, {} unfinished after {:?}",
            acked.len(),
            violations.len(),
            pending.len(),
            within
        ),
        violations,
    }
}
