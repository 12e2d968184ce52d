//! Admin calls: the cluster's status, `cluster init` (with its first admin token), membership
//! changes and tokens. Membership changes run on the leader (a follower forwards them as an
//! [`AdminOp`]); status is answered by any node, from its own view when there is no leader.
//!
//! Invariants:
//! - `cluster init` needs no token, so everything it does is bounded before the node works
//!   for the caller ([`INIT_MEMBERS_MAX`] members, `INIT_PROBE_TIMEOUT` of probing), and an
//!   initialized cluster answers it from its applied state without dialing anyone;
//! - a node joins only after it answered a probe as the id it is added under;
//! - a token's secret is drawn on the node that answers the client: only its hash enters the
//!   log.

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use skiff_client::api::{
    ApiError, ClientCommand, ClusterStatus, Command, CommandResult, CreatedToken, MemberRole,
    NodeId, NodeStatus, RequestId, Role, TokenId, TokenInfo, INIT_MEMBERS_MAX,
};
use skiff_client::transport;
use skiff_raft_store::model::Principal;
use skiff_raft_store::tokens::{token_hash, validate_secret, validate_token_name};

use crate::batcher;
use crate::peer::{self, AdminOp, AdminResult, Probe};
use crate::replica::Replica;

/// Deadline of a reachability probe in `cluster status`.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long `cluster init` keeps proposing the bootstrap token while the first leader is
/// being elected.
const INIT_BOOTSTRAP_WAIT: Duration = Duration::from_secs(10);
/// Pause between two proposals of the bootstrap token while there is no leader yet.
const INIT_BOOTSTRAP_RETRY: Duration = Duration::from_millis(100);
/// How long `cluster init` on a fresh node may spend probing the other members, in all.
const INIT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of an add-node forwarded to the leader: it probes the new node and waits for it
/// to catch up as a learner before making it a voter.
const ADD_NODE_TIMEOUT: Duration = Duration::from_secs(60);

/// A membership change or the status: run on the leader, forwarded there from any other node.
pub async fn admin(replica: &Replica, op: AdminOp) -> Result<AdminResult, ApiError> {
    let leader = match replica.leader().await {
        Ok(l) => Some(l),
        Err(e) if matches!(op, AdminOp::Status) => {
            tracing::debug!(error = %e, "status without a leader");
            None
        }
        Err(e) => return Err(e),
    };
    match leader {
        Some((leader, _)) if leader == replica.id() => admin_on_leader(replica, op).await,
        Some((leader, addr)) => {
            let p = replica.peer(leader, &addr).await?;
            let mut ctx = peer::deadline(replica.timeout());
            if matches!(op, AdminOp::AddNode { .. }) {
                ctx = peer::deadline(ADD_NODE_TIMEOUT);
            }
            match p.forward_admin(ctx, op.clone()).await {
                Ok(r) => r,
                Err(e) => {
                    let refusal = replica.forward_failed(leader, &addr, e).await;
                    if matches!(op, AdminOp::Status) {
                        return Ok(AdminResult::Status(status(replica).await));
                    }
                    Err(refusal)
                }
            }
        }
        None => Ok(AdminResult::Status(status(replica).await)),
    }
}

/// The leader's side of [`admin`] (and of a forwarded [`AdminOp`]).
pub async fn admin_on_leader(replica: &Replica, op: AdminOp) -> Result<AdminResult, ApiError> {
    let raft = replica.raft();
    match op {
        AdminOp::Status => Ok(AdminResult::Status(status(replica).await)),
        AdminOp::AddNode { id, addr } => {
            if id == 0 {
                return Err(ApiError::InvalidArgument("node id 0 is reserved".into()));
            }
            transport::parse_endpoint(&addr).map_err(ApiError::InvalidArgument)?;
            let membership = raft.metrics().borrow().membership_config.clone();
            for (nid, n) in membership.membership().nodes() {
                if *nid == id {
                    return Err(ApiError::FailedPrecondition(format!(
                        "node {id} is already a member (at {})",
                        n.addr
                    )));
                }
                if n.addr == addr {
                    return Err(ApiError::FailedPrecondition(format!(
                        "address {addr} already belongs to node {nid}"
                    )));
                }
            }
            // The new node must answer as `id` before it joins: this catches a wrong
            // address (including one of this node's own) before the membership changes.
            let probe = probe(replica, id, &addr).await.ok_or_else(|| {
                ApiError::FailedPrecondition(format!("node {id} at {addr} is not reachable"))
            })?;
            if probe.id != id {
                return Err(ApiError::FailedPrecondition(format!(
                    "{addr} answers as node {}, not node {id}",
                    probe.id
                )));
            }
            raft.add_learner(id, BasicNode { addr }, true)
                .await
                .map_err(batcher::write_error)?;
            let mut voters: std::collections::BTreeSet<NodeId> = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .voter_ids()
                .collect();
            voters.insert(id);
            raft.change_membership(voters, false)
                .await
                .map_err(batcher::write_error)?;
            Ok(AdminResult::Done)
        }
        AdminOp::RemoveNode { id } => {
            let membership = raft.metrics().borrow().membership_config.clone();
            let m = membership.membership();
            if m.get_node(&id).is_none() {
                return Err(ApiError::NotFound(format!("node {id} is not a member")));
            }
            let is_voter = m.voter_ids().any(|v| v == id);
            if is_voter && m.voter_ids().count() == 1 {
                return Err(ApiError::FailedPrecondition(format!(
                    "node {id} is the last voter"
                )));
            }
            let change = if is_voter {
                ChangeMembers::RemoveVoters([id].into_iter().collect())
            } else {
                ChangeMembers::RemoveNodes([id].into_iter().collect())
            };
            raft.change_membership(change, false)
                .await
                .map_err(batcher::write_error)?;
            if is_voter {
                // Also forget its address, so it is no longer replicated to.
                let still_member = raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .get_node(&id)
                    .is_some();
                if still_member {
                    raft.change_membership(
                        ChangeMembers::RemoveNodes([id].into_iter().collect()),
                        false,
                    )
                    .await
                    .map_err(batcher::write_error)?;
                }
            }
            Ok(AdminResult::Done)
        }
    }
}

/// Probes member `id` at `addr` through the peer pool; `None` if it does not answer.
async fn probe(replica: &Replica, id: NodeId, addr: &str) -> Option<Probe> {
    let p = replica.peers().get(id, addr).await.ok()?;
    match p.probe(peer::deadline(PROBE_TIMEOUT)).await {
        Ok(probe) => Some(probe),
        Err(_) => {
            replica.peers().forget(id).await;
            None
        }
    }
}

/// What this node answers a probe with.
pub fn own_probe(replica: &Replica) -> Probe {
    Probe {
        id: replica.id(),
        last_applied: replica
            .raft()
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index),
    }
}

/// This node's view of the cluster, with every member probed.
pub async fn status(replica: &Replica) -> ClusterStatus {
    let m = replica.raft().metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
    let last_log = m.last_log_index.unwrap_or(0);
    let members: Vec<(NodeId, String)> = membership
        .nodes()
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect();
    let probes = futures::future::join_all(members.iter().map(|(id, addr)| async move {
        if *id == replica.id() {
            Some(own_probe(replica))
        } else {
            probe(replica, *id, addr).await
        }
    }))
    .await;
    let nodes = members
        .into_iter()
        .zip(probes)
        .map(|((id, addr), probe)| {
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&id))
                .map(|l| l.map(|l| l.index).unwrap_or(0));
            NodeStatus {
                id,
                addr,
                role: if voters.contains(&id) {
                    MemberRole::Voter
                } else {
                    MemberRole::Learner
                },
                reachable: probe.is_some(),
                matched,
                lag: matched.map(|x| last_log.saturating_sub(x)),
                last_applied: probe.and_then(|p| p.last_applied),
            }
        })
        .collect();
    ClusterStatus {
        answered_by: replica.id(),
        leader: m.current_leader,
        term: m.current_term,
        last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
        last_log,
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        nodes,
    }
}

/// Initializes the cluster with `members` and makes `admin_secret` its first admin
/// token.
///
/// A caller needs no token, so everything here is bounded before the node does any work
/// for it: an initialized node answers from its own state, without dialing anyone (it
/// succeeds only for a retry of the call that made the first token — same secret — or on
/// a cluster initialized without one); a fresh node takes at most [`INIT_MEMBERS_MAX`]
/// members and probes them at once, on connections of their own (never the peer pool's),
/// for at most `INIT_PROBE_TIMEOUT` in all.
pub async fn init(
    replica: &Replica,
    members: BTreeMap<NodeId, String>,
    admin_secret: &str,
) -> Result<TokenInfo, ApiError> {
    validate_secret(admin_secret)
        .map_err(|e| ApiError::InvalidArgument(format!("admin token: {e}")))?;
    let hash = token_hash(admin_secret);
    let initialized = replica
        .raft()
        .is_initialized()
        .await
        .map_err(|f| batcher::fatal_error(&f))?;
    if initialized {
        return bootstrap(replica, hash, false).await;
    }
    if members.len() > INIT_MEMBERS_MAX {
        return Err(ApiError::InvalidArgument(format!(
            "{} members; a cluster starts with at most {INIT_MEMBERS_MAX} \
             (add more with `cluster add-node`)",
            members.len()
        )));
    }
    if members.is_empty() {
        return Err(ApiError::InvalidArgument("no members given".into()));
    }
    if !members.contains_key(&replica.id()) {
        return Err(ApiError::InvalidArgument(format!(
            "the members must include the node receiving the request (node {})",
            replica.id()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (id, addr) in &members {
        if *id == 0 {
            return Err(ApiError::InvalidArgument("node id 0 is reserved".into()));
        }
        transport::parse_endpoint(addr).map_err(ApiError::InvalidArgument)?;
        if !seen.insert(addr.clone()) {
            return Err(ApiError::InvalidArgument(format!(
                "address {addr} is listed twice"
            )));
        }
    }
    // Each other member must answer as the id it is listed under.
    let deadline = tokio::time::Instant::now() + INIT_PROBE_TIMEOUT;
    let others = members.iter().filter(|(id, _)| **id != replica.id());
    let probes = futures::future::join_all(others.map(|(id, addr)| async move {
        let probe = tokio::time::timeout_at(deadline, async {
            let c = replica.peers().connect_unpooled(*id, addr).await.ok()?;
            c.probe(peer::deadline(PROBE_TIMEOUT)).await.ok()
        })
        .await;
        (*id, addr, probe.ok().flatten())
    }))
    .await;
    for (id, addr, probe) in probes {
        match probe {
            Some(p) if p.id == id => {}
            Some(p) => {
                return Err(ApiError::InvalidArgument(format!(
                    "{addr} answers as node {}, not node {id}",
                    p.id
                )))
            }
            None => {
                return Err(ApiError::FailedPrecondition(format!(
                    "node {id} at {addr} is not reachable"
                )))
            }
        }
    }
    let nodes: BTreeMap<NodeId, BasicNode> = members
        .into_iter()
        .map(|(id, addr)| (id, BasicNode { addr }))
        .collect();
    let fresh = match replica.raft().initialize(nodes).await {
        Ok(()) => true,
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => false,
        Err(RaftError::APIError(InitializeError::NotInMembers(e))) => {
            return Err(ApiError::InvalidArgument(e.to_string()))
        }
        Err(RaftError::Fatal(f)) => return Err(batcher::fatal_error(&f)),
    };
    bootstrap(replica, hash, fresh).await
}

/// Makes the first admin token (of hash `hash`) on a cluster just initialized (`fresh`)
/// or already initialized.
async fn bootstrap(replica: &Replica, hash: String, fresh: bool) -> Result<TokenInfo, ApiError> {
    // An initialized cluster that already has other tokens refuses here, from this
    // node's applied state, so that a caller without a token cannot make log entries.
    // (A node behind on its log falls through; the log's answer is the same.)
    let refused_here = !fresh
        && replica.state(|sm| {
            let tokens = sm.tokens();
            !tokens.is_empty() && tokens.by_hash(&hash).is_none()
        });
    if refused_here {
        return Err(ApiError::FailedPrecondition(
            "the cluster is already initialized".into(),
        ));
    }
    let bootstrap = Command::TokenCreate {
        role: Role::Admin,
        name: Some("bootstrap".into()),
        hash,
        bootstrap: true,
    };
    // The first leader is being elected: retry while there is none, within the bound.
    let deadline = tokio::time::Instant::now() + INIT_BOOTSTRAP_WAIT;
    let result = loop {
        let command = ClientCommand {
            request_id: replica.next_request_id(),
            command: bootstrap.clone(),
        };
        match replica.write(Principal::Node, vec![command]).await {
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "bootstrap token: waiting for a leader");
                tokio::time::sleep(INIT_BOOTSTRAP_RETRY).await;
            }
            other => break other?,
        }
    };
    match result.as_slice() {
        [CommandResult::TokenCreated { token }] => {
            tracing::info!(
                token = token.id,
                fresh,
                "cluster initialized with its first admin token"
            );
            Ok(token.clone())
        }
        [CommandResult::Rejected { .. }] => Err(ApiError::FailedPrecondition(
            "the cluster is already initialized".into(),
        )),
        other => Err(ApiError::Internal(format!(
            "the bootstrap token was answered with {other:?}"
        ))),
    }
}

/// Makes a token: draws its secret here, so that only the hash enters the log.
pub async fn token_create(
    replica: &Replica,
    role: Role,
    name: Option<String>,
) -> Result<CreatedToken, ApiError> {
    if let Some(name) = &name {
        validate_token_name(name).map_err(ApiError::InvalidArgument)?;
    }
    let secret = skiff_proto::tokens::new_token_secret();
    // A fresh request id per call, not the client's: a retried call draws a new secret,
    // and an id of the first attempt would answer with the first attempt's token, whose
    // secret this call does not hold.
    let command = ClientCommand {
        request_id: replica.next_request_id(),
        command: Command::TokenCreate {
            role,
            name,
            hash: token_hash(&secret),
            bootstrap: false,
        },
    };
    match replica
        .write(Principal::Node, vec![command])
        .await?
        .as_slice()
    {
        [CommandResult::TokenCreated { token }] => {
            tracing::info!(token = token.id, role = %token.role, "token created");
            Ok(CreatedToken {
                token: token.clone(),
                secret,
            })
        }
        [CommandResult::Rejected { reason }] => Err(ApiError::FailedPrecondition(reason.clone())),
        other => Err(ApiError::Internal(format!(
            "a token create was answered with {other:?}"
        ))),
    }
}

/// Revokes a token (idempotent under the client's request id).
pub async fn token_revoke(
    replica: &Replica,
    principal: Principal,
    request_id: RequestId,
    id: TokenId,
) -> Result<TokenInfo, ApiError> {
    let command = ClientCommand {
        request_id,
        command: Command::TokenRevoke { id },
    };
    match replica.write(principal, vec![command]).await?.as_slice() {
        [CommandResult::TokenRevoked { token }] => {
            tracing::info!(token = token.id, "token revoked");
            Ok(token.clone())
        }
        [CommandResult::NotFound] => Err(ApiError::NotFound(format!("token {id}"))),
        [CommandResult::Rejected { reason }] => Err(ApiError::FailedPrecondition(reason.clone())),
        other => Err(ApiError::Internal(format!(
            "a token revoke was answered with {other:?}"
        ))),
    }
}
