//! `skiff stream`: stream jobs, one function over every item of a data set: start (and wait
//! with a progress line), status, list, cancel, redrive.
//!
//! The progress line goes to stderr, so stdout holds only the job id or its final summary.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::json;
use skiff_proto::functions::validate_function_name;

use super::render::{
    format_eta, out, stream_json, stream_status_text, stream_summary, streams_table,
};
use super::{CliError, ExitCode};
use crate::api::{StreamJob, StreamOptions, StreamSource, StreamState};
use crate::client::Client;

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

/// How often `stream start --wait` refreshes its progress line.
const STREAM_PROGRESS_INTERVAL: Duration = Duration::from_millis(300);

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

/// Runs one `skiff stream` command.
pub(super) async fn run(client: &Client, cmd: StreamCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        StreamCmd::Start(args) => start(client, args, json).await,
        StreamCmd::Status { id } => {
            let job = client.stream(id).await?.ok_or_else(|| CliError {
                code: ExitCode::NotFound,
                message: format!("stream {id} does not exist"),
            })?;
            if json {
                out(&stream_json(&job).to_string());
                return Ok(());
            }
            out(&stream_status_text(&job));
            Ok(())
        }
        StreamCmd::Ls => {
            let jobs = client.streams().await?;
            if json {
                let list: Vec<serde_json::Value> = jobs.iter().map(stream_json).collect();
                out(&serde_json::Value::Array(list).to_string());
                return Ok(());
            }
            out(&streams_table(&jobs));
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

/// The source and options `stream start` asks for, checked locally.
fn start_request(args: &StreamStartArgs) -> Result<(StreamSource, StreamOptions), CliError> {
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
    Ok((source, options))
}

/// `stream start`: prints the job id, or with `--wait` follows the job to its end; a job
/// that did not succeed is a failure of the command.
async fn start(client: &Client, args: StreamStartArgs, json: bool) -> Result<(), CliError> {
    let (source, options) = start_request(&args)?;
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
