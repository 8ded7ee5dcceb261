//! Router tests against an in-memory engine built on the real domain state machine.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use campanile_cluster::*;
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::testkit::{exchange, FakeEngine, TOKEN};

fn app() -> axum::Router {
    crate::router(Arc::new(FakeEngine::new().with_drill(true)))
}

async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (StatusCode, Value, String) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let req = match body {
        Some(b) => req
            .header("Content-Type", "application/json")
            .body(Body::from(b.to_string()))
            .unwrap(),
        None => req.body(Body::empty()).unwrap(),
    };
    let a = exchange(app, req).await;
    (
        a.status,
        serde_json::from_str(&a.body).unwrap_or(Value::Null),
        a.body,
    )
}

async fn api(
    app: &axum::Router,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let body = body.map(|b| b.to_string());
    let (s, v, _) = call(app, method, path, body.as_deref(), Some(TOKEN)).await;
    (s, v)
}

fn assert_error(v: &Value, code: &str, mentions: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(mentions),
        "message `{msg}` does not mention `{mentions}`"
    );
}

#[tokio::test]
async fn an_import_keeps_the_good_lines_and_names_each_bad_one() {
    let app = app();
    let (s, _) = api(
        &app,
        "POST",
        "/api/v1/subscribers",
        Some(json!({"phone": "+393471111111"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = api(
        &app,
        "POST",
        "/api/v1/subscribers/import",
        Some(json!({"subscribers": [
            {"phone": "+393472222222", "language": "en"},
            {"phone": "not a number"},
            {"phone": "+393471111111"},
            {"phone": "+393473333333", "colour": "red"},
            {"phone": "+393474444444", "zone": "centro"},
        ]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["created"], 2, "{v}");
    assert_eq!(v["duplicates"][0]["item"], 3, "{v}");
    assert!(v["duplicates"][0]["error"]
        .as_str()
        .unwrap()
        .contains("subscriber 1"));
    assert_eq!(v["rejected"][0]["item"], 2, "{v}");
    assert!(v["rejected"][0]["error"]
        .as_str()
        .unwrap()
        .contains("phone"));
    assert_eq!(v["rejected"][1]["item"], 4, "{v}");
    assert!(v["rejected"][1]["error"]
        .as_str()
        .unwrap()
        .contains("colour"));
    // Larger than the one-subscriber limit, within the import limit.
    let many: Vec<Value> = (0..2_000)
        .map(|i| json!({"phone": format!("+39348{i:07}"), "name": "Maria Rossi"}))
        .collect();
    let (s, v) = api(
        &app,
        "POST",
        "/api/v1/subscribers/import",
        Some(json!({ "subscribers": many })),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["created"], 2_000);
    let too_many: Vec<Value> = (0..5_001).map(|_| json!({"phone": "1"})).collect();
    let (s, v) = api(
        &app,
        "POST",
        "/api/v1/subscribers/import",
        Some(json!({ "subscribers": too_many })),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "too_many", "at most 5000");
}

fn campaign_body() -> Value {
    json!({
        "title": "Allerta", "priority": "emergency", "audience": {"all": true},
        "message": {"tts": {"text": "Il fiume è in piena", "language": "it"}}
    })
}

#[tokio::test]
async fn subscriber_lifecycle_and_status_codes() {
    let app = app();
    let (s, v) = api(
        &app,
        "POST",
        "/api/v1/subscribers",
        Some(json!({"phone": "347 123 4567", "zone": "porto"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["phone"], "+393471234567");
    assert_eq!(v["language"], "it");
    let id = v["id"].as_u64().unwrap();
    let (s, _) = api(
        &app,
        "POST",
        "/api/v1/subscribers",
        Some(json!({"phone": "+39 347 1234567"})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, v) = api(&app, "GET", &format!("/api/v1/subscribers/{id}"), None).await;
    assert_eq!((s, v["zone"].clone()), (StatusCode::OK, json!("porto")));
    let (s, _) = api(&app, "DELETE", &format!("/api/v1/subscribers/{id}"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, v) = api(&app, "GET", &format!("/api/v1/subscribers/{id}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_error(&v, "not_found", "does not exist");
}

#[tokio::test]
async fn campaign_lifecycle_and_views() {
    let app = app();
    api(
        &app,
        "POST",
        "/api/v1/subscribers",
        Some(json!({"phone": "3471234567"})),
    )
    .await;
    let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(campaign_body())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["state"], "draft");
    assert_eq!(v["require_confirmation"], true);
    assert_eq!(v["retry"]["max_attempts"], 8);
    let id = v["id"].as_u64().unwrap();
    let (s, v) = api(&app, "POST", &format!("/api/v1/campaigns/{id}/start"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["state"], "running");
    assert_eq!(v["counts"]["targeted"], 1);
    assert_eq!(v["counts"]["pending"], 1);
    let (s, v) = api(&app, "POST", &format!("/api/v1/campaigns/{id}/start"), None).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_error(&v, "conflict", "running");
    let (_, tasks) = api(&app, "GET", &format!("/api/v1/campaigns/{id}/tasks"), None).await;
    assert_eq!(tasks[0]["state"], "pending");
    assert_eq!(tasks[0]["phone"], "+393471234567");
    let (s, v) = api(
        &app,
        "POST",
        &format!("/api/v1/campaigns/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(
        (s, v["state"].clone(), v["counts"]["cancelled"].clone()),
        (StatusCode::OK, json!("cancelled"), json!(1))
    );
    let (_, list) = api(&app, "GET", "/api/v1/campaigns", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn retry_overrides_are_bounded() {
    let app = app();
    let mut b = campaign_body();
    b["retry"] = json!({"max_attempts": 3, "busy_delay_s": 1.5});
    let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(b.clone())).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["retry"]["busy_delay_s"], 1.5);
    b["retry"] = json!({"max_attempts": 0});
    let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(b.clone())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "invalid_field", "retry.max_attempts");
    b["retry"] = json!({"no_answer_delay_s": -1});
    let (_, v) = api(&app, "POST", "/api/v1/campaigns", Some(b)).await;
    assert_error(&v, "invalid_field", "no_answer_delay_s");
}

#[tokio::test]
async fn bad_input_gets_a_json_error_naming_the_problem() {
    let app = app();
    let cases: Vec<(&str, &str, Value, StatusCode, &str, &str)> = vec![
        (
            "POST",
            "/api/v1/subscribers",
            json!({"phone": "hello"}),
            StatusCode::BAD_REQUEST,
            "invalid_phone",
            "phone",
        ),
        (
            "POST",
            "/api/v1/subscribers",
            json!({"phone": "+39 12"}),
            StatusCode::BAD_REQUEST,
            "invalid_phone",
            "phone",
        ),
        (
            "POST",
            "/api/v1/subscribers",
            json!({"phone": "3471234567", "nmae": "x"}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "nmae",
        ),
        (
            "POST",
            "/api/v1/subscribers",
            json!({"phone": 3471234567u64}),
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "phone",
        ),
        (
            "POST",
            "/api/v1/subscribers",
            json!({"phone": "3471234567", "language": "xx"}),
            StatusCode::BAD_REQUEST,
            "unsupported_language",
            "language",
        ),
        (
            "POST",
            "/api/v1/subscribers",
            json!({"phone": "3471234567", "zone": ""}),
            StatusCode::BAD_REQUEST,
            "invalid_field",
            "zone",
        ),
        (
            "GET",
            "/api/v1/subscribers/abc",
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "abc",
        ),
        (
            "GET",
            "/api/v1/campaigns/99",
            Value::Null,
            StatusCode::NOT_FOUND,
            "not_found",
            "99",
        ),
        (
            "POST",
            "/api/v1/campaigns/99/start",
            Value::Null,
            StatusCode::NOT_FOUND,
            "not_found",
            "99",
        ),
        (
            "GET",
            "/api/v1/nothing-here",
            Value::Null,
            StatusCode::NOT_FOUND,
            "not_found",
            "route",
        ),
    ];
    for (method, path, body, status, code, mentions) in cases {
        let body = (!body.is_null()).then_some(body);
        let (s, v) = api(&app, method, path, body).await;
        assert_eq!(s, status, "{method} {path}: {v}");
        assert_error(&v, code, mentions);
    }
    let mut b = campaign_body();
    for (field, value, mentions) in [
        ("title", json!(""), "title"),
        ("title", json!("x".repeat(201)), "title"),
        ("priority", json!("whenever"), "priority"),
        ("audience", json!({"zones": []}), "audience.zones"),
        ("audience", json!({"all": true, "zones": ["a"]}), "audience"),
        (
            "message",
            json!({"tts": {"text": "", "language": "it"}}),
            "message.tts.text",
        ),
        (
            "message",
            json!({"tts": {"text": "x".repeat(2001), "language": "it"}}),
            "message.tts.text",
        ),
        (
            "message",
            json!({"tts": {"text": "ciao", "language": "klingon"}}),
            "message.tts.language",
        ),
    ] {
        let saved = b[field].clone();
        b[field] = value;
        let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(b.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{field}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(mentions),
            "{field}: {v}"
        );
        b[field] = saved;
    }
}

#[tokio::test]
async fn malformed_json_oversize_bodies_and_wrong_content_type_are_refused() {
    let app = app();
    let (s, v, _) = call(
        &app,
        "POST",
        "/api/v1/subscribers",
        Some("{\"phone\": "),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["code"], "invalid_json");
    let big = format!("{{\"phone\": \"{}\"}}", "1".repeat(70_000));
    let (s, v, _) = call(&app, "POST", "/api/v1/subscribers", Some(&big), Some(TOKEN)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&v, "body_too_large", "64 KiB");
    // Routes with a larger limit name theirs.
    let big = format!("[{}]", "1".repeat(crate::IMPORT_BODY_LIMIT));
    let (s, v, _) = call(
        &app,
        "POST",
        "/api/v1/subscribers/import",
        Some(&big),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&v, "body_too_large", "4096 KiB");
    let big = "R".repeat(crate::api::AUDIO_BODY_LIMIT + 1);
    let (s, v, _) = call(
        &app,
        "POST",
        "/api/v1/audio?tenant=default",
        Some(&big),
        Some(TOKEN),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_error(&v, "body_too_large", "64 MiB upload limit");
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/subscribers")
        .header("Authorization", format!("Bearer {TOKEN}"))
        .header("Content-Type", "text/plain")
        .body(Body::from("{\"phone\":\"3471234567\"}"))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Nothing half-written: no subscriber exists after all those refusals.
    let (s, _) = api(&app, "GET", "/api/v1/subscribers/1", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn api_routes_require_the_bearer_token() {
    let app = app();
    let (s, v, _) = call(&app, "GET", "/api/v1/campaigns", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "missing_token");
    let (s, v, text) = call(&app, "GET", "/api/v1/campaigns", None, Some("wrong-token")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "bad_token");
    assert!(
        !text.contains("wrong-token"),
        "the presented token is echoed back"
    );
    let req = Request::builder()
        .uri("/api/v1/campaigns")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert!(resp.headers().contains_key("www-authenticate"));
    // Health, metrics and the page are public.
    assert_eq!(
        call(&app, "GET", "/healthz", None, None).await.0,
        StatusCode::OK
    );
    let (s, _, text) = call(&app, "GET", "/metrics", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(text.contains("campanile_up 1"));
}

/// Console, sessions, CSRF and the authorization matrix.
#[path = "tests_console.rs"]
mod console;

#[tokio::test]
async fn quiet_hours_are_set_as_local_times_checked_and_cleared() {
    let app = app();
    let path = "/api/v1/tenants/default/quiet-hours";
    let (s, v) = api(
        &app,
        "PUT",
        path,
        Some(json!({"start": "22:00", "end": "07:30"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["quiet_hours"], json!({"start": "22:00", "end": "07:30"}));
    let (_, tenants) = api(&app, "GET", "/api/v1/tenants", None).await;
    let default = tenants["tenants"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["slug"] == "default"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(default["quiet_hours"]["start"], "22:00", "{tenants}");
    for (body, mentions) in [
        (json!({"start": "24:00", "end": "07:00"}), "`start`"),
        (json!({"start": "22:00", "end": "7:00"}), "`end`"),
        (json!({"start": "08:00", "end": "08:00"}), "empty window"),
    ] {
        let (s, v) = api(&app, "PUT", path, Some(body.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert_error(&v, "invalid_field", mentions);
    }
    let (s, _) = api(
        &app,
        "PUT",
        "/api/v1/tenants/nowhere/quiet-hours",
        Some(json!({"start": "22:00", "end": "07:00"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = api(&app, "DELETE", path, None).await;
    assert_eq!((s, v["quiet_hours"].clone()), (StatusCode::OK, Value::Null));
}

#[tokio::test]
async fn an_emergency_rings_until_its_deadline_by_default_and_the_schedule_can_be_set() {
    let app = app();
    let mut b = campaign_body();
    b["priority"] = json!("emergency");
    let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(b.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        (
            v["retry"]["quick_retries"].clone(),
            v["retry"]["quick_delay_s"].clone(),
            v["retry"]["until_deadline"].clone()
        ),
        (json!(2), json!(15.0), json!(true)),
        "{v}"
    );
    b["retry"] = json!({"quick_retries": 3, "quick_delay_s": 5, "until_deadline": false});
    let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(b.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["retry"]["quick_retries"], 3);
    assert_eq!(v["retry"]["until_deadline"], false);
    b["retry"] = json!({"quick_retries": 11});
    let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(b)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "invalid_field", "retry.quick_retries");
}
