//! The nemesis: a schedule of faults drawn from a seed, and its execution against a cluster.
//!
//! [`Schedule::generate`] is a pure function of (seed, duration, node count, fault kinds): the
//! same inputs give the same schedule, which is printed at the start of a run. One fault is
//! active at a time: it starts at `at`, holds for `hold`, is healed, and a quiet gap follows.
//! Targets are node ids from the seed, or "the leader at that moment", resolved when the step
//! runs (the resolved node is logged), as Jepsen's leader-targeted partitions do. Node
//! numbers are slots ([`crate::cluster::Node::id`]); a membership change gives a slot a new
//! Raft id.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::cluster::{Cluster, Removal};
use crate::proxy::{LinkFault, NodeId};
use crate::ChaosError;

/// Time before the first fault, so the workload starts against a healthy cluster.
pub const WARMUP: Duration = Duration::from_secs(3);
/// Time at the end of the run with no fault, before the final heal.
pub const COOLDOWN: Duration = Duration::from_secs(2);
/// Range of how long one fault holds, in milliseconds.
pub const HOLD_MS_RANGE: (u64, u64) = (2_000, 8_000);
/// Range of the quiet gap after a fault is healed, in milliseconds.
pub const QUIET_MS_RANGE: (u64, u64) = (1_000, 3_000);
/// How long the nemesis tries to re-add a removed node before leaving it to the final
/// membership check (so a slow add does not push the rest of the schedule far back).
pub const REJOIN_WITHIN: Duration = Duration::from_secs(30);
/// Most steps in one schedule, whatever the duration.
pub const STEPS_MAX: usize = 10_000;

/// The kinds of fault the nemesis can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// One node cut off from every other, both ways.
    Isolate,
    /// The nodes split into a minority and a majority.
    Halves,
    /// One node's outgoing bytes are lost; it still hears the others.
    OneWay,
    /// Every link delayed by 75 ± 50 ms.
    Delay,
    /// Every link loses 2% of its chunks (each loss cuts a connection).
    Drop,
    /// Every link capped at 32 KiB/s.
    Bandwidth,
    /// kill -9 one node, restart it from its data directory after the hold.
    Kill,
    /// SIGSTOP one node for longer than the election timeout, then SIGCONT.
    Pause,
    /// kill -9 a majority at once (the leader among them), restart them after the hold.
    CrashMajority,
    /// kill -9 every node at once, restart them all after the hold.
    CrashAll,
    /// Remove one node from the membership (`cluster remove-node`), stop it and wipe its
    /// data; after the hold add it back under a new id (`cluster add-node`).
    Membership,
}

impl FaultKind {
    pub const ALL: [FaultKind; 11] = [
        FaultKind::Isolate,
        FaultKind::Halves,
        FaultKind::OneWay,
        FaultKind::Delay,
        FaultKind::Drop,
        FaultKind::Bandwidth,
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::CrashMajority,
        FaultKind::CrashAll,
        FaultKind::Membership,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Isolate => "isolate",
            FaultKind::Halves => "halves",
            FaultKind::OneWay => "one-way",
            FaultKind::Delay => "delay",
            FaultKind::Drop => "drop",
            FaultKind::Bandwidth => "bandwidth",
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::CrashMajority => "crash-majority",
            FaultKind::CrashAll => "crash-all",
            FaultKind::Membership => "membership",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!("unknown fault {s:?}; known: {}", names.join(", "))
            })
    }
}

/// Which node a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The leader when the step runs (a random node if there is none).
    Leader,
    Node(NodeId),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Leader => f.write_str("the leader"),
            Target::Node(id) => write!(f, "node {id}"),
        }
    }
}

/// A fault with its parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    Isolate {
        node: Target,
    },
    /// `minority` is cut off from the rest, both ways; `leader_in_minority` puts the leader
    /// there (replacing one of the drawn nodes) when the step runs.
    Halves {
        minority: Vec<NodeId>,
        leader_in_minority: bool,
    },
    OneWay {
        from: Target,
    },
    Delay {
        base_ms: u64,
        jitter_ms: u64,
    },
    Drop {
        per_mille: u32,
    },
    Bandwidth {
        bytes_per_sec: u64,
    },
    Kill {
        node: Target,
    },
    Pause {
        node: Target,
    },
    CrashMajority,
    CrashAll,
    /// Remove `node` from the membership and wipe it; re-add it under a new id after the
    /// hold. Skipped when it would leave fewer voters than a quorum.
    Membership {
        node: Target,
    },
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Isolate { node } => write!(f, "isolate {node}"),
            Fault::Halves {
                minority,
                leader_in_minority,
            } => write!(
                f,
                "partition minority {minority:?}{}",
                if *leader_in_minority {
                    " (with the leader)"
                } else {
                    ""
                }
            ),
            Fault::OneWay { from } => write!(f, "one-way blackhole: {from} cannot send"),
            Fault::Delay { base_ms, jitter_ms } => {
                write!(f, "delay all links {base_ms}±{jitter_ms} ms")
            }
            Fault::Drop { per_mille } => write!(f, "drop {per_mille}‰ of chunks on all links"),
            Fault::Bandwidth { bytes_per_sec } => {
                write!(f, "cap all links at {bytes_per_sec} bytes/s")
            }
            Fault::Kill { node } => write!(f, "kill -9 {node}, restart after the hold"),
            Fault::Pause { node } => write!(f, "SIGSTOP {node}, SIGCONT after the hold"),
            Fault::CrashMajority => write!(f, "kill -9 a majority with the leader, restart"),
            Fault::CrashAll => write!(f, "kill -9 every node, restart"),
            Fault::Membership { node } => write!(
                f,
                "remove {node} from the membership and wipe it, re-add under a new id"
            ),
        }
    }
}

/// One step of a schedule: at `at_ms` from the start, apply `fault` for `hold_ms`, then heal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub at_ms: u64,
    pub hold_ms: u64,
    pub fault: Fault,
}

/// The faults of a run, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub seed: u64,
    pub steps: Vec<Step>,
}

fn pick_target(rng: &mut StdRng, nodes: usize) -> Target {
    if rng.gen_bool(0.5) {
        Target::Leader
    } else {
        Target::Node(rng.gen_range(1..=nodes as u64))
    }
}

impl Schedule {
    /// The schedule for `seed`: steps from [`WARMUP`] until [`COOLDOWN`] before `duration`,
    /// faults drawn from `kinds` in rounds: every kind once per round, in a seeded order
    /// (none if `kinds` is empty).
    pub fn generate(seed: u64, duration: Duration, nodes: usize, kinds: &[FaultKind]) -> Schedule {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut steps = Vec::new();
        let end_ms = duration.saturating_sub(COOLDOWN).as_millis() as u64;
        let mut t = WARMUP.as_millis() as u64;
        let mut bag: Vec<FaultKind> = Vec::new();
        // Bounded by the duration and STEPS_MAX.
        while !kinds.is_empty() && steps.len() < STEPS_MAX {
            let hold_ms = rng.gen_range(HOLD_MS_RANGE.0..=HOLD_MS_RANGE.1);
            if t + hold_ms > end_ms {
                break;
            }
            // Drawn from a shuffled bag of every kind, refilled when empty: each kind comes
            // once per round, so a run long enough for one round gets every fault.
            if bag.is_empty() {
                bag = kinds.to_vec();
                bag.shuffle(&mut rng);
            }
            let kind = bag
                .pop()
                .expect("the bag was just refilled from a non-empty list");
            let fault = match kind {
                FaultKind::Isolate => Fault::Isolate {
                    node: pick_target(&mut rng, nodes),
                },
                FaultKind::Halves => {
                    let mut ids: Vec<NodeId> = (1..=nodes as u64).collect();
                    ids.shuffle(&mut rng);
                    let mut minority: Vec<NodeId> = ids[..(nodes - 1) / 2].to_vec();
                    minority.sort_unstable();
                    Fault::Halves {
                        minority,
                        leader_in_minority: rng.gen_bool(0.5),
                    }
                }
                FaultKind::OneWay => Fault::OneWay {
                    from: pick_target(&mut rng, nodes),
                },
                FaultKind::Delay => Fault::Delay {
                    base_ms: 75,
                    jitter_ms: 50,
                },
                FaultKind::Drop => Fault::Drop { per_mille: 20 },
                FaultKind::Bandwidth => Fault::Bandwidth {
                    bytes_per_sec: 32 * 1024,
                },
                FaultKind::Kill => Fault::Kill {
                    node: pick_target(&mut rng, nodes),
                },
                FaultKind::Pause => Fault::Pause {
                    node: pick_target(&mut rng, nodes),
                },
                FaultKind::CrashMajority => Fault::CrashMajority,
                FaultKind::CrashAll => Fault::CrashAll,
                FaultKind::Membership => Fault::Membership {
                    node: pick_target(&mut rng, nodes),
                },
            };
            steps.push(Step {
                at_ms: t,
                hold_ms,
                fault,
            });
            t += hold_ms + rng.gen_range(QUIET_MS_RANGE.0..=QUIET_MS_RANGE.1);
        }
        Schedule { seed, steps }
    }

    /// The schedule as printable lines.
    pub fn lines(&self) -> Vec<String> {
        self.steps
            .iter()
            .map(|s| {
                format!(
                    "  t={:>6.1}s for {:>4.1}s: {}",
                    s.at_ms as f64 / 1000.0,
                    s.hold_ms as f64 / 1000.0,
                    s.fault
                )
            })
            .collect()
    }
}

/// What the nemesis did, for the report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NemesisLog {
    pub events: Vec<String>,
}

async fn resolve(cluster: &Cluster, target: Target) -> NodeId {
    match target {
        Target::Node(id) => id,
        Target::Leader => match cluster.leader().await {
            Some(id) => id,
            // No leader known: any node will do; take the first for determinism.
            None => cluster.ids().first().copied().unwrap_or(1),
        },
    }
}

/// Cuts `group` off from everyone else, both ways.
fn partition(cluster: &Cluster, group: &[NodeId]) {
    for a in cluster.ids() {
        for b in cluster.ids() {
            if group.contains(&a) != group.contains(&b) {
                cluster.faults.set(a, b, LinkFault::Blackhole);
            }
        }
    }
}

/// What to undo when a step's hold ends.
enum Undo {
    Network,
    Restart(Vec<NodeId>),
    Resume(NodeId),
    Rejoin(NodeId),
    Nothing,
}

async fn apply(cluster: &mut Cluster, fault: &Fault) -> Result<(Undo, String), ChaosError> {
    Ok(match fault {
        Fault::Isolate { node } => {
            let id = resolve(cluster, *node).await;
            partition(cluster, &[id]);
            (Undo::Network, format!("isolated node {id}"))
        }
        Fault::Halves {
            minority,
            leader_in_minority,
        } => {
            let mut group = minority.clone();
            if *leader_in_minority {
                if let Some(leader) = cluster.leader().await {
                    if !group.contains(&leader) {
                        group.pop();
                        group.push(leader);
                    }
                }
            }
            group.sort_unstable();
            partition(cluster, &group);
            (
                Undo::Network,
                format!("partitioned minority {group:?} from the rest"),
            )
        }
        Fault::OneWay { from } => {
            let id = resolve(cluster, *from).await;
            for b in cluster.ids() {
                cluster.faults.set(id, b, LinkFault::Blackhole);
            }
            (
                Undo::Network,
                format!("node {id} cannot send (one-way blackhole)"),
            )
        }
        Fault::Delay { base_ms, jitter_ms } => {
            cluster.faults.set_all(LinkFault::Delay {
                base_ms: *base_ms,
                jitter_ms: *jitter_ms,
            });
            (
                Undo::Network,
                format!("all links delayed {base_ms}±{jitter_ms} ms"),
            )
        }
        Fault::Drop { per_mille } => {
            cluster.faults.set_all(LinkFault::Drop {
                per_mille: *per_mille,
            });
            (
                Undo::Network,
                format!("all links drop {per_mille}‰ of chunks"),
            )
        }
        Fault::Bandwidth { bytes_per_sec } => {
            cluster.faults.set_all(LinkFault::Bandwidth {
                bytes_per_sec: *bytes_per_sec,
            });
            (
                Undo::Network,
                format!("all links capped at {bytes_per_sec} bytes/s"),
            )
        }
        Fault::Kill { node } => {
            let id = resolve(cluster, *node).await;
            cluster.kill_node(id).await?;
            (
                Undo::Restart(vec![id]),
                format!("killed node {id} (SIGKILL)"),
            )
        }
        Fault::Pause { node } => {
            let id = resolve(cluster, *node).await;
            cluster.pause_node(id)?;
            (Undo::Resume(id), format!("paused node {id} (SIGSTOP)"))
        }
        Fault::CrashMajority => {
            let ids = cluster.ids();
            let leader = cluster.leader().await;
            let mut victims: Vec<NodeId> = leader.into_iter().collect();
            for id in &ids {
                if victims.len() > ids.len() / 2 {
                    break;
                }
                if !victims.contains(id) {
                    victims.push(*id);
                }
            }
            for &id in &victims {
                cluster.kill_node(id).await?;
            }
            (
                Undo::Restart(victims.clone()),
                format!("killed nodes {victims:?} (SIGKILL)"),
            )
        }
        Fault::CrashAll => {
            let ids = cluster.ids();
            for &id in &ids {
                cluster.kill_node(id).await?;
            }
            (
                Undo::Restart(ids.clone()),
                format!("killed every node {ids:?} (SIGKILL)"),
            )
        }
        Fault::Membership { node } => {
            let slot = resolve(cluster, *node).await;
            match cluster.remove_member(slot).await? {
                Removal::Removed(id) => (
                    Undo::Rejoin(slot),
                    format!("removed node {id} (slot {slot}) from the membership, wiped it"),
                ),
                Removal::Refused(why) => (
                    Undo::Nothing,
                    format!("membership change on slot {slot} skipped: {why}"),
                ),
            }
        }
    })
}

async fn undo(cluster: &mut Cluster, undo: Undo) -> Result<String, ChaosError> {
    Ok(match undo {
        Undo::Network => {
            cluster.faults.heal();
            "network healed".to_string()
        }
        Undo::Restart(ids) => {
            for &id in &ids {
                cluster.start_node(id).await?;
            }
            format!("restarted nodes {ids:?}")
        }
        Undo::Resume(id) => {
            cluster.resume_node(id)?;
            format!("resumed node {id} (SIGCONT)")
        }
        Undo::Rejoin(slot) => match cluster.rejoin(slot, REJOIN_WITHIN).await? {
            Ok(id) => format!("added slot {slot} back as node {id} (a voter)"),
            Err(why) => format!("re-adding slot {slot} failed ({why}); heal retries"),
        },
        Undo::Nothing => "nothing to undo".to_string(),
    })
}

/// Runs `schedule` against `cluster`, timed from `start`; every fault is undone before the
/// next one starts. Returns what was done.
pub async fn run(
    cluster: &mut Cluster,
    schedule: &Schedule,
    start: tokio::time::Instant,
) -> Result<NemesisLog, ChaosError> {
    let mut log = NemesisLog::default();
    let note = |log: &mut NemesisLog, what: String| {
        let line = format!("t={:>6.1}s {what}", start.elapsed().as_secs_f64());
        tracing::info!(target: "skiff_chaos::nemesis", "{line}");
        log.events.push(line);
    };
    for step in &schedule.steps {
        tokio::time::sleep_until(start + Duration::from_millis(step.at_ms)).await;
        let (to_undo, what) = apply(cluster, &step.fault).await?;
        note(&mut log, what);
        tokio::time::sleep_until(start + Duration::from_millis(step.at_ms + step.hold_ms)).await;
        let what = undo(cluster, to_undo).await?;
        note(&mut log, what);
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_schedule() {
        let d = Duration::from_secs(120);
        let a = Schedule::generate(42, d, 3, &FaultKind::ALL);
        let b = Schedule::generate(42, d, 3, &FaultKind::ALL);
        let c = Schedule::generate(43, d, 3, &FaultKind::ALL);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(!a.steps.is_empty());
    }

    #[test]
    fn steps_fit_the_duration_and_do_not_overlap() {
        for seed in 0..50 {
            let d = Duration::from_secs(60);
            let s = Schedule::generate(seed, d, 5, &FaultKind::ALL);
            let mut end = 0;
            for step in &s.steps {
                assert!(step.at_ms >= end, "{seed}: overlap");
                assert!(step.at_ms >= WARMUP.as_millis() as u64);
                end = step.at_ms + step.hold_ms;
                assert!(
                    end <= (d - COOLDOWN).as_millis() as u64,
                    "{seed}: past the end"
                );
                if let Fault::Halves { minority, .. } = &step.fault {
                    assert_eq!(minority.len(), 2, "a minority of five is two");
                }
            }
        }
    }

    #[test]
    fn every_kind_comes_once_per_round() {
        let s = Schedule::generate(9, Duration::from_secs(600), 3, &FaultKind::ALL);
        assert!(s.steps.len() >= FaultKind::ALL.len());
        let first: std::collections::BTreeSet<String> = s.steps[..FaultKind::ALL.len()]
            .iter()
            .map(|step| {
                format!("{:?}", step.fault)
                    .split([' ', '{'])
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        assert_eq!(first.len(), FaultKind::ALL.len(), "{first:?}");
    }

    #[test]
    fn fault_kinds_parse_and_filter() {
        for k in FaultKind::ALL {
            assert_eq!(k.name().parse::<FaultKind>(), Ok(k));
        }
        assert!("meteor".parse::<FaultKind>().is_err());
        let only = Schedule::generate(1, Duration::from_secs(60), 3, &[FaultKind::Pause]);
        assert!(only
            .steps
            .iter()
            .all(|s| matches!(s.fault, Fault::Pause { .. })));
        assert!(Schedule::generate(1, Duration::from_secs(60), 3, &[])
            .steps
            .is_empty());
        let members = Schedule::generate(1, Duration::from_secs(60), 3, &[FaultKind::Membership]);
        assert!(!members.steps.is_empty());
        assert!(members
            .steps
            .iter()
            .all(|s| matches!(s.fault, Fault::Membership { .. })));
    }
}
