//! The node's cache of unpacked code archives, and the unpacker.
//!
//! Each node unpacks into a directory of its own, `code_cache_dir/node-ID-PID-N` (several
//! nodes, or a node and its restarted self, may share `code_cache_dir`), removed when it
//! stops; a directory left by a process that no longer runs is removed when the next node
//! starts.
//!
//! Invariants:
//! - an archive is unpacked only if it follows [`ArchiveRules`] (regular files and
//!   directories, relative paths without `..`, each name once), and every file and directory
//!   is created relative to the file descriptor of its parent directory, opened with
//!   `O_NOFOLLOW | O_DIRECTORY`, files with `O_CREAT | O_EXCL | O_NOFOLLOW`: no entry path is
//!   ever joined to a host path, and nothing is created or changed outside the unpack
//!   directory even if a check were wrong;
//! - a digest's directory appears whole (unpacked under a temporary name, then renamed) or
//!   not at all;
//! - a directory in use (leased by a run, a sandbox being prepared or an idle warm sandbox)
//!   is never removed; the others go when no function version refers to their digest, and
//!   least recently used first when the cache is past [`CODE_CACHE_ENTRIES_MAX`] or
//!   [`CODE_CACHE_BYTES_MAX`].

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use skiff_client::deploy::{check_archive, ArchiveRules};

/// Most bytes one unpacked code archive may take.
pub const UNPACKED_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// Most unpacked archives a node keeps.
pub const CODE_CACHE_ENTRIES_MAX: usize = 256;
/// Most bytes of unpacked archives a node keeps (entries in use may briefly go past it).
pub const CODE_CACHE_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;

/// Why an archive was not unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The archive breaks a rule (its entry and the rule are in the text).
    #[error("refused code archive: {0}")]
    Refused(String),
    #[error("the archive unpacks to more than {UNPACKED_BYTES_MAX} bytes")]
    TooLarge,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &[u8], source: impl Into<std::io::Error>) -> UnpackError {
    UnpackError::Io {
        what,
        path: String::from_utf8_lossy(path).into_owned(),
        source: source.into(),
    }
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens directory `name` under `parent`, making it (mode 0755) if it does not exist; never
/// follows a symbolic link.
fn open_or_make_dir(parent: impl AsFd, name: &[u8]) -> Result<OwnedFd, UnpackError> {
    match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(io_err("creating directory", name, e)),
    }
    let dir = rustix::fs::openat(&parent, name, DIR_FLAGS, Mode::empty())
        .map_err(|e| io_err("opening directory", name, e))?;
    Ok(dir)
}

/// Unpacks `archive` into a new directory `name` under `parent` (an open directory), all of
/// it relative to directory file descriptors; returns the bytes of its files. The directory
/// appears whole or not at all; if it exists already (unpacked before), it is kept.
pub fn unpack(parent: &OwnedFd, name: &str, archive: &[u8]) -> Result<u64, UnpackError> {
    // Refuse a bad archive before creating anything.
    check_archive(archive).map_err(UnpackError::Refused)?;
    let tmp = format!(".{name}.tmp");
    remove_entry(parent, &tmp);
    rustix::fs::mkdirat(parent, tmp.as_str(), Mode::from_raw_mode(0o700))
        .map_err(|e| io_err("creating", tmp.as_bytes(), e))?;
    let result = (|| {
        let root = rustix::fs::openat(parent, tmp.as_str(), DIR_FLAGS, Mode::empty())
            .map_err(|e| io_err("opening", tmp.as_bytes(), e))?;
        let bytes = unpack_into(&root, archive)?;
        rustix::fs::fchmod(&root, Mode::from_raw_mode(0o755))
            .map_err(|e| io_err("setting the mode of", tmp.as_bytes(), e))?;
        Ok(bytes)
    })();
    let bytes = match result {
        Ok(b) => b,
        Err(e) => {
            remove_entry(parent, &tmp);
            return Err(e);
        }
    };
    match rustix::fs::renameat(parent, tmp.as_str(), parent, name) {
        Ok(()) => Ok(bytes),
        Err(Errno::EXIST | Errno::NOTEMPTY) => {
            remove_entry(parent, &tmp);
            Ok(bytes)
        }
        Err(e) => {
            remove_entry(parent, &tmp);
            Err(io_err("moving into place", name.as_bytes(), e))
        }
    }
}

/// Creates every entry of `archive` under the open directory `root`.
fn unpack_into(root: &OwnedFd, archive: &[u8]) -> Result<u64, UnpackError> {
    let mut rules = ArchiveRules::default();
    let mut total = 0u64;
    let mut ar = tar::Archive::new(archive);
    let entries = ar
        .entries()
        .map_err(|e| UnpackError::Refused(format!("not a valid tar archive: {e}")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| UnpackError::Refused(format!("not a valid tar archive: {e}")))?;
        let raw_path = entry.path_bytes().into_owned();
        let checked = rules
            .check(entry.header().entry_type(), &raw_path)
            .map_err(UnpackError::Refused)?;
        let Some((last, parents)) = checked.components.split_last() else {
            continue; // `./`: the root itself.
        };
        let mut dir: Option<OwnedFd> = None;
        for part in parents {
            let next = open_or_make_dir(dir.as_ref().unwrap_or(root), part)?;
            dir = Some(next);
        }
        let dir = dir.as_ref().unwrap_or(root);
        if checked.is_dir {
            let d = open_or_make_dir(dir, last)?;
            rustix::fs::fchmod(&d, Mode::from_raw_mode(0o755))
                .map_err(|e| io_err("setting the mode of", &raw_path, e))?;
            continue;
        }
        total += entry.size();
        if total > UNPACKED_BYTES_MAX {
            return Err(UnpackError::TooLarge);
        }
        let mode = entry.header().mode().unwrap_or(0o644);
        let fd = rustix::fs::openat(
            dir,
            last.as_slice(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io_err("creating file", &raw_path, e))?;
        let mut file = std::fs::File::from(fd);
        let size = entry.size();
        let copied = std::io::copy(&mut (&mut entry).take(size), &mut file)
            .map_err(|e| io_err("writing", &raw_path, e))?;
        if copied != size {
            return Err(UnpackError::Refused(format!(
                "archive entry {:?} is cut short",
                String::from_utf8_lossy(&raw_path)
            )));
        }
        let perm = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
        rustix::fs::fchmod(&file, Mode::from_raw_mode(perm))
            .map_err(|e| io_err("setting the mode of", &raw_path, e))?;
    }
    if rules.files() == 0 {
        return Err(UnpackError::Refused("the archive holds no files".into()));
    }
    Ok(total)
}

/// Removes `name` under `parent` and everything below it, if it exists.
fn remove_entry(parent: &OwnedFd, name: &str) {
    // `remove_dir_all` does not follow symbolic links; the path is our own name under a
    // directory only this process writes.
    let path = PathBuf::from(format!("/proc/self/fd/{}", fd_number(parent))).join(name);
    match std::fs::remove_dir_all(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(%name, %error, "cannot remove from the code cache"),
    }
}

fn fd_number(fd: &OwnedFd) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// One unpacked archive the cache knows.
#[derive(Debug)]
struct Entry {
    bytes: u64,
    /// Runs, preparations and idle warm sandboxes using it.
    leases: usize,
    last_used: Instant,
}

type Entries = Arc<Mutex<HashMap<String, Entry>>>;

/// A use of one unpacked archive: while it lives the directory is not removed.
#[derive(Debug)]
pub struct CodeLease {
    entries: Entries,
    digest: String,
    dir: PathBuf,
}

impl CodeLease {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }
}

impl Clone for CodeLease {
    fn clone(&self) -> Self {
        if let Some(e) = lock(&self.entries).get_mut(&self.digest) {
            e.leases += 1;
        }
        CodeLease {
            entries: self.entries.clone(),
            digest: self.digest.clone(),
            dir: self.dir.clone(),
        }
    }
}

impl Drop for CodeLease {
    fn drop(&mut self) {
        if let Some(e) = lock(&self.entries).get_mut(&self.digest) {
            e.leases = e.leases.saturating_sub(1);
            e.last_used = Instant::now();
        }
    }
}

/// The unpacked archives of one node process.
pub struct CodeCache {
    root: PathBuf,
    entries: Entries,
    /// One unpack at a time (an unpack is disk-bound; two of one digest would race).
    unpacking: tokio::sync::Mutex<()>,
    entries_max: usize,
    bytes_max: u64,
}

impl CodeCache {
    /// The cache of node `id` under `base` (the configured `code_cache_dir`), removing what
    /// processes that no longer run left there.
    pub fn new(base: &Path, id: u64) -> Self {
        // Several nodes may run in one process (tests): each cache has a directory of its own.
        static CACHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = CACHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        remove_dead_caches(base);
        CodeCache {
            root: base.join(format!("node-{id}-{}-{n}", std::process::id())),
            entries: Arc::default(),
            unpacking: tokio::sync::Mutex::new(()),
            entries_max: CODE_CACHE_ENTRIES_MAX,
            bytes_max: CODE_CACHE_BYTES_MAX,
        }
    }

    /// The same with other bounds (tests).
    pub fn with_bounds(mut self, entries_max: usize, bytes_max: u64) -> Self {
        self.entries_max = entries_max;
        self.bytes_max = bytes_max;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Digests unpacked, with their leases (tests and metrics).
    pub fn entries(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> = lock(&self.entries)
            .iter()
            .map(|(d, e)| (d.clone(), e.leases))
            .collect();
        v.sort();
        v
    }

    fn lease_existing(&self, digest: &str) -> Option<CodeLease> {
        let mut entries = lock(&self.entries);
        let e = entries.get_mut(digest)?;
        e.leases += 1;
        e.last_used = Instant::now();
        Some(CodeLease {
            entries: self.entries.clone(),
            digest: digest.to_string(),
            dir: self.root.join(digest),
        })
    }

    /// A lease on the unpacked code of `digest`, unpacking `archive()` first if needed
    /// (`archive` is only called then). `digest` is 64 hex digits (checked at deploy).
    pub async fn lease<F, Fut>(&self, digest: &str, archive: F) -> Result<CodeLease, String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<u8>, String>>,
    {
        if !(digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err(format!("bad code digest {digest:?}"));
        }
        if let Some(l) = self.lease_existing(digest) {
            return Ok(l);
        }
        let _one = self.unpacking.lock().await;
        if let Some(l) = self.lease_existing(digest) {
            return Ok(l);
        }
        let bytes = archive().await?;
        // Room for one more entry first, so the bound holds once it is in.
        self.evict(self.entries_max.saturating_sub(1), self.bytes_max);
        if lock(&self.entries).len() >= self.entries_max {
            return Err(format!(
                "the code cache holds {} archives, all in use",
                self.entries_max
            ));
        }
        let root = self.root.clone();
        let name = digest.to_string();
        let unpacked = tokio::task::spawn_blocking(move || -> Result<u64, String> {
            std::fs::create_dir_all(&root)
                .map_err(|e| format!("creating the code cache {}: {e}", root.display()))?;
            let parent = rustix::fs::open(&root, DIR_FLAGS, Mode::empty())
                .map_err(|e| format!("opening the code cache {}: {e}", root.display()))?;
            // The sandbox's unprivileged user reads code through it.
            rustix::fs::fchmod(&parent, Mode::from_raw_mode(0o755))
                .map_err(|e| format!("setting the mode of {}: {e}", root.display()))?;
            unpack(&parent, &name, &bytes).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("unpacking failed: {e}"))??;
        lock(&self.entries).insert(
            digest.to_string(),
            Entry {
                bytes: unpacked,
                leases: 0,
                last_used: Instant::now(),
            },
        );
        // Past the byte bound now: make room among the others.
        self.evict(self.entries_max, self.bytes_max);
        self.lease_existing(digest)
            .ok_or_else(|| format!("code {digest} was evicted while being unpacked"))
    }

    /// Removes unleased entries, least recently used first, until at most `entries_max`
    /// entries and `bytes_max` bytes remain (or only leased ones).
    fn evict(&self, entries_max: usize, bytes_max: u64) {
        let gone: Vec<String> = {
            let mut entries = lock(&self.entries);
            let mut free: Vec<(Instant, String)> = entries
                .iter()
                .filter(|(_, e)| e.leases == 0)
                .map(|(d, e)| (e.last_used, d.clone()))
                .collect();
            free.sort();
            let mut bytes: u64 = entries.values().map(|e| e.bytes).sum();
            let mut gone = Vec::new();
            for (_, digest) in free {
                if entries.len() <= entries_max && bytes <= bytes_max {
                    break;
                }
                if let Some(e) = entries.remove(&digest) {
                    bytes -= e.bytes;
                    gone.push(digest);
                }
            }
            gone
        };
        self.remove_dirs(&gone);
    }

    /// Removes every unleased entry whose digest is not in `wanted` (the digests the applied
    /// state's function versions refer to); returns the digests removed.
    pub fn sweep(&self, wanted: &HashSet<String>) -> Vec<String> {
        let gone: Vec<String> = {
            let mut entries = lock(&self.entries);
            let gone: Vec<String> = entries
                .iter()
                .filter(|(d, e)| e.leases == 0 && !wanted.contains(*d))
                .map(|(d, _)| d.clone())
                .collect();
            for d in &gone {
                entries.remove(d);
            }
            gone
        };
        self.remove_dirs(&gone);
        gone
    }

    fn remove_dirs(&self, digests: &[String]) {
        if digests.is_empty() {
            return;
        }
        match rustix::fs::open(&self.root, DIR_FLAGS, Mode::empty()) {
            Ok(parent) => {
                for d in digests {
                    remove_entry(&parent, d);
                }
            }
            Err(error) => {
                tracing::warn!(root = %self.root.display(), %error, "cannot open the code cache")
            }
        }
    }
}

impl Drop for CodeCache {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(root = %self.root.display(), error = %e, "cannot remove the code cache");
            }
        }
    }
}

/// Removes `base/node-ID-PID-N` directories whose process no longer runs.
fn remove_dead_caches(base: &Path) {
    let Ok(read) = std::fs::read_dir(base) else {
        return;
    };
    for item in read.flatten() {
        let name = item.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("node-"))
            .and_then(|n| n.split('-').nth(1))
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = pid as u32 == std::process::id()
            || !matches!(
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                Err(nix::errno::Errno::ESRCH)
            );
        if !alive {
            let path = base.join(&name);
            if let Err(error) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), %error, "cannot remove a dead node's code cache");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a few map updates; a panic cannot leave one half done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// One raw tar entry: the path bytes go into the header as they are, so tests can build
    /// what `tar::Builder` refuses to write.
    pub(crate) struct Raw<'a> {
        pub path: &'a str,
        pub kind: tar::EntryType,
        pub data: &'a [u8],
        pub link: Option<&'a str>,
        pub mode: u32,
    }

    pub(crate) fn file<'a>(path: &'a str, data: &'a [u8]) -> Raw<'a> {
        Raw {
            path,
            kind: tar::EntryType::Regular,
            data,
            link: None,
            mode: 0o644,
        }
    }

    pub(crate) fn raw_tar(entries: &[Raw<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in entries {
            let mut h = tar::Header::new_old();
            {
                let old = h.as_old_mut();
                old.name[..e.path.len()].copy_from_slice(e.path.as_bytes());
                if let Some(l) = e.link {
                    old.linkname[..l.len()].copy_from_slice(l.as_bytes());
                }
            }
            h.set_entry_type(e.kind);
            h.set_size(e.data.len() as u64);
            h.set_mode(e.mode);
            h.set_mtime(0);
            if matches!(e.kind, tar::EntryType::Char | tar::EntryType::Block) {
                let _ = h.set_device_major(1);
                let _ = h.set_device_minor(3);
            }
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(e.data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    fn parent(dir: &Path) -> OwnedFd {
        rustix::fs::open(dir, DIR_FLAGS, Mode::empty()).expect("open")
    }

    fn link<'a>(path: &'a str, kind: tar::EntryType, target: &'a str) -> Raw<'a> {
        Raw {
            path,
            kind,
            data: b"",
            link: Some(target),
            mode: 0o777,
        }
    }

    #[test]
    fn a_plain_archive_unpacks_with_fixed_modes() {
        let t = tempfile::tempdir().expect("tempdir");
        let archive = raw_tar(&[
            Raw {
                kind: tar::EntryType::Directory,
                mode: 0o700,
                ..file("./", b"")
            },
            Raw {
                mode: 0o4755,
                ..file("bin/run", b"#!/bin/sh\n")
            },
            file("./lib//data.txt", b"hello"),
        ]);
        let bytes = unpack(&parent(t.path()), "d", &archive).expect("unpacks");
        assert_eq!(bytes, 15);
        let mode = |p: &str| {
            std::fs::metadata(t.path().join(p))
                .expect("exists")
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("d"), 0o755);
        assert_eq!(mode("d/bin"), 0o755);
        assert_eq!(mode("d/bin/run"), 0o755, "setuid is never kept");
        assert_eq!(mode("d/lib/data.txt"), 0o644);
        assert_eq!(
            std::fs::read(t.path().join("d/lib/data.txt")).expect("read"),
            b"hello"
        );
        // Unpacking the same digest again keeps the first copy.
        unpack(&parent(t.path()), "d", &archive).expect("again");
    }

    #[test]
    fn escaping_and_special_entries_are_refused_and_nothing_is_left() {
        let outside = tempfile::tempdir().expect("tempdir");
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"keep").expect("write");
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let abs = victim.to_str().expect("utf-8").to_string();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (raw_tar(&[file(&abs, b"pwned")]), "absolute path"),
            (raw_tar(&[file("../victim", b"pwned")]), ".."),
            (raw_tar(&[file("a/../../victim", b"pwned")]), ".."),
            (
                raw_tar(&[
                    link("esc", tar::EntryType::Symlink, &abs),
                    file("esc", b"pwned"),
                ]),
                "not a regular file",
            ),
            (
                raw_tar(&[
                    link("d", tar::EntryType::Symlink, "/etc"),
                    file("d/shadow", b"pwned"),
                ]),
                "not a regular file",
            ),
            (
                raw_tar(&[link("h", tar::EntryType::Link, "/etc/shadow")]),
                "not a regular file",
            ),
            (
                raw_tar(&[Raw {
                    kind: tar::EntryType::Char,
                    ..file("null", b"")
                }]),
                "not a regular file",
            ),
            (
                raw_tar(&[Raw {
                    kind: tar::EntryType::Fifo,
                    ..file("fifo", b"")
                }]),
                "not a regular file",
            ),
            (
                raw_tar(&[file("x", b"1"), file("x", b"2")]),
                "appears twice",
            ),
            (
                raw_tar(&[file("x", b"1"), file("x/y", b"2")]),
                "goes through a file",
            ),
            (
                raw_tar(&[file("x/y", b"1"), file("x", b"2")]),
                "a file where an earlier entry made a directory",
            ),
        ];
        for (archive, expected) in cases {
            let t = tempfile::tempdir().expect("tempdir");
            let e = unpack(&parent(t.path()), "d", &archive)
                .expect_err(expected)
                .to_string();
            assert!(e.contains(expected), "{expected:?} not in {e:?}");
            assert!(
                std::fs::read_dir(t.path()).expect("list").next().is_none(),
                "a refused archive leaves nothing behind"
            );
        }
        assert_eq!(std::fs::read(&victim).expect("read"), b"keep");
        let mode = std::fs::metadata(&victim)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn an_existing_symlink_in_the_unpack_directory_is_never_followed() {
        // Even with the checks bypassed: a link planted under the temporary directory is
        // not followed by the fd-relative walk.
        let t = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let root = t.path().join("root");
        std::fs::create_dir(&root).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), root.join("lib")).expect("symlink");
        let fd = rustix::fs::open(&root, DIR_FLAGS, Mode::empty()).expect("open");
        let archive = raw_tar(&[file("lib/x", b"pwned")]);
        let e = unpack_into(&fd, &archive).expect_err("through a symlink");
        assert!(e.to_string().contains("lib"), "{e}");
        assert!(std::fs::read_dir(outside.path())
            .expect("list")
            .next()
            .is_none());
        std::fs::write(outside.path().join("x"), b"keep").expect("write");
        std::os::unix::fs::symlink(outside.path().join("x"), root.join("y")).expect("symlink");
        let e = unpack_into(&fd, &raw_tar(&[file("y", b"pwned")])).expect_err("last component");
        assert!(e.to_string().contains("creating file"), "{e}");
        assert_eq!(
            std::fs::read(outside.path().join("x")).expect("read"),
            b"keep"
        );
    }

    #[tokio::test]
    async fn the_cache_removes_unwanted_unleased_entries_and_keeps_its_bound() {
        let t = tempfile::tempdir().expect("tempdir");
        let cache = CodeCache::new(t.path(), 1).with_bounds(2, u64::MAX);
        let archive = |n: u8| {
            let data = vec![n; 10];
            async move { Ok(raw_tar(&[file("f", &data)])) }
        };
        let d = |n: u8| format!("{:064x}", n);
        let a = cache.lease(&d(1), || archive(1)).await.expect("a");
        assert!(a.dir().join("f").is_file());
        let b = cache.lease(&d(2), || archive(2)).await.expect("b");
        // Both leased: a third does not fit.
        let e = cache
            .lease(&d(3), || archive(3))
            .await
            .expect_err("all in use");
        assert!(e.contains("all in use"), "{e}");
        drop(a);
        // The unleased one goes to make room.
        let c = cache.lease(&d(3), || archive(3)).await.expect("c");
        assert_eq!(
            cache.entries(),
            vec![(d(2), 1), (d(3), 1)],
            "the least recently used unleased entry was evicted"
        );
        assert!(!cache.root().join(d(1)).exists());
        // A sweep keeps what is wanted or leased.
        drop(b);
        let wanted: HashSet<String> = [d(3)].into_iter().collect();
        assert_eq!(cache.sweep(&wanted), vec![d(2)]);
        assert!(!cache.root().join(d(2)).exists());
        drop(c);
        assert!(cache.sweep(&HashSet::new()) == vec![d(3)]);
        assert!(cache.entries().is_empty());
        let root = cache.root().to_path_buf();
        drop(cache);
        assert!(!root.exists(), "the process's cache goes with it");
    }

    #[test]
    fn caches_of_dead_processes_are_removed() {
        let t = tempfile::tempdir().expect("tempdir");
        // PIDs above the kernel's maximum never run.
        let dead = t.path().join("node-1-99999999-0");
        let mine = t.path().join(format!("node-2-{}-0", std::process::id()));
        let other = t.path().join("unrelated");
        for d in [&dead, &mine, &other] {
            std::fs::create_dir(d).expect("mkdir");
        }
        remove_dead_caches(t.path());
        assert!(!dead.exists());
        assert!(mine.exists() && other.exists());
    }
}
