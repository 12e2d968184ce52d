//! `kv_vs_etcd`: replicated key-value writes of skiff against etcd 3.4, side by side in one run.
//!
//! It starts a three-node skiff cluster (three `skiffd` processes) and a three-member etcd
//! cluster (three `etcd` processes with default settings, so etcd fsyncs its WAL as skiff syncs
//! its log), both on 127.0.0.1 with their data under one temporary directory on the same disk.
//! Then, for each round and each concurrency, it drives skiff and then etcd for the same bounded
//! time, interleaved (skiff 1, etcd 1, skiff 16, etcd 16, ...), and prints the median round of
//! every cell and the ratio skiff / etcd.
//!
//! Same semantics on both sides: N writers, each puts one key and waits for the answer before
//! its next put; the same key sequence (`bench/%08d` over `KV_BENCH_KEYS` keys), the same value
//! size; the writers share min(N, 16) connections, all to the leader (the skiff client follows
//! the leader; the etcd side asks every member for its status and dials the leader); latency is
//! timed per put; writes/s counts successful puts. The skiff side is the library function
//! behind `skiff bench kv` itself.
//!
//! The etcd side declares the two gRPC calls it needs (`KV/Put`, `Maintenance/Status`) with
//! prost, field numbers from etcd's `rpc.proto`, instead of using the `etcd-client` crate: that
//! crate's build script needs `protoc`, which would make every `cargo test --workspace` need
//! Debian's protobuf-compiler for one benchmark.
//!
//! Bounds: each measured point runs `KV_BENCH_SECONDS` (or `OPS_MAX` puts); start-up waits at
//! most `READY_TIMEOUT`; every put has a deadline. Clean-up: the processes are killed when the
//! clusters are dropped — on success, on error, and on SIGINT/SIGTERM (the run future is dropped).
//! If this process is killed with SIGKILL, `skiffd` nodes exit within a second
//! (`--exit-with-parent`) and etcd members get SIGKILL from the kernel (`setpriv --pdeathsig`).
//!
//! Run (release; the bench needs the `skiffd` binary next to it):
//! `cargo build --release -p skiff-node --bin skiffd && cargo bench -p skiff-client --bench kv_vs_etcd`
//!
//! Environment: `KV_BENCH_CLIENTS` (default `1,16,256`), `KV_BENCH_SECONDS` (10),
//! `KV_BENCH_ROUNDS` (3), `KV_BENCH_VALUE_BYTES` (64), `KV_BENCH_KEYS` (10000),
//! `KV_BENCH_CONNECTIONS` (16), `KV_BENCH_SKIFFD` (default: `skiffd` in the bench's target
//! directory), `KV_BENCH_ETCD` (`/usr/bin/etcd`), `KV_BENCH_SKIFF_CONFIG` (a `skiffd --config`
//! file for experiments), `KV_BENCH_ONLY` (`skiff` or `etcd`), `KV_BENCH_KEEP` (keep the
//! temporary directory with the logs).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use comfy_table::{presets::ASCII_MARKDOWN, Table};
use skiff_client::api::NodeId;
use skiff_client::cli::{bench_kv, BenchKvArgs, BenchReport};
use skiff_client::{Client, ClientConfig};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

/// How long either cluster may take to start and elect a leader.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Most puts in one measured point, whatever its duration.
const OPS_MAX: u64 = 5_000_000;
/// Deadline of one etcd put (the skiff client has its own, 10 s per attempt).
const ETCD_PUT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most writers or connections accepted from the environment.
const CLIENTS_MAX: usize = 4096;
/// Most rounds accepted from the environment.
const ROUNDS_MAX: usize = 20;

/// The etcd v3 messages used here, declared by hand (etcd `api/etcdserverpb/rpc.proto`).
/// Fields not declared are skipped by prost when decoding.
mod etcdpb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(uint64, tag = "1")]
        pub cluster_id: u64,
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
        #[prost(int64, tag = "3")]
        pub revision: i64,
        #[prost(uint64, tag = "4")]
        pub raft_term: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(string, tag = "2")]
        pub version: String,
        #[prost(uint64, tag = "4")]
        pub leader: u64,
    }
}

/// Settings of one run, from the environment.
#[derive(Debug, Clone)]
struct Settings {
    clients: Vec<usize>,
    duration: Duration,
    rounds: usize,
    value_bytes: usize,
    keys: u64,
    connections: usize,
    skiffd: PathBuf,
    etcd: PathBuf,
    skiff_config: Option<PathBuf>,
    run_skiff: bool,
    run_etcd: bool,
    keep: bool,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow!("{name}={v:?} is not a valid value")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> anyhow::Result<Settings> {
        let clients: Vec<usize> = std::env::var("KV_BENCH_CLIENTS")
            .unwrap_or_else(|_| "1,16,256".into())
            .split(',')
            .map(|s| s.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .context("KV_BENCH_CLIENTS must be a comma-separated list of counts")?;
        if clients.is_empty() || clients.iter().any(|&c| c == 0 || c > CLIENTS_MAX) {
            bail!("KV_BENCH_CLIENTS: each count must be between 1 and {CLIENTS_MAX}");
        }
        let seconds: f64 = env_or("KV_BENCH_SECONDS", 10.0)?;
        if !(0.1..=600.0).contains(&seconds) {
            bail!("KV_BENCH_SECONDS must be between 0.1 and 600");
        }
        let rounds = env_or("KV_BENCH_ROUNDS", 3usize)?;
        if rounds == 0 || rounds > ROUNDS_MAX {
            bail!("KV_BENCH_ROUNDS must be between 1 and {ROUNDS_MAX}");
        }
        let connections = env_or("KV_BENCH_CONNECTIONS", 16usize)?;
        if connections == 0 || connections > CLIENTS_MAX {
            bail!("KV_BENCH_CONNECTIONS must be between 1 and {CLIENTS_MAX}");
        }
        let keys = env_or("KV_BENCH_KEYS", 10_000u64)?;
        if keys == 0 {
            bail!("KV_BENCH_KEYS must be positive");
        }
        let default_skiffd = std::env::current_exe()
            .context("cannot find the bench executable")?
            .parent()
            .and_then(Path::parent)
            .map(|dir| dir.join("skiffd"))
            .ok_or_else(|| anyhow!("the bench executable has no target directory"))?;
        let only = std::env::var("KV_BENCH_ONLY").unwrap_or_default();
        if !["", "skiff", "etcd"].contains(&only.as_str()) {
            bail!("KV_BENCH_ONLY must be skiff or etcd");
        }
        Ok(Settings {
            clients,
            duration: Duration::from_secs_f64(seconds),
            rounds,
            value_bytes: env_or("KV_BENCH_VALUE_BYTES", 64usize)?,
            keys,
            connections,
            skiffd: std::env::var_os("KV_BENCH_SKIFFD").map_or(default_skiffd, PathBuf::from),
            etcd: std::env::var_os("KV_BENCH_ETCD")
                .map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from),
            skiff_config: std::env::var_os("KV_BENCH_SKIFF_CONFIG").map(PathBuf::from),
            run_skiff: only != "etcd",
            run_etcd: only != "skiff",
            keep: std::env::var_os("KV_BENCH_KEEP").is_some(),
        })
    }
}

/// Child processes killed (and reaped) when dropped, whatever the reason of the drop.
struct Processes {
    children: Vec<Child>,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
    }
}

impl Processes {
    /// Fails if a process has already exited (e.g. a port was taken, a flag refused).
    fn check_running(&mut self, what: &str, dir: &Path) -> anyhow::Result<()> {
        for c in &mut self.children {
            if let Some(status) = c.try_wait().context("cannot poll a child process")? {
                bail!(
                    "a {what} process exited ({status}); see the logs in {}",
                    dir.display()
                );
            }
        }
        Ok(())
    }
}

/// `n` distinct free loopback ports. The listeners are closed just before the servers start, so
/// another process could take one in between; the start-up check then reports the failure.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("cannot bind a loopback port")?;
    listeners
        .iter()
        .map(|l| {
            Ok(l.local_addr()
                .context("a bound port has no address")?
                .port())
        })
        .collect()
}

fn log_file(path: &Path) -> anyhow::Result<(Stdio, Stdio)> {
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let g = f
        .try_clone()
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok((Stdio::from(f), Stdio::from(g)))
}

/// A running three-node skiff cluster.
struct SkiffCluster {
    endpoints: String,
    /// The admin token `cluster init` returned.
    token: String,
    _processes: Processes,
}

async fn start_skiff(s: &Settings, dir: &Path) -> anyhow::Result<SkiffCluster> {
    if !s.skiffd.is_file() {
        bail!(
            "{} not found: run `cargo build --release -p skiff-node --bin skiffd` first (or set KV_BENCH_SKIFFD)",
            s.skiffd.display()
        );
    }
    let ports = free_ports(3)?;
    let members: BTreeMap<NodeId, String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| (i as NodeId + 1, format!("127.0.0.1:{p}")))
        .collect();
    let mut processes = Processes {
        children: Vec::new(),
    };
    for (id, addr) in &members {
        let data_dir = dir.join(format!("skiff-{id}"));
        let (out, err) = log_file(&dir.join(format!("skiff-{id}.log")))?;
        let mut cmd = Command::new(&s.skiffd);
        cmd.arg("--id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(addr)
            .arg("--data-dir")
            .arg(&data_dir)
            // No TLS files: plaintext, as etcd runs here too (loopback only; the flag is
            // required, and the node warns that any local process could act as a peer).
            .arg("--insecure-plaintext")
            .arg("--exit-with-parent")
            .arg(std::process::id().to_string());
        if let Some(config) = &s.skiff_config {
            cmd.arg("--config").arg(config);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", s.skiffd.display()))?;
        processes.children.push(child);
    }
    let endpoints: Vec<String> = members.values().cloned().collect();
    let first = Client::new(ClientConfig::new(vec![endpoints[0].clone()]))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("not tried");
    // The cluster is fresh: the init that succeeds returns its admin token.
    let token = loop {
        if Instant::now() > deadline {
            bail!("the skiff cluster was not initialized in {READY_TIMEOUT:?}: {last}");
        }
        processes.check_running("skiffd", dir)?;
        match first.cluster_init(members.clone()).await {
            Ok(admin) => break admin.secret,
            Err(e) => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let all = Client::new(ClientConfig::new(endpoints.clone()).with_token(token.clone()))?;
    let leader = loop {
        if Instant::now() > deadline {
            bail!("the skiff cluster did not become ready in {READY_TIMEOUT:?}: {last}");
        }
        processes.check_running("skiffd", dir)?;
        match all.cluster_status().await {
            Ok(st) if st.nodes.len() == members.len() && st.nodes.iter().all(|n| n.reachable) => {
                if let Some(leader) = st.leader {
                    break leader;
                }
                last = "no leader yet".into();
            }
            Ok(st) => last = format!("leader {:?}, {} nodes", st.leader, st.nodes.len()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    all.put("bench/ready", vec![1])
        .await
        .context("first skiff write failed")?;
    // The client sends to its first endpoint and a follower forwards writes to the leader:
    // list the leader first, so that both systems are driven at their leader.
    let mut ordered: Vec<String> = members.get(&leader).cloned().into_iter().collect();
    ordered.extend(
        members
            .iter()
            .filter(|(id, _)| **id != leader)
            .map(|(_, a)| a.clone()),
    );
    Ok(SkiffCluster {
        endpoints: ordered.join(","),
        token,
        _processes: processes,
    })
}

/// A running three-member etcd cluster.
struct EtcdCluster {
    /// Client URLs, member i at index i.
    client_urls: Vec<String>,
    version: String,
    _processes: Processes,
}

async fn start_etcd(s: &Settings, dir: &Path) -> anyhow::Result<EtcdCluster> {
    if !s.etcd.is_file() {
        bail!(
            "{} not found: install Debian's etcd-server (or set KV_BENCH_ETCD)",
            s.etcd.display()
        );
    }
    let ports = free_ports(6)?;
    let client_urls: Vec<String> = ports[..3]
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let peer_urls: Vec<String> = ports[3..]
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let initial_cluster: Vec<String> = peer_urls
        .iter()
        .enumerate()
        .map(|(i, u)| format!("m{}={u}", i + 1))
        .collect();
    let mut processes = Processes {
        children: Vec::new(),
    };
    for i in 0..3 {
        let name = format!("m{}", i + 1);
        let (out, err) = log_file(&dir.join(format!("etcd-{name}.log")))?;
        // setpriv: the kernel kills the member if this process dies without running `Drop`.
        let child = Command::new("setpriv")
            .arg("--pdeathsig")
            .arg("KILL")
            .arg("--")
            .arg(&s.etcd)
            .args(["--name", &name])
            .arg("--data-dir")
            .arg(dir.join(format!("etcd-{name}")))
            .args(["--listen-client-urls", &client_urls[i]])
            .args(["--advertise-client-urls", &client_urls[i]])
            .args(["--listen-peer-urls", &peer_urls[i]])
            .args(["--initial-advertise-peer-urls", &peer_urls[i]])
            .args(["--initial-cluster", &initial_cluster.join(",")])
            .args(["--initial-cluster-token", "skiff-kv-bench"])
            .args(["--initial-cluster-state", "new"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {} through setpriv", s.etcd.display()))?;
        processes.children.push(child);
    }
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("not tried");
    loop {
        if Instant::now() > deadline {
            bail!("the etcd cluster did not become ready in {READY_TIMEOUT:?}: {last}");
        }
        processes.check_running("etcd", dir)?;
        match etcd_leader(&client_urls).await {
            Ok((leader, version)) => {
                let ch = etcd_channel(&client_urls[leader]).await?;
                match etcd_put(ch, b"bench/ready".to_vec(), vec![1]).await {
                    Ok(_) => {
                        return Ok(EtcdCluster {
                            client_urls,
                            version,
                            _processes: processes,
                        })
                    }
                    Err(e) => last = format!("first put: {e}"),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn etcd_channel(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad etcd url {url}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(ETCD_PUT_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("cannot connect to etcd at {url}"))
}

async fn etcd_unary<Req, Resp>(
    channel: Channel,
    path: &'static str,
    request: Req,
) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let resp = grpc
        .unary(
            tonic::Request::new(request),
            PathAndQuery::from_static(path),
            codec,
        )
        .await?;
    Ok(resp.into_inner())
}

/// One etcd put; answers the revision it created.
async fn etcd_put(channel: Channel, key: Vec<u8>, value: Vec<u8>) -> Result<i64, tonic::Status> {
    let resp: etcdpb::PutResponse = etcd_unary(
        channel,
        "/etcdserverpb.KV/Put",
        etcdpb::PutRequest { key, value },
    )
    .await?;
    Ok(resp.header.map_or(0, |h| h.revision))
}

/// Index in `urls` of the member that is the leader, and the etcd version.
async fn etcd_leader(urls: &[String]) -> anyhow::Result<(usize, String)> {
    for (i, url) in urls.iter().enumerate() {
        let ch = etcd_channel(url).await?;
        let st: etcdpb::StatusResponse = etcd_unary(
            ch,
            "/etcdserverpb.Maintenance/Status",
            etcdpb::StatusRequest {},
        )
        .await
        .with_context(|| format!("status of {url}"))?;
        let member = st.header.map_or(0, |h| h.member_id);
        if st.leader != 0 && st.leader == member {
            return Ok((i, st.version));
        }
    }
    Err(anyhow!("no etcd member is the leader yet"))
}

/// `skiff bench kv`'s loop, against etcd: `clients` writers on `connections` channels to the leader.
async fn bench_etcd(
    cluster: &EtcdCluster,
    s: &Settings,
    clients: usize,
) -> anyhow::Result<BenchReport> {
    let (leader, _) = etcd_leader(&cluster.client_urls).await?;
    let conns = s.connections.min(clients);
    let mut channels = Vec::with_capacity(conns);
    for _ in 0..conns {
        // Endpoint::connect opens one HTTP/2 connection per channel.
        let ch = etcd_channel(&cluster.client_urls[leader]).await?;
        etcd_put(ch.clone(), b"bench/warmup".to_vec(), vec![0])
            .await
            .context("etcd warm-up put failed")?;
        channels.push(ch);
    }
    let value = vec![b'x'; s.value_bytes];
    let keys = s.keys;
    let channels = Arc::new(channels);
    let stats = skiff_client::bench::drive(clients, s.duration, OPS_MAX, move |w, n| {
        let channel = channels[w % channels.len()].clone();
        let value = value.clone();
        async move {
            // The same key sequence as `skiff bench kv`.
            let key = format!("bench/{:08}", n.wrapping_mul(7919) % keys);
            etcd_put(channel, key.into_bytes(), value).await.is_ok()
        }
    })
    .await;
    Ok(BenchReport {
        clients,
        writes: stats.ok,
        errors: stats.errors,
        elapsed_s: stats.elapsed_s,
        writes_per_s: stats.ok_per_s,
        p50_ms: stats.p50_ms,
        p99_ms: stats.p99_ms,
    })
}

async fn bench_skiff(
    cluster: &SkiffCluster,
    s: &Settings,
    clients: usize,
) -> anyhow::Result<BenchReport> {
    let args = BenchKvArgs {
        clients,
        duration: s.duration,
        ops_max: OPS_MAX,
        value_bytes: s.value_bytes,
        keys: s.keys,
        connections: s.connections,
    };
    let config = ClientConfig::from_endpoint_list(&cluster.endpoints).with_token(&cluster.token);
    bench_kv(&config, &args)
        .await
        .map_err(|e| anyhow!("skiff bench failed: {}", e.message))
}

/// The round with the median writes/s (the lower middle one for an even count).
fn median(reports: &[BenchReport]) -> Option<&BenchReport> {
    let mut sorted: Vec<&BenchReport> = reports.iter().collect();
    sorted.sort_by(|a, b| a.writes_per_s.total_cmp(&b.writes_per_s));
    sorted.get((sorted.len().saturating_sub(1)) / 2).copied()
}

fn line(system: &str, round: usize, r: &BenchReport) {
    println!(
        "round {round} {system:>5} clients {:>4}: {:>9.0} writes/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} writes, {} errors, {:.1} s)",
        r.clients, r.writes_per_s, r.p50_ms, r.p99_ms, r.writes, r.errors, r.elapsed_s
    );
}

async fn run(s: Settings, dir: &Path) -> anyhow::Result<()> {
    let skiff = if s.run_skiff {
        Some(start_skiff(&s, dir).await?)
    } else {
        None
    };
    let etcd = if s.run_etcd {
        Some(start_etcd(&s, dir).await?)
    } else {
        None
    };
    if let Some(e) = &etcd {
        println!(
            "etcd {} (3 members, default settings: WAL fsynced)",
            e.version
        );
    }
    println!(
        "{} s per point, {} rounds, clients {:?}, {} B values over {} keys, ≤ {} connections to the leader",
        s.duration.as_secs_f64(),
        s.rounds,
        s.clients,
        s.value_bytes,
        s.keys,
        s.connections
    );
    let mut skiff_runs: BTreeMap<usize, Vec<BenchReport>> = BTreeMap::new();
    let mut etcd_runs: BTreeMap<usize, Vec<BenchReport>> = BTreeMap::new();
    for round in 1..=s.rounds {
        for &clients in &s.clients {
            if let Some(c) = &skiff {
                let r = bench_skiff(c, &s, clients).await?;
                line("skiff", round, &r);
                skiff_runs.entry(clients).or_default().push(r);
            }
            if let Some(c) = &etcd {
                let r = bench_etcd(c, &s, clients).await?;
                line("etcd", round, &r);
                etcd_runs.entry(clients).or_default().push(r);
            }
        }
    }
    let mut table = Table::new();
    table.load_preset(ASCII_MARKDOWN).set_header(vec![
        "clients",
        "skiff writes/s",
        "skiff p50 ms",
        "skiff p99 ms",
        "etcd writes/s",
        "etcd p50 ms",
        "etcd p99 ms",
        "writes/s skiff/etcd",
    ]);
    let cell = |r: Option<&BenchReport>| -> [String; 3] {
        match r {
            Some(r) => [
                format!("{:.0}", r.writes_per_s),
                format!("{:.2}", r.p50_ms),
                format!("{:.2}", r.p99_ms),
            ],
            None => ["-".into(), "-".into(), "-".into()],
        }
    };
    for &clients in &s.clients {
        let sk = skiff_runs.get(&clients).and_then(|v| median(v));
        let et = etcd_runs.get(&clients).and_then(|v| median(v));
        let ratio = match (sk, et) {
            (Some(a), Some(b)) if b.writes_per_s > 0.0 => {
                format!("{:.2}", a.writes_per_s / b.writes_per_s)
            }
            _ => "-".into(),
        };
        let [a, b, c] = cell(sk);
        let [d, e, f] = cell(et);
        table.add_row(vec![clients.to_string(), a, b, c, d, e, f, ratio]);
    }
    println!(
        "\nmedian round of {} (by writes/s) per cell:\n{table}",
        s.rounds
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let temp = tempfile::Builder::new()
        .prefix("skiff-kv-vs-etcd-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let dir = temp.path().to_path_buf();
    println!("data and logs in {}", dir.display());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The clusters live inside the run future: when a signal wins the select, the future is
    // dropped and so are the processes. The children are spawned from this thread (block_on
    // polls the future here), which `--pdeathsig` ties them to.
    let result = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term =
            signal(SignalKind::terminate()).context("cannot install a SIGTERM handler")?;
        tokio::select! {
            r = run(settings.clone(), &dir) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow!("terminated")),
        }
    });
    if settings.keep {
        eprintln!(
            "kept {} (data and logs of every process)",
            temp.keep().display()
        );
    } else if result.is_err() {
        // The logs explain a failure; the data directories would only fill the disk.
        remove_data_dirs(&dir);
        eprintln!("kept the logs in {}", temp.keep().display());
    }
    result
}

/// Removes the nodes' and members' data directories under `dir`, keeping the log files.
fn remove_data_dirs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
