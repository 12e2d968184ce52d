//! Fault-injecting TCP proxies: one per ordered link (node A dials node B through the proxy of
//! link A→B), with faults set per direction of data flow.
//!
//! A *flow* (from, to) is the bytes node `from` sends to node `to`, whatever connection carries
//! them: A's requests on link A→B and A's answers on link B→A are both flow (A, B). So a
//! one-way partition "A cannot send to B" is one flow fault, applied by both proxies.
//!
//! Faults ([`LinkFault`]):
//! - blackhole: bytes are held, not delivered; when the fault changes, every connection that
//!   held bytes is cut (a byte stream cannot skip bytes, and delivering a partition's backlog
//!   late would be a different fault);
//! - delay with jitter: each chunk is delivered `base ± jitter` after it was read, in order;
//! - drop: each chunk is lost with a probability; since a stream cannot lose bytes in the
//!   middle, the loss cuts the connection (the sender sees a reset and reconnects);
//! - bandwidth: chunks are released no faster than a byte rate.
//!
//! Invariants: proxies listen on 127.0.0.1 only; every buffer and queue is bounded
//! ([`CHUNK_BYTES_MAX`], [`CHUNKS_QUEUED_MAX`], [`CONNECTIONS_PER_LINK_MAX`]); every task ends
//! on shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use crate::ChaosError;

/// Largest chunk read from a socket at once, in bytes.
pub const CHUNK_BYTES_MAX: usize = 16 * 1024;
/// Most chunks queued for delayed delivery in one direction of one connection.
pub const CHUNKS_QUEUED_MAX: usize = 256;
/// Most connections one link proxy carries at once; more are refused (closed).
pub const CONNECTIONS_PER_LINK_MAX: usize = 64;
/// One warning is logged per this many refused connections.
const REFUSALS_PER_LOG: u64 = 1000;
/// How long the proxy waits to connect to the real node.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A node id as the harness numbers them (1..=n).
pub type NodeId = u64;

/// A fault on one flow of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LinkFault {
    #[default]
    None,
    Blackhole,
    Delay {
        base_ms: u64,
        jitter_ms: u64,
    },
    /// Each chunk is lost (and the connection cut) with probability `per_mille / 1000`.
    Drop {
        per_mille: u32,
    },
    Bandwidth {
        bytes_per_sec: u64,
    },
}

/// The current fault of every flow, with a watch channel per flow so a held connection wakes
/// when its fault changes.
#[derive(Debug, Clone)]
pub struct FaultTable {
    flows: Arc<HashMap<(NodeId, NodeId), watch::Sender<LinkFault>>>,
}

impl FaultTable {
    /// A table of healthy flows between every ordered pair of `nodes`.
    pub fn new(nodes: &[NodeId]) -> FaultTable {
        let mut flows = HashMap::new();
        for &a in nodes {
            for &b in nodes {
                if a != b {
                    flows.insert((a, b), watch::channel(LinkFault::None).0);
                }
            }
        }
        FaultTable {
            flows: Arc::new(flows),
        }
    }

    /// Sets the fault of the flow `from` → `to`. Unknown pairs (a node to itself) are ignored.
    pub fn set(&self, from: NodeId, to: NodeId, fault: LinkFault) {
        if let Some(tx) = self.flows.get(&(from, to)) {
            tx.send_if_modified(|f| {
                let changed = *f != fault;
                *f = fault;
                changed
            });
        }
    }

    /// Sets every flow.
    pub fn set_all(&self, fault: LinkFault) {
        for tx in self.flows.values() {
            tx.send_if_modified(|f| {
                let changed = *f != fault;
                *f = fault;
                changed
            });
        }
    }

    /// Heals every flow.
    pub fn heal(&self) {
        self.set_all(LinkFault::None);
    }

    pub fn get(&self, from: NodeId, to: NodeId) -> LinkFault {
        self.flows
            .get(&(from, to))
            .map_or(LinkFault::None, |tx| *tx.borrow())
    }

    fn watch(&self, from: NodeId, to: NodeId) -> watch::Receiver<LinkFault> {
        self.flows
            .get(&(from, to))
            .map(watch::Sender::subscribe)
            .unwrap_or_else(|| watch::channel(LinkFault::None).1)
    }
}

/// A started proxy of link `from` → `to`.
#[derive(Debug, Clone)]
pub struct LinkProxy {
    pub from: NodeId,
    pub to: NodeId,
    /// Where `from` dials to reach `to`.
    pub listen: SocketAddr,
}

/// Binds the proxy of link `from` → `to` on a free loopback port. Connections are forwarded
/// to `upstream` (the real address of `to`) once [`LinkProxy`] is started with
/// [`spawn_link`]; binding first lets the node configs name the proxy ports.
pub async fn bind_link() -> Result<TcpListener, ChaosError> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|source| ChaosError::Io {
            what: "bind a proxy port on 127.0.0.1".into(),
            source,
        })
}

/// Runs the proxy of link `from` → `to` on `listener` until `shutdown` turns true.
pub fn spawn_link(
    listener: TcpListener,
    from: NodeId,
    to: NodeId,
    upstream: SocketAddr,
    faults: FaultTable,
    seed: u64,
    shutdown: watch::Receiver<bool>,
) -> Result<LinkProxy, ChaosError> {
    let listen = listener.local_addr().map_err(|source| ChaosError::Io {
        what: "read a proxy's address".into(),
        source,
    })?;
    tokio::spawn(accept_loop(
        listener, from, to, upstream, faults, seed, shutdown,
    ));
    Ok(LinkProxy { from, to, listen })
}

async fn accept_loop(
    listener: TcpListener,
    from: NodeId,
    to: NodeId,
    upstream: SocketAddr,
    faults: FaultTable,
    seed: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_PER_LINK_MAX));
    let mut connections: u64 = 0;
    let mut refused: u64 = 0;
    // Ends on shutdown; each iteration handles one accepted connection.
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok((inbound, _)) = accepted else {
            // Accept errors (e.g. out of descriptors) are transient; pause instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            refused += 1;
            // A node redialing a frozen peer hits the limit in bursts: log the first refusal
            // and then one in REFUSALS_PER_LOG.
            if refused % REFUSALS_PER_LOG == 1 {
                tracing::warn!(
                    from,
                    to,
                    refused,
                    "proxy connection limit reached; refusing"
                );
            }
            continue;
        };
        connections += 1;
        let rng_seed = seed ^ (from << 48) ^ (to << 40) ^ connections;
        let faults = faults.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            carry(inbound, from, to, upstream, faults, rng_seed, shutdown).await;
        });
    }
}

/// Carries one connection until either side closes, a fault cuts it, or shutdown.
async fn carry(
    inbound: TcpStream,
    from: NodeId,
    to: NodeId,
    upstream: SocketAddr,
    faults: FaultTable,
    seed: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let connect = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream));
    let Ok(Ok(outbound)) = connect.await else {
        // The node is down (killed) or not answering: the dialer sees its connection closed.
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let forward = pump(in_read, out_write, faults.watch(from, to), seed);
    let backward = pump(
        out_read,
        in_write,
        faults.watch(to, from),
        seed.rotate_left(17),
    );
    tokio::select! {
        _ = forward => {}
        _ = backward => {}
        _ = shutdown.wait_for(|s| *s) => {}
    }
}

/// Moves bytes from `reader` to `writer` under the flow's fault. Returns when the reader
/// closes, a write fails, or a fault cuts the connection.
async fn pump(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<LinkFault>,
    seed: u64,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_QUEUED_MAX);
    let read_side = async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut buf = vec![0u8; CHUNK_BYTES_MAX];
        let mut last_delivery = Instant::now();
        // Ends when the reader closes or fails, or a fault cuts the connection.
        loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let now = Instant::now();
            let current = *fault.borrow_and_update();
            let deliver_at = match current {
                LinkFault::None => now,
                LinkFault::Blackhole => {
                    // Hold the bytes until the fault changes, then cut the connection.
                    let _ = fault.changed().await;
                    return;
                }
                LinkFault::Delay { base_ms, jitter_ms } => {
                    let jitter = rng.gen_range(0..=2 * jitter_ms);
                    let ms = (base_ms + jitter).saturating_sub(jitter_ms);
                    now + Duration::from_millis(ms)
                }
                LinkFault::Drop { per_mille } => {
                    if rng.gen_range(0..1000) < per_mille {
                        return;
                    }
                    now
                }
                LinkFault::Bandwidth { bytes_per_sec } => {
                    let secs = n as f64 / bytes_per_sec.max(1) as f64;
                    last_delivery.max(now) + Duration::from_secs_f64(secs)
                }
            };
            // Delivery keeps the stream's order even when jitter would reorder chunks.
            let deliver_at = deliver_at.max(last_delivery);
            last_delivery = deliver_at;
            if tx.send((deliver_at, buf[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let write_side = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
    };
    // The writer drains what was queued after the reader ends; either failing ends both.
    let mut read_side = std::pin::pin!(read_side);
    let mut write_side = std::pin::pin!(write_side);
    tokio::select! {
        _ = &mut read_side => { write_side.await }
        _ = &mut write_side => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn proxied(faults: &FaultTable) -> (TcpStream, watch::Sender<bool>) {
        let upstream = echo_server().await;
        let (stop, shutdown) = watch::channel(false);
        let l = bind_link().await.expect("bind");
        let p = spawn_link(l, 1, 2, upstream, faults.clone(), 7, shutdown).expect("spawn");
        let s = TcpStream::connect(p.listen)
            .await
            .expect("connect to proxy");
        (s, stop)
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn healthy_link_forwards_both_ways() {
        let faults = FaultTable::new(&[1, 2]);
        let (mut s, _stop) = proxied(&faults).await;
        let got = round_trip(&mut s, b"hello").await.expect("echo");
        assert_eq!(got, b"hello");
    }

    #[tokio::test]
    async fn blackhole_holds_then_cuts_on_heal() {
        let faults = FaultTable::new(&[1, 2]);
        let (mut s, _stop) = proxied(&faults).await;
        assert_eq!(round_trip(&mut s, b"a").await.expect("echo"), b"a");
        faults.set(1, 2, LinkFault::Blackhole);
        s.write_all(b"b").await.expect("write is buffered");
        let mut buf = [0u8; 1];
        let held = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(held.is_err(), "nothing may come back through a blackhole");
        faults.heal();
        let after = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the cut arrives");
        assert!(
            matches!(after, Ok(0) | Err(_)),
            "the held connection is cut: {after:?}"
        );
    }

    #[tokio::test]
    async fn one_way_blackhole_only_affects_its_direction() {
        let faults = FaultTable::new(&[1, 2]);
        // Answers (2 -> 1) are lost; requests still arrive.
        faults.set(2, 1, LinkFault::Blackhole);
        assert_eq!(faults.get(1, 2), LinkFault::None);
        let (mut s, _stop) = proxied(&faults).await;
        s.write_all(b"x").await.expect("write");
        let mut buf = [0u8; 1];
        let held = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        assert!(held.is_err(), "the echo must be held");
    }

    #[tokio::test]
    async fn delay_and_bandwidth_keep_bytes_in_order() {
        let faults = FaultTable::new(&[1, 2]);
        faults.set(
            1,
            2,
            LinkFault::Delay {
                base_ms: 20,
                jitter_ms: 15,
            },
        );
        faults.set(
            2,
            1,
            LinkFault::Bandwidth {
                bytes_per_sec: 1_000_000,
            },
        );
        let (mut s, _stop) = proxied(&faults).await;
        let msg: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let got = round_trip(&mut s, &msg).await.expect("echo");
        assert_eq!(got, msg);
    }

    #[tokio::test]
    async fn certain_drop_cuts_the_connection() {
        let faults = FaultTable::new(&[1, 2]);
        faults.set(1, 2, LinkFault::Drop { per_mille: 1000 });
        let (mut s, _stop) = proxied(&faults).await;
        let r = tokio::time::timeout(Duration::from_secs(5), round_trip(&mut s, b"z"))
            .await
            .expect("the cut arrives");
        assert!(r.is_err(), "a dropped chunk cuts the connection");
    }
}
