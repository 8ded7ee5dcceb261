//! An emergency takes channels from lower priorities at once. One real node with 3 channels is
//! busy ringing phones nobody answers for an information campaign (a 60 s ring timeout); an
//! emergency for other citizens starts: its calls go out while the information calls are cut
//! (CANCEL), long before any of those would have rung out, and the information campaign's
//! citizens keep their attempts (a cut call is not held against them).

use std::time::Duration;

use campanile_chaos_tests::*;
use serde_json::{json, Value};

const CHANNELS: usize = 3;

fn create_and_start(node: &NodeProc, zone: &str, priority: &str) -> u64 {
    node.create_and_start(json!({
        "title": format!("{priority} for {zone}"),
        "message": { "tts": { "text": "Avviso del comune.", "language": "it" } },
        "audience": { "zones": [zone] },
        "priority": priority,
        "require_confirmation": true,
    }))
    .unwrap()
}

#[test]
fn an_emergency_takes_the_channels_of_an_information_campaign_at_once() {
    let dir = test_dir();
    // Phones ring and nobody answers, for two minutes.
    let profile = dir.path().join("ringing.toml");
    std::fs::write(
        &profile,
        "answer = 0.0\nno_answer = 1.0\nmax_ring_ms = 120000\n",
    )
    .unwrap();
    let city = SimCityProc::start(dir.path(), &profile.display().to_string(), 3).unwrap();
    let config = format!(
        "[trunk]\nname = \"sim\"\nmax_channels = {CHANNELS}\ncalls_per_second = 200\n\n\
         [dialer]\nring_timeout_s = 60.0\nconfirm_wait_s = 3.0\nbatch_ms = 20\n"
    );
    let node = NodeProc::start(
        &dir.path().join("node"),
        &config,
        &format!("sip:{}", city.addr),
    )
    .unwrap();
    let people: Vec<Value> = (0..10)
        .map(|i| {
            let zone = if i < 6 { "campagna" } else { "fiume" };
            json!({ "phone": format!("+39347{:07}", 100 + i), "language": "it", "zone": zone })
        })
        .collect();
    let (status, body) = node
        .post(
            "/api/v1/subscribers/import",
            &json!({ "subscribers": people }),
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");

    let info = create_and_start(&node, "campagna", "info");
    // Every channel rings for the information campaign.
    wait_for("the channels full", Duration::from_secs(60), || {
        let ringing = city
            .events()
            .iter()
            .filter(|e| e["event"] == "invite")
            .count();
        (ringing == CHANNELS).then_some(())
    })
    .unwrap();
    let emergency = create_and_start(&node, "fiume", "emergency");
    let fiume: Vec<String> = (6..10).map(|i| format!("+39347{:07}", 100 + i)).collect();
    let events = wait_for("the emergency's calls out", Duration::from_secs(50), || {
        let events = city.events();
        fiume
            .iter()
            .all(|n| {
                events
                    .iter()
                    .any(|e| e["event"] == "invite" && e["number"] == n.as_str())
            })
            .then_some(events)
    })
    .unwrap();

    // Every emergency call went out before any information call could have rung out: the
    // first information calls were cut, not waited for.
    let first_info_invite = events
        .iter()
        .filter(|e| e["event"] == "invite")
        .filter_map(|e| e["t_ms"].as_u64())
        .min()
        .unwrap();
    let last_emergency_invite = events
        .iter()
        .filter(|e| e["event"] == "invite" && fiume.iter().any(|n| e["number"] == n.as_str()))
        .filter_map(|e| e["t_ms"].as_u64())
        .max()
        .unwrap();
    assert!(
        last_emergency_invite < first_info_invite + 60_000,
        "the emergency waited for the information calls to ring out"
    );
    let cut = events
        .iter()
        .filter(|e| e["event"] == "cancel")
        .filter(|e| !fiume.iter().any(|n| e["number"] == n.as_str()))
        .count();
    assert!(cut >= 1, "no information call was cut: {events:#?}");

    // The cut calls are not held against their citizens.
    let (_, c) = node.get(&format!("/api/v1/campaigns/{info}")).unwrap();
    assert_eq!(c["state"], "running", "{c}");
    assert_eq!(c["counts"]["attempts"], 0, "{c}");
    let (_, tasks) = node
        .get(&format!("/api/v1/campaigns/{info}/tasks"))
        .unwrap();
    assert!(
        tasks
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["attempts"].as_u64().unwrap_or(0) == 0 || t["state"] == "in_flight"),
        "{tasks:#}"
    );
    for id in [info, emergency] {
        let (status, body) = node
            .post(&format!("/api/v1/campaigns/{id}/cancel"), &Value::Null)
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
}
