//! `skiffd dev`: a local cluster of N node processes on loopback in one command.
//!
//! Each node is a separate `skiffd` process (so one can be killed with `kill -9` and started
//! again from its data directory). The command initializes the cluster, waits for a leader,
//! runs a sample write and read, deploys and invokes a sample function, prints the first admin
//! token, writes `DIR/env` (`SKIFF_ENDPOINTS`, `SKIFF_TOKEN` and `SKIFF_CA`) and `DIR/nodes`,
//! and then waits for Ctrl-C or SIGTERM, on which it stops every node it started.
//!
//! `DIR` is this user's and writable by no one else (a new one is made with mode 0700; one
//! given that others may write is refused), and `DIR/env`, which holds the token, is made
//! with mode 0600 (never widened by a `chmod` after the fact).
//! Stream sources and file dependencies are read beneath `DIR/sources` only (each node's
//! `--sources-root`), which the command creates, prints and exports as `SKIFF_SOURCES`.
//!
//! The nodes speak mutual TLS like a production cluster: the first run makes a CA and node
//! certificates for 127.0.0.1 in `DIR/tls` (`skiffd certs`), later runs in the same directory
//! reuse them.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use skiff_client::api::NodeId;
use skiff_client::{Client, ClientConfig};

use crate::NodeError;

/// Options of `skiffd dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub nodes: usize,
    /// Where node data, logs, `env` and `nodes` go; a fresh temporary directory if `None`.
    pub dir: Option<PathBuf>,
    /// First port tried; nodes get consecutive ports when they are free.
    pub base_port: u16,
    /// The `skiffd` executable to start for each node.
    pub exe: PathBuf,
}

/// Most nodes `skiffd dev` starts.
pub const DEV_NODES_MAX: usize = 9;
/// How long the cluster may take to elect a leader and see every node.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two attempts to initialize the cluster while its nodes start.
const READY_POLL: Duration = Duration::from_millis(200);
/// Pause between two looks at the cluster's status while it becomes ready.
const STATUS_POLL: Duration = Duration::from_millis(100);
/// How often the running dev cluster checks whether a node exited.
const EXIT_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How long the nodes get to stop after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two looks at whether a stopping node has exited.
const STOP_POLL: Duration = Duration::from_millis(50);

struct DevNode {
    id: NodeId,
    addr: String,
    data_dir: PathBuf,
    child: Child,
}

fn dev_err(msg: impl Into<String>) -> NodeError {
    NodeError::Dev(msg.into())
}

/// The sample function: a shell script that greets its payload, deployed and invoked once
/// (sync). Running functions needs root (namespaces, cgroups, mounts).
async fn sample_function(client: &Client) -> Result<String, String> {
    use skiff_client::api::{DataGrant, FnMode, FunctionSpec, TaskState};
    if !nix::unistd::geteuid().is_root() {
        return Err("functions run in sandboxes, which need root".into());
    }
    let script = b"#!/bin/sh\nprintf 'hello, %s (from %s)' \"$(cat)\" \"$(uname -n)\"\n";
    let archive = skiff_client::deploy::single_file_archive("hello.sh", script)?;
    let digest = client
        .upload_code(&archive, |_, _| {})
        .await
        .map_err(|e| format!("upload failed: {e}"))?;
    let spec = FunctionSpec {
        name: "hello".into(),
        code_digest: digest,
        entry: vec!["/bin/sh".into(), "hello.sh".into()],
        mode: FnMode::Exec,
        tier: "standard".into(),
        policy: None,
        memory_bytes: 64 << 20,
        timeout_ms: 10_000,
        max_concurrency: 100,
        queue_max: 1000,
        min_warm: 1,
        max_attempts: 3,
        retry_backoff_ms: 1000,
        data: DataGrant::default(),
        env: Vec::new(),
        idempotency: None,
        stages: Vec::new(),
    };
    let version = client
        .deploy(spec)
        .await
        .map_err(|e| format!("deploy failed: {e}"))?;
    let task = client
        .invoke("hello", None, b"world".to_vec(), true)
        .await
        .map_err(|e| format!("invoke failed: {e}"))?;
    let result = task.result.as_ref();
    if task.state != TaskState::Succeeded {
        return Err(format!(
            "invocation {} {}: {}",
            task.id,
            task.state.as_str(),
            result.and_then(|r| r.error.clone()).unwrap_or_default()
        ));
    }
    let r = result.ok_or("a finished task without a result")?;
    Ok(format!(
        "fn deploy hello -> version {version}; invoke hello --payload world -> {:?} (task {}, node {}, {}, {} ms)",
        String::from_utf8_lossy(&r.output),
        task.id,
        r.node,
        if r.warm { "warm" } else { "cold" },
        r.wall_ms
    ))
}

/// Picks `n` free loopback ports, preferring `base..base+n`.
fn pick_ports(base: u16, n: usize) -> Result<Vec<u16>, NodeError> {
    let consecutive: Vec<u16> = (0..n).filter_map(|i| base.checked_add(i as u16)).collect();
    if consecutive.len() == n
        && consecutive
            .iter()
            .all(|p| StdListener::bind(("127.0.0.1", *p)).is_ok())
    {
        return Ok(consecutive);
    }
    let mut ports = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let l = StdListener::bind(("127.0.0.1", 0))
            .map_err(|e| dev_err(format!("no free port: {e}")))?;
        ports.push(l.local_addr().map_err(|e| dev_err(e.to_string()))?.port());
        held.push(l);
    }
    Ok(ports)
}

/// The command line that (re)starts one dev node.
pub fn node_command_line(
    exe: &Path,
    id: NodeId,
    addr: &str,
    data_dir: &Path,
    tls_dir: &Path,
    sources: &Path,
) -> String {
    let tls: Vec<String> = tls_args(tls_dir, id)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!(
        "{} --id {id} --listen {addr} --data-dir {} --sources-root {} {}",
        exe.display(),
        data_dir.display(),
        sources.display(),
        tls.join(" ")
    )
}

/// Makes `DIR/sources`, the directory the dev nodes read file sources from, and returns its
/// real path (a root must be absolute and free of symlinks).
fn ensure_sources(dir: &Path) -> Result<PathBuf, NodeError> {
    let sources = dir.join("sources");
    std::fs::create_dir_all(&sources)
        .map_err(|e| dev_err(format!("cannot create {}: {e}", sources.display())))?;
    sources
        .canonicalize()
        .map_err(|e| dev_err(format!("cannot resolve {}: {e}", sources.display())))
}

/// Makes the dev cluster's CA and node certificates in `DIR/tls`, unless a run before did.
fn ensure_certs(dir: &Path, ids: impl Iterator<Item = NodeId>) -> Result<PathBuf, NodeError> {
    let tls = dir.join("tls");
    let missing: Vec<crate::certs::NodeCert> = ids
        .filter(|&id| !crate::certs::node_files(&tls, id).1.exists())
        .map(|id| crate::certs::NodeCert {
            id,
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
        })
        .collect();
    if !missing.is_empty() || !tls.join("ca.pem").exists() {
        crate::certs::generate(&tls, &missing, false)
            .map_err(|e| dev_err(format!("cannot make TLS certificates: {e}")))?;
    }
    Ok(tls)
}

fn spawn_node(
    exe: &Path,
    dir: &Path,
    sources: &Path,
    id: NodeId,
    addr: &str,
) -> Result<DevNode, NodeError> {
    let data_dir = dir.join(format!("node-{id}"));
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| dev_err(format!("cannot create {}: {e}", data_dir.display())))?;
    let log_path = dir.join(format!("node-{id}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| dev_err(format!("cannot open {}: {e}", log_path.display())))?;
    let log2 = log
        .try_clone()
        .map_err(|e| dev_err(format!("cannot open {}: {e}", log_path.display())))?;
    let child = Command::new(exe)
        .arg("--id")
        .arg(id.to_string())
        .arg("--listen")
        .arg(addr)
        .arg("--data-dir")
        .arg(&data_dir)
        .args(tls_args(&dir.join("tls"), id))
        .arg("--sources-root")
        .arg(sources)
        .arg("--exit-with-parent")
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .spawn()
        .map_err(|e| dev_err(format!("cannot start {}: {e}", exe.display())))?;
    Ok(DevNode {
        id,
        addr: addr.to_string(),
        data_dir,
        child,
    })
}

fn tls_args(tls_dir: &Path, id: NodeId) -> Vec<std::ffi::OsString> {
    let mut args = crate::certs::node_flags(tls_dir, id);
    // Loopback only: a script that reads the endpoints and token but not the CA still works.
    args.push("--allow-plaintext-clients".into());
    args
}

/// The admin token an earlier run of `skiffd dev` wrote to `DIR/env`.
fn previous_token(dir: &Path) -> Result<String, NodeError> {
    let path = dir.join("env");
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    text.lines()
        .find_map(|l| l.trim_start_matches("export ").strip_prefix("SKIFF_TOKEN="))
        .map(str::to_string)
        .ok_or_else(|| {
            dev_err(format!(
                "the cluster in {} is already initialized and {} holds no SKIFF_TOKEN",
                dir.display(),
                path.display()
            ))
        })
}

fn write_files(dir: &Path, nodes: &[DevNode], token: &str) -> Result<(), NodeError> {
    let endpoints: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let env = format!(
        "export SKIFF_ENDPOINTS={}\nexport SKIFF_TOKEN={token}\nexport SKIFF_CA={}\nexport SKIFF_SOURCES={}\n",
        endpoints.join(","),
        dir.join("tls").join("ca.pem").display(),
        ensure_sources(dir)?.display()
    );
    let mut list = String::new();
    for n in nodes {
        list.push_str(&format!("{} {} {}\n", n.id, n.child.id(), n.addr));
    }
    for (name, text) in [("env", env), ("nodes", list)] {
        let path = dir.join(name);
        write_private(&path, text.as_bytes())
            .map_err(|e| dev_err(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(())
}

/// Writes `bytes` to `path` readable by this user only: a new file made with mode 0600 next
/// to it (never a file or link already there: `O_EXCL`), then renamed over `path`, so the
/// secret is never in a file others can open, even for a moment, and a link planted at `path`
/// is replaced, not followed.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("no file name"))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Makes the dev directory (mode 0700, parents too) or checks the one given: it holds the
/// admin token, the TLS keys and the nodes' data, so it must be this user's and writable by
/// no one else (anyone who can write it can swap the files in it).
fn private_dir(dir: &Path) -> Result<(), NodeError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| dev_err(format!("cannot create {}: {e}", dir.display())))?;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| dev_err(format!("cannot stat {}: {e}", dir.display())))?;
    let mode = meta.permissions().mode() & 0o7777;
    if !meta.is_dir() {
        return Err(dev_err(format!(
            "{} is not a directory (a symlink is not taken either)",
            dir.display()
        )));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(dev_err(format!(
            "{} belongs to uid {}, not to this user: it will hold the admin token",
            dir.display(),
            meta.uid()
        )));
    }
    if mode & 0o022 != 0 {
        return Err(dev_err(format!(
            "{} is writable by others (mode {mode:o}): it will hold the admin token; use a \
             directory of your own (chmod go-w) or leave --dir out",
            dir.display()
        )));
    }
    Ok(())
}

async fn wait_ready(
    client: &Client,
    members: &BTreeMap<NodeId, String>,
) -> Result<NodeId, NodeError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match client.cluster_status().await {
            Ok(s)
                if s.leader.is_some()
                    && s.nodes.len() == members.len()
                    && s.nodes.iter().all(|n| n.reachable) =>
            {
                return Ok(s.leader.expect("checked above"));
            }
            Ok(s) => last = format!("leader {:?}, {} nodes", s.leader, s.nodes.len()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
    Err(dev_err(format!(
        "the cluster did not become ready in {READY_TIMEOUT:?}: {last}"
    )))
}

/// Runs the dev cluster until `shutdown` resolves.
pub async fn run(
    opts: DevOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), NodeError> {
    if opts.nodes == 0 || opts.nodes > DEV_NODES_MAX {
        return Err(dev_err(format!(
            "--nodes must be between 1 and {DEV_NODES_MAX}"
        )));
    }
    let (dir, _temp) = match &opts.dir {
        Some(d) => {
            private_dir(d)?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("skiff-dev-")
                .tempdir()
                .map_err(|e| dev_err(format!("cannot create a temporary directory: {e}")))?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let ports = pick_ports(opts.base_port, opts.nodes)?;
    ensure_certs(&dir, 1..=opts.nodes as NodeId)?;
    let sources = ensure_sources(&dir)?;
    let mut nodes = Vec::with_capacity(opts.nodes);
    for (i, port) in ports.iter().enumerate() {
        let id = i as NodeId + 1;
        let addr = format!("127.0.0.1:{port}");
        match spawn_node(&opts.exe, &dir, &sources, id, &addr) {
            Ok(n) => nodes.push(n),
            Err(e) => {
                stop_all(&mut nodes);
                return Err(e);
            }
        }
    }
    let result = bring_up(&opts, &dir, &mut nodes).await;
    if let Err(e) = result {
        stop_all(&mut nodes);
        return Err(e);
    }
    tokio::pin!(shutdown);
    let mut reported_exit = vec![false; nodes.len()];
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(EXIT_CHECK_INTERVAL) => {
                for (i, n) in nodes.iter_mut().enumerate() {
                    if !reported_exit[i] {
                        if let Ok(Some(status)) = n.child.try_wait() {
                            reported_exit[i] = true;
                            eprintln!(
                                "node {} exited ({status}); restart it with:\n  {}",
                                n.id,
                                node_command_line(&opts.exe, n.id, &n.addr, &n.data_dir, &dir.join("tls"), &sources)
                            );
                        }
                    }
                }
            }
        }
    }
    eprintln!("stopping {} nodes", nodes.len());
    stop_all(&mut nodes);
    Ok(())
}

async fn bring_up(opts: &DevOptions, dir: &Path, nodes: &mut [DevNode]) -> Result<(), NodeError> {
    let members: BTreeMap<NodeId, String> = nodes.iter().map(|n| (n.id, n.addr.clone())).collect();
    let endpoints: Vec<String> = members.values().cloned().collect();
    let token = init_cluster(dir, nodes, &members, &endpoints).await?;
    let ca = dir.join("tls").join("ca.pem");
    let mut cfg = ClientConfig::new(endpoints.clone())
        .with_token(token.clone())
        .with_ca(&ca)
        .map_err(|e| dev_err(e.to_string()))?;
    cfg.attempts_max = 3;
    let client = Client::new(cfg).map_err(|e| dev_err(e.to_string()))?;
    let leader = wait_ready(&client, &members).await?;
    write_files(dir, nodes, &token)?;

    // The sample: a replicated write, read back linearizably.
    let version = client
        .put("hello", b"world".to_vec())
        .await
        .map_err(|e| dev_err(format!("sample write failed: {e}")))?;
    let read = client
        .get("hello")
        .await
        .map_err(|e| dev_err(format!("sample read failed: {e}")))?
        .map(|e| String::from_utf8_lossy(&e.value).into_owned());
    let sample_fn = sample_function(&client).await;

    let ready = Ready {
        leader,
        version,
        read,
        sample_fn,
    };
    print_ready(opts, dir, nodes, &endpoints, &token, &ready)
}

/// Waits for every node to listen, then initializes the cluster from node 1; the admin
/// token's secret (or the earlier run's, from a reused directory).
async fn init_cluster(
    dir: &Path,
    nodes: &mut [DevNode],
    members: &BTreeMap<NodeId, String>,
    endpoints: &[String],
) -> Result<String, NodeError> {
    let ca = dir.join("tls").join("ca.pem");
    let first = ClientConfig::new(vec![endpoints[0].clone()])
        .with_ca(&ca)
        .map_err(|e| dev_err(e.to_string()))?;
    let first = Client::new(first).map_err(|e| dev_err(e.to_string()))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match first.cluster_init(members.clone()).await {
            Ok(admin) => return Ok(admin.secret),
            // A directory reused from an earlier run: its env file holds the token.
            Err(skiff_client::ClientError::Api(
                skiff_client::api::ApiError::FailedPrecondition(m),
            )) if m.contains("already initialized") => return previous_token(dir),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "waiting for nodes to start");
                for n in nodes.iter_mut() {
                    if let Ok(Some(status)) = n.child.try_wait() {
                        return Err(dev_err(format!(
                            "node {} exited during start-up ({status}); see {}",
                            n.id,
                            dir.join(format!("node-{}.log", n.id)).display()
                        )));
                    }
                }
                tokio::time::sleep(READY_POLL).await;
            }
            Err(e) => return Err(dev_err(format!("cannot initialize the cluster: {e}"))),
        }
    }
}

/// What `bring_up` found, for the summary it prints.
struct Ready {
    leader: NodeId,
    version: u64,
    read: Option<String>,
    sample_fn: Result<String, String>,
}

/// Prints how to use the cluster just brought up.
fn print_ready(
    opts: &DevOptions,
    dir: &Path,
    nodes: &[DevNode],
    endpoints: &[String],
    token: &str,
    ready: &Ready,
) -> Result<(), NodeError> {
    let Ready {
        leader,
        version,
        read,
        sample_fn,
    } = ready;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "skiff dev cluster: {} nodes, leader is node {leader}",
        nodes.len()
    );
    for n in nodes.iter() {
        let _ = writeln!(
            out,
            "  node {}  {}  pid {}  data {}",
            n.id,
            n.addr,
            n.child.id(),
            n.data_dir.display()
        );
    }
    let _ = writeln!(
        out,
        "sample: kv put hello=world -> version {version}; kv get hello -> {read:?}"
    );
    match &sample_fn {
        Ok(line) => {
            let _ = writeln!(out, "sample: {line}");
        }
        Err(e) => {
            let _ = writeln!(out, "sample function not run: {e}");
        }
    }
    let _ = writeln!(out, "endpoints: {}", endpoints.join(","));
    let _ = writeln!(
        out,
        "file sources: {} (streams and file dependencies read beneath it only; $SKIFF_SOURCES)",
        ensure_sources(dir)?.display()
    );
    let _ = writeln!(out, "admin token: {token}");
    let _ = writeln!(
        out,
        "use it:    source {}/env && skiff cluster status",
        dir.display()
    );
    let _ = writeln!(
        out,
        "restart a killed node: {}   (ADDR: see {}/nodes)",
        node_command_line(
            &opts.exe,
            0,
            "ADDR",
            &dir.join("node-N"),
            &dir.join("tls"),
            &ensure_sources(dir)?,
        )
        .replace("--id 0", "--id N")
        .replace("node-0.", "node-N."),
        dir.display()
    );
    let _ = writeln!(
        out,
        "files:     {0}/env, {0}/nodes (ID PID ADDR), {0}/node-N.log",
        dir.display()
    );
    let _ = writeln!(out, "ready; Ctrl-C stops the cluster");
    Ok(())
}

/// Sends SIGTERM to every node, waits up to `STOP_TIMEOUT`, then SIGKILLs what is left.
fn stop_all(nodes: &mut [DevNode]) {
    for n in nodes.iter() {
        let _ = kill(Pid::from_raw(n.child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for n in nodes.iter_mut() {
        loop {
            match n.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(STOP_POLL),
                Ok(None) => {
                    let _ = n.child.kill();
                    let _ = n.child.wait();
                    break;
                }
            }
        }
    }
}
