//! Stream jobs on the node: the leader's driver that reads sources incrementally and proposes
//! `StreamAdvance`, the source readers, and the start/cancel/redrive requests (forwarded to the
//! leader, which is the node that reads the sources).
//!
//! The driver keeps nothing that matters: each round it reads the jobs from the applied state,
//! reads the next items from the replicated cursor, and proposes an advance whose `from_cursor`
//! is that cursor. The state machine refuses an advance from a stale cursor, so a driver that
//! lost leadership, or raced another, can neither skip nor double-enqueue an item; a new
//! leader's driver simply resumes from the replicated cursor.
//!
//! Files are opened only through [`crate::sources::SourceRoots`]: beneath a root the operator
//! of the reading node configured, regular files only (and, for `dir:`, only entries that are
//! regular files: symlinks, subdirectories, FIFOs, sockets and devices are skipped unopened).
//! The leader checks a source at start, and every read checks it again against the roots of
//! the node reading it, so a driver that moved to another node after a failover applies that
//! node's roots.
//!
//! Invariants:
//! - a source is never read whole: files are read from the cursor's byte offset line by line,
//!   each line or record at most [`RECORD_BYTES_MAX`]; a directory listing keeps at most one
//!   advance's worth of names; a key listing reads one page;
//! - one advance carries at most the job's free window, [`STREAM_ADVANCE_ITEMS_MAX`] items and
//!   about [`STREAM_ADVANCE_BYTES_MAX`] bytes;
//! - only the leader drives, and only through its batcher.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Map, Value};
use skiff_client::api::{
    ApiError, ClientCommand, Command, CommandResult, ReadConsistency, StreamId, StreamJob,
    StreamSource, StreamStartRequest,
};
use skiff_raft_store::model::Principal;
use skiff_raft_store::streams::{
    KvCursor, StreamItem, STREAM_ADVANCE_BYTES_MAX, STREAM_ADVANCE_ITEMS_MAX,
    STREAM_ERROR_BYTES_MAX,
};
use skiff_raft_store::StateMachineData;

use crate::background::Shutdown;
use crate::invoke::Invoker;
use crate::peer::{self, ReadOp, ReadResult, StreamOp, StreamReply};
use crate::replica::Replica;
use crate::sources::SourceRoots;

/// Longest line (JSONL) or record (CSV) read; a longer one is a failed item.
pub const RECORD_BYTES_MAX: usize = 1024 * 1024;
/// Largest file of a `dir:` source sent as an item's content; a larger one is a failed item.
pub const DIR_FILE_BYTES_MAX: u64 = 512 * 1024;
/// How often the driver looks at its jobs when nothing is applied.
const DRIVE_INTERVAL: Duration = Duration::from_millis(200);
/// How long the driver waits after a source could not be read before trying again.
const READ_RETRY: Duration = Duration::from_secs(1);

/// Why a source could not be read at all (a record that cannot be parsed is a failed item,
/// not this). The driver retries after `READ_RETRY`; a start is refused with it.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Not beneath a root, not a regular file (a directory for `dir:`), or not openable.
    #[error(transparent)]
    Source(#[from] crate::sources::SourceError),
    #[error("cursor {0:?} is not a byte offset")]
    Cursor(String),
    #[error("cannot seek {path} to byte {offset}: {source}")]
    Seek {
        path: String,
        offset: u64,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is empty: a CSV source needs a header line")]
    EmptyCsv(String),
    #[error("the header of {0} names a column twice")]
    HeaderTwice(String),
    #[error("the header of {path} is malformed: {reason}")]
    HeaderMalformed { path: String, reason: String },
}

/// Why one round of the driver did not propose.
#[derive(Debug, thiserror::Error)]
enum DriveError {
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The blocking read panicked or was cancelled.
    #[error("{0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Items read from a source, and where the read stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub items: Vec<StreamItem>,
    pub to_cursor: String,
    pub exhausted: bool,
}

/// How much one read may return.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimit {
    pub items: usize,
    pub bytes: usize,
}

fn bad(error: String) -> StreamItem {
    let mut e = error;
    if e.len() > STREAM_ERROR_BYTES_MAX {
        let mut cut = STREAM_ERROR_BYTES_MAX;
        while !e.is_char_boundary(cut) {
            cut -= 1;
        }
        e.truncate(cut);
    }
    StreamItem::Bad(e)
}

fn offset_of(cursor: &str) -> Result<u64, ReadError> {
    if cursor.is_empty() {
        return Ok(0);
    }
    cursor
        .parse()
        .map_err(|_| ReadError::Cursor(cursor.to_string()))
}

/// Reads one line of at most [`RECORD_BYTES_MAX`] bytes (without its `\n`). `None` at the
/// end; `Err(len)` for a longer line, which is consumed whole.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<Option<(usize, bool)>> {
    buf.clear();
    let mut consumed = 0usize;
    let mut too_long = false;
    loop {
        let available = r.fill_buf()?;
        if available.is_empty() {
            return Ok(if consumed == 0 {
                None
            } else {
                Some((consumed, too_long))
            });
        }
        let (chunk, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let n = chunk.len();
        if !too_long {
            if buf.len() + n > RECORD_BYTES_MAX + 1 {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        r.consume(n);
        consumed += n;
        if done {
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(Some((consumed, too_long)));
        }
    }
}

fn read_error(path: &str, source: std::io::Error) -> ReadError {
    ReadError::Read {
        path: path.to_string(),
        source,
    }
}

fn open_at(sources: &SourceRoots, path: &str, offset: u64) -> Result<BufReader<File>, ReadError> {
    let mut f = sources.open_file(path)?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|source| ReadError::Seek {
            path: path.to_string(),
            offset,
            source,
        })?;
    Ok(BufReader::with_capacity(256 * 1024, f))
}

/// The shared loop of the file readers: records from byte `offset` until `limit`, each turned
/// into an item (or skipped when `to_item` gives `None`); the cursor is the byte after the
/// last record read.
fn read_records<R>(
    sources: &SourceRoots,
    path: &str,
    mut offset: u64,
    limit: ReadLimit,
    mut next: impl FnMut(&mut BufReader<File>, &mut Vec<u8>) -> std::io::Result<Option<(usize, R)>>,
    mut to_item: impl FnMut(u64, R, &[u8]) -> Option<StreamItem>,
) -> Result<Batch, ReadError> {
    let mut r = open_at(sources, path, offset)?;
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut buf = Vec::new();
    while items.len() < limit.items && bytes < limit.bytes {
        let Some((consumed, record)) =
            next(&mut r, &mut buf).map_err(|source| read_error(path, source))?
        else {
            return Ok(Batch {
                items,
                to_cursor: offset.to_string(),
                exhausted: true,
            });
        };
        let at = offset;
        offset += consumed as u64;
        let Some(item) = to_item(at, record, &buf) else {
            continue;
        };
        bytes += item.bytes();
        items.push(item);
    }
    // Stopped by the limit: exhausted only if nothing follows.
    let exhausted = r.fill_buf().map(<[u8]>::is_empty).unwrap_or(false);
    Ok(Batch {
        items,
        to_cursor: offset.to_string(),
        exhausted,
    })
}

/// The next items of a JSONL file after byte `cursor`.
pub fn read_jsonl(
    sources: &SourceRoots,
    path: &str,
    cursor: &str,
    limit: ReadLimit,
) -> Result<Batch, ReadError> {
    read_records(
        sources,
        path,
        offset_of(cursor)?,
        limit,
        read_line,
        |at, too_long, buf| {
            if too_long {
                Some(bad(format!(
                    "the line at byte {at} is longer than {RECORD_BYTES_MAX} bytes"
                )))
            } else if buf.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                Some(match serde_json::from_slice::<Value>(buf) {
                    Ok(_) => StreamItem::Ok(buf.trim_ascii().to_vec()),
                    Err(e) => bad(format!("the line at byte {at} is not JSON: {e}")),
                })
            }
        },
    )
}

/// Reads one CSV record (RFC 4180: quoted fields may hold commas, quotes doubled, and line
/// breaks) of at most [`RECORD_BYTES_MAX`] bytes. `None` at the end; the bytes consumed and
/// the fields, or why the record is malformed (it is consumed anyway).
///
/// Written here rather than taken from the `csv` crate because a record must be bounded and
/// resumable at an exact byte offset, and a malformed record must become one failed item.
#[allow(clippy::type_complexity)]
fn read_csv_record(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(usize, Result<Vec<String>, String>)>> {
    let mut consumed = 0usize;
    let mut record = Vec::new();
    let mut too_long = false;
    // A record ends at a line break outside quotes: read lines until the quotes balance.
    loop {
        let Some((n, long)) = read_line(r, buf)? else {
            if consumed == 0 {
                return Ok(None);
            }
            break;
        };
        consumed += n;
        too_long |= long || record.len() + buf.len() > RECORD_BYTES_MAX;
        if !too_long {
            if !record.is_empty() {
                record.push(b'\n');
            }
            record.extend_from_slice(buf);
        }
        let quotes = record.iter().filter(|b| **b == b'"').count();
        if too_long || quotes % 2 == 0 {
            break;
        }
    }
    if too_long {
        return Ok(Some((
            consumed,
            Err(format!("a record is longer than {RECORD_BYTES_MAX} bytes")),
        )));
    }
    Ok(Some((consumed, parse_csv_fields(&record))))
}

fn parse_csv_fields(record: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(record).map_err(|_| "the record is not UTF-8".to_string())?;
    let mut fields = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("a quoted field is not closed".into()),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => fields.push(field),
                Some(c) => return Err(format!("{c:?} after a closing quote")),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(',') => break,
                    Some('"') => return Err("a quote inside an unquoted field".into()),
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
        }
    }
}

/// The header of a CSV file and the offset of its first record.
fn csv_header(sources: &SourceRoots, path: &str) -> Result<(Vec<String>, u64), ReadError> {
    let mut r = open_at(sources, path, 0)?;
    let mut buf = Vec::new();
    match read_csv_record(&mut r, &mut buf).map_err(|source| read_error(path, source))? {
        None => Err(ReadError::EmptyCsv(path.to_string())),
        Some((n, Ok(h))) => {
            if h.iter().collect::<BTreeSet<_>>().len() != h.len() {
                return Err(ReadError::HeaderTwice(path.to_string()));
            }
            Ok((h, n as u64))
        }
        Some((_, Err(reason))) => Err(ReadError::HeaderMalformed {
            path: path.to_string(),
            reason,
        }),
    }
}

/// The next items of a CSV file after byte `cursor` (empty: after the header).
pub fn read_csv(
    sources: &SourceRoots,
    path: &str,
    cursor: &str,
    limit: ReadLimit,
) -> Result<Batch, ReadError> {
    let (header, body) = csv_header(sources, path)?;
    let offset = if cursor.is_empty() {
        body
    } else {
        offset_of(cursor)?
    };
    read_records(
        sources,
        path,
        offset,
        limit,
        read_csv_record,
        |at, record, _| {
            Some(match record {
                Ok(fields) if fields.len() == 1 && fields[0].trim().is_empty() => return None,
                Ok(fields) if fields.len() != header.len() => bad(format!(
                    "the record at byte {at} has {} fields, the header {}",
                    fields.len(),
                    header.len()
                )),
                Ok(fields) => {
                    let object: Map<String, Value> = header
                        .iter()
                        .cloned()
                        .zip(fields.into_iter().map(Value::String))
                        .collect();
                    StreamItem::Ok(serde_json::to_vec(&object).expect("JSON objects serialize"))
                }
                Err(e) => bad(format!("the record at byte {at} is malformed: {e}")),
            })
        },
    )
}

/// The next regular files of a directory after the name `cursor`, in name order; entries
/// that are not regular files are skipped without being opened.
pub fn read_dir(
    sources: &SourceRoots,
    path: &str,
    cursor: &str,
    limit: ReadLimit,
) -> Result<Batch, ReadError> {
    let mut dir = sources.open_dir(path)?;
    // Keep only the `limit.items + 1` smallest names after the cursor: bounded memory
    // whatever the directory's size, and the extra one tells whether more follow.
    let mut names: BTreeSet<String> = BTreeSet::new();
    let mut truncated = false;
    while let Some(name) = dir.next_name() {
        let name = name?;
        if name.as_str() <= cursor {
            continue;
        }
        names.insert(name);
        if names.len() > limit.items + 1 {
            names.pop_last();
            truncated = true;
        }
    }
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut to_cursor = cursor.to_string();
    let mut iter = names.into_iter();
    for name in iter.by_ref() {
        let item = match dir.open_entry(&name) {
            // Not a regular file (any more): skipped, as in the listing.
            Ok(None) => {
                to_cursor = name;
                continue;
            }
            Ok(Some(file)) => match read_small_file(file) {
                Ok(content) => {
                    let object = match String::from_utf8(content) {
                        Ok(text) => json!({"path": name, "content": text}),
                        Err(e) => json!({
                            "path": name,
                            "content_base64": base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
                        }),
                    };
                    StreamItem::Ok(serde_json::to_vec(&object).expect("JSON serializes"))
                }
                Err(e) => bad(format!("{name}: {e}")),
            },
            Err(e) => bad(e.to_string()),
        };
        bytes += item.bytes();
        items.push(item);
        to_cursor = name;
        if items.len() >= limit.items || bytes >= limit.bytes {
            break;
        }
    }
    // Skipped entries may have used up the extra name: then more may follow past it.
    let exhausted = iter.next().is_none() && !truncated;
    Ok(Batch {
        items,
        to_cursor,
        exhausted,
    })
}

fn read_small_file(f: File) -> Result<Vec<u8>, String> {
    let len = f.metadata().map_err(|e| format!("cannot stat: {e}"))?.len();
    if len > DIR_FILE_BYTES_MAX {
        return Err(format!(
            "{len} bytes, the limit for a file item is {DIR_FILE_BYTES_MAX}"
        ));
    }
    let mut out = Vec::new();
    f.take(DIR_FILE_BYTES_MAX)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot read: {e}"))?;
    Ok(out)
}

/// The next keys under a prefix after the key `cursor` that existed at `start_revision`.
pub fn read_kv(
    sm: &StateMachineData,
    prefix: &str,
    follow: bool,
    start_revision: u64,
    cursor: &str,
    limit: ReadLimit,
) -> Batch {
    match KvCursor::parse(cursor) {
        Some(KvCursor::Revision(after)) => return read_kv_follow(sm, prefix, after, limit),
        None => {
            return Batch {
                items: Vec::new(),
                to_cursor: cursor.to_string(),
                exhausted: true,
            }
        }
        Some(KvCursor::Key(_)) => {}
    }
    let start_after = if cursor.is_empty() {
        None
    } else {
        Some(cursor)
    };
    let page = sm.list(prefix, start_after, limit.items.min(1000) as u32);
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut to_cursor = cursor.to_string();
    let mut stopped_early = false;
    for (n, e) in page.entries.iter().enumerate() {
        if bytes >= limit.bytes {
            stopped_early = n < page.entries.len();
            break;
        }
        to_cursor = e.key.clone();
        // Keys created after the job started are not part of its data set.
        if e.create_version > start_revision {
            continue;
        }
        let item = kv_item(e);
        bytes += item.bytes();
        items.push(item);
    }
    let exhausted = page.next.is_none() && !stopped_early;
    if exhausted && follow {
        // The snapshot is done: from now on, every write after the start, by revision.
        return Batch {
            items,
            to_cursor: KvCursor::revision(start_revision),
            exhausted: false,
        };
    }
    Batch {
        items,
        to_cursor,
        exhausted,
    }
}

/// Most keys one follow round scans under a prefix.
const FOLLOW_SCAN_KEYS_MAX: usize = 1_000_000;

/// The follow phase: keys under `prefix` written after revision `after`, oldest write first.
/// Scans the prefix (at most [`FOLLOW_SCAN_KEYS_MAX`] keys per round).
fn read_kv_follow(sm: &StateMachineData, prefix: &str, after: u64, limit: ReadLimit) -> Batch {
    let mut newer: Vec<&skiff_raft_store::model::KvEntry> = sm
        .kv_entries()
        .range::<str, _>((
            std::ops::Bound::Included(prefix),
            std::ops::Bound::Unbounded,
        ))
        .take_while(|(k, _)| k.starts_with(prefix))
        .take(FOLLOW_SCAN_KEYS_MAX)
        .map(|(_, e)| e)
        .filter(|e| e.version > after)
        .collect();
    newer.sort_by_key(|e| e.version);
    let mut items = Vec::new();
    let mut bytes = 0;
    let mut to = after;
    for e in newer.into_iter().take(limit.items) {
        if bytes >= limit.bytes {
            break;
        }
        let item = kv_item(e);
        bytes += item.bytes();
        items.push(item);
        to = e.version;
    }
    Batch {
        items,
        to_cursor: KvCursor::revision(to),
        exhausted: false,
    }
}

fn kv_item(e: &skiff_raft_store::model::KvEntry) -> StreamItem {
    let object = match std::str::from_utf8(&e.value) {
        Ok(text) => json!({"key": e.key, "value": text}),
        Err(_) => json!({
            "key": e.key,
            "value_base64": base64::engine::general_purpose::STANDARD.encode(&e.value),
        }),
    };
    StreamItem::Ok(serde_json::to_vec(&object).expect("JSON serializes"))
}

/// Checks a file source at start: it lies beneath one of this node's roots, is a regular
/// file (a directory for `dir:`), and its first record parses. The answer is the refusal's
/// text, for the client.
pub fn check_source(sources: &SourceRoots, source: &StreamSource) -> Result<(), String> {
    let one = ReadLimit { items: 1, bytes: 1 };
    let first = match source {
        StreamSource::Kv { .. } => return Ok(()),
        StreamSource::Jsonl { path } => read_jsonl(sources, path, "", one),
        StreamSource::Csv { path } => read_csv(sources, path, "", one),
        StreamSource::Dir { path } => read_dir(sources, path, "", one),
    }
    .map_err(|e| e.to_string())?;
    match first.items.first() {
        Some(StreamItem::Bad(e)) => Err(format!("{}: {e}", source.spec())),
        _ => Ok(()),
    }
}

/// The driver loop: it drives only while this node is the leader, and ends on `shutdown`.
pub async fn drive_loop(invoker: Invoker, mut shutdown: Shutdown) {
    let replica = invoker.replica().clone();
    let mut changes = replica.changes();
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(DRIVE_INTERVAL) => {}
            () = shutdown.wait() => return,
        }
        if !changes.leads(replica.id()) {
            continue;
        }
        let jobs: Vec<StreamJob> =
            replica.state(|sm| sm.sched().streams_to_drive().into_iter().cloned().collect());
        for job in jobs {
            if let Err(e) = drive_once(&invoker, &job).await {
                tracing::warn!(stream = job.id, source = %job.source.spec(), error = %e, "cannot read the stream's source; trying again");
                tokio::select! {
                    () = tokio::time::sleep(READ_RETRY) => {}
                    () = shutdown.wait() => return,
                }
            }
        }
    }
}

/// Reads one advance's worth of items of `job` and proposes it.
async fn drive_once(invoker: &Invoker, job: &StreamJob) -> Result<(), DriveError> {
    let replica = invoker.replica();
    let room = u64::from(job.options.max_concurrency).saturating_sub(job.counters.running);
    // Wait for room for a whole batch, so invocations stay full.
    let want = u64::from(job.options.batch.min(job.options.max_concurrency));
    if room < want {
        return Ok(());
    }
    // Whole batches only: every advance then starts at a multiple of the batch size, so a
    // re-run over the same items forms the same batches (same payloads: idempotent hits).
    let whole = (room as usize).min(STREAM_ADVANCE_ITEMS_MAX);
    let whole = whole - whole % (want.max(1) as usize);
    let limit = ReadLimit {
        items: whole.max(1),
        bytes: STREAM_ADVANCE_BYTES_MAX,
    };
    let batch = match &job.source {
        StreamSource::Kv { prefix, follow } => {
            replica.state(|sm| read_kv(sm, prefix, *follow, job.start_revision, &job.cursor, limit))
        }
        source => {
            let (source, cursor) = (source.clone(), job.cursor.clone());
            let sources = replica.sources().clone();
            tokio::task::spawn_blocking(move || match &source {
                StreamSource::Jsonl { path } => read_jsonl(&sources, path, &cursor, limit),
                StreamSource::Csv { path } => read_csv(&sources, path, &cursor, limit),
                StreamSource::Dir { path } => read_dir(&sources, path, &cursor, limit),
                StreamSource::Kv { .. } => unreachable!("kv sources are read above"),
            })
            .await??
        }
    };
    if batch.items.is_empty() && !batch.exhausted && batch.to_cursor == job.cursor {
        return Ok(());
    }
    let command = ClientCommand {
        request_id: replica.next_request_id(),
        command: Command::StreamAdvance {
            job: job.id,
            from_cursor: job.cursor.clone(),
            to_cursor: batch.to_cursor,
            first_item: job.next_item,
            items: batch.items,
            exhausted: batch.exhausted,
        },
    };
    match replica
        .batcher()
        .submit(Principal::Node, vec![command])
        .await
    {
        Ok(results) => match results.into_iter().next() {
            Some(CommandResult::StreamAdvanced { tasks }) => {
                for t in tasks {
                    invoker.dispatch(t).await;
                }
            }
            other => tracing::debug!(stream = job.id, result = ?other, "stream advance refused"),
        },
        Err(e) => tracing::debug!(stream = job.id, error = %e, "stream advance not applied"),
    }
    Ok(())
}

/// A stream request: executed on the leader, forwarded there from any other node.
/// `principal` is the caller the receiving node authenticated.
pub async fn request(
    invoker: &Invoker,
    principal: Principal,
    op: StreamOp,
) -> Result<StreamReply, ApiError> {
    let replica = invoker.replica();
    let (leader, addr) = replica.leader().await?;
    if leader == replica.id() {
        return request_on_leader(invoker, principal, op).await;
    }
    let p = replica.peer(leader, &addr).await?;
    let ctx = peer::deadline(replica.timeout());
    match p.forward_stream(ctx, principal, op).await {
        Ok(r) => r,
        Err(e) => Err(replica.forward_failed(leader, &addr, e).await),
    }
}

/// The leader's side of [`request`].
pub async fn request_on_leader(
    invoker: &Invoker,
    principal: Principal,
    op: StreamOp,
) -> Result<StreamReply, ApiError> {
    let (request_id, command) = match op {
        StreamOp::Start { request_id, req } => {
            check_start(invoker.replica(), &req).await?;
            let command = Command::StreamStart {
                request: Box::new(req),
            };
            (request_id, command)
        }
        StreamOp::Cancel { request_id, id } => (request_id, Command::StreamCancel { job: id }),
        StreamOp::Redrive { request_id, id } => (request_id, Command::StreamRedrive { job: id }),
    };
    command
        .validate()
        .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
    let result = invoker
        .replica()
        .batcher()
        .submit(
            principal,
            vec![ClientCommand {
                request_id,
                command,
            }],
        )
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal("a stream request got no result".into()))?;
    match result {
        CommandResult::StreamStarted { job } => Ok(StreamReply::Started(job)),
        CommandResult::Accepted => Ok(StreamReply::Cancelled),
        CommandResult::StreamRedriven { items, tasks } => {
            for t in tasks {
                invoker.dispatch(t).await;
            }
            Ok(StreamReply::Redriven(items))
        }
        CommandResult::Rejected { reason } if reason.contains("does not exist") => {
            Err(ApiError::NotFound(reason))
        }
        CommandResult::Rejected { reason } => Err(ApiError::FailedPrecondition(reason)),
        CommandResult::Throttled { reason } => Err(ApiError::Throttled(reason)),
        CommandResult::Invalid(e) => Err(ApiError::InvalidArgument(e.to_string())),
        other => Err(ApiError::Internal(format!(
            "a stream request was answered with {other:?}"
        ))),
    }
}

/// Refuses a start whose function is missing or whose source this node cannot read.
async fn check_start(replica: &Replica, req: &StreamStartRequest) -> Result<(), ApiError> {
    req.source.validate().map_err(ApiError::InvalidArgument)?;
    req.options.validate().map_err(ApiError::InvalidArgument)?;
    let exists = replica.state(|sm| sm.sched().function(&req.function).is_some());
    if !exists {
        return Err(ApiError::NotFound(format!(
            "function {} does not exist",
            req.function
        )));
    }
    let source = req.source.clone();
    let sources = replica.sources().clone();
    tokio::task::spawn_blocking(move || check_source(&sources, &source))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| {
            ApiError::InvalidArgument(format!(
                "{e} (the source is read by the leader: it must be at the same path, beneath a sources root, on every node)"
            ))
        })
}

/// Reads one stream job.
pub async fn get(
    replica: &Replica,
    id: StreamId,
    read: ReadConsistency,
) -> Result<Option<StreamJob>, ApiError> {
    match replica.read(ReadOp::Stream { id }, read).await? {
        ReadResult::Stream(j) => Ok(j.map(|j| *j)),
        _ => Err(ApiError::Internal(
            "a stream read was answered with another read".into(),
        )),
    }
}

/// Reads every stream job.
pub async fn list(replica: &Replica, read: ReadConsistency) -> Result<Vec<StreamJob>, ApiError> {
    match replica.read(ReadOp::Streams, read).await? {
        ReadResult::Streams(j) => Ok(j),
        _ => Err(ApiError::Internal(
            "a stream list was answered with another read".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A root holding one file with `content`: the root (kept alive), its roots and the
    /// file's path.
    fn file(content: &str) -> (tempfile::TempDir, SourceRoots, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(content.as_bytes()))
            .expect("write");
        let roots = SourceRoots::open(&[dir.path().to_path_buf()], &[]).expect("root");
        let path = path.to_str().expect("utf-8").to_string();
        (dir, roots, path)
    }

    fn texts(b: &Batch) -> Vec<String> {
        b.items
            .iter()
            .map(|i| match i {
                StreamItem::Ok(b) => String::from_utf8_lossy(b).into_owned(),
                StreamItem::Bad(e) => format!("BAD {e}"),
            })
            .collect()
    }

    const LIMIT: ReadLimit = ReadLimit {
        items: 2,
        bytes: 1 << 20,
    };

    #[test]
    fn jsonl_resumes_at_its_byte_offset_and_fails_bad_lines() {
        let (_d, r, path) = file("{\"a\":1}\n\n not json\n[2]\r\n3");
        let path = path.as_str();
        let b = read_jsonl(&r, path, "", LIMIT).expect("read");
        assert_eq!(texts(&b)[0], "{\"a\":1}");
        assert!(texts(&b)[1].starts_with("BAD the line at byte 9 is not JSON"));
        assert!(!b.exhausted);
        let b2 = read_jsonl(&r, path, &b.to_cursor, LIMIT).expect("read");
        assert_eq!(texts(&b2), vec!["[2]", "3"]);
        assert!(b2.exhausted);
        let end = read_jsonl(&r, path, &b2.to_cursor, LIMIT).expect("read");
        assert!(end.items.is_empty() && end.exhausted);
    }

    #[test]
    fn jsonl_line_longer_than_the_bound_is_one_failed_item() {
        let long = "1".repeat(RECORD_BYTES_MAX + 10);
        let (_d, r, path) = file(&format!("{long}\n2\n"));
        let b = read_jsonl(&r, &path, "", LIMIT).expect("read");
        assert!(texts(&b)[0].contains("longer than"));
        assert_eq!(texts(&b)[1], "2");
    }

    #[test]
    fn csv_quotes_header_objects_and_malformed_records() {
        let (_d, r, path) =
            file("name,note\n\"Smith, J\",\"said \"\"hi\"\"\nthen left\"\nx\nplain,ok\n");
        let b = read_csv(
            &r,
            &path,
            "",
            ReadLimit {
                items: 3,
                bytes: 1 << 20,
            },
        )
        .expect("read");
        let t = texts(&b);
        let first: Value = serde_json::from_str(&t[0]).expect("json");
        assert_eq!(first["name"], "Smith, J");
        assert_eq!(first["note"], "said \"hi\"\nthen left");
        assert!(t[1].starts_with("BAD the record at byte"), "{t:?}");
        assert!(t[2].contains("\"plain\""));
        assert!(b.exhausted);
        let (_d, r, bad) = file("a,b\n\"open,1\n");
        let e = check_source(&r, &StreamSource::Csv { path: bad });
        assert!(e.is_err_and(|e| e.contains("malformed")));
    }

    #[test]
    fn dir_lists_in_name_order_from_the_cursor() {
        let d = tempfile::tempdir().expect("dir");
        for name in ["b", "a", "c"] {
            std::fs::write(d.path().join(name), name).expect("write");
        }
        std::fs::create_dir(d.path().join("sub")).expect("mkdir");
        std::os::unix::fs::symlink(d.path().join("a"), d.path().join("ab-link")).expect("symlink");
        let r = SourceRoots::open(&[d.path().to_path_buf()], &[]).expect("root");
        let path = d.path().to_str().expect("utf-8");
        let b = read_dir(&r, path, "", LIMIT).expect("read");
        assert_eq!(
            texts(&b),
            vec![
                "{\"content\":\"a\",\"path\":\"a\"}",
                "{\"content\":\"b\",\"path\":\"b\"}"
            ]
        );
        assert!(!b.exhausted);
        let b2 = read_dir(&r, path, &b.to_cursor, LIMIT).expect("read");
        assert_eq!(b2.items.len(), 1);
        assert!(b2.exhausted);
    }
}
