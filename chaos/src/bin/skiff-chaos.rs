//! `skiff-chaos`: runs a chaos test against a real local skiff cluster and prints its verdict.
//! Parses flags and calls [`skiff_chaos::run()`]; everything else lives in the library.
//!
//! Exit codes: 0 valid, 1 invalid, 2 usage error, 3 unknown (a check could not decide),
//! 4 the harness could not run (no `skiffd`, the cluster never started).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use skiff_chaos::checker::Status;
use skiff_chaos::nemesis::FaultKind;
use skiff_chaos::RunOptions;

#[derive(Debug, Parser)]
#[command(
    name = "skiff-chaos",
    version,
    about = "Fault-injection tests of a skiff cluster"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a cluster behind fault proxies, run a workload under a seeded nemesis, check it.
    Run {
        /// Seed of the fault schedule and the workload (random if absent; always printed).
        #[arg(long)]
        seed: Option<u64>,
        /// How long the workload and the nemesis run, e.g. 120s or 2m.
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Path of skiffd (else $SKIFFD, else next to this executable).
        #[arg(long)]
        skiffd: Option<PathBuf>,
        /// Keep the run's files here (else a temporary directory, kept unless valid).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Comma-separated fault kinds (default: all): isolate, halves, one-way, delay, drop,
        /// bandwidth, kill, pause, crash-majority, crash-all, membership. Empty ("") for no
        /// faults.
        #[arg(long, value_delimiter = ',')]
        faults: Option<Vec<String>>,
        /// Concurrent workload clients.
        #[arg(long, default_value_t = 5)]
        workers: u32,
        /// DELIBERATELY BROKEN: read with local (possibly stale) reads, to see the checker fail.
        #[arg(long)]
        unsafe_local_reads: bool,
        /// Also run the function workload and its checks (needs root: functions run in
        /// sandboxes): async, sync and idempotent invocations, dependency changes, stream jobs.
        #[arg(long)]
        invocations: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SKIFF_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("skiff_chaos=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match real_main(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("skiff-chaos: {e:#}");
            ExitCode::from(4)
        }
    }
}

fn real_main(args: Args) -> anyhow::Result<ExitCode> {
    let Cmd::Run {
        seed,
        duration,
        nodes,
        skiffd,
        dir,
        faults,
        workers,
        unsafe_local_reads,
        invocations,
        json,
    } = args.command;
    let seed = seed.unwrap_or_else(rand::random);
    eprintln!("skiff-chaos: seed {seed}");
    let mut opts = RunOptions::new(seed, duration);
    opts.nodes = nodes;
    opts.skiffd = skiffd;
    opts.dir = dir;
    opts.workers = workers;
    opts.unsafe_local_reads = unsafe_local_reads;
    opts.invocations = invocations;
    if let Some(list) = faults {
        let mut kinds = Vec::new();
        for name in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            match name.parse::<FaultKind>() {
                Ok(k) => kinds.push(k),
                Err(e) => {
                    eprintln!("skiff-chaos: {e}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
        opts.faults = kinds;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(skiff_chaos::run(opts))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(ExitCode::from(match report.verdict.status {
        Status::Valid => 0,
        Status::Invalid => 1,
        Status::Unknown => 3,
    }))
}
