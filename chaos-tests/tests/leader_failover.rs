//! Issue 4: three real `campanile up` processes on loopback form a cluster over QUIC with mutual TLS
//! (`certs init` / `certs issue`, `--raft`, `--certs`, `--join`). Writes through any node's API are
//! acknowledged; the leader is SIGKILLed; the survivors elect a new leader and take writes again;
//! every acknowledged write is on every node, the killed one too once it is back.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use campanile_chaos_tests::*;
use serde_json::Value;

fn run(args: &[&str]) {
    let out = Command::new(campanile_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "campanile {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn member_args(id: usize, raft: &[SocketAddr], certs: &Path) -> Vec<String> {
    let mut a = vec![
        "--node-id".to_string(),
        id.to_string(),
        "--datacenter".into(),
        format!("dc{id}"),
        "--raft".into(),
        raft[id - 1].to_string(),
        "--certs".into(),
        certs.display().to_string(),
    ];
    if id > 1 {
        a.extend(["--join".to_string(), raft[0].to_string()]);
    }
    a
}

fn cluster_view(node: &NodeProc) -> Option<Value> {
    node.get("/api/v1/cluster")
        .ok()
        .filter(|(s, _)| *s == 200)
        .map(|(_, v)| v)
}

fn has_subscriber(node: &NodeProc, id: u64) -> bool {
    matches!(node.get(&format!("/api/v1/subscribers/{id}")), Ok((200, _)))
}

#[test]
fn three_processes_survive_the_leader_being_killed_and_lose_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    run(&["certs", "init", "--out", ca.to_str().unwrap()]);
    let raft: Vec<SocketAddr> = (0..3).map(|_| free_udp()).collect();
    let city = SimCityProc::start(dir.path(), "always-answer", 1).unwrap();
    let trunk = format!("sip:{}", city.addr);
    let mut nodes: Vec<NodeProc> = Vec::new();
    for id in 1..=3usize {
        let certs = dir.path().join(format!("certs{id}"));
        run(&[
            "certs",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--node-id",
            &id.to_string(),
            "--host",
            "127.0.0.1",
            "--out",
            certs.to_str().unwrap(),
        ]);
        nodes.push(
            NodeProc::start_with(
                &dir.path().join(format!("n{id}")),
                &fast_node_config(4),
                &trunk,
                &member_args(id, &raft, &certs),
            )
            .unwrap(),
        );
    }
    let view = wait_for("three voters", Duration::from_secs(30), || {
        let v = cluster_view(&nodes[0])?;
        let members = v["members"].as_array()?;
        let voters = members
            .iter()
            .filter(|m| m["role"] == "leader" || m["role"] == "follower")
            .count();
        (voters == 3).then_some(v)
    })
    .unwrap();
    assert_eq!(view["leader"], 1);

    // Writes through every node: followers forward them to the leader.
    let mut acked: Vec<u64> = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let first = 1 + 10 * i as u32;
        acked.extend(
            node.register(first, 10)
                .unwrap()
                .into_iter()
                .map(|(id, _)| id),
        );
    }

    // SIGKILL the leader.
    let leader = view["leader"].as_u64().unwrap() as usize;
    nodes[leader - 1].kill();
    let killed_at = Instant::now();
    let survivors: Vec<usize> = (1..=3).filter(|i| *i != leader).collect();
    // A write through a survivor succeeds again once a new leader is elected.
    let mut next = 100u32;
    let id = wait_for(
        "a write after the leader died",
        Duration::from_secs(30),
        || {
            next += 1;
            let phone = format!("+39347{next:07}");
            match nodes[survivors[0] - 1].post(
                "/api/v1/subscribers",
                &serde_json::json!({ "phone": phone, "language": "it" }),
            ) {
                Ok((201, body)) => body["id"].as_u64(),
                _ => None,
            }
        },
    )
    .unwrap();
    eprintln!(
        "first acknowledged write {:?} after SIGKILL of the leader",
        killed_at.elapsed()
    );
    acked.push(id);
    acked.extend(
        nodes[survivors[1] - 1]
            .register(200, 5)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id),
    );
    let view = cluster_view(&nodes[survivors[0] - 1]).unwrap();
    assert_ne!(view["leader"].as_u64(), Some(leader as u64));

    // Every acknowledged write is on both survivors, and on the killed node once it is back.
    nodes[leader - 1].restart().unwrap();
    for node in &nodes {
        for id in &acked {
            wait_for(
                &format!("subscriber {id} on node {}", node.http),
                Duration::from_secs(30),
                || has_subscriber(node, *id).then_some(()),
            )
            .unwrap();
        }
    }
    drop(city);
}
