//! Client authentication and authorization: a client connection presents a bearer token once,
//! after its service byte (see `skiff_client::transport`); every call it makes is checked
//! against this node's applied token table before anything else happens.
//!
//! Invariants:
//! - a call is answered only after [`Session::allow`] found an active token of a role that
//!   may make it; otherwise the answer is `Unauthenticated` or `PermissionDenied` and the
//!   call has no effect (nothing forwarded, proposed or read);
//! - the check reads the answering node's applied state on every call, not a cache, so a
//!   node refuses a revoked token from the moment it applies the revocation, on connections
//!   already open too;
//! - a follower checks before it forwards; the leader trusts forwarded calls (they come over
//!   the peer service, whose authentication is the cluster's, not a client's);
//! - which role a deploy needs is decided in one place, [`deploy_role`];
//! - a function's environment values (its secrets) reach only roles that may deploy: every
//!   answer that carries a function passes through [`function_for`] on the node that
//!   answers the client, whether it read its own state or the leader's.

use std::sync::Arc;
use std::time::Duration;

use skiff_client::api::{
    ApiError, ClientCommand, Command, FunctionRecord, FunctionSpec, Role, TokenInfo,
};
use skiff_raft_store::tokens::{token_hash, validate_secret};
use tokio::sync::OnceCell;

use crate::replica::Replica;

/// How long a node waits, once per connection, for a token it does not know to appear in its
/// applied state: a token created a moment ago through another node may not have reached
/// this one yet.
pub const TOKEN_CATCH_UP_MS: u64 = 2_000;

/// The tier only admin tokens may deploy at.
pub const TRUSTED_TIER: &str = "trusted";

/// What a connection presented.
#[derive(Debug)]
enum Presented {
    None,
    /// Malformed (too short, not printable): no token can match it.
    Malformed(String),
    /// The SHA-256 of a well-formed secret; the secret itself is not kept.
    Hash(String),
}

/// One client connection: the replica it talks to and the token it presented.
#[derive(Clone)]
pub struct Session {
    replica: Replica,
    presented: Arc<Presented>,
    /// Set once this connection has waited for an unknown token ([`TOKEN_CATCH_UP_MS`]).
    caught_up: Arc<OnceCell<()>>,
}

impl Session {
    /// A session for a connection that presented `token` in its handshake.
    pub fn new(replica: Replica, token: Option<String>) -> Session {
        let presented = match token {
            None => Presented::None,
            Some(secret) => match validate_secret(&secret) {
                Ok(()) => Presented::Hash(token_hash(&secret)),
                Err(e) => Presented::Malformed(e),
            },
        };
        Session {
            replica,
            presented: Arc::new(presented),
            caught_up: Arc::new(OnceCell::new()),
        }
    }

    /// Checks that this connection's token is active on this node and that its role
    /// allows `needed`; `what` names the call in the refusal.
    pub async fn allow(&self, needed: Role, what: &str) -> Result<TokenInfo, ApiError> {
        let token = self.authenticate().await?;
        if !token.role.allows(needed) {
            return Err(self.denied(what, needed, &token));
        }
        Ok(token)
    }

    /// Checks a group of commands sent through `write`: each needs the role
    /// [`write_role`] gives it.
    pub async fn allow_write(&self, commands: &[ClientCommand]) -> Result<TokenInfo, ApiError> {
        let token = self.authenticate().await?;
        for c in commands {
            let (needed, what) = write_role(&c.command);
            if !token.role.allows(needed) {
                return Err(self.denied(&what, needed, &token));
            }
        }
        Ok(token)
    }

    fn denied(&self, what: &str, needed: Role, token: &TokenInfo) -> ApiError {
        ApiError::PermissionDenied(format!(
            "{what} needs the {needed} role; token {} has the {} role",
            token.id, token.role
        ))
    }

    /// The replica this connection talks to.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// Whether the connection's token is active here now (after the same once-per-connection
    /// wait for a token made a moment ago elsewhere).
    pub async fn token_is_active(&self) -> bool {
        self.authenticate().await.is_ok()
    }

    async fn authenticate(&self) -> Result<TokenInfo, ApiError> {
        let hash = match &*self.presented {
            Presented::None => {
                return Err(ApiError::Unauthenticated(
                    "this call needs a token (skiff --token or SKIFF_TOKEN)".into(),
                ))
            }
            Presented::Malformed(e) => return Err(ApiError::Unauthenticated(e.clone())),
            Presented::Hash(hash) => hash,
        };
        if let Some(found) = self.lookup(hash) {
            return found;
        }
        // Unknown here: give this node's state, once per connection, a moment to apply a
        // token made through another node.
        self.caught_up
            .get_or_init(|| async {
                let deadline =
                    tokio::time::Instant::now() + Duration::from_millis(TOKEN_CATCH_UP_MS);
                // Out of time, or Raft stopped: the lookup below answers.
                let _ = self
                    .replica
                    .wait_until(deadline, |_| self.lookup(hash).map(|_| ()))
                    .await;
            })
            .await;
        self.lookup(hash)
            .unwrap_or_else(|| Err(ApiError::Unauthenticated("unknown token".into())))
    }

    /// `None` when no token has this hash; else the token, or why it no longer works.
    fn lookup(&self, hash: &str) -> Option<Result<TokenInfo, ApiError>> {
        let token = self
            .replica
            .state(|sm| sm.tokens().by_hash(hash).cloned())?;
        Some(if token.revoked {
            Err(ApiError::Unauthenticated(format!(
                "token {} is revoked",
                token.id
            )))
        } else {
            Ok(token)
        })
    }
}

/// The role one command sent through `write` needs, and what to call it in a refusal.
pub fn write_role(command: &Command) -> (Role, String) {
    match command {
        Command::KvPut { .. } | Command::KvDelete { .. } => (Role::Deployer, "a key write".into()),
        Command::CodeChunk { .. } => (Role::Deployer, "a code upload".into()),
        Command::FnDeploy { spec } => deploy_role(spec),
        Command::FnRemove { .. } => (Role::Deployer, "removing a function".into()),
        Command::FnPurgeCache { .. } => (Role::Deployer, "purging a function's cache".into()),
        // Everything else is refused by `write` for any token (node-only commands, or
        // commands with their own call), so the strictest role is the safe answer.
        _ => (Role::Admin, "this command".into()),
    }
}

/// The role a deploy needs: a deployer's, or an admin's for a function that runs at the
/// `trusted` tier. The one place that decides it, so that a function made of several
/// parts can extend it to every part's tier.
pub fn deploy_role(spec: &FunctionSpec) -> (Role, String) {
    if spec.tier == TRUSTED_TIER {
        (
            Role::Admin,
            format!("deploying function {} at tier {TRUSTED_TIER}", spec.name),
        )
    } else {
        (Role::Deployer, format!("deploying function {}", spec.name))
    }
}

/// The role that may read a function's environment values: the one that may set them.
pub const ENV_READ_ROLE: Role = Role::Deployer;

/// `record` as `token` may see it: below [`ENV_READ_ROLE`] every environment value (of the
/// function and of each stage, in every version) is replaced by an empty string; the names
/// stay, so an invoker still sees which variables a function has.
pub fn function_for(token: &TokenInfo, mut record: FunctionRecord) -> FunctionRecord {
    if token.role.allows(ENV_READ_ROLE) {
        return record;
    }
    let blank = |env: &mut Vec<(String, String)>| env.iter_mut().for_each(|(_, v)| v.clear());
    for version in &mut record.versions {
        blank(&mut version.spec.env);
        for stage in &mut version.spec.stages {
            blank(&mut stage.env);
        }
    }
    record
}
