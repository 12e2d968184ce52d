//! `skiffd`: the skiff node daemon. Parses flags, sets up logging, and calls
//! [`skiff_node::daemon::run`] (or [`skiff_node::dev::run`] for `skiffd dev`) with a shutdown
//! future that resolves on SIGTERM or SIGINT.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use skiff_node::config::{LogFormat, NodeConfig, Overrides};

/// How often `--exit-with-parent` checks whether the parent process is still there.
const PARENT_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(
    name = "skiffd",
    version,
    about = "skiff node daemon",
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// This node's id (positive, unique, never reused after wiping its data).
    #[arg(long, env = "SKIFFD_ID")]
    id: Option<u64>,
    /// Address to listen on for clients and peers (ip:port).
    #[arg(long, env = "SKIFFD_LISTEN")]
    listen: Option<String>,
    /// Address peers and clients dial, if not --listen.
    #[arg(long, env = "SKIFFD_ADVERTISE")]
    advertise: Option<String>,
    /// Directory for this node's data.
    #[arg(long, env = "SKIFFD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// TOML config file; flags override its values.
    #[arg(long, env = "SKIFFD_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(long, env = "SKIFFD_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Log line format on stderr.
    #[arg(long, env = "SKIFFD_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// The cluster CA certificate (PEM) for mutual TLS (`skiffd certs` makes it).
    #[arg(long, env = "SKIFFD_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM).
    #[arg(long, env = "SKIFFD_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, env = "SKIFFD_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// With TLS: also take plaintext client connections (peers still need a certificate).
    #[arg(long, env = "SKIFFD_ALLOW_PLAINTEXT_CLIENTS")]
    allow_plaintext_clients: bool,
    /// Without TLS files: serve clients and peers in plaintext, to any process that reaches
    /// the port (a single test machine only). Without TLS files and without this, the node
    /// refuses to start.
    #[arg(long, env = "SKIFFD_INSECURE_PLAINTEXT")]
    insecure_plaintext: bool,
    /// A directory stream sources and file dependencies may be read from (repeatable;
    /// replaces `[sources] roots`). Without any, every file source is refused.
    #[arg(long = "sources-root", value_name = "DIR")]
    sources_roots: Vec<PathBuf>,
    /// Print a complete default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Exit when this process id disappears (used by `skiffd dev` for its nodes).
    #[arg(long, hide = true)]
    exit_with_parent: Option<i32>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Make the cluster's TLS files in DIR: a CA (once; reused when DIR already holds one) and
    /// a certificate and key per node, naming the hosts the node is dialed at.
    Certs {
        /// Directory of ca.pem, ca.key, node-ID.pem and node-ID.key.
        #[arg(long)]
        dir: PathBuf,
        /// A node: `ID=HOST[,HOST...]` (addresses or DNS names); repeat for each node.
        #[arg(long = "node", required = true, value_parser = skiff_node::certs::parse_node)]
        nodes: Vec<skiff_node::certs::NodeCert>,
        /// Replace existing node certificates (renewal) instead of refusing.
        #[arg(long)]
        replace: bool,
    },
    /// Start a local cluster of N node processes on loopback, initialize it, run a sample.
    Dev {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Directory for node data, logs, `env` and `nodes` (default: a new temporary one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// First port to use.
        #[arg(long, default_value_t = 7001)]
        base_port: u16,
    },
    /// Write a backup (`skiff cluster backup`) into the new, empty data directory of one member
    /// of a new cluster. Run it for every member with the same file and members, then start
    /// the nodes: they elect a leader without `cluster init`.
    Restore {
        /// The backup file.
        #[arg(long)]
        backup: PathBuf,
        /// This node's id in the new cluster.
        #[arg(long)]
        id: u64,
        /// This node's new data directory (must not exist or be empty).
        #[arg(long)]
        data_dir: PathBuf,
        /// Every member of the new cluster: `1=HOST:PORT,2=HOST:PORT,3=HOST:PORT`.
        #[arg(long)]
        members: String,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn,tarpc=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM, SIGINT, or (if asked) when the parent process is gone.
async fn shutdown_signal(parent: Option<i32>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        eprintln!("skiffd: cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    let parent_gone = async {
        match parent {
            Some(pid) => loop {
                tokio::time::sleep(PARENT_POLL).await;
                let pid = nix::unistd::Pid::from_raw(pid);
                if nix::sys::signal::kill(pid, None).is_err() {
                    break;
                }
            },
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        () = parent_gone => {}
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", NodeConfig::default_toml());
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match args.command {
        Some(Cmd::Dev {
            nodes,
            dir,
            base_port,
        }) => {
            init_logging(args.log_format.unwrap_or(LogFormat::Human));
            let exe = std::env::current_exe().context("cannot find the skiffd executable")?;
            let opts = skiff_node::dev::DevOptions {
                nodes,
                dir,
                base_port,
                exe,
            };
            runtime
                .block_on(skiff_node::dev::run(opts, shutdown_signal(None)))
                .context("skiffd dev")?;
        }
        Some(Cmd::Certs {
            dir,
            nodes,
            replace,
        }) => {
            let made =
                skiff_node::certs::generate(&dir, &nodes, replace).context("skiffd certs")?;
            if made.new_ca {
                println!(
                    "made a new cluster CA; keep {} secret and off the nodes",
                    dir.join("ca.key").display()
                );
            }
            for path in &made.written {
                println!("wrote {}", path.display());
            }
        }
        Some(Cmd::Restore {
            backup,
            id,
            data_dir,
            members,
        }) => {
            init_logging(args.log_format.unwrap_or(LogFormat::Human));
            let members = skiff_proto::membership::parse_members(&members)
                .map_err(|e| anyhow::anyhow!("--members: {e}"))?;
            let index = runtime
                .block_on(skiff_node::backup::restore_file(
                    &backup, id, &data_dir, &members,
                ))
                .context("skiffd restore")?;
            println!(
                "restored {} into {} at log index {index}",
                backup.display(),
                data_dir.display()
            );
        }
        None => {
            let overrides = Overrides {
                id: args.id,
                listen: args.listen,
                advertise: args.advertise,
                data_dir: args.data_dir,
                metrics_listen: args.metrics_listen,
                log_format: args.log_format,
                tls_ca: args.tls_ca,
                tls_cert: args.tls_cert,
                tls_key: args.tls_key,
                allow_plaintext_clients: args.allow_plaintext_clients.then_some(true),
                insecure_plaintext: args.insecure_plaintext.then_some(true),
                sources_roots: args.sources_roots,
            };
            let config = NodeConfig::load(args.config.as_deref(), overrides)?;
            init_logging(config.log_format);
            runtime.block_on(skiff_node::daemon::run(
                config,
                shutdown_signal(args.exit_with_parent),
            ))?;
        }
    }
    Ok(())
}
