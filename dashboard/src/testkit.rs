//! One fake engine and the request helpers every test module of this crate shares.
//!
//! `FakeEngine` applies commands straight to the real `campanile_cluster::State`, so the tests see
//! the same rules as a node, minus Raft: every page and route is tested against one set of domain
//! rules rather than a fake per module. Its clock stands still at `now_ms`, and its verification
//! calls read deterministic codes that a test takes from `calls`.

use std::sync::Mutex;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use campanile_cluster::{
    ApiToken, AuditEntry, CallTask, Campaign, CampaignId, CampaignSpec, Command, Imported,
    NewSubscriber, Operator, OperatorUpdate, PhoneNumber, Response, Role, Session, State,
    Subscriber, SubscriberId, SubscriberUpdate, Tenant, TokenScope, VerificationPurpose,
};
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::auth;
use crate::engine::{Engine, EngineError, Health};

/// The node's admin API token.
pub(crate) const TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// A well-formed argon2id hash that no test logs in with: `operator` opens the session directly.
const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";

/// Applies commands straight to a `State`: the same rules as a node, minus Raft.
pub(crate) struct FakeEngine {
    state: Mutex<State>,
    /// When every command is applied and every session checked.
    now_ms: u64,
    drill: bool,
    public_url: Option<String>,
    /// Whether the operators' `create_subscriber` refuses, so that a test proves a page
    /// registers citizens through `register_citizen`.
    citizens_only: bool,
    /// The verification calls placed: the number called and the code read to it.
    pub(crate) calls: Mutex<Vec<(String, String)>>,
}

impl FakeEngine {
    /// No tenant but `default`, no drill, no public address, the clock at 1 ms.
    pub(crate) fn new() -> FakeEngine {
        FakeEngine {
            state: Mutex::default(),
            now_ms: 1,
            drill: false,
            public_url: None,
            citizens_only: false,
            calls: Mutex::default(),
        }
    }

    /// Calls go to the simulated city: pages show the drill banner.
    pub(crate) fn with_drill(mut self, drill: bool) -> FakeEngine {
        self.drill = drill;
        self
    }

    /// The configured address citizens reach the deployment at.
    pub(crate) fn with_public_url(mut self, url: Option<&str>) -> FakeEngine {
        self.public_url = url.map(str::to_string);
        self
    }

    /// Stops the clock at `now_ms` instead of 1 ms (for pages that show dates).
    pub(crate) fn with_clock(mut self, now_ms: u64) -> FakeEngine {
        self.now_ms = now_ms;
        self
    }

    /// `create_subscriber` refuses: only `register_citizen` stores a subscriber.
    pub(crate) fn citizens_only(mut self) -> FakeEngine {
        self.citizens_only = true;
        self
    }

    /// Applies `cmd` now; a refusal becomes the error a node answers with.
    pub(crate) fn apply(&self, cmd: Command) -> Result<Response, EngineError> {
        match self.state.lock().unwrap().apply(&cmd) {
            Response::Refused(r) => Err(EngineError::from(r)),
            ok => Ok(ok),
        }
    }

    /// Creates the tenant `slug`.
    pub(crate) fn tenant(&self, slug: &str, name: &str) {
        self.apply(Command::CreateTenant {
            at_ms: self.now_ms,
            slug: slug.into(),
            name: name.into(),
        })
        .unwrap_or_else(|e| panic!("creating tenant {slug}: {e}"));
    }

    /// A verified citizen of `tenant`, speaking Italian, registered by an operator; answers the id.
    pub(crate) fn seed_subscriber(
        &self,
        tenant: &str,
        phone: &str,
        name: Option<&str>,
        zone: Option<&str>,
    ) -> u64 {
        let subscriber = NewSubscriber {
            phone: PhoneNumber::parse(phone).unwrap(),
            name: name.map(str::to_string),
            language: "it".into(),
            zone: zone.map(str::to_string),
            verified: true,
            tenant: tenant.into(),
            consent: None,
        };
        match self.store(subscriber) {
            Ok(s) => s.id.0,
            Err(e) => panic!("seeding {phone}: {e}"),
        }
    }

    /// Creates a console account.
    pub(crate) fn add_operator(&self, operator: Operator) {
        let username = operator.username.clone();
        self.apply(Command::CreateOperator {
            at_ms: self.now_ms,
            operator,
        })
        .unwrap_or_else(|e| panic!("creating operator {username}: {e}"));
    }

    /// The console account `username` as stored now.
    pub(crate) fn operator_named(&self, username: &str) -> Operator {
        self.state
            .lock()
            .unwrap()
            .operators()
            .find(|o| o.username == username)
            .cloned()
            .unwrap_or_else(|| panic!("no operator {username}"))
    }

    /// Every subscriber, by id.
    pub(crate) fn subscribers(&self) -> Vec<Subscriber> {
        self.state.lock().unwrap().subscribers().cloned().collect()
    }

    /// The subscribers of `tenant`, by id.
    pub(crate) fn of_tenant(&self, tenant: &str) -> Vec<Subscriber> {
        self.state
            .lock()
            .unwrap()
            .subscribers()
            .filter(|s| s.tenant == tenant)
            .cloned()
            .collect()
    }

    /// The subscriber `id` as stored now.
    pub(crate) fn find(&self, id: u64) -> Option<Subscriber> {
        self.state
            .lock()
            .unwrap()
            .subscriber(SubscriberId(id))
            .cloned()
    }

    /// The campaign `id` as stored now.
    pub(crate) fn campaign_now(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.state
            .lock()
            .unwrap()
            .campaign(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("campaign {id} does not exist")))
    }

    fn store(&self, subscriber: NewSubscriber) -> Result<Subscriber, EngineError> {
        match self.apply(Command::CreateSubscriber {
            at_ms: self.now_ms,
            subscriber,
        })? {
            Response::SubscriberCreated(id) => self
                .find(id.0)
                .ok_or_else(|| EngineError::Internal(format!("subscriber {id} is missing"))),
            other => Err(EngineError::Internal(format!("{other:?}"))),
        }
    }
}

/// The console account `operator` creates: its username as display name, a password nobody
/// types, no second factor.
pub(crate) fn operator_account(username: &str, role: Role, tenants: &[&str]) -> Operator {
    Operator {
        username: username.into(),
        display_name: username.into(),
        role,
        tenants: tenants.iter().map(|t| t.to_string()).collect(),
        password_hash: HASH.into(),
        disabled: false,
        created_ms: 0,
        updated_ms: 0,
        totp_secret: None,
    }
}

/// A live session for the existing operator `username`: the cookie header and the CSRF token.
pub(crate) fn login(engine: &FakeEngine, username: &str) -> (String, String) {
    let secret = auth::new_secret();
    engine
        .apply(Command::CreateSession {
            at_ms: engine.now_ms,
            session: Session {
                token_sha256: auth::secret_sha256(&secret),
                username: username.into(),
                created_ms: 1,
                expires_ms: u64::MAX,
            },
        })
        .unwrap_or_else(|e| panic!("opening a session for {username}: {e}"));
    (
        format!("{}={secret}", auth::SESSION_COOKIE),
        auth::csrf_token(&secret),
    )
}

/// An operator with a live session; answers the cookie header and the CSRF token.
pub(crate) fn operator(
    engine: &FakeEngine,
    username: &str,
    role: Role,
    tenants: &[&str],
) -> (String, String) {
    engine.add_operator(operator_account(username, role, tenants));
    login(engine, username)
}

#[async_trait]
impl Engine for FakeEngine {
    async fn create_subscriber(&self, s: NewSubscriber) -> Result<Subscriber, EngineError> {
        if self.citizens_only {
            return Err(EngineError::Unavailable(
                "this fake registers citizens through register_citizen only".into(),
            ));
        }
        self.store(s)
    }
    async fn register_citizen(&self, s: NewSubscriber) -> Result<Subscriber, EngineError> {
        self.store(s)
    }
    async fn import_subscribers(
        &self,
        batch: Vec<NewSubscriber>,
    ) -> Result<Vec<Imported>, EngineError> {
        match self.apply(Command::CreateSubscribers {
            at_ms: self.now_ms,
            subscribers: batch,
        })? {
            Response::Imported(r) => Ok(r),
            other => Err(EngineError::Internal(format!("{other:?}"))),
        }
    }
    async fn subscriber(&self, id: SubscriberId) -> Result<Subscriber, EngineError> {
        self.find(id.0)
            .ok_or_else(|| EngineError::NotFound(format!("subscriber {id} does not exist")))
    }
    async fn delete_subscriber(&self, id: SubscriberId) -> Result<(), EngineError> {
        self.apply(Command::DeleteSubscriber {
            at_ms: self.now_ms,
            id,
        })
        .map(drop)
    }
    async fn search_subscribers(
        &self,
        tenant: String,
        query: String,
        offset: usize,
        limit: usize,
    ) -> Result<(Vec<Subscriber>, usize), EngineError> {
        let q = query.trim().to_lowercase();
        let contains = |field: &Option<String>| {
            field
                .as_ref()
                .is_some_and(|f| f.to_lowercase().contains(&q))
        };
        let hits: Vec<Subscriber> = self
            .of_tenant(&tenant)
            .into_iter()
            .filter(|s| {
                q.is_empty()
                    || s.phone.as_str().contains(&q)
                    || contains(&s.name)
                    || contains(&s.zone)
            })
            .collect();
        let total = hits.len();
        Ok((hits.into_iter().skip(offset).take(limit).collect(), total))
    }
    async fn update_subscriber(
        &self,
        id: SubscriberId,
        update: SubscriberUpdate,
    ) -> Result<Subscriber, EngineError> {
        self.apply(Command::UpdateSubscriber {
            at_ms: self.now_ms,
            id,
            update,
        })?;
        self.subscriber(id).await
    }
    async fn start_verification(
        &self,
        tenant: String,
        phone: PhoneNumber,
        purpose: VerificationPurpose,
    ) -> Result<(), EngineError> {
        let registered = self
            .state
            .lock()
            .unwrap()
            .subscriber_by_phone(&tenant, &phone)
            .map(|s| s.id);
        let Some(id) = registered else {
            return Ok(());
        };
        let mut calls = self.calls.lock().unwrap();
        let code = format!("{:06}", 271_828 + calls.len());
        self.apply(Command::RequestVerification {
            at_ms: self.now_ms,
            id,
            verification: campanile_cluster::Verification {
                code_sha256: campanile_cluster::verification_hash(&tenant, &phone, &code),
                expires_ms: u64::MAX,
                tries_left: campanile_cluster::VERIFICATION_TRIES,
                purpose,
            },
        })?;
        calls.push((phone.as_str().to_string(), code));
        Ok(())
    }
    async fn confirm_verification(
        &self,
        tenant: String,
        phone: PhoneNumber,
        code: String,
    ) -> Result<VerificationPurpose, EngineError> {
        let waiting = self
            .state
            .lock()
            .unwrap()
            .subscriber_by_phone(&tenant, &phone)
            .map(|s| (s.id, s.verification.as_ref().map(|v| v.purpose)));
        let Some((id, Some(purpose))) = waiting else {
            return Err(EngineError::Invalid("no code waiting".into()));
        };
        self.apply(Command::ConfirmVerification {
            at_ms: self.now_ms,
            id,
            code_sha256: campanile_cluster::verification_hash(&tenant, &phone, &code),
        })?;
        Ok(purpose)
    }
    async fn create_campaign(
        &self,
        spec: CampaignSpec,
        created_by: Option<String>,
    ) -> Result<Campaign, EngineError> {
        match self.apply(Command::CreateCampaign {
            at_ms: self.now_ms,
            spec,
            created_by,
        })? {
            Response::CampaignCreated(id) => self.campaign_now(id),
            other => Err(EngineError::Internal(format!("{other:?}"))),
        }
    }
    async fn approve_campaign(&self, id: CampaignId, by: String) -> Result<Campaign, EngineError> {
        self.apply(Command::ApproveCampaign {
            at_ms: self.now_ms,
            id,
            by,
        })?;
        self.campaign_now(id)
    }
    async fn override_approval(
        &self,
        id: CampaignId,
        by: String,
        reason: String,
    ) -> Result<Campaign, EngineError> {
        self.apply(Command::OverrideApproval {
            at_ms: self.now_ms,
            id,
            by,
            reason,
        })?;
        self.campaign_now(id)
    }
    async fn start_campaign(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.apply(Command::StartCampaign {
            at_ms: self.now_ms,
            id,
        })?;
        self.campaign_now(id)
    }
    async fn cancel_campaign(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.apply(Command::CancelCampaign {
            at_ms: self.now_ms,
            id,
        })?;
        self.campaign_now(id)
    }
    async fn pause_campaign(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.apply(Command::PauseCampaign {
            at_ms: self.now_ms,
            id,
        })?;
        self.campaign_now(id)
    }
    async fn resume_campaign(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.apply(Command::ResumeCampaign {
            at_ms: self.now_ms,
            id,
        })?;
        self.campaign_now(id)
    }
    async fn campaign(&self, id: CampaignId) -> Result<Campaign, EngineError> {
        self.campaign_now(id)
    }
    async fn campaigns(&self) -> Result<Vec<Campaign>, EngineError> {
        Ok(self.state.lock().unwrap().campaigns().cloned().collect())
    }
    async fn tasks(&self, id: CampaignId) -> Result<Vec<CallTask>, EngineError> {
        self.campaign_now(id)?;
        Ok(self.state.lock().unwrap().tasks(id).cloned().collect())
    }
    async fn tenants(&self) -> Result<Vec<Tenant>, EngineError> {
        Ok(self.state.lock().unwrap().tenants().cloned().collect())
    }
    async fn create_tenant(&self, slug: String, name: String) -> Result<Tenant, EngineError> {
        self.apply(Command::CreateTenant {
            at_ms: self.now_ms,
            slug: slug.clone(),
            name,
        })?;
        self.state
            .lock()
            .unwrap()
            .tenants()
            .find(|t| t.slug == slug)
            .cloned()
            .ok_or_else(|| EngineError::Internal(format!("tenant {slug} is missing")))
    }
    async fn set_caller_id(
        &self,
        tenant: String,
        caller_id: Option<campanile_cluster::CallerId>,
    ) -> Result<Tenant, EngineError> {
        self.apply(Command::SetCallerId {
            at_ms: self.now_ms,
            tenant: tenant.clone(),
            caller_id,
        })?;
        self.state
            .lock()
            .unwrap()
            .tenant(&tenant)
            .cloned()
            .ok_or_else(|| EngineError::Internal(format!("tenant {tenant} is missing")))
    }
    async fn set_quiet_hours(
        &self,
        tenant: String,
        quiet_hours: Option<campanile_cluster::QuietHours>,
    ) -> Result<Tenant, EngineError> {
        self.apply(Command::SetQuietHours {
            at_ms: self.now_ms,
            tenant: tenant.clone(),
            quiet_hours,
        })?;
        self.state
            .lock()
            .unwrap()
            .tenant(&tenant)
            .cloned()
            .ok_or_else(|| EngineError::Internal(format!("tenant {tenant} is missing")))
    }
    async fn audit(
        &self,
        tenant: Option<String>,
        _after: u64,
        _limit: usize,
    ) -> Result<Vec<AuditEntry>, EngineError> {
        Ok(self
            .state
            .lock()
            .unwrap()
            .audit()
            .iter()
            .filter(|e| tenant.is_none() || e.tenant == tenant)
            .cloned()
            .collect())
    }
    async fn operators(&self) -> Result<Vec<Operator>, EngineError> {
        Ok(self.state.lock().unwrap().operators().cloned().collect())
    }
    async fn create_operator(&self, operator: Operator) -> Result<(), EngineError> {
        self.apply(Command::CreateOperator {
            at_ms: self.now_ms,
            operator,
        })
        .map(drop)
    }
    async fn update_operator(&self, update: OperatorUpdate) -> Result<(), EngineError> {
        self.apply(Command::UpdateOperator {
            at_ms: self.now_ms,
            update,
        })
        .map(drop)
    }
    async fn create_session(&self, session: Session) -> Result<(), EngineError> {
        self.apply(Command::CreateSession {
            at_ms: self.now_ms,
            session,
        })
        .map(drop)
    }
    async fn end_session(&self, token_sha256: String) -> Result<(), EngineError> {
        self.apply(Command::EndSession {
            at_ms: self.now_ms,
            token_sha256,
        })
        .map(drop)
    }
    async fn session(&self, token_sha256: &str) -> Option<(Session, Operator)> {
        self.state
            .lock()
            .unwrap()
            .session(token_sha256, self.now_ms)
            .map(|(s, o)| (s.clone(), o.clone()))
    }
    fn token_principal(&self, presented: &str) -> Option<(String, Option<TokenScope>)> {
        if presented == TOKEN {
            return Some(("token:admin".into(), None));
        }
        self.state
            .lock()
            .unwrap()
            .token(&auth::secret_sha256(presented))
            .map(|t| (format!("token:{}", t.label), t.scope.clone()))
    }
    async fn tokens(&self) -> Result<Vec<ApiToken>, EngineError> {
        Ok(self.state.lock().unwrap().tokens().cloned().collect())
    }
    async fn add_token(&self, token: ApiToken) -> Result<(), EngineError> {
        self.apply(Command::AddToken { token }).map(drop)
    }
    async fn revoke_token(&self, sha256: String) -> Result<(), EngineError> {
        self.apply(Command::RevokeToken {
            at_ms: self.now_ms,
            sha256,
        })
        .map(drop)
    }
    fn metrics_text(&self) -> String {
        "# HELP campanile_up 1\n# TYPE campanile_up gauge\ncampanile_up 1\n".into()
    }
    fn check_token(&self, presented: &str) -> bool {
        presented == TOKEN
    }
    fn public_url(&self) -> Option<String> {
        self.public_url.clone()
    }
    fn drill_mode(&self) -> Option<String> {
        self.drill.then(|| "calls go to the simulated city".into())
    }
    async fn health(&self) -> Health {
        Health {
            ok: true,
            detail: "fine".into(),
        }
    }
}

/// What the router answered.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// The body as text (lossy UTF-8): what pages and JSON are read as.
    pub(crate) body: String,
    /// The body as sent: what images are read as.
    pub(crate) bytes: Vec<u8>,
}

impl Answer {
    /// The body as text.
    pub(crate) fn text(&self) -> String {
        self.body.clone()
    }

    /// Status, headers and text, for a `let (s, h, html) = …`.
    pub(crate) fn into_parts(self) -> (StatusCode, HeaderMap, String) {
        (self.status, self.headers, self.body)
    }
}

/// Sends `req` through the router and reads the whole answer.
pub(crate) async fn exchange(app: &axum::Router, req: Request<Body>) -> Answer {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
        bytes,
    }
}

/// One request with optional cookie, CSRF header, JSON or form body.
pub(crate) async fn send(
    app: &axum::Router,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    csrf: Option<&str>,
    body: Option<Body>,
    content_type: &str,
) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    if let Some(t) = csrf {
        req = req.header("X-CSRF-Token", t);
    }
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, content_type)
            .body(b)
            .unwrap(),
        None => req.body(Body::empty()).unwrap(),
    };
    exchange(app, req).await.into_parts()
}

/// A page fetched with the session cookie header `cookie`.
pub(crate) async fn get_with(app: &axum::Router, path: &str, cookie: &str) -> Answer {
    let req = Request::get(path)
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .unwrap();
    exchange(app, req).await
}

/// A form posted as a browser does, with the session cookie header `cookie`.
pub(crate) async fn post_with(
    app: &axum::Router,
    path: &str,
    cookie: &str,
    fields: &[(&str, &str)],
) -> Answer {
    let req = Request::post(path)
        .header(header::COOKIE, cookie)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form_body(fields)))
        .unwrap();
    exchange(app, req).await
}

/// `application/x-www-form-urlencoded`, as a browser sends it.
pub(crate) fn form_body(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// What a template makes of `text`: askama escapes these five characters as numeric entities.
pub(crate) fn escaped(text: &str) -> String {
    text.replace('&', "&#38;")
        .replace('<', "&#60;")
        .replace('>', "&#62;")
        .replace('"', "&#34;")
        .replace('\'', "&#39;")
}
