//! One cgroup per sandbox, on cgroup v2 when the unified tree has the memory, pids and cpu
//! controllers for us, else on the v1 memory, pids, cpu and cpuacct hierarchies (the hybrid
//! layout these machines have). Detected once per process, at run time.
//!
//! Done through the cgroup file system directly rather than with cgroups-rs: we need a dozen
//! files (limits, three counters, the process list, `cgroup.kill`), and the crate would add a
//! large dependency tree and its own v1/v2 detection that does not know about our hybrid mount.
//!
//! A thread of the node makes a few empty cgroups ahead and removes finished ones behind (see
//! `ahead`), so neither `mkdir` nor `rmdir` is on a sandbox's start.
//!
//! Invariants: every cgroup lives under `<our own cgroup>/skiff-sandbox/` in each hierarchy; a
//! `Cgroup` serves one sandbox and is removed only after all its processes are dead: before
//! the run that made it returns, or, after a normal end, by the cgroup thread within
//! milliseconds (`removals_pending` counts those not yet done).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::error::SandboxError;
use crate::policy::Limits;
use crate::sys;

/// Directory created under our own cgroup in every hierarchy.
const BASE_NAME: &str = "skiff-sandbox";
const CPU_PERIOD_US: u64 = 100_000;
const KILL_WAIT_MAX: Duration = Duration::from_secs(5);
const REMOVE_WAIT_MAX: Duration = Duration::from_secs(5);

/// Which cgroup layout the sandboxes use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One directory in the unified hierarchy.
    V2 { base: PathBuf },
    /// One directory per v1 hierarchy.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
        cpuacct: PathBuf,
    },
}

impl Layout {
    pub fn version(&self) -> u8 {
        match self {
            Layout::V2 { .. } => 2,
            Layout::V1 { .. } => 1,
        }
    }
}

/// The layout of this machine, detected on first use (which also sweeps cgroups left behind
/// by node processes that died, see [`sweep_stale`]).
pub fn layout() -> Result<&'static Layout, SandboxError> {
    static LAYOUT: OnceLock<Result<Layout, String>> = OnceLock::new();
    LAYOUT
        .get_or_init(|| {
            let layout = detect().map_err(|e| e.to_string())?;
            let swept = sweep_stale_in(&layout);
            if swept > 0 {
                tracing::info!(swept, "removed cgroups of sandboxes whose node died");
            }
            Ok(layout)
        })
        .as_ref()
        .map_err(|detail| SandboxError::CgroupUnavailable {
            detail: detail.clone(),
        })
}

struct CgroupMount {
    mount_point: PathBuf,
    root: String,
    v2: bool,
    controllers: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        if left.len() < 5 || right.len() < 3 {
            continue;
        }
        let v2 = match right[0] {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        out.push(CgroupMount {
            mount_point: PathBuf::from(left[4]),
            root: left[3].to_string(),
            v2,
            controllers: right[2].split(',').map(str::to_string).collect(),
        });
    }
    out
}

/// `(controllers, path)` per line of `/proc/self/cgroup`; v2 has empty controllers.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((controllers, path.to_string()))
        })
        .collect()
}

fn join_cgroup_path(mount: &CgroupMount, own: &str) -> PathBuf {
    let relative = own.strip_prefix(mount.root.as_str()).unwrap_or(own);
    mount
        .mount_point
        .join(relative.trim_start_matches('/'))
        .join(BASE_NAME)
}

fn detect() -> Result<Layout, SandboxError> {
    let read = |path: &str| {
        fs::read_to_string(path).map_err(|source| SandboxError::Cgroup {
            op: "read",
            dir: PathBuf::from(path),
            source,
        })
    };
    let mounts = parse_mountinfo(&read("/proc/self/mountinfo")?);
    let own = parse_proc_cgroup(&read("/proc/self/cgroup")?);
    if let Some(layout) = try_v2(&mounts, &own) {
        return Ok(layout);
    }
    let find = |controller: &str| -> Option<PathBuf> {
        let mount = mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller))?;
        let (_, path) = own
            .iter()
            .find(|(cs, _)| cs.iter().any(|c| c == controller))?;
        Some(join_cgroup_path(mount, path))
    };
    match (find("memory"), find("pids"), find("cpu"), find("cpuacct")) {
        (Some(memory), Some(pids), Some(cpu), Some(cpuacct)) => {
            for dir in [&memory, &pids, &cpu, &cpuacct] {
                fs::create_dir_all(dir).map_err(|source| SandboxError::Cgroup {
                    op: "mkdir",
                    dir: dir.clone(),
                    source,
                })?;
            }
            Ok(Layout::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
            })
        }
        _ => Err(SandboxError::CgroupUnavailable {
            detail: "neither cgroup v2 with memory, pids and cpu delegated to us nor v1 \
                     memory, pids, cpu and cpuacct hierarchies"
                .to_string(),
        }),
    }
}

fn try_v2(mounts: &[CgroupMount], own: &[(Vec<String>, String)]) -> Option<Layout> {
    let mount = mounts.iter().find(|m| m.v2)?;
    let (_, path) = own.iter().find(|(cs, _)| cs.is_empty())?;
    let own_dir = join_cgroup_path(mount, path).parent()?.to_path_buf();
    // Our own cgroup first; if it holds processes (the "no internal processes" rule forbids
    // enabling controllers there), its parent: a node run in `<delegated>/node` puts its
    // sandboxes under `<delegated>/skiff-sandbox`.
    let candidates = [
        Some(own_dir.clone()),
        own_dir.parent().map(Path::to_path_buf),
    ];
    candidates
        .into_iter()
        .flatten()
        .filter(|dir| dir.starts_with(&mount.mount_point))
        .find_map(|dir| enable_v2_controllers(&dir))
}

fn enable_v2_controllers(dir: &Path) -> Option<Layout> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).ok()?;
    let needed = ["memory", "pids", "cpu"];
    if !needed
        .iter()
        .all(|n| available.split_whitespace().any(|c| c == *n))
    {
        return None;
    }
    fs::write(dir.join("cgroup.subtree_control"), "+memory +pids +cpu").ok()?;
    let base = dir.join(BASE_NAME);
    fs::create_dir_all(&base).ok()?;
    fs::write(base.join("cgroup.subtree_control"), "+memory +pids +cpu").ok()?;
    Some(Layout::V2 { base })
}

impl Layout {
    fn bases(&self) -> Vec<&Path> {
        match self {
            Layout::V2 { base } => vec![base.as_path()],
            Layout::V1 {
                memory,
                pids,
                cpu,
                cpuacct,
            } => vec![
                memory.as_path(),
                pids.as_path(),
                cpu.as_path(),
                cpuacct.as_path(),
            ],
        }
    }
}

/// The node pid in a sandbox cgroup's name (`sb-<pid>-<n>`).
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix("sb-")?.split('-').next()?.parse().ok()
}

/// Removes the cgroups of sandboxes whose node process is gone: a node killed with SIGKILL
/// cannot clean up, but its sandboxes died with it (parent-death signal), so their cgroups
/// are empty. Processes still listed are killed first. Returns how many were removed.
pub fn sweep_stale() -> Result<usize, SandboxError> {
    Ok(sweep_stale_in(layout()?))
}

fn sweep_stale_in(layout: &Layout) -> usize {
    let mut removed = 0;
    for base in layout.bases() {
        let Ok(entries) = fs::read_dir(base) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = owner_pid(&name.to_string_lossy()) else {
                continue;
            };
            if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let dir = entry.path();
            let pids = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in pids.lines().filter_map(|l| l.trim().parse().ok()) {
                sys::kill_pid(pid);
            }
            let deadline = Instant::now() + REMOVE_WAIT_MAX;
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => {
                        removed += 1;
                        break;
                    }
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(error) => {
                        tracing::warn!(%error, dir = %dir.display(), "stale sandbox cgroup not removed");
                        break;
                    }
                }
            }
        }
    }
    removed
}

/// Counters read from a sandbox's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    pub peak_memory_bytes: u64,
    pub cpu: Duration,
    pub oom_kills: u64,
}

/// The cgroup of one sandbox.
#[derive(Debug)]
pub(crate) struct Cgroup {
    layout: &'static Layout,
    /// Distinct directories, one per hierarchy.
    dirs: Vec<PathBuf>,
    /// The join files (see [`Cgroup::join_files`]), open for writing, in the same order; the
    /// sandbox's processes inherit them (the init writes into them), so the node closes its
    /// copies once the children are started.
    join_fds: Vec<std::os::fd::OwnedFd>,
    /// The counter files [`Cgroup::stats`] reads, opened with the directories (off the run's
    /// path for a cgroup made ahead); `None` when one would not open.
    counters: Option<Counters>,
    /// What the limit files hold, when this process wrote all of them.
    limits: Option<LimitValues>,
    removed: bool,
}

/// Open counter files: v1 `memory.max_usage_in_bytes`, `memory.oom_control`, `cpuacct.usage`;
/// v2 `memory.peak` (or `memory.current`), `memory.events`, `cpu.stat`.
#[derive(Debug)]
struct Counters {
    peak: fs::File,
    oom: fs::File,
    cpu: fs::File,
}

/// Reads a whole small counter file from its start (the kernel regenerates it at each read
/// from offset 0).
fn read_counter(file: &fs::File) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 1024];
    let n = file.read_at(&mut buf, 0)?;
    if n == buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "counter file larger than expected",
        ));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn cg_err<'a>(op: &'static str, dir: &'a Path) -> impl FnOnce(io::Error) -> SandboxError + 'a {
    move |source| SandboxError::Cgroup {
        op,
        dir: dir.to_path_buf(),
        source,
    }
}

fn write_file(dir: &Path, file: &str, value: &str) -> Result<(), SandboxError> {
    fs::write(dir.join(file), value).map_err(cg_err("write limit", &dir.join(file)))
}

fn read_file(dir: &Path, file: &str) -> Result<String, SandboxError> {
    fs::read_to_string(dir.join(file)).map_err(cg_err("read counter", &dir.join(file)))
}

fn parse_u64(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

fn keyed_value(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| parse_u64(v))
        .unwrap_or(0)
}

/// The directories of one sandbox cgroup, one per hierarchy (in [`Layout::bases`] order, a
/// hierarchy mounted twice counted once), created without limits.
fn make_dirs(layout: &'static Layout, name: &str) -> Result<Cgroup, SandboxError> {
    let mut cgroup = Cgroup {
        layout,
        dirs: Vec::new(),
        join_fds: Vec::new(),
        counters: None,
        limits: None,
        removed: false,
    };
    for base in layout.bases() {
        let dir = base.join(name);
        if cgroup.dirs.contains(&dir) {
            continue;
        }
        fs::create_dir(&dir).map_err(cg_err("mkdir", &dir))?;
        // Pushed at once: a later failure drops (and so removes) what exists.
        cgroup.dirs.push(dir);
    }
    // Opened here (ahead, on the cgroup thread, for a cgroup made ahead) by the node as root:
    // the kernel checks a migration against the opener's credentials, and the init then only
    // writes, without looking up the long cgroup paths on the start.
    for file in cgroup.join_files() {
        let fd = fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .map_err(cg_err("open", &file))?;
        cgroup.join_fds.push(std::os::fd::OwnedFd::from(fd));
    }
    cgroup.counters = cgroup.open_counters().ok();
    Ok(cgroup)
}

/// A fresh sandbox cgroup name: `sb-<node pid>-<n>`, never used before by this process.
fn next_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("sb-{}-{n}", std::process::id())
}

/// The values a sandbox cgroup's limit files hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitValues {
    memory_bytes: u64,
    /// The init and everything it starts (the supervisor stays outside).
    pids_max: u32,
    cpu_quota_us: u64,
}

impl LimitValues {
    fn of(limits: &Limits) -> Self {
        Self {
            memory_bytes: limits.memory_bytes_max,
            pids_max: limits.pids_max,
            cpu_quota_us: u64::from(limits.cpu_millis_max) * CPU_PERIOD_US / 1000,
        }
    }
}

impl Cgroup {
    /// A cgroup of its own for one sandbox, with `limits` written: one made ahead by the
    /// node's cgroup thread when one is ready (with these limits already written when they are
    /// the ones the previous sandbox asked for), else made now.
    pub(crate) fn create(limits: &Limits) -> Result<Self, SandboxError> {
        let layout = layout()?;
        let values = LimitValues::of(limits);
        let mut cgroup = match ahead::take(values) {
            Some(cgroup) => cgroup,
            None => make_dirs(layout, &next_name())?,
        };
        cgroup.write_limits(values)?;
        Ok(cgroup)
    }

    /// Writes the limit files, unless they already hold `values`.
    fn write_limits(&mut self, values: LimitValues) -> Result<(), SandboxError> {
        if self.limits == Some(values) {
            return Ok(());
        }
        // Unknown until every write has succeeded.
        let before = self.limits.take();
        let pids_max = values.pids_max.to_string();
        let quota_us = values.cpu_quota_us;
        let memory = values.memory_bytes.to_string();
        match self.layout {
            Layout::V2 { .. } => {
                let dir = &self.dirs[0];
                write_file(dir, "memory.max", &memory)?;
                // Swap would let a function exceed its memory limit silently.
                let _ = fs::write(dir.join("memory.swap.max"), "0");
                write_file(dir, "pids.max", &pids_max)?;
                write_file(dir, "cpu.max", &format!("{quota_us} {CPU_PERIOD_US}"))?;
            }
            Layout::V1 {
                memory: mem_base,
                pids,
                cpu,
                ..
            } => {
                let mem_dir = self.dir_under(mem_base);
                // memsw may not go below the memory limit: lower the memory limit first when
                // shrinking, raise memsw first when growing (a cgroup made ahead may hold
                // another sandbox's values).
                let memsw = mem_dir.join("memory.memsw.limit_in_bytes");
                if before.is_some_and(|b| values.memory_bytes > b.memory_bytes) {
                    // Absent without swap accounting; then there is no swap to limit either.
                    let _ = fs::write(&memsw, &memory);
                    write_file(mem_dir, "memory.limit_in_bytes", &memory)?;
                } else {
                    write_file(mem_dir, "memory.limit_in_bytes", &memory)?;
                    let _ = fs::write(&memsw, &memory);
                }
                write_file(self.dir_under(pids), "pids.max", &pids_max)?;
                let cpu_dir = self.dir_under(cpu);
                write_file(cpu_dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                write_file(cpu_dir, "cpu.cfs_quota_us", &quota_us.to_string())?;
            }
        }
        self.limits = Some(values);
        Ok(())
    }

    /// The files a single-threaded process writes "0" into to join this cgroup.
    ///
    /// On v1 that is `tasks`, not `cgroup.procs`: moving the calling thread alone skips the
    /// global threadgroup rwsem, whose write side waits for an RCU grace period (measured here:
    /// 7 ms per join through `cgroup.procs`, 0.4 ms through `tasks`). The joining process is a
    /// freshly forked, single-threaded child, so its only thread is the whole process.
    pub(crate) fn join_files(&self) -> Vec<PathBuf> {
        let file = match self.layout {
            Layout::V2 { .. } => "cgroup.procs",
            Layout::V1 { .. } => "tasks",
        };
        self.dirs.iter().map(|d| d.join(file)).collect()
    }

    /// The open join files, in the order of [`Cgroup::join_files`].
    pub(crate) fn join_fds(&self) -> Vec<i32> {
        use std::os::fd::AsRawFd;
        self.join_fds.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Closes this process's copies of the join files (the sandbox's processes have theirs).
    pub(crate) fn close_join_fds(&mut self) {
        self.join_fds.clear();
    }

    /// The directory that holds memory counters (for errors and tests).
    pub(crate) fn memory_dir(&self) -> &Path {
        match self.layout {
            Layout::V2 { .. } => &self.dirs[0],
            Layout::V1 { memory, .. } => self
                .dirs
                .iter()
                .find(|d| d.starts_with(memory))
                .expect("v1 cgroup has a memory directory"),
        }
    }

    fn dir_under(&self, base: &Path) -> &Path {
        self.dirs
            .iter()
            .find(|d| d.starts_with(base))
            .expect("one directory per hierarchy")
    }

    /// Memory charged to the cgroup now.
    pub(crate) fn memory_current(&self) -> Result<u64, SandboxError> {
        let dir = self.memory_dir();
        let file = match self.layout {
            Layout::V2 { .. } => "memory.current",
            Layout::V1 { .. } => "memory.usage_in_bytes",
        };
        Ok(parse_u64(&read_file(dir, file)?))
    }

    pub(crate) fn stats(&self) -> Result<CgroupStats, SandboxError> {
        if let Some(counters) = &self.counters {
            let read =
                |f: &fs::File| read_counter(f).map_err(cg_err("read counter", self.memory_dir()));
            let (peak, oom, cpu) = (
                read(&counters.peak)?,
                read(&counters.oom)?,
                read(&counters.cpu)?,
            );
            return Ok(match self.layout {
                Layout::V2 { .. } => CgroupStats {
                    peak_memory_bytes: parse_u64(&peak),
                    cpu: Duration::from_micros(keyed_value(&cpu, "usage_usec")),
                    oom_kills: keyed_value(&oom, "oom_kill"),
                },
                Layout::V1 { .. } => CgroupStats {
                    peak_memory_bytes: parse_u64(&peak),
                    cpu: Duration::from_nanos(parse_u64(&cpu)),
                    oom_kills: keyed_value(&oom, "oom_kill"),
                },
            });
        }
        match self.layout {
            Layout::V2 { .. } => {
                let dir = &self.dirs[0];
                let peak = fs::read_to_string(dir.join("memory.peak"))
                    .or_else(|_| fs::read_to_string(dir.join("memory.current")))
                    .map_err(cg_err("read counter", dir))?;
                let cpu_stat = read_file(dir, "cpu.stat")?;
                let events = read_file(dir, "memory.events")?;
                Ok(CgroupStats {
                    peak_memory_bytes: parse_u64(&peak),
                    cpu: Duration::from_micros(keyed_value(&cpu_stat, "usage_usec")),
                    oom_kills: keyed_value(&events, "oom_kill"),
                })
            }
            Layout::V1 { cpuacct, .. } => {
                let mem = self.memory_dir();
                let peak = parse_u64(&read_file(mem, "memory.max_usage_in_bytes")?);
                let oom = keyed_value(&read_file(mem, "memory.oom_control")?, "oom_kill");
                let cpu_ns = parse_u64(&read_file(self.dir_under(cpuacct), "cpuacct.usage")?);
                Ok(CgroupStats {
                    peak_memory_bytes: peak,
                    cpu: Duration::from_nanos(cpu_ns),
                    oom_kills: oom,
                })
            }
        }
    }

    fn open_counters(&self) -> io::Result<Counters> {
        let open = |dir: &Path, name: &str| fs::File::open(dir.join(name));
        Ok(match self.layout {
            Layout::V2 { .. } => {
                let dir = &self.dirs[0];
                Counters {
                    peak: open(dir, "memory.peak").or_else(|_| open(dir, "memory.current"))?,
                    oom: open(dir, "memory.events")?,
                    cpu: open(dir, "cpu.stat")?,
                }
            }
            Layout::V1 { cpuacct, .. } => {
                let mem = self.memory_dir();
                Counters {
                    peak: open(mem, "memory.max_usage_in_bytes")?,
                    oom: open(mem, "memory.oom_control")?,
                    cpu: open(self.dir_under(cpuacct), "cpuacct.usage")?,
                }
            }
        })
    }

    /// Pids of the processes in the cgroup (every hierarchy holds the same set).
    pub(crate) fn pids(&self) -> Result<Vec<i32>, SandboxError> {
        let Some(dir) = self.dirs.first() else {
            return Ok(Vec::new());
        };
        let text = read_file(dir, "cgroup.procs")?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Kills every process in the cgroup and waits until it is empty.
    pub(crate) fn kill_all(&self) -> Result<(), SandboxError> {
        if self.dirs.is_empty() {
            return Ok(());
        }
        if matches!(self.layout, Layout::V2 { .. }) {
            let _ = fs::write(self.dirs[0].join("cgroup.kill"), "1");
        }
        let deadline = Instant::now() + KILL_WAIT_MAX;
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            // v1 has no cgroup.kill: a process forked between reading the list and the kill
            // is caught by the next round (and the pid namespace dies with its init anyway).
            for pid in pids {
                sys::kill_pid(pid);
            }
            if Instant::now() > deadline {
                return Err(SandboxError::Cgroup {
                    op: "kill",
                    dir: self.dirs[0].clone(),
                    source: io::Error::new(io::ErrorKind::TimedOut, "processes survive SIGKILL"),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Removes the cgroup directories, killing whatever is left in them first.
    pub(crate) fn remove(&mut self) -> Result<(), SandboxError> {
        if self.removed {
            return Ok(());
        }
        self.removed = true;
        if !self.pids()?.is_empty() {
            self.kill_all()?;
        }
        let deadline = Instant::now() + REMOVE_WAIT_MAX;
        for dir in &self.dirs {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    // A just-killed process may still be leaving the cgroup.
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(source) => {
                        return Err(SandboxError::Cgroup {
                            op: "rmdir",
                            dir: dir.clone(),
                            source,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves the directories into a new handle; this one is left owning nothing.
    pub(crate) fn take(&mut self) -> Cgroup {
        Cgroup {
            layout: self.layout,
            dirs: std::mem::take(&mut self.dirs),
            join_fds: std::mem::take(&mut self.join_fds),
            counters: self.counters.take(),
            limits: self.limits,
            removed: std::mem::replace(&mut self.removed, true),
        }
    }

    pub(crate) fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(error) = self.remove() {
            tracing::warn!(%error, "sandbox cgroup left behind");
        }
    }
}

/// Cgroups kept ready by default (see [`set_cgroup_pool_size`]).
pub const CGROUP_POOL_SIZE_DEFAULT: usize = 4;
/// The largest pool [`set_cgroup_pool_size`] accepts.
pub const CGROUP_POOL_SIZE_MAX: usize = 64;
/// Finished sandboxes whose cgroups wait for the cgroup thread; beyond this, the run that
/// finished removes its own (as it would without the thread).
const REMOVALS_QUEUED_MAX: usize = 64;
/// Pause after a failed creation ahead before the next try (it must not spin).
const RETRY_PAUSE: Duration = Duration::from_secs(5);

/// Sets how many empty sandbox cgroups the process keeps ready (0 turns the pool off and
/// removes the ready ones; clamped to [`CGROUP_POOL_SIZE_MAX`]).
pub fn set_cgroup_pool_size(size: usize) {
    ahead::TARGET.store(size.min(CGROUP_POOL_SIZE_MAX), Ordering::Relaxed);
    ahead::shared().wake.notify_one();
}

/// How many sandbox cgroups are ready now.
pub fn cgroup_pool_ready() -> usize {
    ahead::lock().ready.len()
}

/// Marks a sandbox start in its setup (from before its cgroup is taken until its init is
/// ready): meanwhile the cgroup thread holds back its `mkdir`s and `rmdir`s (at most
/// [`SETUP_YIELD_MAX`]), which hold the cgroup mutex the start's init needs to join.
pub(crate) struct StartInSetup(());

/// The longest the cgroup thread holds back for starts in their setup.
const SETUP_YIELD_MAX: Duration = Duration::from_millis(3);

impl StartInSetup {
    pub(crate) fn begin() -> Self {
        ahead::lock().starts_in_setup += 1;
        StartInSetup(())
    }
}

impl Drop for StartInSetup {
    fn drop(&mut self) {
        let mut work = ahead::lock();
        work.starts_in_setup = work.starts_in_setup.saturating_sub(1);
        drop(work);
        ahead::shared().wake.notify_all();
    }
}

/// How many finished sandboxes still wait for their supervisor or starter to be reaped and
/// their cgroup removed by the cgroup thread (each is done within a few milliseconds of its run's end).
pub fn removals_pending() -> usize {
    ahead::lock().pending
}

/// Hands a finished sandbox to the cgroup thread: reap its supervisor if it has one (which has
/// reported the init's exit and only exits after that), drop `keep`, then remove its cgroup.
/// Off the run's path: the supervisor's exit tears down its copy of the node's address space
/// and the sandbox's mount namespace (a one-shot run's `keep` holds that namespace instead),
/// and removing v1 cgroups takes a few hundred microseconds more. Done here, by the caller,
/// when the queue is full or the thread cannot run.
/// `keep` is freed only once the supervisor is reaped (memory its copy of the node shares).
pub(crate) fn remove_behind(
    supervisor_pid: Option<i32>,
    cgroup: Cgroup,
    keep: Box<dyn std::any::Any + Send>,
) {
    let finished = ahead::Finished {
        supervisor_pid,
        cgroup,
        keep,
    };
    if let Some(finished) = ahead::queue_removal(finished) {
        finished.complete();
    }
}

/// Cgroups made ahead and removed behind by one thread of the node (`skiff-cgroup`), the way
/// `netns` makes network namespaces ahead.
///
/// Invariants: a cgroup made ahead is empty and has never held a process; it is handed to one
/// sandbox and never back (a finished sandbox's cgroup is removed, never pooled). Ready
/// cgroups are named like any other (`sb-<pid>-<n>`), so a node that dies with some ready
/// leaves them to the next node's [`sweep_stale`]; a process that exits normally removes them
/// (an exit handler), as does [`set_cgroup_pool_size`]`(0)`.
mod ahead {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

    use super::{
        layout, make_dirs, next_name, Cgroup, LimitValues, REMOVALS_QUEUED_MAX, RETRY_PAUSE,
        SETUP_YIELD_MAX,
    };
    use crate::sys;

    pub(super) static TARGET: AtomicUsize = AtomicUsize::new(super::CGROUP_POOL_SIZE_DEFAULT);

    pub(super) struct Finished {
        pub(super) supervisor_pid: Option<i32>,
        pub(super) cgroup: Cgroup,
        pub(super) keep: Box<dyn std::any::Any + Send>,
    }

    impl Finished {
        pub(super) fn complete(mut self) {
            // It has reported and is exiting on its own, at idle priority (a kill here would
            // make it exit at the node's priority, on the CPU of the node's next start).
            if let Some(pid) = self.supervisor_pid {
                if let Err(error) = sys::wait_pid(pid) {
                    tracing::warn!(%error, pid, "supervisor not reaped");
                }
            }
            drop(self.keep);
            if let Err(error) = self.cgroup.remove() {
                tracing::warn!(%error, "sandbox cgroup left behind");
            }
        }
    }

    #[derive(Default)]
    pub(super) struct Work {
        pub(super) ready: VecDeque<Cgroup>,
        finished: VecDeque<Finished>,
        /// Finished sandboxes queued or being cleaned up.
        pub(super) pending: usize,
        /// The limits the last sandbox asked for: cgroups made ahead get them written.
        last_limits: Option<LimitValues>,
        /// See [`super::StartInSetup`].
        pub(super) starts_in_setup: usize,
    }

    pub(super) struct Shared {
        work: Mutex<Work>,
        pub(super) wake: Condvar,
        /// Whether the thread runs (set on first use).
        running: OnceLock<bool>,
    }

    pub(super) fn shared() -> &'static Shared {
        static SHARED: OnceLock<Shared> = OnceLock::new();
        SHARED.get_or_init(|| Shared {
            work: Mutex::new(Work::default()),
            wake: Condvar::new(),
            running: OnceLock::new(),
        })
    }

    pub(super) fn lock() -> MutexGuard<'static, Work> {
        shared()
            .work
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ensure_running() -> bool {
        *shared().running.get_or_init(|| {
            let spawned = std::thread::Builder::new()
                .name("skiff-cgroup".to_string())
                .spawn(run_forever);
            match spawned {
                Ok(_) => {
                    if !sys::at_exit(remove_at_exit) {
                        tracing::debug!("no exit handler: ready cgroups left to the next sweep");
                    }
                    true
                }
                Err(error) => {
                    tracing::warn!(%error, "cgroup thread not started");
                    false
                }
            }
        })
    }

    /// A ready cgroup, one with `limits` already written if there is one, or `None` (pool
    /// off, empty, or the thread not running).
    pub(super) fn take(limits: LimitValues) -> Option<Cgroup> {
        if TARGET.load(Ordering::Relaxed) == 0 || !ensure_running() {
            return None;
        }
        let taken = {
            let mut work = lock();
            work.last_limits = Some(limits);
            let at = work
                .ready
                .iter()
                .position(|c| c.limits == Some(limits))
                .unwrap_or(0);
            work.ready.remove(at)
        };
        shared().wake.notify_one();
        taken
    }

    /// Queues a finished sandbox; gives it back when the caller must clean it up itself.
    pub(super) fn queue_removal(finished: Finished) -> Option<Finished> {
        if !ensure_running() {
            return Some(finished);
        }
        let mut work = lock();
        if work.finished.len() >= REMOVALS_QUEUED_MAX {
            return Some(finished);
        }
        work.finished.push_back(finished);
        work.pending += 1;
        drop(work);
        shared().wake.notify_one();
        None
    }

    enum Job {
        Make,
        Remove(Finished),
        Discard(Cgroup),
    }

    fn run_forever() {
        // Behind the starts: their setups and commands come first on a busy CPU.
        sys::lower_to_background_priority();
        let mut failing_since: Option<std::time::Instant> = None;
        loop {
            let job = {
                let mut work = lock();
                // Let the starts in their setup join their cgroups first (bounded).
                let until = std::time::Instant::now() + SETUP_YIELD_MAX;
                while work.starts_in_setup > 0 {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    work = shared()
                        .wake
                        .wait_timeout(work, left)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
                loop {
                    let target = TARGET.load(Ordering::Relaxed);
                    let may_make = failing_since.is_none_or(|t| t.elapsed() >= RETRY_PAUSE);
                    // The next start waits for a ready cgroup; a finished one only for itself.
                    if work.ready.len() < target && may_make {
                        break Job::Make;
                    }
                    if let Some(finished) = work.finished.pop_front() {
                        break Job::Remove(finished);
                    }
                    if work.ready.len() > target {
                        let extra = work.ready.pop_back().expect("longer than the target");
                        break Job::Discard(extra);
                    }
                    work = if may_make {
                        shared()
                            .wake
                            .wait(work)
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                    } else {
                        shared()
                            .wake
                            .wait_timeout(work, RETRY_PAUSE)
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0
                    };
                }
            };
            match job {
                Job::Make => match layout()
                    .and_then(|layout| make_dirs(layout, &next_name()))
                    .and_then(|mut cgroup| {
                        let last = lock().last_limits;
                        if let Some(limits) = last {
                            cgroup.write_limits(limits)?;
                        }
                        Ok(cgroup)
                    }) {
                    Ok(cgroup) => {
                        failing_since = None;
                        lock().ready.push_back(cgroup);
                    }
                    Err(error) => {
                        tracing::debug!(%error, "cgroup not made ahead");
                        failing_since = Some(std::time::Instant::now());
                    }
                },
                Job::Remove(finished) => {
                    finished.complete();
                    let mut work = lock();
                    work.pending = work.pending.saturating_sub(1);
                }
                // Dropping removes it.
                Job::Discard(cgroup) => drop(cgroup),
            }
        }
    }

    /// At a normal exit: remove the ready cgroups and finish the queued removals, unless the
    /// cgroup thread holds the lock (then they are left to the next node's sweep).
    extern "C" fn remove_at_exit() {
        TARGET.store(0, Ordering::Relaxed);
        let Ok(mut work) = shared().work.try_lock() else {
            return;
        };
        let ready = std::mem::take(&mut work.ready);
        let finished = std::mem::take(&mut work.finished);
        drop(work);
        drop(ready);
        for finished in finished {
            finished.complete();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw";

    #[test]
    fn parses_hybrid_mounts() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 4);
        assert!(mounts[3].v2);
        assert_eq!(mounts[0].controllers, vec!["rw", "memory"]);
        assert_eq!(mounts[1].mount_point, PathBuf::from("/sys/fs/cgroup/pids"));
    }

    #[test]
    fn joins_own_cgroup_path() {
        let own = parse_proc_cgroup("4:memory:/process_api/abc\n0::/\n");
        assert_eq!(own[0].0, vec!["memory"]);
        assert!(own[1].0.is_empty());
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(
            join_cgroup_path(&mounts[0], &own[0].1),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/skiff-sandbox")
        );
    }

    #[test]
    fn sandbox_cgroup_names_carry_the_node_pid() {
        assert_eq!(owner_pid("sb-1234-7"), Some(1234));
        assert_eq!(owner_pid("sb-x-7"), None);
        assert_eq!(owner_pid("other"), None);
    }

    #[test]
    fn reads_keyed_counters() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(text, "oom_kill"), 3);
        assert_eq!(
            keyed_value("usage_usec 1500\nuser_usec 1", "usage_usec"),
            1500
        );
        assert_eq!(keyed_value("", "oom_kill"), 0);
    }
}
