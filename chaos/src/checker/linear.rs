//! Linearizability of the kv operations, key by key: a search for a total order of each key's
//! operations that respects real time and a register model, in the manner of Wing & Gong as
//! refined by Lowe and used by Knossos and Porcupine (depth-first with a cache of
//! (linearized set, state) pairs already explored).
//!
//! The model: a key holds nothing, or the value of one write operation (values are unique per
//! run, so the state is that write's [`OpId`]). Versions are revisions of one counter shared
//! by the key space: a write's version is known once any answer shows it (its own ok result, a
//! read that returned its value); a CAS succeeds exactly when the key's version equals the
//! expected one (0: absent). A write whose version no answer ever showed has an "unseen"
//! version: it may equal any version not owned by another write.
//!
//! Operations that certainly failed are left out; reads whose outcome is unknown are left out
//! (they change nothing); writes whose outcome is unknown may take effect at any point after
//! their invocation, or never (they return "at infinity", after everything, where taking effect
//! is invisible).
//!
//! The search is bounded ([`SEARCH_STEPS_MAX`] by default): past it a key is reported unknown,
//! never valid.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::history::{describe, Op, OpId, OpKind, OpResult};

/// Default bound on search steps for one key, past which the key is reported unknown.
pub const SEARCH_STEPS_MAX: u64 = 20_000_000;
/// Most operations named in one violation.
const VIOLATION_OPS_MAX: usize = 8;

/// A problem the checker found, with the operations involved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub key: String,
    pub message: String,
    /// The operations involved, described one per line.
    pub ops: Vec<String>,
}

/// The verdict on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyVerdict {
    Linearizable,
    Violation(Violation),
    /// The search hit its bound.
    Unknown(String),
}

/// The verdict on every key of a history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearReport {
    pub keys_checked: usize,
    pub violations: Vec<Violation>,
    /// Keys whose search hit the bound, with why.
    pub unknown: Vec<String>,
}

/// Facts about writes gathered from every answer in the history.
struct Facts<'h> {
    history: &'h [Op],
    /// Value -> the write that stored it.
    writer_of: HashMap<&'h str, OpId>,
    /// Write -> its version, when an answer showed it.
    version_of: HashMap<OpId, u64>,
    /// Version -> the write that holds it.
    owner_of: HashMap<u64, OpId>,
}

/// The version of the register's state, as far as the answers tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Known(u64),
    Unseen,
}

type State = Option<OpId>;

/// The state after an unknown write that no answer ever showed. All such writes behave the
/// same in the model (their versions are unseen, no read returned them), so they share one
/// state, which lets the search's cache merge paths that differ only in which one applied.
const UNSEEN_WRITE: OpId = OpId::MAX;

impl<'h> Facts<'h> {
    /// Gathers the facts; contradictions among answers (a value no write stored, one write
    /// with two versions, one version on two writes) are violations on their own.
    fn gather(history: &'h [Op]) -> (Facts<'h>, Vec<Violation>) {
        let mut facts = Facts {
            history,
            writer_of: HashMap::new(),
            version_of: HashMap::new(),
            owner_of: HashMap::new(),
        };
        let mut violations = Vec::new();
        for op in history {
            if let Some(v) = op.kind.written_value() {
                facts.writer_of.insert(v, op.id);
            }
        }
        let observe = |facts: &mut Facts<'h>,
                       violations: &mut Vec<Violation>,
                       writer: OpId,
                       version: u64,
                       by: &Op| {
            let key = history[writer].kind.key().to_string();
            if let Some(&known) = facts.version_of.get(&writer) {
                if known != version {
                    violations.push(Violation {
                        key,
                        message: format!(
                            "one write seen at two versions (v{known} and v{version})"
                        ),
                        ops: vec![describe(&history[writer]), describe(by)],
                    });
                    return;
                }
            }
            if let Some(&owner) = facts.owner_of.get(&version) {
                if owner != writer {
                    violations.push(Violation {
                        key,
                        message: format!("version v{version} held by two writes"),
                        ops: vec![
                            describe(&history[owner]),
                            describe(&history[writer]),
                            describe(by),
                        ],
                    });
                    return;
                }
            }
            facts.version_of.insert(writer, version);
            facts.owner_of.insert(version, writer);
        };
        for op in history {
            match op.ok() {
                Some(OpResult::Written { version }) => {
                    observe(&mut facts, &mut violations, op.id, *version, op)
                }
                Some(OpResult::Read { found: Some(r) }) => {
                    match facts.writer_of.get(r.value.as_str()).copied() {
                        None => violations.push(Violation {
                            key: op.kind.key().to_string(),
                            message: format!("read a value no operation wrote: {:?}", r.value),
                            ops: vec![describe(op)],
                        }),
                        Some(w) if history[w].kind.key() != op.kind.key() => {
                            violations.push(Violation {
                                key: op.kind.key().to_string(),
                                message: "read a value written to another key".to_string(),
                                ops: vec![describe(&history[w]), describe(op)],
                            })
                        }
                        Some(w) if history[w].is_fail() => violations.push(Violation {
                            key: op.kind.key().to_string(),
                            message: "read the value of a write that failed".to_string(),
                            ops: vec![describe(&history[w]), describe(op)],
                        }),
                        Some(w) => observe(&mut facts, &mut violations, w, r.version, op),
                    }
                }
                _ => {}
            }
        }
        (facts, violations)
    }

    /// The state once write `id` took effect.
    fn written(&self, id: OpId) -> State {
        if self.version_of.contains_key(&id) {
            Some(id)
        } else {
            Some(UNSEEN_WRITE)
        }
    }

    fn version(&self, s: State) -> Version {
        match s {
            None => Version::Known(0),
            Some(w) => self
                .version_of
                .get(&w)
                .map_or(Version::Unseen, |v| Version::Known(*v)),
        }
    }

    /// Whether the register's version in state `s` may be `v`.
    fn could_be(&self, s: State, v: u64) -> bool {
        match self.version(s) {
            Version::Known(x) => x == v,
            Version::Unseen => v != 0 && self.owner_of.get(&v).is_none_or(|o| Some(*o) == s),
        }
    }

    /// The state after `op` from `s`, or `None` if its answer is impossible from `s`. `None`
    /// as the answer means the outcome is unknown (the op takes effect here).
    fn step(&self, s: State, op: &Op) -> Option<State> {
        let result = op.ok();
        match (&op.kind, result) {
            (OpKind::Put { .. }, Some(OpResult::Written { version })) => match self.version(s) {
                Version::Known(prev) if *version <= prev => None,
                _ => Some(Some(op.id)),
            },
            (OpKind::Put { .. }, None) => Some(self.written(op.id)),
            (OpKind::Cas { expect_version, .. }, Some(OpResult::Written { version })) => {
                (self.could_be(s, *expect_version) && version > expect_version)
                    .then_some(Some(op.id))
            }
            (OpKind::Cas { expect_version, .. }, Some(OpResult::Conflict { current })) => {
                (current != expect_version && self.could_be(s, *current)).then_some(s)
            }
            // An unseen version cannot be the expected one: the worker learned the expected
            // version from an answer, and that answer made the version known.
            (OpKind::Cas { expect_version, .. }, None) => match self.version(s) {
                Version::Known(x) if x == *expect_version => Some(self.written(op.id)),
                _ => Some(s),
            },
            (OpKind::Delete { .. }, Some(OpResult::Deleted { version })) => {
                (s.is_some() && self.could_be(s, *version)).then_some(None)
            }
            (OpKind::Delete { .. }, Some(OpResult::NotFound)) => s.is_none().then_some(None),
            (OpKind::Delete { .. }, None) => Some(None),
            (OpKind::Get { .. }, Some(OpResult::Read { found: None })) => s.is_none().then_some(s),
            (OpKind::Get { .. }, Some(OpResult::Read { found: Some(r) })) => {
                let w = self.writer_of.get(r.value.as_str()).copied();
                (w.is_some() && s == w).then_some(s)
            }
            _ => None,
        }
    }

    fn describe_state(&self, s: State) -> String {
        match s {
            None => "absent".to_string(),
            Some(UNSEEN_WRITE) => "the value of an unknown write no answer showed".to_string(),
            Some(w) => format!("the value of {}", describe(&self.history[w])),
        }
    }
}

/// Checks every key of `history`, each search bounded by `steps_max`.
pub fn check(history: &[Op], steps_max: u64) -> LinearReport {
    let (facts, mut violations) = Facts::gather(history);
    let mut by_key: HashMap<&str, Vec<&Op>> = HashMap::new();
    for op in history {
        // Failed ops did nothing; unknown reads observed nothing.
        if op.is_fail() || (op.kind.is_read() && op.is_unknown()) {
            continue;
        }
        by_key.entry(op.kind.key()).or_default().push(op);
    }
    let mut keys: Vec<&str> = by_key.keys().copied().collect();
    keys.sort_unstable();
    let mut report = LinearReport {
        keys_checked: keys.len(),
        ..LinearReport::default()
    };
    for key in keys {
        match check_key(key, &by_key[key], &facts, steps_max) {
            KeyVerdict::Linearizable => {}
            KeyVerdict::Violation(v) => violations.push(v),
            KeyVerdict::Unknown(why) => report.unknown.push(format!("{key}: {why}")),
        }
    }
    report.violations = violations;
    report
}

const NIL: usize = usize::MAX;

/// One event of the doubly linked list the search walks: the call or the return of an op.
struct Node {
    /// Index into the key's op list.
    call: usize,
    is_call: bool,
    prev: usize,
    next: usize,
    /// For a call, the node of its return.
    ret: usize,
}

struct Events {
    nodes: Vec<Node>,
    head: usize,
}

impl Events {
    fn build(ops: &[&Op]) -> Events {
        // Returns of unknown ops sit after every other event: they may take effect any time.
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
        for (i, op) in ops.iter().enumerate() {
            let ret = if op.is_unknown() {
                u64::MAX
            } else {
                op.complete_ns.unwrap_or(u64::MAX)
            };
            events.push((op.invoke_ns, true, i));
            events.push((ret, false, i));
        }
        // On equal times calls come first: then the two ops count as concurrent, the
        // permissive reading of a tie.
        events.sort_by_key(|&(t, is_call, i)| (t, !is_call, i));
        let head = events.len();
        let mut nodes: Vec<Node> = Vec::with_capacity(events.len() + 1);
        let mut ret_node = vec![NIL; ops.len()];
        for (pos, &(_, is_call, i)) in events.iter().enumerate() {
            if !is_call {
                ret_node[i] = pos;
            }
            nodes.push(Node {
                call: i,
                is_call,
                prev: if pos == 0 { head } else { pos - 1 },
                next: if pos + 1 == events.len() {
                    NIL
                } else {
                    pos + 1
                },
                ret: NIL,
            });
        }
        for node in nodes.iter_mut() {
            if node.is_call {
                node.ret = ret_node[node.call];
            }
        }
        nodes.push(Node {
            call: NIL,
            is_call: false,
            prev: NIL,
            next: if events.is_empty() { NIL } else { 0 },
            ret: NIL,
        });
        Events { nodes, head }
    }

    fn unlink(&mut self, i: usize) {
        let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
        self.nodes[prev].next = next;
        if next != NIL {
            self.nodes[next].prev = prev;
        }
    }

    fn relink(&mut self, i: usize) {
        let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
        self.nodes[prev].next = i;
        if next != NIL {
            self.nodes[next].prev = i;
        }
    }

    /// Takes a call and its return out of the list (the op is linearized).
    fn lift(&mut self, call: usize) {
        let ret = self.nodes[call].ret;
        self.unlink(call);
        self.unlink(ret);
    }

    /// Undoes [`Events::lift`]; must be called in the reverse order of the lifts.
    fn unlift(&mut self, call: usize) {
        let ret = self.nodes[call].ret;
        self.relink(ret);
        self.relink(call);
    }

    fn first(&self) -> usize {
        self.nodes[self.head].next
    }
}

/// For each op, the op that must be linearized before it may be, if any.
///
/// Unknown writes no answer showed are interchangeable: each may take effect any time after
/// its invocation, and they leave the same state. So are unknown deletes. Linearizing such ops
/// only in invocation order loses no linearization (swap any two) and turns the 2^k subsets
/// of k pending ones into k + 1 prefixes.
fn interchangeable_chains(ops: &[&Op], facts: &Facts<'_>) -> Vec<Option<usize>> {
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_by_key(|&i| (ops[i].invoke_ns, i));
    let mut before = vec![None; ops.len()];
    let (mut last_put, mut last_delete) = (None, None);
    for i in order {
        let op = ops[i];
        if !op.is_unknown() {
            continue;
        }
        let chain = match op.kind {
            OpKind::Put { .. } if !facts.version_of.contains_key(&op.id) => &mut last_put,
            OpKind::Delete { .. } => &mut last_delete,
            _ => continue,
        };
        before[i] = *chain;
        *chain = Some(i);
    }
    before
}

fn check_key(key: &str, ops: &[&Op], facts: &Facts<'_>, steps_max: u64) -> KeyVerdict {
    let mut events = Events::build(ops);
    let must_follow = interchangeable_chains(ops, facts);
    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut entry = events.first();
    let mut steps: u64 = 0;
    // The deepest point the search reached, for the report: (depth, state, blocked op).
    let mut deepest: Option<(usize, State, usize, Vec<usize>)> = None;
    while events.first() != NIL {
        steps += 1;
        if steps > steps_max {
            return KeyVerdict::Unknown(format!(
                "search gave up after {steps_max} steps over {} operations",
                ops.len()
            ));
        }
        let node = &events.nodes[entry];
        if node.is_call {
            let call = node.call;
            let next = node.next;
            let in_order =
                must_follow[call].is_none_or(|b| linearized[b / 64] & (1 << (b % 64)) != 0);
            if let Some(new_state) = in_order.then(|| facts.step(state, ops[call])).flatten() {
                linearized[call / 64] |= 1 << (call % 64);
                if seen.insert((linearized.clone(), new_state)) {
                    stack.push((entry, state));
                    state = new_state;
                    events.lift(entry);
                    entry = events.first();
                    continue;
                }
                linearized[call / 64] &= !(1 << (call % 64));
            }
            entry = next;
        } else {
            // A return whose call is not linearized: nothing pending can go first. Back up.
            if deepest.as_ref().is_none_or(|d| stack.len() > d.0) {
                let mut pending = Vec::new();
                let mut i = events.first();
                while i != entry && i != NIL && pending.len() < VIOLATION_OPS_MAX {
                    if events.nodes[i].is_call {
                        pending.push(events.nodes[i].call);
                    }
                    i = events.nodes[i].next;
                }
                deepest = Some((stack.len(), state, node.call, pending));
            }
            let Some((call_entry, prev_state)) = stack.pop() else {
                return KeyVerdict::Violation(violation(key, ops, facts, deepest));
            };
            state = prev_state;
            let call = events.nodes[call_entry].call;
            linearized[call / 64] &= !(1 << (call % 64));
            events.unlift(call_entry);
            entry = events.nodes[call_entry].next;
        }
    }
    KeyVerdict::Linearizable
}

fn violation(
    key: &str,
    ops: &[&Op],
    facts: &Facts<'_>,
    deepest: Option<(usize, State, usize, Vec<usize>)>,
) -> Violation {
    let Some((depth, state, blocked, pending)) = deepest else {
        return Violation {
            key: key.to_string(),
            message: "no linearization exists".to_string(),
            ops: Vec::new(),
        };
    };
    let mut described = vec![describe(ops[blocked])];
    described.extend(
        pending
            .iter()
            .filter(|&&i| i != blocked)
            .map(|&i| describe(ops[i])),
    );
    // The write acknowledged last before the blocked op began: what a stale read missed.
    let began = ops[blocked].invoke_ns;
    let last_acked = ops
        .iter()
        .filter(|op| !op.kind.is_read() && op.ok().is_some())
        .filter(|op| op.complete_ns.is_some_and(|c| c < began))
        .max_by_key(|op| op.complete_ns);
    if let Some(op) = last_acked {
        described.push(format!(
            "last write acknowledged before it began: {}",
            describe(op)
        ));
    }
    Violation {
        key: key.to_string(),
        message: format!(
            "not linearizable: after the longest valid prefix ({depth} of {} operations, the key \
             holding {}), operation #{} cannot take effect before it returns; the first line is \
             that operation, then those pending with it",
            ops.len(),
            facts.describe_state(state),
            ops[blocked].id,
        ),
        ops: described,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Outcome, ReadValue};

    /// A small builder of hand-made histories; times are in milliseconds.
    struct H(Vec<Op>);

    impl H {
        fn new() -> H {
            H(Vec::new())
        }

        fn push(&mut self, kind: OpKind, t: (u64, Option<u64>), outcome: Option<Outcome>) -> OpId {
            let id = self.0.len();
            self.0.push(Op {
                id,
                process: id as u32,
                kind,
                invoke_ns: t.0 * 1_000_000,
                complete_ns: t.1.map(|c| c * 1_000_000),
                outcome,
            });
            id
        }

        fn put(&mut self, v: &str, t: (u64, u64), version: Option<u64>) -> OpId {
            let outcome = match version {
                Some(version) => Outcome::Ok(OpResult::Written { version }),
                None => Outcome::Unknown("timed out".into()),
            };
            let kind = OpKind::Put {
                key: "k".into(),
                value: v.into(),
            };
            self.push(kind, (t.0, Some(t.1)), Some(outcome))
        }

        fn cas(&mut self, v: &str, expect: u64, t: (u64, u64), result: Option<OpResult>) -> OpId {
            let kind = OpKind::Cas {
                key: "k".into(),
                value: v.into(),
                expect_version: expect,
            };
            let outcome = result.map_or(Outcome::Unknown("timed out".into()), Outcome::Ok);
            self.push(kind, (t.0, Some(t.1)), Some(outcome))
        }

        fn get(&mut self, found: Option<(&str, u64)>, t: (u64, u64)) -> OpId {
            let found = found.map(|(v, version)| ReadValue {
                value: v.into(),
                version,
            });
            self.push(
                OpKind::Get { key: "k".into() },
                (t.0, Some(t.1)),
                Some(Outcome::Ok(OpResult::Read { found })),
            )
        }

        fn delete(&mut self, t: (u64, u64), result: Option<OpResult>) -> OpId {
            let outcome = result.map_or(Outcome::Unknown("timed out".into()), Outcome::Ok);
            self.push(
                OpKind::Delete { key: "k".into() },
                (t.0, Some(t.1)),
                Some(outcome),
            )
        }

        fn check(&self) -> LinearReport {
            check(&self.0, SEARCH_STEPS_MAX)
        }
    }

    fn assert_valid(h: &H) {
        let r = h.check();
        assert!(r.violations.is_empty(), "{:#?}", r.violations);
        assert!(r.unknown.is_empty(), "{:?}", r.unknown);
    }

    fn assert_invalid(h: &H) -> Vec<Violation> {
        let r = h.check();
        assert!(!r.violations.is_empty(), "must be invalid: {:#?}", h.0);
        r.violations
    }

    #[test]
    fn sequential_history_is_valid() {
        let mut h = H::new();
        h.get(None, (0, 1));
        h.put("a", (2, 3), Some(1));
        h.get(Some(("a", 1)), (4, 5));
        h.cas("b", 1, (6, 7), Some(OpResult::Written { version: 2 }));
        h.cas("c", 1, (8, 9), Some(OpResult::Conflict { current: 2 }));
        h.delete((10, 11), Some(OpResult::Deleted { version: 2 }));
        h.delete((12, 13), Some(OpResult::NotFound));
        h.cas("d", 0, (14, 15), Some(OpResult::Written { version: 3 }));
        h.get(Some(("d", 3)), (16, 17));
        assert_valid(&h);
    }

    #[test]
    fn concurrent_ops_may_take_effect_in_either_order() {
        let mut h = H::new();
        h.put("a", (0, 10), Some(2));
        h.put("b", (1, 9), Some(1));
        // The read overlaps both writes and sees a, which is last in version order.
        h.get(Some(("a", 2)), (2, 8));
        h.get(Some(("a", 2)), (11, 12));
        assert_valid(&h);
    }

    #[test]
    fn stale_read_is_invalid() {
        let mut h = H::new();
        h.put("a", (0, 10), Some(1));
        h.put("b", (20, 30), Some(2));
        h.get(Some(("a", 1)), (40, 50));
        let v = assert_invalid(&h);
        assert!(v[0].message.contains("not linearizable"), "{v:?}");
        assert!(
            v[0].ops[0].contains("get"),
            "the stale read is named first: {v:?}"
        );
        let last = v[0].ops.last().expect("ops");
        assert!(
            last.contains("acknowledged before") && last.contains("\"b\""),
            "{v:?}"
        );
    }

    #[test]
    fn lost_acknowledged_write_is_invalid() {
        let mut h = H::new();
        h.put("a", (0, 10), Some(1));
        h.get(None, (100, 110));
        assert_invalid(&h);
    }

    #[test]
    fn two_cas_succeeding_on_one_version_is_invalid() {
        let mut h = H::new();
        h.put("a", (0, 10), Some(1));
        h.cas("b", 1, (20, 30), Some(OpResult::Written { version: 2 }));
        h.cas("c", 1, (40, 50), Some(OpResult::Written { version: 3 }));
        assert_invalid(&h);
    }

    #[test]
    fn concurrent_cas_on_one_version_cannot_both_win() {
        let mut h = H::new();
        h.put("a", (0, 10), Some(1));
        h.cas("b", 1, (20, 50), Some(OpResult::Written { version: 2 }));
        h.cas("c", 1, (21, 49), Some(OpResult::Written { version: 3 }));
        assert_invalid(&h);
    }

    #[test]
    fn unknown_write_may_take_effect_late_or_never() {
        let mut h = H::new();
        h.put("a", (0, 10), Some(1));
        h.put("b", (20, 30), None);
        h.get(Some(("a", 1)), (40, 50));
        h.get(Some(("b", 2)), (60, 70));
        h.get(Some(("b", 2)), (80, 90));
        assert_valid(&h);

        let mut never = H::new();
        never.put("a", (0, 10), Some(1));
        never.put("b", (20, 30), None);
        never.get(Some(("a", 1)), (40, 50));
        assert_valid(&never);
    }

    #[test]
    fn unknown_write_cannot_take_effect_before_its_invocation() {
        let mut h = H::new();
        h.get(Some(("b", 1)), (0, 10));
        h.put("b", (20, 30), None);
        assert_invalid(&h);
    }

    #[test]
    fn unknown_write_takes_effect_at_most_once() {
        let mut h = H::new();
        h.put("a", (0, 10), None);
        h.get(Some(("a", 1)), (20, 30));
        h.put("b", (40, 50), Some(2));
        h.get(Some(("a", 1)), (60, 70));
        assert_invalid(&h);
    }

    #[test]
    fn unknown_cas_and_delete_are_handled() {
        let mut h = H::new();
        h.put("a", (0, 10), Some(1));
        h.cas("b", 1, (20, 30), None);
        h.delete((21, 31), None);
        h.get(None, (40, 50));
        h.cas("c", 0, (60, 70), Some(OpResult::Written { version: 4 }));
        h.get(Some(("c", 4)), (80, 90));
        assert_valid(&h);
    }

    #[test]
    fn read_of_a_value_nobody_wrote_is_invalid() {
        let mut h = H::new();
        h.get(Some(("ghost", 7)), (0, 10));
        let v = assert_invalid(&h);
        assert!(v[0].message.contains("no operation wrote"), "{v:?}");
    }

    #[test]
    fn failed_ops_are_ignored_but_reading_them_is_invalid() {
        let mut h = H::new();
        h.push(
            OpKind::Put {
                key: "k".into(),
                value: "x".into(),
            },
            (0, Some(1)),
            Some(Outcome::Fail("invalid".into())),
        );
        h.get(None, (2, 3));
        assert_valid(&h);
        h.get(Some(("x", 1)), (4, 5));
        assert_invalid(&h);
    }

    #[test]
    fn versions_must_grow() {
        let mut h = H::new();
        h.put("a", (0, 10), Some(5));
        h.put("b", (20, 30), Some(3));
        assert_invalid(&h);
    }

    #[test]
    fn many_pending_unknown_writes_stay_cheap() {
        const PENDING: u64 = 20;
        let mut h = H::new();
        h.put("a", (0, 10), Some(1));
        for i in 0..PENDING {
            h.put(&format!("u{i}"), (20 + i, 30 + i), None);
            h.delete((20 + i, 30 + i), None);
        }
        for i in 0..50u64 {
            h.get(Some(("a", 1)), (200 + 2 * i, 201 + 2 * i));
        }
        let r = check(&h.0, 5_000_000);
        assert!(r.violations.is_empty() && r.unknown.is_empty(), "{r:?}");
        // And a real violation among them is still found.
        h.put("b", (400, 410), Some(2));
        h.get(Some(("a", 1)), (420, 430));
        let r = check(&h.0, 5_000_000);
        assert_eq!(r.violations.len(), 1, "{r:?}");
    }

    #[test]
    fn a_tight_bound_gives_unknown_not_valid() {
        let mut h = H::new();
        for i in 0..20u64 {
            h.put(&format!("v{i}"), (i, 1000 + i), None);
        }
        h.get(Some(("v0", 1)), (2000, 2001));
        let r = check(&h.0, 10);
        assert!(r.violations.is_empty());
        assert_eq!(r.unknown.len(), 1, "{r:?}");
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut h = H::new();
        h.put("a", (0, 10), Some(1));
        h.push(
            OpKind::Put {
                key: "other".into(),
                value: "z".into(),
            },
            (0, Some(10)),
            Some(Outcome::Ok(OpResult::Written { version: 2 })),
        );
        h.get(Some(("a", 1)), (20, 30));
        let r = h.check();
        assert_eq!(r.keys_checked, 2);
        assert!(r.violations.is_empty());
    }
}
