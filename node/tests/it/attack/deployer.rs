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
        ApiError, Command, FnMode, FunctionSpec, Idempotency, StreamOptions, StreamSource, StreamState,
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
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
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
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
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
        let cli = Cli::try_parse_from(["skiff", "fn", "deploy"].iter().chain(args)).expect("parses");
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
