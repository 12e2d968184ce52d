//! The store behind the data service: the [`KvBackend`] trait, and [`MemoryBackend`], an
//! unreplicated one for tests and single-process tools. The node's own is `NodeKv`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use skiff_raft_store::model::{
    validate_key, CommandResult, InvalidCommand, KvEntry, KvPage, VALUE_BYTES_MAX,
};

/// The store as the data service sees it. The node implements it over its Raft state machine;
/// [`MemoryBackend`] implements it in memory.
///
/// `Err` is for the store being unreachable or failing (no leader, timeout, shutdown); business
/// outcomes — a conflict, a missing key, an invalid command — are `Ok` [`CommandResult`]s.
pub trait KvBackend: Send + Sync + 'static {
    fn get(&self, key: String) -> BoxFuture<'static, Result<Option<KvEntry>, String>>;
    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        expect_version: Option<u64>,
    ) -> BoxFuture<'static, Result<CommandResult, String>>;
    fn delete(
        &self,
        key: String,
        expect_version: Option<u64>,
    ) -> BoxFuture<'static, Result<CommandResult, String>>;
    fn list(
        &self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> BoxFuture<'static, Result<KvPage, String>>;
    /// Told of every request the service refused as the function's fault (a key its grant
    /// does not cover: `data_denied`; a malformed or oversize request: `data_invalid`), so
    /// the node can count it.
    fn refused(&self, _reason: &'static str) {}
}

/// An unreplicated [`KvBackend`]: one ordered map behind a mutex, with versions drawn from one
/// revision counter as the replicated store does. For tests and single-process tools.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    state: Arc<Mutex<MemoryState>>,
}

#[derive(Debug, Default)]
struct MemoryState {
    revision: u64,
    entries: BTreeMap<String, KvEntry>,
}

impl MemoryBackend {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut MemoryState) -> T) -> T {
        // A panic while holding the lock cannot leave the map half-updated: every change below
        // is a single insert or remove.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state)
    }
}

impl KvBackend for MemoryBackend {
    fn get(&self, key: String) -> BoxFuture<'static, Result<Option<KvEntry>, String>> {
        let entry = self.with_state(|s| s.entries.get(&key).cloned());
        Box::pin(async move { Ok(entry) })
    }

    fn put(
        &self,
        key: String,
        value: Vec<u8>,
        expect_version: Option<u64>,
    ) -> BoxFuture<'static, Result<CommandResult, String>> {
        let result = self.with_state(|s| {
            if let Err(e) = validate_key(&key) {
                return CommandResult::Invalid(e);
            }
            if value.len() > VALUE_BYTES_MAX {
                return CommandResult::Invalid(InvalidCommand::ValueTooLarge {
                    bytes: value.len(),
                    max: VALUE_BYTES_MAX,
                });
            }
            let current = s.entries.get(&key);
            let current_version = current.map_or(0, |e| e.version);
            if expect_version.is_some_and(|v| v != current_version) {
                return CommandResult::Conflict {
                    current: current_version,
                };
            }
            s.revision += 1;
            let version = s.revision;
            let create_version = current.map_or(version, |e| e.create_version);
            s.entries.insert(
                key.clone(),
                KvEntry {
                    key,
                    value,
                    version,
                    create_version,
                },
            );
            CommandResult::Put { version }
        });
        Box::pin(async move { Ok(result) })
    }

    fn delete(
        &self,
        key: String,
        expect_version: Option<u64>,
    ) -> BoxFuture<'static, Result<CommandResult, String>> {
        let result = self.with_state(|s| {
            let current_version = s.entries.get(&key).map_or(0, |e| e.version);
            if expect_version.is_some_and(|v| v != current_version) {
                return CommandResult::Conflict {
                    current: current_version,
                };
            }
            match s.entries.remove(&key) {
                Some(entry) => {
                    s.revision += 1;
                    CommandResult::Deleted {
                        version: entry.version,
                    }
                }
                None => CommandResult::NotFound,
            }
        });
        Box::pin(async move { Ok(result) })
    }

    fn list(
        &self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> BoxFuture<'static, Result<KvPage, String>> {
        let page = self.with_state(|s| {
            let limit = limit as usize;
            let mut entries: Vec<KvEntry> = s
                .entries
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter(|(k, _)| start_after.as_ref().is_none_or(|after| *k > after))
                .take(limit + 1)
                .map(|(_, e)| e.clone())
                .collect();
            let next = if entries.len() > limit {
                entries.truncate(limit);
                entries.last().map(|e| e.key.clone())
            } else {
                None
            };
            KvPage {
                entries,
                next,
                revision: s.revision,
            }
        });
        Box::pin(async move { Ok(page) })
    }
}
