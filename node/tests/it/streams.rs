//! Stream jobs on a real three-node cluster: every item of a JSONL file gets its result in the
//! key-value sink (batched), also across a `kill -9` of the leader mid-stream; failed items
//! are kept and redriven after a fix; CSV and directory sources; clear refusals at start.
//! Sandboxes need root: without it the tests that run functions say so and skip.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use skiff_client::api::{
    FnMode, FunctionSpec, StreamJob, StreamOptions, StreamSource, StreamState,
};
use skiff_client::client::{Client, ClientError};

use crate::functions::{archive, deploy, is_root, rpc, spec, wait_workers, CONFIG};
use crate::harness::TestCluster;
use crate::require_root;

/// A serve-mode function that answers each request line with itself: one item's result is
/// the item, a batch's results are its items.
const ECHO_SERVE: &str = "while IFS= read -r line; do printf '%s\\n' \"$line\"; done\n";

fn jsonl(dir: &Path, n: usize) -> String {
    let path = dir.join("items.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    for i in 0..n {
        writeln!(f, "{{\"i\":{i}}}").expect("write");
    }
    f.flush().expect("flush");
    path.to_str().expect("utf-8").to_string()
}

async fn deploy_fn(cluster: &TestCluster, name: &str, script: &str, mode: FnMode) {
    let c = rpc(cluster, 1).await;
    let s = FunctionSpec {
        max_concurrency: 64,
        ..spec(name, &["/bin/sh", "main.sh"], mode)
    };
    deploy(&c, s, &archive(&[("main.sh", 0o755, script)])).await;
    wait_workers(&c, 3).await;
}

fn options(max_concurrency: u32, batch: u32, results: &str) -> StreamOptions {
    StreamOptions {
        max_concurrency,
        batch,
        max_attempts: 2,
        retry_backoff_ms: 50,
        results_prefix: Some(results.into()),
        ..StreamOptions::default()
    }
}

/// Polls until the job ends (reads retried across a leader change).
async fn wait_stream(client: &Client, id: u64, within: Duration) -> StreamJob {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(job)) = client.stream(id).await {
            if job.state.is_finished() {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "stream not done in time: {job:?}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "stream {id} not readable in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every item `{"i":N}` has exactly itself as its result under `prefix`.
async fn assert_every_result(client: &Client, prefix: &str, n: usize) {
    let entries = client.list_all(prefix, n + 10).await.expect("list");
    assert_eq!(entries.len(), n, "one result per item");
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.key, format!("{prefix}{i:012}"));
        assert_eq!(
            String::from_utf8_lossy(&e.value),
            format!("{{\"i\":{i}}}"),
            "result of item {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_item_of_a_jsonl_file_gets_its_result() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let dir = cluster.sources_dir();
    let path = jsonl(dir.as_path(), 10_000);
    deploy_fn(&cluster, "echo", ECHO_SERVE, FnMode::Serve).await;
    let client = cluster.client();
    let id = client
        .stream_start(
            "echo",
            StreamSource::Jsonl { path },
            options(1_000, 50, "r/"),
        )
        .await
        .expect("start");
    let job = wait_stream(&client, id, Duration::from_secs(50)).await;
    assert_eq!(job.state, StreamState::Succeeded, "{job:?}");
    let c = &job.counters;
    assert_eq!(
        (c.total, c.enqueued, c.succeeded, c.failed, c.running),
        (Some(10_000), 10_000, 10_000, 0, 0)
    );
    assert_every_result(&client, "r/", 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_survives_kill_9_of_its_leader() {
    require_root!();
    let mut cluster = TestCluster::start(3, CONFIG).await;
    let dir = cluster.sources_dir();
    let path = jsonl(dir.as_path(), 5_000);
    // Slow enough that the job is mid-way when the leader dies.
    let script = "while IFS= read -r line; do sleep 0.05; printf '%s\\n' \"$line\"; done\n";
    deploy_fn(&cluster, "slow", script, FnMode::Serve).await;
    let client = cluster.client();
    let id = client
        .stream_start("slow", StreamSource::Jsonl { path }, options(400, 20, "k/"))
        .await
        .expect("start");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = client.stream(id).await.expect("read").expect("job");
        if job.counters.succeeded >= 500 {
            assert!(!job.state.is_finished(), "the job ended too fast: {job:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {job:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = cluster.wait_leader(&cluster.ids()).await;
    cluster.kill(leader);
    let rest: Vec<u64> = cluster.ids().into_iter().filter(|i| *i != leader).collect();
    cluster.wait_leader(&rest).await;
    let client = cluster.client_for(&rest);
    let job = wait_stream(&client, id, Duration::from_secs(50)).await;
    assert_eq!(job.state, StreamState::Succeeded, "{job:?}");
    let c = &job.counters;
    assert_eq!((c.total, c.succeeded, c.failed), (Some(5_000), 5_000, 0));
    eprintln!(
        "after the leader's death: {} item runs repeated, {} retried",
        c.duplicates, c.retried
    );
    assert_every_result(&client, "k/", 5_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_items_are_kept_and_redriven_after_a_fix() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let dir = cluster.sources_dir();
    let path = jsonl(dir.as_path(), 100);
    let broken = "read -r line\ncase \"$line\" in '{\"i\":3}'|'{\"i\":77}') echo \"cannot take $line\" >&2; exit 1;; esac\nprintf '%s' \"$line\"\n";
    deploy_fn(&cluster, "picky", broken, FnMode::Exec).await;
    let client = cluster.client();
    let id = client
        .stream_start("picky", StreamSource::Jsonl { path }, options(20, 1, "p/"))
        .await
        .expect("start");
    let job = wait_stream(&client, id, Duration::from_secs(50)).await;
    assert_eq!(job.state, StreamState::Failed, "{job:?}");
    assert_eq!((job.counters.succeeded, job.counters.failed), (98, 2));
    let failed: Vec<u64> = job.failed_items.iter().map(|f| f.index).collect();
    assert_eq!(failed, vec![3, 77]);
    assert!(
        job.failed_items[0].error.contains("cannot take"),
        "the item's error carries the function's log: {:?}",
        job.failed_items[0]
    );
    assert_eq!(job.counters.retried, 2, "each failed item was tried twice");
    // The fix: a new version that takes every item.
    let c = rpc(&cluster, 1).await;
    let fixed = FunctionSpec {
        max_concurrency: 64,
        ..spec("picky", &["/bin/sh", "main.sh"], FnMode::Exec)
    };
    deploy(&c, fixed, &archive(&[("main.sh", 0o755, "cat\n")])).await;
    assert_eq!(client.stream_redrive(id).await.expect("redrive"), 2);
    let job = wait_stream(&client, id, Duration::from_secs(30)).await;
    assert_eq!(job.state, StreamState::Succeeded, "{job:?}");
    assert_eq!((job.counters.succeeded, job.counters.failed), (100, 0));
    assert_eq!(job.version, 2);
    assert_every_result(&client, "p/", 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn csv_and_directory_sources() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let dir = cluster.sources_dir();
    deploy_fn(&cluster, "echo", ECHO_SERVE, FnMode::Serve).await;
    let client = cluster.client();

    let csv = dir.as_path().join("people.csv");
    let mut text = String::from("name,city\n");
    for i in 0..30 {
        text.push_str(&format!("\"Doe, {i}\",\"Paris \"\"{i}\"\"\"\n"));
    }
    std::fs::write(&csv, text).expect("write csv");
    let id = client
        .stream_start(
            "echo",
            StreamSource::Csv {
                path: csv.to_str().expect("utf-8").into(),
            },
            options(10, 4, "csv/"),
        )
        .await
        .expect("start csv");
    let job = wait_stream(&client, id, Duration::from_secs(30)).await;
    assert_eq!(job.state, StreamState::Succeeded, "{job:?}");
    let results = client.list_all("csv/", 100).await.expect("list");
    assert_eq!(results.len(), 30);
    let row: serde_json::Value = serde_json::from_slice(&results[7].value).expect("json");
    assert_eq!(row["name"], "Doe, 7");
    assert_eq!(row["city"], "Paris \"7\"");

    let files = dir.as_path().join("files");
    std::fs::create_dir(&files).expect("mkdir");
    for name in ["c.txt", "a.txt", "b.txt"] {
        std::fs::write(files.join(name), format!("content of {name}")).expect("write");
    }
    let id = client
        .stream_start(
            "echo",
            StreamSource::Dir {
                path: files.to_str().expect("utf-8").into(),
            },
            options(10, 1, "dir/"),
        )
        .await
        .expect("start dir");
    let job = wait_stream(&client, id, Duration::from_secs(30)).await;
    assert_eq!(job.state, StreamState::Succeeded, "{job:?}");
    let results = client.list_all("dir/", 10).await.expect("list");
    let got: Vec<serde_json::Value> = results
        .iter()
        .map(|e| serde_json::from_slice(&e.value).expect("json"))
        .collect();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0]["path"], "a.txt");
    assert_eq!(got[2]["content"], "content of c.txt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_starts_are_refused_with_a_clear_error() {
    let cluster = TestCluster::start(3, "").await;
    let c = rpc(&cluster, 1).await;
    deploy(
        &c,
        spec("f", &["/bin/sh", "main.sh"], FnMode::Exec),
        &archive(&[("main.sh", 0o755, "cat\n")]),
    )
    .await;
    let client = cluster.client();
    let dir = cluster.sources_dir();
    let start = |function: &'static str, source: StreamSource| {
        let client = client.clone();
        async move {
            client
                .stream_start(function, source, StreamOptions::default())
                .await
                .expect_err("refused")
                .to_string()
        }
    };
    let missing = dir.join("nope.jsonl").to_str().expect("utf-8").to_string();
    let e = start("f", StreamSource::Jsonl { path: missing }).await;
    assert!(e.contains("cannot open") && e.contains("nope.jsonl"), "{e}");

    let bad = dir.as_path().join("bad.jsonl");
    std::fs::write(&bad, "{not json\n{\"ok\":1}\n").expect("write");
    let e = start(
        "f",
        StreamSource::Jsonl {
            path: bad.to_str().expect("utf-8").into(),
        },
    )
    .await;
    assert!(e.contains("is not JSON"), "{e}");

    let bad_csv = dir.as_path().join("bad.csv");
    std::fs::write(&bad_csv, "a,b\n1,2,3\n").expect("write");
    let e = start(
        "f",
        StreamSource::Csv {
            path: bad_csv.to_str().expect("utf-8").into(),
        },
    )
    .await;
    assert!(e.contains("has 3 fields"), "{e}");

    let good = dir.as_path().join("good.jsonl");
    std::fs::write(&good, "1\n").expect("write");
    let r = client
        .stream_start(
            "nope",
            StreamSource::Jsonl {
                path: good.to_str().expect("utf-8").into(),
            },
            StreamOptions::default(),
        )
        .await;
    match r {
        Err(ClientError::Api(skiff_client::api::ApiError::NotFound(m))) => {
            assert!(m.contains("function nope does not exist"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        client.streams().await.expect("list").is_empty(),
        "nothing started"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_following_kv_stream_picks_up_keys_written_later() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    deploy_fn(&cluster, "echo", ECHO_SERVE, FnMode::Serve).await;
    let client = cluster.client();
    for k in ["in/a", "in/b"] {
        client.put(k, b"before".to_vec()).await.expect("put");
    }
    let id = client
        .stream_start(
            "echo",
            StreamSource::Kv {
                prefix: "in/".into(),
                follow: true,
            },
            options(16, 1, "out/"),
        )
        .await
        .expect("start");
    let results = |n: usize| {
        let client = client.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let got = client.list_all("out/", 10_000).await.unwrap_or_default();
                if got.len() >= n {
                    return got;
                }
                assert!(
                    Instant::now() < deadline,
                    "only {} results: {got:?}",
                    got.len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let first = results(2).await;
    assert_eq!(first.len(), 2, "the keys present at the start");
    // Written after the start: a new key and a rewrite of an old one.
    client.put("in/c", b"later".to_vec()).await.expect("put");
    client
        .put("in/a", b"rewritten".to_vec())
        .await
        .expect("put");
    client
        .put("elsewhere/x", b"not under the prefix".to_vec())
        .await
        .expect("put");
    let all = results(4).await;
    let values: Vec<String> = all
        .iter()
        .map(|e| String::from_utf8_lossy(&e.value).into_owned())
        .collect();
    assert!(
        values
            .iter()
            .any(|v| v.contains("\"in/c\"") && v.contains("later")),
        "{values:?}"
    );
    assert!(values.iter().any(|v| v.contains("rewritten")), "{values:?}");
    let job = client.stream(id).await.expect("read").expect("job");
    assert_eq!(
        job.state,
        StreamState::Running,
        "a following job keeps running: {job:?}"
    );
    assert_eq!(job.counters.succeeded, 4, "{job:?}");
    client.stream_cancel(id).await.expect("cancel");
    let job = wait_stream(&client, id, Duration::from_secs(20)).await;
    assert_eq!(job.state, StreamState::Cancelled, "{job:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rerunning_a_stream_over_unchanged_items_is_all_hits() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let dir = cluster.sources_dir();
    let path = jsonl(dir.as_path(), 200);
    let c = rpc(&cluster, 1).await;
    let s = FunctionSpec {
        max_concurrency: 64,
        idempotency: Some(skiff_client::api::Idempotency {
            dependencies: vec![],
            ttl_ms: 600_000,
            cache_failures: false,
            track_reads: false,
        }),
        ..spec("idem-echo", &["/bin/sh", "main.sh"], FnMode::Serve)
    };
    deploy(&c, s, &archive(&[("main.sh", 0o755, ECHO_SERVE)])).await;
    wait_workers(&c, 3).await;
    let client = cluster.client();
    let mut hits = Vec::new();
    for round in 0..2 {
        let id = client
            .stream_start(
                "idem-echo",
                StreamSource::Jsonl { path: path.clone() },
                options(64, 10, &format!("run{round}/")),
            )
            .await
            .expect("start");
        let job = wait_stream(&client, id, Duration::from_secs(50)).await;
        assert_eq!(job.state, StreamState::Succeeded, "{job:?}");
        assert_eq!(job.counters.succeeded, 200);
        hits.push(job.counters.idempotent_hits);
        assert_every_result(&client, &format!("run{round}/"), 200).await;
    }
    assert_eq!(
        hits,
        vec![0, 200],
        "the second pass over unchanged items ran nothing"
    );
}
