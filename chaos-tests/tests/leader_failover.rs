//! Issue 4: three and five real `campanile up` processes on loopback form a cluster over QUIC with
//! mutual TLS (`certs init` / `certs issue`, `--raft`, `--certs`, `--join`). Writes through any node's
//! API are acknowledged; the leader is SIGKILLed; the survivors elect a new leader and take writes
//! again; every acknowledged write is on every node, the killed one too once it is back. Each node's
//! admin token works on every node (tokens are replicated state).

use std::time::{Duration, Instant};

use campanile_chaos_tests::*;

#[test]
fn three_processes_survive_the_leader_being_killed_and_lose_no_acknowledged_write() {
    survive_leader_kill(3);
}

#[test]
fn five_processes_survive_the_leader_being_killed_and_lose_no_acknowledged_write() {
    survive_leader_kill(5);
}

fn survive_leader_kill(n: usize) {
    let dir = test_dir();
    let plan = ClusterPlan::new(dir.path(), n).unwrap();
    let city = SimCityProc::start(dir.path(), "always-answer", 1).unwrap();
    let trunk = format!("sip:{}", city.addr);
    let config = format!("{}\n[node]\nvoters = {n}\n", fast_node_config(4));
    let mut nodes: Vec<NodeProc> = (1..=n)
        .map(|id| plan.start(id, &config, &trunk).unwrap())
        .collect();
    let view = wait_voters(&nodes[0], n, Duration::from_secs(60)).unwrap();
    assert_eq!(view["leader"], 1);
    // Every member registered its data centre and HTTP address; every admin token works everywhere.
    for m in view["members"].as_array().unwrap() {
        assert!(
            m["datacenter"].is_string() && m["http_addr"].is_string(),
            "{m}"
        );
    }
    for a in &nodes {
        for b in &nodes {
            let (status, body) = b.get_as(a.token(), "/api/v1/campaigns").unwrap();
            assert_eq!(status, 200, "token of {} on {}: {body}", a.http, b.http);
        }
    }

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
    let survivors: Vec<usize> = (1..=n).filter(|i| *i != leader).collect();
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
                || node.has_subscriber(*id).then_some(()),
            )
            .unwrap();
        }
    }
    drop(city);
}
