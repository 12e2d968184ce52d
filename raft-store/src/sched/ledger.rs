//! The idempotency ledger inside the scheduler: per (function, key or payload), the last run's
//! result with the state of its dependencies, deciding whether an invocation is answered from
//! it, joins a run in flight, or runs (and why).
//!
//! Invariants:
//! - an entry answers an invocation only when it succeeded (or failures are cached), is within
//!   its time to live, and its version, payload and every dependency (declared and tracked
//!   reads) are unchanged: the decision is the same read-only ([`Sched::cached`]) and in apply;
//! - finished entries are evicted oldest first past `LEDGER_ENTRIES_MAX` or `LEDGER_BYTES_MAX`;
//!   `ledger_order` and `ledger_bytes` cover exactly the finished entries.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use super::{rejected, ObjKey, Sched};
use crate::functions::{
    CacheOutcome, Dependency, DependencyState, Idempotency, IdempotencyInput, LedgerEntry,
    MissReason, Task, TaskId, TaskState, LEDGER_BYTES_MAX, LEDGER_ENTRIES_MAX, TRACKED_READS_MAX,
};
use crate::model::{CommandResult, KvEntry};

/// An invocation of an idempotent function, as the ledger sees it.
pub(super) struct LedgerCall<'a> {
    pub(super) function: &'a str,
    pub(super) version: u64,
    pub(super) payload: &'a [u8],
    pub(super) sync: bool,
    pub(super) input: Option<&'a IdempotencyInput>,
}

/// An idempotent invocation that runs: why, and the ledger entry its run will fill.
pub(super) struct LedgerRun {
    pub(super) cache: CacheOutcome,
    key: String,
    payload_hash: String,
    dependencies: Vec<DependencyState>,
}

impl LedgerRun {
    pub(super) fn key(&self) -> &str {
        &self.key
    }
}

impl Sched {
    /// Decides an idempotent invocation: `Err` with the answer when it joins a run in flight,
    /// is answered from the ledger, or is refused (a dependency it cannot state); otherwise
    /// the run to make and why it runs.
    pub(super) fn ledger_lookup(
        &mut self,
        now: u64,
        call: &LedgerCall<'_>,
        idem: &Idempotency,
        kv: &BTreeMap<String, KvEntry>,
    ) -> Result<LedgerRun, CommandResult> {
        let input = call.input.cloned().unwrap_or_default();
        let payload_hash = hex::encode(Sha256::digest(call.payload));
        let key = ledger_key(call.function, input.key.as_deref(), &payload_hash);
        let deps = dependency_states(idem, &input, kv).map_err(rejected)?;
        let reason = match self.ledger.get(&key) {
            None => MissReason::FirstRun,
            Some(e) if !e.done => {
                if self
                    .tasks
                    .get(&e.task)
                    .is_some_and(|t| !t.state.is_finished())
                {
                    return Err(CommandResult::Submitted {
                        task: e.task,
                        node: None,
                        token: 0,
                        cache: Some(CacheOutcome::Joined { task: e.task }),
                    });
                }
                MissReason::PreviousRunLost
            }
            Some(e) => match decide(e, idem, call.version, &payload_hash, &deps, kv, now) {
                None => return Err(self.answer_from_ledger(now, &key, call.payload, call.sync)),
                Some(reason) => reason,
            },
        };
        Ok(LedgerRun {
            cache: CacheOutcome::Miss { reason },
            key,
            payload_hash,
            dependencies: deps,
        })
    }

    /// Records that task `id` runs for `run`, replacing the entry its key had.
    pub(super) fn ledger_start(
        &mut self,
        now: u64,
        function: &str,
        version: u64,
        id: TaskId,
        run: LedgerRun,
    ) {
        let key = run.key;
        self.ledger_remove(&key);
        let entry = LedgerEntry {
            key: key.clone(),
            function: function.to_string(),
            version,
            payload_hash: run.payload_hash,
            task: id,
            done: false,
            succeeded: false,
            dependencies: run.dependencies,
            result: None,
            recorded_ms: now,
        };
        self.ledger.insert(key.clone(), entry);
        self.touch(ObjKey::Ledger(key));
    }

    /// A read-only hit check: the ledger entry that would answer this invocation right now,
    /// if any (the same decision [`Sched::submit`] makes, without changing anything). A
    /// leader that has confirmed its leadership may answer a hit from this without a log
    /// entry; everything else goes through `submit`.
    pub fn cached(
        &self,
        now: u64,
        function: &str,
        version: Option<u64>,
        payload: &[u8],
        idempotency: Option<&IdempotencyInput>,
        kv: &BTreeMap<String, KvEntry>,
    ) -> Option<&LedgerEntry> {
        let record = self.functions.get(function)?;
        let version = version.unwrap_or(record.latest);
        let idem = record.version(version)?.spec.idempotency.as_ref()?;
        let input = idempotency.cloned().unwrap_or_default();
        let payload_hash = hex::encode(Sha256::digest(payload));
        let key = ledger_key(function, input.key.as_deref(), &payload_hash);
        let deps = dependency_states(idem, &input, kv).ok()?;
        let e = self.ledger.get(&key)?;
        if !e.done {
            return None;
        }
        match decide(e, idem, version, &payload_hash, &deps, kv, now) {
            None => Some(e),
            Some(_) => None,
        }
    }

    /// A finished task carrying the ledger's result, without running anything.
    pub(super) fn answer_from_ledger(
        &mut self,
        now: u64,
        key: &str,
        payload: &[u8],
        sync: bool,
    ) -> CommandResult {
        let e = self.ledger[key].clone();
        self.meta.next_task += 1;
        let id = self.meta.next_task;
        self.touch(ObjKey::Meta);
        let state = if e.succeeded {
            TaskState::Succeeded
        } else {
            TaskState::Failed
        };
        let source = CacheOutcome::Hit {
            source_task: e.task,
        };
        let task = Task {
            id,
            function: e.function.clone(),
            version: e.version,
            payload: payload.to_vec(),
            sync,
            state,
            attempts: 0,
            failures: 0,
            node: None,
            token: 0,
            submitted_ms: now,
            assigned_ms: None,
            started_ms: None,
            finished_ms: Some(now),
            not_before_ms: now,
            queue_seq: 0,
            memory_bytes: 0,
            timeout_ms: 0,
            result: e.result.clone(),
            dead_letter: false,
            cache: Some(source.clone()),
            ledger_key: None,
            request_id: None,
        };
        self.task_bytes += task.bytes();
        self.tasks.insert(id, task);
        self.finished.insert((now, id));
        self.touch(ObjKey::Task(id));
        CommandResult::Submitted {
            task: id,
            node: None,
            token: 0,
            cache: Some(source),
        }
    }

    /// Forgets the finished ledger entries of `function`.
    pub fn purge_cache(&mut self, name: &str) -> CommandResult {
        if !self.functions.contains_key(name) {
            return rejected(format!("function {name} does not exist"));
        }
        let keys: Vec<String> = self
            .ledger
            .values()
            .filter(|e| e.function == name && e.done)
            .map(|e| e.key.clone())
            .collect();
        for k in &keys {
            self.ledger_remove(k);
        }
        CommandResult::Purged {
            entries: keys.len() as u64,
        }
    }

    pub(super) fn ledger_remove(&mut self, key: &str) {
        if let Some(e) = self.ledger.remove(key) {
            if e.done {
                self.ledger_order.remove(&(e.recorded_ms, e.key.clone()));
                self.ledger_bytes -= e.bytes();
            }
            self.touch(ObjKey::Ledger(key.to_string()));
        }
    }

    /// Records the end of a ledger run (at the task's final state).
    pub(super) fn ledger_finish(&mut self, id: TaskId, now: u64) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let Some(key) = task.ledger_key.clone() else {
            return;
        };
        let succeeded = task.state == TaskState::Succeeded;
        let result = task.result.clone();
        let cache_failures = self
            .functions
            .get(&task.function)
            .and_then(|f| f.version(task.version))
            .and_then(|v| v.spec.idempotency.as_ref())
            .is_some_and(|i| i.cache_failures);
        let Some(e) = self.ledger.get_mut(&key) else {
            return;
        };
        if e.task != id || e.done {
            return;
        }
        e.done = true;
        e.succeeded = succeeded;
        e.result = if succeeded || cache_failures {
            result
        } else {
            None
        };
        e.recorded_ms = now;
        let bytes = e.bytes();
        self.ledger_order.insert((now, key.clone()));
        self.ledger_bytes += bytes;
        self.touch(ObjKey::Ledger(key));
        while self.ledger_order.len() > LEDGER_ENTRIES_MAX || self.ledger_bytes > LEDGER_BYTES_MAX {
            let Some((_, oldest)) = self.ledger_order.first().cloned() else {
                break;
            };
            self.ledger_remove(&oldest);
        }
    }

    /// Adds a finished run's tracked reads to its ledger entry.
    pub(super) fn record_reads(&mut self, id: TaskId, reads: &[(String, u64)]) {
        let Some(key) = self.tasks.get(&id).and_then(|t| t.ledger_key.clone()) else {
            return;
        };
        let track = self
            .ledger
            .get(&key)
            .and_then(|e| self.functions.get(&e.function)?.version(e.version))
            .and_then(|v| v.spec.idempotency.as_ref())
            .is_some_and(|i| i.track_reads);
        let Some(e) = self.ledger.get_mut(&key) else {
            return;
        };
        if !track || e.task != id || !e.done || reads.is_empty() {
            return;
        }
        let before = e.bytes();
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for (k, v) in reads.iter().take(TRACKED_READS_MAX) {
            // The first version a run saw of a key is the one its result depends on.
            if seen.insert(k) {
                e.dependencies.push(DependencyState::Read {
                    key: k.clone(),
                    version: *v,
                });
            }
        }
        let after = e.bytes();
        self.ledger_bytes = self.ledger_bytes - before + after;
        self.touch(ObjKey::Ledger(key));
    }

    /// The ledger, for reads.
    pub fn ledger_entries(&self, function: &str) -> Vec<&LedgerEntry> {
        self.ledger
            .values()
            .filter(|e| e.function == function)
            .collect()
    }
}

/// The ledger key: function name and explicit key, or function name and payload hash.
pub(super) fn ledger_key(function: &str, explicit: Option<&str>, payload_hash: &str) -> String {
    let mut h = Sha256::new();
    h.update(function.as_bytes());
    h.update([0]);
    match explicit {
        Some(k) => {
            h.update(b"key\0");
            h.update(k.as_bytes());
        }
        None => {
            h.update(b"payload\0");
            h.update(payload_hash.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// The current state of an invocation's dependencies: declared keys and prefixes from the
/// replicated store, files as hashed by the receiving node, caller tokens.
pub(super) fn dependency_states(
    idem: &Idempotency,
    input: &IdempotencyInput,
    kv: &BTreeMap<String, KvEntry>,
) -> Result<Vec<DependencyState>, String> {
    let mut out = Vec::new();
    for d in &idem.dependencies {
        out.push(match d {
            Dependency::Kv(key) => DependencyState::Kv {
                key: key.clone(),
                version: kv.get(key).map_or(0, |e| e.version),
            },
            Dependency::KvPrefix(prefix) => {
                let mut h = Sha256::new();
                for (k, e) in kv
                    .range::<str, _>((
                        std::ops::Bound::Included(prefix.as_str()),
                        std::ops::Bound::Unbounded,
                    ))
                    .take_while(|(k, _)| k.starts_with(prefix.as_str()))
                {
                    h.update(k.as_bytes());
                    h.update([0]);
                    h.update(e.version.to_be_bytes());
                }
                DependencyState::KvPrefix {
                    prefix: prefix.clone(),
                    digest: hex::encode(h.finalize()),
                }
            }
            Dependency::File(path) => {
                let hash = input
                    .files
                    .iter()
                    .find(|(p, _)| p == path)
                    .map(|(_, h)| h.clone())
                    .ok_or_else(|| {
                        format!("file dependency {path} was not hashed by the receiving node")
                    })?;
                DependencyState::File {
                    path: path.clone(),
                    hash,
                }
            }
        });
    }
    let mut tokens = input.tokens.clone();
    tokens.sort();
    tokens.dedup_by(|a, b| a.0 == b.0);
    for (name, value) in tokens {
        out.push(DependencyState::Token { name, value });
    }
    Ok(out)
}

/// `None` when the ledger entry answers the invocation; otherwise why the function runs.
pub(super) fn decide(
    e: &LedgerEntry,
    idem: &Idempotency,
    version: u64,
    payload_hash: &str,
    deps: &[DependencyState],
    kv: &BTreeMap<String, KvEntry>,
    now: u64,
) -> Option<MissReason> {
    if !e.succeeded && (!idem.cache_failures || e.result.is_none()) {
        return Some(MissReason::PreviousRunFailed);
    }
    if e.recorded_ms.saturating_add(idem.ttl_ms) <= now {
        return Some(MissReason::Expired);
    }
    if e.version != version {
        return Some(MissReason::CodeChanged {
            was: e.version,
            now: version,
        });
    }
    if e.payload_hash != payload_hash {
        return Some(MissReason::PayloadChanged);
    }
    let recorded: Vec<&DependencyState> = e
        .dependencies
        .iter()
        .filter(|d| !matches!(d, DependencyState::Read { .. }))
        .collect();
    for d in &recorded {
        let now_state = deps.iter().find(|c| c.name() == d.name());
        if now_state != Some(*d) {
            return Some(MissReason::DependencyChanged {
                dependency: d.name(),
                was: d.state(),
                now: now_state.map_or("absent".into(), |c| c.state()),
            });
        }
    }
    for c in deps {
        if !recorded.iter().any(|d| d.name() == c.name()) {
            return Some(MissReason::DependencyChanged {
                dependency: c.name(),
                was: "absent".into(),
                now: c.state(),
            });
        }
    }
    for d in &e.dependencies {
        if let DependencyState::Read { key, version } = d {
            let current = kv.get(key).map_or(0, |e| e.version);
            if current != *version {
                let now_state = DependencyState::Read {
                    key: key.clone(),
                    version: current,
                };
                return Some(MissReason::DependencyChanged {
                    dependency: d.name(),
                    was: d.state(),
                    now: now_state.state(),
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::*;
    use crate::sched::testing::*;
    use crate::sched::*;

    fn kv_with(entries: &[(&str, u64)]) -> BTreeMap<String, KvEntry> {
        entries
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    KvEntry {
                        key: k.to_string(),
                        value: vec![],
                        version: *v,
                        create_version: *v,
                    },
                )
            })
            .collect()
    }

    fn idem_cluster(deps: Vec<Dependency>, track_reads: bool) -> Sched {
        let mut s = Sched::default();
        let digest = upload(&mut s, 1, b"code");
        let mut sp = spec("i", &digest, 10, 10);
        sp.idempotency = Some(Idempotency {
            dependencies: deps,
            ttl_ms: 10_000,
            cache_failures: false,
            track_reads,
        });
        s.deploy(1, &sp);
        s.heartbeat(1, &hb(1, vec![]));
        s
    }

    fn cache_of(r: &CommandResult) -> CacheOutcome {
        match r {
            CommandResult::Submitted { cache, .. } => cache.clone().expect("idempotent"),
            other => panic!("not submitted: {other:?}"),
        }
    }

    fn sub(
        s: &mut Sched,
        now: u64,
        payload: &[u8],
        kv: &BTreeMap<String, KvEntry>,
    ) -> CommandResult {
        s.submit(now, "i", None, payload, true, None, kv)
    }

    #[test]
    fn idempotent_hit_join_and_misses_with_reasons() {
        let mut s = idem_cluster(vec![Dependency::Kv("a".into())], true);
        let kv = kv_with(&[("a", 1), ("r", 5)]);
        let first = sub(&mut s, 2, b"p", &kv);
        assert_eq!(
            cache_of(&first),
            CacheOutcome::Miss {
                reason: MissReason::FirstRun
            }
        );
        let (id, _, token) = submitted(first);
        // An identical call while it runs joins it.
        let joined = sub(&mut s, 3, b"p", &kv);
        assert_eq!(cache_of(&joined), CacheOutcome::Joined { task: id });
        assert_eq!(submitted(joined).0, id);
        let reads = vec![("r".to_string(), 5)];
        s.complete(4, id, token, &result(RunStatus::Succeeded), &reads);
        // Same inputs: a hit, answered by a finished task with the recorded output.
        let hit = sub(&mut s, 5, b"p", &kv);
        assert_eq!(cache_of(&hit), CacheOutcome::Hit { source_task: id });
        let hit_task = s.task(submitted(hit).0).expect("task").clone();
        assert_eq!(hit_task.state, TaskState::Succeeded);
        assert_eq!(hit_task.result.expect("result").output, b"out");
        assert_eq!(s.stats().tasks_active, 0, "nothing runs on a hit");
        // A declared dependency changed.
        let kv2 = kv_with(&[("a", 2), ("r", 5)]);
        match cache_of(&sub(&mut s, 6, b"p", &kv2)) {
            CacheOutcome::Miss {
                reason: MissReason::DependencyChanged { dependency, .. },
            } => {
                assert_eq!(dependency, "kv:a")
            }
            other => panic!("{other:?}"),
        }
        assert_reloads(&mut s, 6);
    }

    #[test]
    fn tracked_reads_payload_code_and_ttl_misses() {
        let mut s = idem_cluster(vec![], true);
        let kv = kv_with(&[("r", 5)]);
        let (id, _, token) = submitted(sub(&mut s, 2, b"p", &kv));
        s.complete(
            3,
            id,
            token,
            &result(RunStatus::Succeeded),
            &[("r".into(), 5)],
        );
        // A tracked read's key changed: exactly one new run.
        let kv2 = kv_with(&[("r", 6)]);
        let r = sub(&mut s, 4, b"p", &kv2);
        assert!(matches!(
            cache_of(&r),
            CacheOutcome::Miss { reason: MissReason::DependencyChanged { ref dependency, .. } } if dependency == "read:r"
        ));
        let (id2, _, token2) = submitted(r);
        s.complete(
            5,
            id2,
            token2,
            &result(RunStatus::Succeeded),
            &[("r".into(), 6)],
        );
        assert!(matches!(
            cache_of(&sub(&mut s, 6, b"p", &kv2)),
            CacheOutcome::Hit { .. }
        ));
        // Another payload is another ledger key: a first run.
        assert_eq!(
            cache_of(&sub(&mut s, 6, b"q", &kv2)),
            CacheOutcome::Miss {
                reason: MissReason::FirstRun
            }
        );
        // With an explicit key, a different payload is "payload changed".
        let input = IdempotencyInput {
            key: Some("k".into()),
            ..Default::default()
        };
        let (t, _, tok) = submitted(s.submit(7, "i", None, b"x", true, Some(&input), &kv2));
        s.complete(7, t, tok, &result(RunStatus::Succeeded), &[]);
        let r = s.submit(8, "i", None, b"y", true, Some(&input), &kv2);
        assert_eq!(
            cache_of(&r),
            CacheOutcome::Miss {
                reason: MissReason::PayloadChanged
            }
        );
        // New code version.
        let digest = s.functions["i"]
            .latest()
            .expect("v")
            .spec
            .code_digest
            .clone();
        let mut sp = s.functions["i"].latest().expect("v").spec.clone();
        sp.code_digest = digest;
        s.deploy(9, &sp);
        assert_eq!(
            cache_of(&sub(&mut s, 10, b"p", &kv2)),
            CacheOutcome::Miss {
                reason: MissReason::CodeChanged { was: 1, now: 2 }
            }
        );
        // Past the TTL.
        let mut s = idem_cluster(vec![], false);
        let (id, _, token) = submitted(sub(&mut s, 2, b"p", &kv));
        s.complete(3, id, token, &result(RunStatus::Succeeded), &[]);
        assert_eq!(
            cache_of(&sub(&mut s, 3 + 10_000, b"p", &kv)),
            CacheOutcome::Miss {
                reason: MissReason::Expired
            }
        );
    }

    #[test]
    fn failed_runs_are_not_cached_and_purge_forgets() {
        let mut s = idem_cluster(vec![], false);
        let kv = BTreeMap::new();
        let (id, _, token) = submitted(sub(&mut s, 2, b"p", &kv));
        s.complete(3, id, token, &result(RunStatus::Failed), &[]);
        assert_eq!(
            cache_of(&sub(&mut s, 4, b"p", &kv)),
            CacheOutcome::Miss {
                reason: MissReason::PreviousRunFailed
            }
        );
        let (id, _, token) = submitted(sub(&mut s, 5, b"z", &kv));
        s.complete(6, id, token, &result(RunStatus::Succeeded), &[]);
        assert_eq!(s.purge_cache("i"), CommandResult::Purged { entries: 1 });
        assert_eq!(
            cache_of(&sub(&mut s, 7, b"z", &kv)),
            CacheOutcome::Miss {
                reason: MissReason::FirstRun
            }
        );
        assert_reloads(&mut s, 7);
    }
}
