//! The wire of the data service (`docs/data-service.md`): one JSON request per line, one
//! JSON reply per line; error codes; values as text when UTF-8, else base64.
//!
//! Invariant: unknown request fields are refused, and every reply serializes.

use std::io;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::AccessOp;

/// Why a request failed; each variant is one wire error code.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error("{op} of {key:?} denied: {allowed}")]
    Denied {
        op: AccessOp,
        key: String,
        allowed: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{key:?} is at version {current}, not the expected {expected}")]
    Conflict {
        key: String,
        current: u64,
        expected: u64,
    },
    #[error("{key:?} does not exist")]
    NotFound { key: String },
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

impl RequestError {
    pub(super) fn code(&self) -> ErrorCode {
        match self {
            RequestError::Denied { .. } => ErrorCode::Denied,
            RequestError::Invalid(_) => ErrorCode::Invalid,
            RequestError::Conflict { .. } => ErrorCode::Conflict,
            RequestError::NotFound { .. } => ErrorCode::NotFound,
            RequestError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum ErrorCode {
    Denied,
    Invalid,
    Conflict,
    Unavailable,
    NotFound,
}

/// One request line. Unknown fields are refused, so a misspelled `expect_version` cannot turn
/// a conditional write into an unconditional one.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub(super) enum WireRequest {
    Get {
        key: String,
    },
    Put {
        key: String,
        value: Option<String>,
        value_b64: Option<String>,
        expect_version: Option<u64>,
    },
    Delete {
        key: String,
        expect_version: Option<u64>,
    },
    List {
        prefix: String,
        start_after: Option<String>,
        limit: Option<u32>,
    },
}

/// One response line: `ok` and the fields of the answer; absent fields are left out.
#[derive(Debug, Default, Serialize)]
pub(super) struct Reply {
    pub(super) ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) found: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) value_b64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) entries: Option<Vec<WireEntry>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) next: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) code: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) current: Option<u64>,
}

impl Reply {
    pub(super) fn ok() -> Self {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }

    pub(super) fn error(error: &RequestError) -> Self {
        Reply {
            ok: false,
            error: Some(error.to_string()),
            code: Some(error.code()),
            current: match error {
                RequestError::Conflict { current, .. } => Some(*current),
                _ => None,
            },
            ..Reply::default()
        }
    }

    pub(super) fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self)
            .expect("a reply is strings, numbers and booleans: it always serializes");
        line.push(b'\n');
        line
    }
}

#[derive(Debug, Serialize)]
pub(super) struct WireEntry {
    pub(super) key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) value_b64: Option<String>,
    pub(super) version: u64,
}

/// A value as it goes on the wire: `value` when it is UTF-8, `value_b64` otherwise.
pub(super) fn encode_value(value: Vec<u8>) -> (Option<String>, Option<String>) {
    match String::from_utf8(value) {
        Ok(text) => (Some(text), None),
        Err(e) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
        ),
    }
}

/// Counts the bytes written through it, to size list pages without building them twice.
struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(super) fn encoded_bytes(entry: &WireEntry) -> usize {
    let mut counter = ByteCounter(0);
    serde_json::to_writer(&mut counter, entry)
        .expect("an entry is strings and a number: it always serializes");
    counter.0
}

pub(super) fn decode_put_value(
    value: Option<String>,
    value_b64: Option<String>,
) -> Result<Vec<u8>, RequestError> {
    match (value, value_b64) {
        (Some(text), None) => Ok(text.into_bytes()),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| RequestError::Invalid(format!("value_b64 is not standard base64: {e}"))),
        _ => Err(RequestError::Invalid(
            "a put needs exactly one of value and value_b64".to_string(),
        )),
    }
}
