//! The `skiff` command line: the arguments, the exit codes, and the dispatch of a parsed
//! command line to the command group that runs it.
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
//!
//! # Layout
//! One file per command group, each holding its arguments and the code that runs them:
//! `cluster.rs` (membership, status, backup), `kv.rs`, `function.rs` (`fn`: deploy, list,
//! show, remove), `invoke.rs`, `task.rs`, `stream.rs`, `token.rs` and `bench.rs` (the load
//! generators). `render.rs` holds how results look on stdout: tables, JSON and text, and the
//! formatting of sizes, durations and times.

use clap::{Parser, Subcommand};

use crate::api::ApiError;
use crate::client::{Client, ClientConfig, ClientError};

mod bench;
mod cluster;
mod function;
mod invoke;
mod kv;
mod render;
mod stream;
mod task;
mod token;

pub use bench::{
    bench_invoke, bench_kv, BenchCmd, BenchInvokeArgs, BenchKvArgs, BenchReport, InvokeBenchReport,
};
pub use cluster::ClusterCmd;
pub use function::{deploy_plan, DeployArgs, FnCmd};
pub use invoke::{parse_target, InvokeArgs};
pub use kv::KvCmd;
pub use render::{cache_text, task_json};
pub use stream::{StreamCmd, StreamStartArgs};
pub use task::{parse_task_state, TaskCmd};
pub use token::TokenCmd;

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

/// Runs a parsed command line: builds the client, then hands the command to its group.
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
        Cmd::Cluster(cmd) => cluster::run(&client, cmd, json).await,
        Cmd::Kv(cmd) => kv::run(&client, cmd, json).await,
        Cmd::Function(cmd) => function::run(&client, cmd, json).await,
        Cmd::Invoke(args) => invoke::run(&client, args, json).await,
        Cmd::Task(cmd) => task::run(&client, cmd, json).await,
        Cmd::Stream(cmd) => stream::run(&client, cmd, json).await,
        Cmd::Bench(cmd) => bench::run(&config, cmd, json).await,
        Cmd::Token(cmd) => token::run(&client, cmd, json).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    pub(super) fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("skiff").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
