//! The console's Citizens page: the operators of a comune find, add, correct, import, export and
//! erase the people their alerts call.
//!
//! It makes the same checks as the JSON API's subscriber routes — another tenant's citizen does not
//! exist (404), a role without the right is refused (403), every change carries the session's CSRF
//! token — and judges each field as the API does, so the console adds nothing the API would refuse.
//! Lists come in as pasted CSV (a spreadsheet saved as CSV): a small RFC 4180 reader here takes
//! quoted fields, doubled quotes, CRLF and a byte-order mark, each line is judged on its own, and
//! the good lines go to the cluster in one replicated import, so one typo never costs the rest of
//! the list. The export is the same columns, with text cells that a spreadsheet would run as a
//! formula defused.

use std::borrow::Cow;

use askama::Template;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use campanile_cluster::{
    Imported, NewSubscriber, PhoneNumber, Subscriber, SubscriberId, SubscriberUpdate,
};
use serde::Deserialize;

use crate::api::{AppState, IMPORT_MAX, LANGUAGES};
use crate::auth::{Action, Principal};
use crate::console::{Chrome, Console};
use crate::engine::EngineError;
use crate::error::ApiError;

/// Citizens per page of the list.
pub const PAGE_SIZE: usize = 50;
/// Longest name, as the API allows.
const NAME_MAX: usize = 100;
/// Longest zone, as the API allows.
const ZONE_MAX: usize = 64;
/// Longest search the list accepts.
const QUERY_MAX: usize = 100;
/// Citizens asked of the engine per call while exporting.
const EXPORT_CHUNK: usize = 1_000;
/// The columns of an export, in order; an import reads the first four and skips the others.
const EXPORT_HEADER: &str = "phone,name,language,zone,id,verified,created";

/// The Citizens routes (all behind the console's login).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/subscribers", get(list_page))
        .route("/subscribers/new", get(new_page).post(new_submit))
        // A pasted list of IMPORT_MAX lines is larger than the console's usual body limit.
        .route(
            "/subscribers/import",
            get(import_page)
                .post(import_submit)
                .layer(DefaultBodyLimit::max(crate::IMPORT_BODY_LIMIT)),
        )
        .route("/subscribers/export.csv", get(export_csv))
        .route("/subscribers/{id}", get(edit_page).post(edit_submit))
        .route(
            "/subscribers/{id}/erase",
            get(erase_page).post(erase_submit),
        )
}

// ---- pieces every page uses ----

fn render(status: StatusCode, t: &impl Template) -> Response {
    crate::console::render_status(status, t)
}

fn chrome(engine: &AppState, who: &Principal) -> Chrome {
    crate::console::chrome(engine, who, "subscribers")
}

use crate::console::{checked_form, error_page};

/// The comuni the operator serves, for the tenant selects.
fn tenants_of(who: &Principal) -> Vec<String> {
    match who {
        Principal::Operator { tenants, .. } => tenants.clone(),
        Principal::Token { .. } => vec![who.home_tenant()],
    }
}

/// The tenant a page acts on: the one asked for, or the operator's first. 404 unless the operator
/// serves it, 403 unless the role allows `action`.
fn pick_tenant(who: &Principal, asked: Option<&str>, action: Action) -> Result<String, ApiError> {
    let tenant = asked
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| who.home_tenant());
    who.check(
        action,
        &tenant,
        &format!(
            "the comune `{}`",
            tenant.chars().take(40).collect::<String>()
        ),
    )?;
    Ok(tenant)
}

/// Subscriber `raw` if `who` may do `action` on it; another tenant's citizen does not exist.
async fn subscriber_for(
    engine: &AppState,
    who: &Principal,
    raw: &str,
    action: Action,
) -> Result<Subscriber, ApiError> {
    let id = raw.parse::<u64>().map(SubscriberId).map_err(|_| {
        ApiError::not_found(format!(
            "there is no subscriber `{}`",
            raw.chars().take(20).collect::<String>()
        ))
    })?;
    let s = engine.subscriber(id).await.map_err(ApiError::from)?;
    who.check(action, &s.tenant, &format!("subscriber {}", id.0))?;
    Ok(s)
}

use crate::console::url_encode;

// ---- fields, judged as the API judges them ----

fn check_phone(raw: &str) -> Result<PhoneNumber, String> {
    PhoneNumber::parse(raw).map_err(|e| e.to_string())
}

/// An optional text field: empty is none; longer than `max` characters is refused.
fn check_text(raw: &str, max: usize) -> Result<Option<String>, String> {
    let v = raw.trim();
    if v.is_empty() {
        return Ok(None);
    }
    let n = v.chars().count();
    if n > max {
        return Err(format!(
            "at most {max} characters, this has {n}: shorten it"
        ));
    }
    Ok(Some(v.to_string()))
}

/// A language of `LANGUAGES`; empty means Italian.
fn check_language(raw: &str) -> Result<String, String> {
    let l = raw.trim().to_ascii_lowercase();
    if l.is_empty() {
        return Ok("it".into());
    }
    if LANGUAGES.contains(&l.as_str()) {
        Ok(l)
    } else {
        Err(format!(
            "must be one of {} (not `{}`)",
            LANGUAGES.join(", "),
            l.chars().take(16).collect::<String>()
        ))
    }
}

fn language_label(code: &str) -> &'static str {
    match code {
        "it" => "Italiano",
        "en" => "English",
        "de" => "Deutsch",
        "fr" => "Français",
        "es" => "Español",
        _ => "",
    }
}

/// One choice of the language select.
pub struct LanguageOption {
    pub code: &'static str,
    pub label: String,
    pub selected: bool,
}

fn language_options(selected: &str) -> Vec<LanguageOption> {
    LANGUAGES
        .iter()
        .map(|code| LanguageOption {
            code,
            label: match language_label(code) {
                "" => code.to_string(),
                name => format!("{name} ({code})"),
            },
            selected: *code == selected,
        })
        .collect()
}

/// A subscriber form as posted (and shown again, values kept, after a mistake).
#[derive(Deserialize, Default, Clone)]
pub struct SubscriberForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    phone: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    language: String,
    #[serde(default)]
    zone: String,
}

/// What is wrong with a form, field by field.
#[derive(Default, Debug)]
pub struct FieldErrors {
    pub form: Option<String>,
    pub tenant: Option<String>,
    pub phone: Option<String>,
    pub name: Option<String>,
    pub language: Option<String>,
    pub zone: Option<String>,
}

impl FieldErrors {
    /// Whether anything is wrong.
    pub fn any(&self) -> bool {
        self.form.is_some()
            || self.tenant.is_some()
            || self.phone.is_some()
            || self.name.is_some()
            || self.language.is_some()
            || self.zone.is_some()
    }
}

/// The name, language and zone of a form, or what is wrong with them.
fn check_details(form: &SubscriberForm, errors: &mut FieldErrors) -> Option<SubscriberUpdate> {
    let name = check_text(&form.name, NAME_MAX).map_err(|e| errors.name = Some(e));
    let language = check_language(&form.language).map_err(|e| errors.language = Some(e));
    let zone = check_text(&form.zone, ZONE_MAX).map_err(|e| errors.zone = Some(e));
    Some(SubscriberUpdate {
        name: name.ok()?,
        language: language.ok()?,
        zone: zone.ok()?,
    })
}

/// A citizen an operator adds: verified (the operator vouches for the number), no consent record.
fn validate_new(
    form: &SubscriberForm,
    tenant: &str,
    errors: &mut FieldErrors,
) -> Option<NewSubscriber> {
    let phone = check_phone(&form.phone).map_err(|e| errors.phone = Some(e));
    let details = check_details(form, errors)?;
    Some(NewSubscriber {
        phone: phone.ok()?,
        name: details.name,
        language: details.language,
        zone: details.zone,
        verified: true,
        tenant: tenant.to_string(),
        consent: None,
    })
}

/// The subscriber already holding `phone` in `tenant`, if the engine can find it.
async fn holder_of(engine: &AppState, tenant: &str, phone: &PhoneNumber) -> Option<u64> {
    let (found, _) = engine
        .search_subscribers(tenant.to_string(), phone.as_str().to_string(), 0, 20)
        .await
        .ok()?;
    found.iter().find(|s| s.phone == *phone).map(|s| s.id.0)
}

use crate::italian_time::{italian_date, utc_timestamp};

// ---- the list ----

/// One citizen as the list shows them.
pub struct Row {
    pub id: u64,
    pub phone: String,
    pub name: String,
    pub language: String,
    pub zone: String,
    pub verified: bool,
    pub opted_out: bool,
    pub registered: String,
}

fn row(s: &Subscriber) -> Row {
    Row {
        id: s.id.0,
        phone: s.phone.as_str().to_string(),
        name: s.name.clone().unwrap_or_default(),
        language: s.language.clone(),
        zone: s.zone.clone().unwrap_or_default(),
        verified: s.verified,
        opted_out: s.opted_out,
        registered: italian_date(s.created_ms),
    }
}

#[derive(Template)]
#[template(path = "subscribers.html")]
struct ListPage {
    drill: Option<String>,
    chrome: Chrome,
    tenants: Vec<String>,
    tenant: String,
    q: String,
    rows: Vec<Row>,
    count_text: String,
    page: usize,
    pages: usize,
    prev_href: Option<String>,
    next_href: Option<String>,
    clear_href: String,
    notice: Option<String>,
    notice_link: Option<u64>,
    error: Option<String>,
}

#[derive(Deserialize, Default)]
struct ListQuery {
    tenant: Option<String>,
    q: Option<String>,
    page: Option<String>,
    added: Option<String>,
    erased: Option<String>,
}

/// What the engine is asked for: a search that looks like a phone number loses its spaces and
/// separators (stored numbers are E.164), anything else is searched as typed.
fn search_text(typed: &str) -> String {
    let t = typed.trim();
    let digits = t.chars().filter(char::is_ascii_digit).count();
    let phone_like = digits >= 5
        && t.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '+' | '-' | '.' | '/' | '(' | ')'));
    if !phone_like {
        return t.to_string();
    }
    let compact: String = t
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == '+')
        .collect();
    match compact.strip_prefix("00") {
        Some(rest) => format!("+{rest}"),
        None => compact,
    }
}

fn list_href(tenant: &str, q: &str, page: usize) -> String {
    let mut h = format!("/subscribers?tenant={}", url_encode(tenant));
    if !q.is_empty() {
        h.push_str("&q=");
        h.push_str(&url_encode(q));
    }
    if page > 1 {
        h.push_str(&format!("&page={page}"));
    }
    h
}

fn count_text(total: usize, q: &str) -> String {
    let citizens = if total == 1 { "citizen" } else { "citizens" };
    if q.is_empty() {
        format!("{total} {citizens} registered.")
    } else {
        format!(
            "{total} {citizens} {} “{q}”.",
            if total == 1 { "matches" } else { "match" }
        )
    }
}

/// `GET /subscribers?tenant=&q=&page=`: one page of the comune's citizens, searched.
async fn list_page(
    State(engine): State<AppState>,
    Console(who): Console,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let tenant = match pick_tenant(&who, query.tenant.as_deref(), Action::Read) {
        Ok(t) => t,
        Err(e) => return error_page(&engine, &who, e),
    };
    let q: String = query
        .q
        .unwrap_or_default()
        .trim()
        .chars()
        .take(QUERY_MAX)
        .collect();
    let page = query
        .page
        .and_then(|p| p.trim().parse::<usize>().ok())
        .filter(|p| *p >= 1)
        .unwrap_or(1);
    let offset = (page - 1).saturating_mul(PAGE_SIZE);
    let (rows, total, error, status) = match engine
        .search_subscribers(tenant.clone(), search_text(&q), offset, PAGE_SIZE)
        .await
    {
        Ok((found, total)) => (found.iter().map(row).collect(), total, None, StatusCode::OK),
        Err(e) => {
            let e = ApiError::from(e);
            (
                Vec::new(),
                0,
                Some(format!("Cannot list the citizens: {}", e.message)),
                e.status,
            )
        }
    };
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let (notice, notice_link) = match (
        query.added.and_then(|v| v.parse::<u64>().ok()),
        query.erased.and_then(|v| v.parse::<u64>().ok()),
    ) {
        (Some(id), _) => (Some(format!("Citizen added as subscriber {id}.")), Some(id)),
        (None, Some(id)) => (
            Some(format!(
                "Subscriber {id} was erased: their number and details are deleted, and no alert will call them."
            )),
            None,
        ),
        _ => (None, None),
    };
    let chrome = chrome(&engine, &who);
    render(
        status,
        &ListPage {
            drill: chrome.drill.clone(),
            chrome,
            tenants: tenants_of(&who),
            count_text: count_text(total, &q),
            prev_href: (page > 1).then(|| list_href(&tenant, &q, (page - 1).min(pages))),
            next_href: (page < pages).then(|| list_href(&tenant, &q, page + 1)),
            clear_href: list_href(&tenant, "", 1),
            tenant,
            q,
            rows,
            page,
            pages,
            notice,
            notice_link,
            error,
        },
    )
}

// ---- add one ----

#[derive(Template)]
#[template(path = "subscribers_new.html")]
struct NewPage {
    drill: Option<String>,
    chrome: Chrome,
    tenants: Vec<String>,
    form: SubscriberForm,
    errors: FieldErrors,
    languages: Vec<LanguageOption>,
    duplicate: Option<u64>,
}

fn new_form(
    engine: &AppState,
    who: &Principal,
    status: StatusCode,
    form: SubscriberForm,
    errors: FieldErrors,
    duplicate: Option<u64>,
) -> Response {
    let chrome = chrome(engine, who);
    render(
        status,
        &NewPage {
            drill: chrome.drill.clone(),
            chrome,
            tenants: tenants_of(who),
            languages: language_options(&form.language),
            form,
            errors,
            duplicate,
        },
    )
}

#[derive(Deserialize, Default)]
struct TenantQuery {
    tenant: Option<String>,
}

/// `GET /subscribers/new`.
async fn new_page(
    State(engine): State<AppState>,
    Console(who): Console,
    query: Result<Query<TenantQuery>, QueryRejection>,
) -> Response {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let tenant = match pick_tenant(&who, query.tenant.as_deref(), Action::Operate) {
        Ok(t) => t,
        Err(e) => return error_page(&engine, &who, e),
    };
    let form = SubscriberForm {
        tenant,
        language: "it".into(),
        ..Default::default()
    };
    new_form(
        &engine,
        &who,
        StatusCode::OK,
        form,
        FieldErrors::default(),
        None,
    )
}

/// `POST /subscribers/new`.
async fn new_submit(
    State(engine): State<AppState>,
    Console(who): Console,
    form: Result<Form<SubscriberForm>, FormRejection>,
) -> Response {
    let form = match checked_form(&engine, &who, form, crate::BODY_LIMIT, |f| &f.csrf) {
        Ok(f) => f,
        Err(page) => return *page,
    };
    let tenant = match pick_tenant(&who, Some(&form.tenant), Action::Operate) {
        Ok(t) => t,
        Err(e) => return error_page(&engine, &who, e),
    };
    let mut errors = FieldErrors::default();
    let Some(new) = validate_new(&form, &tenant, &mut errors) else {
        return new_form(&engine, &who, StatusCode::BAD_REQUEST, form, errors, None);
    };
    let phone = new.phone.clone();
    match engine.create_subscriber(new).await {
        Ok(s) => {
            tracing::info!(
                operator = %who.actor(), tenant = %s.tenant, subscriber = s.id.0,
                number = %phone.masked(), "operator added a subscriber"
            );
            Redirect::to(&format!(
                "/subscribers?tenant={}&added={}",
                url_encode(&s.tenant),
                s.id.0
            ))
            .into_response()
        }
        Err(EngineError::Conflict(why)) => {
            let existing = holder_of(&engine, &tenant, &phone).await;
            let errors = FieldErrors {
                phone: Some(match existing {
                    Some(id) => format!("this number is already registered as subscriber {id}"),
                    None => why,
                }),
                ..Default::default()
            };
            new_form(&engine, &who, StatusCode::CONFLICT, form, errors, existing)
        }
        Err(e) => {
            let e = ApiError::from(e);
            let errors = FieldErrors {
                form: Some(format!(
                    "The cluster did not add the citizen: {}",
                    e.message
                )),
                ..Default::default()
            };
            new_form(&engine, &who, e.status, form, errors, None)
        }
    }
}

// ---- one citizen: details, correction, erasure ----

/// A citizen as the details and erase pages show them.
pub struct Details {
    pub id: u64,
    pub phone: String,
    pub name: String,
    pub tenant: String,
    pub verified: bool,
    pub opted_out: bool,
    pub registered: String,
    pub consent: Option<String>,
}

fn details(s: &Subscriber) -> Details {
    Details {
        id: s.id.0,
        phone: s.phone.as_str().to_string(),
        name: s.name.clone().unwrap_or_default(),
        tenant: s.tenant.clone(),
        verified: s.verified,
        opted_out: s.opted_out,
        registered: italian_date(s.created_ms),
        consent: s.consent.as_ref().map(|c| {
            format!(
                "given on the public page on {}: “{}”",
                italian_date(c.at_ms),
                c.text
            )
        }),
    }
}

fn form_of(s: &Subscriber) -> SubscriberForm {
    SubscriberForm {
        tenant: s.tenant.clone(),
        phone: s.phone.as_str().to_string(),
        name: s.name.clone().unwrap_or_default(),
        language: s.language.clone(),
        zone: s.zone.clone().unwrap_or_default(),
        ..Default::default()
    }
}

#[derive(Template)]
#[template(path = "subscribers_edit.html")]
struct EditPage {
    drill: Option<String>,
    chrome: Chrome,
    s: Details,
    form: SubscriberForm,
    errors: FieldErrors,
    languages: Vec<LanguageOption>,
    notice: Option<String>,
}

fn edit_form(
    engine: &AppState,
    who: &Principal,
    status: StatusCode,
    s: &Subscriber,
    form: SubscriberForm,
    errors: FieldErrors,
    notice: Option<String>,
) -> Response {
    let chrome = chrome(engine, who);
    render(
        status,
        &EditPage {
            drill: chrome.drill.clone(),
            chrome,
            s: details(s),
            languages: language_options(&form.language),
            form,
            errors,
            notice,
        },
    )
}

#[derive(Deserialize, Default)]
struct SavedQuery {
    saved: Option<String>,
}

/// `GET /subscribers/{id}`.
async fn edit_page(
    State(engine): State<AppState>,
    Console(who): Console,
    Path(id): Path<String>,
    query: Result<Query<SavedQuery>, QueryRejection>,
) -> Response {
    let s = match subscriber_for(&engine, &who, &id, Action::Read).await {
        Ok(s) => s,
        Err(e) => return error_page(&engine, &who, e),
    };
    let saved = query.is_ok_and(|Query(q)| q.saved.is_some());
    edit_form(
        &engine,
        &who,
        StatusCode::OK,
        &s,
        form_of(&s),
        FieldErrors::default(),
        saved.then(|| "Saved.".to_string()),
    )
}

/// `POST /subscribers/{id}`: corrects the name, language and zone.
async fn edit_submit(
    State(engine): State<AppState>,
    Console(who): Console,
    Path(id): Path<String>,
    form: Result<Form<SubscriberForm>, FormRejection>,
) -> Response {
    let form = match checked_form(&engine, &who, form, crate::BODY_LIMIT, |f| &f.csrf) {
        Ok(f) => f,
        Err(page) => return *page,
    };
    let s = match subscriber_for(&engine, &who, &id, Action::Operate).await {
        Ok(s) => s,
        Err(e) => return error_page(&engine, &who, e),
    };
    let mut errors = FieldErrors::default();
    let Some(update) = check_details(&form, &mut errors) else {
        return edit_form(
            &engine,
            &who,
            StatusCode::BAD_REQUEST,
            &s,
            form,
            errors,
            None,
        );
    };
    match engine.update_subscriber(s.id, update).await {
        Ok(_) => {
            tracing::info!(
                operator = %who.actor(), tenant = %s.tenant, subscriber = s.id.0,
                "operator corrected a subscriber's details"
            );
            Redirect::to(&format!("/subscribers/{}?saved=1", s.id.0)).into_response()
        }
        Err(e) => {
            let e = ApiError::from(e);
            let errors = FieldErrors {
                form: Some(format!(
                    "The cluster did not save the change: {}",
                    e.message
                )),
                ..Default::default()
            };
            edit_form(&engine, &who, e.status, &s, form, errors, None)
        }
    }
}

#[derive(Template)]
#[template(path = "subscribers_erase.html")]
struct ErasePage {
    drill: Option<String>,
    chrome: Chrome,
    s: Details,
}

fn erase_confirmation(engine: &AppState, who: &Principal, s: &Subscriber) -> Response {
    let chrome = chrome(engine, who);
    render(
        StatusCode::OK,
        &ErasePage {
            drill: chrome.drill.clone(),
            chrome,
            s: details(s),
        },
    )
}

/// `GET /subscribers/{id}/erase`: says what erasing does, with the button that does it.
async fn erase_page(
    State(engine): State<AppState>,
    Console(who): Console,
    Path(id): Path<String>,
) -> Response {
    match subscriber_for(&engine, &who, &id, Action::Operate).await {
        Ok(s) => erase_confirmation(&engine, &who, &s),
        Err(e) => error_page(&engine, &who, e),
    }
}

#[derive(Deserialize)]
struct EraseForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    confirm: String,
}

/// `POST /subscribers/{id}/erase`: GDPR erasure once confirmed; without the confirmation, the page
/// that asks for it.
async fn erase_submit(
    State(engine): State<AppState>,
    Console(who): Console,
    Path(id): Path<String>,
    form: Result<Form<EraseForm>, FormRejection>,
) -> Response {
    let form = match checked_form(&engine, &who, form, crate::BODY_LIMIT, |f| &f.csrf) {
        Ok(f) => f,
        Err(page) => return *page,
    };
    let s = match subscriber_for(&engine, &who, &id, Action::Operate).await {
        Ok(s) => s,
        Err(e) => return error_page(&engine, &who, e),
    };
    if form.confirm != "yes" {
        return erase_confirmation(&engine, &who, &s);
    }
    if let Err(e) = engine.delete_subscriber(s.id).await {
        return error_page(&engine, &who, ApiError::from(e));
    }
    tracing::info!(
        operator = %who.actor(), tenant = %s.tenant, subscriber = s.id.0,
        number = %s.phone.masked(), "operator erased a subscriber"
    );
    Redirect::to(&format!(
        "/subscribers?tenant={}&erased={}",
        url_encode(&s.tenant),
        s.id.0
    ))
    .into_response()
}

// ---- CSV ----

/// One record of a CSV text: the line it starts on (1-based) and its fields, or why it cannot be
/// read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvRecord {
    pub line: usize,
    pub fields: Result<Vec<String>, String>,
}

impl CsvRecord {
    /// An empty line, or one with nothing but commas and spaces (spreadsheets leave them).
    fn is_blank(&self) -> bool {
        matches!(&self.fields, Ok(f) if f.iter().all(|x| x.trim().is_empty()))
    }
}

/// Length of the line break at `i` (`\r\n`, `\n` or a lone `\r`), 0 if there is none.
fn line_break(b: &[u8], i: usize) -> usize {
    match b.get(i) {
        Some(b'\n') => 1,
        Some(b'\r') if b.get(i + 1) == Some(&b'\n') => 2,
        Some(b'\r') => 1,
        _ => 0,
    }
}

/// Reads CSV as RFC 4180 writes it, and as spreadsheets save it: comma-separated; a field in double
/// quotes may hold commas, line breaks and doubled quotes (`""`); lines end in CRLF, LF or CR; a
/// UTF-8 byte-order mark is skipped. A quote inside an unquoted field is kept as it is. A record
/// that cannot be read is reported by its line, and reading goes on with the next line, so one
/// stray quote costs one record.
pub fn parse_csv(text: &str) -> Vec<CsvRecord> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let b = text.as_bytes();
    let mut records = Vec::new();
    let mut i = 0;
    let mut line = 1;
    while i < b.len() {
        let start = i;
        let start_line = line;
        let mut cells = Vec::new();
        let fields = loop {
            // At the start of a field. Slicing `text` at these byte positions is safe: they are
            // all next to ASCII delimiters, which never occur inside a UTF-8 sequence.
            let mut field = String::new();
            if b.get(i) == Some(&b'"') {
                i += 1;
                let mut from = i;
                let mut closed = false;
                while i < b.len() {
                    match b[i] {
                        b'"' if b.get(i + 1) == Some(&b'"') => {
                            field.push_str(&text[from..=i]);
                            i += 2;
                            from = i;
                        }
                        b'"' => {
                            field.push_str(&text[from..i]);
                            i += 1;
                            closed = true;
                            break;
                        }
                        _ => {
                            let n = line_break(b, i);
                            if n > 0 {
                                line += 1;
                                i += n;
                            } else {
                                i += 1;
                            }
                        }
                    }
                }
                if !closed {
                    // Everything after the opening quote was swallowed: start again on the next line.
                    let mut j = start;
                    while j < b.len() && line_break(b, j) == 0 {
                        j += 1;
                    }
                    i = j + line_break(b, j);
                    line = start_line + 1;
                    break Err("a field opens a double quote that is never closed".to_string());
                }
                if i < b.len() && b[i] != b',' && line_break(b, i) == 0 {
                    while i < b.len() && line_break(b, i) == 0 {
                        i += 1;
                    }
                    i += line_break(b, i);
                    line += 1;
                    break Err(
                        "after a closing double quote must come a comma or the end of the \
                               line; a quote inside a quoted field is written twice (\"\")"
                            .to_string(),
                    );
                }
            } else {
                let from = i;
                while i < b.len() && b[i] != b',' && line_break(b, i) == 0 {
                    i += 1;
                }
                field.push_str(&text[from..i]);
            }
            cells.push(field);
            if b.get(i) == Some(&b',') {
                i += 1;
                continue;
            }
            let n = line_break(b, i);
            if n > 0 {
                i += n;
                line += 1;
            }
            break Ok(cells);
        };
        records.push(CsvRecord {
            line: start_line,
            fields,
        });
    }
    records
}

/// Whether a spreadsheet would take a cell starting like `value` for a formula.
fn formula_like(value: &str) -> bool {
    value.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

/// Appends one CSV field, in double quotes when it needs them. Text that a spreadsheet would run as
/// a formula gets a leading `'` (OWASP's advice on CSV injection) unless `verbatim`.
fn push_field(out: &mut String, value: &str, verbatim: bool) {
    let value: Cow<str> = if !verbatim && formula_like(value) {
        Cow::Owned(format!("'{value}"))
    } else {
        Cow::Borrowed(value)
    };
    let quote =
        value.contains([',', '"', '\r', '\n']) || value.starts_with(' ') || value.ends_with(' ');
    if quote {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(&value);
    }
}

/// The export: a byte-order mark (so spreadsheets read the accents as UTF-8), the header, one line
/// per citizen, CRLF line ends.
fn export_text(subscribers: &[Subscriber]) -> String {
    let mut out = String::with_capacity(64 * (subscribers.len() + 1));
    out.push('\u{feff}');
    out.push_str(EXPORT_HEADER);
    out.push_str("\r\n");
    for s in subscribers {
        // E.164 numbers start with `+` and are numbers, not formulas: the phone column is verbatim.
        push_field(&mut out, s.phone.as_str(), true);
        for v in [
            s.name.as_deref().unwrap_or(""),
            &s.language,
            s.zone.as_deref().unwrap_or(""),
        ] {
            out.push(',');
            push_field(&mut out, v, false);
        }
        out.push_str(&format!(
            ",{},{},{}\r\n",
            s.id.0,
            if s.verified { "yes" } else { "no" },
            utc_timestamp(s.created_ms)
        ));
    }
    out
}

/// A cell as a person meant it: an export's `'` before a formula character comes off again.
fn unneutralise(value: &str) -> &str {
    match value.strip_prefix('\'') {
        Some(rest) if formula_like(rest) => rest,
        _ => value,
    }
}

/// What a column of a pasted list holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Phone,
    Name,
    Language,
    Zone,
    /// `id`, `verified` and `created` of an export: not the importer's to set.
    Skipped,
}

/// The columns a header line names.
fn columns(header: &[String]) -> Result<Vec<Column>, String> {
    if header
        .first()
        .is_some_and(|f| PhoneNumber::parse(unneutralise(f)).is_ok())
    {
        return Err("Line 1 is a citizen, not the header: add the line \
                    phone,name,language,zone above the list."
            .into());
    }
    let mut cols = Vec::with_capacity(header.len());
    for (n, raw) in header.iter().enumerate() {
        let name = raw.trim().to_ascii_lowercase();
        let col = match name.as_str() {
            "phone" => Column::Phone,
            "name" => Column::Name,
            "language" => Column::Language,
            "zone" => Column::Zone,
            "id" | "verified" | "created" => Column::Skipped,
            "" => {
                return Err(format!(
                    "Column {} of the header line has no name: the header is phone,name,language,zone.",
                    n + 1
                ))
            }
            _ => {
                return Err(format!(
                    "The header line names a column `{}` that is not known: use phone, name, language and zone.",
                    name.chars().take(30).collect::<String>()
                ))
            }
        };
        if col != Column::Skipped && cols.contains(&col) {
            return Err(format!("The header line names the column `{name}` twice."));
        }
        cols.push(col);
    }
    if !cols.contains(&Column::Phone) {
        return Err(
            "The header line has no `phone` column: it is phone,name,language,zone.".into(),
        );
    }
    Ok(cols)
}

/// One data line of a paste, judged on its own.
fn read_line(fields: &[String], cols: &[Column], tenant: &str) -> Result<NewSubscriber, String> {
    if fields.len() > cols.len() {
        return Err(format!(
            "{} fields, but the header names {} columns: put a name or zone that holds a comma \
             in double quotes",
            fields.len(),
            cols.len()
        ));
    }
    let cell = |c: Column| {
        cols.iter()
            .position(|x| *x == c)
            .and_then(|i| fields.get(i))
            .map(|v| unneutralise(v))
            .unwrap_or("")
    };
    let mut problems = Vec::new();
    let phone = check_phone(cell(Column::Phone)).map_err(|e| problems.push(format!("phone: {e}")));
    let name =
        check_text(cell(Column::Name), NAME_MAX).map_err(|e| problems.push(format!("name: {e}")));
    let language =
        check_language(cell(Column::Language)).map_err(|e| problems.push(format!("language: {e}")));
    let zone =
        check_text(cell(Column::Zone), ZONE_MAX).map_err(|e| problems.push(format!("zone: {e}")));
    match (phone, name, language, zone) {
        (Ok(phone), Ok(name), Ok(language), Ok(zone)) => Ok(NewSubscriber {
            phone,
            name,
            language,
            zone,
            verified: true,
            tenant: tenant.to_string(),
            consent: None,
        }),
        _ => Err(problems.join("; ")),
    }
}

/// A line of a paste that was not imported, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineProblem {
    pub line: usize,
    pub reason: String,
}

/// A line whose number was already registered, and with whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineDuplicate {
    pub line: usize,
    pub existing: u64,
}

/// A paste read and judged: the citizens to import with their lines, the lines refused, and how many
/// data lines there were.
#[derive(Debug)]
struct Paste {
    good: Vec<(usize, NewSubscriber)>,
    bad: Vec<LineProblem>,
    lines: usize,
}

/// Reads a pasted list for `tenant`. Err when the paste as a whole cannot be taken (no header,
/// unknown columns, too many lines); otherwise every line is judged on its own.
fn read_paste(csv: &str, tenant: &str) -> Result<Paste, String> {
    let mut records = parse_csv(csv).into_iter().filter(|r| !r.is_blank());
    let Some(header) = records.next() else {
        return Err(
            "The list is empty: paste the CSV, starting with the header line \
                    phone,name,language,zone."
                .into(),
        );
    };
    let cols = match &header.fields {
        Ok(f) => columns(f)?,
        Err(e) => {
            return Err(format!(
                "The header line ({}) cannot be read: {e}.",
                header.line
            ))
        }
    };
    let data: Vec<CsvRecord> = records.collect();
    if data.len() > IMPORT_MAX {
        return Err(format!(
            "The list has {} lines of citizens; import at most {IMPORT_MAX} at a time: split it and paste each part.",
            data.len()
        ));
    }
    let mut paste = Paste {
        good: Vec::new(),
        bad: Vec::new(),
        lines: data.len(),
    };
    for r in data {
        match r.fields.and_then(|f| read_line(&f, &cols, tenant)) {
            Ok(s) => paste.good.push((r.line, s)),
            Err(reason) => paste.bad.push(LineProblem {
                line: r.line,
                reason,
            }),
        }
    }
    Ok(paste)
}

// ---- import ----

/// The import form as posted.
#[derive(Deserialize, Default, Clone)]
pub struct ImportForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    tenant: String,
    #[serde(default)]
    csv: String,
}

#[derive(Template)]
#[template(path = "subscribers_import.html")]
struct ImportPage {
    drill: Option<String>,
    chrome: Chrome,
    tenants: Vec<String>,
    form: ImportForm,
    error: Option<String>,
    max: usize,
    languages: String,
}

fn import_form(
    engine: &AppState,
    who: &Principal,
    status: StatusCode,
    form: ImportForm,
    error: Option<String>,
) -> Response {
    let chrome = chrome(engine, who);
    render(
        status,
        &ImportPage {
            drill: chrome.drill.clone(),
            chrome,
            tenants: tenants_of(who),
            form,
            error,
            max: IMPORT_MAX,
            languages: LANGUAGES.join(", "),
        },
    )
}

#[derive(Template)]
#[template(path = "subscribers_import_result.html")]
struct ImportResultPage {
    drill: Option<String>,
    chrome: Chrome,
    tenant: String,
    created: usize,
    lines: usize,
    rejected: Vec<LineProblem>,
    duplicates: Vec<LineDuplicate>,
}

/// `GET /subscribers/import`.
async fn import_page(
    State(engine): State<AppState>,
    Console(who): Console,
    query: Result<Query<TenantQuery>, QueryRejection>,
) -> Response {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    match pick_tenant(&who, query.tenant.as_deref(), Action::Operate) {
        Ok(tenant) => import_form(
            &engine,
            &who,
            StatusCode::OK,
            ImportForm {
                tenant,
                ..Default::default()
            },
            None,
        ),
        Err(e) => error_page(&engine, &who, e),
    }
}

/// `POST /subscribers/import`: the good lines in one replicated import; the page names every line
/// that was not imported.
async fn import_submit(
    State(engine): State<AppState>,
    Console(who): Console,
    form: Result<Form<ImportForm>, FormRejection>,
) -> Response {
    let form = match checked_form(&engine, &who, form, crate::IMPORT_BODY_LIMIT, |f| &f.csrf) {
        Ok(f) => f,
        Err(page) => return *page,
    };
    let tenant = match pick_tenant(&who, Some(&form.tenant), Action::Operate) {
        Ok(t) => t,
        Err(e) => return error_page(&engine, &who, e),
    };
    let paste = match read_paste(&form.csv, &tenant) {
        Ok(p) => p,
        Err(why) => return import_form(&engine, &who, StatusCode::BAD_REQUEST, form, Some(why)),
    };
    let (lines, batch): (Vec<usize>, Vec<NewSubscriber>) = paste.good.into_iter().unzip();
    let results = if batch.is_empty() {
        Vec::new()
    } else {
        match engine.import_subscribers(batch).await {
            Ok(r) => r,
            Err(e) => {
                let e = ApiError::from(e);
                let why = format!("The cluster did not import the list: {}", e.message);
                return import_form(&engine, &who, e.status, form, Some(why));
            }
        }
    };
    if results.len() != lines.len() {
        tracing::error!(
            sent = lines.len(),
            answered = results.len(),
            "an import was answered for a different number of citizens than were sent"
        );
    }
    let mut created = 0;
    let mut duplicates = Vec::new();
    for (line, r) in lines.iter().zip(&results) {
        match r {
            Imported::Created(_) => created += 1,
            Imported::Duplicate(existing) => duplicates.push(LineDuplicate {
                line: *line,
                existing: existing.0,
            }),
        }
    }
    tracing::info!(
        operator = %who.actor(), tenant = %tenant, lines = paste.lines, created,
        duplicates = duplicates.len(), rejected = paste.bad.len(),
        "operator imported a list of subscribers"
    );
    let chrome = chrome(&engine, &who);
    render(
        StatusCode::OK,
        &ImportResultPage {
            drill: chrome.drill.clone(),
            chrome,
            tenant,
            created,
            lines: paste.lines,
            rejected: paste.bad,
            duplicates,
        },
    )
}

// ---- export ----

/// `GET /subscribers/export.csv?tenant=`: every citizen of the comune (personal data: the file name
/// says so).
async fn export_csv(
    State(engine): State<AppState>,
    Console(who): Console,
    query: Result<Query<TenantQuery>, QueryRejection>,
) -> Response {
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let tenant = match pick_tenant(&who, query.tenant.as_deref(), Action::Operate) {
        Ok(t) => t,
        Err(e) => return error_page(&engine, &who, e),
    };
    let mut all: Vec<Subscriber> = Vec::new();
    loop {
        match engine
            .search_subscribers(tenant.clone(), String::new(), all.len(), EXPORT_CHUNK)
            .await
        {
            Ok((page, total)) => {
                let done = page.is_empty();
                all.extend(page);
                if done || all.len() >= total {
                    break;
                }
            }
            Err(e) => return error_page(&engine, &who, ApiError::from(e)),
        }
    }
    tracing::info!(
        operator = %who.actor(), tenant = %tenant, citizens = all.len(),
        "operator downloaded the subscribers' personal data"
    );
    // Slugs are lower-case letters, digits and dashes; keep the header clean whatever comes.
    let slug: String = tenant
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"subscribers-{slug}-personal-data.csv\""),
            ),
            (header::CACHE_CONTROL, "no-store".to_string()),
        ],
        export_text(&all),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use campanile_cluster::Role;

    use super::*;
    use crate::testkit::{escaped, get_with, operator, post_with, Answer, FakeEngine};

    /// 2024-06-01T00:00:00Z: 2 in the morning of June 1st in Italy.
    const NOW_MS: u64 = 1_717_200_000_000;

    async fn get(app: &axum::Router, path: &str, who: &(String, String)) -> Answer {
        get_with(app, path, &who.0).await
    }

    /// A form posted with the operator's CSRF token added.
    async fn post(
        app: &axum::Router,
        path: &str,
        who: &(String, String),
        fields: &[(&str, &str)],
    ) -> Answer {
        let mut all = vec![("csrf", who.1.as_str())];
        all.extend_from_slice(fields);
        post_with(app, path, &who.0, &all).await
    }

    /// The real state machine with the comuni pisa and lucca, its clock at `NOW_MS`.
    fn site() -> (Arc<FakeEngine>, axum::Router) {
        let engine = Arc::new(FakeEngine::new().with_clock(NOW_MS));
        for slug in ["pisa", "lucca"] {
            engine.tenant(slug, &format!("Comune di {slug}"));
        }
        (engine.clone(), crate::router(engine))
    }

    /// The row headers (`<th scope="row">`) of the table with `id`.
    fn row_heads(html: &str, id: &str) -> Vec<String> {
        let Some(start) = html.find(&format!("id=\"{id}\"")) else {
            return Vec::new();
        };
        let table = &html[start..];
        let table = &table[..table.find("</table>").unwrap_or(table.len())];
        table
            .split("<th scope=\"row\">")
            .skip(1)
            .map(|s| s[..s.find("</th>").unwrap_or(0)].to_string())
            .collect()
    }

    #[tokio::test]
    async fn search_finds_by_name_and_by_part_of_the_number_within_the_operators_comune() {
        let (engine, app) = site();
        engine.seed_subscriber("pisa", "+393471234567", Some("Maria Rossi"), Some("Centro"));
        engine.seed_subscriber(
            "pisa",
            "+393339876543",
            Some("Luigi Bianchi"),
            Some("Marina"),
        );
        engine.seed_subscriber("lucca", "+393471234599", Some("Maria Verdi"), None);
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);

        let a = get(&app, "/subscribers", &op).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.body.contains("2 citizens registered."), "{}", a.body);
        assert!(a.body.contains("<caption>Citizens of pisa</caption>"));
        assert!(a.body.contains("<th scope=\"col\">Number</th>"));
        assert!(a.body.contains("<label for=\"q\">"));
        assert!(a.body.contains("aria-current=\"page\">Citizens</a>"));
        assert!(a.body.contains("2024-06-01"), "Italian date of NOW_MS");
        assert!(!a.body.contains("Maria Verdi"));

        let a = get(&app, "/subscribers?q=ROSSI", &op).await;
        assert!(a.body.contains("1 citizen matches “ROSSI”."), "{}", a.body);
        assert!(a.body.contains("+393471234567"));
        assert!(!a.body.contains("Bianchi"));

        // Typed the way people read numbers; lucca's +393471234599 matches too, but is not pisa's.
        let a = get(&app, "/subscribers?q=347+123", &op).await;
        assert!(a.body.contains("Maria Rossi"), "{}", a.body);
        assert!(!a.body.contains("+393471234599"));
        assert!(!a.body.contains("Bianchi"));

        let a = get(&app, "/subscribers?q=marina", &op).await;
        assert!(a.body.contains("Luigi Bianchi"));

        let a = get(&app, "/subscribers?tenant=lucca", &op).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        assert!(!a.body.contains("Maria Verdi"));
        let a = get(&app, "/subscribers/export.csv?tenant=lucca", &op).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn an_operator_of_two_comuni_chooses_which_to_list() {
        let (engine, app) = site();
        engine.seed_subscriber("lucca", "+393471234599", Some("Maria Verdi"), None);
        // Only a regional account (read-only) works for several comuni.
        let op = operator(&engine, "prefetto", Role::Regional, &["pisa", "lucca"]);
        let a = get(&app, "/subscribers", &op).await;
        assert!(a.body.contains("<select id=\"tenant\" name=\"tenant\">"));
        assert!(!a.body.contains("Maria Verdi"));
        let a = get(&app, "/subscribers?tenant=lucca", &op).await;
        assert!(a.body.contains("Maria Verdi"));
        assert!(a.body.contains("<option value=\"lucca\" selected>"));
    }

    #[tokio::test]
    async fn the_list_shows_fifty_citizens_a_page() {
        let (engine, app) = site();
        for i in 0..51 {
            engine.seed_subscriber("pisa", &format!("+39347100{i:04}"), None, None);
        }
        let op = operator(&engine, "anna", Role::Viewer, &["pisa"]);
        let a = get(&app, "/subscribers", &op).await;
        assert!(a.body.contains("51 citizens registered."));
        assert_eq!(a.body.matches("<th scope=\"row\"").count(), PAGE_SIZE);
        assert!(a.body.contains("Page 1 of 2"));
        assert!(a
            .body
            .contains("href=\"/subscribers?tenant=pisa&#38;page=2\" rel=\"next\""));
        let a = get(&app, "/subscribers?page=2", &op).await;
        assert_eq!(a.body.matches("<th scope=\"row\"").count(), 1);
        assert!(a.body.contains("+393471000050"));
        assert!(a.body.contains("rel=\"prev\""));
        // Nonsense page numbers are page 1.
        let a = get(&app, "/subscribers?page=-3", &op).await;
        assert!(a.body.contains("Page 1 of 2"));
    }

    #[tokio::test]
    async fn adding_a_citizen_makes_a_verified_subscriber_without_consent() {
        let (engine, app) = site();
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
        let a = get(&app, "/subscribers/new", &op).await;
        assert_eq!(a.status, StatusCode::OK);
        for field in ["phone", "name", "language", "zone"] {
            assert!(
                a.body.contains(&format!("<label for=\"{field}\"")),
                "{field}"
            );
        }
        let a = post(
            &app,
            "/subscribers/new",
            &op,
            &[
                ("tenant", "pisa"),
                ("phone", "347 123 4567"),
                ("name", "  Maria Rossi "),
                ("language", "de"),
                ("zone", "Porta a Mare"),
            ],
        )
        .await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
        let subs = engine.of_tenant("pisa");
        assert_eq!(subs.len(), 1);
        let s = &subs[0];
        assert_eq!(
            a.headers[header::LOCATION],
            format!("/subscribers?tenant=pisa&added={}", s.id.0)
        );
        assert_eq!(s.phone.as_str(), "+393471234567");
        assert_eq!(s.name.as_deref(), Some("Maria Rossi"));
        assert_eq!(s.language, "de");
        assert_eq!(s.zone.as_deref(), Some("Porta a Mare"));
        assert!(s.verified);
        assert_eq!(s.consent, None);
        let a = get(&app, &format!("/subscribers?added={}", s.id.0), &op).await;
        assert!(a
            .body
            .contains(&format!("Citizen added as subscriber {}.", s.id.0)));
    }

    #[tokio::test]
    async fn adding_with_a_bad_phone_shows_the_error_and_keeps_the_values() {
        let (engine, app) = site();
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
        let a = post(
            &app,
            "/subscribers/new",
            &op,
            &[
                ("tenant", "pisa"),
                ("phone", "12345"),
                ("name", "Maria Rossi"),
                ("language", "fr"),
                ("zone", "Porta a Mare"),
            ],
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        assert!(a.body.contains("id=\"phone-error\""), "{}", a.body);
        assert!(a.body.contains("aria-invalid=\"true\""));
        assert!(a.body.contains("<a href=\"#phone\">Phone number:"));
        assert!(a.body.contains("value=\"12345\""));
        assert!(a.body.contains("value=\"Maria Rossi\""));
        assert!(a.body.contains("value=\"Porta a Mare\""));
        assert!(a
            .body
            .contains("<option value=\"fr\" lang=\"fr\" selected>"));
        assert!(engine.of_tenant("pisa").is_empty());

        let long = "x".repeat(NAME_MAX + 1);
        let a = post(
            &app,
            "/subscribers/new",
            &op,
            &[
                ("phone", "3471234567"),
                ("name", &long),
                ("language", "klingon"),
            ],
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        assert!(a.body.contains("id=\"name-error\""));
        assert!(a.body.contains("id=\"language-error\""));
        assert!(!a.body.contains("id=\"phone-error\""));
        assert!(engine.of_tenant("pisa").is_empty());
    }

    #[tokio::test]
    async fn adding_a_registered_number_names_the_subscriber_holding_it() {
        let (engine, app) = site();
        let id = engine.seed_subscriber("pisa", "+393471234567", Some("Maria Rossi"), None);
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
        let a = post(
            &app,
            "/subscribers/new",
            &op,
            &[("tenant", "pisa"), ("phone", "0039 347 1234567")],
        )
        .await;
        assert_eq!(a.status, StatusCode::CONFLICT);
        assert!(
            a.body
                .contains(&format!("already registered as subscriber {id}")),
            "{}",
            a.body
        );
        assert!(a.body.contains(&format!("href=\"/subscribers/{id}\"")));
        assert_eq!(engine.of_tenant("pisa").len(), 1);
    }

    #[tokio::test]
    async fn editing_changes_the_zone() {
        let (engine, app) = site();
        let id =
            engine.seed_subscriber("pisa", "+393471234567", Some("Maria Rossi"), Some("Centro"));
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
        let a = get(&app, &format!("/subscribers/{id}"), &op).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.body.contains("value=\"Centro\""));
        let a = post(
            &app,
            &format!("/subscribers/{id}"),
            &op,
            &[
                ("name", "Maria Rossi"),
                ("language", "it"),
                ("zone", "Marina di Pisa"),
            ],
        )
        .await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
        assert_eq!(
            a.headers[header::LOCATION],
            format!("/subscribers/{id}?saved=1")
        );
        let s = engine.find(id).unwrap();
        assert_eq!(s.zone.as_deref(), Some("Marina di Pisa"));
        assert_eq!(s.name.as_deref(), Some("Maria Rossi"));
        assert_eq!(s.phone.as_str(), "+393471234567");

        // A mistake keeps what was typed and changes nothing.
        let a = post(
            &app,
            &format!("/subscribers/{id}"),
            &op,
            &[("name", "Maria"), ("language", "xx"), ("zone", "Altrove")],
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        assert!(a.body.contains("value=\"Altrove\""));
        assert_eq!(
            engine.find(id).unwrap().zone.as_deref(),
            Some("Marina di Pisa")
        );
    }

    #[tokio::test]
    async fn erasing_asks_first_then_removes_the_citizen() {
        let (engine, app) = site();
        let id = engine.seed_subscriber("pisa", "+393471234567", Some("Maria Rossi"), None);
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
        let a = get(&app, &format!("/subscribers/{id}/erase"), &op).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.body.contains("cannot be undone"));
        assert!(a.body.contains("name=\"confirm\" value=\"yes\""));
        // Posting without the confirmation only asks.
        let a = post(&app, &format!("/subscribers/{id}/erase"), &op, &[]).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.body.contains("Erase for good"));
        assert!(engine.find(id).is_some());

        let a = post(
            &app,
            &format!("/subscribers/{id}/erase"),
            &op,
            &[("confirm", "yes")],
        )
        .await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
        assert_eq!(
            a.headers[header::LOCATION],
            format!("/subscribers?tenant=pisa&erased={id}")
        );
        assert!(engine.find(id).is_none());
        let a = get(&app, &format!("/subscribers?erased={id}"), &op).await;
        assert!(a.body.contains(&format!("Subscriber {id} was erased")));
        assert!(!a.body.contains("Maria Rossi"));
    }

    #[tokio::test]
    async fn a_viewer_may_look_but_gets_403_on_add() {
        let (engine, app) = site();
        let id = engine.seed_subscriber("pisa", "+393471234567", Some("Maria Rossi"), None);
        let viewer = operator(&engine, "vera", Role::Viewer, &["pisa"]);
        let a = get(&app, "/subscribers", &viewer).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.body.contains("Maria Rossi"));
        assert!(!a.body.contains("Add a citizen"));
        assert_eq!(
            get(&app, "/subscribers/new", &viewer).await.status,
            StatusCode::FORBIDDEN
        );
        let a = post(
            &app,
            "/subscribers/new",
            &viewer,
            &[("tenant", "pisa"), ("phone", "3339876543")],
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert!(a.body.contains("your role (viewer) does not allow this"));
        assert_eq!(engine.of_tenant("pisa").len(), 1);
        let a = post(
            &app,
            &format!("/subscribers/{id}"),
            &viewer,
            &[("zone", "X")],
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        let a = post(
            &app,
            &format!("/subscribers/{id}/erase"),
            &viewer,
            &[("confirm", "yes")],
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert!(engine.find(id).is_some());
        let a = post(
            &app,
            "/subscribers/import",
            &viewer,
            &[("csv", "phone\n3339876543\n")],
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        // Details are readable; the form to change them is not offered.
        let a = get(&app, &format!("/subscribers/{id}"), &viewer).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(!a.body.contains("id=\"save\""));
    }

    #[tokio::test]
    async fn another_comunes_citizen_is_404() {
        let (engine, app) = site();
        let id = engine.seed_subscriber("lucca", "+393471234599", Some("Maria Verdi"), None);
        let op = operator(&engine, "anna", Role::Admin, &["pisa"]);
        for path in [
            format!("/subscribers/{id}"),
            format!("/subscribers/{id}/erase"),
            "/subscribers/999".to_string(),
            "/subscribers/not-a-number".to_string(),
        ] {
            let a = get(&app, &path, &op).await;
            assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
            assert!(!a.body.contains("Maria Verdi"));
        }
        let a = post(&app, &format!("/subscribers/{id}"), &op, &[("zone", "X")]).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        let a = post(
            &app,
            &format!("/subscribers/{id}/erase"),
            &op,
            &[("confirm", "yes")],
        )
        .await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        assert!(engine.find(id).is_some());
        let a = post(
            &app,
            "/subscribers/new",
            &op,
            &[("tenant", "lucca"), ("phone", "3339876543")],
        )
        .await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        assert!(engine.of_tenant("lucca").len() == 1);
    }

    #[tokio::test]
    async fn changes_without_the_sessions_csrf_token_are_refused() {
        let (engine, app) = site();
        let id = engine.seed_subscriber("pisa", "+393471234567", None, None);
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
        let forged = (op.0.clone(), "0".repeat(40));
        let a = post(
            &app,
            &format!("/subscribers/{id}/erase"),
            &forged,
            &[("confirm", "yes")],
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert!(a.body.contains("security token"));
        assert!(engine.find(id).is_some());
        let a = post(
            &app,
            "/subscribers/new",
            &forged,
            &[("phone", "3339876543")],
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        assert_eq!(engine.of_tenant("pisa").len(), 1);
    }

    #[tokio::test]
    async fn pages_without_a_login_go_to_the_login() {
        let (_, app) = site();
        let nobody = (String::new(), String::new());
        for path in ["/subscribers", "/subscribers/1", "/subscribers/export.csv"] {
            let a = get(&app, path, &nobody).await;
            assert_eq!(a.status, StatusCode::SEE_OTHER, "{path}");
            assert_eq!(a.headers[header::LOCATION], "/login");
        }
    }

    #[tokio::test]
    async fn import_names_bad_lines_and_duplicates_by_line_and_creates_the_good_ones() {
        let (engine, app) = site();
        let existing = engine.seed_subscriber("pisa", "+393471234567", Some("Maria Rossi"), None);
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
        let csv = "\u{feff}phone,name,language,zone\r\n\
                   +393471110001,Anna Neri,it,Centro\r\n\
                   12345,Numero Sbagliato,it,Centro\r\n\
                   \"+393471110002\",\"Rossi, Maria \"\"Mariuccia\"\"\",en,\"Porta a Mare\"\r\n\
                   347 123 4567,Già registrata,,\r\n\
                   3471110003,,,\r\n\
                   \r\n";
        let a = post(
            &app,
            "/subscribers/import",
            &op,
            &[("tenant", "pisa"), ("csv", csv)],
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert!(
            a.body
                .contains("<strong id=\"created\">3 citizens imported</strong>"),
            "{}",
            a.body
        );
        assert!(a.body.contains("out of 5 lines"));
        assert_eq!(row_heads(&a.body, "rejected"), vec!["3"]);
        assert!(a.body.contains("not a valid number") || a.body.contains("not a phone number"));
        assert_eq!(row_heads(&a.body, "duplicates"), vec!["5"]);
        assert!(a.body.contains(&format!(
            "<a href=\"/subscribers/{existing}\">subscriber {existing}</a>"
        )));

        let subs = engine.of_tenant("pisa");
        assert_eq!(subs.len(), 4);
        let quoted = subs
            .iter()
            .find(|s| s.phone.as_str() == "+393471110002")
            .unwrap();
        assert_eq!(quoted.name.as_deref(), Some("Rossi, Maria \"Mariuccia\""));
        assert_eq!(quoted.language, "en");
        assert_eq!(quoted.zone.as_deref(), Some("Porta a Mare"));
        let bare = subs
            .iter()
            .find(|s| s.phone.as_str() == "+393471110003")
            .unwrap();
        assert_eq!((bare.name.as_deref(), bare.language.as_str()), (None, "it"));
        assert!(subs.iter().all(|s| s.verified && s.consent.is_none()));
        let rossi = engine.find(existing).unwrap();
        assert_eq!(rossi.name.as_deref(), Some("Maria Rossi"), "left as it was");
    }

    #[tokio::test]
    async fn an_import_over_the_limit_is_refused_naming_the_limit() {
        let (engine, app) = site();
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
        let mut csv = String::from("phone,name\n");
        for i in 0..=IMPORT_MAX {
            csv.push_str(&format!("+39347{i:07},Cittadino numero {i}\n"));
        }
        assert!(
            csv.len() > crate::BODY_LIMIT,
            "larger than the usual body limit"
        );
        let a = post(
            &app,
            "/subscribers/import",
            &op,
            &[("tenant", "pisa"), ("csv", &csv)],
        )
        .await;
        assert_eq!(
            a.status,
            StatusCode::BAD_REQUEST,
            "{}",
            &a.body[..a.body.len().min(500)]
        );
        assert!(a
            .body
            .contains(&format!("{} lines of citizens", IMPORT_MAX + 1)));
        assert!(a.body.contains(&format!("at most {IMPORT_MAX}")));
        assert!(
            a.body.contains("Cittadino numero 4999"),
            "the paste is kept"
        );
        assert!(engine.of_tenant("pisa").is_empty());
    }

    #[tokio::test]
    async fn a_paste_without_a_usable_header_is_refused_whole() {
        let (engine, app) = site();
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
        for (csv, says) in [
            ("3471234567,Maria\n", "not the header"),
            (
                "telefono,nome\n3471234567,Maria\n",
                "`telefono` that is not known",
            ),
            ("name,zone\nMaria,Centro\n", "no `phone` column"),
            ("phone,phone\n3471234567,3471234568\n", "twice"),
            ("\n\n", "The list is empty"),
        ] {
            let a = post(
                &app,
                "/subscribers/import",
                &op,
                &[("tenant", "pisa"), ("csv", csv)],
            )
            .await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{csv}");
            assert!(a.body.contains(&escaped(says)), "{csv}: {}", a.body);
        }
        assert!(engine.of_tenant("pisa").is_empty());
    }

    #[tokio::test]
    async fn export_round_trips_through_the_parser_and_defuses_formulas() {
        let (engine, app) = site();
        let formula = "=cmd|' /C calc'!A0";
        let a = engine.seed_subscriber("pisa", "+393471234567", Some(formula), Some("@zona"));
        let b = engine.seed_subscriber(
            "pisa",
            "+393339876543",
            Some("Rossi, \"Nina\"\nseconda riga"),
            Some("Niccolò"),
        );
        engine.seed_subscriber("lucca", "+393471234599", Some("Maria Verdi"), None);
        // All of a comune's personal data: a viewer may look, not take it away.
        let viewer = operator(&engine, "vera", Role::Viewer, &["pisa"]);
        let resp = get(&app, "/subscribers/export.csv?tenant=pisa", &viewer).await;
        assert_eq!(resp.status, StatusCode::FORBIDDEN);
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
        let resp = get(&app, "/subscribers/export.csv?tenant=pisa", &op).await;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(
            resp.headers[header::CONTENT_DISPOSITION],
            "attachment; filename=\"subscribers-pisa-personal-data.csv\""
        );
        assert!(resp.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/csv"));
        assert!(!resp.body.contains("Maria Verdi"));

        let records = parse_csv(&resp.body);
        let rows: Vec<Vec<String>> = records.into_iter().map(|r| r.fields.unwrap()).collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].join(","), EXPORT_HEADER);
        assert_eq!(
            rows[1],
            vec![
                "+393471234567".to_string(),
                format!("'{formula}"),
                "it".into(),
                "'@zona".into(),
                a.to_string(),
                "yes".into(),
                "2024-06-01T00:00:00Z".into(),
            ]
        );
        assert_eq!(rows[2][1], "Rossi, \"Nina\"\nseconda riga");
        assert_eq!(rows[2][3], "Niccolò");
        assert_eq!(rows[2][4], b.to_string());

        // The file imports as it is, and the defused cells come back as they were.
        let op2 = operator(&engine, "admin", Role::Admin, &["lucca"]);
        let r = post(
            &app,
            "/subscribers/import",
            &op2,
            &[("tenant", "lucca"), ("csv", &resp.body)],
        )
        .await;
        assert!(r.body.contains("2 citizens imported"), "{}", r.body);
        let lucca = engine.of_tenant("lucca");
        let copy = lucca
            .iter()
            .find(|s| s.phone.as_str() == "+393471234567")
            .unwrap();
        assert_eq!(copy.name.as_deref(), Some(formula));
        assert_eq!(copy.zone.as_deref(), Some("@zona"));
    }

    #[tokio::test]
    async fn a_script_in_a_name_is_shown_escaped() {
        let (engine, app) = site();
        let script = "<script>alert(1)</script>";
        let id = engine.seed_subscriber("pisa", "+393471234567", Some(script), Some(script));
        let op = operator(&engine, "anna", Role::Operator, &["pisa"]);
        for path in [
            "/subscribers".to_string(),
            format!("/subscribers/{id}"),
            format!("/subscribers/{id}/erase"),
        ] {
            let a = get(&app, &path, &op).await;
            assert!(
                a.body.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
                "{path}"
            );
            assert!(!a.body.contains(script), "{path}");
        }
        let a = get(&app, "/subscribers?q=%3Cscript%3E", &op).await;
        assert!(a.body.contains("&#60;script&#62;"));
        assert!(!a.body.contains(script));
    }

    // ---- the pieces ----

    fn fields(text: &str) -> Vec<(usize, Result<Vec<String>, String>)> {
        parse_csv(text)
            .into_iter()
            .map(|r| (r.line, r.fields))
            .collect()
    }

    fn ok(line: usize, f: &[&str]) -> (usize, Result<Vec<String>, String>) {
        (line, Ok(f.iter().map(|s| s.to_string()).collect()))
    }

    #[test]
    fn csv_reads_quotes_commas_doubled_quotes_crlf_bom_and_a_trailing_line() {
        assert_eq!(
            fields("\u{feff}a,b\r\n\"x, y\",\"say \"\"hi\"\"\"\r\n,\r\n"),
            vec![
                ok(1, &["a", "b"]),
                ok(2, &["x, y", "say \"hi\""]),
                ok(3, &["", ""])
            ]
        );
        assert_eq!(
            fields("a\n\nb"),
            vec![ok(1, &["a"]), ok(2, &[""]), ok(3, &["b"])]
        );
        assert_eq!(fields("a\rb\r"), vec![ok(1, &["a"]), ok(2, &["b"])]);
        assert_eq!(fields(""), vec![]);
        assert_eq!(fields("\"\""), vec![ok(1, &[""])]);
        assert_eq!(fields("a,"), vec![ok(1, &["a", ""])]);
        // A quote inside an unquoted field is an ordinary character.
        assert_eq!(
            fields("Mario \"Il Grande\",x"),
            vec![ok(1, &["Mario \"Il Grande\"", "x"])]
        );
        assert_eq!(fields("città,perché"), vec![ok(1, &["città", "perché"])]);
    }

    #[test]
    fn csv_line_numbers_count_lines_inside_quoted_fields() {
        assert_eq!(
            fields("h\n\"one\r\ntwo\",x\nlast\n"),
            vec![ok(1, &["h"]), ok(2, &["one\r\ntwo", "x"]), ok(4, &["last"])]
        );
    }

    #[test]
    fn a_broken_record_costs_only_its_own_line() {
        let got = fields("h\n\"never closed,x\nnext,1\n");
        assert_eq!(got[0], ok(1, &["h"]));
        assert_eq!(got[1].0, 2);
        assert!(got[1].1.as_ref().unwrap_err().contains("never closed"));
        assert_eq!(got[2], ok(3, &["next", "1"]));

        let got = fields("\"ab\"c,d\ne,f\n");
        assert!(got[0]
            .1
            .as_ref()
            .unwrap_err()
            .contains("closing double quote"));
        assert_eq!(got[1], ok(2, &["e", "f"]));
    }

    #[test]
    fn written_fields_read_back_as_they_were() {
        let tricky = [
            "",
            "plain",
            "a,b",
            "say \"hi\"",
            "\"",
            "two\r\nlines",
            " padded ",
            "Niccolò d'Arezzo",
            "+393471234567",
        ];
        let mut line = String::new();
        for (i, v) in tricky.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            push_field(&mut line, v, true);
        }
        let back = parse_csv(&line);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].fields.as_ref().unwrap(), &tricky);
    }

    #[test]
    fn formulas_are_defused_except_in_the_phone_column() {
        for (v, want) in [
            ("=1+1", "'=1+1"),
            ("+39", "'+39"),
            ("-2", "'-2"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("=a,b", "\"'=a,b\""),
            ("ok=1", "ok=1"),
        ] {
            let mut out = String::new();
            push_field(&mut out, v, false);
            assert_eq!(out, want, "{v}");
            assert_eq!(
                unneutralise(&parse_csv(&out)[0].fields.clone().unwrap()[0]),
                v
            );
        }
        let mut out = String::new();
        push_field(&mut out, "+393471234567", true);
        assert_eq!(out, "+393471234567");
        assert_eq!(unneutralise("'quoted"), "'quoted");
    }

    #[test]
    fn a_line_with_more_fields_than_the_header_is_refused_with_a_hint() {
        let cols = columns(&["phone".into(), "name".into()]).unwrap();
        let why = read_line(
            &["3471234567".into(), "Rossi".into(), " Maria".into()],
            &cols,
            "pisa",
        )
        .unwrap_err();
        assert!(why.contains("double quotes"), "{why}");
        let s = read_line(&["3471234567".into()], &cols, "pisa").unwrap();
        assert_eq!((s.name, s.language.as_str()), (None, "it"));
        let why = read_line(&["".into(), "x".repeat(101)], &cols, "pisa").unwrap_err();
        assert!(
            why.starts_with("phone: ") && why.contains("; name: at most 100"),
            "{why}"
        );
    }

    #[test]
    fn a_search_that_looks_like_a_number_loses_its_separators() {
        assert_eq!(search_text(" 347 123 45 "), "34712345");
        assert_eq!(search_text("0039 347-123"), "+39347123");
        assert_eq!(search_text("+39 347"), "+39347");
        assert_eq!(search_text("Rossi"), "Rossi");
        assert_eq!(search_text("Zona 3-4"), "Zona 3-4");
        assert_eq!(search_text("3-4"), "3-4");
    }
}
