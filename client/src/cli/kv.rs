//! `skiff kv`: the replicated key-value store: put (optionally conditional), get, list, rm.
//!
//! `kv get` writes the value's bytes as they are stored; a value read from a file is checked
//! against the value limit before anything is sent.

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use super::render::{entry_json, out};
use super::{CliError, ExitCode};
use crate::client::Client;

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

/// Runs one `skiff kv` command.
pub(super) async fn run(client: &Client, cmd: KvCmd, json: bool) -> Result<(), CliError> {
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
    let max = skiff_proto::model::VALUE_BYTES_MAX as u64;
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
