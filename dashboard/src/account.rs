//! The console's Account page: the logged-in operator's own name, role and comuni, and the second
//! factor (RFC 6238 codes from an authenticator app, see `totp`) they turn on and off themselves.
//!
//! Turning it on takes two steps so that nobody locks themselves out: `start` makes a secret and
//! shows it (as text and as a QR code of its `otpauth://` address), and only `confirm`, with a code
//! the app made from it, stores it in the operator's replicated record. Until then the secret lives
//! only in that page's hidden field, under the session's CSRF token. Turning it off needs a current
//! code, so a browser left logged in cannot strip the factor; wrong codes there count as failed
//! logins in this node's throttle. Neither a secret nor a code is ever written to the log.

use std::sync::Arc;
use std::time::Instant;

use askama::Template;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use campanile_cluster::{Operator, OperatorUpdate, TotpChange};
use serde::Deserialize;

use crate::api::AppState;
use crate::auth::{self, LoginThrottle, Principal};
use crate::console::{checked_form, chrome, error_page, render_status, Chrome, Console, PeerAddr};
use crate::error::ApiError;
use crate::totp;

/// The name authenticator apps list the account under.
pub const ISSUER: &str = "Campanile";

/// The Account routes (behind the console's login).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/account", get(account_page))
        .route("/account/totp/start", post(totp_start))
        .route("/account/totp/confirm", post(totp_confirm))
        .route("/account/totp/disable", post(totp_disable))
}

// ---- pieces every page uses ----

/// Seconds since the Unix epoch, the clock TOTP codes follow.
fn now_secs() -> u64 {
    auth::now_ms() / 1000
}

/// The operator's own record (with the second factor's state), or why there is none.
async fn own_record(engine: &AppState, who: &Principal) -> Result<Operator, ApiError> {
    let Some(username) = who.operator() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "not_an_operator",
            "only a console operator has an account page: an API token has no password or second \
             factor to manage",
        ));
    };
    engine
        .operators()
        .await
        .map_err(ApiError::from)?
        .into_iter()
        .find(|o| o.username == username)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "the account `{username}` no longer exists: ask an admin"
            ))
        })
}

/// A page that shows a secret must not stay in a cache or the browser's history.
fn no_store(mut r: Response) -> Response {
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// Refusal to set up a second factor over one that is on.
fn already_on() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "totp_already_on",
        "Your second factor is already on. To move it to another app, turn it off first (that \
         takes a code from the app you use now), then set it up again.",
    )
}

// ---- the account page ----

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    drill: Option<String>,
    chrome: Chrome,
    username: String,
    display_name: String,
    role: &'static str,
    tenants: String,
    totp_on: bool,
    notice: Option<&'static str>,
    error: Option<String>,
}

#[derive(Deserialize, Default)]
struct AccountQuery {
    #[serde(default)]
    done: String,
}

fn account_view(
    engine: &AppState,
    who: &Principal,
    op: &Operator,
    status: StatusCode,
    notice: Option<&'static str>,
    error: Option<String>,
) -> Response {
    let chrome = chrome(engine, who, "account");
    render_status(
        status,
        &AccountPage {
            drill: chrome.drill.clone(),
            chrome,
            username: op.username.clone(),
            display_name: op.display_name.clone(),
            role: auth::role_name(op.role),
            tenants: op.tenants.join(", "),
            totp_on: op.totp_secret.is_some(),
            notice,
            error,
        },
    )
}

/// `GET /account`.
async fn account_page(
    State(engine): State<AppState>,
    Console(who): Console,
    q: Result<Query<AccountQuery>, QueryRejection>,
) -> Response {
    let op = match own_record(&engine, &who).await {
        Ok(op) => op,
        Err(e) => return error_page(&engine, &who, e),
    };
    // Fixed sentences, never text from the address: a link cannot make the page say anything.
    let notice = match q.map(|Query(q)| q.done).unwrap_or_default().as_str() {
        "totp_on" => Some(
            "The second factor is on: from your next login, type the code your app shows \
             after your password.",
        ),
        "totp_off" => Some("The second factor is off: your password alone logs you in."),
        _ => None,
    };
    account_view(&engine, &who, &op, StatusCode::OK, notice, None)
}

// ---- turning it on ----

#[derive(Template)]
#[template(path = "account_totp.html")]
struct TotpSetupPage {
    drill: Option<String>,
    chrome: Chrome,
    /// The secret as the form sends it back.
    secret: String,
    /// The secret in groups of four, for typing it into an app.
    secret_grouped: String,
    /// The address an app reads from the QR code (or a phone opens as a link).
    uri: String,
    /// The QR code as inline SVG; None if it could not be drawn.
    qr_svg: Option<String>,
    error: Option<String>,
}

/// `ABCDEFGH…` as `ABCD EFGH …`.
fn grouped(secret: &str) -> String {
    secret
        .chars()
        .collect::<Vec<_>>()
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

fn setup_view(
    engine: &AppState,
    who: &Principal,
    op: &Operator,
    secret: String,
    status: StatusCode,
    error: Option<String>,
) -> Response {
    let uri = totp::otpauth_uri(&secret, &op.username, ISSUER);
    let qr_svg = match crate::portal::QrMatrix::encode(&uri) {
        Ok(m) => Some(m.svg("QR code for your authenticator app")),
        Err(e) => {
            // The address holds the secret: the log gets only the reason.
            tracing::error!(error = %e, "cannot draw the second factor's QR code");
            None
        }
    };
    let chrome = chrome(engine, who, "account");
    no_store(render_status(
        status,
        &TotpSetupPage {
            drill: chrome.drill.clone(),
            chrome,
            secret_grouped: grouped(&secret),
            secret,
            uri,
            qr_svg,
            error,
        },
    ))
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /account/totp/start`: a fresh secret to put into an app; nothing is stored yet.
async fn totp_start(
    State(engine): State<AppState>,
    Console(who): Console,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    if let Err(page) = checked_form(&engine, &who, form, crate::BODY_LIMIT, |f| &f.csrf) {
        return *page;
    }
    let op = match own_record(&engine, &who).await {
        Ok(op) if op.totp_secret.is_some() => return error_page(&engine, &who, already_on()),
        Ok(op) => op,
        Err(e) => return error_page(&engine, &who, e),
    };
    setup_view(&engine, &who, &op, totp::new_secret(), StatusCode::OK, None)
}

#[derive(Deserialize)]
struct ConfirmForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    secret: String,
    #[serde(default)]
    code: String,
}

/// `POST /account/totp/confirm`: stores the secret if the app already makes its codes.
async fn totp_confirm(
    State(engine): State<AppState>,
    Console(who): Console,
    form: Result<Form<ConfirmForm>, FormRejection>,
) -> Response {
    let form = match checked_form(&engine, &who, form, crate::BODY_LIMIT, |f| &f.csrf) {
        Ok(f) => f,
        Err(page) => return *page,
    };
    let op = match own_record(&engine, &who).await {
        Ok(op) if op.totp_secret.is_some() => return error_page(&engine, &who, already_on()),
        Ok(op) => op,
        Err(e) => return error_page(&engine, &who, e),
    };
    // The secret comes back from the browser: only one this page could have made is stored, in
    // the canonical form (upper case, no spaces or padding).
    let secret =
        match totp::base32_decode(&form.secret) {
            Some(key) if totp::valid_secret(&form.secret) => totp::base32_encode(&key),
            _ => return error_page(
                &engine,
                &who,
                ApiError::bad_request(
                    "invalid_secret",
                    "The setup form was damaged and its secret cannot be used. Go back to your \
                     account and start again.",
                ),
            ),
        };
    if !totp::verify(&secret, &form.code, now_secs()) {
        return setup_view(
            &engine,
            &who,
            &op,
            secret,
            StatusCode::BAD_REQUEST,
            Some(
                "That is not the code your app shows for this account now. Check that you added \
                 this secret (scan the QR code again if unsure) and that the phone sets its clock \
                 automatically, then type the newest code."
                    .into(),
            ),
        );
    }
    let update = OperatorUpdate {
        username: op.username.clone(),
        role: None,
        tenants: None,
        password_hash: None,
        disabled: None,
        totp: Some(TotpChange::Enable(secret)),
    };
    if let Err(e) = engine.update_operator(update).await {
        return error_page(&engine, &who, e.into());
    }
    tracing::info!(operator = %op.username, "operator turned on the second factor");
    Redirect::to("/account?done=totp_on").into_response()
}

// ---- turning it off ----

#[derive(Deserialize)]
struct CodeForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    code: String,
}

/// `POST /account/totp/disable`: turns the second factor off, given a current code.
async fn totp_disable(
    State(engine): State<AppState>,
    Extension(throttle): Extension<Arc<LoginThrottle>>,
    PeerAddr(peer): PeerAddr,
    Console(who): Console,
    form: Result<Form<CodeForm>, FormRejection>,
) -> Response {
    let form = match checked_form(&engine, &who, form, crate::BODY_LIMIT, |f| &f.csrf) {
        Ok(f) => f,
        Err(page) => return *page,
    };
    let op = match own_record(&engine, &who).await {
        Ok(op) => op,
        Err(e) => return error_page(&engine, &who, e),
    };
    let Some(secret) = op.totp_secret.as_deref() else {
        return Redirect::to("/account").into_response();
    };
    // As at login: the TCP peer, not a header anyone can send.
    let client = peer.map_or_else(|| "unknown".to_string(), |a| a.ip().to_string());
    if let Some(seconds) = throttle.locked_for(&op.username, &client, Instant::now()) {
        return account_view(
            &engine,
            &who,
            &op,
            StatusCode::TOO_MANY_REQUESTS,
            None,
            Some(format!(
                "Too many wrong codes or failed logins. Try again in {} minutes, or ask an admin.",
                seconds.div_ceil(60)
            )),
        );
    }
    if !totp::verify(secret, &form.code, now_secs()) {
        // Someone at an unattended browser guessing codes: the same budget as guessing passwords.
        throttle.failed(&op.username, &client, Instant::now());
        tracing::info!(operator = %op.username, "wrong code to turn off the second factor");
        return account_view(
            &engine,
            &who,
            &op,
            StatusCode::BAD_REQUEST,
            None,
            Some(
                "That is not the code your app shows now. The second factor is still on. If you \
                 lost the phone with the app, ask your administrator for help."
                    .into(),
            ),
        );
    }
    let update = OperatorUpdate {
        username: op.username.clone(),
        role: None,
        tenants: None,
        password_hash: None,
        disabled: None,
        totp: Some(TotpChange::Disable),
    };
    if let Err(e) = engine.update_operator(update).await {
        return error_page(&engine, &who, e.into());
    }
    tracing::info!(operator = %op.username, "operator turned off the second factor");
    Redirect::to("/account?done=totp_off").into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{HeaderMap, Request};
    use campanile_cluster::Role;

    use super::*;
    use crate::testkit::{exchange, get_with, login, operator_account, post_with, FakeEngine};

    /// A site with the operator `mario` (pisa) logged in: the router, the engine, the session's
    /// cookie header and CSRF token.
    struct Site {
        engine: Arc<FakeEngine>,
        router: axum::Router,
        cookie: String,
        csrf: String,
    }

    fn site() -> Site {
        let engine = Arc::new(FakeEngine::new());
        engine.tenant("pisa", "Comune di Pisa");
        engine.add_operator(Operator {
            display_name: "Mario Rossi".into(),
            ..operator_account("mario", Role::Operator, &["pisa"])
        });
        let (cookie, csrf) = login(&engine, "mario");
        Site {
            router: crate::router(engine.clone()),
            engine,
            cookie,
            csrf,
        }
    }

    async fn send(site: &Site, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
        exchange(&site.router, req).await.into_parts()
    }

    async fn get(site: &Site, path: &str) -> (StatusCode, HeaderMap, String) {
        get_with(&site.router, path, &site.cookie)
            .await
            .into_parts()
    }

    /// A form post as the logged-in browser sends it.
    async fn post(
        site: &Site,
        path: &str,
        fields: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        post_with(&site.router, path, &site.cookie, fields)
            .await
            .into_parts()
    }

    /// The value of the hidden field `name` in a page.
    fn hidden(html: &str, name: &str) -> String {
        let marker = format!("name=\"{name}\" value=\"");
        let start = html.find(&marker).unwrap() + marker.len();
        html[start..].split('"').next().unwrap().to_string()
    }

    /// A six-digit code that is none of the three `verify` accepts now.
    fn wrong_code(secret: &str) -> String {
        (0..1_000_000u32)
            .map(|n| format!("{n:06}"))
            .find(|c| {
                !totp::verify(secret, c, now_secs()) && !totp::verify(secret, c, now_secs() + 30)
            })
            .unwrap()
    }

    /// Start, then confirm with the app's current code; answers the secret.
    async fn turn_on(site: &Site) -> String {
        let (_, _, html) = post(site, "/account/totp/start", &[("csrf", &site.csrf)]).await;
        let secret = hidden(&html, "secret");
        let code = totp::code_at(&secret, now_secs()).unwrap();
        let (s, h, _) = post(
            site,
            "/account/totp/confirm",
            &[("csrf", &site.csrf), ("secret", &secret), ("code", &code)],
        )
        .await;
        assert_eq!(s, StatusCode::SEE_OTHER);
        assert_eq!(h[header::LOCATION], "/account?done=totp_on");
        secret
    }

    #[tokio::test]
    async fn the_account_page_shows_the_operator_and_needs_a_login() {
        let site = site();
        let (s, _, html) = get(&site, "/account").await;
        assert_eq!(s, StatusCode::OK);
        assert!(html.contains("Mario Rossi"));
        assert!(html.contains("mario"));
        assert!(html.contains("pisa"));
        assert!(html.contains("id=\"totp-off\""));

        let req = Request::get("/account").body(Body::empty()).unwrap();
        let (s, h, _) = send(&site, req).await;
        assert_eq!(s, StatusCode::SEE_OTHER);
        assert_eq!(h[header::LOCATION], "/login");
    }

    #[tokio::test]
    async fn start_shows_a_secret_and_its_otpauth_address_without_storing_it() {
        let site = site();
        let (s, h, html) = post(&site, "/account/totp/start", &[("csrf", &site.csrf)]).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
        let secret = hidden(&html, "secret");
        assert!(totp::valid_secret(&secret));
        assert!(html.contains(&format!("otpauth://totp/Campanile:mario?secret={secret}")));
        assert!(html.contains("issuer=Campanile"));
        assert!(html.contains(&grouped(&secret)));
        assert!(html.contains("<svg"));
        assert!(html.contains("autocomplete=\"one-time-code\""));
        assert_eq!(site.engine.operator_named("mario").totp_secret, None);
    }

    #[tokio::test]
    async fn a_wrong_code_leaves_the_second_factor_off_and_the_right_one_turns_it_on() {
        let site = site();
        let (_, _, html) = post(&site, "/account/totp/start", &[("csrf", &site.csrf)]).await;
        let secret = hidden(&html, "secret");

        let wrong = wrong_code(&secret);
        let (s, _, html) = post(
            &site,
            "/account/totp/confirm",
            &[("csrf", &site.csrf), ("secret", &secret), ("code", &wrong)],
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(html.contains("role=\"alert\""));
        assert_eq!(
            hidden(&html, "secret"),
            secret,
            "the same secret to try again"
        );
        assert_eq!(site.engine.operator_named("mario").totp_secret, None);

        let code = totp::code_at(&secret, now_secs()).unwrap();
        let (s, h, _) = post(
            &site,
            "/account/totp/confirm",
            &[("csrf", &site.csrf), ("secret", &secret), ("code", &code)],
        )
        .await;
        assert_eq!(s, StatusCode::SEE_OTHER);
        assert_eq!(h[header::LOCATION], "/account?done=totp_on");
        assert_eq!(
            site.engine.operator_named("mario").totp_secret,
            Some(secret)
        );

        let (_, _, html) = get(&site, "/account?done=totp_on").await;
        assert!(html.contains("id=\"totp-on\""));
        assert!(html.contains("The second factor is on"));
    }

    #[tokio::test]
    async fn a_second_factor_that_is_on_is_not_replaced_without_turning_it_off() {
        let site = site();
        let secret = turn_on(&site).await;
        let (s, _, _) = post(&site, "/account/totp/start", &[("csrf", &site.csrf)]).await;
        assert_eq!(s, StatusCode::CONFLICT);
        let other = totp::new_secret();
        let code = totp::code_at(&other, now_secs()).unwrap();
        let (s, _, _) = post(
            &site,
            "/account/totp/confirm",
            &[("csrf", &site.csrf), ("secret", &other), ("code", &code)],
        )
        .await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert_eq!(
            site.engine.operator_named("mario").totp_secret,
            Some(secret)
        );
    }

    #[tokio::test]
    async fn a_weak_or_damaged_secret_is_refused() {
        let site = site();
        for secret in ["GEZDGNBVGY3TQOJQ", "not-base32-at-all!", ""] {
            let (s, _, _) = post(
                &site,
                "/account/totp/confirm",
                &[("csrf", &site.csrf), ("secret", secret), ("code", "123456")],
            )
            .await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{secret}");
        }
        assert_eq!(site.engine.operator_named("mario").totp_secret, None);
    }

    #[tokio::test]
    async fn turning_it_off_needs_a_current_code() {
        let site = site();
        let secret = turn_on(&site).await;

        let wrong = wrong_code(&secret);
        let (s, _, html) = post(
            &site,
            "/account/totp/disable",
            &[("csrf", &site.csrf), ("code", &wrong)],
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(html.contains("still on"));
        let (s, _, _) = post(&site, "/account/totp/disable", &[("csrf", &site.csrf)]).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "no code at all");
        assert_eq!(
            site.engine.operator_named("mario").totp_secret.as_deref(),
            Some(secret.as_str())
        );

        let code = totp::code_at(&secret, now_secs()).unwrap();
        let (s, h, _) = post(
            &site,
            "/account/totp/disable",
            &[("csrf", &site.csrf), ("code", &code)],
        )
        .await;
        assert_eq!(s, StatusCode::SEE_OTHER);
        assert_eq!(h[header::LOCATION], "/account?done=totp_off");
        assert_eq!(site.engine.operator_named("mario").totp_secret, None);
    }

    #[tokio::test]
    async fn wrong_codes_to_turn_it_off_are_throttled_like_failed_logins() {
        let site = site();
        let secret = turn_on(&site).await;
        let wrong = wrong_code(&secret);
        for _ in 0..auth::MAX_FAILURES {
            let (s, _, _) = post(
                &site,
                "/account/totp/disable",
                &[("csrf", &site.csrf), ("code", &wrong)],
            )
            .await;
            assert_eq!(s, StatusCode::BAD_REQUEST);
        }
        let code = totp::code_at(&secret, now_secs()).unwrap();
        let (s, _, html) = post(
            &site,
            "/account/totp/disable",
            &[("csrf", &site.csrf), ("code", &code)],
        )
        .await;
        assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
        assert!(html.contains("Try again in"));
        assert!(site.engine.operator_named("mario").totp_secret.is_some());
    }

    #[tokio::test]
    async fn every_post_needs_the_sessions_csrf_token() {
        let site = site();
        let (s, _, _) = post(&site, "/account/totp/start", &[]).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, _, _) = post(&site, "/account/totp/start", &[("csrf", "0000")]).await;
        assert_eq!(s, StatusCode::FORBIDDEN);

        let secret = totp::new_secret();
        let code = totp::code_at(&secret, now_secs()).unwrap();
        let (s, _, _) = post(
            &site,
            "/account/totp/confirm",
            &[("secret", &secret), ("code", &code)],
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert_eq!(site.engine.operator_named("mario").totp_secret, None);

        let secret = turn_on(&site).await;
        let code = totp::code_at(&secret, now_secs()).unwrap();
        let (s, _, _) = post(&site, "/account/totp/disable", &[("code", &code)]).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        assert!(site.engine.operator_named("mario").totp_secret.is_some());
    }
}
