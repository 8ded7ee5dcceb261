//! Issue 2: the real binary, 200 subscribers registered over the API, one campaign against
//! `campanile sim-city --profile realistic`; every subscriber's final state is checked against what the
//! simulated phones themselves logged.

use std::collections::BTreeMap;
use std::time::Duration;

use campanile_chaos_tests::*;
use serde_json::json;

#[test]
fn realistic_city_every_subscriber_final_and_confirmed_only_where_a_phone_pressed_1() {
    let dir = tempfile::tempdir().unwrap();
    let city = SimCityProc::start(dir.path(), "realistic", 7).unwrap();
    let node = NodeProc::start(
        dir.path(),
        &fast_node_config(60),
        &format!("sip:{}", city.addr),
    )
    .unwrap();

    let subscribers = node.register(1, 200).unwrap();
    let id = node
        .start_campaign(json!({
            "max_attempts": 6, "busy_delay_s": 1.0, "no_answer_delay_s": 2.0, "failure_delay_s": 1.0
        }))
        .unwrap();
    let done = node
        .wait_campaign_done(id, Duration::from_secs(600))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");

    let (status, tasks) = node.get(&format!("/api/v1/campaigns/{id}/tasks")).unwrap();
    assert_eq!(status, 200);
    let tasks = tasks.as_array().unwrap();
    assert_eq!(
        tasks.len(),
        subscribers.len(),
        "every subscriber was targeted"
    );

    let events = city.events();
    let pressed = numbers_that_pressed(&events);
    let by_number = events_by_number(&events);
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        let phone = t["phone"].as_str().unwrap();
        let state = t["state"].as_str().unwrap();
        *states.entry(state.to_string()).or_default() += 1;
        assert!(
            !matches!(state, "pending" | "in_flight"),
            "{phone} left in {state}"
        );
        let calls = by_number.get(phone).map(Vec::len).unwrap_or(0);
        assert!(
            calls > 0,
            "{phone} ended {state} but the city never saw a call"
        );
        if state == "confirmed" {
            assert!(
                pressed.contains(phone),
                "{phone} confirmed but its phone never pressed 1"
            );
        } else {
            assert!(
                !pressed.contains(phone),
                "{phone} pressed 1 but ended {state}"
            );
        }
        if state == "invalid" {
            let rejected_404 = by_number[phone]
                .iter()
                .any(|e| e["event"] == "reject" && e["code"] == 404);
            assert!(
                rejected_404,
                "{phone} marked invalid without a 404 from the city"
            );
        }
    }
    let counts = &done["counts"];
    assert_eq!(
        counts["confirmed"].as_u64().unwrap() as usize,
        pressed.len()
    );
    assert_eq!(counts["targeted"], 200);
    assert_eq!(counts["pending"], 0);
    assert_eq!(counts["in_flight"], 0);
    // A realistic city with retries reaches most people; a broken dialer would not.
    assert!(
        pressed.len() >= 150,
        "only {} of 200 confirmed: {states:?}",
        pressed.len()
    );
    eprintln!("final states: {states:?}");

    // 503s from the overloaded carrier back off the trunk and are not the citizens' attempts.
    let invites = events.iter().filter(|e| e["event"] == "invite").count() as u64;
    let overloads = events
        .iter()
        .filter(|e| e["event"] == "reject" && e["code"] == 503)
        .count() as u64;
    assert!(
        overloads > 0,
        "the realistic city sent no 503, so the trunk gate went untested"
    );
    assert_eq!(
        counts["attempts"].as_u64().unwrap(),
        invites - overloads,
        "{done}"
    );
    // After a 503 with Retry-After: 1 the whole trunk pauses: no new INVITE reaches the city until the
    // second is over (100 ms of slack for calls that were already on their way when the 503 arrived).
    let invite_times: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "invite")
        .filter_map(|e| e["t_ms"].as_u64())
        .collect();
    for e in events
        .iter()
        .filter(|e| e["event"] == "reject" && e["code"] == 503)
    {
        let t = e["t_ms"].as_u64().unwrap();
        let during = invite_times
            .iter()
            .filter(|i| **i > t + 100 && **i < t + 950)
            .count();
        assert_eq!(
            during, 0,
            "{during} INVITEs reached the city during the pause after the 503 at {t}"
        );
    }

    // The metrics endpoint is valid Prometheus text according to promtool.
    let metrics = node.text("/metrics").unwrap();
    assert!(
        metrics.contains(&format!(
            "campanile_trunk_rejections_total{{code=\"503\"}} {overloads}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("campanile_calls_total"), "{metrics}");
    let check = promtool_check(&metrics);
    assert!(check.is_empty(), "promtool check metrics: {check}");
}

/// Runs `promtool check metrics` on `text`; returns its complaints (empty when clean).
fn promtool_check(text: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by the test command (Debian package prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    if out.status.success() && s.trim().is_empty() {
        String::new()
    } else {
        format!("exit {}: {s}", out.status)
    }
}
