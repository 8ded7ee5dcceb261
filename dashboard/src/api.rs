//! The JSON API under `/api/v1`: request bodies are validated field by field and refused with an error
//! that names the field; responses are stable views of the domain types.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use campanile_cluster::{
    Audience, CallTask, Campaign, CampaignId, CampaignSpec, Message, NewSubscriber, PhoneNumber,
    Priority, RetryPolicy, Subscriber, SubscriberId,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::{Action, Principal};
use crate::engine::{Engine, EngineError};
use crate::error::ApiError;

pub type AppState = Arc<dyn Engine>;

/// Languages with voices and prompts.
pub const LANGUAGES: [&str; 5] = ["it", "en", "de", "fr", "es"];

/// `Json` whose rejections use our error format and keep axum's status (400, 413, 415, 422 → 400).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit = if req.uri().path().ends_with("/subscribers/import") {
            crate::IMPORT_BODY_LIMIT
        } else {
            crate::BODY_LIMIT
        };
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                let status = rejection.status();
                let (status, code) = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => (status, "body_too_large"),
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => (status, "unsupported_media_type"),
                    _ => (StatusCode::BAD_REQUEST, "invalid_json"),
                };
                let message = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => {
                        format!("request body is larger than the {} KiB limit", limit / 1024)
                    }
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                        "send the body as JSON with Content-Type: application/json".to_string()
                    }
                    _ => rejection.body_text(),
                };
                Err(ApiError::new(status, code, message))
            }
        }
    }
}

/// `Query` whose rejections use our error format (400 `invalid_query`, naming the parameter).
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(ApiError::bad_request(
                "invalid_query",
                rejection.body_text(),
            )),
        }
    }
}

/// Any API route called with a method it does not take.
pub async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this API route does not take that method; see /api/v1/openapi.json",
    )
}

/// Every API route needs a caller: `Authorization: Bearer <token>` (automation), or a console
/// session cookie — and then, on anything but GET, the session's `X-CSRF-Token`. The caller goes
/// into the request as a `Principal` and into the audit log as its actor.
pub async fn authenticate(
    State(engine): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let principal = match presented {
        Some(token) => match engine.token_principal(token) {
            Some((label, scope)) => Principal::Token { label, scope },
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "bad_token",
                    "the bearer token is not valid",
                )
                .into_response()
            }
        },
        None => match crate::auth::session_principal(&*engine, req.headers()).await {
            Some(p) => {
                if let Err(e) = check_csrf(&p, req.method(), req.headers()) {
                    return e.into_response();
                }
                p
            }
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing_token",
                    "log in at /login, or send Authorization: Bearer <token>; the admin token is in the node's data directory (admin-token)",
                )
                .into_response()
            }
        },
    };
    let actor = principal.actor();
    req.extensions_mut().insert(principal);
    crate::engine::ACTOR.scope(actor, next.run(req)).await
}

/// A session's state-changing request must carry its CSRF token in `X-CSRF-Token`.
fn check_csrf(
    p: &Principal,
    method: &axum::http::Method,
    headers: &axum::http::HeaderMap,
) -> Result<(), ApiError> {
    let Principal::Operator { csrf, .. } = p else {
        return Ok(());
    };
    if matches!(*method, axum::http::Method::GET | axum::http::Method::HEAD) {
        return Ok(());
    }
    let sent = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if crate::auth::same(sent, csrf) {
        Ok(())
    } else {
        Err(csrf_refused())
    }
}

/// The 403 for a missing, stale or foreign CSRF token.
pub fn csrf_refused() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "csrf",
        "the form's security token is missing or no longer valid; reload the page and try again",
    )
}

type Who = axum::Extension<Principal>;

fn parse_id(raw: &str, what: &str) -> Result<u64, ApiError> {
    raw.parse::<u64>().map_err(|_| {
        ApiError::bad_request(
            "invalid_id",
            format!(
                "`{}` is not a {what} id (a positive number)",
                raw.chars().take(40).collect::<String>()
            ),
        )
    })
}

fn check_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("`{field}` must not be empty"),
        ));
    }
    if value.chars().count() > max {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("`{field}` is longer than {max} characters"),
        ));
    }
    Ok(())
}

fn check_language(field: &str, lang: &str) -> Result<(), ApiError> {
    if LANGUAGES.contains(&lang) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "unsupported_language",
            format!(
                "`{field}` must be one of it, en, de, fr, es (got `{}`)",
                lang.chars().take(16).collect::<String>()
            ),
        ))
    }
}

// ---- subscribers ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberBody {
    phone: String,
    name: Option<String>,
    language: Option<String>,
    zone: Option<String>,
    /// Default: the `default` tenant.
    tenant: Option<String>,
}

/// A tenant slug from a request (default: the caller's own tenant); whether it exists is the state
/// machine's answer.
fn tenant_field(field: &str, tenant: Option<String>, who: &Principal) -> Result<String, ApiError> {
    let tenant = tenant.unwrap_or_else(|| who.home_tenant());
    if !campanile_cluster::Tenant::valid_slug(&tenant) {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!(
                "`{field}` must be a tenant slug: 1 to 40 lower-case letters, digits and dashes"
            ),
        ));
    }
    Ok(tenant)
}

pub fn subscriber_view(s: &Subscriber) -> Value {
    json!({
        "id": s.id.0,
        "phone": s.phone.as_str(),
        "name": s.name,
        "language": s.language,
        "zone": s.zone,
        "tenant": s.tenant,
        "verified": s.verified,
        "opted_out": s.opted_out,
        "created_ms": s.created_ms,
    })
}

/// Checks every field of a subscriber as an operator sent it, and that the caller may add it.
fn new_subscriber(body: SubscriberBody, who: &Principal) -> Result<NewSubscriber, ApiError> {
    let tenant = tenant_field("tenant", body.tenant, who)?;
    who.check(Action::Operate, &tenant, &format!("tenant `{tenant}`"))?;
    let phone = PhoneNumber::parse(&body.phone)
        .map_err(|e| ApiError::bad_request("invalid_phone", format!("`phone`: {e}")))?;
    if let Some(name) = &body.name {
        check_text("name", name, 100)?;
    }
    if let Some(zone) = &body.zone {
        check_text("zone", zone, 64)?;
    }
    let language = body.language.unwrap_or_else(|| "it".into());
    check_language("language", &language)?;
    Ok(NewSubscriber {
        tenant,
        phone,
        name: body.name,
        language,
        zone: body.zone,
        verified: true,
        consent: None,
    })
}

pub async fn create_subscriber(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    ApiJson(body): ApiJson<SubscriberBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let s = engine
        .create_subscriber(new_subscriber(body, &who)?)
        .await?;
    Ok((StatusCode::CREATED, Json(subscriber_view(&s))))
}

/// Most subscribers one import request may carry.
pub const IMPORT_MAX: usize = 5_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportBody {
    subscribers: Vec<Value>,
}

/// `POST /api/v1/subscribers/import`: up to `IMPORT_MAX` subscribers in one Raft entry. Every item
/// is checked on its own: the good ones are imported, each bad one is reported by its position
/// (1-based) with the reason, numbers already registered are named with the subscriber holding them.
pub async fn import_subscribers(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    ApiJson(body): ApiJson<ImportBody>,
) -> Result<Json<Value>, ApiError> {
    who.require(Action::Operate)?;
    if body.subscribers.len() > IMPORT_MAX {
        return Err(ApiError::bad_request(
            "too_many",
            format!(
                "{} subscribers in one request; send at most {IMPORT_MAX} per request",
                body.subscribers.len()
            ),
        ));
    }
    let mut rejected = Vec::new();
    let mut batch = Vec::new();
    let mut positions = Vec::new();
    for (i, item) in body.subscribers.into_iter().enumerate() {
        let checked = serde_json::from_value::<SubscriberBody>(item)
            .map_err(|e| e.to_string())
            .and_then(|b| new_subscriber(b, &who).map_err(|e| e.message));
        match checked {
            Ok(s) => {
                batch.push(s);
                positions.push(i + 1);
            }
            Err(why) => rejected.push(json!({ "item": i + 1, "error": why })),
        }
    }
    let results = if batch.is_empty() {
        Vec::new()
    } else {
        engine.import_subscribers(batch).await?
    };
    let mut created = 0u64;
    let mut duplicates = Vec::new();
    for (item, r) in positions.iter().zip(results) {
        match r {
            campanile_cluster::Imported::Created(_) => created += 1,
            campanile_cluster::Imported::Duplicate(existing) => duplicates.push(
                json!({ "item": item, "error": format!("the number is already registered as subscriber {}", existing.0) }),
            ),
        }
    }
    Ok(Json(json!({
        "created": created,
        "duplicates": duplicates,
        "rejected": rejected,
    })))
}

/// The subscriber `id` if `who` may do `action` on it; another tenant's subscriber does not exist.
async fn subscriber_for(
    engine: &AppState,
    who: &Principal,
    id: &str,
    action: Action,
) -> Result<Subscriber, ApiError> {
    let id = SubscriberId(parse_id(id, "subscriber")?);
    let s = engine.subscriber(id).await?;
    who.check(action, &s.tenant, &format!("subscriber {id}"))?;
    Ok(s)
}

pub async fn get_subscriber(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let s = subscriber_for(&engine, &who, &id, Action::Read).await?;
    Ok(Json(subscriber_view(&s)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberQuery {
    tenant: Option<String>,
    q: Option<String>,
    offset: Option<usize>,
    limit: Option<usize>,
    #[allow(dead_code)]
    stale: Option<bool>,
}

/// `GET /api/v1/subscribers?tenant=T&q=TEXT&offset=N&limit=N`: a page of a tenant's subscribers whose
/// number, name or zone contains `q` (all when absent), by id, and how many match.
pub async fn list_subscribers(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    ApiQuery(q): ApiQuery<SubscriberQuery>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_field("tenant", q.tenant, &who)?;
    who.check(Action::Read, &tenant, &format!("tenant `{tenant}`"))?;
    let query = q.q.unwrap_or_default();
    if query.chars().count() > 100 {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`q` is longer than 100 characters",
        ));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1_000);
    let (page, total) = engine
        .search_subscribers(tenant, query, q.offset.unwrap_or(0), limit)
        .await?;
    Ok(Json(json!({
        "total": total,
        "subscribers": page.iter().map(subscriber_view).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriberPatch {
    name: Option<String>,
    language: Option<String>,
    zone: Option<String>,
}

/// `PATCH /api/v1/subscribers/{id}` with any of `name`, `language`, `zone` (an empty string clears
/// the name or the zone).
pub async fn update_subscriber(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<SubscriberPatch>,
) -> Result<Json<Value>, ApiError> {
    let s = subscriber_for(&engine, &who, &id, Action::Operate).await?;
    let clearable = |field: &str, v: Option<String>, current: Option<String>, max| match v {
        None => Ok(current),
        Some(v) if v.trim().is_empty() => Ok(None),
        Some(v) => check_text(field, &v, max).map(|_| Some(v.trim().to_string())),
    };
    let language = body.language.unwrap_or(s.language.clone());
    check_language("language", &language)?;
    let update = campanile_cluster::SubscriberUpdate {
        name: clearable("name", body.name, s.name.clone(), 100)?,
        language,
        zone: clearable("zone", body.zone, s.zone.clone(), 64)?,
    };
    Ok(Json(subscriber_view(
        &engine.update_subscriber(s.id, update).await?,
    )))
}

pub async fn delete_subscriber(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let s = subscriber_for(&engine, &who, &id, Action::Operate).await?;
    engine.delete_subscriber(s.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- campaigns ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignBody {
    title: String,
    message: MessageBody,
    audience: AudienceBody,
    priority: Priority,
    require_confirmation: Option<bool>,
    retry: Option<RetryBody>,
    /// Default: the `default` tenant.
    tenant: Option<String>,
    /// Schedule: nobody is called before this time (ms since the epoch).
    not_before_ms: Option<u64>,
    /// Deadline: nobody is called from this time on (ms since the epoch).
    deadline_ms: Option<u64>,
}

/// Exactly one of: text to speak, or a recording stored with `POST /api/v1/audio`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageBody {
    tts: Option<TtsBody>,
    recording: Option<RecordingBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordingBody {
    sha256: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtsBody {
    text: String,
    language: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudienceBody {
    all: Option<bool>,
    zones: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {
    max_attempts: Option<u32>,
    busy_delay_s: Option<f64>,
    no_answer_delay_s: Option<f64>,
    failure_delay_s: Option<f64>,
    quick_retries: Option<u32>,
    quick_delay_s: Option<f64>,
    until_deadline: Option<bool>,
}

fn delay_ms(field: &str, v: Option<f64>, default: u64) -> Result<u64, ApiError> {
    match v {
        None => Ok(default),
        Some(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => {
            Ok((s * 1000.0).round() as u64)
        }
        Some(_) => Err(ApiError::bad_request(
            "invalid_field",
            format!("`retry.{field}` must be between 0 and 86400 seconds"),
        )),
    }
}

impl CampaignBody {
    fn into_spec(self, who: &Principal) -> Result<CampaignSpec, ApiError> {
        check_text("title", &self.title, 200)?;
        let message = match (self.message.tts, self.message.recording) {
            (Some(tts), None) => {
                check_text("message.tts.text", &tts.text, 2000)?;
                check_language("message.tts.language", &tts.language)?;
                Message::Tts {
                    text: tts.text,
                    language: tts.language,
                }
            }
            (None, Some(rec)) => {
                let sha = rec.sha256.to_ascii_lowercase();
                if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ApiError::bad_request(
                        "invalid_field",
                        "`message.recording.sha256` must be 64 hex digits, as `POST /api/v1/audio` answers",
                    ));
                }
                Message::Recording { sha256: sha }
            }
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    "`message` must have exactly one of `tts` and `recording`",
                ))
            }
        };
        let tenant = tenant_field("tenant", self.tenant, who)?;
        who.check(Action::Operate, &tenant, &format!("tenant `{tenant}`"))?;
        let audience = match (self.audience.all, self.audience.zones) {
            (Some(true), None) => Audience::All,
            (None | Some(false), Some(zones)) => {
                if zones.is_empty() {
                    return Err(ApiError::bad_request(
                        "invalid_field",
                        "`audience.zones` must list at least one zone",
                    ));
                }
                for z in &zones {
                    check_text("audience.zones[]", z, 64)?;
                }
                Audience::Zones(zones)
            }
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    "`audience` must be {\"all\": true} or {\"zones\": [\"...\"]}",
                ))
            }
        };
        let not_before_ms = check_schedule("not_before_ms", self.not_before_ms)
            .map_err(|m| ApiError::bad_request("invalid_field", m))?;
        let deadline_ms = check_deadline("deadline_ms", self.deadline_ms, not_before_ms)
            .map_err(|m| ApiError::bad_request("invalid_field", m))?;
        let defaults = RetryPolicy::default_for(self.priority);
        let retry = match self.retry {
            None => defaults,
            Some(r) => {
                let max_attempts = r.max_attempts.unwrap_or(defaults.max_attempts);
                if !(1..=50).contains(&max_attempts) {
                    return Err(ApiError::bad_request(
                        "invalid_field",
                        "`retry.max_attempts` must be between 1 and 50",
                    ));
                }
                RetryPolicy {
                    max_attempts,
                    busy_delay_ms: delay_ms(
                        "busy_delay_s",
                        r.busy_delay_s,
                        defaults.busy_delay_ms,
                    )?,
                    no_answer_delay_ms: delay_ms(
                        "no_answer_delay_s",
                        r.no_answer_delay_s,
                        defaults.no_answer_delay_ms,
                    )?,
                    failure_delay_ms: delay_ms(
                        "failure_delay_s",
                        r.failure_delay_s,
                        defaults.failure_delay_ms,
                    )?,
                    quick_retries: match r.quick_retries {
                        None => defaults.quick_retries,
                        Some(n) if n <= 10 => n,
                        Some(_) => {
                            return Err(ApiError::bad_request(
                                "invalid_field",
                                "`retry.quick_retries` must be between 0 and 10",
                            ))
                        }
                    },
                    quick_delay_ms: delay_ms(
                        "quick_delay_s",
                        r.quick_delay_s,
                        defaults.quick_delay_ms,
                    )?,
                    until_deadline: r.until_deadline.unwrap_or(defaults.until_deadline),
                }
            }
        };
        Ok(CampaignSpec {
            title: self.title.trim().to_string(),
            message,
            audience,
            priority: self.priority,
            require_confirmation: self.require_confirmation.unwrap_or(true),
            retry,
            tenant,
            not_before_ms,
            deadline_ms,
        })
    }
}

/// Furthest ahead a campaign may be scheduled.
pub const MAX_SCHEDULE_AHEAD_MS: u64 = 31 * 24 * 3_600_000;

/// A schedule time: not in the past (a minute's grace for clocks), at most a month ahead.
pub fn check_schedule(field: &str, at_ms: Option<u64>) -> Result<Option<u64>, String> {
    let Some(at) = at_ms else { return Ok(None) };
    let now = crate::auth::now_ms();
    if at + 60_000 < now {
        return Err(format!("`{field}` is in the past"));
    }
    if at > now + MAX_SCHEDULE_AHEAD_MS {
        return Err(format!("`{field}` is more than 31 days ahead"));
    }
    Ok(Some(at))
}

/// A deadline: after the start time (or now) and at most a month ahead.
pub fn check_deadline(
    field: &str,
    at_ms: Option<u64>,
    not_before_ms: Option<u64>,
) -> Result<Option<u64>, String> {
    let Some(at) = at_ms else { return Ok(None) };
    let start = not_before_ms.unwrap_or_else(crate::auth::now_ms);
    if at <= start {
        return Err(format!("`{field}` must come after the start"));
    }
    if at > crate::auth::now_ms() + 2 * MAX_SCHEDULE_AHEAD_MS {
        return Err(format!("`{field}` is more than 62 days ahead"));
    }
    Ok(Some(at))
}

pub fn campaign_view(c: &Campaign) -> Value {
    let k = &c.counts;
    let message = match &c.spec.message {
        Message::Tts { text, language } => json!({ "tts": { "text": text, "language": language } }),
        Message::Recording { sha256 } => json!({ "recording": { "sha256": sha256 } }),
    };
    json!({
        "id": c.id.0,
        "title": c.spec.title,
        "state": c.state.as_str(),
        "priority": c.spec.priority.as_str(),
        "require_confirmation": c.spec.require_confirmation,
        "message": message,
        "tenant": c.spec.tenant,
        "audience": match &c.spec.audience {
            Audience::All => json!({ "all": true }),
            Audience::Zones(z) => json!({ "zones": z }),
        },
        "retry": {
            "max_attempts": c.spec.retry.max_attempts,
            "busy_delay_s": c.spec.retry.busy_delay_ms as f64 / 1000.0,
            "no_answer_delay_s": c.spec.retry.no_answer_delay_ms as f64 / 1000.0,
            "failure_delay_s": c.spec.retry.failure_delay_ms as f64 / 1000.0,
            "quick_retries": c.spec.retry.quick_retries,
            "quick_delay_s": c.spec.retry.quick_delay_ms as f64 / 1000.0,
            "until_deadline": c.spec.retry.until_deadline,
        },
        "counts": {
            "targeted": k.targeted, "pending": k.pending, "in_flight": k.in_flight,
            "confirmed": k.confirmed, "exhausted": k.exhausted, "invalid": k.invalid,
            "opted_out": k.opted_out, "cancelled": k.cancelled,
            "attempts": k.attempts, "answered": k.answered,
        },
        "answer_ratio": k.answer_ratio(),
        "by_node": c.by_node.iter().map(|(node, p)| (node.0.to_string(), json!({
            "attempts": p.attempts, "answered": p.answered, "confirmed": p.confirmed,
        }))).collect::<serde_json::Map<String, Value>>(),
        "created_by": c.created_by,
        "approval": approval_view(&c.approval),
        "created_ms": c.created_ms,
        "started_ms": c.started_ms,
        "finished_ms": c.finished_ms,
        "not_before_ms": c.spec.not_before_ms,
        "deadline_ms": c.spec.deadline_ms,
    })
}

fn approval_view(a: &campanile_cluster::Approval) -> Value {
    use campanile_cluster::Approval;
    match a {
        Approval::NotNeeded => json!({ "state": "not_needed" }),
        Approval::Pending => json!({ "state": "pending" }),
        Approval::Approved { by, at_ms } => {
            json!({ "state": "approved", "by": by, "at_ms": at_ms })
        }
        Approval::Overridden { by, reason, at_ms } => {
            json!({ "state": "overridden", "by": by, "reason": reason, "at_ms": at_ms })
        }
    }
}

fn task_view(t: &CallTask) -> Value {
    json!({
        "subscriber": t.subscriber.0,
        "phone": t.phone.as_str(),
        "state": t.state.label(),
        "attempts": t.attempts,
        "last_outcome": t.last_outcome.as_ref().map(|o| o.label()),
        "next_due_ms": t.next_due_ms,
    })
}

pub async fn create_campaign(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    ApiJson(body): ApiJson<CampaignBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let spec = body.into_spec(&who)?;
    let c = engine.create_campaign(spec, who.composer()).await?;
    Ok((StatusCode::CREATED, Json(campaign_view(&c))))
}

pub async fn list_campaigns(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
) -> Result<Json<Value>, ApiError> {
    let list: Vec<Value> = engine
        .campaigns()
        .await?
        .iter()
        .filter(|c| who.serves(&c.spec.tenant))
        .map(campaign_view)
        .collect();
    Ok(Json(Value::Array(list)))
}

/// The campaign `id` if `who` may do `action` on it; another tenant's campaign does not exist.
pub async fn campaign_for(
    engine: &AppState,
    who: &Principal,
    id: &str,
    action: Action,
) -> Result<Campaign, ApiError> {
    let id = CampaignId(parse_id(id, "campaign")?);
    let c = engine.campaign(id).await?;
    who.check(action, &c.spec.tenant, &format!("campaign {id}"))?;
    Ok(c)
}

pub async fn get_campaign(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = campaign_for(&engine, &who, &id, Action::Read).await?;
    Ok(Json(campaign_view(&c)))
}

/// What an operator can do to a campaign from the console or the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignAction {
    Start,
    Pause,
    Resume,
    Cancel,
    Approve,
}

/// Checks the caller's right to `action` on campaign `id` and does it.
pub async fn act_on_campaign(
    engine: &AppState,
    who: &Principal,
    id: &str,
    action: CampaignAction,
) -> Result<Campaign, ApiError> {
    let needs = if action == CampaignAction::Approve {
        Action::Approve
    } else {
        Action::Operate
    };
    let c = campaign_for(engine, who, id, needs).await?;
    Ok(match action {
        CampaignAction::Start => engine.start_campaign(c.id).await?,
        CampaignAction::Pause => engine.pause_campaign(c.id).await?,
        CampaignAction::Resume => engine.resume_campaign(c.id).await?,
        CampaignAction::Cancel => engine.cancel_campaign(c.id).await?,
        CampaignAction::Approve => {
            let by = who.operator().ok_or_else(person_only)?;
            engine.approve_campaign(c.id, by.to_string()).await?
        }
    })
}

/// Approvals and overrides are a person's decision, never automation's.
fn person_only() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "person_required",
        "approvals and emergency overrides are made by a logged-in operator, not an API token",
    )
}

pub async fn start_campaign(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = act_on_campaign(&engine, &who, &id, CampaignAction::Start).await?;
    Ok(Json(campaign_view(&c)))
}

pub async fn cancel_campaign(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = act_on_campaign(&engine, &who, &id, CampaignAction::Cancel).await?;
    Ok(Json(campaign_view(&c)))
}

pub async fn pause_campaign(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = act_on_campaign(&engine, &who, &id, CampaignAction::Pause).await?;
    Ok(Json(campaign_view(&c)))
}

pub async fn resume_campaign(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = act_on_campaign(&engine, &who, &id, CampaignAction::Resume).await?;
    Ok(Json(campaign_view(&c)))
}

pub async fn approve_campaign(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = act_on_campaign(&engine, &who, &id, CampaignAction::Approve).await?;
    Ok(Json(campaign_view(&c)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideBody {
    reason: String,
}

/// Checks the caller's right to start emergency campaign `id` without a second person, and records
/// the override with its reason.
pub async fn override_campaign_approval(
    engine: &AppState,
    who: &Principal,
    id: &str,
    reason: String,
) -> Result<Campaign, ApiError> {
    let c = campaign_for(engine, who, id, Action::Operate).await?;
    let by = who.operator().ok_or_else(person_only)?;
    check_text("reason", &reason, 500)?;
    Ok(engine
        .override_approval(c.id, by.to_string(), reason)
        .await?)
}

/// `POST /api/v1/campaigns/{id}/override` with `{"reason": "..."}`.
pub async fn override_approval(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<OverrideBody>,
) -> Result<Json<Value>, ApiError> {
    let c = override_campaign_approval(&engine, &who, &id, body.reason).await?;
    Ok(Json(campaign_view(&c)))
}

pub async fn campaign_tasks(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = campaign_for(&engine, &who, &id, Action::Read).await?;
    let list: Vec<Value> = engine.tasks(c.id).await?.iter().map(task_view).collect();
    Ok(Json(Value::Array(list)))
}

/// Any other path under /api/v1.
pub async fn unknown_route() -> ApiError {
    ApiError::not_found("no such API route; see README for the routes under /api/v1")
}

/// `GET /api/v1/cluster`: leader, term and members (id, data centre, role, raft and HTTP addresses,
/// applied index, lag).
pub async fn cluster(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
) -> Result<Json<Value>, ApiError> {
    who.require(Action::Read)?;
    Ok(Json(engine.cluster().await?))
}

/// `GET /api/v1/backup`: a consistent copy of the replicated state, for `campanile restore`. It holds
/// personal data (phone numbers): the response says so in its file name.
pub async fn backup(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
) -> Result<Response, ApiError> {
    who.require(Action::System)?;
    let file = tokio::fs::File::from_std(engine.backup().await?);
    let body =
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 16));
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/octet-stream"),
            (
                axum::http::header::CONTENT_DISPOSITION,
                "attachment; filename=\"campanile-backup-personal-data.cbk\"",
            ),
        ],
        body,
    )
        .into_response())
}

/// `DELETE /api/v1/cluster/members/{id}`: the node leaves the cluster; its in-flight calls are
/// given to the others.
pub async fn remove_member(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    who.require(Action::System)?;
    let id = parse_id(&id, "node")?;
    Ok(Json(engine.remove_member(id).await?))
}

/// Every `GET` under `/api/v1` is linearizable: before it reads, the node makes sure it has applied
/// everything committed when the request arrived (Raft read index through the leader). A query with
/// `stale=true` reads this node's applied state as it is, and keeps working without a quorum.
pub async fn linearizable_reads(
    State(engine): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let stale = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "stale=true" || kv == "stale=1"));
    // The cluster view must answer without a quorum: it is how an SRE finds out why there is none.
    let cluster_view = req.uri().path().contains("/cluster");
    if req.method() == axum::http::Method::GET && !stale && !cluster_view {
        if let Err(e) = engine.linearize().await {
            return ApiError::from(e).into_response();
        }
    }
    next.run(req).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantBody {
    slug: String,
    name: String,
}

fn tenant_view(t: &campanile_cluster::Tenant) -> Value {
    json!({
        "slug": t.slug, "name": t.name, "created_ms": t.created_ms,
        "caller_id": t.caller_id.as_ref().map(|c| json!({ "number": c.number, "display_name": c.display_name })),
        "quiet_hours": t.quiet_hours.map(|q| json!({
            "start": clock_time(q.start_minute), "end": clock_time(q.end_minute),
        })),
    })
}

/// `HH:MM` of a minute of the day.
fn clock_time(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

/// Minutes after midnight of an `HH:MM` time of day; None when it is not one.
fn parse_clock_time(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHoursBody {
    start: String,
    end: String,
}

/// `PUT /api/v1/tenants/{slug}/quiet-hours` with `{"start": "22:00", "end": "07:00"}` (Italian
/// local time; the window may wrap midnight): the tenant's non-emergency campaigns start no calls
/// then.
pub async fn set_quiet_hours(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(slug): Path<String>,
    ApiJson(body): ApiJson<QuietHoursBody>,
) -> Result<Json<Value>, ApiError> {
    who.check(Action::Administer, &slug, &format!("tenant `{slug}`"))?;
    let time = |field: &str, value: &str| {
        parse_clock_time(value).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_field",
                format!("`{field}` must be a time of day as HH:MM (00:00 to 23:59)"),
            )
        })
    };
    let quiet = campanile_cluster::QuietHours {
        start_minute: time("start", &body.start)?,
        end_minute: time("end", &body.end)?,
    };
    if let Some(problem) = quiet.problem() {
        return Err(ApiError::bad_request("invalid_field", problem));
    }
    Ok(Json(tenant_view(
        &engine.set_quiet_hours(slug, Some(quiet)).await?,
    )))
}

/// `DELETE /api/v1/tenants/{slug}/quiet-hours`: the tenant's campaigns call at any time of day.
pub async fn clear_quiet_hours(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(slug): Path<String>,
) -> Result<Json<Value>, ApiError> {
    who.check(Action::Administer, &slug, &format!("tenant `{slug}`"))?;
    Ok(Json(tenant_view(
        &engine.set_quiet_hours(slug, None).await?,
    )))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerIdBody {
    number: String,
    display_name: String,
}

/// `PUT /api/v1/tenants/{slug}/caller-id` with `{"number", "display_name"}`: what the tenant's
/// calls show (From and P-Asserted-Identity); the trunk must allow the number.
pub async fn set_caller_id(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(slug): Path<String>,
    ApiJson(body): ApiJson<CallerIdBody>,
) -> Result<Json<Value>, ApiError> {
    who.check(Action::Administer, &slug, &format!("tenant `{slug}`"))?;
    let caller = campanile_cluster::CallerId {
        number: body.number.trim().to_string(),
        display_name: body.display_name.trim().to_string(),
    };
    if let Some(problem) = caller.problem() {
        return Err(ApiError::bad_request("invalid_field", problem));
    }
    Ok(Json(tenant_view(
        &engine.set_caller_id(slug, Some(caller)).await?,
    )))
}

/// `DELETE /api/v1/tenants/{slug}/caller-id`: back to the node's `[caller_id]`.
pub async fn clear_caller_id(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(slug): Path<String>,
) -> Result<Json<Value>, ApiError> {
    who.check(Action::Administer, &slug, &format!("tenant `{slug}`"))?;
    Ok(Json(tenant_view(&engine.set_caller_id(slug, None).await?)))
}

/// `GET /api/v1/tenants`.
pub async fn tenants(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
) -> Result<Json<Value>, ApiError> {
    let list: Vec<Value> = engine
        .tenants()
        .await?
        .iter()
        .filter(|t| who.serves(&t.slug))
        .map(tenant_view)
        .collect();
    Ok(Json(json!({ "tenants": list })))
}

/// `POST /api/v1/tenants` with `{"slug": "pisa", "name": "Comune di Pisa"}`.
pub async fn create_tenant(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    ApiJson(body): ApiJson<TenantBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    who.require(Action::System)?;
    let slug = tenant_field("slug", Some(body.slug), &who)?;
    check_text("name", &body.name, 200)?;
    let t = engine
        .create_tenant(slug, body.name.trim().to_string())
        .await?;
    Ok((StatusCode::CREATED, Json(tenant_view(&t))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    tenant: Option<String>,
}

/// Largest WAV upload: two minutes of 48 kHz 32-bit stereo, comfortably; it is stored as 8 kHz mono.
pub const AUDIO_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// `POST /api/v1/audio?tenant=T` with a WAV body: stored as 8 kHz mono, content-addressed. A campaign
/// plays it with `"message": {"recording": {"sha256": ...}}`.
pub async fn put_audio(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    ApiQuery(q): ApiQuery<TenantQuery>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let tenant = tenant_field("tenant", q.tenant, &who)?;
    who.check(Action::Operate, &tenant, &format!("tenant `{tenant}`"))?;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the recording is larger than the {} MiB upload limit",
                AUDIO_BODY_LIMIT / (1024 * 1024)
            ),
        ),
        status => ApiError::new(status, "invalid_body", rejection.body_text()),
    })?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "send the recording as a WAV file in the request body",
        ));
    }
    let (sha256, duration_ms) = engine.put_audio(tenant.clone(), body.to_vec()).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "sha256": sha256, "tenant": tenant, "duration_ms": duration_ms })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    tenant: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
    /// Read this node's state as it is (see `linearizable_reads`).
    #[allow(dead_code)]
    stale: Option<bool>,
}

/// `GET /api/v1/audit?tenant=T&after=SEQ&limit=N`: who did what, oldest first (at most 1,000 per
/// page; page on with `after` = the last `seq`).
pub async fn audit(
    State(engine): State<AppState>,
    ApiQuery(q): ApiQuery<AuditQuery>,
    axum::Extension(who): Who,
) -> Result<Json<Value>, ApiError> {
    // A token reads the whole log; an operator reads one of its tenants' (its first by default).
    let tenant = match (q.tenant, &who) {
        (None, Principal::Token { scope: None, .. }) => None,
        (t, _) => {
            let t = tenant_field("tenant", t, &who)?;
            who.check(Action::Audit, &t, &format!("tenant `{t}`"))?;
            Some(t)
        }
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1_000);
    let entries = engine.audit(tenant, q.after.unwrap_or(0), limit).await?;
    Ok(Json(json!({ "entries": entries })))
}

// ---- operators ----

fn operator_view(o: &campanile_cluster::Operator) -> Value {
    json!({
        "username": o.username,
        "display_name": o.display_name,
        "role": crate::auth::role_name(o.role),
        "tenants": o.tenants,
        "disabled": o.disabled,
        "totp": o.totp_secret.is_some(),
        "created_ms": o.created_ms,
        "updated_ms": o.updated_ms,
    })
}

/// `GET /api/v1/operators`: the accounts of the caller's tenants (never a password hash).
pub async fn operators(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
) -> Result<Json<Value>, ApiError> {
    who.require(Action::Audit)?;
    let list: Vec<Value> = engine
        .operators()
        .await?
        .iter()
        .filter(|o| o.tenants.iter().any(|t| who.serves(t)))
        .map(operator_view)
        .collect();
    Ok(Json(json!({ "operators": list })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorBody {
    username: String,
    display_name: Option<String>,
    role: String,
    /// Default: the caller's own tenant.
    tenants: Option<Vec<String>>,
    password: String,
}

fn role_field(role: &str) -> Result<campanile_cluster::Role, ApiError> {
    crate::auth::parse_role(role).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_field",
            "`role` must be one of admin, approver, operator, viewer, regional",
        )
    })
}

/// An admin of a tenant manages that tenant's accounts; regional accounts and accounts of several
/// tenants are made with an API token (by whoever runs the cluster).
fn check_may_manage(
    who: &Principal,
    role: campanile_cluster::Role,
    tenants: &[String],
) -> Result<(), ApiError> {
    for t in tenants {
        who.check(Action::Administer, t, &format!("tenant `{t}`"))?;
    }
    if !who.is_system() && (role == campanile_cluster::Role::Regional || tenants.len() != 1) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "regional accounts and accounts of several tenants are made with an API token",
        ));
    }
    who.require(Action::Administer)
}

/// Hashes a password (argon2id) off the async workers, after checking it is acceptable.
pub async fn hash_new_password(password: String) -> Result<String, ApiError> {
    if let Some(problem) = crate::auth::password_problem(&password) {
        return Err(ApiError::bad_request("weak_password", problem));
    }
    tokio::task::spawn_blocking(move || crate::auth::hash_password(&password))
        .await
        .map_err(|e| EngineError::Internal(e.to_string()))?
        .map_err(|e| ApiError::from(EngineError::Internal(e)))
}

/// `POST /api/v1/operators` with `{"username", "display_name", "role", "tenants", "password"}`.
pub async fn create_operator(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    ApiJson(body): ApiJson<OperatorBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let role = role_field(&body.role)?;
    let tenants = match body.tenants {
        Some(t) => t,
        None => vec![who.home_tenant()],
    };
    check_may_manage(&who, role, &tenants)?;
    if let Some(name) = &body.display_name {
        check_text("display_name", name, 100)?;
    }
    let password_hash = hash_new_password(body.password).await?;
    let op = campanile_cluster::Operator {
        totp_secret: None,
        display_name: body
            .display_name
            .unwrap_or_else(|| body.username.clone())
            .trim()
            .to_string(),
        username: body.username,
        role,
        tenants,
        password_hash,
        disabled: false,
        created_ms: 0,
        updated_ms: 0,
    };
    let username = op.username.clone();
    engine.create_operator(op).await?;
    // Answer what the cluster stored (it stamps the times).
    let stored = engine
        .operators()
        .await?
        .into_iter()
        .find(|o| o.username == username)
        .ok_or_else(|| ApiError::not_found(format!("operator `{username}` does not exist")))?;
    Ok((StatusCode::CREATED, Json(operator_view(&stored))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorPatch {
    role: Option<String>,
    disabled: Option<bool>,
    password: Option<String>,
    /// `true` turns the account's second factor off (a lost phone); the operator sets it up again.
    reset_totp: Option<bool>,
}

/// `PATCH /api/v1/operators/{username}`: role, disabled, or a new password (which ends the
/// account's sessions everywhere).
pub async fn update_operator(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(username): Path<String>,
    ApiJson(body): ApiJson<OperatorPatch>,
) -> Result<Json<Value>, ApiError> {
    let current = engine
        .operators()
        .await?
        .into_iter()
        .find(|o| o.username == username)
        .filter(|o| o.tenants.iter().any(|t| who.serves(t)))
        .ok_or_else(|| ApiError::not_found(format!("operator `{username}` does not exist")))?;
    let role = body.role.as_deref().map(role_field).transpose()?;
    check_may_manage(&who, role.unwrap_or(current.role), &current.tenants)?;
    let password_hash = match body.password {
        Some(p) => Some(hash_new_password(p).await?),
        None => None,
    };
    engine
        .update_operator(campanile_cluster::OperatorUpdate {
            totp: (body.reset_totp == Some(true)).then_some(campanile_cluster::TotpChange::Disable),
            username: username.clone(),
            role,
            tenants: None,
            password_hash,
            disabled: body.disabled,
        })
        .await?;
    let updated = engine
        .operators()
        .await?
        .into_iter()
        .find(|o| o.username == username)
        .ok_or_else(|| ApiError::not_found(format!("operator `{username}` does not exist")))?;
    Ok(Json(operator_view(&updated)))
}

/// `GET /api/v1/session`: who the caller is, what it may do, and (for a console session) its CSRF
/// token for scripts.
pub async fn whoami(axum::Extension(who): Who) -> Json<Value> {
    let may = |a| who.may(a);
    let mut v = json!({
        "actor": who.actor(),
        "may": {
            "read": may(Action::Read), "operate": may(Action::Operate), "approve": may(Action::Approve),
            "audit": may(Action::Audit), "administer": may(Action::Administer),
            "system": may(Action::System),
        },
    });
    if let Principal::Operator {
        role,
        tenants,
        csrf,
        ..
    } = &who
    {
        v["role"] = json!(crate::auth::role_name(*role));
        v["tenants"] = json!(tenants);
        v["csrf"] = json!(csrf);
    }
    Json(v)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewQuery {
    text: String,
    language: String,
    #[allow(dead_code)]
    stale: Option<bool>,
}

/// `GET /api/v1/preview?text=...&language=it`: the message as a citizen would hear it, as WAV.
pub async fn preview(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    ApiQuery(q): ApiQuery<PreviewQuery>,
) -> Result<Response, ApiError> {
    who.require(Action::Operate)?;
    check_text("text", &q.text, 2000)?;
    check_language("language", &q.language)?;
    let wav = engine.preview(q.text, q.language).await?;
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "audio/wav"),
            (axum::http::header::CACHE_CONTROL, "private, max-age=600"),
        ],
        wav,
    )
        .into_response())
}

// ---- API tokens ----

/// A token's public id: the first 16 hex digits of its hash (enough to name it, useless to call
/// the API with).
fn token_id(t: &campanile_cluster::ApiToken) -> &str {
    t.sha256.get(..16).unwrap_or(&t.sha256)
}

fn token_view(t: &campanile_cluster::ApiToken) -> Value {
    json!({
        "id": token_id(t),
        "label": t.label,
        "created_ms": t.created_ms,
        "role": t.scope.as_ref().map_or("admin token", |s| crate::auth::role_name(s.role)),
        "tenants": t.scope.as_ref().map(|s| s.tenants.clone()),
        "created_by": t.scope.as_ref().map(|s| s.created_by.clone()),
    })
}

/// Whether `who` may see and revoke `t`: a node's admin token only by another admin token; a
/// scoped one by whoever administers all of its tenants.
fn manages_token(who: &Principal, t: &campanile_cluster::ApiToken) -> bool {
    match &t.scope {
        None => who.is_system(),
        Some(scope) => scope.tenants.iter().all(|x| who.serves(x)),
    }
}

/// `GET /api/v1/tokens`: the API tokens the caller administers (never their secrets).
pub async fn tokens(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
) -> Result<Json<Value>, ApiError> {
    who.require(Action::Administer)?;
    let list: Vec<Value> = engine
        .tokens()
        .await?
        .iter()
        .filter(|t| manages_token(&who, t))
        .map(token_view)
        .collect();
    Ok(Json(json!({ "tokens": list })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    label: String,
    role: String,
    /// Default: the caller's own tenant.
    tenants: Option<Vec<String>>,
}

/// `POST /api/v1/tokens` with `{"label", "role", "tenants"}`: a token for automation with that role
/// in those tenants. The secret is in this answer only; the cluster keeps its hash.
pub async fn create_token(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    ApiJson(body): ApiJson<TokenBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let role = role_field(&body.role)?;
    check_text("label", &body.label, 100)?;
    let tenants = body.tenants.unwrap_or_else(|| vec![who.home_tenant()]);
    if tenants.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_field",
            "`tenants` must name at least one tenant",
        ));
    }
    check_may_manage(&who, role, &tenants)?;
    let secret = crate::auth::new_secret();
    let token = campanile_cluster::ApiToken {
        sha256: crate::auth::secret_sha256(&secret),
        label: body.label.trim().to_string(),
        created_ms: crate::auth::now_ms(),
        scope: Some(campanile_cluster::TokenScope {
            role,
            tenants,
            created_by: who.actor(),
        }),
    };
    engine.add_token(token.clone()).await?;
    let mut view = token_view(&token);
    view["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(view)))
}

/// `DELETE /api/v1/tokens/{id}`: the token stops working on every node.
pub async fn revoke_token(
    State(engine): State<AppState>,
    axum::Extension(who): Who,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    who.require(Action::Administer)?;
    let found = engine
        .tokens()
        .await?
        .into_iter()
        .find(|t| id.len() >= 8 && t.sha256.starts_with(&id.to_ascii_lowercase()))
        .filter(|t| manages_token(&who, t))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no API token with id `{}`",
                id.chars().take(64).collect::<String>()
            ))
        })?;
    engine.revoke_token(found.sha256).await?;
    Ok(StatusCode::NO_CONTENT)
}
