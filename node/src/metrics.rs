//! The node's Prometheus metrics and the `/metrics` HTTP endpoint.
//!
//! Counters and histograms are updated where the work happens (the batcher, the request
//! handlers); Raft gauges are read from openraft's metrics at scrape time, so they are never
//! stale. The HTTP side answers `GET /metrics` only, reads at most `REQUEST_BYTES_MAX` bytes of a
//! request, closes every connection after one answer, and bounds the connections it holds (in
//! number, per address, and in time: see [`serve`]).

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use skiff_raft_store::types::Raft;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::connections::Admission;

/// Largest HTTP request read from a scraper.
const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing one answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most open connections to the endpoint.
pub const CONNECTIONS_MAX: usize = 32;
/// Most open connections to the endpoint from one address.
pub const CONNECTIONS_PER_ADDRESS_MAX: usize = 4;
/// How long the endpoint waits after a failed accept before accepting again.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// How a client write ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum WriteOutcome {
    Committed,
    Overloaded,
    NoLeader,
    Failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: WriteOutcome,
}

/// Why an input was refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// One finished attempt, as counted on the node that ran it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvocationLabel {
    pub function: String,
    /// `succeeded`, `failed` or `timed_out`.
    pub outcome: String,
    /// `warm` or `cold`.
    pub start: String,
}

/// Invocations refused at submit, by function.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabel {
    pub function: String,
}

/// Whether an idempotent invocation was answered from the ledger.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HitLabel {
    /// `hit` or `miss` (a joined call counts as a miss of the run it joined).
    pub result: String,
}

/// Every metric of one node.
pub struct Metrics {
    /// Attempts run on this node, by function, outcome and warm or cold start.
    pub invocations: Family<InvocationLabel, Counter>,
    /// Seconds of one attempt on this node (sandbox hand-off to result).
    pub invocation_seconds: Histogram,
    /// Invocations refused because a queue was full.
    pub throttled: Family<FunctionLabel, Counter>,
    warm_idle: Gauge,
    warm_memory_bytes: Gauge,
    /// Idempotent invocations answered from the ledger (hits) or run (misses and joins).
    pub idempotency: Family<HitLabel, Counter>,
    /// Client commands by how their write ended.
    pub writes: Family<OutcomeLabel, Counter>,
    /// Commands per log entry proposed by the leader.
    pub batch_commands: Histogram,
    /// Seconds from proposal to commit of one log entry.
    pub commit_seconds: Histogram,
    /// Inputs refused before they reached the log.
    pub rejected_inputs: Family<ReasonLabel, Counter>,
    term: Gauge,
    is_leader: Gauge,
    last_log_index: Gauge,
    applied_index: Gauge,
    snapshot_index: Gauge,
    purged_index: Gauge,
    write_queue_depth: Gauge,
    registry: Registry,
}

impl Metrics {
    /// Registers every metric. Long by nature, not by logic: one registration per metric,
    /// each with its help text, in the order `/metrics` shows them.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("skiff");
        let writes = Family::<OutcomeLabel, Counter>::default();
        let batch_commands = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        let commit_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let rejected_inputs = Family::<ReasonLabel, Counter>::default();
        let m = Metrics {
            invocations: Family::default(),
            invocation_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 18)),
            throttled: Family::default(),
            warm_idle: Gauge::default(),
            warm_memory_bytes: Gauge::default(),
            idempotency: Family::default(),
            writes,
            batch_commands,
            commit_seconds,
            rejected_inputs,
            term: Gauge::default(),
            is_leader: Gauge::default(),
            last_log_index: Gauge::default(),
            applied_index: Gauge::default(),
            snapshot_index: Gauge::default(),
            purged_index: Gauge::default(),
            write_queue_depth: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("writes", "Client commands by outcome", m.writes.clone());
        registry.register(
            "raft_batch_commands",
            "Client commands per log entry proposed",
            m.batch_commands.clone(),
        );
        registry.register(
            "raft_commit_seconds",
            "Seconds from proposing a log entry to its commit and apply",
            m.commit_seconds.clone(),
        );
        registry.register(
            "rejected_inputs",
            "Inputs refused before reaching the log, by reason",
            m.rejected_inputs.clone(),
        );
        registry.register("raft_term", "Current Raft term", m.term.clone());
        registry.register(
            "raft_is_leader",
            "1 if this node is the leader",
            m.is_leader.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Index of the last log entry",
            m.last_log_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Index of the last applied entry",
            m.applied_index.clone(),
        );
        registry.register(
            "raft_snapshot_index",
            "Last index covered by the latest snapshot",
            m.snapshot_index.clone(),
        );
        registry.register(
            "raft_purged_index",
            "Last purged log index",
            m.purged_index.clone(),
        );
        registry.register(
            "write_queue_depth",
            "Client commands waiting for the batcher",
            m.write_queue_depth.clone(),
        );
        registry.register(
            "invocations",
            "Attempts run on this node by function, outcome and start (warm or cold)",
            m.invocations.clone(),
        );
        registry.register(
            "invocation_seconds",
            "Seconds of one attempt on this node",
            m.invocation_seconds.clone(),
        );
        registry.register(
            "throttled",
            "Invocations refused because the function's queue was full",
            m.throttled.clone(),
        );
        registry.register(
            "warm_sandboxes",
            "Idle warm sandboxes on this node",
            m.warm_idle.clone(),
        );
        registry.register(
            "warm_memory_bytes",
            "Memory held by idle warm sandboxes on this node",
            m.warm_memory_bytes.clone(),
        );
        registry.register(
            "idempotent_invocations",
            "Idempotent invocations on the leader: answered from the ledger (hit) or not (miss)",
            m.idempotency.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts an idempotent invocation's outcome.
    pub fn idempotency(&self, hit: bool) {
        self.idempotency
            .get_or_create(&HitLabel {
                result: if hit { "hit" } else { "miss" }.to_string(),
            })
            .inc();
    }

    /// Counts one finished attempt.
    pub fn invocation(
        &self,
        function: &str,
        status: skiff_client::api::RunStatus,
        warm: bool,
        wall_ms: u64,
    ) {
        use skiff_client::api::RunStatus;
        let outcome = match status {
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::TimedOut => "timed_out",
        };
        self.invocations
            .get_or_create(&InvocationLabel {
                function: function.to_string(),
                outcome: outcome.to_string(),
                start: if warm { "warm" } else { "cold" }.to_string(),
            })
            .inc();
        self.invocation_seconds.observe(wall_ms as f64 / 1000.0);
    }

    /// Counts an invocation refused as throttled.
    pub fn throttled_invocation(&self, function: &str) {
        self.throttled
            .get_or_create(&FunctionLabel {
                function: function.to_string(),
            })
            .inc();
    }

    /// Sets the warm pool gauges.
    pub fn warm_pool(&self, idle: usize, memory_bytes: u64) {
        self.warm_idle.set(i64::try_from(idle).unwrap_or(i64::MAX));
        self.warm_memory_bytes
            .set(i64::try_from(memory_bytes).unwrap_or(i64::MAX));
    }

    pub fn write(&self, outcome: WriteOutcome, commands: u64) {
        self.writes
            .get_or_create(&OutcomeLabel { outcome })
            .inc_by(commands);
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected_inputs
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Renders the text exposition, refreshing the Raft gauges first.
    pub fn render(&self, raft: &Raft, queue_depth: usize) -> String {
        let m = raft.metrics().borrow().clone();
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.term.set(as_i64(m.current_term));
        self.is_leader
            .set(i64::from(m.current_leader == Some(m.id)));
        self.last_log_index
            .set(as_i64(m.last_log_index.unwrap_or(0)));
        self.applied_index
            .set(as_i64(m.last_applied.map(|l| l.index).unwrap_or(0)));
        self.snapshot_index
            .set(as_i64(m.snapshot.map(|l| l.index).unwrap_or(0)));
        self.purged_index
            .set(as_i64(m.purged.map(|l| l.index).unwrap_or(0)));
        self.write_queue_depth.set(as_i64(queue_depth as u64));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` (the connections it serves end with
/// it: they are its own tasks, joined before it returns).
///
/// Every connection is bounded: at most [`CONNECTIONS_MAX`] open (and
/// [`CONNECTIONS_PER_ADDRESS_MAX`] from one address, so that a scraper from elsewhere still
/// gets in), its request read within `REQUEST_TIMEOUT` and `REQUEST_BYTES_MAX`, its answer
/// written within `WRITE_TIMEOUT` (a client that never reads is dropped, and its buffer with
/// it). A connection over a bound is closed at once.
pub async fn serve(
    listener: TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
    mut shutdown: crate::background::Shutdown,
) {
    let render = std::sync::Arc::new(render);
    let admission = Admission::new(CONNECTIONS_MAX, CONNECTIONS_PER_ADDRESS_MAX);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.wait() => break,
        };
        let Ok((mut stream, source)) = accepted else {
            tokio::time::sleep(ACCEPT_RETRY).await;
            continue;
        };
        let Ok(admitted) = admission.admit(source.ip()) else {
            tracing::debug!(%source, "metrics connection refused: over its bound");
            continue;
        };
        let render = render.clone();
        connections.spawn(async move {
            let _admitted = admitted;
            let mut buf = vec![0u8; REQUEST_BYTES_MAX];
            let mut len = 0;
            let head_done = |b: &[u8]| b.windows(4).any(|w| w == b"\r\n\r\n");
            let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
                while len < buf.len() && !head_done(&buf[..len]) {
                    match stream.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => len += n,
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let response = if request.starts_with("GET /metrics ") {
                let body = render();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
                stream.write_all(response.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
        });
    }
    connections.shutdown().await;
}
