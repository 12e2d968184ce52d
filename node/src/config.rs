//! Node configuration: a TOML file, overridden by command-line flags (and their `SKIFFD_*`
//! environment variables), validated before anything starts.
//!
//! Every limit is named with its unit. `skiffd --print-default-config` prints [`NodeConfig`]'s
//! defaults as a complete, commented-by-name TOML file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Everything a node needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id: a positive integer, unique in the cluster, never reused after the node's
    /// data is wiped.
    pub id: u64,
    /// Address the node listens on for clients and peers (`host:port`).
    pub listen: String,
    /// Address other nodes and clients use to reach this node, if not `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Directory of the node's RocksDB data.
    pub data_dir: PathBuf,
    /// Address of the Prometheus `/metrics` endpoint, if any.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// `human` or `json` log lines on stderr.
    #[serde(default = "default_log_format")]
    pub log_format: LogFormat,
    #[serde(default)]
    pub raft: RaftSettings,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub worker: WorkerSettings,
    #[serde(default)]
    pub tls: TlsSettings,
    #[serde(default)]
    pub sources: SourcesSettings,
    /// Addresses to dial instead of the membership's for some peers (node id -> `host:port`):
    /// for a proxy or NAT between nodes. The fault-injection harness routes every link through
    /// its own proxy this way.
    #[serde(default)]
    pub dial_overrides: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub sandbox: SandboxSettings,
}

/// How this node's sandboxes sit on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxSettings {
    /// Host uids and gids sandboxes run as, `"START:COUNT"`: the first is the group of every
    /// sandbox (the one that may reach the data sockets), each sandbox takes a uid from the
    /// rest. No entry of `/etc/subuid`, `/etc/subgid`, `/etc/passwd` or `/etc/group` may fall
    /// in it (checked at start): a local user delegated one of these ids could signal, trace
    /// or read what a sandbox owns. The default, `1879048192:65536` (0x70000000), lies above
    /// the ranges `useradd` and systemd hand out.
    pub host_ids: skiff_sandbox::HostIdRange,
}

/// Transport security (see `skiff_client::tls`). With the three files every connection to the
/// node is TLS and peers must present a certificate the cluster CA signed (`skiffd certs`
/// makes the files); without them the node refuses to start unless `insecure_plaintext` is
/// set, and then speaks plaintext to everyone (peers included) and warns at start.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// The cluster CA certificate (PEM) that peers' certificates must chain to.
    pub ca: Option<PathBuf>,
    /// This node's certificate chain (PEM), naming the hosts it is dialed at.
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    pub key: Option<PathBuf>,
    /// With TLS: also take plaintext *client* connections (the peer service still needs a
    /// node certificate). For a loopback-only cluster whose clients have no CA file.
    pub allow_plaintext_clients: bool,
    /// Without TLS files: serve everything, the peer service included, in plaintext to any
    /// process that reaches the port. For a single test machine only; refused with TLS files.
    pub insecure_plaintext: bool,
}

/// Why a node without TLS files does not start.
pub const PLAINTEXT_REFUSED: &str = "no TLS files (tls.ca, tls.cert, tls.key): without them any \
     process that reaches the port could act as a peer (vote, append entries, run any function). \
     Make certificates with `skiffd certs --dir DIR --node ID=HOST,...` and pass --tls-ca, \
     --tls-cert, --tls-key (or [tls] in the config file); for a single test machine only, \
     --insecure-plaintext (tls.insecure_plaintext = true, SKIFFD_INSECURE_PLAINTEXT=1) serves \
     everything in plaintext";
/// Files the node reads for callers (stream sources, `file:` dependencies of idempotent
/// functions): only beneath these directories (see `crate::sources`). None by default, so
/// every file source is refused until the operator lists one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourcesSettings {
    /// Absolute, symlink-free directories; none may be, hold or lie inside `/proc`, `/sys`,
    /// `/dev` or the node's data, TLS and code-cache directories. A mount point inside a root
    /// is not crossed: list it as a root of its own.
    pub roots: Vec<PathBuf>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

fn default_log_format() -> LogFormat {
    LogFormat::Human
}

/// Raft timing and log compaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSettings {
    /// Interval of the leader's heartbeats.
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for a random time in this range starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log behind a snapshot (for slow followers) before purging.
    pub logs_kept_after_snapshot: u64,
    /// Size of one snapshot chunk sent to a follower.
    pub snapshot_chunk_bytes: u64,
    /// Most entries in one append request to a follower.
    pub append_entries_max: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 800,
            election_timeout_max_ms: 1600,
            snapshot_logs_since_last: 20_000,
            logs_kept_after_snapshot: 2_000,
            snapshot_chunk_bytes: 1024 * 1024,
            append_entries_max: 300,
        }
    }
}

/// Bounds on what the node accepts and holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame on a client connection.
    pub client_frame_bytes_max: usize,
    /// Largest frame on a peer connection (append batches, snapshot chunks).
    pub peer_frame_bytes_max: usize,
    /// Most open client and peer connections.
    pub connections_max: usize,
    /// Most open connections from one source IP address, counted from accept until the
    /// connection closes; a peer that proves itself with a node certificate leaves the count,
    /// so that one address (a stranger's) cannot take every slot of `connections_max`.
    pub connections_per_address_max: usize,
    /// A client connection with no request in progress for this long is closed (one waiting
    /// for a long request, a sync invocation say, is not idle). Peer connections are exempt.
    pub client_idle_timeout_ms: u64,
    /// Most requests one connection may have in progress at once.
    pub requests_per_connection_max: usize,
    /// Most client commands waiting to be batched into the log; past it writes are refused
    /// as overloaded instead of queueing without end.
    pub write_queue_max: usize,
    /// Most log entries the leader has proposed and not yet seen committed. One (the default)
    /// is plain group commit: whatever arrives while an entry commits rides in the next one.
    pub writes_in_flight_max: usize,
    /// Most bytes of commands grouped into one log entry.
    pub entry_bytes_max: usize,
    /// Deadline of a client request inside the node (forwarding, waiting for commit).
    pub request_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            client_frame_bytes_max: skiff_client::api::CLIENT_FRAME_BYTES_MAX,
            peer_frame_bytes_max: 64 * 1024 * 1024,
            connections_max: 4096,
            connections_per_address_max: 256,
            client_idle_timeout_ms: 300_000,
            requests_per_connection_max: 1024,
            write_queue_max: 65_536,
            // Measured on a 3-node loopback cluster (docs/benchmarks.md, "Replicated writes"):
            // with 32 in flight, 16 writers got 470 writes/s, fewer than one writer alone (640);
            // with 1, batches form while an entry commits: 3,400 writes/s (12,300 at 256).
            writes_in_flight_max: 1,
            entry_bytes_max: 4 * 1024 * 1024,
            request_timeout_ms: 10_000,
        }
    }
}

/// How this node runs functions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Run tasks on this node (a node with it off still votes and serves clients).
    pub enabled: bool,
    /// Tasks run at once on this node.
    pub slots: u32,
    /// Memory given to sandboxes, running and warm; placement keeps within it.
    pub memory_budget_bytes: u64,
    /// Most idle warm sandboxes.
    pub warm_pool_max: usize,
    /// Most memory held by idle warm sandboxes (counted in `memory_budget_bytes` too).
    pub warm_memory_budget_bytes: u64,
    /// An idle warm sandbox is discarded after this long.
    pub warm_idle_expiry_ms: u64,
    /// Keep one warm sandbox of a function version after it ran here.
    pub keep_warm_after_use: bool,
    /// How long a task waits for a warm sandbox being prepared before cold-starting one.
    pub cold_start_wait_ms: u64,
    /// Interval of this node's heartbeats (warm pools, running tasks) through the log.
    pub heartbeat_interval_ms: u64,
    /// Content-addressed cache of unpacked code; its path must be traversable by others
    /// (sandboxes run as unprivileged uids). Node processes on one host may share it.
    pub code_cache_dir: PathBuf,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            enabled: true,
            slots: 32,
            memory_budget_bytes: 8 * 1024 * 1024 * 1024,
            warm_pool_max: 64,
            warm_memory_budget_bytes: 1024 * 1024 * 1024,
            warm_idle_expiry_ms: 300_000,
            keep_warm_after_use: true,
            cold_start_wait_ms: 25,
            heartbeat_interval_ms: 1000,
            code_cache_dir: PathBuf::from("/run/skiff/code"),
        }
    }
}

/// A configuration that cannot be used, with what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("missing setting `{0}` (give it in the config file or as a flag)")]
    Missing(&'static str),
    #[error("invalid setting `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// Settings given on the command line; each one overrides the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub id: Option<u64>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub log_format: Option<LogFormat>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub allow_plaintext_clients: Option<bool>,
    pub insecure_plaintext: Option<bool>,
    /// Replaces `[sources] roots` when not empty.
    pub sources_roots: Vec<PathBuf>,
}

/// A partial config as a file may hold it (the required fields may come from flags).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    listen: Option<String>,
    advertise: Option<String>,
    data_dir: Option<PathBuf>,
    metrics_listen: Option<String>,
    log_format: Option<LogFormat>,
    #[serde(default)]
    raft: RaftSettings,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    worker: WorkerSettings,
    #[serde(default)]
    tls: TlsSettings,
    #[serde(default)]
    sources: SourcesSettings,
    #[serde(default)]
    dial_overrides: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    sandbox: SandboxSettings,
}

/// Largest config file read, in bytes.
const CONFIG_FILE_BYTES_MAX: u64 = 1024 * 1024;

impl NodeConfig {
    /// Loads `path` (if any), applies `overrides`, and validates the result.
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<NodeConfig, ConfigError> {
        let file = match path {
            Some(path) => {
                let read_err = |source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                };
                let len = std::fs::metadata(path).map_err(read_err)?.len();
                if len > CONFIG_FILE_BYTES_MAX {
                    return Err(ConfigError::Parse {
                        path: path.to_path_buf(),
                        message: format!("{len} bytes, the limit is {CONFIG_FILE_BYTES_MAX}"),
                    });
                }
                let text = std::fs::read_to_string(path).map_err(read_err)?;
                Self::parse_file(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message,
                })?
            }
            None => FileConfig::default(),
        };
        let config = NodeConfig {
            id: overrides.id.or(file.id).ok_or(ConfigError::Missing("id"))?,
            listen: overrides
                .listen
                .or(file.listen)
                .ok_or(ConfigError::Missing("listen"))?,
            advertise: overrides.advertise.or(file.advertise),
            data_dir: overrides
                .data_dir
                .or(file.data_dir)
                .ok_or(ConfigError::Missing("data_dir"))?,
            metrics_listen: overrides.metrics_listen.or(file.metrics_listen),
            log_format: overrides
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Human),
            raft: file.raft,
            limits: file.limits,
            worker: file.worker,
            tls: TlsSettings {
                ca: overrides.tls_ca.or(file.tls.ca),
                cert: overrides.tls_cert.or(file.tls.cert),
                key: overrides.tls_key.or(file.tls.key),
                allow_plaintext_clients: overrides
                    .allow_plaintext_clients
                    .unwrap_or(file.tls.allow_plaintext_clients),
                insecure_plaintext: overrides
                    .insecure_plaintext
                    .unwrap_or(file.tls.insecure_plaintext),
            },
            sources: if overrides.sources_roots.is_empty() {
                file.sources
            } else {
                SourcesSettings {
                    roots: overrides.sources_roots,
                }
            },
            dial_overrides: file.dial_overrides,
            sandbox: file.sandbox,
        };
        config.validate()?;
        Ok(config)
    }

    fn parse_file(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().replace('\n', " ").trim().to_string())
    }

    /// The address peers and clients dial to reach this node.
    pub fn advertised(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    /// Checks every setting; the first problem is the error. Long by nature, not by logic:
    /// one flat check per setting, in the order of the file, so that a setting's rule is
    /// found next to its neighbours'.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(invalid("id", "node ids start at 1"));
        }
        self.listen.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "listen",
                format!("{:?} is not an ip:port address", self.listen),
            )
        })?;
        if let Some(a) = &self.advertise {
            skiff_client::transport::parse_endpoint(a).map_err(|e| invalid("advertise", e))?;
        }
        if let Some(m) = &self.metrics_listen {
            m.parse::<SocketAddr>().map_err(|_| {
                invalid("metrics_listen", format!("{m:?} is not an ip:port address"))
            })?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "is empty"));
        }
        for (id, addr) in &self.dial_overrides {
            if !id.parse::<u64>().is_ok_and(|id| id != 0) {
                return Err(invalid(
                    "dial_overrides",
                    format!("{id:?} is not a node id"),
                ));
            }
            skiff_client::transport::parse_endpoint(addr)
                .map_err(|e| invalid("dial_overrides", e))?;
        }
        let t = &self.tls;
        let given = [
            ("tls.ca", &t.ca),
            ("tls.cert", &t.cert),
            ("tls.key", &t.key),
        ];
        if given.iter().any(|(_, p)| p.is_some()) {
            if t.insecure_plaintext {
                return Err(invalid(
                    "tls.insecure_plaintext",
                    "cannot be set with TLS files: choose one",
                ));
            }
            for (field, path) in given {
                match path {
                    None => {
                        return Err(invalid(
                            field,
                            "is missing: mutual TLS needs tls.ca, tls.cert and tls.key \
                             (`skiffd certs` makes them)",
                        ))
                    }
                    Some(p) if p.as_os_str().is_empty() => return Err(invalid(field, "is empty")),
                    Some(_) => {}
                }
            }
        } else if t.allow_plaintext_clients {
            return Err(invalid(
                "tls.allow_plaintext_clients",
                "only means something with TLS files (without them everything is plaintext)",
            ));
        }
        // Neither TLS files nor `insecure_plaintext`: refused when the node starts
        // (`daemon::start`), so that a config without them still loads for other uses.
        if self.sources.roots.len() > crate::sources::ROOTS_MAX {
            return Err(invalid(
                "sources.roots",
                format!("at most {} roots", crate::sources::ROOTS_MAX),
            ));
        }
        let protected = self.protected_dirs();
        for root in &self.sources.roots {
            crate::sources::check_root_path(root, &protected)
                .map_err(|e| invalid("sources.roots", format!("{}: {e}", root.display())))?;
        }
        let r = &self.raft;
        if r.heartbeat_interval_ms == 0 {
            return Err(invalid("raft.heartbeat_interval_ms", "must be positive"));
        }
        if r.election_timeout_min_ms <= r.heartbeat_interval_ms {
            return Err(invalid(
                "raft.election_timeout_min_ms",
                "must be greater than raft.heartbeat_interval_ms",
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                "must be greater than raft.election_timeout_min_ms",
            ));
        }
        if r.snapshot_logs_since_last == 0 {
            return Err(invalid("raft.snapshot_logs_since_last", "must be positive"));
        }
        if r.snapshot_chunk_bytes < 1024
            || r.snapshot_chunk_bytes as usize > self.limits.peer_frame_bytes_max / 2
        {
            return Err(invalid(
                "raft.snapshot_chunk_bytes",
                "must be at least 1024 and at most half of limits.peer_frame_bytes_max",
            ));
        }
        if r.append_entries_max == 0 {
            return Err(invalid("raft.append_entries_max", "must be positive"));
        }
        let w = &self.worker;
        if w.slots == 0 || w.slots > 10_000 {
            return Err(invalid("worker.slots", "must be between 1 and 10000"));
        }
        if w.heartbeat_interval_ms == 0
            || w.heartbeat_interval_ms >= skiff_raft_store::functions::NODE_LEASE_MS / 2
        {
            return Err(invalid(
                "worker.heartbeat_interval_ms",
                format!(
                    "must be positive and under half the node lease ({} ms)",
                    skiff_raft_store::functions::NODE_LEASE_MS
                ),
            ));
        }
        if w.warm_memory_budget_bytes > w.memory_budget_bytes {
            return Err(invalid(
                "worker.warm_memory_budget_bytes",
                "cannot exceed worker.memory_budget_bytes",
            ));
        }
        if !w.code_cache_dir.is_absolute() {
            return Err(invalid("worker.code_cache_dir", "must be an absolute path"));
        }
        let l = &self.limits;
        let positive: [(&'static str, usize); 6] = [
            ("limits.connections_max", l.connections_max),
            (
                "limits.requests_per_connection_max",
                l.requests_per_connection_max,
            ),
            ("limits.write_queue_max", l.write_queue_max),
            ("limits.writes_in_flight_max", l.writes_in_flight_max),
            ("limits.entry_bytes_max", l.entry_bytes_max),
            ("limits.request_timeout_ms", l.request_timeout_ms as usize),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(invalid(field, "must be positive"));
            }
        }
        if l.connections_per_address_max == 0 || l.connections_per_address_max > l.connections_max {
            return Err(invalid(
                "limits.connections_per_address_max",
                "must be between 1 and limits.connections_max",
            ));
        }
        // Below a second, a client between two calls of one command would be cut off.
        if l.client_idle_timeout_ms < 1000 {
            return Err(invalid(
                "limits.client_idle_timeout_ms",
                "must be at least 1000",
            ));
        }
        let value_max = skiff_raft_store::model::VALUE_BYTES_MAX;
        if l.client_frame_bytes_max < 2 * value_max {
            return Err(invalid(
                "limits.client_frame_bytes_max",
                format!("must be at least {} (twice the value limit)", 2 * value_max),
            ));
        }
        if l.entry_bytes_max < 2 * value_max {
            return Err(invalid(
                "limits.entry_bytes_max",
                format!("must be at least {} (twice the value limit)", 2 * value_max),
            ));
        }
        if l.peer_frame_bytes_max < 2 * l.entry_bytes_max {
            return Err(invalid(
                "limits.peer_frame_bytes_max",
                "must be at least twice limits.entry_bytes_max",
            ));
        }
        Ok(())
    }

    /// The node's own directories, which no sources root may be, hold or lie inside: its
    /// data, the directories of its TLS files, and its code cache.
    pub fn protected_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.data_dir.clone(), self.worker.code_cache_dir.clone()];
        for file in [&self.tls.ca, &self.tls.cert, &self.tls.key]
            .into_iter()
            .flatten()
        {
            let file = std::path::absolute(file).unwrap_or_else(|_| file.clone());
            if let Some(dir) = file.parent() {
                dirs.push(dir.to_path_buf());
            }
        }
        dirs.into_iter()
            .map(|d| std::path::absolute(&d).unwrap_or(d))
            .collect()
    }

    /// A complete example configuration with every default, as TOML.
    pub fn default_toml() -> String {
        let example = NodeConfig {
            id: 1,
            listen: "127.0.0.1:7001".into(),
            advertise: None,
            data_dir: PathBuf::from("/var/lib/skiff"),
            metrics_listen: Some("127.0.0.1:9101".into()),
            log_format: LogFormat::Human,
            raft: RaftSettings::default(),
            limits: Limits::default(),
            worker: WorkerSettings::default(),
            tls: TlsSettings::default(),
            sources: SourcesSettings::default(),
            dial_overrides: Default::default(),
            sandbox: SandboxSettings::default(),
        };
        let body = toml::to_string_pretty(&example).expect("the default config serializes");
        format!(
            "# skiffd configuration. Flags (--id, --listen, --data-dir, --metrics-listen, \
             --log-format,\n# --tls-ca, --tls-cert, --tls-key, --allow-plaintext-clients, \
             --insecure-plaintext) and their SKIFFD_* environment\n# variables override these \
             values.\n\
             # advertise = \"10.0.0.1:7001\"   # address peers dial, if not `listen`\n\
             # Mutual TLS (files from `skiffd certs`); without them the node refuses to start \
             unless\n# [tls] insecure_plaintext = true (a single test machine only: anyone may \
             act as a peer):\n\
             # [tls] ca = \"/etc/skiff/tls/ca.pem\", cert = \"/etc/skiff/tls/node-1.pem\", \
             key = \"/etc/skiff/tls/node-1.key\"\n\
             # Directories stream sources and file dependencies may be read from (none: every\n\
             # file source is refused); see docs/operations.md:\n\
             # [sources] roots = [\"/srv/data\"]\n{body}"
        )
    }

    /// Node id -> address to dial, from `dial_overrides` (validated, so ids parse).
    pub fn dial_override_map(&self) -> std::collections::HashMap<u64, String> {
        self.dial_overrides
            .iter()
            .filter_map(|(id, addr)| Some((id.parse().ok()?, addr.clone())))
            .collect()
    }

    /// The openraft configuration these settings describe.
    pub fn openraft(&self) -> Result<openraft::Config, ConfigError> {
        let r = &self.raft;
        let config = openraft::Config {
            cluster_name: "skiff".into(),
            heartbeat_interval: r.heartbeat_interval_ms,
            election_timeout_min: r.election_timeout_min_ms,
            election_timeout_max: r.election_timeout_max_ms,
            max_payload_entries: r.append_entries_max,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: r.logs_kept_after_snapshot,
            snapshot_max_chunk_size: r.snapshot_chunk_bytes,
            // Purge as soon as a snapshot covers entries; followers that fall behind further
            // are caught up by snapshot.
            purge_batch_size: 1,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| invalid("raft", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides() -> Overrides {
        Overrides {
            id: Some(1),
            listen: Some("127.0.0.1:7001".into()),
            data_dir: Some("/tmp/x".into()),
            ..Default::default()
        }
    }

    #[test]
    fn tls_takes_all_three_files_or_none() {
        let c = with_file("", overrides()).expect("no TLS: plaintext");
        assert_eq!(c.tls, TlsSettings::default());
        let err = with_file(
            "[tls]\nca = \"/c/ca.pem\"\ncert = \"/c/n.pem\"\n",
            overrides(),
        )
        .expect_err("no key")
        .to_string();
        assert!(
            err.contains("`tls.key`") && err.contains("skiffd certs"),
            "{err}"
        );
        let c = with_file(
            "[tls]\nca = \"/c/ca.pem\"\ncert = \"/c/n.pem\"\nkey = \"/c/n.key\"\n",
            overrides(),
        )
        .expect("all three files");
        assert!(!c.tls.allow_plaintext_clients);
        let flags = Overrides {
            tls_cert: Some("/f/n.pem".into()),
            tls_key: Some("/f/n.key".into()),
            allow_plaintext_clients: Some(true),
            ..overrides()
        };
        let c = with_file("[tls]\nca = \"/c/ca.pem\"\ncert = \"/c/x.pem\"\n", flags)
            .expect("flags complete and override the file");
        assert_eq!(c.tls.cert.as_deref(), Some(Path::new("/f/n.pem")));
        assert!(c.tls.allow_plaintext_clients);
        let err = with_file("[tls]\nallow_plaintext_clients = true\n", overrides())
            .expect_err("plaintext clients without TLS")
            .to_string();
        assert!(err.contains("`tls.allow_plaintext_clients`"), "{err}");
    }

    fn with_file(text: &str, o: Overrides) -> Result<NodeConfig, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).expect("write config");
        NodeConfig::load(Some(&path), o)
    }

    #[test]
    fn default_config_round_trips_and_validates() {
        let text = NodeConfig::default_toml();
        let c = with_file(&text, Overrides::default()).expect("the printed default config loads");
        assert_eq!(c.id, 1);
        assert_eq!(c.raft, RaftSettings::default());
        assert_eq!(c.limits, Limits::default());
        c.openraft().expect("openraft accepts the defaults");
    }

    #[test]
    fn flags_override_the_file() {
        let c = with_file(
            "id = 7\nlisten = \"127.0.0.1:9\"\ndata_dir = \"/a\"\n",
            overrides(),
        )
        .expect("valid");
        assert_eq!(c.id, 1);
        assert_eq!(c.listen, "127.0.0.1:7001");
    }

    #[test]
    fn bad_configs_are_refused_with_the_field_named() {
        let cases: [(&str, &str); 6] = [
            ("id = 0", "node ids start at 1"),
            ("listen = \"nowhere\"", "listen"),
            (
                "[raft]\nelection_timeout_min_ms = 50",
                "election_timeout_min_ms",
            ),
            ("[raft]\nheartbeat_interval_ms = 0", "heartbeat_interval_ms"),
            ("[limits]\nwrite_queue_max = 0", "write_queue_max"),
            ("unknown_key = 1", "unknown field"),
        ];
        for (text, needle) in cases {
            let o = Overrides {
                id: None,
                listen: None,
                ..overrides()
            };
            let o = if text.starts_with("id") {
                Overrides {
                    listen: Some("127.0.0.1:1".into()),
                    ..o
                }
            } else if text.starts_with("listen") {
                Overrides { id: Some(1), ..o }
            } else {
                overrides()
            };
            let err = with_file(text, o).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn sources_roots_are_none_by_default_and_never_hold_the_nodes_files() {
        let c = with_file("", overrides()).expect("valid");
        assert!(
            c.sources.roots.is_empty(),
            "no file is read for callers by default"
        );
        let c = with_file("[sources]\nroots = [\"/srv/data\"]\n", overrides()).expect("valid");
        assert_eq!(c.sources.roots, [PathBuf::from("/srv/data")]);
        let flags = Overrides {
            sources_roots: vec!["/srv/other".into()],
            ..overrides()
        };
        let c = with_file("[sources]\nroots = [\"/srv/data\"]\n", flags).expect("valid");
        assert_eq!(
            c.sources.roots,
            [PathBuf::from("/srv/other")],
            "the flag replaces the file"
        );
        for (roots, needle) in [
            ("[\"/tmp\"]", "/tmp/x, the node's own files"),
            ("[\"/tmp/x/raft\"]", "the node's own files"),
            ("[\"/run/skiff\"]", "the node's own files"),
            ("[\"/proc/1\"]", "never reads for callers"),
            ("[\"/\"]", "never reads for callers"),
            ("[\"srv\"]", "absolute"),
            ("[\"/srv/../etc\"]", "absolute path without `..`"),
        ] {
            let err = with_file(&format!("[sources]\nroots = {roots}\n"), overrides())
                .expect_err(roots)
                .to_string();
            assert!(
                err.contains("`sources.roots`") && err.contains(needle),
                "{roots}: {err}"
            );
        }
    }

    #[test]
    fn missing_required_settings_are_named() {
        let err = NodeConfig::load(None, Overrides::default()).expect_err("no id");
        assert_eq!(
            err.to_string(),
            "missing setting `id` (give it in the config file or as a flag)"
        );
    }

    #[test]
    fn unreadable_file_is_a_clear_error() {
        let err = NodeConfig::load(Some(Path::new("/nonexistent/node.toml")), overrides())
            .expect_err("missing file");
        assert!(err
            .to_string()
            .starts_with("cannot read config file /nonexistent/node.toml"));
    }
}
