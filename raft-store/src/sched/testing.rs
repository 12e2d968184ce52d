//! Builders shared by the scheduler's unit tests: code uploads, specs, heartbeats, results,
//! and the check that a state reloads from its objects unchanged.

use sha2::{Digest, Sha256};

use super::Sched;
use crate::functions::{
    DataGrant, FnMode, FunctionSpec, Heartbeat, RunStatus, TaskId, TaskResult, WarmReport,
};
use crate::model::{CommandResult, NodeId};
use crate::streams::{StreamOptions, StreamSource, StreamStartRequest};

pub(crate) fn upload(s: &mut Sched, now: u64, code: &[u8]) -> String {
    let digest = hex::encode(Sha256::digest(code));
    let total = code.len() as u64;
    for (i, chunk) in code.chunks(CODE_CHUNK_BYTES_FOR_TEST).enumerate() {
        let r = s.code_chunk(now, &digest, total, i as u32, chunk);
        assert!(matches!(r, CommandResult::ChunkStored { .. }), "{r:?}");
    }
    digest
}

pub(crate) const CODE_CHUNK_BYTES_FOR_TEST: usize = crate::functions::CODE_CHUNK_BYTES;

pub(crate) fn spec(name: &str, digest: &str, max_concurrency: u32, queue_max: u32) -> FunctionSpec {
    FunctionSpec {
        name: name.into(),
        code_digest: digest.into(),
        entry: vec!["sh".into(), "main.sh".into()],
        mode: FnMode::Exec,
        tier: "standard".into(),
        policy: None,
        memory_bytes: 64 << 20,
        timeout_ms: 1_000,
        max_concurrency,
        queue_max,
        min_warm: 0,
        max_attempts: 3,
        retry_backoff_ms: 100,
        data: DataGrant::default(),
        env: vec![],
        idempotency: None,
        stages: Vec::new(),
    }
}

pub(crate) fn hb(node: NodeId, warm: Vec<WarmReport>) -> Heartbeat {
    Heartbeat {
        node,
        slots: 8,
        memory_budget_bytes: 1 << 30,
        warm_memory_bytes: 0,
        warm,
        running: vec![],
    }
}

pub(crate) fn result(status: RunStatus) -> TaskResult {
    TaskResult {
        status,
        node: 1,
        exit_code: Some(0),
        output: b"out".to_vec(),
        log: vec![],
        error: None,
        warm: false,
        wall_ms: 1,
        cpu_ms: 1,
        peak_memory_bytes: 1,
    }
}

pub(crate) fn submitted(r: CommandResult) -> (TaskId, Option<NodeId>, u64) {
    match r {
        CommandResult::Submitted {
            task, node, token, ..
        } => (task, node, token),
        other => panic!("not submitted: {other:?}"),
    }
}

/// Reloading from the persisted objects gives the same state.
pub(crate) fn assert_reloads(s: &mut Sched, now: u64) {
    s.check(now).expect("the state holds every invariant");
    s.take_changes();
    let copy = Sched::from_objects(s.objects(), now).expect("valid image");
    assert_eq!(&copy, s);
}

pub(crate) fn cluster() -> (Sched, String) {
    let mut s = Sched::default();
    let digest = upload(&mut s, 1, b"echo hi");
    assert_eq!(
        s.deploy(1, &spec("f", &digest, 2, 2)),
        CommandResult::Deployed { version: 1 }
    );
    s.heartbeat(1, &hb(1, vec![]));
    s.heartbeat(1, &hb(2, vec![]));
    (s, digest)
}

pub(crate) fn start_stream(s: &mut Sched, batch: u32, results: Option<&str>) -> u64 {
    let req = StreamStartRequest {
        function: "f".into(),
        source: StreamSource::Jsonl {
            path: "/data/x.jsonl".into(),
        },
        options: StreamOptions {
            max_concurrency: 10,
            batch,
            max_attempts: 2,
            retry_backoff_ms: 100,
            results_prefix: results.map(String::from),
            ..StreamOptions::default()
        },
    };
    match s.stream_start(2, 0, &req) {
        CommandResult::StreamStarted { job } => job,
        other => panic!("{other:?}"),
    }
}
