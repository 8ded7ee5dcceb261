//! Who is asking, and what they may do.
//!
//! Two kinds of callers reach the API: automation with a bearer token, and operators logged into the
//! console. A node's admin token is the break-glass key of whoever runs the node (every tenant, no
//! two-person rule); a comune's automation token has a role in its tenants, like an operator, and its
//! city-wide or emergency campaigns wait for a person's approval too (tokens never approve). An operator's login is a server-side session, replicated
//! through Raft so that any node accepts it after a failover: the browser holds a random secret in an
//! HttpOnly, SameSite=Strict cookie (Secure when the console is reached over HTTPS), the cluster holds
//! only its SHA-256. Every state-changing request from a session must carry that session's CSRF token
//! (a hidden form field or the `X-CSRF-Token` header), derived from the secret so a token from
//! another or an ended session never matches. Failed logins are throttled per username and per
//! client address on each node.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::http::{header, HeaderMap, StatusCode};
use campanile_cluster::{Operator, Role};
use sha2::Digest;

use crate::engine::Engine;
use crate::error::ApiError;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "campanile_session";
/// How long a login lasts (a working day and a night shift).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Shortest password an operator may choose.
pub const MIN_PASSWORD_CHARS: usize = 12;

/// Who makes a request.
#[derive(Debug, Clone)]
pub enum Principal {
    /// An API token; `label` names it in the audit log. A node's admin token has no scope (every
    /// tenant, every right); an automation token has a role in some tenants.
    Token {
        label: String,
        scope: Option<campanile_cluster::TokenScope>,
    },
    /// A console operator with a live session.
    Operator {
        username: String,
        display_name: String,
        role: Role,
        tenants: Vec<String>,
        /// The session's CSRF token.
        csrf: String,
        /// The hash the session is stored under (for logout).
        session_sha256: String,
    },
}

/// What a request wants to do, for the role check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// See campaigns, subscribers, progress, the cluster.
    Read,
    /// Compose, start, pause, resume and cancel campaigns; manage subscribers and recordings.
    Operate,
    /// Approve another person's campaign.
    Approve,
    /// Read the audit log and the list of accounts (oversight).
    Audit,
    /// Manage the tenant's operators.
    Administer,
    /// Cluster-wide matters: tenants, membership, backups. API tokens only.
    System,
}

impl Principal {
    /// The audit log's actor.
    pub fn actor(&self) -> String {
        match self {
            Principal::Token { label, .. } => label.clone(),
            Principal::Operator { username, .. } => username.clone(),
        }
    }

    /// The operator's username, None for a token.
    pub fn operator(&self) -> Option<&str> {
        match self {
            Principal::Token { .. } => None,
            Principal::Operator { username, .. } => Some(username),
        }
    }

    /// Whether this caller may see `tenant` at all (otherwise its data answers 404).
    pub fn serves(&self, tenant: &str) -> bool {
        match self {
            Principal::Token { scope: None, .. } => true,
            Principal::Token {
                scope: Some(scope), ..
            } => scope.tenants.iter().any(|t| t == tenant),
            Principal::Operator { tenants, .. } => tenants.iter().any(|t| t == tenant),
        }
    }

    /// Who composes a campaign, for the two-person rule: an operator, or a tenant's automation token
    /// (an admin must not sidestep the rule by making a token); None for a node's admin token, the
    /// break-glass key of whoever runs the node.
    pub fn composer(&self) -> Option<String> {
        (!self.is_system()).then(|| self.actor())
    }

    /// Whether this is a node's admin token (every tenant and right).
    pub fn is_system(&self) -> bool {
        matches!(self, Principal::Token { scope: None, .. })
    }

    /// The tenant a request without one acts on: the operator's first, or `default` for a token.
    pub fn home_tenant(&self) -> String {
        match self {
            Principal::Token { scope: None, .. } => campanile_cluster::default_tenant(),
            Principal::Token {
                scope: Some(campanile_cluster::TokenScope { tenants, .. }),
                ..
            }
            | Principal::Operator { tenants, .. } => tenants
                .first()
                .cloned()
                .unwrap_or_else(campanile_cluster::default_tenant),
        }
    }

    /// Whether the role allows `action` (tenant membership is checked separately, by `serves`).
    pub fn may(&self, action: Action) -> bool {
        match self {
            Principal::Token { scope: None, .. } => true,
            Principal::Token {
                scope: Some(scope), ..
            } => role_may(scope.role, action),
            Principal::Operator { role, .. } => role_may(*role, action),
        }
    }

    /// `may` and `serves` together: 404 when the tenant is not the caller's (its data does not
    /// exist for them), 403 when the role does not allow the action.
    pub fn check(&self, action: Action, tenant: &str, what: &str) -> Result<(), ApiError> {
        if !self.serves(tenant) {
            return Err(ApiError::not_found(format!("{what} does not exist")));
        }
        self.require(action)
    }

    /// 403 unless the role allows `action`.
    pub fn require(&self, action: Action) -> Result<(), ApiError> {
        if self.may(action) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "your role ({}) does not allow this: it needs {}",
                    match self {
                        Principal::Operator { role, .. }
                        | Principal::Token {
                            scope: Some(campanile_cluster::TokenScope { role, .. }),
                            ..
                        } => role_name(*role),
                        Principal::Token { scope: None, .. } => "admin token",
                    },
                    action_needs(action)
                ),
            ))
        }
    }
}

/// The role table. Regional operators (a prefecture) oversee and approve; they do not compose.
pub fn role_may(role: Role, action: Action) -> bool {
    match action {
        Action::Read => true,
        Action::Operate => matches!(role, Role::Admin | Role::Approver | Role::Operator),
        Action::Approve => matches!(role, Role::Admin | Role::Approver | Role::Regional),
        Action::Audit => matches!(role, Role::Admin | Role::Regional),
        Action::Administer => role == Role::Admin,
        Action::System => false,
    }
}

fn action_needs(action: Action) -> &'static str {
    match action {
        Action::Read => "any role",
        Action::Operate => "the operator, approver or admin role",
        Action::Approve => "the approver, admin or regional role",
        Action::Audit => "the admin or regional role",
        Action::Administer => "the admin role",
        Action::System => "an API token",
    }
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Approver => "approver",
        Role::Operator => "operator",
        Role::Viewer => "viewer",
        Role::Regional => "regional",
    }
}

pub fn parse_role(s: &str) -> Option<Role> {
    Some(match s {
        "admin" => Role::Admin,
        "approver" => Role::Approver,
        "operator" => Role::Operator,
        "viewer" => Role::Viewer,
        "regional" => Role::Regional,
        _ => return None,
    })
}

/// Hex SHA-256 of a session secret: what the cluster stores.
pub fn secret_sha256(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// The CSRF token of the session whose cookie secret is `secret`.
pub fn csrf_token(secret: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(b"campanile-csrf-v1\0");
    h.update(secret.as_bytes());
    hex::encode(&h.finalize()[..20])
}

/// A fresh 256-bit secret, hex.
pub fn new_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Compares two strings in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether `password` is acceptable for an operator; the reason when it is not.
pub fn password_problem(password: &str) -> Option<String> {
    let n = password.chars().count();
    if n < MIN_PASSWORD_CHARS {
        return Some(format!(
            "the password must have at least {MIN_PASSWORD_CHARS} characters"
        ));
    }
    if n > 256 {
        return Some("the password must have at most 256 characters".into());
    }
    None
}

/// argon2id PHC string of `password` (OWASP's parameters: 19 MiB, 2 passes). Slow on purpose: call
/// it off the async workers.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Whether `password` matches the PHC string `hash`. Slow on purpose.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash of a random password, verified against when the username does not exist.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| hash_password(&new_secret()).unwrap_or_default())
}

/// The value of cookie `name` in the request, if any.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Whether the browser reached us over HTTPS (directly or through a TLS-terminating proxy), so
/// cookies must be `Secure`.
pub fn over_https(headers: &HeaderMap, public_url: Option<&str>) -> bool {
    public_url.is_some_and(|u| u.starts_with("https://"))
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// `Set-Cookie` for a session secret (or, with `None`, one that clears it).
pub fn session_cookie(secret: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match secret {
        Some(s) => format!(
            "{SESSION_COOKIE}={s}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            SESSION_TTL.as_secs()
        ),
        None => format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

/// The operator behind the request's session cookie, if the session is live.
pub async fn session_principal(engine: &dyn Engine, headers: &HeaderMap) -> Option<Principal> {
    let secret = cookie(headers, SESSION_COOKIE)?;
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let sha = secret_sha256(secret);
    let (_, op) = engine.session(&sha).await?;
    Some(operator_principal(&op, csrf_token(secret), sha))
}

fn operator_principal(op: &Operator, csrf: String, session_sha256: String) -> Principal {
    Principal::Operator {
        username: op.username.clone(),
        display_name: op.display_name.clone(),
        role: op.role,
        tenants: op.tenants.clone(),
        csrf,
        session_sha256,
    }
}

/// Failed logins per username and per client address, on this node. Five failures within fifteen
/// minutes lock the username (or the address) for fifteen minutes; the lock is lifted by waiting,
/// and a successful login clears the username's count.
#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<String, Vec<Instant>>>,
    /// The last second-factor time step accepted per username: a code is good once (RFC 6238 §5.2).
    used_steps: Mutex<HashMap<String, u64>>,
}

/// Failures allowed in `THROTTLE_WINDOW` before a lock.
pub const MAX_FAILURES: usize = 5;
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(15 * 60);

impl LoginThrottle {
    fn keys(username: &str, client: &str) -> [String; 2] {
        [format!("user:{username}"), format!("addr:{client}")]
    }

    /// Seconds until a login may be tried again for `username` from `client`, if locked.
    pub fn locked_for(&self, username: &str, client: &str, now: Instant) -> Option<u64> {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, v| {
            v.retain(|t| now.duration_since(*t) < THROTTLE_WINDOW);
            !v.is_empty()
        });
        Self::keys(username, client)
            .iter()
            .filter_map(|k| map.get(k))
            .filter(|v| v.len() >= MAX_FAILURES)
            .filter_map(|v| v.first())
            .map(|first| (THROTTLE_WINDOW - now.duration_since(*first)).as_secs() + 1)
            .max()
    }

    pub fn failed(&self, username: &str, client: &str, now: Instant) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        for k in Self::keys(username, client) {
            map.entry(k).or_default().push(now);
        }
    }

    /// Accepts a second-factor code's time step for `username` once; false for a step already used
    /// (or an older one).
    pub fn use_step(&self, username: &str, step: u64) -> bool {
        let mut used = self.used_steps.lock().unwrap_or_else(|e| e.into_inner());
        match used.get(username) {
            Some(last) if *last >= step => false,
            _ => {
                used.insert(username.to_string(), step);
                true
            }
        }
    }

    pub fn succeeded(&self, username: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&format!("user:{username}"));
    }
}

/// Why a login failed. Unknown user, wrong password and a wrong or missing code read the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    Wrong,
    Locked { seconds: u64 },
    Unavailable(String),
}

/// A successful login: the cookie secret and the principal.
pub struct LoggedIn {
    pub secret: String,
    pub principal: Principal,
}

/// Checks a username and password and opens a replicated session.
pub async fn login(
    engine: &dyn Engine,
    throttle: &LoginThrottle,
    username: &str,
    password: &str,
    totp: Option<&str>,
    client: &str,
    now_ms: u64,
) -> Result<LoggedIn, LoginError> {
    if let Some(seconds) = throttle.locked_for(username, client, Instant::now()) {
        return Err(LoginError::Locked { seconds });
    }
    let operators = engine
        .operators()
        .await
        .map_err(|e| LoginError::Unavailable(e.to_string()))?;
    let op = operators
        .into_iter()
        .find(|o| o.username == username && !o.disabled);
    // The same work whether or not the user exists, so timing does not tell usernames apart.
    let hash = match &op {
        Some(o) => o.password_hash.clone(),
        None => dummy_hash().to_string(),
    };
    let pw = password.to_string();
    let ok = tokio::task::spawn_blocking(move || verify_password(&pw, &hash))
        .await
        .unwrap_or(false);
    // The second factor, when on: a missing or wrong code fails exactly like a wrong password (same
    // throttle count, same answer), so the reply never tells whether the password was right.
    let code_ok = match op.as_ref().and_then(|o| o.totp_secret.as_deref()) {
        Some(secret) if ok => totp
            .and_then(|code| crate::totp::matching_step(secret, code, now_ms / 1000))
            .is_some_and(|step| throttle.use_step(username, step)),
        Some(_) => false,
        None => true,
    };
    let Some(op) = op.filter(|_| ok && code_ok) else {
        throttle.failed(username, client, Instant::now());
        return Err(LoginError::Wrong);
    };
    throttle.succeeded(username);
    let secret = new_secret();
    let sha = secret_sha256(&secret);
    // A login is in the audit log under the operator's name (failed ones only in this node's log:
    // anyone can make those).
    crate::engine::ACTOR
        .scope(
            op.username.clone(),
            engine.create_session(campanile_cluster::Session {
                token_sha256: sha.clone(),
                username: op.username.clone(),
                created_ms: now_ms,
                expires_ms: now_ms + SESSION_TTL.as_millis() as u64,
            }),
        )
        .await
        .map_err(|e| LoginError::Unavailable(e.to_string()))?;
    let csrf = csrf_token(&secret);
    Ok(LoggedIn {
        principal: operator_principal(&op, csrf, sha),
        secret,
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_against_their_own_hash() {
        let h = hash_password("correct horse battery").expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterz", &h));
        assert!(!verify_password("x", "not a phc string"));
    }

    #[test]
    fn csrf_tokens_differ_between_sessions() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert_ne!(csrf_token(&a), csrf_token(&b));
        assert_eq!(csrf_token(&a), csrf_token(&a));
    }

    #[test]
    fn five_failures_lock_the_username_and_the_address() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..MAX_FAILURES - 1 {
            t.failed("sindaco", "10.0.0.1", now);
        }
        assert_eq!(t.locked_for("sindaco", "10.0.0.1", now), None);
        t.failed("sindaco", "10.0.0.1", now);
        assert!(t.locked_for("sindaco", "10.0.0.2", now).is_some());
        assert!(t.locked_for("altro", "10.0.0.1", now).is_some());
        assert_eq!(t.locked_for("altro", "10.0.0.9", now), None);
        assert_eq!(
            t.locked_for("sindaco", "10.0.0.2", now + THROTTLE_WINDOW),
            None
        );
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; campanile_session=abc; b=2".parse().expect("header"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn the_role_table() {
        use Action::*;
        assert!(role_may(Role::Viewer, Read));
        assert!(!role_may(Role::Viewer, Operate));
        assert!(role_may(Role::Operator, Operate));
        assert!(!role_may(Role::Operator, Approve));
        assert!(role_may(Role::Approver, Approve));
        assert!(!role_may(Role::Regional, Operate));
        assert!(role_may(Role::Regional, Approve));
        assert!(!role_may(Role::Admin, System));
        assert!(role_may(Role::Regional, Audit));
        assert!(!role_may(Role::Regional, Administer));
    }
}
