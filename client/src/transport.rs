//! Framing shared by clients and nodes: one TCP port per node carries two services, chosen by
//! the first byte a connection sends ([`Service`]); after it, length-delimited bincode frames
//! with a maximum size on both sides.

use std::net::SocketAddr;
use std::time::Duration;

use tarpc::serde_transport::Transport;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Wraps a byte stream into a bincode tarpc transport whose frames are at most
/// `frame_bytes_max` long in either direction.
pub fn framed<S, Item, SinkItem>(
    io: S,
    frame_bytes_max: usize,
) -> Transport<S, Item, SinkItem, Bincode<Item, SinkItem>>
where
    S: AsyncRead + AsyncWrite,
    Item: for<'de> serde::Deserialize<'de>,
    SinkItem: serde::Serialize,
{
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(frame_bytes_max)
        .new_codec();
    tarpc::serde_transport::new(Framed::new(io, codec), Bincode::default())
}

/// Opens a TCP connection to `addr` and announces `service`.
pub async fn dial(addr: &str, service: Service) -> std::io::Result<TcpStream> {
    let addr = resolve(addr)?;
    let mut stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out after {CONNECT_TIMEOUT:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    stream.write_all(&[service.preamble()]).await?;
    Ok(stream)
}

/// Parses `host:port` into a socket address, with a clear error for anything else.
pub fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    parse_endpoint(addr).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    addr.to_socket_addrs()?.next().ok_or_else(|| {
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

    #[test]
    fn preambles_round_trip() {
        for s in [Service::Client, Service::Peer] {
            assert_eq!(Service::from_preamble(s.preamble()), Some(s));
        }
        assert_eq!(Service::from_preamble(b'X'), None);
    }
}
