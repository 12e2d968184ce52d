//! The warm pool: exec mode (one use), serve mode (reuse for the same version only), memory
//! accounting and idle expiry.

use std::sync::Arc;
use std::time::Duration;

use skiff_sandbox::{
    ExitStatus, PoolConfig, PoolKey, PoolMode, SandboxError, Tier, WarmPool, WarmSandbox,
};

use crate::{argv, can_sandbox, code_dir, spec, text};

fn key(version: u64, mode: PoolMode) -> PoolKey {
    PoolKey {
        function: "echo".into(),
        function_id: 1,
        version,
        mode,
    }
}

#[tokio::test]
async fn exec_mode_sandboxes_are_prepared_ahead_and_used_once() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    let spec = spec(Tier::Untrusted, code.path(), "");
    let pool = Arc::new(WarmPool::new(PoolConfig {
        size_max: 2,
        idle_expiry: Duration::from_secs(60),
        memory_budget_bytes: 1 << 30,
    }));
    let k = key(1, PoolMode::Exec);
    for _ in 0..3 {
        pool.prewarm(k.clone(), spec.clone(), None)
            .await
            .expect("prewarm");
    }
    let stats = pool.stats();
    assert_eq!(stats.idle, 2, "size_max caps the pool");
    assert!(stats.memory_bytes > 0, "idle sandboxes are accounted");
    assert!(
        pool.acquire(&key(2, PoolMode::Exec)).is_none(),
        "another version gets nothing"
    );
    let Some(WarmSandbox::Exec(sandbox)) = pool.acquire(&k) else {
        panic!("a warm exec sandbox");
    };
    let out = sandbox
        .run(&argv(&["sh", "-c", "cat; echo warm"]), b"in:")
        .await
        .expect("runs");
    assert_eq!(out.status, ExitStatus::Exited(0));
    assert_eq!(text(&out.stdout), "in:warm\n");
    assert_eq!(pool.stats().idle, 1);
    pool.clear();
    assert_eq!(pool.stats(), Default::default());
}

#[test]
fn the_memory_budget_and_idle_expiry_bound_the_pool() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    let spec = spec(Tier::Untrusted, code.path(), "");
    let k = key(1, PoolMode::Exec);
    let tiny = WarmPool::new(PoolConfig {
        size_max: 10,
        idle_expiry: Duration::from_secs(60),
        memory_budget_bytes: 1,
    });
    assert!(!tiny
        .prewarm_blocking(k.clone(), &spec, None)
        .expect("prewarm"));
    assert_eq!(tiny.stats().idle, 0);

    let expiring = WarmPool::new(PoolConfig {
        size_max: 10,
        idle_expiry: Duration::from_millis(1),
        memory_budget_bytes: 1 << 30,
    });
    assert!(expiring
        .prewarm_blocking(k.clone(), &spec, None)
        .expect("prewarm"));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(expiring.expire_idle(), 1);
    assert_eq!(expiring.stats().idle, 0);
    assert!(expiring
        .prewarm_blocking(k.clone(), &spec, None)
        .expect("prewarm"));
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        expiring.acquire(&k).is_none(),
        "an expired sandbox is never handed out"
    );
}

const SERVER: &str = r#"
import json, sys
count = 0
for line in sys.stdin:
    count += 1
    req = json.loads(line)
    if req.get("sleep"):
        import time; time.sleep(req["sleep"])
    print(json.dumps({"echo": req, "count": count}), flush=True)
    print("served", count, file=sys.stderr, flush=True)
"#;

#[tokio::test]
async fn serve_mode_reuses_one_process_for_one_version_only() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[("server.py", SERVER)]);
    let spec = spec(Tier::Standard, code.path(), "timeout_ms = 2000");
    let pool = Arc::new(WarmPool::new(PoolConfig::default()));
    let k = key(7, PoolMode::Serve);
    let serve_argv = argv(&["python3", "/code/server.py"]);
    assert!(pool
        .prewarm(k.clone(), spec.clone(), Some(serve_argv.clone()))
        .await
        .expect("prewarm"));
    assert!(pool.acquire(&key(8, PoolMode::Serve)).is_none());
    assert!(pool.acquire(&key(7, PoolMode::Exec)).is_none());
    let Some(WarmSandbox::Serve(mut sandbox)) = pool.acquire(&k) else {
        panic!("a warm serve sandbox");
    };
    let response = sandbox.request_blocking(br#"{"n": 1}"#).expect("response");
    assert_eq!(text(&response), r#"{"echo": {"n": 1}, "count": 1}"#);
    let (sandbox, response) = sandbox.request(br#"{"n": 2}"#.to_vec()).await;
    assert_eq!(
        text(&response.expect("response")),
        r#"{"echo": {"n": 2}, "count": 2}"#
    );
    pool.release(k.clone(), sandbox);
    assert_eq!(pool.stats().idle, 1);
    // Released to the same key: the same process answers (its count goes on).
    let Some(WarmSandbox::Serve(mut sandbox)) = pool.acquire(&k) else {
        panic!("the released serve sandbox");
    };
    let response = sandbox.request_blocking(br#"{"n": 3}"#).expect("response");
    assert_eq!(text(&response), r#"{"echo": {"n": 3}, "count": 3}"#);
    assert!(text(sandbox.log()).contains("served 2"));
    assert!(matches!(
        sandbox.request_blocking(b"two\nlines"),
        Err(SandboxError::InvalidCommand { .. })
    ));
    // A request past the timeout kills the process; it is not reused.
    let err = sandbox
        .request_blocking(br#"{"sleep": 10}"#)
        .expect_err("times out");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(!sandbox.is_alive());
    pool.release(k.clone(), sandbox);
    assert_eq!(pool.stats().idle, 0);
}

/// The parent-death signal follows the forking thread: a sandbox pre-warmed from a thread
/// that then exits must still be alive and usable.
#[test]
fn warm_sandboxes_outlive_the_thread_that_asked_for_them() {
    if !can_sandbox() {
        return;
    }
    let code = code_dir(&[]);
    let spec = spec(Tier::Standard, code.path(), "");
    let pool = Arc::new(WarmPool::new(PoolConfig::default()));
    let exec = key(1, PoolMode::Exec);
    let serve = key(1, PoolMode::Serve);
    {
        let (pool, spec, exec, serve) = (pool.clone(), spec.clone(), exec.clone(), serve.clone());
        std::thread::spawn(move || {
            assert!(pool
                .prewarm_blocking(exec, &spec, None)
                .expect("prewarm exec"));
            let cat = argv(&["sh", "-c", "while IFS= read -r l; do echo \"$l\"; done"]);
            assert!(pool
                .prewarm_blocking(serve, &spec, Some(&cat))
                .expect("prewarm serve"));
        })
        .join()
        .expect("the asking thread ends");
    }
    std::thread::sleep(Duration::from_millis(300));
    let Some(WarmSandbox::Exec(sandbox)) = pool.acquire(&exec) else {
        panic!("a warm exec sandbox");
    };
    let out = sandbox
        .run_blocking(&argv(&["sh", "-c", "echo alive"]), b"")
        .expect("the warm sandbox still runs");
    assert_eq!(text(&out.stdout), "alive\n");
    let Some(WarmSandbox::Serve(mut s)) = pool.acquire(&serve) else {
        panic!("a warm serve sandbox");
    };
    assert_eq!(
        s.request_blocking(b"{\"x\":1}").expect("answers"),
        b"{\"x\":1}"
    );
    pool.clear();
}
