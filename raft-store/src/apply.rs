//! The deterministic core of the state machine: in-memory state and the pure function that
//! applies one [`Request`] to it.
//!
//! [`StateMachineData::apply_request`] returns the [`Response`] and the list of [`Mutation`]s
//! the caller must persist; the storage layer ([`crate::state_machine`]) writes them, this
//! module never does I/O.
//!
//! Invariants:
//! - apply is a pure function of (state, request): it never reads the clock or an RNG; the
//!   time is the leader's stamp `Request::time_ms`, clamped so it never runs backwards;
//! - every successful write bumps `revision` by one and the written key takes the new value
//!   as its version, so versions strictly increase and never repeat;
//! - a command whose ([`Principal`], [`RequestId`]) is remembered is answered with the stored
//!   result and changes nothing but the deduplication bookkeeping, if it is of the same
//!   [`CommandKind`]; of another kind it is refused ([`CommandResult::Rejected`]) and changes
//!   nothing at all: a request id never answers with another command's result, and one
//!   principal's ids never touch another's;
//! - the deduplication map holds at most [`DEDUP_ENTRIES_MAX`] records, none older than
//!   [`DEDUP_WINDOW_MS`] relative to `last_time_ms`; eviction is oldest first, by
//!   `(time_ms, request id)`, so it is the same on every replica.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Bound;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{
    validate_key, Command, CommandKind, CommandResult, KvEntry, KvPage, Principal, Request,
    RequestId, Response, DEDUP_ENTRIES_MAX, DEDUP_WINDOW_MS, LIST_LIMIT_MAX, VALUE_BYTES_MAX,
};
use crate::sched::Sched;
use crate::token_table::Tokens;

/// What a remembered command is found by: who sent it and the id they gave it. Ids are
/// chosen by clients (and visible in task records), so an id alone names nothing: only the
/// principal the node authenticated makes it one caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DedupKey {
    pub principal: Principal,
    pub id: RequestId,
}

impl std::fmt::Display for DedupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "request {} of {}", self.id, self.principal)
    }
}

/// What the state machine remembers about an applied command, to answer its retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRecord {
    /// `last_time_ms` of the state machine when the command was applied.
    pub time_ms: u64,
    /// The kind of the command: a retry of another kind is refused.
    pub kind: CommandKind,
    pub result: CommandResult,
}

/// One change to persist, in the order produced. Applying the same list to the persisted
/// image of the state before the request yields the persisted image of the state after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Write (create or replace) this key-value entry.
    KvPut(KvEntry),
    /// Remove this key.
    KvDelete(String),
    /// Remember the result of a command.
    DedupPut { key: DedupKey, record: DedupRecord },
    /// Forget a remembered command (expired or evicted).
    DedupDelete(DedupKey),
    /// The scalar state after the request.
    Meta { revision: u64, last_time_ms: u64 },
    /// Write (`Some`) or delete (`None`) one scheduler object (see [`crate::sched`]).
    Obj {
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    },
}

/// A broken invariant found in a state image read from disk or received in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid state machine image: {0}")]
pub struct InvalidImage(pub String);

/// The whole in-memory state of the replicated state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateMachineData {
    kv: BTreeMap<String, KvEntry>,
    revision: u64,
    last_time_ms: u64,
    dedup: BTreeMap<DedupKey, DedupRecord>,
    /// `(time_ms, key)` of every record in `dedup`: the eviction order.
    dedup_order: BTreeSet<(u64, DedupKey)>,
    /// [`DEDUP_ENTRIES_MAX`] except in tests, which cannot afford a million records to
    /// exercise eviction.
    dedup_entries_max: usize,
    /// Functions, code, tasks and worker nodes.
    sched: Sched,
    /// Bearer tokens of the control plane.
    tokens: Tokens,
}

impl Default for StateMachineData {
    fn default() -> Self {
        StateMachineData {
            kv: BTreeMap::new(),
            revision: 0,
            last_time_ms: 0,
            dedup: BTreeMap::new(),
            dedup_order: BTreeSet::new(),
            dedup_entries_max: DEDUP_ENTRIES_MAX,
            sched: Sched::default(),
            tokens: Tokens::default(),
        }
    }
}

impl StateMachineData {
    /// An empty state machine: no keys, revision 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a state from its parts (as loaded from disk or a snapshot), checking every
    /// invariant that the parts alone can break.
    pub fn from_parts(
        kv: impl IntoIterator<Item = KvEntry>,
        dedup: impl IntoIterator<Item = (DedupKey, DedupRecord)>,
        objects: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
        revision: u64,
        last_time_ms: u64,
    ) -> Result<Self, InvalidImage> {
        // Tokens and scheduler objects share one column family (and the snapshot's object
        // list); their tags are disjoint.
        let (tokens, sched): (Vec<_>, Vec<_>) = objects
            .into_iter()
            .partition(|(key, _)| Tokens::is_token_key(key));
        let mut state = StateMachineData {
            revision,
            last_time_ms,
            sched: Sched::from_objects(sched, last_time_ms).map_err(InvalidImage)?,
            tokens: Tokens::from_objects(tokens).map_err(InvalidImage)?,
            ..Self::default()
        };
        let mut versions = HashSet::new();
        for entry in kv {
            validate_key(&entry.key)
                .map_err(|e| InvalidImage(format!("key {:?}: {e}", entry.key)))?;
            if entry.value.len() > VALUE_BYTES_MAX {
                return Err(InvalidImage(format!(
                    "key {:?}: value of {} bytes",
                    entry.key,
                    entry.value.len()
                )));
            }
            if entry.create_version == 0
                || entry.create_version > entry.version
                || entry.version > revision
            {
                return Err(InvalidImage(format!(
                    "key {:?}: create_version {} version {} revision {}",
                    entry.key, entry.create_version, entry.version, revision
                )));
            }
            if !versions.insert(entry.version) {
                return Err(InvalidImage(format!(
                    "version {} held by two keys",
                    entry.version
                )));
            }
            let key = entry.key.clone();
            if state.kv.insert(key.clone(), entry).is_some() {
                return Err(InvalidImage(format!("key {key:?} appears twice")));
            }
        }
        for (id, record) in dedup {
            if record.time_ms > last_time_ms {
                return Err(InvalidImage(format!(
                    "request {id} remembered at {} after last time {last_time_ms}",
                    record.time_ms
                )));
            }
            state.dedup_order.insert((record.time_ms, id));
            if state.dedup.insert(id, record).is_some() {
                return Err(InvalidImage(format!("request {id} appears twice")));
            }
        }
        if state.dedup.len() > DEDUP_ENTRIES_MAX {
            return Err(InvalidImage(format!(
                "{} deduplication records, the limit is {DEDUP_ENTRIES_MAX}",
                state.dedup.len()
            )));
        }
        Ok(state)
    }

    /// Applies one log entry's request. Returns one result per command, in order, and the
    /// mutations to persist. Never fails: a bad command gets [`CommandResult::Invalid`].
    pub fn apply_request(&mut self, req: &Request) -> (Response, Vec<Mutation>) {
        let mut mutations = Vec::new();
        // The leader's clock may step back across a leader change; time here never does, so
        // expiry stays monotone.
        self.last_time_ms = self.last_time_ms.max(req.time_ms);
        self.expire_dedup(&mut mutations);
        self.sched.tick(self.last_time_ms);
        self.put_stream_results(&mut mutations);

        let mut results = Vec::with_capacity(req.commands.len());
        for logged in &req.commands {
            let key = DedupKey {
                principal: logged.principal,
                id: logged.request_id,
            };
            let kind = logged.command.kind();
            if let Some(record) = self.dedup.get(&key) {
                results.push(if record.kind == kind {
                    record.result.clone()
                } else {
                    // Neither the stored result (it answers another command) nor a new run
                    // (the id names that command until it expires).
                    CommandResult::Rejected {
                        reason: format!(
                            "request id {} was already used for a {} by {}; a {} needs a new request id",
                            key.id, record.kind, key.principal, kind
                        ),
                    }
                });
                continue;
            }
            let result = self.execute(&logged.command, logged.request_id, &mut mutations);
            self.put_stream_results(&mut mutations);
            self.remember(key, kind, result.clone(), &mut mutations);
            results.push(result);
        }
        for (key, value) in self.sched.take_changes() {
            mutations.push(Mutation::Obj { key, value });
        }
        for (key, value) in self.tokens.take_changes() {
            mutations.push(Mutation::Obj { key, value });
        }
        mutations.push(Mutation::Meta {
            revision: self.revision,
            last_time_ms: self.last_time_ms,
        });
        // A broken scheduler invariant is a bug: debug builds stop at the entry that broke it.
        #[cfg(debug_assertions)]
        if let Err(broken) = self.sched.check(self.last_time_ms) {
            panic!("after the entry of {} ms: {broken}", req.time_ms);
        }
        (Response { results }, mutations)
    }

    // Longer than 100 lines on purpose: the dispatch of every command to the part of the state
    // it changes, one short arm each, so the whole command set reads as one table.
    fn execute(
        &mut self,
        command: &Command,
        request_id: RequestId,
        mutations: &mut Vec<Mutation>,
    ) -> CommandResult {
        if let Err(invalid) = command.validate() {
            return CommandResult::Invalid(invalid);
        }
        match command {
            Command::KvPut {
                key,
                value,
                expect_version,
            } => {
                let (current, existing_create_version) = self
                    .kv
                    .get(key)
                    .map_or((0, None), |e| (e.version, Some(e.create_version)));
                if let Some(expected) = expect_version {
                    if *expected != current {
                        return CommandResult::Conflict { current };
                    }
                }
                let version = self.next_revision();
                let create_version = existing_create_version.unwrap_or(version);
                let entry = KvEntry {
                    key: key.clone(),
                    value: value.clone(),
                    version,
                    create_version,
                };
                assert!(
                    version > current && create_version <= version,
                    "put of {key:?} would not advance its version"
                );
                self.kv.insert(key.clone(), entry.clone());
                mutations.push(Mutation::KvPut(entry));
                CommandResult::Put { version }
            }
            Command::KvDelete {
                key,
                expect_version,
            } => {
                let current = self.kv.get(key).map_or(0, |e| e.version);
                match expect_version {
                    Some(expected) if *expected != current => {
                        return CommandResult::Conflict { current };
                    }
                    _ => {}
                }
                if current == 0 {
                    return CommandResult::NotFound;
                }
                self.next_revision();
                self.kv.remove(key);
                mutations.push(Mutation::KvDelete(key.clone()));
                CommandResult::Deleted { version: current }
            }
            Command::CodeChunk {
                digest,
                total_bytes,
                index,
                bytes,
            } => self
                .sched
                .code_chunk(self.last_time_ms, digest, *total_bytes, *index, bytes),
            Command::FnDeploy { spec } => self.sched.deploy(self.last_time_ms, spec),
            Command::FnRemove { name } => self.sched.remove(self.last_time_ms, name),
            Command::Submit {
                function,
                version,
                payload,
                sync,
                idempotency,
            } => self.sched.submit_request(
                request_id,
                self.last_time_ms,
                function,
                *version,
                payload,
                *sync,
                idempotency.as_deref(),
                &self.kv,
            ),
            Command::FnPurgeCache { name } => self.sched.purge_cache(name),
            Command::Heartbeat(hb) => self.sched.heartbeat(self.last_time_ms, hb),
            Command::Complete {
                task,
                token,
                result,
                reads,
            } => self
                .sched
                .complete(self.last_time_ms, *task, *token, result, reads),
            Command::StreamStart { request } => {
                self.sched
                    .stream_start(self.last_time_ms, self.revision, request)
            }
            Command::StreamAdvance {
                job,
                from_cursor,
                to_cursor,
                first_item,
                items,
                exhausted,
            } => self.sched.stream_advance(
                self.last_time_ms,
                *job,
                from_cursor,
                to_cursor,
                *first_item,
                items,
                *exhausted,
                &self.kv,
            ),
            Command::StreamCancel { job } => self.sched.stream_cancel(self.last_time_ms, *job),
            Command::StreamRedrive { job } => {
                self.sched.stream_redrive(self.last_time_ms, *job, &self.kv)
            }
            Command::TokenCreate {
                role,
                name,
                hash,
                bootstrap,
            } => self
                .tokens
                .create(self.last_time_ms, *role, name.as_deref(), hash, *bootstrap),
            Command::TokenRevoke { id } => self.tokens.revoke(self.last_time_ms, *id),
        }
    }

    /// Writes the results the scheduler's streams produced (item outputs into their result
    /// keys) as ordinary puts, so versions and the revision stay one counter.
    fn put_stream_results(&mut self, mutations: &mut Vec<Mutation>) {
        for (key, value) in self.sched.take_kv_puts() {
            if validate_key(&key).is_err() || value.len() > VALUE_BYTES_MAX {
                // Stream options and outputs are bounded so that this cannot happen.
                debug_assert!(false, "stream result {key:?} out of bounds");
                continue;
            }
            let create_version = self.kv.get(&key).map(|e| e.create_version);
            let version = self.next_revision();
            let entry = KvEntry {
                key: key.clone(),
                value,
                version,
                create_version: create_version.unwrap_or(version),
            };
            self.kv.insert(key, entry.clone());
            mutations.push(Mutation::KvPut(entry));
        }
    }

    /// The scheduler state: functions, code, tasks, nodes.
    pub fn sched(&self) -> &Sched {
        &self.sched
    }

    /// The token table: who may call what.
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// Every persisted object (scheduler and tokens), in key order: the object column
    /// family's content and the snapshot's object list.
    pub fn objects(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = self.sched.objects();
        out.extend(self.tokens.objects());
        out.sort();
        out
    }

    /// The key-value entries, for decisions that depend on versions (idempotency).
    pub fn kv_entries(&self) -> &BTreeMap<String, KvEntry> {
        &self.kv
    }

    fn next_revision(&mut self) -> u64 {
        // 2^64 writes cannot happen; overflow here would be memory corruption.
        self.revision = self
            .revision
            .checked_add(1)
            .expect("revision counter cannot overflow u64");
        self.revision
    }

    fn remember(
        &mut self,
        key: DedupKey,
        kind: CommandKind,
        result: CommandResult,
        mutations: &mut Vec<Mutation>,
    ) {
        let record = DedupRecord {
            time_ms: self.last_time_ms,
            kind,
            result,
        };
        self.dedup_order.insert((record.time_ms, key));
        self.dedup.insert(key, record.clone());
        mutations.push(Mutation::DedupPut { key, record });
        while self.dedup.len() > self.dedup_entries_max {
            let Some((_, oldest)) = self.dedup_order.pop_first() else {
                break;
            };
            self.dedup.remove(&oldest);
            mutations.push(Mutation::DedupDelete(oldest));
        }
        debug_assert_eq!(self.dedup.len(), self.dedup_order.len());
    }

    /// Forgets records older than the window, relative to `last_time_ms`.
    fn expire_dedup(&mut self, mutations: &mut Vec<Mutation>) {
        while let Some(&(time_ms, id)) = self.dedup_order.first() {
            if time_ms.saturating_add(DEDUP_WINDOW_MS) > self.last_time_ms {
                break;
            }
            self.dedup_order.pop_first();
            self.dedup.remove(&id);
            mutations.push(Mutation::DedupDelete(id));
        }
    }

    /// The entry under `key`, if any.
    pub fn get(&self, key: &str) -> Option<&KvEntry> {
        self.kv.get(key)
    }

    /// Keys starting with `prefix`, in key order, after `start_after` (exclusive). `limit` 0 or
    /// over [`LIST_LIMIT_MAX`] means [`LIST_LIMIT_MAX`]. `next` is set only if more remain.
    pub fn list(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> KvPage {
        let limit = if limit == 0 || limit > LIST_LIMIT_MAX {
            LIST_LIMIT_MAX
        } else {
            limit
        };
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let mut matching = self
            .kv
            .range::<str, _>((lower, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(_, entry)| entry);
        // `limit` is at most LIST_LIMIT_MAX, so the cast cannot truncate.
        let entries: Vec<KvEntry> = matching.by_ref().take(limit as usize).cloned().collect();
        let next = match matching.next() {
            Some(_) => entries.last().map(|e| e.key.clone()),
            None => None,
        };
        KvPage {
            entries,
            next,
            revision: self.revision,
        }
    }

    /// The revision of the last successful write (0: none yet).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The state machine's time: the largest leader stamp applied so far.
    pub fn last_time_ms(&self) -> u64 {
        self.last_time_ms
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    /// True when no key exists.
    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }

    /// Number of remembered request ids.
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    /// The remembered result of `key`, if still in the window.
    pub fn dedup_get(&self, key: &DedupKey) -> Option<&DedupRecord> {
        self.dedup.get(key)
    }

    /// All entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = &KvEntry> {
        self.kv.values()
    }

    /// All deduplication records in (principal, request id) order.
    pub fn dedup_iter(&self) -> impl Iterator<Item = (&DedupKey, &DedupRecord)> {
        self.dedup.iter()
    }

    /// SHA-256 (hex) of the revision and every key, value and version in key order. Two
    /// replicas that applied the same log prefix have equal digests.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.revision.to_be_bytes());
        hasher.update((self.kv.len() as u64).to_be_bytes());
        for entry in self.kv.values() {
            hasher.update((entry.key.len() as u64).to_be_bytes());
            hasher.update(entry.key.as_bytes());
            hasher.update((entry.value.len() as u64).to_be_bytes());
            hasher.update(&entry.value);
            hasher.update(entry.version.to_be_bytes());
            hasher.update(entry.create_version.to_be_bytes());
        }
        self.sched.hash_into(&mut hasher);
        for (k, v) in self.tokens.objects() {
            hasher.update((k.len() as u64).to_be_bytes());
            hasher.update(&k);
            hasher.update((v.len() as u64).to_be_bytes());
            hasher.update(&v);
        }
        hex::encode(hasher.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClientCommand, InvalidCommand, LoggedCommand};

    /// The principal of the tests' commands.
    const CALLER: Principal = Principal::Token(1);

    fn logged(commands: Vec<ClientCommand>) -> Vec<LoggedCommand> {
        commands.into_iter().map(|c| c.by(CALLER)).collect()
    }

    fn key(seq: u64) -> DedupKey {
        DedupKey {
            principal: CALLER,
            id: id(seq),
        }
    }

    /// The state rebuilt from its parts, as a restart or a snapshot install does.
    fn rebuilt(sm: &StateMachineData) -> StateMachineData {
        StateMachineData::from_parts(
            sm.iter().cloned(),
            sm.dedup_iter().map(|(i, r)| (*i, r.clone())),
            sm.objects(),
            sm.revision(),
            sm.last_time_ms(),
        )
        .expect("valid image")
    }

    #[test]
    fn dedup_evicts_oldest_first_at_the_bound() {
        let mut sm = StateMachineData {
            dedup_entries_max: 2,
            ..StateMachineData::new()
        };
        apply(&mut sm, 1, vec![put(1, "a", b"", None)]);
        apply(&mut sm, 2, vec![put(2, "b", b"", None)]);
        let (_, mutations) = sm.apply_request(&Request {
            time_ms: 3,
            commands: logged(vec![put(3, "c", b"", None)]),
        });
        assert!(mutations.contains(&Mutation::DedupDelete(key(1))));
        assert_eq!(sm.dedup_len(), 2);
        assert!(sm.dedup_get(&key(1)).is_none());
        assert!(sm.dedup_get(&key(2)).is_some() && sm.dedup_get(&key(3)).is_some());
    }

    fn id(seq: u64) -> RequestId {
        RequestId { client: 7, seq }
    }

    fn put(seq: u64, key: &str, value: &[u8], expect_version: Option<u64>) -> ClientCommand {
        ClientCommand {
            request_id: id(seq),
            command: Command::KvPut {
                key: key.to_string(),
                value: value.to_vec(),
                expect_version,
            },
        }
    }

    fn del(seq: u64, key: &str, expect_version: Option<u64>) -> ClientCommand {
        ClientCommand {
            request_id: id(seq),
            command: Command::KvDelete {
                key: key.to_string(),
                expect_version,
            },
        }
    }

    fn apply(sm: &mut StateMachineData, time_ms: u64, commands: Vec<ClientCommand>) -> Response {
        sm.apply_request(&Request {
            time_ms,
            commands: logged(commands),
        })
        .0
    }

    #[test]
    fn put_get_delete_and_versions() {
        let mut sm = StateMachineData::new();
        let r = apply(
            &mut sm,
            1,
            vec![put(1, "a", b"1", None), put(2, "b", b"2", None)],
        );
        assert_eq!(
            r.results,
            vec![
                CommandResult::Put { version: 1 },
                CommandResult::Put { version: 2 }
            ]
        );
        let r = apply(&mut sm, 2, vec![put(3, "a", b"3", None)]);
        assert_eq!(r.results, vec![CommandResult::Put { version: 3 }]);
        let a = sm.get("a").expect("a exists");
        assert_eq!(
            (a.version, a.create_version, &a.value[..]),
            (3, 1, &b"3"[..])
        );

        let r = apply(&mut sm, 3, vec![del(4, "a", None), del(5, "a", None)]);
        assert_eq!(
            r.results,
            vec![
                CommandResult::Deleted { version: 3 },
                CommandResult::NotFound
            ]
        );
        assert_eq!(sm.revision(), 4);
        assert!(sm.get("a").is_none());

        // Re-created: a fresh create_version, never an old version.
        let r = apply(&mut sm, 4, vec![put(6, "a", b"x", None)]);
        assert_eq!(r.results, vec![CommandResult::Put { version: 5 }]);
        assert_eq!(sm.get("a").map(|e| e.create_version), Some(5));
    }

    #[test]
    fn compare_and_set() {
        let mut sm = StateMachineData::new();
        let r = apply(
            &mut sm,
            1,
            vec![put(1, "k", b"v", Some(0)), put(2, "k", b"w", Some(0))],
        );
        assert_eq!(
            r.results,
            vec![
                CommandResult::Put { version: 1 },
                CommandResult::Conflict { current: 1 }
            ]
        );
        let r = apply(
            &mut sm,
            1,
            vec![put(3, "k", b"w", Some(1)), put(4, "k", b"z", Some(1))],
        );
        assert_eq!(
            r.results,
            vec![
                CommandResult::Put { version: 2 },
                CommandResult::Conflict { current: 2 }
            ]
        );
        let r = apply(
            &mut sm,
            1,
            vec![
                del(5, "k", Some(1)),
                del(6, "absent", Some(3)),
                del(7, "absent", Some(0)),
                del(8, "k", Some(2)),
            ],
        );
        assert_eq!(
            r.results,
            vec![
                CommandResult::Conflict { current: 2 },
                CommandResult::Conflict { current: 0 },
                CommandResult::NotFound,
                CommandResult::Deleted { version: 2 },
            ]
        );
        assert_eq!(sm.revision(), 3);
    }

    #[test]
    fn invalid_commands_change_nothing() {
        let mut sm = StateMachineData::new();
        let r = apply(
            &mut sm,
            1,
            vec![put(1, "", b"v", None), put(2, "a\nb", b"v", None)],
        );
        assert_eq!(
            r.results,
            vec![
                CommandResult::Invalid(InvalidCommand::EmptyKey),
                CommandResult::Invalid(InvalidCommand::KeyHasControlChar)
            ]
        );
        assert_eq!((sm.revision(), sm.len()), (0, 0));
    }

    #[test]
    fn retried_request_id_returns_stored_result() {
        let mut sm = StateMachineData::new();
        apply(&mut sm, 1, vec![put(1, "k", b"v", None)]);
        let before = sm.digest();
        // Same id and kind (a retry): the stored answer, no change. Another kind under the
        // same id: refused, never answered with the put's result.
        let r = apply(
            &mut sm,
            2,
            vec![put(1, "k", b"other", None), del(1, "k", None)],
        );
        assert_eq!(r.results[0], CommandResult::Put { version: 1 });
        match &r.results[1] {
            CommandResult::Rejected { reason } => assert!(
                reason.contains("already used for a key write")
                    && reason.contains("a key delete needs a new request id"),
                "{reason}"
            ),
            other => panic!("a delete under a put's id was answered with {other:?}"),
        }
        assert_eq!(sm.digest(), before);
        assert_eq!(
            sm.dedup_get(&key(1)).map(|r| r.kind),
            Some(CommandKind::KvPut)
        );
    }

    #[test]
    fn request_ids_are_per_principal() {
        let mut sm = StateMachineData::new();
        apply(&mut sm, 1, vec![put(1, "k", b"mine", None)]);
        // Another principal sending the same id (read from a task record, say) runs its own
        // command and gets its own result.
        let other = Principal::Token(2);
        let (r, _) = sm.apply_request(&Request {
            time_ms: 2,
            commands: vec![put(1, "j", b"theirs", None).by(other)],
        });
        assert_eq!(r.results, vec![CommandResult::Put { version: 2 }]);
        assert_eq!(
            sm.get("j").map(|e| e.value.clone()),
            Some(b"theirs".to_vec())
        );
        // Each principal's retry still gets its own stored result.
        let (r, _) = sm.apply_request(&Request {
            time_ms: 3,
            commands: vec![
                put(1, "k", b"mine", None).by(CALLER),
                put(1, "j", b"theirs", None).by(other),
            ],
        });
        assert_eq!(
            r.results,
            vec![
                CommandResult::Put { version: 1 },
                CommandResult::Put { version: 2 }
            ]
        );
        assert_eq!(sm.revision(), 2);
        let copy = rebuilt(&sm);
        assert_eq!(copy, sm);
    }

    #[test]
    fn dedup_expires_after_window_and_time_never_goes_back() {
        let mut sm = StateMachineData::new();
        apply(&mut sm, 1_000, vec![put(1, "k", b"v", None)]);
        // A stale leader stamp does not move time backwards.
        apply(&mut sm, 10, vec![]);
        assert_eq!(sm.last_time_ms(), 1_000);
        apply(&mut sm, 1_000 + DEDUP_WINDOW_MS - 1, vec![]);
        assert!(sm.dedup_get(&key(1)).is_some());
        let (_, mutations) = sm.apply_request(&Request {
            time_ms: 1_000 + DEDUP_WINDOW_MS,
            commands: vec![],
        });
        assert!(sm.dedup_get(&key(1)).is_none());
        assert!(mutations.contains(&Mutation::DedupDelete(key(1))));
        // Now the id is new again and applies.
        let r = apply(
            &mut sm,
            1_000 + DEDUP_WINDOW_MS,
            vec![put(1, "k", b"w", None)],
        );
        assert_eq!(r.results, vec![CommandResult::Put { version: 2 }]);
    }

    #[test]
    fn list_pages_by_prefix() {
        let mut sm = StateMachineData::new();
        let keys = ["a/1", "a/2", "a/3", "b/1", "a"];
        let commands = keys
            .iter()
            .enumerate()
            .map(|(i, k)| put(i as u64, k, b"v", None))
            .collect();
        apply(&mut sm, 1, commands);
        let page = sm.list("a/", None, 2);
        let got: Vec<_> = page.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(got, ["a/1", "a/2"]);
        assert_eq!(page.next.as_deref(), Some("a/2"));
        assert_eq!(page.revision, 5);
        let page = sm.list("a/", page.next.as_deref(), 2);
        let got: Vec<_> = page.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(got, ["a/3"]);
        assert_eq!(page.next, None);
        // Exactly `limit` left: no next.
        assert_eq!(sm.list("a/", Some("a/1"), 2).next, None);
        // start_after before the prefix starts at the prefix.
        assert_eq!(sm.list("b/", Some("a"), 10).entries.len(), 1);
        assert_eq!(sm.list("", None, 0).entries.len(), 5);
    }

    #[test]
    fn from_parts_rejects_broken_images() {
        let entry = |key: &str, version, create_version| KvEntry {
            key: key.to_string(),
            value: vec![],
            version,
            create_version,
        };
        assert!(StateMachineData::from_parts([entry("a", 2, 1)], [], [], 2, 0).is_ok());
        assert!(StateMachineData::from_parts([entry("a", 3, 1)], [], [], 2, 0).is_err());
        assert!(StateMachineData::from_parts([entry("a", 1, 2)], [], [], 2, 0).is_err());
        assert!(StateMachineData::from_parts([entry("", 1, 1)], [], [], 2, 0).is_err());
        assert!(
            StateMachineData::from_parts([entry("a", 1, 1), entry("b", 1, 1)], [], [], 2, 0)
                .is_err()
        );
        let record = DedupRecord {
            time_ms: 5,
            kind: CommandKind::KvDelete,
            result: CommandResult::NotFound,
        };
        assert!(StateMachineData::from_parts([], [(key(1), record)], [], 0, 4).is_err());
    }

    #[test]
    fn from_parts_round_trips() {
        let mut sm = StateMachineData::new();
        apply(
            &mut sm,
            3,
            vec![put(1, "a", b"1", None), put(2, "b", b"2", None)],
        );
        apply(&mut sm, 4, vec![del(3, "a", None)]);
        let copy = rebuilt(&sm);
        assert_eq!(copy, sm);
    }

    #[test]
    fn tokens_apply_persist_and_rebuild() {
        use crate::tokens::{token_hash, Role, TOKEN_NAME_BYTES_MAX};
        let create = |seq, role, name: Option<&str>, secret: &str, bootstrap| ClientCommand {
            request_id: id(seq),
            command: Command::TokenCreate {
                role,
                name: name.map(str::to_string),
                hash: token_hash(secret),
                bootstrap,
            },
        };
        let mut sm = StateMachineData::new();
        let (r, mutations) = sm.apply_request(&Request {
            time_ms: 10,
            commands: logged(vec![
                create(1, Role::Admin, Some("bootstrap"), "s1", true),
                create(2, Role::Invoker, Some("ci"), "s2", false),
                create(3, Role::Admin, None, "s3", true),
                create(
                    4,
                    Role::Invoker,
                    Some(&"n".repeat(TOKEN_NAME_BYTES_MAX + 1)),
                    "s4",
                    false,
                ),
                create(5, Role::Deployer, None, "s5", true),
            ]),
        });
        assert!(matches!(r.results[0], CommandResult::TokenCreated { .. }));
        assert!(matches!(r.results[1], CommandResult::TokenCreated { .. }));
        assert!(
            matches!(r.results[2], CommandResult::Rejected { .. }),
            "second bootstrap"
        );
        assert!(
            matches!(r.results[3], CommandResult::Invalid(_)),
            "name too long"
        );
        assert!(
            matches!(r.results[4], CommandResult::Invalid(_)),
            "non-admin bootstrap"
        );
        assert_eq!(sm.tokens().len(), 2);
        let token_writes = mutations
            .iter()
            .filter(|m| matches!(m, Mutation::Obj { key, .. } if Tokens::is_token_key(key)))
            .count();
        assert_eq!(token_writes, 2);
        let r = apply(
            &mut sm,
            20,
            vec![ClientCommand {
                request_id: id(6),
                command: Command::TokenRevoke { id: 2 },
            }],
        );
        assert!(matches!(&r.results[0], CommandResult::TokenRevoked { token } if token.revoked));
        assert!(sm.tokens().authenticate("s2").is_none());
        assert_eq!(
            sm.tokens().authenticate("s1").map(|t| t.role),
            Some(Role::Admin)
        );
        let copy = rebuilt(&sm);
        assert_eq!(copy, sm);
        assert_eq!(copy.digest(), sm.digest());
        assert!(copy.tokens().get(2).is_some_and(|t| t.revoked));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn command() -> impl Strategy<Value = LoggedCommand> {
            let key = prop::sample::select(vec!["a", "b", "c", "d/1", "d/2", ""]);
            let id = (0u64..3, 0u64..20).prop_map(|(client, seq)| RequestId { client, seq });
            let expect = prop::option::of(0u64..8);
            let op = (
                key,
                expect,
                prop::collection::vec(any::<u8>(), 0..4),
                any::<bool>(),
            )
                .prop_map(|(key, expect_version, value, is_put)| {
                    if is_put {
                        Command::KvPut {
                            key: key.to_string(),
                            value,
                            expect_version,
                        }
                    } else {
                        Command::KvDelete {
                            key: key.to_string(),
                            expect_version,
                        }
                    }
                });
            // Token commands too, so replay and rebuild cover the token table.
            let token = (0u8..4, any::<bool>(), 1u64..4).prop_map(|(secret, bootstrap, revoke)| {
                if secret == 3 {
                    Command::TokenRevoke { id: revoke }
                } else {
                    Command::TokenCreate {
                        role: if bootstrap {
                            crate::tokens::Role::Admin
                        } else {
                            crate::tokens::Role::Invoker
                        },
                        name: None,
                        hash: crate::tokens::token_hash(&secret.to_string()),
                        bootstrap,
                    }
                }
            });
            let op = prop_oneof![4 => op, 1 => token];
            // Two principals sharing ids: one's ids never answer the other.
            let principal = prop::sample::select(vec![Principal::Node, Principal::Token(1)]);
            (principal, id, op).prop_map(|(principal, request_id, command)| LoggedCommand {
                principal,
                request_id,
                command,
            })
        }

        fn requests() -> impl Strategy<Value = Vec<Request>> {
            prop::collection::vec(
                (
                    0u64..2 * DEDUP_WINDOW_MS,
                    prop::collection::vec(command(), 0..6),
                )
                    .prop_map(|(time_ms, commands)| Request { time_ms, commands }),
                0..30,
            )
        }

        /// Replays mutations onto a map, as the storage layer does onto RocksDB.
        fn replay(
            kv: &mut BTreeMap<String, KvEntry>,
            dedup: &mut BTreeMap<DedupKey, DedupRecord>,
            scalars: &mut (u64, u64),
            objects: &mut BTreeMap<Vec<u8>, Vec<u8>>,
            mutations: Vec<Mutation>,
        ) {
            for m in mutations {
                match m {
                    Mutation::KvPut(e) => {
                        kv.insert(e.key.clone(), e);
                    }
                    Mutation::KvDelete(k) => {
                        kv.remove(&k);
                    }
                    Mutation::DedupPut { key, record } => {
                        dedup.insert(key, record);
                    }
                    Mutation::DedupDelete(id) => {
                        dedup.remove(&id);
                    }
                    Mutation::Meta {
                        revision,
                        last_time_ms,
                    } => *scalars = (revision, last_time_ms),
                    Mutation::Obj { key, value } => match value {
                        Some(v) => {
                            objects.insert(key, v);
                        }
                        None => {
                            objects.remove(&key);
                        }
                    },
                }
            }
        }

        proptest! {
            // A failure is printed with its seed and shrunk input, never written into the tree.
            #![proptest_config(ProptestConfig {
                failure_persistence: None,
                ..ProptestConfig::default()
            })]
            #[test]
            fn replay_is_deterministic(reqs in requests()) {
                let mut a = StateMachineData::new();
                let mut b = StateMachineData::new();
                for r in &reqs {
                    let (ra, ma) = a.apply_request(r);
                    let (rb, mb) = b.apply_request(r);
                    prop_assert_eq!(ra, rb);
                    prop_assert_eq!(ma, mb);
                }
                prop_assert_eq!(a.digest(), b.digest());
                prop_assert_eq!(a, b);
            }

            #[test]
            fn mutations_reproduce_the_state(reqs in requests()) {
                let mut sm = StateMachineData::new();
                let mut kv = BTreeMap::new();
                let mut dedup = BTreeMap::new();
                let mut scalars = (0, 0);
                let mut objects = BTreeMap::new();
                for r in &reqs {
                    let (_, m) = sm.apply_request(r);
                    replay(&mut kv, &mut dedup, &mut scalars, &mut objects, m);
                }
                let rebuilt = StateMachineData::from_parts(
                    kv.into_values(), dedup, objects, scalars.0, scalars.1,
                ).expect("mutations form a valid image");
                prop_assert_eq!(rebuilt, sm);
            }

            #[test]
            fn retrying_a_request_changes_nothing(reqs in requests()) {
                let mut sm = StateMachineData::new();
                for r in &reqs {
                    let (first, _) = sm.apply_request(r);
                    let digest = sm.digest();
                    // Same commands again at the same time: all ids are remembered.
                    let (again, _) = sm.apply_request(r);
                    prop_assert_eq!(first, again);
                    prop_assert_eq!(sm.digest(), digest);
                }
            }

            #[test]
            fn versions_strictly_increase(reqs in requests()) {
                let mut sm = StateMachineData::new();
                let mut version_max = 0;
                for r in &reqs {
                    let mut revision = sm.revision();
                    let (_, mutations) = sm.apply_request(r);
                    for m in mutations {
                        match m {
                            Mutation::KvPut(e) => {
                                revision += 1;
                                prop_assert_eq!(e.version, revision);
                                prop_assert!(e.version > version_max);
                                version_max = e.version;
                            }
                            Mutation::KvDelete(_) => revision += 1,
                            _ => {}
                        }
                    }
                    prop_assert_eq!(sm.revision(), revision);
                    for e in sm.iter() {
                        prop_assert!(e.create_version <= e.version && e.version <= sm.revision());
                    }
                }
            }
        }
    }
}
