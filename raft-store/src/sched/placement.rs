//! Placement inside the scheduler: worker nodes' reports, choosing a node for a task, and the
//! bookkeeping of assignment (fencing tokens, per-function and per-node counts).
//!
//! Invariants:
//! - a task is placed only on a live node (lease valid at the entry's time) with a free slot
//!   and, unless the node is idle, memory for it;
//! - each assignment takes a new fencing token, larger than every token given before;
//! - `active`, `by_node`, `node_memory` and `deadlines` change only in [`Sched::assign`] and
//!   [`Sched::release`], which undo each other exactly.

use std::collections::BTreeSet;

use super::ObjKey;
use super::{failure_result, Sched};
use crate::functions::{
    FunctionRecord, Heartbeat, NodeRecord, Task, TaskId, TaskState, ASSIGNMENT_GRACE_MS,
    NODE_LEASE_MS,
};
use crate::model::{CommandResult, NodeId};

impl Sched {
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    /// Nodes whose lease is valid at `now`, in id order.
    pub fn live_nodes(&self, now: u64) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| is_live(n, now))
            .map(|n| n.id)
            .collect()
    }

    /// Tasks assigned or running on `node`.
    pub fn load_of(&self, node: NodeId) -> usize {
        self.by_node.get(&node).map_or(0, BTreeSet::len)
    }

    /// Tasks assigned to or running on `node`.
    pub fn tasks_on(&self, node: NodeId) -> Vec<&Task> {
        self.by_node
            .get(&node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.tasks.get(id))
            .collect()
    }

    /// Records a worker's report and places what its capacity allows.
    pub fn heartbeat(&mut self, now: u64, hb: &Heartbeat) -> CommandResult {
        let mut warm = hb.warm.clone();
        warm.sort_by(|a, b| (&a.function, a.version).cmp(&(&b.function, b.version)));
        warm.dedup_by(|a, b| a.function == b.function && a.version == b.version);
        // A report made before the node saw a removal names what no longer exists.
        warm.retain(|w| {
            w.idle > 0
                && self
                    .functions
                    .get(&w.function)
                    .is_some_and(|f| f.version(w.version).is_some())
        });
        let record = NodeRecord {
            id: hb.node,
            last_heartbeat_ms: now,
            slots: hb.slots.clamp(1, 10_000),
            memory_budget_bytes: hb.memory_budget_bytes,
            warm_memory_bytes: hb.warm_memory_bytes,
            warm,
        };
        self.nodes.insert(hb.node, record);
        self.touch(ObjKey::Node(hb.node));
        for &(id, token) in &hb.running {
            if let Some(t) = self.tasks.get_mut(&id) {
                if t.state == TaskState::Assigned && t.token == token && t.node == Some(hb.node) {
                    t.state = TaskState::Running;
                    t.started_ms = Some(now);
                    self.dirty.insert(ObjKey::Task(id));
                }
            }
        }
        self.fill(now);
        CommandResult::Accepted
    }

    /// A live node with a free slot and memory for task `id`: one with an idle warm sandbox
    /// of its function version first, then the least loaded.
    pub(super) fn choose_node(&self, id: TaskId, now: u64) -> Option<NodeId> {
        let task = self.tasks.get(&id)?;
        let mut best: Option<((bool, u64, u64), NodeId)> = None;
        for n in self.nodes.values() {
            if !is_live(n, now) {
                continue;
            }
            let load = self.load_of(n.id) as u64;
            if load >= u64::from(n.slots) {
                continue;
            }
            let used = self.node_memory.get(&n.id).copied().unwrap_or(0) + n.warm_memory_bytes;
            if load > 0 && used + task.memory_bytes > n.memory_budget_bytes {
                continue;
            }
            let warm = n.warm_idle(&task.function, task.version) > 0;
            let spread = (n.id ^ id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let key = (!warm, load * 1_000_000 / u64::from(n.slots), spread);
            if best.as_ref().is_none_or(|(k, _)| key < *k) {
                best = Some((key, n.id));
            }
        }
        best.map(|(_, n)| n)
    }

    pub(super) fn assign(&mut self, id: TaskId, node: NodeId, now: u64) -> u64 {
        self.meta.next_token += 1;
        let token = self.meta.next_token;
        self.touch(ObjKey::Meta);
        let task = self.tasks.get_mut(&id).expect("assigning a known task");
        task.state = TaskState::Assigned;
        task.node = Some(node);
        task.token = token;
        task.attempts += 1;
        task.assigned_ms = Some(now);
        task.started_ms = None;
        let (function, version, memory) = (task.function.clone(), task.version, task.memory_bytes);
        let deadline = assignment_deadline(task);
        self.dirty.insert(ObjKey::Task(id));
        *self.active.entry(function.clone()).or_default() += 1;
        self.by_node.entry(node).or_default().insert(id);
        *self.node_memory.entry(node).or_default() += memory;
        self.deadlines.insert((deadline, id));
        if let Some(n) = self.nodes.get_mut(&node) {
            if let Some(w) = n
                .warm
                .iter_mut()
                .find(|w| w.function == function && w.version == version && w.idle > 0)
            {
                w.idle -= 1;
                n.warm.retain(|w| w.idle > 0);
                self.dirty.insert(ObjKey::Node(node));
            }
        }
        token
    }

    /// Undoes the assignment bookkeeping of an assigned or running task.
    pub(super) fn release(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        if !matches!(task.state, TaskState::Assigned | TaskState::Running) {
            return;
        }
        let (function, memory, deadline) = (
            task.function.clone(),
            task.memory_bytes,
            assignment_deadline(task),
        );
        if let Some(node) = task.node {
            if let Some(set) = self.by_node.get_mut(&node) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_node.remove(&node);
                }
            }
            if let Some(m) = self.node_memory.get_mut(&node) {
                *m = m.saturating_sub(memory);
                if *m == 0 {
                    self.node_memory.remove(&node);
                }
            }
        }
        if let Some(a) = self.active.get_mut(&function) {
            *a = a.saturating_sub(1);
            if *a == 0 {
                self.active.remove(&function);
            }
        }
        self.deadlines.remove(&(deadline, id));
    }

    /// Puts a released task back in its queue, not before `not_before`.
    pub(super) fn requeue(&mut self, id: TaskId, not_before: u64, now: u64) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.state = TaskState::Queued;
        task.node = None;
        task.not_before_ms = not_before;
        let entry = (task.queue_seq, id);
        let function = task.function.clone();
        self.dirty.insert(ObjKey::Task(id));
        if not_before > now {
            self.delayed.insert((not_before, id));
        } else {
            self.queues.entry(function).or_default().insert(entry);
        }
    }

    /// Places queued tasks while their functions have free concurrency and a node has room.
    pub(super) fn fill(&mut self, now: u64) {
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            let max = self
                .functions
                .get(&name)
                .and_then(FunctionRecord::latest)
                .map_or(0, |v| v.spec.max_concurrency);
            loop {
                let active = self.active.get(&name).copied().unwrap_or(0);
                let Some(&(seq, id)) = self.queues.get(&name).and_then(BTreeSet::first) else {
                    break;
                };
                if !self.functions.contains_key(&name) {
                    self.queues.get_mut(&name).map(|q| q.remove(&(seq, id)));
                    self.finish(
                        id,
                        TaskState::Failed,
                        Some(failure_result("the function was removed")),
                        now,
                    );
                    continue;
                }
                if active >= max {
                    break;
                }
                let Some(node) = self.choose_node(id, now) else {
                    break;
                };
                self.queues.get_mut(&name).map(|q| q.remove(&(seq, id)));
                self.assign(id, node, now);
            }
            if self.queues.get(&name).is_some_and(BTreeSet::is_empty) {
                self.queues.remove(&name);
            }
        }
    }
}

pub(super) fn is_live(n: &NodeRecord, now: u64) -> bool {
    n.last_heartbeat_ms.saturating_add(NODE_LEASE_MS) > now
}

pub(super) fn assignment_deadline(task: &Task) -> u64 {
    task.assigned_ms
        .unwrap_or(task.submitted_ms)
        .saturating_add(task.timeout_ms)
        .saturating_add(ASSIGNMENT_GRACE_MS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::*;
    use crate::sched::testing::*;
    use crate::sched::*;

    #[test]
    fn concurrency_queue_and_throttle() {
        let (mut s, _) = cluster();
        let a = submitted(s.submit(2, "f", None, b"1", false, None, &BTreeMap::new()));
        let b = submitted(s.submit(2, "f", None, b"2", false, None, &BTreeMap::new()));
        assert!(a.1.is_some() && b.1.is_some());
        let c = submitted(s.submit(2, "f", None, b"3", false, None, &BTreeMap::new()));
        let d = submitted(s.submit(2, "f", None, b"4", false, None, &BTreeMap::new()));
        assert_eq!((c.1, d.1), (None, None));
        assert!(matches!(
            s.submit(2, "f", None, b"5", false, None, &BTreeMap::new()),
            CommandResult::Throttled { .. }
        ));
        // A completion frees a slot: the oldest queued task is placed.
        assert_eq!(
            s.complete(3, a.0, a.2, &result(RunStatus::Succeeded), &[]),
            CommandResult::Accepted
        );
        assert_eq!(s.task(c.0).map(|t| t.state), Some(TaskState::Assigned));
        assert_eq!(s.task(d.0).map(|t| t.state), Some(TaskState::Queued));
        assert_eq!(s.task(a.0).map(|t| t.state), Some(TaskState::Succeeded));
        assert_reloads(&mut s, 3);
    }

    #[test]
    fn warm_node_is_preferred_and_claimed() {
        let (mut s, _) = cluster();
        let warm = vec![WarmReport {
            function: "f".into(),
            version: 1,
            idle: 1,
        }];
        s.heartbeat(2, &hb(2, warm));
        let a = submitted(s.submit(3, "f", None, b"", true, None, &BTreeMap::new()));
        assert_eq!(a.1, Some(2));
        // The one warm sandbox is claimed: the next goes by load, to node 1.
        let b = submitted(s.submit(3, "f", None, b"", true, None, &BTreeMap::new()));
        assert_eq!(b.1, Some(1));
        assert_reloads(&mut s, 3);
    }

    #[test]
    fn silent_node_loses_its_tasks_and_stale_tokens_are_refused() {
        let (mut s, _) = cluster();
        let a = submitted(s.submit(2, "f", None, b"", true, None, &BTreeMap::new()));
        let first = a.1.expect("placed");
        let other = if first == 1 { 2 } else { 1 };
        // Only the other node keeps heartbeating.
        s.heartbeat(NODE_LEASE_MS, &hb(other, vec![]));
        s.tick(NODE_LEASE_MS + 2);
        let t = s.task(a.0).expect("task").clone();
        assert_eq!(
            (t.state, t.node, t.attempts),
            (TaskState::Assigned, Some(other), 2)
        );
        assert!(t.token > a.2);
        let late = s.complete(
            NODE_LEASE_MS + 3,
            a.0,
            a.2,
            &result(RunStatus::Succeeded),
            &[],
        );
        assert!(matches!(late, CommandResult::Rejected { .. }), "{late:?}");
        assert_eq!(
            s.complete(
                NODE_LEASE_MS + 3,
                a.0,
                t.token,
                &result(RunStatus::Succeeded),
                &[]
            ),
            CommandResult::Accepted
        );
        assert_reloads(&mut s, NODE_LEASE_MS + 3);
    }
}
