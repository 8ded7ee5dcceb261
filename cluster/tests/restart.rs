//! A node's replicated state survives a restart, with and without a snapshot that purged the log.

use campanile_cluster::*;

fn new_sub(n: u32) -> Command {
    Command::CreateSubscriber {
        at_ms: n as u64,
        subscriber: NewSubscriber {
            tenant: campanile_cluster::default_tenant(),
            phone: PhoneNumber::parse(&format!("+39347{n:07}")).unwrap(),
            name: None,
            language: "it".into(),
            zone: None,
            verified: true,
            consent: None,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_writes_survive_restart_and_snapshot_with_purge() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::open(NodeId(1), dir.path()).await.unwrap();
    for n in 1..=50 {
        assert!(matches!(
            c.write(new_sub(n)).await.unwrap(),
            Response::SubscriberCreated(_)
        ));
    }
    c.shutdown().await.unwrap();
    drop(c);

    // Keep no log behind a snapshot, so the snapshot really replaces the purged entries.
    let opts = ClusterOptions {
        snapshot_every: 10_000,
        keep_behind_snapshot: 0,
        purge_batch: 1,
        ..ClusterOptions::default()
    };
    let c = Cluster::open_with(NodeId(1), dir.path(), opts)
        .await
        .unwrap();
    assert_eq!(c.read(|s| s.subscriber_count()), 50);
    // Snapshot, then write more: the restart must combine the snapshot and the log after it.
    c.snapshot_now().await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while c.status().purged_index.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "log never purged: {:?}",
            c.status()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(c.status().snapshot_index.is_some());
    for n in 51..=60 {
        c.write(new_sub(n)).await.unwrap();
    }
    c.shutdown().await.unwrap();
    drop(c);

    let c = Cluster::open(NodeId(1), dir.path()).await.unwrap();
    assert_eq!(c.read(|s| s.subscriber_count()), 60);
    // The phone index was rebuilt: a duplicate is still refused after the restart.
    assert!(matches!(
        c.write(new_sub(7)).await.unwrap(),
        Response::Refused(Refusal::DuplicatePhone(..))
    ));
    c.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_garbage_data_directory_is_refused_not_started_empty() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("raft")).unwrap();
    std::fs::write(dir.path().join("raft/conf"), b"\x00\x01garbage").unwrap();
    std::fs::write(dir.path().join("raft/db"), b"not a sled database at all").unwrap();
    let err = Cluster::open(NodeId(1), dir.path())
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("raft"), "{msg}");
}
