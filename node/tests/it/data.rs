//! The data service's clients against a real socket: the `skiff-data` binary and
//! `examples/data/skiff_data.py` on the host, then both inside a real sandbox (root only).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use skiff_node::data_service::{bind, AccessOp, DataAccess, DataSocket, MemoryBackend};
use skiff_sandbox::{ExitStatus, SandboxSpec, Tier};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const SKIFF_DATA: &str = env!("CARGO_BIN_EXE_skiff-data");

fn grant() -> DataAccess {
    DataAccess {
        read_prefixes: vec!["pub/".to_string()],
        write_prefixes: vec!["own/".to_string()],
    }
}

/// A served socket in a directory others may traverse (as the sandbox's uid must).
async fn serve() -> (tempfile::TempDir, DataSocket) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = bind(
        &dir.path().join("data.sock"),
        grant(),
        Arc::new(MemoryBackend::new()),
    )
    .await
    .expect("bind");
    (dir, socket)
}

async fn cli(socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(SKIFF_DATA)
        .args(args)
        .env("SKIFF_DATA_SOCKET", socket)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn skiff-data");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin).await.expect("write stdin");
    drop(input);
    child.wait_with_output().await.expect("skiff-data runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn assert_run(out: &Output, code: i32, stdout: &[u8], stderr_starts: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(out.stdout, stdout, "stdout: {}", text(&out.stdout));
    assert!(
        text(&out.stderr).starts_with(stderr_starts),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_client_gets_puts_lists_and_removes() {
    let (_dir, socket) = serve().await;
    let path = socket.path();

    let out = cli(path, &["get", "own/a"], b"").await;
    assert_run(&out, 1, b"", "skiff-data: \"own/a\" does not exist\n");
    let out = cli(path, &["put", "own/a", "hello"], b"").await;
    assert_run(&out, 0, b"1\n", "");
    // From stdin, binary and with a newline: stored and printed back exactly.
    let out = cli(path, &["put", "own/b", "-"], b"\x00\xff\n").await;
    assert_run(&out, 0, b"2\n", "");
    let out = cli(path, &["get", "own/b"], b"").await;
    assert_run(&out, 0, b"\x00\xff\n", "");
    let out = cli(path, &["ls", "own/"], b"").await;
    assert_run(&out, 0, b"own/a\thello\nown/b\t\x00\xff\n\n", "");

    let out = cli(path, &["put", "pub/x", "v"], b"").await;
    assert_run(
        &out,
        4,
        b"",
        "skiff-data: put of \"pub/x\" denied: this function may read keys starting with \"pub/\", \"own/\" and write keys starting with \"own/\"\n",
    );
    let out = cli(path, &["ls", "secret/"], b"").await;
    assert_run(&out, 4, b"", "skiff-data: list of \"secret/\" denied");

    let out = cli(path, &["rm", "own/a"], b"").await;
    assert_run(&out, 0, b"", "");
    let out = cli(path, &["rm", "own/a"], b"").await;
    assert_run(&out, 1, b"", "skiff-data: \"own/a\" does not exist\n");
    let out = cli(path, &["get", ""], b"").await;
    assert_run(&out, 5, b"", "skiff-data: key is empty\n");

    let out = cli(path, &[], b"").await;
    assert_run(
        &out,
        2,
        b"",
        "skiff-data: no command\nusage: skiff-data get KEY",
    );
    let out = cli(path, &["cat", "x"], b"").await;
    assert_run(&out, 2, b"", "skiff-data: unknown command \"cat\"");
    let out = cli(path, &["put", "own/a"], b"").await;
    assert_run(&out, 2, b"", "skiff-data: missing VALUE");
    let out = cli(&path.with_file_name("absent.sock"), &["get", "own/a"], b"").await;
    assert_run(
        &out,
        5,
        b"",
        "skiff-data: cannot connect to the data service at ",
    );

    let log = socket.access_log().take();
    assert_eq!(log.dropped, 0);
    let denied: Vec<(AccessOp, &str)> = log
        .records
        .iter()
        .filter(|r| !r.allowed)
        .map(|r| (r.op, r.key.as_str()))
        .collect();
    assert_eq!(
        denied,
        vec![(AccessOp::Put, "pub/x"), (AccessOp::List, "secret/")]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_client_lists_across_pages() {
    let (_dir, socket) = serve().await;
    let backend_keys = 250;
    let mut want = Vec::new();
    for i in 0..backend_keys {
        let key = format!("own/{i:03}");
        let out = cli(socket.path(), &["put", &key, "v"], b"").await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        want.extend_from_slice(format!("{key}\tv\n").as_bytes());
    }
    let out = cli(socket.path(), &["ls", "own/"], b"").await;
    assert_run(&out, 0, &want, "");
}

/// `python3` on the host, or why the test cannot run.
async fn host_python() -> Option<&'static str> {
    match Command::new("python3").arg("--version").output().await {
        Ok(out) if out.status.success() => Some("python3"),
        _ => {
            eprintln!("skipping: no python3 on the host to run examples/data/skiff_data.py");
            None
        }
    }
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data")
}

/// Exercises every function of the Python module; prints one line per check.
const PY_CHECKS: &str = r#"
import skiff_data as data
print(data.get("own/n"))
print(data.put("own/n", "1", expect_version=0))
try:
    data.put("own/n", "2", expect_version=0)
except data.DataError as e:
    print(e.code, e.current)
print(data.put("own/bin", b"\x00\xff"))
print(data.get("own/bin").value)
print([(e.key, e.value, e.version) for e in data.list("own/")])
print(data.delete("own/n"), data.delete("own/n"))
try:
    data.get("secret")
except data.DataError as e:
    print(e.code, e)
"#;

const PY_EXPECTED: &str = "None\n1\nconflict 1\n2\nb'\\x00\\xff'\n[('own/bin', b'\\x00\\xff', 2), ('own/n', b'1', 1)]\n1 None\ndenied get of \"secret\" denied: this function may read keys starting with \"pub/\", \"own/\" and write keys starting with \"own/\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_module_gets_puts_lists_and_deletes() {
    let Some(python) = host_python().await else {
        return;
    };
    let (_dir, socket) = serve().await;
    let out = Command::new(python)
        .args(["-c", PY_CHECKS])
        .env("PYTHONPATH", examples_dir())
        .env("SKIFF_DATA_SOCKET", socket.path())
        .output()
        .await
        .expect("python runs");
    assert_eq!(text(&out.stdout), PY_EXPECTED, "{}", text(&out.stderr));
    assert!(out.status.success());
}

/// Whether this process can create sandboxes; says why not.
fn can_sandbox() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    if !root {
        eprintln!("skipping: running clients in a sandbox needs root");
        return false;
    }
    true
}

/// A directory others may read, holding `files` (name, contents, mode).
fn shared_dir(files: &[(&str, &[u8], u32)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for (name, contents, mode) in files {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode)).expect("chmod");
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_clients_work_inside_an_untrusted_sandbox() {
    if !can_sandbox() {
        return;
    }
    let (_dir, socket) = serve().await;
    // The build directory may not be readable by the sandbox's uid: ship a copy, as a node would.
    let helper = std::fs::read(SKIFF_DATA).expect("read skiff-data");
    let bin = shared_dir(&[("skiff-data", &helper, 0o755)]);
    let module = std::fs::read(examples_dir().join("skiff_data.py")).expect("read module");
    let code = shared_dir(&[
        ("skiff_data.py", &module, 0o644),
        ("checks.py", PY_CHECKS.as_bytes(), 0o644),
    ]);
    let mut spec = SandboxSpec::new(Tier::Untrusted, code.path());
    spec.data_socket = Some(socket.path().to_path_buf());
    spec.helper_binary = Some(bin.path().join("skiff-data"));

    let script = "skiff-data put own/sh from-sh && skiff-data get own/sh && echo && \
                  skiff-data get secret; echo \"exit $?\"";
    let argv = ["/bin/sh".to_string(), "-c".to_string(), script.to_string()];
    let out = skiff_sandbox::run(&spec, &argv, b"")
        .await
        .expect("sandbox runs");
    assert_eq!(
        text(&out.stdout),
        "1\nfrom-sh\nexit 4\n",
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).starts_with("skiff-data: get of \"secret\" denied"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status, ExitStatus::Exited(0));

    // A fresh store for the Python checks, whose versions start at 1.
    drop(socket);
    let (_dir2, socket) = serve().await;
    spec.data_socket = Some(socket.path().to_path_buf());
    let argv = ["python3".to_string(), "/code/checks.py".to_string()];
    let out = skiff_sandbox::run(&spec, &argv, b"")
        .await
        .expect("sandbox runs");
    assert_eq!(text(&out.stdout), PY_EXPECTED, "{}", text(&out.stderr));
    assert_eq!(out.status, ExitStatus::Exited(0));
}
