//! Functions and invocations on a real three-node cluster: deploy, sync and async invocations
//! of exec- and serve-mode functions in `sh` and `python3`, warm reuse, concurrency limits
//! and throttling, failover of a node running a task, a burst of async invocations, and the
//! data service. Sandboxes need root: without it every test here says so and skips.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use skiff_client::api::{
    ClientApiClient, ClientCommand, Command, CommandResult, DataGrant, FnMode, FunctionSpec,
    InvokeRequest, ReadConsistency, RequestId, Task, TaskFilter, TaskState,
};
use skiff_client::transport;
use skiff_raft_store::functions::CODE_CHUNK_BYTES;
use tarpc::context;

use crate::harness::TestCluster;

/// Worker settings for tests: fast heartbeats so that placement sees warm pools quickly.
pub(crate) const CONFIG: &str = "[worker]\nheartbeat_interval_ms = 200\n";

pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[macro_export]
macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipping: sandboxes need root (run the tests as root)");
            return;
        }
    };
}

/// A raw RPC connection to node `id` presenting the cluster's admin token.
pub(crate) async fn rpc(cluster: &TestCluster, id: u64) -> ClientApiClient {
    rpc_as(&cluster.tls(), &cluster.node(id).addr, Some(&cluster.token)).await
}

/// A raw RPC connection to `addr` over `tls` presenting `token` (or none).
pub(crate) async fn rpc_as(
    tls: &skiff_client::tls::TlsConnector,
    addr: &str,
    token: Option<&str>,
) -> ClientApiClient {
    let stream = transport::dial_client(addr, token, Some(tls))
        .await
        .expect("dial");
    let t = transport::framed(stream, skiff_client::api::CLIENT_FRAME_BYTES_MAX);
    ClientApiClient::new(tarpc::client::Config::default(), t).spawn()
}

pub(crate) fn ctx(secs: u64) -> context::Context {
    let mut c = context::current();
    c.deadline = Instant::now() + Duration::from_secs(secs);
    c
}

pub(crate) fn request_id() -> RequestId {
    RequestId {
        client: rand::random(),
        seq: 0,
    }
}

/// A tar of `files` (path, mode, content).
pub(crate) fn archive(files: &[(&str, u32, &str)]) -> Vec<u8> {
    let files: Vec<(&str, u32, &[u8])> = files
        .iter()
        .map(|(p, m, c)| (*p, *m, c.as_bytes()))
        .collect();
    archive_bytes(&files)
}

/// A tar of `files` (path, mode, bytes).
pub(crate) fn archive_bytes(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(*mode);
        h.set_cksum();
        b.append_data(&mut h, path, *content).expect("append");
    }
    b.into_inner().expect("finish tar")
}

pub(crate) async fn write(c: &ClientApiClient, command: Command) -> CommandResult {
    let r = c
        .write(
            ctx(30),
            vec![ClientCommand {
                request_id: RequestId {
                    client: rand::random(),
                    seq: 1,
                },
                command,
            }]
            .into(),
        )
        .await
        .expect("rpc")
        .expect("write");
    r.into_iter().next().expect("one result")
}

pub(crate) async fn deploy(c: &ClientApiClient, spec: FunctionSpec, code: &[u8]) -> u64 {
    let digest = hex::encode(Sha256::digest(code));
    for (i, chunk) in code.chunks(CODE_CHUNK_BYTES).enumerate() {
        let r = write(
            c,
            Command::CodeChunk {
                digest: digest.clone(),
                total_bytes: code.len() as u64,
                index: i as u32,
                bytes: chunk.to_vec(),
            },
        )
        .await;
        assert!(matches!(r, CommandResult::ChunkStored { .. }), "{r:?}");
    }
    let spec = FunctionSpec {
        code_digest: digest,
        ..spec
    };
    match write(
        c,
        Command::FnDeploy {
            spec: Box::new(spec),
        },
    )
    .await
    {
        CommandResult::Deployed { version } => version,
        other => panic!("deploy refused: {other:?}"),
    }
}

pub(crate) fn spec(name: &str, entry: &[&str], mode: FnMode) -> FunctionSpec {
    FunctionSpec {
        name: name.into(),
        code_digest: String::new(),
        entry: entry.iter().map(|s| s.to_string()).collect(),
        mode,
        tier: "standard".into(),
        policy: None,
        memory_bytes: 128 << 20,
        timeout_ms: 20_000,
        max_concurrency: 100,
        queue_max: 2000,
        min_warm: 0,
        max_attempts: 2,
        retry_backoff_ms: 100,
        data: DataGrant::default(),
        env: vec![],
        idempotency: None,
        stages: Vec::new(),
    }
}

pub(crate) async fn invoke(
    c: &ClientApiClient,
    function: &str,
    payload: &[u8],
    wait: bool,
) -> Task {
    // As a real client does: one request id, retried while the cluster is between leaders.
    let id = request_id();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match invoke_id(c, id, function, payload, wait).await {
            Ok(t) => return t,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("invoke {function}: {e:?}"),
        }
    }
}

pub(crate) async fn invoke_id(
    c: &ClientApiClient,
    request_id: RequestId,
    function: &str,
    payload: &[u8],
    wait: bool,
) -> Result<Task, skiff_client::api::ApiError> {
    c.invoke(
        ctx(120),
        InvokeRequest {
            request_id,
            function: function.into(),
            version: None,
            payload: payload.to_vec(),
            wait,
            idempotency_key: None,
            tokens: vec![],
            files: vec![],
        },
    )
    .await
    .expect("rpc")
}

/// Waits until `n` workers have heartbeated recently.
pub(crate) async fn wait_workers(c: &ClientApiClient, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let w = match c
            .workers(ctx(10), ReadConsistency::Linearizable)
            .await
            .expect("rpc")
        {
            Ok(w) => w,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => panic!("workers: {e:?}"),
        };
        let live = w
            .nodes
            .iter()
            .filter(|r| r.last_heartbeat_ms + 2_000 > w.now_ms)
            .count();
        if live >= n {
            return;
        }
        assert!(Instant::now() < deadline, "only {live} workers live: {w:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn wait_finished(c: &ClientApiClient, id: u64, within: Duration) -> Task {
    let deadline = Instant::now() + within;
    loop {
        // A leader change (a node was killed) makes reads fail for a moment: retry those.
        match c
            .task_get(ctx(10), id, ReadConsistency::Linearizable)
            .await
            .expect("rpc")
        {
            Ok(Some(t)) if t.state.is_finished() => return t,
            Ok(Some(_)) => {}
            Ok(None) => panic!("task {id} does not exist"),
            Err(e) if e.is_retryable() => {}
            Err(e) => panic!("task_get: {e:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "task {id} not finished in {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn output(t: &Task) -> String {
    let r = t.result.as_ref().expect("a result");
    String::from_utf8_lossy(&r.output).into_owned()
}

fn python3() -> bool {
    Path::new("/usr/bin/python3").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_and_async_exec_and_serve_in_sh_and_python() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;

    let sh = archive(&[("main.sh", 0o755, "#!/bin/sh\nprintf 'got:'\ncat\n")]);
    deploy(
        &c,
        spec("echo-sh", &["/bin/sh", "main.sh"], FnMode::Exec),
        &sh,
    )
    .await;
    let t = invoke(&c, "echo-sh", b"{\"a\": 1}\n", true).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert!(
        t.request_id.is_some(),
        "the task carries its invocation's request id"
    );
    assert_eq!(output(&t), "got:{\"a\": 1}\n");

    let a = invoke(&c, "echo-sh", b"async payload", false).await;
    assert!(!a.state.is_finished() || a.state == TaskState::Succeeded);
    let a = wait_finished(&c, a.id, Duration::from_secs(30)).await;
    assert_eq!(output(&a), "got:async payload");

    // A failing exec function: non-zero exit, stderr kept as the log.
    let fail = archive(&[("main.sh", 0o755, "echo oops >&2; exit 3\n")]);
    deploy(
        &c,
        spec("fail-sh", &["/bin/sh", "main.sh"], FnMode::Exec),
        &fail,
    )
    .await;
    let t = invoke(&c, "fail-sh", b"", true).await;
    assert_eq!(t.state, TaskState::Failed);
    let r = t.result.expect("result");
    assert_eq!((r.exit_code, &r.log[..]), (Some(3), &b"oops\n"[..]));

    // Serve mode in sh: one request line in, one response line out, the process reused.
    let serve_sh = archive(&[(
        "serve.sh",
        0o755,
        "n=0\nwhile IFS= read -r line; do n=$((n+1)); printf '{\"n\":%d,\"req\":%s}\\n' \"$n\" \"$line\"; done\n",
    )]);
    deploy(
        &c,
        spec("serve-sh", &["/bin/sh", "serve.sh"], FnMode::Serve),
        &serve_sh,
    )
    .await;
    let t1 = invoke(&c, "serve-sh", b"{\"x\":1}", true).await;
    assert_eq!(output(&t1), "{\"n\":1,\"req\":{\"x\":1}}");

    if python3() {
        let py = archive(&[(
            "main.py",
            0o644,
            "import sys, json\nd = json.load(sys.stdin)\nprint(json.dumps({'sum': sum(d)}), end='')\n",
        )]);
        deploy(
            &c,
            spec("sum-py", &["python3", "main.py"], FnMode::Exec),
            &py,
        )
        .await;
        let t = invoke(&c, "sum-py", b"[1, 2, 3]", true).await;
        assert_eq!(output(&t), "{\"sum\": 6}", "{t:?}");

        let py_serve = archive(&[(
            "serve.py",
            0o644,
            "import sys, json\nfor line in sys.stdin:\n    d = json.loads(line)\n    print(json.dumps({'upper': d['s'].upper()}), flush=True)\n",
        )]);
        deploy(
            &c,
            spec("upper-py", &["python3", "serve.py"], FnMode::Serve),
            &py_serve,
        )
        .await;
        let t = invoke(&c, "upper-py", b"{\"s\":\"abc\"}", true).await;
        assert_eq!(output(&t), "{\"upper\": \"ABC\"}", "{t:?}");
        let a = invoke(&c, "upper-py", b"{\"s\":\"xyz\"}", false).await;
        let a = wait_finished(&c, a.id, Duration::from_secs(30)).await;
        assert_eq!(output(&a), "{\"upper\": \"XYZ\"}");
    } else {
        eprintln!("python3 is not installed: its part of this test is skipped");
    }

    // Unknown functions are refused at submit, sync and async.
    for wait in [true, false] {
        let e = invoke_id(&c, request_id(), "no-such-fn", b"", wait)
            .await
            .expect_err("refused");
        assert!(
            matches!(e, skiff_client::api::ApiError::NotFound(_)),
            "{e:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_call_is_warm_on_the_node_that_had_the_sandbox() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 2).await;
    let code = archive(&[("main.sh", 0o755, "cat\n")]);
    deploy(
        &c,
        spec("warm", &["/bin/sh", "main.sh"], FnMode::Exec),
        &code,
    )
    .await;
    let first = invoke(&c, "warm", b"1", true).await;
    let r1 = first.result.clone().expect("result");
    assert!(!r1.warm, "the first call is cold");
    // Wait until a heartbeat reports the replacement warm sandbox on that node.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let w = c
            .workers(ctx(10), ReadConsistency::Linearizable)
            .await
            .expect("rpc")
            .expect("workers");
        let warm = w
            .nodes
            .iter()
            .find(|n| n.id == r1.node)
            .is_some_and(|n| n.warm_idle("warm", first.version) > 0);
        if warm {
            break;
        }
        assert!(Instant::now() < deadline, "no warm sandbox reported: {w:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = invoke(&c, "warm", b"2", true).await;
    let r2 = second.result.expect("result");
    assert!(r2.warm, "the second call is warm: {r2:?}");
    assert_eq!(r2.node, r1.node, "on the node that had the warm sandbox");
    assert_eq!(r2.output, b"2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_concurrency_holds_under_a_burst_and_excess_is_throttled() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    // Each run records its start and end times; at most 2 overlap.
    let code = archive(&[("main.sh", 0o755, "sleep 0.3; echo done\n")]);
    let s = FunctionSpec {
        max_concurrency: 2,
        queue_max: 4,
        ..spec("limited", &["/bin/sh", "main.sh"], FnMode::Exec)
    };
    deploy(&c, s, &code).await;
    wait_workers(&c, 3).await;
    let mut calls = Vec::new();
    for i in 0..12u8 {
        let c = c.clone();
        calls.push(tokio::spawn(async move {
            invoke_id(&c, request_id(), "limited", &[i], false).await
        }));
    }
    let mut accepted = Vec::new();
    let mut throttled = 0;
    for call in calls {
        match call.await.expect("join") {
            Ok(t) => accepted.push(t.id),
            Err(skiff_client::api::ApiError::Throttled(_)) => throttled += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!(accepted.len(), 6, "2 running + 4 queued accepted");
    assert_eq!(throttled, 6);
    let mut spans = Vec::new();
    for id in accepted {
        let t = wait_finished(&c, id, Duration::from_secs(60)).await;
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        spans.push((
            t.assigned_ms.expect("assigned"),
            t.finished_ms.expect("finished"),
        ));
    }
    // Replicated timestamps: at no assignment time were more than 2 tasks assigned.
    for (start, _) in &spans {
        let overlapping = spans
            .iter()
            .filter(|(s, e)| s <= start && start < e)
            .count();
        assert!(
            overlapping <= 2,
            "{overlapping} tasks overlapped: {spans:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_loses_its_task_to_another_node() {
    require_root!();
    let mut cluster = TestCluster::start(3, CONFIG).await;
    let leader = cluster.wait_leader(&cluster.ids()).await;
    let c = rpc(&cluster, leader).await;
    let code = archive(&[("main.sh", 0o755, "sleep 2; printf 'finished:'; cat\n")]);
    let s = FunctionSpec {
        max_attempts: 1,
        ..spec("long", &["/bin/sh", "main.sh"], FnMode::Exec)
    };
    deploy(&c, s, &code).await;
    // Submit until one lands on a follower (placement spreads by load), then kill it.
    let (task, victim) = loop {
        let t = invoke(&c, "long", b"x", false).await;
        let t = c
            .task_get(ctx(10), t.id, ReadConsistency::Linearizable)
            .await
            .expect("rpc")
            .expect("get")
            .expect("task");
        match t.node {
            Some(n) if n != leader => break (t, n),
            _ => {
                wait_finished(&c, t.id, Duration::from_secs(30)).await;
            }
        }
    };
    // Wait for a sync caller on the same task: a retried invocation with the same request
    // id would find it too, but here we watch by id.
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.kill(victim);
    let done = wait_finished(&c, task.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, TaskState::Succeeded, "{done:?}");
    assert_eq!(output(&done), "finished:x");
    let r = done.result.clone().expect("result");
    assert_ne!(r.node, victim, "completed on another node");
    assert!(done.attempts >= 2, "reassigned: {done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_async_invocations_each_complete_once() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 3).await;
    let code = archive(&[("main.sh", 0o755, "cat\n")]);
    let s = FunctionSpec {
        max_concurrency: 64,
        queue_max: 2000,
        ..spec("burst", &["/bin/sh", "main.sh"], FnMode::Exec)
    };
    deploy(&c, s, &code).await;
    let mut ids = BTreeSet::new();
    let mut submits = Vec::new();
    for chunk in 0..10u32 {
        let c = c.clone();
        submits.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..100u32 {
                let n = chunk * 100 + i;
                let t = invoke(&c, "burst", n.to_string().as_bytes(), false).await;
                out.push(t.id);
            }
            out
        }));
    }
    for s in submits {
        ids.extend(s.await.expect("join"));
    }
    assert_eq!(ids.len(), 1000, "1000 distinct tasks");
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let mut listed = Vec::new();
        let mut after = 0;
        loop {
            let page = match c
                .task_list(
                    ctx(10),
                    TaskFilter {
                        function: Some("burst".into()),
                        ..TaskFilter::default()
                    },
                    after,
                    1000,
                    ReadConsistency::Linearizable,
                )
                .await
                .expect("rpc")
            {
                Ok(page) => page,
                // A leadership confirmation that missed its quorum under load: ask again.
                Err(e) if e.is_retryable() => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => panic!("list: {e:?}"),
            };
            let Some(last) = page.last() else { break };
            after = last.id;
            listed.extend(page);
        }
        let done = listed.iter().filter(|t| t.state.is_finished()).count();
        if done == 1000 {
            let listed_ids: Vec<u64> = listed.iter().map(|t| t.id).collect();
            let unique: BTreeSet<u64> = listed_ids.iter().copied().collect();
            assert_eq!(listed_ids.len(), 1000, "each task listed exactly once");
            assert_eq!(unique, ids);
            for t in &listed {
                assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
                assert_eq!(
                    t.result.as_ref().expect("result").output,
                    t.payload,
                    "each output is its own payload"
                );
            }
            break;
        }
        assert!(Instant::now() < deadline, "{done} of 1000 finished in time");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_function_reads_and_writes_keys_through_the_data_service() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    let put = write(
        &c,
        Command::KvPut {
            key: "in/greeting".into(),
            value: b"hello".to_vec(),
            expect_version: None,
        },
    )
    .await;
    assert!(matches!(put, CommandResult::Put { .. }));
    let code = archive(&[(
        "main.sh",
        0o755,
        "v=$(skiff-data get in/greeting) || exit 9\nskiff-data put out/result \"$v world\" >/dev/null || exit 8\nskiff-data get secret/x 2>&1; echo \"denied:$?\"\n",
    )]);
    let s = FunctionSpec {
        data: DataGrant {
            read_prefixes: vec!["in/".into()],
            write_prefixes: vec!["out/".into()],
        },
        ..spec("data-fn", &["/bin/sh", "main.sh"], FnMode::Exec)
    };
    deploy(&c, s, &code).await;
    let t = invoke(&c, "data-fn", b"", true).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let out = output(&t);
    assert!(
        out.contains("denied:4"),
        "the denied read is refused: {out}"
    );
    // And counted by the node that ran it.
    let node = t.result.as_ref().expect("result").node;
    assert!(crate::tls::rejected(&cluster, node, "data_denied").await >= 1.0);
    let v = c
        .kv_get(ctx(10), "out/result".into(), ReadConsistency::Linearizable)
        .await
        .expect("rpc")
        .expect("get")
        .expect("written by the function");
    assert_eq!(v.value, b"hello world");
}

/// The sum of every sample of `family` in a Prometheus text exposition, checking each sample
/// line parses.
fn metric_sum(text: &str, family: &str) -> f64 {
    let mut sum = 0.0;
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name_labels, value) = line.rsplit_once(' ').expect("sample line: name value");
        let value: f64 = value.parse().expect("numeric sample value");
        let name = name_labels.split('{').next().expect("name");
        if name == family {
            sum += value;
        }
    }
    sum
}

pub(crate) async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("response");
    let (head, body) = out.split_once("\r\n\r\n").expect("http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_of_every_node_count_real_invocations() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    let code = archive(&[("main.sh", 0o755, "cat\n")]);
    deploy(
        &c,
        spec("counted", &["/bin/sh", "main.sh"], FnMode::Exec),
        &code,
    )
    .await;
    let total = |texts: &[String]| -> f64 {
        texts
            .iter()
            .map(|t| metric_sum(t, "skiff_invocations_total"))
            .sum()
    };
    let mut before = Vec::new();
    for n in &cluster.nodes {
        before.push(scrape(&n.metrics_addr).await);
    }
    for i in 0..5u8 {
        let t = invoke(&c, "counted", &[b'a' + i], true).await;
        assert_eq!(t.state, TaskState::Succeeded);
    }
    let mut after = Vec::new();
    for n in &cluster.nodes {
        let text = scrape(&n.metrics_addr).await;
        assert!(
            text.contains("skiff_raft_applied_index"),
            "raft gauges on every node"
        );
        after.push(text);
    }
    assert_eq!(total(&after) - total(&before), 5.0, "five attempts counted");
    assert!(
        after.iter().any(|t| t.contains("function=\"counted\"")),
        "labelled by function"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_code_archive_is_replicated_in_chunks_and_runs() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    // 6 MiB of incompressible bytes: twelve chunks, each its own log entry.
    let mut blob = vec![0u8; 6 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in blob.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let code = archive_bytes(&[
        ("data.bin", 0o644, &blob[..]),
        ("main.sh", 0o755, &b"wc -c < data.bin\n"[..]),
    ]);
    deploy(
        &c,
        spec("big", &["/bin/sh", "main.sh"], FnMode::Exec),
        &code,
    )
    .await;
    wait_workers(&c, 3).await;
    // Every node can run it: invoke until each has.
    let mut nodes = BTreeSet::new();
    for _ in 0..30 {
        let t = invoke(&c, "big", b"", true).await;
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_eq!(output(&t).trim(), (6 << 20).to_string());
        nodes.insert(t.result.expect("result").node);
        if nodes.len() == 3 {
            break;
        }
    }
    assert!(!nodes.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_under_invocation_load_fails_no_acknowledged_call() {
    require_root!();
    let mut cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    let code = archive(&[(
        "serve.sh",
        0o755,
        "while IFS= read -r l; do printf '%s\\n' \"$l\"; done\n",
    )]);
    let s = FunctionSpec {
        min_warm: 3,
        ..spec("steady", &["/bin/sh", "serve.sh"], FnMode::Serve)
    };
    deploy(&c, s, &code).await;
    wait_workers(&c, 3).await;
    // A steady load through the client library: sync calls, each retried under one request id.
    let client = cluster.client();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut done = Vec::new();
            for n in 0..5_000u32 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let payload = format!("{{\"n\":{n}}}");
                let r = client
                    .invoke("steady", None, payload.clone().into_bytes(), true)
                    .await;
                done.push((payload, r));
            }
            done
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in cluster.ids() {
        cluster.terminate(id);
        tokio::time::sleep(Duration::from_millis(500)).await;
        cluster.spawn(id);
        let all = cluster.ids();
        cluster.wait_leader(&all).await;
        // Back in the cluster (heartbeating) before the next one goes down.
        let other = cluster
            .ids()
            .into_iter()
            .find(|i| *i != id)
            .expect("another node");
        wait_workers(&c_for(&cluster, other).await, 3).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let done = load.await.expect("load task");
    assert!(done.len() > 20, "the load ran: {} calls", done.len());
    eprintln!("{} calls during the rolling restart", done.len());
    for (payload, r) in &done {
        let t = r
            .as_ref()
            .unwrap_or_else(|e| panic!("call {payload} failed during the restart: {e}"));
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        assert_eq!(output(t), *payload, "each call got its own result");
    }
}

/// A raw connection to node `id` (as the rolling restart brings nodes back).
async fn c_for(cluster: &TestCluster, id: u64) -> ClientApiClient {
    rpc(cluster, id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_first_calls_waits_for_sandboxes_instead_of_cold_starting_each() {
    require_root!();
    // A generous wait, so the test does not depend on how fast this machine starts sandboxes.
    let cluster = TestCluster::start(
        3,
        "[worker]\nheartbeat_interval_ms = 200\ncold_start_wait_ms = 2000\n",
    )
    .await;
    let c = rpc(&cluster, 1).await;
    let code = archive(&[(
        "serve.sh",
        0o755,
        "while IFS= read -r l; do printf '%s\\n' \"$l\"; done\n",
    )]);
    deploy(
        &c,
        spec("bursty", &["/bin/sh", "serve.sh"], FnMode::Serve),
        &code,
    )
    .await;
    wait_workers(&c, 3).await;
    let mut calls = Vec::new();
    for i in 0..24u32 {
        let c = c.clone();
        calls.push(tokio::spawn(async move {
            invoke(&c, "bursty", format!("{{\"i\":{i}}}").as_bytes(), true).await
        }));
    }
    let mut cold = 0;
    for call in calls {
        let t = call.await.expect("join");
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        if !t.result.expect("result").warm {
            cold += 1;
        }
    }
    // One sandbox started per node at most; every other call reused one.
    assert!(cold <= 3, "{cold} of 24 calls cold-started a sandbox");
}

/// An output cut at a limit (the sandbox's stdout limit of the tier, or the 1 MiB bound of a
/// task result) fails the task, says why, and keeps the first part; never a complete-looking
/// success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_over_its_limit_fails_the_task_and_says_so() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    let script = "#!/bin/sh\nhead -c \"$1\" /dev/zero | tr '\\0' a\n";
    let code = archive(&[("run.sh", 0o755, script)]);
    let mib = 1024 * 1024;
    // (tier, bytes printed, what the error names)
    let cases = [
        ("untrusted", mib + mib / 2, "stdout limit"),
        ("standard", 2 * mib, "limit of a task result"),
        ("untrusted", mib - 10, ""),
    ];
    for (i, (tier, bytes, why)) in cases.into_iter().enumerate() {
        let name = format!("loud-{i}");
        let mut f = spec(
            &name,
            &["/bin/sh", "run.sh", &bytes.to_string()],
            FnMode::Exec,
        );
        f.tier = tier.into();
        f.timeout_ms = 5_000;
        deploy(&c, f, &code).await;
        let t = invoke(&c, &name, b"", true).await;
        let r = t.result.as_ref().expect("a result");
        if why.is_empty() {
            assert_eq!(t.state, TaskState::Succeeded, "{:?}", r.error);
            assert_eq!(r.output.len(), bytes);
            continue;
        }
        assert_eq!(t.state, TaskState::Failed, "{tier}, {bytes} bytes: {r:?}");
        let error = r.error.as_deref().unwrap_or_default();
        assert!(error.contains(why) && error.contains("kept"), "{error}");
        assert_eq!(r.output.len(), mib, "the first part is kept");
    }
}
