//! The engine handle the HTTP surface depends on. The node implements it; tests implement a fake. The
//! dashboard never reaches into node internals.

use async_trait::async_trait;
use campanile_cluster::{
    CallTask, Campaign, CampaignId, CampaignSpec, NewSubscriber, Operator, OperatorUpdate,
    PhoneNumber, Session, Subscriber, SubscriberId, SubscriberUpdate, VerificationPurpose,
};

/// Whether the node can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub ok: bool,
    pub detail: String,
}

/// Why the engine refused or failed a request; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl From<campanile_cluster::Refusal> for EngineError {
    /// The status a refusal of the state machine answers with.
    fn from(r: campanile_cluster::Refusal) -> Self {
        use campanile_cluster::Refusal;
        match r {
            Refusal::DuplicatePhone(..) => EngineError::Conflict(r.to_string()),
            Refusal::UnknownSubscriber(_) | Refusal::UnknownCampaign(_) | Refusal::UnknownToken => {
                EngineError::NotFound(r.to_string())
            }
            Refusal::WrongCampaignState { .. }
            | Refusal::DuplicateTenant(_)
            | Refusal::DuplicateOperator(_)
            | Refusal::ApprovalRequired(_)
            | Refusal::ApprovalNotNeeded(_)
            | Refusal::SelfApproval(..)
            | Refusal::OverrideNotEmergency(_)
            | Refusal::DisabledOperator(_) => EngineError::Conflict(r.to_string()),
            Refusal::UnknownTenant(_) | Refusal::UnknownOperator(_) | Refusal::UnknownAudio(_) => {
                EngineError::NotFound(r.to_string())
            }
            Refusal::InvalidTenant(_)
            | Refusal::InvalidOperator { .. }
            | Refusal::AudioTooLarge { .. }
            | Refusal::OverrideWithoutReason
            | Refusal::NoVerification(_)
            | Refusal::InvalidCallerId(_)
            | Refusal::InvalidQuietHours(_)
            | Refusal::WrongCode { .. }
            | Refusal::NestedAudit => EngineError::Invalid(r.to_string()),
        }
    }
}

tokio::task_local! {
    /// Who is making the API request being served (`token:<label>`): the audit log's actor.
    pub static ACTOR: String;
}

/// The actor of the API request being served on this task, if any.
pub fn current_actor() -> Option<String> {
    ACTOR.try_with(|a| a.clone()).ok()
}

/// What the HTTP surface asks of a node.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    async fn create_subscriber(&self, s: NewSubscriber) -> Result<Subscriber, EngineError>;
    async fn subscriber(&self, id: SubscriberId) -> Result<Subscriber, EngineError>;
    /// Creates a batch of subscribers in one replicated command; per subscriber, in order, the new
    /// id or the id already holding the number.
    async fn import_subscribers(
        &self,
        _batch: Vec<NewSubscriber>,
    ) -> Result<Vec<campanile_cluster::Imported>, EngineError> {
        Err(EngineError::Unavailable(
            "import is not available on this node".into(),
        ))
    }
    async fn delete_subscriber(&self, id: SubscriberId) -> Result<(), EngineError>;
    /// One page of a tenant's subscribers whose number, name or zone contains `query` (all when
    /// empty), by id; and how many match in all.
    async fn search_subscribers(
        &self,
        _tenant: String,
        _query: String,
        _offset: usize,
        _limit: usize,
    ) -> Result<(Vec<Subscriber>, usize), EngineError> {
        Err(EngineError::Unavailable(
            "subscriber search is not available on this node".into(),
        ))
    }
    /// Changes a subscriber's name, language and zone.
    async fn update_subscriber(
        &self,
        _id: SubscriberId,
        _update: SubscriberUpdate,
    ) -> Result<Subscriber, EngineError> {
        Err(EngineError::Unavailable(
            "subscribers cannot be changed on this node".into(),
        ))
    }
    /// Calls `phone` (registered with `tenant`) and reads it a fresh code to type on the public page.
    /// A number that is not registered gets no call and the same answer, so the page does not tell
    /// who is registered.
    async fn start_verification(
        &self,
        _tenant: String,
        _phone: PhoneNumber,
        _purpose: VerificationPurpose,
    ) -> Result<(), EngineError> {
        Err(EngineError::Unavailable(
            "verification calls are not available on this node".into(),
        ))
    }
    /// Checks a typed code; right, it registers or erases the subscriber and answers which.
    async fn confirm_verification(
        &self,
        _tenant: String,
        _phone: PhoneNumber,
        _code: String,
    ) -> Result<VerificationPurpose, EngineError> {
        Err(EngineError::Unavailable(
            "verification calls are not available on this node".into(),
        ))
    }
    /// `created_by` is the console operator composing it (None for an API token); the state machine
    /// decides from it whether the campaign waits for a second person's approval.
    async fn create_campaign(
        &self,
        spec: CampaignSpec,
        created_by: Option<String>,
    ) -> Result<Campaign, EngineError>;
    /// A second person approves a campaign that waits for approval.
    async fn approve_campaign(
        &self,
        _id: CampaignId,
        _by: String,
    ) -> Result<Campaign, EngineError> {
        Err(EngineError::Unavailable(
            "approvals are not available on this node".into(),
        ))
    }
    /// Life safety: an emergency campaign may start without a second person; `reason` is kept.
    async fn override_approval(
        &self,
        _id: CampaignId,
        _by: String,
        _reason: String,
    ) -> Result<Campaign, EngineError> {
        Err(EngineError::Unavailable(
            "approvals are not available on this node".into(),
        ))
    }
    async fn start_campaign(&self, id: CampaignId) -> Result<Campaign, EngineError>;
    async fn cancel_campaign(&self, id: CampaignId) -> Result<Campaign, EngineError>;
    /// Stops a running campaign's dialing on every node until it is resumed.
    async fn pause_campaign(&self, _id: CampaignId) -> Result<Campaign, EngineError> {
        Err(EngineError::Unavailable(
            "pausing is not available on this node".into(),
        ))
    }
    async fn resume_campaign(&self, _id: CampaignId) -> Result<Campaign, EngineError> {
        Err(EngineError::Unavailable(
            "resuming is not available on this node".into(),
        ))
    }
    async fn campaign(&self, id: CampaignId) -> Result<Campaign, EngineError>;
    async fn campaigns(&self) -> Result<Vec<Campaign>, EngineError>;
    async fn tasks(&self, id: CampaignId) -> Result<Vec<CallTask>, EngineError>;
    /// Prometheus text exposition of the node's own registry.
    fn metrics_text(&self) -> String;
    /// Constant-time check of an API bearer token.
    fn check_token(&self, presented: &str) -> bool;
    /// Who a valid token speaks for in the audit log (`token:<label>`); None for an invalid token.
    fn token_actor(&self, presented: &str) -> Option<String> {
        self.check_token(presented).then(|| "token".to_string())
    }
    /// The label and scope of a valid token (scope None: a node's admin token); None for an
    /// invalid one.
    fn token_principal(
        &self,
        presented: &str,
    ) -> Option<(String, Option<campanile_cluster::TokenScope>)> {
        self.token_actor(presented).map(|label| (label, None))
    }
    /// API tokens (hashes and scopes, never secrets).
    async fn tokens(&self) -> Result<Vec<campanile_cluster::ApiToken>, EngineError> {
        Err(EngineError::Unavailable(
            "API tokens are not available on this node".into(),
        ))
    }
    /// Stores a new token (its hash).
    async fn add_token(&self, _token: campanile_cluster::ApiToken) -> Result<(), EngineError> {
        Err(EngineError::Unavailable(
            "API tokens are not available on this node".into(),
        ))
    }
    async fn revoke_token(&self, _sha256: String) -> Result<(), EngineError> {
        Err(EngineError::Unavailable(
            "API tokens are not available on this node".into(),
        ))
    }
    /// Sets (None: clears) the caller ID a tenant's calls present; answers the tenant.
    async fn set_caller_id(
        &self,
        _tenant: String,
        _caller_id: Option<campanile_cluster::CallerId>,
    ) -> Result<campanile_cluster::Tenant, EngineError> {
        Err(EngineError::Unavailable(
            "caller IDs cannot be changed on this node".into(),
        ))
    }
    /// Sets (None: clears) a tenant's quiet hours; answers the tenant.
    async fn set_quiet_hours(
        &self,
        _tenant: String,
        _quiet_hours: Option<campanile_cluster::QuietHours>,
    ) -> Result<campanile_cluster::Tenant, EngineError> {
        Err(EngineError::Unavailable(
            "quiet hours cannot be changed on this node".into(),
        ))
    }
    /// Tenants (comuni) of the cluster.
    async fn tenants(&self) -> Result<Vec<campanile_cluster::Tenant>, EngineError> {
        Err(EngineError::Unavailable(
            "tenants are not available on this node".into(),
        ))
    }
    async fn create_tenant(
        &self,
        _slug: String,
        _name: String,
    ) -> Result<campanile_cluster::Tenant, EngineError> {
        Err(EngineError::Unavailable(
            "tenants are not available on this node".into(),
        ))
    }
    /// Stores a recording (any common WAV) for `tenant` as 8 kHz mono; answers its SHA-256 and its
    /// duration in milliseconds.
    async fn put_audio(
        &self,
        _tenant: String,
        _wav: Vec<u8>,
    ) -> Result<(String, u64), EngineError> {
        Err(EngineError::Unavailable(
            "recordings are not available on this node".into(),
        ))
    }
    /// Audit log entries after `after` (a sequence number), oldest first, at most `limit`, of one
    /// tenant or all.
    async fn audit(
        &self,
        _tenant: Option<String>,
        _after: u64,
        _limit: usize,
    ) -> Result<Vec<campanile_cluster::AuditEntry>, EngineError> {
        Err(EngineError::Unavailable(
            "the audit log is not available on this node".into(),
        ))
    }
    /// Console accounts (with their password hashes, which the HTTP surface never shows).
    async fn operators(&self) -> Result<Vec<Operator>, EngineError> {
        Err(EngineError::Unavailable(
            "operators are not available on this node".into(),
        ))
    }
    /// Creates a console account; the password is already an argon2id hash.
    async fn create_operator(&self, _op: Operator) -> Result<(), EngineError> {
        Err(EngineError::Unavailable(
            "operators are not available on this node".into(),
        ))
    }
    async fn update_operator(&self, _update: OperatorUpdate) -> Result<(), EngineError> {
        Err(EngineError::Unavailable(
            "operators are not available on this node".into(),
        ))
    }
    /// Records a login (replicated: any node accepts the session afterwards).
    async fn create_session(&self, _session: Session) -> Result<(), EngineError> {
        Err(EngineError::Unavailable(
            "logins are not available on this node".into(),
        ))
    }
    async fn end_session(&self, _token_sha256: String) -> Result<(), EngineError> {
        Ok(())
    }
    /// The live session with this secret hash and its operator (enabled, not expired).
    async fn session(&self, _token_sha256: &str) -> Option<(Session, Operator)> {
        None
    }
    /// The message as a citizen would hear it (TTS in `language`), as a WAV file: the console's
    /// "listen" preview.
    async fn preview(&self, _text: String, _language: String) -> Result<Vec<u8>, EngineError> {
        Err(EngineError::Unavailable(
            "previews are not available on this node".into(),
        ))
    }
    /// A citizen registering on a tenant's public page (`/r/{tenant}`): stored unverified, with the
    /// consent given; verified numbers are the only ones a campaign calls.
    async fn register_citizen(&self, s: NewSubscriber) -> Result<Subscriber, EngineError> {
        self.create_subscriber(s).await
    }
    /// The address citizens reach this deployment at (`https://allerta.comune.example`), from the
    /// configuration; None when unset (pages then use the request's Host).
    fn public_url(&self) -> Option<String> {
        None
    }
    /// Some(explanation) when calls go to a simulated city instead of a real trunk.
    fn drill_mode(&self) -> Option<String>;
    async fn health(&self) -> Health;
    /// The cluster as this node sees it: leader, term, members.
    async fn cluster(&self) -> Result<serde_json::Value, EngineError> {
        Err(EngineError::Unavailable(
            "cluster view not available".into(),
        ))
    }
    /// Removes a member from the cluster; answers the cluster view afterwards.
    async fn remove_member(&self, _node: u64) -> Result<serde_json::Value, EngineError> {
        Err(EngineError::Unavailable(
            "cluster membership cannot be changed on this node".into(),
        ))
    }
    /// A consistent backup of the replicated state (`campanile backup`).
    /// A file positioned at its start; the API streams it.
    async fn backup(&self) -> Result<std::fs::File, EngineError> {
        Err(EngineError::Unavailable(
            "backups are not available on this node".into(),
        ))
    }
    /// Waits until this node's reads are linearizable (Raft read index); reads that accept stale
    /// data skip it.
    async fn linearize(&self) -> Result<(), EngineError> {
        Ok(())
    }
}
