//! The citizen portal: each tenant's public registration page (`/r/{tenant}`), its QR code and a
//! printable poster. It is the only part of the HTTP surface a citizen sees, so it is Italian first
//! (English with `?lang=en`), works on a phone with a keyboard or a screen reader, never asks for a
//! token, and keeps the exact privacy notice a citizen accepted with the subscriber. Registrations are
//! throttled per client address and per number on this node, because each one will cost a
//! verification call.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use campanile_cluster::{
    Consent, NewSubscriber, PhoneError, PhoneNumber, Tenant, VerificationPurpose,
};
use serde::Deserialize;

use crate::api::{AppState, LANGUAGES};
use crate::engine::EngineError;

/// Longest name a citizen may give.
pub const NAME_MAX: usize = 100;
/// Longest zone a citizen may give.
pub const ZONE_MAX: usize = 64;
/// Registrations one client address may make per [`IP_WINDOW`].
pub const IP_LIMIT: usize = 5;
/// The window [`IP_LIMIT`] counts over.
pub const IP_WINDOW: Duration = Duration::from_secs(10 * 60);
/// Registrations one phone number may receive per [`PHONE_WINDOW`].
pub const PHONE_LIMIT: usize = 3;
/// The window [`PHONE_LIMIT`] counts over.
pub const PHONE_WINDOW: Duration = Duration::from_secs(60 * 60);
/// Pixels per QR module in the PNG.
pub const QR_PNG_SCALE: usize = 8;
/// Light modules around the symbol, as ISO/IEC 18004 requires for reliable scanning.
pub const QR_QUIET_ZONE: usize = 4;

/// The portal's routes; they sit outside `/api/v1` and need no token.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/r/{tenant}", get(form).post(register))
        .route("/r/{tenant}/qr.svg", get(qr_svg))
        .route("/r/{tenant}/qr.png", get(qr_png))
        .route("/r/{tenant}/poster", get(poster))
        .route("/r/{tenant}/verify", post(verify))
        .route("/r/{tenant}/call-again", post(call_again))
        .route(
            "/r/{tenant}/unsubscribe",
            get(unsubscribe_form).post(unsubscribe),
        )
        .layer(Extension(Arc::new(Throttle::default())))
}

// ---- languages and wording ----

/// The language a portal page is shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    It,
    En,
}

impl Lang {
    /// From the request's `?lang=` (Italian unless it says `en`).
    fn of(uri: &Uri) -> Lang {
        let asked = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.strip_prefix("lang="))
            .next_back();
        match asked {
            Some("en") => Lang::En,
            _ => Lang::It,
        }
    }

    fn texts(self) -> &'static Texts {
        match self {
            Lang::It => &IT,
            Lang::En => &EN,
        }
    }
}

/// Every fixed sentence of the portal in one language.
pub struct Texts {
    pub code: &'static str,
    pub other_code: &'static str,
    pub other_name: &'static str,
    pub switch_nav: &'static str,
    pub register_title: &'static str,
    pub intro: &'static str,
    pub required: &'static str,
    pub phone_label: &'static str,
    pub phone_hint: &'static str,
    pub name_label: &'static str,
    pub language_label: &'static str,
    pub language_hint: &'static str,
    pub zone_label: &'static str,
    pub zone_hint: &'static str,
    pub consent_heading: &'static str,
    pub consent_label: &'static str,
    pub submit: &'static str,
    pub error_summary: &'static str,
    pub error_prefix: &'static str,
    pub phone_empty: &'static str,
    pub phone_invalid: &'static str,
    pub name_long: &'static str,
    pub zone_long: &'static str,
    pub language_bad: &'static str,
    pub consent_missing: &'static str,
    pub form_unreadable: &'static str,
    pub conflict_title: &'static str,
    pub conflict_body: &'static str,
    pub throttled_title: &'static str,
    pub throttled_body: &'static str,
    pub not_found_title: &'static str,
    pub not_found_body: &'static str,
    pub unavailable_title: &'static str,
    pub unavailable_body: &'static str,
    pub refused_title: &'static str,
    pub bad_host_title: &'static str,
    pub bad_host_body: &'static str,
    pub back: &'static str,
    pub code_title: &'static str,
    pub code_calling: &'static str,
    pub code_calling_unsubscribe: &'static str,
    pub code_label: &'static str,
    pub code_hint: &'static str,
    pub code_submit: &'static str,
    pub code_wrong: &'static str,
    pub call_again: &'static str,
    pub verified_title: &'static str,
    pub verified_body: &'static str,
    pub erased_title: &'static str,
    pub erased_body: &'static str,
    pub unsubscribe_link: &'static str,
    pub unsubscribe_title: &'static str,
    pub unsubscribe_intro: &'static str,
    pub unsubscribe_submit: &'static str,
}

const IT: Texts = Texts {
    code: "it",
    other_code: "en",
    other_name: "English",
    switch_nav: "Lingua della pagina",
    register_title: "Registrati alle allerte",
    intro: "In caso di emergenza (alluvione, incendio, acqua non potabile…) il Comune ti telefona e ti fa \
            ascoltare un messaggio. Il servizio è gratuito, su cellulare o telefono fisso.",
    required: "(obbligatorio)",
    phone_label: "Numero di telefono",
    phone_hint: "Cellulare o fisso, ad esempio 347 123 4567. Per un numero estero scrivi anche il prefisso (+41…).",
    name_label: "Nome (facoltativo)",
    language_label: "Lingua delle chiamate",
    language_hint: "La lingua in cui ascolterai i messaggi, quando disponibile.",
    zone_label: "Zona, frazione o quartiere (facoltativo)",
    zone_hint: "Serve per le allerte che riguardano una sola zona. Al massimo 64 caratteri.",
    consent_heading: "Informativa sulla privacy",
    consent_label: "Ho letto l'informativa e acconsento al trattamento dei miei dati",
    submit: "Registrati",
    error_summary: "Controlla i campi segnalati",
    error_prefix: "Errore:",
    phone_empty: "Scrivi il numero di telefono.",
    phone_invalid: "Questo non sembra un numero di telefono valido: controlla le cifre e il prefisso.",
    name_long: "Il nome può avere al massimo 100 caratteri.",
    zone_long: "La zona può avere al massimo 64 caratteri.",
    language_bad: "Scegli una delle lingue dell'elenco.",
    consent_missing: "Per registrarti devi accettare l'informativa sulla privacy.",
    form_unreadable: "Il modulo non è arrivato completo: compilalo e invialo di nuovo.",
    conflict_title: "Numero già registrato",
    conflict_body: "Questo numero è già registrato per le allerte del {comune}: non serve registrarlo di nuovo.",
    throttled_title: "Troppe registrazioni",
    throttled_body: "Abbiamo ricevuto troppe registrazioni da questa connessione o per questo numero. \
                     Riprova tra {minutes} minuti.",
    not_found_title: "Pagina non trovata",
    not_found_body: "Nessun comune usa questo indirizzo. Controlla il link o chiedi al tuo Comune quello giusto.",
    unavailable_title: "Servizio momentaneamente non disponibile",
    unavailable_body: "Non riusciamo a completare la richiesta in questo momento. Riprova tra qualche minuto.",
    refused_title: "Registrazione non riuscita",
    bad_host_title: "Richiesta non valida",
    bad_host_body: "Il nome del server nella richiesta (intestazione Host) non è valido: apri la pagina \
                    dall'indirizzo pubblico del servizio.",
    back: "Torna al modulo",
    code_title: "Ti stiamo chiamando",
    code_calling: "Tra poco il numero {phone} riceverà una chiamata che legge un codice di 6 cifre. \
                   Scrivilo qui sotto per confermare che il numero è tuo.",
    code_calling_unsubscribe: "Se il numero {phone} è registrato, tra poco riceverà una chiamata che legge \
                               un codice di 6 cifre. Scrivilo qui sotto per cancellare la registrazione.",
    code_label: "Codice ricevuto per telefono",
    code_hint: "6 cifre. Il codice vale 10 minuti.",
    code_submit: "Conferma",
    code_wrong: "Il codice non è giusto o è scaduto. Controlla le cifre, oppure chiedi una nuova chiamata.",
    call_again: "Non è arrivata la chiamata? Chiamami di nuovo",
    verified_title: "Numero confermato",
    verified_body: "Grazie: il numero {phone} riceverà le allerte del {comune}.",
    erased_title: "Registrazione cancellata",
    erased_body: "Il numero {phone} e i dati che avevi lasciato sono stati cancellati: non riceverai più \
                  le allerte del {comune}.",
    unsubscribe_link: "Non vuoi più ricevere le allerte? Cancella la registrazione",
    unsubscribe_title: "Cancella la registrazione",
    unsubscribe_intro: "Scrivi il numero registrato: riceverà una chiamata con un codice per confermare \
                        che sei tu. Poi i tuoi dati saranno cancellati.",
    unsubscribe_submit: "Chiamami con il codice",
};

const EN: Texts = Texts {
    code: "en",
    other_code: "it",
    other_name: "Italiano",
    switch_nav: "Page language",
    register_title: "Sign up for alerts",
    intro: "In an emergency (flood, fire, unsafe tap water…) the comune calls you and plays you a message. \
            The service is free, on a mobile or a landline.",
    required: "(required)",
    phone_label: "Phone number",
    phone_hint: "Mobile or landline, for example 347 123 4567. For a number outside Italy also type its prefix (+41…).",
    name_label: "Name (optional)",
    language_label: "Language of the calls",
    language_hint: "The language you will hear the messages in, when available.",
    zone_label: "Zone, hamlet or neighbourhood (optional)",
    zone_hint: "Used for alerts that concern one area only. Up to 64 characters.",
    consent_heading: "Privacy notice",
    consent_label: "I have read the notice and consent to the processing of my data",
    submit: "Sign up",
    error_summary: "Please check these fields",
    error_prefix: "Error:",
    phone_empty: "Type your phone number.",
    phone_invalid: "This does not look like a valid phone number: check the digits and the prefix.",
    name_long: "The name can be at most 100 characters long.",
    zone_long: "The zone can be at most 64 characters long.",
    language_bad: "Choose one of the languages in the list.",
    consent_missing: "To sign up you must accept the privacy notice.",
    form_unreadable: "The form did not arrive complete: please fill it in and send it again.",
    conflict_title: "Number already registered",
    conflict_body: "This number is already registered for alerts from the {comune}: there is no need to \
                    register it again.",
    throttled_title: "Too many registrations",
    throttled_body: "We received too many registrations from this connection or for this number. \
                     Please try again in {minutes} minutes.",
    not_found_title: "Page not found",
    not_found_body: "No comune uses this address. Check the link or ask your comune for the right one.",
    unavailable_title: "Service temporarily unavailable",
    unavailable_body: "We cannot complete the request right now. Please try again in a few minutes.",
    refused_title: "Registration failed",
    bad_host_title: "Bad request",
    bad_host_body: "The server name in the request (Host header) is not valid: open the page from the \
                    service's public address.",
    back: "Back to the form",
    code_title: "We are calling you",
    code_calling: "In a moment {phone} will get a call that reads a 6-digit code. Type it below to \
                   confirm the number is yours.",
    code_calling_unsubscribe: "If {phone} is registered, it will get a call in a moment that reads a \
                               6-digit code. Type it below to cancel the registration.",
    code_label: "Code from the call",
    code_hint: "6 digits. The code is valid for 10 minutes.",
    code_submit: "Confirm",
    code_wrong: "The code is wrong or has expired. Check the digits, or ask for a new call.",
    call_again: "No call? Call me again",
    verified_title: "Number confirmed",
    verified_body: "Thank you: {phone} will receive the alerts of {comune}.",
    erased_title: "Registration cancelled",
    erased_body: "The number {phone} and the details you gave have been erased: you will no longer \
                  receive the alerts of {comune}.",
    unsubscribe_link: "No longer want the alerts? Cancel your registration",
    unsubscribe_title: "Cancel your registration",
    unsubscribe_intro: "Type the registered number: it will get a call with a code to confirm it is you. \
                        Then your details are erased.",
    unsubscribe_submit: "Call me with the code",
};

/// The names the language menu offers, each in its own language.
const LANGUAGE_NAMES: [(&str, &str); 5] = [
    ("it", "Italiano"),
    ("en", "English"),
    ("de", "Deutsch"),
    ("fr", "Français"),
    ("es", "Español"),
];

/// The tenant as a sentence names it: "Comune di Pisa" whether it was created as "Comune di Pisa" or
/// as "Pisa".
fn comune(name: &str) -> String {
    let starts_with_comune = name
        .get(..6)
        .is_some_and(|head| head.eq_ignore_ascii_case("comune"));
    if starts_with_comune {
        name.to_string()
    } else {
        format!("Comune di {name}")
    }
}

/// The privacy notice shown on the form; the subscriber keeps it word for word as its consent.
pub fn consent_text(lang: Lang, tenant_name: &str) -> String {
    let comune = comune(tenant_name);
    match lang {
        Lang::It => format!(
            "Titolare del trattamento è il {comune}. I dati che inserisci (il numero di telefono e, se li \
             indichi, nome, lingua e zona) sono trattati solo per chiamarti con messaggi di allerta e di \
             protezione civile e per verificare che il numero sia tuo, sulla base del tuo consenso (art. 6, \
             par. 1, lett. a del Regolamento UE 2016/679). Non sono ceduti a terzi né usati per altri \
             scopi e sono conservati finché resti iscritto. Puoi revocare il consenso e chiedere la \
             cancellazione dei dati in qualsiasi momento rivolgendoti al Comune; la revoca non rende \
             illecite le chiamate già fatte. Puoi anche proporre reclamo al Garante per la protezione dei \
             dati personali."
        ),
        Lang::En => format!(
            "The data controller is the {comune}. The data you enter (your phone number and, if you give \
             them, name, language and zone) are processed only to call you with emergency and civil \
             protection messages and to check that the number is yours, on the basis of your consent \
             (Art. 6(1)(a) of Regulation (EU) 2016/679). They are not passed on to anyone else or used for \
             any other purpose, and are kept for as long as you stay registered. You can withdraw your \
             consent and ask for your data to be erased at any time by contacting the comune; withdrawing \
             does not make calls already made unlawful. You may also complain to the Italian data \
             protection authority (Garante per la protezione dei dati personali)."
        ),
    }
}

// ---- templates ----

/// What every portal page shows around its content.
pub struct Chrome {
    pub t: &'static Texts,
    /// The tenant's display name, or empty when there is no tenant (a 404).
    pub tenant_name: String,
}

/// One entry of the language menu.
pub struct LanguageChoice {
    pub code: &'static str,
    pub label: &'static str,
    pub selected: bool,
}

/// What the citizen typed, kept to fill the form again after an error.
#[derive(Debug, Default, Deserialize)]
pub struct RegistrationForm {
    #[serde(default)]
    pub phone: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub language: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub consent: Option<String>,
}

/// One message per field that was refused.
#[derive(Debug, Default)]
pub struct FieldErrors {
    pub form: Option<&'static str>,
    pub phone: Option<&'static str>,
    pub name: Option<&'static str>,
    pub language: Option<&'static str>,
    pub zone: Option<&'static str>,
    pub consent: Option<&'static str>,
}

impl FieldErrors {
    pub fn any(&self) -> bool {
        self.form.is_some()
            || self.phone.is_some()
            || self.name.is_some()
            || self.language.is_some()
            || self.zone.is_some()
            || self.consent.is_some()
    }
}

#[derive(Template)]
#[template(path = "portal_register.html")]
struct RegisterPage {
    drill: Option<String>,
    c: Chrome,
    slug: String,
    heading: String,
    consent_text: String,
    form: RegistrationForm,
    consent_checked: bool,
    languages: Vec<LanguageChoice>,
    errors: FieldErrors,
}

#[derive(Template)]
#[template(path = "portal_message.html")]
struct MessagePage {
    drill: Option<String>,
    c: Chrome,
    title: &'static str,
    paragraphs: Vec<String>,
    /// Where "back to the form" leads, if anywhere.
    back: Option<String>,
    notice: bool,
}

#[derive(Template)]
#[template(path = "portal_code.html")]
struct CodePage {
    drill: Option<String>,
    c: Chrome,
    slug: String,
    phone: String,
    purpose: &'static str,
    calling: String,
    error: Option<&'static str>,
}

#[derive(Template)]
#[template(path = "portal_unsubscribe.html")]
struct UnsubscribePage {
    drill: Option<String>,
    c: Chrome,
    slug: String,
    phone: String,
    error: Option<&'static str>,
}

#[derive(Template)]
#[template(path = "portal_poster.html")]
struct PosterPage {
    drill: Option<String>,
    tenant_name: String,
    comune: String,
    url: String,
    qr_svg: String,
}

/// What a page answers when its own template fails: plain, in both languages.
const RENDER_FAILED: &str = "<!doctype html><html lang=\"it\"><head><meta charset=\"utf-8\">\
<title>Errore</title></head><body><h1>Errore interno</h1><p>La pagina non può essere mostrata. Riprova più \
tardi.</p><p lang=\"en\">Internal error: the page cannot be shown. Please try again later.</p></body></html>";

fn html(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(body) => (status, Html(body)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot render a citizen portal page");
            (StatusCode::INTERNAL_SERVER_ERROR, Html(RENDER_FAILED)).into_response()
        }
    }
}

fn message(
    engine: &AppState,
    status: StatusCode,
    c: Chrome,
    title: &'static str,
    paragraphs: Vec<String>,
    back: Option<String>,
) -> Response {
    let page = MessagePage {
        drill: engine.drill_mode(),
        c,
        title,
        paragraphs,
        back,
        notice: status.is_success(),
    };
    html(status, &page)
}

// ---- tenant lookup ----

/// The tenant named in the path, or the page that says why there is none.
async fn tenant(engine: &AppState, slug: &str, lang: Lang) -> Result<Tenant, Response> {
    let t = lang.texts();
    let found = if Tenant::valid_slug(slug) {
        engine
            .tenants()
            .await
            .map(|all| all.into_iter().find(|tenant| tenant.slug == slug))
    } else {
        Ok(None)
    };
    let chrome = || Chrome {
        t,
        tenant_name: String::new(),
    };
    match found {
        Ok(Some(tenant)) => Ok(tenant),
        Ok(None) | Err(EngineError::NotFound(_)) => Err(message(
            engine,
            StatusCode::NOT_FOUND,
            chrome(),
            t.not_found_title,
            vec![t.not_found_body.to_string()],
            None,
        )),
        Err(e) => {
            tracing::warn!(error = %e, tenant = slug, "citizen portal cannot list tenants");
            Err(message(
                engine,
                StatusCode::SERVICE_UNAVAILABLE,
                chrome(),
                t.unavailable_title,
                vec![t.unavailable_body.to_string()],
                None,
            ))
        }
    }
}

fn register_page(
    engine: &AppState,
    tenant: &Tenant,
    lang: Lang,
    form: RegistrationForm,
    errors: FieldErrors,
) -> RegisterPage {
    let t = lang.texts();
    let chosen = if form.language.is_empty() {
        t.code
    } else {
        form.language.as_str()
    };
    let languages = LANGUAGE_NAMES
        .iter()
        .map(|&(code, label)| LanguageChoice {
            code,
            label,
            selected: code == chosen,
        })
        .collect();
    let heading = match lang {
        Lang::It => format!("Ricevi le allerte del {}", comune(&tenant.name)),
        Lang::En => format!("Get alerts from the {}", comune(&tenant.name)),
    };
    RegisterPage {
        drill: engine.drill_mode(),
        c: Chrome {
            t,
            tenant_name: tenant.name.clone(),
        },
        slug: tenant.slug.clone(),
        heading,
        consent_text: consent_text(lang, &tenant.name),
        consent_checked: form.consent.is_some(),
        form,
        languages,
        errors,
    }
}

// ---- registration ----

/// `GET /r/{tenant}`: the registration form.
async fn form(State(engine): State<AppState>, Path(slug): Path<String>, uri: Uri) -> Response {
    let lang = Lang::of(&uri);
    let tenant = match tenant(&engine, &slug, lang).await {
        Ok(t) => t,
        Err(page) => return page,
    };
    let page = register_page(
        &engine,
        &tenant,
        lang,
        RegistrationForm::default(),
        FieldErrors::default(),
    );
    html(StatusCode::OK, &page)
}

/// A registration that passed every check.
struct Registration {
    phone: PhoneNumber,
    name: Option<String>,
    language: String,
    zone: Option<String>,
}

/// Checks every field and answers all that are wrong at once.
fn validate(form: &RegistrationForm, t: &'static Texts) -> Result<Registration, FieldErrors> {
    let mut errors = FieldErrors::default();
    let phone = match PhoneNumber::parse(&form.phone) {
        Ok(p) => Some(p),
        Err(PhoneError::Empty) => {
            errors.phone = Some(t.phone_empty);
            None
        }
        Err(_) => {
            errors.phone = Some(t.phone_invalid);
            None
        }
    };
    let optional = |s: &str| Some(s.trim().to_string()).filter(|s| !s.is_empty());
    let name = optional(&form.name);
    if name.as_ref().is_some_and(|n| n.chars().count() > NAME_MAX) {
        errors.name = Some(t.name_long);
    }
    let zone = optional(&form.zone);
    if zone.as_ref().is_some_and(|z| z.chars().count() > ZONE_MAX) {
        errors.zone = Some(t.zone_long);
    }
    if !LANGUAGES.contains(&form.language.as_str()) {
        errors.language = Some(t.language_bad);
    }
    if form.consent.is_none() {
        errors.consent = Some(t.consent_missing);
    }
    match phone {
        Some(phone) if !errors.any() => Ok(Registration {
            phone,
            name,
            language: form.language.clone(),
            zone,
        }),
        _ => Err(errors),
    }
}

/// The client's address, for throttling: the connection's peer when the server records it, else
/// `unknown`. IPv6 clients count per /64, the block one household or phone usually holds.
pub struct ClientAddr(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let addr = match parts.extensions.get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(peer)) => match peer.ip().to_canonical() {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => {
                    let s = v6.segments();
                    format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
            },
            None => "unknown".to_string(),
        };
        Ok(ClientAddr(addr))
    }
}

/// `POST /r/{tenant}`: registers a citizen, unverified, with the consent they gave.
async fn register(
    State(engine): State<AppState>,
    Extension(throttle): Extension<Arc<Throttle>>,
    Path(slug): Path<String>,
    uri: Uri,
    ClientAddr(client): ClientAddr,
    body: Result<Form<RegistrationForm>, FormRejection>,
) -> Response {
    let lang = Lang::of(&uri);
    let t = lang.texts();
    let tenant = match tenant(&engine, &slug, lang).await {
        Ok(t) => t,
        Err(page) => return page,
    };
    let form = match body {
        Ok(Form(form)) => form,
        Err(rejection) => {
            tracing::debug!(error = %rejection, tenant = %tenant.slug, "unreadable registration form");
            let errors = FieldErrors {
                form: Some(t.form_unreadable),
                ..FieldErrors::default()
            };
            let page = register_page(&engine, &tenant, lang, RegistrationForm::default(), errors);
            return html(StatusCode::BAD_REQUEST, &page);
        }
    };
    let reg = match validate(&form, t) {
        Ok(reg) => reg,
        Err(errors) => {
            let page = register_page(&engine, &tenant, lang, form, errors);
            return html(StatusCode::BAD_REQUEST, &page);
        }
    };
    let chrome = || Chrome {
        t,
        tenant_name: tenant.name.clone(),
    };
    let back = Some(format!("/r/{}?lang={}", tenant.slug, t.code));
    // Counted before the engine answers, so a number already registered costs an attempt too: the
    // 409 tells whether a number is registered, and this bounds how fast anyone can ask.
    if let Err(wait) = throttle.admit(&client, reg.phone.as_str(), Instant::now()) {
        tracing::info!(
            tenant = %tenant.slug, client = %client, phone = %reg.phone.masked(),
            "citizen registration throttled"
        );
        let minutes = wait.as_secs().div_ceil(60).max(1);
        let mut resp = message(
            &engine,
            StatusCode::TOO_MANY_REQUESTS,
            chrome(),
            t.throttled_title,
            vec![t.throttled_body.replace("{minutes}", &minutes.to_string())],
            back,
        );
        let retry_after = HeaderValue::from(wait.as_secs().max(1));
        resp.headers_mut().insert(header::RETRY_AFTER, retry_after);
        return resp;
    }
    let comune = comune(&tenant.name);
    let masked = reg.phone.masked();
    let subscriber = NewSubscriber {
        tenant: tenant.slug.clone(),
        phone: reg.phone.clone(),
        name: reg.name,
        language: reg.language,
        zone: reg.zone,
        verified: false,
        consent: Some(Consent {
            text: consent_text(lang, &tenant.name),
            at_ms: crate::auth::now_ms(),
        }),
    };
    match engine.register_citizen(subscriber).await {
        Ok(s) => {
            tracing::info!(tenant = %tenant.slug, phone = %masked, id = %s.id, "citizen registered on the public page");
            call_for_code(
                &engine,
                &tenant,
                lang,
                reg.phone,
                VerificationPurpose::Register,
            )
            .await
        }
        Err(EngineError::Conflict(_)) => {
            tracing::info!(tenant = %tenant.slug, phone = %masked, "citizen registration of a number already registered");
            message(
                &engine,
                StatusCode::CONFLICT,
                chrome(),
                t.conflict_title,
                vec![t.conflict_body.replace("{comune}", &comune)],
                back,
            )
        }
        Err(EngineError::NotFound(_)) => message(
            &engine,
            StatusCode::NOT_FOUND,
            chrome(),
            t.not_found_title,
            vec![t.not_found_body.to_string()],
            None,
        ),
        Err(EngineError::Invalid(reason)) => {
            tracing::warn!(tenant = %tenant.slug, phone = %masked, %reason, "engine refused a citizen registration");
            message(
                &engine,
                StatusCode::BAD_REQUEST,
                chrome(),
                t.refused_title,
                vec![t.unavailable_body.to_string()],
                back,
            )
        }
        Err(e) => {
            tracing::error!(tenant = %tenant.slug, phone = %masked, error = %e, "citizen registration failed");
            let status = if matches!(e, EngineError::Unavailable(_)) {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            message(
                &engine,
                status,
                chrome(),
                t.unavailable_title,
                vec![t.unavailable_body.to_string()],
                back,
            )
        }
    }
}

// ---- verification by a voice call ----

fn purpose_name(p: VerificationPurpose) -> &'static str {
    match p {
        VerificationPurpose::Register => "register",
        VerificationPurpose::Unsubscribe => "unsubscribe",
    }
}

/// Places the verification call and shows the page to type its code on.
async fn call_for_code(
    engine: &AppState,
    tenant: &Tenant,
    lang: Lang,
    phone: PhoneNumber,
    purpose: VerificationPurpose,
) -> Response {
    let t = lang.texts();
    if let Err(e) = engine
        .start_verification(tenant.slug.clone(), phone.clone(), purpose)
        .await
    {
        tracing::error!(tenant = %tenant.slug, phone = %phone.masked(), error = %e, "cannot start a verification call");
        return message(
            engine,
            StatusCode::SERVICE_UNAVAILABLE,
            Chrome {
                t,
                tenant_name: tenant.name.clone(),
            },
            t.unavailable_title,
            vec![t.unavailable_body.to_string()],
            None,
        );
    }
    code_page(engine, tenant, lang, &phone, purpose, StatusCode::OK, None)
}

fn code_page(
    engine: &AppState,
    tenant: &Tenant,
    lang: Lang,
    phone: &PhoneNumber,
    purpose: VerificationPurpose,
    status: StatusCode,
    error: Option<&'static str>,
) -> Response {
    let t = lang.texts();
    let calling = match purpose {
        VerificationPurpose::Register => t.code_calling,
        VerificationPurpose::Unsubscribe => t.code_calling_unsubscribe,
    }
    .replace("{phone}", phone.as_str());
    let page = CodePage {
        drill: engine.drill_mode(),
        c: Chrome {
            t,
            tenant_name: tenant.name.clone(),
        },
        slug: tenant.slug.clone(),
        phone: phone.as_str().to_string(),
        purpose: purpose_name(purpose),
        calling,
        error,
    };
    html(status, &page)
}

/// The code form as posted.
#[derive(Debug, Default, Deserialize)]
pub struct CodeForm {
    #[serde(default)]
    pub phone: String,
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub purpose: String,
}

fn purpose_of(s: &str) -> VerificationPurpose {
    if s == "unsubscribe" {
        VerificationPurpose::Unsubscribe
    } else {
        VerificationPurpose::Register
    }
}

/// `POST /r/{tenant}/verify`: the code read by the call. Right, the number is verified (or erased);
/// wrong, the page asks again (five tries per call, counted by the cluster).
async fn verify(
    State(engine): State<AppState>,
    Path(slug): Path<String>,
    uri: Uri,
    body: Result<Form<CodeForm>, FormRejection>,
) -> Response {
    let lang = Lang::of(&uri);
    let t = lang.texts();
    let tenant = match tenant(&engine, &slug, lang).await {
        Ok(t) => t,
        Err(page) => return page,
    };
    let form = body.map(|Form(f)| f).unwrap_or_default();
    let Ok(phone) = PhoneNumber::parse(&form.phone) else {
        let page = register_page(
            &engine,
            &tenant,
            lang,
            RegistrationForm::default(),
            FieldErrors {
                phone: Some(t.phone_invalid),
                ..FieldErrors::default()
            },
        );
        return html(StatusCode::BAD_REQUEST, &page);
    };
    let purpose = purpose_of(&form.purpose);
    let code: String = form.code.chars().filter(|c| !c.is_whitespace()).collect();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return code_page(
            &engine,
            &tenant,
            lang,
            &phone,
            purpose,
            StatusCode::BAD_REQUEST,
            Some(t.code_wrong),
        );
    }
    let chrome = Chrome {
        t,
        tenant_name: tenant.name.clone(),
    };
    let comune = comune(&tenant.name);
    match engine
        .confirm_verification(tenant.slug.clone(), phone.clone(), code)
        .await
    {
        Ok(VerificationPurpose::Register) => {
            tracing::info!(tenant = %tenant.slug, phone = %phone.masked(), "citizen verified the number");
            message(
                &engine,
                StatusCode::OK,
                chrome,
                t.verified_title,
                vec![t
                    .verified_body
                    .replace("{phone}", phone.as_str())
                    .replace("{comune}", &comune)],
                None,
            )
        }
        Ok(VerificationPurpose::Unsubscribe) => {
            tracing::info!(tenant = %tenant.slug, phone = %phone.masked(), "citizen erased the registration");
            message(
                &engine,
                StatusCode::OK,
                chrome,
                t.erased_title,
                vec![t
                    .erased_body
                    .replace("{phone}", phone.as_str())
                    .replace("{comune}", &comune)],
                None,
            )
        }
        Err(EngineError::Invalid(_) | EngineError::NotFound(_)) => code_page(
            &engine,
            &tenant,
            lang,
            &phone,
            purpose,
            StatusCode::BAD_REQUEST,
            Some(t.code_wrong),
        ),
        Err(e) => {
            tracing::error!(tenant = %tenant.slug, phone = %phone.masked(), error = %e, "cannot check a verification code");
            message(
                &engine,
                StatusCode::SERVICE_UNAVAILABLE,
                chrome,
                t.unavailable_title,
                vec![t.unavailable_body.to_string()],
                None,
            )
        }
    }
}

/// `POST /r/{tenant}/call-again`: a new call with a new code (throttled like a registration).
async fn call_again(
    State(engine): State<AppState>,
    Extension(throttle): Extension<Arc<Throttle>>,
    Path(slug): Path<String>,
    uri: Uri,
    ClientAddr(client): ClientAddr,
    body: Result<Form<CodeForm>, FormRejection>,
) -> Response {
    let form = body.map(|Form(f)| f).unwrap_or_default();
    let purpose = purpose_of(&form.purpose);
    call_for_form(
        &engine,
        &throttle,
        &slug,
        &uri,
        &client,
        &form.phone,
        purpose,
    )
    .await
}

/// The tenant of the path, then `call_checked`.
async fn call_for_form(
    engine: &AppState,
    throttle: &Throttle,
    slug: &str,
    uri: &Uri,
    client: &str,
    phone: &str,
    purpose: VerificationPurpose,
) -> Response {
    let lang = Lang::of(uri);
    match tenant(engine, slug, lang).await {
        Ok(tenant) => call_checked(engine, throttle, &tenant, lang, client, phone, purpose).await,
        Err(page) => page,
    }
}

/// Throttles, checks the number and calls it; a bad number goes back to the right form.
async fn call_checked(
    engine: &AppState,
    throttle: &Throttle,
    tenant: &Tenant,
    lang: Lang,
    client: &str,
    phone: &str,
    purpose: VerificationPurpose,
) -> Response {
    let t = lang.texts();
    let Ok(phone) = PhoneNumber::parse(phone) else {
        return unsubscribe_page(
            engine,
            tenant,
            lang,
            phone,
            StatusCode::BAD_REQUEST,
            Some(t.phone_invalid),
        );
    };
    if let Err(wait) = throttle.admit(client, phone.as_str(), Instant::now()) {
        let minutes = wait.as_secs().div_ceil(60).max(1);
        let mut resp = message(
            engine,
            StatusCode::TOO_MANY_REQUESTS,
            Chrome {
                t,
                tenant_name: tenant.name.clone(),
            },
            t.throttled_title,
            vec![t.throttled_body.replace("{minutes}", &minutes.to_string())],
            None,
        );
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs().max(1)),
        );
        return resp;
    }
    call_for_code(engine, tenant, lang, phone, purpose).await
}

fn unsubscribe_page(
    engine: &AppState,
    tenant: &Tenant,
    lang: Lang,
    phone: &str,
    status: StatusCode,
    error: Option<&'static str>,
) -> Response {
    let t = lang.texts();
    let page = UnsubscribePage {
        drill: engine.drill_mode(),
        c: Chrome {
            t,
            tenant_name: tenant.name.clone(),
        },
        slug: tenant.slug.clone(),
        phone: phone.to_string(),
        error,
    };
    html(status, &page)
}

/// `GET /r/{tenant}/unsubscribe`: the number to erase.
async fn unsubscribe_form(
    State(engine): State<AppState>,
    Path(slug): Path<String>,
    uri: Uri,
) -> Response {
    let lang = Lang::of(&uri);
    match tenant(&engine, &slug, lang).await {
        Ok(tenant) => unsubscribe_page(&engine, &tenant, lang, "", StatusCode::OK, None),
        Err(page) => page,
    }
}

/// `POST /r/{tenant}/unsubscribe`: calls the number with a code; the page never says whether the
/// number was registered.
async fn unsubscribe(
    State(engine): State<AppState>,
    Extension(throttle): Extension<Arc<Throttle>>,
    Path(slug): Path<String>,
    uri: Uri,
    ClientAddr(client): ClientAddr,
    body: Result<Form<CodeForm>, FormRejection>,
) -> Response {
    let form = body.map(|Form(f)| f).unwrap_or_default();
    let purpose = VerificationPurpose::Unsubscribe;
    call_for_form(
        &engine,
        &throttle,
        &slug,
        &uri,
        &client,
        &form.phone,
        purpose,
    )
    .await
}

// ---- throttling ----

/// Recent registrations per client address and per number, on this node only: enough to stop one
/// script from making the cluster place thousands of verification calls, without a replicated write
/// per attempt.
#[derive(Default)]
pub struct Throttle {
    inner: Mutex<Windows>,
}

#[derive(Default)]
struct Windows {
    by_client: HashMap<String, VecDeque<Instant>>,
    by_phone: HashMap<String, VecDeque<Instant>>,
    admitted_since_sweep: u32,
}

/// Admissions between two sweeps of keys whose window has passed.
const SWEEP_EVERY: u32 = 256;

impl Throttle {
    /// Records a registration of `phone` from `client` at `now`, or answers how long to wait when
    /// either has reached its limit (nothing is recorded then).
    pub fn admit(&self, client: &str, phone: &str, now: Instant) -> Result<(), Duration> {
        let mut w = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let client_wait = wait(&mut w.by_client, client, IP_LIMIT, IP_WINDOW, now);
        let phone_wait = wait(&mut w.by_phone, phone, PHONE_LIMIT, PHONE_WINDOW, now);
        if let Some(longest) = client_wait.max(phone_wait) {
            return Err(longest);
        }
        w.by_client
            .entry(client.to_string())
            .or_default()
            .push_back(now);
        w.by_phone
            .entry(phone.to_string())
            .or_default()
            .push_back(now);
        w.admitted_since_sweep += 1;
        if w.admitted_since_sweep >= SWEEP_EVERY {
            w.admitted_since_sweep = 0;
            sweep(&mut w.by_client, IP_WINDOW, now);
            sweep(&mut w.by_phone, PHONE_WINDOW, now);
        }
        Ok(())
    }

    /// Keys currently remembered (client addresses plus numbers).
    pub fn tracked(&self) -> usize {
        let w = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        w.by_client.len() + w.by_phone.len()
    }
}

/// Drops `key`'s registrations older than `window`; answers how long until it may register again if
/// it has `limit` within the window.
fn wait(
    map: &mut HashMap<String, VecDeque<Instant>>,
    key: &str,
    limit: usize,
    window: Duration,
    now: Instant,
) -> Option<Duration> {
    let recent = map.get_mut(key)?;
    expire(recent, window, now);
    if recent.len() < limit {
        return None;
    }
    let oldest = recent.front()?;
    Some(window.saturating_sub(now.saturating_duration_since(*oldest)))
}

fn expire(recent: &mut VecDeque<Instant>, window: Duration, now: Instant) {
    while recent
        .front()
        .is_some_and(|&at| now.saturating_duration_since(at) >= window)
    {
        recent.pop_front();
    }
}

fn sweep(map: &mut HashMap<String, VecDeque<Instant>>, window: Duration, now: Instant) {
    map.retain(|_, recent| {
        expire(recent, window, now);
        !recent.is_empty()
    });
}

// ---- QR code and poster ----

/// Why the registration address cannot be built from this request.
fn bad_host(engine: &AppState, lang: Lang, tenant_name: String) -> Response {
    let t = lang.texts();
    message(
        engine,
        StatusCode::BAD_REQUEST,
        Chrome { t, tenant_name },
        t.bad_host_title,
        vec![t.bad_host_body.to_string()],
        None,
    )
}

/// Whether `host` looks like `name[:port]`, `ipv4[:port]` or `[ipv6][:port]`: the only thing a Host
/// header may put into an address printed on a poster.
pub fn plausible_host(host: &str) -> bool {
    if host.is_empty() || host.len() > 261 {
        return false;
    }
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return false;
        };
        if inside.is_empty()
            || !inside
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return false,
            },
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (Some(name), Some(port)),
            None => (Some(host), None),
        }
    };
    let port_ok = port.is_none_or(|p| {
        (1..=5).contains(&p.len())
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok_and(|n| n > 0)
    });
    let name_ok = name.is_none_or(|n| {
        (1..=253).contains(&n.len())
            && n.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
    });
    port_ok && name_ok
}

/// The address citizens open to register with `slug`: the configured public address, else this
/// request's Host.
fn registration_url(
    engine: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    slug: &str,
) -> Option<String> {
    let base = match engine.public_url() {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => {
            let host = match headers.get(header::HOST) {
                Some(h) => h.to_str().ok()?.to_string(),
                // HTTP/2 carries the host in the request target instead.
                None => uri.authority()?.as_str().to_string(),
            };
            if !plausible_host(&host) {
                return None;
            }
            format!("http://{host}")
        }
    };
    Some(format!("{base}/r/{slug}"))
}

/// The dark/light modules of a QR code, row by row, without quiet zone.
pub struct QrMatrix {
    pub width: usize,
    pub dark: Vec<bool>,
}

impl QrMatrix {
    pub fn encode(text: &str) -> Result<QrMatrix, qrcode::types::QrError> {
        let code = qrcode::QrCode::new(text.as_bytes())?;
        let width = code.width();
        let dark = code
            .to_colors()
            .into_iter()
            .map(|c| c == qrcode::Color::Dark)
            .collect();
        Ok(QrMatrix { width, dark })
    }

    fn is_dark(&self, x: usize, y: usize) -> bool {
        self.dark.get(y * self.width + x).copied().unwrap_or(false)
    }

    /// An SVG in module units (quiet zone included), one horizontal run of dark modules per subpath;
    /// `label` names it for screen readers.
    pub fn svg(&self, label: &str) -> String {
        let side = self.width + 2 * QR_QUIET_ZONE;
        let px = side * QR_PNG_SCALE;
        let mut path = String::new();
        for y in 0..self.width {
            let mut x = 0;
            while x < self.width {
                if !self.is_dark(x, y) {
                    x += 1;
                    continue;
                }
                let start = x;
                while x < self.width && self.is_dark(x, y) {
                    x += 1;
                }
                path.push_str(&format!(
                    "M{} {}h{}v1h-{}z",
                    start + QR_QUIET_ZONE,
                    y + QR_QUIET_ZONE,
                    x - start,
                    x - start
                ));
            }
        }
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {side} {side}\" width=\"{px}\" \
             height=\"{px}\" shape-rendering=\"crispEdges\" role=\"img\" aria-label=\"{label}\">\
             <rect width=\"{side}\" height=\"{side}\" fill=\"#fff\"/><path fill=\"#000\" d=\"{path}\"/></svg>",
            label = escape_attr(label),
        )
    }

    /// An 8-bit grayscale PNG with the quiet zone, [`QR_PNG_SCALE`] pixels per module.
    pub fn png(&self) -> Result<Vec<u8>, png::EncodingError> {
        let side = (self.width + 2 * QR_QUIET_ZONE) * QR_PNG_SCALE;
        let mut pixels = vec![0xffu8; side * side];
        for (i, px) in pixels.iter_mut().enumerate() {
            let (mx, my) = (i % side / QR_PNG_SCALE, i / side / QR_PNG_SCALE);
            let inside = (QR_QUIET_ZONE..QR_QUIET_ZONE + self.width).contains(&mx)
                && (QR_QUIET_ZONE..QR_QUIET_ZONE + self.width).contains(&my);
            if inside && self.is_dark(mx - QR_QUIET_ZONE, my - QR_QUIET_ZONE) {
                *px = 0;
            }
        }
        // A QR code is at most 177 modules wide, so the side is at most 1,480 pixels.
        let side = side as u32;
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, side, side);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
        writer.finish()?;
        Ok(out)
    }
}

/// Escapes text for an HTML or SVG attribute value.
fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// The tenant and its QR code, or the page that says why not.
async fn qr_for(
    engine: &AppState,
    slug: &str,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(Tenant, String, QrMatrix), Response> {
    let lang = Lang::of(uri);
    let tenant = tenant(engine, slug, lang).await?;
    let Some(url) = registration_url(engine, headers, uri, &tenant.slug) else {
        return Err(bad_host(engine, lang, tenant.name));
    };
    match QrMatrix::encode(&url) {
        Ok(m) => Ok((tenant, url, m)),
        Err(e) => {
            tracing::error!(error = %e, url = %url, "cannot encode the registration address as a QR code");
            Err((StatusCode::INTERNAL_SERVER_ERROR, Html(RENDER_FAILED)).into_response())
        }
    }
}

fn image(content_type: &'static str, body: impl IntoResponse) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// `GET /r/{tenant}/qr.svg`.
async fn qr_svg(
    State(engine): State<AppState>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    match qr_for(&engine, &slug, &headers, &uri).await {
        Ok((_, url, m)) => image("image/svg+xml", m.svg(&url)),
        Err(page) => page,
    }
}

/// `GET /r/{tenant}/qr.png`.
async fn qr_png(
    State(engine): State<AppState>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    match qr_for(&engine, &slug, &headers, &uri).await {
        Ok((_, url, m)) => match m.png() {
            Ok(png) => image("image/png", png),
            Err(e) => {
                tracing::error!(error = %e, url = %url, "cannot encode the registration QR code as PNG");
                (StatusCode::INTERNAL_SERVER_ERROR, Html(RENDER_FAILED)).into_response()
            }
        },
        Err(page) => page,
    }
}

/// `GET /r/{tenant}/poster`: an A4 poster to print and hang, Italian first, English below.
async fn poster(
    State(engine): State<AppState>,
    Path(slug): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    match qr_for(&engine, &slug, &headers, &uri).await {
        Ok((tenant, url, m)) => {
            let page = PosterPage {
                drill: engine.drill_mode(),
                comune: comune(&tenant.name),
                tenant_name: tenant.name,
                qr_svg: m.svg(&url),
                url,
            };
            html(StatusCode::OK, &page)
        }
        Err(page) => page,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use axum::http::{header, Request, StatusCode};

    use super::*;
    use crate::testkit::{escaped, exchange, form_body, Answer, FakeEngine};

    /// One router for the whole test, as a node has: the throttle lives in it. The engine has the
    /// tenant `pisa` and registers citizens only through `register_citizen`.
    struct Site {
        engine: Arc<FakeEngine>,
        router: axum::Router,
    }

    impl Site {
        fn new(public_url: Option<&str>, drill: bool) -> Site {
            let engine = Arc::new(
                FakeEngine::new()
                    .with_public_url(public_url)
                    .with_drill(drill)
                    .citizens_only(),
            );
            engine.tenant("pisa", "Comune di Pisa");
            Site {
                router: crate::router(engine.clone()),
                engine,
            }
        }
    }

    async fn send(site: &Site, req: Request<Body>) -> Answer {
        exchange(&site.router, req).await
    }

    async fn get(site: &Site, path: &str) -> Answer {
        let req = Request::get(path)
            .header(header::HOST, "node1.local:8080")
            .body(Body::empty())
            .unwrap();
        send(site, req).await
    }

    async fn post(
        site: &Site,
        path: &str,
        fields: &[(&str, &str)],
        client: Option<Ipv4Addr>,
    ) -> Answer {
        let mut req = Request::post(path)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(form_body(fields)))
            .unwrap();
        if let Some(ip) = client {
            req.extensions_mut()
                .insert(ConnectInfo(SocketAddr::from((ip, 40_000))));
        }
        send(site, req).await
    }

    fn good_form(phone: &str) -> Vec<(&str, &str)> {
        vec![
            ("phone", phone),
            ("name", "  Maria Rossi "),
            ("language", "de"),
            ("zone", "Porta a Mare"),
            ("consent", "yes"),
        ]
    }

    #[tokio::test]
    async fn the_page_is_italian_by_default_and_names_the_comune() {
        let site = Site::new(None, false);
        let a = get(&site, "/r/pisa").await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let page = a.text();
        assert!(page.contains("<html lang=\"it\">"), "{page}");
        assert!(page.contains("Ricevi le allerte del Comune di Pisa"));
        assert!(page.contains("href=\"?lang=en\""));
        for field in ["phone", "name", "language", "zone", "consent"] {
            assert!(page.contains(&format!("<label for=\"{field}\"")), "{field}");
            assert!(page.contains(&format!("id=\"{field}\"")), "{field}");
        }
        assert!(page.contains("type=\"tel\""));
        assert!(page.contains("<option value=\"it\" lang=\"it\" selected>"));
        assert!(page.contains(&escaped(&consent_text(Lang::It, "Comune di Pisa"))));
        assert!(page.contains("action=\"/r/pisa?lang=it\""));
    }

    #[tokio::test]
    async fn lang_en_switches_the_page_to_english_and_links_back() {
        let site = Site::new(None, false);
        let page = get(&site, "/r/pisa?lang=en").await.text();
        assert!(page.contains("<html lang=\"en\">"), "{page}");
        assert!(page.contains("Get alerts from the Comune di Pisa"));
        assert!(page.contains("href=\"?lang=it\""));
        assert!(page.contains("<option value=\"en\" lang=\"en\" selected>"));
        assert!(page.contains(&escaped(&consent_text(Lang::En, "Comune di Pisa"))));
        assert!(page.contains("action=\"/r/pisa?lang=en\""));
    }

    #[tokio::test]
    async fn the_drill_banner_shows_on_the_portal() {
        let site = Site::new(None, true);
        let page = get(&site, "/r/pisa").await.text();
        assert!(page.contains("DRILL MODE"));
    }

    #[tokio::test]
    async fn a_script_typed_into_a_field_is_shown_escaped() {
        let site = Site::new(None, false);
        let a = post(
            &site,
            "/r/pisa",
            &[
                ("phone", "\"><script>alert(1)</script>"),
                ("name", "<script>alert('x')</script>"),
                ("language", "it"),
                ("consent", "yes"),
            ],
            None,
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        let page = a.text();
        assert!(!page.contains("<script>"), "{page}");
        assert!(
            page.contains(&escaped("<script>alert('x')</script>")),
            "{page}"
        );
        assert!(page.contains("value=\"&#34;&#62;&#60;script&#62;alert(1)"));
    }

    #[tokio::test]
    async fn missing_consent_is_refused_with_the_values_kept() {
        let site = Site::new(None, false);
        let mut fields = good_form("347 123 4567");
        fields.retain(|(k, _)| *k != "consent");
        let a = post(&site, "/r/pisa", &fields, None).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        let page = a.text();
        assert!(page.contains(&escaped(IT.consent_missing)), "{page}");
        assert!(page.contains("href=\"#consent\""));
        assert!(page.contains("value=\"347 123 4567\""));
        assert!(page.contains("value=\"  Maria Rossi \""));
        assert!(page.contains("value=\"Porta a Mare\""));
        assert!(page.contains("<option value=\"de\" lang=\"de\" selected>"));
        assert!(!page.contains(" checked"));
        assert!(site.engine.subscribers().is_empty());
    }

    #[tokio::test]
    async fn a_bad_phone_is_refused_naming_the_phone_field() {
        let site = Site::new(None, false);
        let a = post(&site, "/r/pisa?lang=en", &good_form("12"), None).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        let page = a.text();
        assert!(page.contains(EN.phone_invalid), "{page}");
        assert!(page.contains("<a href=\"#phone\">Phone number:"));
        assert!(page.contains("aria-describedby=\"phone-hint phone-error\" aria-invalid=\"true\""));
        // The other values survive, the consent tick included.
        assert!(page.contains(" checked"));
        assert!(site.engine.subscribers().is_empty());
    }

    #[tokio::test]
    async fn too_long_name_and_zone_and_an_unknown_language_are_each_named() {
        let site = Site::new(None, false);
        let name = "n".repeat(NAME_MAX + 1);
        let zone = "z".repeat(ZONE_MAX + 1);
        let a = post(
            &site,
            "/r/pisa",
            &[
                ("phone", "+39 347 123 4567"),
                ("name", &name),
                ("zone", &zone),
                ("language", "xx"),
                ("consent", "yes"),
            ],
            None,
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        let page = a.text();
        for message in [IT.name_long, IT.zone_long, IT.language_bad] {
            assert!(page.contains(&escaped(message)), "{message}");
        }
        assert!(!page.contains(IT.phone_invalid));
    }

    #[tokio::test]
    async fn an_unreadable_form_is_a_400_page_not_json() {
        let site = Site::new(None, false);
        let req = Request::post("/r/pisa")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{}"))
            .unwrap();
        let a = send(&site, req).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        assert!(a.text().contains(&escaped(IT.form_unreadable)));
    }

    #[tokio::test]
    async fn a_registration_stores_an_unverified_subscriber_with_the_consent_shown() {
        let site = Site::new(None, false);
        let a = post(&site, "/r/pisa", &good_form("347 123 4567"), None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        let page = a.text();
        assert!(page.contains("+393471234567"));
        assert!(page.contains(&escaped(IT.code_title)), "{page}");
        let subs = site.engine.subscribers();
        assert_eq!(subs.len(), 1);
        let s = &subs[0];
        assert_eq!(s.tenant, "pisa");
        assert_eq!(s.phone.as_str(), "+393471234567");
        assert_eq!(s.name.as_deref(), Some("Maria Rossi"));
        assert_eq!(s.language, "de");
        assert_eq!(s.zone.as_deref(), Some("Porta a Mare"));
        assert!(!s.verified);
        let consent = s.consent.as_ref().expect("consent is stored");
        assert_eq!(consent.text, consent_text(Lang::It, "Comune di Pisa"));
        assert!(consent.at_ms > 1_600_000_000_000);

        // In English the English notice is the one kept.
        let a = post(
            &site,
            "/r/pisa?lang=en",
            &good_form("+41 79 123 45 67"),
            None,
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.text().contains(&escaped(EN.code_title)));
        let subs = site.engine.subscribers();
        let swiss = subs
            .iter()
            .find(|s| s.phone.as_str() == "+41791234567")
            .unwrap();
        assert_eq!(
            swiss.consent.as_ref().unwrap().text,
            consent_text(Lang::En, "Comune di Pisa")
        );
    }

    #[tokio::test]
    async fn a_number_already_registered_gets_a_friendly_409() {
        let site = Site::new(None, false);
        let first = post(&site, "/r/pisa", &good_form("347 123 4567"), None).await;
        assert_eq!(first.status, StatusCode::OK);
        let again = post(&site, "/r/pisa", &good_form("+393471234567"), None).await;
        assert_eq!(again.status, StatusCode::CONFLICT);
        assert!(again.text().contains("già registrato"));
        assert_eq!(site.engine.subscribers().len(), 1);
    }

    #[tokio::test]
    async fn an_unknown_tenant_is_a_404_page() {
        let site = Site::new(None, false);
        for path in [
            "/r/nowhere",
            "/r/nowhere?lang=en",
            "/r/Not%20A%20Slug",
            "/r/nowhere/qr.svg",
            "/r/nowhere/qr.png",
            "/r/nowhere/poster",
        ] {
            let a = get(&site, path).await;
            assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
            assert!(
                a.headers[header::CONTENT_TYPE]
                    .to_str()
                    .unwrap()
                    .starts_with("text/html"),
                "{path}"
            );
        }
        assert!(get(&site, "/r/nowhere?lang=en")
            .await
            .text()
            .contains("Page not found"));
        let a = post(&site, "/r/nowhere", &good_form("347 123 4567"), None).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
        assert!(a.text().contains("Pagina non trovata"));
        // The default tenant always exists.
        assert_eq!(get(&site, "/r/default").await.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn the_sixth_registration_from_one_address_is_throttled() {
        let site = Site::new(None, false);
        let client = Some(Ipv4Addr::new(192, 0, 2, 7));
        for i in 0..IP_LIMIT {
            let phone = format!("347 123 456{i}");
            let a = post(&site, "/r/pisa", &good_form(&phone), client).await;
            assert_eq!(a.status, StatusCode::OK, "registration {i}");
        }
        let a = post(&site, "/r/pisa?lang=en", &good_form("347 123 4569"), client).await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(a.text().contains("Too many registrations"));
        assert!(a.headers.contains_key(header::RETRY_AFTER));
        assert_eq!(site.engine.subscribers().len(), IP_LIMIT);
        // Another address is not held back.
        let other = Some(Ipv4Addr::new(198, 51, 100, 1));
        let a = post(&site, "/r/pisa", &good_form("347 123 4569"), other).await;
        assert_eq!(a.status, StatusCode::OK);
    }

    #[test]
    fn a_number_may_register_three_times_an_hour_and_an_address_five_times_in_ten_minutes() {
        let throttle = Throttle::default();
        let t0 = Instant::now();
        for i in 0..PHONE_LIMIT {
            assert!(throttle
                .admit(&format!("10.0.0.{i}"), "+393471234567", t0)
                .is_ok());
        }
        let wait = throttle
            .admit("10.0.0.9", "+393471234567", t0 + Duration::from_secs(60))
            .unwrap_err();
        assert_eq!(wait, PHONE_WINDOW - Duration::from_secs(60));
        assert!(throttle
            .admit("10.0.0.9", "+393471234567", t0 + PHONE_WINDOW)
            .is_ok());

        let throttle = Throttle::default();
        for i in 0..IP_LIMIT {
            assert!(throttle
                .admit("10.0.0.1", &format!("+3934712345{i:02}"), t0)
                .is_ok());
        }
        assert!(throttle.admit("10.0.0.1", "+393470000000", t0).is_err());
        // A refused attempt is not counted: the window still ends ten minutes after the first five.
        assert!(throttle
            .admit("10.0.0.1", "+393470000000", t0 + IP_WINDOW)
            .is_ok());
    }

    #[test]
    fn the_throttle_forgets_keys_whose_window_has_passed() {
        let throttle = Throttle::default();
        let t0 = Instant::now();
        let admitted = SWEEP_EVERY as usize - 1;
        for i in 0..admitted {
            assert!(throttle
                .admit(&format!("c{i}"), &format!("p{i}"), t0)
                .is_ok());
        }
        assert_eq!(throttle.tracked(), 2 * admitted);
        // The next admission sweeps: every earlier window has passed.
        assert!(throttle.admit("c", "p", t0 + PHONE_WINDOW).is_ok());
        assert_eq!(throttle.tracked(), 2);
    }

    #[test]
    fn plausible_host_accepts_names_and_addresses_only() {
        for good in [
            "localhost",
            "localhost:8080",
            "allerta.comune.pisa.it",
            "192.0.2.1:80",
            "[::1]",
            "[2001:db8::1]:8443",
        ] {
            assert!(plausible_host(good), "{good}");
        }
        for bad in [
            "",
            "evil.example/path",
            "a b",
            "host:0",
            "host:99999",
            "host:",
            "-bad.example",
            "x.example\"><script>",
            "[::1",
            "[::1]x",
            "user@host",
        ] {
            assert!(!plausible_host(bad), "{bad}");
        }
    }

    // ---- reading the QR code back ----

    /// The modules of a PNG made by `QrMatrix::png`, checking its size and its white quiet zone.
    fn modules_from_png(bytes: &[u8]) -> (usize, Vec<bool>) {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!(info.color_type, png::ColorType::Grayscale);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        assert_eq!(info.width, info.height);
        let side = info.width as usize;
        assert_eq!(side % QR_PNG_SCALE, 0);
        let n = side / QR_PNG_SCALE - 2 * QR_QUIET_ZONE;
        let at = |x: usize, y: usize| pixels[y * side + x];
        for y in 0..side {
            for x in 0..side {
                let (mx, my) = (x / QR_PNG_SCALE, y / QR_PNG_SCALE);
                let quiet = !(QR_QUIET_ZONE..QR_QUIET_ZONE + n).contains(&mx)
                    || !(QR_QUIET_ZONE..QR_QUIET_ZONE + n).contains(&my);
                if quiet {
                    assert_eq!(at(x, y), 0xff, "quiet zone pixel ({x}, {y})");
                }
            }
        }
        let centre = |m: usize| (m + QR_QUIET_ZONE) * QR_PNG_SCALE + QR_PNG_SCALE / 2;
        let dark = (0..n * n)
            .map(|i| at(centre(i % n), centre(i / n)) < 0x80)
            .collect();
        (n, dark)
    }

    /// The modules an SVG made by `QrMatrix::svg` draws.
    fn modules_from_svg(svg: &str, n: usize) -> Vec<bool> {
        let d = svg.split("d=\"").nth(1).unwrap().split('"').next().unwrap();
        let mut dark = vec![false; n * n];
        for run in d.split('M').skip(1) {
            let (xy, rest) = run.split_once('h').unwrap();
            let (x, y) = xy.split_once(' ').unwrap();
            let (x, y): (usize, usize) = (x.parse().unwrap(), y.parse().unwrap());
            let len: usize = rest.split_once('v').unwrap().0.parse().unwrap();
            for dx in 0..len {
                dark[(y - QR_QUIET_ZONE) * n + x - QR_QUIET_ZONE + dx] = true;
            }
        }
        dark
    }

    /// Data codewords per block, by version (1 to 6) and error-correction level (L, M, Q, H),
    /// from ISO/IEC 18004 table 9.
    fn data_blocks(version: usize, level: usize) -> Vec<usize> {
        let table: [[&[usize]; 4]; 6] = [
            [&[19], &[16], &[13], &[9]],
            [&[34], &[28], &[22], &[16]],
            [&[55], &[44], &[17, 17], &[13, 13]],
            [&[80], &[32, 32], &[24, 24], &[9, 9, 9, 9]],
            [&[108], &[43, 43], &[15, 15, 16, 16], &[11, 11, 12, 12]],
            [
                &[68, 68],
                &[27, 27, 27, 27],
                &[19, 19, 19, 19],
                &[15, 15, 15, 15],
            ],
        ];
        table[version - 1][level].to_vec()
    }

    /// A QR reader for versions 1 to 6 without error correction (the image is exact), written from
    /// the standard rather than the encoder, so a test proves what the code says.
    fn read_qr(n: usize, dark: &[bool]) -> String {
        let version = (n - 17) / 4;
        assert!((1..=6).contains(&version), "version {version}");
        let m = |x: usize, y: usize| dark[y * n + x];

        // Format information, both copies, BCH-checked (ISO/IEC 18004 §7.9).
        let mut first = 0u32;
        let mut second = 0u32;
        for i in 0..15 {
            let (x, y) = match i {
                0..=5 => (8, i),
                6 => (8, 7),
                7 => (8, 8),
                8 => (7, 8),
                _ => (14 - i, 8),
            };
            first |= u32::from(m(x, y)) << i;
            let (x, y) = if i < 8 {
                (n - 1 - i, 8)
            } else {
                (8, n - 15 + i)
            };
            second |= u32::from(m(x, y)) << i;
        }
        assert_eq!(
            first, second,
            "the two copies of the format information differ"
        );
        let format = first ^ 0x5412;
        let data = format >> 10;
        let mut rem = data;
        for _ in 0..10 {
            rem = (rem << 1) ^ ((rem >> 9) * 0x537);
        }
        assert_eq!((data << 10) | (rem & 0x3ff), format, "format BCH code");
        let level = match data >> 3 {
            1 => 0,
            0 => 1,
            3 => 2,
            _ => 3,
        };
        let mask = data & 7;

        let align = n - 7;
        // Finder patterns with their separators and format information sit in three corners.
        let corner = |v: usize| v < 9 || v >= n - 8;
        let function = |x: usize, y: usize| {
            (corner(x) && corner(y) && (x < 9 || y < 9))
                || x == 6
                || y == 6
                || (version >= 2 && x.abs_diff(align) <= 2 && y.abs_diff(align) <= 2)
        };
        let flip = |x: usize, y: usize| match mask {
            0 => (y + x).is_multiple_of(2),
            1 => y.is_multiple_of(2),
            2 => x.is_multiple_of(3),
            3 => (y + x).is_multiple_of(3),
            4 => (y / 2 + x / 3).is_multiple_of(2),
            5 => (y * x) % 2 + (y * x) % 3 == 0,
            6 => ((y * x) % 2 + (y * x) % 3).is_multiple_of(2),
            _ => ((y + x) % 2 + (y * x) % 3).is_multiple_of(2),
        };

        // Codeword bits in placement order: two-column strips from the right, up then down.
        let mut bits = Vec::new();
        let mut x = n - 1;
        let mut upward = true;
        loop {
            if x == 6 {
                x = 5;
            }
            for i in 0..n {
                let y = if upward { n - 1 - i } else { i };
                for col in [x, x - 1] {
                    if !function(col, y) {
                        bits.push(m(col, y) ^ flip(col, y));
                    }
                }
            }
            upward = !upward;
            if x < 2 {
                break;
            }
            x -= 2;
        }
        let codewords: Vec<u8> = bits
            .chunks_exact(8)
            .map(|c| c.iter().fold(0u8, |acc, &b| (acc << 1) | u8::from(b)))
            .collect();

        // Data codewords are interleaved across blocks; error-correction codewords follow.
        let blocks = data_blocks(version, level);
        let mut per_block: Vec<Vec<u8>> = blocks.iter().map(|_| Vec::new()).collect();
        let mut next = codewords.iter();
        for i in 0..blocks.iter().max().copied().unwrap() {
            for (b, &len) in blocks.iter().enumerate() {
                if i < len {
                    per_block[b].push(*next.next().unwrap());
                }
            }
        }
        let stream: Vec<bool> = per_block
            .concat()
            .iter()
            .flat_map(|byte| (0..8).rev().map(move |i| byte >> i & 1 == 1))
            .collect();

        // Segments: numeric, alphanumeric or byte (counts sized for versions 1 to 9).
        let mut pos = 0;
        let mut take = |count: usize| -> u32 {
            let v = stream[pos..pos + count]
                .iter()
                .fold(0u32, |acc, &b| (acc << 1) | u32::from(b));
            pos += count;
            v
        };
        const ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";
        let mut text = Vec::new();
        let total = stream.len();
        loop {
            let mode = take(4);
            match mode {
                0 => break,
                1 => {
                    let mut left = take(10) as usize;
                    while left > 0 {
                        let (digits, width) = match left {
                            1 => (1, 4),
                            2 => (2, 7),
                            _ => (3, 10),
                        };
                        let v = take(width);
                        text.extend(format!("{v:0digits$}").bytes());
                        left -= digits;
                    }
                }
                2 => {
                    let mut left = take(9) as usize;
                    while left > 0 {
                        if left >= 2 {
                            let v = take(11) as usize;
                            text.extend([ALNUM[v / 45], ALNUM[v % 45]]);
                            left -= 2;
                        } else {
                            text.push(ALNUM[take(6) as usize]);
                            left -= 1;
                        }
                    }
                }
                4 => {
                    for _ in 0..take(8) {
                        text.push(take(8) as u8);
                    }
                }
                other => panic!("unexpected segment mode {other:04b}"),
            }
        }
        // After the terminator: zero bits to a byte boundary, then the 0xEC 0x11 pad bytes.
        let after = pos.div_ceil(8);
        assert!(stream[pos..(after * 8).min(total)].iter().all(|b| !b));
        for (i, byte) in per_block.concat()[after..].iter().enumerate() {
            assert_eq!(*byte, if i % 2 == 0 { 0xec } else { 0x11 }, "pad byte {i}");
        }
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn the_reader_reads_codes_of_every_size_the_portal_makes() {
        for url in [
            "http://a/r/x",
            "https://allerta.example.it/r/pisa",
            "http://[2001:db8::1]:8443/r/comune-di-san-giuliano-terme",
            "https://allerta.protezionecivile.comune.example.it/r/unione-dei-comuni-della-valdera",
        ] {
            let m = QrMatrix::encode(url).unwrap();
            assert_eq!(read_qr(m.width, &m.dark), url);
        }
    }

    #[tokio::test]
    async fn qr_png_decodes_to_the_registration_address_and_matches_the_svg() {
        let site = Site::new(Some("https://allerta.example.it/"), false);
        let a = get(&site, "/r/pisa/qr.png").await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.headers[header::CONTENT_TYPE], "image/png");
        assert_eq!(a.headers[header::CACHE_CONTROL], "public, max-age=3600");
        assert!(a.bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        let (n, dark) = modules_from_png(&a.bytes);
        let expected = QrMatrix::encode("https://allerta.example.it/r/pisa").unwrap();
        assert_eq!(n, expected.width);
        assert_eq!(read_qr(n, &dark), "https://allerta.example.it/r/pisa");

        let svg = get(&site, "/r/pisa/qr.svg").await;
        assert_eq!(svg.status, StatusCode::OK);
        assert_eq!(svg.headers[header::CONTENT_TYPE], "image/svg+xml");
        assert_eq!(svg.headers[header::CACHE_CONTROL], "public, max-age=3600");
        let svg = svg.text();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.contains("aria-label=\"https://allerta.example.it/r/pisa\""));
        assert_eq!(modules_from_svg(&svg, n), dark);
    }

    #[tokio::test]
    async fn without_a_public_url_the_qr_code_uses_the_host_header() {
        let site = Site::new(None, false);
        let a = get(&site, "/r/pisa/qr.png").await;
        assert_eq!(a.status, StatusCode::OK);
        let (n, dark) = modules_from_png(&a.bytes);
        assert_eq!(read_qr(n, &dark), "http://node1.local:8080/r/pisa");
        let side = (n + 2 * QR_QUIET_ZONE) * QR_PNG_SCALE;
        let decoder = png::Decoder::new(std::io::Cursor::new(&a.bytes));
        let info = decoder.read_info().unwrap().info().clone();
        assert_eq!((info.width as usize, info.height as usize), (side, side));
    }

    #[tokio::test]
    async fn an_implausible_host_header_is_refused() {
        let site = Site::new(None, false);
        for path in ["/r/pisa/qr.svg", "/r/pisa/qr.png", "/r/pisa/poster"] {
            let req = Request::get(path)
                .header(header::HOST, "evil.example/phish?")
                .body(Body::empty())
                .unwrap();
            let a = send(&site, req).await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path}");
        }
    }

    #[tokio::test]
    async fn the_poster_is_a4_italian_first_with_the_qr_code_and_the_address() {
        let site = Site::new(Some("https://allerta.example.it"), false);
        let a = get(&site, "/r/pisa/poster").await;
        assert_eq!(a.status, StatusCode::OK);
        let page = a.text();
        assert!(page.contains("<html lang=\"it\">"));
        assert!(page.contains("Ricevi le allerte del Comune di Pisa"));
        assert!(page.contains("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(page.contains(">https://allerta.example.it/r/pisa<"));
        assert!(page.contains("lang=\"en\""));
        assert!(page.contains("Get alerts from the Comune di Pisa"));
        assert_eq!(page.matches("<li>").count(), 6);
    }

    #[test]
    fn a_tenant_name_reads_as_a_comune_either_way() {
        assert_eq!(comune("Comune di Pisa"), "Comune di Pisa");
        assert_eq!(comune("Pisa"), "Comune di Pisa");
        assert_eq!(comune("Città"), "Comune di Città");
    }

    #[tokio::test]
    async fn the_code_from_the_call_verifies_the_number_and_erases_it_on_request() {
        let site = Site::new(None, false);
        let a = post(&site, "/r/pisa", &good_form("347 123 4567"), None).await;
        assert_eq!(a.status, StatusCode::OK);
        let (number, code) = site.engine.calls.lock().unwrap()[0].clone();
        assert_eq!(number, "+393471234567");
        // A wrong code asks again; the right one verifies.
        let wrong = [
            ("phone", "+393471234567"),
            ("purpose", "register"),
            ("code", "000000"),
        ];
        let a = post(&site, "/r/pisa/verify", &wrong, None).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
        assert!(a.text().contains(&escaped(IT.code_wrong)));
        assert!(!site.engine.subscribers()[0].verified);
        let right = [
            ("phone", "+393471234567"),
            ("purpose", "register"),
            ("code", code.as_str()),
        ];
        let a = post(&site, "/r/pisa/verify", &right, None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert!(a.text().contains(&escaped(IT.verified_title)));
        assert!(site.engine.subscribers()[0].verified);
        // The same code does not work twice.
        let a = post(&site, "/r/pisa/verify", &right, None).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);

        // Unsubscribing a number that is not registered looks the same, and places no call.
        let a = get(&site, "/r/pisa/unsubscribe").await;
        assert_eq!(a.status, StatusCode::OK);
        let a = post(
            &site,
            "/r/pisa/unsubscribe",
            &[("phone", "+393470000000")],
            Some(Ipv4Addr::new(10, 0, 0, 2)),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(site.engine.calls.lock().unwrap().len(), 1);
        // The registered one gets a call, and its code erases the subscriber.
        let a = post(
            &site,
            "/r/pisa/unsubscribe",
            &[("phone", "347 123 4567")],
            Some(Ipv4Addr::new(10, 0, 0, 2)),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
        let (_, code) = site.engine.calls.lock().unwrap()[1].clone();
        let erase = [
            ("phone", "+393471234567"),
            ("purpose", "unsubscribe"),
            ("code", code.as_str()),
        ];
        let a = post(&site, "/r/pisa/verify", &erase, None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert!(a.text().contains(&escaped(IT.erased_title)));
        assert!(site.engine.subscribers().is_empty());
    }
}
