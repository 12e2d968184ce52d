//! Preparing a function deploy on the client: packing code into the archive a node accepts,
//! reading a `skiff.toml` manifest, and the parsers shared by the manifest and the command
//! line (sizes, durations, environment variables).
//!
//! Invariants:
//! - [`pack_directory`] is deterministic: the same tree (relative paths, file contents and
//!   owner-exec bits) gives the same bytes, so the same digest, whatever the machine, the
//!   clock or the owner of the files;
//! - an archive holds only regular files and directories, as nodes accept; a symbolic link,
//!   device, FIFO or socket is refused with its path, never followed or skipped;
//! - every read is bounded before it happens: an archive by [`CODE_BYTES_MAX`], a manifest by
//!   [`MANIFEST_BYTES_MAX`], a policy by [`POLICY_BYTES_MAX`], a payload by
//!   [`PAYLOAD_BYTES_MAX`];
//! - the defaults of a deploy are stated once, here ([`DEFAULT_MEMORY`] and the rest), for the
//!   command line and the manifest alike; a default limit never exceeds the tier's ceiling
//!   ([`default_memory_bytes`], [`default_timeout_ms`]), so defaults deploy at every tier.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
pub use skiff_proto::files::read_bounded;
use skiff_proto::functions::{
    check_tier_ceiling, tier_ceiling, validate_spec, DataGrant, Dependency, FunctionSpec,
    Idempotency, StageSpec, CODE_BYTES_MAX, PAYLOAD_BYTES_MAX, POLICY_BYTES_MAX, STAGES_MAX,
};

/// Largest manifest file.
pub const MANIFEST_BYTES_MAX: u64 = 64 * 1024;
/// Most entries (files and directories) of an archive; nodes refuse more.
pub const ARCHIVE_ENTRIES_MAX: usize = 100_000;

pub const DEFAULT_MODE: &str = "exec";
pub const DEFAULT_TIER: &str = "standard";
pub const DEFAULT_MEMORY: &str = "128M";
pub const DEFAULT_TIMEOUT: &str = "30s";
pub const DEFAULT_MAX_CONCURRENCY: u32 = 100;
pub const DEFAULT_QUEUE_MAX: u32 = 1000;
pub const DEFAULT_MIN_WARM: u32 = 0;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_RETRY_BACKOFF: &str = "1s";

/// The memory limit of a deploy that gives none: [`DEFAULT_MEMORY`], or the tier's ceiling
/// where that is lower.
pub fn default_memory_bytes(tier: &str) -> u64 {
    let default = parse_size(DEFAULT_MEMORY).expect("the default memory parses");
    tier_ceiling(tier).map_or(default, |c| default.min(c.memory_bytes_max))
}

/// The timeout of a deploy that gives none: [`DEFAULT_TIMEOUT`], or the tier's ceiling where
/// that is lower (an untrusted function gets 10 s, not 30).
pub fn default_timeout_ms(tier: &str) -> u64 {
    let default = parse_duration_ms(DEFAULT_TIMEOUT).expect("the default timeout parses");
    tier_ceiling(tier).map_or(default, |c| default.min(c.timeout_ms_max))
}

/// Tar blocks are 512 bytes; every entry takes one header block plus its padded data.
const BLOCK_BYTES: u64 = 512;

/// Stands in for the code digest when a deploy is checked before its code is uploaded.
const PLACEHOLDER_DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A deploy as the user describes it, before its code is packed and uploaded: the code's
/// path, and the spec to deploy, whose `code_digest` is filled in once the code is uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeployPlan {
    /// A directory or a `.tar` file.
    pub code: PathBuf,
    pub spec: FunctionSpec,
}

impl DeployPlan {
    /// The spec to deploy once the code is uploaded under `code_digest`.
    pub fn with_digest(&self, code_digest: &str) -> FunctionSpec {
        FunctionSpec {
            code_digest: code_digest.to_string(),
            ..self.spec.clone()
        }
    }

    /// Checks everything the cluster would check except the code, so that a bad setting is
    /// reported before anything is packed or uploaded.
    pub fn validate(&self) -> Result<(), String> {
        validate_spec(&self.with_digest(PLACEHOLDER_DIGEST))?;
        check_tier_ceiling(&self.spec)?;
        unique_env(&self.spec.env)?;
        for (i, stage) in self.spec.stages.iter().enumerate() {
            unique_env(&stage.env)
                .map_err(|e| format!("stage {} ({:?}): {e}", i + 1, stage.name))?;
        }
        Ok(())
    }
}

fn unique_env(env: &[(String, String)]) -> Result<(), String> {
    let mut names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("environment variable {} is given twice", w[0]));
    }
    Ok(())
}

/// Splits an entry command line on whitespace (no shell quoting: use an array in a manifest
/// for arguments with spaces).
pub fn split_entry(line: &str) -> Vec<String> {
    line.split_whitespace().map(String::from).collect()
}

/// Parses a size: a number of bytes with an optional binary unit, `K`, `M` or `G` (also
/// written `Ki`/`KiB`, ...; case-insensitive). `128M` is 128 MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("bad size {s:?} (e.g. 128M, 1G or a number of bytes)");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(multiplier).ok_or_else(bad)
}

/// Parses a duration such as `30s`, `1m 30s` or `500ms` into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let d: Duration = humantime::parse_duration(s.trim())
        .map_err(|e| format!("bad duration {s:?} ({e}; e.g. 30s, 2m, 500ms)"))?;
    u64::try_from(d.as_millis()).map_err(|_| format!("duration {s:?} is too long"))
}

/// Parses `NAME=VALUE` (the value may be empty and may hold `=`).
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("environment variable {s:?} is not NAME=VALUE")),
    }
}

/// Default lifetime of an idempotent result.
pub const DEFAULT_IDEMPOTENCY_TTL: &str = "1h";

/// The idempotency settings of a deploy; dependencies without `idempotent` are an error.
pub fn idempotency_settings(
    idempotent: bool,
    deps: &[String],
    ttl: Option<&str>,
    cache_failures: bool,
    track_reads: bool,
) -> Result<Option<Idempotency>, String> {
    if !idempotent {
        if !deps.is_empty() || ttl.is_some() || cache_failures {
            return Err("dependencies, a TTL and cache-failures need idempotent".into());
        }
        return Ok(None);
    }
    let dependencies = deps
        .iter()
        .map(|d| d.parse::<Dependency>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(Idempotency {
        dependencies,
        ttl_ms: parse_duration_ms(ttl.unwrap_or(DEFAULT_IDEMPOTENCY_TTL))
            .map_err(|e| format!("idempotency ttl: {e}"))?,
        cache_failures,
        track_reads,
    }))
}

/// Reads an invocation payload file (at most [`PAYLOAD_BYTES_MAX`]).
pub fn read_payload(path: &Path) -> Result<Vec<u8>, String> {
    read_bounded(path, PAYLOAD_BYTES_MAX as u64, "payload file")
}

/// Reads a sandbox policy file: UTF-8 TOML of at most [`POLICY_BYTES_MAX`] bytes. Only the
/// syntax is checked here; the node checks what it means at deploy.
pub fn read_policy(path: &Path) -> Result<String, String> {
    let bytes = read_bounded(path, POLICY_BYTES_MAX as u64, "policy")?;
    let text =
        String::from_utf8(bytes).map_err(|_| format!("policy {} is not UTF-8", path.display()))?;
    text.parse::<toml::Table>()
        .map_err(|e| format!("policy {}: {}", path.display(), toml_error(&text, &e)))?;
    Ok(text)
}

/// The code archive for `--code PATH`: a directory is packed with [`pack_directory`]; a file
/// ending in `.tar` is taken as it is, after checking that it holds only regular files and
/// directories. Compressed archives are refused (no decompressor is built in).
pub fn read_code(path: &Path) -> Result<Vec<u8>, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read code {}: {e}", path.display()))?;
    if meta.is_dir() {
        return pack_directory(path);
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        return Err(format!(
            "{}: compressed archives are not accepted; give a directory or an uncompressed .tar",
            path.display()
        ));
    }
    if !meta.is_file() || !name.ends_with(".tar") {
        return Err(format!(
            "{}: give a directory or a .tar archive as code",
            path.display()
        ));
    }
    let archive = read_bounded(path, CODE_BYTES_MAX, "code archive")?;
    check_archive(&archive).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(archive)
}

/// A code archive of one executable file (mode 0755, mtime 0): the shape of the sample and
/// benchmark functions.
pub fn single_file_archive(name: &str, content: &[u8]) -> Result<Vec<u8>, String> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_cksum();
    builder
        .append_data(&mut header, name, content)
        .map_err(|e| format!("packing {name}: {e}"))?;
    builder
        .into_inner()
        .map_err(|e| format!("packing {name}: {e}"))
}

/// Longest path of an archive entry, and longest component, in bytes (the kernel's
/// `PATH_MAX` and `NAME_MAX`).
pub const ARCHIVE_PATH_BYTES_MAX: usize = 4096;
pub const ARCHIVE_NAME_BYTES_MAX: usize = 255;

/// The rules every entry of a code archive follows, checked one entry at a time in archive
/// order, by the client before an upload and by the node before and while it unpacks:
///
/// - only regular files and directories (no symbolic or hard links, devices, FIFOs, sparse
///   or other special entries);
/// - a relative path of plain components: no leading `/`, no `..`, no NUL, each component at
///   most [`ARCHIVE_NAME_BYTES_MAX`] bytes and the whole at most [`ARCHIVE_PATH_BYTES_MAX`]
///   (`.` components and repeated slashes are dropped, so `./a//b` is `a/b`);
/// - every name at most once, and no entry below or in place of a file (`a` a file, then
///   `a/b`; or `a/b` then a file `a`);
/// - at most [`ARCHIVE_ENTRIES_MAX`] entries.
///
/// Since no entry can be a link and every path stays below the root, an archive that passes
/// lands entirely inside the directory it is unpacked in.
#[derive(Debug, Default)]
pub struct ArchiveRules {
    entries: usize,
    files: std::collections::HashSet<Vec<u8>>,
    /// Directories named by an entry or implied as the parent of one.
    dirs: std::collections::HashSet<Vec<u8>>,
    /// Paths named by an entry (a directory may be implied first and named later, once).
    named: std::collections::HashSet<Vec<u8>>,
}

/// What an archive entry is, after [`ArchiveRules::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedEntry {
    pub is_dir: bool,
    /// The path's components, each a plain file name; empty for the root itself (`./`).
    pub components: Vec<Vec<u8>>,
}

impl ArchiveRules {
    /// Files seen so far.
    pub fn files(&self) -> usize {
        self.files.len()
    }

    /// Checks the next entry, of type `kind` at raw path `path` (as the archive holds it,
    /// long names resolved).
    pub fn check(&mut self, kind: tar::EntryType, path: &[u8]) -> Result<CheckedEntry, String> {
        let shown = String::from_utf8_lossy(path).into_owned();
        if self.entries >= ARCHIVE_ENTRIES_MAX {
            return Err(format!(
                "the archive has more than {ARCHIVE_ENTRIES_MAX} entries"
            ));
        }
        self.entries += 1;
        let is_dir = match kind {
            tar::EntryType::Regular => false,
            tar::EntryType::Directory => true,
            _ => {
                return Err(format!(
                    "archive entry {shown:?} is not a regular file or directory (links, devices and FIFOs are refused)"
                ))
            }
        };
        let refuse = |why: &str| Err(format!("archive entry {shown:?}: {why}"));
        if path.is_empty() || path.len() > ARCHIVE_PATH_BYTES_MAX {
            return refuse(&format!(
                "the path must have 1 to {ARCHIVE_PATH_BYTES_MAX} bytes"
            ));
        }
        if path[0] == b'/' {
            return refuse("an absolute path is refused");
        }
        if path.contains(&0) {
            return refuse("a path with a NUL byte is refused");
        }
        if !is_dir && path.ends_with(b"/") {
            return refuse("a file path ends with /");
        }
        let mut components = Vec::new();
        for part in path.split(|b| *b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => return refuse("a path with .. is refused"),
                name if name.len() > ARCHIVE_NAME_BYTES_MAX => {
                    return refuse(&format!(
                        "a path component is longer than {ARCHIVE_NAME_BYTES_MAX} bytes"
                    ))
                }
                name => components.push(name.to_vec()),
            }
        }
        if components.is_empty() {
            if is_dir {
                // `./`: the root itself, which the unpacker makes.
                return Ok(CheckedEntry { is_dir, components });
            }
            return refuse("a file needs a name");
        }
        let mut prefix = Vec::new();
        for part in &components[..components.len() - 1] {
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(part);
            if self.files.contains(&prefix) {
                return refuse("a path goes through a file of an earlier entry");
            }
            self.dirs.insert(prefix.clone());
        }
        let full = components.join(&b'/');
        if !self.named.insert(full.clone()) {
            return refuse("the name appears twice");
        }
        if is_dir {
            if self.files.contains(&full) {
                return refuse("a directory where an earlier entry made a file");
            }
            self.dirs.insert(full);
        } else {
            if self.dirs.contains(&full) {
                return refuse("a file where an earlier entry made a directory");
            }
            self.files.insert(full);
        }
        Ok(CheckedEntry { is_dir, components })
    }
}

/// Checks that `archive` is a tar file following [`ArchiveRules`] and holding at least one
/// file.
pub fn check_archive(archive: &[u8]) -> Result<(), String> {
    let mut ar = tar::Archive::new(archive);
    let entries = ar
        .entries()
        .map_err(|e| format!("not a valid tar archive: {e}"))?;
    let mut rules = ArchiveRules::default();
    for entry in entries {
        let entry = entry.map_err(|e| format!("not a valid tar archive: {e}"))?;
        rules.check(entry.header().entry_type(), &entry.path_bytes())?;
    }
    if rules.files() == 0 {
        return Err("the archive holds no files".into());
    }
    Ok(())
}

/// Packs the regular files and directories under `root` into a deterministic tar archive:
/// entries sorted by path, directories before their contents, every modification time 0,
/// owner and group 0 without names, directories mode 0755, files 0755 when their owner may
/// execute them and 0644 otherwise.
///
/// Refuses symbolic links, devices, FIFOs and sockets (naming the path), a tree of no files,
/// more than [`ARCHIVE_ENTRIES_MAX`] entries, and an archive past [`CODE_BYTES_MAX`]
/// (stopping before reading the file that would cross it).
pub fn pack_directory(root: &Path) -> Result<Vec<u8>, String> {
    let meta =
        std::fs::metadata(root).map_err(|e| format!("cannot read code {}: {e}", root.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", root.display()));
    }
    let entries = walk(root)?;
    if !entries.iter().any(|e| !e.is_dir) {
        return Err(format!("{} holds no files", root.display()));
    }
    let limit_error = |after: &Path| {
        format!(
            "the code in {} is over the {} MiB limit (reached at {})",
            root.display(),
            CODE_BYTES_MAX / (1024 * 1024),
            after.display()
        )
    };
    let mut builder = tar::Builder::new(Vec::new());
    for entry in &entries {
        let full = root.join(&entry.relative);
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        let data = if entry.is_dir {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            Vec::new()
        } else {
            // The archive so far, this entry's header (and a possible long-name header),
            // its padded data and the two closing blocks must fit.
            let written = builder.get_ref().len() as u64;
            let padded = entry.len.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
            if written + 4 * BLOCK_BYTES + padded > CODE_BYTES_MAX {
                return Err(limit_error(&entry.relative));
            }
            let data = read_bounded(&full, entry.len, "file")?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(if entry.mode & 0o100 != 0 {
                0o755
            } else {
                0o644
            });
            data
        };
        header.set_size(data.len() as u64);
        builder
            .append_data(&mut header, &entry.relative, data.as_slice())
            .map_err(|e| format!("cannot pack {}: {e}", full.display()))?;
        if builder.get_ref().len() as u64 > CODE_BYTES_MAX {
            return Err(limit_error(&entry.relative));
        }
    }
    let archive = builder
        .into_inner()
        .map_err(|e| format!("cannot pack {}: {e}", root.display()))?;
    if archive.len() as u64 > CODE_BYTES_MAX {
        return Err(limit_error(root));
    }
    Ok(archive)
}

/// One file or directory found under the root.
struct Found {
    relative: PathBuf,
    is_dir: bool,
    len: u64,
    mode: u32,
}

/// Lists everything under `root` (not `root` itself), sorted so that the order does not
/// depend on the file system: `Path` orders component by component, so a directory comes
/// right before its contents.
fn walk(root: &Path) -> Result<Vec<Found>, String> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    let mut found = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(dir) = pending.pop() {
        let full_dir = root.join(&dir);
        let read = std::fs::read_dir(&full_dir)
            .map_err(|e| format!("cannot read {}: {e}", full_dir.display()))?;
        for item in read {
            let item = item.map_err(|e| format!("cannot read {}: {e}", full_dir.display()))?;
            let relative = dir.join(item.file_name());
            let full = root.join(&relative);
            let meta = std::fs::symlink_metadata(&full)
                .map_err(|e| format!("cannot read {}: {e}", full.display()))?;
            let kind = meta.file_type();
            if kind.is_symlink() {
                return Err(format!(
                    "{} is a symbolic link; code may hold only regular files and directories",
                    full.display()
                ));
            }
            if kind.is_block_device()
                || kind.is_char_device()
                || kind.is_fifo()
                || kind.is_socket()
                || !(kind.is_file() || kind.is_dir())
            {
                return Err(format!(
                    "{} is a device, FIFO or socket; code may hold only regular files and directories",
                    full.display()
                ));
            }
            if found.len() >= ARCHIVE_ENTRIES_MAX {
                return Err(format!(
                    "{} holds more than {ARCHIVE_ENTRIES_MAX} files and directories",
                    root.display()
                ));
            }
            if kind.is_dir() {
                pending.push(relative.clone());
            }
            found.push(Found {
                relative,
                is_dir: kind.is_dir(),
                len: meta.len(),
                mode: meta.permissions().mode(),
            });
        }
    }
    found.sort_by(|a, b| a.relative.cmp(&b.relative));
    Ok(found)
}

/// A `skiff.toml` manifest. Every field but `code` and `entry` (or `[[stage]]` tables) is
/// optional; unknown fields are refused so that a typo is not silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    name: Option<String>,
    /// Relative to the manifest's directory.
    code: PathBuf,
    /// A string split on whitespace, or an array of arguments. Absent for a staged function.
    entry: Option<toml::Value>,
    /// The stages of a staged function, in order (`[[stage]]` tables).
    #[serde(default, rename = "stage")]
    stages: Vec<StageManifest>,
    mode: Option<String>,
    tier: Option<String>,
    memory: Option<String>,
    timeout: Option<String>,
    min_warm: Option<u32>,
    max_concurrency: Option<u32>,
    queue_max: Option<u32>,
    max_attempts: Option<u32>,
    retry_backoff: Option<String>,
    /// A policy file, relative to the manifest's directory.
    policy: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    data_read: Vec<String>,
    #[serde(default)]
    data_write: Vec<String>,
    /// Skip runs whose inputs did not change.
    #[serde(default)]
    idempotent: bool,
    /// Declared dependencies: `kv:KEY`, `kv:PREFIX*`, `file:/PATH`.
    #[serde(default)]
    deps: Vec<String>,
    /// How long a recorded result may answer (default 1h).
    idempotency_ttl: Option<String>,
    #[serde(default)]
    cache_failures: bool,
    /// Record data-service reads as dependencies (default true).
    track_reads: Option<bool>,
}

/// One `[[stage]]` table: what runs in one sandbox of a staged function.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageManifest {
    name: String,
    entry: toml::Value,
    /// Default: the function's tier.
    tier: Option<String>,
    /// A policy file, relative to the manifest's directory.
    policy: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    data_read: Vec<String>,
    #[serde(default)]
    data_write: Vec<String>,
}

/// An entry command: a string split on whitespace or an array of arguments.
fn entry_value(value: &toml::Value) -> Result<Vec<String>, String> {
    match value {
        toml::Value::String(line) => Ok(split_entry(line)),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(String::from))
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| "entry must be a string or an array of strings".to_string()),
        _ => Err("entry must be a string or an array of strings".into()),
    }
}

/// Reads and checks a manifest file (at most [`MANIFEST_BYTES_MAX`] bytes). `name`, when
/// given, replaces the manifest's `name`.
pub fn read_manifest(path: &Path, name: Option<String>) -> Result<DeployPlan, String> {
    let bytes = read_bounded(path, MANIFEST_BYTES_MAX, "manifest")?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("manifest {} is not UTF-8", path.display()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    parse_manifest(&text, dir, name).map_err(|e| format!("manifest {}: {e}", path.display()))
}

/// Parses and checks manifest text whose relative paths are relative to `dir`.
pub fn parse_manifest(text: &str, dir: &Path, name: Option<String>) -> Result<DeployPlan, String> {
    let m: Manifest = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    let name = name.or(m.name).ok_or_else(|| {
        "no function name (add name = \"...\" or give NAME on the command line)".to_string()
    })?;
    let entry = match &m.entry {
        Some(value) => entry_value(value)?,
        None if m.stages.is_empty() => {
            return Err("no entry (add entry = \"...\", or [[stage]] tables)".into())
        }
        None => Vec::new(),
    };
    // Checked before any stage's policy file is read.
    if m.stages.len() > STAGES_MAX {
        return Err(format!(
            "{} stages: a function has at most {STAGES_MAX}",
            m.stages.len()
        ));
    }
    let tier = m.tier.unwrap_or_else(|| DEFAULT_TIER.to_string());
    let stages = m
        .stages
        .into_iter()
        .enumerate()
        .map(|(i, st)| {
            let at = |e: String| format!("stage {} ({:?}): {e}", i + 1, st.name);
            Ok(StageSpec {
                entry: entry_value(&st.entry).map_err(&at)?,
                tier: st.tier.clone().unwrap_or_else(|| tier.clone()),
                policy: match &st.policy {
                    Some(p) => Some(read_policy(&dir.join(p)).map_err(&at)?),
                    None => None,
                },
                data: DataGrant {
                    read_prefixes: st.data_read,
                    write_prefixes: st.data_write,
                },
                env: st.env.into_iter().collect(),
                name: st.name,
            })
        })
        .collect::<Result<Vec<StageSpec>, String>>()?;
    let field = |what: &str, e: String| format!("{what}: {e}");
    let plan = DeployPlan {
        code: dir.join(&m.code),
        spec: FunctionSpec {
            name,
            code_digest: String::new(),
            entry,
            mode: m
                .mode
                .as_deref()
                .unwrap_or(DEFAULT_MODE)
                .parse()
                .map_err(|e| field("mode", e))?,
            tier: tier.clone(),
            policy: match &m.policy {
                Some(p) => Some(read_policy(&dir.join(p))?),
                None => None,
            },
            memory_bytes: match m.memory.as_deref() {
                Some(text) => parse_size(text).map_err(|e| field("memory", e))?,
                None => default_memory_bytes(&tier),
            },
            timeout_ms: match m.timeout.as_deref() {
                Some(text) => parse_duration_ms(text).map_err(|e| field("timeout", e))?,
                None => default_timeout_ms(&tier),
            },
            max_concurrency: m.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY),
            queue_max: m.queue_max.unwrap_or(DEFAULT_QUEUE_MAX),
            min_warm: m.min_warm.unwrap_or(DEFAULT_MIN_WARM),
            max_attempts: m.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
            retry_backoff_ms: parse_duration_ms(
                m.retry_backoff.as_deref().unwrap_or(DEFAULT_RETRY_BACKOFF),
            )
            .map_err(|e| field("retry_backoff", e))?,
            data: DataGrant {
                read_prefixes: m.data_read,
                write_prefixes: m.data_write,
            },
            env: m.env.into_iter().collect(),
            idempotency: idempotency_settings(
                m.idempotent,
                &m.deps,
                m.idempotency_ttl.as_deref(),
                m.cache_failures,
                m.track_reads.unwrap_or(true),
            )?,
            stages,
        },
    };
    plan.validate()?;
    Ok(plan)
}

/// A TOML error on one line: the line it points at and its message, whose parts the parser
/// puts on lines of their own ("invalid string", "expected ...") joined with semicolons.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    match e.span() {
        Some(span) => {
            // Counted in bytes: slicing the `str` would panic on a span that does not start
            // on a character boundary.
            let line = text.as_bytes()[..span.start.min(text.len())]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_proto::functions::FnMode;
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("lib/inner")).expect("mkdir");
        std::fs::create_dir_all(root.join("empty")).expect("mkdir");
        std::fs::write(root.join("main.py"), b"print('hi')\n").expect("write");
        std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").expect("write");
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        std::fs::write(root.join("lib/inner/data.bin"), vec![7u8; 1500]).expect("write");
        std::fs::write(root.join("lib.txt"), b"x").expect("write");
        dir
    }

    /// (path, mode, is_dir, contents) of every entry, in archive order.
    fn entries(archive: &[u8]) -> Vec<(String, u32, bool, Vec<u8>)> {
        let mut ar = tar::Archive::new(archive);
        ar.entries()
            .expect("entries")
            .map(|e| {
                let mut e = e.expect("entry");
                let h = e.header().clone();
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("read");
                (
                    e.path().expect("path").display().to_string(),
                    h.mode().expect("mode"),
                    h.entry_type().is_dir(),
                    data,
                )
            })
            .collect()
    }

    #[test]
    fn packing_is_deterministic_and_sorted() {
        let a = tree();
        let b = tree();
        // Different modification times must not change the bytes.
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for name in ["main.py", "lib/inner/data.bin"] {
            std::fs::File::options()
                .write(true)
                .open(b.path().join(name))
                .expect("open")
                .set_modified(old)
                .expect("set mtime");
        }
        let pa = pack_directory(a.path()).expect("pack a");
        let pb = pack_directory(b.path()).expect("pack b");
        assert_eq!(pa, pb);
        assert_eq!(pa, pack_directory(a.path()).expect("pack again"));
        let names: Vec<String> = entries(&pa).into_iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            [
                "empty",
                "lib",
                "lib/inner",
                "lib/inner/data.bin",
                "lib.txt",
                "main.py",
                "run.sh"
            ]
        );
        let mut ar = tar::Archive::new(pa.as_slice());
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            assert_eq!(e.header().mtime().expect("mtime"), 0);
            assert_eq!(e.header().uid().expect("uid"), 0);
            assert_eq!(e.header().gid().expect("gid"), 0);
        }
        check_archive(&pa).expect("a packed archive passes the check");
    }

    #[test]
    fn packing_keeps_the_owner_exec_bit_only() {
        let t = tree();
        std::fs::set_permissions(
            t.path().join("main.py"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        let archive = pack_directory(t.path()).expect("pack");
        let by_name: BTreeMap<String, (u32, bool, Vec<u8>)> = entries(&archive)
            .into_iter()
            .map(|(p, m, d, c)| (p, (m, d, c)))
            .collect();
        assert_eq!(by_name["run.sh"].0, 0o755);
        assert_eq!(by_name["main.py"].0, 0o644);
        assert_eq!(by_name["lib"].0, 0o755);
        assert!(by_name["lib"].1);
        assert_eq!(by_name["lib/inner/data.bin"].2, vec![7u8; 1500]);
        // A changed exec bit is a changed archive.
        std::fs::set_permissions(
            t.path().join("main.py"),
            std::fs::Permissions::from_mode(0o700),
        )
        .expect("chmod");
        assert_ne!(archive, pack_directory(t.path()).expect("pack"));
    }

    #[test]
    fn packing_refuses_symlinks_and_fifos_naming_the_path() {
        let t = tree();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("lib/link")).expect("symlink");
        let e = pack_directory(t.path()).expect_err("a symlink is refused");
        assert!(e.contains("lib/link") && e.contains("symbolic link"), "{e}");

        let t = tree();
        let fifo = t.path().join("pipe");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
        let e = pack_directory(t.path()).expect_err("a FIFO is refused");
        assert!(e.contains("pipe") && e.contains("FIFO"), "{e}");
    }

    #[test]
    fn packing_stops_at_the_size_bound() {
        let t = tempfile::tempdir().expect("temp dir");
        // Sparse files: the size bound must trip before their contents are read.
        for name in ["a.bin", "b.bin"] {
            let f = std::fs::File::create(t.path().join(name)).expect("create");
            f.set_len(CODE_BYTES_MAX / 2).expect("set_len");
        }
        let e = pack_directory(t.path()).expect_err("over the bound");
        assert!(e.contains("limit") && e.contains("b.bin"), "{e}");

        let empty = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(empty.path().join("sub")).expect("mkdir");
        let e = pack_directory(empty.path()).expect_err("no files");
        assert!(e.contains("no files"), "{e}");
    }

    #[test]
    fn code_paths_accept_a_directory_or_a_tar_only() {
        let t = tree();
        let archive = pack_directory(t.path()).expect("pack");
        let out = tempfile::tempdir().expect("temp dir");
        let tar_path = out.path().join("code.tar");
        std::fs::write(&tar_path, &archive).expect("write");
        assert_eq!(read_code(&tar_path).expect("a .tar"), archive);
        assert_eq!(read_code(t.path()).expect("a directory"), archive);
        for name in ["code.tar.gz", "code.tgz"] {
            let p = out.path().join(name);
            std::fs::write(&p, b"\x1f\x8b").expect("write");
            let e = read_code(&p).expect_err(name);
            assert!(e.contains("compressed"), "{e}");
        }
        let zip = out.path().join("code.zip");
        std::fs::write(&zip, b"PK").expect("write");
        assert!(read_code(&zip).expect_err("zip").contains(".tar"));

        // A hand-made .tar with a symlink is refused before upload.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "evil", "/etc/passwd").expect("link");
        let bad = b.into_inner().expect("archive");
        let e = check_archive(&bad).expect_err("symlink entry");
        assert!(e.contains("evil"), "{e}");
    }

    const GOOD: &str = r#"
name = "resize"
code = "src"
entry = "python3 main.py --fast"
mode = "serve"
tier = "trusted"
memory = "256M"
timeout = "2m"
min_warm = 2
max_concurrency = 10
queue_max = 50
max_attempts = 5
retry_backoff = "500ms"
data_read = ["images/"]
data_write = ["thumbs/"]

[env]
LEVEL = "debug"
"#;

    #[test]
    fn a_manifest_parses_with_relative_code() {
        let plan = parse_manifest(GOOD, Path::new("/srv/fns/resize"), None).expect("good");
        assert_eq!(plan.spec.name, "resize");
        assert_eq!(plan.code, PathBuf::from("/srv/fns/resize/src"));
        assert_eq!(plan.spec.entry, ["python3", "main.py", "--fast"]);
        assert_eq!(plan.spec.mode, FnMode::Serve);
        assert_eq!(plan.spec.tier, "trusted");
        assert_eq!(plan.spec.memory_bytes, 256 << 20);
        assert_eq!(plan.spec.timeout_ms, 120_000);
        assert_eq!(
            (
                plan.spec.min_warm,
                plan.spec.max_concurrency,
                plan.spec.queue_max
            ),
            (2, 10, 50)
        );
        assert_eq!(
            (plan.spec.max_attempts, plan.spec.retry_backoff_ms),
            (5, 500)
        );
        assert_eq!(plan.spec.data.read_prefixes, ["images/"]);
        assert_eq!(plan.spec.data.write_prefixes, ["thumbs/"]);
        assert_eq!(plan.spec.env, [("LEVEL".to_string(), "debug".to_string())]);

        // Defaults, an argv array, and a name given on the command line.
        let minimal = "code = \".\"\nentry = [\"/code/run\", \"a b\"]\n";
        let plan = parse_manifest(minimal, Path::new("rel"), Some("other".into())).expect("ok");
        assert_eq!(plan.spec.name, "other");
        assert_eq!(plan.code, PathBuf::from("rel/."));
        assert_eq!(plan.spec.entry, ["/code/run", "a b"]);
        assert_eq!(plan.spec.mode, FnMode::Exec);
        assert_eq!(plan.spec.tier, "standard");
        assert_eq!(plan.spec.memory_bytes, 128 << 20);
        assert_eq!(plan.spec.timeout_ms, 30_000);
        assert_eq!(
            (plan.spec.max_concurrency, plan.spec.queue_max),
            (100, 1000)
        );
        assert_eq!((plan.spec.min_warm, plan.spec.max_attempts), (0, 3));
        assert_eq!(plan.spec.retry_backoff_ms, 1000);
        assert!(
            plan.spec.policy.is_none() && plan.spec.data.is_empty() && plan.spec.env.is_empty()
        );
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let dir = Path::new(".");
        let cases = [
            (format!("colour = \"red\"\n{GOOD}"), "colour"),
            (GOOD.replace("\"serve\"", "\"batch\""), "mode"),
            (GOOD.replace("\"trusted\"", "\"root\""), "tier"),
            (GOOD.replace("\"256M\"", "\"lots\""), "memory"),
            (GOOD.replace("\"2m\"", "\"soon\""), "timeout"),
            (GOOD.replace("code = \"src\"\n", ""), "code"),
            (
                GOOD.replace("\"python3 main.py --fast\"", "\"  \""),
                "entry",
            ),
            (GOOD.replace("\"python3 main.py --fast\"", "3"), "entry"),
            (GOOD.replace("min_warm = 2", "min_warm = 20"), "min-warm"),
            (GOOD.replace("name = \"resize\"\n", ""), "name"),
        ];
        for (text, word) in cases {
            let e = parse_manifest(&text, dir, None).expect_err(word);
            assert!(e.contains(word), "{word}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        // Syntax errors whose message the TOML parser writes on two lines.
        for (text, expected) in [
            ("\"\\\t", "line 1: invalid escape sequence; expected "),
            ("env = { a = }\n", "line 1: invalid string; expected "),
        ] {
            let e = parse_manifest(text, dir, None).expect_err(text);
            assert!(e.starts_with(expected), "{expected:?} does not start {e:?}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    const STAGED: &str = r#"
name = "ingest"
code = "."
tier = "trusted"
timeout = "5s"

[[stage]]
name = "parse"
entry = "python3 parse.py"
tier = "untrusted"

[[stage]]
name = "store"
entry = ["/bin/sh", "store.sh"]
data_write = ["scores/"]
env = { TOKEN = "t" }
"#;

    #[test]
    fn a_staged_manifest_parses_stage_by_stage() {
        let plan = parse_manifest(STAGED, Path::new("/srv"), None).expect("good");
        let s = &plan.spec;
        assert!(s.entry.is_empty() && s.data.is_empty() && s.env.is_empty());
        assert_eq!((s.tier.as_str(), s.timeout_ms), ("trusted", 5_000));
        assert_eq!(s.stages.len(), 2);
        assert_eq!(s.stages[0].name, "parse");
        assert_eq!(s.stages[0].entry, ["python3", "parse.py"]);
        assert_eq!(s.stages[0].tier, "untrusted");
        assert!(s.stages[0].data.is_empty() && s.stages[0].env.is_empty());
        // A stage without a tier takes the function's.
        assert_eq!(s.stages[1].tier, "trusted");
        assert_eq!(s.stages[1].entry, ["/bin/sh", "store.sh"]);
        assert_eq!(s.stages[1].data.write_prefixes, ["scores/"]);
        assert_eq!(s.stages[1].env, [("TOKEN".to_string(), "t".to_string())]);
    }

    #[test]
    fn bad_staged_manifests_are_refused_naming_the_stage() {
        let dir = Path::new(".");
        let nine: String = (0..9)
            .map(|i| format!("[[stage]]\nname = \"s{i}\"\nentry = \"true\"\n"))
            .collect();
        let cases = [
            (
                format!("code = \".\"\nname = \"f\"\n{nine}"),
                "9 stages: a function has at most 8".to_string(),
            ),
            (
                STAGED.replace("\"python3 parse.py\"", "\" \""),
                "stage 1 (\"parse\"): the entry command is empty".to_string(),
            ),
            (
                STAGED
                    .replace("tier = \"trusted\"", "tier = \"standard\"")
                    .replace("name = \"store\"", "name = \"store\"\ntier = \"trusted\""),
                "stage 2 (\"store\"): tier trusted is above the function's tier standard"
                    .to_string(),
            ),
            (
                STAGED.replace("timeout = \"5s\"", "entry = \"sh x\""),
                "gives its entry per stage".to_string(),
            ),
            (
                STAGED.replace("timeout = \"5s\"", "mode = \"serve\""),
                "exec mode only".to_string(),
            ),
            (
                STAGED.replace("tier = \"untrusted\"", "colour = \"red\""),
                "colour".to_string(),
            ),
            (
                STAGED.replace("env = { TOKEN = \"t\" }", "policy = \"absent.toml\""),
                "stage 2 (\"store\"): cannot read policy".to_string(),
            ),
            (
                "code = \".\"\nname = \"f\"\n".to_string(),
                "no entry".to_string(),
            ),
        ];
        for (text, expected) in cases {
            let e = parse_manifest(&text, dir, None).expect_err(&expected);
            assert!(e.contains(&expected), "{expected:?} not in {e:?}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn a_manifest_file_is_bounded_and_its_policy_read() {
        let d = tempfile::tempdir().expect("temp dir");
        std::fs::write(d.path().join("policy.toml"), "timeout_ms = 1000\n").expect("write");
        let path = d.path().join("skiff.toml");
        std::fs::write(
            &path,
            "name = \"f\"\ncode = \"src\"\nentry = \"sh run.sh\"\npolicy = \"policy.toml\"\n",
        )
        .expect("write");
        let plan = read_manifest(&path, None).expect("manifest");
        assert_eq!(plan.spec.policy.as_deref(), Some("timeout_ms = 1000\n"));
        assert_eq!(plan.code, d.path().join("src"));

        std::fs::write(d.path().join("policy.toml"), "timeout_ms = = 1\n").expect("write");
        let e = read_manifest(&path, None).expect_err("bad policy");
        assert!(e.contains("policy"), "{e}");

        let big = format!("# {}\n", "x".repeat(MANIFEST_BYTES_MAX as usize));
        std::fs::write(&path, big).expect("write");
        let e = read_manifest(&path, None).expect_err("too large");
        assert!(e.contains("limit"), "{e}");
    }

    #[test]
    fn sizes_durations_and_env_parse() {
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("512mi"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "M", "12X", "1.5G", "-1M", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("1m 30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert!(parse_duration_ms("30").is_err());
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("=x").is_err() && parse_env("A").is_err());
    }
}
