//! A local unprivileged user on a node: no token, but a shell on the machine.
//!
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
    std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
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
