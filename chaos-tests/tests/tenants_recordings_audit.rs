//! Tenants, recordings and the audit log through a real `campanile up` process and the simulated city:
//! - a second tenant (`pisa`) keeps its subscribers apart: the same number may be registered with both
//!   tenants, and a campaign of `pisa` calls `pisa`'s subscribers only;
//! - a WAV recording (44.1 kHz stereo, as a browser or a phone would make it) is uploaded, stored as
//!   8 kHz mono under its SHA-256, and played by a campaign; every citizen hears enough of it to press 1;
//! - audio that cannot be decoded is refused by name; another tenant cannot use `pisa`'s recording;
//! - every API action is in the replicated audit log with the token that asked and what came of it,
//!   refusals included, and all of it survives a SIGKILL and restart.

use std::collections::BTreeSet;
use std::time::Duration;

use campanile_chaos_tests::*;
use serde_json::{json, Value};

/// A 16-bit PCM WAV: `secs` of a 440 Hz tone at `rate` Hz on `channels` channels.
fn tone_wav(rate: u32, channels: u16, secs: f64) -> Vec<u8> {
    let frames = (rate as f64 * secs) as u32;
    let data_len = frames * channels as u32 * 2;
    let mut w = Vec::with_capacity(44 + data_len as usize);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&channels.to_le_bytes());
    w.extend_from_slice(&rate.to_le_bytes());
    w.extend_from_slice(&(rate * channels as u32 * 2).to_le_bytes());
    w.extend_from_slice(&(channels * 2).to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    for i in 0..frames {
        let t = i as f64 / rate as f64;
        let v = ((2.0 * std::f64::consts::PI * 440.0 * t).sin() * 12_000.0) as i16;
        for _ in 0..channels {
            w.extend_from_slice(&v.to_le_bytes());
        }
    }
    w
}

fn subscriber(node: &NodeProc, tenant: &str, phone: &str) -> Value {
    let (status, body) = node
        .post(
            "/api/v1/subscribers",
            &json!({ "phone": phone, "language": "it", "tenant": tenant }),
        )
        .unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

#[test]
fn a_second_tenant_records_a_message_calls_only_its_citizens_and_everything_is_audited() {
    let dir = test_dir();
    let city = SimCityProc::start(dir.path(), "always-answer", 3).unwrap();
    let mut node = NodeProc::start(
        &dir.path().join("node"),
        &fast_node_config(10),
        &format!("sip:{}", city.addr),
    )
    .unwrap();

    // Tenants: `default` exists; `pisa` is created; bad and duplicate slugs are refused by name.
    let (status, body) = node
        .post(
            "/api/v1/tenants",
            &json!({ "slug": "pisa", "name": "Comune di Pisa" }),
        )
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, body) = node
        .post(
            "/api/v1/tenants",
            &json!({ "slug": "pisa", "name": "again" }),
        )
        .unwrap();
    assert_eq!(status, 409, "{body}");
    let (status, body) = node
        .post(
            "/api/v1/tenants",
            &json!({ "slug": "Pisa Centro", "name": "x" }),
        )
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("slug"), "{body}");
    let (_, body) = node.get("/api/v1/tenants").unwrap();
    let slugs: BTreeSet<&str> = body["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["slug"].as_str())
        .collect();
    assert_eq!(slugs, BTreeSet::from(["default", "pisa"]));

    // Pisa's calls show Pisa's own number and name; a caller ID that would break a SIP header is refused.
    let (status, body) = node
        .put(
            "/api/v1/tenants/pisa/caller-id",
            &json!({ "number": "+390502211", "display_name": "Comune di Pisa" }),
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["caller_id"]["number"], "+390502211");
    let (status, body) = node
        .put(
            "/api/v1/tenants/pisa/caller-id",
            &json!({ "number": "+390502211", "display_name": "Pisa\"\r\nX-Evil: 1" }),
        )
        .unwrap();
    assert_eq!(status, 400, "{body}");

    // Subscribers: four in `default`, three in `pisa`, one number registered with both.
    node.register(1, 4).unwrap();
    let pisa_numbers = ["+393470000001", "+393470000101", "+393470000102"];
    for phone in pisa_numbers {
        assert_eq!(subscriber(&node, "pisa", phone)["tenant"], "pisa");
    }
    let (status, body) = node
        .post(
            "/api/v1/subscribers",
            &json!({ "phone": "+393470000101", "tenant": "pisa" }),
        )
        .unwrap();
    assert_eq!(status, 409, "the same number twice in one tenant: {body}");
    let (status, body) = node
        .post(
            "/api/v1/subscribers",
            &json!({ "phone": "+393470000201", "tenant": "lucca" }),
        )
        .unwrap();
    assert_eq!(status, 404, "{body}");

    // A recording: 2 s at 44.1 kHz stereo, stored as 8 kHz mono under its SHA-256.
    let (status, body) = node
        .post_bytes(
            "/api/v1/audio?tenant=pisa",
            "audio/wav",
            &tone_wav(44_100, 2, 2.0),
        )
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let sha = body["sha256"].as_str().unwrap().to_string();
    assert_eq!(sha.len(), 64);
    let ms = body["duration_ms"].as_u64().unwrap();
    assert!((1_990..=2_010).contains(&ms), "duration {ms} ms");
    let (status, body) = node
        .post_bytes(
            "/api/v1/audio?tenant=pisa",
            "audio/wav",
            b"RIFF but not really a wav",
        )
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("cannot be decoded"), "{body}");

    let campaign = |tenant: &str| {
        json!({
            "title": "Allerta registrata",
            "tenant": tenant,
            "message": { "recording": { "sha256": sha } },
            "audience": { "all": true },
            "priority": "urgent",
            "require_confirmation": true,
            "retry": { "max_attempts": 3, "busy_delay_s": 1.0, "no_answer_delay_s": 1.0, "failure_delay_s": 1.0 },
        })
    };
    // Another tenant cannot play `pisa`'s recording.
    let (status, body) = node
        .post("/api/v1/campaigns", &campaign("default"))
        .unwrap();
    assert_eq!(status, 404, "{body}");

    let (status, body) = node.post("/api/v1/campaigns", &campaign("pisa")).unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["message"]["recording"]["sha256"], sha.as_str());
    let id = body["id"].as_u64().unwrap();
    let (status, body) = node
        .post(&format!("/api/v1/campaigns/{id}/start"), &Value::Null)
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let done = node
        .wait_campaign_done(id, Duration::from_secs(120))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["targeted"], 3, "{done}");
    assert_eq!(done["counts"]["confirmed"], 3, "{done}");

    // The city was called on `pisa`'s numbers only, and each pressed 1 after hearing the message.
    let called: BTreeSet<String> = events_by_number(&city.events()).into_keys().collect();
    let expected: BTreeSet<String> = pisa_numbers.iter().map(|n| n.to_string()).collect();
    assert_eq!(called, expected);
    assert_eq!(numbers_that_pressed(&city.events()), expected);
    for e in city.events().iter().filter(|e| e["event"] == "invite") {
        let caller = e["caller"].as_str().unwrap_or_default();
        assert!(
            caller.contains("\"Comune di Pisa\"") && caller.contains("sip:+390502211@"),
            "the phone shows Pisa's caller ID: {e}"
        );
    }

    // The audit log: who did what, refusals included, no phone number.
    let audit = |node: &NodeProc, q: &str| -> Vec<Value> {
        let (status, body) = node.get(&format!("/api/v1/audit{q}")).unwrap();
        assert_eq!(status, 200, "{body}");
        body["entries"].as_array().unwrap().clone()
    };
    let pisa_log = audit(&node, "?tenant=pisa&limit=1000");
    let actions: Vec<(&str, &str)> = pisa_log
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["result"].as_str().unwrap()))
        .collect();
    let count = |action: &str, ok: bool| {
        actions
            .iter()
            .filter(|(a, r)| *a == action && (*r == "ok") == ok)
            .count()
    };
    assert_eq!(count("create_tenant", true), 1, "{actions:?}");
    assert_eq!(count("create_tenant", false), 1, "{actions:?}");
    assert_eq!(count("create_subscriber", true), 3, "{actions:?}");
    assert_eq!(count("create_subscriber", false), 1, "{actions:?}");
    assert_eq!(count("put_audio", true), 1, "{actions:?}");
    assert_eq!(count("create_campaign", true), 1, "{actions:?}");
    assert_eq!(count("start_campaign", true), 1, "{actions:?}");
    assert!(pisa_log
        .iter()
        .all(|e| e["actor"] == "token:admin token of node 1" && e["tenant"] == "pisa"));
    let everything = audit(&node, "?limit=1000");
    assert!(
        everything.iter().any(|e| e["tenant"] == "default"
            && e["action"] == "create_campaign"
            && e["result"]
                .as_str()
                .unwrap()
                .starts_with("refused: recording")),
        "{everything:?}"
    );
    let text = serde_json::to_string(&everything).unwrap();
    assert!(
        !text.contains("3470000101"),
        "a phone number in the audit log: {text}"
    );
    // Paging: `after` continues where a page ended.
    let page = audit(&node, "?limit=2");
    let rest = audit(&node, &format!("?after={}", page[1]["seq"]));
    assert_eq!(
        rest[0]["seq"].as_u64(),
        page[1]["seq"].as_u64().map(|s| s + 1)
    );

    // Everything is replicated state: it survives SIGKILL and a restart.
    node.kill();
    node.restart().unwrap();
    assert_eq!(audit(&node, "?limit=1000"), everything);
    let (_, body) = node.get("/api/v1/tenants").unwrap();
    assert_eq!(body["tenants"].as_array().unwrap().len(), 2);
}
