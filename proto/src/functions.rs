//! The data model of functions, code, tasks and worker nodes, as the replicated state machine
//! holds them. Plain data shared with clients; the behaviour is in `skiff_raft_store::sched`.
//!
//! A task's life: `Queued` (waiting for a slot under the function's concurrency limit or
//! for a node) → `Assigned` (to a node, with a fencing token) → `Running` (the node reported
//! it started) → `Succeeded` | `Failed` | `TimedOut`. A failed asynchronous task goes back to
//! `Queued` after a back-off until its attempts are used up, then stays `Failed` on the
//! dead-letter list. A task whose node stops heartbeating goes back to `Queued` with a new
//! token; a completion carrying an old token is refused.

use serde::{Deserialize, Serialize};

use crate::ids::{check_key, prefix_is_valid, NodeId, RequestId};
pub use crate::ids::{FunctionId, TaskId};

mod idempotency;
pub use idempotency::{
    CacheOutcome, Dependency, DependencyState, Idempotency, IdempotencyInput, LedgerEntry,
    MissReason, DEPENDENCIES_MAX, IDEMPOTENCY_KEY_BYTES_MAX, IDEMPOTENCY_TTL_MS_MAX,
    INVOCATION_DEPS_MAX, LEDGER_BYTES_MAX, LEDGER_ENTRIES_MAX, TRACKED_READS_MAX,
};

/// Longest function name.
pub const FUNCTION_NAME_BYTES_MAX: usize = 128;
/// Most functions the cluster holds.
pub const FUNCTIONS_MAX: usize = 1024;
/// Versions kept per function; deploying past it drops the oldest.
pub const VERSIONS_KEPT: usize = 16;
/// Largest code archive of one function version.
pub const CODE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Most code bytes (all blobs, complete or uploading) the cluster holds. Code lives in the
/// state machine's memory on every node, so this bound is a memory bound.
pub const CODE_TOTAL_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// Size of one code chunk (the last may be shorter). One chunk per command keeps every log
/// entry small.
pub const CODE_CHUNK_BYTES: usize = 512 * 1024;
/// Most code blobs (complete or uploading).
pub const CODE_BLOBS_MAX: usize = 4096;
/// An upload that is not complete after this long is discarded; a complete blob no version
/// refers to is discarded after this long too (long enough to deploy after uploading).
pub const CODE_UNREFERENCED_TTL_MS: u64 = 30 * 60 * 1000;
/// Largest invocation payload.
pub const PAYLOAD_BYTES_MAX: usize = 1024 * 1024;
/// Largest output kept in a task's result.
pub const OUTPUT_BYTES_MAX: usize = 1024 * 1024;
/// Largest log (stderr) kept in a task's result.
pub const LOG_BYTES_MAX: usize = 64 * 1024;
/// Most tasks not yet finished, over all functions.
pub const ACTIVE_TASKS_MAX: usize = 100_000;
/// Most finished tasks kept; past it the oldest are purged first.
pub const FINISHED_TASKS_MAX: usize = 100_000;
/// Most bytes of payloads, outputs and logs held by all tasks; past it finished tasks are
/// purged oldest first, and submissions are refused while active tasks alone exceed it.
pub const TASK_BYTES_MAX: u64 = 1024 * 1024 * 1024;
/// How long a finished task (and its result) is kept.
pub const RESULT_RETENTION_MS: u64 = 60 * 60 * 1000;
/// A node that has not heartbeated for this long loses its tasks to other nodes.
pub const NODE_LEASE_MS: u64 = 5_000;
/// A node record not refreshed for this long is forgotten.
pub const NODE_FORGET_MS: u64 = 24 * 60 * 60 * 1000;
/// An assigned task not completed within its function's timeout plus this grace is taken
/// back and queued again (its node may have lost it).
pub const ASSIGNMENT_GRACE_MS: u64 = 60_000;
/// Most entries of one heartbeat's warm report and running list.
pub const HEARTBEAT_ENTRIES_MAX: usize = 4096;
/// Most arguments of an entry command, and bytes of each.
pub const ENTRY_ARGS_MAX: usize = 64;
pub const ENTRY_ARG_BYTES_MAX: usize = 4096;
/// Most environment variables, and bytes of each name plus value.
pub const ENV_VARS_MAX: usize = 64;
pub const ENV_VAR_BYTES_MAX: usize = 4096;
/// Largest policy text.
pub const POLICY_BYTES_MAX: usize = 64 * 1024;
/// Most data-service prefixes per function.
pub const DATA_PREFIXES_MAX: usize = 64;
/// Longest function timeout.
pub const TIMEOUT_MS_MAX: u64 = 15 * 60 * 1000;
/// Most attempts of an asynchronous invocation.
pub const ATTEMPTS_MAX: u32 = 16;
/// Largest per-function queue bound.
pub const QUEUE_MAX: u32 = 100_000;
/// Largest per-function concurrency.
pub const CONCURRENCY_MAX: u32 = 10_000;
/// Largest retry back-off.
pub const RETRY_BACKOFF_MS_MAX: u64 = 10 * 60 * 1000;

/// How a function's process handles invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FnMode {
    /// One process per invocation: payload on stdin, result on stdout.
    Exec,
    /// One long-lived process per warm sandbox: one JSON request line in, one line out.
    Serve,
}

impl FnMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FnMode::Exec => "exec",
            FnMode::Serve => "serve",
        }
    }
}

impl std::str::FromStr for FnMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exec" => Ok(FnMode::Exec),
            "serve" => Ok(FnMode::Serve),
            other => Err(format!("unknown mode {other:?} (exec or serve)")),
        }
    }
}

/// What a function may reach through the data service. Empty: no data socket at all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataGrant {
    /// Key prefixes the function may read.
    pub read_prefixes: Vec<String>,
    /// Key prefixes the function may read and write.
    pub write_prefixes: Vec<String>,
}

impl DataGrant {
    pub fn is_empty(&self) -> bool {
        self.read_prefixes.is_empty() && self.write_prefixes.is_empty()
    }
}

/// Everything a deploy states about one version of a function.
///
/// A function is either **plain** (`stages` empty: `entry` runs in one sandbox of `tier`,
/// narrowed by `policy`, reaching the store through `data`) or **staged**: a pipeline of
/// [`StageSpec`]s, each in its own sandbox at its own tier with its own policy, grant and
/// environment, sharing the one code archive; stage 1 reads the payload, each next stage the
/// previous stage's output, and the last stage's output is the result. For a staged function
/// `tier` is the ceiling of its stages' tiers (so whoever may deploy that tier may deploy the
/// pipeline), `memory_bytes` bounds every stage, `timeout_ms` bounds the whole pipeline, and
/// the per-sandbox settings (`entry`, `policy`, `data`, `env`) live in the stages only.
///
/// The binary encoding of a plain function is the one it had before stages existed (see
/// `spec_wire`), so stored functions and older clients' deploys read the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "spec_wire::SpecWire", into = "spec_wire::SpecWire")]
pub struct FunctionSpec {
    pub name: String,
    /// SHA-256 (hex) of the code archive (a tar file), uploaded before the deploy.
    pub code_digest: String,
    /// The command and its arguments, run with `/code` as working directory.
    pub entry: Vec<String>,
    pub mode: FnMode,
    /// `untrusted`, `standard` or `trusted`.
    pub tier: String,
    /// A sandbox policy (TOML) narrowing the tier, if any.
    pub policy: Option<String>,
    pub memory_bytes: u64,
    pub timeout_ms: u64,
    /// Most tasks of this function assigned or running at once, over the cluster.
    pub max_concurrency: u32,
    /// Most tasks waiting for a slot; past it submissions are throttled.
    pub queue_max: u32,
    /// Warm sandboxes kept ready across the cluster.
    pub min_warm: u32,
    /// Attempts of an asynchronous invocation before it goes to the dead-letter list.
    pub max_attempts: u32,
    /// Back-off before the second attempt; doubled for each further one.
    pub retry_backoff_ms: u64,
    pub data: DataGrant,
    pub env: Vec<(String, String)>,
    /// Skip runs whose inputs have not changed (see [`Idempotency`]).
    pub idempotency: Option<Idempotency>,
    /// The pipeline of a staged function, in order; empty for a plain function.
    pub stages: Vec<StageSpec>,
}

impl FunctionSpec {
    pub fn is_staged(&self) -> bool {
        !self.stages.is_empty()
    }
}

/// Most stages of one function.
pub const STAGES_MAX: usize = 8;
/// Longest stage name.
pub const STAGE_NAME_BYTES_MAX: usize = 64;

/// One stage of a staged function: what runs, at which trust level, with which limits and
/// which part of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSpec {
    /// Unique within the function: 1 to [`STAGE_NAME_BYTES_MAX`] bytes of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// The command and its arguments, run with `/code` as working directory.
    pub entry: Vec<String>,
    /// `untrusted`, `standard` or `trusted`; at most the function's tier.
    pub tier: String,
    /// A sandbox policy (TOML) narrowing the stage's tier, if any.
    pub policy: Option<String>,
    /// What this stage may reach through the data service; empty: no data socket.
    pub data: DataGrant,
    /// Environment variables of this stage only (a credential given to one stage is not
    /// visible to the others).
    pub env: Vec<(String, String)>,
}

/// The most memory and the longest run a function of a tier may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierCeiling {
    pub memory_bytes_max: u64,
    pub timeout_ms_max: u64,
}

/// The ceiling of a tier (`None` for an unknown tier): the sandbox's tier presets
/// (`skiff_sandbox::Tier::limits`, which a node test checks these agree with), stated here so
/// that a client can choose defaults within them without depending on the sandbox.
pub fn tier_ceiling(tier: &str) -> Option<TierCeiling> {
    const MIB: u64 = 1024 * 1024;
    let (memory_bytes_max, timeout_ms_max) = match tier {
        "untrusted" => (256 * MIB, 10_000),
        "standard" => (512 * MIB, 60_000),
        "trusted" => (2048 * MIB, 600_000),
        _ => return None,
    };
    Some(TierCeiling {
        memory_bytes_max,
        timeout_ms_max,
    })
}

/// Refuses a function (not staged: a stage keeps within its own tier's ceiling whatever the
/// function's limits) whose memory or timeout is above its tier's ceiling, saying what to
/// give instead. Checked where a deploy enters (the client, the receiving node), not in apply.
pub fn check_tier_ceiling(spec: &FunctionSpec) -> Result<(), String> {
    if spec.is_staged() {
        return Ok(());
    }
    let Some(c) = tier_ceiling(&spec.tier) else {
        return Err(format!("unknown tier {:?}", spec.tier));
    };
    let ms = |v: u64| {
        if v.is_multiple_of(1000) {
            format!("{} s", v / 1000)
        } else {
            format!("{v} ms")
        }
    };
    let bytes = |v: u64| {
        if v.is_multiple_of(1024 * 1024) {
            format!("{} MiB", v / (1024 * 1024))
        } else {
            format!("{v} bytes")
        }
    };
    if spec.timeout_ms > c.timeout_ms_max {
        return Err(format!(
            "timeout {} is above the {} ceiling of tier {}: give at most {} (or leave it out \
             to get the ceiling), or deploy at a higher tier",
            ms(spec.timeout_ms),
            ms(c.timeout_ms_max),
            spec.tier,
            ms(c.timeout_ms_max)
        ));
    }
    if spec.memory_bytes > c.memory_bytes_max {
        return Err(format!(
            "memory {} is above the {} ceiling of tier {}: give at most {}, or deploy at a \
             higher tier",
            bytes(spec.memory_bytes),
            bytes(c.memory_bytes_max),
            spec.tier,
            bytes(c.memory_bytes_max)
        ));
    }
    Ok(())
}

/// Trust order of the tier names, for the rule that a stage stays within its function's tier.
fn tier_rank(tier: &str) -> Option<u8> {
    match tier {
        "untrusted" => Some(0),
        "standard" => Some(1),
        "trusted" => Some(2),
        _ => None,
    }
}

/// The binary encoding of [`FunctionSpec`]. bincode is not self-describing: a plain new field
/// would change the bytes of every function, so stored state and older clients' deploys would
/// no longer decode. Instead the pipeline rides in the tag of the last field, `idempotency`:
/// an `Option` is encoded as the byte 0 or 1 (then the value), and a staged spec writes the
/// byte [`spec_wire::STAGED_TAG`] followed by the idempotency option and the stages. A plain
/// spec is therefore byte for byte what it was, and a build that predates stages refuses a
/// staged spec (an invalid option tag) rather than misreading it. In human-readable formats a
/// plain spec is also as before, and a staged one holds `{"idempotency", "stages"}` in that
/// field.
mod spec_wire {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{DataGrant, FnMode, FunctionSpec, Idempotency, StageSpec};

    /// The tag of the last field of a staged spec; 0 and 1 are `None` and `Some`.
    pub(super) const STAGED_TAG: u8 = 2;

    #[derive(Serialize, Deserialize)]
    pub(super) struct SpecWire {
        name: String,
        code_digest: String,
        entry: Vec<String>,
        mode: FnMode,
        tier: String,
        policy: Option<String>,
        memory_bytes: u64,
        timeout_ms: u64,
        max_concurrency: u32,
        queue_max: u32,
        min_warm: u32,
        max_attempts: u32,
        retry_backoff_ms: u64,
        data: DataGrant,
        env: Vec<(String, String)>,
        idempotency: Tail,
    }

    /// `idempotency` and `stages` as one field.
    pub(super) struct Tail {
        idempotency: Option<Idempotency>,
        stages: Vec<StageSpec>,
    }

    /// The layout of a staged [`Tail`] in human-readable formats (a plain one is the option
    /// alone, as before stages).
    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TailText {
        idempotency: Option<Idempotency>,
        stages: Vec<StageSpec>,
    }

    /// What a human-readable `idempotency` field may hold.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TailTextIn {
        Staged(TailText),
        Plain(Option<Idempotency>),
    }

    impl From<FunctionSpec> for SpecWire {
        fn from(s: FunctionSpec) -> Self {
            SpecWire {
                name: s.name,
                code_digest: s.code_digest,
                entry: s.entry,
                mode: s.mode,
                tier: s.tier,
                policy: s.policy,
                memory_bytes: s.memory_bytes,
                timeout_ms: s.timeout_ms,
                max_concurrency: s.max_concurrency,
                queue_max: s.queue_max,
                min_warm: s.min_warm,
                max_attempts: s.max_attempts,
                retry_backoff_ms: s.retry_backoff_ms,
                data: s.data,
                env: s.env,
                idempotency: Tail {
                    idempotency: s.idempotency,
                    stages: s.stages,
                },
            }
        }
    }

    impl From<SpecWire> for FunctionSpec {
        fn from(w: SpecWire) -> Self {
            FunctionSpec {
                name: w.name,
                code_digest: w.code_digest,
                entry: w.entry,
                mode: w.mode,
                tier: w.tier,
                policy: w.policy,
                memory_bytes: w.memory_bytes,
                timeout_ms: w.timeout_ms,
                max_concurrency: w.max_concurrency,
                queue_max: w.queue_max,
                min_warm: w.min_warm,
                max_attempts: w.max_attempts,
                retry_backoff_ms: w.retry_backoff_ms,
                data: w.data,
                env: w.env,
                idempotency: w.idempotency.idempotency,
                stages: w.idempotency.stages,
            }
        }
    }

    impl Serialize for Tail {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeTuple;
            if self.stages.is_empty() {
                return self.idempotency.serialize(serializer);
            }
            if serializer.is_human_readable() {
                return TailText {
                    idempotency: self.idempotency.clone(),
                    stages: self.stages.clone(),
                }
                .serialize(serializer);
            }
            let mut t = serializer.serialize_tuple(3)?;
            t.serialize_element(&STAGED_TAG)?;
            t.serialize_element(&self.idempotency)?;
            t.serialize_element(&self.stages)?;
            t.end()
        }
    }

    impl<'de> Deserialize<'de> for Tail {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            if deserializer.is_human_readable() {
                return Ok(match TailTextIn::deserialize(deserializer)? {
                    TailTextIn::Staged(t) => Tail {
                        idempotency: t.idempotency,
                        stages: t.stages,
                    },
                    TailTextIn::Plain(idempotency) => Tail {
                        idempotency,
                        stages: Vec::new(),
                    },
                });
            }
            // A tuple of up to three elements whose first one, the tag, says how many follow:
            // the reader stops after the tag for `None`.
            deserializer.deserialize_tuple(3, TailVisitor)
        }
    }

    struct TailVisitor;

    impl<'de> Visitor<'de> for TailVisitor {
        type Value = Tail;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an idempotency option, or the staged tag, the option and the stages")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tail, A::Error> {
            let tag: u8 = seq
                .next_element()?
                .ok_or_else(|| de::Error::invalid_length(0, &self))?;
            let (idempotency, stages) = match tag {
                0 => (None, Vec::new()),
                1 => {
                    let idem: Idempotency = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                    (Some(idem), Vec::new())
                }
                STAGED_TAG => {
                    let idem: Option<Idempotency> = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                    let stages: Vec<StageSpec> = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(2, &self))?;
                    if stages.is_empty() {
                        return Err(de::Error::custom("a staged spec without stages"));
                    }
                    (idem, stages)
                }
                other => {
                    return Err(de::Error::invalid_value(
                        de::Unexpected::Unsigned(u64::from(other)),
                        &self,
                    ))
                }
            };
            Ok(Tail {
                idempotency,
                stages,
            })
        }
    }
}

/// Why a function spec is refused.
pub fn validate_spec(spec: &FunctionSpec) -> Result<(), String> {
    validate_function_name(&spec.name)?;
    if spec.code_digest.len() != 64 || !spec.code_digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("code digest must be 64 hex digits (SHA-256)".into());
    }
    if spec.is_staged() {
        validate_pipeline(spec)?;
    } else {
        validate_entry(&spec.entry)?;
        validate_tier(&spec.tier)?;
        validate_policy_text(spec.policy.as_deref())?;
        validate_grant(&spec.data)?;
        validate_env(&spec.env)?;
    }
    if spec.memory_bytes < 8 * 1024 * 1024 {
        return Err("memory must be at least 8 MiB".into());
    }
    if spec.timeout_ms == 0 || spec.timeout_ms > TIMEOUT_MS_MAX {
        return Err(format!(
            "timeout must be between 1 ms and {} s",
            TIMEOUT_MS_MAX / 1000
        ));
    }
    if spec.max_concurrency == 0 || spec.max_concurrency > CONCURRENCY_MAX {
        return Err(format!(
            "max concurrency must be between 1 and {CONCURRENCY_MAX}"
        ));
    }
    if spec.queue_max > QUEUE_MAX {
        return Err(format!("the queue bound is at most {QUEUE_MAX}"));
    }
    if spec.min_warm > spec.max_concurrency {
        return Err("min-warm cannot exceed max concurrency".into());
    }
    if spec.max_attempts == 0 || spec.max_attempts > ATTEMPTS_MAX {
        return Err(format!("max attempts must be between 1 and {ATTEMPTS_MAX}"));
    }
    if spec.retry_backoff_ms > RETRY_BACKOFF_MS_MAX {
        return Err(format!(
            "the retry back-off is at most {} s",
            RETRY_BACKOFF_MS_MAX / 1000
        ));
    }
    if let Some(idem) = &spec.idempotency {
        if idem.dependencies.len() > DEPENDENCIES_MAX {
            return Err(format!("at most {DEPENDENCIES_MAX} dependencies"));
        }
        if idem.ttl_ms == 0 || idem.ttl_ms > IDEMPOTENCY_TTL_MS_MAX {
            return Err("the idempotency TTL must be between 1 ms and 30 days".into());
        }
        for d in &idem.dependencies {
            match d {
                Dependency::Kv(k) => check_key(k).map_err(|e| format!("dependency kv:{k}: {e}"))?,
                Dependency::KvPrefix(p) => {
                    if !prefix_is_valid(p) {
                        return Err(format!("bad dependency prefix {p:?}"));
                    }
                }
                Dependency::File(p) => {
                    if !p.starts_with('/') || p.len() > 4096 || p.contains('\0') {
                        return Err(format!("file dependency {p:?} must be an absolute path"));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The rules only a staged function has: a bounded pipeline of valid, uniquely named stages,
/// each within the function's tier, exec mode, no warm pool, and every per-sandbox setting
/// given per stage rather than for the function.
fn validate_pipeline(spec: &FunctionSpec) -> Result<(), String> {
    if spec.stages.len() > STAGES_MAX {
        return Err(format!(
            "{} stages: a function has at most {STAGES_MAX}",
            spec.stages.len()
        ));
    }
    if spec.mode != FnMode::Exec {
        return Err(
            "a staged function runs in exec mode only (serve mode keeps one process per sandbox, a pipeline has several)"
                .into(),
        );
    }
    if spec.min_warm > 0 {
        return Err(
            "a staged function starts each stage in a fresh sandbox: min-warm must be 0".into(),
        );
    }
    let per_stage = [
        ("entry", !spec.entry.is_empty()),
        ("policy", spec.policy.is_some()),
        ("data grant", !spec.data.is_empty()),
        ("environment", !spec.env.is_empty()),
    ];
    if let Some((what, _)) = per_stage.iter().find(|(_, set)| *set) {
        return Err(format!(
            "a staged function gives its {what} per stage, not for the whole function"
        ));
    }
    validate_tier(&spec.tier)?;
    let ceiling = tier_rank(&spec.tier).expect("the tier was just validated");
    for (i, stage) in spec.stages.iter().enumerate() {
        let at = |e: String| format!("stage {} ({:?}): {e}", i + 1, stage.name);
        validate_stage_name(&stage.name).map_err(at)?;
        if spec.stages[..i].iter().any(|s| s.name == stage.name) {
            return Err(at("the name is used by an earlier stage".into()));
        }
        validate_entry(&stage.entry).map_err(at)?;
        validate_tier(&stage.tier).map_err(at)?;
        if tier_rank(&stage.tier).expect("the tier was just validated") > ceiling {
            return Err(at(format!(
                "tier {} is above the function's tier {}",
                stage.tier, spec.tier
            )));
        }
        validate_policy_text(stage.policy.as_deref()).map_err(at)?;
        validate_grant(&stage.data).map_err(at)?;
        validate_env(&stage.env).map_err(at)?;
    }
    Ok(())
}

/// A stage name: 1 to [`STAGE_NAME_BYTES_MAX`] bytes of `[A-Za-z0-9_.-]`.
fn validate_stage_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= STAGE_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad stage name: 1-{STAGE_NAME_BYTES_MAX} characters of A-Z a-z 0-9 _ - ."
        ))
    }
}

fn validate_entry(entry: &[String]) -> Result<(), String> {
    if entry.is_empty() || entry[0].is_empty() {
        return Err("the entry command is empty".into());
    }
    if entry.len() > ENTRY_ARGS_MAX
        || entry
            .iter()
            .any(|a| a.len() > ENTRY_ARG_BYTES_MAX || a.contains('\0'))
    {
        return Err(format!(
            "the entry command is limited to {ENTRY_ARGS_MAX} arguments of {ENTRY_ARG_BYTES_MAX} bytes without NUL"
        ));
    }
    Ok(())
}

fn validate_tier(tier: &str) -> Result<(), String> {
    if tier_rank(tier).is_none() {
        return Err(format!(
            "unknown tier {tier:?} (untrusted, standard or trusted)"
        ));
    }
    Ok(())
}

fn validate_policy_text(policy: Option<&str>) -> Result<(), String> {
    if policy.is_some_and(|p| p.len() > POLICY_BYTES_MAX) {
        return Err(format!("the policy is limited to {POLICY_BYTES_MAX} bytes"));
    }
    Ok(())
}

fn validate_grant(data: &DataGrant) -> Result<(), String> {
    let prefixes = data.read_prefixes.len() + data.write_prefixes.len();
    if prefixes > DATA_PREFIXES_MAX {
        return Err(format!("at most {DATA_PREFIXES_MAX} data-service prefixes"));
    }
    for p in data.read_prefixes.iter().chain(&data.write_prefixes) {
        if !prefix_is_valid(p) {
            return Err(format!("bad data-service prefix {p:?}"));
        }
    }
    Ok(())
}

fn validate_env(env: &[(String, String)]) -> Result<(), String> {
    if env.len() > ENV_VARS_MAX
        || env.iter().any(|(k, v)| {
            k.is_empty()
                || k.len() + v.len() > ENV_VAR_BYTES_MAX
                || k.contains(['=', '\0'])
                || v.contains('\0')
        })
    {
        return Err(format!(
            "at most {ENV_VARS_MAX} environment variables, names without '=' or NUL"
        ));
    }
    Ok(())
}

/// A function name: 1 to [`FUNCTION_NAME_BYTES_MAX`] bytes of `[A-Za-z0-9_.-]`, starting
/// with a letter or digit.
pub fn validate_function_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= FUNCTION_NAME_BYTES_MAX
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad function name {name:?}: 1-{FUNCTION_NAME_BYTES_MAX} characters of A-Z a-z 0-9 _ - ., starting with a letter or digit"
        ))
    }
}

/// One immutable version of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionVersion {
    pub version: u64,
    /// The identity of the function this version belongs to.
    pub function_id: FunctionId,
    pub spec: FunctionSpec,
    pub deployed_ms: u64,
}

/// A function and its kept versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub name: String,
    /// Never reused (see [`FunctionId`]).
    pub id: FunctionId,
    /// Kept versions, oldest first.
    pub versions: Vec<FunctionVersion>,
    pub latest: u64,
    pub created_ms: u64,
}

impl FunctionRecord {
    pub fn version(&self, version: u64) -> Option<&FunctionVersion> {
        self.versions.iter().find(|v| v.version == version)
    }

    pub fn latest(&self) -> Option<&FunctionVersion> {
        self.version(self.latest)
    }
}

/// An uploaded (or uploading) code archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeBlob {
    pub digest: String,
    pub total_bytes: u64,
    pub chunks: u32,
    pub received: u32,
    pub complete: bool,
    pub created_ms: u64,
}

/// The number of chunks of an archive of `total_bytes`.
pub fn chunk_count(total_bytes: u64) -> u32 {
    let n = total_bytes.div_ceil(CODE_CHUNK_BYTES as u64).max(1);
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskState {
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    TimedOut,
}

impl TaskState {
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::TimedOut
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::TimedOut => "timed_out",
        }
    }
}

/// How one attempt ended, as its node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStatus {
    Succeeded,
    Failed,
    TimedOut,
}

/// What one attempt produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub status: RunStatus,
    pub node: NodeId,
    /// Exit code of an exec-mode process, when it exited.
    pub exit_code: Option<i32>,
    /// Stdout (exec) or the response line (serve), at most [`OUTPUT_BYTES_MAX`].
    #[serde(with = "serde_bytes")]
    pub output: Vec<u8>,
    /// Stderr, the last [`LOG_BYTES_MAX`] bytes.
    #[serde(with = "serde_bytes")]
    pub log: Vec<u8>,
    /// Why the attempt failed, when it did (out of memory, sandbox error, ...).
    pub error: Option<String>,
    /// The sandbox was warm (taken from the pool) rather than created for this attempt.
    pub warm: bool,
    pub wall_ms: u64,
    pub cpu_ms: u64,
    pub peak_memory_bytes: u64,
}

/// One invocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub function: String,
    pub version: u64,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// A caller waits for the result (no automatic retry of failures).
    pub sync: bool,
    pub state: TaskState,
    /// Times the task was assigned to a node.
    pub attempts: u32,
    /// Attempts that ended in failure or timeout.
    pub failures: u32,
    pub node: Option<NodeId>,
    /// Fencing token of the current assignment; only a completion carrying it is accepted.
    pub token: u64,
    pub submitted_ms: u64,
    pub assigned_ms: Option<u64>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Not placed before this time (retry back-off).
    pub not_before_ms: u64,
    /// Position in its function's queue (a counter; smaller is earlier).
    pub queue_seq: u64,
    /// Memory the function version asks for, counted against its node while assigned.
    pub memory_bytes: u64,
    /// Copied from the function version at submit.
    pub timeout_ms: u64,
    pub result: Option<TaskResult>,
    /// The task failed every attempt and is on the dead-letter list.
    pub dead_letter: bool,
    /// For an idempotent function: hit, joined or miss (and why).
    pub cache: Option<CacheOutcome>,
    /// The ledger entry this run records into.
    pub ledger_key: Option<String>,
    /// The request id of the invocation that made the task (for logs, end to end).
    #[serde(default)]
    pub request_id: Option<RequestId>,
}

impl Task {
    /// Bytes this task holds in memory, for [`TASK_BYTES_MAX`].
    pub fn bytes(&self) -> u64 {
        let result = self
            .result
            .as_ref()
            .map_or(0, |r| r.output.len() + r.log.len());
        (self.payload.len() + result + self.function.len() + 256) as u64
    }
}

/// Warm sandboxes of one function version idle on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmReport {
    pub function: String,
    pub version: u64,
    pub idle: u32,
}

/// A worker node as its heartbeats describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub last_heartbeat_ms: u64,
    /// Tasks the node runs at once.
    pub slots: u32,
    /// Memory the node gives to sandboxes (running and warm).
    pub memory_budget_bytes: u64,
    /// Memory held by its idle warm sandboxes.
    pub warm_memory_bytes: u64,
    /// Idle warm sandboxes per (function, version), minus those claimed by placements
    /// since the last heartbeat.
    pub warm: Vec<WarmReport>,
}

impl NodeRecord {
    pub fn warm_idle(&self, function: &str, version: u64) -> u32 {
        self.warm
            .iter()
            .find(|w| w.function == function && w.version == version)
            .map_or(0, |w| w.idle)
    }
}

/// A worker's periodic report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: NodeId,
    pub slots: u32,
    pub memory_budget_bytes: u64,
    pub warm_memory_bytes: u64,
    pub warm: Vec<WarmReport>,
    /// Tasks the node has started, with the tokens they run under.
    pub running: Vec<(TaskId, u64)>,
}

/// Which tasks a listing returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFilter {
    pub function: Option<String>,
    pub state: Option<TaskState>,
    /// Only tasks on the dead-letter list.
    pub dead_letter: bool,
}

impl TaskFilter {
    pub fn matches(&self, task: &Task) -> bool {
        self.function.as_ref().is_none_or(|f| *f == task.function)
            && self.state.is_none_or(|s| s == task.state)
            && (!self.dead_letter || task.dead_letter)
    }
}

/// Counters of the scheduler state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedStats {
    pub functions: usize,
    pub tasks_active: usize,
    pub tasks_queued: usize,
    pub tasks_finished: usize,
    pub code_blobs: usize,
    pub code_bytes: u64,
    pub task_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use bincode::Options as _;

    fn plain() -> FunctionSpec {
        FunctionSpec {
            name: "f".into(),
            code_digest: "ab".repeat(32),
            entry: vec!["sh".into(), "main.sh".into()],
            mode: FnMode::Exec,
            tier: "standard".into(),
            policy: Some("pids_max = 4\n".into()),
            memory_bytes: 64 << 20,
            timeout_ms: 1_000,
            max_concurrency: 4,
            queue_max: 10,
            min_warm: 1,
            max_attempts: 3,
            retry_backoff_ms: 100,
            data: DataGrant {
                read_prefixes: vec!["in/".into()],
                write_prefixes: vec!["out/".into()],
            },
            env: vec![("A".into(), "b".into())],
            idempotency: None,
            stages: vec![],
        }
    }

    fn stage(name: &str, tier: &str) -> StageSpec {
        StageSpec {
            name: name.into(),
            entry: vec!["sh".into(), format!("{name}.sh")],
            tier: tier.into(),
            policy: None,
            data: DataGrant::default(),
            env: vec![],
        }
    }

    fn staged() -> FunctionSpec {
        FunctionSpec {
            entry: vec![],
            policy: None,
            data: DataGrant::default(),
            env: vec![],
            min_warm: 0,
            tier: "trusted".into(),
            stages: vec![stage("parse", "untrusted"), stage("store", "trusted")],
            ..plain()
        }
    }

    /// [`FunctionSpec`] as it was before stages, with its derived encoding.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct LegacySpec {
        name: String,
        code_digest: String,
        entry: Vec<String>,
        mode: FnMode,
        tier: String,
        policy: Option<String>,
        memory_bytes: u64,
        timeout_ms: u64,
        max_concurrency: u32,
        queue_max: u32,
        min_warm: u32,
        max_attempts: u32,
        retry_backoff_ms: u64,
        data: DataGrant,
        env: Vec<(String, String)>,
        idempotency: Option<Idempotency>,
    }

    fn legacy(s: &FunctionSpec) -> LegacySpec {
        LegacySpec {
            name: s.name.clone(),
            code_digest: s.code_digest.clone(),
            entry: s.entry.clone(),
            mode: s.mode,
            tier: s.tier.clone(),
            policy: s.policy.clone(),
            memory_bytes: s.memory_bytes,
            timeout_ms: s.timeout_ms,
            max_concurrency: s.max_concurrency,
            queue_max: s.queue_max,
            min_warm: s.min_warm,
            max_attempts: s.max_attempts,
            retry_backoff_ms: s.retry_backoff_ms,
            data: s.data.clone(),
            env: s.env.clone(),
            idempotency: s.idempotency.clone(),
        }
    }

    fn idempotency() -> Idempotency {
        Idempotency {
            dependencies: vec![Dependency::Kv("cfg".into())],
            ttl_ms: 60_000,
            cache_failures: false,
            track_reads: true,
        }
    }

    #[test]
    fn a_plain_spec_encodes_as_before_stages_existed() {
        let with_idem = FunctionSpec {
            idempotency: Some(idempotency()),
            ..plain()
        };
        for spec in [plain(), with_idem] {
            // The store's encoding (fixed-width integers) and bincode's default (the RPCs').
            let fixint = bincode::DefaultOptions::new().with_fixint_encoding();
            let old = fixint.serialize(&legacy(&spec)).expect("encodes");
            assert_eq!(fixint.serialize(&spec).expect("encodes"), old);
            let decoded: FunctionSpec = fixint.deserialize(&old).expect("decodes");
            assert_eq!(decoded, spec);
            let varint = bincode::DefaultOptions::new();
            let old = varint.serialize(&legacy(&spec)).expect("encodes");
            assert_eq!(varint.serialize(&spec).expect("encodes"), old);
            // Inside a larger value, as in a function record, what follows still decodes.
            let version = FunctionVersion {
                version: 7,
                function_id: 3,
                spec: spec.clone(),
                deployed_ms: 99,
            };
            let bytes = fixint.serialize(&version).expect("encodes");
            let back: FunctionVersion = fixint.deserialize(&bytes).expect("decodes");
            assert_eq!(back, version);
        }
    }

    #[test]
    fn a_staged_spec_round_trips_and_an_older_build_refuses_it() {
        let fixint = bincode::DefaultOptions::new().with_fixint_encoding();
        for idem in [None, Some(idempotency())] {
            let spec = FunctionSpec {
                idempotency: idem,
                ..staged()
            };
            let version = FunctionVersion {
                version: 3,
                function_id: 3,
                spec: spec.clone(),
                deployed_ms: 5,
            };
            let bytes = fixint.serialize(&version).expect("encodes");
            let back: FunctionVersion = fixint.deserialize(&bytes).expect("decodes");
            assert_eq!(back, version);
            let bytes = fixint.serialize(&spec).expect("encodes");
            assert!(
                fixint.deserialize::<LegacySpec>(&bytes).is_err(),
                "a build without stages must not read a pipeline as a plain function"
            );
        }
        // Human-readable formats: a plain spec as before, a staged one with named fields.
        let json = serde_json::to_value(staged()).expect("json");
        assert_eq!(json["idempotency"]["stages"][1]["name"], "store");
        let back: FunctionSpec = serde_json::from_value(json).expect("from json");
        assert_eq!(back, staged());
        for idem in [None, Some(idempotency())] {
            let plain = FunctionSpec {
                idempotency: idem,
                ..plain()
            };
            let json = serde_json::to_value(&plain).expect("json");
            assert_eq!(json, serde_json::to_value(legacy(&plain)).expect("json"));
            let back: FunctionSpec = serde_json::from_value(json).expect("from json");
            assert_eq!(back, plain);
        }
    }

    #[test]
    fn a_valid_pipeline_passes_and_plain_rules_are_unchanged() {
        validate_spec(&plain()).expect("plain");
        validate_spec(&staged()).expect("staged");
        let eight = FunctionSpec {
            stages: (0..STAGES_MAX)
                .map(|i| stage(&format!("s{i}"), "standard"))
                .collect(),
            ..staged()
        };
        validate_spec(&eight).expect("the bound itself is allowed");
        let plain_empty = FunctionSpec {
            entry: vec![],
            ..plain()
        };
        assert_eq!(
            validate_spec(&plain_empty).expect_err("no entry"),
            "the entry command is empty"
        );
    }

    #[test]
    fn bad_pipelines_are_refused_naming_the_stage() {
        let mut cases: Vec<(FunctionSpec, &str)> = Vec::new();
        let mut too_many = staged();
        too_many.stages = (0..=STAGES_MAX)
            .map(|i| stage(&format!("s{i}"), "standard"))
            .collect();
        cases.push((too_many, "9 stages: a function has at most 8"));
        let mut empty = staged();
        empty.stages[1].entry = vec![];
        cases.push((empty, "stage 2 (\"store\"): the entry command is empty"));
        let mut blank = staged();
        blank.stages[0].entry = vec![String::new()];
        cases.push((blank, "stage 1 (\"parse\"): the entry command is empty"));
        let mut wider = staged();
        wider.tier = "standard".into();
        cases.push((
            wider,
            "stage 2 (\"store\"): tier trusted is above the function's tier standard",
        ));
        let mut bad_tier = staged();
        bad_tier.stages[0].tier = "root".into();
        cases.push((bad_tier, "stage 1 (\"parse\"): unknown tier \"root\""));
        let mut twice = staged();
        twice.stages[1].name = "parse".into();
        cases.push((
            twice,
            "stage 2 (\"parse\"): the name is used by an earlier stage",
        ));
        let mut unnamed = staged();
        unnamed.stages[0].name = "a b".into();
        cases.push((unnamed, "stage 1 (\"a b\"): bad stage name"));
        let mut serve = staged();
        serve.mode = FnMode::Serve;
        cases.push((serve, "a staged function runs in exec mode only"));
        let mut warm = staged();
        warm.min_warm = 1;
        cases.push((warm, "min-warm must be 0"));
        let mut entry = staged();
        entry.entry = vec!["sh".into()];
        cases.push((entry, "gives its entry per stage"));
        let mut grant = staged();
        grant.data.read_prefixes = vec!["x/".into()];
        cases.push((grant, "gives its data grant per stage"));
        let mut env = staged();
        env.env = vec![("K".into(), "v".into())];
        cases.push((env, "gives its environment per stage"));
        let mut stage_env = staged();
        stage_env.stages[1].env = vec![("=".into(), "v".into())];
        cases.push((
            stage_env,
            "stage 2 (\"store\"): at most 64 environment variables",
        ));
        let mut stage_grant = staged();
        stage_grant.stages[0].data.write_prefixes = vec!["a\nb".into()];
        cases.push((stage_grant, "stage 1 (\"parse\"): bad data-service prefix"));
        let mut big_policy = staged();
        big_policy.stages[0].policy = Some("#".repeat(POLICY_BYTES_MAX + 1));
        cases.push((big_policy, "stage 1 (\"parse\"): the policy is limited"));
        for (spec, expected) in cases {
            let e = validate_spec(&spec).expect_err(expected);
            assert!(e.contains(expected), "{expected:?} not in {e:?}");
        }
    }
}
