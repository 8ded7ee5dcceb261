//! Issue 4, operating a cluster of real `campanile up` processes on loopback:
//! - a fourth node joins as a learner once the cluster has its three voters;
//! - `campanile cluster status` through any node shows leader, term, data centres, roles and lag;
//! - a follower SIGKILLed while the others take writes and purge their logs behind snapshots catches
//!   up from a snapshot when it comes back;
//! - reads through a learner see a write just acknowledged by the leader (read index);
//! - `campanile cluster remove` through a learner removes a voter and the learner takes its vote;
//! - `campanile backup` from a follower and `campanile restore` make a new node with the same state;
//! - with two of three voters dead a write gets a clear 503 after a bounded wait, never an
//!   acknowledgement; linearizable reads are refused too, stale reads still answer.
//!
//! A second test: a node whose certificate comes from another CA cannot join, and the cluster logs
//! the refused connection.

use std::time::Duration;

use campanile_chaos_tests::*;
use serde_json::{json, Value};

fn role_of(view: &Value, id: u64) -> Option<String> {
    view["members"]
        .as_array()?
        .iter()
        .find(|m| m["id"] == id)
        .and_then(|m| m["role"].as_str().map(str::to_string))
}

#[test]
fn learners_snapshots_removal_backup_and_lost_quorum() {
    let dir = test_dir();
    let plan = ClusterPlan::new(dir.path(), 4).unwrap();
    let city = SimCityProc::start(dir.path(), "always-answer", 1).unwrap();
    let trunk = format!("sip:{}", city.addr);
    // Small snapshot interval so that a few hundred writes purge the log several times.
    let config = format!("{}\n[node]\nsnapshot_every = 50\n", fast_node_config(4));
    let mut nodes: Vec<NodeProc> = (1..=3)
        .map(|id| plan.start(id, &config, &trunk).unwrap())
        .collect();
    wait_voters(&nodes[0], 3, Duration::from_secs(60)).unwrap();
    nodes.push(plan.start(4, &config, &trunk).unwrap());
    let view = wait_for("node 4 as a learner", Duration::from_secs(30), || {
        let v = cluster_view(&nodes[0])?;
        (role_of(&v, 4)? == "learner").then_some(v)
    })
    .unwrap();
    assert_eq!(members_with_role(&view, &["leader", "follower"]).len(), 3);

    // The status command, through a follower, with that follower's own token file.
    let token2 = nodes[1].data.join("admin-token");
    let table = campanile(&[
        "cluster",
        "status",
        "--via",
        &nodes[1].http.to_string(),
        "--token-file",
        token2.to_str().unwrap(),
    ])
    .unwrap();
    eprintln!("{table}");
    assert!(table.starts_with("leader: node 1"), "{table}");
    for needle in ["learner", "follower", "dc1", "dc2", "dc3", "LAG"] {
        assert!(table.contains(needle), "`{needle}` missing from:\n{table}");
    }
    assert_eq!(table.lines().count(), 6, "{table}");

    // A follower dies; the others take writes and purge their logs.
    let before = cluster_view(&nodes[0]).unwrap();
    let follower_index = before["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 2)
        .and_then(|m| m["applied_index"].as_u64())
        .unwrap();
    nodes[1].kill();
    let ids: Vec<u64> = nodes[2]
        .register(1, 200)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let purged = wait_for(
        "the leader to purge its log past node 2",
        Duration::from_secs(30),
        || {
            let p = cluster_view(&nodes[0])?["purged_index"].as_u64()?;
            (p > follower_index + 1).then_some(p)
        },
    )
    .unwrap();
    eprintln!("node 2 stopped at index {follower_index}; the leader purged up to {purged}");
    nodes[1].restart().unwrap();
    for id in &ids {
        wait_for(
            &format!("subscriber {id} on the restarted node 2"),
            Duration::from_secs(30),
            || nodes[1].has_subscriber(*id).then_some(()),
        )
        .unwrap();
    }
    let v2 = cluster_view(&nodes[1]).unwrap();
    assert!(
        v2["snapshot_index"].as_u64().unwrap_or(0) >= purged,
        "node 2 must hold a snapshot at or past the purge point {purged}: {v2}"
    );

    // Read index: a write acknowledged by the leader is visible at once through the learner.
    for i in 0..20u32 {
        let (status, body) = nodes[0]
            .post(
                "/api/v1/subscribers",
                &json!({ "phone": format!("+39348{i:07}"), "language": "it" }),
            )
            .unwrap();
        assert_eq!(status, 201, "{body}");
        let id = body["id"].as_u64().unwrap();
        let (status, body) = nodes[3].get(&format!("/api/v1/subscribers/{id}")).unwrap();
        assert_eq!(
            status, 200,
            "read through the learner right after the write: {body}"
        );
    }

    // Remove voter 3 through the learner: the learner takes its vote.
    let token4 = nodes[3].data.join("admin-token");
    let out = campanile(&[
        "cluster",
        "remove",
        "3",
        "--via",
        &nodes[3].http.to_string(),
        "--token-file",
        token4.to_str().unwrap(),
    ])
    .unwrap();
    assert!(out.starts_with("node 3 removed"), "{out}");
    let view = wait_for(
        "voters 1, 2 and 4 without node 3",
        Duration::from_secs(30),
        || {
            let v = cluster_view(&nodes[0])?;
            let mut voters = members_with_role(&v, &["leader", "follower"]);
            voters.sort();
            (voters == [1, 2, 4] && role_of(&v, 3).is_none()).then_some(v)
        },
    )
    .unwrap();
    eprintln!("after removal: {view}");
    nodes[2].kill();
    let err = campanile(&[
        "cluster",
        "remove",
        "9",
        "--via",
        &nodes[0].http.to_string(),
        "--token-file",
        token4.to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("node 9 is not a member"), "{err}");

    // Backup through a follower, restore into a new data directory, start a node on it.
    let backup = dir.path().join("city.cbk");
    let out = campanile(&[
        "backup",
        "--via",
        &nodes[1].http.to_string(),
        "--out",
        backup.to_str().unwrap(),
        "--token-file",
        token2.to_str().unwrap(),
    ])
    .unwrap();
    assert!(out.contains("220 subscribers"), "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "a backup holds phone numbers");
    }
    let restored_dir = dir.path().join("restored");
    let out = campanile(&[
        "restore",
        backup.to_str().unwrap(),
        "--data",
        restored_dir.join("data").to_str().unwrap(),
    ])
    .unwrap();
    assert!(out.contains("restored 220 subscribers"), "{out}");
    let again = campanile(&[
        "restore",
        backup.to_str().unwrap(),
        "--data",
        restored_dir.join("data").to_str().unwrap(),
    ])
    .unwrap_err();
    assert!(
        again.to_string().contains("already holds a store"),
        "{again}"
    );
    let restored = NodeProc::start(&restored_dir, &fast_node_config(4), &trunk).unwrap();
    for id in &ids {
        assert!(
            restored.has_subscriber(*id),
            "subscriber {id} after restore"
        );
    }
    // Token hashes travel in the backup: node 1's token works on the restored node.
    let (status, _) = restored
        .get_as(nodes[0].token(), "/api/v1/campaigns")
        .unwrap();
    assert_eq!(status, 200);
    drop(restored);

    // Two of the three voters die: no quorum. A write is refused after a bounded wait, never
    // acknowledged; a linearizable read is refused; a stale read still answers.
    nodes[1].kill();
    nodes[3].kill();
    let (status, body) = nodes[0]
        .post(
            "/api/v1/subscribers",
            &json!({ "phone": "+393499999999", "language": "it" }),
        )
        .unwrap();
    assert_eq!(status, 503, "write without quorum: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("quorum"), "{body}");
    let id = ids[0];
    let (status, body) = nodes[0].get(&format!("/api/v1/subscribers/{id}")).unwrap();
    assert_eq!(status, 503, "linearizable read without quorum: {body}");
    let (status, body) = nodes[0]
        .get(&format!("/api/v1/subscribers/{id}?stale=true"))
        .unwrap();
    assert_eq!(status, 200, "stale read without quorum: {body}");
    drop(city);
}

#[test]
fn a_node_with_another_cas_certificate_cannot_join() {
    let dir = test_dir();
    let plan = ClusterPlan::new(dir.path(), 2).unwrap();
    let city = SimCityProc::start(dir.path(), "always-answer", 1).unwrap();
    let trunk = format!("sip:{}", city.addr);
    let node1 = plan.start(1, &fast_node_config(4), &trunk).unwrap();
    wait_voters(&node1, 1, Duration::from_secs(30)).unwrap();

    // Node 2's certificate comes from a CA of its own making.
    let rogue = dir.path().join("rogue");
    std::fs::create_dir_all(&rogue).unwrap();
    let rogue_plan = ClusterPlan {
        dir: rogue.clone(),
        ca: rogue.join("ca"),
        raft: plan.raft.clone(),
    };
    campanile(&["certs", "init", "--out", rogue_plan.ca.to_str().unwrap()]).unwrap();
    let mut args: Vec<String> = vec![
        "up".into(),
        "--data".into(),
        rogue.join("data").display().to_string(),
        "--http".into(),
        free_tcp().to_string(),
        "--sip".into(),
        free_udp().to_string(),
        "--trunk".into(),
        trunk.clone(),
    ];
    args.extend(rogue_plan.member_args(2).unwrap());
    let mut intruder = Proc::spawn(
        "rogue node",
        &campanile_bin(),
        &args,
        rogue.join("node.out"),
    )
    .unwrap();
    wait_for(
        "node 1 to log the refused connection",
        Duration::from_secs(30),
        || {
            node1
                .proc
                .log_text()
                .contains("refused a cluster connection")
                .then_some(())
        },
    )
    .unwrap();
    wait_for(
        "the intruder to report that it cannot join",
        Duration::from_secs(30),
        || {
            intruder
                .log_text()
                .contains("cannot join yet")
                .then_some(())
        },
    )
    .unwrap();
    let view = cluster_view(&node1).unwrap();
    assert_eq!(
        view["members"].as_array().map(Vec::len),
        Some(1),
        "the intruder must not be a member: {view}"
    );
    intruder.kill();
    drop(city);
}

/// libfaketime (Debian package `faketime`, which `scripts/test-all.sh` installs), preloaded to move
/// one node's wall clock.
fn libfaketime() -> String {
    let found = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|d| format!("{d}/faketime/libfaketimeMT.so.1"))
    .find(|p| std::path::Path::new(p).exists());
    found.expect("libfaketime is missing: apt-get install faketime (scripts/test-all.sh does)")
}

/// `campanile_peer_clock_offset_seconds{peer="<peer>"}` on `node`'s /metrics, when it is there.
fn clock_offset(node: &NodeProc, peer: u64) -> Option<f64> {
    let text = node.text("/metrics").ok()?;
    let series = format!("campanile_peer_clock_offset_seconds{{peer=\"{peer}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until `node`'s log holds `needle`.
fn wait_log(node: &NodeProc, needle: &str) {
    wait_for(needle, Duration::from_secs(30), || {
        node.proc.log_text().contains(needle).then_some(())
    })
    .unwrap();
}

/// Node 2's wall clock runs 2 s ahead (libfaketime reading its offset from a file the test rewrites;
/// the monotonic clock is left alone), as after a broken NTP. Each node measures the other's clock
/// over the cluster's QUIC connection, publishes it on /metrics and warns; once node 2's clock is
/// put right both estimates come back and both nodes say so.
#[test]
fn a_member_whose_clock_is_off_is_reported_until_it_agrees_again() {
    let dir = test_dir();
    let plan = ClusterPlan::new(dir.path(), 2).unwrap();
    let city = SimCityProc::start(dir.path(), "always-answer", 1).unwrap();
    let trunk = format!("sip:{}", city.addr);
    let config = fast_node_config(4);
    let offset_file = dir.path().join("node2-clock");
    std::fs::write(&offset_file, "+2s\n").unwrap();
    let env: Vec<(String, String)> = [
        ("LD_PRELOAD", libfaketime()),
        ("FAKETIME_TIMESTAMP_FILE", offset_file.display().to_string()),
        ("FAKETIME_CACHE_DURATION", "1".to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let node1 = plan.start(1, &config, &trunk).unwrap();
    wait_voters(&node1, 1, Duration::from_secs(30)).unwrap();
    let node2 = plan.start_with_env(2, &config, &trunk, &env).unwrap();
    wait_voters(&node1, 2, Duration::from_secs(60)).unwrap();

    let measured = |node: &NodeProc, peer: u64, near: f64| {
        wait_for(
            &format!("node {peer}'s clock measured near {near} s"),
            Duration::from_secs(60),
            || clock_offset(node, peer).filter(|o| (o - near).abs() < 0.1),
        )
    };
    let ahead = measured(&node1, 2, 2.0).unwrap();
    let behind = measured(&node2, 1, -2.0).unwrap();
    eprintln!("node 1 sees node 2 at {ahead:+.4} s, node 2 sees node 1 at {behind:+.4} s");
    // The warning names the offset to the millisecond: 2 s, give or take the estimate's error
    // (1.999 or 2.000 s as the probe's half round trip falls).
    let warned = |node: &NodeProc, peer: u64, way: &str| {
        let head = format!("node {peer}'s clock is ");
        let tail = format!(" s {way} this node's");
        wait_for(&format!("{head}... {way}"), Duration::from_secs(30), || {
            node.proc.log_text().lines().find_map(|l| {
                let said = l.split_once(&head)?.1.split_once(&tail)?.0;
                said.parse::<f64>().ok()
            })
        })
        .unwrap()
    };
    let (said_ahead, said_behind) = (warned(&node1, 2, "ahead of"), warned(&node2, 1, "behind"));
    assert!(
        (said_ahead - 2.0).abs() < 0.1 && (said_behind - 2.0).abs() < 0.1,
        "warned of {said_ahead:.3} s ahead and {said_behind:.3} s behind"
    );
    let rtt = node1.text("/metrics").unwrap();
    assert!(
        rtt.contains("campanile_peer_clock_rtt_seconds{peer=\"2\"}"),
        "{rtt}"
    );
    // The cluster view and `campanile cluster status` show it as well.
    let view = cluster_view(&node1).unwrap();
    let offset_ms = view["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["id"] == 2))
        .and_then(|m| m["clock_offset_ms"].as_f64());
    assert!(
        offset_ms.is_some_and(|ms| (ms - 2000.0).abs() < 100.0),
        "{view}"
    );
    let table = campanile(&[
        "cluster",
        "status",
        "--via",
        &node1.http.to_string(),
        "--token-file",
        node1.data.join("admin-token").to_str().unwrap(),
    ])
    .unwrap();
    let ends = |suffix: &str| {
        table
            .lines()
            .filter(|l| l.trim_end().ends_with(suffix))
            .count()
    };
    assert_eq!((ends("here"), ends(" s OFF")), (1, 1), "{table}");

    // NTP puts node 2 right.
    std::fs::write(&offset_file, "+0s\n").unwrap();
    let right = measured(&node1, 2, 0.0).unwrap();
    let right_too = measured(&node2, 1, 0.0).unwrap();
    eprintln!("then node 1 sees node 2 at {right:+.4} s, node 2 sees node 1 at {right_too:+.4} s");
    wait_log(&node1, "node 2's clock agrees with this node's again");
    wait_log(&node2, "node 1's clock agrees with this node's again");
    drop(city);
}
