//! `skiff fn`: deploy a function (from flags or a `skiff.toml` manifest), list, show,
//! remove, and purge an idempotent function's cached results.
//!
//! A deploy is checked locally first ([`deploy_plan`]): a bad manifest, spec or code is a
//! usage error and nothing is uploaded.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::json;
use skiff_proto::functions::DataGrant;

use super::render::{function_json, function_text, functions_json, functions_table, out};
use super::CliError;
use crate::api::{FnMode, FunctionRecord, FunctionSpec, FunctionVersion};
use crate::client::{Client, ClientError};
use crate::deploy::{self, DeployPlan};

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

pub(super) fn parse_mode(s: &str) -> Result<FnMode, String> {
    s.parse()
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

/// Runs one `skiff fn` command.
pub(super) async fn run(client: &Client, cmd: FnCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        FnCmd::Deploy(args) => deploy_version(client, *args, json).await?,
        FnCmd::Ls => {
            let list = client.functions().await?;
            let latest: Vec<(&FunctionRecord, &FunctionVersion)> = list
                .iter()
                .filter_map(|f| f.latest().map(|v| (f, v)))
                .collect();
            if json {
                out(&functions_json(&latest).to_string());
            } else {
                out(&functions_table(&latest));
            }
        }
        FnCmd::Show { name } => {
            let Some(f) = client.function(&name).await? else {
                return Err(ClientError::FunctionNotFound { name }.into());
            };
            if json {
                out(&function_json(&f).to_string());
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

/// `fn deploy`: checks the deploy locally, uploads the code (with a progress line for large
/// archives on a terminal), then deploys the new version.
async fn deploy_version(client: &Client, args: DeployArgs, json: bool) -> Result<(), CliError> {
    let plan = deploy_plan(args)?;
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::tests::parse;
    use crate::cli::{Cmd, ExitCode};

    fn deploy_args(args: &[&str]) -> DeployArgs {
        match parse(args).expect("parses").command {
            Cmd::Function(FnCmd::Deploy(a)) => *a,
            other => panic!("not a deploy: {other:?}"),
        }
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
}
