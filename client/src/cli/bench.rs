//! `skiff bench`: load generators against a running cluster: replicated key-value writes,
//! and invocations of a warm echo function (with a local bwrap one-shot for comparison).
//!
//! Every run is bounded by a duration and an operation count, driven by [`crate::bench`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use super::function::parse_mode;
use super::render::{bench_invoke_text, bench_kv_text, out};
use super::CliError;
use crate::api::{
    CacheOutcome, DataGrant, FnMode, FunctionSpec, Idempotency, TaskFilter, TaskId, TaskState,
};
use crate::bench;
use crate::client::{Client, ClientConfig};
use crate::deploy;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Replicated key-value writes: throughput and latency at a given concurrency.
    Kv(BenchKvArgs),
    /// Invocations of a warm echo function: sync latency, async throughput, and a local
    /// bwrap one-shot of the same command side by side. Needs root on the nodes.
    Invoke(BenchInvokeArgs),
}

#[derive(Debug, Args)]
pub struct BenchInvokeArgs {
    /// exec (`cat` per invocation) or serve (one long-lived line echo per warm sandbox).
    #[arg(long, default_value = "exec", value_parser = parse_mode)]
    pub mode: FnMode,
    /// Concurrent callers for the sync part (each waits for its result).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// How long the sync part (and the bwrap part) runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop the sync part after this many invocations.
    #[arg(long, default_value_t = 1_000_000)]
    pub ops_max: u64,
    /// Async invocations submitted for the throughput part.
    #[arg(long, default_value_t = 2000)]
    pub async_count: u64,
    /// TCP connections shared by the callers.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Also run the same command as local bwrap one-shots.
    #[arg(long)]
    pub compare_bwrap: bool,
    /// Deploy the echo function as idempotent and call it with one payload: after the first
    /// run, every sync call is a hit answered from the ledger.
    #[arg(long)]
    pub hits: bool,
}

#[derive(Debug, Args)]
pub struct BenchKvArgs {
    /// Concurrent writers (each waits for its write before the next).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// How long to run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop after this many writes in all, even before the duration ends.
    #[arg(long, default_value_t = 5_000_000)]
    pub ops_max: u64,
    /// Size of each value.
    #[arg(long, default_value_t = 64)]
    pub value_bytes: usize,
    /// Number of distinct keys written.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// TCP connections shared by the writers.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
}

/// Runs one `skiff bench` command and prints its report.
pub(super) async fn run(config: &ClientConfig, cmd: BenchCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        BenchCmd::Invoke(args) => {
            let report = bench_invoke(config, &args).await?;
            if json {
                out(&serde_json::to_string(&report).expect("report serializes"));
            } else {
                out(&bench_invoke_text(&report));
            }
        }
        BenchCmd::Kv(args) => {
            let report = bench_kv(config, &args).await?;
            if json {
                out(&serde_json::to_string(&report).expect("report serializes"));
            } else {
                out(&bench_kv_text(&report));
            }
        }
    }
    Ok(())
}

/// What `skiff bench kv` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub clients: usize,
    pub writes: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub writes_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Drives `args.clients` concurrent writers for `args.duration` (or `args.ops_max` writes).
pub async fn bench_kv(config: &ClientConfig, args: &BenchKvArgs) -> Result<BenchReport, CliError> {
    if args.clients == 0 || args.connections == 0 || args.keys == 0 {
        return Err(CliError::usage(
            "--clients, --connections and --keys must be positive",
        ));
    }
    if args.value_bytes > skiff_proto::model::VALUE_BYTES_MAX {
        return Err(CliError::usage("--value-bytes is over the value limit"));
    }
    let clients = connected_clients(config, args.connections.min(args.clients))?;
    // Warm the connections (and learn the leader) before the clock starts.
    for c in clients.iter() {
        c.put("bench/warmup", vec![0]).await?;
    }
    let value = vec![b'x'; args.value_bytes];
    let keys = args.keys;
    let stats = bench::drive(args.clients, args.duration, args.ops_max, move |w, n| {
        let client = clients[w % clients.len()].clone();
        let value = value.clone();
        async move {
            let key = format!("bench/{:08}", n.wrapping_mul(7919) % keys);
            client.put(&key, value).await.is_ok()
        }
    })
    .await;
    Ok(BenchReport {
        clients: args.clients,
        writes: stats.ok,
        errors: stats.errors,
        elapsed_s: stats.elapsed_s,
        writes_per_s: stats.ok_per_s,
        p50_ms: stats.p50_ms,
        p99_ms: stats.p99_ms,
    })
}

fn connected_clients(config: &ClientConfig, n: usize) -> Result<Arc<Vec<Client>>, CliError> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        clients.push(Client::new(config.clone())?);
    }
    Ok(Arc::new(clients))
}

/// What `skiff bench invoke` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InvokeBenchReport {
    pub function: String,
    pub mode: String,
    /// Sync invocations, each waiting for its result.
    pub sync: bench::LoadStats,
    /// Sync invocations that ran in a warm sandbox (or, with `--hits`, were cache hits).
    pub sync_warm: u64,
    /// Async invocations submitted, and the time until every one had finished.
    pub async_submitted: u64,
    pub async_failed: u64,
    pub async_elapsed_s: f64,
    pub async_per_s: f64,
    /// The same command in a local `bwrap` one-shot, if bwrap is installed.
    pub bwrap: Option<bench::LoadStats>,
}

/// Most warm sandboxes the echo function asks for, whatever the number of callers.
const ECHO_WARM_MAX: u32 = 64;
/// The echo function's memory limit.
const ECHO_MEMORY_BYTES: u64 = 64 << 20;
/// The echo function's timeout per invocation.
const ECHO_TIMEOUT_MS: u64 = 10_000;
/// The echo function's concurrency and queue bounds: far above any load the bench makes, so
/// the bench measures the cluster and not the function's throttling.
const ECHO_MAX_CONCURRENCY: u32 = 10_000;
const ECHO_QUEUE_MAX: u32 = 100_000;
/// How long a recorded result of the idempotent echo function answers (`--hits`).
const ECHO_IDEMPOTENCY_TTL_MS: u64 = 3_600_000;
/// The pause after deploying that lets min-warm fill the pools before the clock starts.
const POOL_FILL_WAIT: Duration = Duration::from_secs(3);
/// Longest wait for the async burst to finish; tasks still running then count as not failed.
const ASYNC_FINISH_WAIT_MAX: Duration = Duration::from_secs(600);
/// How often the async part polls its tasks.
const ASYNC_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Deploys an echo function (exec `cat`, or a serve-mode line echo) with warm sandboxes,
/// then measures sync latency and async throughput, and a local bwrap one-shot of the same
/// command for comparison.
pub async fn bench_invoke(
    config: &ClientConfig,
    args: &BenchInvokeArgs,
) -> Result<InvokeBenchReport, CliError> {
    if args.clients == 0 || args.connections == 0 {
        return Err(CliError::usage(
            "--clients and --connections must be positive",
        ));
    }
    let clients = connected_clients(config, args.connections.min(args.clients))?;
    let function = deploy_echo(&clients[0], args).await?;
    // Let min-warm fill the pools, and warm each connection.
    tokio::time::sleep(POOL_FILL_WAIT).await;
    for c in clients.iter() {
        c.invoke(&function, None, b"{}".to_vec(), true).await?;
    }
    let (sync, sync_warm) = sync_calls(&clients, &function, args).await;
    // Async: submit a bounded burst, then wait until every task has finished.
    let start = Instant::now();
    let ids = async_burst(&clients, &function, args.clients, args.async_count).await;
    let failed = wait_finished(&clients[0], &function, &ids).await?;
    let async_elapsed = start.elapsed().as_secs_f64();
    let bwrap = if args.compare_bwrap {
        bwrap_one_shots(args.mode, args.duration).await
    } else {
        None
    };
    Ok(InvokeBenchReport {
        function,
        mode: args.mode.as_str().to_string(),
        sync,
        sync_warm,
        async_submitted: ids.len() as u64,
        async_failed: failed,
        async_elapsed_s: async_elapsed,
        async_per_s: ids.len() as f64 / async_elapsed,
        bwrap,
    })
}

/// Uploads and deploys the echo function of `args.mode` (idempotent with `--hits`); returns
/// its name.
async fn deploy_echo(client: &Client, args: &BenchInvokeArgs) -> Result<String, CliError> {
    let function = format!(
        "bench-echo-{}{}",
        args.mode.as_str(),
        if args.hits { "-idem" } else { "" }
    );
    let script: &[u8] = match args.mode {
        FnMode::Exec => b"exec cat\n",
        FnMode::Serve => b"while IFS= read -r l; do printf '%s\\n' \"$l\"; done\n",
    };
    let archive = deploy::single_file_archive("main.sh", script).map_err(CliError::usage)?;
    let digest = client.upload_code(&archive, |_, _| {}).await?;
    let warm = u32::try_from(args.clients)
        .unwrap_or(u32::MAX)
        .min(ECHO_WARM_MAX);
    client
        .deploy(FunctionSpec {
            name: function.clone(),
            code_digest: digest,
            entry: vec!["/bin/sh".into(), "main.sh".into()],
            mode: args.mode,
            tier: "standard".into(),
            policy: None,
            memory_bytes: ECHO_MEMORY_BYTES,
            timeout_ms: ECHO_TIMEOUT_MS,
            max_concurrency: ECHO_MAX_CONCURRENCY,
            queue_max: ECHO_QUEUE_MAX,
            min_warm: warm,
            max_attempts: 1,
            retry_backoff_ms: 0,
            data: DataGrant::default(),
            env: Vec::new(),
            idempotency: args.hits.then(|| Idempotency {
                dependencies: Vec::new(),
                ttl_ms: ECHO_IDEMPOTENCY_TTL_MS,
                cache_failures: false,
                track_reads: false,
            }),
            stages: Vec::new(),
        })
        .await?;
    Ok(function)
}

/// The sync part: `args.clients` callers each waiting for their result; an invocation counts
/// as ok if it echoed its payload. Returns the stats and how many ran warm (or were hits).
async fn sync_calls(
    clients: &Arc<Vec<Client>>,
    function: &str,
    args: &BenchInvokeArgs,
) -> (bench::LoadStats, u64) {
    let warm_count = Arc::new(AtomicU64::new(0));
    let hits = args.hits;
    let sync = {
        let (clients, function, warm_count) =
            (clients.clone(), function.to_string(), warm_count.clone());
        bench::drive(args.clients, args.duration, args.ops_max, move |w, n| {
            let client = clients[w % clients.len()].clone();
            let function = function.clone();
            let warm_count = warm_count.clone();
            async move {
                let payload = if hits {
                    b"{}".to_vec()
                } else {
                    format!("{{\"n\":{n}}}").into_bytes()
                };
                match client.invoke(&function, None, payload.clone(), true).await {
                    Ok(t) => {
                        let r = t.result.as_ref();
                        let hit = matches!(t.cache, Some(CacheOutcome::Hit { .. }));
                        if hit || r.is_some_and(|r| r.warm) {
                            warm_count.fetch_add(1, Ordering::Relaxed);
                        }
                        t.state == TaskState::Succeeded
                            && r.is_some_and(|r| r.output.trim_ascii_end() == payload.as_slice())
                    }
                    Err(_) => false,
                }
            }
        })
        .await
    };
    (sync, warm_count.load(Ordering::Relaxed))
}

/// Submits `count` async invocations spread over `workers` submitters; the ids of those the
/// cluster accepted, sorted.
async fn async_burst(
    clients: &Arc<Vec<Client>>,
    function: &str,
    workers: usize,
    count: u64,
) -> Vec<TaskId> {
    let per = count.div_ceil(workers.max(1) as u64);
    let mut handles = Vec::new();
    for w in 0..workers {
        let (clients, function) = (clients.clone(), function.to_string());
        handles.push(tokio::spawn(async move {
            let client = clients[w % clients.len()].clone();
            let mut ids = Vec::new();
            for i in 0..per {
                let n = w as u64 * per + i;
                if n >= count {
                    break;
                }
                if let Ok(t) = client
                    .invoke(
                        &function,
                        None,
                        format!("{{\"a\":{n}}}").into_bytes(),
                        false,
                    )
                    .await
                {
                    ids.push(t.id);
                }
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.extend(h.await.unwrap_or_default());
    }
    ids.sort_unstable();
    ids
}

/// Polls until every task of `ids` (sorted) has finished, or [`ASYNC_FINISH_WAIT_MAX`];
/// returns how many of the finished ones did not succeed.
async fn wait_finished(client: &Client, function: &str, ids: &[TaskId]) -> Result<u64, CliError> {
    let first = ids.iter().copied().min().unwrap_or(0);
    let deadline = Instant::now() + ASYNC_FINISH_WAIT_MAX;
    loop {
        let mut done = 0;
        let mut failed = 0;
        let filter = TaskFilter {
            function: Some(function.to_string()),
            ..Default::default()
        };
        for t in client
            .tasks_all(filter, usize::MAX)
            .await?
            .into_iter()
            .filter(|t| t.id >= first && ids.binary_search(&t.id).is_ok())
        {
            if t.state.is_finished() {
                done += 1;
                if t.state != TaskState::Succeeded {
                    failed += 1;
                }
            }
        }
        if done >= ids.len() || Instant::now() > deadline {
            return Ok(failed);
        }
        tokio::time::sleep(ASYNC_POLL_INTERVAL).await;
    }
}

/// Sequential local one-shots of `sh -c 'exec cat'` in bwrap (all namespaces, read-only
/// `/usr`), each fed one JSON line: the baseline a single host gets without skiff.
async fn bwrap_one_shots(mode: FnMode, duration: Duration) -> Option<bench::LoadStats> {
    let _ = mode;
    let probe = tokio::process::Command::new("bwrap")
        .arg("--version")
        .output()
        .await
        .ok()?;
    if !probe.status.success() {
        return None;
    }
    Some(
        bench::drive(1, duration, 100_000, |_, n| async move {
            let mut cmd = tokio::process::Command::new("bwrap");
            cmd.args([
                "--unshare-all",
                "--die-with-parent",
                "--ro-bind",
                "/usr",
                "/usr",
            ]);
            for (link, target) in [
                ("/bin", "usr/bin"),
                ("/lib", "usr/lib"),
                ("/lib64", "usr/lib64"),
            ] {
                cmd.args(["--symlink", target, link]);
            }
            cmd.args([
                "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev", "/bin/sh", "-c", "exec cat",
            ]);
            cmd.stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null());
            let Ok(mut child) = cmd.spawn() else {
                return false;
            };
            let line = format!("{{\"n\":{n}}}\n");
            if let Some(mut stdin) = child.stdin.take() {
                use tokio::io::AsyncWriteExt;
                let _ = stdin.write_all(line.as_bytes()).await;
            }
            match child.wait_with_output().await {
                Ok(o) => o.status.success() && o.stdout == line.as_bytes(),
                Err(_) => false,
            }
        })
        .await,
    )
}
