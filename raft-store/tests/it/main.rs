//! Integration tests of the RocksDB store: openraft's storage suite, restart, snapshot
//! transfer (key-value state and tokens) and rejection of garbage snapshots. (The apply logic has its unit and property
//! tests next to it, in `src/apply.rs`.)

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;

use skiff_raft_store::model::{
    ClientCommand, Command, CommandResult, Principal, Request, RequestId,
};
use skiff_raft_store::tokens::{token_hash, Role};
use skiff_raft_store::types::openraft::storage::{
    RaftLogStorage, RaftLogStorageExt, RaftStateMachine,
};
use skiff_raft_store::types::openraft::testing::{StoreBuilder, Suite};
use skiff_raft_store::types::openraft::{CommittedLeaderId, RaftLogReader, RaftSnapshotBuilder};
use skiff_raft_store::types::{
    BasicNode, Entry, EntryPayload, LogId, Membership, SnapshotMeta, StorageError, TypeConfig, Vote,
};
use skiff_raft_store::{open, LogStore, StateMachineStore};
use tempfile::TempDir;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let (log, sm) = open(dir.path()).await.expect("open a fresh store");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    // The suite runs its own tokio runtime per test case, so this test is not async.
    Suite::test_all(RocksBuilder).expect("openraft storage suite passes");
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn put(seq: u64, key: &str, value: &str) -> ClientCommand {
    ClientCommand {
        request_id: RequestId { client: 9, seq },
        command: Command::KvPut {
            key: key.to_string(),
            value: value.as_bytes().to_vec(),
            expect_version: None,
        },
    }
}

fn normal(term: u64, index: u64, time_ms: u64, commands: Vec<ClientCommand>) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Request {
            time_ms,
            commands: commands
                .into_iter()
                .map(|c| c.by(Principal::Token(1)))
                .collect(),
        }),
    }
}

fn membership_entry(term: u64, index: u64) -> Entry {
    let voters = BTreeSet::from([1u64, 2, 3]);
    let nodes: BTreeMap<u64, BasicNode> = voters
        .iter()
        .map(|id| (*id, BasicNode::new(format!("127.0.0.1:{}", 7000 + id))))
        .collect();
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
    }
}

/// A handful of entries with writes, a membership change and a retried request.
fn sample_entries() -> Vec<Entry> {
    vec![
        Entry {
            log_id: log_id(1, 1),
            payload: EntryPayload::Blank,
        },
        membership_entry(1, 2),
        normal(1, 3, 1_000, vec![put(1, "a", "1"), put(2, "b", "2")]),
        normal(2, 4, 2_000, vec![put(3, "a", "3"), put(1, "a", "retried")]),
        normal(
            2,
            5,
            3_000,
            vec![ClientCommand {
                request_id: RequestId { client: 9, seq: 4 },
                command: Command::KvDelete {
                    key: "b".to_string(),
                    expect_version: None,
                },
            }],
        ),
    ]
}

#[tokio::test]
async fn everything_survives_a_restart() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let vote = Vote::new_committed(2, 1);
    let entries = sample_entries();
    let (digest, membership) = {
        let (mut log, mut sm) = open(dir.path()).await.expect("open");
        log.save_vote(&vote).await.expect("save vote");
        log.blocking_append(entries.clone()).await.expect("append");
        log.save_committed(Some(log_id(2, 5)))
            .await
            .expect("save committed");
        let responses = sm.apply(entries.clone()).await.expect("apply");
        assert_eq!(responses.len(), 5);
        assert_eq!(
            responses[3].results,
            vec![
                CommandResult::Put { version: 3 },
                CommandResult::Put { version: 1 }
            ],
            "the retried request id gets its first answer"
        );
        assert_eq!(
            responses[4].results,
            vec![CommandResult::Deleted { version: 2 }]
        );
        (sm.digest(), sm.membership())
    };
    assert_eq!(membership.log_id(), &Some(log_id(1, 2)));

    let (mut log, mut sm) = open(dir.path()).await.expect("reopen");
    assert_eq!(log.read_vote().await.expect("read vote"), Some(vote));
    assert_eq!(
        log.read_committed().await.expect("read committed"),
        Some(log_id(2, 5))
    );
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
    assert_eq!(state.last_purged_log_id, None);
    let read_back = log.try_get_log_entries(1..6).await.expect("read log");
    assert_eq!(read_back, entries);

    assert_eq!(sm.applied(), Some(log_id(2, 5)));
    let (applied, stored_membership) = sm.applied_state().await.expect("applied state");
    assert_eq!(applied, Some(log_id(2, 5)));
    assert_eq!(stored_membership, membership);
    assert_eq!(sm.digest(), digest);
    assert_eq!(sm.revision(), 4);
    let a = sm.get("a").expect("a survives");
    assert_eq!(
        (a.value.as_slice(), a.version, a.create_version),
        (&b"3"[..], 3, 1)
    );
    assert!(sm.get("b").is_none());
    // Deduplication state survives too: retrying seq 3 answers the stored result.
    let response = sm
        .apply([normal(2, 6, 4_000, vec![put(3, "a", "again")])])
        .await
        .expect("apply after restart");
    assert_eq!(response[0].results, vec![CommandResult::Put { version: 3 }]);
    assert_eq!(sm.revision(), 4);

    // Purge survives a restart as well.
    log.purge(log_id(1, 3)).await.expect("purge");
    drop((log, sm));
    let (mut log, _sm) = open(dir.path()).await.expect("reopen after purge");
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
    let left = log.try_get_log_entries(0..10).await.expect("read log");
    assert_eq!(left, entries[3..].to_vec());
}

#[tokio::test]
async fn snapshot_round_trip_into_a_fresh_store() {
    let leader_dir = tempfile::tempdir().expect("tempdir");
    let follower_dir = tempfile::tempdir().expect("tempdir");
    let (_log, mut leader) = open(leader_dir.path()).await.expect("open leader");
    let (_log_f, mut follower) = open(follower_dir.path()).await.expect("open follower");
    // Some state on the follower that the snapshot must wipe.
    follower
        .apply([normal(1, 1, 10, vec![put(100, "stale", "x")])])
        .await
        .expect("apply on follower");

    leader
        .apply(sample_entries())
        .await
        .expect("apply on leader");
    let snapshot = leader
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build snapshot");
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(2, 5)));

    let mut receiving = follower.begin_receiving_snapshot().await.expect("begin");
    *receiving = Cursor::new(snapshot.snapshot.into_inner());
    follower
        .install_snapshot(&snapshot.meta, receiving)
        .await
        .expect("install snapshot");

    assert_eq!(follower.digest(), leader.digest());
    assert!(follower.get("stale").is_none());
    assert_eq!(follower.applied(), leader.applied());
    assert_eq!(follower.membership(), leader.membership());
    assert_eq!(
        follower.read(|d| d.dedup_len()),
        leader.read(|d| d.dedup_len())
    );

    // The installed state and the current snapshot survive a restart of the follower.
    drop((_log_f, follower));
    let (_log_f, mut follower) = open(follower_dir.path()).await.expect("reopen follower");
    assert_eq!(follower.digest(), leader.digest());
    assert_eq!(follower.applied(), Some(log_id(2, 5)));
    let current = follower
        .get_current_snapshot()
        .await
        .expect("current snapshot")
        .expect("a snapshot is stored");
    assert_eq!(current.meta, snapshot.meta);
}

#[tokio::test]
async fn garbage_snapshots_are_rejected_without_changing_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_log, mut sm) = open(dir.path()).await.expect("open");
    sm.apply(sample_entries()).await.expect("apply");
    let digest = sm.digest();
    let good = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build snapshot");
    let good_bytes = good.snapshot.into_inner();

    let mut flipped = good_bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    let mut wrong_meta = good.meta.clone();
    wrong_meta.last_log_id = Some(log_id(9, 99));
    let cases: Vec<(&str, SnapshotMeta, Vec<u8>)> = vec![
        ("empty", good.meta.clone(), Vec::new()),
        ("random bytes", good.meta.clone(), vec![0x5a; 4096]),
        ("flipped byte", good.meta.clone(), flipped),
        (
            "truncated",
            good.meta.clone(),
            good_bytes[..good_bytes.len() - 1].to_vec(),
        ),
        ("meta mismatch", wrong_meta, good_bytes.clone()),
    ];
    for (name, meta, bytes) in cases {
        let result = sm
            .install_snapshot(&meta, Box::new(Cursor::new(bytes)))
            .await;
        assert!(result.is_err(), "{name}: garbage snapshot accepted");
        assert_eq!(sm.digest(), digest, "{name}: state changed");
    }
}

#[tokio::test]
async fn truncate_removes_the_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut log, _sm) = open(dir.path()).await.expect("open");
    log.blocking_append(sample_entries()).await.expect("append");
    log.truncate(log_id(2, 4)).await.expect("truncate");
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_log_id, Some(log_id(1, 3)));
    let left = log.try_get_log_entries(..).await.expect("read");
    assert_eq!(left.len(), 3);
}

#[tokio::test]
async fn a_failed_apply_leaves_memory_equal_to_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_log, mut sm) = open(dir.path()).await.expect("open");
    sm.apply(sample_entries()).await.expect("apply");
    let digest = sm.digest();
    // The second entry goes backwards: the whole call fails after the first entry has
    // already changed the in-memory state, which must then be rolled back to the disk's.
    let result = sm
        .apply([
            normal(2, 6, 5_000, vec![put(50, "x", "1")]),
            normal(2, 6, 5_000, vec![put(51, "y", "1")]),
        ])
        .await;
    assert!(result.is_err(), "an apply that goes backwards is refused");
    assert!(sm.get("x").is_none());
    assert_eq!(sm.digest(), digest);
    assert_eq!(sm.applied(), Some(log_id(2, 5)));
}

#[tokio::test]
async fn a_backup_restores_into_a_new_cluster_with_its_membership() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_log, mut sm) = open(dir.path()).await.expect("open");
    sm.apply(sample_entries()).await.expect("apply");
    let (covered, backup) = sm.export().expect("export");
    assert_eq!(covered, Some(log_id(2, 5)));

    let members: BTreeMap<u64, String> = [(7, "127.0.0.1:9007"), (8, "127.0.0.1:9008")]
        .into_iter()
        .map(|(id, addr)| (id, addr.to_string()))
        .collect();
    let new_root = tempfile::tempdir().expect("tempdir");
    let target = new_root.path().join("node-7");
    let last = skiff_raft_store::backup::restore(&target, 7, &members, &backup)
        .await
        .expect("restore");
    assert_eq!(last, log_id(2, 5));

    let (mut log, mut restored) = open(&target).await.expect("open the restored store");
    assert_eq!(restored.digest(), sm.digest());
    assert_eq!(restored.get("a"), sm.get("a"));
    let (applied, membership) = restored.applied_state().await.expect("applied state");
    assert_eq!(applied, Some(log_id(2, 5)));
    let voters: BTreeSet<u64> = membership.membership().voter_ids().collect();
    assert_eq!(voters, BTreeSet::from([7, 8]));
    assert_eq!(
        membership.membership().get_node(&8),
        Some(&BasicNode {
            addr: "127.0.0.1:9008".to_string()
        })
    );
    // The log is empty and purged up to the restored state; the snapshot is that state.
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id, Some(log_id(2, 5)));
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
    assert_eq!(log.read_vote().await.expect("vote"), None);
    let current = restored
        .get_current_snapshot()
        .await
        .expect("snapshot")
        .expect("the restored state is the current snapshot");
    assert_eq!(current.meta.last_log_id, Some(log_id(2, 5)));

    // Never into a directory that holds anything, never a node outside the members, never a
    // corrupt backup (and nothing is left behind by one).
    let again = skiff_raft_store::backup::restore(&target, 7, &members, &backup).await;
    assert!(
        matches!(
            again,
            Err(skiff_raft_store::backup::RestoreError::NotEmpty(_))
        ),
        "{again:?}"
    );
    let other = new_root.path().join("node-9");
    let outsider = skiff_raft_store::backup::restore(&other, 9, &members, &backup).await;
    assert!(
        matches!(
            outsider,
            Err(skiff_raft_store::backup::RestoreError::NotAMember(9))
        ),
        "{outsider:?}"
    );
    let mut corrupt = backup.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0xff;
    let bad = skiff_raft_store::backup::restore(&other, 8, &members, &corrupt).await;
    assert!(
        matches!(
            bad,
            Err(skiff_raft_store::backup::RestoreError::BadBackup(_))
        ),
        "{bad:?}"
    );
    assert!(!other.exists(), "a refused backup left {other:?} behind");
}

/// A bootstrap admin token, a deployer token and the deployer's revocation.
fn token_entries() -> Vec<Entry> {
    let command = |seq, command| ClientCommand {
        request_id: RequestId { client: 5, seq },
        command,
    };
    vec![
        normal(
            1,
            1,
            1_000,
            vec![
                command(
                    1,
                    Command::TokenCreate {
                        role: Role::Admin,
                        name: Some("bootstrap".into()),
                        hash: token_hash("admin-secret"),
                        bootstrap: true,
                    },
                ),
                command(
                    2,
                    Command::TokenCreate {
                        role: Role::Deployer,
                        name: None,
                        hash: token_hash("deployer-secret"),
                        bootstrap: false,
                    },
                ),
            ],
        ),
        normal(
            1,
            2,
            2_000,
            vec![command(3, Command::TokenRevoke { id: 2 })],
        ),
    ]
}

fn assert_tokens(sm: &StateMachineStore) {
    sm.read(|d| {
        let t = d.tokens();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.authenticate("admin-secret").map(|i| (i.id, i.role)),
            Some((1, Role::Admin))
        );
        assert!(t.authenticate("deployer-secret").is_none(), "revoked");
        let d = t.get(2).expect("the revoked token is kept");
        assert!(d.revoked && d.revoked_ms == Some(2_000) && d.created_ms == 1_000);
    });
}

#[tokio::test]
async fn tokens_survive_a_restart_and_travel_in_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let digest = {
        let (_log, mut sm) = open(dir.path()).await.expect("open");
        let responses = sm.apply(token_entries()).await.expect("apply");
        assert!(matches!(
            responses[0].results[..],
            [
                CommandResult::TokenCreated { .. },
                CommandResult::TokenCreated { .. }
            ]
        ));
        assert_tokens(&sm);
        sm.digest()
    };
    let (_log, mut sm) = open(dir.path()).await.expect("reopen");
    assert_tokens(&sm);
    assert_eq!(sm.digest(), digest);

    let snapshot = sm
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build snapshot");
    let follower_dir = tempfile::tempdir().expect("tempdir");
    let (_log_f, mut follower) = open(follower_dir.path()).await.expect("open follower");
    follower
        .install_snapshot(
            &snapshot.meta,
            Box::new(Cursor::new(snapshot.snapshot.into_inner())),
        )
        .await
        .expect("install");
    assert_tokens(&follower);
    assert_eq!(follower.digest(), digest);
    drop((_log_f, follower));
    let (_log_f, follower) = open(follower_dir.path()).await.expect("reopen follower");
    assert_tokens(&follower);

    // A second bootstrap on the restored state is refused and changes nothing.
    let mut follower = follower;
    let r = follower
        .apply([normal(
            1,
            3,
            3_000,
            vec![ClientCommand {
                request_id: RequestId { client: 5, seq: 4 },
                command: Command::TokenCreate {
                    role: Role::Admin,
                    name: None,
                    hash: token_hash("another-admin"),
                    bootstrap: true,
                },
            }],
        )])
        .await
        .expect("apply");
    assert!(
        matches!(r[0].results[0], CommandResult::Rejected { .. }),
        "{r:?}"
    );
    assert_tokens(&follower);
}
