//! The `skiff` command line: argument definitions and the commands behind them.
//!
//! Every command prints data on stdout (a table or plain text, or JSON with `--json`) and a
//! one-line error on stderr when it fails, with an exit code from [`ExitCode`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::api::{ApiError, KvEntry, NodeId};
use crate::client::{Client, ClientError};
use crate::transport;

/// Documented exit codes of `skiff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Ok = 0,
    /// The thing asked for does not exist (e.g. `kv get` of an absent key).
    NotFound = 1,
    /// Bad arguments or input; nothing was changed.
    Usage = 2,
    /// A precondition failed (version conflict, cluster already initialized).
    Conflict = 3,
    /// The cluster could not be reached, has no leader, or did not answer in time.
    Unavailable = 4,
    /// Any other failure.
    Failure = 5,
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
            | ClientError::Invalid(_) => ExitCode::Usage,
            ClientError::Unreachable { .. } => ExitCode::Unavailable,
            ClientError::Conflict { .. } => ExitCode::Conflict,
            ClientError::NotFound { .. } => ExitCode::NotFound,
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
    /// Load generators.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Initialize a new cluster: ID=ADDR,ID=ADDR,...
    Init { members: String },
    /// Nodes, leader, term, applied index, reachability and lag.
    Status,
    /// Add a node (learner first, voter once caught up).
    AddNode { id: NodeId, addr: String },
    /// Remove a node from the membership.
    RemoveNode { id: NodeId },
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
pub enum BenchCmd {
    /// Replicated key-value writes: throughput and latency at a given concurrency.
    Kv(BenchKvArgs),
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
    let client = Client::from_endpoint_list(&cli.endpoints)?;
    let json = cli.json;
    match cli.command {
        Cmd::Cluster(cmd) => cluster(&client, cmd, json).await,
        Cmd::Kv(cmd) => kv(&client, cmd, json).await,
        Cmd::Bench(BenchCmd::Kv(args)) => {
            let report = bench_kv(&cli.endpoints, &args).await?;
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
            client.cluster_init(members.clone()).await?;
            if json {
                out(&json!({"initialized": true, "members": members}).to_string());
            } else {
                out(&format!("initialized a cluster of {} nodes", members.len()));
            }
        }
        ClusterCmd::Status => {
            let status = client.cluster_status().await?;
            if json {
                out(&serde_json::to_string(&status).expect("status serializes"));
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
    }
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

/// Most latency samples kept per writer, so memory stays bounded on long runs.
const SAMPLES_PER_WRITER_MAX: usize = 1_000_000;

/// Drives `args.clients` concurrent writers for `args.duration` (or `args.ops_max` writes).
pub async fn bench_kv(endpoints: &str, args: &BenchKvArgs) -> Result<BenchReport, CliError> {
    if args.clients == 0 || args.connections == 0 || args.keys == 0 {
        return Err(CliError::usage(
            "--clients, --connections and --keys must be positive",
        ));
    }
    if args.value_bytes > skiff_raft_store::model::VALUE_BYTES_MAX {
        return Err(CliError::usage("--value-bytes is over the value limit"));
    }
    let conns = args.connections.min(args.clients);
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        clients.push(Client::from_endpoint_list(endpoints)?);
    }
    // Warm the connections (and learn the leader) before the clock starts.
    for c in &clients {
        c.put("bench/warmup", vec![0]).await?;
    }
    let ops = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut tasks = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let client = clients[i % conns].clone();
        let ops = ops.clone();
        let ops_max = args.ops_max;
        let value = vec![b'x'; args.value_bytes];
        let keys = args.keys;
        tasks.push(tokio::spawn(async move {
            let mut samples: Vec<u32> = Vec::new();
            let mut errors = 0u64;
            let mut n = i as u64;
            while Instant::now() < deadline
                && ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < ops_max
            {
                let key = format!("bench/{:08}", n % keys);
                n = n.wrapping_add(7919);
                let t = Instant::now();
                match client.put(&key, value.clone()).await {
                    Ok(_) => {
                        if samples.len() < SAMPLES_PER_WRITER_MAX {
                            samples.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        }
                    }
                    Err(_) => errors += 1,
                }
            }
            (samples, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (s, e) = t
            .await
            .map_err(|e| CliError::usage(format!("writer task failed: {e}")))?;
        all.extend(s);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all[i] as f64 / 1000.0
    };
    Ok(BenchReport {
        clients: args.clients,
        writes: all.len() as u64,
        errors,
        elapsed_s: elapsed,
        writes_per_s: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    })
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
        ];
        for (e, code) in cases {
            assert_eq!(CliError::from(e).code, code);
        }
    }
}
