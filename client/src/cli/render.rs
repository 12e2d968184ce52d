//! How results look: the JSON objects behind `--json`, the text views (`fn show`,
//! `task show`, the workers of `cluster status`, stream summaries), and the formatting of
//! sizes, durations and times shared by the tables.
//!
//! Invariants: a token's JSON never holds a secret; text shown from a function's output or
//! log is bounded ([`PREVIEW_BYTES`]) and has its control characters escaped.

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use serde_json::json;
use skiff_proto::functions::NODE_LEASE_MS;

use super::{BenchReport, InvokeBenchReport};
use crate::api::{
    CacheOutcome, ClusterStatus, FunctionRecord, FunctionSpec, FunctionVersion, KvEntry,
    MissReason, StreamJob, Task, TaskState, TokenInfo, Workers,
};

pub(super) fn out(s: &str) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout (e.g. piped into `head`) is not an error of the command.
    let _ = writeln!(stdout, "{s}");
}

/// A table in the style every listing uses, with its header row.
pub(super) fn table<const N: usize>(header: [&str; N]) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    table.set_header(header);
    table
}

/// A token as `--json` shows it: never a secret.
pub(super) fn token_json(t: &TokenInfo) -> serde_json::Value {
    json!({
        "id": t.id,
        "name": t.name,
        "role": t.role.as_str(),
        "created_ms": t.created_ms,
        "revoked": t.revoked,
        "revoked_ms": t.revoked_ms,
    })
}

pub(super) fn entry_json(e: &KvEntry) -> serde_json::Value {
    json!({
        "key": e.key,
        "value": String::from_utf8_lossy(&e.value),
        "version": e.version,
        "create_version": e.create_version,
    })
}

/// The membership part of `cluster status`: the leader line and one row per node.
pub(super) fn status_text(status: &ClusterStatus) -> String {
    let mut text = format!(
        "leader: {}   term: {}   last log: {}   applied: {} (answered by node {})\n",
        status
            .leader
            .map(|l| format!("node {l}"))
            .unwrap_or_else(|| "none".into()),
        status.term,
        status.last_log,
        status.last_applied,
        status.answered_by
    );
    let mut table = table([
        "id",
        "address",
        "role",
        "reachable",
        "applied",
        "matched",
        "lag",
    ]);
    for n in &status.nodes {
        let role = if Some(n.id) == status.leader {
            format!("{} (leader)", n.role)
        } else {
            n.role.to_string()
        };
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        table.add_row([
            n.id.to_string(),
            n.addr.clone(),
            role,
            if n.reachable { "yes" } else { "NO" }.to_string(),
            opt(n.last_applied),
            opt(n.matched),
            opt(n.lag),
        ]);
    }
    text.push_str(&table.to_string());
    text
}

/// The workers section of `cluster status`: one row per node, from heartbeats.
pub(super) fn workers_text(w: &Workers) -> String {
    let st = &w.stats;
    let mut text = format!(
        "workers: {} functions, {} tasks active ({} queued), {} finished, {} code archives ({})\n",
        st.functions,
        st.tasks_active,
        st.tasks_queued,
        st.tasks_finished,
        st.code_blobs,
        fmt_bytes(st.code_bytes)
    );
    let mut table = table([
        "node",
        "heartbeat",
        "load/slots",
        "memory budget",
        "warm memory",
        "warm pools",
    ]);
    /// Warm pools listed per node before "+N more".
    const POOLS_SHOWN: usize = 4;
    for n in &w.nodes {
        let age_ms = w.now_ms.saturating_sub(n.last_heartbeat_ms);
        let mut heartbeat = format!("{:.1}s ago", age_ms as f64 / 1000.0);
        if age_ms >= NODE_LEASE_MS {
            heartbeat.push_str(" (lease lost)");
        }
        let load = w
            .load
            .iter()
            .find(|(id, _)| *id == n.id)
            .map_or(0, |(_, l)| *l);
        let mut pools: Vec<String> = n
            .warm
            .iter()
            .filter(|p| p.idle > 0)
            .map(|p| format!("{}@{}×{}", p.function, p.version, p.idle))
            .collect();
        if pools.len() > POOLS_SHOWN {
            let more = pools.len() - POOLS_SHOWN;
            pools.truncate(POOLS_SHOWN);
            pools.push(format!("+{more} more"));
        }
        table.add_row([
            n.id.to_string(),
            heartbeat,
            format!("{load}/{}", n.slots),
            fmt_bytes(n.memory_budget_bytes),
            fmt_bytes(n.warm_memory_bytes),
            if pools.is_empty() {
                "-".to_string()
            } else {
                pools.join(" ")
            },
        ]);
    }
    text.push_str(&table.to_string());
    text
}

/// One function version's settings as a JSON object.
pub(super) fn version_json(v: &FunctionVersion) -> serde_json::Map<String, serde_json::Value> {
    let s = &v.spec;
    let env: serde_json::Map<String, serde_json::Value> =
        s.env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let value = json!({
        "version": v.version,
        "deployed_ms": v.deployed_ms,
        "code_digest": s.code_digest,
        "entry": s.entry,
        "mode": s.mode.as_str(),
        "tier": s.tier,
        "memory_bytes": s.memory_bytes,
        "timeout_ms": s.timeout_ms,
        "max_concurrency": s.max_concurrency,
        "queue_max": s.queue_max,
        "min_warm": s.min_warm,
        "max_attempts": s.max_attempts,
        "retry_backoff_ms": s.retry_backoff_ms,
        "policy": s.policy,
        "data_read": s.data.read_prefixes,
        "data_write": s.data.write_prefixes,
        "env": env,
        "stages": s.stages.iter().map(stage_json).collect::<Vec<_>>(),
    });
    match value {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("json! of an object literal is an object"),
    }
}

/// One stage of a staged function as a JSON object.
fn stage_json(stage: &crate::api::StageSpec) -> serde_json::Value {
    let env: serde_json::Map<String, serde_json::Value> = stage
        .env
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "name": stage.name,
        "entry": stage.entry,
        "tier": stage.tier,
        "policy": stage.policy,
        "data_read": stage.data.read_prefixes,
        "data_write": stage.data.write_prefixes,
        "env": env,
    })
}

/// The mode column: `exec`, `serve`, or `exec, N stages`.
pub(super) fn mode_text(spec: &FunctionSpec) -> String {
    if spec.is_staged() {
        format!("{}, {} stages", spec.mode.as_str(), spec.stages.len())
    } else {
        spec.mode.as_str().to_string()
    }
}

/// The policy row: its size, or `-`.
fn policy_text(policy: &Option<String>) -> String {
    policy
        .as_ref()
        .map_or("-".to_string(), |p| format!("{} bytes", p.len()))
}

/// `fn show` for people: every kept version, newest first.
pub(super) fn function_text(f: &FunctionRecord) -> String {
    let mut text = format!(
        "function {} (latest version {}, created {})\n",
        f.name,
        f.latest,
        fmt_time(f.created_ms)
    );
    for v in f.versions.iter().rev() {
        let s = &v.spec;
        let latest = if v.version == f.latest {
            " (latest)"
        } else {
            ""
        };
        let list = |items: &[String]| {
            if items.is_empty() {
                "-".to_string()
            } else {
                items.join(" ")
            }
        };
        let env: Vec<String> = s.env.iter().map(|(k, _)| k.clone()).collect();
        text.push_str(&format!(
            "\nversion {}{latest}, deployed {}\n",
            v.version,
            fmt_time(v.deployed_ms)
        ));
        let mut rows = vec![
            ("code", format!("sha256 {}", s.code_digest)),
            ("entry", s.entry.join(" ")),
            ("mode", mode_text(s)),
            ("tier", s.tier.clone()),
            ("memory", fmt_bytes(s.memory_bytes)),
            ("timeout", fmt_ms(s.timeout_ms)),
            ("max concurrency", s.max_concurrency.to_string()),
            ("queue max", s.queue_max.to_string()),
            ("min warm", s.min_warm.to_string()),
            (
                "retries",
                format!(
                    "{} attempts, back-off {}",
                    s.max_attempts,
                    fmt_ms(s.retry_backoff_ms)
                ),
            ),
            ("data read", list(&s.data.read_prefixes)),
            ("data write", list(&s.data.write_prefixes)),
            ("env", list(&env)),
            ("policy", policy_text(&s.policy)),
        ];
        if s.is_staged() {
            // The per-sandbox settings are the stages'; the function has none of its own.
            rows.retain(|(k, _)| {
                !matches!(*k, "entry" | "data read" | "data write" | "env" | "policy")
            });
        }
        for (k, v) in rows {
            text.push_str(&format!("  {k:<16} {v}\n"));
        }
        for (i, stage) in s.stages.iter().enumerate() {
            let env: Vec<String> = stage.env.iter().map(|(k, _)| k.clone()).collect();
            text.push_str(&format!("  stage {} {}\n", i + 1, stage.name));
            for (k, v) in [
                ("entry", stage.entry.join(" ")),
                ("tier", stage.tier.clone()),
                ("data read", list(&stage.data.read_prefixes)),
                ("data write", list(&stage.data.write_prefixes)),
                ("env", list(&env)),
                ("policy", policy_text(&stage.policy)),
            ] {
                text.push_str(&format!("    {k:<14} {v}\n"));
            }
        }
    }
    text.truncate(text.trim_end().len());
    text
}

/// One line saying why a finished task did not succeed.
pub(super) fn failure_message(task: &Task) -> String {
    let what = format!("task {} ({}@{})", task.id, task.function, task.version);
    let result = task.result.as_ref();
    let error = result.and_then(|r| r.error.as_deref()).map(one_line);
    let exit = result.and_then(|r| r.exit_code);
    match (task.state, error, exit) {
        (TaskState::TimedOut, error, _) => format!(
            "{what} timed out after {}{}",
            fmt_ms(task.timeout_ms),
            error.map(|e| format!(": {e}")).unwrap_or_default()
        ),
        (_, Some(e), _) => format!("{what} failed: {e}"),
        (_, None, Some(code)) => format!("{what} failed: exited with code {code}"),
        (_, None, None) => format!("{what} failed"),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One line saying whether an idempotent invocation ran, and why.
pub fn cache_text(c: &CacheOutcome) -> String {
    match c {
        CacheOutcome::Hit { source_task } => {
            format!("cache hit: the result of task {source_task}, nothing ran")
        }
        CacheOutcome::Joined { task } => {
            format!("joined: an identical invocation (task {task}) was running")
        }
        CacheOutcome::Miss { reason } => format!("cache miss: {reason}"),
    }
}

/// How an idempotent invocation was answered, as JSON: a hit, a join, or a miss with its reason.
fn cache_json(c: &CacheOutcome) -> serde_json::Value {
    match c {
        CacheOutcome::Hit { source_task } => json!({"hit": true, "source_task": source_task}),
        CacheOutcome::Joined { task } => json!({"hit": false, "joined": task}),
        CacheOutcome::Miss { reason } => {
            let kind = match reason {
                MissReason::FirstRun => "first_run",
                MissReason::CodeChanged { .. } => "code_changed",
                MissReason::PayloadChanged => "payload_changed",
                MissReason::DependencyChanged { .. } => "dependency_changed",
                MissReason::Expired => "expired",
                MissReason::PreviousRunFailed => "previous_run_failed",
                MissReason::PreviousRunLost => "previous_run_lost",
            };
            let mut v = json!({"hit": false, "reason": kind, "detail": reason.to_string()});
            if let MissReason::DependencyChanged { dependency, .. } = reason {
                v["dependency"] = json!(dependency);
            }
            v
        }
    }
}

/// A task as JSON. `full` adds the payload, output and log: as `payload`, `output`, `log`
/// when they are UTF-8, otherwise as base64 under `payload_b64`, `output_b64`, `log_b64`
/// (with the plain key null).
pub fn task_json(t: &Task, full: bool) -> serde_json::Value {
    let r = t.result.as_ref();
    let mut v = json!({
        "id": t.id,
        "function": t.function,
        "version": t.version,
        "state": t.state.as_str(),
        "sync": t.sync,
        "dead_letter": t.dead_letter,
        "node": t.node,
        "warm": r.map(|r| if r.warm { "warm" } else { "cold" }),
        "attempts": t.attempts,
        "failures": t.failures,
        "exit_code": r.and_then(|r| r.exit_code),
        "error": r.and_then(|r| r.error.clone()),
        "timings": {
            "submitted_ms": t.submitted_ms,
            "assigned_ms": t.assigned_ms,
            "started_ms": t.started_ms,
            "finished_ms": t.finished_ms,
            "wall_ms": r.map(|r| r.wall_ms),
            "cpu_ms": r.map(|r| r.cpu_ms),
        },
        "timeout_ms": t.timeout_ms,
        "peak_memory_bytes": r.map(|r| r.peak_memory_bytes),
        "payload_bytes": t.payload.len(),
        "output_bytes": r.map(|r| r.output.len()),
        "cache": t.cache.as_ref().map(cache_json),
        "request_id": t.request_id.map(|r| r.to_string()),
    });
    if full {
        put_bytes(&mut v, "payload", Some(&t.payload));
        put_bytes(&mut v, "output", r.map(|r| &r.output));
        put_bytes(&mut v, "log", r.map(|r| &r.log));
    }
    v
}

fn put_bytes(v: &mut serde_json::Value, key: &str, bytes: Option<&Vec<u8>>) {
    match bytes.map(|b| std::str::from_utf8(b).map_err(|_| b)) {
        None => v[key] = serde_json::Value::Null,
        Some(Ok(text)) => v[key] = json!(text),
        Some(Err(raw)) => {
            v[key] = serde_json::Value::Null;
            v[format!("{key}_b64")] = json!(base64::engine::general_purpose::STANDARD.encode(raw));
        }
    }
}

/// Bytes of output and log shown by `task show`.
const PREVIEW_BYTES: usize = 1024;

/// `task show` for people.
pub(super) fn task_text(t: &Task) -> String {
    let r = t.result.as_ref();
    let mut state = t.state.as_str().to_string();
    if t.dead_letter {
        state.push_str(" (dead-lettered)");
    }
    let since = |ms: Option<u64>| {
        ms.map_or("-".to_string(), |ms| {
            format!("+{}", fmt_ms(ms.saturating_sub(t.submitted_ms)))
        })
    };
    let mut rows: Vec<(&str, String)> = vec![
        ("state", state),
        ("function", format!("{}@{}", t.function, t.version)),
        (
            "node",
            match (t.node, r) {
                (Some(n), Some(r)) => format!("{n} ({})", if r.warm { "warm" } else { "cold" }),
                (Some(n), None) => n.to_string(),
                (None, _) => "-".to_string(),
            },
        ),
        (
            "attempts",
            format!(
                "{} ({} failed){}",
                t.attempts,
                t.failures,
                if t.sync { ", sync" } else { ", async" }
            ),
        ),
        ("submitted", fmt_time(t.submitted_ms)),
        ("assigned", since(t.assigned_ms)),
        ("started", since(t.started_ms)),
        ("finished", since(t.finished_ms)),
    ];
    if let Some(r) = r {
        rows.push((
            "run",
            format!(
                "wall {}, cpu {}, peak memory {}",
                fmt_ms(r.wall_ms),
                fmt_ms(r.cpu_ms),
                fmt_bytes(r.peak_memory_bytes)
            ),
        ));
        if let Some(code) = r.exit_code {
            rows.push(("exit code", code.to_string()));
        }
        if let Some(e) = &r.error {
            rows.push(("error", one_line(e)));
        }
    }
    let mut text = format!("task {}\n", t.id);
    for (k, v) in rows {
        text.push_str(&format!("  {k:<10} {v}\n"));
    }
    if let Some(r) = r {
        for (what, bytes) in [("output", &r.output), ("log", &r.log)] {
            if !bytes.is_empty() {
                text.push_str(&format!(
                    "{what} ({} bytes):\n{}\n",
                    bytes.len(),
                    preview(bytes)
                ));
            }
        }
    }
    text.truncate(text.trim_end().len());
    text
}

/// The start of `bytes` as text: at most [`PREVIEW_BYTES`], invalid UTF-8 replaced, control
/// characters other than newline and tab escaped so a terminal shows them harmlessly.
fn preview(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(PREVIEW_BYTES)];
    let mut text: String = String::from_utf8_lossy(shown)
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    if bytes.len() > shown.len() {
        text.push_str(&format!("… ({} more bytes)", bytes.len() - shown.len()));
    }
    text
}

/// Bytes in binary units: exact values as integers (`128M`), others with one decimal.
pub(super) fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    for (size, unit) in UNITS {
        if bytes >= size {
            let whole = bytes / size;
            return if whole * size == bytes {
                format!("{whole}{unit}")
            } else {
                format!("{:.1}{unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes}B")
}

pub(super) fn fmt_ms(ms: u64) -> String {
    if ms == 0 {
        return "0ms".to_string();
    }
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

/// Milliseconds since the Unix epoch as an RFC 3339 time (UTC, seconds).
pub(super) fn fmt_time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub(super) fn stream_json(j: &StreamJob) -> serde_json::Value {
    serde_json::to_value(j).expect("stream jobs serialize")
}

pub(super) fn stream_summary(j: &StreamJob) -> String {
    let c = &j.counters;
    format!(
        "stream {} {} fn={}@{} from={} done={}/{} succeeded={} failed={} running={} retried={} duplicates={} hits={}{}",
        j.id,
        j.state.as_str(),
        j.function,
        j.version,
        j.source.spec(),
        c.succeeded + c.failed,
        c.total.map_or("?".to_string(), |t| t.to_string()),
        c.succeeded,
        c.failed,
        c.running,
        c.retried,
        c.duplicates,
        c.idempotent_hits,
        j.reason
            .as_ref()
            .map(|r| format!(" reason={r:?}"))
            .unwrap_or_default()
    )
}

pub(super) fn format_eta(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// `bench invoke` for people: the sync and async parts on one line, bwrap's on a second.
pub(super) fn bench_invoke_text(r: &InvokeBenchReport) -> String {
    let s = &r.sync;
    let mut text = format!(
        "{} ({}): sync clients={} invocations={} (warm {}) errors={} {:.0}/s p50={:.2}ms p99={:.2}ms | async {} in {:.2}s = {:.0}/s ({} failed)",
        r.function, r.mode, s.workers, s.ok, r.sync_warm, s.errors, s.ok_per_s, s.p50_ms, s.p99_ms,
        r.async_submitted, r.async_elapsed_s, r.async_per_s, r.async_failed
    );
    if let Some(b) = &r.bwrap {
        text.push_str(&format!(
            "\nbwrap one-shot (local, sequential): runs={} errors={} p50={:.2}ms p99={:.2}ms; skiff warm p50 / bwrap p50 = {:.2}",
            b.ok, b.errors, b.p50_ms, b.p99_ms,
            if b.p50_ms > 0.0 { s.p50_ms / b.p50_ms } else { 0.0 }
        ));
    }
    text
}

/// `bench kv` for people: one line.
pub(super) fn bench_kv_text(report: &BenchReport) -> String {
    format!(
        "clients={} writes={} errors={} elapsed={:.2}s writes/s={:.0} p50={:.3}ms p99={:.3}ms",
        report.clients,
        report.writes,
        report.errors,
        report.elapsed_s,
        report.writes_per_s,
        report.p50_ms,
        report.p99_ms
    )
}

/// `token ls` for people: one row per token.
pub(super) fn tokens_table(list: &[TokenInfo]) -> String {
    let mut table = table(["id", "name", "role", "created", "state"]);
    for t in list {
        table.add_row([
            t.id.to_string(),
            t.name.clone().unwrap_or_else(|| "-".into()),
            t.role.to_string(),
            fmt_time(t.created_ms),
            match t.revoked_ms {
                Some(ms) => format!("revoked {}", fmt_time(ms)),
                None => "active".into(),
            },
        ]);
    }
    table.to_string()
}

/// `stream ls` for people: one row per job.
pub(super) fn streams_table(jobs: &[StreamJob]) -> String {
    let mut table = table([
        "ID", "STATE", "FUNCTION", "SOURCE", "DONE", "TOTAL", "FAILED", "RUNNING",
    ]);
    for j in jobs {
        let c = &j.counters;
        table.add_row(vec![
            j.id.to_string(),
            j.state.as_str().to_string(),
            format!("{}@{}", j.function, j.version),
            j.source.spec(),
            (c.succeeded + c.failed).to_string(),
            c.total.map_or("?".to_string(), |t| t.to_string()),
            c.failed.to_string(),
            c.running.to_string(),
        ]);
    }
    table.to_string()
}

/// `task ls` for people: one row per task.
pub(super) fn tasks_table(list: &[Task]) -> String {
    let mut table = table([
        "id",
        "function",
        "state",
        "attempts",
        "node",
        "submitted",
        "wall",
    ]);
    for t in list {
        let mut state = t.state.as_str().to_string();
        if t.dead_letter {
            state.push_str(" (dead)");
        }
        table.add_row([
            t.id.to_string(),
            format!("{}@{}", t.function, t.version),
            state,
            t.attempts.to_string(),
            t.node.map_or("-".to_string(), |n| n.to_string()),
            fmt_time(t.submitted_ms),
            t.result
                .as_ref()
                .map_or("-".to_string(), |r| fmt_ms(r.wall_ms)),
        ]);
    }
    table.to_string()
}

/// `fn ls` for people: one row per function, with its latest version's settings.
pub(super) fn functions_table(latest: &[(&FunctionRecord, &FunctionVersion)]) -> String {
    let mut table = table([
        "name",
        "version",
        "mode",
        "tier",
        "memory",
        "timeout",
        "max concurrency",
        "min warm",
    ]);
    for (f, v) in latest {
        table.add_row([
            f.name.clone(),
            f.latest.to_string(),
            mode_text(&v.spec),
            v.spec.tier.clone(),
            fmt_bytes(v.spec.memory_bytes),
            fmt_ms(v.spec.timeout_ms),
            v.spec.max_concurrency.to_string(),
            v.spec.min_warm.to_string(),
        ]);
    }
    table.to_string()
}

/// `fn ls --json`: each function's latest version with its name and latest version number.
pub(super) fn functions_json(latest: &[(&FunctionRecord, &FunctionVersion)]) -> serde_json::Value {
    let items: Vec<serde_json::Value> = latest
        .iter()
        .map(|(f, v)| {
            let mut item = version_json(v);
            item.insert("name".into(), json!(f.name));
            item.insert("latest".into(), json!(f.latest));
            serde_json::Value::Object(item)
        })
        .collect();
    serde_json::Value::Array(items)
}

/// `fn show --json`: a function with every kept version.
pub(super) fn function_json(f: &FunctionRecord) -> serde_json::Value {
    let versions: Vec<serde_json::Value> = f
        .versions
        .iter()
        .map(|v| serde_json::Value::Object(version_json(v)))
        .collect();
    json!({
        "name": f.name,
        "latest": f.latest,
        "created_ms": f.created_ms,
        "versions": versions,
    })
}

/// `stream status` for people: the summary, the cursor, and each kept failed item.
pub(super) fn stream_status_text(job: &StreamJob) -> String {
    let mut lines = vec![
        stream_summary(job),
        format!(
            "cursor={:?} next_item={} exhausted={} in_flight_invocations={}",
            job.cursor,
            job.next_item,
            job.exhausted,
            job.window.len()
        ),
    ];
    if job.counters.failed_dropped > 0 {
        lines.push(format!(
            "{} failed items were not kept (past the bound) and cannot be redriven",
            job.counters.failed_dropped
        ));
    }
    for f in &job.failed_items {
        let payload = f
            .payload
            .as_ref()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_else(|| "-".into());
        lines.push(format!(
            "failed item {}: {} (item: {payload})",
            f.index, f.error
        ));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Role;
    use crate::deploy;

    #[test]
    fn token_json_never_holds_a_secret_field() {
        let v = token_json(&TokenInfo {
            id: 2,
            name: Some("ci".into()),
            role: Role::Invoker,
            created_ms: 5,
            revoked: false,
            revoked_ms: None,
        });
        let mut keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["created_ms", "id", "name", "revoked", "revoked_ms", "role"]
        );
        assert_eq!(v["role"], "invoker");
    }

    #[test]
    fn show_lists_the_stages_of_a_pipeline() {
        let dir = tempfile::tempdir().expect("temp dir");
        let manifest = dir.path().join("skiff.toml");
        std::fs::write(
            &manifest,
            "name = \"p\"\ncode = \".\"\ntier = \"trusted\"\n\
             [[stage]]\nname = \"parse\"\nentry = \"python3 parse.py\"\ntier = \"untrusted\"\n\
             [[stage]]\nname = \"store\"\nentry = \"sh store.sh\"\ndata_write = [\"out/\"]\n\
             env = { TOKEN = \"secret\" }\n",
        )
        .expect("write");
        let plan = deploy::read_manifest(&manifest, None).expect("manifest");
        let record = FunctionRecord {
            name: "p".into(),
            id: 1,
            versions: vec![FunctionVersion {
                version: 1,
                function_id: 1,
                spec: plan.with_digest(&"ab".repeat(32)),
                deployed_ms: 0,
            }],
            latest: 1,
            created_ms: 0,
        };
        let text = function_text(&record);
        assert!(text.contains("mode             exec, 2 stages"), "{text}");
        assert!(text.contains("  stage 1 parse\n    entry          python3 parse.py\n    tier           untrusted\n"), "{text}");
        assert!(text.contains("  stage 2 store\n"), "{text}");
        assert!(text.contains("    data write     out/\n"), "{text}");
        assert!(text.contains("    env            TOKEN\n"), "{text}");
        assert!(
            !text.contains("secret"),
            "environment values stay out of show: {text}"
        );
        assert!(
            !text.contains("\n  entry"),
            "no function-level entry row: {text}"
        );
        let json = version_json(&record.versions[0]);
        assert_eq!(json["stages"][1]["data_write"][0], "out/");
        assert_eq!(json["stages"][0]["tier"], "untrusted");
    }

    fn finished_task(state: TaskState, output: &[u8], error: Option<&str>) -> Task {
        Task {
            id: 42,
            function: "echo".into(),
            version: 3,
            payload: b"hi".to_vec(),
            sync: true,
            state,
            attempts: 1,
            failures: u32::from(state != TaskState::Succeeded),
            node: Some(2),
            token: 1,
            submitted_ms: 1_000,
            assigned_ms: Some(1_002),
            started_ms: Some(1_010),
            finished_ms: Some(1_050),
            not_before_ms: 0,
            queue_seq: 1,
            memory_bytes: 128 << 20,
            timeout_ms: 30_000,
            result: Some(crate::api::TaskResult {
                status: match state {
                    TaskState::Failed => crate::api::RunStatus::Failed,
                    TaskState::TimedOut => crate::api::RunStatus::TimedOut,
                    _ => crate::api::RunStatus::Succeeded,
                },
                node: 2,
                exit_code: Some(if state == TaskState::Succeeded { 0 } else { 1 }),
                output: output.to_vec(),
                log: b"trace\n".to_vec(),
                error: error.map(String::from),
                warm: true,
                wall_ms: 40,
                cpu_ms: 12,
                peak_memory_bytes: 1 << 20,
            }),
            dead_letter: false,
            cache: None,
            ledger_key: None,
            request_id: None,
        }
    }

    #[test]
    fn task_json_carries_output_as_text_or_base64() {
        let t = finished_task(TaskState::Succeeded, b"{\"ok\":true}", None);
        let v = task_json(&t, true);
        assert_eq!(v["id"], 42);
        assert_eq!(v["state"], "succeeded");
        assert_eq!(v["node"], 2);
        assert_eq!(v["warm"], "warm");
        assert_eq!(v["attempts"], 1);
        assert_eq!(v["output"], "{\"ok\":true}");
        assert!(v.get("output_b64").is_none());
        assert_eq!(v["timings"]["started_ms"], 1_010);
        assert_eq!(v["timings"]["wall_ms"], 40);
        assert_eq!(v["timings"]["cpu_ms"], 12);

        let t = finished_task(TaskState::Succeeded, &[0xff, 0x00, 0x80], None);
        let v = task_json(&t, true);
        assert!(v["output"].is_null());
        assert_eq!(v["output_b64"], "/wCA");
        let summary = task_json(&t, false);
        assert!(summary.get("output").is_none() && summary["output_bytes"] == 3);
    }

    #[test]
    fn failures_are_described_on_one_line() {
        let t = finished_task(TaskState::TimedOut, b"", None);
        let m = failure_message(&t);
        assert!(
            m.contains("timed out") && m.contains("echo@3") && m.contains("30s"),
            "{m}"
        );
        let t = finished_task(TaskState::Failed, b"", Some("out of\nmemory"));
        let m = failure_message(&t);
        assert_eq!(m, "task 42 (echo@3) failed: out of memory");
        let t = finished_task(TaskState::Failed, b"", None);
        assert!(failure_message(&t).ends_with("exited with code 1"));
    }

    #[test]
    fn previews_escape_control_characters_and_stop() {
        assert_eq!(preview(b"a\tb\nc\x1b[2J"), "a\tb\nc\\u{1b}[2J");
        let long = vec![b'x'; PREVIEW_BYTES + 10];
        assert!(preview(&long).ends_with("… (10 more bytes)"));
        assert_eq!(fmt_bytes(128 << 20), "128M");
        assert_eq!(fmt_bytes(1536), "1.5K");
        assert_eq!(fmt_bytes(12), "12B");
    }
}
