//! The sandbox policy of a function and of each of its stages: the function's own policy
//! narrowed by its memory and timeout settings, and the deploy-time check that every tier
//! and policy resolves to valid limits.
//!
//! Invariant: a policy never widens its tier; the memory and timeout a function sets only
//! narrow what its policy allows.

use skiff_raft_store::functions::StageSpec;
use skiff_sandbox::{Policy, PolicyError, Tier, UnknownTier};

/// Why a function's (or a stage's) tier and policy do not make a sandbox. The texts are what
/// a refused deploy and a failed task carry, so they stay as they are.
#[derive(Debug, thiserror::Error)]
pub enum FunctionPolicyError {
    /// The policy text does not parse.
    #[error("bad policy: {0}")]
    Parse(#[source] PolicyError),
    /// The tier is not one of the sandbox's.
    #[error(transparent)]
    Tier(#[from] UnknownTier),
    /// The policy widens its tier.
    #[error(transparent)]
    Resolve(PolicyError),
    /// The function's memory or timeout is over its tier's ceiling.
    #[error("{0}")]
    Ceiling(String),
    /// One stage of a staged function fails, named as in its logs.
    #[error("{label}: {source}")]
    Stage {
        label: String,
        source: Box<FunctionPolicyError>,
    },
}

/// A policy's text parsed, or the default policy without one.
fn parse_policy(text: Option<&String>) -> Result<Policy, FunctionPolicyError> {
    match text {
        Some(text) => Policy::from_toml(text).map_err(FunctionPolicyError::Parse),
        None => Ok(Policy::default()),
    }
}

/// The sandbox policy of a function: its own policy narrowed further by its memory and
/// timeout settings.
pub fn function_policy(
    spec: &skiff_client::api::FunctionSpec,
) -> Result<Policy, FunctionPolicyError> {
    let mut policy = parse_policy(spec.policy.as_ref())?;
    policy.memory_bytes_max = Some(
        policy
            .memory_bytes_max
            .map_or(spec.memory_bytes, |m| m.min(spec.memory_bytes)),
    );
    policy.timeout_ms = Some(
        policy
            .timeout_ms
            .map_or(spec.timeout_ms, |t| t.min(spec.timeout_ms)),
    );
    Ok(policy)
}

/// The sandbox policy of one stage: its own policy narrowed further by the function's memory
/// and by `remaining_ms`, what is left of the function's timeout for the rest of the pipeline.
/// Those two are the function's, for every stage, so a stage whose tier allows less keeps its
/// tier's ceiling instead (an untrusted stage of a pipeline with 30 s in all still stops at
/// its tier's 10 s); only the stage's own policy can be refused for widening its tier.
pub fn stage_policy(
    spec: &skiff_client::api::FunctionSpec,
    stage: &StageSpec,
    tier: Tier,
    remaining_ms: u64,
) -> Result<Policy, FunctionPolicyError> {
    let mut policy = parse_policy(stage.policy.as_ref())?;
    let ceiling = tier.limits();
    policy.memory_bytes_max = Some(match policy.memory_bytes_max {
        Some(m) => m.min(spec.memory_bytes),
        None => spec.memory_bytes.min(ceiling.memory_bytes_max),
    });
    policy.timeout_ms = Some(match policy.timeout_ms {
        Some(t) => t.min(remaining_ms),
        None => remaining_ms.min(ceiling.timeout_ms),
    });
    Ok(policy)
}

/// Checks at deploy time that a function's tier and policy resolve to valid limits (for a
/// staged function: every stage's tier and policy, naming the stage that fails).
pub fn check_function_sandbox(
    spec: &skiff_client::api::FunctionSpec,
) -> Result<(), FunctionPolicyError> {
    for (index, stage) in spec.stages.iter().enumerate() {
        let in_stage = |source: FunctionPolicyError| FunctionPolicyError::Stage {
            label: stage_label(index, spec.stages.len(), stage),
            source: Box::new(source),
        };
        let tier: Tier = stage
            .tier
            .parse()
            .map_err(|e: UnknownTier| in_stage(e.into()))?;
        let policy = stage_policy(spec, stage, tier, spec.timeout_ms).map_err(in_stage)?;
        policy
            .resolve(tier)
            .map_err(|e| in_stage(FunctionPolicyError::Resolve(e)))?;
        // The stage's own policy alone, so a field it widens is refused even where the
        // function's memory or timeout would have narrowed it back.
        if let Some(text) = &stage.policy {
            let own =
                Policy::from_toml(text).map_err(|e| in_stage(FunctionPolicyError::Parse(e)))?;
            own.resolve(tier)
                .map_err(|e| in_stage(FunctionPolicyError::Resolve(e)))?;
        }
    }
    if spec.is_staged() {
        return Ok(());
    }
    let tier: Tier = spec.tier.parse()?;
    skiff_raft_store::functions::check_tier_ceiling(spec).map_err(FunctionPolicyError::Ceiling)?;
    let policy = function_policy(spec)?;
    policy.resolve(tier).map_err(FunctionPolicyError::Resolve)?;
    Ok(())
}

/// How errors and logs name a stage: `stage 2 of 3 (store)`.
pub(crate) fn stage_label(index: usize, count: usize, stage: &StageSpec) -> String {
    format!("stage {} of {count} ({})", index + 1, stage.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tier_ceilings_clients_default_within_are_the_sandboxs() {
        for tier in Tier::ALL {
            let limits = tier.limits();
            let c = skiff_raft_store::functions::tier_ceiling(tier.as_str())
                .expect("every sandbox tier has a ceiling");
            assert_eq!(
                (c.memory_bytes_max, c.timeout_ms_max),
                (limits.memory_bytes_max, limits.timeout_ms),
                "{tier}"
            );
        }
    }
}
