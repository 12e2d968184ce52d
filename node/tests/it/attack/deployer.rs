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

mod files {
    //! Files: stream sources and `file:` dependencies are read by a node running as root, so a
    //! deployer names them only beneath the sources roots the operator configured (the harness
    //! gives its nodes one, [`TestCluster::sources_dir`]); every way out of a root (absolute
    //! paths, `..`, symlinks absolute, relative and into `/proc`, mount points) is refused, and
    //! FIFOs, sockets and devices inside a root are refused without being opened.

    use std::os::unix::fs::symlink;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use clap::Parser;
    use skiff_client::api::{
        ApiError, Command, FnMode, FunctionSpec, Idempotency, StreamOptions, StreamSource,
        StreamState,
    };
    use skiff_client::cli::{deploy_plan, Cli, Cmd, FnCmd};
    use skiff_raft_store::functions::Dependency;

    use crate::functions::{
        archive, deploy, invoke_id, is_root, request_id, rpc, spec, wait_workers, CONFIG,
    };
    use crate::harness::TestCluster;
    use crate::require_root;

    /// A file outside every root holding a JSON line a deployer must never get back.
    fn outside_secret(cluster: &TestCluster) -> PathBuf {
        let path = cluster.dir.path().join("outside.jsonl");
        std::fs::write(&path, "{\"secret\":\"outside the root\"}\n").expect("write outside file");
        path
    }

    fn text(p: &Path) -> String {
        p.to_str().expect("utf-8 path").to_string()
    }

    async fn start_err(cluster: &TestCluster, source: StreamSource) -> String {
        let started = tokio::time::timeout(
            Duration::from_secs(20),
            cluster
                .client()
                .stream_start("f", source.clone(), StreamOptions::default()),
        )
        .await
        .unwrap_or_else(|_| panic!("starting {} hung (a FIFO or device opened?)", source.spec()));
        match started {
            Err(e) => e.to_string(),
            Ok(id) => panic!("{} was started as stream {id}", source.spec()),
        }
    }

    async fn deploy_f(cluster: &TestCluster) {
        let c = rpc(cluster, 1).await;
        deploy(
            &c,
            spec("f", &["/bin/sh", "main.sh"], FnMode::Exec),
            &archive(&[("main.sh", 0o755, "cat\n")]),
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn stream_sources_outside_the_operators_roots_are_refused_before_anything_is_stored() {
        let cluster = TestCluster::start(1, "").await;
        deploy_f(&cluster).await;
        let root = cluster.sources_dir();
        let outside = outside_secret(&cluster);
        let jsonl = |p: &Path| StreamSource::Jsonl { path: text(p) };

        // Absolute paths outside the root: the host's files as root.
        let e = start_err(
            &cluster,
            StreamSource::Dir {
                path: "/root".into(),
            },
        )
        .await;
        assert!(e.contains("outside this node's sources roots"), "{e}");
        let e = start_err(
            &cluster,
            StreamSource::Jsonl {
                path: "/etc/shadow".into(),
            },
        )
        .await;
        assert!(e.contains("outside this node's sources roots"), "{e}");
        let e = start_err(
            &cluster,
            StreamSource::Csv {
                path: "/etc/passwd".into(),
            },
        )
        .await;
        assert!(e.contains("outside this node's sources roots"), "{e}");
        let e = start_err(&cluster, jsonl(&outside)).await;
        assert!(e.contains("outside this node's sources roots"), "{e}");
        // `..` inside a root.
        let dotdot = format!("{}/../outside.jsonl", text(&root));
        let e = start_err(&cluster, StreamSource::Jsonl { path: dotdot }).await;
        assert!(e.contains("`..` is not allowed"), "{e}");

        // Symlinks inside the root leading out: absolute, relative, into /proc.
        symlink(&outside, root.join("abs.jsonl")).expect("symlink");
        symlink("../outside.jsonl", root.join("rel.jsonl")).expect("symlink");
        symlink("/proc/self/environ", root.join("environ")).expect("symlink");
        let climb = format!(
            "{}proc/self/environ",
            "../".repeat(root.components().count())
        );
        symlink(&climb, root.join("environ-rel")).expect("symlink");
        symlink("/", root.join("slash")).expect("symlink");
        for name in ["abs.jsonl", "rel.jsonl", "environ", "environ-rel"] {
            let e = start_err(&cluster, jsonl(&root.join(name))).await;
            assert!(e.contains("leads out of the sources root"), "{name}: {e}");
        }
        let e = start_err(
            &cluster,
            StreamSource::Dir {
                path: text(&root.join("slash")),
            },
        )
        .await;
        assert!(e.contains("leads out of the sources root"), "{e}");
        let through = format!("{}/slash/etc/passwd", text(&root));
        let e = start_err(&cluster, StreamSource::Csv { path: through }).await;
        assert!(e.contains("leads out of the sources root"), "{e}");

        // Special files inside the root: refused by type, never opened (a FIFO opened for
        // reading would hang the start; the device has /dev/null's numbers).
        let fifo = root.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644))
            .expect("mkfifo");
        let e = start_err(&cluster, jsonl(&fifo)).await;
        assert!(e.contains("is a FIFO, not a regular file"), "{e}");
        let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).expect("bind");
        let e = start_err(&cluster, jsonl(&root.join("sock"))).await;
        assert!(e.contains("is a socket, not a regular file"), "{e}");
        let dev = root.join("null");
        nix::sys::stat::mknod(
            &dev,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .expect("mknod (the tests run as root)");
        let e = start_err(&cluster, jsonl(&dev)).await;
        assert!(
            e.contains("is a character device, not a regular file"),
            "{e}"
        );
        let e = start_err(
            &cluster,
            StreamSource::Dir {
                path: text(&root.join("sock")),
            },
        )
        .await;
        assert!(e.contains("not a directory"), "{e}");

        let client = cluster.client();
        assert!(
            client.streams().await.expect("list").is_empty(),
            "nothing was started"
        );

        // Inside the root: a file, a symlink that stays inside, and a hard link to a file
        // elsewhere on the same filesystem, which a root's writer made (the operator's own).
        std::fs::write(root.join("ok.jsonl"), "{\"i\":1}\n").expect("write");
        symlink("ok.jsonl", root.join("alias.jsonl")).expect("symlink");
        std::fs::hard_link(&outside, root.join("hard.jsonl")).expect("hard link");
        for name in ["ok.jsonl", "alias.jsonl", "hard.jsonl"] {
            client
                .stream_start("f", jsonl(&root.join(name)), StreamOptions::default())
                .await
                .unwrap_or_else(|e| panic!("{name} is inside the root: {e}"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_node_without_sources_roots_reads_no_file_and_says_how_to_open_one() {
        let cluster = TestCluster::start(1, "[sources]\nroots = []\n").await;
        deploy_f(&cluster).await;
        let file = cluster.dir.path().join("items.jsonl");
        std::fs::write(&file, "{\"i\":1}\n").expect("write");
        let e = start_err(&cluster, StreamSource::Jsonl { path: text(&file) }).await;
        assert!(
            e.contains("reads no files for callers") && e.contains("[sources] roots"),
            "{e}"
        );
        // Key-value sources need no root.
        cluster
            .client()
            .stream_start(
                "f",
                StreamSource::Kv {
                    prefix: "in/".into(),
                    follow: false,
                },
                StreamOptions::default(),
            )
            .await
            .expect("a kv source");
    }

    /// The driver opens the source again at every read, beneath the roots of the node reading
    /// it: a source swapped for a symlink out of the root after the start yields nothing more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_source_swapped_for_a_symlink_after_the_start_is_not_read() {
        require_root!();
        let cluster = TestCluster::start(1, CONFIG).await;
        let c = rpc(&cluster, 1).await;
        let slow = FunctionSpec {
            max_concurrency: 1,
            ..spec("slow", &["/bin/sh", "main.sh"], FnMode::Exec)
        };
        deploy(&c, slow, &archive(&[("main.sh", 0o755, "sleep 3\ncat\n")])).await;
        wait_workers(&c, 1).await;
        let root = cluster.sources_dir();
        let outside = cluster.dir.path().join("outside.jsonl");
        std::fs::write(&outside, "{\"secret\":1}\n".repeat(20)).expect("write");
        let source = root.join("items.jsonl");
        std::fs::write(&source, "{\"i\":0}\n{\"i\":1}\n{\"i\":2}\n").expect("write");
        let client = cluster.client();
        let options = StreamOptions {
            max_concurrency: 1,
            batch: 1,
            results_prefix: Some("swap/".into()),
            ..StreamOptions::default()
        };
        let id = client
            .stream_start(
                "slow",
                StreamSource::Jsonl {
                    path: text(&source),
                },
                options,
            )
            .await
            .expect("start");
        // The driver has read the first item (it runs 3 s, and nothing more is read meanwhile).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let job = client.stream(id).await.expect("read").expect("job");
            if job.counters.enqueued >= 1 {
                break;
            }
            assert!(Instant::now() < deadline, "the first item: {job:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::remove_file(&source).expect("remove");
        symlink(&outside, &source).expect("symlink");
        // Every later read of the source is refused.
        loop {
            let job = client.stream(id).await.expect("read").expect("job");
            if job.counters.succeeded >= 1
                && cluster.log_of(1).contains("leads out of the sources root")
            {
                break;
            }
            assert!(Instant::now() < deadline, "the swapped source: {job:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let job = client.stream(id).await.expect("read").expect("job");
        assert_eq!(job.state, StreamState::Running, "{job:?}");
        assert_eq!(job.counters.enqueued, 1, "read after the swap: {job:?}");
        for e in client.list_all("swap/", 100).await.expect("list") {
            assert!(
                !String::from_utf8_lossy(&e.value).contains("secret"),
                "{e:?}"
            );
        }
        client.stream_cancel(id).await.expect("cancel");
    }

    /// A `dir:` source lists only regular files: symlinked entries (in or out of the root),
    /// subdirectories, FIFOs and sockets are skipped, never opened.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_dir_source_skips_symlinked_and_special_entries() {
        require_root!();
        let cluster = TestCluster::start(1, CONFIG).await;
        let c = rpc(&cluster, 1).await;
        let echo = "printf '%s' \"$(cat)\"\n";
        deploy(
            &c,
            spec("echo", &["/bin/sh", "main.sh"], FnMode::Exec),
            &archive(&[("main.sh", 0o755, echo)]),
        )
        .await;
        wait_workers(&c, 1).await;
        let root = cluster.sources_dir();
        let outside = outside_secret(&cluster);
        let d = root.join("d");
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("a"), "inside").expect("write");
        symlink(&outside, d.join("b-abs")).expect("symlink");
        symlink("../../outside.jsonl", d.join("c-rel")).expect("symlink");
        symlink("a", d.join("d-inside")).expect("symlink");
        symlink("/proc/self/environ", d.join("e-proc")).expect("symlink");
        nix::unistd::mkfifo(
            &d.join("f-fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        let _sock = std::os::unix::net::UnixListener::bind(d.join("g-sock")).expect("bind");
        std::fs::create_dir(d.join("h-sub")).expect("mkdir");
        let client = cluster.client();
        let id = client
            .stream_start(
                "echo",
                StreamSource::Dir { path: text(&d) },
                StreamOptions {
                    results_prefix: Some("dir/".into()),
                    ..StreamOptions::default()
                },
            )
            .await
            .expect("start");
        let deadline = Instant::now() + Duration::from_secs(30);
        let job = loop {
            let job = client.stream(id).await.expect("read").expect("job");
            if job.state.is_finished() {
                break job;
            }
            assert!(Instant::now() < deadline, "{job:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(job.state, StreamState::Succeeded, "{job:?}");
        assert_eq!(
            job.counters.total,
            Some(1),
            "only the regular file: {job:?}"
        );
        let results = client.list_all("dir/", 10).await.expect("list");
        assert_eq!(results.len(), 1);
        let item = String::from_utf8_lossy(&results[0].value).into_owned();
        assert!(
            item.contains("\"path\":\"a\"") && item.contains("inside"),
            "{item}"
        );
    }

    fn idempotent(name: &str, files: &[&Path]) -> FunctionSpec {
        FunctionSpec {
            idempotency: Some(Idempotency {
                dependencies: files.iter().map(|p| Dependency::File(text(p))).collect(),
                ttl_ms: 600_000,
                cache_failures: false,
                track_reads: false,
            }),
            ..spec(name, &["/bin/sh", "main.sh"], FnMode::Exec)
        }
    }

    /// Sends a deploy and returns the node's refusal.
    async fn deploy_refused(cluster: &TestCluster, s: FunctionSpec) -> String {
        let c = rpc(cluster, 1).await;
        let code = archive(&[("main.sh", 0o755, "cat\n")]);
        let digest = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&code))
        };
        crate::functions::write(
            &c,
            Command::CodeChunk {
                digest: digest.clone(),
                total_bytes: code.len() as u64,
                index: 0,
                bytes: code.clone(),
            },
        )
        .await;
        let spec = FunctionSpec {
            code_digest: digest,
            ..s
        };
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            c.write(
                crate::functions::ctx(15),
                vec![skiff_client::api::ClientCommand {
                    request_id: request_id(),
                    command: Command::FnDeploy {
                        spec: Box::new(spec),
                    },
                }]
                .into(),
            ),
        )
        .await
        .expect("the deploy hung (a FIFO or device opened?)")
        .expect("rpc");
        match r {
            Err(e) => e.to_string(),
            Ok(results) => panic!("deployed: {results:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn file_dependencies_outside_the_roots_or_not_regular_are_refused_at_deploy() {
        let cluster = TestCluster::start(1, "").await;
        let root = cluster.sources_dir();
        let outside = outside_secret(&cluster);
        let e = deploy_refused(&cluster, idempotent("shadow", &[Path::new("/etc/shadow")])).await;
        assert!(e.contains("outside this node's sources roots"), "{e}");
        let e = deploy_refused(&cluster, idempotent("outside", &[&outside])).await;
        assert!(e.contains("outside this node's sources roots"), "{e}");
        symlink(&outside, root.join("link")).expect("symlink");
        let e = deploy_refused(&cluster, idempotent("link", &[&root.join("link")])).await;
        assert!(e.contains("leads out of the sources root"), "{e}");
        // A FIFO: opening it to hash it would block the node's hashing thread for good.
        let fifo = root.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644))
            .expect("mkfifo");
        let e = deploy_refused(&cluster, idempotent("fifo", &[&fifo])).await;
        assert!(e.contains("is a FIFO, not a regular file"), "{e}");
        let dev = root.join("null");
        nix::sys::stat::mknod(
            &dev,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .expect("mknod (the tests run as root)");
        let e = deploy_refused(&cluster, idempotent("dev", &[&dev])).await;
        assert!(
            e.contains("is a character device, not a regular file"),
            "{e}"
        );
        let client = cluster.client();
        for name in ["shadow", "outside", "link", "fifo", "dev"] {
            let f = client.function(name).await;
            assert!(
                !matches!(f, Ok(Some(_))),
                "function {name} was stored: {f:?}"
            );
        }
    }

    /// A dependency that was a regular file in the root at deploy and was later swapped for a
    /// symlink out of it is refused at every invocation, before anything is hashed or submitted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_file_dependency_swapped_out_of_the_root_fails_the_invocation() {
        let cluster = TestCluster::start(1, "").await;
        let root = cluster.sources_dir();
        let model = root.join("model.bin");
        std::fs::write(&model, b"weights").expect("write");
        let c = rpc(&cluster, 1).await;
        deploy(
            &c,
            idempotent("model", &[&model]),
            &archive(&[("main.sh", 0o755, "cat\n")]),
        )
        .await;
        std::fs::remove_file(&model).expect("remove");
        symlink("/etc/shadow", &model).expect("symlink");
        let e = invoke_id(&c, request_id(), "model", b"", false)
            .await
            .expect_err("refused");
        match e {
            ApiError::FailedPrecondition(m) => {
                assert!(m.contains("leads out of the sources root"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        let tasks = cluster
            .client()
            .tasks(Default::default(), 0, 100)
            .await
            .expect("list tasks");
        assert!(tasks.is_empty(), "nothing was submitted: {tasks:?}");
    }

    fn cli_spec(args: &[&str]) -> FunctionSpec {
        let cli =
            Cli::try_parse_from(["skiff", "fn", "deploy"].iter().chain(args)).expect("parses");
        match cli.command {
            Cmd::Function(FnCmd::Deploy(a)) => deploy_plan(*a).expect("a valid plan").spec,
            other => panic!("not a deploy: {other:?}"),
        }
    }

    /// `skiff fn deploy NAME --code C --entry E --tier T` with every other flag left out deploys
    /// at every tier (a default limit never exceeds the tier's ceiling); a limit given above the
    /// ceiling is refused, by the node too, saying what to give.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn default_deploy_flags_deploy_at_every_tier_and_an_explicit_limit_above_it_is_refused() {
        let cluster = TestCluster::start(1, "").await;
        let c = rpc(&cluster, 1).await;
        let code = archive(&[("main.sh", 0o755, "cat\n")]);
        for tier in ["untrusted", "standard", "trusted"] {
            let name = format!("d-{tier}");
            let s = cli_spec(&[
                &name,
                "--code",
                ".",
                "--entry",
                "sh main.sh",
                "--tier",
                tier,
            ]);
            assert_eq!(deploy(&c, s, &code).await, 1, "{tier}");
        }
        let f = cluster
            .client()
            .function("d-untrusted")
            .await
            .expect("read")
            .expect("deployed");
        let latest = f.versions.last().expect("a version");
        assert_eq!(latest.spec.timeout_ms, 10_000, "the untrusted ceiling");

        let mut s = cli_spec(&[
            "x",
            "--code",
            ".",
            "--entry",
            "sh main.sh",
            "--tier",
            "untrusted",
        ]);
        s.timeout_ms = 30_000;
        let e = deploy_refused(&cluster, s.clone()).await;
        assert!(
            e.contains("timeout 30 s is above the 10 s ceiling of tier untrusted"),
            "{e}"
        );
        s.timeout_ms = 10_000;
        s.memory_bytes = 300 << 20;
        let e = deploy_refused(&cluster, s).await;
        assert!(
            e.contains("memory 300 MiB is above the 256 MiB ceiling of tier untrusted"),
            "{e}"
        );
        // The command line refuses it before uploading anything.
        let cli = Cli::try_parse_from([
            "skiff",
            "fn",
            "deploy",
            "x",
            "--code",
            ".",
            "--entry",
            "sh main.sh",
            "--tier",
            "untrusted",
            "--timeout",
            "30s",
        ])
        .expect("parses");
        let Cmd::Function(FnCmd::Deploy(a)) = cli.command else {
            panic!("not a deploy")
        };
        let e = deploy_plan(*a).expect_err("above the ceiling").message;
        assert!(e.contains("above the 10 s ceiling"), "{e}");
    }
}

mod code {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use skiff_client::api::{DataGrant, FnMode, FunctionSpec, Role, Task, TaskState};
    use skiff_client::{Client, ClientError};

    use crate::functions::{archive, is_root, spec, CONFIG};
    use crate::harness::TestCluster;
    use crate::require_root;

    /// One raw tar entry, its path written into the header as it is: what `tar::Builder` (and
    /// the `skiff` command line) refuse to make.
    struct Raw<'a> {
        path: &'a str,
        kind: tar::EntryType,
        data: &'a [u8],
        link: Option<&'a str>,
        mode: u32,
    }

    fn raw_file<'a>(path: &'a str, data: &'a [u8]) -> Raw<'a> {
        Raw {
            path,
            kind: tar::EntryType::Regular,
            data,
            link: None,
            mode: 0o755,
        }
    }

    fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in entries {
            let mut h = tar::Header::new_old();
            {
                let old = h.as_old_mut();
                old.name[..e.path.len()].copy_from_slice(e.path.as_bytes());
                if let Some(l) = e.link {
                    old.linkname[..l.len()].copy_from_slice(l.as_bytes());
                }
            }
            h.set_entry_type(e.kind);
            h.set_size(e.data.len() as u64);
            h.set_mode(e.mode);
            h.set_mtime(0);
            if matches!(e.kind, tar::EntryType::Char) {
                let _ = h.set_device_major(1);
                let _ = h.set_device_minor(3);
            }
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(e.data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    fn mode_and_content(path: &Path) -> (u32, Vec<u8>) {
        let meta = std::fs::symlink_metadata(path).expect("stat the host file");
        (
            meta.permissions().mode() & 0o7777,
            std::fs::read(path).expect("read the host file"),
        )
    }

    /// A deployer's client and the admin's.
    async fn deployer(cluster: &TestCluster) -> Client {
        let made = cluster
            .client()
            .token_create(Role::Deployer, Some("deployer".into()))
            .await
            .expect("make a deployer token");
        cluster.client_with(&cluster.ids(), Some(made.secret))
    }

    async fn invoke_sync(c: &Client, name: &str, payload: &[u8]) -> Task {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match c.invoke(name, None, payload.to_vec(), true).await {
                Ok(t) => return t,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("invoke {name}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("invoke {name}: {e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_code_archive_never_changes_a_host_file() {
        require_root!();
        let cluster = TestCluster::start(3, CONFIG).await;
        let as_deployer = deployer(&cluster).await;
        let host = tempfile::tempdir().expect("tempdir");
        let victim = host.path().join("victim");
        std::fs::write(&victim, b"host secret\n").expect("write");
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let before = mode_and_content(&victim);
        let abs = victim.to_str().expect("utf-8 path").to_string();
        let dir = host.path().to_str().expect("utf-8 path").to_string();
        // Deep enough to climb out of any code cache directory to `/`.
        let climb = format!("{}{}", "../".repeat(16), abs.trim_start_matches('/'));
        let main = raw_file("main.sh", b"echo ran\n");
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "absolute",
                raw_tar(&[main.clone_entry(), raw_file(&abs, b"pwned\n")]),
                "absolute path",
            ),
            (
                "dotdot",
                raw_tar(&[main.clone_entry(), raw_file(&climb, b"pwned\n")]),
                "..",
            ),
            (
                "symlink",
                raw_tar(&[
                    main.clone_entry(),
                    Raw {
                        kind: tar::EntryType::Symlink,
                        link: Some(&dir),
                        ..raw_file("out", b"")
                    },
                    raw_file("out/victim", b"pwned\n"),
                ]),
                "not a regular file",
            ),
            (
                "hardlink",
                raw_tar(&[
                    main.clone_entry(),
                    Raw {
                        kind: tar::EntryType::Link,
                        link: Some("/etc/shadow"),
                        ..raw_file("shadow", b"")
                    },
                ]),
                "not a regular file",
            ),
            (
                "hardlink-victim",
                raw_tar(&[
                    main.clone_entry(),
                    Raw {
                        kind: tar::EntryType::Link,
                        link: Some(&abs),
                        ..raw_file("v", b"")
                    },
                ]),
                "not a regular file",
            ),
            (
                "chardev",
                raw_tar(&[
                    main.clone_entry(),
                    Raw {
                        kind: tar::EntryType::Char,
                        ..raw_file("null", b"")
                    },
                ]),
                "not a regular file",
            ),
            (
                "duplicate",
                raw_tar(&[main.clone_entry(), raw_file("main.sh", b"echo other\n")]),
                "appears twice",
            ),
        ];
        let shadow_before = std::fs::symlink_metadata("/etc/shadow")
            .ok()
            .map(|m| m.permissions().mode());
        for (name, code, reason) in cases {
            // The library uploads what it is given: the checks the command line makes before an
            // upload are not what protects the node.
            let digest = as_deployer
                .upload_code(&code, |_, _| {})
                .await
                .expect("upload");
            let fname = format!("evil-{name}");
            let deployed = as_deployer
                .deploy(FunctionSpec {
                    code_digest: digest,
                    ..spec(&fname, &["/bin/sh", "main.sh"], FnMode::Exec)
                })
                .await;
            match deployed {
                Err(e) => {
                    // Refused by the node that received the deploy, naming the entry's fault.
                    let text = e.to_string();
                    assert!(text.contains(reason), "{name}: {reason:?} not in {text:?}");
                }
                Ok(_) => {
                    // That node did not hold the archive yet: the unpack refuses it instead.
                    let task = invoke_sync(&as_deployer, &fname, b"").await;
                    assert_eq!(task.state, TaskState::Failed, "{name}: {task:?}");
                    let error = task.result.and_then(|r| r.error).unwrap_or_default();
                    assert!(
                        error.contains("refused code archive") && error.contains(reason),
                        "{name}: {reason:?} not in {error:?}"
                    );
                }
            }
            assert_eq!(
                mode_and_content(&victim),
                before,
                "{name}: the host file changed"
            );
        }
        let shadow_after = std::fs::symlink_metadata("/etc/shadow")
            .ok()
            .map(|m| m.permissions().mode());
        assert_eq!(shadow_before, shadow_after, "/etc/shadow changed mode");
    }

    impl Raw<'_> {
        fn clone_entry(&self) -> Raw<'_> {
            Raw {
                path: self.path,
                kind: self.kind,
                data: self.data,
                link: self.link,
                mode: self.mode,
            }
        }
    }

    /// The runs of `name` until one has run on every node, at most `runs`.
    async fn runs_on_every_node(c: &Client, name: &str, runs: usize) -> Vec<Task> {
        let mut out = Vec::new();
        let mut nodes = std::collections::BTreeSet::new();
        for i in 0..runs {
            let t = invoke_sync(c, name, format!("{i}").as_bytes()).await;
            if let Some(r) = &t.result {
                nodes.insert(r.node);
            }
            out.push(t);
            if nodes.len() == 3 && out.len() >= 6 {
                break;
            }
        }
        out
    }

    /// Waits until every node reports an idle warm sandbox of `name` version 1.
    async fn warm_everywhere(c: &Client, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let w = c.workers().await.expect("workers");
            if w.nodes.len() == 3 && w.nodes.iter().all(|n| n.warm_idle(name, 1) > 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no warm sandbox of {name} on every node: {:?}",
                w.nodes
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn output(t: &Task) -> String {
        let r = t.result.as_ref().expect("a finished task has a result");
        assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
        String::from_utf8_lossy(&r.output).into_owned()
    }

    /// An admin's function with a secret, warm on every node; the deployer removes it and makes
    /// a function of the same name that prints its environment. No run of the new function may
    /// happen in the old sandboxes.
    async fn made_again_after_removal(tier: &str, entry: &[&str], code: Vec<u8>) {
        let cluster = TestCluster::start(3, CONFIG).await;
        let admin = cluster.client();
        let as_deployer = deployer(&cluster).await;
        let secret = format!("admin-secret-{}", rand::random::<u64>());
        let digest = admin.upload_code(&code, |_, _| {}).await.expect("upload");
        admin
            .deploy(FunctionSpec {
                code_digest: digest.clone(),
                tier: tier.into(),
                env: vec![("SECRET".into(), secret.clone())],
                min_warm: 3,
                ..spec("report", entry, FnMode::Exec)
            })
            .await
            .expect("admin deploys");
        for t in runs_on_every_node(&admin, "report", 9).await {
            assert!(!output(&t).is_empty());
        }
        warm_everywhere(&admin, "report").await;

        as_deployer
            .remove_function("report")
            .await
            .expect("the deployer removes it");
        let digest = as_deployer
            .upload_code(&code, |_, _| {})
            .await
            .expect("upload");
        let version = as_deployer
            .deploy(FunctionSpec {
                code_digest: digest,
                env: vec![("SECRET".into(), "mine".into())],
                ..spec("report", &["/usr/bin/env"], FnMode::Exec)
            })
            .await
            .expect("the deployer deploys the same name");
        assert_eq!(version, 1, "versions count from 1 again");
        let runs = runs_on_every_node(&as_deployer, "report", 12).await;
        assert!(
            !runs[0].result.as_ref().expect("result").warm,
            "the first run of the new function is cold: {:?}",
            runs[0]
        );
        for t in &runs {
            let out = output(t);
            assert!(
                !out.contains(&secret),
                "the new function saw the old function's secret (warm: {:?}): {out}",
                t.result.as_ref().map(|r| r.warm)
            );
            assert!(out.contains("SECRET=mine"), "{out}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_function_made_again_after_removal_never_runs_in_the_old_trusted_sandbox() {
        require_root!();
        let code = archive(&[("main.sh", 0o755, "echo \"secret is $SECRET\"\n")]);
        made_again_after_removal("trusted", &["/bin/sh", "main.sh"], code).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_function_made_again_with_the_same_tier_and_entry_never_sees_the_old_env() {
        require_root!();
        let code = archive(&[("main.sh", 0o755, "echo unused\n")]);
        made_again_after_removal("standard", &["/usr/bin/env"], code).await;
    }

    /// Every path under `root` (depth first), for finding what a node left behind.
    fn all_paths(root: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            let Ok(read) = std::fs::read_dir(&dir) else {
                continue;
            };
            for item in read.flatten() {
                let p = item.path();
                if item.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(p.clone());
                }
                out.push(p);
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removing_a_function_releases_its_code_and_data_sockets_on_every_node() {
        require_root!();
        // The nodes' code cache (and the socket directory next to it) in a directory of this test.
        let base = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let code_dir = base.path().join("code");
        let config = format!(
            "{CONFIG}code_cache_dir = {:?}\n",
            code_dir.to_str().expect("utf-8")
        );
        let cluster = TestCluster::start(3, &config).await;
        let as_deployer = deployer(&cluster).await;
        // Content of this test only, so its digest is too.
        let marker = rand::random::<u64>();
        let code = archive(&[("main.sh", 0o755, &format!("echo {marker}\n"))]);
        let digest = as_deployer
            .upload_code(&code, |_, _| {})
            .await
            .expect("upload");
        as_deployer
            .deploy(FunctionSpec {
                code_digest: digest.clone(),
                data: DataGrant {
                    read_prefixes: vec!["in/".into()],
                    write_prefixes: vec![],
                },
                ..spec("held", &["/bin/sh", "main.sh"], FnMode::Exec)
            })
            .await
            .expect("deploy");
        runs_on_every_node(&as_deployer, "held", 12).await;
        let left = || {
            all_paths(base.path())
                .into_iter()
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name == digest || (name.starts_with("held-") && name.ends_with(".sock"))
                })
                .collect::<Vec<_>>()
        };
        let held = left();
        assert!(
            held.iter().any(|p| p.ends_with(&digest)),
            "the code is unpacked: {held:?}"
        );
        assert!(
            held.iter()
                .any(|p| p.extension().is_some_and(|e| e == "sock")),
            "a data socket is bound: {held:?}"
        );
        as_deployer.remove_function("held").await.expect("remove");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = left();
            if now.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still there 20 s after the removal: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let e = as_deployer
            .invoke("held", None, Vec::new(), true)
            .await
            .expect_err("removed");
        assert!(
            matches!(
                e,
                ClientError::Rejected { .. } | ClientError::FunctionNotFound { .. }
            ) || e.to_string().contains("held"),
            "{e}"
        );
    }
}
