//! `skiff invoke`: run a function (NAME or NAME@VERSION) and print its output, or queue it
//! (`--async`) and print the task id.
//!
//! A synchronous invocation writes the function's output bytes to stdout exactly as the
//! function produced them; a cache hit or miss, the error and the log go to stderr.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use skiff_proto::functions::validate_function_name;

use super::render::{cache_text, failure_message, out, task_json};
use super::{CliError, ExitCode};
use crate::api::TaskState;
use crate::client::Client;
use crate::deploy;

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

/// Runs `skiff invoke`: waits for the result and prints the output, or with `--async` prints
/// the queued task.
pub(super) async fn run(client: &Client, args: InvokeArgs, json: bool) -> Result<(), CliError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::tests::parse;
    use crate::cli::Cmd;

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
}
