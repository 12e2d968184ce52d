//! Acquiring a sandbox for a run: the sandbox a function version (or one stage of it) runs
//! in, an idle warm one taken or claimed from the pool, and the pool replenished up to this
//! node's share of the function's min-warm.
//!
//! Invariant: a serve-mode request is counted busy for its key from the moment it claims
//! until it is done, so requests arriving together wait for one cold start instead of each
//! making their own.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use skiff_client::api::{FnMode, FunctionVersion};
use skiff_sandbox::{PolicyError, PoolKey, SandboxSpec, Tier, WarmSandbox};

use super::leases::{CodeError, DataSocketError, Leases};
use super::{lock, Worker};
use crate::data_service::DataSocket;
use crate::policy::{function_policy, stage_policy, FunctionPolicyError};
use crate::replica::Replica;

/// Why the sandbox of a run could not be prepared; its text follows "cannot prepare the
/// sandbox: " in the failed task's error.
#[derive(Debug, thiserror::Error)]
pub(super) enum PrepareError {
    #[error(transparent)]
    Policy(#[from] FunctionPolicyError),
    #[error(transparent)]
    Code(#[from] CodeError),
    /// The resolved policy does not make a sandbox spec.
    #[error(transparent)]
    Spec(#[from] PolicyError),
    #[error(transparent)]
    DataSocket(#[from] DataSocketError),
}

impl Worker {
    /// The sandbox a function version runs in, and what it uses.
    pub(super) async fn sandbox_spec(
        &self,
        node: &Replica,
        fv: &FunctionVersion,
    ) -> Result<(SandboxSpec, Leases), PrepareError> {
        let tier: Tier = fv.spec.tier.parse().map_err(FunctionPolicyError::from)?;
        let policy = function_policy(&fv.spec)?;
        let code = self.code_dir(node, &fv.spec.code_digest).await?;
        let mut spec = SandboxSpec::with_policy(tier, &policy, code.dir())?;
        spec.env = fv.spec.env.clone();
        let mut socket = None;
        if !fv.spec.data.is_empty() {
            let s = self.data_socket(node, fv, None, &fv.spec.data).await?;
            spec.data_socket = Some(s.path().to_path_buf());
            spec.helper_binary = self.helper_binary.clone();
            socket = Some(s);
        }
        let leases = Leases {
            _code: code,
            _socket: socket,
        };
        Ok((spec, leases))
    }

    /// The sandbox of stage `index` of a staged function version, given the time left of the
    /// pipeline: the stage's tier narrowed by its policy, the function's memory and that time;
    /// its own environment, and a data socket limited to its own grant (none without one).
    pub(super) async fn stage_sandbox_spec(
        &self,
        node: &Replica,
        fv: &FunctionVersion,
        index: usize,
        code: &Path,
        remaining_ms: u64,
    ) -> Result<(SandboxSpec, Option<Arc<DataSocket>>), PrepareError> {
        let stage = &fv.spec.stages[index];
        let tier: Tier = stage.tier.parse().map_err(FunctionPolicyError::from)?;
        let policy = stage_policy(&fv.spec, stage, tier, remaining_ms)?;
        let mut spec = SandboxSpec::with_policy(tier, &policy, code)?;
        spec.env = stage.env.clone();
        let mut socket = None;
        if !stage.data.is_empty() {
            let s = self.data_socket(node, fv, Some(index), &stage.data).await?;
            spec.data_socket = Some(s.path().to_path_buf());
            spec.helper_binary = self.helper_binary.clone();
            socket = Some(s);
        }
        Ok((spec, socket))
    }

    /// How many idle sandboxes of `fv` this node should hold: its share of the function's
    /// min-warm over the live nodes, and at least one after a recent use.
    pub(super) fn warm_target(&self, node: &Replica, fv: &FunctionVersion, used: bool) -> usize {
        let min_warm = fv.spec.min_warm as usize;
        let share = node.state(|sm| {
            let live = sm.sched().live_nodes(sm.last_time_ms());
            match live.iter().position(|n| *n == self.id) {
                Some(rank) if !live.is_empty() => {
                    min_warm / live.len() + usize::from(rank < min_warm % live.len())
                }
                _ => 0,
            }
        });
        share.max(usize::from(used && self.settings.keep_warm_after_use))
    }

    /// Starts pre-warming sandboxes of `fv` up to `target` (in the background).
    pub(super) fn replenish(
        self: &Arc<Self>,
        spec: SandboxSpec,
        leases: &Leases,
        fv: &FunctionVersion,
        target: usize,
    ) {
        let key = Self::key(fv);
        let have =
            self.pool.idle_count(&key) + lock(&self.prewarming).get(&key).copied().unwrap_or(0);
        if have >= target {
            return;
        }
        let argv = match fv.spec.mode {
            FnMode::Exec => None,
            FnMode::Serve => Some(fv.spec.entry.clone()),
        };
        for _ in have..target {
            *lock(&self.prewarming).entry(key.clone()).or_default() += 1;
            let w = self.clone();
            let (key, spec, argv) = (key.clone(), spec.clone(), argv.clone());
            let leases = leases.clone();
            self.background.spawn_until_shutdown(async move {
                let result = w.pool.prewarm(key.clone(), spec, argv).await;
                if let Some(n) = lock(&w.prewarming).get_mut(&key) {
                    *n = n.saturating_sub(1);
                }
                match result {
                    Ok(true) => w.hold_for_warm(&key, leases),
                    Ok(false) => tracing::debug!(function = %key.function, "warm pool full"),
                    Err(error) => {
                        tracing::warn!(function = %key.function, %error, "pre-warm failed")
                    }
                }
                w.warmed.notify_waiters();
                w.pool_changed.notify_one();
            });
        }
    }

    /// An idle warm sandbox for `key`, waiting up to the cold-start wait for one being
    /// prepared rather than cold-starting another (exec mode; serve mode: `claim_serve`).
    pub(super) async fn take_warm(&self, key: &PoolKey) -> Option<WarmSandbox> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.cold_start_wait_ms);
        loop {
            let notified = self.warmed.notified();
            if let Some(s) = self.pool.acquire(key) {
                self.pool_changed.notify_one();
                return Some(s);
            }
            if lock(&self.prewarming).get(key).copied().unwrap_or(0) == 0 {
                return None;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// A serve-mode sandbox for one request: an idle one, or (after waiting up to the
    /// cold-start wait for one in use or being prepared to come back) `None`, meaning the
    /// caller starts one. Either way the caller is counted busy for `key`, decided under one
    /// lock, so requests arriving together do not all cold-start: one does, the others wait
    /// for its sandbox.
    pub(super) async fn claim_serve(&self, key: &PoolKey) -> Option<WarmSandbox> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.settings.cold_start_wait_ms);
        loop {
            let notified = self.warmed.notified();
            {
                let mut busy = lock(&self.busy);
                if let Some(s) = self.pool.acquire(key) {
                    *busy.entry(key.clone()).or_default() += 1;
                    self.pool_changed.notify_one();
                    return Some(s);
                }
                let pending = lock(&self.prewarming).get(key).copied().unwrap_or(0)
                    + busy.get(key).copied().unwrap_or(0);
                if pending == 0 || tokio::time::Instant::now() >= deadline {
                    *busy.entry(key.clone()).or_default() += 1;
                    return None;
                }
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}
