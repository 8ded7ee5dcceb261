//! The commands that go through the Raft log, and what applying one answers.
//!
//! Commands are externally tagged serde enums: a new release may add variants and fields with defaults,
//! and a node of the next release still replays this release's log (rolling upgrades).

use serde::{Deserialize, Serialize};

use crate::domain::{
    ApiToken, AttemptEvent, CallerId, CampaignId, CampaignSpec, NewSubscriber, NodeId, NodeInfo,
    Operator, OperatorUpdate, QuietHours, Session, SubscriberId, SubscriberUpdate, Verification,
};

/// A change to the replicated state. `at_ms` is the proposer's wall clock; `apply` never reads a clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    CreateSubscriber {
        at_ms: u64,
        subscriber: NewSubscriber,
    },
    /// An import batch: each subscriber is created unless its number is already registered.
    CreateSubscribers {
        at_ms: u64,
        subscribers: Vec<NewSubscriber>,
    },
    DeleteSubscriber {
        at_ms: u64,
        id: SubscriberId,
    },
    CreateCampaign {
        at_ms: u64,
        spec: CampaignSpec,
        /// The console operator composing it (None for an API token): a city-wide or emergency
        /// campaign from an operator waits for a second person's approval.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        created_by: Option<String>,
    },
    StartCampaign {
        at_ms: u64,
        id: CampaignId,
    },
    CancelCampaign {
        at_ms: u64,
        id: CampaignId,
    },
    /// A running campaign stops dialing everywhere until it is resumed.
    PauseCampaign {
        at_ms: u64,
        id: CampaignId,
    },
    ResumeCampaign {
        at_ms: u64,
        id: CampaignId,
    },
    /// A batch of dialer records from one node.
    RecordAttempts {
        at_ms: u64,
        node: NodeId,
        events: Vec<AttemptEvent>,
    },
    /// Adds an API token (by its hash); adding one that exists changes nothing.
    AddToken {
        token: ApiToken,
    },
    /// A node announces (or re-announces on start) its addresses and data centre.
    RegisterNode {
        at_ms: u64,
        node: NodeInfo,
    },
    /// Another node takes over dialing from `from`: every call task `from` had in flight is given back
    /// as interrupted so it is dialled again.
    ReclaimTasks {
        at_ms: u64,
        from: NodeId,
    },
    /// A node renews every lease it holds for `lease_ms` from `at_ms`; it is also the node's
    /// heartbeat, from which the leader knows who is alive.
    RenewLeases {
        at_ms: u64,
        node: NodeId,
        lease_ms: u64,
        /// The node's calls in progress (trunk channels in use), for the cluster view.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channels_in_use: Option<u32>,
        /// The node's trunk capacity (concurrent channels): the leader gives each node a share of
        /// the partitions in proportion to it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        capacity: Option<u32>,
    },
    /// The leader hands partitions to nodes. A grant takes effect only if the partition has no
    /// lease or its lease has expired by `at_ms`; the epoch grows, and calls the previous holder
    /// still had in flight in that partition are given back to be dialled again.
    AssignLeases {
        at_ms: u64,
        lease_ms: u64,
        grants: Vec<(u16, NodeId)>,
    },
    /// A holder gives partitions up (rebalancing): they can be granted at once.
    ReleaseLeases {
        at_ms: u64,
        node: NodeId,
        partitions: Vec<u16>,
    },
    /// The leader moves answered calls of a node that stopped renewing its leases to live nodes
    /// (campaign, subscriber, new node): they continue each call inside its dialog (a re-INVITE),
    /// without waiting for the dead node's partition leases to expire.
    HandOverCalls {
        at_ms: u64,
        from: NodeId,
        moves: Vec<(CampaignId, SubscriberId, NodeId)>,
    },
    /// A node left the cluster (`campanile cluster remove`): its registration goes, and every call
    /// task it had in flight is given back as interrupted so another node dials it.
    ForgetNode {
        at_ms: u64,
        node: NodeId,
    },
    /// A new tenant (a comune, a region).
    CreateTenant {
        at_ms: u64,
        slug: String,
        name: String,
    },
    /// A new console account; `created_ms` and `updated_ms` are set from `at_ms`.
    CreateOperator {
        at_ms: u64,
        operator: Operator,
    },
    UpdateOperator {
        at_ms: u64,
        update: OperatorUpdate,
    },
    /// Stores a recording (WAV bytes) for a tenant under the SHA-256 of its bytes; storing the same
    /// bytes again changes nothing.
    PutAudio {
        at_ms: u64,
        tenant: String,
        #[serde(with = "crate::domain::base64_bytes")]
        wav: Vec<u8>,
    },
    /// A second operator approves a campaign waiting for approval; its author cannot.
    ApproveCampaign {
        at_ms: u64,
        id: CampaignId,
        by: String,
    },
    /// Life safety: the campaign may start without a second person; the reason is kept.
    OverrideApproval {
        at_ms: u64,
        id: CampaignId,
        by: String,
        reason: String,
    },
    /// An operator logged in; expired sessions are dropped when this applies.
    CreateSession {
        at_ms: u64,
        session: Session,
    },
    /// Logout (or a password change elsewhere): the session stops working on every node.
    EndSession {
        at_ms: u64,
        token_sha256: String,
    },
    /// The leader closes campaigns whose deadline has come: their citizens waiting for a call end
    /// `exhausted` (calls up at that moment end as they end, without a retry).
    CloseExpired {
        at_ms: u64,
    },
    /// Sets (or, with None, clears) the caller ID a tenant's calls present.
    SetCallerId {
        at_ms: u64,
        tenant: String,
        caller_id: Option<CallerId>,
    },
    /// Sets (or, with None, clears) a tenant's quiet hours.
    SetQuietHours {
        at_ms: u64,
        tenant: String,
        quiet_hours: Option<QuietHours>,
    },
    /// An API token stops working everywhere.
    RevokeToken {
        at_ms: u64,
        sha256: String,
    },
    /// An operator corrects a subscriber's name, language or zone.
    UpdateSubscriber {
        at_ms: u64,
        id: SubscriberId,
        update: SubscriberUpdate,
    },
    /// A verification call is about to read a code to the subscriber (replaces any earlier one).
    RequestVerification {
        at_ms: u64,
        id: SubscriberId,
        verification: Verification,
    },
    /// The citizen typed a code on the public page: right, it registers or erases the subscriber
    /// (as the verification's purpose says); wrong, it uses up a try.
    ConfirmVerification {
        at_ms: u64,
        id: SubscriberId,
        code_sha256: String,
    },
    /// `command`, applied as usual, and a line in the audit log saying who asked and what came of it.
    Audited {
        at_ms: u64,
        actor: String,
        tenant: Option<String>,
        command: Box<Command>,
    },
}

impl Command {
    /// The command's kind as it is written in the log (`start_campaign`...), without serialising it
    /// (`apply` asks for it on every audited command, imports and recordings included).
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateSubscriber { .. } => "create_subscriber",
            Command::CreateSubscribers { .. } => "create_subscribers",
            Command::DeleteSubscriber { .. } => "delete_subscriber",
            Command::CreateCampaign { .. } => "create_campaign",
            Command::StartCampaign { .. } => "start_campaign",
            Command::CancelCampaign { .. } => "cancel_campaign",
            Command::PauseCampaign { .. } => "pause_campaign",
            Command::ResumeCampaign { .. } => "resume_campaign",
            Command::RecordAttempts { .. } => "record_attempts",
            Command::AddToken { .. } => "add_token",
            Command::RegisterNode { .. } => "register_node",
            Command::ReclaimTasks { .. } => "reclaim_tasks",
            Command::HandOverCalls { .. } => "hand_over_calls",
            Command::RenewLeases { .. } => "renew_leases",
            Command::AssignLeases { .. } => "assign_leases",
            Command::ReleaseLeases { .. } => "release_leases",
            Command::ForgetNode { .. } => "forget_node",
            Command::CreateTenant { .. } => "create_tenant",
            Command::CreateOperator { .. } => "create_operator",
            Command::UpdateOperator { .. } => "update_operator",
            Command::PutAudio { .. } => "put_audio",
            Command::ApproveCampaign { .. } => "approve_campaign",
            Command::OverrideApproval { .. } => "override_approval",
            Command::CreateSession { .. } => "create_session",
            Command::EndSession { .. } => "end_session",
            Command::CloseExpired { .. } => "close_expired",
            Command::SetCallerId { .. } => "set_caller_id",
            Command::SetQuietHours { .. } => "set_quiet_hours",
            Command::RevokeToken { .. } => "revoke_token",
            Command::UpdateSubscriber { .. } => "update_subscriber",
            Command::RequestVerification { .. } => "request_verification",
            Command::ConfirmVerification { .. } => "confirm_verification",
            Command::Audited { .. } => "audited",
        }
    }
}

/// What applying a command answered. Refusals are data, decided deterministically by the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    #[default]
    Ok,
    SubscriberCreated(SubscriberId),
    /// Per subscriber of a `CreateSubscribers` batch, in order: the new id, or the id that already
    /// holds the number.
    Imported(Vec<Imported>),
    CampaignCreated(CampaignId),
    /// The SHA-256 a recording is stored under.
    AudioStored(String),
    /// How many events of a `RecordAttempts` batch changed something (the rest were duplicates or stale).
    Recorded {
        applied: u32,
    },
    Refused(Refusal),
}

/// What became of one subscriber of an import batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Imported {
    Created(SubscriberId),
    Duplicate(SubscriberId),
}

/// Why the state machine refused a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    #[error("phone number {0} is already registered as subscriber {1}")]
    /// Carries the masked number only: refusals end up in logs.
    DuplicatePhone(String, SubscriberId),
    #[error("subscriber {0} does not exist")]
    UnknownSubscriber(SubscriberId),
    #[error("campaign {0} does not exist")]
    UnknownCampaign(CampaignId),
    #[error("campaign {id} is {state}; only a {wanted} campaign can be {verb}")]
    WrongCampaignState {
        id: CampaignId,
        state: String,
        wanted: String,
        verb: String,
    },
    #[error("tenant `{0}` does not exist")]
    UnknownTenant(String),
    #[error("tenant `{0}` already exists")]
    DuplicateTenant(String),
    #[error("`{0}` cannot name a tenant: use 1 to 40 lower-case letters, digits and dashes")]
    InvalidTenant(String),
    #[error("operator `{0}` already exists")]
    DuplicateOperator(String),
    #[error("operator `{0}` does not exist")]
    UnknownOperator(String),
    #[error("operator `{username}` is not valid: {reason}")]
    InvalidOperator { username: String, reason: String },
    #[error("the recording is {bytes} bytes; the limit is {limit} bytes (ten minutes at 8 kHz)")]
    AudioTooLarge { bytes: usize, limit: usize },
    #[error("recording {0} does not exist for this tenant")]
    UnknownAudio(String),
    #[error("operator `{0}` is disabled")]
    DisabledOperator(String),
    #[error(
        "campaign {0} needs a second person's approval (or an emergency override) before it starts"
    )]
    ApprovalRequired(CampaignId),
    #[error("campaign {0} does not need an approval")]
    ApprovalNotNeeded(CampaignId),
    #[error("`{0}` composed campaign {1}; a different person must approve it")]
    SelfApproval(String, CampaignId),
    #[error("only an emergency campaign can start on an override; campaign {0} is not one")]
    OverrideNotEmergency(CampaignId),
    #[error("an emergency override needs a reason of at least 10 characters")]
    OverrideWithoutReason,
    #[error("caller ID refused: {0}")]
    InvalidCallerId(String),
    #[error("invalid quiet hours: {0}")]
    InvalidQuietHours(String),
    #[error("no API token has that hash")]
    UnknownToken,
    #[error("no verification code is waiting for this number (or it expired); ask for a new call")]
    NoVerification(SubscriberId),
    #[error("wrong code; {tries_left} tries left")]
    WrongCode { tries_left: u32 },
    #[error("an audited command cannot wrap another audited command")]
    NestedAudit,
}
