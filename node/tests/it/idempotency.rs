//! Idempotent execution on a real three-node cluster: hits run nothing (a counter the function
//! keeps through the data service proves it), each kind of change causes exactly one new run,
//! and concurrent identical calls share one run.

use std::time::Duration;

use skiff_client::api::{
    ApiError, CacheOutcome, ClientApiClient, Command, CommandResult, DataGrant, Dependency, FnMode,
    FunctionSpec, Idempotency, InvokeRequest, MissReason, ReadConsistency, Task, TaskState,
};

use crate::functions::{
    archive, ctx, deploy, is_root, output, request_id, rpc, spec, wait_workers, write, CONFIG,
};
use crate::harness::TestCluster;
use crate::require_root;

async fn call(c: &ClientApiClient, function: &str, payload: &[u8]) -> Task {
    call_with(c, function, payload, None).await.expect("invoke")
}

async fn call_with(
    c: &ClientApiClient,
    function: &str,
    payload: &[u8],
    key: Option<&str>,
) -> Result<Task, ApiError> {
    c.invoke(
        ctx(120),
        InvokeRequest {
            request_id: request_id(),
            function: function.into(),
            version: None,
            payload: payload.to_vec(),
            wait: true,
            idempotency_key: key.map(str::to_string),
            tokens: vec![],
            files: vec![],
        },
    )
    .await
    .expect("rpc")
}

pub(crate) async fn put(c: &ClientApiClient, key: &str, value: &str) {
    let r = write(
        c,
        Command::KvPut {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            expect_version: None,
        },
    )
    .await;
    assert!(matches!(r, CommandResult::Put { .. }), "{r:?}");
}

pub(crate) async fn get(c: &ClientApiClient, key: &str) -> String {
    // Retried while a read is refused for want of a quorum (a leader change, or load).
    for _ in 0..100 {
        match c
            .kv_get(ctx(10), key.into(), ReadConsistency::Linearizable)
            .await
            .expect("rpc")
        {
            Ok(e) => {
                return e
                    .map(|e| String::from_utf8_lossy(&e.value).into_owned())
                    .unwrap_or_default()
            }
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("get {key}: {e:?}"),
        }
    }
    panic!("get {key}: no answer after 100 tries");
}

pub(crate) fn miss_reason(t: &Task) -> MissReason {
    match &t.cache {
        Some(CacheOutcome::Miss { reason }) => reason.clone(),
        other => panic!("expected a miss, got {other:?} for {t:?}"),
    }
}

pub(crate) fn is_hit(t: &Task) -> bool {
    matches!(t.cache, Some(CacheOutcome::Hit { .. }))
}

/// A counter kept through the data service: every run adds one to `counter`.
const COUNTING: &str = "c=$(skiff-data get counter 2>/dev/null || echo 0)\n\
skiff-data put counter $((c+1)) >/dev/null || exit 7\n\
printf 'cfg=%s payload=%s' \"$(skiff-data get cfg 2>/dev/null)\" \"$(cat)\"\n";

fn idempotent(name: &str, deps: Vec<Dependency>, track_reads: bool) -> FunctionSpec {
    FunctionSpec {
        data: DataGrant {
            read_prefixes: vec!["cfg".into(), "data/".into()],
            write_prefixes: vec!["counter".into()],
        },
        idempotency: Some(Idempotency {
            dependencies: deps,
            ttl_ms: 600_000,
            cache_failures: false,
            track_reads,
        }),
        ..spec(name, &["/bin/sh", "main.sh"], FnMode::Exec)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hits_run_nothing_and_each_change_runs_once() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 2).await;
    put(&c, "cfg", "one").await;
    let code = archive(&[("main.sh", 0o755, COUNTING)]);
    let s = idempotent("counted", vec![Dependency::Kv("cfg".into())], false);
    deploy(&c, s.clone(), &code).await;
    wait_workers(&c, 3).await;

    let first = call(&c, "counted", b"p1").await;
    assert_eq!(first.state, TaskState::Succeeded, "{first:?}");
    assert_eq!(miss_reason(&first), MissReason::FirstRun);
    assert_eq!(output(&first), "cfg=one payload=p1");
    assert_eq!(get(&c, "counter").await, "1");

    let second = call(&c, "counted", b"p1").await;
    assert!(is_hit(&second), "{second:?}");
    assert_eq!(output(&second), "cfg=one payload=p1");
    assert_eq!(get(&c, "counter").await, "1", "a hit runs nothing");

    // A declared dependency changes: one run, then hits again.
    put(&c, "cfg", "two").await;
    let t = call(&c, "counted", b"p1").await;
    assert!(
        matches!(miss_reason(&t), MissReason::DependencyChanged { ref dependency, .. } if dependency == "kv:cfg"),
        "{t:?}"
    );
    assert_eq!(output(&t), "cfg=two payload=p1");
    assert!(is_hit(&call(&c, "counted", b"p1").await));
    assert_eq!(get(&c, "counter").await, "2");

    // The payload changes (under an explicit key): one run.
    let a = call_with(&c, "counted", b"x", Some("job-7"))
        .await
        .expect("invoke");
    assert_eq!(miss_reason(&a), MissReason::FirstRun);
    let b = call_with(&c, "counted", b"y", Some("job-7"))
        .await
        .expect("invoke");
    assert_eq!(miss_reason(&b), MissReason::PayloadChanged);
    assert_eq!(get(&c, "counter").await, "4");

    // The code changes: one run.
    deploy(
        &c,
        s,
        &archive(&[("main.sh", 0o755, &format!("{COUNTING}\n# v2\n"))]),
    )
    .await;
    let t = call(&c, "counted", b"p1").await;
    assert!(
        matches!(miss_reason(&t), MissReason::CodeChanged { was: 1, now: 2 }),
        "{t:?}"
    );
    assert!(is_hit(&call(&c, "counted", b"p1").await));
    assert_eq!(get(&c, "counter").await, "5");

    // Fifty concurrent identical calls: one run, fifty identical results.
    let mut calls = Vec::new();
    for _ in 0..50 {
        let c = c.clone();
        calls.push(tokio::spawn(
            async move { call(&c, "counted", b"burst").await },
        ));
    }
    let mut outputs = Vec::new();
    for call in calls {
        let t = call.await.expect("join");
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        outputs.push(output(&t));
    }
    assert!(
        outputs.iter().all(|o| o == "cfg=two payload=burst"),
        "{outputs:?}"
    );
    assert_eq!(
        get(&c, "counter").await,
        "6",
        "exactly one run for fifty calls"
    );

    // purge-cache forgets: the next call runs.
    let r = write(
        &c,
        Command::FnPurgeCache {
            name: "counted".into(),
        },
    )
    .await;
    assert!(
        matches!(r, CommandResult::Purged { entries } if entries >= 3),
        "{r:?}"
    );
    let t = call(&c, "counted", b"p1").await;
    assert_eq!(miss_reason(&t), MissReason::FirstRun);
    assert_eq!(get(&c, "counter").await, "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tracked_reads_and_file_dependencies_cause_one_new_run() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    put(&c, "data/x", "10").await;
    // Reads data/x through the data service without declaring it.
    let code = archive(&[(
        "main.sh",
        0o755,
        "printf 'x=%s' \"$(skiff-data get data/x)\"\n",
    )]);
    deploy(&c, idempotent("reader", vec![], true), &code).await;
    let first = call(&c, "reader", b"").await;
    assert_eq!(output(&first), "x=10");
    assert_eq!(miss_reason(&first), MissReason::FirstRun);
    assert!(is_hit(&call(&c, "reader", b"").await));
    put(&c, "data/x", "11").await;
    let t = call(&c, "reader", b"").await;
    assert!(
        matches!(miss_reason(&t), MissReason::DependencyChanged { ref dependency, .. } if dependency == "read:data/x"),
        "{t:?}"
    );
    assert_eq!(output(&t), "x=11");
    assert!(is_hit(&call(&c, "reader", b"").await));

    // A file the receiving node hashes.
    let file = cluster.sources_dir().join("model.bin");
    std::fs::write(&file, b"weights v1").expect("write file");
    let path = file.to_str().expect("utf-8 path").to_string();
    let code = archive(&[("main.sh", 0o755, "printf done\n")]);
    deploy(
        &c,
        idempotent("filedep", vec![Dependency::File(path.clone())], false),
        &code,
    )
    .await;
    assert_eq!(
        miss_reason(&call(&c, "filedep", b"").await),
        MissReason::FirstRun
    );
    assert!(is_hit(&call(&c, "filedep", b"").await));
    std::fs::write(&file, b"weights v2").expect("rewrite file");
    let t = call(&c, "filedep", b"").await;
    assert!(
        matches!(miss_reason(&t), MissReason::DependencyChanged { ref dependency, .. } if *dependency == format!("file:{path}")),
        "{t:?}"
    );
    assert!(is_hit(&call(&c, "filedep", b"").await));
    // An unreadable file is a clear error at submit, and nothing runs.
    std::fs::remove_file(&file).expect("remove");
    let e = call_with(&c, "filedep", b"", None)
        .await
        .expect_err("refused");
    assert!(
        matches!(&e, ApiError::FailedPrecondition(m) if m.contains("file dependency")),
        "{e:?}"
    );
    let _ = Duration::from_secs(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_change_does_not_run_an_idempotent_call_twice() {
    require_root!();
    let mut cluster = TestCluster::start(3, CONFIG).await;
    let leader = cluster.wait_leader(&cluster.ids()).await;
    let c = rpc(&cluster, leader).await;
    // Each run counts itself under count/PAYLOAD, slowly enough to outlive an election.
    let code = archive(&[(
        "main.sh",
        0o755,
        "p=$(cat)\nsleep 2\nc=$(skiff-data get \"count/$p\" 2>/dev/null || echo 0)\nskiff-data put \"count/$p\" $((c+1)) >/dev/null || exit 7\nprintf 'ran %s' \"$p\"\n",
    )]);
    let s = FunctionSpec {
        data: DataGrant {
            read_prefixes: vec![],
            write_prefixes: vec!["count/".into()],
        },
        idempotency: Some(Idempotency {
            dependencies: vec![],
            ttl_ms: 600_000,
            cache_failures: false,
            track_reads: false,
        }),
        ..spec("slow", &["/bin/sh", "main.sh"], FnMode::Exec)
    };
    deploy(&c, s, &code).await;
    wait_workers(&c, 3).await;
    // Start asynchronous runs until one is placed on a follower.
    let (payload, task) = {
        let mut found = None;
        for i in 0..20 {
            let p = format!("p{i}");
            let t = crate::functions::invoke(&c, "slow", p.as_bytes(), false).await;
            if t.node.is_some_and(|n| n != leader) {
                found = Some((p, t.id));
                break;
            }
        }
        found.expect("a run placed on a follower")
    };
    cluster.kill(leader);
    let others: Vec<u64> = cluster.ids().into_iter().filter(|i| *i != leader).collect();
    cluster.wait_leader(&others).await;
    let c2 = rpc(&cluster, others[0]).await;
    // The same invocation after the leader change: it joins the running task or hits its
    // result; it never starts a second run.
    let again = loop {
        match call_with(&c2, "slow", payload.as_bytes(), None).await {
            Ok(t) => break t,
            Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("invoke after failover: {e:?}"),
        }
    };
    assert_eq!(output(&again), format!("ran {payload}"));
    assert!(
        matches!(again.cache, Some(CacheOutcome::Joined { task: t }) if t == task)
            || matches!(again.cache, Some(CacheOutcome::Hit { source_task }) if source_task == task),
        "{again:?}"
    );
    assert_eq!(get(&c2, &format!("count/{payload}")).await, "1", "one run");
}
