//! Leader handover before a planned stop.
//!
//! A leader that simply stops leaves the cluster without one for a leader lease plus an
//! election timeout (followers refuse to vote while the lease of the leader they last heard
//! runs: up to `election_timeout_max` + `election_timeout_max` ≈ 3 s with the defaults), and
//! writes in flight at that moment end unknown to their clients. On SIGTERM a leader instead:
//!
//! 1. stops taking new writes (the batcher refuses them as `NoLeader`, which clients retry
//!    elsewhere) and waits until everything it proposed is applied;
//! 2. picks a voter whose replicated log matches its own last entry;
//! 3. asks that voter to campaign (`PeerApi::campaign`). The voter's request for a higher term
//!    carries a log as long as the leader's, and the leader grants it: a leader's own vote was
//!    last refreshed when it was elected, so its lease check passes once it has led for one
//!    lease. With the leader's vote the candidate has a majority of three at once, whatever
//!    the other follower (still under the lease) answers;
//! 4. waits until another node leads, then stops as before.
//!
//! Every step is bounded ([`HANDOVER_TIMEOUT`] in all); if one fails (no caught-up voter, the
//! voter unreachable, no new leader in time) the node logs why and stops anyway — the cluster
//! then elects as after a crash. This is what openraft's own documentation of
//! `become_leader` describes as a leader transferring to a follower by having it elect.

use std::time::{Duration, Instant};

use skiff_client::api::NodeId;

use crate::peer::{self, PeerRefusal};
use crate::replica::Replica;

/// Longest a stopping leader spends handing over before it stops regardless.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(6);
/// Deadline of one `campaign` call to the voter taking over.
const CAMPAIGN_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Added to the longest election timeout for the wait for another node to lead after a
/// campaign call.
const ELECTION_MARGIN: Duration = Duration::from_millis(200);
/// How often the stopping leader looks again whether a voter has caught up.
const CATCH_UP_POLL: Duration = Duration::from_millis(10);

/// Why a handover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("node {node} has no address")]
    NoAddress { node: NodeId },
    #[error("node {node} did not take over in time")]
    TookTooLong { node: NodeId },
    #[error("node {node} at {addr}: {source}")]
    Connect {
        node: NodeId,
        addr: String,
        source: std::io::Error,
    },
    #[error("node {node} refused: {refusal}")]
    Refused { node: NodeId, refusal: PeerRefusal },
    #[error("node {node} at {addr}: {source}")]
    Call {
        node: NodeId,
        addr: String,
        source: tarpc::client::RpcError,
    },
    #[error("no voter caught up to index {last:?} in time (applied {applied:?})")]
    NotCaughtUp {
        last: Option<u64>,
        applied: Option<u64>,
    },
}

/// How a handover ended.
#[derive(Debug)]
pub enum Handover {
    /// This node was not the leader, or the only voter: nothing to hand over.
    NotNeeded,
    /// `to` leads now.
    Done { to: NodeId, elapsed: Duration },
    /// It did not happen; the reason.
    Failed(HandoverError),
}

/// Hands leadership to a caught-up voter if this node leads. Leaves the batcher paused on
/// success (the node is stopping); resumes it on failure so the node keeps serving until it
/// stops.
/// `election_max` is the longest election timeout of the cluster's settings.
pub async fn hand_over(node: &Replica, election_max: Duration) -> Handover {
    let me = node.id();
    let started = Instant::now();
    let deadline = started + HANDOVER_TIMEOUT;
    let m = node.raft().metrics().borrow().clone();
    if m.current_leader != Some(me) {
        return Handover::NotNeeded;
    }
    let voters: Vec<NodeId> = m
        .membership_config
        .membership()
        .voter_ids()
        .filter(|&v| v != me)
        .collect();
    if voters.is_empty() {
        return Handover::NotNeeded;
    }
    node.batcher().pause(true);
    // Once it steps down it must not campaign again itself: its log may still be a little
    // longer than the voter's, and it would win back what it is giving away.
    node.raft().runtime_config().elect(false);
    let result = run(node, &voters, deadline, election_max).await;
    match result {
        Ok(to) => Handover::Done {
            to,
            elapsed: started.elapsed(),
        },
        Err(why) => {
            node.raft().runtime_config().elect(true);
            node.batcher().pause(false);
            Handover::Failed(why)
        }
    }
}

async fn run(
    node: &Replica,
    voters: &[NodeId],
    deadline: Instant,
    election_max: Duration,
) -> Result<NodeId, HandoverError> {
    let me = node.id();
    loop {
        if let Some(l) = node.current_leader() {
            if l != me {
                return Ok(l);
            }
        }
        let target = caught_up_voter(node, voters, deadline).await?;
        let addr = node
            .member_addr(target)
            .ok_or(HandoverError::NoAddress { node: target })?;
        // Ask it to campaign, then wait for another node to lead. A leader elected less than
        // a lease ago refuses the first request; the voter, now a candidate, tries again on
        // its own election timer, and so does this loop (after checking again that the voter
        // holds every entry).
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandoverError::TookTooLong { node: target });
        }
        let c = node
            .peers()
            .get(target, &addr)
            .await
            .map_err(|source| HandoverError::Connect {
                node: target,
                addr: addr.clone(),
                source,
            })?;
        match c
            .campaign(peer::deadline(left.min(CAMPAIGN_CALL_TIMEOUT)), target)
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(refusal)) => {
                return Err(HandoverError::Refused {
                    node: target,
                    refusal,
                })
            }
            Err(e) => {
                node.peers().forget(target).await;
                return Err(HandoverError::Call {
                    node: target,
                    addr,
                    source: e,
                });
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let wait = left.min(election_max + ELECTION_MARGIN);
        let another = |r: &Replica| r.current_leader().filter(|&l| l != me);
        let moved = node
            .wait_until(tokio::time::Instant::now() + wait, another)
            .await;
        if let Ok(leader) = moved {
            return Ok(leader);
        }
        if Instant::now() >= deadline {
            return Err(HandoverError::TookTooLong { node: target });
        }
    }
}

/// Waits until every write this node took is applied and a voter's log holds all of it;
/// returns that voter (the lowest such id).
async fn caught_up_voter(
    node: &Replica,
    voters: &[NodeId],
    deadline: Instant,
) -> Result<NodeId, HandoverError> {
    loop {
        let m = node.raft().metrics().borrow().clone();
        let last = m.last_log_index;
        let applied = m.last_applied.map(|l| l.index);
        let matched = |v: &NodeId| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(v).cloned().flatten())
                .map(|l| l.index)
        };
        // Replication progress is known only while this node leads; after it stepped down
        // (a candidate's higher term), the voters' logs are compared by the election itself.
        if node.batcher().idle() && applied == last {
            if m.replication.is_none() {
                if let Some(&v) = voters.first() {
                    return Ok(v);
                }
            } else if let Some(&v) = voters.iter().find(|v| matched(v) == last) {
                return Ok(v);
            }
        }
        if Instant::now() >= deadline {
            return Err(HandoverError::NotCaughtUp { last, applied });
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
}
