//! Staged functions on a real three-node cluster: a pipeline transforms a payload stage by
//! stage, each stage reaching the store only through its own grant (and the reads of every
//! stage feeding the idempotency ledger); a failing middle stage fails the invocation and is
//! named; the pipeline shares the function's timeout; bad pipelines are refused at deploy with
//! nothing deployed. Runs need root for the sandboxes: without it those tests say so and skip.

use sha2::{Digest, Sha256};
use skiff_client::api::{
    ApiError, ClientCommand, Command, CommandResult, DataGrant, FnMode, FunctionSpec, Idempotency,
    MissReason, ReadConsistency, RunStatus, StageSpec, TaskState,
};
use skiff_raft_store::functions::STAGES_MAX;

use crate::functions::{
    archive, ctx, deploy, invoke, is_root, output, request_id, rpc, spec, write, CONFIG,
};
use crate::harness::TestCluster;
use crate::idempotency::{get, is_hit, miss_reason, put};
use crate::require_root;

fn stage(name: &str, tier: &str, script: &str, data: DataGrant) -> StageSpec {
    StageSpec {
        name: name.into(),
        entry: vec!["/bin/sh".into(), script.into()],
        tier: tier.into(),
        policy: None,
        data,
        env: vec![],
    }
}

/// A staged function of `stages` at most at the standard tier.
fn staged(name: &str, stages: Vec<StageSpec>) -> FunctionSpec {
    FunctionSpec {
        entry: vec![],
        stages,
        ..spec(name, &[], FnMode::Exec)
    }
}

/// Stage 1 (untrusted, may only read `in/`): reads a key, upper-cases the payload, tries a
/// write it is not granted and passes the refusal on.
const PARSE: &str = "g=$(skiff-data get in/greeting) || exit 9\n\
p=$(cat | tr a-z A-Z)\n\
w=$(skiff-data put out/evil x 2>&1); code=$?\n\
printf '%s %s\\nput:%s:%s\\n' \"$g\" \"$p\" \"$code\" \"$w\"\n";

/// Stage 2 (standard, may write `out/`): stores the first line with a suffix it reads, tries
/// a read outside its grant, and answers with what it stored, the refusal stage 1 saw and its
/// own.
const STORE: &str = "IFS= read -r line\nIFS= read -r refusal\n\
sfx=$(skiff-data get out/suffix) || exit 9\n\
skiff-data put out/result \"$line$sfx\" >/dev/null || exit 8\n\
skiff-data get in/greeting >/dev/null 2>&1; got=$?\n\
printf '%s\\n%s\\nget:%s\\n' \"$line$sfx\" \"$refusal\" \"$got\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_stage_pipeline_transforms_a_payload_with_a_grant_per_stage() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    put(&c, "in/greeting", "hello").await;
    put(&c, "out/suffix", "!").await;
    let code = archive(&[("parse.sh", 0o644, PARSE), ("store.sh", 0o644, STORE)]);
    let read_in = DataGrant {
        read_prefixes: vec!["in/".into()],
        write_prefixes: vec![],
    };
    let write_out = DataGrant {
        read_prefixes: vec![],
        write_prefixes: vec!["out/".into()],
    };
    let s = FunctionSpec {
        idempotency: Some(Idempotency {
            dependencies: vec![],
            ttl_ms: 600_000,
            cache_failures: false,
            track_reads: true,
        }),
        ..staged(
            "pipeline",
            vec![
                stage("parse", "untrusted", "parse.sh", read_in),
                stage("store", "standard", "store.sh", write_out),
            ],
        )
    };
    deploy(&c, s, &code).await;

    let t = invoke(&c, "pipeline", b"world", true).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(miss_reason(&t), MissReason::FirstRun);
    let expected = "hello WORLD!\n\
put:4:skiff-data: put of \"out/evil\" denied: this function may read keys starting with \"in/\" and write no key\n\
get:4\n";
    assert_eq!(output(&t), expected);
    assert_eq!(get(&c, "out/result").await, "hello WORLD!");
    assert_eq!(
        get(&c, "out/evil").await,
        "",
        "stage 1's write never happened"
    );

    // Unchanged reads in both stages: a hit, nothing runs.
    let t = invoke(&c, "pipeline", b"world", true).await;
    assert!(is_hit(&t), "{t:?}");
    assert_eq!(output(&t), expected);
    // A key only stage 1 read changed: the pipeline runs again, and says why.
    put(&c, "in/greeting", "hey").await;
    let t = invoke(&c, "pipeline", b"world", true).await;
    assert!(
        matches!(&miss_reason(&t), MissReason::DependencyChanged { dependency, .. } if dependency == "read:in/greeting"),
        "{t:?}"
    );
    assert!(output(&t).starts_with("hey WORLD!\n"), "{}", output(&t));
    assert!(is_hit(&invoke(&c, "pipeline", b"world", true).await));
    // A key only stage 2 read changed: the same.
    put(&c, "out/suffix", "?").await;
    let t = invoke(&c, "pipeline", b"world", true).await;
    assert!(
        matches!(&miss_reason(&t), MissReason::DependencyChanged { dependency, .. } if dependency == "read:out/suffix"),
        "{t:?}"
    );
    assert_eq!(get(&c, "out/result").await, "hey WORLD?");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_middle_stage_fails_the_invocation_and_is_named() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    // Stage 1 has no grant: no socket and no helper in its sandbox. Stage 2 shows what it got
    // on stderr and fails. Stage 3 would write a key.
    let code = archive(&[
        (
            "first.sh",
            0o644,
            "[ -e /run/skiff/data.sock ] && echo sock || echo nosock\n\
             command -v skiff-data >/dev/null && echo helper || echo nohelper\n",
        ),
        (
            "middle.sh",
            0o644,
            "cat >&2\necho 'middle gives up' >&2\necho partial\nexit 3\n",
        ),
        (
            "last.sh",
            0o644,
            "skiff-data put out/never ran >/dev/null\ncat\n",
        ),
    ]);
    let s = staged(
        "fails-in-the-middle",
        vec![
            stage("first", "untrusted", "first.sh", DataGrant::default()),
            stage("middle", "untrusted", "middle.sh", DataGrant::default()),
            stage(
                "last",
                "standard",
                "last.sh",
                DataGrant {
                    read_prefixes: vec![],
                    write_prefixes: vec!["out/".into()],
                },
            ),
        ],
    );
    deploy(&c, s, &code).await;
    let t = invoke(&c, "fails-in-the-middle", b"", true).await;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let r = t.result.as_ref().expect("a result");
    assert_eq!(r.status, RunStatus::Failed);
    assert_eq!(
        r.error.as_deref(),
        Some("stage 2 of 3 (middle) failed: exit status 3")
    );
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(
        String::from_utf8_lossy(&r.log),
        "nosock\nnohelper\nmiddle gives up\n",
        "the log is the failing stage's stderr, and stage 1's output reached it"
    );
    assert!(r.output.is_empty(), "a failed pipeline has no output");
    assert_eq!(get(&c, "out/never").await, "", "stage 3 never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stages_share_the_function_timeout() {
    require_root!();
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    // Each stage alone is within the 1.5 s timeout; the two together are not.
    let code = archive(&[("nap.sh", 0o644, "sleep 1\ncat\n")]);
    let s = FunctionSpec {
        timeout_ms: 1_500,
        ..staged(
            "slow-pipeline",
            vec![
                stage("one", "standard", "nap.sh", DataGrant::default()),
                stage("two", "standard", "nap.sh", DataGrant::default()),
            ],
        )
    };
    deploy(&c, s, &code).await;
    let t = invoke(&c, "slow-pipeline", b"x", true).await;
    assert_eq!(t.state, TaskState::TimedOut, "{t:?}");
    let r = t.result.as_ref().expect("a result");
    assert_eq!(r.error.as_deref(), Some("stage 2 of 2 (two) timed out"));
    assert!(r.wall_ms < 5_000, "killed at the function's timeout: {r:?}");
}

/// Sends a deploy of `spec` (code already uploaded) and returns the node's refusal.
async fn refused_deploy(c: &skiff_client::api::ClientApiClient, spec: FunctionSpec) -> String {
    let name = spec.name.clone();
    let r = c
        .write(
            ctx(30),
            vec![ClientCommand {
                request_id: request_id(),
                command: Command::FnDeploy {
                    spec: Box::new(spec),
                },
            }]
            .into(),
        )
        .await
        .expect("rpc");
    let reason = match r {
        Err(ApiError::InvalidArgument(reason)) => reason,
        other => panic!("deploy of {name} not refused: {other:?}"),
    };
    let record = c
        .fn_get(ctx(10), name.clone(), ReadConsistency::Linearizable)
        .await
        .expect("rpc")
        .expect("fn_get");
    assert!(record.is_none(), "{name} was deployed anyway: {record:?}");
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_pipelines_are_refused_with_nothing_deployed() {
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    let code = archive(&[("ok.sh", 0o644, "cat\n")]);
    let digest = hex::encode(Sha256::digest(&code));
    let stored = write(
        &c,
        Command::CodeChunk {
            digest: digest.clone(),
            total_bytes: code.len() as u64,
            index: 0,
            bytes: code.clone(),
        },
    )
    .await;
    assert!(
        matches!(stored, CommandResult::ChunkStored { .. }),
        "{stored:?}"
    );
    let ok = |name: &str| stage(name, "untrusted", "ok.sh", DataGrant::default());
    let with_code = |s: FunctionSpec| FunctionSpec {
        code_digest: digest.clone(),
        ..s
    };

    let many = (0..=STAGES_MAX).map(|i| ok(&format!("s{i}"))).collect();
    let e = refused_deploy(&c, with_code(staged("too-many", many))).await;
    assert!(e.contains("9 stages: a function has at most 8"), "{e}");

    let mut empty = ok("second");
    empty.entry = vec![];
    let e = refused_deploy(
        &c,
        with_code(staged("empty-entry", vec![ok("first"), empty])),
    )
    .await;
    assert!(
        e.contains("stage 2 (\"second\"): the entry command is empty"),
        "{e}"
    );

    let mut wide = ok("greedy");
    wide.policy = Some("pids_max = 100000\n".into());
    let e = refused_deploy(&c, with_code(staged("widening", vec![ok("first"), wide]))).await;
    assert!(
        e.contains("stage 2 of 2 (greedy)") && e.contains("pids_max"),
        "{e}"
    );

    let mut above = ok("root");
    above.tier = "trusted".into();
    let e = refused_deploy(&c, with_code(staged("above-tier", vec![above]))).await;
    assert!(
        e.contains("tier trusted is above the function's tier standard"),
        "{e}"
    );

    let serve = FunctionSpec {
        mode: FnMode::Serve,
        ..staged("served", vec![ok("only")])
    };
    let e = refused_deploy(&c, with_code(serve)).await;
    assert!(e.contains("exec mode only"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_pipeline_deploys_from_its_manifest_and_runs() {
    require_root!();
    if !std::path::Path::new("/usr/bin/python3").exists() {
        eprintln!("skipping: the example's parser stage needs /usr/bin/python3");
        return;
    }
    let manifest =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/stages/skiff.toml");
    let plan = skiff_client::deploy::read_manifest(&manifest, None).expect("the manifest");
    let code = skiff_client::deploy::read_code(&plan.code).expect("the code");
    let cluster = TestCluster::start(3, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    deploy(&c, plan.spec.clone(), &code).await;

    let t = invoke(&c, "scores", br#"{"user":"ada","score":42}"#, true).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert!(
        output(&t).starts_with("{\"stored\":\"scores/ada\",\"version\":"),
        "{}",
        output(&t)
    );
    assert_eq!(get(&c, "scores/ada").await, r#"{"user":"ada","score":42}"#);

    // Refused by the parser: the trusted stage never runs, and the parser is named.
    let t = invoke(&c, "scores", br#"{"user":"../etc","score":1}"#, true).await;
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let r = t.result.as_ref().expect("a result");
    assert_eq!(
        r.error.as_deref(),
        Some("stage 1 of 2 (parse) failed: exit status 2")
    );
    assert_eq!(
        String::from_utf8_lossy(&r.log),
        "user must be 1-32 characters of a-z 0-9 _ -\n"
    );
    assert_eq!(get(&c, "scores/../etc").await, "");
}
