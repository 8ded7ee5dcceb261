//! Issue 3: OPTIONS pings mark a trunk down when the carrier stops answering; no call is attempted while
//! it is down, and dialing resumes by itself when the carrier answers again.

use std::time::{Duration, Instant};

use campanile_chaos_tests::*;
use serde_json::json;

fn trunk_up(node: &NodeProc) -> Option<bool> {
    let m = node.text("/metrics").ok()?;
    m.lines()
        .find(|l| l.starts_with("campanile_trunk_up "))
        .map(|l| l.ends_with(" 1"))
}

/// A test node pinging its trunk every half second (the interval belongs to the [trunk] table).
fn pinging_config() -> String {
    fast_node_config(4).replacen("[trunk]\n", "[trunk]\noptions_interval_s = 0.5\n", 1)
}

/// Kills `node`'s carrier and waits until the node has marked its trunk down; then starts a
/// campaign (on `start_on`) with quick retries and answers its id.
fn kill_carrier_then_alert(city: &mut SimCityProc, node: &NodeProc, start_on: &NodeProc) -> u64 {
    city.proc.kill();
    wait_for(
        "the trunk to be marked down",
        Duration::from_secs(20),
        || (trunk_up(node) == Some(false)).then_some(()),
    )
    .unwrap();
    start_on
        .start_campaign(json!({"max_attempts": 3, "busy_delay_s": 1.0, "no_answer_delay_s": 1.0, "failure_delay_s": 1.0}))
        .unwrap()
}

#[test]
fn a_dead_carrier_stops_dialing_and_its_return_resumes_it() {
    let dir = test_dir();
    let mut city = SimCityProc::start(dir.path(), "always-answer", 1).unwrap();
    let addr = city.addr;
    let node = NodeProc::start(dir.path(), &pinging_config(), &format!("sip:{addr}")).unwrap();
    node.register(1, 5).unwrap();

    let id = kill_carrier_then_alert(&mut city, &node, &node);
    // Absence of calls can only be observed over a window: 1.5 s of polls, every one must see no attempt.
    let window = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < window {
        let (_, c) = node.get(&format!("/api/v1/campaigns/{id}")).unwrap();
        assert_eq!(
            c["counts"]["attempts"], 0,
            "a call was attempted on a trunk marked down: {c}"
        );
        assert_eq!(c["counts"]["in_flight"], 0, "{c}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let city = SimCityProc::start_at(dir.path(), "always-answer", 1, addr).unwrap();
    wait_for("the trunk to come back up", Duration::from_secs(20), || {
        (trunk_up(&node) == Some(true)).then_some(())
    })
    .unwrap();
    let done = node
        .wait_campaign_done(id, Duration::from_secs(120))
        .unwrap();
    assert_eq!(done["counts"]["confirmed"], 5, "{done}");
    // Nobody's retry budget was spent while the trunk was down.
    assert_eq!(done["counts"]["attempts"], 5, "{done}");
    assert_eq!(numbers_that_pressed(&city.events()).len(), 5);
    assert!(node
        .proc
        .log_text()
        .contains("trunk stopped answering OPTIONS pings"));
}

/// Two data centres, each node with its own carrier. One carrier dies: while its trunk is down its
/// node takes no partitions (it says a capacity of 0), so the other data centre's node dials every
/// citizen instead of half of them waiting for the dead carrier.
#[test]
fn a_node_whose_carrier_is_dead_leaves_its_citizens_to_the_other_data_centre() {
    let dir = test_dir();
    let (dir_a, dir_b) = (dir.path().join("city-a"), dir.path().join("city-b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let mut city_a = SimCityProc::start(&dir_a, "always-answer", 2).unwrap();
    let city_b = SimCityProc::start(&dir_b, "always-answer", 3).unwrap();
    let config = pinging_config();
    let plan = ClusterPlan::new(dir.path(), 2).unwrap();
    let node_a = plan
        .start(1, &config, &format!("sip:{}", city_a.addr))
        .unwrap();
    let node_b = plan
        .start(2, &config, &format!("sip:{}", city_b.addr))
        .unwrap();
    wait_voters(&node_a, 2, Duration::from_secs(60)).unwrap();
    // Both hold a share while both carriers answer.
    let shares = |node: &NodeProc| -> Option<Vec<u64>> {
        let v = cluster_view(node)?;
        let held: Vec<u64> = v["members"]
            .as_array()?
            .iter()
            .filter_map(|m| m["leases"].as_u64())
            .collect();
        (held.len() == 2).then_some(held)
    };
    wait_for(
        "both nodes to hold partitions",
        Duration::from_secs(30),
        || shares(&node_b).filter(|h| h.iter().all(|n| *n > 0)),
    )
    .unwrap();
    node_a.register(1, 20).unwrap();

    let id = kill_carrier_then_alert(&mut city_a, &node_a, &node_b);
    let done = node_b
        .wait_campaign_done(id, Duration::from_secs(90))
        .unwrap_or_else(|e| {
            let (_, c) = node_b.get(&format!("/api/v1/campaigns/{id}")).unwrap();
            panic!(
                "{e}: the campaign did not finish with node A's carrier dead: {c}, leases {:?}",
                shares(&node_b)
            )
        });
    assert_eq!(done["counts"]["confirmed"], 20, "{done}");
    assert_eq!(numbers_that_pressed(&city_b.events()).len(), 20);
    // Node A gave its partitions up (it may keep one it had a call in flight in, until the call ends).
    let held = shares(&node_b).unwrap();
    assert!(
        held[0] <= 1 && held[1] >= 255,
        "leases held (A, B): {held:?}"
    );
    // The cluster view tells the SRE why: node A offers no channels, node B its own.
    let v = cluster_view(&node_b).unwrap();
    let capacity = |id: u64| {
        v["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["id"] == id))
            .map(|m| m["capacity"].clone())
    };
    assert_eq!(capacity(1), Some(json!(0)), "{v}");
    assert!(
        capacity(2).and_then(|c| c.as_u64()).is_some_and(|c| c > 0),
        "{v}"
    );
}
