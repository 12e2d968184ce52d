//! An invoker: holds a token that may call functions and read results, never deploy.
//!
//! It must not read what only deployers may set (a function's environment, where its secrets
//! live), whatever path returns a function, and a request id it read in a task record must
//! not make the cluster answer it with another caller's result.

use std::time::Duration;

use skiff_client::api::{FnMode, ReadConsistency, RequestId, Role};

use crate::functions::{ctx, deploy, invoke_id, is_root, rpc, rpc_as, spec, wait_finished, CONFIG};
use crate::harness::TestCluster;

const SECRET: &str = "s3cr3t-database-password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoker_never_reads_a_function_environment_value() {
    let cluster = TestCluster::start(3, CONFIG).await;
    let admin = rpc(&cluster, 1).await;
    let code = crate::functions::archive(&[("run.sh", 0o755, "#!/bin/sh\ncat\n")]);
    let mut f = spec("with-secret", &["/bin/sh", "run.sh"], FnMode::Exec);
    f.env = vec![("DB_PASSWORD".into(), SECRET.into())];
    // A staged function keeps an environment per stage: each one is a secret too.
    deploy(&admin, f, &code).await;
    let client = cluster.client();
    let invoker = client
        .token_create(Role::Invoker, Some("reader".into()))
        .await
        .expect("invoker token");
    let deployer = client
        .token_create(Role::Deployer, None)
        .await
        .expect("deployer token");

    let leaks = |what: &str, text: String| {
        assert!(
            !text.contains(SECRET),
            "{what} showed an invoker the environment value: {text}"
        );
    };
    // Every node (the leader answers, followers forward or read locally), every read path.
    for id in cluster.ids() {
        let as_invoker = rpc_as(
            &cluster.tls(),
            &cluster.node(id).addr,
            Some(&invoker.secret),
        )
        .await;
        for read in [ReadConsistency::Linearizable, ReadConsistency::Local] {
            let one = as_invoker
                .fn_get(ctx(10), "with-secret".into(), read)
                .await
                .expect("rpc")
                .expect("fn_get");
            // Local reads on a follower may lag: wait for the deploy to arrive there.
            let one = match one {
                Some(f) => f,
                None => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    as_invoker
                        .fn_get(ctx(10), "with-secret".into(), read)
                        .await
                        .expect("rpc")
                        .expect("fn_get")
                        .expect("the function is there")
                }
            };
            let env = &one.latest().expect("a version").spec.env;
            assert_eq!(env.len(), 1, "the names stay visible: {env:?}");
            assert_eq!(env[0].0, "DB_PASSWORD");
            leaks(
                &format!("fn_get on node {id} ({read:?})"),
                format!("{one:?}"),
            );
            let all = as_invoker
                .fn_list(ctx(10), read)
                .await
                .expect("rpc")
                .expect("fn_list");
            leaks(
                &format!("fn_list on node {id} ({read:?})"),
                format!("{all:?}"),
            );
        }
        // A deployer, who may set the value, reads it back.
        let as_deployer = rpc_as(
            &cluster.tls(),
            &cluster.node(id).addr,
            Some(&deployer.secret),
        )
        .await;
        let seen = as_deployer
            .fn_get(ctx(10), "with-secret".into(), ReadConsistency::Linearizable)
            .await
            .expect("rpc")
            .expect("fn_get")
            .expect("the function");
        assert_eq!(
            seen.latest().expect("a version").spec.env,
            vec![("DB_PASSWORD".to_string(), SECRET.to_string())]
        );
    }
    // The command line's JSON, which printed the values before.
    // The `skiff` binary of the same build (a workspace build puts it beside `skiffd`).
    let skiff = std::path::Path::new(env!("CARGO_BIN_EXE_skiffd")).with_file_name("skiff");
    let out = std::process::Command::new(skiff)
        .args(["fn", "show", "with-secret", "--json"])
        .env("SKIFF_ENDPOINTS", &cluster.node(2).addr)
        .env("SKIFF_TOKEN", &invoker.secret)
        .env("SKIFF_CA", cluster.tls_dir().join("ca.pem"))
        .output()
        .expect("run skiff");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("DB_PASSWORD"), "{text}");
    leaks("skiff fn show --json", text.into_owned());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_read_from_a_task_record_answers_no_other_caller() {
    if !is_root() {
        eprintln!("skipping: sandboxes need root (run the tests as root)");
        return;
    }
    let cluster = TestCluster::start(3, CONFIG).await;
    let admin = rpc(&cluster, 1).await;
    let code = crate::functions::archive(&[("run.sh", 0o755, "#!/bin/sh\ncat\n")]);
    deploy(
        &admin,
        spec("echo", &["/bin/sh", "run.sh"], FnMode::Exec),
        &code,
    )
    .await;
    let client = cluster.client();
    let invoker = client
        .token_create(Role::Invoker, None)
        .await
        .expect("invoker token");

    // Another caller's invocation, with its private payload.
    let theirs = RequestId {
        client: rand::random(),
        seq: 1,
    };
    let victim = invoke_id(
        &admin,
        theirs,
        "echo",
        b"the victim's private payload",
        true,
    )
    .await
    .expect("the victim's invocation");
    assert_eq!(victim.request_id, Some(theirs));

    // The invoker lists tasks, reads the victim's request id, and invokes with it.
    let as_invoker = rpc_as(&cluster.tls(), &cluster.node(2).addr, Some(&invoker.secret)).await;
    let tasks = as_invoker
        .task_list(
            ctx(10),
            Default::default(),
            0,
            100,
            ReadConsistency::Linearizable,
        )
        .await
        .expect("rpc")
        .expect("task_list");
    let learned = tasks
        .iter()
        .find(|t| t.id == victim.id)
        .and_then(|t| t.request_id)
        .expect("the task record shows the request id");
    let mine = invoke_id(&as_invoker, learned, "echo", b"mine", true)
        .await
        .expect("the invoker's invocation runs as its own");
    assert_ne!(mine.id, victim.id, "the id answered with the victim's task");
    assert_eq!(mine.payload, b"mine");
    let mine = wait_finished(&as_invoker, mine.id, Duration::from_secs(60)).await;
    assert_eq!(mine.result.expect("a result").output, b"mine");
    // The victim's retry still finds its own task.
    let again = invoke_id(
        &admin,
        theirs,
        "echo",
        b"the victim's private payload",
        true,
    )
    .await
    .expect("the victim's retry");
    assert_eq!(again.id, victim.id, "a retry gets its stored result");
    // And the invoker's retry its own.
    let retried = invoke_id(&as_invoker, learned, "echo", b"mine", true)
        .await
        .expect("the invoker's retry");
    assert_eq!(retried.id, mine.id);
}
