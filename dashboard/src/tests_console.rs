//! The console behind its login: sessions, CSRF, the two-person rule, and every API route × every
//! role × own and other tenant. The engine is `testkit::FakeEngine`, on the real state machine.

use super::*;
use crate::auth;
use crate::testkit::{operator, operator_account, post_with, send};

/// A fake with two comuni (pisa, lucca) plus siena for the regional account.
fn seeded() -> Arc<FakeEngine> {
    let engine = Arc::new(FakeEngine::new().with_drill(true));
    for slug in ["pisa", "lucca", "siena"] {
        engine.tenant(slug, &format!("Comune di {slug}"));
    }
    engine
}

async fn json_as(
    app: &axum::Router,
    method: &str,
    path: &str,
    who: &(String, String),
    body: Option<Value>,
) -> (StatusCode, Value) {
    let (s, _, text) = send(
        app,
        method,
        path,
        Some(&who.0),
        Some(&who.1),
        body.map(|b| Body::from(b.to_string())),
        "application/json",
    )
    .await;
    (s, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn city_wide(tenant: &str) -> Value {
    json!({
        "title": "Allerta piena", "tenant": tenant,
        "message": {"tts": {"text": "Il fiume è in piena", "language": "it"}},
        "audience": {"all": true}, "priority": "urgent",
    })
}

#[tokio::test]
async fn pages_behind_the_login_redirect_and_the_login_form_opens_a_session() {
    let engine = seeded();
    engine.add_operator(Operator {
        display_name: "Il Sindaco".into(),
        password_hash: auth::hash_password("una password lunga").unwrap(),
        ..operator_account("sindaco", Role::Operator, &["pisa"])
    });
    let app = crate::router(engine.clone());
    let (s, h, _) = send(&app, "GET", "/", None, None, None, "").await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(h["location"], "/login");

    // The login form sets a pre-login token; a post without it is refused.
    let (s, h, html) = send(&app, "GET", "/login", None, None, None, "").await;
    assert_eq!(s, StatusCode::OK);
    let login_cookie = h["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let token = login_cookie.split('=').nth(1).unwrap().to_string();
    assert!(html.contains(&token));
    let form = |pw: &str, tok: &str| {
        Body::from(format!(
            "username=sindaco&password={}&login_token={tok}",
            pw.replace(' ', "+")
        ))
    };
    let urlenc = "application/x-www-form-urlencoded";
    let (s, _, _) = send(
        &app,
        "POST",
        "/login",
        None,
        None,
        Some(form("una password lunga", &token)),
        urlenc,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "no pre-login cookie");

    let (s, _, html) = send(
        &app,
        "POST",
        "/login",
        Some(&login_cookie),
        None,
        Some(form("sbagliata", &token)),
        urlenc,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(html.contains("Wrong username, password or code"));

    let (s, h, _) = send(
        &app,
        "POST",
        "/login",
        Some(&login_cookie),
        None,
        Some(form("una password lunga", &token)),
        urlenc,
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let set = h["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert!(!set.contains("Secure"), "plain HTTP: no Secure flag");
    let session = set.split(';').next().unwrap().to_string();

    let (s, _, html) = send(&app, "GET", "/", Some(&session), None, None, "").await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("Il Sindaco") && html.contains("DRILL MODE"));

    // Behind a TLS proxy the cookie is Secure.
    let mut req = Request::builder().method("POST").uri("/login");
    req = req
        .header("Cookie", &login_cookie)
        .header("X-Forwarded-Proto", "https")
        .header("Content-Type", urlenc);
    let resp = app
        .clone()
        .oneshot(req.body(form("una password lunga", &token)).unwrap())
        .await
        .unwrap();
    assert!(resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Secure"));
}

#[tokio::test]
async fn five_wrong_passwords_lock_the_account_on_this_node() {
    let engine = seeded();
    let app = crate::router(engine.clone());
    let (_, h, html) = send(&app, "GET", "/login", None, None, None, "").await;
    let login_cookie = h["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let token = login_cookie.split('=').nth(1).unwrap().to_string();
    assert!(html.contains(&token));
    let urlenc = "application/x-www-form-urlencoded";
    for _ in 0..auth::MAX_FAILURES {
        let body = Body::from(format!("username=nessuno&password=x&login_token={token}"));
        let (s, _, _) = send(
            &app,
            "POST",
            "/login",
            Some(&login_cookie),
            None,
            Some(body),
            urlenc,
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    let body = Body::from(format!("username=nessuno&password=x&login_token={token}"));
    let (s, _, html) = send(
        &app,
        "POST",
        "/login",
        Some(&login_cookie),
        None,
        Some(body),
        urlenc,
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert!(html.contains("Too many failed logins"), "{html}");
}

#[tokio::test]
async fn a_session_needs_its_own_csrf_token_to_change_anything() {
    let engine = seeded();
    let app = crate::router(engine.clone());
    let a = operator(&engine, "anna", Role::Operator, &["pisa"]);
    let b = operator(&engine, "bruno", Role::Operator, &["pisa"]);
    let body = || Some(Body::from(city_wide("pisa").to_string()));
    let j = "application/json";
    // Reads need no token; writes do, and only the session's own.
    let (s, _, _) = send(&app, "GET", "/api/v1/campaigns", Some(&a.0), None, None, j).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, text) = send(
        &app,
        "POST",
        "/api/v1/campaigns",
        Some(&a.0),
        None,
        body(),
        j,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{text}");
    assert!(text.contains("\"csrf\""));
    let (s, _, _) = send(
        &app,
        "POST",
        "/api/v1/campaigns",
        Some(&a.0),
        Some(&b.1),
        body(),
        j,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "another session's token");
    let (s, _, _) = send(
        &app,
        "POST",
        "/api/v1/campaigns",
        Some(&a.0),
        Some(&a.1),
        body(),
        j,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    // Console forms carry it as a field.
    let form = "application/x-www-form-urlencoded";
    let (s, _, _) = send(
        &app,
        "POST",
        "/campaigns/1/cancel",
        Some(&a.0),
        None,
        Some(Body::from("csrf=")),
        form,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // After logout the cookie and its token are dead: a replay is refused.
    let (s, _, _) = send(
        &app,
        "POST",
        "/logout",
        Some(&a.0),
        None,
        Some(Body::from(format!("csrf={}", a.1))),
        form,
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (s, _, _) = send(
        &app,
        "POST",
        "/api/v1/campaigns",
        Some(&a.0),
        Some(&a.1),
        body(),
        j,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, h, _) = send(
        &app,
        "POST",
        "/campaigns/1/cancel",
        Some(&a.0),
        None,
        Some(Body::from(format!("csrf={}", a.1))),
        form,
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(h["location"], "/login");
    assert_eq!(
        engine.campaign_now(CampaignId(1)).unwrap().state,
        CampaignState::Draft
    );
}

#[tokio::test]
async fn a_city_wide_alert_waits_for_a_second_person() {
    let engine = seeded();
    let app = crate::router(engine.clone());
    let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
    let approver = operator(&engine, "carla", Role::Approver, &["pisa"]);
    let lone_approver = operator(&engine, "dario", Role::Approver, &["pisa"]);
    let (s, c) = json_as(
        &app,
        "POST",
        "/api/v1/campaigns",
        &op,
        Some(city_wide("pisa")),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(c["approval"]["state"], "pending");
    assert_eq!(c["created_by"], "anna");
    let (s, v) = json_as(&app, "POST", "/api/v1/campaigns/1/start", &op, None).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("approval"));
    // An operator cannot approve; an approver cannot approve their own.
    let (s, _) = json_as(&app, "POST", "/api/v1/campaigns/1/approve", &op, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let mut own = city_wide("pisa");
    own["title"] = json!("Mia");
    json_as(&app, "POST", "/api/v1/campaigns", &lone_approver, Some(own)).await;
    let (s, v) = json_as(
        &app,
        "POST",
        "/api/v1/campaigns/2/approve",
        &lone_approver,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    // Automation cannot approve either.
    let (s, _) = api(&app, "POST", "/api/v1/campaigns/1/approve", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Through the console form, a second person approves; then it starts.
    let form = "application/x-www-form-urlencoded";
    let (s, h, _) = send(
        &app,
        "POST",
        "/campaigns/1/approve",
        Some(&approver.0),
        None,
        Some(Body::from(format!("csrf={}", approver.1))),
        form,
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert!(h["location"].to_str().unwrap().contains("done="));
    let (s, v) = json_as(&app, "POST", "/api/v1/campaigns/1/start", &op, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // An emergency may start on an override with a logged reason; an urgent one may not.
    let mut emergency = json!({
        "title": "Frana", "tenant": "pisa",
        "message": {"tts": {"text": "Evacuare", "language": "it"}},
        "audience": {"zones": ["colle"]}, "priority": "emergency",
    });
    let (_, c) = json_as(
        &app,
        "POST",
        "/api/v1/campaigns",
        &op,
        Some(emergency.clone()),
    )
    .await;
    let id = c["id"].as_u64().unwrap();
    assert_eq!(c["approval"]["state"], "pending");
    let (s, _) = json_as(
        &app,
        "POST",
        &format!("/api/v1/campaigns/{id}/override"),
        &op,
        Some(json!({"reason": "short"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, v) = json_as(
        &app,
        "POST",
        &format!("/api/v1/campaigns/{id}/override"),
        &op,
        Some(json!({"reason": "frana in corso, nessun approvatore"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["approval"]["state"], "overridden");
    let (s, _) = json_as(
        &app,
        "POST",
        "/api/v1/campaigns/2/override",
        &op,
        Some(json!({"reason": "frana in corso, nessun approvatore"})),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::CONFLICT,
        "campaign 2 is urgent, not an emergency"
    );
    // Zones and urgent from an operator: no approval needed. From a token: never.
    emergency["priority"] = json!("urgent");
    let (_, c) = json_as(&app, "POST", "/api/v1/campaigns", &op, Some(emergency)).await;
    assert_eq!(c["approval"]["state"], "not_needed");
    let (_, c) = api(&app, "POST", "/api/v1/campaigns", Some(city_wide("pisa"))).await;
    assert_eq!(c["approval"]["state"], "not_needed");
}

#[tokio::test]
async fn script_in_a_title_is_shown_as_text_in_the_console() {
    let engine = seeded();
    let app = crate::router(engine.clone());
    let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
    let mut b = city_wide("pisa");
    b["title"] = json!("<script>alert('x')</script>");
    json_as(&app, "POST", "/api/v1/campaigns", &op, Some(b)).await;
    for path in ["/", "/campaigns/1"] {
        let (s, _, html) = send(&app, "GET", path, Some(&op.0), None, None, "").await;
        assert_eq!(s, StatusCode::OK);
        assert!(!html.contains("<script>alert"), "{path}: {html}");
        assert!(html.contains("&#60;script&#62;alert("), "{path}: {html}");
        assert!(html.contains("DRILL MODE"));
    }
}

/// One API route for the matrix: how to call it for a tenant, and what it needs.
struct RouteCase {
    method: &'static str,
    path: String,
    body: Option<Value>,
    needs: auth::Action,
    /// Whether an operator of another tenant must get 404 (the thing belongs to a tenant).
    tenant_scoped: bool,
}

/// Every API route, pointed at `tenant`'s data: `campaign` and `subscriber` are ids in it.
fn routes(tenant: &str, campaign: u64, subscriber: u64) -> Vec<RouteCase> {
    use auth::Action::*;
    let c = |m: &'static str, p: String, b: Option<Value>, needs, scoped| RouteCase {
        method: m,
        path: p,
        body: b,
        needs,
        tenant_scoped: scoped,
    };
    vec![
        c(
            "POST",
            "/api/v1/subscribers".into(),
            Some(json!({"phone": "+393479999999", "tenant": tenant})),
            Operate,
            true,
        ),
        c(
            "POST",
            "/api/v1/subscribers/import".into(),
            Some(json!({"subscribers": [{"phone": "+393479999998", "tenant": tenant}]})),
            Operate,
            false,
        ),
        c(
            "GET",
            format!("/api/v1/subscribers/{subscriber}"),
            None,
            Read,
            true,
        ),
        c(
            "GET",
            format!("/api/v1/subscribers?tenant={tenant}&q=347"),
            None,
            Read,
            true,
        ),
        c(
            "PUT",
            format!("/api/v1/tenants/{tenant}/caller-id"),
            Some(json!({"number": "+390502211", "display_name": "Comune"})),
            Administer,
            true,
        ),
        c(
            "PUT",
            format!("/api/v1/tenants/{tenant}/quiet-hours"),
            Some(json!({"start": "22:00", "end": "07:00"})),
            Administer,
            true,
        ),
        c(
            "DELETE",
            format!("/api/v1/tenants/{tenant}/quiet-hours"),
            None,
            Administer,
            true,
        ),
        c(
            "PATCH",
            format!("/api/v1/subscribers/{subscriber}"),
            Some(json!({"zone": "collina"})),
            Operate,
            true,
        ),
        c(
            "DELETE",
            format!("/api/v1/subscribers/{subscriber}"),
            None,
            Operate,
            true,
        ),
        c(
            "POST",
            "/api/v1/campaigns".into(),
            Some(
                json!({"title": "t", "tenant": tenant, "message": {"tts": {"text": "x", "language": "it"}}, "audience": {"zones": ["z"]}, "priority": "info"}),
            ),
            Operate,
            true,
        ),
        c("GET", "/api/v1/campaigns".into(), None, Read, false),
        c(
            "GET",
            format!("/api/v1/campaigns/{campaign}"),
            None,
            Read,
            true,
        ),
        c(
            "GET",
            format!("/api/v1/campaigns/{campaign}/tasks"),
            None,
            Read,
            true,
        ),
        c(
            "POST",
            format!("/api/v1/campaigns/{campaign}/start"),
            None,
            Operate,
            true,
        ),
        c(
            "POST",
            format!("/api/v1/campaigns/{campaign}/pause"),
            None,
            Operate,
            true,
        ),
        c(
            "POST",
            format!("/api/v1/campaigns/{campaign}/resume"),
            None,
            Operate,
            true,
        ),
        c(
            "POST",
            format!("/api/v1/campaigns/{campaign}/cancel"),
            None,
            Operate,
            true,
        ),
        c(
            "POST",
            format!("/api/v1/campaigns/{campaign}/approve"),
            None,
            Approve,
            true,
        ),
        c(
            "POST",
            format!("/api/v1/campaigns/{campaign}/override"),
            Some(json!({"reason": "a reason long enough"})),
            Operate,
            true,
        ),
        c("GET", "/api/v1/cluster".into(), None, Read, false),
        c(
            "DELETE",
            "/api/v1/cluster/members/9".into(),
            None,
            System,
            false,
        ),
        c("GET", "/api/v1/backup".into(), None, System, false),
        c("GET", "/api/v1/tenants".into(), None, Read, false),
        c(
            "POST",
            "/api/v1/tenants".into(),
            Some(json!({"slug": "nuovo", "name": "Nuovo"})),
            System,
            false,
        ),
        c(
            "GET",
            format!("/api/v1/audit?tenant={tenant}"),
            None,
            Audit,
            true,
        ),
        c("GET", "/api/v1/operators".into(), None, Audit, false),
        c(
            "POST",
            "/api/v1/operators".into(),
            Some(
                json!({"username": format!("nuovo-{tenant}"), "role": "viewer", "tenants": [tenant], "password": "una password lunga"}),
            ),
            Administer,
            true,
        ),
        c("GET", "/api/v1/session".into(), None, Read, false),
        c("GET", "/api/v1/tokens".into(), None, Administer, false),
        c(
            "POST",
            "/api/v1/tokens".into(),
            Some(json!({"label": "script", "role": "operator", "tenants": [tenant]})),
            Administer,
            true,
        ),
    ]
}

#[tokio::test]
async fn every_api_route_for_every_role_in_its_own_and_another_tenant() {
    let roles = [
        ("admin", Role::Admin),
        ("approver", Role::Approver),
        ("operator", Role::Operator),
        ("viewer", Role::Viewer),
        ("regional", Role::Regional),
    ];
    let mut checked = 0;
    for (name, role) in roles {
        for own in [true, false] {
            // A fresh cluster per cell, so one call's effect does not change the next one's answer.
            let cases = routes(if own { "pisa" } else { "lucca" }, 1, 1).len();
            for i in 0..cases {
                let engine = seeded();
                let app = crate::router(engine.clone());
                let tenants: &[&str] = if role == Role::Regional {
                    &["pisa", "siena"]
                } else {
                    &["pisa"]
                };
                let who = operator(&engine, name, role, tenants);
                let tenant = if own { "pisa" } else { "lucca" };
                // The tenant's data: a subscriber and a campaign created by someone else.
                let (_, s) = api(
                    &app,
                    "POST",
                    "/api/v1/subscribers",
                    Some(json!({"phone": "+393471000001", "tenant": tenant})),
                )
                .await;
                let mut body = city_wide(tenant);
                body["priority"] = json!("emergency");
                let author = operator(
                    &engine,
                    &format!("autore-{name}"),
                    Role::Operator,
                    &[tenant],
                );
                let (_, c) = json_as(&app, "POST", "/api/v1/campaigns", &author, Some(body)).await;
                let case = &routes(tenant, c["id"].as_u64().unwrap(), s["id"].as_u64().unwrap())[i];
                let (status, v) =
                    json_as(&app, case.method, &case.path, &who, case.body.clone()).await;
                let allowed = auth::role_may(role, case.needs);
                let cell = format!(
                    "{name} {} {} ({} tenant): {status} {v}",
                    case.method,
                    case.path,
                    if own { "own" } else { "other" }
                );
                if !own && case.tenant_scoped {
                    assert_eq!(status, StatusCode::NOT_FOUND, "{cell}");
                } else if !allowed {
                    assert_eq!(status, StatusCode::FORBIDDEN, "{cell}");
                    assert_eq!(v["error"]["code"], "forbidden", "{cell}");
                } else {
                    // The fake has no cluster view: it answers 503, past the checks.
                    let fake_gap =
                        status == StatusCode::SERVICE_UNAVAILABLE && case.path == "/api/v1/cluster";
                    assert!(
                        status.is_success() || status == StatusCode::CONFLICT || fake_gap,
                        "{cell}"
                    );
                    // Lists show only the caller's tenants.
                    if case.method == "GET" && case.path == "/api/v1/campaigns" {
                        assert_eq!(v.as_array().unwrap().len(), usize::from(own), "{cell}");
                    }
                    if case.path.starts_with("/api/v1/subscribers?") {
                        assert_eq!(v["total"], 1, "{cell}");
                    }
                    if case.path == "/api/v1/subscribers/import" && !own {
                        assert_eq!(v["created"], 0, "{cell}");
                    }
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 5 * 2 * routes("x", 1, 1).len());
}

#[tokio::test]
async fn a_campaign_can_be_scheduled_but_not_in_the_past_or_months_ahead() {
    let engine = seeded();
    let app = crate::router(engine.clone());
    let now = auth::now_ms();
    let mut body = city_wide("pisa");
    body["not_before_ms"] = json!(now + 3_600_000);
    let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(body.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["not_before_ms"], now + 3_600_000);
    body["not_before_ms"] = json!(now - 3_600_000);
    let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(body.clone())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "invalid_field", "in the past");
    body["not_before_ms"] = json!(now + 40 * 24 * 3_600_000);
    let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(body)).await;
    assert_error(&v, "invalid_field", "31 days");
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // A deadline must come after the start.
    let mut body = city_wide("pisa");
    body["not_before_ms"] = json!(now + 3_600_000);
    body["deadline_ms"] = json!(now + 1_800_000);
    let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(body.clone())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_error(&v, "invalid_field", "after the start");
    body["deadline_ms"] = json!(now + 7_200_000);
    let (s, v) = api(&app, "POST", "/api/v1/campaigns", Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["deadline_ms"], now + 7_200_000);
    // The console's form takes Italian local time.
    let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
    let (s, _, html) = post_with(
        &app,
        "/campaigns/new",
        &op.0,
        &[
            ("csrf", op.1.as_str()),
            ("tenant", "pisa"),
            ("title", "Prova"),
            ("message_kind", "tts"),
            ("text", "Ciao"),
            ("language", "it"),
            ("audience", "zones"),
            ("zones", "colle"),
            ("priority", "info"),
            ("retry", "standard"),
            ("schedule", "2020-01-01T10:00"),
        ],
    )
    .await
    .into_parts();
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(html.contains("Schedule a time from now"), "{html}");
}

#[tokio::test]
async fn an_automation_token_has_a_role_in_its_tenants_and_can_be_revoked() {
    let engine = seeded();
    let app = crate::router(engine.clone());
    let admin = operator(&engine, "amministratore", Role::Admin, &["pisa"]);
    let (s, t) = json_as(
        &app,
        "POST",
        "/api/v1/tokens",
        &admin,
        Some(json!({"label": "anagrafe", "role": "operator"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    assert_eq!(t["tenants"], json!(["pisa"]));
    assert_eq!(t["created_by"], "amministratore");
    let secret = t["token"].as_str().unwrap().to_string();
    // Its secret is shown once: the list has the id, never the secret.
    let (_, list) = json_as(&app, "GET", "/api/v1/tokens", &admin, None).await;
    assert!(!list.to_string().contains(&secret), "{list}");
    assert_eq!(
        list["tokens"].as_array().unwrap().len(),
        1,
        "node admin tokens are not the tenant's: {list}"
    );
    // It works as an operator of pisa: create there, nothing in lucca, no approvals, no tokens.
    let (s, v, _) = call(
        &app,
        "POST",
        "/api/v1/campaigns",
        Some(&city_wide("pisa").to_string()),
        Some(&secret),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(
        v["approval"]["state"], "pending",
        "a comune's token cannot sidestep the two-person rule"
    );
    let (s, _, _) = call(
        &app,
        "POST",
        "/api/v1/campaigns",
        Some(&city_wide("lucca").to_string()),
        Some(&secret),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = call(&app, "GET", "/api/v1/tokens", None, Some(&secret)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = call(&app, "GET", "/api/v1/backup", None, Some(&secret)).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // An admin cannot make a token for a tenant it does not serve, nor a regional one.
    let (s, _) = json_as(
        &app,
        "POST",
        "/api/v1/tokens",
        &admin,
        Some(json!({"label": "x", "role": "operator", "tenants": ["lucca"]})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = json_as(
        &app,
        "POST",
        "/api/v1/tokens",
        &admin,
        Some(json!({"label": "x", "role": "regional"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Revoked, it stops working.
    let id = t["id"].as_str().unwrap().to_string();
    let (s, _) = json_as(
        &app,
        "DELETE",
        &format!("/api/v1/tokens/{id}"),
        &admin,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _, _) = call(&app, "GET", "/api/v1/campaigns", None, Some(&secret)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn with_the_second_factor_on_a_login_needs_a_fresh_code_and_each_code_works_once() {
    let engine = seeded();
    let secret = crate::totp::new_secret();
    engine.add_operator(Operator {
        display_name: "Il Sindaco".into(),
        password_hash: auth::hash_password("una password lunga").unwrap(),
        totp_secret: Some(secret.clone()),
        ..operator_account("sindaco", Role::Operator, &["pisa"])
    });
    let app = crate::router(engine.clone());
    let (_, h, _) = send(&app, "GET", "/login", None, None, None, "").await;
    let login_cookie = h["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let token = login_cookie.split('=').nth(1).unwrap().to_string();
    let urlenc = "application/x-www-form-urlencoded";
    let attempt = |code: String| {
        Body::from(format!(
            "username=sindaco&password=una+password+lunga&login_token={token}&totp={code}"
        ))
    };
    // The right password alone is not enough, and the page does not say which part was wrong.
    let (s, _, html) = send(
        &app,
        "POST",
        "/login",
        Some(&login_cookie),
        None,
        Some(attempt(String::new())),
        urlenc,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(html.contains("Wrong username, password or code"));
    let (s, _, _) = send(
        &app,
        "POST",
        "/login",
        Some(&login_cookie),
        None,
        Some(attempt("000000".into())),
        urlenc,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let code = crate::totp::code_at(&secret, auth::now_ms() / 1000).unwrap();
    let (s, _, _) = send(
        &app,
        "POST",
        "/login",
        Some(&login_cookie),
        None,
        Some(attempt(code.clone())),
        urlenc,
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    // The same code again is refused (it could have been seen over a shoulder).
    let (s, _, _) = send(
        &app,
        "POST",
        "/login",
        Some(&login_cookie),
        None,
        Some(attempt(code)),
        urlenc,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // An admin can turn a lost second factor off.
    let (s, v) = api(
        &app,
        "PATCH",
        "/api/v1/operators/sindaco",
        Some(json!({"reset_totp": true})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["totp"], false);
}

#[tokio::test]
async fn a_link_cannot_put_words_of_its_own_on_the_campaign_page() {
    let engine = seeded();
    let app = crate::router(engine.clone());
    let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
    json_as(
        &app,
        "POST",
        "/api/v1/campaigns",
        &op,
        Some(city_wide("pisa")),
    )
    .await;
    let (s, _, html) = send(
        &app,
        "GET",
        "/campaigns/1?done=started",
        Some(&op.0),
        None,
        None,
        "",
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("Started: the calls are going out."));
    for q in ["done=Call+0123+456+now", "error=Your+account+is+blocked"] {
        let (s, _, html) = send(
            &app,
            "GET",
            &format!("/campaigns/1?{q}"),
            Some(&op.0),
            None,
            None,
            "",
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{q}");
        assert!(
            !html.contains("0123") && !html.contains("blocked"),
            "{q}: {html}"
        );
    }
    // A refused action shows the page again with the reason, without a redirect carrying it.
    let (s, _, html) = post_with(
        &app,
        "/campaigns/1/start",
        &op.0,
        &[("csrf", op.1.as_str())],
    )
    .await
    .into_parts();
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(html.contains("approval"), "{html}");
}
