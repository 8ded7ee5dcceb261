//! Issue 2: SIGKILL the node mid-campaign, restart it on the same data directory, and see the campaign
//! finish with every outcome that was committed before the kill still there.

use std::time::Duration;

use campanile_chaos_tests::*;
use serde_json::{json, Value};

fn confirmed_set(node: &NodeProc, id: u64) -> Vec<String> {
    let (_, tasks) = node.get(&format!("/api/v1/campaigns/{id}/tasks")).unwrap();
    tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "confirmed")
        .map(|t| t["phone"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn sigkill_mid_campaign_then_restart_loses_no_committed_outcome() {
    let dir = test_dir();
    let city = SimCityProc::start(dir.path(), "always-answer", 3).unwrap();
    let mut node = NodeProc::start(
        dir.path(),
        &fast_node_config(8),
        &format!("sip:{}", city.addr),
    )
    .unwrap();
    // The admin token was written on first start, readable by the node's user only.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(node.data.join("admin-token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "admin-token mode {mode:o}");
    }
    node.register(1, 60).unwrap();
    let id = node
        .start_campaign(json!({"max_attempts": 5, "busy_delay_s": 1.0, "no_answer_delay_s": 1.0, "failure_delay_s": 1.0}))
        .unwrap();

    // Let a good part of the city confirm, then kill the node without warning.
    wait_for("15 confirmations", Duration::from_secs(180), || {
        let (_, c) = node.get(&format!("/api/v1/campaigns/{id}")).ok()?;
        (c["counts"]["confirmed"].as_u64()? >= 15).then_some(())
    })
    .unwrap();
    let before = confirmed_set(&node, id);
    let (_, view_before) = node.get(&format!("/api/v1/campaigns/{id}")).unwrap();
    assert_eq!(
        view_before["state"], "running",
        "killed too late to test anything"
    );
    node.kill();

    let token_before = std::fs::read_to_string(node.data.join("admin-token")).unwrap();
    node.restart().unwrap();
    assert_eq!(
        std::fs::read_to_string(node.data.join("admin-token")).unwrap(),
        token_before
    );
    // Nothing acknowledged before the kill is gone after the restart.
    let after_restart = confirmed_set(&node, id);
    for phone in &before {
        assert!(
            after_restart.contains(phone),
            "{phone} lost its confirmation across SIGKILL"
        );
    }
    let done: Value = node
        .wait_campaign_done(id, Duration::from_secs(300))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["confirmed"], 60, "{done}");
    let final_set = confirmed_set(&node, id);
    for phone in &before {
        assert!(final_set.contains(phone));
    }
    // The cluster's confirmations match the phones' own record.
    let pressed = numbers_that_pressed(&city.events());
    assert_eq!(pressed.len(), 60);
    // The restarted node said it re-placed the calls cut by the kill.
    assert!(node.proc.log_text().contains("campanile node is up"));
}
