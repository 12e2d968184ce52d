//! How one RPC reaches the cluster: the endpoint list (configured, plus leaders learned from
//! hints), a lazily opened connection per endpoint, and the bounded retry loop every call of
//! [`Client`] goes through.
//!
//! Invariants:
//! - a call makes at most `attempts_max` attempts, each with its own deadline, and none after
//!   its `retry_until` (if given);
//! - only a transport failure or a retryable [`ApiError`] is retried; the back-off between
//!   attempts doubles up to `backoff_max`;
//! - the endpoint list never grows past [`ENDPOINTS_MAX`], whatever the hints say.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tarpc::client::RpcError;
use tarpc::context;

use super::{Client, ClientError};
use crate::api::{ApiError, ClientApiClient, CLIENT_FRAME_BYTES_MAX};
use crate::transport;

pub(super) struct Endpoint {
    pub(super) addr: String,
    pub(super) conn: Option<ClientApiClient>,
}

/// Most endpoints a client remembers (configured plus learned), so hints cannot grow it.
pub(super) const ENDPOINTS_MAX: usize = 64;

impl Client {
    /// Runs one RPC with bounded retries: a transport failure moves to the next endpoint; a
    /// retryable [`ApiError`] waits and tries again, following a leader hint if there is one.
    pub(super) async fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(ClientApiClient, context::Context) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, ApiError>, RpcError>>,
    {
        self.call_within(self.inner.config.rpc_timeout, None, f)
            .await
    }

    /// [`Client::call`] with a deadline of `attempt_timeout` per attempt, and no attempt
    /// started after `retry_until` (if given).
    pub(super) async fn call_within<T, F, Fut>(
        &self,
        attempt_timeout: Duration,
        retry_until: Option<Instant>,
        f: F,
    ) -> Result<T, ClientError>
    where
        F: Fn(ClientApiClient, context::Context) -> Fut,
        Fut: std::future::Future<Output = Result<Result<T, ApiError>, RpcError>>,
    {
        let cfg = &self.inner.config;
        let may_retry = |attempt: u32| {
            attempt < cfg.attempts_max && retry_until.is_none_or(|t| Instant::now() < t)
        };
        let mut backoff = cfg.backoff_initial;
        let mut last = String::from("no attempt made");
        let mut attempts = 0;
        for attempt in 1..=cfg.attempts_max {
            attempts = attempt;
            let idx = self.inner.preferred.load(Ordering::Relaxed);
            let (idx, conn) = match self.connection(idx).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    self.rotate(idx).await;
                    if !may_retry(attempt) {
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(cfg.backoff_max);
                    continue;
                }
            };
            let mut ctx = context::current();
            ctx.deadline = Instant::now() + attempt_timeout;
            match f(conn, ctx).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if e.is_retryable() && may_retry(attempt) => {
                    last = e.to_string();
                    if let ApiError::NoLeader {
                        leader_addr: Some(addr),
                        ..
                    } = &e
                    {
                        self.prefer(addr).await;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(cfg.backoff_max);
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => {
                    last = format!("{}: {e}", self.addr_of(idx).await);
                    self.drop_connection(idx).await;
                    self.rotate(idx).await;
                    if !may_retry(attempt) {
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(cfg.backoff_max);
                }
            }
        }
        let last = if cfg.tls.is_none() {
            // A node with TLS closes a plaintext connection without a word.
            format!("{last} (this client speaks plaintext; if the cluster uses TLS, give its CA with --ca or SKIFF_CA)")
        } else {
            last
        };
        Err(ClientError::Unreachable {
            endpoints: cfg.endpoints.join(","),
            attempts,
            last,
        })
    }

    async fn connection(&self, idx: usize) -> Result<(usize, ClientApiClient), String> {
        let mut eps = self.inner.endpoints.lock().await;
        let idx = idx % eps.len();
        let ep = &mut eps[idx];
        if let Some(conn) = &ep.conn {
            return Ok((idx, conn.clone()));
        }
        let config = &self.inner.config;
        let stream = transport::dial_client(&ep.addr, config.token.as_deref(), config.tls.as_ref())
            .await
            .map_err(|e| format!("{}: {e}", ep.addr))?;
        let transport = transport::framed(stream, CLIENT_FRAME_BYTES_MAX);
        let conn = ClientApiClient::new(tarpc::client::Config::default(), transport).spawn();
        ep.conn = Some(conn.clone());
        Ok((idx, conn))
    }

    async fn addr_of(&self, idx: usize) -> String {
        let eps = self.inner.endpoints.lock().await;
        eps[idx % eps.len()].addr.clone()
    }

    async fn drop_connection(&self, idx: usize) {
        let mut eps = self.inner.endpoints.lock().await;
        let n = eps.len();
        eps[idx % n].conn = None;
    }

    async fn rotate(&self, failed: usize) {
        let n = self.inner.endpoints.lock().await.len();
        let _ = self.inner.preferred.compare_exchange(
            failed,
            (failed + 1) % n,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Makes `addr` the first endpoint tried, remembering it if it is new.
    async fn prefer(&self, addr: &str) {
        if transport::parse_endpoint(addr).is_err() {
            return;
        }
        let mut eps = self.inner.endpoints.lock().await;
        let idx = match eps.iter().position(|e| e.addr == addr) {
            Some(i) => i,
            None if eps.len() < ENDPOINTS_MAX => {
                eps.push(Endpoint {
                    addr: addr.to_string(),
                    conn: None,
                });
                eps.len() - 1
            }
            None => return,
        };
        self.inner.preferred.store(idx, Ordering::Relaxed);
    }
}
