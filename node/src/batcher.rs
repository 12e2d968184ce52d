//! Group commit on the leader: client commands wait in a bounded queue and are packed, many at a
//! time, into one log entry.
//!
//! One entry costs one append (one fsync on each node) and one replication round however many
//! commands it carries, which is where throughput under concurrency comes from. A proposal in
//! flight does not stop the next batch from forming: up to `writes_in_flight_max` entries are
//! proposed concurrently, and whatever arrives meanwhile rides in the next one. At low load a
//! batch is a single command and adds no waiting.
//!
//! Invariants: the queue and the number of proposals in flight are bounded; a full queue is an
//! `Overloaded` error to the caller, never an unbounded wait; every queued command gets exactly
//! one answer (a result, or an error when the proposal failed or the node stops).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use skiff_client::api::{ApiError, ClientCommand, CommandResult, NodeId};
use skiff_raft_store::model::{LoggedCommand, Principal, Request, COMMANDS_PER_ENTRY_MAX};
use skiff_raft_store::types::Raft;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::background::{Background, Shutdown};
use crate::metrics::{Metrics, WriteOutcome};

/// The bounds of a batcher (from the node's `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct BatcherLimits {
    /// Client calls waiting to be packed into an entry.
    pub queue_max: usize,
    /// Entries proposed and not yet answered by Raft.
    pub in_flight_max: usize,
    /// Approximate encoded size of one entry.
    pub entry_bytes_max: usize,
}

/// A group of commands from one client call, answered together.
struct Pending {
    commands: Vec<LoggedCommand>,
    bytes: usize,
    reply: oneshot::Sender<Result<Vec<CommandResult>, ApiError>>,
}

/// Handle used to submit commands; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
    metrics: Arc<Metrics>,
    /// Set while a stopping leader hands over: new writes are refused as `NoLeader`.
    paused: Arc<std::sync::atomic::AtomicBool>,
    /// Batches taken from the queue and not yet answered by Raft (proposed or about to be).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// Approximate encoded size of a command, to keep entries under `entry_bytes_max`.
fn command_bytes(c: &LoggedCommand) -> usize {
    32 + c.command.approx_bytes()
}

impl Batcher {
    /// Starts the batching task, a task of `background`: it stops on its shutdown signal
    /// (writes still queued then are answered `ShuttingDown`) or when every [`Batcher`]
    /// handle is dropped.
    pub fn start(
        raft: Raft,
        metrics: Arc<Metrics>,
        background: &Background,
        limits: BatcherLimits,
    ) -> Batcher {
        let (tx, rx) = mpsc::channel(limits.queue_max);
        let batches: Arc<std::sync::atomic::AtomicUsize> = Default::default();
        let batching = Batching {
            raft,
            metrics: metrics.clone(),
            background: background.clone(),
            in_flight_max: limits.in_flight_max,
            entry_bytes_max: limits.entry_bytes_max,
            batches: batches.clone(),
        };
        let shutdown = background.shutdown();
        background.spawn(run(batching, rx, shutdown));
        Batcher {
            tx,
            metrics,
            paused: Default::default(),
            in_flight: batches,
        }
    }

    /// Whether nothing is queued or being proposed: every write taken so far has its answer.
    pub fn idle(&self) -> bool {
        self.queue_depth() == 0 && self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0
    }

    /// Refuses (`true`) or takes again (`false`) new writes. Writes already queued still go.
    pub fn pause(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::SeqCst);
    }

    /// Client calls waiting to be packed into an entry.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Queues `commands`, sent by `principal` (whom the caller authenticated), for the log
    /// and waits for their results.
    pub async fn submit(
        &self,
        principal: Principal,
        commands: Vec<ClientCommand>,
    ) -> Result<Vec<CommandResult>, ApiError> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        if commands.len() > COMMANDS_PER_ENTRY_MAX {
            return Err(ApiError::InvalidArgument(format!(
                "{} commands in one call, the limit is {COMMANDS_PER_ENTRY_MAX}",
                commands.len()
            )));
        }
        let commands: Vec<LoggedCommand> = commands.into_iter().map(|c| c.by(principal)).collect();
        let bytes = commands.iter().map(command_bytes).sum();
        let n = commands.len() as u64;
        if self.paused.load(std::sync::atomic::Ordering::SeqCst) {
            // Retryable: the client tries the other nodes, one of which leads in a moment.
            self.metrics.write(WriteOutcome::NoLeader, n);
            return Err(ApiError::NoLeader {
                leader: None,
                leader_addr: None,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Pending {
                commands,
                bytes,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.metrics.write(WriteOutcome::Overloaded, n);
                    ApiError::Overloaded("the write queue is full".into())
                }
                mpsc::error::TrySendError::Closed(_) => ApiError::ShuttingDown,
            })?;
        rx.await.map_err(|_| ApiError::ShuttingDown)?
    }
}

/// What the batching task works with.
struct Batching {
    raft: Raft,
    metrics: Arc<Metrics>,
    background: Background,
    in_flight_max: usize,
    entry_bytes_max: usize,
    batches: Arc<std::sync::atomic::AtomicUsize>,
}

async fn run(b: Batching, mut rx: mpsc::Receiver<Pending>, mut shutdown: Shutdown) {
    let Batching {
        raft,
        metrics,
        background,
        in_flight_max,
        entry_bytes_max,
        batches,
    } = b;
    let in_flight = Arc::new(Semaphore::new(in_flight_max));
    // A command that did not fit the previous entry starts the next one.
    let mut carry: Option<Pending> = None;
    loop {
        // A batch is counted from the moment its first write leaves the queue until Raft
        // answers it (a carried write was counted when it was put aside).
        let first = match carry.take() {
            Some(p) => p,
            None => match tokio::select! {
                p = rx.recv() => p,
                () = shutdown.wait() => None,
            } {
                Some(p) => {
                    batches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    p
                }
                None => return,
            },
        };
        // Wait for a proposal slot before draining, so that everything arriving meanwhile
        // joins this entry.
        let permit = match tokio::select! {
            p = in_flight.clone().acquire_owned() => p,
            () = shutdown.wait() => return,
        } {
            Ok(p) => p,
            Err(_) => return,
        };
        let mut count = first.commands.len();
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while count < COMMANDS_PER_ENTRY_MAX && bytes < entry_bytes_max {
            match rx.try_recv() {
                Ok(p) => {
                    if count + p.commands.len() > COMMANDS_PER_ENTRY_MAX
                        || bytes + p.bytes > entry_bytes_max
                    {
                        // The next batch, counted now: it has left the queue.
                        batches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        carry = Some(p);
                        break;
                    }
                    count += p.commands.len();
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        let metrics = metrics.clone();
        let batches = batches.clone();
        let mut shutdown = shutdown.clone();
        background.spawn(async move {
            // On the signal the proposal is dropped, and with it its callers' replies: they
            // are answered `ShuttingDown`, as when Raft stops under them.
            tokio::select! {
                () = propose(&raft, &metrics, batch) => {}
                () = shutdown.wait() => {}
            }
            drop(permit);
            batches.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn propose(raft: &Raft, metrics: &Metrics, batch: Vec<Pending>) {
    let commands: Vec<LoggedCommand> = batch
        .iter()
        .flat_map(|p| p.commands.iter().cloned())
        .collect();
    let n = commands.len() as u64;
    metrics.batch_commands.observe(n as f64);
    let request = Request {
        time_ms: now_ms(),
        commands,
    };
    let started = std::time::Instant::now();
    match raft.client_write(request).await {
        Ok(resp) => {
            metrics
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.write(WriteOutcome::Committed, n);
            let mut results = resp.data.results.into_iter();
            for p in batch {
                let mine: Vec<CommandResult> = results.by_ref().take(p.commands.len()).collect();
                let answer = if mine.len() == p.commands.len() {
                    Ok(mine)
                } else {
                    Err(ApiError::Internal(format!(
                        "the state machine answered {} of {} commands",
                        mine.len(),
                        p.commands.len()
                    )))
                };
                let _ = p.reply.send(answer);
            }
        }
        Err(e) => {
            let err = write_error(e);
            let outcome = match err {
                ApiError::NoLeader { .. } => WriteOutcome::NoLeader,
                _ => WriteOutcome::Failed,
            };
            metrics.write(outcome, n);
            for p in batch {
                let _ = p.reply.send(Err(err.clone()));
            }
        }
    }
}

/// Maps a failed proposal to what the client sees. The entry may or may not commit later, so a
/// lost leadership is retryable: the client's retry carries the same request ids.
pub fn write_error(
    e: RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>,
) -> ApiError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            let addr = f.leader_node.map(|n| n.addr);
            ApiError::NoLeader {
                leader: f.leader_id,
                leader_addr: addr,
            }
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ApiError::FailedPrecondition(e.to_string())
        }
        RaftError::Fatal(f) => fatal_error(&f),
    }
}

/// A stopped Raft (the node is shutting down) is retryable elsewhere; a broken one is not.
pub fn fatal_error(f: &openraft::error::Fatal<skiff_client::api::NodeId>) -> ApiError {
    match f {
        openraft::error::Fatal::Stopped => ApiError::ShuttingDown,
        other => ApiError::Internal(format!("raft stopped: {other}")),
    }
}
