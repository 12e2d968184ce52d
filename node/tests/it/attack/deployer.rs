//! A deployer: may deploy and remove functions and start streams, never reach the host as the
//! node's user, other deployers' secrets beyond its role, or paths the operator did not open.

use skiff_client::api::{
    ApiError, ClientCommand, Command, CommandResult, FnMode, InvokeRequest, ReadConsistency,
    RequestId, Role,
};

use crate::functions::{ctx, deploy, rpc, rpc_as, spec, CONFIG};
use crate::harness::TestCluster;

/// A write of one command under `request_id`, answered with its one result.
async fn write_as(
    c: &skiff_client::api::ClientApiClient,
    request_id: RequestId,
    command: Command,
) -> CommandResult {
    let r = c
        .write(
            ctx(30),
            vec![ClientCommand {
                request_id,
                command,
            }]
            .into(),
        )
        .await
        .expect("rpc")
        .expect("write");
    r.into_iter().next().expect("one result")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_is_one_callers_and_names_one_kind_of_command() {
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
    let mut deployers = Vec::new();
    for name in ["a", "b"] {
        let t = client
            .token_create(Role::Deployer, Some(name.into()))
            .await
            .expect("deployer token");
        deployers.push(rpc_as(&cluster.tls(), &cluster.node(2).addr, Some(&t.secret)).await);
    }
    let (a, b) = (&deployers[0], &deployers[1]);
    let id = RequestId {
        client: rand::random(),
        seq: 7,
    };
    let put = |key: &str, value: &str| Command::KvPut {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        expect_version: None,
    };
    let first = write_as(a, id, put("a-key", "a")).await;
    let CommandResult::Put { version } = first else {
        panic!("a's put: {first:?}")
    };

    // Another deployer sending the same id: its own command runs, with its own result.
    let theirs = write_as(b, id, put("b-key", "b")).await;
    assert!(
        matches!(theirs, CommandResult::Put { version: v } if v > version),
        "b's put under a's id was answered with {theirs:?}"
    );
    let stored = admin
        .kv_get(ctx(10), "b-key".into(), ReadConsistency::Linearizable)
        .await
        .expect("rpc")
        .expect("kv_get");
    assert_eq!(stored.map(|e| e.value), Some(b"b".to_vec()));

    // The same caller retrying gets the stored result; the same id for another kind of
    // command is refused, with the reason, and changes nothing.
    assert_eq!(
        write_as(a, id, put("a-key", "a")).await,
        CommandResult::Put { version }
    );
    let refused = write_as(
        a,
        id,
        Command::KvDelete {
            key: "a-key".into(),
            expect_version: None,
        },
    )
    .await;
    match &refused {
        CommandResult::Rejected { reason } => assert!(
            reason.contains("already used for a key write") && reason.contains("new request id"),
            "{reason}"
        ),
        other => panic!("a delete under a put's id was answered with {other:?}"),
    }
    let e = a
        .invoke(
            ctx(30),
            InvokeRequest {
                request_id: id,
                function: "echo".into(),
                version: None,
                payload: b"x".to_vec(),
                wait: false,
                idempotency_key: None,
                tokens: vec![],
                files: vec![],
            },
        )
        .await
        .expect("rpc")
        .expect_err("an invocation under a put's id");
    assert!(
        matches!(&e, ApiError::FailedPrecondition(m) if m.contains("already used for a key write")),
        "{e:?}"
    );
    let still = admin
        .kv_get(ctx(10), "a-key".into(), ReadConsistency::Linearizable)
        .await
        .expect("rpc")
        .expect("kv_get")
        .expect("a-key is still there");
    assert_eq!(still.version, version);
}
