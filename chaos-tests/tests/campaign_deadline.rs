//! A campaign's deadline with a real node and the sim-city: from the deadline on nobody is called,
//! the citizens not reached end `exhausted`, and the campaign completes. An emergency with a
//! deadline rings until then, past its attempt budget.

use std::time::Duration;

use campanile_chaos_tests::*;
use serde_json::json;

#[test]
fn from_the_deadline_nobody_is_called_and_the_unreached_end_exhausted() {
    let dir = test_dir();
    // Nobody answers: every citizen would be called again and again until the attempts run out.
    let profile = dir.path().join("nobody-answers.toml");
    std::fs::write(
        &profile,
        "answer = 0.0\nno_answer = 1.0\nmax_ring_ms = 60000\n",
    )
    .unwrap();
    let city = SimCityProc::start(dir.path(), &profile.display().to_string(), 9).unwrap();
    let node = NodeProc::start(
        &dir.path().join("node"),
        &fast_node_config(2),
        &format!("sip:{}", city.addr),
    )
    .unwrap();
    node.register(1, 12).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let deadline = now + 6_000;
    let id = node.create_and_start(json!({
                "title": "Entro le 18",
                "message": { "tts": { "text": "Chiusura della strada provinciale.", "language": "it" } },
                "audience": { "all": true },
                "priority": "info",
                "retry": { "max_attempts": 10, "no_answer_delay_s": 0.5 },
                "deadline_ms": deadline,
            })).unwrap();
    let done = node
        .wait_campaign_done(id, Duration::from_secs(60))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    // Two channels and 4 s of ringing: not everyone could be called ten times by the deadline.
    assert_eq!(done["counts"]["exhausted"], 12, "{done}");
    assert!(done["counts"]["attempts"].as_u64().unwrap() < 120, "{done}");
    // The city's log: calls before the deadline, none after (a start in flight at that instant may
    // reach the city within the dialer's batch; 500 ms covers it).
    let invites: Vec<u64> = city
        .events()
        .iter()
        .filter(|e| e["event"] == "invite")
        .filter_map(|e| e["t_ms"].as_u64())
        .collect();
    assert!(!invites.is_empty());
    let late: Vec<u64> = invites
        .iter()
        .filter(|t| **t > deadline + 500)
        .copied()
        .collect();
    assert!(
        late.is_empty(),
        "calls placed after the deadline: {late:?} (deadline {deadline})"
    );
}

#[test]
fn an_emergency_with_a_deadline_rings_past_its_attempt_budget_until_the_deadline() {
    let dir = test_dir();
    let profile = dir.path().join("nobody-answers.toml");
    std::fs::write(
        &profile,
        "answer = 0.0\nno_answer = 1.0\nmax_ring_ms = 60000\n",
    )
    .unwrap();
    let city = SimCityProc::start(dir.path(), &profile.display().to_string(), 10).unwrap();
    let mut config = fast_node_config(4);
    // Ring a second only, so a few seconds hold many attempts.
    config = config.replace("ring_timeout_s = 4.0", "ring_timeout_s = 1.0");
    let node = NodeProc::start(
        &dir.path().join("node"),
        &config,
        &format!("sip:{}", city.addr),
    )
    .unwrap();
    node.register(1, 3).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let deadline = now + 8_000;
    let (status, body) = node
        .post(
            "/api/v1/campaigns",
            &json!({
                "title": "Evacuazione entro le 18",
                "message": { "tts": { "text": "Evacuare il quartiere.", "language": "it" } },
                "audience": { "all": true },
                "priority": "emergency",
                "retry": { "max_attempts": 2, "no_answer_delay_s": 0.5, "quick_delay_s": 0.2 },
                "deadline_ms": deadline,
            }),
        )
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["retry"]["until_deadline"], true, "{body}");
    let id = body["id"].as_u64().unwrap();
    let (status, body) = node
        .post(
            &format!("/api/v1/campaigns/{id}/start"),
            &serde_json::Value::Null,
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let done = node
        .wait_campaign_done(id, Duration::from_secs(60))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["exhausted"], 3, "{done}");
    // Three citizens, two attempts each by the budget: an emergency calls on regardless.
    let attempts = done["counts"]["attempts"].as_u64().unwrap();
    assert!(
        attempts > 6,
        "only {attempts} attempts before the deadline: {done}"
    );
    let invites: Vec<u64> = city
        .events()
        .iter()
        .filter(|e| e["event"] == "invite")
        .filter_map(|e| e["t_ms"].as_u64())
        .collect();
    let late: Vec<u64> = invites
        .iter()
        .filter(|t| **t > deadline + 500)
        .copied()
        .collect();
    assert!(
        late.is_empty(),
        "calls placed after the deadline: {late:?} (deadline {deadline})"
    );
}
