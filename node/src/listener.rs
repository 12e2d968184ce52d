//! The listener: one port for clients and peers. It admits connections (in total and per
//! source address), makes the TLS handshake, reads the preamble (a service byte, and a
//! client's token) and serves the connection with the client or the peer service.
//!
//! Invariants:
//! - every connection is admitted before any work is done for it, and holds its slot until
//!   it ends;
//! - the preamble is read within `PREAMBLE_TIMEOUT`; a client without an active token gets
//!   frames of at most [`UNAUTHENTICATED_FRAME_BYTES_MAX`];
//! - with TLS on, the peer service is served only to connections with a node certificate; a
//!   plaintext connection (when allowed) gets the client service only;
//! - the accept loop and every connection are tasks of the node's [`Background`] owner and
//!   end on its shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use skiff_client::api::ClientApi;
use skiff_client::transport::{self, Conn, Service, TlsAcceptor};
use tarpc::server::{BaseChannel, Channel};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use crate::auth::Session;
use crate::background::{Background, Shutdown};
use crate::client_service::ClientService;
use crate::connections::{Admission, Admitted, IdleClock};
use crate::invoke::Invoker;
use crate::metrics::Metrics;
use crate::peer::PeerApi;
use crate::peer_service::PeerService;

/// How long a new connection may take to send its service byte (and a client its token).
const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the accept loop waits after a failed accept (out of file descriptors and the
/// like) before accepting again.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// What serving a connection needs.
#[derive(Clone)]
pub struct Listener {
    invoker: Invoker,
    /// The TLS side (`None`: plaintext, no TLS files configured).
    tls: Option<TlsAcceptor>,
    /// Whether a plaintext client connection is served beside TLS.
    allow_plaintext_clients: bool,
    background: Background,
}

impl Listener {
    pub fn new(
        invoker: Invoker,
        tls: Option<TlsAcceptor>,
        allow_plaintext_clients: bool,
        background: Background,
    ) -> Listener {
        Listener {
            invoker,
            tls,
            allow_plaintext_clients,
            background,
        }
    }

    fn metrics(&self) -> &Arc<Metrics> {
        self.invoker.replica().metrics()
    }

    /// Accepts connections on `listener` until the shutdown signal; each is served by a task
    /// of its own, which ends on the signal too.
    pub async fn accept_loop(self, listener: TcpListener, mut shutdown: Shutdown) {
        let limits = self.invoker.replica().limits();
        let admission = Admission::new(limits.connections_max, limits.connections_per_address_max);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = shutdown.wait() => return,
            };
            let (stream, peer_addr) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait and keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            let mut admitted = match admission.admit(peer_addr.ip()) {
                Ok(a) => a,
                Err(refused) => {
                    // Counted, and logged at debug only: a flood must not flood the log too.
                    self.metrics().rejected(refused.reason());
                    tracing::debug!(%peer_addr, %refused, "connection refused");
                    continue;
                }
            };
            let this = self.clone();
            let mut shutdown = shutdown.clone();
            self.background.spawn(async move {
                tokio::select! {
                    r = this.serve_connection(stream, peer_addr, &mut admitted) => {
                        if let Err(e) = r {
                            tracing::debug!(%peer_addr, error = %e, "connection closed");
                        }
                    }
                    () = shutdown.wait() => {}
                }
                drop(admitted);
            });
        }
    }

    async fn serve_connection(
        &self,
        tcp: tokio::net::TcpStream,
        peer_addr: std::net::SocketAddr,
        admitted: &mut Admitted,
    ) -> std::io::Result<()> {
        tcp.set_nodelay(true)?;
        let mut stream = match &self.tls {
            Some(tls) if !(self.allow_plaintext_clients && starts_plaintext(&tcp).await) => {
                tls.accept(tcp).await.inspect_err(|_| {
                    // Plaintext connections, certificates the CA did not sign, scanners.
                    self.metrics().rejected("tls_handshake");
                })?
            }
            // A plaintext connection gets the client service only: `peer_verified` is false.
            _ => Conn::Plain(tcp),
        };
        let mut first = [0u8; 1];
        tokio::time::timeout(PREAMBLE_TIMEOUT, stream.read_exact(&mut first))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no service byte"))
            .map_err(self.refused("handshake_timeout"))??;
        match Service::from_preamble(first[0]) {
            Some(Service::Client) => self.serve_client(stream, peer_addr).await,
            Some(Service::Peer) => self.serve_peer(stream, peer_addr, admitted).await,
            None => {
                self.metrics().rejected("unknown_service");
                Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown service byte {:#04x}", first[0]),
                ))
            }
        }
    }

    /// Counts an error that ends a handshake under `reason`.
    fn refused(&self, reason: &'static str) -> impl Fn(std::io::Error) -> std::io::Error {
        let metrics = self.metrics().clone();
        move |e| {
            metrics.rejected(reason);
            e
        }
    }

    async fn serve_client(
        &self,
        mut stream: Conn,
        peer_addr: std::net::SocketAddr,
    ) -> std::io::Result<()> {
        let metrics = self.metrics().clone();
        let limits = self.invoker.replica().limits();
        let per_conn = limits.requests_per_connection_max;
        let token = tokio::time::timeout(PREAMBLE_TIMEOUT, transport::read_token(&mut stream))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no token byte"))
            .map_err(self.refused("handshake_timeout"))?
            .map_err(self.refused("bad_token_handshake"))?;
        let session = Session::new(self.invoker.replica().clone(), token);
        // A connection without an active token can do nothing but `cluster_init`: it gets
        // small frames, so that what a stranger can make the node decode stays small.
        let frame_bytes_max = if session.token_is_active().await {
            limits.client_frame_bytes_max
        } else {
            UNAUTHENTICATED_FRAME_BYTES_MAX
        };
        let t =
            transport::framed(stream, frame_bytes_max).inspect(count_bad_frames(metrics.clone()));
        // A request in progress (a sync invocation, a long wait) keeps the connection open;
        // no request for `client_idle_timeout_ms` closes it, so idle connections cannot hold
        // slots of `connections_max` for ever.
        let clock = Arc::new(IdleClock::default());
        let service = ClientService::new(session, self.invoker.clone());
        let serving = BaseChannel::with_defaults(t)
            .max_concurrent_requests(per_conn)
            .execute(ClientApi::serve(service))
            .for_each_concurrent(per_conn, |fut| {
                let busy = clock.busy();
                async move {
                    fut.await;
                    drop(busy);
                }
            });
        let idle = Duration::from_millis(limits.client_idle_timeout_ms);
        tokio::select! {
            () = serving => {}
            () = clock.idle_for(idle) => {
                metrics.rejected("client_idle_timeout");
                tracing::debug!(%peer_addr, "idle client connection closed");
            }
        }
        Ok(())
    }

    async fn serve_peer(
        &self,
        stream: Conn,
        peer_addr: std::net::SocketAddr,
        admitted: &mut Admitted,
    ) -> std::io::Result<()> {
        if self.tls.is_some() && !stream.peer_verified() {
            // Votes, appends and forwarded reads are for nodes of this cluster only.
            self.metrics().rejected("peer_without_certificate");
            tracing::warn!(%peer_addr, "peer connection without a node certificate refused");
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "peer service without a node certificate",
            ));
        }
        if stream.peer_verified() {
            // A node of this cluster: it does not compete with its address's clients.
            admitted.leave_address_count();
        }
        let limits = self.invoker.replica().limits();
        let per_conn = limits.requests_per_connection_max;
        let t = transport::framed(stream, limits.peer_frame_bytes_max)
            .inspect(count_bad_frames(self.metrics().clone()));
        BaseChannel::with_defaults(t)
            .max_concurrent_requests(per_conn)
            .execute(PeerApi::serve(PeerService::new(self.invoker.clone())))
            .for_each_concurrent(per_conn, |fut| fut)
            .await;
        Ok(())
    }
}

/// Largest frame on a client connection whose token is not active (or absent): room for a
/// `cluster_init` and the refusals of everything else.
pub const UNAUTHENTICATED_FRAME_BYTES_MAX: usize = 64 * 1024;

/// Whether a new connection starts with a service byte rather than a TLS record (whose first
/// byte is 22, a handshake); waits at most `PREAMBLE_TIMEOUT` for that byte.
async fn starts_plaintext(tcp: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(PREAMBLE_TIMEOUT, tcp.peek(&mut first)).await,
        Ok(Ok(1)) if Service::from_preamble(first[0]).is_some()
    )
}

/// Counts a request frame the connection could not take: over the frame limit, or not a
/// request at all (both end the connection; a closed or reset one is not counted).
fn count_bad_frames<T>(metrics: Arc<Metrics>) -> impl FnMut(&std::io::Result<T>) {
    move |item| {
        if let Err(e) = item {
            // The transport wraps the codec's error in one of kind `Other`.
            let kind = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<std::io::Error>())
                .map_or(e.kind(), std::io::Error::kind);
            if kind == std::io::ErrorKind::InvalidData {
                metrics.rejected(if e.to_string().contains("frame size too big") {
                    "frame_too_large"
                } else {
                    "undecodable_request"
                });
            }
        }
    }
}
