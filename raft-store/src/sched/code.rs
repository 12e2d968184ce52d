//! Functions and their code inside the scheduler: code archives uploaded in chunks and checked
//! against their digest, versions made by deploy, and removal.
//!
//! Invariants:
//! - a code blob is `complete` only when every chunk arrived and the whole hashes to its
//!   digest; a blob that does not match is dropped, never kept half-trusted;
//! - a deploy names only complete code; a function keeps at most `VERSIONS_KEPT` versions;
//! - a function's identity is never reused: a function made again after removal gets a new
//!   one, and removal fails every unfinished task of it and ends its running streams.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{failure_result, rejected, ObjKey, Sched};
use crate::functions::{
    chunk_count, CodeBlob, FunctionRecord, FunctionSpec, FunctionVersion, TaskId, TaskState,
    CODE_BLOBS_MAX, CODE_TOTAL_BYTES_MAX, FUNCTIONS_MAX, VERSIONS_KEPT,
};
use crate::model::CommandResult;
use crate::streams::StreamId;

impl Sched {
    pub fn code_blob(&self, digest: &str) -> Option<&CodeBlob> {
        self.code.get(digest)
    }

    /// The whole archive of a complete code blob.
    pub fn code_archive(&self, digest: &str) -> Option<Vec<u8>> {
        let blob = self.code.get(digest).filter(|b| b.complete)?;
        let mut out = Vec::with_capacity(usize::try_from(blob.total_bytes).ok()?);
        for i in 0..blob.chunks {
            out.extend_from_slice(self.chunks.get(&(digest.to_string(), i))?);
        }
        Some(out)
    }

    /// Stores one code chunk.
    pub fn code_chunk(
        &mut self,
        now: u64,
        digest: &str,
        total_bytes: u64,
        index: u32,
        bytes: &[u8],
    ) -> CommandResult {
        let chunks = chunk_count(total_bytes);
        match self.code.get(digest) {
            Some(blob) if blob.complete => return CommandResult::ChunkStored { complete: true },
            Some(blob) if blob.total_bytes != total_bytes => {
                return rejected(format!(
                    "code {digest} is being uploaded with {} bytes, not {total_bytes}",
                    blob.total_bytes
                ))
            }
            Some(_) => {}
            None => {
                if self.code.len() >= CODE_BLOBS_MAX {
                    return rejected(format!("the cluster holds {CODE_BLOBS_MAX} code archives"));
                }
                if self.code_bytes + total_bytes > CODE_TOTAL_BYTES_MAX {
                    return rejected(format!(
                        "the cluster's code store is full ({} of {CODE_TOTAL_BYTES_MAX} bytes); remove unused functions",
                        self.code_bytes
                    ));
                }
                self.code.insert(
                    digest.to_string(),
                    CodeBlob {
                        digest: digest.to_string(),
                        total_bytes,
                        chunks,
                        received: 0,
                        complete: false,
                        created_ms: now,
                    },
                );
            }
        }
        let key = (digest.to_string(), index);
        if !self.chunks.contains_key(&key) {
            self.code_bytes += bytes.len() as u64;
            self.chunks.insert(key, Arc::new(bytes.to_vec()));
            self.touch(ObjKey::Chunk(digest.to_string(), index));
            if let Some(blob) = self.code.get_mut(digest) {
                blob.received += 1;
            }
        }
        self.touch(ObjKey::Code(digest.to_string()));
        let blob = &self.code[digest];
        if blob.received < blob.chunks {
            return CommandResult::ChunkStored { complete: false };
        }
        let mut hasher = Sha256::new();
        for i in 0..blob.chunks {
            hasher.update(
                &**self
                    .chunks
                    .get(&(digest.to_string(), i))
                    .expect("all received"),
            );
        }
        if hex::encode(hasher.finalize()) != digest.to_ascii_lowercase() {
            self.drop_code(digest);
            return rejected(format!(
                "the uploaded code does not match its digest {digest}; upload it again"
            ));
        }
        if let Some(blob) = self.code.get_mut(digest) {
            blob.complete = true;
        }
        CommandResult::ChunkStored { complete: true }
    }

    pub(super) fn drop_code(&mut self, digest: &str) {
        let Some(blob) = self.code.remove(digest) else {
            return;
        };
        self.touch(ObjKey::Code(digest.to_string()));
        for i in 0..blob.chunks {
            if let Some(bytes) = self.chunks.remove(&(digest.to_string(), i)) {
                self.code_bytes -= bytes.len() as u64;
                self.touch(ObjKey::Chunk(digest.to_string(), i));
            }
        }
    }

    /// Makes a new version of `spec.name`.
    pub fn deploy(&mut self, now: u64, spec: &FunctionSpec) -> CommandResult {
        if !self.code.get(&spec.code_digest).is_some_and(|b| b.complete) {
            return rejected(format!(
                "code {} is not uploaded (or its upload is incomplete)",
                spec.code_digest
            ));
        }
        if !self.functions.contains_key(&spec.name) && self.functions.len() >= FUNCTIONS_MAX {
            return rejected(format!("the cluster holds {FUNCTIONS_MAX} functions"));
        }
        if !self.functions.contains_key(&spec.name) {
            self.next_function += 1;
            self.touch(ObjKey::FunctionMeta);
            let record = FunctionRecord {
                name: spec.name.clone(),
                id: self.next_function,
                versions: Vec::new(),
                latest: 0,
                created_ms: now,
            };
            self.functions.insert(spec.name.clone(), record);
        }
        let record = self
            .functions
            .get_mut(&spec.name)
            .expect("the function exists or was just made");
        let version = record.latest + 1;
        record.versions.push(FunctionVersion {
            version,
            function_id: record.id,
            spec: spec.clone(),
            deployed_ms: now,
        });
        record.latest = version;
        while record.versions.len() > VERSIONS_KEPT {
            record.versions.remove(0);
        }
        self.touch(ObjKey::Function(spec.name.clone()));
        CommandResult::Deployed { version }
    }

    /// Removes a function: every task of it not finished fails (a task names its function
    /// by name and version, which a function made later under the same name reuses, so none
    /// may outlive the removal), its ledger entries go, and no node is counted warm for it.
    pub fn remove(&mut self, now: u64, name: &str) -> CommandResult {
        if self.functions.remove(name).is_none() {
            return rejected(format!("function {name} does not exist"));
        }
        self.touch(ObjKey::Function(name.to_string()));
        let placed: Vec<TaskId> = self
            .by_node
            .values()
            .flatten()
            .filter(|id| self.tasks.get(id).is_some_and(|t| t.function == name))
            .copied()
            .collect();
        for id in placed {
            self.release(id);
            let result = failure_result("the function was removed");
            self.finish(id, TaskState::Failed, Some(result), now);
        }
        // A stream names its function by name and version too: it ends with its function
        // rather than feed its items to a function made later under the same name.
        let streams: Vec<StreamId> = self
            .streams
            .values()
            .filter(|j| j.function == name && j.state == crate::streams::StreamState::Running)
            .map(|j| j.id)
            .collect();
        for id in streams {
            let reason = format!("function {name} was removed");
            self.end_stream(id, crate::streams::StreamState::Failed, Some(reason), now);
        }
        for n in self.nodes.values_mut() {
            if n.warm.iter().any(|w| w.function == name) {
                n.warm.retain(|w| w.function != name);
                self.dirty.insert(ObjKey::Node(n.id));
            }
        }
        let mut queued: Vec<TaskId> = self
            .queues
            .remove(name)
            .into_iter()
            .flatten()
            .map(|(_, id)| id)
            .collect();
        let delayed: Vec<(u64, TaskId)> = self
            .delayed
            .iter()
            .filter(|(_, id)| self.tasks.get(id).is_some_and(|t| t.function == name))
            .copied()
            .collect();
        for entry in delayed {
            self.delayed.remove(&entry);
            queued.push(entry.1);
        }
        for id in queued {
            let result = failure_result("the function was removed");
            self.finish(id, TaskState::Failed, Some(result), now);
        }
        let keys: Vec<String> = self
            .ledger
            .values()
            .filter(|e| e.function == name)
            .map(|e| e.key.clone())
            .collect();
        for k in keys {
            self.ledger_remove(&k);
        }
        CommandResult::Removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::*;
    use crate::sched::testing::*;
    use crate::sched::*;
    use crate::streams::*;

    #[test]
    fn code_must_match_its_digest_and_be_complete() {
        let mut s = Sched::default();
        let code = vec![7u8; CODE_CHUNK_BYTES_FOR_TEST + 10];
        let digest = hex::encode(Sha256::digest(&code));
        let r = s.code_chunk(
            1,
            &digest,
            code.len() as u64,
            0,
            &code[..CODE_CHUNK_BYTES_FOR_TEST],
        );
        assert_eq!(r, CommandResult::ChunkStored { complete: false });
        assert!(matches!(
            s.deploy(1, &spec("f", &digest, 1, 1)),
            CommandResult::Rejected { .. }
        ));
        let r = s.code_chunk(
            1,
            &digest,
            code.len() as u64,
            1,
            &code[CODE_CHUNK_BYTES_FOR_TEST..],
        );
        assert_eq!(r, CommandResult::ChunkStored { complete: true });
        assert_eq!(s.code_archive(&digest).as_deref(), Some(&code[..]));
        // A wrong archive under a digest is refused and leaves nothing behind.
        let bad = "0".repeat(64);
        assert!(matches!(
            s.code_chunk(1, &bad, 3, 0, b"abc"),
            CommandResult::Rejected { .. }
        ));
        assert!(s.code_blob(&bad).is_none());
        assert_reloads(&mut s, 1);
    }

    #[test]
    fn removing_a_function_fails_its_queue_and_collects_its_code() {
        let (mut s, digest) = cluster();
        let mut ids = vec![];
        for _ in 0..4 {
            ids.push(submitted(s.submit(2, "f", None, b"", false, None, &BTreeMap::new())).0);
        }
        let token = s.task(ids[0]).map(|t| t.token).expect("assigned");
        assert_eq!(s.remove(3, "f"), CommandResult::Removed);
        assert_eq!(s.task(ids[3]).map(|t| t.state), Some(TaskState::Failed));
        // Placed tasks fail too: none outlives its function, and its slot is free.
        assert_eq!(s.task(ids[0]).map(|t| t.state), Some(TaskState::Failed));
        assert_eq!(s.stats().tasks_active, 0);
        assert!(s.tasks_on(1).is_empty() && s.tasks_on(2).is_empty());
        // Its late completion is refused.
        assert!(matches!(
            s.complete(4, ids[0], token, &result(RunStatus::Succeeded), &[]),
            CommandResult::Rejected { .. }
        ));
        s.tick(3 + CODE_UNREFERENCED_TTL_MS + GC_INTERVAL_MS);
        assert!(s.code_blob(&digest).is_none());
        assert_reloads(&mut s, 3 + CODE_UNREFERENCED_TTL_MS + GC_INTERVAL_MS);
    }

    #[test]
    fn a_function_made_again_after_removal_has_a_new_identity() {
        let (mut s, digest) = cluster();
        let first = s.function("f").map(|f| f.id).expect("f");
        assert_eq!(first, 1);
        let job = start_stream(&mut s, 2, None);
        s.heartbeat(
            2,
            &hb(
                1,
                vec![WarmReport {
                    function: "f".into(),
                    version: 1,
                    idle: 1,
                }],
            ),
        );
        assert_eq!(
            s.nodes().find(|n| n.id == 1).map(|n| n.warm_idle("f", 1)),
            Some(1)
        );
        assert_eq!(s.remove(3, "f"), CommandResult::Removed);
        assert_eq!(
            s.nodes().find(|n| n.id == 1).map(|n| n.warm_idle("f", 1)),
            Some(0),
            "no node counts warm for a removed function"
        );
        let j = s.stream(job).expect("job");
        assert_eq!(
            (j.state, j.reason.as_deref()),
            (StreamState::Failed, Some("function f was removed")),
            "a stream ends with its function"
        );
        assert_eq!(
            s.deploy(4, &spec("f", &digest, 2, 2)),
            CommandResult::Deployed { version: 1 }
        );
        let again = s.function("f").expect("f").clone();
        assert_eq!((again.id, again.latest), (2, 1));
        assert_eq!(again.versions[0].function_id, 2);
        // A late report of the old function's sandboxes, applied after the new deploy, only
        // claims versions that exist; the node's pool keys by identity either way.
        s.deploy(5, &spec("g", &digest, 2, 2));
        assert_eq!(s.function("g").map(|f| f.id), Some(3));
        s.remove(6, "g");
        s.heartbeat(
            7,
            &hb(
                1,
                vec![WarmReport {
                    function: "g".into(),
                    version: 1,
                    idle: 1,
                }],
            ),
        );
        assert_eq!(
            s.nodes().find(|n| n.id == 1).map(|n| n.warm_idle("g", 1)),
            Some(0)
        );
        assert_reloads(&mut s, 7);
        // The counter is persisted: a reloaded state does not give 2 or 3 again.
        let mut copy = Sched::from_objects(s.objects(), 7).expect("valid image");
        copy.deploy(8, &spec("h", &digest, 2, 2));
        assert_eq!(copy.function("h").map(|f| f.id), Some(4));
    }
}
