//! Checks of the function part of a run: sync answers, idempotent effects, stream items.
//!
//! - [`sync_outputs`]: every ok answer of a synchronous call carries the function's own
//!   output for its payload (the echo answers the payload; the idempotent function answers
//!   `<payload> <dependency> <run>`).
//! - [`idempotent_effects`]: at most one effect per (payload, dependency state) among the
//!   runs the cluster reported as succeeded, unless the cluster's ledger explains the rerun;
//!   every reported run left its effect; a hit answers its source run's output.
//! - [`stream_items`]: after a job completes, every item of its data set has its result (at
//!   least one call per item), and the result is that item's.
//!
//! All three are pure functions of what the run recorded and read back, so hand-made inputs
//! prove they can fail (the tests below).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use skiff_client::api::{CacheOutcome, MissReason, StreamState};

use super::{CheckReport, Status, Violation};
use crate::calls::{describe, CallKind, CallOp, CallResult, EFFECT_PREFIX};
use crate::streams::{item, Settled};

/// Every ok answer of a sync call carries the function's output for its own payload.
pub fn sync_outputs(history: &[CallOp]) -> CheckReport {
    let mut violations = Vec::new();
    let (mut ok, mut fail, mut unknown) = (0usize, 0usize, 0usize);
    for op in history {
        let payload = match &op.kind {
            CallKind::Sync { payload } | CallKind::Idempotent { payload } => payload,
            _ => continue,
        };
        match op.ok() {
            Some(CallResult::Succeeded { output, .. }) => {
                ok += 1;
                let right = match &op.kind {
                    CallKind::Sync { .. } => output == payload,
                    _ => output.split(' ').next() == Some(payload.as_str()),
                };
                if !right {
                    violations.push(Violation {
                        key: payload.clone(),
                        message: format!(
                            "a successful call answered {output:?}, not its own payload's output"
                        ),
                        ops: vec![describe(op)],
                    });
                }
            }
            Some(_) => {}
            None if op.is_fail() => fail += 1,
            None => unknown += 1,
        }
    }
    CheckReport {
        name: "sync-outputs".into(),
        status: if violations.is_empty() {
            Status::Valid
        } else {
            Status::Invalid
        },
        summary: format!(
            "{ok} ok (fail {fail}, unknown {unknown}) sync calls, {} with a wrong output",
            violations.len()
        ),
        violations,
    }
}

/// A succeeded task of the idempotent function, as listed after heal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub task: u64,
    pub payload: String,
    pub output: String,
    pub cache: Option<CacheOutcome>,
}

/// One marker key, split into what it records.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Effect {
    payload: String,
    dependency: String,
    run: String,
}

fn parse_effect(key: &str) -> Option<Effect> {
    let mut parts = key.strip_prefix(EFFECT_PREFIX)?.splitn(3, '/');
    Some(Effect {
        payload: parts.next()?.to_string(),
        dependency: parts.next()?.to_string(),
        run: parts.next()?.to_string(),
    })
}

fn parse_output(output: &str) -> Option<Effect> {
    let mut parts = output.split(' ');
    let e = Effect {
        payload: parts.next()?.to_string(),
        dependency: parts.next()?.to_string(),
        run: parts.next()?.to_string(),
    };
    parts.next().is_none().then_some(e)
}

/// Whether the ledger's reason for running again says the recorded state of the earlier run
/// differs from the current one although the value its run read is the same: its declared
/// dependency was recorded when it was queued and changed while it ran, or the run the
/// ledger held last was lost or failed (an at-least-once retry of a lost node's task).
fn rerun_explained(reason: &MissReason) -> bool {
    matches!(
        reason,
        MissReason::DependencyChanged { .. }
            | MissReason::PreviousRunLost
            | MissReason::PreviousRunFailed
    )
}

/// At most one effect per idempotent run whose dependencies did not change.
///
/// `runs` are the succeeded tasks of the idempotent function; `effect_keys` every key under
/// [`EFFECT_PREFIX`]; `complete` whether both listings were read in full. A task that ran
/// (a miss) reports its run in its output; hits and joined tasks report another task's run.
/// Violations: two reported runs for one (payload, dependency value) where the later one's
/// miss reason does not explain a rerun (e.g. `first run` after a run was recorded: the
/// ledger forgot it, or two concurrent identical calls both ran); a reported run whose
/// marker is missing; a hit whose output is not its source run's.
pub fn idempotent_effects(
    runs: &[RunRecord],
    effect_keys: &[String],
    complete: bool,
) -> CheckReport {
    let effects: BTreeSet<Effect> = effect_keys.iter().filter_map(|k| parse_effect(k)).collect();
    let by_task: HashMap<u64, &RunRecord> = runs.iter().map(|r| (r.task, r)).collect();
    let mut violations = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<(&RunRecord, Effect)>> = BTreeMap::new();
    let (mut ran, mut hits, mut joined, mut explained) = (0usize, 0usize, 0usize, 0usize);
    let show = |r: &RunRecord| {
        let cache = match &r.cache {
            Some(CacheOutcome::Miss { reason }) => format!("miss: {reason}"),
            Some(CacheOutcome::Hit { source_task }) => format!("hit of task {source_task}"),
            Some(CacheOutcome::Joined { task }) => format!("joined task {task}"),
            None => "no cache outcome".into(),
        };
        format!(
            "task {} payload {:?} -> {:?} ({cache})",
            r.task, r.payload, r.output
        )
    };
    let mut reported = BTreeSet::new();
    for r in runs {
        match &r.cache {
            Some(CacheOutcome::Hit { source_task }) => {
                hits += 1;
                if let Some(src) = by_task.get(source_task) {
                    if src.output != r.output {
                        violations.push(Violation {
                            key: r.payload.clone(),
                            message: format!(
                                "a hit answered {:?}, its source task {} answered {:?}",
                                r.output, src.task, src.output
                            ),
                            ops: vec![show(r), show(src)],
                        });
                    }
                }
                continue;
            }
            Some(CacheOutcome::Joined { .. }) => {
                joined += 1;
                continue;
            }
            Some(CacheOutcome::Miss { .. }) | None => {}
        }
        ran += 1;
        let Some(e) = parse_output(&r.output).filter(|e| e.payload == r.payload) else {
            violations.push(Violation {
                key: r.payload.clone(),
                message: format!(
                    "a run answered {:?}, not its own payload's output",
                    r.output
                ),
                ops: vec![show(r)],
            });
            continue;
        };
        if !effects.contains(&e) {
            violations.push(Violation {
                key: r.payload.clone(),
                message: format!(
                    "task {} reported run {} at dependency {:?}, but its marker is missing",
                    r.task, e.run, e.dependency
                ),
                ops: vec![show(r)],
            });
        }
        reported.insert(e.clone());
        groups
            .entry((e.payload.clone(), e.dependency.clone()))
            .or_default()
            .push((r, e));
    }
    for ((payload, dependency), mut group) in groups {
        // Task ids grow in log order: the order in which the ledger decided.
        group.sort_by_key(|(r, _)| r.task);
        group.dedup_by(|a, b| a.1.run == b.1.run);
        let Some(((first, _), later)) = group.split_first() else {
            continue;
        };
        for (r, _) in later {
            match &r.cache {
                Some(CacheOutcome::Miss { reason }) if rerun_explained(reason) => explained += 1,
                _ => violations.push(Violation {
                    key: format!("{payload} @ {dependency}"),
                    message: format!(
                        "two effects for payload {payload:?} at dependency {dependency:?}: \
                         task {} ran again after task {} had run",
                        r.task, first.task
                    ),
                    ops: vec![show(first), show(r)],
                }),
            }
        }
    }
    let unreported = effects.iter().filter(|e| !reported.contains(e)).count();
    let status = if !violations.is_empty() {
        Status::Invalid
    } else if !complete {
        Status::Unknown
    } else {
        Status::Valid
    };
    CheckReport {
        name: "idempotent-effects".into(),
        status,
        summary: format!(
            "{ran} runs reported ({hits} hits, {joined} joined), {} markers ({unreported} of \
             runs never reported: lost or failed), {explained} reruns at one dependency value \
             explained by the ledger, {} violations{}",
            effects.len(),
            violations.len(),
            if complete {
                ""
            } else {
                "; the listings were not read in full"
            }
        ),
        violations,
    }
}

/// Whether two texts are the same JSON value (a batch's results are re-serialized, so key
/// order may differ from the item's line).
fn same_json(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// After each job completed, every item of its data set has its result, and it is the
/// item's own (the echo function's output for it). A job still running, or whose results
/// could not be read, makes the check unknown.
pub fn stream_items(jobs: &[Settled]) -> CheckReport {
    let mut violations = Vec::new();
    let mut undecided = Vec::new();
    let mut items_checked = 0u64;
    for s in jobs {
        let job = s.started.job;
        let finished = s.state.is_some_and(|st| st != StreamState::Running);
        if !finished || s.results_unread {
            undecided.push(format!(
                "job {job} {}",
                if s.results_unread {
                    "results unread"
                } else {
                    "not finished"
                }
            ));
            continue;
        }
        if s.total != Some(s.started.items) {
            violations.push(Violation {
                key: format!("stream job {job}"),
                message: format!(
                    "the job counted {:?} items in a data set of {}",
                    s.total, s.started.items
                ),
                ops: vec![],
            });
        }
        let mut missing = Vec::new();
        for i in 0..s.started.items {
            items_checked += 1;
            match s.results.get(&i) {
                None => missing.push(i),
                Some(r) if !same_json(r, &item(s.started.seq, i)) => violations.push(Violation {
                    key: format!("stream job {job} item {i}"),
                    message: format!(
                        "the result of item {i} is {r:?}, not {:?}",
                        item(s.started.seq, i)
                    ),
                    ops: vec![],
                }),
                Some(_) => {}
            }
        }
        if !missing.is_empty() {
            let shown: Vec<String> = missing.iter().take(20).map(u64::to_string).collect();
            violations.push(Violation {
                key: format!("stream job {job}"),
                message: format!(
                    "{} items have no result after the job ended {} (succeeded {}, failed {}): \
                     items {}{}",
                    missing.len(),
                    s.state.map_or("?", |st| st.as_str()),
                    s.succeeded,
                    s.failed,
                    shown.join(", "),
                    if missing.len() > shown.len() {
                        ", ..."
                    } else {
                        ""
                    }
                ),
                ops: vec![],
            });
        }
        if let Some(extra) = s.results.keys().find(|i| **i >= s.started.items) {
            violations.push(Violation {
                key: format!("stream job {job}"),
                message: format!("a result for item {extra}, past the data set"),
                ops: vec![],
            });
        }
    }
    let status = if !violations.is_empty() {
        Status::Invalid
    } else if !undecided.is_empty() {
        Status::Unknown
    } else {
        Status::Valid
    };
    let mut summary = format!(
        "{} jobs, {items_checked} items checked, {} violations",
        jobs.len(),
        violations.len()
    );
    if !undecided.is_empty() {
        summary.push_str(&format!("; undecided: {}", undecided.join(", ")));
    }
    CheckReport {
        name: "stream-items".into(),
        status,
        summary,
        violations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Op, Outcome};
    use crate::streams::Started;

    fn miss(reason: MissReason) -> Option<CacheOutcome> {
        Some(CacheOutcome::Miss { reason })
    }

    fn run(task: u64, p: &str, d: &str, r: &str, cache: Option<CacheOutcome>) -> RunRecord {
        RunRecord {
            task,
            payload: p.into(),
            output: format!("{p} {d} {r}"),
            cache,
        }
    }

    fn marker(p: &str, d: &str, r: &str) -> String {
        format!("{EFFECT_PREFIX}{p}/{d}/{r}")
    }

    #[test]
    fn one_run_per_dependency_value_with_hits_is_valid() {
        let runs = vec![
            run(1, "q0", "d5", "aa", miss(MissReason::FirstRun)),
            run(
                2,
                "q0",
                "d5",
                "aa",
                Some(CacheOutcome::Hit { source_task: 1 }),
            ),
            run(3, "q0", "d5", "aa", Some(CacheOutcome::Joined { task: 1 })),
            run(
                4,
                "q0",
                "d9",
                "bb",
                miss(MissReason::DependencyChanged {
                    dependency: "kv:chaos-once/dep".into(),
                    was: "version 5".into(),
                    now: "version 9".into(),
                }),
            ),
        ];
        let keys = vec![marker("q0", "d5", "aa"), marker("q0", "d9", "bb")];
        let r = idempotent_effects(&runs, &keys, true);
        assert_eq!(r.status, Status::Valid, "{r:?}");
    }

    #[test]
    fn a_double_effect_at_one_dependency_value_is_invalid() {
        // The ledger forgot task 1's run: task 2 ran again as a "first run" although the
        // dependency never changed.
        let runs = vec![
            run(1, "q1", "d5", "aa", miss(MissReason::FirstRun)),
            run(2, "q1", "d5", "bb", miss(MissReason::FirstRun)),
        ];
        let keys = vec![marker("q1", "d5", "aa"), marker("q1", "d5", "bb")];
        let r = idempotent_effects(&runs, &keys, true);
        assert_eq!(r.status, Status::Invalid, "{r:?}");
        assert_eq!(r.violations.len(), 1);
        assert!(r.violations[0].message.contains("two effects"), "{r:?}");
        assert_eq!(r.violations[0].ops.len(), 2, "both runs are named");
    }

    #[test]
    fn a_rerun_the_ledger_explains_is_not_a_violation() {
        let runs = vec![
            run(1, "q2", "d5", "aa", miss(MissReason::FirstRun)),
            run(2, "q2", "d5", "bb", miss(MissReason::PreviousRunLost)),
        ];
        let keys = vec![marker("q2", "d5", "aa"), marker("q2", "d5", "bb")];
        assert_eq!(idempotent_effects(&runs, &keys, true).status, Status::Valid);
    }

    #[test]
    fn a_reported_run_without_its_marker_and_a_wrong_hit_are_invalid() {
        let runs = vec![run(1, "q3", "d5", "aa", miss(MissReason::FirstRun))];
        let r = idempotent_effects(&runs, &[], true);
        assert_eq!(r.status, Status::Invalid, "{r:?}");
        assert!(r.violations[0].message.contains("marker is missing"));

        let mut hit = run(
            2,
            "q3",
            "d5",
            "zz",
            Some(CacheOutcome::Hit { source_task: 1 }),
        );
        hit.output = "q3 d5 zz".into();
        let runs = vec![runs[0].clone(), hit];
        let r = idempotent_effects(&runs, &[marker("q3", "d5", "aa")], true);
        assert_eq!(r.status, Status::Invalid, "{r:?}");
    }

    #[test]
    fn unread_listings_make_the_check_unknown() {
        let r = idempotent_effects(&[], &[], false);
        assert_eq!(r.status, Status::Unknown);
    }

    fn settled(results: BTreeMap<u64, String>, state: StreamState) -> Settled {
        Settled {
            started: Started {
                job: 7,
                seq: 2,
                items: 5,
                results_prefix: "r/".into(),
            },
            state: Some(state),
            total: Some(5),
            succeeded: results.len() as u64,
            failed: 0,
            results,
            results_unread: false,
        }
    }

    #[test]
    fn every_item_with_its_result_is_valid() {
        // Results come back re-serialized: key order is not significant.
        let all: BTreeMap<u64, String> = (0..5)
            .map(|i| (i, format!("{{\"i\":{i},\"j\":2}}")))
            .collect();
        let r = stream_items(&[settled(all, StreamState::Succeeded)]);
        assert_eq!(r.status, Status::Valid, "{r:?}");
    }

    #[test]
    fn a_skipped_stream_item_is_invalid() {
        let mut some: BTreeMap<u64, String> = (0..5).map(|i| (i, item(2, i))).collect();
        some.remove(&3);
        let r = stream_items(&[settled(some, StreamState::Succeeded)]);
        assert_eq!(r.status, Status::Invalid, "{r:?}");
        assert!(r.violations[0].message.contains("items 3"), "{r:?}");
    }

    #[test]
    fn a_wrong_result_is_invalid_and_a_running_job_unknown() {
        let mut wrong: BTreeMap<u64, String> = (0..5).map(|i| (i, item(2, i))).collect();
        wrong.insert(1, item(2, 4));
        let r = stream_items(&[settled(wrong, StreamState::Succeeded)]);
        assert_eq!(r.status, Status::Invalid, "{r:?}");
        let r = stream_items(&[settled(BTreeMap::new(), StreamState::Running)]);
        assert_eq!(r.status, Status::Unknown, "{r:?}");
    }

    #[test]
    fn a_sync_answer_of_another_payload_is_invalid() {
        let op = |id, payload: &str, output: &str| Op {
            id,
            process: 1000,
            kind: CallKind::Sync {
                payload: payload.into(),
            },
            invoke_ns: 0,
            complete_ns: Some(1),
            outcome: Some(Outcome::Ok(CallResult::Succeeded {
                task: id as u64,
                output: output.into(),
                cache: None,
            })),
        };
        let good = vec![op(0, "a", "a")];
        assert_eq!(sync_outputs(&good).status, Status::Valid);
        let bad = vec![op(0, "a", "a"), op(1, "b", "a")];
        let r = sync_outputs(&bad);
        assert_eq!(r.status, Status::Invalid, "{r:?}");
        assert_eq!(r.violations.len(), 1);
    }
}
