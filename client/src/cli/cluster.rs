//! `skiff cluster`: initialize, status (with the workers and warm pools), add and remove
//! nodes, and backups.
//!
//! A backup is written through a synced temporary file renamed into place, so a crash never
//! leaves a half-written backup under the name asked for.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde_json::json;

use super::render::{out, status_text, token_json, workers_text};
use super::{CliError, ExitCode};
use crate::api::{NodeId, ReadConsistency};
use crate::client::Client;
use skiff_proto::membership;

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Initialize a new cluster: ID=ADDR,ID=ADDR,...
    Init { members: String },
    /// Nodes, leader, term, applied index, reachability and lag; workers and warm pools.
    Status,
    /// Add a node (learner first, voter once caught up).
    AddNode { id: NodeId, addr: String },
    /// Remove a node from the membership.
    RemoveNode { id: NodeId },
    /// Download a backup of the whole state (every acknowledged write) into FILE; restore it
    /// into a new cluster with `skiffd restore` (see docs/operations.md).
    Backup { file: PathBuf },
}

/// The member list of `cluster init`; a bad list is a usage error.
fn parse_members(s: &str) -> Result<BTreeMap<NodeId, String>, CliError> {
    membership::parse_members(s).map_err(|e| CliError::usage(e.to_string()))
}

/// Runs one `skiff cluster` command.
pub(super) async fn run(client: &Client, cmd: ClusterCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        ClusterCmd::Init { members } => {
            let members = parse_members(&members)?;
            let admin = client.cluster_init(members.clone()).await?;
            if json {
                out(&json!({
                    "initialized": true,
                    "members": members,
                    "token": token_json(&admin.token),
                    "secret": admin.secret,
                })
                .to_string());
            } else {
                // The secret goes to stdout alone on its line so that scripts can capture it;
                // the explanation goes to stderr.
                eprintln!(
                    "initialized a cluster of {} nodes; its first admin token (id {}) follows, shown this once:",
                    members.len(),
                    admin.token.id
                );
                out(&admin.secret);
            }
        }
        ClusterCmd::Status => status(client, json).await?,
        ClusterCmd::AddNode { id, addr } => {
            client.cluster_add_node(id, &addr).await?;
            if json {
                out(&json!({"added": id, "addr": addr}).to_string());
            } else {
                out(&format!("node {id} at {addr} is a voter"));
            }
        }
        ClusterCmd::RemoveNode { id } => {
            client.cluster_remove_node(id).await?;
            if json {
                out(&json!({"removed": id}).to_string());
            } else {
                out(&format!("node {id} removed"));
            }
        }
        ClusterCmd::Backup { file } => {
            let backup = client.backup(|_, _| {}).await?;
            write_file_atomically(&file, &backup.bytes)?;
            if json {
                out(&json!({
                    "file": file.display().to_string(),
                    "bytes": backup.bytes.len(),
                    "covers_index": backup.covers_index,
                    "sha256": backup.sha256,
                })
                .to_string());
            } else {
                out(&format!(
                    "backup of {} bytes (state at log index {}, sha256 {}) written to {}",
                    backup.bytes.len(),
                    backup.covers_index,
                    backup.sha256,
                    file.display()
                ));
            }
        }
    }
    Ok(())
}

/// `cluster status`: the membership as the answering node sees it, then the workers (or why
/// they could not be read).
async fn status(client: &Client, json: bool) -> Result<(), CliError> {
    let status = client.cluster_status().await?;
    // The answering node's view, so that status works without a leader too.
    let workers = client.workers_with(ReadConsistency::Local).await;
    if json {
        let mut v = serde_json::to_value(&status).expect("status serializes");
        match &workers {
            Ok(w) => v["workers"] = serde_json::to_value(w).expect("workers serialize"),
            Err(e) => {
                v["workers"] = serde_json::Value::Null;
                v["workers_error"] = json!(e.to_string());
            }
        }
        out(&v.to_string());
    } else {
        out(&status_text(&status));
        match &workers {
            Ok(w) => out(&workers_text(w)),
            Err(e) => out(&format!("workers: unavailable ({e})")),
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced, then
/// renamed: a crash never leaves a half-written file under the final name.
fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    use std::io::Write as _;
    let failed = |e: std::io::Error| CliError {
        code: ExitCode::Failure,
        message: format!("cannot write {}: {e}", path.display()),
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(failed)?;
    tmp.write_all(bytes).map_err(failed)?;
    tmp.as_file().sync_all().map_err(failed)?;
    tmp.persist(path).map_err(|e| failed(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_and_refuse_bad_input() {
        let m = parse_members("1=127.0.0.1:7001,2=127.0.0.1:7002").expect("valid");
        assert_eq!(m.len(), 2);
        assert_eq!(m[&2], "127.0.0.1:7002");
        for bad in [
            "",
            "1",
            "x=127.0.0.1:1",
            "0=127.0.0.1:1",
            "1=127.0.0.1",
            "1=a:1,1=b:2",
            "1=a:1,2=a:1",
        ] {
            let e = parse_members(bad).expect_err(bad);
            assert_eq!(e.code, ExitCode::Usage, "{bad:?}");
        }
    }
}
