//! A stranger on the network: no token, no client certificate, or only the ability to open TCP
//! connections to a node's port.
//!
//! Every test client comes from loopback; a stranger "from another machine" is a socket bound
//! to another address of 127.0.0.0/8 (127.0.0.2, 127.0.0.3), which Linux routes to loopback.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use skiff_client::api::{ApiError, ClientApiClient, NodeId, ReadConsistency, TaskState};
use skiff_client::tls::TlsConnector;
use skiff_client::transport::{self, Conn, Service};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::functions::{archive, ctx, deploy, invoke, is_root, rpc, scrape, spec, CONFIG};
use crate::harness::TestCluster;
use crate::tls::rejected;

/// Listeners on loopback that accept TCP connections and never answer a byte.
struct BlackHoles {
    addrs: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl BlackHoles {
    async fn new(n: usize) -> BlackHoles {
        let mut holes = BlackHoles {
            addrs: Vec::new(),
            tasks: Vec::new(),
        };
        for _ in 0..n {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind a black hole");
            holes
                .addrs
                .push(l.local_addr().expect("local addr").to_string());
            holes.tasks.push(tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((s, _)) = l.accept().await {
                    held.push(s);
                }
            }));
        }
        holes
    }
}

impl Drop for BlackHoles {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A TCP connection to `addr` from the loopback address `source` (e.g. "127.0.0.2").
async fn tcp_from(source: &str, addr: &str) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{source}:0").parse().expect("source address"))?;
    socket
        .connect(addr.parse().expect("node address is ip:port"))
        .await
}

/// A client connection from `source`, through TLS, the service byte and the token handshake.
async fn client_conn_from(
    source: &str,
    addr: &str,
    tls: &TlsConnector,
    token: Option<&str>,
) -> std::io::Result<Conn> {
    let tcp = tcp_from(source, addr).await?;
    let mut conn = tls.connect("127.0.0.1", tcp).await?;
    conn.write_all(&[Service::Client.preamble()]).await?;
    transport::write_token(&mut conn, token).await?;
    conn.flush().await?;
    Ok(conn)
}

fn rpc_over(conn: Conn) -> ClientApiClient {
    let t = transport::framed(conn, skiff_client::api::CLIENT_FRAME_BYTES_MAX);
    ClientApiClient::new(tarpc::client::Config::default(), t).spawn()
}

/// A tokenless RPC connection to `addr`, dialed again until the node is up.
async fn stranger(addr: &str, tls: &TlsConnector) -> ClientApiClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match transport::dial_client(addr, None, Some(tls)).await {
            Ok(conn) => return rpc_over(conn),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot reach {addr}: {e}"),
        }
    }
}

/// Whether the other side closes `s` (end of stream or an error) within `within`.
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// `members`: the node `id` at `addr`, and every other id up to `n` at a black hole.
fn members_with_holes(id: NodeId, addr: &str, holes: &BlackHoles) -> BTreeMap<NodeId, String> {
    let mut members: BTreeMap<NodeId, String> = BTreeMap::new();
    members.insert(id, addr.to_string());
    // The cluster's own ids come first: a probe must not replace a real peer's connection.
    let mut next = 1;
    for hole in &holes.addrs {
        if next == id {
            next += 1;
        }
        members.insert(next, hole.clone());
        next += 1;
    }
    members
}

async fn timed_put(client: &skiff_client::Client, key: &str) -> Duration {
    let start = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), client.put(key, b"v".to_vec()))
        .await
        .unwrap_or_else(|_| panic!("put {key} did not finish within 20 s"))
        .unwrap_or_else(|e| panic!("put {key}: {e}"));
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tokenless_init_of_an_initialized_node_is_refused_at_once_and_stalls_no_write() {
    let cluster = TestCluster::start(3, "").await;
    let leader = cluster.wait_leader(&cluster.ids()).await;
    // A follower forwards writes to the leader through its peer pool, the pool a probe used.
    let follower = *cluster
        .ids()
        .iter()
        .find(|id| **id != leader)
        .expect("a follower");
    let addr = cluster.node(follower).addr.clone();
    let writer = cluster.client_for(&[follower]);
    for i in 0..3 {
        timed_put(&writer, &format!("warm-{i}")).await;
    }
    let mut baseline = Duration::ZERO;
    for i in 0..5 {
        baseline = baseline.max(timed_put(&writer, &format!("base-{i}")).await);
    }

    let holes = BlackHoles::new(300).await;
    let members = members_with_holes(follower, &addr, &holes);
    // Several strangers at once, each on a connection of its own.
    let mut inits = Vec::new();
    for _ in 0..8 {
        let stranger = stranger(&addr, &cluster.tls()).await;
        let members = members.clone();
        inits.push(tokio::spawn(async move {
            let start = Instant::now();
            let secret = skiff_proto::tokens::new_token_secret();
            let answer = tokio::time::timeout(
                Duration::from_secs(30),
                stranger.cluster_init(ctx(30), members, secret),
            )
            .await;
            (start.elapsed(), answer)
        }));
    }
    // Writes through the same node while the inits run.
    let mut during = Vec::new();
    for i in 0..5 {
        during.push(timed_put(&writer, &format!("during-{i}")).await);
    }
    let bound = (baseline * 20).max(Duration::from_secs(1));
    for (i, t) in during.iter().enumerate() {
        assert!(
            *t < bound,
            "write {i} took {t:?} while strangers sent inits (baseline {baseline:?})"
        );
    }
    for init in inits {
        let (took, answer) = init.await.expect("init task");
        let answer = answer
            .unwrap_or_else(|_| panic!("the init was not answered within 30 s"))
            .expect("rpc");
        assert!(
            matches!(&answer, Err(ApiError::FailedPrecondition(m)) if m.contains("already initialized")),
            "{answer:?}"
        );
        // The refusal comes from the node's own state: no member is dialed, so it is
        // answered well before a single dial's bound (4 s) could expire.
        assert!(
            took < Duration::from_secs(2),
            "an initialized node refused the init only after {took:?}"
        );
    }
    drop(holes);
    // The real peers are still reachable through the pool.
    let status = cluster.status(&[follower]).await;
    assert!(status.nodes.iter().all(|n| n.reachable), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tokenless_init_of_a_fresh_node_is_bounded_in_members_and_time() {
    let mut cluster = TestCluster::start_uninitialized(1, "");
    let addr = cluster.node(1).addr.clone();
    let stranger = stranger(&addr, &cluster.tls()).await;

    // Hundreds of members: refused before anything is dialed.
    let many = BlackHoles::new(300).await;
    let start = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        stranger.cluster_init(
            ctx(30),
            members_with_holes(1, &addr, &many),
            skiff_proto::tokens::new_token_secret(),
        ),
    )
    .await
    .expect("answered within 30 s")
    .expect("rpc");
    assert!(
        matches!(&answer, Err(ApiError::InvalidArgument(m)) if m.contains("at most")),
        "{answer:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    drop(many);

    // As many members as allowed, none of which answers: probed at once, within one bound
    // for all (5 s), not one dial after the other.
    let few = BlackHoles::new(skiff_client::api::INIT_MEMBERS_MAX - 1).await;
    let start = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        stranger.cluster_init(
            ctx(30),
            members_with_holes(1, &addr, &few),
            skiff_proto::tokens::new_token_secret(),
        ),
    )
    .await
    .expect("answered within 30 s")
    .expect("rpc");
    assert!(
        matches!(&answer, Err(ApiError::FailedPrecondition(m)) if m.contains("not reachable")),
        "{answer:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "probing {} silent members took {:?}",
        few.addrs.len(),
        start.elapsed()
    );
    drop(few);

    // Nothing was initialized: the operator's init still works.
    cluster.init().await;
    cluster
        .client()
        .put("after", b"v".to_vec())
        .await
        .expect("write after init");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_silent_connections_are_closed_and_a_long_request_is_not_idle() {
    let config = format!("{CONFIG}[limits]\nclient_idle_timeout_ms = 1000\n");
    let cluster = TestCluster::start(1, &config).await;
    let addr = cluster.node(1).addr.clone();

    // TCP only, no TLS hello: closed by the handshake bound (5 s).
    let mut silent = TcpStream::connect(&addr).await.expect("connect");
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)).await,
        "a connection that never starts its handshake is held"
    );

    // Through the handshake, then no request: closed after the idle timeout.
    let mut idle = client_conn_from("127.0.0.1", &addr, &cluster.tls(), None)
        .await
        .expect("handshake");
    let start = Instant::now();
    assert!(
        closed_within(&mut idle, Duration::from_secs(10)).await,
        "an idle client connection is held"
    );
    assert!(start.elapsed() >= Duration::from_millis(900));
    assert!(rejected(&cluster, 1, "client_idle_timeout").await >= 1.0);

    // The client library reconnects after its idle connection was closed.
    let client = cluster.client();
    client.put("a", b"1".to_vec()).await.expect("first put");
    tokio::time::sleep(Duration::from_secs(3)).await;
    client
        .put("b", b"2".to_vec())
        .await
        .expect("put after idle close");

    if !is_root() {
        eprintln!("skipping the long-request part: sandboxes need root (run the tests as root)");
        return;
    }
    // A sync invocation running three idle timeouts keeps its connection.
    let c = rpc(&cluster, 1).await;
    let code = archive(&[("main.sh", 0o755, "sleep 3\necho done\n")]);
    deploy(
        &c,
        spec(
            "slow",
            &["/bin/sh", "main.sh"],
            skiff_client::api::FnMode::Exec,
        ),
        &code,
    )
    .await;
    let t = invoke(&c, "slow", b"", true).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    // And once it is idle, it is closed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = c.kv_get(ctx(5), "a".into(), ReadConsistency::Local).await;
    assert!(
        after.is_err(),
        "the idle connection still answers: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_connections_from_one_address_leaves_room_for_others() {
    let config = "[limits]\nconnections_max = 24\nconnections_per_address_max = 8\n";
    let cluster = TestCluster::start(1, config).await;
    let addr = cluster.node(1).addr.clone();
    let tls = cluster.tls();
    let refused_before = rejected(&cluster, 1, "connections_per_address_max").await;

    // 40 connections from one address, each through the handshake and then quiet.
    let mut flood = Vec::new();
    let mut refused = 0;
    for _ in 0..40 {
        match client_conn_from("127.0.0.2", &addr, &tls, None).await {
            Ok(mut c) => {
                // A refused connection may finish its handshake before the close arrives.
                if closed_within(&mut c, Duration::from_millis(200)).await {
                    refused += 1;
                } else {
                    flood.push(c);
                }
            }
            Err(_) => refused += 1,
        }
    }
    assert!(
        flood.len() <= 8,
        "{} connections from one address are held",
        flood.len()
    );
    assert_eq!(refused + flood.len(), 40);
    assert!(rejected(&cluster, 1, "connections_per_address_max").await >= refused_before + 32.0);

    // Another address still gets in and is served.
    let other = client_conn_from("127.0.0.3", &addr, &tls, Some(&cluster.token))
        .await
        .expect("a connection from another address");
    let other = rpc_over(other);
    let answer = other
        .kv_get(ctx(5), "k".into(), ReadConsistency::Linearizable)
        .await
        .expect("answered");
    assert!(answer.is_ok(), "{answer:?}");
    cluster
        .client()
        .put("k", b"v".to_vec())
        .await
        .expect("a client from 127.0.0.1 writes");

    // Once the flood goes, its address is served again.
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = client_conn_from("127.0.0.2", &addr, &tls, None).await {
            if !closed_within(&mut c, Duration::from_millis(200)).await {
                break;
            }
        }
        assert!(Instant::now() < deadline, "127.0.0.2 stays refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_idle_connections_to_the_metrics_port_leaves_room_for_a_scrape() {
    let cluster = TestCluster::start(1, "").await;
    let metrics = cluster.node(1).metrics_addr.clone();
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(tcp_from("127.0.0.2", &metrics).await.expect("connect"));
    }
    // Past the per-address bound, connections are closed at once.
    let mut closed = 0;
    let mut held = Vec::new();
    for mut c in flood {
        if closed_within(&mut c, Duration::from_millis(100)).await {
            closed += 1;
        } else {
            held.push(c);
        }
    }
    assert!(
        held.len() <= skiff_node::metrics::CONNECTIONS_PER_ADDRESS_MAX,
        "{} idle metrics connections from one address are held",
        held.len()
    );
    assert_eq!(closed + held.len(), 40);
    // A scraper from elsewhere is answered meanwhile.
    let body = scrape(&metrics).await;
    assert!(body.contains("skiff_raft_term"), "{body}");
    // And the held ones, which never sent a request, are closed by the read bound.
    for mut c in held {
        assert!(
            closed_within(&mut c, Duration::from_secs(10)).await,
            "an idle metrics connection is held past the request bound"
        );
    }
}

mod plaintext {
    //! Without TLS files any process that reaches the port would be served as a peer (votes,
    //! appends, forwarded writes, dispatch of any function version): a node only runs so when the
    //! operator says so explicitly. That a TLS node refuses a peer without a node certificate is
    //! `tls::a_rogue_node_without_a_valid_certificate_cannot_join_vote_or_read`.

    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::harness::free_port;

    /// Starts `skiffd` without TLS files, with `extra` flags and environment; returns the child
    /// and where its output goes.
    fn plaintext_node(
        dir: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (std::process::Child, std::path::PathBuf, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join(format!("node-{}.log", addr.replace([':', '.'], "-")));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_skiffd"))
            .args(["--id", "1", "--listen", &addr])
            .arg("--data-dir")
            .arg(dir.join(format!("data-{}", addr.replace([':', '.'], "-"))))
            .args(extra)
            .envs(env.iter().copied())
            .env("SKIFF_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().expect("clone")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("start skiffd");
        (child, log, addr)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_without_tls_files_starts_only_when_told_it_is_insecure() {
        let dir = tempfile::tempdir().expect("tempdir");

        // Neither TLS files nor the flag: the node refuses to start and says how to fix it.
        let (mut child, log, addr) = plaintext_node(dir.path(), &[], &[]);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "a node without TLS files and without --insecure-plaintext kept running \
                     (serving peers in plaintext at {addr}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(!status.success(), "{text}");
        assert!(
            text.contains("skiffd certs") && text.contains("--insecure-plaintext"),
            "the refusal says how to make certificates or pass the flag: {text}"
        );
        assert!(
            std::net::TcpStream::connect(&addr).is_err(),
            "nothing listens at {addr}"
        );

        // With the flag, or its environment variable: it starts, and says loudly what it means.
        for (flags, env) in [
            (&["--insecure-plaintext"][..], &[][..]),
            (&[][..], &[("SKIFFD_INSECURE_PLAINTEXT", "true")][..]),
        ] {
            let (mut child, log, addr) = plaintext_node(dir.path(), flags, env);
            let deadline = Instant::now() + Duration::from_secs(30);
            let started =
                || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("node started"));
            while std::net::TcpStream::connect(&addr).is_err() || !started() {
                if let Some(status) = child.try_wait().expect("wait") {
                    panic!(
                        "{flags:?} {env:?}: exited ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "{flags:?} {env:?}: not listening"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let text = std::fs::read_to_string(&log).expect("log");
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                text.contains("INSECURE") && text.contains("ANY process"),
                "{flags:?} {env:?}: no warning at start: {text}"
            );
        }

        // The flag with TLS files is a contradiction, refused.
        let (mut child, log, _) = plaintext_node(
            dir.path(),
            &[
                "--insecure-plaintext",
                "--tls-ca",
                "/nonexistent/ca.pem",
                "--tls-cert",
                "/nonexistent/n.pem",
                "--tls-key",
                "/nonexistent/n.key",
            ],
            &[],
        );
        let status = child.wait().expect("wait");
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(
            !status.success() && text.contains("tls.insecure_plaintext"),
            "{text}"
        );
    }
}
