//! The nouns of a voice-alert service: subscribers, campaigns, call tasks and what happened on each call.
//!
//! Everything here is plain data that travels in Raft commands and snapshots, so it derives serde and
//! carries no clocks: every timestamp is milliseconds since the Unix epoch, supplied by whoever proposes
//! the command.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies a subscriber (a registered phone number) within the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SubscriberId(pub u64);

/// Identifies a campaign (one alert sent to an audience).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CampaignId(pub u64);

/// Identifies a node of the cluster; it is also the Raft node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u64);

macro_rules! display_id {
    ($t:ty, $prefix:literal) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}
display_id!(SubscriberId, "sub-");
display_id!(CampaignId, "cmp-");
display_id!(NodeId, "node-");

/// A phone number in E.164 form (`+393471234567`), validated on the way in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PhoneNumber(String);

/// Why a phone number was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("phone number is empty")]
    Empty,
    #[error("`{0}` is not a phone number: {1}")]
    Unparsable(String, String),
    #[error("`{0}` is not a valid number for its country (check the digits and the prefix)")]
    Invalid(String),
}

impl PhoneNumber {
    /// Parses what a person typed (`347 123 4567`, `+39 06 1234567`, `0039...`), taking Italy as the
    /// region when no international prefix is given, and normalises it to E.164.
    pub fn parse(input: &str) -> Result<Self, PhoneError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(PhoneError::Empty);
        }
        if trimmed.len() > 32 {
            return Err(PhoneError::Unparsable(
                shorten(trimmed),
                "longer than 32 characters".into(),
            ));
        }
        let normalised = match trimmed.strip_prefix("00") {
            Some(rest) => format!("+{rest}"),
            None => trimmed.to_string(),
        };
        let parsed = phonenumber::parse(Some(phonenumber::country::Id::IT), &normalised)
            .map_err(|e| PhoneError::Unparsable(trimmed.to_string(), e.to_string()))?;
        if !phonenumber::is_valid(&parsed) {
            return Err(PhoneError::Invalid(trimmed.to_string()));
        }
        Ok(PhoneNumber(
            parsed.format().mode(phonenumber::Mode::E164).to_string(),
        ))
    }

    /// Wraps a string already known to be E.164 (from our own state or a SIP URI we built).
    pub fn from_e164_unchecked(s: impl Into<String>) -> Self {
        PhoneNumber(s.into())
    }

    /// The E.164 form, with the leading `+`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A form safe for info-level logs: country prefix and the last two digits only (`+39******67`).
    pub fn masked(&self) -> String {
        mask_number(&self.0)
    }
}

/// Masks a phone number (or any dial string) for logs, keeping a short prefix and the last two digits.
pub fn mask_number(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() <= 5 {
        return "*".repeat(chars.len());
    }
    let keep_head = 3.min(chars.len() - 2);
    let mut out: String = chars[..keep_head].iter().collect();
    out.push_str(&"*".repeat(chars.len() - keep_head - 2));
    out.extend(&chars[chars.len() - 2..]);
    out
}

fn shorten(s: &str) -> String {
    s.chars().take(20).collect::<String>() + "…"
}

impl fmt::Display for PhoneNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A registered phone that can be alerted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscriber {
    pub id: SubscriberId,
    pub phone: PhoneNumber,
    pub name: Option<String>,
    /// BCP 47 primary language tag used for TTS and prompts (`it`, `en`, `de`, `fr`, `es`).
    pub language: String,
    pub zone: Option<String>,
    /// The number was confirmed to belong to the person (operator-entered numbers count as verified).
    pub verified: bool,
    pub opted_out: bool,
    pub created_ms: u64,
    #[serde(default = "default_tenant", skip_serializing_if = "is_default_tenant")]
    pub tenant: String,
    /// The privacy consent a citizen gave on the public page (operator-entered numbers have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<Consent>,
    /// A verification call's code waiting to be entered on the public page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

/// What entering a verification code does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerificationPurpose {
    /// The number becomes verified: campaigns call it.
    Register,
    /// The subscriber is erased.
    Unsubscribe,
}

/// A code read to the citizen by a verification call; only its hash is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub code_sha256: String,
    pub expires_ms: u64,
    /// Wrong codes still allowed before the code is void.
    pub tries_left: u32,
    pub purpose: VerificationPurpose,
}

/// Wrong codes allowed per verification call.
pub const VERIFICATION_TRIES: u32 = 5;

/// The hash a verification code is kept under: bound to the tenant and the number, so a code is
/// worth nothing for another one.
pub fn verification_hash(tenant: &str, phone: &PhoneNumber, code: &str) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for part in ["campanile-verification-v1", tenant, phone.as_str(), code] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The fields of a subscriber an operator may change (the number itself is not one: a new number
/// is a new registration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriberUpdate {
    pub name: Option<String>,
    pub language: String,
    pub zone: Option<String>,
}

/// The privacy notice a citizen accepted, word for word, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub text: String,
    pub at_ms: u64,
}

/// What a new subscriber looks like before the state machine gives it an id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSubscriber {
    pub phone: PhoneNumber,
    pub name: Option<String>,
    pub language: String,
    pub zone: Option<String>,
    pub verified: bool,
    /// The tenant the subscriber registers with; the same number may be registered with several.
    #[serde(default = "default_tenant", skip_serializing_if = "is_default_tenant")]
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consent: Option<Consent>,
}

/// How urgent an alert is; emergency calls are dialled first and ignore quiet hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Emergency,
    Urgent,
    Info,
}

impl Priority {
    /// Lower rank is dialled first.
    pub fn rank(self) -> u8 {
        match self {
            Priority::Emergency => 0,
            Priority::Urgent => 1,
            Priority::Info => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Emergency => "emergency",
            Priority::Urgent => "urgent",
            Priority::Info => "info",
        }
    }
}

/// What is played to the citizen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    /// Text spoken by the TTS engine in `language`.
    Tts { text: String, language: String },
    /// A recording stored in the cluster (`PutAudio`), by the hex SHA-256 of its WAV bytes.
    Recording { sha256: String },
}

/// The tenant everything belonged to before tenants existed, and a fresh cluster's only tenant.
pub const DEFAULT_TENANT: &str = "default";

/// Serde default for records written before tenants existed.
pub fn default_tenant() -> String {
    DEFAULT_TENANT.into()
}

/// Records of the default tenant are written without the field, exactly as before tenants existed,
/// so logs and snapshots stay readable both ways.
fn is_default_tenant(t: &String) -> bool {
    t == DEFAULT_TENANT
}

/// A comune, a region or any organisation: its subscribers, campaigns, recordings and operators are
/// invisible to every other tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    /// Lower-case letters, digits and dashes, 1 to 40 characters: it appears in URLs (`/r/{slug}`).
    pub slug: String,
    pub name: String,
    pub created_ms: u64,
    /// What citizens see calling: the comune's own number and name; None: the node's `[caller_id]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_id: Option<CallerId>,
    /// When the comune's non-emergency campaigns start no calls; None: any time of day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<QuietHours>,
}

/// A daily window, in Italian local time, in which a tenant's non-emergency campaigns start no
/// calls (calls already up go on to their end; emergencies ignore it). The window may wrap
/// midnight: 22:00 to 07:00 is `start_minute: 1320, end_minute: 420`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietHours {
    /// Minutes after local midnight when the window opens (0 to 1439).
    pub start_minute: u16,
    /// Minutes after local midnight when it closes (0 to 1439), exclusive.
    pub end_minute: u16,
}

/// Minutes in a day (a clock change day is read on the local clock, so still 0 to 1439).
pub const MINUTES_PER_DAY: u16 = 24 * 60;

impl QuietHours {
    /// Why this window cannot be kept, if it cannot.
    pub fn problem(&self) -> Option<&'static str> {
        if self.start_minute >= MINUTES_PER_DAY || self.end_minute >= MINUTES_PER_DAY {
            return Some("start and end must be times of day, 00:00 to 23:59");
        }
        if self.start_minute == self.end_minute {
            return Some(
                "start and end are the same time: an empty window (clear quiet hours instead)",
            );
        }
        None
    }

    /// Whether the local time `minute_of_day` (minutes after local midnight) falls in the window.
    pub fn contains(&self, minute_of_day: u16) -> bool {
        let (start, end, m) = (self.start_minute, self.end_minute, minute_of_day);
        if start <= end {
            start <= m && m < end
        } else {
            m >= start || m < end
        }
    }
}

/// A caller ID: the number (user part of From and P-Asserted-Identity) and the display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerId {
    pub number: String,
    pub display_name: String,
}

impl CallerId {
    /// Why this caller ID cannot go into a SIP header, if it cannot: a number of 3 to 20 digits
    /// (a leading `+` allowed), a name of at most 60 printable characters without quotes or
    /// backslashes.
    pub fn problem(&self) -> Option<&'static str> {
        let digits = self.number.strip_prefix('+').unwrap_or(&self.number);
        if !(3..=20).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Some("the number must be 3 to 20 digits, optionally after a +");
        }
        let name = &self.display_name;
        if name.trim().is_empty()
            || name.chars().count() > 60
            || name
                .chars()
                .any(|c| c.is_control() || c == '"' || c == '\\')
        {
            return Some("the name must be 1 to 60 characters, without quotes or backslashes");
        }
        None
    }
}

impl Tenant {
    /// Whether `slug` can name a tenant: `[a-z0-9][a-z0-9-]{0,39}`.
    pub fn valid_slug(slug: &str) -> bool {
        (1..=40).contains(&slug.len())
            && slug
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !slug.starts_with('-')
    }
}

/// What an operator may do. A regional operator (a prefecture) oversees every tenant it lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Approver,
    Operator,
    Viewer,
    Regional,
}

/// A person who works in the console. The password is only ever an argon2id hash (PHC string),
/// made by the node that received it; the log never holds a password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    pub username: String,
    pub display_name: String,
    pub role: Role,
    /// The tenants this operator works for (one, except for a regional role).
    pub tenants: Vec<String>,
    pub password_hash: String,
    #[serde(default)]
    pub disabled: bool,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The shared secret (base32) of a second factor (RFC 6238 TOTP), when the operator turned it on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp_secret: Option<String>,
}

impl Operator {
    /// Usernames: 1 to 64 characters of letters, digits, `.`, `_`, `-` and `@`.
    pub fn valid_username(name: &str) -> bool {
        (1..=64).contains(&name.len())
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
    }

    /// Whether this operator may see or act on `tenant`'s data.
    pub fn serves(&self, tenant: &str) -> bool {
        self.tenants.iter().any(|t| t == tenant)
    }
}

/// A change to an operator; fields left `None` stay as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorUpdate {
    pub username: String,
    #[serde(default)]
    pub role: Option<Role>,
    #[serde(default)]
    pub tenants: Option<Vec<String>>,
    #[serde(default)]
    pub password_hash: Option<String>,
    #[serde(default)]
    pub disabled: Option<bool>,
    /// Turns the second factor on (with its secret) or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totp: Option<TotpChange>,
}

/// A change to an operator's second factor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TotpChange {
    Enable(String),
    Disable,
}

/// A console login, replicated so that any node accepts it after a failover. Only the SHA-256 of the
/// cookie's secret is kept; the secret itself lives in the operator's browser.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub token_sha256: String,
    pub username: String,
    pub created_ms: u64,
    pub expires_ms: u64,
}

/// Most sessions one operator keeps; a new login past it ends the oldest.
pub const MAX_SESSIONS_PER_OPERATOR: usize = 10;

/// The two-person rule: a city-wide or emergency alert composed by an operator waits for a second
/// person, or for an emergency override whose reason is logged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// Created by automation (an API token) or neither city-wide nor an emergency.
    #[default]
    NotNeeded,
    Pending,
    Approved {
        by: String,
        at_ms: u64,
    },
    /// Started without a second person, for life safety; the reason is kept and audited.
    Overridden {
        by: String,
        reason: String,
        at_ms: u64,
    },
}

impl Approval {
    pub fn is_not_needed(&self) -> bool {
        *self == Approval::NotNeeded
    }

    /// Whether the campaign may start.
    pub fn allows_start(&self) -> bool {
        *self != Approval::Pending
    }
}

/// One line of the replicated audit log: who did what, and what the state machine answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    pub at_ms: u64,
    /// An operator's username, `token:<name>` for an API token, or `system`.
    pub actor: String,
    pub tenant: Option<String>,
    /// The command's kind (`start_campaign`, `create_operator`...).
    pub action: String,
    /// What it was about (a campaign id, a username...), never a phone number or a secret.
    pub target: String,
    /// `ok`, or the refusal.
    pub result: String,
}

/// Largest recording the cluster stores: ten minutes of 8 kHz 16-bit mono WAV.
pub const MAX_AUDIO_BYTES: usize = 10 * 60 * 8_000 * 2 + 44;

/// A recorded message, content-addressed by the hex SHA-256 of its WAV bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AudioBlob {
    pub sha256: String,
    pub tenant: String,
    pub created_ms: u64,
    #[serde(with = "base64_bytes")]
    pub wav: Vec<u8>,
}

/// Bytes as standard base64 in JSON (a third of the size of a JSON array of numbers).
pub(crate) mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// Who a campaign calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    All,
    Zones(Vec<String>),
}

impl Audience {
    pub fn includes(&self, s: &Subscriber) -> bool {
        match self {
            Audience::All => true,
            Audience::Zones(zones) => s
                .zone
                .as_ref()
                .is_some_and(|z| zones.iter().any(|w| w == z)),
        }
    }
}

/// When and how often a subscriber is called again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts (calls placed) before the task ends as `Exhausted`.
    pub max_attempts: u32,
    /// Delay after a busy line.
    pub busy_delay_ms: u64,
    /// Delay after no answer, an answer without confirmation, or a hang-up.
    pub no_answer_delay_ms: u64,
    /// Delay after a network or trunk failure.
    pub failure_delay_ms: u64,
    /// The first this many retries wait at most `quick_delay_ms`: a citizen who missed the first
    /// ring is likely near the phone. Absent in campaigns of earlier releases (0: none).
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub quick_retries: u32,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub quick_delay_ms: u64,
    /// With a deadline, call until the citizen is reached or the deadline comes, however many
    /// attempts that takes (`max_attempts` still bounds a campaign without a deadline).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub until_deadline: bool,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

impl RetryPolicy {
    /// Sensible defaults per priority: an emergency is retried sooner and more often, twice
    /// after 15 s and then every minute, and with a deadline it rings until heard.
    pub fn default_for(priority: Priority) -> Self {
        match priority {
            Priority::Emergency => RetryPolicy {
                max_attempts: 8,
                busy_delay_ms: 30_000,
                no_answer_delay_ms: 60_000,
                failure_delay_ms: 30_000,
                quick_retries: 2,
                quick_delay_ms: 15_000,
                until_deadline: true,
            },
            Priority::Urgent => RetryPolicy {
                max_attempts: 5,
                busy_delay_ms: 60_000,
                no_answer_delay_ms: 180_000,
                failure_delay_ms: 60_000,
                ..RetryPolicy::NONE
            },
            Priority::Info => RetryPolicy {
                max_attempts: 3,
                busy_delay_ms: 300_000,
                no_answer_delay_ms: 900_000,
                failure_delay_ms: 300_000,
                ..RetryPolicy::NONE
            },
        }
    }

    /// One attempt, no retries: the base for a policy written field by field.
    pub const NONE: RetryPolicy = RetryPolicy {
        max_attempts: 1,
        busy_delay_ms: 0,
        no_answer_delay_ms: 0,
        failure_delay_ms: 0,
        quick_retries: 0,
        quick_delay_ms: 0,
        until_deadline: false,
    };
}

/// Everything an operator decides about a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignSpec {
    pub title: String,
    pub message: Message,
    pub audience: Audience,
    pub priority: Priority,
    /// When true only a DTMF "1" confirms; when false hearing the whole message does.
    pub require_confirmation: bool,
    pub retry: RetryPolicy,
    /// Whose subscribers are called.
    #[serde(default = "default_tenant", skip_serializing_if = "is_default_tenant")]
    pub tenant: String,
    /// Scheduled: started before this time (ms since the epoch), nobody is called until it comes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// Deadline: nobody is called from this time on; citizens not reached by then end `exhausted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

impl CampaignSpec {
    /// Whether the deadline has come at `now_ms`.
    pub fn past_deadline(&self, now_ms: u64) -> bool {
        self.deadline_ms.is_some_and(|d| now_ms >= d)
    }
}

/// Where a campaign is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    Draft,
    Running,
    /// Stopped by an operator: nobody is called until it is resumed; calls up at the pause end.
    Paused,
    Completed,
    Cancelled,
}

impl CampaignState {
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignState::Draft => "draft",
            CampaignState::Running => "running",
            CampaignState::Paused => "paused",
            CampaignState::Completed => "completed",
            CampaignState::Cancelled => "cancelled",
        }
    }
}

/// Per-campaign tallies kept up to date by the state machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub targeted: u64,
    pub pending: u64,
    pub in_flight: u64,
    pub confirmed: u64,
    pub exhausted: u64,
    pub invalid: u64,
    pub opted_out: u64,
    pub cancelled: u64,
    /// Calls placed (finished attempts, interrupted ones excluded).
    pub attempts: u64,
    /// Finished attempts that were answered by someone or something.
    pub answered: u64,
}

impl Counts {
    fn slot(&mut self, state: &TaskState) -> &mut u64 {
        match state {
            TaskState::Pending => &mut self.pending,
            TaskState::InFlight { .. } => &mut self.in_flight,
            TaskState::Final(FinalState::Confirmed) => &mut self.confirmed,
            TaskState::Final(FinalState::Exhausted) => &mut self.exhausted,
            TaskState::Final(FinalState::Invalid) => &mut self.invalid,
            TaskState::Final(FinalState::OptedOut) => &mut self.opted_out,
            TaskState::Final(FinalState::Cancelled) => &mut self.cancelled,
        }
    }

    pub(crate) fn enter(&mut self, state: &TaskState) {
        *self.slot(state) += 1;
    }

    pub(crate) fn leave(&mut self, state: &TaskState) {
        let slot = self.slot(state);
        *slot = slot.saturating_sub(1);
    }

    /// Answered attempts over finished attempts; 0 before the first call ends.
    pub fn answer_ratio(&self) -> f64 {
        if self.attempts == 0 {
            0.0
        } else {
            self.answered as f64 / self.attempts as f64
        }
    }

    /// Tasks that still need work.
    pub fn open(&self) -> u64 {
        self.pending + self.in_flight
    }
}

/// A campaign as the state machine holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Campaign {
    pub id: CampaignId,
    pub spec: CampaignSpec,
    pub state: CampaignState,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub counts: Counts,
    /// The operator who composed it; None when an API token created it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Approval::is_not_needed")]
    pub approval: Approval,
    /// What each node did for this campaign (absent from snapshots of earlier releases).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub by_node: std::collections::BTreeMap<NodeId, NodeProgress>,
}

/// One node's share of a campaign: the subscribers' attempts it finished, how many were answered,
/// and how many ended `confirmed` on its calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProgress {
    pub attempts: u64,
    pub answered: u64,
    pub confirmed: u64,
}

/// The state every targeted subscriber must end in (ARCHITECTURE.md, delivery guarantee).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalState {
    Confirmed,
    Exhausted,
    Invalid,
    OptedOut,
    Cancelled,
}

impl FinalState {
    pub fn as_str(self) -> &'static str {
        match self {
            FinalState::Confirmed => "confirmed",
            FinalState::Exhausted => "exhausted",
            FinalState::Invalid => "invalid",
            FinalState::OptedOut => "opted_out",
            FinalState::Cancelled => "cancelled",
        }
    }
}

/// Where one subscriber's call task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for its next attempt at `CallTask::next_due_ms`.
    Pending,
    /// A node is on the phone with this subscriber, under the lease epoch it started the attempt
    /// with (absent for attempts started before leases existed).
    InFlight {
        attempt: u32,
        node: NodeId,
        since_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
    },
    Final(FinalState),
}

impl TaskState {
    pub fn label(&self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::InFlight { .. } => "in_flight",
            TaskState::Final(f) => f.as_str(),
        }
    }
}

/// What happened on one call attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The phone pressed 1.
    Confirmed,
    /// The message played to its end.
    Heard,
    /// Answered, message played, no confirmation arrived.
    NotConfirmed,
    /// The callee hung up before the message ended.
    HungUp { after_ms: u64 },
    /// An answering machine took the call; the message was left after its beep. Never a confirmation:
    /// the citizen is called again.
    Voicemail,
    /// 486 / 600.
    Busy,
    /// Rang until our timeout (or 408/480/487).
    NoAnswer,
    /// The number does not exist (404, 484, 604).
    InvalidNumber { code: u16 },
    /// Any other final error response.
    Rejected { code: u16 },
    /// No response from the trunk, or a transport error.
    Unreachable,
    /// The citizen pressed 9 to leave the service.
    OptOut,
    /// The node placing the call stopped before the call ended; not the subscriber's attempt.
    Interrupted,
    /// The trunk refused the call (503 and the like); not the subscriber's attempt.
    TrunkRejected { code: u16 },
}

impl Outcome {
    /// True when a person or machine picked up.
    pub fn answered(&self) -> bool {
        matches!(
            self,
            Outcome::Confirmed
                | Outcome::Heard
                | Outcome::NotConfirmed
                | Outcome::HungUp { .. }
                | Outcome::Voicemail
                | Outcome::OptOut
        )
    }

    /// False when the attempt failed for reasons that are not the subscriber's (our node or our trunk);
    /// such attempts are given back and do not count toward the retry budget.
    pub fn is_subscribers_attempt(&self) -> bool {
        !matches!(self, Outcome::Interrupted | Outcome::TrunkRejected { .. })
    }

    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Confirmed => "confirmed",
            Outcome::Heard => "heard",
            Outcome::NotConfirmed => "not_confirmed",
            Outcome::HungUp { .. } => "hung_up",
            Outcome::Voicemail => "voicemail",
            Outcome::Busy => "busy",
            Outcome::NoAnswer => "no_answer",
            Outcome::InvalidNumber { .. } => "invalid_number",
            Outcome::Rejected { .. } => "rejected",
            Outcome::Unreachable => "unreachable",
            Outcome::OptOut => "opt_out",
            Outcome::Interrupted => "interrupted",
            Outcome::TrunkRejected { .. } => "trunk_rejected",
        }
    }
}

/// What the dialer decided after an attempt: try again at a time, or stop in a final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Next {
    RetryAt(u64),
    Final(FinalState),
}

/// One subscriber's work inside one campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallTask {
    pub campaign: CampaignId,
    pub subscriber: SubscriberId,
    pub phone: PhoneNumber,
    pub language: String,
    /// Attempts started so far (interrupted ones are given back).
    pub attempts: u32,
    pub state: TaskState,
    pub next_due_ms: u64,
    pub last_outcome: Option<Outcome>,
    pub updated_ms: u64,
    /// While an answered call is up: its dialog and stream, for a takeover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<CallHandover>,
}

/// An API token as the cluster stores it: only the SHA-256 of the secret, never the secret itself, so a
/// backup or a snapshot cannot be used to call the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Lowercase hex SHA-256 of the token as presented in `Authorization: Bearer`.
    pub sha256: String,
    /// What the token is for (`admin token of node 2`, `import script`).
    pub label: String,
    pub created_ms: u64,
    /// What an automation token may do; None for a node's admin token (everything, every tenant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<TokenScope>,
}

/// An automation token's rights: a role in some tenants, like an operator's, and who made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenScope {
    pub role: Role,
    pub tenants: Vec<String>,
    pub created_by: String,
}

/// A member of the cluster as it announced itself: where to reach it and in which data centre it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    pub datacenter: String,
    pub raft_addr: String,
    pub http_addr: String,
    /// When the node first registered, and when it last re-registered (every start).
    pub registered_ms: u64,
    pub started_ms: u64,
}

/// Subscribers are split into this many partitions; each is dialled by the one node holding its lease.
pub const PARTITIONS: u16 = 256;

/// A subscriber's partition. Ids are dense, so a multiplicative hash spreads neighbours apart.
pub fn partition_of(subscriber: SubscriberId) -> u16 {
    (subscriber.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u16 % PARTITIONS
}

/// Who may dial a partition, until when, and under which fencing epoch. `expires_ms` is on the
/// proposers' wall clocks; a holder stops on its own monotonic clock a safety margin earlier, so
/// the scheme is safe while wall clocks differ by less than that margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub node: NodeId,
    /// Grows by one at every change of holder; attempts carry it and a stale one is refused.
    pub epoch: u64,
    pub expires_ms: u64,
}

/// A record produced by a dialer about one attempt; batched into `Command::RecordAttempts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptEvent {
    /// The node begins attempt number `attempt` (1-based) of this task, under the lease epoch it
    /// holds for the subscriber's partition (fencing token; absent in logs from before leases).
    Started {
        campaign: CampaignId,
        subscriber: SubscriberId,
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
    },
    /// The attempt ended with `outcome`; the task moves to `next`.
    Finished {
        campaign: CampaignId,
        subscriber: SubscriberId,
        attempt: u32,
        outcome: Outcome,
        next: Next,
        /// The epoch the attempt was started under; an outcome of another epoch is stale.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
    },
    /// The call was answered (or its stream moved): what another node needs to continue it if this
    /// one dies. A later record replaces an earlier one; the attempt's end clears it.
    Answered {
        campaign: CampaignId,
        subscriber: SubscriberId,
        attempt: u32,
        call: Box<CallHandover>,
    },
}

/// An answered call as another node needs it to take the call over: the SIP dialog (RFC 3261 §12)
/// to send a re-INVITE inside, and where the message's RTP stream stood at a moment, so the new
/// node continues the same stream (SSRC, sequence, timestamp) at the right place of the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallHandover {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
    /// Our From header value, without tag.
    pub local_party: String,
    /// The callee's To header value, without tag.
    pub remote_party: String,
    /// Where in-dialog requests go (the callee's Contact).
    pub remote_target: String,
    /// Route headers for in-dialog requests, in order.
    pub route_set: Vec<String>,
    /// The last CSeq number we used in the dialog.
    pub local_cseq: u32,
    /// `UDP` or `TCP`.
    pub via_transport: String,
    /// The callee's RTP address (`ip:port`), and RTCP if it named one.
    pub remote_rtp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_rtcp: Option<String>,
    /// RTP payload type of the audio (0 PCMU, 8 PCMA) and of telephone-event, if negotiated.
    pub payload_type: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telephone_event: Option<u8>,
    pub ssrc: u32,
    /// At wall-clock time `at_ms` the stream was about to send frame `frame` of the message with
    /// this sequence number and timestamp.
    pub at_ms: u64,
    pub frame: u32,
    pub seq: u16,
    pub ts: u32,
    /// When the callee answered (wall clock).
    pub answered_ms: u64,
    /// The nodes that carried this attempt before the leader moved the call to another
    /// (`HandOverCalls`), filled in by the log only: a 1 or a 9 one of them heard before the move
    /// still counts when its record reaches the log late.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved_from: Vec<NodeId>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn italian_numbers_are_normalised_to_e164() {
        let cases = [
            ("347 123 4567", "+393471234567"),
            ("+39 06 6982 1234", "+390669821234"),
            ("0039 347 1234567", "+393471234567"),
            ("06 69821234", "+390669821234"),
        ];
        for (input, want) in cases {
            assert_eq!(PhoneNumber::parse(input).unwrap().as_str(), want, "{input}");
        }
    }

    #[test]
    fn bad_numbers_are_refused_with_a_reason() {
        assert_eq!(PhoneNumber::parse("  "), Err(PhoneError::Empty));
        assert!(matches!(
            PhoneNumber::parse("hello"),
            Err(PhoneError::Unparsable(..))
        ));
        assert!(matches!(
            PhoneNumber::parse("+39 12"),
            Err(PhoneError::Invalid(_)) | Err(PhoneError::Unparsable(..))
        ));
        assert!(PhoneNumber::parse(&"9".repeat(100)).is_err());
    }

    #[test]
    fn masked_numbers_keep_only_the_prefix_and_last_two_digits() {
        let p = PhoneNumber::parse("+393471234567").unwrap();
        assert_eq!(p.masked(), "+39********67");
        assert_eq!(mask_number("123"), "***");
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,40}") {
            let _ = PhoneNumber::parse(&s);
        }
    }
}
