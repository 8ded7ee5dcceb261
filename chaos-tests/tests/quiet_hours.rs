//! Quiet hours with a real node and the sim-city: while its tenant's quiet hours last, a
//! non-emergency campaign places no call, and an emergency of the same tenant calls everyone;
//! once quiet hours are cleared the held campaign calls too. The window is chosen around the
//! present moment, so the test does not depend on the time of day it runs at.

use std::time::Duration;

use campanile_chaos_tests::*;
use serde_json::{json, Value};

#[test]
fn quiet_hours_hold_non_emergency_calls_and_let_emergencies_through() {
    let dir = test_dir();
    let city = SimCityProc::start(dir.path(), "always-answer", 5).unwrap();
    let node = NodeProc::start(
        &dir.path().join("node"),
        &fast_node_config(20),
        &format!("sip:{}", city.addr),
    )
    .unwrap();
    node.register(1, 6).unwrap();

    // Italy is UTC+1 or UTC+2: a window from the UTC time of day now to four hours later holds
    // the Italian time of day now, in winter and in summer, for at least two hours.
    let utc_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 60
        % 1440;
    let hhmm = |m: u64| format!("{:02}:{:02}", m % 1440 / 60, m % 60);
    let window = json!({ "start": hhmm(utc_minute), "end": hhmm(utc_minute + 240) });
    let (status, tenant) = node
        .put("/api/v1/tenants/default/quiet-hours", &window)
        .unwrap();
    assert_eq!(status, 200, "{tenant}");
    assert_eq!(tenant["quiet_hours"], window);

    let info = create_and_start(&node, "Raccolta rifiuti", "info");
    let emergency = create_and_start(&node, "Evacuazione", "emergency");

    // The emergency reaches everyone; the info campaign, due all along on a node with free
    // channels, has called nobody by then.
    let done = node
        .wait_campaign_done(emergency, Duration::from_secs(120))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["confirmed"], 6, "{done}");
    let (_, held) = node.get(&format!("/api/v1/campaigns/{info}")).unwrap();
    assert_eq!(held["state"], "running", "{held}");
    assert_eq!(held["counts"]["attempts"], 0, "{held}");
    assert_eq!(held["counts"]["pending"], 6, "{held}");
    let invites = |events: &[Value]| events.iter().filter(|e| e["event"] == "invite").count();
    assert_eq!(invites(&city.events()), 6, "only the emergency's calls");

    // Quiet hours over: the held campaign calls everyone.
    let (status, tenant) = node.delete("/api/v1/tenants/default/quiet-hours").unwrap();
    assert_eq!(status, 200, "{tenant}");
    assert_eq!(tenant["quiet_hours"], Value::Null);
    let done = node
        .wait_campaign_done(info, Duration::from_secs(120))
        .unwrap();
    assert_eq!(done["counts"]["confirmed"], 6, "{done}");
    assert_eq!(invites(&city.events()), 12);

    // Both changes are in the audit log under the tenant.
    let (_, audit) = node.get("/api/v1/audit?tenant=default").unwrap();
    let changes = audit["entries"]
        .as_array()
        .or_else(|| audit.as_array())
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["action"] == "set_quiet_hours" && e["result"] == "ok")
                .count()
        })
        .unwrap_or(0);
    assert_eq!(changes, 2, "{audit}");
}

fn create_and_start(node: &NodeProc, title: &str, priority: &str) -> u64 {
    node.create_and_start(json!({
        "title": title,
        "message": { "tts": { "text": "Avviso del comune.", "language": "it" } },
        "audience": { "all": true },
        "priority": priority,
        "require_confirmation": true,
    }))
    .unwrap()
}
