//! Control-plane authentication on a real cluster: calls without a valid token get nothing,
//! roles bound what a token may do (the `trusted` tier needs an admin), a revoked token stops
//! working on every node, listings never show a secret, and the bootstrap happens once.

use std::time::{Duration, Instant};

use skiff_client::api::{ApiError, FnMode, ReadConsistency, Role, TaskState};
use skiff_client::{Client, ClientError};
use skiff_proto::tokens::new_token_secret;

use crate::functions::{archive, ctx, rpc_as, spec};
use crate::harness::TestCluster;

fn unauthenticated(e: &ClientError) -> bool {
    matches!(e, ClientError::Api(ApiError::Unauthenticated(_)))
}

fn denied(e: &ClientError) -> bool {
    matches!(e, ClientError::Api(ApiError::PermissionDenied(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_token_nothing_is_read_or_written_and_bootstrap_happens_once() {
    let cluster = TestCluster::start(3, "").await;
    let admin = cluster.client();
    admin.put("k", b"before".to_vec()).await.expect("admin put");

    for id in cluster.ids() {
        // No token: a read and a write are refused, on every node.
        let anonymous = cluster.client_with(&[id], None);
        let e = anonymous.get("k").await.expect_err("read without a token");
        assert!(unauthenticated(&e), "node {id}: {e}");
        let e = anonymous
            .put("k", b"anonymous".to_vec())
            .await
            .expect_err("write without a token");
        assert!(unauthenticated(&e), "node {id}: {e}");
        let e = anonymous.cluster_status().await.expect_err("status");
        assert!(unauthenticated(&e), "node {id}: {e}");
    }
    // A well-formed secret the cluster never made is refused the same way.
    let stranger = cluster.client_with(&[2], Some(new_token_secret()));
    let e = stranger
        .put("k", b"stranger".to_vec())
        .await
        .expect_err("unknown token");
    assert!(unauthenticated(&e), "{e}");
    let e = stranger
        .tokens()
        .await
        .expect_err("unknown token lists nothing");
    assert!(unauthenticated(&e), "{e}");
    // A raw connection with no token gets the error and no data either.
    let raw = rpc_as(&cluster.tls(), &cluster.node(3).addr, None).await;
    let r = raw
        .kv_get(ctx(10), "k".into(), ReadConsistency::Local)
        .await
        .expect("rpc");
    assert!(matches!(r, Err(ApiError::Unauthenticated(_))), "{r:?}");

    let value = admin.get("k").await.expect("admin get").expect("k exists");
    assert_eq!(value.value, b"before", "refused writes changed nothing");

    // A second init, with its own secret, is refused and makes no token.
    let members = cluster
        .nodes
        .iter()
        .map(|n| (n.id, n.addr.clone()))
        .collect();
    let e = cluster
        .client_with(&[2], None)
        .cluster_init(members)
        .await
        .expect_err("second bootstrap");
    assert!(
        matches!(&e, ClientError::Api(ApiError::FailedPrecondition(m)) if m.contains("already initialized")),
        "{e}"
    );
    let tokens = admin.tokens().await.expect("token ls");
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(
        (tokens[0].id, tokens[0].role, tokens[0].name.as_deref()),
        (1, Role::Admin, Some("bootstrap"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_bound_what_a_token_may_do_and_trusted_needs_an_admin() {
    let cluster = TestCluster::start(3, "").await;
    let admin = cluster.client();
    let deployer = admin
        .token_create(Role::Deployer, Some("ci".into()))
        .await
        .expect("create deployer");
    let invoker = admin
        .token_create(Role::Invoker, None)
        .await
        .expect("create invoker");
    assert_eq!(deployer.token.role, Role::Deployer);
    // Each through another node than the one that made it: catch-up on first use.
    let as_deployer = cluster.client_with(&[3, 1, 2], Some(deployer.secret.clone()));
    let as_invoker = cluster.client_with(&[2, 3, 1], Some(invoker.secret.clone()));

    let code = archive(&[("run.sh", 0o755, "#!/bin/sh\ncat\n")]);
    // An invoker may not upload or deploy, nor write keys, nor make tokens.
    let e = as_invoker
        .upload_code(&code, |_, _| {})
        .await
        .expect_err("invoker upload");
    assert!(denied(&e), "{e}");
    let e = as_invoker
        .deploy(skiff_client::api::FunctionSpec {
            code_digest: "ab".repeat(32),
            ..spec("f", &["/bin/sh", "run.sh"], FnMode::Exec)
        })
        .await
        .expect_err("invoker deploy");
    assert!(denied(&e), "{e}");
    let e = as_invoker
        .put("k", b"v".to_vec())
        .await
        .expect_err("kv put");
    assert!(denied(&e), "{e}");
    let e = as_invoker
        .token_create(Role::Admin, None)
        .await
        .expect_err("invoker makes a token");
    assert!(denied(&e), "{e}");
    assert!(admin.function("f").await.expect("fn show").is_none());

    // A deployer deploys at the standard tier, not at trusted.
    let digest = as_deployer
        .upload_code(&code, |_, _| {})
        .await
        .expect("deployer upload");
    let standard = skiff_client::api::FunctionSpec {
        code_digest: digest.clone(),
        ..spec("f", &["/bin/sh", "run.sh"], FnMode::Exec)
    };
    as_deployer
        .deploy(standard.clone())
        .await
        .expect("deployer deploys standard");
    let trusted = skiff_client::api::FunctionSpec {
        name: "t".into(),
        tier: "trusted".into(),
        ..standard
    };
    let e = as_deployer
        .deploy(trusted.clone())
        .await
        .expect_err("deployer deploys trusted");
    assert!(denied(&e) && e.to_string().contains("trusted"), "{e}");
    assert!(admin.function("t").await.expect("fn show").is_none());
    let e = as_deployer
        .tokens()
        .await
        .expect_err("deployer lists tokens");
    assert!(denied(&e), "{e}");
    let e = as_deployer
        .cluster_remove_node(3)
        .await
        .expect_err("membership");
    assert!(denied(&e), "{e}");
    // An admin may.
    admin.deploy(trusted).await.expect("admin deploys trusted");
    assert_eq!(
        admin
            .function("t")
            .await
            .expect("fn show")
            .and_then(|f| f.latest().map(|v| v.spec.tier.clone()))
            .as_deref(),
        Some("trusted")
    );

    // The invoker reads what it may: functions, keys, and invokes (async: the task is
    // queued; running it needs root, which this test does not).
    as_deployer
        .put("k", b"v".to_vec())
        .await
        .expect("deployer put");
    let v = as_invoker.get("k").await.expect("invoker get").expect("k");
    assert_eq!(v.value, b"v");
    assert!(as_invoker
        .function("f")
        .await
        .expect("invoker fn show")
        .is_some());
    let task = as_invoker
        .invoke("f", None, b"x".to_vec(), false)
        .await
        .expect("invoker invokes");
    assert_ne!(task.state, TaskState::Failed);
    let seen = as_invoker.task(task.id).await.expect("invoker task show");
    assert!(seen.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stops_working_on_every_node_and_listings_show_no_secret() {
    let cluster = TestCluster::start(3, "").await;
    let admin = cluster.client();
    let made = admin
        .token_create(Role::Invoker, Some("to-revoke".into()))
        .await
        .expect("create");
    admin.put("k", b"v".to_vec()).await.expect("put");

    // One client per node, each holding its connection open across the revocation.
    let per_node: Vec<(u64, Client)> = cluster
        .ids()
        .into_iter()
        .map(|id| (id, cluster.client_with(&[id], Some(made.secret.clone()))))
        .collect();
    for (id, c) in &per_node {
        c.get_with("k", ReadConsistency::Local)
            .await
            .unwrap_or_else(|e| panic!("node {id} refused a valid token: {e}"));
    }

    // The listing never carries a secret (nor the hash the cluster keeps).
    let listed = admin.tokens().await.expect("token ls");
    let text = serde_json::to_string(&listed).expect("json");
    assert!(!text.contains(&made.secret), "{text}");
    assert!(
        !text.contains(&skiff_raft_store::tokens::token_hash(&made.secret)),
        "{text}"
    );
    assert!(listed
        .iter()
        .any(|t| t.name.as_deref() == Some("to-revoke")));

    let revoked = admin.token_revoke(made.token.id).await.expect("revoke");
    assert!(revoked.revoked);
    for (id, c) in &per_node {
        // Each node refuses the token once it has applied the revocation.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match c.get_with("k", ReadConsistency::Local).await {
                Err(e) if unauthenticated(&e) => {
                    assert!(e.to_string().contains("revoked"), "node {id}: {e}");
                    break;
                }
                Err(e) => panic!("node {id}: {e}"),
                Ok(_) => {
                    assert!(
                        Instant::now() < deadline,
                        "node {id} still accepts a token revoked 10 s ago"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        // And a fresh connection is refused too.
        let fresh = cluster.client_with(&[*id], Some(made.secret.clone()));
        let e = fresh.get("k").await.expect_err("revoked token");
        assert!(unauthenticated(&e), "node {id}: {e}");
    }
    let listed = admin.tokens().await.expect("token ls");
    let t = listed
        .iter()
        .find(|t| t.id == made.token.id)
        .expect("a revoked token is still listed");
    assert!(t.revoked && t.revoked_ms.is_some());
    // Unknown ids are not found.
    let e = admin.token_revoke(999).await.expect_err("unknown id");
    assert!(matches!(e, ClientError::Api(ApiError::NotFound(_))), "{e}");
}
