//! Input bounds: every refused input is a clear error to the sender and a counted metric on
//! the node that refused it (`skiff_rejected_inputs_total{reason}`).

use std::time::Duration;

use skiff_client::api::{ApiError, ReadConsistency};
use skiff_client::transport::{Conn, Service};
use skiff_client::ClientError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::functions::{ctx, rpc};
use crate::harness::TestCluster;
use crate::tls::rejected;

/// A TLS connection to node 1 that has sent `bytes` after the handshake; waits until the node
/// closes it (it must: each of these inputs ends the connection).
async fn send_raw(cluster: &TestCluster, bytes: &[u8]) {
    let addr = cluster.node(1).addr.clone();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let mut conn: Conn = cluster
        .tls()
        .connect("127.0.0.1", tcp)
        .await
        .expect("handshake");
    conn.write_all(bytes).await.expect("send");
    conn.flush().await.expect("flush");
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut sink)).await;
    assert!(
        closed.is_ok(),
        "the node closes a connection after {bytes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refused_input_is_a_clear_error_and_a_counted_metric() {
    let cluster = TestCluster::start(1, "").await;
    let client = cluster.client();

    // A key over the limit (sent raw: the client library refuses it before sending): a clear
    // error naming the bound, counted as invalid_argument.
    let before = rejected(&cluster, 1, "invalid_argument").await;
    let raw = rpc(&cluster, 1).await;
    let err = raw
        .kv_get(ctx(5), "k".repeat(100_000), ReadConsistency::Linearizable)
        .await
        .expect("answered")
        .expect_err("an oversize key is refused");
    assert!(
        matches!(&err, ApiError::InvalidArgument(m) if m.contains("bytes")),
        "{err}"
    );
    assert_eq!(
        rejected(&cluster, 1, "invalid_argument").await,
        before + 1.0
    );

    // No token.
    let before = rejected(&cluster, 1, "unauthenticated").await;
    let anonymous = cluster.client_with(&[1], None);
    assert!(matches!(
        anonymous.get("k").await,
        Err(ClientError::Api(ApiError::Unauthenticated(_)))
    ));
    assert!(rejected(&cluster, 1, "unauthenticated").await > before);

    // Below the RPC layer: each ends the connection and is counted by kind.
    let client_byte = Service::Client.preamble();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown_service", vec![b'X']),
        // A token length byte over the bound.
        ("bad_token_handshake", vec![client_byte, 255]),
        // No token, then a frame that claims 1 GiB.
        (
            "frame_too_large",
            vec![client_byte, 0, 0x40, 0x00, 0x00, 0x00, 1, 2, 3],
        ),
        // No token, then a 100 KiB frame: more than a connection without an active token may
        // send (a token holder may send up to the client frame limit, below).
        (
            "frame_too_large",
            vec![client_byte, 0, 0x00, 0x01, 0x90, 0x00, 1, 2, 3],
        ),
        // No token, then a 4-byte frame that is no request.
        (
            "undecodable_request",
            vec![client_byte, 0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff],
        ),
    ];
    for (reason, bytes) in cases {
        let before = rejected(&cluster, 1, reason).await;
        send_raw(&cluster, &bytes).await;
        let after = rejected(&cluster, 1, reason).await;
        assert_eq!(after, before + 1.0, "{reason} is counted once");
    }
    // The node still serves, and a token holder sends large frames.
    client
        .put("still", vec![b'u'; 200 * 1024])
        .await
        .expect("a 200 KiB value with a token");
}
