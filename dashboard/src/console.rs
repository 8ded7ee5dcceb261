//! The operator console: server-rendered pages behind a login.
//!
//! Every page is an askama template (checked at compile time, HTML-escaped by default); the little
//! JavaScript there is (`/static/console.js`) adds live counters over server-sent events, the
//! listen-preview and the WAV upload, and the console works for reading and acting without it.
//! Forms post back here with the session's CSRF token in a hidden field; actions go through the same
//! checks as the JSON API (`api::act_on_campaign` and friends), so the console can do nothing the
//! API would refuse.

use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use campanile_cluster::{
    Approval, Audience, Campaign, CampaignSpec, CampaignState, Message, Priority, RetryPolicy,
    TaskState,
};
use serde::Deserialize;

use crate::api::{AppState, CampaignAction};
use crate::auth::{self, Action, LoginThrottle, Principal};
use crate::error::ApiError;

/// The console's routes (the login page and the pages behind it).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(campaigns_page))
        .route("/login", get(login_page).post(login_submit))
        .route("/logout", post(logout))
        .route("/campaigns/new", get(compose_page).post(compose_submit))
        .route("/campaigns/{id}", get(campaign_page))
        .route("/campaigns/{id}/events", get(campaign_events))
        .route("/campaigns/{id}/report.csv", get(campaign_report))
        .route("/campaigns/{id}/{action}", post(campaign_action))
        .route("/cluster", get(cluster_page))
        .route("/static/campanile.css", get(stylesheet))
        .route("/static/console.js", get(script))
}

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("../static/campanile.css"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        include_str!("../static/console.js"),
    )
}

/// A logged-in operator (or the node's token holder cannot use the console: it has no password).
/// Pages without a live session redirect to `/login`.
pub struct Console(pub Principal);

impl FromRequestParts<AppState> for Console {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, engine: &AppState) -> Result<Self, Response> {
        match auth::session_principal(&**engine, &parts.headers).await {
            Some(p) => Ok(Console(p)),
            None => Err(Redirect::to("/login").into_response()),
        }
    }
}

/// Console requests act as the logged-in operator: whatever they change lands in the audit log
/// under the operator's name, as API calls do under their token's.
pub async fn as_operator(
    State(engine): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match auth::session_principal(&*engine, req.headers()).await {
        Some(p) => crate::engine::ACTOR.scope(p.actor(), next.run(req)).await,
        None => next.run(req).await,
    }
}

/// A console form axum could not read: too large (naming the page's `limit`), or not a form.
pub(crate) fn form_refused(r: &axum::extract::rejection::FormRejection, limit: usize) -> ApiError {
    let status = r.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "The form is larger than the {} KiB this page accepts: send long lists in parts.",
            limit / 1024
        )
    } else {
        "The form could not be read. Reload the page and try again.".to_string()
    };
    ApiError::new(status, "invalid_form", message)
}

/// What every console POST checks first: the form could be read (within the page's `limit`) and
/// carries this session's CSRF token (`csrf` picks it out). `Err` is the page to answer with.
pub(crate) fn checked_form<T>(
    engine: &AppState,
    who: &Principal,
    form: Result<Form<T>, axum::extract::rejection::FormRejection>,
    limit: usize,
    csrf: impl Fn(&T) -> &str,
) -> Result<T, Box<Response>> {
    let form = match form {
        Ok(Form(f)) => f,
        Err(r) => return Err(Box::new(error_page(engine, who, form_refused(&r, limit)))),
    };
    check_form_csrf(who, csrf(&form)).map_err(|e| Box::new(error_page(engine, who, e)))?;
    Ok(form)
}

/// Renders a template, or a plain 500 naming the failure.
fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "a console template failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered; see the node's log",
            )
                .into_response()
        }
    }
}

pub(crate) fn render_status(status: StatusCode, t: &impl Template) -> Response {
    let mut r = render(t);
    if r.status() == StatusCode::OK {
        *r.status_mut() = status;
    }
    r
}

/// What every console page shows in its header.
pub struct Chrome {
    pub drill: Option<String>,
    pub display_name: String,
    pub role: &'static str,
    pub csrf: String,
    pub current: &'static str,
    pub may_operate: bool,
}

pub(crate) fn chrome(engine: &AppState, who: &Principal, current: &'static str) -> Chrome {
    let (display_name, role, csrf) = match who {
        Principal::Operator {
            display_name,
            role,
            csrf,
            ..
        } => (display_name.clone(), auth::role_name(*role), csrf.clone()),
        Principal::Token { label, .. } => (label.clone(), "token", String::new()),
    };
    Chrome {
        drill: engine.drill_mode(),
        display_name,
        role,
        csrf,
        current,
        may_operate: who.may(Action::Operate),
    }
}

// ---- login ----

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    drill: Option<String>,
    error: Option<String>,
    username: String,
    login_token: String,
}

const LOGIN_COOKIE: &str = "campanile_login";

/// `GET /login`. A pre-login token (cookie + hidden field) keeps other sites from logging a browser
/// into an account of theirs.
async fn login_page(State(engine): State<AppState>, headers: HeaderMap) -> Response {
    if auth::session_principal(&*engine, &headers).await.is_some() {
        return Redirect::to("/").into_response();
    }
    login_form(&engine, &headers, StatusCode::OK, None, String::new())
}

fn login_form(
    engine: &AppState,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<String>,
    username: String,
) -> Response {
    let token = auth::new_secret();
    let secure = auth::over_https(headers, engine.public_url().as_deref());
    let mut r = render_status(
        status,
        &LoginPage {
            drill: engine.drill_mode(),
            error,
            username,
            login_token: token.clone(),
        },
    );
    if let Ok(v) = format!(
        "{LOGIN_COOKIE}={token}; Path=/login; HttpOnly; SameSite=Strict; Max-Age=3600{}",
        if secure { "; Secure" } else { "" }
    )
    .parse()
    {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
    login_token: String,
    /// The second factor's code, for operators who turned it on.
    #[serde(default)]
    totp: String,
}

/// The TCP peer of the request, when the server records it (`serve` does).
pub struct PeerAddr(pub Option<std::net::SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(PeerAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// The client address for throttling: the TCP peer. `X-Forwarded-For` is not believed (anyone can
/// send it); behind a reverse proxy every client shares the proxy's address, and the per-username
/// lock still holds.
fn client_address(peer: Option<std::net::SocketAddr>) -> String {
    peer.map(|a| a.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

async fn login_submit(
    State(engine): State<AppState>,
    Extension(throttle): Extension<std::sync::Arc<LoginThrottle>>,
    PeerAddr(peer): PeerAddr,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return login_form(
            &engine,
            &headers,
            StatusCode::BAD_REQUEST,
            Some("Fill in the username and the password.".into()),
            String::new(),
        );
    };
    let expected = auth::cookie(&headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !auth::same(expected, &form.login_token) {
        return login_form(
            &engine,
            &headers,
            StatusCode::FORBIDDEN,
            Some("The login form expired. Please try again.".into()),
            form.username,
        );
    }
    let client = client_address(peer);
    let username = form.username.trim().to_string();
    match auth::login(
        &*engine,
        &throttle,
        &username,
        &form.password,
        Some(form.totp.as_str()).filter(|c| !c.trim().is_empty()),
        &client,
        auth::now_ms(),
    )
    .await
    {
        Ok(done) => {
            tracing::info!(operator = %username, "operator logged in");
            let secure = auth::over_https(&headers, engine.public_url().as_deref());
            let mut r = Redirect::to("/").into_response();
            if let Ok(v) = auth::session_cookie(Some(&done.secret), secure).parse() {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r
        }
        Err(auth::LoginError::Wrong) => {
            tracing::info!(operator = %username, "failed login");
            login_form(
                &engine,
                &headers,
                StatusCode::UNAUTHORIZED,
                Some("Wrong username, password or code.".into()),
                username,
            )
        }
        Err(auth::LoginError::Locked { seconds }) => login_form(
            &engine,
            &headers,
            StatusCode::TOO_MANY_REQUESTS,
            Some(format!(
                "Too many failed logins. Try again in {} minutes, or ask an admin.",
                seconds.div_ceil(60)
            )),
            username,
        ),
        Err(auth::LoginError::Unavailable(e)) => login_form(
            &engine,
            &headers,
            StatusCode::SERVICE_UNAVAILABLE,
            Some(format!("The cluster cannot log you in right now: {e}")),
            username,
        ),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub(crate) fn check_form_csrf(who: &Principal, sent: &str) -> Result<(), ApiError> {
    match who {
        Principal::Operator { csrf, .. } if auth::same(csrf, sent) => Ok(()),
        _ => Err(crate::api::csrf_refused()),
    }
}

async fn logout(
    State(engine): State<AppState>,
    Console(who): Console,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(e) = check_form_csrf(&who, &form.csrf) {
        return e.into_response();
    }
    if let Principal::Operator { session_sha256, .. } = &who {
        if let Err(e) = engine.end_session(session_sha256.clone()).await {
            tracing::warn!(error = %e, "logout could not end the session");
        }
    }
    let secure = auth::over_https(&headers, engine.public_url().as_deref());
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = auth::session_cookie(None, secure).parse() {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

// ---- campaigns ----

/// One campaign as the pages show it.
pub struct CampaignRow {
    pub id: u64,
    pub title: String,
    pub tenant: String,
    pub priority: &'static str,
    pub state: &'static str,
    pub approval: String,
    pub targeted: u64,
    pub confirmed: u64,
    pub pct: String,
    pub in_flight: u64,
    pub pending: u64,
    pub unreached: u64,
}

fn approval_text(a: &Approval) -> String {
    match a {
        Approval::NotNeeded => String::new(),
        Approval::Pending => "waiting for approval".into(),
        Approval::Approved { by, .. } => format!("approved by {by}"),
        Approval::Overridden { by, reason, .. } => {
            format!("emergency override by {by}: {reason}")
        }
    }
}

fn row(c: &Campaign) -> CampaignRow {
    let k = c.counts;
    let pct = if k.targeted == 0 {
        0.0
    } else {
        100.0 * k.confirmed as f64 / k.targeted as f64
    };
    CampaignRow {
        id: c.id.0,
        title: c.spec.title.clone(),
        tenant: c.spec.tenant.clone(),
        priority: c.spec.priority.as_str(),
        state: c.state.as_str(),
        approval: approval_text(&c.approval),
        targeted: k.targeted,
        confirmed: k.confirmed,
        pct: format!("{pct:.0}"),
        in_flight: k.in_flight,
        pending: k.pending,
        unreached: k.exhausted,
    }
}

#[derive(Template)]
#[template(path = "campaigns.html")]
struct CampaignsPage {
    drill: Option<String>,
    chrome: Chrome,
    rows: Vec<CampaignRow>,
    error: Option<String>,
}

async fn campaigns_page(State(engine): State<AppState>, Console(who): Console) -> Response {
    let (rows, error) = match engine.campaigns().await {
        Ok(mut list) => {
            list.retain(|c| who.serves(&c.spec.tenant));
            list.sort_by_key(|c| std::cmp::Reverse(c.id));
            (list.iter().map(row).collect(), None)
        }
        Err(e) => (Vec::new(), Some(format!("Cannot list campaigns: {e}"))),
    };
    let chrome = chrome(&engine, &who, "campaigns");
    render(&CampaignsPage {
        drill: chrome.drill.clone(),
        chrome,
        rows,
        error,
    })
}

// ---- compose ----

#[derive(Template)]
#[template(path = "compose.html")]
struct ComposePage {
    drill: Option<String>,
    chrome: Chrome,
    tenants: Vec<String>,
    form: ComposeForm,
    errors: Vec<String>,
    languages: &'static [&'static str],
}

/// The compose form as posted (and re-shown with its values after a mistake).
#[derive(Deserialize, Default, Clone)]
pub struct ComposeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    title: String,
    #[serde(default)]
    message_kind: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    language: String,
    #[serde(default)]
    recording_sha256: String,
    #[serde(default)]
    audience: String,
    #[serde(default)]
    zones: String,
    #[serde(default)]
    priority: String,
    #[serde(default)]
    require_confirmation: Option<String>,
    #[serde(default)]
    retry: String,
    /// Italian local time (`datetime-local`), empty for "as soon as it starts".
    #[serde(default)]
    schedule: String,
    /// Italian local time after which nobody is called; empty for none.
    #[serde(default)]
    deadline: String,
}

async fn compose_page(State(engine): State<AppState>, Console(who): Console) -> Response {
    if let Err(e) = who.require(Action::Operate) {
        return e.into_response();
    }
    let form = ComposeForm {
        message_kind: "tts".into(),
        language: "it".into(),
        audience: "all".into(),
        priority: "urgent".into(),
        require_confirmation: Some("on".into()),
        retry: "standard".into(),
        tenant: who.home_tenant(),
        ..Default::default()
    };
    compose_form(&engine, &who, StatusCode::OK, form, Vec::new())
}

fn compose_form(
    engine: &AppState,
    who: &Principal,
    status: StatusCode,
    form: ComposeForm,
    errors: Vec<String>,
) -> Response {
    let tenants = match who {
        Principal::Operator { tenants, .. } => tenants.clone(),
        Principal::Token { .. } => vec![who.home_tenant()],
    };
    let chrome = chrome(engine, who, "compose");
    render_status(
        status,
        &ComposePage {
            drill: chrome.drill.clone(),
            chrome,
            tenants,
            form,
            errors,
            languages: &crate::api::LANGUAGES,
        },
    )
}

/// Retry presets the console offers, from the priority's defaults.
fn retry_preset(name: &str, priority: Priority) -> Option<RetryPolicy> {
    let base = RetryPolicy::default_for(priority);
    Some(match name {
        "standard" => base,
        "persistent" => RetryPolicy {
            max_attempts: (base.max_attempts * 2).min(20),
            ..base
        },
        "once" => RetryPolicy {
            max_attempts: 1,
            until_deadline: false,
            ..base
        },
        _ => return None,
    })
}

/// An optional Italian local time from the compose form, checked by `check`; a problem is added to
/// `errors` as `out_of_range` or `unreadable`.
fn time_field(
    raw: &str,
    check: impl FnOnce(u64) -> Result<Option<u64>, String>,
    out_of_range: &str,
    unreadable: &str,
    errors: &mut Vec<String>,
) -> Option<u64> {
    if raw.trim().is_empty() {
        return None;
    }
    match crate::italian_time::parse_italian_local(raw).map(check) {
        Some(Ok(t)) => t,
        Some(Err(_)) => {
            errors.push(out_of_range.into());
            None
        }
        None => {
            errors.push(unreadable.into());
            None
        }
    }
}

/// Checks the compose form; every problem is listed, in the form's order.
fn compose_spec(form: &ComposeForm, who: &Principal) -> Result<CampaignSpec, Vec<String>> {
    let mut errors = Vec::new();
    let title = form.title.trim();
    if title.is_empty() || title.chars().count() > 200 {
        errors.push("Give the alert a title (at most 200 characters).".to_string());
    }
    if !who.serves(&form.tenant) {
        errors.push("Choose one of your comuni.".to_string());
    }
    let message = match form.message_kind.as_str() {
        "recording" => {
            let sha = form.recording_sha256.trim().to_ascii_lowercase();
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                errors.push("Upload a WAV recording first, or choose text to speech.".into());
            }
            Message::Recording { sha256: sha }
        }
        _ => {
            let text = form.text.trim();
            if text.is_empty() || text.chars().count() > 2000 {
                errors.push("Write the message (at most 2000 characters).".into());
            }
            if !crate::api::LANGUAGES.contains(&form.language.as_str()) {
                errors.push("Choose the language the message is written in.".into());
            }
            Message::Tts {
                text: text.to_string(),
                language: form.language.clone(),
            }
        }
    };
    let audience = if form.audience == "zones" {
        let zones: Vec<String> = form
            .zones
            .split(',')
            .map(|z| z.trim().to_string())
            .filter(|z| !z.is_empty())
            .collect();
        if zones.is_empty() || zones.iter().any(|z| z.chars().count() > 64) {
            errors.push("List at least one zone, separated by commas.".into());
        }
        Audience::Zones(zones)
    } else {
        Audience::All
    };
    let priority = match form.priority.as_str() {
        "emergency" => Priority::Emergency,
        "info" => Priority::Info,
        "urgent" => Priority::Urgent,
        _ => {
            errors.push("Choose a priority.".into());
            Priority::Urgent
        }
    };
    let retry = retry_preset(&form.retry, priority).unwrap_or_else(|| {
        errors.push("Choose how often to call again.".into());
        RetryPolicy::default_for(priority)
    });
    let not_before_ms = time_field(
        &form.schedule,
        |t| crate::api::check_schedule("schedule", Some(t)),
        "Schedule a time from now to 31 days ahead, or leave it empty.",
        "Write the scheduled time as day and hour, or leave it empty.",
        &mut errors,
    );
    let deadline_ms = time_field(
        &form.deadline,
        |t| crate::api::check_deadline("deadline", Some(t), not_before_ms),
        "The deadline must come after the start, or be left empty.",
        "Write the deadline as day and hour, or leave it empty.",
        &mut errors,
    );
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(CampaignSpec {
        title: title.to_string(),
        message,
        audience,
        priority,
        require_confirmation: form.require_confirmation.is_some(),
        retry,
        tenant: form.tenant.clone(),
        not_before_ms,
        deadline_ms,
    })
}

async fn compose_submit(
    State(engine): State<AppState>,
    Console(who): Console,
    Form(form): Form<ComposeForm>,
) -> Response {
    if let Err(e) = check_form_csrf(&who, &form.csrf) {
        return e.into_response();
    }
    if let Err(e) = who.require(Action::Operate) {
        return e.into_response();
    }
    let spec = match compose_spec(&form, &who) {
        Ok(spec) => spec,
        Err(errors) => return compose_form(&engine, &who, StatusCode::BAD_REQUEST, form, errors),
    };
    match engine.create_campaign(spec, who.composer()).await {
        Ok(c) => Redirect::to(&format!("/campaigns/{}", c.id.0)).into_response(),
        Err(e) => compose_form(
            &engine,
            &who,
            StatusCode::BAD_REQUEST,
            form,
            vec![e.to_string()],
        ),
    }
}

// ---- one campaign ----

/// A citizen not reached yet, as the campaign page lists them.
pub struct OpenTask {
    pub subscriber: u64,
    pub phone: String,
    pub state: &'static str,
    pub attempts: u32,
    pub last: &'static str,
}

#[derive(Template)]
#[template(path = "campaign.html")]
struct CampaignPage {
    drill: Option<String>,
    chrome: Chrome,
    c: CampaignRow,
    message: String,
    audience: String,
    schedule: Option<String>,
    deadline: Option<String>,
    created_by: String,
    counts: Vec<(&'static str, &'static str, u64)>,
    answer_ratio: String,
    can_start: bool,
    can_approve: bool,
    can_override: bool,
    can_pause: bool,
    can_resume: bool,
    can_cancel: bool,
    open_tasks: Vec<OpenTask>,
    open_total: usize,
    notice: Option<&'static str>,
    error: Option<String>,
}

#[derive(Deserialize, Default)]
struct PageQuery {
    done: Option<String>,
}

fn counts_list(c: &Campaign) -> Vec<(&'static str, &'static str, u64)> {
    let k = c.counts;
    vec![
        ("targeted", "Citizens", k.targeted),
        ("confirmed", "Confirmed", k.confirmed),
        ("in_flight", "On the phone now", k.in_flight),
        ("pending", "To call (again)", k.pending),
        ("exhausted", "Not reached", k.exhausted),
        ("invalid", "Invalid numbers", k.invalid),
        ("opted_out", "Opted out", k.opted_out),
        ("attempts", "Calls made", k.attempts),
        ("answered", "Calls answered", k.answered),
    ]
}

async fn campaign_page(
    State(engine): State<AppState>,
    Console(who): Console,
    Path(id): Path<String>,
    q: Result<axum::extract::Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let notice = q
        .ok()
        .and_then(|q| q.0.done)
        .and_then(|key| notice_for(&key));
    show_campaign(&engine, &who, &id, notice, None, StatusCode::OK).await
}

/// What an action that worked says on the campaign page. Only these fixed sentences can appear: a
/// link cannot put words of its own on the page.
fn notice_for(key: &str) -> Option<&'static str> {
    Some(match key {
        "started" => "Started: the calls are going out.",
        "paused" => "Paused: no new calls until you resume.",
        "resumed" => "Resumed.",
        "cancelled" => "Cancelled: no more calls will be made.",
        "approved" => "Approved: it can start now.",
        "overridden" => "Emergency override recorded: the alert can start now.",
        _ => return None,
    })
}

/// The campaign page, with what the last action did.
async fn show_campaign(
    engine: &AppState,
    who: &Principal,
    id: &str,
    notice: Option<&'static str>,
    error: Option<String>,
    status: StatusCode,
) -> Response {
    let c = match crate::api::campaign_for(engine, who, id, Action::Read).await {
        Ok(c) => c,
        Err(e) => return error_page(engine, who, e),
    };
    let tasks = engine.tasks(c.id).await.unwrap_or_default();
    let open: Vec<OpenTask> = tasks
        .iter()
        .filter(|t| {
            !matches!(
                t.state,
                TaskState::Final(campanile_cluster::FinalState::Confirmed)
            )
        })
        .filter(|_| c.state != CampaignState::Draft)
        .map(|t| OpenTask {
            subscriber: t.subscriber.0,
            phone: t.phone.as_str().to_string(),
            state: t.state.label(),
            attempts: t.attempts,
            last: t.last_outcome.as_ref().map(|o| o.label()).unwrap_or("—"),
        })
        .collect();
    let open_total = open.len();
    let operate = who.may(Action::Operate);
    let mine = who.operator().is_some() && c.created_by.as_deref() == who.operator();
    let pending = c.approval == Approval::Pending;
    let draft = c.state == CampaignState::Draft;
    let chrome = chrome(engine, who, "campaigns");
    let page = CampaignPage {
        drill: chrome.drill.clone(),
        chrome,
        message: match &c.spec.message {
            Message::Tts { text, language } => format!("{text} ({language}, text to speech)"),
            Message::Recording { sha256 } => {
                format!("recording {}", &sha256[..12.min(sha256.len())])
            }
        },
        audience: match &c.spec.audience {
            Audience::All => "everyone".into(),
            Audience::Zones(z) => format!("zones: {}", z.join(", ")),
        },
        schedule: c
            .spec
            .not_before_ms
            .map(crate::italian_time::italian_datetime),
        deadline: c
            .spec
            .deadline_ms
            .map(crate::italian_time::italian_datetime),
        created_by: c
            .created_by
            .clone()
            .unwrap_or_else(|| "an API token".into()),
        counts: counts_list(&c),
        answer_ratio: format!("{:.0}", 100.0 * c.counts.answer_ratio()),
        can_start: operate && draft && !pending,
        can_approve: who.may(Action::Approve)
            && draft
            && pending
            && !mine
            && who.operator().is_some(),
        can_override: operate
            && draft
            && pending
            && c.spec.priority == Priority::Emergency
            && who.operator().is_some(),
        can_pause: operate && c.state == CampaignState::Running,
        can_resume: operate && c.state == CampaignState::Paused,
        can_cancel: operate
            && matches!(
                c.state,
                CampaignState::Draft | CampaignState::Running | CampaignState::Paused
            ),
        open_tasks: open.into_iter().take(200).collect(),
        open_total,
        notice,
        error,
        c: row(&c),
    };
    render_status(status, &page)
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    drill: Option<String>,
    chrome: Chrome,
    message: String,
}

pub(crate) fn error_page(engine: &AppState, who: &Principal, e: ApiError) -> Response {
    let chrome = chrome(engine, who, "");
    render_status(
        e.status,
        &ErrorPage {
            drill: chrome.drill.clone(),
            chrome,
            message: e.message,
        },
    )
}

#[derive(Deserialize)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

async fn campaign_action(
    State(engine): State<AppState>,
    Console(who): Console,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err(e) = check_form_csrf(&who, &form.csrf) {
        return e.into_response();
    }
    let (result, done) = match action.as_str() {
        "override" => (
            crate::api::override_campaign_approval(&engine, &who, &id, form.reason).await,
            "overridden",
        ),
        other => {
            let (a, done) = match other {
                "start" => (CampaignAction::Start, "started"),
                "pause" => (CampaignAction::Pause, "paused"),
                "resume" => (CampaignAction::Resume, "resumed"),
                "cancel" => (CampaignAction::Cancel, "cancelled"),
                "approve" => (CampaignAction::Approve, "approved"),
                _ => {
                    return error_page(
                        &engine,
                        &who,
                        ApiError::not_found("no such action on a campaign"),
                    )
                }
            };
            (
                crate::api::act_on_campaign(&engine, &who, &id, a).await,
                done,
            )
        }
    };
    match result {
        Ok(_) => Redirect::to(&format!("/campaigns/{id}?done={done}")).into_response(),
        Err(e) if e.status == StatusCode::NOT_FOUND || e.status == StatusCode::FORBIDDEN => {
            error_page(&engine, &who, e)
        }
        // Refused (e.g. it needs an approval first): the page again, saying why.
        Err(e) => show_campaign(&engine, &who, &id, None, Some(e.message), e.status).await,
    }
}

/// Percent-encodes a query value.
pub(crate) fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The live numbers of a campaign, as the page's script reads them.
fn progress_json(c: &Campaign) -> String {
    let k = c.counts;
    serde_json::json!({
        "state": c.state.as_str(),
        "approval": approval_text(&c.approval),
        "counts": {
            "targeted": k.targeted, "confirmed": k.confirmed, "in_flight": k.in_flight,
            "pending": k.pending, "exhausted": k.exhausted, "invalid": k.invalid,
            "opted_out": k.opted_out, "attempts": k.attempts, "answered": k.answered,
        },
        "answer_ratio": k.answer_ratio(),
        "at_ms": auth::now_ms(),
    })
    .to_string()
}

/// `GET /campaigns/{id}/events`: server-sent events with the campaign's numbers every second while
/// anything changes; the stream ends a few seconds after the campaign is over.
async fn campaign_events(
    State(engine): State<AppState>,
    Console(who): Console,
    Path(id): Path<String>,
) -> Response {
    let c = match crate::api::campaign_for(&engine, &who, &id, Action::Read).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let id = c.id;
    let stream = progress_stream(engine, id);
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn progress_stream(
    engine: AppState,
    id: campanile_cluster::CampaignId,
) -> impl tokio_stream::Stream<Item = Result<Event, Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(4);
    tokio::spawn(async move {
        let mut last = String::new();
        let mut finished_for = 0u32;
        let mut quiet = 0u32;
        // The page's numbers refresh once a second.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let Ok(c) = engine.campaign(id).await else {
                break;
            };
            let json = progress_json(&c);
            // Send when something but the timestamp changed (and at least every 10 s).
            let key = json.split("\"at_ms\"").next().unwrap_or("").to_string();
            quiet += 1;
            if key != last || quiet >= 10 {
                last = key;
                quiet = 0;
                if tx
                    .send(Ok(Event::default().event("progress").data(json)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            if matches!(c.state, CampaignState::Completed | CampaignState::Cancelled) {
                finished_for += 1;
                if finished_for > 3 {
                    break;
                }
            }
            tick.tick().await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// `GET /campaigns/{id}/report.csv`: every citizen of the campaign with the outcome (personal data:
/// the file name says so).
async fn campaign_report(
    State(engine): State<AppState>,
    Console(who): Console,
    Path(id): Path<String>,
) -> Response {
    let c = match crate::api::campaign_for(&engine, &who, &id, Action::Read).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let tasks = match engine.tasks(c.id).await {
        Ok(t) => t,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let mut csv = String::from("subscriber,phone,state,attempts,last_outcome\n");
    for t in &tasks {
        csv.push_str(&format!(
            "{},{},{},{},{}\n",
            t.subscriber.0,
            t.phone.as_str(),
            t.state.label(),
            t.attempts,
            t.last_outcome.as_ref().map(|o| o.label()).unwrap_or("")
        ));
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!(
                    "attachment; filename=\"campaign-{}-report-personal-data.csv\"",
                    c.id.0
                ),
            ),
        ],
        csv,
    )
        .into_response()
}

// ---- cluster ----

/// Whether a member dials, from the capacity of its last heartbeat: the cluster page's and
/// `campanile cluster status`'s wording. 0 is what a node whose trunk is down (its OPTIONS pings
/// unanswered) or that is stopping says; the others then dial its partitions.
pub fn dialling(capacity: Option<u64>) -> String {
    match capacity {
        Some(0) => "NO: trunk down or stopping".into(),
        Some(n) => format!("yes, {n} channels"),
        None => "—".into(),
    }
}

/// A member's clock against the answering node's, signed in seconds (`+`: ahead), flagged `OFF`
/// past the offset the nodes warn about: the cluster page's and `campanile cluster status`'s
/// wording. `here` for the answering node itself.
pub fn clock(offset_ms: Option<f64>, here: bool) -> String {
    let tolerated_ms = campanile_cluster::clock::TOLERATED.as_secs_f64() * 1e3;
    match offset_ms {
        _ if here => "here".into(),
        Some(ms) if ms.abs() > tolerated_ms => format!("{:+.3} s OFF", ms / 1e3),
        Some(ms) => format!("{:+.3} s", ms / 1e3),
        None => "—".into(),
    }
}

#[derive(Template)]
#[template(path = "cluster.html")]
struct ClusterPage {
    drill: Option<String>,
    chrome: Chrome,
    leader: String,
    members: Vec<Vec<String>>,
    error: Option<String>,
    health: String,
}

async fn cluster_page(State(engine): State<AppState>, Console(who): Console) -> Response {
    let chrome = chrome(&engine, &who, "cluster");
    let health = engine.health().await;
    let (leader, members, error) = match engine.cluster().await {
        Ok(v) => {
            let members = v["members"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .map(|m| {
                            [
                                "id",
                                "datacenter",
                                "role",
                                "http_addr",
                                "leases",
                                "applied_index",
                                "lag",
                                "heartbeat_age_ms",
                                "channels_in_use",
                            ]
                            .iter()
                            .map(|k| match &m[*k] {
                                serde_json::Value::Null => "—".to_string(),
                                serde_json::Value::String(s) => s.clone(),
                                other => other.to_string(),
                            })
                            .chain([
                                dialling(m["capacity"].as_u64()),
                                clock(m["clock_offset_ms"].as_f64(), m["id"] == v["node"]),
                            ])
                            .collect()
                        })
                        .collect()
                })
                .unwrap_or_default();
            (v["leader"].to_string(), members, None)
        }
        Err(e) => (String::new(), Vec::new(), Some(e.to_string())),
    };
    render(&ClusterPage {
        drill: chrome.drill.clone(),
        chrome,
        leader,
        members,
        error,
        health: if health.ok {
            format!("healthy: {}", health.detail)
        } else {
            format!("NOT HEALTHY: {}", health.detail)
        },
    })
}
