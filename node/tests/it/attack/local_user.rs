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
            "--insecure-plaintext",
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

mod dev_files {
    //! `skiffd dev` writes the admin token into `DIR/env` and keeps the TLS keys and the nodes'
    //! data in `DIR`: another user of the machine must not be able to read them.

    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::harness::free_port;

    /// `cat PATH` as the unprivileged user `nobody` (uid and gid 65534, no groups).
    fn read_as_nobody(path: &std::path::Path) -> std::process::Output {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--",
                "cat",
            ])
            .arg(path)
            .output()
            .expect("run setpriv")
    }

    /// Runs `skiffd dev --nodes 1 --dir DIR` until it is ready; returns the process.
    fn dev_cluster(dir: &std::path::Path) -> Result<std::process::Child, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_skiffd"))
            .args([
                "dev",
                "--nodes",
                "1",
                "--base-port",
                &free_port().to_string(),
            ])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start skiffd dev");
        let stdout = child.stdout.take().expect("piped");
        let mut seen = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap_or_default();
            seen.push_str(&line);
            seen.push('\n');
            if line.starts_with("ready;") {
                return Ok(child);
            }
        }
        let status = child.wait().expect("wait");
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        Err(format!("skiffd dev exited ({status}): {seen}{err}"))
    }

    fn stop(mut child: std::process::Child) {
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn the_dev_token_file_is_readable_by_its_owner_only() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: reading as another user (setpriv) needs root");
            return;
        }
        // A parent any user may enter, as /tmp or a home directory often is.
        let parent = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let dir = parent.path().join("dev");
        let dev = dev_cluster(&dir).expect("dev cluster");
        let env = dir.join("env");
        let text = std::fs::read_to_string(&env).expect("env file");
        let checks = || -> Result<(), String> {
            if !text.contains("SKIFF_TOKEN=skiff_") {
                return Err(format!("no token in {}: {text}", env.display()));
            }
            let mode = std::fs::metadata(&env)
                .map_err(|e| e.to_string())?
                .permissions()
                .mode();
            if mode & 0o777 != 0o600 {
                return Err(format!(
                    "{} has mode {:o}, not 600",
                    env.display(),
                    mode & 0o777
                ));
            }
            let dir_mode = std::fs::metadata(&dir)
                .map_err(|e| e.to_string())?
                .permissions()
                .mode();
            if dir_mode & 0o077 != 0 {
                return Err(format!("{} has mode {:o}", dir.display(), dir_mode & 0o777));
            }
            let read = read_as_nobody(&env);
            if read.status.success() || String::from_utf8_lossy(&read.stdout).contains("skiff_") {
                return Err(format!(
                    "another user read the admin token: {}",
                    String::from_utf8_lossy(&read.stdout)
                ));
            }
            // The nodes' data (every key, every function's environment) is in the directory too.
            let data = read_as_nobody(&dir.join("node-1").join("raft").join("CURRENT"));
            if data.status.success() {
                return Err("another user read the node's store".into());
            }
            Ok(())
        };
        let result = checks();
        stop(dev);
        result.expect("the token file is the owner's alone");

        // A directory others may write is refused: they could swap the files in it.
        let open = parent.path().join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        match dev_cluster(&open) {
            Ok(child) => {
                stop(child);
                panic!("skiffd dev ran in a world-writable directory");
            }
            Err(e) => assert!(e.contains("writable by others"), "{e}"),
        }
        assert!(!open.join("env").exists(), "nothing was written there");
    }
}
