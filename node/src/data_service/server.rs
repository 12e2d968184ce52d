//! The socket: [`bind`] makes it reachable by sandboxes only, an accept loop serves at most
//! [`CONNECTIONS_MAX`] connections, each reading bounded request lines and writing one reply
//! per line; dropping the [`DataSocket`] stops it all and removes the socket file.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::{JoinHandle, JoinSet};

use super::access_log::PEER_UID;
use super::protocol::{Reply, RequestError};
use super::service::Service;
use super::{
    AccessLog, DataAccess, KvBackend, ACCESS_RECORDS_MAX, CONNECTIONS_MAX, REQUEST_LINE_BYTES_MAX,
    RESPONSE_WRITE_TIMEOUT_MS,
};

/// A listening data socket. Dropping it stops the service and removes the socket file.
#[derive(Debug)]
pub struct DataSocket {
    path: PathBuf,
    access_log: Arc<AccessLog>,
    task: JoinHandle<()>,
}

impl DataSocket {
    /// The socket's path on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The log of the accesses made through this socket.
    pub fn access_log(&self) -> Arc<AccessLog> {
        self.access_log.clone()
    }
}

impl Drop for DataSocket {
    fn drop(&mut self) {
        // The accept loop owns the connections (a JoinSet): aborting it aborts them too.
        self.task.abort();
        if let Err(error) = std::fs::remove_file(&self.path) {
            if error.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), %error, "cannot remove data socket");
            }
        }
    }
}

/// Binds the data socket at `path` for a function with `access`, and serves it until the
/// returned [`DataSocket`] is dropped. Must be called inside a tokio runtime.
///
/// A socket file left at `path` by an earlier run is removed; any other kind of file there is
/// an error. Only sandboxes may connect: the socket is `root:G` mode 0660 and the directory
/// holding it (which must hold data sockets only) `root:G` mode 0710, where G is the group
/// every sandbox runs as (`skiff_sandbox::host_id_range().group()`), an id no local account
/// has. A local user can neither reach the socket nor connect to it; a sandbox, whatever its
/// uid, connects through its group. Every directory above the socket's must be traversable
/// (`o+x`) by the sandbox's uid. Run by a user other than root (tests), the socket and its
/// directory keep their owner and group: only that user connects.
pub async fn bind(
    path: &Path,
    access: DataAccess,
    backend: Arc<dyn KvBackend>,
) -> io::Result<DataSocket> {
    let context = |what: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot {what} data socket {}: {e}", path.display()),
        )
    };
    match tokio::fs::symlink_metadata(path).await {
        Ok(meta) if meta.file_type().is_socket() => tokio::fs::remove_file(path)
            .await
            .map_err(|e| context("remove the stale", e))?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "cannot bind data socket {}: a file that is not a socket is in the way",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(context("inspect", e)),
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    restrict_to_sandboxes(dir, 0o710).map_err(|e| context("restrict the directory of", e))?;
    let listener = UnixListener::bind(path).map_err(|e| context("bind", e))?;
    restrict_to_sandboxes(path, 0o660).map_err(|e| context("restrict", e))?;
    let access_log = Arc::new(AccessLog::new(ACCESS_RECORDS_MAX));
    let service = Arc::new(Service {
        access,
        backend,
        log: access_log.clone(),
    });
    let task = tokio::spawn(accept_loop(listener, service));
    Ok(DataSocket {
        path: path.to_path_buf(),
        access_log,
        task,
    })
}

/// Gives `path` to root and the sandboxes' group (when run as root) with `mode`.
fn restrict_to_sandboxes(path: &Path, mode: u32) -> io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        let group = skiff_sandbox::host_id_range().group();
        std::os::unix::fs::chown(path, Some(0), Some(group))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// The pause after a failed accept (out of file descriptors and the like) before the next.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(50);

async fn accept_loop(listener: UnixListener, service: Arc<Service>) {
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: wait and keep serving.
                tracing::warn!(%error, "data socket accept failed");
                tokio::time::sleep(ACCEPT_RETRY_PAUSE).await;
                continue;
            }
        };
        while let Some(done) = connections.try_join_next() {
            if let Err(error) = done {
                tracing::warn!(%error, "data connection task failed");
            }
        }
        if connections.len() >= CONNECTIONS_MAX {
            let reply = Reply::error(&RequestError::Unavailable(format!(
                "too many connections: at most {CONNECTIONS_MAX} at once"
            )));
            // Best effort: a fresh socket's buffer takes one short line without blocking.
            let _ = stream.try_write(&reply.to_line());
            continue;
        }
        let service = service.clone();
        connections.spawn(async move {
            if let Err(error) = serve_connection(stream, &service).await {
                tracing::debug!(%error, "data connection closed");
            }
        });
    }
}

async fn serve_connection(stream: UnixStream, service: &Service) -> io::Result<()> {
    let uid = stream.peer_cred().ok().map(|c| c.uid());
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(REQUEST_LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if read == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') && line.len() > REQUEST_LINE_BYTES_MAX {
            let reply = service.refusal(&RequestError::Invalid(format!(
                "request line is longer than {REQUEST_LINE_BYTES_MAX} bytes; closing"
            )));
            send(&mut write, &reply).await?;
            return Ok(());
        }
        // A last line without its newline (the client shut down its side) is still a request.
        let reply = PEER_UID.scope(uid, service.handle(&line)).await;
        send(&mut write, &reply).await?;
    }
}

async fn send(write: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> io::Result<()> {
    let line = reply.to_line();
    tokio::time::timeout(
        Duration::from_millis(RESPONSE_WRITE_TIMEOUT_MS),
        write.write_all(&line),
    )
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("client did not read its response within {RESPONSE_WRITE_TIMEOUT_MS} ms"),
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use futures::future::BoxFuture;
    use skiff_raft_store::model::{CommandResult, KvEntry, KvPage, VALUE_BYTES_MAX};

    use crate::data_service::{AccessOp, AccessRecord, Accesses, MemoryBackend};

    fn access(read: &[&str], write: &[&str]) -> DataAccess {
        DataAccess {
            read_prefixes: read.iter().map(|s| s.to_string()).collect(),
            write_prefixes: write.iter().map(|s| s.to_string()).collect(),
        }
    }

    struct Conn {
        reader: BufReader<tokio::net::unix::OwnedReadHalf>,
        writer: tokio::net::unix::OwnedWriteHalf,
    }

    impl Conn {
        async fn open(path: &Path) -> Conn {
            let stream = UnixStream::connect(path).await.expect("connect");
            let (read, writer) = stream.into_split();
            Conn {
                reader: BufReader::new(read),
                writer,
            }
        }

        async fn send_raw(&mut self, bytes: &[u8]) {
            self.writer.write_all(bytes).await.expect("write request");
        }

        async fn recv(&mut self) -> Option<Value> {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).await.expect("read reply");
            if n == 0 {
                return None;
            }
            assert!(line.ends_with('\n'), "reply without newline: {line:?}");
            Some(serde_json::from_str(&line).expect("reply is JSON"))
        }

        async fn call(&mut self, request: Value) -> Value {
            let mut line = serde_json::to_vec(&request).expect("json");
            line.push(b'\n');
            self.send_raw(&line).await;
            self.recv().await.expect("a reply")
        }
    }

    async fn serve(access: DataAccess) -> (tempfile::TempDir, DataSocket) {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = bind(
            &dir.path().join("data.sock"),
            access,
            Arc::new(MemoryBackend::new()),
        )
        .await
        .expect("bind");
        (dir, socket)
    }

    #[tokio::test]
    async fn get_put_list_delete_round_trip() {
        let (_dir, socket) = serve(access(&[], &["app/"])).await;
        let mut c = Conn::open(socket.path()).await;

        let r = c.call(json!({"op": "get", "key": "app/a"})).await;
        assert_eq!(r, json!({"ok": true, "found": false}));

        let r = c
            .call(json!({"op": "put", "key": "app/a", "value": "one"}))
            .await;
        assert_eq!(r, json!({"ok": true, "version": 1}));
        let r = c
            .call(json!({"op": "put", "key": "app/b", "value_b64": "AP8=", "expect_version": 0}))
            .await;
        assert_eq!(r, json!({"ok": true, "version": 2}));

        let r = c.call(json!({"op": "get", "key": "app/a"})).await;
        assert_eq!(
            r,
            json!({"ok": true, "found": true, "value": "one", "version": 1})
        );
        // Binary values come back as base64.
        let r = c.call(json!({"op": "get", "key": "app/b"})).await;
        assert_eq!(
            r,
            json!({"ok": true, "found": true, "value_b64": "AP8=", "version": 2})
        );

        let r = c
            .call(json!({"op": "put", "key": "app/a", "value": "two", "expect_version": 5}))
            .await;
        assert_eq!(r["ok"], false);
        assert_eq!(r["code"], "conflict");
        assert_eq!(r["current"], 1);
        assert_eq!(r["error"], r#""app/a" is at version 1, not the expected 5"#);

        let r = c
            .call(json!({"op": "list", "prefix": "app/", "limit": 1}))
            .await;
        assert_eq!(
            r,
            json!({"ok": true, "entries": [{"key": "app/a", "value": "one", "version": 1}], "next": "app/a"})
        );
        let r = c
            .call(json!({"op": "list", "prefix": "app/", "start_after": "app/a"}))
            .await;
        assert_eq!(
            r,
            json!({"ok": true, "entries": [{"key": "app/b", "value_b64": "AP8=", "version": 2}]})
        );

        let r = c
            .call(json!({"op": "delete", "key": "app/a", "expect_version": 1}))
            .await;
        assert_eq!(r, json!({"ok": true, "version": 1}));
        let r = c.call(json!({"op": "delete", "key": "app/a"})).await;
        assert_eq!(r["code"], "not_found");
        assert_eq!(r["error"], r#""app/a" does not exist"#);
        let r = c.call(json!({"op": "get", "key": "app/a"})).await;
        assert_eq!(r, json!({"ok": true, "found": false}));
    }

    #[tokio::test]
    async fn accesses_outside_the_grant_are_denied_and_logged() {
        let (_dir, socket) = serve(access(&["shared/"], &["own/"])).await;
        let mut c = Conn::open(socket.path()).await;

        let r = c.call(json!({"op": "get", "key": "secret/x"})).await;
        assert_eq!(r["ok"], false);
        assert_eq!(r["code"], "denied");
        assert_eq!(
            r["error"],
            r#"get of "secret/x" denied: this function may read keys starting with "shared/", "own/" and write keys starting with "own/""#
        );
        let r = c
            .call(json!({"op": "put", "key": "shared/x", "value": "v"}))
            .await;
        assert_eq!(r["code"], "denied");
        assert!(r["error"]
            .as_str()
            .expect("message")
            .starts_with(r#"put of "shared/x" denied"#));
        let r = c.call(json!({"op": "delete", "key": "shared/x"})).await;
        assert_eq!(r["code"], "denied");
        let r = c.call(json!({"op": "list", "prefix": ""})).await;
        assert_eq!(r["code"], "denied");

        // Allowed accesses still work on the same connection.
        let r = c
            .call(json!({"op": "put", "key": "own/x", "value": "v"}))
            .await;
        assert_eq!(r, json!({"ok": true, "version": 1}));
        let r = c.call(json!({"op": "get", "key": "shared/y"})).await;
        assert_eq!(r, json!({"ok": true, "found": false}));
        let r = c.call(json!({"op": "list", "prefix": "own/"})).await;
        assert_eq!(r["entries"][0]["key"], "own/x");

        let record = |op, key: &str, version, allowed| AccessRecord {
            op,
            key: key.to_string(),
            version,
            allowed,
        };
        let taken = socket.access_log().take();
        assert_eq!(taken.dropped, 0);
        assert_eq!(
            taken.records,
            vec![
                record(AccessOp::Get, "secret/x", 0, false),
                record(AccessOp::Put, "shared/x", 0, false),
                record(AccessOp::Delete, "shared/x", 0, false),
                record(AccessOp::List, "", 0, false),
                record(AccessOp::Put, "own/x", 1, true),
                record(AccessOp::Get, "shared/y", 0, true),
                record(AccessOp::List, "own/", 1, true),
            ]
        );
        assert_eq!(socket.access_log().take(), Accesses::default());
    }

    #[tokio::test]
    async fn malformed_lines_get_an_error_and_the_connection_stays_usable() {
        let (_dir, socket) = serve(access(&["a/"], &[])).await;
        let mut c = Conn::open(socket.path()).await;
        for bad in [
            &b"not json\n"[..],
            b"{\"op\":\"get\"}\n",
            b"{\"op\":\"rename\",\"key\":\"a/x\"}\n",
            b"{\"op\":\"put\",\"key\":\"a/x\",\"value\":\"v\",\"expected_version\":1}\n",
            b"\xff\xfe\n",
            b"\n",
        ] {
            c.send_raw(bad).await;
            let r = c.recv().await.expect("a reply");
            assert_eq!(r["ok"], false, "{bad:?}");
            assert_eq!(r["code"], "invalid", "{bad:?}");
            assert!(
                r["error"]
                    .as_str()
                    .expect("message")
                    .starts_with("malformed request: "),
                "{r}"
            );
        }
        // Well-formed but invalid: the key is checked, and a put needs one value field.
        let r = c.call(json!({"op": "get", "key": ""})).await;
        assert_eq!(r["code"], "invalid");
        assert_eq!(r["error"], "key is empty");
        let r = c
            .call(json!({"op": "put", "key": "a/x", "value": "v", "value_b64": "dg=="}))
            .await;
        assert_eq!(r["error"], "a put needs exactly one of value and value_b64");
        let r = c
            .call(json!({"op": "put", "key": "a/x", "value_b64": "not base64!"}))
            .await;
        assert_eq!(r["code"], "invalid");
        let r = c.call(json!({"op": "get", "key": "a/x"})).await;
        assert_eq!(r, json!({"ok": true, "found": false}));
    }

    #[tokio::test]
    async fn an_overlong_line_is_refused_and_the_connection_closed() {
        let (_dir, socket) = serve(access(&[""], &[""])).await;
        // A value at the limit fits in one line.
        let mut c = Conn::open(socket.path()).await;
        let value = "v".repeat(VALUE_BYTES_MAX);
        let r = c
            .call(json!({"op": "put", "key": "big", "value": value}))
            .await;
        assert_eq!(r, json!({"ok": true, "version": 1}));
        let r = c
            .call(json!({"op": "put", "key": "big", "value": format!("{value}v")}))
            .await;
        assert_eq!(r["code"], "invalid");
        assert_eq!(r["error"], "value is 1048577 bytes, the limit is 1048576");

        let mut c = Conn::open(socket.path()).await;
        let writer = tokio::spawn(async move {
            let line = vec![b' '; REQUEST_LINE_BYTES_MAX + 10];
            // The server may close before reading everything: a failed write is expected.
            let _ = c.writer.write_all(&line).await;
            c.reader
        });
        let mut reader = writer.await.expect("writer task");
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("read reply");
        let r: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(r["code"], "invalid");
        assert_eq!(
            r["error"],
            format!("request line is longer than {REQUEST_LINE_BYTES_MAX} bytes; closing")
        );
        // Then the end: the server closed with our unread bytes queued, which Linux reports as
        // a reset once the reply has been read.
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(n) => assert_eq!(n, 0, "{line:?}"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        }
    }

    #[tokio::test]
    async fn the_access_log_keeps_its_bound_and_counts_the_rest() {
        let (_dir, socket) = serve(access(&["k/"], &[])).await;
        let extra = 5;
        let total = ACCESS_RECORDS_MAX + extra;
        let stream = UnixStream::connect(socket.path()).await.expect("connect");
        let (read, mut write) = stream.into_split();
        let sender = tokio::spawn(async move {
            for i in 0..total {
                let line = format!("{{\"op\":\"get\",\"key\":\"k/{i}\"}}\n");
                write.write_all(line.as_bytes()).await.expect("write");
            }
            write
        });
        let mut lines = BufReader::new(read).lines();
        for _ in 0..total {
            let line = lines.next_line().await.expect("read").expect("a reply");
            assert_eq!(line, r#"{"ok":true,"found":false}"#);
        }
        let _write = sender.await.expect("sender");
        let taken = socket.access_log().take();
        assert_eq!(taken.records.len(), ACCESS_RECORDS_MAX);
        assert_eq!(taken.dropped, extra as u64);
        assert_eq!(taken.records[0].key, "k/0");
        assert_eq!(
            taken.records[ACCESS_RECORDS_MAX - 1].key,
            format!("k/{}", ACCESS_RECORDS_MAX - 1)
        );
    }

    #[tokio::test]
    async fn large_list_pages_are_cut_by_bytes_with_a_next_key() {
        let (_dir, socket) = serve(access(&[], &["l/"])).await;
        let mut c = Conn::open(socket.path()).await;
        let value = "x".repeat(VALUE_BYTES_MAX);
        for i in 0..6 {
            let r = c
                .call(json!({"op": "put", "key": format!("l/{i}"), "value": value}))
                .await;
            assert_eq!(r["ok"], true);
        }
        let mut seen = Vec::new();
        let mut start_after: Option<String> = None;
        loop {
            let r = c
                .call(json!({"op": "list", "prefix": "l/", "start_after": start_after}))
                .await;
            let entries = r["entries"].as_array().expect("entries");
            assert!(
                !entries.is_empty() && entries.len() <= 4,
                "{}",
                entries.len()
            );
            seen.extend(
                entries
                    .iter()
                    .map(|e| e["key"].as_str().expect("key").to_string()),
            );
            match r.get("next").and_then(Value::as_str) {
                Some(next) => start_after = Some(next.to_string()),
                None => break,
            }
        }
        let want: Vec<String> = (0..6).map(|i| format!("l/{i}")).collect();
        assert_eq!(seen, want);
    }

    #[tokio::test]
    async fn connections_past_the_bound_are_refused_with_a_reason() {
        let (_dir, socket) = serve(access(&["k/"], &[])).await;
        let mut open = Vec::new();
        for _ in 0..CONNECTIONS_MAX {
            let mut c = Conn::open(socket.path()).await;
            // A round trip proves the connection is being served.
            let r = c.call(json!({"op": "get", "key": "k/x"})).await;
            assert_eq!(r["ok"], true);
            open.push(c);
        }
        let mut refused = Conn::open(socket.path()).await;
        let r = refused.recv().await.expect("a refusal");
        assert_eq!(r["code"], "unavailable");
        assert_eq!(
            r["error"],
            format!(
                "the store is unavailable: too many connections: at most {CONNECTIONS_MAX} at once"
            )
        );
        assert!(refused.recv().await.is_none());
        // Closing one frees a slot; the server notices the close asynchronously, so a new
        // connection may be refused a few times first.
        drop(open.pop());
        let mut again = false;
        for _ in 0..100 {
            let mut c = Conn::open(socket.path()).await;
            // A refused connection may already be closed: the write may fail, the read tells.
            let _ = c
                .writer
                .write_all(b"{\"op\":\"get\",\"key\":\"k/x\"}\n")
                .await;
            if c.recv().await.is_some_and(|r| r["ok"] == true) {
                again = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(again, "a slot was freed");
    }

    #[tokio::test]
    async fn binding_replaces_a_stale_socket_and_dropping_removes_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data.sock");
        let stale = std::os::unix::net::UnixListener::bind(&path).expect("stale socket");
        drop(stale);
        let socket = bind(&path, DataAccess::default(), Arc::new(MemoryBackend::new()))
            .await
            .expect("bind over a stale socket");
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660);
        let dir_meta = std::fs::metadata(dir.path()).expect("directory");
        assert_eq!(dir_meta.permissions().mode() & 0o777, 0o710);
        if nix::unistd::geteuid().is_root() {
            use std::os::unix::fs::MetadataExt;
            let group = skiff_sandbox::host_id_range().group();
            let meta = std::fs::metadata(&path).expect("socket");
            assert_eq!((meta.uid(), meta.gid()), (0, group));
            assert_eq!((dir_meta.uid(), dir_meta.gid()), (0, group));
        }
        drop(socket);
        assert!(!path.exists());

        std::fs::write(&path, b"not a socket").expect("write");
        let err = bind(&path, DataAccess::default(), Arc::new(MemoryBackend::new()))
            .await
            .expect_err("a regular file is in the way");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).expect("still there"), b"not a socket");
    }

    #[tokio::test]
    async fn a_failing_backend_is_unavailable_and_not_logged() {
        struct Down;
        impl KvBackend for Down {
            fn get(&self, _: String) -> BoxFuture<'static, Result<Option<KvEntry>, String>> {
                Box::pin(async { Err("no leader".to_string()) })
            }
            fn put(
                &self,
                _: String,
                _: Vec<u8>,
                _: Option<u64>,
            ) -> BoxFuture<'static, Result<CommandResult, String>> {
                Box::pin(async { Err("no leader".to_string()) })
            }
            fn delete(
                &self,
                _: String,
                _: Option<u64>,
            ) -> BoxFuture<'static, Result<CommandResult, String>> {
                Box::pin(async { Err("no leader".to_string()) })
            }
            fn list(
                &self,
                _: String,
                _: Option<String>,
                _: u32,
            ) -> BoxFuture<'static, Result<KvPage, String>> {
                // A broken backend that lists outside the prefix must not leak the key.
                Box::pin(async {
                    Ok(KvPage {
                        entries: vec![KvEntry {
                            key: "other/secret".to_string(),
                            value: b"s".to_vec(),
                            version: 1,
                            create_version: 1,
                        }],
                        next: None,
                        revision: 1,
                    })
                })
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = bind(
            &dir.path().join("d.sock"),
            access(&[""], &[""]),
            Arc::new(Down),
        )
        .await
        .expect("bind");
        let mut c = Conn::open(socket.path()).await;
        let r = c.call(json!({"op": "get", "key": "x"})).await;
        assert_eq!(r["code"], "unavailable");
        assert_eq!(r["error"], "the store is unavailable: no leader");
        let r = c.call(json!({"op": "list", "prefix": "mine"})).await;
        assert_eq!(r["code"], "unavailable");
        assert!(!r.to_string().contains("\"s\""), "{r}");
        assert_eq!(socket.access_log().take(), Accesses::default());
    }
}
