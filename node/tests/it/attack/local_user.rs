//! A local unprivileged user on a node: no token, but a shell on the machine.

use std::path::PathBuf;
use std::time::Duration;

use skiff_client::api::{Command, CommandResult, DataGrant, FnMode, FunctionSpec, TaskState};

use crate::functions::{archive, deploy, invoke, is_root, output, rpc, spec, write, CONFIG};
use crate::harness::{free_port, TestCluster};

/// What `nobody` gets trying to reach the data socket at `socket`: one line per attempt.
const NOBODY_PROBE: &str = r#"
import errno, os, socket, sys
path = sys.argv[1]
def name(e):
    return errno.errorcode.get(e.errno, str(e.errno))
try:
    os.listdir(os.path.dirname(path))
    print("list OK")
except OSError as e:
    print("list", name(e))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(path)
    s.sendall(b'{"op":"get","key":"in/greeting"}\n')
    print("connect OK", s.recv(4096).decode().strip())
except OSError as e:
    print("connect", name(e))
"#;

/// The Unix sockets with a path that process `pid` holds open, found through its fds and the
/// kernel's socket table (whatever directory layout the node uses).
fn unix_sockets_of(pid: u32) -> Vec<PathBuf> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the node's fds")
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|link| {
            let link = link.to_str()?.to_string();
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/unix").expect("socket table");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (inode, path) = (fields.get(6)?, fields.get(7)?);
            (path.starts_with('/') && inodes.iter().any(|i| i == inode))
                .then(|| PathBuf::from(path))
        })
        .collect()
}

/// Appends a line to a host file and puts the file back as it was on drop.
struct HostFileLine {
    path: &'static str,
    before: String,
}

impl HostFileLine {
    fn append(path: &'static str, line: &str) -> Self {
        let before = std::fs::read_to_string(path).unwrap_or_default();
        let mut after = before.clone();
        if !after.is_empty() && !after.ends_with('\n') {
            after.push('\n');
        }
        after.push_str(line);
        after.push('\n');
        std::fs::write(path, after).expect("write the host file");
        Self { path, before }
    }
}

impl Drop for HostFileLine {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, &self.before);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_local_user_cannot_connect_to_a_functions_data_socket() {
    if !is_root() {
        eprintln!("skipping: sandboxes and switching to nobody need root");
        return;
    }
    let cluster = TestCluster::start(1, CONFIG).await;
    let c = rpc(&cluster, 1).await;
    let put = write(
        &c,
        Command::KvPut {
            key: "in/greeting".into(),
            value: b"hello".to_vec(),
            expect_version: None,
        },
    )
    .await;
    assert!(matches!(put, CommandResult::Put { .. }));
    let code = archive(&[("main.sh", 0o755, "skiff-data get in/greeting || exit 9\n")]);
    let s = FunctionSpec {
        data: DataGrant {
            read_prefixes: vec!["in/".into()],
            write_prefixes: vec!["out/".into()],
        },
        ..spec("granted", &["/bin/sh", "main.sh"], FnMode::Exec)
    };
    deploy(&c, s, &code).await;
    // The function, in its sandbox, reaches the data service.
    let t = invoke(&c, "granted", b"", true).await;
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    assert_eq!(output(&t), "hello");

    let pid = cluster.node(1).child.as_ref().expect("running").id();
    let sockets = unix_sockets_of(pid);
    assert_eq!(sockets.len(), 1, "the function's data socket: {sockets:?}");
    let out = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", NOBODY_PROBE])
        .arg(&sockets[0])
        .output()
        .await
        .expect("setpriv runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout,
        "list EACCES\nconnect EACCES\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The function still reaches it after the attempt.
    let t = invoke(&c, "granted", b"", true).await;
    assert_eq!(output(&t), "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_id_range_delegated_to_a_local_user_stops_the_node() {
    if !is_root() {
        eprintln!("skipping: delegating ids in /etc/subuid needs root");
        return;
    }
    // A user delegated ids (as `useradd` does), far from the default range, so that nodes of
    // other tests are not affected; the file is put back after.
    let (start, count) = (1_500_000_000u64, 65_536u64);
    let entry = format!("skiff-local-user:{start}:{count}");
    let subuid = HostFileLine::append("/etc/subuid", &entry);
    let line = subuid.before.lines().count() + 1;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("node.toml");
    // A range whose last id is the entry's first.
    let ours = start - 999;
    std::fs::write(&config, format!("[sandbox]\nhost_ids = \"{ours}:1000\"\n"))
        .expect("write config");
    let node = tokio::process::Command::new(env!("CARGO_BIN_EXE_skiffd"))
        .args([
            "--id",
            "1",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start skiffd");
    let out = tokio::time::timeout(Duration::from_secs(20), node.wait_with_output())
        .await
        .expect("the node stops by itself")
        .expect("wait");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("/etc/subuid line {line}")) && stderr.contains(&entry),
        "{stderr}"
    );
}
