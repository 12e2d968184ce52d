//! Files the node opens for callers: the sources of stream jobs (`jsonl:`, `csv:`, `dir:`)
//! and the `file:` dependencies of idempotent functions. The node runs as root and a deployer
//! names these paths, so they are confined to directories the *operator* lists in the node
//! config (`[sources] roots`); with none listed every file source is refused.
//!
//! How a path is opened:
//! 1. it must be absolute, without `..`, and lie (lexically) inside a configured root (the
//!    longest one that holds it);
//! 2. the rest of the path is resolved by the kernel with `openat2` relative to the root's
//!    descriptor (opened once at start) under `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS |
//!    RESOLVE_NO_XDEV`: no symlink, `..` or mount point leads out of the root, no `/proc`
//!    magic link is followed, and a mount inside the root is not crossed;
//! 3. that open is `O_PATH`, which opens nothing (no driver's `open` runs, a FIFO does not
//!    block); its type is checked with `fstat`, and only a regular file (or a directory for a
//!    `dir:` source) goes on;
//! 4. the file is then opened for reading through that same descriptor
//!    (`/proc/self/fd/N`, which names exactly the inode checked), and the inode read is
//!    compared with the one checked.
//!
//! Invariants:
//! - no root is, holds, or lies inside `/proc`, `/sys`, `/dev`, the node's data directory,
//!   its TLS files' directories or its code cache; no root path passes through a symlink, and
//!   no root is on a kernel pseudo-filesystem (checked when the node starts);
//! - nothing that is not a regular file (or directory, for listing) is ever opened for reading;
//! - the hash cache holds at most [`HASH_CACHE_ENTRIES_MAX`] entries.
//!
//! Hard links are not refused: a hard link inside a root to a file elsewhere was made by
//! someone who can write the root, and a root is the operator's statement of what may be read.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, FileStat, SFlag};

/// Most roots a node may list.
pub const ROOTS_MAX: usize = 64;
/// Most file hashes the node remembers (by inode and times); the oldest goes first.
pub const HASH_CACHE_ENTRIES_MAX: usize = 4096;
/// Largest file an idempotent function may depend on.
pub const FILE_DEPENDENCY_BYTES_MAX: u64 = 1024 * 1024 * 1024;
/// How often an open is retried when the kernel could not rule out a `..` race (`EAGAIN`).
const OPEN_RETRIES_MAX: usize = 4;
/// Directories no root may be, hold, or lie inside, whatever else the node is configured with.
pub const FORBIDDEN_DIRS: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Why a path named by a caller cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "{path}: this node reads no files for callers: the operator opens a directory for \
         file sources with `[sources] roots = [\"/srv/data\"]` in the node config (or \
         `skiffd --sources-root DIR`)"
    )]
    NoRoots { path: String },
    #[error(
        "{path} is outside this node's sources roots ({roots}): the operator adds a root with \
         `[sources] roots` in the node config"
    )]
    OutsideRoots { path: String, roots: String },
    #[error("{path}: {reason}")]
    BadPath { path: String, reason: &'static str },
    #[error("{path} leads out of the sources root {} (through a symlink, `..` or a mount point)", root.display())]
    Escapes { path: String, root: PathBuf },
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular { path: String, kind: &'static str },
    #[error("{path} is a {kind}, not a directory")]
    NotDirectory { path: String, kind: &'static str },
    #[error("{path}: {len} bytes, the limit is {max}")]
    TooLarge { path: String, len: u64, max: u64 },
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// Why a configured root cannot be used (the node does not start).
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("{}: {reason}", path.display())]
    Bad { path: PathBuf, reason: String },
    #[error("cannot open {}: {source}", path.display())]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An `O_PATH` descriptor, closed when dropped. A raw descriptor because `openat2` returns
/// one and this crate has no `unsafe` to wrap it in an `OwnedFd`; it never leaves this module.
struct PathFd(RawFd);

impl Drop for PathFd {
    fn drop(&mut self) {
        let _ = nix::unistd::close(self.0);
    }
}

impl PathFd {
    /// The magic link that names exactly this descriptor's inode.
    fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.0))
    }
}

struct Root {
    path: PathBuf,
    dir: File,
}

/// The identity and version of a file's content as far as its inode tells: a write changes
/// the size or the modification time, and any change (even `utimes` setting the time back)
/// moves the change time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(st: &FileStat) -> FileKey {
        FileKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

#[derive(Default)]
struct HashCache {
    hashes: HashMap<FileKey, String>,
    /// Insertion order, for eviction.
    order: VecDeque<FileKey>,
    /// Files hashed (cache misses), for tests and diagnostics.
    computed: u64,
}

impl HashCache {
    fn insert(&mut self, key: FileKey, hash: String) {
        if self.hashes.insert(key, hash).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > HASH_CACHE_ENTRIES_MAX {
            if let Some(old) = self.order.pop_front() {
                self.hashes.remove(&old);
            }
        }
    }
}

/// The roots this node reads caller-named files from, opened once.
pub struct SourceRoots {
    roots: Vec<Root>,
    hashes: Mutex<HashCache>,
}

impl std::fmt::Debug for SourceRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.roots.iter().map(|r| &r.path))
            .finish()
    }
}

fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS | ResolveFlag::RESOLVE_NO_XDEV
}

fn kind_of(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symlink",
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFSOCK => "socket",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        _ => "special file",
    }
}

fn is_regular(st: &FileStat) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFREG.bits()
}

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits()
}

/// Whether `a` is `b`, holds it, or lies inside it (component-wise).
fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// The path without `.` components and repeated slashes; `None` if it has `..` or is relative.
fn normal(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return None;
    }
    Some(path.components().collect())
}

/// The real path of `p`, or of its nearest existing ancestor joined with the rest (a data
/// directory is created after the roots are checked).
fn real_path(p: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut at = p.to_path_buf();
    loop {
        if let Ok(real) = at.canonicalize() {
            return missing.iter().rev().fold(real, |acc, c| acc.join(c));
        }
        match (at.file_name().map(|n| n.to_os_string()), at.parent()) {
            (Some(name), Some(parent)) => {
                missing.push(name);
                at = parent.to_path_buf();
            }
            _ => return p.to_path_buf(),
        }
    }
}

/// Checks a root's path as written (before anything is opened): absolute, no `..`, and clear
/// of `protected` and [`FORBIDDEN_DIRS`]. Shared by config validation and [`SourceRoots::open`].
pub fn check_root_path(root: &Path, protected: &[PathBuf]) -> Result<PathBuf, String> {
    let path = normal(root).ok_or("must be an absolute path without `..`")?;
    for f in FORBIDDEN_DIRS.iter().map(PathBuf::from) {
        if overlaps(&path, &f) {
            return Err(format!(
                "is, holds or lies inside {}, which the node never reads for callers",
                f.display()
            ));
        }
    }
    for p in protected {
        for q in [normal(p).unwrap_or_else(|| p.clone()), real_path(p)] {
            if overlaps(&path, &q) {
                return Err(format!(
                    "is, holds or lies inside {}, the node's own files",
                    p.display()
                ));
            }
        }
    }
    Ok(path)
}

/// Filesystems a root may never be on: the kernel's views of itself and of its devices.
fn pseudo_fs(fs: nix::sys::statfs::FsType) -> Option<&'static str> {
    use nix::sys::statfs as s;
    let known = [
        (s::PROC_SUPER_MAGIC, "procfs"),
        (s::SYSFS_MAGIC, "sysfs"),
        (s::DEBUGFS_MAGIC, "debugfs"),
        (s::TRACEFS_MAGIC, "tracefs"),
        (s::SECURITYFS_MAGIC, "securityfs"),
        (s::CGROUP_SUPER_MAGIC, "cgroupfs"),
        (s::CGROUP2_SUPER_MAGIC, "cgroup2fs"),
        (s::BPF_FS_MAGIC, "bpffs"),
        (s::DEVPTS_SUPER_MAGIC, "devpts"),
    ];
    known.iter().find(|(m, _)| *m == fs).map(|(_, n)| *n)
}

impl SourceRoots {
    /// No roots: every file source is refused.
    pub fn none() -> SourceRoots {
        SourceRoots {
            roots: Vec::new(),
            hashes: Mutex::default(),
        }
    }

    /// Opens `roots`, refusing any that passes through a symlink, is not a directory, is on a
    /// kernel pseudo-filesystem, or is, holds or lies inside [`FORBIDDEN_DIRS`] or `protected`
    /// (the node's data, TLS and code directories).
    pub fn open(roots: &[PathBuf], protected: &[PathBuf]) -> Result<SourceRoots, RootError> {
        if roots.len() > ROOTS_MAX {
            return Err(RootError::Bad {
                path: PathBuf::new(),
                reason: format!("at most {ROOTS_MAX} roots"),
            });
        }
        let mut opened: Vec<Root> = Vec::with_capacity(roots.len());
        for root in roots {
            let bad = |reason: String| RootError::Bad {
                path: root.clone(),
                reason,
            };
            let path = check_root_path(root, protected).map_err(bad)?;
            // No symlink anywhere in the root's own path: what the operator wrote is the real
            // path, so the checks above hold for what is opened.
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
            let fd = match openat2(nix::libc::AT_FDCWD, &path, how) {
                Ok(fd) => PathFd(fd),
                Err(Errno::ELOOP) => {
                    return Err(bad(format!(
                        "passes through a symlink: list its real path{}",
                        path.canonicalize()
                            .map(|p| format!(" ({})", p.display()))
                            .unwrap_or_default()
                    )))
                }
                Err(Errno::ENOTDIR) => return Err(bad("is not a directory".into())),
                Err(e) => {
                    return Err(RootError::Open {
                        path: root.clone(),
                        source: e.into(),
                    })
                }
            };
            let dir = File::open(fd.proc_path()).map_err(|source| RootError::Open {
                path: root.clone(),
                source,
            })?;
            let fs = nix::sys::statfs::fstatfs(&dir).map_err(|e| RootError::Open {
                path: root.clone(),
                source: e.into(),
            })?;
            if let Some(name) = pseudo_fs(fs.filesystem_type()) {
                return Err(bad(format!(
                    "is on {name}, which the node never reads for callers"
                )));
            }
            if opened.iter().any(|r| r.path == path) {
                return Err(bad("is listed twice".into()));
            }
            opened.push(Root { path, dir });
        }
        Ok(SourceRoots {
            roots: opened,
            hashes: Mutex::default(),
        })
    }

    /// The roots, as configured.
    pub fn paths(&self) -> Vec<&Path> {
        self.roots.iter().map(|r| r.path.as_path()).collect()
    }

    /// The root holding `path` (the longest), and the rest of the path below it.
    fn locate(&self, path: &str) -> Result<(&Root, PathBuf), SourceError> {
        if self.roots.is_empty() {
            return Err(SourceError::NoRoots { path: path.into() });
        }
        let bad = |reason| SourceError::BadPath {
            path: path.into(),
            reason,
        };
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(bad("a file source must be an absolute path"));
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(bad("`..` is not allowed in a file source"));
        }
        let root = self
            .roots
            .iter()
            .filter(|r| p.starts_with(&r.path))
            .max_by_key(|r| r.path.components().count())
            .ok_or_else(|| SourceError::OutsideRoots {
                path: path.into(),
                roots: self
                    .roots
                    .iter()
                    .map(|r| r.path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let rest = p
            .strip_prefix(&root.path)
            .expect("the root is a prefix of the path");
        let rest = if rest.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            rest.to_path_buf()
        };
        Ok((root, rest))
    }

    /// `O_PATH` open of `rest` beneath `root` (no file is opened), and its status.
    fn open_path(
        root: &Root,
        rest: &Path,
        shown: &str,
        extra: OFlag,
    ) -> Result<(PathFd, FileStat), SourceError> {
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC | extra)
            .resolve(beneath());
        let mut tries = 0;
        let fd = loop {
            match openat2(root.dir.as_raw_fd(), rest, how) {
                Ok(fd) => break PathFd(fd),
                Err(Errno::EAGAIN) if tries < OPEN_RETRIES_MAX => tries += 1,
                Err(Errno::EXDEV) => {
                    return Err(SourceError::Escapes {
                        path: shown.into(),
                        root: root.path.clone(),
                    })
                }
                Err(e) => {
                    return Err(SourceError::Open {
                        path: shown.into(),
                        source: e.into(),
                    })
                }
            }
        };
        let st = fstat(fd.0).map_err(|e| SourceError::Open {
            path: shown.into(),
            source: e.into(),
        })?;
        Ok((fd, st))
    }

    /// Opens for reading the inode `fd` names, checked to be `st`.
    fn reopen(fd: &PathFd, st: &FileStat, shown: &str) -> Result<File, SourceError> {
        let f = File::open(fd.proc_path()).map_err(|source| SourceError::Open {
            path: shown.into(),
            source,
        })?;
        let m = f.metadata().map_err(|source| SourceError::Open {
            path: shown.into(),
            source,
        })?;
        if (m.dev(), m.ino()) != (st.st_dev, st.st_ino) {
            return Err(SourceError::Open {
                path: shown.into(),
                source: std::io::Error::other("the file changed while it was opened"),
            });
        }
        Ok(f)
    }

    /// The status of a regular file at `path`, and its `O_PATH` descriptor.
    fn regular(&self, path: &str) -> Result<(PathFd, FileStat), SourceError> {
        let (root, rest) = self.locate(path)?;
        let (fd, st) = Self::open_path(root, &rest, path, OFlag::empty())?;
        if !is_regular(&st) {
            return Err(SourceError::NotRegular {
                path: path.into(),
                kind: kind_of(&st),
            });
        }
        Ok((fd, st))
    }

    /// Opens a regular file inside a root for reading (symlinks inside the root are followed
    /// as long as they stay inside it).
    pub fn open_file(&self, path: &str) -> Result<File, SourceError> {
        let (fd, st) = self.regular(path)?;
        Self::reopen(&fd, &st, path)
    }

    /// Checks that `path` is a regular file inside a root, without opening it.
    pub fn check_file(&self, path: &str) -> Result<(), SourceError> {
        self.regular(path).map(|_| ())
    }

    /// Opens a directory inside a root for listing.
    pub fn open_dir(&self, path: &str) -> Result<SourceDir<'_>, SourceError> {
        let (root, rest) = self.locate(path)?;
        let (fd, st) = Self::open_path(root, &rest, path, OFlag::empty())?;
        if !is_dir(&st) {
            return Err(SourceError::NotDirectory {
                path: path.into(),
                kind: kind_of(&st),
            });
        }
        let entries = std::fs::read_dir(fd.proc_path()).map_err(|source| SourceError::Open {
            path: path.into(),
            source,
        })?;
        Ok(SourceDir {
            root,
            rest,
            path: path.into(),
            entries,
            _fd: fd,
        })
    }

    /// SHA-256 (hex) of a regular file inside a root of at most
    /// [`FILE_DEPENDENCY_BYTES_MAX`] bytes, from the cache when its inode, size and times have
    /// not changed since it was hashed (the file is then not opened at all).
    pub fn file_hash(&self, path: &str) -> Result<String, SourceError> {
        use sha2::{Digest, Sha256};
        let (fd, st) = self.regular(path)?;
        let len = st.st_size.max(0) as u64;
        if len > FILE_DEPENDENCY_BYTES_MAX {
            return Err(SourceError::TooLarge {
                path: path.into(),
                len,
                max: FILE_DEPENDENCY_BYTES_MAX,
            });
        }
        let key = FileKey::of(&st);
        if let Some(h) = self.cache().hashes.get(&key) {
            return Ok(h.clone());
        }
        let file = Self::reopen(&fd, &st, path)?;
        let read_err = |source| SourceError::Read {
            path: path.into(),
            source,
        };
        let mut hasher = Sha256::new();
        let mut reader = (&file).take(FILE_DEPENDENCY_BYTES_MAX);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = reader.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let hash = hex::encode(hasher.finalize());
        let mut cache = self.cache();
        cache.computed += 1;
        // Remembered only if the file did not change while it was read.
        if fstat(fd.0).is_ok_and(|after| FileKey::of(&after) == key) {
            cache.insert(key, hash.clone());
        }
        Ok(hash)
    }

    /// Files hashed so far (not answered from the cache).
    pub fn hashes_computed(&self) -> u64 {
        self.cache().computed
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashCache> {
        // The cache holds no invariant a panicking holder could break halfway.
        self.hashes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A directory inside a root being listed.
pub struct SourceDir<'a> {
    root: &'a Root,
    rest: PathBuf,
    path: String,
    entries: std::fs::ReadDir,
    /// Keeps `/proc/self/fd/N`, the listing's path, naming this directory while it is read.
    _fd: PathFd,
}

impl SourceDir<'_> {
    /// The next entry name that may be a regular file, by the type the listing reports (when
    /// it reports none, [`SourceDir::open_entry`] decides). Names that are not UTF-8 are left
    /// out. `None` at the end.
    pub fn next_name(&mut self) -> Option<Result<String, SourceError>> {
        for entry in self.entries.by_ref() {
            let entry = match entry {
                Ok(e) => e,
                Err(source) => {
                    return Some(Err(SourceError::Read {
                        path: self.path.clone(),
                        source,
                    }))
                }
            };
            if entry.file_type().is_ok_and(|t| !t.is_file()) {
                continue;
            }
            if let Ok(name) = entry.file_name().into_string() {
                return Some(Ok(name));
            }
        }
        None
    }

    /// Opens the entry `name` for reading if it is a regular file; `None` for anything else
    /// (a symlink, directory, FIFO, socket or device is skipped without being opened: the
    /// entry is opened `O_PATH` without following a final symlink, beneath the root).
    pub fn open_entry(&self, name: &str) -> Result<Option<File>, SourceError> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Ok(None);
        }
        let shown = format!("{}/{name}", self.path.trim_end_matches('/'));
        let (fd, st) =
            SourceRoots::open_path(self.root, &self.rest.join(name), &shown, OFlag::O_NOFOLLOW)?;
        if !is_regular(&st) {
            return Ok(None);
        }
        SourceRoots::reopen(&fd, &st, &shown).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root() -> (tempfile::TempDir, PathBuf, SourceRoots) {
        let d = tempfile::tempdir().expect("tempdir");
        let r = d.path().canonicalize().expect("real path").join("root");
        std::fs::create_dir(&r).expect("mkdir");
        let roots = SourceRoots::open(std::slice::from_ref(&r), &[]).expect("open root");
        (d, r, roots)
    }

    fn s(p: &Path) -> &str {
        p.to_str().expect("utf-8")
    }

    #[test]
    fn a_path_is_read_only_beneath_a_root() {
        let (d, r, roots) = root();
        std::fs::write(r.join("in"), "inside").expect("write");
        std::fs::write(d.path().join("out"), "outside").expect("write");
        let mut text = String::new();
        roots
            .open_file(s(&r.join("in")))
            .expect("inside")
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "inside");
        let out = d.path().canonicalize().expect("real").join("out");
        assert!(matches!(
            roots.open_file(s(&out)),
            Err(SourceError::OutsideRoots { .. })
        ));
        assert!(matches!(
            roots.open_file(&format!("{}/../out", s(&r))),
            Err(SourceError::BadPath { .. })
        ));
        assert!(matches!(
            roots.open_file("relative/in"),
            Err(SourceError::BadPath { .. })
        ));
        // A sibling whose name starts with the root's is not inside it.
        let sibling = format!("{}-x/in", s(&r));
        assert!(matches!(
            roots.open_file(&sibling),
            Err(SourceError::OutsideRoots { .. })
        ));
        assert!(matches!(
            SourceRoots::none().open_file(s(&r.join("in"))),
            Err(SourceError::NoRoots { .. })
        ));
    }

    #[test]
    fn symlinks_are_followed_only_while_they_stay_inside() {
        let (d, r, roots) = root();
        std::fs::write(r.join("in"), "inside").expect("write");
        std::fs::write(d.path().join("out"), "outside").expect("write");
        symlink("in", r.join("alias")).expect("symlink");
        symlink(d.path().join("out"), r.join("abs")).expect("symlink");
        symlink("../out", r.join("rel")).expect("symlink");
        symlink("/proc/self/environ", r.join("proc")).expect("symlink");
        std::fs::create_dir(r.join("sub")).expect("mkdir");
        symlink("../../out", r.join("sub/up")).expect("symlink");
        symlink("..", r.join("sub/parent")).expect("symlink");
        roots.check_file(s(&r.join("alias"))).expect("stays inside");
        roots
            .check_file(s(&r.join("sub/parent/in")))
            .expect("`..` of a symlink that stays inside");
        for name in ["abs", "rel", "proc", "sub/up"] {
            let e = roots.open_file(s(&r.join(name)));
            assert!(
                matches!(e, Err(SourceError::Escapes { .. })),
                "{name}: {e:?}"
            );
        }
    }

    #[test]
    fn special_files_are_refused_by_type_without_being_opened() {
        let (_d, r, roots) = root();
        let fifo = r.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        // Opening this FIFO for reading would block for good: the check returns at once.
        let e = roots.open_file(s(&fifo)).expect_err("a FIFO");
        assert_eq!(
            e.to_string(),
            format!("{} is a FIFO, not a regular file", s(&fifo))
        );
        let _l = std::os::unix::net::UnixListener::bind(r.join("sock")).expect("bind");
        let e = roots.file_hash(s(&r.join("sock"))).expect_err("a socket");
        assert!(
            matches!(e, SourceError::NotRegular { kind: "socket", .. }),
            "{e}"
        );
        assert!(matches!(
            roots.open_file(s(&r)),
            Err(SourceError::NotRegular {
                kind: "directory",
                ..
            })
        ));
        assert!(matches!(
            roots.open_dir(s(&fifo)),
            Err(SourceError::NotDirectory { .. })
        ));
    }

    #[test]
    fn dir_entries_that_are_not_regular_files_are_skipped() {
        let (d, r, roots) = root();
        std::fs::write(r.join("a"), "a").expect("write");
        std::fs::write(d.path().join("out"), "outside").expect("write");
        symlink("a", r.join("b")).expect("symlink");
        symlink(d.path().join("out"), r.join("c")).expect("symlink");
        std::fs::create_dir(r.join("d")).expect("mkdir");
        nix::unistd::mkfifo(
            &r.join("e"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("mkfifo");
        let mut dir = roots.open_dir(s(&r)).expect("list the root itself");
        let mut names = Vec::new();
        while let Some(n) = dir.next_name() {
            names.push(n.expect("entry"));
        }
        names.sort();
        assert_eq!(names, ["a"]);
        // Even named directly, a symlinked or special entry is not opened.
        for name in ["b", "c", "d", "e"] {
            assert!(dir.open_entry(name).expect("checked").is_none(), "{name}");
        }
        assert!(dir.open_entry("a").expect("opened").is_some());
        assert!(dir.open_entry("..").expect("checked").is_none());
    }

    #[test]
    fn hashes_are_cached_by_inode_and_times_and_bounded() {
        let (_d, r, roots) = root();
        let f = r.join("model");
        std::fs::write(&f, "v1").expect("write");
        let h1 = roots.file_hash(s(&f)).expect("hash");
        assert_eq!(roots.file_hash(s(&f)).expect("hash"), h1);
        assert_eq!(roots.hashes_computed(), 1, "the second call is a cache hit");
        std::fs::write(&f, "v2").expect("rewrite");
        let h2 = roots.file_hash(s(&f)).expect("hash");
        assert_ne!(h1, h2);
        assert_eq!(roots.hashes_computed(), 2);
        let mut cache = HashCache::default();
        for i in 0..(HASH_CACHE_ENTRIES_MAX as u64 + 10) {
            let key = FileKey {
                dev: 1,
                ino: i,
                size: 0,
                mtime: (0, 0),
                ctime: (0, 0),
            };
            cache.insert(key, String::new());
        }
        assert_eq!(cache.hashes.len(), HASH_CACHE_ENTRIES_MAX);
        assert_eq!(cache.order.len(), HASH_CACHE_ENTRIES_MAX);
    }

    #[test]
    fn roots_that_expose_the_kernel_or_the_node_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let base = d.path().canonicalize().expect("real path");
        let data = base.join("data");
        std::fs::create_dir(&data).expect("mkdir");
        let open = |root: &Path| {
            SourceRoots::open(&[root.to_path_buf()], std::slice::from_ref(&data))
                .expect_err("refused")
                .to_string()
        };
        for bad in [
            "/",
            "/proc",
            "/proc/self",
            "/sys/kernel",
            "/dev",
            "/dev/shm",
        ] {
            let e = open(Path::new(bad));
            assert!(e.contains("never reads for callers"), "{bad}: {e}");
        }
        let e = open(&base);
        assert!(e.contains("the node's own files"), "{e}");
        let e = open(&data.join("raft"));
        assert!(e.contains("the node's own files"), "{e}");
        // A root that is a symlink, or passes through one.
        let real = base.join("real");
        std::fs::create_dir(&real).expect("mkdir");
        symlink(&real, base.join("link")).expect("symlink");
        let e = open(&base.join("link"));
        assert!(e.contains("passes through a symlink"), "{e}");
        let e = open(&base.join("link/."));
        assert!(e.contains("passes through a symlink"), "{e}");
        // A symlink to the data directory is caught by its real path too.
        symlink(&data, base.join("data-link")).expect("symlink");
        let e = SourceRoots::open(std::slice::from_ref(&real), &[base.join("data-link")]);
        assert!(e.is_ok(), "{e:?}");
        let e = SourceRoots::open(&[data.join("x")], &[base.join("data-link")])
            .expect_err("inside the data directory through its link")
            .to_string();
        assert!(e.contains("the node's own files"), "{e}");
        let e = open(Path::new("relative"));
        assert!(e.contains("absolute"), "{e}");
        SourceRoots::open(&[real], &[data]).expect("a plain directory beside the data");
    }
}
