//! One request served: parsed, checked against the function's grant, run on the backend
//! within [`BACKEND_TIMEOUT_MS`], logged, and answered.
//!
//! Invariants: a request outside the grant never reaches the backend; a backend answer
//! naming a key the request did not ask for is refused, never passed on.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use skiff_raft_store::model::{
    validate_key, CommandResult, InvalidCommand, KEY_BYTES_MAX, VALUE_BYTES_MAX,
};

use super::protocol::{
    decode_put_value, encode_value, encoded_bytes, Reply, RequestError, WireEntry, WireRequest,
};
use super::{
    AccessLog, AccessOp, AccessRecord, DataAccess, KvBackend, BACKEND_TIMEOUT_MS, LIST_ENTRIES_MAX,
    LIST_PAGE_BYTES_MAX,
};

/// The state one socket's connections share.
pub(super) struct Service {
    pub(super) access: DataAccess,
    pub(super) backend: Arc<dyn KvBackend>,
    pub(super) log: Arc<AccessLog>,
}

impl Service {
    pub(super) async fn handle(&self, line: &[u8]) -> Reply {
        let request = match serde_json::from_slice::<WireRequest>(line) {
            Ok(request) => request,
            Err(e) => {
                return self.refusal(&RequestError::Invalid(format!("malformed request: {e}")))
            }
        };
        self.execute(request)
            .await
            .unwrap_or_else(|e| self.refusal(&e))
    }

    /// The reply to a failed request; a refusal of the function's input is also counted.
    pub(super) fn refusal(&self, e: &RequestError) -> Reply {
        match e {
            RequestError::Denied { .. } => self.backend.refused("data_denied"),
            RequestError::Invalid(_) => self.backend.refused("data_invalid"),
            _ => {}
        }
        Reply::error(e)
    }

    async fn execute(&self, request: WireRequest) -> Result<Reply, RequestError> {
        match request {
            WireRequest::Get { key } => self.get(key).await,
            WireRequest::Put {
                key,
                value,
                value_b64,
                expect_version,
            } => {
                let value = decode_put_value(value, value_b64)?;
                self.put(key, value, expect_version).await
            }
            WireRequest::Delete {
                key,
                expect_version,
            } => self.delete(key, expect_version).await,
            WireRequest::List {
                prefix,
                start_after,
                limit,
            } => self.list(prefix, start_after, limit).await,
        }
    }

    fn log(&self, op: AccessOp, key: &str, version: u64, allowed: bool) {
        self.log.record(AccessRecord {
            op,
            key: key.to_string(),
            version,
            allowed,
        });
    }

    /// Refuses (and logs) an access outside the grant.
    fn check(&self, op: AccessOp, key: &str) -> Result<(), RequestError> {
        let allowed = match op {
            AccessOp::Get => self.access.can_read(key),
            AccessOp::List => self.access.can_list(key),
            AccessOp::Put | AccessOp::Delete => self.access.can_write(key),
        };
        if allowed {
            return Ok(());
        }
        self.log(op, key, 0, false);
        Err(RequestError::Denied {
            op,
            key: key.to_string(),
            allowed: self.access.describe(),
        })
    }

    async fn get(&self, key: String) -> Result<Reply, RequestError> {
        validate_key(&key).map_err(invalid)?;
        self.check(AccessOp::Get, &key)?;
        let entry = call_backend(self.backend.get(key.clone())).await?;
        match entry {
            None => {
                self.log(AccessOp::Get, &key, 0, true);
                Ok(Reply {
                    found: Some(false),
                    ..Reply::ok()
                })
            }
            Some(entry) => {
                if entry.key != key {
                    return Err(backend_broke(format!(
                        "asked for {key:?}, it answered {:?}",
                        entry.key
                    )));
                }
                self.log(AccessOp::Get, &key, entry.version, true);
                let (value, value_b64) = encode_value(entry.value);
                Ok(Reply {
                    found: Some(true),
                    value,
                    value_b64,
                    version: Some(entry.version),
                    ..Reply::ok()
                })
            }
        }
    }

    async fn put(
        &self,
        key: String,
        value: Vec<u8>,
        expect_version: Option<u64>,
    ) -> Result<Reply, RequestError> {
        validate_key(&key).map_err(invalid)?;
        if value.len() > VALUE_BYTES_MAX {
            return Err(invalid(InvalidCommand::ValueTooLarge {
                bytes: value.len(),
                max: VALUE_BYTES_MAX,
            }));
        }
        self.check(AccessOp::Put, &key)?;
        let result = call_backend(self.backend.put(key.clone(), value, expect_version)).await?;
        match result {
            CommandResult::Put { version } => {
                self.log(AccessOp::Put, &key, version, true);
                Ok(Reply {
                    version: Some(version),
                    ..Reply::ok()
                })
            }
            CommandResult::Conflict { current } => {
                self.log(AccessOp::Put, &key, current, true);
                Err(RequestError::Conflict {
                    key,
                    current,
                    expected: expect_version.unwrap_or_default(),
                })
            }
            CommandResult::Invalid(e) => Err(invalid(e)),
            other => Err(backend_broke(format!("answered {other:?} to a put"))),
        }
    }

    async fn delete(
        &self,
        key: String,
        expect_version: Option<u64>,
    ) -> Result<Reply, RequestError> {
        validate_key(&key).map_err(invalid)?;
        self.check(AccessOp::Delete, &key)?;
        let result = call_backend(self.backend.delete(key.clone(), expect_version)).await?;
        match result {
            CommandResult::Deleted { version } => {
                self.log(AccessOp::Delete, &key, version, true);
                Ok(Reply {
                    version: Some(version),
                    ..Reply::ok()
                })
            }
            CommandResult::NotFound => {
                self.log(AccessOp::Delete, &key, 0, true);
                Err(RequestError::NotFound { key })
            }
            CommandResult::Conflict { current } => {
                self.log(AccessOp::Delete, &key, current, true);
                Err(RequestError::Conflict {
                    key,
                    current,
                    expected: expect_version.unwrap_or_default(),
                })
            }
            CommandResult::Invalid(e) => Err(invalid(e)),
            other => Err(backend_broke(format!("answered {other:?} to a delete"))),
        }
    }

    async fn list(
        &self,
        prefix: String,
        start_after: Option<String>,
        limit: Option<u32>,
    ) -> Result<Reply, RequestError> {
        if prefix.len() > KEY_BYTES_MAX
            || start_after
                .as_ref()
                .is_some_and(|s| s.len() > KEY_BYTES_MAX)
        {
            return Err(RequestError::Invalid(format!(
                "prefix and start_after are limited to {KEY_BYTES_MAX} bytes"
            )));
        }
        self.check(AccessOp::List, &prefix)?;
        let limit = limit.unwrap_or(LIST_ENTRIES_MAX).clamp(1, LIST_ENTRIES_MAX);
        let page = call_backend(self.backend.list(prefix.clone(), start_after, limit)).await?;
        if let Some(stray) = page.entries.iter().find(|e| !e.key.starts_with(&prefix)) {
            return Err(backend_broke(format!(
                "listed {:?} under the prefix {prefix:?}",
                stray.key
            )));
        }
        self.log(AccessOp::List, &prefix, page.revision, true);
        let total = page.entries.len();
        let mut entries = Vec::with_capacity(total);
        let mut bytes = 0;
        for entry in page.entries {
            let key = entry.key;
            let (value, value_b64) = encode_value(entry.value);
            let wire = WireEntry {
                key,
                value,
                value_b64,
                version: entry.version,
            };
            bytes += encoded_bytes(&wire);
            if bytes > LIST_PAGE_BYTES_MAX && !entries.is_empty() {
                break;
            }
            entries.push(wire);
        }
        let next = if entries.len() < total {
            entries.last().map(|e| e.key.clone())
        } else {
            page.next
        };
        Ok(Reply {
            entries: Some(entries),
            next,
            ..Reply::ok()
        })
    }
}

fn invalid(e: InvalidCommand) -> RequestError {
    RequestError::Invalid(e.to_string())
}

/// A backend answer that breaks its contract: a bug in the node, reported to the function as
/// the store being unavailable rather than passed on.
fn backend_broke(detail: String) -> RequestError {
    tracing::error!(%detail, "data service backend broke its contract");
    RequestError::Unavailable(format!("the store answered wrongly ({detail})"))
}

async fn call_backend<T>(call: BoxFuture<'static, Result<T, String>>) -> Result<T, RequestError> {
    match tokio::time::timeout(Duration::from_millis(BACKEND_TIMEOUT_MS), call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(RequestError::Unavailable(e)),
        Err(_) => Err(RequestError::Unavailable(format!(
            "no answer within {BACKEND_TIMEOUT_MS} ms"
        ))),
    }
}
