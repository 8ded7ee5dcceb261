//! Issue 4, first multi-node step: three members in one process, each with its own sled store and
//! its own QUIC/mTLS endpoint on loopback. Nodes join through any member; a write on the leader or
//! forwarded by a follower reaches every member; when the leader stops, the other two elect a new one
//! and take writes, and nothing acknowledged is lost.
//! (The multi-process version with SIGKILL belongs to chaos-tests once nodes can be started with
//! `up --join`.)

use std::time::{Duration, Instant};

use campanile_cluster::tls::{self, NodeIdentity};
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

struct Member {
    cluster: Cluster,
    endpoint: quinn::Endpoint,
    addr: std::net::SocketAddr,
}

async fn member(root: &std::path::Path, ca: &std::path::Path, id: u64, bootstrap: bool) -> Member {
    let certs = root.join(format!("certs{id}"));
    tls::issue(ca, id, "127.0.0.1", &certs).unwrap();
    let identity = NodeIdentity::load(&certs).unwrap();
    let endpoint = tls::endpoint("127.0.0.1:0".parse().unwrap(), &identity).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let cluster = Cluster::open_member(
        NodeId(id),
        &root.join(format!("data{id}")),
        ClusterOptions::default(),
        MemberNet {
            endpoint: endpoint.clone(),
            raft_addr: addr,
            bootstrap,
        },
    )
    .await
    .unwrap();
    Member {
        cluster,
        endpoint,
        addr,
    }
}

async fn wait_count(c: &Cluster, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.read(|s| s.subscriber_count()) < n {
        assert!(
            Instant::now() < deadline,
            "node {} has {} of {n}",
            c.node_id(),
            c.read(|s| s.subscriber_count())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until `c` leads and hears exactly `ids` (itself included); answers its term.
async fn wait_reached(c: &Cluster, ids: &[u64]) -> u64 {
    let want: std::collections::BTreeSet<NodeId> = ids.iter().map(|i| NodeId(*i)).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = c.leadership();
        if let Some((term, reached)) = &now {
            if *reached == want {
                return *term;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {} hears {now:?}, not {want:?}",
            c.node_id()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_replicate_and_survive_the_leader_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    tls::init_ca(&ca).unwrap();
    let m1 = member(dir.path(), &ca, 1, true).await;
    let m2 = member(dir.path(), &ca, 2, false).await;
    let m3 = member(dir.path(), &ca, 3, false).await;
    assert_eq!(
        m1.cluster
            .wait_for_leader(Duration::from_secs(10))
            .await
            .unwrap(),
        1
    );
    // Node 2 joins through the leader, node 3 through node 2 (a follower, which forwards the join).
    m2.cluster.join(m1.addr).await.unwrap();
    m3.cluster.join(m2.addr).await.unwrap();
    for n in 1..=10 {
        m1.cluster.write(new_sub(n)).await.unwrap();
    }
    // A write on a follower is forwarded to the leader.
    for n in 11..=20 {
        m3.cluster.write(new_sub(n)).await.unwrap();
    }
    for m in [&m1, &m2, &m3] {
        wait_count(&m.cluster, 20).await;
    }
    // The leader hears everyone; a follower leads nothing.
    wait_reached(&m1.cluster, &[1, 2, 3]).await;
    assert_eq!(m2.cluster.leadership(), None);

    // The leader stops: its Raft and its endpoint go away.
    m1.cluster.shutdown().await.unwrap();
    m1.endpoint.close(quinn::VarInt::from_u32(0), b"stopped");
    let deadline = Instant::now() + Duration::from_secs(10);
    let leader = loop {
        let l = m2.cluster.status().leader;
        if let Some(l) = l.filter(|l| *l != 1) {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader: {:?}",
            m2.cluster.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let new_leader = if leader == 2 { &m2 } else { &m3 };
    for n in 21..=30 {
        new_leader.cluster.write(new_sub(n)).await.unwrap();
    }
    for m in [&m2, &m3] {
        wait_count(&m.cluster, 30).await;
    }
    // The new leader hears the other survivor and not the stopped leader, in a term of its own.
    let term = wait_reached(&new_leader.cluster, &[2, 3]).await;
    assert!(term > 1, "term {term}");
    // The remaining follower does not commit on its own (it names the leader) but forwards.
    let follower = if leader == 2 { &m3 } else { &m2 };
    match follower.cluster.write_here(new_sub(99)).await {
        Err(ClusterError::NotLeader { leader: Some(l) }) => assert_eq!(l, leader),
        other => panic!("a follower committed a write by itself: {other:?}"),
    }
    follower.cluster.write(new_sub(31)).await.unwrap();
    for m in [&m2, &m3] {
        wait_count(&m.cluster, 31).await;
    }
}
