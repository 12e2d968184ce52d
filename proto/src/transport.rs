//! Framing shared by clients and nodes: one TCP port per node carries two services, chosen by
//! the first byte a connection sends ([`Service`]); after it, length-delimited bincode frames
//! with a maximum size on both sides. On a cluster with TLS (the default; see [`crate::tls`])
//! the handshake comes first and everything after it, the service byte included, is
//! encrypted.
//!
//! A client connection says who it is once, right after the service byte: one length byte
//! (0: no token) and that many bytes of bearer token ([`write_token`], [`read_token`]). Once
//! per connection rather than a field on every request, so the RPC types stay as they are,
//! the secret crosses the wire (and is hashed) once per connection instead of once per call,
//! and a request cannot forget it. The node still checks the token on every call against
//! its applied token table, so a revocation also ends connections already open.

use std::net::SocketAddr;
use std::time::Duration;

use crate::tokens::TOKEN_SECRET_BYTES_MAX;
use tarpc::serde_transport::Transport;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

pub use crate::tls::{Conn, TlsAcceptor, TlsConnector};

/// Which service a connection speaks, sent as its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// [`crate::api::ClientApi`].
    Client,
    /// The node-to-node Raft service.
    Peer,
}

impl Service {
    pub fn preamble(self) -> u8 {
        match self {
            Service::Client => b'C',
            Service::Peer => b'P',
        }
    }

    pub fn from_preamble(byte: u8) -> Option<Service> {
        match byte {
            b'C' => Some(Service::Client),
            b'P' => Some(Service::Peer),
            _ => None,
        }
    }
}

/// How long a TCP connect may take before the endpoint counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a whole dial may take: name resolution, connect, TLS handshake and preamble. An
/// endpoint that accepts TCP and never answers costs its caller this much, no more.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(4);
/// How long resolving a host name may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most host name resolutions in progress at once in this process. The system resolver
/// blocks, so each runs on a blocking thread; a resolver that hangs holds these, not the
/// runtime's threads, and further dials by name wait (within their dial time) for a free one.
pub const RESOLVES_IN_FLIGHT_MAX: usize = 8;

/// Wraps a byte stream into a bincode tarpc transport whose frames are at most
/// `frame_bytes_max` long in either direction.
pub fn framed<S, Item, SinkItem>(
    io: S,
    frame_bytes_max: usize,
) -> Transport<S, Item, SinkItem, GuardedBincode<Item, SinkItem>>
where
    S: AsyncRead + AsyncWrite,
    Item: for<'de> serde::Deserialize<'de> + Unpin,
    SinkItem: serde::Serialize + Unpin,
{
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(frame_bytes_max)
        .new_codec();
    tarpc::serde_transport::new(Framed::new(io, codec), GuardedBincode(Bincode::default()))
}

/// The bincode codec, with a decode that panics turned into an error. tarpc's own types can
/// panic while decoding (a request deadline further away than the clock can count overflows
/// the `Instant` it is added to); one such frame must end its connection, not a task of the
/// node, whatever the build's panic strategy.
pub struct GuardedBincode<Item, SinkItem>(Bincode<Item, SinkItem>);

impl<Item, SinkItem> tarpc::tokio_serde::Deserializer<Item> for GuardedBincode<Item, SinkItem>
where
    Item: for<'de> serde::Deserialize<'de> + Unpin,
    SinkItem: Unpin,
{
    type Error = std::io::Error;

    fn deserialize(
        self: std::pin::Pin<&mut Self>,
        src: &tarpc::tokio_util::bytes::BytesMut,
    ) -> Result<Item, Self::Error> {
        let inner = &mut self.get_mut().0;
        quiet_decode_panics();
        DECODING.set(true);
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::pin::Pin::new(inner).deserialize(src)
        }));
        DECODING.set(false);
        decoded.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a frame whose decoding panicked",
            ))
        })
    }
}

std::thread_local! {
    /// Whether this thread is decoding a frame inside [`GuardedBincode`].
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes the panic hook silent for a panic while a frame is decoded (it becomes an error
/// there): otherwise every such frame from a peer would print a message, and, with
/// `RUST_BACKTRACE` set, capture and symbolise a backtrace (about 100 MB of heap and tens of
/// milliseconds here, measured by the fuzz target) — a cheap way to flood a node's log and
/// memory. Every other panic goes to the hook that was in place. Installed once per process.
fn quiet_decode_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !DECODING.get() {
                previous(info);
            }
        }));
    });
}

impl<Item, SinkItem> tarpc::tokio_serde::Serializer<SinkItem> for GuardedBincode<Item, SinkItem>
where
    SinkItem: serde::Serialize + Unpin,
    Item: Unpin,
{
    type Error = std::io::Error;

    fn serialize(
        self: std::pin::Pin<&mut Self>,
        item: &SinkItem,
    ) -> Result<tarpc::tokio_util::bytes::Bytes, Self::Error> {
        std::pin::Pin::new(&mut self.get_mut().0).serialize(item)
    }
}

/// Opens a connection to `addr` (TLS when `tls` is given, checking the node's certificate
/// names the host dialed) and announces `service`, all within [`DIAL_TIMEOUT`].
async fn dial(addr: &str, service: Service, tls: Option<&TlsConnector>) -> std::io::Result<Conn> {
    tokio::time::timeout(DIAL_TIMEOUT, dial_unbounded(addr, service, tls))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("dialing {addr} did not finish within {DIAL_TIMEOUT:?}"),
            )
        })?
}

async fn dial_unbounded(
    addr: &str,
    service: Service,
    tls: Option<&TlsConnector>,
) -> std::io::Result<Conn> {
    let (host, _) = parse_endpoint(addr)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let sock = resolve(addr).await?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(sock))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {sock} timed out after {CONNECT_TIMEOUT:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    let mut conn = match tls {
        Some(tls) => tls.connect(host, stream).await?,
        None => Conn::Plain(stream),
    };
    conn.write_all(&[service.preamble()]).await?;
    conn.flush().await?;
    Ok(conn)
}

// The handshake's length byte must be able to say every allowed length.
const _: () = assert!(TOKEN_SECRET_BYTES_MAX <= u8::MAX as usize);

/// Opens a peer (node-to-node) connection to `addr`, presenting the node's certificate.
pub async fn dial_peer(addr: &str, tls: Option<&TlsConnector>) -> std::io::Result<Conn> {
    dial(addr, Service::Peer, tls).await
}

/// Opens a client connection to `addr` presenting `token` (`None`: no token; the node then
/// answers every call but `cluster_init` with `Unauthenticated`). The token is written only
/// after the TLS handshake when `tls` is given.
pub async fn dial_client(
    addr: &str,
    token: Option<&str>,
    tls: Option<&TlsConnector>,
) -> std::io::Result<Conn> {
    let mut conn = dial(addr, Service::Client, tls).await?;
    write_token(&mut conn, token).await?;
    conn.flush().await?;
    Ok(conn)
}

/// Writes the client handshake that follows the service byte: a length byte, then the token.
pub async fn write_token<W: AsyncWrite + Unpin>(
    w: &mut W,
    token: Option<&str>,
) -> std::io::Result<()> {
    let token = token.unwrap_or("").as_bytes();
    if token.len() > TOKEN_SECRET_BYTES_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a token is at most {TOKEN_SECRET_BYTES_MAX} bytes"),
        ));
    }
    let mut hello = Vec::with_capacity(token.len() + 1);
    hello.push(token.len() as u8);
    hello.extend_from_slice(token);
    w.write_all(&hello).await
}

/// Reads the client handshake: `Ok(None)` when the client presented no token. A token that
/// is not UTF-8 is returned lossily (it matches no token); one over the bound is an error.
pub async fn read_token<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<String>> {
    let len = r.read_u8().await? as usize;
    if len == 0 {
        return Ok(None);
    }
    if len > TOKEN_SECRET_BYTES_MAX {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a token of {len} bytes; the limit is {TOKEN_SECRET_BYTES_MAX}"),
        ));
    }
    let mut token = vec![0; len];
    r.read_exact(&mut token).await?;
    Ok(Some(String::from_utf8_lossy(&token).into_owned()))
}

/// Resolves `host:port` into a socket address, with a clear error for anything else. An IP
/// address is parsed here; a name goes to the system resolver on a blocking thread (never a
/// runtime thread), at most [`RESOLVES_IN_FLIGHT_MAX`] at once and for [`RESOLVE_TIMEOUT`].
pub async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    static RESOLVES: tokio::sync::Semaphore =
        tokio::sync::Semaphore::const_new(RESOLVES_IN_FLIGHT_MAX);
    let (host, port) = parse_endpoint(addr)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let timed_out = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("resolving {addr:?} did not finish within {RESOLVE_TIMEOUT:?}"),
        )
    };
    let deadline = tokio::time::Instant::now() + RESOLVE_TIMEOUT;
    let permit = tokio::time::timeout_at(deadline, RESOLVES.acquire())
        .await
        .map_err(|_| timed_out())?
        .map_err(|_| std::io::Error::other("the resolver limit is closed"))?;
    let name = addr.to_string();
    // The permit goes with the lookup: a lookup given up on still holds it until the
    // resolver returns, so hung lookups cannot pile up blocking threads.
    let lookup = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        std::net::ToSocketAddrs::to_socket_addrs(&name).map(|mut found| found.next())
    });
    let found = tokio::time::timeout_at(deadline, lookup)
        .await
        .map_err(|_| timed_out())?
        .map_err(std::io::Error::other)??;
    found.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("endpoint {addr:?} resolves to no address"),
        )
    })
}

/// Checks that `endpoint` looks like `host:port` with a non-zero numeric port.
pub fn parse_endpoint(endpoint: &str) -> Result<(&str, u16), String> {
    let (host, port) = endpoint
        .rsplit_once(':')
        .ok_or_else(|| format!("endpoint {endpoint:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("endpoint {endpoint:?} has no host"));
    }
    if host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("endpoint {endpoint:?} has an invalid host"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("endpoint {endpoint:?} has an invalid port {port:?}"))?;
    if port == 0 {
        return Err(format!("endpoint {endpoint:?} has port 0"));
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked() {
        assert_eq!(parse_endpoint("127.0.0.1:7001"), Ok(("127.0.0.1", 7001)));
        assert_eq!(parse_endpoint("[::1]:7001"), Ok(("::1", 7001)));
        assert_eq!(parse_endpoint("localhost:80"), Ok(("localhost", 80)));
        for bad in [
            "",
            "127.0.0.1",
            ":7001",
            "127.0.0.1:",
            "127.0.0.1:x",
            "h:0",
            "h:70000",
            "a b:1",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[tokio::test]
    async fn the_token_handshake_round_trips_and_is_bounded() {
        for token in [None, Some("skiff_0123456789abcdef0123456789abcdef")] {
            let mut buf = Vec::new();
            write_token(&mut buf, token).await.expect("write");
            let read = read_token(&mut buf.as_slice()).await.expect("read");
            assert_eq!(read.as_deref(), token);
        }
        let long = "x".repeat(TOKEN_SECRET_BYTES_MAX + 1);
        assert!(write_token(&mut Vec::new(), Some(&long)).await.is_err());
        let mut over = vec![u8::try_from(TOKEN_SECRET_BYTES_MAX + 1).expect("fits a byte")];
        over.extend(long.as_bytes());
        assert!(read_token(&mut over.as_slice()).await.is_err());
        // A cut-off handshake is an error, not a shorter token.
        assert!(read_token(&mut [5u8, b'a'].as_slice()).await.is_err());
    }

    #[tokio::test]
    async fn addresses_are_parsed_and_names_resolved_off_the_runtime() {
        // An IP address never reaches the resolver.
        let a = resolve("127.0.0.1:7001").await.expect("ipv4");
        assert_eq!(a, "127.0.0.1:7001".parse().expect("addr"));
        let a = resolve("[::1]:7001").await.expect("ipv6");
        assert_eq!(a, "[::1]:7001".parse().expect("addr"));
        // A name is resolved on a blocking thread (this runtime has one thread only).
        let a = resolve("localhost:7001").await.expect("localhost");
        assert_eq!(a.port(), 7001);
        assert!(a.ip().is_loopback());
        assert!(resolve("no-port").await.is_err());
    }

    #[test]
    fn preambles_round_trip() {
        for s in [Service::Client, Service::Peer] {
            assert_eq!(Service::from_preamble(s.preamble()), Some(s));
        }
        assert_eq!(Service::from_preamble(b'X'), None);
    }
}
