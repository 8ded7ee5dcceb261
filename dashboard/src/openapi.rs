//! The OpenAPI 3.0.3 description of the JSON API, served without authentication at
//! `GET /api/v1/openapi.json`.
//!
//! It exists so that automation can be written, and the API fuzzed (schemathesis, in
//! `chaos-tests/tests/api_schema.rs`), against a contract rather than by reading `api.rs`. It is
//! written by hand beside the handlers: request schemas say what the handlers accept (every body
//! refuses unknown fields), response schemas say exactly what the views (`subscriber_view`,
//! `campaign_view`, ...) answer, and every error is the one format of `error.rs`. The unit test
//! below reads `lib.rs` and fails when a route or a method has no entry here.

use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Map, Value};

use crate::api::{IMPORT_MAX, LANGUAGES};
use crate::auth::{MIN_PASSWORD_CHARS, SESSION_COOKIE};

/// Roles an operator may have, as the API spells them.
const ROLES: [&str; 5] = ["admin", "approver", "operator", "viewer", "regional"];

/// Campaign priorities, as the API spells them.
const PRIORITIES: [&str; 3] = ["emergency", "urgent", "info"];

/// `GET /api/v1/openapi.json`: the document, for anyone (it holds no data).
pub async fn document() -> impl IntoResponse {
    Json(spec())
}

/// The whole OpenAPI document.
pub fn spec() -> Value {
    let mut paths = Map::new();
    for (path, item) in path_items() {
        paths.insert(path.to_string(), item);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Campanile API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The JSON API of a Campanile node. Every request needs a caller: \
                `Authorization: Bearer <token>` (automation; the node's admin token is in its data \
                directory, file `admin-token`), or a console session cookie — and then, on anything \
                but GET, the session's `X-CSRF-Token` header. Every GET is linearizable (the node \
                catches up with the leader first) unless it carries `stale=true`. Every error is \
                `{\"error\": {\"code\", \"message\"}}`: `code` is a stable snake_case word, \
                `message` a sentence for a person.",
            "license": { "name": env!("CARGO_PKG_LICENSE") },
        },
        "servers": [{ "url": "/api/v1" }],
        "security": read_security(),
        "tags": [
            { "name": "subscribers", "description": "Registered phone numbers" },
            { "name": "campaigns", "description": "Alerts and their progress" },
            { "name": "recordings", "description": "Recorded messages and previews" },
            { "name": "accounts", "description": "Tenants, operators and the caller's session" },
            { "name": "oversight", "description": "The audit log" },
            { "name": "cluster", "description": "Membership and backups" },
        ],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token; the node writes its admin token to `admin-token` in its data directory.",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": SESSION_COOKIE,
                    "description": "A console session, opened by logging in at `/login`.",
                },
                "csrf": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-CSRF-Token",
                    "description": "The session's CSRF token (`csrf` in `GET /session`); needed with a session cookie on anything but GET.",
                },
            },
            "parameters": {
                "stale": {
                    "name": "stale",
                    "in": "query",
                    "required": false,
                    "description": "`true` reads this node's applied state as it is, without asking the leader: it keeps answering without a quorum.",
                    "schema": { "type": "boolean", "default": false },
                },
                "subscriberId": id_param("Subscriber id"),
                "campaignId": id_param("Campaign id"),
                "nodeId": id_param("Node id"),
                "username": {
                    "name": "username",
                    "in": "path",
                    "required": true,
                    "description": "An operator's username",
                    "schema": username(),
                    "example": "sindaco",
                },
            },
            "responses": error_responses(),
            "schemas": all_schemas(),
        },
    })
}

/// Any caller may read: a token or a session.
fn read_security() -> Value {
    json!([{ "bearer": [] }, { "session": [] }])
}

/// A state-changing request: a token, or a session with its CSRF token.
fn write_security() -> Value {
    json!([{ "bearer": [] }, { "session": [], "csrf": [] }])
}

fn id_param(description: &str) -> Value {
    json!({
        "name": "id",
        "in": "path",
        "required": true,
        "description": description,
        "schema": { "type": "integer", "format": "int64", "minimum": 0 },
        "example": 1,
    })
}

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn param_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/parameters/{name}") })
}

/// Text a handler checks with `check_text`: not blank, at most `max` characters.
fn text(max: usize, description: &str) -> Value {
    json!({
        "type": "string",
        "minLength": 1,
        "maxLength": max,
        "pattern": "\\S",
        "description": description,
    })
}

fn language() -> Value {
    json!({ "type": "string", "enum": LANGUAGES })
}

fn tenant_slug() -> Value {
    json!({
        "type": "string",
        "pattern": "^[a-z0-9][a-z0-9-]{0,39}$",
        "minLength": 1,
        "maxLength": 40,
        "description": "A tenant slug: 1 to 40 lower-case letters, digits and dashes, not starting with a dash",
    })
}

fn username() -> Value {
    json!({
        "type": "string",
        "pattern": "^[A-Za-z0-9._@-]{1,64}$",
        "minLength": 1,
        "maxLength": 64,
    })
}

fn password() -> Value {
    json!({
        "type": "string",
        "minLength": MIN_PASSWORD_CHARS,
        "maxLength": 256,
        "format": "password",
    })
}

fn uint() -> Value {
    json!({ "type": "integer", "format": "int64", "minimum": 0 })
}

/// A time of day, `HH:MM` (Italian local time).
fn clock_time() -> Value {
    json!({ "type": "string", "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$", "example": "22:00" })
}

fn nullable(mut schema: Value) -> Value {
    schema["nullable"] = json!(true);
    // OpenAPI 3.0.3: a nullable enum lists null among its values.
    if let Some(values) = schema.get_mut("enum").and_then(Value::as_array_mut) {
        values.push(Value::Null);
    }
    schema
}

/// An object whose every listed property is present and nothing else is.
fn exact(properties: Value) -> Value {
    let required: Vec<String> = properties
        .as_object()
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": required,
        "properties": properties,
    })
}

/// A request body object: `required` fields, unknown fields refused.
fn body(required: &[&str], properties: Value) -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": required,
        "properties": properties,
    })
}

/// The one error format (`error.rs`), under each status it is answered with.
fn error_responses() -> Value {
    let error = |description: &str| {
        json!({
            "description": description,
            "content": { "application/json": { "schema": schema_ref("Error") } },
        })
    };
    json!({
        "BadRequest": error("The request is not valid: the message names the field or parameter"),
        "Unauthorized": error("No caller: the bearer token is missing or not valid, or the session ended"),
        "Forbidden": error("The caller's role does not allow this, or the session's CSRF token is missing"),
        "NotFound": error("No such thing, or it belongs to a tenant the caller does not serve"),
        "Conflict": error("The state does not allow it (a duplicate, or a campaign in the wrong state)"),
        "PayloadTooLarge": error("The request body is larger than the route's limit"),
        "UnsupportedMediaType": error("The body is not sent as `application/json`"),
        "Unavailable": error("The cluster cannot answer now (no leader or no quorum); try again"),
        "Error": error("Any other error, in the same format"),
    })
}

/// Responses of an operation: `ok` (status, response) plus the named error statuses and a default.
fn responses(ok: &[(&str, Value)], errors: &[&str]) -> Value {
    let mut r = Map::new();
    for (status, response) in ok {
        r.insert(status.to_string(), response.clone());
    }
    for status in errors {
        let name = match *status {
            "400" => "BadRequest",
            "401" => "Unauthorized",
            "403" => "Forbidden",
            "404" => "NotFound",
            "409" => "Conflict",
            "413" => "PayloadTooLarge",
            "415" => "UnsupportedMediaType",
            "503" => "Unavailable",
            other => panic!("no error response for status {other}"),
        };
        r.insert(
            status.to_string(),
            json!({ "$ref": format!("#/components/responses/{name}") }),
        );
    }
    r.insert(
        "default".into(),
        json!({ "$ref": "#/components/responses/Error" }),
    );
    Value::Object(r)
}

fn json_response(description: &str, schema: Value) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": schema } },
    })
}

fn json_body(schema: Value, example: Value) -> Value {
    json!({
        "required": true,
        "content": { "application/json": { "schema": schema, "example": example } },
    })
}

/// Statuses every authenticated operation may answer besides its own.
const ALWAYS: [&str; 2] = ["401", "503"];

fn with_always(errors: &[&'static str]) -> Vec<&'static str> {
    let mut all = errors.to_vec();
    all.extend(ALWAYS);
    all.sort_unstable();
    all.dedup();
    all
}

/// One operation.
struct Op {
    id: &'static str,
    tag: &'static str,
    summary: &'static str,
    parameters: Vec<Value>,
    body: Option<Value>,
    ok: Vec<(&'static str, Value)>,
    errors: Vec<&'static str>,
}

impl Op {
    fn new(id: &'static str, tag: &'static str, summary: &'static str) -> Op {
        Op {
            id,
            tag,
            summary,
            parameters: Vec::new(),
            body: None,
            ok: Vec::new(),
            errors: Vec::new(),
        }
    }

    fn param(mut self, p: Value) -> Op {
        self.parameters.push(p);
        self
    }

    fn body(mut self, b: Value) -> Op {
        self.body = Some(b);
        self
    }

    fn ok(mut self, status: &'static str, response: Value) -> Op {
        self.ok.push((status, response));
        self
    }

    fn errors(mut self, errors: &[&'static str]) -> Op {
        self.errors = errors.to_vec();
        self
    }

    fn build(self, method: &str) -> Value {
        let mut op = json!({
            "operationId": self.id,
            "tags": [self.tag],
            "summary": self.summary,
            "security": if method == "get" { read_security() } else { write_security() },
            "responses": responses(&self.ok, &with_always(&self.errors)),
        });
        if !self.parameters.is_empty() {
            op["parameters"] = Value::Array(self.parameters);
        }
        if let Some(b) = self.body {
            op["requestBody"] = b;
        }
        op
    }
}

/// A campaign lifecycle action: `POST /campaigns/{id}/<verb>`, no body, the campaign afterwards.
fn campaign_action(id: &'static str, summary: &'static str) -> Value {
    json!({
        "post": Op::new(id, "campaigns", summary)
            .param(param_ref("campaignId"))
            .ok("200", json_response("The campaign afterwards", schema_ref("Campaign")))
            .errors(&["400", "403", "404", "409"])
            .build("post"),
    })
}

fn path_items() -> Vec<(&'static str, Value)> {
    let stale = || param_ref("stale");
    vec![
        (
            "/openapi.json",
            json!({
                "get": {
                    "operationId": "openapi",
                    "tags": ["cluster"],
                    "summary": "This document (no authentication)",
                    "security": [],
                    "responses": {
                        "200": json_response("The OpenAPI document", json!({
                            "type": "object",
                            "required": ["openapi", "info", "paths"],
                        })),
                    },
                },
            }),
        ),
        (
            "/subscribers",
            json!({
                "get": Op::new("listSubscribers", "subscribers", "A page of a tenant's subscribers whose number, name or zone contains `q`")
                    .param(json!({
                        "name": "tenant", "in": "query", "required": false,
                        "description": "Default: the caller's own tenant",
                        "schema": tenant_slug(),
                    }))
                    .param(json!({
                        "name": "q", "in": "query", "required": false,
                        "schema": { "type": "string", "maxLength": 100 },
                        "description": "Part of a number, a name or a zone",
                    }))
                    .param(json!({ "name": "offset", "in": "query", "required": false, "schema": uint() }))
                    .param(json!({
                        "name": "limit", "in": "query", "required": false,
                        "schema": { "type": "integer", "minimum": 1, "maximum": 1000 },
                    }))
                    .param(stale())
                    .ok("200", json_response("The page and how many match", exact(json!({
                        "total": uint(),
                        "subscribers": { "type": "array", "items": schema_ref("Subscriber") },
                    }))))
                    .errors(&["400", "403", "404"])
                    .build("get"),
                "post": Op::new("createSubscriber", "subscribers", "Registers a phone number (verified: entered by an operator)")
                    .body(json_body(
                        schema_ref("SubscriberInput"),
                        json!({ "phone": "+393471234567", "name": "Maria Rossi", "language": "it", "zone": "centro" }),
                    ))
                    .ok("201", json_response("The new subscriber", schema_ref("Subscriber")))
                    .errors(&["400", "403", "404", "409", "413", "415"])
                    .build("post"),
            }),
        ),
        (
            "/subscribers/import",
            json!({
                "post": Op::new("importSubscribers", "subscribers", "Registers up to 5,000 numbers in one Raft entry; each bad item is reported by position")
                    .body(json_body(body(&["subscribers"], json!({
                        "subscribers": {
                            "type": "array",
                            "maxItems": IMPORT_MAX,
                            "items": schema_ref("SubscriberInput"),
                        },
                    })), json!({
                        "subscribers": [
                            { "phone": "+393471234568", "zone": "centro" },
                            { "phone": "347 123 4569", "language": "en" },
                        ],
                    })))
                    .ok("200", json_response("What was imported, and why the rest was not", schema_ref("ImportResult")))
                    .errors(&["400", "403", "404", "413", "415"])
                    .build("post"),
            }),
        ),
        (
            "/subscribers/{id}",
            json!({
                "get": Op::new("getSubscriber", "subscribers", "One subscriber")
                    .param(param_ref("subscriberId"))
                    .param(stale())
                    .ok("200", json_response("The subscriber", schema_ref("Subscriber")))
                    .errors(&["400", "404"])
                    .build("get"),
                "patch": Op::new("updateSubscriber", "subscribers", "Changes a subscriber's name, language or zone (an empty string clears the name or the zone)")
                    .param(param_ref("subscriberId"))
                    .body(json_body(body(&[], json!({
                        "name": nullable(json!({ "type": "string", "maxLength": 100 })),
                        "language": nullable(language()),
                        "zone": nullable(json!({ "type": "string", "maxLength": 64 })),
                    })), json!({ "zone": "collina" })))
                    .ok("200", json_response("The subscriber afterwards", schema_ref("Subscriber")))
                    .errors(&["400", "403", "404", "413", "415"])
                    .build("patch"),
                "delete": Op::new("deleteSubscriber", "subscribers", "Forgets a subscriber")
                    .param(param_ref("subscriberId"))
                    .ok("204", json!({ "description": "Deleted" }))
                    .errors(&["400", "403", "404", "409"])
                    .build("delete"),
            }),
        ),
        (
            "/campaigns",
            json!({
                "get": Op::new("listCampaigns", "campaigns", "Every campaign of the caller's tenants")
                    .param(stale())
                    .ok("200", json_response("The campaigns", json!({ "type": "array", "items": schema_ref("Campaign") })))
                    .errors(&[])
                    .build("get"),
                "post": Op::new("createCampaign", "campaigns", "Composes a campaign (a draft; start it with /start)")
                    .body(json_body(schema_ref("CampaignInput"), json!({
                        "title": "Allerta meteo",
                        "message": { "tts": { "text": "Allerta rossa: il fiume è in piena. Premi 1 per confermare.", "language": "it" } },
                        "audience": { "zones": ["centro"] },
                        "priority": "emergency",
                        "require_confirmation": true,
                        "retry": { "max_attempts": 3, "busy_delay_s": 30, "no_answer_delay_s": 60, "failure_delay_s": 30 },
                    })))
                    .ok("201", json_response("The new campaign", schema_ref("Campaign")))
                    .errors(&["400", "403", "404", "409", "413", "415"])
                    .build("post"),
            }),
        ),
        (
            "/campaigns/{id}",
            json!({
                "get": Op::new("getCampaign", "campaigns", "One campaign with its progress")
                    .param(param_ref("campaignId"))
                    .param(stale())
                    .ok("200", json_response("The campaign", schema_ref("Campaign")))
                    .errors(&["400", "404"])
                    .build("get"),
            }),
        ),
        (
            "/campaigns/{id}/start",
            campaign_action("startCampaign", "Starts calling the audience"),
        ),
        (
            "/campaigns/{id}/cancel",
            campaign_action("cancelCampaign", "Stops the campaign for good"),
        ),
        (
            "/campaigns/{id}/pause",
            campaign_action("pauseCampaign", "Stops calling until resumed"),
        ),
        (
            "/campaigns/{id}/resume",
            campaign_action("resumeCampaign", "Calls again after a pause"),
        ),
        (
            "/campaigns/{id}/approve",
            campaign_action(
                "approveCampaign",
                "A second person approves the campaign (a logged-in operator, never a token)",
            ),
        ),
        (
            "/campaigns/{id}/override",
            json!({
                "post": Op::new("overrideApproval", "campaigns", "Starts an emergency campaign without a second person, with a reason (a logged-in operator, never a token)")
                    .param(param_ref("campaignId"))
                    .body(json_body(
                        body(&["reason"], json!({ "reason": text(500, "Why no second person could approve") })),
                        json!({ "reason": "the approver cannot be reached and the river is rising" }),
                    ))
                    .ok("200", json_response("The campaign afterwards", schema_ref("Campaign")))
                    .errors(&["400", "403", "404", "409", "413", "415"])
                    .build("post"),
            }),
        ),
        (
            "/campaigns/{id}/tasks",
            json!({
                "get": Op::new("campaignTasks", "campaigns", "Where each targeted subscriber stands")
                    .param(param_ref("campaignId"))
                    .param(stale())
                    .ok("200", json_response("One task per targeted subscriber", json!({ "type": "array", "items": schema_ref("Task") })))
                    .errors(&["400", "404"])
                    .build("get"),
            }),
        ),
        (
            "/operators",
            json!({
                "get": Op::new("listOperators", "accounts", "The console accounts of the caller's tenants (never a password hash)")
                    .param(stale())
                    .ok("200", json_response("The accounts", exact(json!({
                        "operators": { "type": "array", "items": schema_ref("Operator") },
                    }))))
                    .errors(&["403"])
                    .build("get"),
                "post": Op::new("createOperator", "accounts", "Makes a console account")
                    .body(json_body(schema_ref("OperatorInput"), json!({
                        "username": "vigile", "display_name": "Vigile di turno", "role": "operator",
                        "tenants": ["default"], "password": "correct horse battery",
                    })))
                    .ok("201", json_response("The new account", schema_ref("Operator")))
                    .errors(&["400", "403", "404", "409", "413", "415"])
                    .build("post"),
            }),
        ),
        (
            "/operators/{username}",
            json!({
                "patch": Op::new("updateOperator", "accounts", "Changes an account's role, disables it, or sets a new password (which ends its sessions)")
                    .param(param_ref("username"))
                    .body(json_body(schema_ref("OperatorPatch"), json!({ "role": "approver", "disabled": false })))
                    .ok("200", json_response("The account afterwards", schema_ref("Operator")))
                    .errors(&["400", "403", "404", "409", "413", "415"])
                    .build("patch"),
            }),
        ),
        (
            "/tokens",
            json!({
                "get": Op::new("listTokens", "accounts", "The API tokens the caller administers (never their secrets)")
                    .param(stale())
                    .ok("200", json_response("The tokens", exact(json!({
                        "tokens": { "type": "array", "items": schema_ref("Token") },
                    }))))
                    .errors(&["403"])
                    .build("get"),
                "post": Op::new("createToken", "accounts", "Makes an API token for automation with a role in some tenants; the secret is in this answer only")
                    .body(json_body(schema_ref("TokenInput"), json!({
                        "label": "import from the registry office", "role": "operator", "tenants": ["default"],
                    })))
                    .ok("201", json_response("The new token and its secret", schema_ref("NewToken")))
                    .errors(&["400", "403", "404", "413", "415"])
                    .build("post"),
            }),
        ),
        (
            "/tokens/{id}",
            json!({
                "delete": Op::new("revokeToken", "accounts", "The token stops working on every node")
                    .param(json!({
                        "name": "id", "in": "path", "required": true,
                        "schema": { "type": "string", "pattern": "^[0-9a-fA-F]{8,64}$" },
                        "description": "The token's id (the start of its hash, as listed)",
                        "example": "0123456789abcdef",
                    }))
                    .ok("204", json!({ "description": "Revoked" }))
                    .errors(&["403", "404"])
                    .build("delete"),
            }),
        ),
        (
            "/session",
            json!({
                "get": Op::new("whoami", "accounts", "Who the caller is and what it may do")
                    .param(stale())
                    .ok("200", json_response("The caller", schema_ref("Session")))
                    .errors(&[])
                    .build("get"),
            }),
        ),
        (
            "/preview",
            json!({
                "get": Op::new("preview", "recordings", "A message as a citizen would hear it")
                    .param(json!({
                        "name": "text", "in": "query", "required": true,
                        "schema": text(2000, "The text to speak"),
                        "example": "Allerta meteo: restate in casa.",
                    }))
                    .param(json!({
                        "name": "language", "in": "query", "required": true, "schema": language(),
                        "example": "it",
                    }))
                    .ok("200", json!({
                        "description": "The message as 8 kHz mono WAV",
                        "content": { "audio/wav": { "schema": { "type": "string", "format": "binary" } } },
                    }))
                    .errors(&["400", "403"])
                    .build("get"),
            }),
        ),
        (
            "/cluster",
            json!({
                "get": Op::new("cluster", "cluster", "Leader, term and members; answers without a quorum")
                    .param(stale())
                    .ok("200", json_response("The cluster as this node sees it", schema_ref("Cluster")))
                    .errors(&[])
                    .build("get"),
            }),
        ),
        (
            "/cluster/members/{id}",
            json!({
                "delete": Op::new("removeMember", "cluster", "The node leaves the cluster; its in-flight calls go to the others (API tokens only)")
                    .param(param_ref("nodeId"))
                    .ok("200", json_response("The cluster afterwards", schema_ref("Cluster")))
                    .errors(&["400", "403", "404", "409"])
                    .build("delete"),
            }),
        ),
        (
            "/backup",
            json!({
                "get": Op::new("backup", "cluster", "A consistent copy of the replicated state, for `campanile restore` (API tokens only; holds personal data)")
                    .param(stale())
                    .ok("200", json!({
                        "description": "The backup file",
                        "content": { "application/octet-stream": { "schema": { "type": "string", "format": "binary" } } },
                    }))
                    .errors(&["403"])
                    .build("get"),
            }),
        ),
        (
            "/tenants/{slug}/caller-id",
            json!({
                "put": Op::new("setCallerId", "accounts", "What the tenant's calls show (From and P-Asserted-Identity); the trunk must allow the number")
                    .param(json!({
                        "name": "slug", "in": "path", "required": true, "schema": tenant_slug(), "example": "default",
                    }))
                    .body(json_body(body(&["number", "display_name"], json!({
                        "number": { "type": "string", "pattern": "^\\+?[0-9]{3,20}$" },
                        "display_name": { "type": "string", "minLength": 1, "maxLength": 60, "pattern": "^[^\"\\\\\\u0000-\\u001f\\u007f]+$" },
                    })), json!({ "number": "+390502211", "display_name": "Comune di Pisa" })))
                    .ok("200", json_response("The tenant afterwards", schema_ref("Tenant")))
                    .errors(&["400", "403", "404", "413", "415"])
                    .build("put"),
                "delete": Op::new("clearCallerId", "accounts", "Back to the node's own caller ID")
                    .param(json!({
                        "name": "slug", "in": "path", "required": true, "schema": tenant_slug(), "example": "default",
                    }))
                    .ok("200", json_response("The tenant afterwards", schema_ref("Tenant")))
                    .errors(&["403", "404"])
                    .build("delete"),
            }),
        ),
        (
            "/tenants/{slug}/quiet-hours",
            json!({
                "put": Op::new("setQuietHours", "accounts", "When the tenant's non-emergency campaigns start no calls: a daily window in Italian local time, which may wrap midnight (calls up at its start go on; emergencies ignore it)")
                    .param(json!({
                        "name": "slug", "in": "path", "required": true, "schema": tenant_slug(), "example": "default",
                    }))
                    .body(json_body(body(&["start", "end"], json!({
                        "start": clock_time(),
                        "end": clock_time(),
                    })), json!({ "start": "22:00", "end": "07:00" })))
                    .ok("200", json_response("The tenant afterwards", schema_ref("Tenant")))
                    .errors(&["400", "403", "404", "413", "415"])
                    .build("put"),
                "delete": Op::new("clearQuietHours", "accounts", "The tenant's campaigns call at any time of day")
                    .param(json!({
                        "name": "slug", "in": "path", "required": true, "schema": tenant_slug(), "example": "default",
                    }))
                    .ok("200", json_response("The tenant afterwards", schema_ref("Tenant")))
                    .errors(&["403", "404"])
                    .build("delete"),
            }),
        ),
        (
            "/tenants",
            json!({
                "get": Op::new("listTenants", "accounts", "The tenants the caller serves")
                    .param(stale())
                    .ok("200", json_response("The tenants", exact(json!({
                        "tenants": { "type": "array", "items": schema_ref("Tenant") },
                    }))))
                    .errors(&[])
                    .build("get"),
                "post": Op::new("createTenant", "accounts", "Makes a tenant (API tokens only)")
                    .body(json_body(body(&["slug", "name"], json!({
                        "slug": tenant_slug(),
                        "name": text(200, "The tenant's name, shown to citizens"),
                    })), json!({ "slug": "lucca", "name": "Comune di Lucca" })))
                    .ok("201", json_response("The new tenant", schema_ref("Tenant")))
                    .errors(&["400", "403", "409", "413", "415"])
                    .build("post"),
            }),
        ),
        (
            "/audio",
            json!({
                "post": Op::new("putAudio", "recordings", "Stores a recording (any common WAV; kept as 8 kHz mono, at most 600 s), content-addressed")
                    .param(json!({
                        "name": "tenant", "in": "query", "required": false,
                        "description": "Default: the caller's own tenant",
                        "schema": tenant_slug(),
                    }))
                    .body(json!({
                        "required": true,
                        "description": "A WAV file; the Content-Type is not looked at",
                        "content": {
                            "audio/wav": { "schema": { "type": "string", "format": "binary" } },
                            "application/octet-stream": { "schema": { "type": "string", "format": "binary" } },
                        },
                    }))
                    .ok("201", json_response("Where the recording is stored", schema_ref("AudioStored")))
                    .errors(&["400", "403", "404", "413"])
                    .build("post"),
            }),
        ),
        (
            "/audit",
            json!({
                "get": Op::new("audit", "oversight", "Who did what, oldest first, a page at a time")
                    .param(json!({
                        "name": "tenant", "in": "query", "required": false,
                        "description": "One tenant's entries; a token reads every tenant's by default, an operator its first tenant's",
                        "schema": tenant_slug(),
                    }))
                    .param(json!({
                        "name": "after", "in": "query", "required": false,
                        "description": "Entries after this `seq` (the last one of the previous page)",
                        "schema": uint(),
                    }))
                    .param(json!({
                        "name": "limit", "in": "query", "required": false,
                        "description": "Entries per page",
                        "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 },
                    }))
                    .ok("200", json_response("A page of the audit log", exact(json!({
                        "entries": { "type": "array", "items": schema_ref("AuditEntry") },
                    }))))
                    .errors(&["400", "403", "404"])
                    .build("get"),
            }),
        ),
    ]
}

/// Every schema of the document.
fn all_schemas() -> Value {
    let mut all = schemas();
    if let (Some(all), Value::Object(more)) = (all.as_object_mut(), token_schemas()) {
        all.extend(more);
    }
    all
}

/// The API token schemas (kept apart: one `json!` for every schema outgrows the macro's recursion).
fn token_schemas() -> Value {
    json!({
        "TokenInput": body(&["label", "role"], json!({
            "label": text(100, "What the token is for"),
            "role": schema_ref("Role"),
            "tenants": nullable(json!({
                "type": "array", "minItems": 1, "items": tenant_slug(),
                "description": "Default: the caller's own tenant",
            })),
        })),
        "Token": exact(json!({
            "id": { "type": "string" },
            "label": { "type": "string" },
            "created_ms": uint(),
            "role": { "type": "string", "description": "The token's role, or `admin token` for a node's own" },
            "tenants": nullable(json!({ "type": "array", "items": { "type": "string" } })),
            "created_by": nullable(json!({ "type": "string" })),
        })),
        "NewToken": exact(json!({
            "id": { "type": "string" },
            "label": { "type": "string" },
            "created_ms": uint(),
            "role": { "type": "string", "description": "The token's role, or `admin token` for a node's own" },
            "tenants": nullable(json!({ "type": "array", "items": { "type": "string" } })),
            "created_by": nullable(json!({ "type": "string" })),
            "token": { "type": "string", "description": "The secret: send it as `Authorization: Bearer`" },
        })),
    })
}

fn schemas() -> Value {
    let counts: Map<String, Value> = [
        "targeted",
        "pending",
        "in_flight",
        "confirmed",
        "exhausted",
        "invalid",
        "opted_out",
        "cancelled",
        "attempts",
        "answered",
    ]
    .iter()
    .map(|k| (k.to_string(), uint()))
    .collect();
    let may: Map<String, Value> = [
        "read",
        "operate",
        "approve",
        "audit",
        "administer",
        "system",
    ]
    .iter()
    .map(|k| (k.to_string(), json!({ "type": "boolean" })))
    .collect();
    let delay = |what: &str| {
        json!({
            "type": "number", "minimum": 0, "maximum": 86400,
            "description": format!("Seconds before calling again after {what}"),
        })
    };
    json!({
        "Error": exact(json!({
            "error": exact(json!({
                "code": { "type": "string", "pattern": "^[a-z][a-z0-9_]*$", "description": "Stable, snake_case" },
                "message": { "type": "string", "description": "What failed and what to do, for a person" },
            })),
        })),
        "Language": language(),
        "Priority": { "type": "string", "enum": PRIORITIES },
        "Role": { "type": "string", "enum": ROLES },
        "TenantSlug": tenant_slug(),
        "SubscriberInput": body(&["phone"], json!({
            "phone": {
                "type": "string", "minLength": 1, "maxLength": 32,
                "description": "E.164 (`+393471234567`), or an Italian number as a person types it",
            },
            "name": nullable(text(100, "The subscriber's name")),
            "language": nullable(json!({ "type": "string", "enum": LANGUAGES, "description": "Default: it" })),
            "zone": nullable(text(64, "The zone a campaign's audience names")),
            "tenant": nullable(tenant_slug()),
        })),
        "Subscriber": exact(json!({
            "id": uint(),
            "phone": { "type": "string", "description": "E.164" },
            "name": nullable(json!({ "type": "string" })),
            "language": { "type": "string" },
            "zone": nullable(json!({ "type": "string" })),
            "tenant": { "type": "string" },
            "verified": { "type": "boolean" },
            "opted_out": { "type": "boolean" },
            "created_ms": uint(),
        })),
        "ImportProblem": exact(json!({
            "item": { "type": "integer", "minimum": 1, "description": "Position in the request, from 1" },
            "error": { "type": "string" },
        })),
        "ImportResult": exact(json!({
            "created": uint(),
            "duplicates": { "type": "array", "items": schema_ref("ImportProblem") },
            "rejected": { "type": "array", "items": schema_ref("ImportProblem") },
        })),
        "TtsMessage": exact(json!({
            "tts": exact(json!({
                "text": text(2000, "What the voice says"),
                "language": schema_ref("Language"),
            })),
        })),
        "RecordingMessage": exact(json!({
            "recording": exact(json!({
                "sha256": {
                    "type": "string", "pattern": "^[0-9a-fA-F]{64}$",
                    "description": "As `POST /audio` answered",
                },
            })),
        })),
        "Message": {
            "description": "Exactly one of: text to speak, or a stored recording",
            "oneOf": [schema_ref("TtsMessage"), schema_ref("RecordingMessage")],
        },
        "Audience": {
            "oneOf": [
                exact(json!({ "all": { "type": "boolean", "enum": [true] } })),
                exact(json!({
                    "zones": { "type": "array", "minItems": 1, "items": text(64, "A zone") },
                })),
            ],
        },
        "RetryInput": body(&[], json!({
            "max_attempts": { "type": "integer", "minimum": 1, "maximum": 50 },
            "busy_delay_s": delay("a busy line"),
            "no_answer_delay_s": delay("no answer"),
            "failure_delay_s": delay("a failure"),
            "quick_retries": { "type": "integer", "minimum": 0, "maximum": 10, "description": "The first retries that wait at most quick_delay_s" },
            "quick_delay_s": delay("a missed call, for the first quick_retries retries"),
            "until_deadline": { "type": "boolean", "description": "With a deadline, call until confirmed or the deadline, beyond max_attempts (emergency default)" },
        })),
        "Retry": exact(json!({
            "max_attempts": { "type": "integer", "minimum": 1 },
            "busy_delay_s": { "type": "number", "minimum": 0 },
            "no_answer_delay_s": { "type": "number", "minimum": 0 },
            "failure_delay_s": { "type": "number", "minimum": 0 },
            "quick_retries": { "type": "integer", "minimum": 0 },
            "quick_delay_s": { "type": "number", "minimum": 0 },
            "until_deadline": { "type": "boolean" },
        })),
        "CampaignInput": body(&["title", "message", "audience", "priority"], json!({
            "title": text(200, "What operators see"),
            "message": schema_ref("Message"),
            "audience": schema_ref("Audience"),
            "priority": schema_ref("Priority"),
            "require_confirmation": { "type": "boolean", "default": true, "description": "Whether a citizen must press 1" },
            "retry": schema_ref("RetryInput"),
            "tenant": tenant_slug(),
            "deadline_ms": {
                "type": "integer", "minimum": 0,
                "description": "Nobody is called from this time on (ms since the epoch; after the start, at most 62 days ahead); who is not reached by then ends exhausted",
            },
            "not_before_ms": {
                "type": "integer", "minimum": 0,
                "description": "Schedule: once started, nobody is called before this time (ms since the epoch; at most 31 days ahead)",
            },
        })),
        "Approval": {
            "oneOf": [
                exact(json!({ "state": { "type": "string", "enum": ["not_needed"] } })),
                exact(json!({ "state": { "type": "string", "enum": ["pending"] } })),
                exact(json!({
                    "state": { "type": "string", "enum": ["approved"] },
                    "by": { "type": "string" },
                    "at_ms": uint(),
                })),
                exact(json!({
                    "state": { "type": "string", "enum": ["overridden"] },
                    "by": { "type": "string" },
                    "reason": { "type": "string" },
                    "at_ms": uint(),
                })),
            ],
        },
        "NodeProgress": exact(json!({
            "attempts": uint(),
            "answered": uint(),
            "confirmed": uint(),
        })),
        "Campaign": exact(json!({
            "id": uint(),
            "title": { "type": "string" },
            "state": { "type": "string", "enum": ["draft", "running", "paused", "completed", "cancelled"] },
            "priority": schema_ref("Priority"),
            "require_confirmation": { "type": "boolean" },
            "message": schema_ref("Message"),
            "tenant": { "type": "string" },
            "audience": schema_ref("Audience"),
            "retry": schema_ref("Retry"),
            "counts": exact(Value::Object(counts)),
            "answer_ratio": { "type": "number", "minimum": 0, "maximum": 1 },
            "by_node": {
                "type": "object",
                "description": "Per node id",
                "additionalProperties": schema_ref("NodeProgress"),
            },
            "created_by": nullable(json!({ "type": "string", "description": "The operator; null when a token created it" })),
            "approval": schema_ref("Approval"),
            "created_ms": uint(),
            "started_ms": nullable(uint()),
            "finished_ms": nullable(uint()),
            "not_before_ms": nullable(uint()),
            "deadline_ms": nullable(uint()),
        })),
        "Task": exact(json!({
            "subscriber": uint(),
            "phone": { "type": "string" },
            "state": {
                "type": "string",
                "enum": ["pending", "in_flight", "confirmed", "exhausted", "invalid", "opted_out", "cancelled"],
            },
            "attempts": uint(),
            "last_outcome": nullable(json!({
                "type": "string",
                "enum": [
                    "confirmed", "heard", "not_confirmed", "hung_up", "voicemail", "busy", "no_answer",
                    "invalid_number", "rejected", "unreachable", "opt_out", "interrupted", "trunk_rejected",
                ],
            })),
            "next_due_ms": uint(),
        })),
        "OperatorInput": body(&["username", "role", "password"], json!({
            "username": username(),
            "display_name": nullable(text(100, "Default: the username")),
            "role": schema_ref("Role"),
            "tenants": nullable(json!({
                "type": "array", "minItems": 1, "items": tenant_slug(),
                "description": "Default: the caller's own tenant",
            })),
            "password": password(),
        })),
        "OperatorPatch": body(&[], json!({
            "role": nullable(json!({ "type": "string", "enum": ROLES })),
            "disabled": nullable(json!({ "type": "boolean" })),
            "password": nullable(password()),
            "reset_totp": nullable(json!({ "type": "boolean", "description": "true turns the account's second factor off" })),
        })),
        "Operator": exact(json!({
            "username": { "type": "string" },
            "display_name": { "type": "string" },
            "role": schema_ref("Role"),
            "tenants": { "type": "array", "items": { "type": "string" } },
            "disabled": { "type": "boolean" },
            "totp": { "type": "boolean", "description": "Whether the second factor is on" },
            "created_ms": uint(),
            "updated_ms": uint(),
        })),
        "Session": {
            "type": "object",
            "additionalProperties": false,
            "required": ["actor", "may"],
            "properties": {
                "actor": { "type": "string", "description": "The name in the audit log" },
                "may": exact(Value::Object(may)),
                "role": { "type": "string", "enum": ROLES, "description": "Console sessions only" },
                "tenants": { "type": "array", "items": { "type": "string" }, "description": "Console sessions only" },
                "csrf": { "type": "string", "description": "Console sessions only: send it as X-CSRF-Token" },
            },
        },
        "Tenant": exact(json!({
            "slug": { "type": "string" },
            "name": { "type": "string" },
            "created_ms": uint(),
            "caller_id": nullable(schema_ref("CallerId")),
            "quiet_hours": nullable(schema_ref("QuietHours")),
        })),
        "QuietHours": exact(json!({
            "start": clock_time(),
            "end": clock_time(),
        })),
        "CallerId": exact(json!({
            "number": { "type": "string" },
            "display_name": { "type": "string" },
        })),
        "AudioStored": exact(json!({
            "sha256": { "type": "string", "pattern": "^[0-9a-f]{64}$" },
            "tenant": { "type": "string" },
            "duration_ms": uint(),
        })),
        "AuditEntry": exact(json!({
            "seq": { "type": "integer", "minimum": 1 },
            "at_ms": uint(),
            "actor": { "type": "string" },
            "tenant": nullable(json!({ "type": "string" })),
            "action": { "type": "string" },
            "target": { "type": "string" },
            "result": { "type": "string", "description": "`ok`, or the refusal" },
        })),
        "ClusterMember": exact(json!({
            "id": uint(),
            "role": { "type": "string", "enum": ["leader", "follower", "learner"] },
            "datacenter": nullable(json!({ "type": "string" })),
            "raft_addr": { "type": "string" },
            "http_addr": nullable(json!({ "type": "string" })),
            "applied_index": nullable(uint()),
            "lag": nullable(json!({ "type": "integer", "minimum": 0, "description": "Known on the leader only" })),
            "leases": uint(),
            "heartbeat_age_ms": nullable(uint()),
            "channels_in_use": nullable(json!({ "type": "integer", "minimum": 0, "description": "Calls in progress at its last heartbeat" })),
            "capacity": nullable(json!({ "type": "integer", "minimum": 0, "description": "Trunk channels it offered at its last heartbeat; 0: it is not dialling (its trunk is down, or it is stopping), and the others dial its partitions" })),
            "clock_offset_ms": nullable(json!({ "type": "number", "description": "Its wall clock minus the answering node's, in milliseconds, from the quickest of the last probes (every 5 s); null for the answering node itself and for a member the last probe did not reach. Leases and takeovers assume members within 300 ms" })),
        })),
        "Cluster": exact(json!({
            "node": uint(),
            "leader": nullable(uint()),
            "term": uint(),
            "last_log_index": nullable(uint()),
            "applied_index": uint(),
            "snapshot_index": nullable(uint()),
            "purged_index": nullable(uint()),
            "members": { "type": "array", "items": schema_ref("ClusterMember") },
        })),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (path, methods) of every `.route(...)` of the `/api/v1` router in `lib.rs`.
    fn api_routes() -> Vec<(String, Vec<String>)> {
        let src = include_str!("lib.rs");
        let start = src
            .find("let api = Router::new()")
            .expect("lib.rs builds the API router as `let api = Router::new()`");
        let end = start
            + src[start..]
                .find(".fallback(")
                .expect("the API router ends with its fallback");
        let block = &src[start..end];
        let mut routes = Vec::new();
        let mut rest = block;
        while let Some(at) = rest.find(".route(") {
            let call = &rest[at + ".route(".len()..];
            // The call's arguments, up to the matching parenthesis.
            let mut depth = 1;
            let mut len = 0;
            for (i, c) in call.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    len = i;
                    break;
                }
            }
            let args = &call[..len];
            let path = args
                .split('"')
                .nth(1)
                .expect("a route's first argument is a string literal");
            // axum 0.7 wrote `:id`; OpenAPI and axum 0.8 write `{id}`.
            let path = path
                .split('/')
                .map(|seg| match seg.strip_prefix(':') {
                    Some(name) => format!("{{{name}}}"),
                    None => seg.to_string(),
                })
                .collect::<Vec<_>>()
                .join("/");
            let mut methods = Vec::new();
            for m in ["get", "post", "put", "patch", "delete"] {
                let called = args.match_indices(&format!("{m}(")).any(|(i, _)| {
                    !args[..i]
                        .chars()
                        .next_back()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
                });
                if called {
                    methods.push(m.to_string());
                }
            }
            assert!(!methods.is_empty(), "no method found for route {path}");
            routes.push((path, methods));
            rest = &call[len..];
        }
        routes
    }

    #[test]
    fn the_route_parser_reads_lib_rs() {
        let routes = api_routes();
        assert!(routes.len() >= 20, "{routes:?}");
        let find = |p: &str| routes.iter().find(|(path, _)| path == p).cloned();
        assert_eq!(
            find("/subscribers/{id}").map(|r| r.1),
            Some(vec![
                "get".to_string(),
                "patch".to_string(),
                "delete".to_string()
            ])
        );
        assert_eq!(
            find("/subscribers/import").map(|r| r.1),
            Some(vec!["post".to_string()])
        );
        assert_eq!(
            find("/operators/{username}").map(|r| r.1),
            Some(vec!["patch".to_string()])
        );
    }

    #[test]
    fn every_api_route_and_method_is_in_the_document() {
        let doc = spec();
        let text = serde_json::to_string(&doc).expect("serialises");
        let doc: Value = serde_json::from_str(&text).expect("the document is valid JSON");
        assert_eq!(doc["openapi"], "3.0.3");
        let paths = doc["paths"].as_object().expect("paths");
        let routes = api_routes();
        for (path, methods) in &routes {
            let item = paths
                .get(path)
                .unwrap_or_else(|| panic!("route {path} of lib.rs is missing from openapi.rs"));
            for m in methods {
                let op = item.get(m).unwrap_or_else(|| {
                    panic!(
                        "{} {path} of lib.rs is missing from openapi.rs",
                        m.to_uppercase()
                    )
                });
                assert!(op["responses"].is_object(), "{m} {path}: no responses");
            }
            for (m, _) in item.as_object().expect("a path item") {
                assert!(
                    methods.contains(m),
                    "openapi.rs documents {} {path}, which lib.rs does not route",
                    m.to_uppercase()
                );
            }
        }
        for path in paths.keys() {
            assert!(
                path == "/openapi.json" || routes.iter().any(|(p, _)| p == path),
                "openapi.rs documents {path}, which lib.rs does not route"
            );
        }
    }

    /// Every `$ref` in `v`.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", Value::String(r)) => out.push(r.clone()),
                        _ => refs(x, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    #[test]
    fn every_reference_resolves_and_every_path_parameter_is_declared() {
        let doc = spec();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let pointer = r.strip_prefix('#').expect("a local reference");
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
        let resolve = |p: &Value| -> Value {
            match p["$ref"].as_str() {
                Some(r) => doc.pointer(&r[1..]).cloned().expect("resolves"),
                None => p.clone(),
            }
        };
        for (path, item) in doc["paths"].as_object().expect("paths") {
            let wanted: Vec<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            for (method, op) in item.as_object().expect("a path item") {
                let declared: Vec<String> = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(resolve)
                    .filter(|p| p["in"] == "path")
                    .filter_map(|p| p["name"].as_str().map(String::from))
                    .collect();
                assert_eq!(declared, wanted, "{method} {path}: path parameters");
            }
        }
    }

    #[test]
    fn enums_match_what_the_handlers_accept() {
        for role in ROLES {
            assert!(crate::auth::parse_role(role).is_some(), "{role}");
        }
        let doc = spec();
        assert_eq!(
            doc["components"]["schemas"]["Language"]["enum"],
            json!(["it", "en", "de", "fr", "es"])
        );
        assert_eq!(
            doc["components"]["schemas"]["Priority"]["enum"],
            json!(["emergency", "urgent", "info"])
        );
        for p in PRIORITIES {
            let parsed: campanile_cluster::Priority =
                serde_json::from_value(json!(p)).expect("a priority");
            assert_eq!(parsed.as_str(), p);
        }
        assert_eq!(
            doc["components"]["securitySchemes"]["session"]["name"],
            "campanile_session"
        );
    }

    #[test]
    fn request_bodies_refuse_unknown_fields_like_the_handlers() {
        let doc = spec();
        let schemas = &doc["components"]["schemas"];
        for name in [
            "SubscriberInput",
            "CampaignInput",
            "RetryInput",
            "OperatorInput",
            "OperatorPatch",
        ] {
            assert_eq!(
                schemas[name]["additionalProperties"], false,
                "{name} must refuse unknown fields"
            );
        }
        let error = &schemas["Error"];
        assert_eq!(error["required"], json!(["error"]));
        assert_eq!(
            error["properties"]["error"]["required"],
            json!(["code", "message"])
        );
    }
}
