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

#[test]
fn a_dead_carrier_stops_dialing_and_its_return_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut city = SimCityProc::start(dir.path(), "always-answer", 1).unwrap();
    let addr = city.addr;
    // Ping every half second; the interval belongs to the [trunk] table.
    let config =
        fast_node_config(4).replacen("[trunk]\n", "[trunk]\noptions_interval_s = 0.5\n", 1);
    let node = NodeProc::start(dir.path(), &config, &format!("sip:{addr}")).unwrap();
    node.register(1, 5).unwrap();

    city.proc.kill();
    wait_for(
        "the trunk to be marked down",
        Duration::from_secs(20),
        || (trunk_up(&node) == Some(false)).then_some(()),
    )
    .unwrap();
    let id = node
        .start_campaign(json!({"max_attempts": 3, "busy_delay_s": 1.0, "no_answer_delay_s": 1.0, "failure_delay_s": 1.0}))
        .unwrap();
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
