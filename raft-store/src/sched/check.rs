//! [`Sched::check`]: the scheduler's invariants (the module header of [`crate::sched`]),
//! asserted on a whole state. Apply runs it after every entry in debug builds and the
//! property tests run it after every command; a broken invariant is a bug, never a user error.
//!
//! What it asserts:
//! - ids: every task, stream and function identity lies within the counter that gave it;
//!   a function's versions carry its identity; every chunk belongs to a code blob and a blob
//!   counts the chunks it holds;
//! - places: every task is in exactly one of its function's queue (queued, due), `delayed`
//!   (queued, later), `by_node` (assigned or running) and `finished`, as its state says, and
//!   every index apply keeps equals the one derived from the tasks alone (what loading
//!   rebuilds), byte counters included;
//! - concurrency: no function has more tasks assigned or running than its `max_concurrency`
//!   (the largest of its kept versions: a redeploy that lowers it lets running tasks finish);
//! - fencing: every token given lies within the token counter, and no two tasks hold the same
//!   one, so a new token is larger than every token held;
//! - bounds: functions, code blobs, unfinished tasks, streams and finished ledger entries
//!   within their limits.

use std::collections::{BTreeMap, BTreeSet};

use super::objects::TaskIndexes;
use super::Sched;
use crate::functions::{
    TaskId, TaskState, ACTIVE_TASKS_MAX, CODE_BLOBS_MAX, FUNCTIONS_MAX, LEDGER_ENTRIES_MAX,
};
use crate::streams::STREAMS_MAX;

/// A scheduler invariant found broken, with what breaks it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("scheduler invariant broken: {0}")]
pub struct Broken(pub String);

fn broken<T>(what: impl Into<String>) -> Result<T, Broken> {
    Err(Broken(what.into()))
}

impl Sched {
    /// Asserts every invariant of the state as of state-machine time `now` (the time of the
    /// last entry applied, after its [`Sched::tick`]). Linear in the size of the state.
    pub fn check(&self, now: u64) -> Result<(), Broken> {
        self.check_ids()?;
        self.check_places(now)?;
        self.check_concurrency()?;
        self.check_fencing()?;
        self.check_bounds()
    }

    fn check_ids(&self) -> Result<(), Broken> {
        if let Some(id) = self
            .tasks
            .keys()
            .find(|&&id| id == 0 || id > self.meta.next_task)
        {
            return broken(format!("task {id} past the last id given"));
        }
        if let Some(t) = self
            .tasks
            .values()
            .find(|t| t.queue_seq > self.meta.next_seq)
        {
            return broken(format!("task {} holds a queue place never given", t.id));
        }
        if let Some(id) = self
            .streams
            .keys()
            .find(|&&id| id == 0 || id > self.next_stream)
        {
            return broken(format!("stream {id} past the last id given"));
        }
        let mut identities = BTreeSet::new();
        for f in self.functions.values() {
            if f.id > self.next_function || (f.id > 0 && !identities.insert(f.id)) {
                return broken(format!("function {:?} has identity {}", f.name, f.id));
            }
            if f.versions.iter().any(|v| v.function_id != f.id) {
                return broken(format!("function {:?} holds another's version", f.name));
            }
        }
        let mut held: BTreeMap<&str, u32> = BTreeMap::new();
        for (digest, _) in self.chunks.keys() {
            if !self.code.contains_key(digest) {
                return broken(format!("chunk of unknown code blob {digest}"));
            }
            *held.entry(digest).or_default() += 1;
        }
        for blob in self.code.values() {
            let n = held.get(blob.digest.as_str()).copied().unwrap_or(0);
            if n != blob.received || (blob.complete && n != blob.chunks) {
                return broken(format!(
                    "code blob {} counts {} of {} chunks and holds {n}",
                    blob.digest, blob.received, blob.chunks
                ));
            }
        }
        Ok(())
    }

    /// Each task in exactly one place, the one its state names; the kept indexes equal the
    /// derived ones.
    fn check_places(&self, now: u64) -> Result<(), Broken> {
        let mut seen: BTreeMap<TaskId, &str> = BTreeMap::new();
        let mut place = |id: TaskId, at: &'static str| -> Result<(), Broken> {
            match seen.insert(id, at) {
                Some(other) => broken(format!("task {id} is both in {other} and in {at}")),
                None => Ok(()),
            }
        };
        for (_, id) in self.queues.values().flatten() {
            place(*id, "a queue")?;
        }
        for (_, id) in &self.delayed {
            place(*id, "delayed")?;
        }
        for id in self.by_node.values().flatten() {
            place(*id, "by_node")?;
        }
        for (_, id) in &self.finished {
            place(*id, "finished")?;
        }
        for (id, task) in &self.tasks {
            let expected = match task.state {
                TaskState::Queued if task.not_before_ms > now => "delayed",
                TaskState::Queued => "a queue",
                TaskState::Assigned | TaskState::Running => "by_node",
                _ => "finished",
            };
            match seen.remove(id) {
                Some(at) if at == expected => {}
                Some(at) => {
                    let state = task.state.as_str();
                    return broken(format!("task {id} is {state} but in {at}"));
                }
                None => return broken(format!("task {id} is in no place (expected {expected})")),
            }
        }
        if let Some((id, at)) = seen.first_key_value() {
            return broken(format!("{at} holds task {id}, which does not exist"));
        }
        let derived = TaskIndexes::of(&self.tasks, self.meta.next_task, now).map_err(Broken)?;
        if TaskIndexes::kept_by(self).normalized() != derived.normalized() {
            return broken("the task indexes differ from those the tasks determine");
        }
        let (mut order, mut bytes) = (BTreeSet::new(), 0);
        for e in self.ledger.values().filter(|e| e.done) {
            order.insert((e.recorded_ms, e.key.clone()));
            bytes += e.bytes();
        }
        if order != self.ledger_order || bytes != self.ledger_bytes {
            return broken("the ledger's eviction order or byte count differs from its entries");
        }
        let code_bytes: u64 = self.chunks.values().map(|c| c.len() as u64).sum();
        if code_bytes != self.code_bytes {
            return broken(format!(
                "code bytes counted {}, held {code_bytes}",
                self.code_bytes
            ));
        }
        Ok(())
    }

    /// A placement needs a free slot under the bound of the version it runs or of the latest,
    /// both kept while any task placed after them runs; tokens order placements, so the
    /// newest placement bounds what runs now.
    fn check_concurrency(&self) -> Result<(), Broken> {
        let mut placed: BTreeMap<&str, (u32, u64, u64)> = BTreeMap::new();
        for t in self.tasks.values() {
            if matches!(t.state, TaskState::Assigned | TaskState::Running) {
                let e = placed.entry(t.function.as_str()).or_default();
                e.0 += 1;
                if t.token > e.1 {
                    (e.1, e.2) = (t.token, t.version);
                }
            }
        }
        for (name, (count, _, newest_version)) in placed {
            let Some(record) = self.functions.get(name) else {
                return broken(format!("function {name} was removed with tasks placed"));
            };
            if record.version(newest_version).is_none() {
                // Placed under a version no longer kept: its bound is gone with it.
                continue;
            }
            let max = record.versions.iter().map(|v| v.spec.max_concurrency).max();
            if count > max.unwrap_or(0) {
                return broken(format!(
                    "function {name} has {count} tasks placed, its max concurrency is {}",
                    max.unwrap_or(0)
                ));
            }
        }
        Ok(())
    }

    fn check_fencing(&self) -> Result<(), Broken> {
        let mut tokens = BTreeSet::new();
        for t in self.tasks.values() {
            let placed = matches!(t.state, TaskState::Assigned | TaskState::Running);
            if t.token > self.meta.next_token || (placed && t.token == 0) {
                return broken(format!(
                    "task {} holds token {}, the last given is {}",
                    t.id, t.token, self.meta.next_token
                ));
            }
            if t.token > 0 && !tokens.insert(t.token) {
                return broken(format!("token {} is held by two tasks", t.token));
            }
        }
        Ok(())
    }

    fn check_bounds(&self) -> Result<(), Broken> {
        let unfinished = self.tasks.len() - self.finished.len().min(self.tasks.len());
        let bounds = [
            ("functions", self.functions.len(), FUNCTIONS_MAX),
            ("code blobs", self.code.len(), CODE_BLOBS_MAX),
            ("unfinished tasks", unfinished, ACTIVE_TASKS_MAX),
            ("stream jobs", self.streams.len(), STREAMS_MAX),
            (
                "ledger entries",
                self.ledger_order.len(),
                LEDGER_ENTRIES_MAX,
            ),
        ];
        for (what, n, max) in bounds {
            if n > max {
                return broken(format!("{n} {what}, the limit is {max}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::*;
    use crate::sched::testing::*;
    use proptest::prelude::*;

    /// A cluster with one task running on node 1, one queued behind it (concurrency 1) and
    /// one finished.
    fn busy() -> Sched {
        let mut s = Sched::default();
        let digest = upload(&mut s, 1, b"echo hi");
        s.deploy(1, &spec("f", &digest, 1, 10));
        s.heartbeat(1, &hb(1, vec![]));
        let kv = BTreeMap::new();
        let (done, _, token) = submitted(s.submit(2, "f", None, b"a", false, None, &kv));
        s.complete(2, done, token, &result(RunStatus::Succeeded), &[]);
        submitted(s.submit(2, "f", None, b"b", false, None, &kv));
        submitted(s.submit(2, "f", None, b"c", false, None, &kv));
        s.check(2)
            .expect("a state made by apply holds every invariant");
        s
    }

    fn id_in(s: &Sched, state: TaskState) -> TaskId {
        s.tasks
            .values()
            .find(|t| t.state == state)
            .expect("task")
            .id
    }

    #[test]
    fn a_task_in_two_places_is_reported() {
        let mut s = busy();
        let queued = id_in(&s, TaskState::Queued);
        s.finished.insert((2, queued));
        let e = s.check(2).expect_err("corrupt");
        assert!(e.0.contains(&format!("task {queued}")), "{e}");
    }

    #[test]
    fn a_task_in_no_place_is_reported() {
        let mut s = busy();
        let running = id_in(&s, TaskState::Assigned);
        s.by_node.values_mut().for_each(|set| {
            set.remove(&running);
        });
        assert!(s.check(2).is_err());
    }

    #[test]
    fn a_task_in_the_wrong_place_is_reported() {
        let mut s = busy();
        let queued = id_in(&s, TaskState::Queued);
        s.queues
            .values_mut()
            .for_each(|q| q.retain(|(_, id)| *id != queued));
        s.delayed.insert((1_000, queued));
        let e = s.check(2).expect_err("corrupt");
        assert!(e.0.contains("but in delayed"), "{e}");
    }

    #[test]
    fn a_kept_counter_that_drifted_is_reported() {
        let mut s = busy();
        s.task_bytes += 1;
        assert!(s.check(2).is_err());
        let mut s = busy();
        *s.active.get_mut("f").expect("active") += 1;
        assert!(s.check(2).is_err());
        let mut s = busy();
        s.ledger_bytes += 1;
        assert!(s.check(2).is_err());
        let mut s = busy();
        s.code_bytes -= 1;
        assert!(s.check(2).is_err());
    }

    #[test]
    fn a_function_over_its_concurrency_is_reported() {
        let mut s = busy();
        let queued = id_in(&s, TaskState::Queued);
        // Placed behind the scheduler's back, with a fresh token and every index kept.
        s.queues
            .values_mut()
            .for_each(|q| q.retain(|(_, id)| *id != queued));
        s.assign(queued, 1, 2);
        let e = s.check(2).expect_err("two placed, concurrency 1");
        assert!(e.0.contains("max concurrency"), "{e}");
    }

    #[test]
    fn a_token_reused_or_never_given_is_reported() {
        let mut s = busy();
        let running = id_in(&s, TaskState::Assigned);
        let finished = id_in(&s, TaskState::Succeeded);
        let token = s.tasks[&running].token;
        s.tasks.get_mut(&finished).expect("task").token = token;
        let e = s.check(2).expect_err("shared token");
        assert!(e.0.contains("two tasks"), "{e}");
        let mut s = busy();
        s.meta.next_token -= 1;
        assert!(s.check(2).is_err());
    }

    #[test]
    fn ids_past_their_counters_are_reported() {
        let mut s = busy();
        s.meta.next_task -= 1;
        assert!(s.check(2).is_err());
        let mut s = busy();
        s.next_function = 0;
        assert!(s.check(2).is_err());
    }

    /// One step of a random scheduler workload.
    #[derive(Debug, Clone)]
    enum Op {
        Deploy { function: u8, concurrency: u32 },
        Submit { function: u8, sync: bool },
        Heartbeat { node: u64, running: bool },
        Complete { pick: usize, ok: bool, stale: bool },
        Remove { function: u8 },
        Wait { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..2, 1u32..3).prop_map(|(function, concurrency)| Op::Deploy {
                function,
                concurrency
            }),
            (0u8..2, any::<bool>()).prop_map(|(function, sync)| Op::Submit { function, sync }),
            (1u64..4, any::<bool>()).prop_map(|(node, running)| Op::Heartbeat { node, running }),
            (0usize..8, any::<bool>(), prop::bool::weighted(0.2))
                .prop_map(|(pick, ok, stale)| Op::Complete { pick, ok, stale }),
            (0u8..2).prop_map(|function| Op::Remove { function }),
            prop_oneof![Just(50u64), Just(500), Just(NODE_LEASE_MS), Just(70_000)]
                .prop_map(|ms| Op::Wait { ms }),
        ]
    }

    fn step(s: &mut Sched, now: u64, digest: &str, op: &Op) {
        let kv = BTreeMap::new();
        let name = |f: u8| format!("f{f}");
        match op {
            Op::Deploy {
                function,
                concurrency,
            } => {
                s.deploy(now, &spec(&name(*function), digest, *concurrency, 4));
            }
            Op::Submit { function, sync } => {
                s.submit(now, &name(*function), None, b"p", *sync, None, &kv);
            }
            Op::Heartbeat { node, running } => {
                let mut report = hb(*node, vec![]);
                report.slots = 2;
                if *running {
                    report.running = s.tasks_on(*node).iter().map(|t| (t.id, t.token)).collect();
                }
                s.heartbeat(now, &report);
            }
            Op::Complete { pick, ok, stale } => {
                let placed: Vec<(TaskId, u64)> = s
                    .tasks
                    .values()
                    .filter(|t| matches!(t.state, TaskState::Assigned | TaskState::Running))
                    .map(|t| (t.id, t.token))
                    .collect();
                if let Some(&(id, token)) = placed.get(pick % placed.len().max(1)) {
                    let status = if *ok {
                        RunStatus::Succeeded
                    } else {
                        RunStatus::Failed
                    };
                    let token = if *stale {
                        token.saturating_sub(1)
                    } else {
                        token
                    };
                    s.complete(now, id, token, &result(status), &[]);
                }
            }
            Op::Remove { function } => {
                s.remove(now, &name(*function));
            }
            Op::Wait { .. } => {}
        }
    }

    proptest! {
        // A failure is printed with its seed and shrunk input, never written into the tree.
        #![proptest_config(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::default()
        })]
        #[test]
        fn every_command_keeps_the_invariants(ops in prop::collection::vec(op(), 1..60)) {
            let mut s = Sched::default();
            let digest = upload(&mut s, 1, b"echo hi");
            let mut now = 1;
            let mut last_token = 0;
            for op in &ops {
                if let Op::Wait { ms } = op {
                    now += ms;
                }
                // As apply does: time-driven work first, then the command.
                s.tick(now);
                step(&mut s, now, &digest, op);
                if let Err(e) = s.check(now) {
                    prop_assert!(false, "after {op:?}: {e}");
                }
                prop_assert!(s.meta.next_token >= last_token, "tokens went back");
                last_token = s.meta.next_token;
            }
            assert_reloads(&mut s, now);
        }
    }
}
