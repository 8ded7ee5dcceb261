//! Campanile's HTTP surface.
//!
//! Operators, citizens and automation reach a node through this crate: a JSON API under `/api/v1`
//! (a bearer token or a console session; reads linearizable unless `?stale=true`; described by the
//! OpenAPI document at `/api/v1/openapi.json`), the operator console behind a login (`/`, `/login`,
//! server-rendered askama templates, live progress over server-sent events), the public citizen
//! portal (`/r/{tenant}`, with its QR codes and poster), Prometheus metrics at `/metrics` and a health
//! check at `/healthz`. Who may do what is decided in one place (`auth`); the crate depends on the
//! `Engine` trait, which the node implements, never on node internals; every API error is one JSON
//! format that names the problem.

// The OpenAPI document is one large `json!` literal.
#![recursion_limit = "256"]

pub mod account;
pub mod api;
pub mod auth;
pub mod console;
pub mod engine;
pub mod error;
pub mod italian_time;
pub mod openapi;
pub mod portal;
pub mod subscribers_page;
pub mod totp;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{middleware, Json, Router};

pub use engine::{Engine, EngineError, Health};
pub use error::ApiError;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Largest body of an import request (`api::IMPORT_MAX` subscribers).
pub const IMPORT_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// All routes, bound to `engine`.
pub fn router(engine: Arc<dyn Engine>) -> Router {
    let api = Router::new()
        .route(
            "/subscribers",
            post(api::create_subscriber).get(api::list_subscribers),
        )
        .route(
            "/subscribers/import",
            post(api::import_subscribers).layer(DefaultBodyLimit::max(IMPORT_BODY_LIMIT)),
        )
        .route(
            "/subscribers/{id}",
            get(api::get_subscriber)
                .patch(api::update_subscriber)
                .delete(api::delete_subscriber),
        )
        .route(
            "/campaigns",
            post(api::create_campaign).get(api::list_campaigns),
        )
        .route("/campaigns/{id}", get(api::get_campaign))
        .route("/campaigns/{id}/start", post(api::start_campaign))
        .route("/campaigns/{id}/cancel", post(api::cancel_campaign))
        .route("/campaigns/{id}/pause", post(api::pause_campaign))
        .route("/campaigns/{id}/resume", post(api::resume_campaign))
        .route("/campaigns/{id}/approve", post(api::approve_campaign))
        .route("/campaigns/{id}/override", post(api::override_approval))
        .route("/operators", get(api::operators).post(api::create_operator))
        .route(
            "/operators/{username}",
            axum::routing::patch(api::update_operator),
        )
        .route("/tokens", get(api::tokens).post(api::create_token))
        .route("/tokens/{id}", axum::routing::delete(api::revoke_token))
        .route("/session", get(api::whoami))
        .route("/preview", get(api::preview))
        .route("/campaigns/{id}/tasks", get(api::campaign_tasks))
        .route("/cluster", get(api::cluster))
        .route("/backup", get(api::backup))
        .route("/tenants", get(api::tenants).post(api::create_tenant))
        .route(
            "/tenants/{slug}/caller-id",
            axum::routing::put(api::set_caller_id).delete(api::clear_caller_id),
        )
        .route(
            "/tenants/{slug}/quiet-hours",
            axum::routing::put(api::set_quiet_hours).delete(api::clear_quiet_hours),
        )
        .route(
            "/audio",
            post(api::put_audio).layer(DefaultBodyLimit::max(api::AUDIO_BODY_LIMIT)),
        )
        .route("/audit", get(api::audit))
        .route(
            "/cluster/members/{id}",
            axum::routing::delete(api::remove_member),
        )
        .fallback(api::unknown_route)
        .method_not_allowed_fallback(api::wrong_method)
        .layer(middleware::from_fn_with_state(
            engine.clone(),
            api::linearizable_reads,
        ))
        .layer(middleware::from_fn_with_state(
            engine.clone(),
            api::authenticate,
        ));
    Router::new()
        .route("/api/v1/openapi.json", get(openapi::document))
        .nest("/api/v1", api)
        .merge(
            console::routes()
                .merge(subscribers_page::routes())
                .merge(account::routes())
                .layer(middleware::from_fn_with_state(
                    engine.clone(),
                    console::as_operator,
                )),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .merge(portal::routes())
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::Extension(Arc::new(auth::LoginThrottle::default())))
        .with_state(engine)
}

async fn metrics(State(engine): State<api::AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        engine.metrics_text(),
    )
}

async fn healthz(State(engine): State<api::AppState>) -> impl IntoResponse {
    let h = engine.health().await;
    let status = if h.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            serde_json::json!({ "ok": h.ok, "detail": h.detail, "drill_mode": engine.drill_mode().is_some() }),
        ),
    )
}

/// Serves the router on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<dyn Engine>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        router(engine).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;
