//! Load generation for `skiff bench`: one bounded closed-loop driver shared by every
//! benchmark (and by the comparison benches against other systems), so that all of them
//! count, time and bound their operations the same way.
//!
//! Invariants: every loop stops at its deadline or after `ops_max` operations in all,
//! whichever comes first; each worker keeps at most [`SAMPLES_PER_WORKER_MAX`] latency
//! samples, so memory stays bounded on long runs.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most latency samples kept per worker.
pub const SAMPLES_PER_WORKER_MAX: usize = 1_000_000;

/// What one closed-loop run measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadStats {
    pub workers: usize,
    /// Operations that succeeded (each has a latency sample while under the cap).
    pub ok: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub ok_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Runs `workers` concurrent loops, each calling `op(worker, n)` and waiting for it before
/// the next, until `duration` has passed or `ops_max` operations were started in all. `op`
/// returns whether the operation succeeded.
pub async fn drive<F, Fut>(workers: usize, duration: Duration, ops_max: u64, op: F) -> LoadStats
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let ops = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let ops = ops.clone();
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut samples: Vec<u32> = Vec::new();
            let mut errors = 0u64;
            let mut n = w as u64;
            while Instant::now() < deadline && ops.fetch_add(1, Ordering::Relaxed) < ops_max {
                let t = Instant::now();
                if op(w, n).await {
                    if samples.len() < SAMPLES_PER_WORKER_MAX {
                        samples.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                } else {
                    errors += 1;
                }
                n = n.wrapping_add(workers as u64);
            }
            (samples, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok((s, e)) => {
                all.extend(s);
                errors += e;
            }
            // A panicking operation counts as one error; the others still report.
            Err(_) => errors += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    summarize(workers, all, errors, elapsed)
}

/// Percentiles and rates of latency samples (microseconds).
pub fn summarize(workers: usize, mut samples: Vec<u32>, errors: u64, elapsed_s: f64) -> LoadStats {
    samples.sort_unstable();
    let pct = |p: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples[i] as f64 / 1000.0
    };
    LoadStats {
        workers,
        ok: samples.len() as u64,
        errors,
        elapsed_s,
        ok_per_s: if elapsed_s > 0.0 {
            samples.len() as f64 / elapsed_s
        } else {
            0.0
        },
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_driver_stops_at_ops_max_and_counts_errors() {
        let calls = Arc::new(AtomicU64::new(0));
        let stats = drive(4, Duration::from_secs(30), 100, move |_, _| {
            let k = calls.fetch_add(1, Ordering::Relaxed);
            async move { !k.is_multiple_of(10) }
        })
        .await;
        assert_eq!(stats.ok + stats.errors, 100);
        assert_eq!(stats.errors, 10, "every tenth operation fails");
        assert!(stats.elapsed_s < 30.0, "ops_max ended it, not the clock");
    }

    #[tokio::test]
    async fn the_driver_stops_at_its_deadline() {
        let stats = drive(2, Duration::from_millis(200), u64::MAX, |_, _| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            true
        })
        .await;
        assert!(stats.ok > 0 && stats.ok < 100, "{stats:?}");
        assert!(stats.p50_ms >= 10.0, "{stats:?}");
    }

    #[test]
    fn percentiles_of_known_samples() {
        let s = summarize(1, (1..=100).map(|i| i * 1000).collect(), 0, 1.0);
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (51.0, 99.0, 100.0));
        assert_eq!(s.ok_per_s, 100.0);
    }
}
