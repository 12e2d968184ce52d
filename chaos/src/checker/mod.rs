//! The checkers that turn a run into a verdict.
//!
//! - [`linear`]: every key's operations are linearizable against a register model;
//! - [`acknowledged_writes`]: every acknowledged write is still visible after heal (or was
//!   overwritten by a write that may come after it);
//! - [`replicas`]: every node holds the same state once their applied indexes are equal;
//! - [`availability`]: the healed cluster accepts a write within a bound;
//! - [`calls`]: sync outputs, idempotent effects and stream items of the function workload
//!   (the acknowledged-invocations check is [`crate::invocations::check`]).
//!
//! Each check is valid, invalid (with the violating operations) or unknown (it could not decide,
//! e.g. the search bound was hit or a final read failed). The run's verdict is invalid if any
//! check is, else unknown if any is, else valid: unknown is never reported as valid.

pub mod calls;
pub mod linear;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::history::{describe, Op, OpKind, OpResult, ReadValue, FINAL_READER};
pub use linear::Violation;

/// The outcome of a check or of a whole run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Valid,
    Invalid,
    Unknown,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Valid => "valid",
            Status::Invalid => "invalid",
            Status::Unknown => "unknown",
        })
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    pub name: String,
    pub status: Status,
    pub summary: String,
    pub violations: Vec<Violation>,
}

/// The verdict of a run: its status and every check's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub status: Status,
    pub checks: Vec<CheckReport>,
}

impl Verdict {
    /// Combines checks: invalid beats unknown beats valid.
    pub fn of(checks: Vec<CheckReport>) -> Verdict {
        let status = if checks.iter().any(|c| c.status == Status::Invalid) {
            Status::Invalid
        } else if checks.iter().any(|c| c.status == Status::Unknown) {
            Status::Unknown
        } else {
            Status::Valid
        };
        Verdict { status, checks }
    }
}

/// Checks linearizability of every key; see [`linear`].
pub fn linearizable(history: &[Op], steps_max: u64) -> CheckReport {
    let r = linear::check(history, steps_max);
    let status = if !r.violations.is_empty() {
        Status::Invalid
    } else if !r.unknown.is_empty() {
        Status::Unknown
    } else {
        Status::Valid
    };
    let mut summary = format!(
        "{} keys checked, {} violations",
        r.keys_checked,
        r.violations.len()
    );
    if !r.unknown.is_empty() {
        summary.push_str(&format!("; undecided: {}", r.unknown.join("; ")));
    }
    CheckReport {
        name: "linearizable".into(),
        status,
        summary,
        violations: r.violations,
    }
}

/// Every acknowledged write (ok put, ok CAS, ok delete) is reflected in the final read of its
/// key after heal: the final value is that write's, or that of a write that may be ordered
/// after it (not finished before it began); a final "absent" needs a delete that may be
/// ordered after it. Keys without a successful final read make the check unknown.
pub fn acknowledged_writes(history: &[Op]) -> CheckReport {
    let mut finals: HashMap<&str, &Option<ReadValue>> = HashMap::new();
    for op in history {
        if let (FINAL_READER, OpKind::Get { key }, Some(OpResult::Read { found })) =
            (op.process, &op.kind, op.ok())
        {
            finals.insert(key, found);
        }
    }
    let writer_of: HashMap<&str, &Op> = history
        .iter()
        .filter_map(|op| op.kind.written_value().map(|v| (v, op)))
        .collect();
    // Whether `b` certainly finished before `a` began (so it cannot be ordered after `a`).
    let before = |b: &Op, a: &Op| -> bool {
        !b.is_unknown() && b.complete_ns.is_some_and(|c| c < a.invoke_ns)
    };
    let mut violations = Vec::new();
    let mut unchecked_keys = std::collections::BTreeSet::new();
    let mut acknowledged = 0usize;
    for a in history {
        let is_delete = match (&a.kind, a.ok()) {
            (OpKind::Put { .. } | OpKind::Cas { .. }, Some(OpResult::Written { .. })) => false,
            (OpKind::Delete { .. }, Some(OpResult::Deleted { .. })) => true,
            _ => continue,
        };
        acknowledged += 1;
        let key = a.kind.key();
        let Some(found) = finals.get(key) else {
            unchecked_keys.insert(key.to_string());
            continue;
        };
        let lost = match found {
            Some(r) => match writer_of.get(r.value.as_str()) {
                Some(w) if w.id == a.id => None,
                Some(w) if before(w, a) => Some(format!(
                    "the final value is that of #{}, which finished before this write began",
                    w.id
                )),
                Some(_) => None,
                None => Some(format!("the final value {:?} was never written", r.value)),
            },
            None if is_delete => None,
            None => {
                let later_delete = history.iter().any(|d| {
                    d.kind.key() == key
                        && matches!(d.kind, OpKind::Delete { .. })
                        && (d.is_unknown() || matches!(d.ok(), Some(OpResult::Deleted { .. })))
                        && !before(d, a)
                });
                (!later_delete).then(|| {
                    "the key is absent after heal and no delete may come after this write"
                        .to_string()
                })
            }
        };
        if let Some(why) = lost {
            let final_desc = history
                .iter()
                .rev()
                .find(|op| op.process == FINAL_READER && op.kind.key() == key && op.ok().is_some())
                .map(describe)
                .unwrap_or_default();
            violations.push(Violation {
                key: key.to_string(),
                message: format!("acknowledged write lost: {why}"),
                ops: vec![describe(a), final_desc],
            });
        }
    }
    let status = if !violations.is_empty() {
        Status::Invalid
    } else if !unchecked_keys.is_empty() {
        Status::Unknown
    } else {
        Status::Valid
    };
    let mut summary = format!(
        "{acknowledged} acknowledged writes over {} keys read after heal, {} lost",
        finals.len(),
        violations.len()
    );
    if !unchecked_keys.is_empty() {
        summary.push_str(&format!(
            "; no final read for {} keys: {}",
            unchecked_keys.len(),
            unchecked_keys.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    CheckReport {
        name: "acknowledged-writes".into(),
        status,
        summary,
        violations,
    }
}

/// One node's local view of the keys: key -> value (absent: `None`).
pub type NodeView = BTreeMap<String, Option<ReadValue>>;

/// Every node's local state is the same. `views` holds what could be read (a node that could
/// not be read is missing), `converged` whether the applied indexes became equal first.
pub fn replicas(views: &BTreeMap<u64, NodeView>, nodes: usize, converged: bool) -> CheckReport {
    let name = "replicas-equal".to_string();
    if views.len() < nodes || !converged {
        return CheckReport {
            name,
            status: Status::Unknown,
            summary: format!(
                "read {} of {nodes} nodes; applied indexes {}",
                views.len(),
                if converged {
                    "equal"
                } else {
                    "never became equal"
                }
            ),
            violations: Vec::new(),
        };
    }
    let mut keys: std::collections::BTreeSet<&String> = std::collections::BTreeSet::new();
    for view in views.values() {
        keys.extend(view.keys());
    }
    let mut violations = Vec::new();
    for key in &keys {
        let per_node: Vec<(u64, Option<&ReadValue>)> = views
            .iter()
            .map(|(id, view)| (*id, view.get(*key).and_then(Option::as_ref)))
            .collect();
        if per_node.windows(2).any(|w| w[0].1 != w[1].1) {
            violations.push(Violation {
                key: (*key).clone(),
                message: "nodes disagree on the key's value".into(),
                ops: per_node
                    .iter()
                    .map(|(id, v)| match v {
                        Some(r) => format!("node {id}: {:?} v{}", r.value, r.version),
                        None => format!("node {id}: absent"),
                    })
                    .collect(),
            });
        }
    }
    CheckReport {
        name,
        status: if violations.is_empty() {
            Status::Valid
        } else {
            Status::Invalid
        },
        summary: format!(
            "{} keys compared on {} nodes, {} differ",
            keys.len(),
            views.len(),
            violations.len()
        ),
        violations,
    }
}

/// The healed cluster accepted a write within `bound` (`first_write`: how long the first one
/// took, `None` if none succeeded in the bound).
pub fn availability(first_write: Option<Duration>, bound: Duration) -> CheckReport {
    let (status, summary) = match first_write {
        Some(d) if d <= bound => (
            Status::Valid,
            format!("first write after heal succeeded after {d:.1?} (bound {bound:?})"),
        ),
        Some(d) => (
            Status::Invalid,
            format!("first write after heal took {d:.1?}, over the bound of {bound:?}"),
        ),
        None => (
            Status::Invalid,
            format!("no write succeeded within {bound:?} after heal"),
        ),
    };
    CheckReport {
        name: "available-after-heal".into(),
        status,
        summary,
        violations: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Outcome;

    fn op(id: usize, process: u32, kind: OpKind, t: (u64, u64), outcome: Outcome) -> Op {
        Op {
            id,
            process,
            kind,
            invoke_ns: t.0,
            complete_ns: Some(t.1),
            outcome: Some(outcome),
        }
    }

    fn put(id: usize, v: &str, t: (u64, u64), outcome: Outcome) -> Op {
        let kind = OpKind::Put {
            key: "k".into(),
            value: v.into(),
        };
        op(id, 1, kind, t, outcome)
    }

    fn final_read(id: usize, found: Option<(&str, u64)>, t: (u64, u64)) -> Op {
        let found = found.map(|(v, version)| ReadValue {
            value: v.into(),
            version,
        });
        op(
            id,
            FINAL_READER,
            OpKind::Get { key: "k".into() },
            t,
            Outcome::Ok(OpResult::Read { found }),
        )
    }

    fn written(version: u64) -> Outcome {
        Outcome::Ok(OpResult::Written { version })
    }

    #[test]
    fn lost_acknowledged_write_is_reported() {
        let h = vec![
            put(0, "a", (0, 10), written(1)),
            put(1, "b", (20, 30), written(2)),
            final_read(2, Some(("a", 1)), (100, 110)),
        ];
        let r = acknowledged_writes(&h);
        assert_eq!(r.status, Status::Invalid, "{r:?}");
        assert_eq!(r.violations.len(), 1);
        assert!(r.violations[0].ops[0].starts_with("#1 "), "{r:?}");
        assert_eq!(
            linearizable(&h, linear::SEARCH_STEPS_MAX).status,
            Status::Invalid
        );
    }

    #[test]
    fn write_lost_to_nothing_is_reported() {
        let h = vec![
            put(0, "a", (0, 10), written(1)),
            final_read(1, None, (100, 110)),
        ];
        assert_eq!(acknowledged_writes(&h).status, Status::Invalid);
    }

    #[test]
    fn overwrite_by_a_concurrent_or_unknown_write_is_fine() {
        let h = vec![
            put(0, "a", (0, 10), written(2)),
            put(1, "b", (5, 8), written(1)),
            put(2, "c", (1, 2), Outcome::Unknown("timeout".into())),
            final_read(3, Some(("c", 3)), (100, 110)),
        ];
        let r = acknowledged_writes(&h);
        assert_eq!(r.status, Status::Valid, "{r:?}");
        let d = vec![
            put(0, "a", (0, 10), written(1)),
            op(
                1,
                2,
                OpKind::Delete { key: "k".into() },
                (5, 50),
                Outcome::Unknown("timeout".into()),
            ),
            final_read(2, None, (100, 110)),
        ];
        assert_eq!(acknowledged_writes(&d).status, Status::Valid);
    }

    #[test]
    fn missing_final_read_is_unknown() {
        let h = vec![put(0, "a", (0, 10), written(1))];
        assert_eq!(acknowledged_writes(&h).status, Status::Unknown);
    }

    #[test]
    fn replicas_must_agree() {
        let v = |s: &str, version| {
            Some(ReadValue {
                value: s.into(),
                version,
            })
        };
        let mut views = BTreeMap::new();
        views.insert(1, NodeView::from([("k".to_string(), v("a", 1))]));
        views.insert(2, NodeView::from([("k".to_string(), v("a", 1))]));
        assert_eq!(replicas(&views, 2, true).status, Status::Valid);
        assert_eq!(replicas(&views, 3, true).status, Status::Unknown);
        assert_eq!(replicas(&views, 2, false).status, Status::Unknown);
        views.insert(3, NodeView::from([("k".to_string(), None)]));
        let r = replicas(&views, 3, true);
        assert_eq!(r.status, Status::Invalid);
        assert_eq!(r.violations[0].ops.len(), 3);
    }

    #[test]
    fn verdict_combines_checks() {
        let c = |status| CheckReport {
            name: "x".into(),
            status,
            summary: String::new(),
            violations: Vec::new(),
        };
        assert_eq!(Verdict::of(vec![c(Status::Valid)]).status, Status::Valid);
        assert_eq!(
            Verdict::of(vec![c(Status::Valid), c(Status::Unknown)]).status,
            Status::Unknown
        );
        assert_eq!(
            Verdict::of(vec![c(Status::Unknown), c(Status::Invalid)]).status,
            Status::Invalid
        );
        let bound = Duration::from_secs(30);
        assert_eq!(
            availability(Some(Duration::from_secs(1)), bound).status,
            Status::Valid
        );
        assert_eq!(availability(None, bound).status, Status::Invalid);
    }
}
