//! The `skiff` command line: argument definitions and the commands behind them.
//!
//! Every command prints data on stdout (a table or plain text, or JSON with `--json`) and a
//! one-line error on stderr when it fails, with an exit code from [`ExitCode`].
//!
//! Invariants:
//! - nothing is uploaded or changed before the arguments, the manifest and the code have been
//!   checked locally (a usage error, exit 2, changes nothing);
//! - `invoke` (synchronous) writes the function's output bytes to stdout exactly as the
//!   function produced them, and nothing else; on failure its error and log go to stderr;
//! - every listing is bounded (`--limit`, or the cluster's own bounds).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use base64::Engine;
use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::api::{
    ApiError, CacheOutcome, CreatedToken, FnMode, FunctionRecord, FunctionSpec, FunctionVersion,
    KvEntry, MissReason, NodeId, ReadConsistency, Role, StreamJob, StreamOptions, StreamSource,
    StreamState, Task, TaskFilter, TaskId, TaskState, TokenId, TokenInfo, Workers,
};
use crate::bench;
use crate::client::{Client, ClientConfig, ClientError};
use crate::deploy::{self, DeployPlan};
use crate::transport;
use skiff_raft_store::functions::{
    validate_function_name, DataGrant, ACTIVE_TASKS_MAX, FINISHED_TASKS_MAX, NODE_LEASE_MS,
};

/// Documented exit codes of `skiff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Ok = 0,
    /// The thing asked for does not exist: a key (`kv get`, `kv rm`), a function (`fn show`,
    /// `fn rm`, `invoke` of an unknown function or version), a task (`task show`).
    NotFound = 1,
    /// Bad arguments or input (a bad manifest, code that cannot be packed, an invalid spec);
    /// nothing was changed.
    Usage = 2,
    /// A precondition failed: version conflict, cluster already initialized, a deploy or code
    /// upload the cluster refused (code store or function count full, code not uploaded).
    Conflict = 3,
    /// The cluster could not be reached, has no leader, or did not answer in time; or it
    /// throttled an invocation (the function's queue is full). Retrying later may work.
    Unavailable = 4,
    /// Any other failure, including an invocation that ran and failed or timed out (its error
    /// and log are printed on stderr).
    Failure = 5,
    /// Not allowed: no token, an unknown or revoked token, or a token whose role may not make
    /// this call (e.g. a deployer deploying at tier `trusted`). Nothing was done.
    Denied = 6,
}

/// A failed command: the one-line message and the exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: ExitCode,
    pub message: String,
}

impl CliError {
    fn usage(message: impl Into<String>) -> CliError {
        CliError {
            code: ExitCode::Usage,
            message: message.into(),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        let code = match &e {
            ClientError::NoEndpoints
            | ClientError::InvalidEndpoint(_)
            | ClientError::InvalidToken(_)
            | ClientError::Invalid(_)
            | ClientError::CodeSize { .. } => ExitCode::Usage,
            ClientError::Unreachable { .. } => ExitCode::Unavailable,
            ClientError::Conflict { .. } | ClientError::Rejected { .. } => ExitCode::Conflict,
            ClientError::NotFound { .. } | ClientError::FunctionNotFound { .. } => {
                ExitCode::NotFound
            }
            ClientError::Protocol(_) => ExitCode::Failure,
            ClientError::Api(api) => match api {
                ApiError::NoLeader { .. }
                | ApiError::Timeout(_)
                | ApiError::Overloaded(_)
                | ApiError::Throttled(_)
                | ApiError::ShuttingDown => ExitCode::Unavailable,
                ApiError::InvalidArgument(_) => ExitCode::Usage,
                ApiError::NotFound(_) => ExitCode::NotFound,
                ApiError::FailedPrecondition(_) => ExitCode::Conflict,
                ApiError::Internal(_) => ExitCode::Failure,
                ApiError::Unauthenticated(_) | ApiError::PermissionDenied(_) => ExitCode::Denied,
            },
        };
        CliError {
            code,
            message: e.to_string(),
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "skiff",
    version,
    about = "Command line client of a skiff cluster"
)]
pub struct Cli {
    /// Comma-separated host:port of any nodes of the cluster.
    #[arg(
        long,
        env = "SKIFF_ENDPOINTS",
        global = true,
        default_value = "127.0.0.1:7001"
    )]
    pub endpoints: String,
    /// Bearer token for the cluster.
    #[arg(long, env = "SKIFF_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster's CA certificate (PEM): connect over TLS and check each node against it.
    /// Without it the client speaks plaintext, which a node with TLS refuses unless it allows
    /// plaintext clients (as `skiffd dev` does).
    #[arg(long, env = "SKIFF_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Cluster membership and health.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// The replicated key-value store.
    #[command(subcommand)]
    Kv(KvCmd),
    /// Functions: deploy, list, show, remove.
    #[command(name = "fn", subcommand)]
    Function(FnCmd),
    /// Invoke a function (NAME or NAME@VERSION) and print its output.
    Invoke(InvokeArgs),
    /// Invocations (tasks): state, timings, results.
    #[command(subcommand)]
    Task(TaskCmd),
    /// Stream jobs: a function over every item of a data set.
    #[command(subcommand)]
    Stream(StreamCmd),
    /// Load generators.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Bearer tokens: create (prints the secret once), list, revoke. Needs an admin token.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Make a token; prints its secret, which is shown this once and never stored.
    Create {
        /// admin, deployer or invoker (see docs/security.md).
        #[arg(long)]
        role: Role,
        /// A label for `token ls` (1-64 bytes).
        #[arg(long)]
        name: Option<String>,
    },
    /// Every token with its id, name, role, creation time and state; never a secret.
    Ls,
    /// Revoke a token: every node refuses it once it has applied the revocation.
    Revoke { id: TokenId },
}

#[derive(Debug, Subcommand)]
pub enum StreamCmd {
    /// Start a job: one invocation per item (or per batch of items) of a data set. Prints
    /// the job id; with --wait, a progress line on stderr until it ends (exit 0 if it
    /// succeeded, 5 if it failed or was cancelled).
    Start(StreamStartArgs),
    /// A job's state, counters, cursor and failed items (exit 1 if absent).
    Status { id: u64 },
    /// Every job.
    Ls,
    /// Cancel a running job: no more items are read; its queued invocations fail.
    Cancel { id: u64 },
    /// Run a job's failed items again, with the function's latest version.
    Redrive { id: u64 },
}

#[derive(Debug, Args)]
pub struct StreamStartArgs {
    /// The function to run for each item.
    pub function: String,
    /// The data set: kv:PREFIX, jsonl:PATH, csv:PATH or dir:PATH (absolute paths beneath a
    /// sources root the operator configured, as the leader sees them: the same on every node).
    #[arg(long = "from")]
    pub from: String,
    /// kv sources only: after the keys present at the start, keep streaming every key written
    /// under the prefix later, until `stream cancel`.
    #[arg(long)]
    pub follow: bool,
    /// Most items in flight at once.
    #[arg(long, default_value_t = 100)]
    pub max_concurrency: u32,
    /// Items per invocation (above 1: a JSON array in, a JSON array of results out).
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
    /// Attempts per invocation before its items count as failed.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
    /// Back-off before the second attempt, doubled for each further one.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,
    /// The job succeeds if at most this percentage of items failed (default: none may fail).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub tolerate_failures: Option<u32>,
    /// The job succeeds if at most this many items failed; past it, it fails at once.
    #[arg(long)]
    pub tolerate_failure_count: Option<u64>,
    /// Write each item's result under PREFIX + its zero-padded index: kv:PREFIX.
    #[arg(long)]
    pub results: Option<String>,
    /// Wait until the job ends, showing progress on stderr.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Initialize a new cluster: ID=ADDR,ID=ADDR,...
    Init { members: String },
    /// Nodes, leader, term, applied index, reachability and lag; workers and warm pools.
    Status,
    /// Add a node (learner first, voter once caught up).
    AddNode { id: NodeId, addr: String },
    /// Remove a node from the membership.
    RemoveNode { id: NodeId },
    /// Download a backup of the whole state (every acknowledged write) into FILE; restore it
    /// into a new cluster with `skiffd restore` (see docs/operations.md).
    Backup { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum KvCmd {
    /// Write a value; prints the new version.
    Put {
        key: String,
        /// The value (or use --file).
        value: Option<String>,
        /// Read the value from a file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Only write if the key is at this version (0: only if absent).
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Print a value (exit 1 if absent).
    Get { key: String },
    /// List keys under a prefix.
    Ls {
        #[arg(default_value = "")]
        prefix: String,
        /// Most keys to print.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
    /// Delete a key (exit 1 if absent).
    Rm {
        key: String,
        #[arg(long)]
        expect_version: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum FnCmd {
    /// Deploy a new version from a directory or a .tar (or from a manifest: -f skiff.toml);
    /// prints NAME version N.
    Deploy(Box<DeployArgs>),
    /// Functions with their latest version's settings.
    Ls,
    /// A function's kept versions with all their settings (exit 1 if absent).
    Show { name: String },
    /// Remove a function and all its versions; its queued tasks fail (exit 1 if absent).
    Rm { name: String },
    /// Forget the recorded results of an idempotent function (exit 1 if absent).
    PurgeCache { name: String },
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The function's name (with -f: replaces the manifest's `name`).
    #[arg(required_unless_present = "file")]
    pub name: Option<String>,
    /// Take everything from a manifest (TOML); paths in it are relative to its directory.
    #[arg(
        short = 'f',
        long,
        conflicts_with_all = [
            "code", "entry", "mode", "tier", "memory", "timeout", "min_warm",
            "max_concurrency", "queue_max", "max_attempts", "retry_backoff", "policy", "env",
            "data_read", "data_write", "idempotent", "deps", "idempotency_ttl",
            "cache_failures", "no_track_reads",
        ]
    )]
    pub file: Option<PathBuf>,
    /// The code: a directory (packed into a deterministic tar) or a .tar archive.
    #[arg(long, required_unless_present = "file")]
    pub code: Option<PathBuf>,
    /// The command run in /code, split on whitespace (e.g. "python3 main.py").
    #[arg(long, required_unless_present = "file")]
    pub entry: Option<String>,
    /// exec: one process per invocation; serve: a long-lived process, one JSON line per request.
    #[arg(long, default_value = deploy::DEFAULT_MODE, value_parser = parse_mode)]
    pub mode: FnMode,
    #[arg(long, default_value = deploy::DEFAULT_TIER, value_parser = ["untrusted", "standard", "trusted"])]
    pub tier: String,
    /// Memory limit; K, M and G are binary units (128M is 128 MiB). Default: 128M, or the
    /// tier's ceiling where that is lower.
    #[arg(long, value_parser = deploy::parse_size)]
    pub memory: Option<u64>,
    /// Longest run of one invocation (e.g. 30s, 5m). Default: 30s, or the tier's ceiling
    /// where that is lower (untrusted: 10s).
    #[arg(long, value_parser = deploy::parse_duration_ms)]
    pub timeout: Option<u64>,
    /// Warm sandboxes kept ready across the cluster.
    #[arg(long, default_value_t = deploy::DEFAULT_MIN_WARM)]
    pub min_warm: u32,
    /// Most invocations running at once across the cluster.
    #[arg(long, default_value_t = deploy::DEFAULT_MAX_CONCURRENCY)]
    pub max_concurrency: u32,
    /// Most invocations waiting for a slot; past it invocations are throttled.
    #[arg(long, default_value_t = deploy::DEFAULT_QUEUE_MAX)]
    pub queue_max: u32,
    /// Attempts of an asynchronous invocation before it is dead-lettered.
    #[arg(long, default_value_t = deploy::DEFAULT_MAX_ATTEMPTS)]
    pub max_attempts: u32,
    /// Pause before the second attempt, doubled for each further one.
    #[arg(long, default_value = deploy::DEFAULT_RETRY_BACKOFF, value_parser = deploy::parse_duration_ms)]
    pub retry_backoff: u64,
    /// A sandbox policy file (TOML) narrowing the tier.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// An environment variable NAME=VALUE (repeatable).
    #[arg(long, value_parser = deploy::parse_env)]
    pub env: Vec<(String, String)>,
    /// A key prefix the function may read through the data service (repeatable).
    #[arg(long)]
    pub data_read: Vec<String>,
    /// A key prefix the function may read and write through the data service (repeatable).
    #[arg(long)]
    pub data_write: Vec<String>,
    /// Skip runs whose inputs did not change (see docs/execution.md).
    #[arg(long)]
    pub idempotent: bool,
    /// A dependency of an idempotent function: kv:KEY, kv:PREFIX* or file:/PATH (repeatable;
    /// a file beneath a sources root of the nodes).
    #[arg(long = "dep")]
    pub deps: Vec<String>,
    /// How long a recorded result of an idempotent function may answer.
    #[arg(long)]
    pub idempotency_ttl: Option<String>,
    /// Cache failed runs of an idempotent function too.
    #[arg(long)]
    pub cache_failures: bool,
    /// Do not record the function's data-service reads as dependencies.
    #[arg(long)]
    pub no_track_reads: bool,
}

#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// NAME, or NAME@VERSION for a kept version other than the latest.
    pub target: String,
    /// The payload: the function's stdin (exec) or its request line (serve). Default: empty.
    #[arg(long, conflicts_with = "payload_file")]
    pub payload: Option<String>,
    /// Read the payload from a file.
    #[arg(long)]
    pub payload_file: Option<PathBuf>,
    /// Print the task id once queued instead of waiting for the result.
    #[arg(long = "async")]
    pub no_wait: bool,
    /// For an idempotent function: this key, not the payload's hash, names the cached result.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// For an idempotent function: a version token NAME=VALUE the result depends on (e.g. an
    /// ETag); repeatable.
    #[arg(long = "version-token", value_parser = deploy::parse_env)]
    pub tokens: Vec<(String, String)>,
}

/// Most tasks one `task ls` prints: every task the cluster can hold.
const TASKS_LISTED_MAX: u64 = (ACTIVE_TASKS_MAX + FINISHED_TASKS_MAX) as u64;

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// A task's state, function, node, attempts, timings, error and output (exit 1 if absent).
    Show { id: TaskId },
    /// Tasks in id order (oldest first).
    Ls {
        /// Only this function's tasks.
        #[arg(long)]
        function: Option<String>,
        /// Only tasks in this state: queued, assigned, running, succeeded, failed, timed_out.
        #[arg(long, value_parser = parse_task_state)]
        state: Option<TaskState>,
        /// Only dead-lettered tasks (asynchronous tasks that failed every attempt).
        #[arg(long)]
        dead: bool,
        /// Most tasks to print.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=TASKS_LISTED_MAX))]
        limit: u64,
    },
}

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

/// Runs a parsed command line. Returns what to print on success.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let mut config = ClientConfig::from_endpoint_list(&cli.endpoints);
    config.token = cli.token.clone();
    if let Some(ca) = &cli.ca {
        config = config
            .with_ca(ca)
            .map_err(|e| CliError::usage(e.to_string()))?;
    }
    let client = Client::new(config.clone())?;
    let json = cli.json;
    match cli.command {
        Cmd::Cluster(cmd) => cluster(&client, cmd, json).await,
        Cmd::Kv(cmd) => kv(&client, cmd, json).await,
        Cmd::Function(cmd) => functions(&client, cmd, json).await,
        Cmd::Invoke(args) => invoke(&client, args, json).await,
        Cmd::Task(cmd) => tasks(&client, cmd, json).await,
        Cmd::Bench(BenchCmd::Invoke(args)) => {
            let r = bench_invoke(&config, &args).await?;
            if json {
                out(&serde_json::to_string(&r).expect("report serializes"));
            } else {
                let s = &r.sync;
                out(&format!(
                    "{} ({}): sync clients={} invocations={} (warm {}) errors={} {:.0}/s p50={:.2}ms p99={:.2}ms | async {} in {:.2}s = {:.0}/s ({} failed)",
                    r.function, r.mode, s.workers, s.ok, r.sync_warm, s.errors, s.ok_per_s, s.p50_ms, s.p99_ms,
                    r.async_submitted, r.async_elapsed_s, r.async_per_s, r.async_failed
                ));
                if let Some(b) = &r.bwrap {
                    out(&format!(
                        "bwrap one-shot (local, sequential): runs={} errors={} p50={:.2}ms p99={:.2}ms; skiff warm p50 / bwrap p50 = {:.2}",
                        b.ok, b.errors, b.p50_ms, b.p99_ms,
                        if b.p50_ms > 0.0 { s.p50_ms / b.p50_ms } else { 0.0 }
                    ));
                }
            }
            Ok(())
        }
        Cmd::Stream(cmd) => streams(&client, cmd, json).await,
        Cmd::Token(cmd) => tokens(&client, cmd, json).await,
        Cmd::Bench(BenchCmd::Kv(args)) => {
            let report = bench_kv(&config, &args).await?;
            if json {
                out(&serde_json::to_string(&report).expect("report serializes"));
            } else {
                out(&format!(
                    "clients={} writes={} errors={} elapsed={:.2}s writes/s={:.0} p50={:.3}ms p99={:.3}ms",
                    report.clients,
                    report.writes,
                    report.errors,
                    report.elapsed_s,
                    report.writes_per_s,
                    report.p50_ms,
                    report.p99_ms
                ));
            }
            Ok(())
        }
    }
}

fn out(s: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (e.g. piped into `head`) is not an error of the command.
    let _ = writeln!(stdout, "{s}");
}

async fn tokens(client: &Client, cmd: TokenCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        TokenCmd::Create { role, name } => {
            let CreatedToken { token, secret } = client.token_create(role, name).await?;
            if json {
                out(&json!({"token": token_json(&token), "secret": secret}).to_string());
            } else {
                eprintln!(
                    "token {} ({}) created; its secret follows, shown this once:",
                    token.id, token.role
                );
                out(&secret);
            }
        }
        TokenCmd::Ls => {
            let list = client.tokens().await?;
            if json {
                let items: Vec<serde_json::Value> = list.iter().map(token_json).collect();
                out(&serde_json::Value::Array(items).to_string());
            } else {
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
                table.set_header(["id", "name", "role", "created", "state"]);
                for t in &list {
                    table.add_row([
                        t.id.to_string(),
                        t.name.clone().unwrap_or_else(|| "-".into()),
                        t.role.to_string(),
                        fmt_time(t.created_ms),
                        match t.revoked_ms {
                            Some(ms) => format!("revoked {}", fmt_time(ms)),
                            None => "active".into(),
                        },
                    ]);
                }
                out(&table.to_string());
            }
        }
        TokenCmd::Revoke { id } => {
            let token = client.token_revoke(id).await?;
            if json {
                out(&token_json(&token).to_string());
            } else {
                out(&format!("token {} revoked", token.id));
            }
        }
    }
    Ok(())
}

/// A token as `--json` shows it: never a secret.
fn token_json(t: &TokenInfo) -> serde_json::Value {
    json!({
        "id": t.id,
        "name": t.name,
        "role": t.role.as_str(),
        "created_ms": t.created_ms,
        "revoked": t.revoked,
        "revoked_ms": t.revoked_ms,
    })
}

/// Parses `1=127.0.0.1:7001,2=...` into a member map.
pub fn parse_members(s: &str) -> Result<BTreeMap<NodeId, String>, CliError> {
    let mut members = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| CliError::usage(format!("member {part:?} is not ID=HOST:PORT")))?;
        let id: NodeId = id
            .parse()
            .map_err(|_| CliError::usage(format!("member {part:?} has an invalid id {id:?}")))?;
        if id == 0 {
            return Err(CliError::usage("node id 0 is reserved; ids start at 1"));
        }
        transport::parse_endpoint(addr).map_err(CliError::usage)?;
        if members.insert(id, addr.to_string()).is_some() {
            return Err(CliError::usage(format!("node id {id} is listed twice")));
        }
    }
    if members.is_empty() {
        return Err(CliError::usage("no members given"));
    }
    let mut addrs: Vec<&String> = members.values().collect();
    addrs.sort();
    if addrs.windows(2).any(|w| w[0] == w[1]) {
        return Err(CliError::usage("two members share an address"));
    }
    Ok(members)
}

async fn cluster(client: &Client, cmd: ClusterCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        ClusterCmd::Init { members } => {
            let members = parse_members(&members)?;
            let admin = client.cluster_init(members.clone()).await?;
            if json {
                out(&json!({
                    "initialized": true,
                    "members": members,
                    "token": token_json(&admin.token),
                    "secret": admin.secret,
                })
                .to_string());
            } else {
                // The secret goes to stdout alone on its line so that scripts can capture it;
                // the explanation goes to stderr.
                eprintln!(
                    "initialized a cluster of {} nodes; its first admin token (id {}) follows, shown this once:",
                    members.len(),
                    admin.token.id
                );
                out(&admin.secret);
            }
        }
        ClusterCmd::Status => {
            let status = client.cluster_status().await?;
            // The answering node's view, so that status works without a leader too.
            let workers = client.workers_with(ReadConsistency::Local).await;
            if json {
                let mut v = serde_json::to_value(&status).expect("status serializes");
                match &workers {
                    Ok(w) => v["workers"] = serde_json::to_value(w).expect("workers serialize"),
                    Err(e) => {
                        v["workers"] = serde_json::Value::Null;
                        v["workers_error"] = json!(e.to_string());
                    }
                }
                out(&v.to_string());
            } else {
                out(&format!(
                    "leader: {}   term: {}   last log: {}   applied: {} (answered by node {})",
                    status
                        .leader
                        .map(|l| format!("node {l}"))
                        .unwrap_or_else(|| "none".into()),
                    status.term,
                    status.last_log,
                    status.last_applied,
                    status.answered_by
                ));
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
                table.set_header([
                    "id",
                    "address",
                    "role",
                    "reachable",
                    "applied",
                    "matched",
                    "lag",
                ]);
                for n in &status.nodes {
                    let role = if Some(n.id) == status.leader {
                        format!("{} (leader)", n.role)
                    } else {
                        n.role.to_string()
                    };
                    let opt =
                        |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
                    table.add_row([
                        n.id.to_string(),
                        n.addr.clone(),
                        role,
                        if n.reachable { "yes" } else { "NO" }.to_string(),
                        opt(n.last_applied),
                        opt(n.matched),
                        opt(n.lag),
                    ]);
                }
                out(&table.to_string());
                match &workers {
                    Ok(w) => out(&workers_text(w)),
                    Err(e) => out(&format!("workers: unavailable ({e})")),
                }
            }
        }
        ClusterCmd::AddNode { id, addr } => {
            client.cluster_add_node(id, &addr).await?;
            if json {
                out(&json!({"added": id, "addr": addr}).to_string());
            } else {
                out(&format!("node {id} at {addr} is a voter"));
            }
        }
        ClusterCmd::RemoveNode { id } => {
            client.cluster_remove_node(id).await?;
            if json {
                out(&json!({"removed": id}).to_string());
            } else {
                out(&format!("node {id} removed"));
            }
        }
        ClusterCmd::Backup { file } => {
            let backup = client.backup(|_, _| {}).await?;
            write_file_atomically(&file, &backup.bytes)?;
            if json {
                out(&json!({
                    "file": file.display().to_string(),
                    "bytes": backup.bytes.len(),
                    "covers_index": backup.covers_index,
                    "sha256": backup.sha256,
                })
                .to_string());
            } else {
                out(&format!(
                    "backup of {} bytes (state at log index {}, sha256 {}) written to {}",
                    backup.bytes.len(),
                    backup.covers_index,
                    backup.sha256,
                    file.display()
                ));
            }
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced, then
/// renamed: a crash never leaves a half-written file under the final name.
fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    use std::io::Write as _;
    let failed = |e: std::io::Error| CliError {
        code: ExitCode::Failure,
        message: format!("cannot write {}: {e}", path.display()),
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(failed)?;
    tmp.write_all(bytes).map_err(failed)?;
    tmp.as_file().sync_all().map_err(failed)?;
    tmp.persist(path).map_err(|e| failed(e.error))?;
    Ok(())
}

fn entry_json(e: &KvEntry) -> serde_json::Value {
    json!({
        "key": e.key,
        "value": String::from_utf8_lossy(&e.value),
        "version": e.version,
        "create_version": e.create_version,
    })
}

async fn kv(client: &Client, cmd: KvCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        KvCmd::Put {
            key,
            value,
            file,
            expect_version,
        } => {
            let bytes = match (value, file) {
                (Some(v), None) => v.into_bytes(),
                (None, Some(path)) => read_value_file(&path)?,
                _ => return Err(CliError::usage("give a VALUE or --file")),
            };
            let version = client.put_if(&key, bytes, expect_version).await?;
            if json {
                out(&json!({"key": key, "version": version}).to_string());
            } else {
                out(&version.to_string());
            }
        }
        KvCmd::Get { key } => match client.get(&key).await? {
            Some(entry) => {
                if json {
                    out(&entry_json(&entry).to_string());
                } else {
                    let mut stdout = std::io::stdout().lock();
                    let _ = stdout.write_all(&entry.value);
                    let _ = stdout.write_all(b"\n");
                }
            }
            None => {
                return Err(CliError {
                    code: ExitCode::NotFound,
                    message: format!("key {key:?} not found"),
                })
            }
        },
        KvCmd::Ls { prefix, limit } => {
            let entries = client.list_all(&prefix, limit).await?;
            if json {
                let list: Vec<_> = entries.iter().map(entry_json).collect();
                out(&serde_json::Value::Array(list).to_string());
            } else {
                for e in entries {
                    out(&format!("{}\t{}", e.key, e.version));
                }
            }
        }
        KvCmd::Rm {
            key,
            expect_version,
        } => {
            let version = client.delete(&key, expect_version).await?;
            if json {
                out(&json!({"key": key, "deleted_version": version}).to_string());
            } else {
                out(&format!("deleted {key} (was version {version})"));
            }
        }
    }
    Ok(())
}

fn read_value_file(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    let max = skiff_raft_store::model::VALUE_BYTES_MAX as u64;
    let meta = std::fs::metadata(path)
        .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
    if meta.len() > max {
        return Err(CliError::usage(format!(
            "{} is {} bytes, the value limit is {max}",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read(path).map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))
}

/// The workers section of `cluster status`: one row per node, from heartbeats.
fn workers_text(w: &Workers) -> String {
    let st = &w.stats;
    let mut text = format!(
        "workers: {} functions, {} tasks active ({} queued), {} finished, {} code archives ({})\n",
        st.functions,
        st.tasks_active,
        st.tasks_queued,
        st.tasks_finished,
        st.code_blobs,
        fmt_bytes(st.code_bytes)
    );
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_header([
        "node",
        "heartbeat",
        "load/slots",
        "memory budget",
        "warm memory",
        "warm pools",
    ]);
    /// Warm pools listed per node before "+N more".
    const POOLS_SHOWN: usize = 4;
    for n in &w.nodes {
        let age_ms = w.now_ms.saturating_sub(n.last_heartbeat_ms);
        let mut heartbeat = format!("{:.1}s ago", age_ms as f64 / 1000.0);
        if age_ms >= NODE_LEASE_MS {
            heartbeat.push_str(" (lease lost)");
        }
        let load = w
            .load
            .iter()
            .find(|(id, _)| *id == n.id)
            .map_or(0, |(_, l)| *l);
        let mut pools: Vec<String> = n
            .warm
            .iter()
            .filter(|p| p.idle > 0)
            .map(|p| format!("{}@{}×{}", p.function, p.version, p.idle))
            .collect();
        if pools.len() > POOLS_SHOWN {
            let more = pools.len() - POOLS_SHOWN;
            pools.truncate(POOLS_SHOWN);
            pools.push(format!("+{more} more"));
        }
        table.add_row([
            n.id.to_string(),
            heartbeat,
            format!("{load}/{}", n.slots),
            fmt_bytes(n.memory_budget_bytes),
            fmt_bytes(n.warm_memory_bytes),
            if pools.is_empty() {
                "-".to_string()
            } else {
                pools.join(" ")
            },
        ]);
    }
    text.push_str(&table.to_string());
    text
}

fn parse_mode(s: &str) -> Result<FnMode, String> {
    s.parse()
}

/// Parses a task state as `TaskState::as_str` writes it.
pub fn parse_task_state(s: &str) -> Result<TaskState, String> {
    const STATES: [TaskState; 6] = [
        TaskState::Queued,
        TaskState::Assigned,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::TimedOut,
    ];
    let wanted = s.replace('-', "_");
    STATES
        .into_iter()
        .find(|st| st.as_str() == wanted)
        .ok_or_else(|| {
            format!(
                "unknown task state {s:?} (queued, assigned, running, succeeded, failed or timed_out)"
            )
        })
}

/// Parses `NAME` or `NAME@VERSION` (versions start at 1).
pub fn parse_target(s: &str) -> Result<(String, Option<u64>), CliError> {
    let (name, version) = match s.rsplit_once('@') {
        Some((name, v)) => match v.parse::<u64>() {
            Ok(v) if v > 0 => (name, Some(v)),
            _ => {
                return Err(CliError::usage(format!(
                    "bad version {v:?} in {s:?}: NAME@VERSION takes a version from 1 up"
                )))
            }
        },
        None => (s, None),
    };
    validate_function_name(name).map_err(CliError::usage)?;
    Ok((name.to_string(), version))
}

/// The deploy the arguments describe (flags or a manifest), checked locally.
pub fn deploy_plan(args: DeployArgs) -> Result<DeployPlan, CliError> {
    if let Some(file) = &args.file {
        return deploy::read_manifest(file, args.name).map_err(CliError::usage);
    }
    let missing = |what: &str| CliError::usage(format!("{what} is required without -f"));
    let entry = args.entry.ok_or_else(|| missing("--entry"))?;
    let policy = match &args.policy {
        Some(path) => Some(deploy::read_policy(path).map_err(CliError::usage)?),
        None => None,
    };
    let plan = DeployPlan {
        code: args.code.ok_or_else(|| missing("--code"))?,
        spec: FunctionSpec {
            name: args.name.ok_or_else(|| missing("NAME"))?,
            code_digest: String::new(),
            entry: deploy::split_entry(&entry),
            mode: args.mode,
            memory_bytes: args
                .memory
                .unwrap_or_else(|| deploy::default_memory_bytes(&args.tier)),
            timeout_ms: args
                .timeout
                .unwrap_or_else(|| deploy::default_timeout_ms(&args.tier)),
            tier: args.tier,
            policy,
            max_concurrency: args.max_concurrency,
            queue_max: args.queue_max,
            min_warm: args.min_warm,
            max_attempts: args.max_attempts,
            retry_backoff_ms: args.retry_backoff,
            data: DataGrant {
                read_prefixes: args.data_read,
                write_prefixes: args.data_write,
            },
            env: args.env,
            idempotency: deploy::idempotency_settings(
                args.idempotent,
                &args.deps,
                args.idempotency_ttl.as_deref(),
                args.cache_failures,
                !args.no_track_reads,
            )
            .map_err(CliError::usage)?,
            stages: Vec::new(),
        },
    };
    plan.validate().map_err(CliError::usage)?;
    Ok(plan)
}

/// Uploads larger than this show a progress line (on a terminal).
const PROGRESS_BYTES_MIN: u64 = 4 * 1024 * 1024;

/// A progress line on stderr for a code upload, redrawn in place.
struct UploadProgress {
    enabled: bool,
    drawn: bool,
    last: Instant,
}

impl UploadProgress {
    fn new(total: u64) -> UploadProgress {
        UploadProgress {
            enabled: total > PROGRESS_BYTES_MIN && std::io::stderr().is_terminal(),
            drawn: false,
            last: Instant::now(),
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.enabled || (done < total && self.last.elapsed() < Duration::from_millis(100)) {
            return;
        }
        self.last = Instant::now();
        self.drawn = true;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let _ = write!(
            std::io::stderr(),
            "\ruploading code: {:.1} / {:.1} MiB",
            mib(done),
            mib(total)
        );
    }

    fn finish(&self) {
        if self.drawn {
            let _ = writeln!(std::io::stderr());
        }
    }
}

async fn functions(client: &Client, cmd: FnCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        FnCmd::Deploy(args) => {
            let plan = deploy_plan(*args)?;
            let archive = deploy::read_code(&plan.code).map_err(CliError::usage)?;
            let bytes = archive.len() as u64;
            let mut progress = UploadProgress::new(bytes);
            let digest = client
                .upload_code(&archive, |done, total| progress.update(done, total))
                .await;
            progress.finish();
            let digest = digest?;
            let version = client.deploy(plan.with_digest(&digest)).await?;
            if json {
                out(&json!({
                    "name": plan.spec.name,
                    "version": version,
                    "digest": digest,
                    "bytes": bytes,
                })
                .to_string());
            } else {
                out(&format!("{} version {version}", plan.spec.name));
            }
        }
        FnCmd::Ls => {
            let list = client.functions().await?;
            let latest: Vec<(&FunctionRecord, &FunctionVersion)> = list
                .iter()
                .filter_map(|f| f.latest().map(|v| (f, v)))
                .collect();
            if json {
                let items: Vec<serde_json::Value> = latest
                    .iter()
                    .map(|(f, v)| {
                        let mut item = version_json(v);
                        item.insert("name".into(), json!(f.name));
                        item.insert("latest".into(), json!(f.latest));
                        serde_json::Value::Object(item)
                    })
                    .collect();
                out(&serde_json::Value::Array(items).to_string());
            } else {
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
                table.set_header([
                    "name",
                    "version",
                    "mode",
                    "tier",
                    "memory",
                    "timeout",
                    "max concurrency",
                    "min warm",
                ]);
                for (f, v) in latest {
                    table.add_row([
                        f.name.clone(),
                        f.latest.to_string(),
                        mode_text(&v.spec),
                        v.spec.tier.clone(),
                        fmt_bytes(v.spec.memory_bytes),
                        fmt_ms(v.spec.timeout_ms),
                        v.spec.max_concurrency.to_string(),
                        v.spec.min_warm.to_string(),
                    ]);
                }
                out(&table.to_string());
            }
        }
        FnCmd::Show { name } => {
            let Some(f) = client.function(&name).await? else {
                return Err(ClientError::FunctionNotFound { name }.into());
            };
            if json {
                let versions: Vec<serde_json::Value> = f
                    .versions
                    .iter()
                    .map(|v| serde_json::Value::Object(version_json(v)))
                    .collect();
                out(&json!({
                    "name": f.name,
                    "latest": f.latest,
                    "created_ms": f.created_ms,
                    "versions": versions,
                })
                .to_string());
            } else {
                out(&function_text(&f));
            }
        }
        FnCmd::Rm { name } => {
            client.remove_function(&name).await?;
            if json {
                out(&json!({"removed": name}).to_string());
            } else {
                out(&format!("removed function {name}"));
            }
        }
        FnCmd::PurgeCache { name } => {
            let entries = client.purge_cache(&name).await?;
            if json {
                out(&json!({"function": name, "purged": entries}).to_string());
            } else {
                out(&format!("forgot {entries} cached results of {name}"));
            }
        }
    }
    Ok(())
}

/// One function version's settings as a JSON object.
fn version_json(v: &FunctionVersion) -> serde_json::Map<String, serde_json::Value> {
    let s = &v.spec;
    let env: serde_json::Map<String, serde_json::Value> =
        s.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let value = json!({
        "version": v.version,
        "deployed_ms": v.deployed_ms,
        "code_digest": s.code_digest,
        "entry": s.entry,
        "mode": s.mode.as_str(),
        "tier": s.tier,
        "memory_bytes": s.memory_bytes,
        "timeout_ms": s.timeout_ms,
        "max_concurrency": s.max_concurrency,
        "queue_max": s.queue_max,
        "min_warm": s.min_warm,
        "max_attempts": s.max_attempts,
        "retry_backoff_ms": s.retry_backoff_ms,
        "policy": s.policy,
        "data_read": s.data.read_prefixes,
        "data_write": s.data.write_prefixes,
        "env": env,
        "stages": s.stages.iter().map(stage_json).collect::<Vec<_>>(),
    });
    match value {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("json! of an object literal is an object"),
    }
}

/// One stage of a staged function as a JSON object.
fn stage_json(stage: &crate::api::StageSpec) -> serde_json::Value {
    let env: serde_json::Map<String, serde_json::Value> = stage
        .env
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "name": stage.name,
        "entry": stage.entry,
        "tier": stage.tier,
        "policy": stage.policy,
        "data_read": stage.data.read_prefixes,
        "data_write": stage.data.write_prefixes,
        "env": env,
    })
}

/// The mode column: `exec`, `serve`, or `exec, N stages`.
fn mode_text(spec: &FunctionSpec) -> String {
    if spec.is_staged() {
        format!("{}, {} stages", spec.mode.as_str(), spec.stages.len())
    } else {
        spec.mode.as_str().to_string()
    }
}

/// The policy row: its size, or `-`.
fn policy_text(policy: &Option<String>) -> String {
    policy
        .as_ref()
        .map_or("-".to_string(), |p| format!("{} bytes", p.len()))
}

/// `fn show` for people: every kept version, newest first.
fn function_text(f: &FunctionRecord) -> String {
    let mut text = format!(
        "function {} (latest version {}, created {})\n",
        f.name,
        f.latest,
        fmt_time(f.created_ms)
    );
    for v in f.versions.iter().rev() {
        let s = &v.spec;
        let latest = if v.version == f.latest {
            " (latest)"
        } else {
            ""
        };
        let list = |items: &[String]| {
            if items.is_empty() {
                "-".to_string()
            } else {
                items.join(" ")
            }
        };
        let env: Vec<String> = s.env.iter().map(|(k, _)| k.clone()).collect();
        text.push_str(&format!(
            "\nversion {}{latest}, deployed {}\n",
            v.version,
            fmt_time(v.deployed_ms)
        ));
        let mut rows = vec![
            ("code", format!("sha256 {}", s.code_digest)),
            ("entry", s.entry.join(" ")),
            ("mode", mode_text(s)),
            ("tier", s.tier.clone()),
            ("memory", fmt_bytes(s.memory_bytes)),
            ("timeout", fmt_ms(s.timeout_ms)),
            ("max concurrency", s.max_concurrency.to_string()),
            ("queue max", s.queue_max.to_string()),
            ("min warm", s.min_warm.to_string()),
            (
                "retries",
                format!(
                    "{} attempts, back-off {}",
                    s.max_attempts,
                    fmt_ms(s.retry_backoff_ms)
                ),
            ),
            ("data read", list(&s.data.read_prefixes)),
            ("data write", list(&s.data.write_prefixes)),
            ("env", list(&env)),
            ("policy", policy_text(&s.policy)),
        ];
        if s.is_staged() {
            // The per-sandbox settings are the stages'; the function has none of its own.
            rows.retain(|(k, _)| {
                !matches!(*k, "entry" | "data read" | "data write" | "env" | "policy")
            });
        }
        for (k, v) in rows {
            text.push_str(&format!("  {k:<16} {v}\n"));
        }
        for (i, stage) in s.stages.iter().enumerate() {
            let env: Vec<String> = stage.env.iter().map(|(k, _)| k.clone()).collect();
            text.push_str(&format!("  stage {} {}\n", i + 1, stage.name));
            for (k, v) in [
                ("entry", stage.entry.join(" ")),
                ("tier", stage.tier.clone()),
                ("data read", list(&stage.data.read_prefixes)),
                ("data write", list(&stage.data.write_prefixes)),
                ("env", list(&env)),
                ("policy", policy_text(&stage.policy)),
            ] {
                text.push_str(&format!("    {k:<14} {v}\n"));
            }
        }
    }
    text.truncate(text.trim_end().len());
    text
}

async fn invoke(client: &Client, args: InvokeArgs, json: bool) -> Result<(), CliError> {
    let (name, version) = parse_target(&args.target)?;
    let payload = match (args.payload, args.payload_file) {
        (Some(p), None) => p.into_bytes(),
        (None, Some(path)) => deploy::read_payload(&path).map_err(CliError::usage)?,
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => return Err(CliError::usage("give --payload or --payload-file")),
    };
    let options = crate::client::InvokeOptions {
        idempotency_key: args.idempotency_key,
        tokens: args.tokens,
    };
    let task = client
        .invoke_with(&name, version, payload, !args.no_wait, options)
        .await?;
    if let (Some(cache), false) = (&task.cache, json) {
        // Hit or miss goes to stderr, so stdout stays the function's output.
        eprintln!("{}", cache_text(cache));
    }
    if args.no_wait {
        if json {
            out(&task_json(&task, false).to_string());
        } else {
            out(&task.id.to_string());
        }
        return Ok(());
    }
    if json {
        out(&task_json(&task, true).to_string());
    }
    match (task.state, &task.result) {
        (TaskState::Succeeded, Some(result)) => {
            if !json {
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(&result.output);
                let _ = stdout.flush();
            }
            Ok(())
        }
        (TaskState::Failed | TaskState::TimedOut, result) => {
            if !json {
                if let Some(r) = result.as_ref().filter(|r| !r.log.is_empty()) {
                    let mut stderr = std::io::stderr().lock();
                    let _ = stderr.write_all(&r.log);
                    if !r.log.ends_with(b"\n") {
                        let _ = stderr.write_all(b"\n");
                    }
                }
            }
            Err(CliError {
                code: ExitCode::Failure,
                message: failure_message(&task),
            })
        }
        (state, _) => Err(CliError {
            code: ExitCode::Failure,
            message: format!(
                "task {} is {} without a result; see `skiff task show {}`",
                task.id,
                state.as_str(),
                task.id
            ),
        }),
    }
}

/// One line saying why a finished task did not succeed.
fn failure_message(task: &Task) -> String {
    let what = format!("task {} ({}@{})", task.id, task.function, task.version);
    let result = task.result.as_ref();
    let error = result.and_then(|r| r.error.as_deref()).map(one_line);
    let exit = result.and_then(|r| r.exit_code);
    match (task.state, error, exit) {
        (TaskState::TimedOut, error, _) => format!(
            "{what} timed out after {}{}",
            fmt_ms(task.timeout_ms),
            error.map(|e| format!(": {e}")).unwrap_or_default()
        ),
        (_, Some(e), _) => format!("{what} failed: {e}"),
        (_, None, Some(code)) => format!("{what} failed: exited with code {code}"),
        (_, None, None) => format!("{what} failed"),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn tasks(client: &Client, cmd: TaskCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        TaskCmd::Show { id } => {
            let Some(task) = client.task(id).await? else {
                return Err(CliError {
                    code: ExitCode::NotFound,
                    message: format!("task {id} not found (finished tasks are kept for an hour)"),
                });
            };
            if json {
                out(&task_json(&task, true).to_string());
            } else {
                out(&task_text(&task));
            }
        }
        TaskCmd::Ls {
            function,
            state,
            dead,
            limit,
        } => {
            if let Some(f) = &function {
                validate_function_name(f).map_err(CliError::usage)?;
            }
            let filter = TaskFilter {
                function,
                state,
                dead_letter: dead,
            };
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            let list = client.tasks_all(filter, limit).await?;
            if json {
                let items: Vec<serde_json::Value> =
                    list.iter().map(|t| task_json(t, false)).collect();
                out(&serde_json::Value::Array(items).to_string());
            } else {
                let mut table = comfy_table::Table::new();
                table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
                table.set_header([
                    "id",
                    "function",
                    "state",
                    "attempts",
                    "node",
                    "submitted",
                    "wall",
                ]);
                for t in &list {
                    let mut state = t.state.as_str().to_string();
                    if t.dead_letter {
                        state.push_str(" (dead)");
                    }
                    table.add_row([
                        t.id.to_string(),
                        format!("{}@{}", t.function, t.version),
                        state,
                        t.attempts.to_string(),
                        t.node.map_or("-".to_string(), |n| n.to_string()),
                        fmt_time(t.submitted_ms),
                        t.result
                            .as_ref()
                            .map_or("-".to_string(), |r| fmt_ms(r.wall_ms)),
                    ]);
                }
                out(&table.to_string());
            }
        }
    }
    Ok(())
}

/// A task as JSON. `full` adds the payload, output and log: as `payload`, `output`, `log`
/// when they are UTF-8, otherwise as base64 under `payload_b64`, `output_b64`, `log_b64`
/// (with the plain key null).
/// One line saying whether an idempotent invocation ran, and why.
pub fn cache_text(c: &CacheOutcome) -> String {
    match c {
        CacheOutcome::Hit { source_task } => {
            format!("cache hit: the result of task {source_task}, nothing ran")
        }
        CacheOutcome::Joined { task } => {
            format!("joined: an identical invocation (task {task}) was running")
        }
        CacheOutcome::Miss { reason } => format!("cache miss: {reason}"),
    }
}

fn cache_json(c: &CacheOutcome) -> serde_json::Value {
    match c {
        CacheOutcome::Hit { source_task } => json!({"hit": true, "source_task": source_task}),
        CacheOutcome::Joined { task } => json!({"hit": false, "joined": task}),
        CacheOutcome::Miss { reason } => {
            let kind = match reason {
                MissReason::FirstRun => "first_run",
                MissReason::CodeChanged { .. } => "code_changed",
                MissReason::PayloadChanged => "payload_changed",
                MissReason::DependencyChanged { .. } => "dependency_changed",
                MissReason::Expired => "expired",
                MissReason::PreviousRunFailed => "previous_run_failed",
                MissReason::PreviousRunLost => "previous_run_lost",
            };
            let mut v = json!({"hit": false, "reason": kind, "detail": reason.to_string()});
            if let MissReason::DependencyChanged { dependency, .. } = reason {
                v["dependency"] = json!(dependency);
            }
            v
        }
    }
}

pub fn task_json(t: &Task, full: bool) -> serde_json::Value {
    let r = t.result.as_ref();
    let mut v = json!({
        "id": t.id,
        "function": t.function,
        "version": t.version,
        "state": t.state.as_str(),
        "sync": t.sync,
        "dead_letter": t.dead_letter,
        "node": t.node,
        "warm": r.map(|r| if r.warm { "warm" } else { "cold" }),
        "attempts": t.attempts,
        "failures": t.failures,
        "exit_code": r.and_then(|r| r.exit_code),
        "error": r.and_then(|r| r.error.clone()),
        "timings": {
            "submitted_ms": t.submitted_ms,
            "assigned_ms": t.assigned_ms,
            "started_ms": t.started_ms,
            "finished_ms": t.finished_ms,
            "wall_ms": r.map(|r| r.wall_ms),
            "cpu_ms": r.map(|r| r.cpu_ms),
        },
        "timeout_ms": t.timeout_ms,
        "peak_memory_bytes": r.map(|r| r.peak_memory_bytes),
        "payload_bytes": t.payload.len(),
        "output_bytes": r.map(|r| r.output.len()),
        "cache": t.cache.as_ref().map(cache_json),
        "request_id": t.request_id.map(|r| r.to_string()),
    });
    if full {
        put_bytes(&mut v, "payload", Some(&t.payload));
        put_bytes(&mut v, "output", r.map(|r| &r.output));
        put_bytes(&mut v, "log", r.map(|r| &r.log));
    }
    v
}

fn put_bytes(v: &mut serde_json::Value, key: &str, bytes: Option<&Vec<u8>>) {
    match bytes.map(|b| std::str::from_utf8(b).map_err(|_| b)) {
        None => v[key] = serde_json::Value::Null,
        Some(Ok(text)) => v[key] = json!(text),
        Some(Err(raw)) => {
            v[key] = serde_json::Value::Null;
            v[format!("{key}_b64")] = json!(base64::engine::general_purpose::STANDARD.encode(raw));
        }
    }
}

/// Bytes of output and log shown by `task show`.
const PREVIEW_BYTES: usize = 1024;

/// `task show` for people.
fn task_text(t: &Task) -> String {
    let r = t.result.as_ref();
    let mut state = t.state.as_str().to_string();
    if t.dead_letter {
        state.push_str(" (dead-lettered)");
    }
    let since = |ms: Option<u64>| {
        ms.map_or("-".to_string(), |ms| {
            format!("+{}", fmt_ms(ms.saturating_sub(t.submitted_ms)))
        })
    };
    let mut rows: Vec<(&str, String)> = vec![
        ("state", state),
        ("function", format!("{}@{}", t.function, t.version)),
        (
            "node",
            match (t.node, r) {
                (Some(n), Some(r)) => format!("{n} ({})", if r.warm { "warm" } else { "cold" }),
                (Some(n), None) => n.to_string(),
                (None, _) => "-".to_string(),
            },
        ),
        (
            "attempts",
            format!(
                "{} ({} failed){}",
                t.attempts,
                t.failures,
                if t.sync { ", sync" } else { ", async" }
            ),
        ),
        ("submitted", fmt_time(t.submitted_ms)),
        ("assigned", since(t.assigned_ms)),
        ("started", since(t.started_ms)),
        ("finished", since(t.finished_ms)),
    ];
    if let Some(r) = r {
        rows.push((
            "run",
            format!(
                "wall {}, cpu {}, peak memory {}",
                fmt_ms(r.wall_ms),
                fmt_ms(r.cpu_ms),
                fmt_bytes(r.peak_memory_bytes)
            ),
        ));
        if let Some(code) = r.exit_code {
            rows.push(("exit code", code.to_string()));
        }
        if let Some(e) = &r.error {
            rows.push(("error", one_line(e)));
        }
    }
    let mut text = format!("task {}\n", t.id);
    for (k, v) in rows {
        text.push_str(&format!("  {k:<10} {v}\n"));
    }
    if let Some(r) = r {
        for (what, bytes) in [("output", &r.output), ("log", &r.log)] {
            if !bytes.is_empty() {
                text.push_str(&format!(
                    "{what} ({} bytes):\n{}\n",
                    bytes.len(),
                    preview(bytes)
                ));
            }
        }
    }
    text.truncate(text.trim_end().len());
    text
}

/// The start of `bytes` as text: at most [`PREVIEW_BYTES`], invalid UTF-8 replaced, control
/// characters other than newline and tab escaped so a terminal shows them harmlessly.
fn preview(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(PREVIEW_BYTES)];
    let mut text: String = String::from_utf8_lossy(shown)
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    if bytes.len() > shown.len() {
        text.push_str(&format!("… ({} more bytes)", bytes.len() - shown.len()));
    }
    text
}

/// Bytes in binary units: exact values as integers (`128M`), others with one decimal.
fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (size, unit) in UNITS {
        if bytes >= size {
            let whole = bytes / size;
            return if whole * size == bytes {
                format!("{whole}{unit}")
            } else {
                format!("{:.1}{unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes}B")
}

fn fmt_ms(ms: u64) -> String {
    if ms == 0 {
        return "0ms".to_string();
    }
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

/// Milliseconds since the Unix epoch as an RFC 3339 time (UTC, seconds).
fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
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
    if args.value_bytes > skiff_raft_store::model::VALUE_BYTES_MAX {
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

fn connected_clients(
    config: &ClientConfig,
    n: usize,
) -> Result<std::sync::Arc<Vec<Client>>, CliError> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        clients.push(Client::new(config.clone())?);
    }
    Ok(std::sync::Arc::new(clients))
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

/// Deploys an echo function (exec `cat`, or a serve-mode line echo) with warm sandboxes,
/// then measures sync latency and async throughput, and a local bwrap one-shot of the same
/// command for comparison.
pub async fn bench_invoke(
    config: &ClientConfig,
    args: &BenchInvokeArgs,
) -> Result<InvokeBenchReport, CliError> {
    use crate::api::{DataGrant, FunctionSpec};
    if args.clients == 0 || args.connections == 0 {
        return Err(CliError::usage(
            "--clients and --connections must be positive",
        ));
    }
    let clients = connected_clients(config, args.connections.min(args.clients))?;
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
    let client = &clients[0];
    let digest = client.upload_code(&archive, |_, _| {}).await?;
    let warm = u32::try_from(args.clients).unwrap_or(u32::MAX).min(64);
    client
        .deploy(FunctionSpec {
            name: function.clone(),
            code_digest: digest,
            entry: vec!["/bin/sh".into(), "main.sh".into()],
            mode: args.mode,
            tier: "standard".into(),
            policy: None,
            memory_bytes: 64 << 20,
            timeout_ms: 10_000,
            max_concurrency: 10_000,
            queue_max: 100_000,
            min_warm: warm,
            max_attempts: 1,
            retry_backoff_ms: 0,
            data: DataGrant::default(),
            env: Vec::new(),
            idempotency: args.hits.then(|| crate::api::Idempotency {
                dependencies: Vec::new(),
                ttl_ms: 3_600_000,
                cache_failures: false,
                track_reads: false,
            }),
            stages: Vec::new(),
        })
        .await?;
    // Let min-warm fill the pools, and warm each connection.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for c in clients.iter() {
        c.invoke(&function, None, b"{}".to_vec(), true).await?;
    }
    let warm_count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let hits = args.hits;
    let sync = {
        let (clients, function, warm_count) =
            (clients.clone(), function.clone(), warm_count.clone());
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
                        let hit = matches!(t.cache, Some(crate::api::CacheOutcome::Hit { .. }));
                        if hit || r.is_some_and(|r| r.warm) {
                            warm_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    // Async: submit a bounded burst, then wait until every task has finished.
    let n_async = args.async_count;
    let start = Instant::now();
    let ids = {
        let (clients, function) = (clients.clone(), function.clone());
        let per = n_async.div_ceil(args.clients.max(1) as u64);
        let mut handles = Vec::new();
        for w in 0..args.clients {
            let (clients, function) = (clients.clone(), function.clone());
            handles.push(tokio::spawn(async move {
                let client = clients[w % clients.len()].clone();
                let mut ids = Vec::new();
                for i in 0..per {
                    let n = w as u64 * per + i;
                    if n >= n_async {
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
    };
    let first = ids.iter().copied().min().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(600);
    let failed = loop {
        let mut done = 0;
        let mut failed = 0;
        let filter = crate::api::TaskFilter {
            function: Some(function.clone()),
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
            break failed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
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
        sync_warm: warm_count.load(std::sync::atomic::Ordering::Relaxed),
        async_submitted: ids.len() as u64,
        async_failed: failed,
        async_elapsed_s: async_elapsed,
        async_per_s: ids.len() as f64 / async_elapsed,
        bwrap,
    })
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

// ----- streams -------------------------------------------------------------------------------

/// How often `stream start --wait` refreshes its progress line.
const STREAM_PROGRESS_INTERVAL: Duration = Duration::from_millis(300);

fn stream_json(j: &StreamJob) -> serde_json::Value {
    serde_json::to_value(j).expect("stream jobs serialize")
}

fn stream_summary(j: &StreamJob) -> String {
    let c = &j.counters;
    format!(
        "stream {} {} fn={}@{} from={} done={}/{} succeeded={} failed={} running={} retried={} duplicates={} hits={}{}",
        j.id,
        j.state.as_str(),
        j.function,
        j.version,
        j.source.spec(),
        c.succeeded + c.failed,
        c.total.map_or("?".to_string(), |t| t.to_string()),
        c.succeeded,
        c.failed,
        c.running,
        c.retried,
        c.duplicates,
        c.idempotent_hits,
        j.reason
            .as_ref()
            .map(|r| format!(" reason={r:?}"))
            .unwrap_or_default()
    )
}

fn format_eta(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// Polls a job until it ends, with a progress line on stderr; the final job.
async fn wait_stream(client: &Client, id: u64) -> Result<StreamJob, CliError> {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut first_done: Option<(Instant, u64)> = None;
    let mut last_line = Instant::now() - Duration::from_secs(60);
    loop {
        let job = client.stream(id).await?.ok_or_else(|| CliError {
            code: ExitCode::NotFound,
            message: format!("stream {id} does not exist"),
        })?;
        let c = &job.counters;
        let done = c.succeeded + c.failed;
        let now = Instant::now();
        let (t0, d0) = *first_done.get_or_insert((now, done));
        let elapsed = now.duration_since(t0).as_secs_f64();
        let rate = if elapsed > 0.0 {
            (done - d0) as f64 / elapsed
        } else {
            0.0
        };
        let eta = match c.total {
            Some(total) if rate > 0.0 => {
                format!(" ETA {}", format_eta((total - done) as f64 / rate))
            }
            _ => String::new(),
        };
        let line = format!(
            "stream {id}: {done}/{} items ({} failed, {} in flight) {rate:.0} items/s{eta}",
            c.total.map_or("?".to_string(), |t| t.to_string()),
            c.failed,
            c.running,
        );
        // On a terminal the line is redrawn in place; in a log, one line every few seconds.
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else if now.duration_since(last_line) >= Duration::from_secs(5) || job.state.is_finished()
        {
            eprintln!("{line}");
            last_line = now;
        }
        if job.state.is_finished() {
            if tty {
                eprintln!(
                    " — {} in {:.1}s",
                    job.state.as_str(),
                    started.elapsed().as_secs_f64()
                );
            }
            return Ok(job);
        }
        tokio::time::sleep(STREAM_PROGRESS_INTERVAL).await;
    }
}

async fn streams(client: &Client, cmd: StreamCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        StreamCmd::Start(args) => {
            validate_function_name(&args.function).map_err(CliError::usage)?;
            let mut source: StreamSource = args.from.parse().map_err(CliError::usage)?;
            if args.follow {
                match &mut source {
                    StreamSource::Kv { follow, .. } => *follow = true,
                    _ => return Err(CliError::usage("--follow applies to kv: sources only")),
                }
            }
            let results_prefix = match &args.results {
                None => None,
                Some(r) => Some(
                    r.strip_prefix("kv:")
                        .ok_or_else(|| CliError::usage(format!("--results {r:?}: use kv:PREFIX")))?
                        .to_string(),
                ),
            };
            let options = StreamOptions {
                max_concurrency: args.max_concurrency,
                batch: args.batch,
                max_attempts: args.max_attempts,
                retry_backoff_ms: u64::try_from(args.retry_backoff.as_millis()).unwrap_or(u64::MAX),
                tolerated_failure_pct: args.tolerate_failures,
                tolerated_failure_count: args.tolerate_failure_count,
                results_prefix,
            };
            options.validate().map_err(CliError::usage)?;
            let id = client.stream_start(&args.function, source, options).await?;
            if !args.wait {
                if json {
                    out(&json!({"stream": id}).to_string());
                } else {
                    out(&id.to_string());
                }
                return Ok(());
            }
            let job = wait_stream(client, id).await?;
            if json {
                out(&stream_json(&job).to_string());
            } else {
                out(&stream_summary(&job));
            }
            match job.state {
                StreamState::Succeeded => Ok(()),
                state => Err(CliError {
                    code: ExitCode::Failure,
                    message: format!(
                        "stream {id} {}: {}",
                        state.as_str(),
                        job.reason.unwrap_or_default()
                    ),
                }),
            }
        }
        StreamCmd::Status { id } => {
            let job = client.stream(id).await?.ok_or_else(|| CliError {
                code: ExitCode::NotFound,
                message: format!("stream {id} does not exist"),
            })?;
            if json {
                out(&stream_json(&job).to_string());
                return Ok(());
            }
            out(&stream_summary(&job));
            out(&format!(
                "cursor={:?} next_item={} exhausted={} in_flight_invocations={}",
                job.cursor,
                job.next_item,
                job.exhausted,
                job.window.len()
            ));
            if job.counters.failed_dropped > 0 {
                out(&format!(
                    "{} failed items were not kept (past the bound) and cannot be redriven",
                    job.counters.failed_dropped
                ));
            }
            for f in &job.failed_items {
                let payload = f
                    .payload
                    .as_ref()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .unwrap_or_else(|| "-".into());
                out(&format!(
                    "failed item {}: {} (item: {payload})",
                    f.index, f.error
                ));
            }
            Ok(())
        }
        StreamCmd::Ls => {
            let jobs = client.streams().await?;
            if json {
                let list: Vec<serde_json::Value> = jobs.iter().map(stream_json).collect();
                out(&serde_json::Value::Array(list).to_string());
                return Ok(());
            }
            let mut table = comfy_table::Table::new();
            table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
            table.set_header(vec![
                "ID", "STATE", "FUNCTION", "SOURCE", "DONE", "TOTAL", "FAILED", "RUNNING",
            ]);
            for j in &jobs {
                let c = &j.counters;
                table.add_row(vec![
                    j.id.to_string(),
                    j.state.as_str().to_string(),
                    format!("{}@{}", j.function, j.version),
                    j.source.spec(),
                    (c.succeeded + c.failed).to_string(),
                    c.total.map_or("?".to_string(), |t| t.to_string()),
                    c.failed.to_string(),
                    c.running.to_string(),
                ]);
            }
            out(&table.to_string());
            Ok(())
        }
        StreamCmd::Cancel { id } => {
            client.stream_cancel(id).await?;
            if json {
                out(&json!({"cancelled": id}).to_string());
            } else {
                out(&format!("stream {id} cancelled"));
            }
            Ok(())
        }
        StreamCmd::Redrive { id } => {
            let n = client.stream_redrive(id).await?;
            if json {
                out(&json!({"stream": id, "redriven": n}).to_string());
            } else {
                out(&format!("stream {id}: {n} failed items redriven"));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_and_refuse_bad_input() {
        let m = parse_members("1=127.0.0.1:7001,2=127.0.0.1:7002").expect("valid");
        assert_eq!(m.len(), 2);
        assert_eq!(m[&2], "127.0.0.1:7002");
        for bad in [
            "",
            "1",
            "x=127.0.0.1:1",
            "0=127.0.0.1:1",
            "1=127.0.0.1",
            "1=a:1,1=b:2",
            "1=a:1,2=a:1",
        ] {
            let e = parse_members(bad).expect_err(bad);
            assert_eq!(e.code, ExitCode::Usage, "{bad:?}");
        }
    }

    #[test]
    fn errors_map_to_documented_exit_codes() {
        let cases = [
            (ClientError::NoEndpoints, ExitCode::Usage),
            (
                ClientError::Conflict {
                    key: "k".into(),
                    current: 3,
                },
                ExitCode::Conflict,
            ),
            (
                ClientError::NotFound { key: "k".into() },
                ExitCode::NotFound,
            ),
            (
                ClientError::Api(ApiError::NoLeader {
                    leader: None,
                    leader_addr: None,
                }),
                ExitCode::Unavailable,
            ),
            (
                ClientError::Api(ApiError::InvalidArgument("x".into())),
                ExitCode::Usage,
            ),
            (
                ClientError::Api(ApiError::Unauthenticated("no token".into())),
                ExitCode::Denied,
            ),
            (
                ClientError::Api(ApiError::PermissionDenied("tier trusted".into())),
                ExitCode::Denied,
            ),
            (ClientError::InvalidToken("short".into()), ExitCode::Usage),
        ];
        for (e, code) in cases {
            assert_eq!(CliError::from(e).code, code);
        }
        assert_eq!(ExitCode::Denied as i32, 6);
    }

    #[test]
    fn token_commands_parse() {
        match parse(&["token", "create", "--role", "deployer", "--name", "ci"])
            .expect("parses")
            .command
        {
            Cmd::Token(TokenCmd::Create { role, name }) => {
                assert_eq!((role, name.as_deref()), (Role::Deployer, Some("ci")));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(parse(&["token", "create", "--role", "root"]).is_err());
        assert!(parse(&["token", "create"]).is_err(), "--role is required");
        assert!(matches!(
            parse(&["token", "revoke", "3"]).expect("parses").command,
            Cmd::Token(TokenCmd::Revoke { id: 3 })
        ));
        assert!(parse(&["token", "revoke", "x"]).is_err());
        let cli = parse(&["--token", "skiff_abc", "token", "ls", "--json"]).expect("parses");
        assert_eq!(cli.token.as_deref(), Some("skiff_abc"));
        assert!(cli.json && matches!(cli.command, Cmd::Token(TokenCmd::Ls)));
    }

    #[test]
    fn token_json_never_holds_a_secret_field() {
        let v = token_json(&TokenInfo {
            id: 2,
            name: Some("ci".into()),
            role: Role::Invoker,
            created_ms: 5,
            revoked: false,
            revoked_ms: None,
        });
        let mut keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["created_ms", "id", "name", "revoked", "revoked_ms", "role"]
        );
        assert_eq!(v["role"], "invoker");
    }

    #[test]
    fn function_errors_map_to_documented_exit_codes() {
        let cases = [
            (
                ClientError::FunctionNotFound { name: "f".into() },
                ExitCode::NotFound,
            ),
            (
                ClientError::Rejected {
                    reason: "code store full".into(),
                },
                ExitCode::Conflict,
            ),
            (
                ClientError::CodeSize {
                    bytes: 0,
                    max: 1 << 26,
                },
                ExitCode::Usage,
            ),
            (
                ClientError::Api(ApiError::Throttled("queue full".into())),
                ExitCode::Unavailable,
            ),
            (
                ClientError::Api(ApiError::NotFound("function f does not exist".into())),
                ExitCode::NotFound,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(CliError::from(e).code, code);
        }
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("skiff").chain(args.iter().copied()))
    }

    fn deploy_args(args: &[&str]) -> DeployArgs {
        match parse(args).expect("parses").command {
            Cmd::Function(FnCmd::Deploy(a)) => *a,
            other => panic!("not a deploy: {other:?}"),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn default_limits_stay_within_the_tiers_ceiling() {
        let base = [
            "fn", "deploy", "f", "--code", "c", "--entry", "sh f.sh", "--tier",
        ];
        let with = |tier: &str, extra: &[&str]| {
            let mut args: Vec<&str> = base.to_vec();
            args.push(tier);
            args.extend_from_slice(extra);
            deploy_plan(deploy_args(&args))
        };
        let plan = with("untrusted", &[]).expect("defaults deploy at the untrusted tier");
        assert_eq!(
            (plan.spec.timeout_ms, plan.spec.memory_bytes),
            (10_000, 128 << 20)
        );
        let plan = with("trusted", &[]).expect("valid");
        assert_eq!(
            (plan.spec.timeout_ms, plan.spec.memory_bytes),
            (30_000, 128 << 20)
        );
        let e = with("untrusted", &["--timeout", "30s"]).expect_err("above the ceiling");
        assert!(
            e.message.contains("timeout 30 s is above the 10 s ceiling"),
            "{e:?}"
        );
        let e = with("untrusted", &["--memory", "512M"]).expect_err("above the ceiling");
        assert!(
            e.message
                .contains("memory 512 MiB is above the 256 MiB ceiling"),
            "{e:?}"
        );
    }

    #[test]
    fn deploy_flags_have_the_documented_defaults() {
        let a = deploy_args(&[
            "fn",
            "deploy",
            "echo",
            "--code",
            "./src",
            "--entry",
            "python3  main.py  -v",
        ]);
        let plan = deploy_plan(a).expect("valid");
        assert_eq!(plan.spec.name, "echo");
        assert_eq!(plan.code, PathBuf::from("./src"));
        assert_eq!(plan.spec.entry, ["python3", "main.py", "-v"]);
        assert_eq!(plan.spec.mode, FnMode::Exec);
        assert_eq!(plan.spec.tier, "standard");
        assert_eq!(plan.spec.memory_bytes, 128 << 20);
        assert_eq!(plan.spec.timeout_ms, 30_000);
        assert_eq!(
            (plan.spec.max_concurrency, plan.spec.queue_max),
            (100, 1000)
        );
        assert_eq!((plan.spec.min_warm, plan.spec.max_attempts), (0, 3));
        assert_eq!(plan.spec.retry_backoff_ms, 1000);

        let a = deploy_args(&[
            "fn",
            "deploy",
            "echo",
            "--code",
            "c",
            "--entry",
            "sh run.sh",
            "--mode",
            "serve",
            "--tier",
            "trusted",
            "--memory",
            "1G",
            "--timeout",
            "2m",
            "--min-warm",
            "2",
            "--max-concurrency",
            "8",
            "--queue-max",
            "9",
            "--max-attempts",
            "1",
            "--retry-backoff",
            "250ms",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--data-read",
            "in/",
            "--data-write",
            "out/",
        ]);
        let plan = deploy_plan(a).expect("valid");
        assert_eq!(plan.spec.mode, FnMode::Serve);
        assert_eq!(plan.spec.tier, "trusted");
        assert_eq!(plan.spec.memory_bytes, 1 << 30);
        assert_eq!(plan.spec.timeout_ms, 120_000);
        assert_eq!(
            (
                plan.spec.min_warm,
                plan.spec.max_concurrency,
                plan.spec.queue_max
            ),
            (2, 8, 9)
        );
        assert_eq!(
            (plan.spec.max_attempts, plan.spec.retry_backoff_ms),
            (1, 250)
        );
        assert_eq!(
            plan.spec.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(plan.spec.data.read_prefixes, ["in/"]);
        assert_eq!(plan.spec.data.write_prefixes, ["out/"]);
    }

    #[test]
    fn bad_deploys_are_refused_before_anything_is_sent() {
        for bad in [
            &["fn", "deploy", "echo", "--code", "c"][..],
            &["fn", "deploy", "--code", "c", "--entry", "x"],
            &[
                "fn", "deploy", "e", "--code", "c", "--entry", "x", "--mode", "batch",
            ],
            &[
                "fn", "deploy", "e", "--code", "c", "--entry", "x", "--tier", "root",
            ],
            &[
                "fn", "deploy", "e", "--code", "c", "--entry", "x", "--memory", "lots",
            ],
            &[
                "fn", "deploy", "e", "--code", "c", "--entry", "x", "--env", "NOEQUALS",
            ],
            &["fn", "deploy", "-f", "skiff.toml", "--memory", "1G"],
            &["fn", "deploy", "-f", "skiff.toml", "--code", "c"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must not parse");
        }
        // Parse, but the spec is invalid: caught locally.
        for bad in [
            &["fn", "deploy", "bad name", "--code", "c", "--entry", "x"][..],
            &["fn", "deploy", "e", "--code", "c", "--entry", "  "],
            &[
                "fn", "deploy", "e", "--code", "c", "--entry", "x", "--memory", "1M",
            ],
            &[
                "fn",
                "deploy",
                "e",
                "--code",
                "c",
                "--entry",
                "x",
                "--min-warm",
                "200",
            ],
            &[
                "fn", "deploy", "e", "--code", "c", "--entry", "x", "--env", "A=1", "--env", "A=2",
            ],
        ] {
            let e = deploy_plan(deploy_args(bad)).expect_err(&format!("{bad:?}"));
            assert_eq!(e.code, ExitCode::Usage, "{bad:?}");
        }
        // -f alone (a name is optional with it) parses.
        let a = deploy_args(&["fn", "deploy", "-f", "skiff.toml"]);
        assert_eq!(a.file, Some(PathBuf::from("skiff.toml")));
        assert_eq!(a.name, None);
    }

    #[test]
    fn a_manifest_deploy_reads_paths_relative_to_the_manifest() {
        let d = tempfile::tempdir().expect("temp dir");
        let path = d.path().join("skiff.toml");
        std::fs::write(
            &path,
            "name = \"m\"\ncode = \"src\"\nentry = \"sh run.sh\"\n",
        )
        .expect("write");
        let path_arg = path.to_str().expect("utf-8 temp path");
        let plan = deploy_plan(deploy_args(&["fn", "deploy", "-f", path_arg])).expect("manifest");
        assert_eq!(plan.spec.name, "m");
        assert_eq!(plan.code, d.path().join("src"));
        let plan = deploy_plan(deploy_args(&["fn", "deploy", "other", "-f", path_arg]))
            .expect("manifest with a name");
        assert_eq!(plan.spec.name, "other");
        std::fs::write(&path, "code = \"src\"\nentry = \"x\"\ncpus = 2\n").expect("write");
        let e = deploy_plan(deploy_args(&["fn", "deploy", "-f", path_arg])).expect_err("unknown");
        assert_eq!(e.code, ExitCode::Usage);
        assert!(e.message.contains("cpus"), "{}", e.message);
    }

    #[test]
    fn show_lists_the_stages_of_a_pipeline() {
        let dir = tempfile::tempdir().expect("temp dir");
        let manifest = dir.path().join("skiff.toml");
        std::fs::write(
            &manifest,
            "name = \"p\"\ncode = \".\"\ntier = \"trusted\"\n\
             [[stage]]\nname = \"parse\"\nentry = \"python3 parse.py\"\ntier = \"untrusted\"\n\
             [[stage]]\nname = \"store\"\nentry = \"sh store.sh\"\ndata_write = [\"out/\"]\n\
             env = { TOKEN = \"secret\" }\n",
        )
        .expect("write");
        let plan = deploy::read_manifest(&manifest, None).expect("manifest");
        let record = FunctionRecord {
            name: "p".into(),
            id: 1,
            versions: vec![FunctionVersion {
                version: 1,
                function_id: 1,
                spec: plan.with_digest(&"ab".repeat(32)),
                deployed_ms: 0,
            }],
            latest: 1,
            created_ms: 0,
        };
        let text = function_text(&record);
        assert!(text.contains("mode             exec, 2 stages"), "{text}");
        assert!(text.contains("  stage 1 parse\n    entry          python3 parse.py\n    tier           untrusted\n"), "{text}");
        assert!(text.contains("  stage 2 store\n"), "{text}");
        assert!(text.contains("    data write     out/\n"), "{text}");
        assert!(text.contains("    env            TOKEN\n"), "{text}");
        assert!(
            !text.contains("secret"),
            "environment values stay out of show: {text}"
        );
        assert!(
            !text.contains("\n  entry"),
            "no function-level entry row: {text}"
        );
        let json = version_json(&record.versions[0]);
        assert_eq!(json["stages"][1]["data_write"][0], "out/");
        assert_eq!(json["stages"][0]["tier"], "untrusted");
    }

    #[test]
    fn invoke_targets_parse() {
        assert_eq!(parse_target("echo").expect("name"), ("echo".into(), None));
        assert_eq!(
            parse_target("img.resize-2@17").expect("versioned"),
            ("img.resize-2".into(), Some(17))
        );
        for bad in [
            "", "@3", "echo@", "echo@0", "echo@x", "echo@-1", "a b", "echo@3@4",
        ] {
            let e = parse_target(bad).expect_err(bad);
            assert_eq!(e.code, ExitCode::Usage, "{bad:?}");
        }
        let cli = parse(&["invoke", "echo@2", "--payload", "{}", "--async"]).expect("parses");
        match cli.command {
            Cmd::Invoke(a) => {
                assert_eq!(a.target, "echo@2");
                assert_eq!(a.payload.as_deref(), Some("{}"));
                assert!(a.no_wait);
            }
            other => panic!("not an invoke: {other:?}"),
        }
        assert!(parse(&["invoke", "e", "--payload", "1", "--payload-file", "f"]).is_err());
        let cli = parse(&[
            "invoke",
            "e",
            "--idempotency-key",
            "k",
            "--version-token",
            "etag=abc",
        ])
        .expect("idempotency inputs parse");
        match cli.command {
            Cmd::Invoke(a) => {
                assert_eq!(a.idempotency_key.as_deref(), Some("k"));
                assert_eq!(a.tokens, vec![("etag".to_string(), "abc".to_string())]);
            }
            other => panic!("not an invoke: {other:?}"),
        }
        assert!(parse(&["invoke", "e", "--version-token", "no-equals"]).is_err());
    }

    #[test]
    fn task_listing_flags_parse_and_are_bounded() {
        let cli = parse(&[
            "task",
            "ls",
            "--state",
            "timed_out",
            "--dead",
            "--limit",
            "5",
        ])
        .expect("parses");
        match cli.command {
            Cmd::Task(TaskCmd::Ls {
                state, dead, limit, ..
            }) => {
                assert_eq!(state, Some(TaskState::TimedOut));
                assert!(dead);
                assert_eq!(limit, 5);
            }
            other => panic!("not task ls: {other:?}"),
        }
        assert!(parse(&["task", "ls", "--limit", "0"]).is_err());
        assert!(parse(&["task", "ls", "--limit", "200001"]).is_err());
        assert!(parse(&["task", "ls", "--state", "lost"]).is_err());
        assert_eq!(parse_task_state("timed-out"), Ok(TaskState::TimedOut));
    }

    fn finished_task(state: TaskState, output: &[u8], error: Option<&str>) -> Task {
        Task {
            id: 42,
            function: "echo".into(),
            version: 3,
            payload: b"hi".to_vec(),
            sync: true,
            state,
            attempts: 1,
            failures: u32::from(state != TaskState::Succeeded),
            node: Some(2),
            token: 1,
            submitted_ms: 1_000,
            assigned_ms: Some(1_002),
            started_ms: Some(1_010),
            finished_ms: Some(1_050),
            not_before_ms: 0,
            queue_seq: 1,
            memory_bytes: 128 << 20,
            timeout_ms: 30_000,
            result: Some(crate::api::TaskResult {
                status: match state {
                    TaskState::Failed => crate::api::RunStatus::Failed,
                    TaskState::TimedOut => crate::api::RunStatus::TimedOut,
                    _ => crate::api::RunStatus::Succeeded,
                },
                node: 2,
                exit_code: Some(if state == TaskState::Succeeded { 0 } else { 1 }),
                output: output.to_vec(),
                log: b"trace\n".to_vec(),
                error: error.map(String::from),
                warm: true,
                wall_ms: 40,
                cpu_ms: 12,
                peak_memory_bytes: 1 << 20,
            }),
            dead_letter: false,
            cache: None,
            ledger_key: None,
            request_id: None,
        }
    }

    #[test]
    fn task_json_carries_output_as_text_or_base64() {
        let t = finished_task(TaskState::Succeeded, b"{\"ok\":true}", None);
        let v = task_json(&t, true);
        assert_eq!(v["id"], 42);
        assert_eq!(v["state"], "succeeded");
        assert_eq!(v["node"], 2);
        assert_eq!(v["warm"], "warm");
        assert_eq!(v["attempts"], 1);
        assert_eq!(v["output"], "{\"ok\":true}");
        assert!(v.get("output_b64").is_none());
        assert_eq!(v["timings"]["started_ms"], 1_010);
        assert_eq!(v["timings"]["wall_ms"], 40);
        assert_eq!(v["timings"]["cpu_ms"], 12);

        let t = finished_task(TaskState::Succeeded, &[0xff, 0x00, 0x80], None);
        let v = task_json(&t, true);
        assert!(v["output"].is_null());
        assert_eq!(v["output_b64"], "/wCA");
        let summary = task_json(&t, false);
        assert!(summary.get("output").is_none() && summary["output_bytes"] == 3);
    }

    #[test]
    fn failures_are_described_on_one_line() {
        let t = finished_task(TaskState::TimedOut, b"", None);
        let m = failure_message(&t);
        assert!(
            m.contains("timed out") && m.contains("echo@3") && m.contains("30s"),
            "{m}"
        );
        let t = finished_task(TaskState::Failed, b"", Some("out of\nmemory"));
        let m = failure_message(&t);
        assert_eq!(m, "task 42 (echo@3) failed: out of memory");
        let t = finished_task(TaskState::Failed, b"", None);
        assert!(failure_message(&t).ends_with("exited with code 1"));
    }

    #[test]
    fn previews_escape_control_characters_and_stop() {
        assert_eq!(preview(b"a\tb\nc\x1b[2J"), "a\tb\nc\\u{1b}[2J");
        let long = vec![b'x'; PREVIEW_BYTES + 10];
        assert!(preview(&long).ends_with("… (10 more bytes)"));
        assert_eq!(fmt_bytes(128 << 20), "128M");
        assert_eq!(fmt_bytes(1536), "1.5K");
        assert_eq!(fmt_bytes(12), "12B");
    }
}
