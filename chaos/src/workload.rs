//! The workload: concurrent workers issuing kv puts, CAS, reads and deletes against the
//! cluster, each operation recorded in the [`Recorder`] as invoke, then ok / fail / unknown.
//!
//! Keys rotate: a small set of active keys is replaced by fresh ones every
//! [`WorkloadConfig::ops_per_key`] operations per key, so each key's history stays short
//! enough for the linearizability search (Jepsen's "independent keys"). The function workload
//! (invocations, dependency writes, stream starts) has its own history of
//! [`crate::calls::CallKind`]s on the same clock.
//!
//! Invariants: every worker loop is bounded by a deadline and by the history's capacity;
//! every operation by [`OP_TIMEOUT`]; a write whose answer did not arrive is unknown.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skiff_client::api::ReadConsistency;
use skiff_client::{Client, ClientError};
use tokio::time::Instant;

use crate::cluster;
use crate::history::{value_for, OpKind, OpResult, Outcome, ReadValue, Recorder};
use crate::ChaosError;

/// Longest one operation may take before it is recorded as unknown.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra pause of a worker after an operation that did not succeed, so that a worker facing a
/// dead cluster does not pile up unknown writes (each one widens the checker's search).
pub const ERROR_PAUSE: Duration = Duration::from_millis(250);

/// Shape of the workload.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Concurrent workers, each with its own client (and client id).
    pub workers: u32,
    /// Keys in use at once.
    pub keys_active: usize,
    /// Operations per key before it is replaced by a fresh key.
    pub ops_per_key: usize,
    /// Mean pause between two operations of one worker, in milliseconds.
    pub think_ms_mean: u64,
    /// Read with `ReadConsistency::Local` instead of linearizable. DELIBERATELY BROKEN: local
    /// reads may be stale, so a run with this on should be found invalid under partitions;
    /// it exists to show that the checker can fail.
    pub unsafe_local_reads: bool,
    /// Prefix of every key, unique per run.
    pub key_prefix: String,
}

impl WorkloadConfig {
    /// The key a worker uses for slot `slot` when `done` operations were issued in total.
    fn key(&self, done: usize, slot: usize) -> String {
        let generation = done / (self.ops_per_key * self.keys_active).max(1);
        format!("{}/g{generation}-k{slot}", self.key_prefix)
    }
}

/// Runs the workload until `deadline`; returns when every worker is done.
pub async fn run(
    endpoints: Vec<String>,
    config: WorkloadConfig,
    recorder: Arc<Recorder>,
    seed: u64,
    deadline: Instant,
) -> Result<(), ChaosError> {
    let issued = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..config.workers {
        // Each worker prefers a different node first.
        let mut eps = endpoints.clone();
        let shift = worker as usize % eps.len().max(1);
        eps.rotate_left(shift);
        let client = cluster::client_for(eps)?;
        let rng = StdRng::seed_from_u64(seed.wrapping_add(1 + u64::from(worker)));
        tasks.spawn(worker_loop(
            worker,
            client,
            config.clone(),
            Arc::clone(&recorder),
            Arc::clone(&issued),
            rng,
            deadline,
        ));
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| ChaosError::Cluster(format!("a workload worker panicked: {e}")))?;
    }
    Ok(())
}

async fn worker_loop(
    worker: u32,
    client: Client,
    config: WorkloadConfig,
    recorder: Arc<Recorder>,
    issued: Arc<AtomicUsize>,
    mut rng: StdRng,
    deadline: Instant,
) {
    // The last version this worker saw per key: what its CAS operations expect.
    let mut seen: HashMap<String, u64> = HashMap::new();
    // Bounded by the deadline and by the recorder's capacity.
    while Instant::now() < deadline {
        let done = issued.fetch_add(1, Ordering::Relaxed);
        let key = config.key(done, rng.gen_range(0..config.keys_active));
        let roll = rng.gen_range(0..100);
        let expect = seen.get(&key).copied().unwrap_or(0);
        let Some((id, kind)) = recorder.invoke(worker, |id| match roll {
            0..=39 => OpKind::Get { key: key.clone() },
            40..=64 => OpKind::Put {
                key: key.clone(),
                value: value_for(worker, id),
            },
            65..=89 => OpKind::Cas {
                key: key.clone(),
                value: value_for(worker, id),
                expect_version: expect,
            },
            _ => OpKind::Delete { key: key.clone() },
        }) else {
            return;
        };
        let outcome = match tokio::time::timeout(
            OP_TIMEOUT,
            execute(&client, &kind, config.unsafe_local_reads),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Unknown(format!("no answer within {OP_TIMEOUT:?}")),
        };
        if let Outcome::Ok(r) = &outcome {
            let version = match r {
                OpResult::Written { version } => Some(*version),
                OpResult::Conflict { current } => Some(*current),
                OpResult::Deleted { .. } | OpResult::NotFound => Some(0),
                OpResult::Read { found } => Some(found.as_ref().map_or(0, |f| f.version)),
            };
            if let Some(v) = version {
                seen.insert(key.clone(), v);
            }
        }
        let failed = !matches!(outcome, Outcome::Ok(_));
        recorder.complete(id, outcome);
        let pause = Duration::from_millis(rng.gen_range(0..=2 * config.think_ms_mean));
        tokio::time::sleep(if failed { pause + ERROR_PAUSE } else { pause }).await;
    }
}

/// The outcome of a write that returned an error: unknown unless the error proves nothing
/// was applied (the command was refused as invalid before it was sent).
pub(crate) fn write_error(e: ClientError) -> Outcome {
    match e {
        ClientError::Invalid(_) | ClientError::NoEndpoints | ClientError::InvalidEndpoint(_) => {
            Outcome::Fail(e.to_string())
        }
        ClientError::Conflict { current, .. } => Outcome::Ok(OpResult::Conflict { current }),
        ClientError::NotFound { .. } => Outcome::Ok(OpResult::NotFound),
        // Everything else may follow an attempt that was applied (retries reuse the request
        // id, so an earlier attempt can succeed while a later one reports an error).
        other => Outcome::Unknown(other.to_string()),
    }
}

/// Runs one operation and classifies its answer.
pub async fn execute(client: &Client, kind: &OpKind, unsafe_local_reads: bool) -> Outcome {
    match kind {
        OpKind::Put { key, value } => match client.put(key, value.as_bytes().to_vec()).await {
            Ok(version) => Outcome::Ok(OpResult::Written { version }),
            Err(e) => write_error(e),
        },
        OpKind::Cas {
            key,
            value,
            expect_version,
        } => match client
            .put_if(key, value.as_bytes().to_vec(), Some(*expect_version))
            .await
        {
            Ok(version) => Outcome::Ok(OpResult::Written { version }),
            Err(e) => write_error(e),
        },
        OpKind::Delete { key } => match client.delete(key, None).await {
            Ok(version) => Outcome::Ok(OpResult::Deleted { version }),
            Err(e) => write_error(e),
        },
        OpKind::Get { key } => {
            let read = if unsafe_local_reads {
                ReadConsistency::Local
            } else {
                ReadConsistency::Linearizable
            };
            match client.get_with(key, read).await {
                Ok(found) => Outcome::Ok(OpResult::Read {
                    found: found.map(|e| ReadValue {
                        value: String::from_utf8_lossy(&e.value).into_owned(),
                        version: e.version,
                    }),
                }),
                // A read changes nothing: a failed read is simply left out of the check.
                Err(e) => Outcome::Fail(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_rotate_by_generation() {
        let c = WorkloadConfig {
            workers: 1,
            keys_active: 2,
            ops_per_key: 10,
            think_ms_mean: 0,
            unsafe_local_reads: false,
            key_prefix: "chaos/1".into(),
        };
        assert_eq!(c.key(0, 1), "chaos/1/g0-k1");
        assert_eq!(c.key(19, 0), "chaos/1/g0-k0");
        assert_eq!(c.key(20, 0), "chaos/1/g1-k0");
    }

    #[test]
    fn write_errors_are_unknown_unless_certainly_not_applied() {
        let timeout = ClientError::Api(skiff_client::api::ApiError::Timeout("t".into()));
        assert!(matches!(write_error(timeout), Outcome::Unknown(_)));
        let refused = ClientError::NoEndpoints;
        assert!(matches!(write_error(refused), Outcome::Fail(_)));
        let conflict = ClientError::Conflict {
            key: "k".into(),
            current: 3,
        };
        assert_eq!(
            write_error(conflict),
            Outcome::Ok(OpResult::Conflict { current: 3 })
        );
    }
}
