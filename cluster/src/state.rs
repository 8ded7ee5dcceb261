//! The domain state machine: what every node holds once a command is committed.
//!
//! `State::apply` is deterministic — no clock, no randomness, no I/O — so every replica that applies the
//! same log reaches the same state. Indexes that can be derived (phone → subscriber, the due queue) are
//! skipped by serde and rebuilt by `State::rebuild_indexes` after a snapshot is loaded.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{Command, Imported, Refusal, Response};
use crate::domain::{
    partition_of, ApiToken, Approval, AttemptEvent, Audience, AudioBlob, AuditEntry, CallTask,
    Campaign, CampaignId, CampaignSpec, CampaignState, Counts, FinalState, Lease, Message,
    NewSubscriber, Next, NodeId, NodeInfo, Operator, OperatorUpdate, Outcome, PhoneNumber,
    Priority, Session, Subscriber, SubscriberId, TaskState, Tenant, TotpChange,
    VerificationPurpose, DEFAULT_TENANT, MAX_AUDIO_BYTES, MAX_SESSIONS_PER_OPERATOR, PARTITIONS,
};

/// Key of the due queue: priority rank first, so the dialer pops emergencies first (`due_key`).
pub type DueKey = (u8, u8, u64, CampaignId, SubscriberId);

/// Where a pending task stands in the due order: by priority, then by how often its citizen has been
/// called (fewest first, those called `ATTEMPT_CLASSES` times or more together), then by due time.
///
/// Fewest attempts first means a city is called once before anyone is called again, and, when
/// the channels are full, a citizen with more of their retries ahead is not kept waiting behind
/// one near the end of theirs: the last chains of retries start as early as they can, which is
/// what decides when the city is done (the same channels otherwise sit idle at the end waiting
/// for them). It changes which due task goes first, never whether one is due.
pub fn due_key(rank: u8, task: &CallTask, campaign: CampaignId) -> DueKey {
    let class = task.attempts.min(ATTEMPT_CLASSES - 1) as u8;
    (rank, class, task.next_due_ms, campaign, task.subscriber)
}

/// Attempt counts the due order tells apart (`due_key`).
const ATTEMPT_CLASSES: u32 = 8;

/// The whole replicated domain state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    next_subscriber: u64,
    next_campaign: u64,
    subscribers: BTreeMap<SubscriberId, Subscriber>,
    campaigns: BTreeMap<CampaignId, Campaign>,
    tasks: BTreeMap<CampaignId, BTreeMap<SubscriberId, CallTask>>,
    /// API tokens by the hex SHA-256 of the secret. Absent from snapshots of earlier releases.
    #[serde(default)]
    tokens: BTreeMap<String, ApiToken>,
    /// Registered nodes. Absent from snapshots of earlier releases.
    #[serde(default)]
    nodes: BTreeMap<NodeId, NodeInfo>,
    /// Partition leases (absent from snapshots of earlier releases).
    #[serde(default)]
    leases: BTreeMap<u16, Lease>,
    /// Each node's last lease renewal (its heartbeat), on its own clock.
    #[serde(default)]
    heartbeats: BTreeMap<NodeId, u64>,
    /// The log's own clock: the newest time a node stamped on a heartbeat or an attempt record
    /// the log holds (each on its node's clock). It stands still while the log does.
    #[serde(default)]
    log_clock_ms: u64,
    /// Each node's calls in progress at its last heartbeat.
    #[serde(default)]
    channels: BTreeMap<NodeId, u32>,
    /// Counts `HandOverCalls` that moved something.
    #[serde(default)]
    handovers_applied: u64,
    /// Each node's trunk capacity (concurrent channels), from its heartbeat.
    #[serde(default)]
    capacities: BTreeMap<NodeId, u32>,
    /// Tenants by slug; `default` always exists.
    #[serde(default)]
    tenants: Tenants,
    /// Console accounts by username.
    #[serde(default)]
    operators: BTreeMap<String, Operator>,
    /// Who did what, in commit order.
    #[serde(default)]
    audit: Vec<AuditEntry>,
    /// Recordings by SHA-256.
    #[serde(default)]
    audio: BTreeMap<String, AudioBlob>,
    /// Console sessions by the SHA-256 of their secret.
    #[serde(default)]
    sessions: BTreeMap<String, Session>,
    /// (tenant, phone) → subscriber.
    #[serde(skip)]
    phones: BTreeMap<(String, PhoneNumber), SubscriberId>,
    #[serde(skip)]
    due: BTreeSet<DueKey>,
}

/// The tenants map, which always holds `default` (so a fresh cluster and a snapshot of a release
/// before tenants both have it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
struct Tenants(BTreeMap<String, Tenant>);

impl Default for Tenants {
    fn default() -> Self {
        let default = Tenant {
            slug: DEFAULT_TENANT.into(),
            name: "Default".into(),
            created_ms: 0,
            caller_id: None,
            quiet_hours: None,
        };
        Tenants([(default.slug.clone(), default)].into_iter().collect())
    }
}

impl State {
    /// Applies one committed command. Never panics on any command, well-formed or not.
    pub fn apply(&mut self, cmd: &Command) -> Response {
        match cmd {
            Command::CreateSubscriber { at_ms, subscriber } => {
                if !self.tenants.0.contains_key(&subscriber.tenant) {
                    return Response::Refused(Refusal::UnknownTenant(subscriber.tenant.clone()));
                }
                match self.create_subscriber(subscriber, *at_ms) {
                    Imported::Created(id) => Response::SubscriberCreated(id),
                    Imported::Duplicate(existing) => Response::Refused(Refusal::DuplicatePhone(
                        subscriber.phone.masked(),
                        existing,
                    )),
                }
            }
            Command::CreateSubscribers { at_ms, subscribers } => {
                // A batch with an unknown tenant is refused whole, before anything is created.
                if let Some(s) = subscribers
                    .iter()
                    .find(|s| !self.tenants.0.contains_key(&s.tenant))
                {
                    return Response::Refused(Refusal::UnknownTenant(s.tenant.clone()));
                }
                Response::Imported(
                    subscribers
                        .iter()
                        .map(|s| self.create_subscriber(s, *at_ms))
                        .collect(),
                )
            }
            Command::DeleteSubscriber { at_ms, id } => self.erase_subscriber(*id, *at_ms),
            Command::UpdateSubscriber { id, update, .. } => {
                let Some(sub) = self.subscribers.get_mut(id) else {
                    return Response::Refused(Refusal::UnknownSubscriber(*id));
                };
                sub.name = update.name.clone();
                sub.language = update.language.clone();
                sub.zone = update.zone.clone();
                Response::Ok
            }
            Command::RequestVerification {
                id, verification, ..
            } => {
                let Some(sub) = self.subscribers.get_mut(id) else {
                    return Response::Refused(Refusal::UnknownSubscriber(*id));
                };
                sub.verification = Some(verification.clone());
                Response::Ok
            }
            Command::ConfirmVerification {
                at_ms,
                id,
                code_sha256,
            } => {
                let Some(sub) = self.subscribers.get_mut(id) else {
                    return Response::Refused(Refusal::UnknownSubscriber(*id));
                };
                let Some(v) = sub.verification.as_mut().filter(|v| v.expires_ms > *at_ms) else {
                    sub.verification = None;
                    return Response::Refused(Refusal::NoVerification(*id));
                };
                if v.code_sha256 != *code_sha256 {
                    v.tries_left = v.tries_left.saturating_sub(1);
                    let tries_left = v.tries_left;
                    if tries_left == 0 {
                        sub.verification = None;
                    }
                    return Response::Refused(Refusal::WrongCode { tries_left });
                }
                let purpose = v.purpose;
                sub.verification = None;
                match purpose {
                    VerificationPurpose::Register => {
                        sub.verified = true;
                        Response::Ok
                    }
                    VerificationPurpose::Unsubscribe => self.erase_subscriber(*id, *at_ms),
                }
            }
            Command::CreateCampaign {
                at_ms,
                spec,
                created_by,
            } => {
                if let Some(refusal) = self.campaign_refusal(spec) {
                    return Response::Refused(refusal);
                }
                let city_wide = spec.audience == Audience::All;
                let approval = if created_by.is_some()
                    && (city_wide || spec.priority == Priority::Emergency)
                {
                    Approval::Pending
                } else {
                    Approval::NotNeeded
                };
                self.next_campaign += 1;
                let id = CampaignId(self.next_campaign);
                self.campaigns.insert(
                    id,
                    Campaign {
                        id,
                        spec: spec.clone(),
                        state: CampaignState::Draft,
                        created_ms: *at_ms,
                        started_ms: None,
                        finished_ms: None,
                        counts: Counts::default(),
                        created_by: created_by.clone(),
                        approval,
                        by_node: Default::default(),
                    },
                );
                Response::CampaignCreated(id)
            }
            Command::StartCampaign { at_ms, id } => self.start_campaign(*id, *at_ms),
            Command::CancelCampaign { at_ms, id } => self.cancel_campaign(*id, *at_ms),
            Command::PauseCampaign { id, .. } => self.pause_campaign(*id, true),
            Command::ResumeCampaign { at_ms, id } => {
                let r = self.pause_campaign(*id, false);
                self.complete_if_done(*id, *at_ms);
                r
            }
            Command::RecordAttempts {
                at_ms,
                node,
                events,
            } => {
                self.log_clock_ms = self.log_clock_ms.max(*at_ms);
                let applied = events
                    .iter()
                    .filter(|e| self.record(*node, e, *at_ms))
                    .count();
                Response::Recorded {
                    applied: applied as u32,
                }
            }
            Command::AddToken { token } => {
                if let Some(scope) = &token.scope {
                    if let Some(t) = scope
                        .tenants
                        .iter()
                        .find(|t| !self.tenants.0.contains_key(*t))
                    {
                        return Response::Refused(Refusal::UnknownTenant(t.clone()));
                    }
                }
                self.tokens
                    .entry(token.sha256.clone())
                    .or_insert_with(|| token.clone());
                Response::Ok
            }
            Command::CloseExpired { at_ms } => {
                let expired = self.expired_campaigns(*at_ms);
                let mut closed = 0;
                for id in expired {
                    let waiting: Vec<SubscriberId> = self
                        .tasks
                        .get(&id)
                        .map(|t| {
                            t.values()
                                .filter(|t| t.state == TaskState::Pending)
                                .map(|t| t.subscriber)
                                .collect()
                        })
                        .unwrap_or_default();
                    for sid in waiting {
                        self.finish_task_if_open(id, sid, FinalState::Exhausted, *at_ms);
                        closed += 1;
                    }
                }
                Response::Recorded { applied: closed }
            }
            Command::SetCallerId {
                tenant, caller_id, ..
            } => {
                if let Some(problem) = caller_id.as_ref().and_then(|c| c.problem()) {
                    return Response::Refused(Refusal::InvalidCallerId(problem.into()));
                }
                match self.tenants.0.get_mut(tenant) {
                    Some(t) => {
                        t.caller_id = caller_id.clone();
                        Response::Ok
                    }
                    None => Response::Refused(Refusal::UnknownTenant(tenant.clone())),
                }
            }
            Command::SetQuietHours {
                tenant,
                quiet_hours,
                ..
            } => {
                if let Some(problem) = quiet_hours.as_ref().and_then(|q| q.problem()) {
                    return Response::Refused(Refusal::InvalidQuietHours(problem.into()));
                }
                match self.tenants.0.get_mut(tenant) {
                    Some(t) => {
                        t.quiet_hours = *quiet_hours;
                        Response::Ok
                    }
                    None => Response::Refused(Refusal::UnknownTenant(tenant.clone())),
                }
            }
            Command::RevokeToken { sha256, .. } => match self.tokens.remove(sha256) {
                Some(_) => Response::Ok,
                None => Response::Refused(Refusal::UnknownToken),
            },
            Command::RegisterNode { at_ms, node } => {
                let registered_ms = self
                    .nodes
                    .get(&node.id)
                    .map(|n| n.registered_ms)
                    .unwrap_or(*at_ms);
                self.nodes.insert(
                    node.id,
                    NodeInfo {
                        registered_ms,
                        started_ms: *at_ms,
                        ..node.clone()
                    },
                );
                Response::Ok
            }
            Command::ReclaimTasks { at_ms, from } => Response::Recorded {
                applied: self.reclaim(*from, *at_ms),
            },
            Command::HandOverCalls { at_ms, from, moves } => Response::Recorded {
                applied: self.hand_over(*from, moves, *at_ms),
            },
            Command::RenewLeases {
                at_ms,
                node,
                lease_ms,
                channels_in_use,
                capacity,
            } => {
                // A node's renewals are not serialised (one goes out every `renew_every` whether the
                // last was committed or not), so an older one may be applied after a newer one: it
                // must not move the heartbeat or a lease back.
                let beat = self.heartbeats.entry(*node).or_insert(*at_ms);
                *beat = (*beat).max(*at_ms);
                self.log_clock_ms = self.log_clock_ms.max(*at_ms);
                if let Some(n) = channels_in_use {
                    self.channels.insert(*node, *n);
                }
                if let Some(c) = capacity {
                    self.capacities.insert(*node, *c);
                }
                let mut renewed = 0;
                // Only a live lease is renewed: an expired or released one must be granted anew
                // (with a new epoch) by the leader.
                for lease in self
                    .leases
                    .values_mut()
                    .filter(|l| l.node == *node && l.expires_ms > *at_ms)
                {
                    lease.expires_ms = lease.expires_ms.max(at_ms.saturating_add(*lease_ms));
                    renewed += 1;
                }
                Response::Recorded { applied: renewed }
            }
            Command::AssignLeases {
                at_ms,
                lease_ms,
                grants,
            } => {
                let mut applied = 0;
                for (partition, node) in grants {
                    if *partition >= PARTITIONS {
                        continue;
                    }
                    let previous = self.leases.get(partition).copied();
                    if previous.is_some_and(|l| l.expires_ms > *at_ms) {
                        continue; // still held: only an expired or released lease moves
                    }
                    self.leases.insert(
                        *partition,
                        Lease {
                            node: *node,
                            epoch: previous.map(|l| l.epoch + 1).unwrap_or(1),
                            expires_ms: at_ms.saturating_add(*lease_ms),
                        },
                    );
                    if let Some(prev) = previous.filter(|l| l.node != *node) {
                        self.reclaim_where(prev.node, *at_ms, |s| partition_of(s) == *partition);
                    }
                    applied += 1;
                }
                Response::Recorded { applied }
            }
            Command::ReleaseLeases {
                node, partitions, ..
            } => {
                let mut applied = 0;
                for p in partitions {
                    if let Some(l) = self.leases.get_mut(p).filter(|l| l.node == *node) {
                        l.expires_ms = 0;
                        applied += 1;
                    }
                }
                Response::Recorded { applied }
            }
            Command::ForgetNode { at_ms, node } => {
                self.nodes.remove(node);
                self.heartbeats.remove(node);
                self.channels.remove(node);
                for l in self.leases.values_mut().filter(|l| l.node == *node) {
                    l.expires_ms = 0;
                }
                Response::Recorded {
                    applied: self.reclaim(*node, *at_ms),
                }
            }
            Command::CreateTenant { at_ms, slug, name } => {
                if !Tenant::valid_slug(slug) {
                    return Response::Refused(Refusal::InvalidTenant(slug.clone()));
                }
                if self.tenants.0.contains_key(slug) {
                    return Response::Refused(Refusal::DuplicateTenant(slug.clone()));
                }
                let tenant = Tenant {
                    slug: slug.clone(),
                    name: name.clone(),
                    created_ms: *at_ms,
                    caller_id: None,
                    quiet_hours: None,
                };
                self.tenants.0.insert(slug.clone(), tenant);
                Response::Ok
            }
            Command::CreateOperator { at_ms, operator } => {
                if self.operators.contains_key(&operator.username) {
                    return Response::Refused(Refusal::DuplicateOperator(
                        operator.username.clone(),
                    ));
                }
                if let Some(refusal) = self.operator_refusal(operator) {
                    return Response::Refused(refusal);
                }
                self.operators.insert(
                    operator.username.clone(),
                    Operator {
                        created_ms: *at_ms,
                        updated_ms: *at_ms,
                        ..operator.clone()
                    },
                );
                Response::Ok
            }
            Command::UpdateOperator { at_ms, update } => self.update_operator(update, *at_ms),
            Command::PutAudio { at_ms, tenant, wav } => {
                if !self.tenants.0.contains_key(tenant) {
                    return Response::Refused(Refusal::UnknownTenant(tenant.clone()));
                }
                if wav.len() > MAX_AUDIO_BYTES {
                    return Response::Refused(Refusal::AudioTooLarge {
                        bytes: wav.len(),
                        limit: MAX_AUDIO_BYTES,
                    });
                }
                let sha256 = hex_sha256(wav);
                self.audio
                    .entry(sha256.clone())
                    .or_insert_with(|| AudioBlob {
                        sha256: sha256.clone(),
                        tenant: tenant.clone(),
                        created_ms: *at_ms,
                        wav: wav.clone(),
                    });
                Response::AudioStored(sha256)
            }
            Command::ApproveCampaign { at_ms, id, by } => {
                let Some(c) = self.campaigns.get_mut(id) else {
                    return Response::Refused(Refusal::UnknownCampaign(*id));
                };
                if c.approval != Approval::Pending {
                    return Response::Refused(Refusal::ApprovalNotNeeded(*id));
                }
                if c.created_by.as_deref() == Some(by.as_str()) {
                    return Response::Refused(Refusal::SelfApproval(by.clone(), *id));
                }
                c.approval = Approval::Approved {
                    by: by.clone(),
                    at_ms: *at_ms,
                };
                Response::Ok
            }
            Command::OverrideApproval {
                at_ms,
                id,
                by,
                reason,
            } => {
                let Some(c) = self.campaigns.get_mut(id) else {
                    return Response::Refused(Refusal::UnknownCampaign(*id));
                };
                if c.approval != Approval::Pending {
                    return Response::Refused(Refusal::ApprovalNotNeeded(*id));
                }
                if c.spec.priority != Priority::Emergency {
                    return Response::Refused(Refusal::OverrideNotEmergency(*id));
                }
                if reason.trim().chars().count() < 10 {
                    return Response::Refused(Refusal::OverrideWithoutReason);
                }
                c.approval = Approval::Overridden {
                    by: by.clone(),
                    reason: reason.trim().to_string(),
                    at_ms: *at_ms,
                };
                Response::Ok
            }
            Command::CreateSession { at_ms, session } => {
                match self.operators.get(&session.username) {
                    None => {
                        return Response::Refused(Refusal::UnknownOperator(
                            session.username.clone(),
                        ))
                    }
                    Some(op) if op.disabled => {
                        return Response::Refused(Refusal::DisabledOperator(
                            session.username.clone(),
                        ))
                    }
                    Some(_) => {}
                }
                self.sessions.retain(|_, s| s.expires_ms > *at_ms);
                let mut own: Vec<(u64, String)> = self
                    .sessions
                    .values()
                    .filter(|s| s.username == session.username)
                    .map(|s| (s.created_ms, s.token_sha256.clone()))
                    .collect();
                own.sort();
                while own.len() >= MAX_SESSIONS_PER_OPERATOR {
                    let (_, oldest) = own.remove(0);
                    self.sessions.remove(&oldest);
                }
                self.sessions
                    .insert(session.token_sha256.clone(), session.clone());
                Response::Ok
            }
            Command::EndSession { token_sha256, .. } => {
                self.sessions.remove(token_sha256);
                Response::Ok
            }
            Command::Audited {
                at_ms,
                actor,
                tenant,
                command,
            } => {
                if matches!(**command, Command::Audited { .. }) {
                    return Response::Refused(Refusal::NestedAudit);
                }
                let tenant = tenant.clone().or_else(|| self.command_tenant(command));
                let response = self.apply(command);
                let result = match &response {
                    Response::Refused(r) => format!("refused: {r}"),
                    _ => "ok".into(),
                };
                self.audit.push(AuditEntry {
                    seq: self.audit.len() as u64 + 1,
                    at_ms: *at_ms,
                    actor: actor.clone(),
                    tenant,
                    action: command.kind().to_string(),
                    target: audit_target(command, &response),
                    result,
                });
                response
            }
        }
    }

    /// The tenant a command acts on, for the audit log (read before the command is applied).
    fn command_tenant(&self, cmd: &Command) -> Option<String> {
        let of_campaign = |id: &CampaignId| self.campaigns.get(id).map(|c| c.spec.tenant.clone());
        match cmd {
            Command::CreateSubscriber { subscriber, .. } => Some(subscriber.tenant.clone()),
            Command::CreateSubscribers { subscribers, .. } => {
                subscribers.first().map(|s| s.tenant.clone())
            }
            Command::DeleteSubscriber { id, .. }
            | Command::UpdateSubscriber { id, .. }
            | Command::RequestVerification { id, .. }
            | Command::ConfirmVerification { id, .. } => {
                self.subscribers.get(id).map(|s| s.tenant.clone())
            }
            Command::CreateCampaign { spec, .. } => Some(spec.tenant.clone()),
            Command::StartCampaign { id, .. }
            | Command::CancelCampaign { id, .. }
            | Command::PauseCampaign { id, .. }
            | Command::ResumeCampaign { id, .. }
            | Command::ApproveCampaign { id, .. }
            | Command::OverrideApproval { id, .. } => of_campaign(id),
            Command::CreateTenant { slug, .. } => Some(slug.clone()),
            Command::SetCallerId { tenant, .. } => Some(tenant.clone()),
            Command::SetQuietHours { tenant, .. } => Some(tenant.clone()),
            Command::PutAudio { tenant, .. } => Some(tenant.clone()),
            Command::CreateOperator { operator, .. } => operator.tenants.first().cloned(),
            _ => None,
        }
    }

    /// Removes a subscriber (an erasure request): open tasks for this person end as cancelled;
    /// nobody dials a deleted number.
    fn erase_subscriber(&mut self, id: SubscriberId, at_ms: u64) -> Response {
        let Some(sub) = self.subscribers.remove(&id) else {
            return Response::Refused(Refusal::UnknownSubscriber(id));
        };
        self.phones.remove(&(sub.tenant.clone(), sub.phone.clone()));
        let campaign_ids: Vec<CampaignId> = self.tasks.keys().copied().collect();
        for cid in campaign_ids {
            self.finish_task_if_open(cid, id, FinalState::Cancelled, at_ms);
        }
        Response::Ok
    }

    /// Why a campaign cannot be created: its tenant or its recording does not exist.
    fn campaign_refusal(&self, spec: &CampaignSpec) -> Option<Refusal> {
        if !self.tenants.0.contains_key(&spec.tenant) {
            return Some(Refusal::UnknownTenant(spec.tenant.clone()));
        }
        match &spec.message {
            Message::Recording { sha256 } if self.audio(&spec.tenant, sha256).is_none() => {
                Some(Refusal::UnknownAudio(sha256.clone()))
            }
            _ => None,
        }
    }

    /// Why an operator record is not acceptable (checked on create and after an update).
    fn operator_refusal(&self, op: &Operator) -> Option<Refusal> {
        let invalid = |reason: &str| {
            Some(Refusal::InvalidOperator {
                username: op.username.clone(),
                reason: reason.into(),
            })
        };
        if !Operator::valid_username(&op.username) {
            return invalid("a username has 1 to 64 letters, digits, `.`, `_`, `-` or `@`");
        }
        if !op.password_hash.starts_with("$argon2id$") {
            return invalid("the password must arrive as an argon2id hash");
        }
        if op.tenants.is_empty() {
            return invalid("an operator works for at least one tenant");
        }
        if op.tenants.len() > 1 && op.role != crate::domain::Role::Regional {
            return invalid("only a regional operator works for several tenants");
        }
        if let Some(t) = op.tenants.iter().find(|t| !self.tenants.0.contains_key(*t)) {
            return Some(Refusal::UnknownTenant(t.clone()));
        }
        None
    }

    fn update_operator(&mut self, update: &OperatorUpdate, at_ms: u64) -> Response {
        let Some(current) = self.operators.get(&update.username) else {
            return Response::Refused(Refusal::UnknownOperator(update.username.clone()));
        };
        let mut next = current.clone();
        if let Some(role) = update.role {
            next.role = role;
        }
        if let Some(tenants) = &update.tenants {
            next.tenants = tenants.clone();
        }
        if let Some(hash) = &update.password_hash {
            next.password_hash = hash.clone();
        }
        match &update.totp {
            Some(TotpChange::Enable(secret)) => next.totp_secret = Some(secret.clone()),
            Some(TotpChange::Disable) => next.totp_secret = None,
            None => {}
        }
        if let Some(disabled) = update.disabled {
            next.disabled = disabled;
        }
        next.updated_ms = at_ms;
        if let Some(refusal) = self.operator_refusal(&next) {
            return Response::Refused(refusal);
        }
        // A new password or a disabled account ends every session the operator had.
        if update.password_hash.is_some() || next.disabled {
            self.sessions.retain(|_, s| s.username != next.username);
        }
        self.operators.insert(next.username.clone(), next);
        Response::Ok
    }

    /// Gives back every attempt `node` has in flight, as interrupted and due at once: the node is gone
    /// (or no longer dials) and another one must call these citizens. Late records from `node` about
    /// these attempts are then refused, because the task no longer names it.
    fn reclaim(&mut self, node: NodeId, at_ms: u64) -> u32 {
        self.reclaim_where(node, at_ms, |_| true)
    }

    /// Moves answered calls of `from` (a node that stopped renewing) to the nodes the leader chose:
    /// each task stays in flight under the same attempt, now on its new node, which continues the
    /// call with a re-INVITE. Records of `from` about these calls are refused from now on. Only a
    /// call in flight on `from` with a handover record moves, so a repeated command changes nothing.
    fn hand_over(
        &mut self,
        from: NodeId,
        moves: &[(CampaignId, SubscriberId, NodeId)],
        at_ms: u64,
    ) -> u32 {
        let mut moved = 0;
        for (campaign, subscriber, to) in moves {
            if *to == from {
                continue;
            }
            let live = self
                .campaigns
                .get(campaign)
                .is_some_and(|c| matches!(c.state, CampaignState::Running | CampaignState::Paused));
            let Some(task) = self
                .tasks
                .get_mut(campaign)
                .and_then(|t| t.get_mut(subscriber))
            else {
                continue;
            };
            match task.state {
                TaskState::InFlight {
                    attempt,
                    node,
                    epoch,
                    ..
                } if live && node == from && task.handover.is_some() => {
                    // The attempt and its epoch go on: only the node carrying it changes.
                    if let Some(h) = task.handover.as_mut() {
                        if !h.moved_from.contains(&from) {
                            h.moved_from.push(from);
                        }
                    }
                    task.state = TaskState::InFlight {
                        attempt,
                        node: *to,
                        since_ms: at_ms,
                        epoch,
                    };
                    task.updated_ms = at_ms;
                    moved += 1;
                }
                _ => {}
            }
        }
        if moved > 0 {
            self.handovers_applied += 1;
        }
        moved
    }

    /// How many `HandOverCalls` have moved calls so far: a node compares it with the value it saw
    /// last to know when to look for calls it must continue or let go.
    pub fn handovers_applied(&self) -> u64 {
        self.handovers_applied
    }

    /// Answered calls in flight on `node`, in campaigns still running or paused.
    pub fn answered_calls_on(&self, node: NodeId) -> Vec<&CallTask> {
        self.tasks
            .iter()
            .filter(|(id, _)| {
                self.campaigns.get(id).is_some_and(|c| {
                    matches!(c.state, CampaignState::Running | CampaignState::Paused)
                })
            })
            .flat_map(|(_, t)| t.values())
            .filter(|t| {
                t.handover.is_some()
                    && matches!(t.state, TaskState::InFlight { node: n, .. } if n == node)
            })
            .collect()
    }

    /// `reclaim`, for the subscribers `which` selects.
    fn reclaim_where(
        &mut self,
        node: NodeId,
        at_ms: u64,
        which: impl Fn(SubscriberId) -> bool,
    ) -> u32 {
        let stale: Vec<AttemptEvent> = self
            .in_flight_on(node)
            .into_iter()
            .filter(|t| which(t.subscriber))
            .filter_map(|t| match t.state {
                TaskState::InFlight { attempt, epoch, .. } => Some(AttemptEvent::Finished {
                    campaign: t.campaign,
                    subscriber: t.subscriber,
                    attempt,
                    outcome: Outcome::Interrupted,
                    next: Next::RetryAt(at_ms),
                    epoch,
                }),
                _ => None,
            })
            .collect();
        stale.iter().filter(|e| self.record(node, e, at_ms)).count() as u32
    }

    fn create_subscriber(&mut self, subscriber: &NewSubscriber, at_ms: u64) -> Imported {
        let key = (subscriber.tenant.clone(), subscriber.phone.clone());
        if let Some(existing) = self.phones.get(&key) {
            return Imported::Duplicate(*existing);
        }
        self.next_subscriber += 1;
        let id = SubscriberId(self.next_subscriber);
        self.phones.insert(key, id);
        self.subscribers.insert(
            id,
            Subscriber {
                id,
                phone: subscriber.phone.clone(),
                name: subscriber.name.clone(),
                language: subscriber.language.clone(),
                zone: subscriber.zone.clone(),
                verified: subscriber.verified,
                opted_out: false,
                created_ms: at_ms,
                tenant: subscriber.tenant.clone(),
                consent: subscriber.consent.clone(),
                verification: None,
            },
        );
        Imported::Created(id)
    }

    fn start_campaign(&mut self, id: CampaignId, at_ms: u64) -> Response {
        let Some(campaign) = self.campaigns.get_mut(&id) else {
            return Response::Refused(Refusal::UnknownCampaign(id));
        };
        if campaign.state != CampaignState::Draft {
            return Response::Refused(wrong_state(campaign, "draft", "started"));
        }
        if !campaign.approval.allows_start() {
            return Response::Refused(Refusal::ApprovalRequired(id));
        }
        let rank = campaign.spec.priority.rank();
        // A scheduled campaign starts now, and its first calls fall due at the scheduled time.
        let first_due = campaign.spec.not_before_ms.map_or(at_ms, |t| t.max(at_ms));
        let mut tasks = BTreeMap::new();
        let mut counts = Counts::default();
        for sub in self.subscribers.values() {
            if sub.tenant != campaign.spec.tenant
                || !sub.verified
                || sub.opted_out
                || !campaign.spec.audience.includes(sub)
            {
                continue;
            }
            let task = CallTask {
                campaign: id,
                subscriber: sub.id,
                phone: sub.phone.clone(),
                language: sub.language.clone(),
                attempts: 0,
                state: TaskState::Pending,
                next_due_ms: first_due,
                last_outcome: None,
                updated_ms: at_ms,
                handover: None,
            };
            self.due.insert(due_key(rank, &task, id));
            tasks.insert(sub.id, task);
            counts.targeted += 1;
            counts.pending += 1;
        }
        campaign.counts = counts;
        campaign.state = CampaignState::Running;
        campaign.started_ms = Some(at_ms);
        self.tasks.insert(id, tasks);
        self.complete_if_done(id, at_ms);
        Response::Ok
    }

    /// Pauses (`pause`) a running campaign or resumes a paused one: its pending tasks leave the due
    /// queue, or come back to it. Calls in flight end on their own and are recorded.
    fn pause_campaign(&mut self, id: CampaignId, pause: bool) -> Response {
        let Some(campaign) = self.campaigns.get_mut(&id) else {
            return Response::Refused(Refusal::UnknownCampaign(id));
        };
        let (from, to, verb) = if pause {
            (CampaignState::Running, CampaignState::Paused, "paused")
        } else {
            (CampaignState::Paused, CampaignState::Running, "resumed")
        };
        if campaign.state != from {
            return Response::Refused(wrong_state(campaign, from.as_str(), verb));
        }
        campaign.state = to;
        let rank = campaign.spec.priority.rank();
        for t in self.tasks.get(&id).into_iter().flat_map(|t| t.values()) {
            if t.state == TaskState::Pending {
                let key = due_key(rank, t, id);
                if pause {
                    self.due.remove(&key);
                } else {
                    self.due.insert(key);
                }
            }
        }
        Response::Ok
    }

    fn cancel_campaign(&mut self, id: CampaignId, at_ms: u64) -> Response {
        let Some(campaign) = self.campaigns.get(&id) else {
            return Response::Refused(Refusal::UnknownCampaign(id));
        };
        match campaign.state {
            CampaignState::Draft | CampaignState::Running | CampaignState::Paused => {}
            _ => {
                return Response::Refused(wrong_state(
                    campaign,
                    "draft, running or paused",
                    "cancelled",
                ))
            }
        }
        let open: Vec<SubscriberId> = self
            .tasks
            .get(&id)
            .map(|t| {
                t.values()
                    .filter(|t| !matches!(t.state, TaskState::Final(_)))
                    .map(|t| t.subscriber)
                    .collect()
            })
            .unwrap_or_default();
        for sid in open {
            self.finish_task_if_open(id, sid, FinalState::Cancelled, at_ms);
        }
        if let Some(c) = self.campaigns.get_mut(&id) {
            c.state = CampaignState::Cancelled;
            c.finished_ms = Some(at_ms);
        }
        Response::Ok
    }

    /// Applies one dialer record; returns whether it changed anything (duplicates and stale records don't).
    fn record(&mut self, node: NodeId, event: &AttemptEvent, at_ms: u64) -> bool {
        let (campaign, subscriber) = match event {
            AttemptEvent::Started {
                campaign,
                subscriber,
                ..
            }
            | AttemptEvent::Finished {
                campaign,
                subscriber,
                ..
            }
            | AttemptEvent::Answered {
                campaign,
                subscriber,
                ..
            } => (*campaign, *subscriber),
        };
        let Some(c) = self.campaigns.get_mut(&campaign) else {
            return false;
        };
        // A paused campaign starts nothing, but the calls it had up may still end.
        let paused = c.state == CampaignState::Paused;
        let starting = matches!(event, AttemptEvent::Started { .. });
        if !(c.state == CampaignState::Running || paused && !starting) {
            return false;
        }
        let rank = c.spec.priority.rank();
        let Some(task) = self
            .tasks
            .get_mut(&campaign)
            .and_then(|t| t.get_mut(&subscriber))
        else {
            return false;
        };
        let before = task.state;
        match event {
            AttemptEvent::Answered { attempt, call, .. } => {
                // Only the node on the call, for the attempt it is on, describes it.
                return match before {
                    TaskState::InFlight {
                        attempt: current,
                        node: owner,
                        ..
                    } if current == *attempt && owner == node => {
                        let mut call = call.as_ref().clone();
                        call.moved_from = task
                            .handover
                            .take()
                            .map(|h| h.moved_from)
                            .unwrap_or_default();
                        task.handover = Some(call);
                        true
                    }
                    _ => false,
                };
            }
            AttemptEvent::Started { attempt, epoch, .. } => {
                if before != TaskState::Pending || *attempt != task.attempts + 1 {
                    return false;
                }
                // Fencing: once its partition has a lease, only the holder, under the current
                // epoch and before expiry, may start a call.
                match (self.leases.get(&partition_of(subscriber)), epoch) {
                    (Some(l), Some(e))
                        if l.node == node && l.epoch == *e && l.expires_ms > at_ms => {}
                    (None, None) => {}
                    _ => return false,
                }
                self.due.remove(&due_key(rank, task, campaign));
                task.attempts = *attempt;
                task.state = TaskState::InFlight {
                    attempt: *attempt,
                    node,
                    since_ms: at_ms,
                    epoch: *epoch,
                };
            }
            AttemptEvent::Finished {
                attempt,
                outcome,
                next,
                epoch,
                ..
            } => {
                let citizens_answer = matches!(outcome, Outcome::Confirmed | Outcome::OptOut);
                let on_the_call = match before {
                    // Fencing: an outcome carries the epoch its attempt started under, so an
                    // attempt given back and started again under another epoch is another call.
                    TaskState::InFlight {
                        attempt: current,
                        node: owner,
                        epoch: started_under,
                        ..
                    } if current == *attempt
                        && !(epoch.is_some()
                            && started_under.is_some()
                            && *epoch != started_under) =>
                    {
                        // A call moved to another node (`HandOverCalls`) is ended by its new
                        // owner only, except for the citizen's own answer: a 1 (or a 9) heard by a
                        // node that carried this attempt before the move, whose record could not
                        // reach the log in time (the node was cut off, or the quorum was lost),
                        // still stands. Any other outcome from a former owner is stale.
                        let carried_it = owner == node
                            || citizens_answer
                                && task
                                    .handover
                                    .as_ref()
                                    .is_some_and(|h| h.moved_from.contains(&node));
                        if !carried_it {
                            return false;
                        }
                        true
                    }
                    _ => false,
                };
                if !on_the_call {
                    // The attempt has ended (or the task is on another one). The citizen's own 1
                    // (or 9) still stands: the node that heard it may have been cut off from the
                    // log, or lost its quorum, while another node continued the call or called
                    // the citizen again and ended that attempt first. Refused, the citizen who
                    // confirmed would be called again and might end `exhausted`. A node records
                    // an outcome only for a call the log let it place or moved to it, so the
                    // record is a real call's.
                    if !citizens_answer || !Self::late_answer_stands(task, *attempt) {
                        return false;
                    }
                    if before == TaskState::Pending {
                        self.due.remove(&due_key(rank, task, campaign));
                    }
                    task.handover = None;
                    // The attempt was counted when it ended; only the confirmation is new. A call
                    // still up for a later attempt plays on, and its end is stale.
                    if *outcome == Outcome::Confirmed {
                        c.by_node.entry(node).or_default().confirmed += 1;
                    }
                    task.last_outcome = Some(outcome.clone());
                    task.state = TaskState::Final(match outcome {
                        Outcome::OptOut => FinalState::OptedOut,
                        _ => FinalState::Confirmed,
                    });
                } else {
                    task.handover = None;
                    let counts = &mut c.counts;
                    if !outcome.is_subscribers_attempt() {
                        // Not the subscriber's attempt: give it back.
                        task.attempts = task.attempts.saturating_sub(1);
                    } else {
                        let mine = c.by_node.entry(node).or_default();
                        counts.attempts += 1;
                        mine.attempts += 1;
                        if outcome.answered() {
                            counts.answered += 1;
                            mine.answered += 1;
                        }
                        if *next == Next::Final(FinalState::Confirmed) {
                            mine.confirmed += 1;
                        }
                    }
                    task.last_outcome = Some(outcome.clone());
                    // Past the deadline nobody is called again.
                    let next = match next {
                        Next::RetryAt(_) if c.spec.past_deadline(at_ms) => {
                            &Next::Final(FinalState::Exhausted)
                        }
                        other => other,
                    };
                    match next {
                        Next::RetryAt(due) => {
                            task.state = TaskState::Pending;
                            task.next_due_ms = *due;
                            if !paused {
                                self.due.insert(due_key(rank, task, campaign));
                            }
                        }
                        Next::Final(f) => task.state = TaskState::Final(*f),
                    }
                }
                if *outcome == Outcome::OptOut {
                    if let Some(s) = self.subscribers.get_mut(&subscriber) {
                        s.opted_out = true;
                    }
                }
            }
        }
        task.updated_ms = at_ms;
        let after = task.state;
        c.counts.leave(&before);
        c.counts.enter(&after);
        self.complete_if_done(campaign, at_ms);
        true
    }

    /// Whether a citizen's 1 or 9 recorded for `attempt` after that attempt ended (or moved on
    /// without the recording node) still decides `task`: an attempt this task has had, and a task
    /// not ended by an answer, an invalid number or a cancellation. It overrides `exhausted`.
    fn late_answer_stands(task: &CallTask, attempt: u32) -> bool {
        let ended_otherwise = matches!(
            task.state,
            TaskState::Final(
                FinalState::Confirmed
                    | FinalState::OptedOut
                    | FinalState::Invalid
                    | FinalState::Cancelled
            )
        );
        // Attempts given back (interrupted) lower the count, so the attempt may be one above it.
        attempt >= 1 && attempt <= task.attempts.saturating_add(1) && !ended_otherwise
    }

    fn finish_task_if_open(
        &mut self,
        campaign: CampaignId,
        subscriber: SubscriberId,
        to: FinalState,
        at_ms: u64,
    ) {
        let Some(c) = self.campaigns.get_mut(&campaign) else {
            return;
        };
        let Some(task) = self
            .tasks
            .get_mut(&campaign)
            .and_then(|t| t.get_mut(&subscriber))
        else {
            return;
        };
        if matches!(task.state, TaskState::Final(_)) {
            return;
        }
        if task.state == TaskState::Pending {
            self.due
                .remove(&due_key(c.spec.priority.rank(), task, campaign));
        }
        c.counts.leave(&task.state);
        task.state = TaskState::Final(to);
        task.updated_ms = at_ms;
        c.counts.enter(&task.state);
        self.complete_if_done(campaign, at_ms);
    }

    /// Running or paused campaigns whose deadline has come and that still have citizens waiting.
    pub fn expired_campaigns(&self, now_ms: u64) -> Vec<CampaignId> {
        self.campaigns
            .values()
            .filter(|c| {
                matches!(c.state, CampaignState::Running | CampaignState::Paused)
                    && c.spec.past_deadline(now_ms)
                    && c.counts.pending > 0
            })
            .map(|c| c.id)
            .collect()
    }

    fn complete_if_done(&mut self, id: CampaignId, at_ms: u64) {
        if let Some(c) = self.campaigns.get_mut(&id) {
            if c.state == CampaignState::Running && c.counts.open() == 0 {
                c.state = CampaignState::Completed;
                c.finished_ms = Some(at_ms);
            }
        }
    }

    /// Rebuilds the indexes that serde skips; call after deserialising a snapshot.
    pub fn rebuild_indexes(&mut self) {
        self.phones = self
            .subscribers
            .values()
            .map(|s| ((s.tenant.clone(), s.phone.clone()), s.id))
            .collect();
        self.due.clear();
        for (cid, tasks) in &self.tasks {
            let Some(c) = self.campaigns.get(cid) else {
                continue;
            };
            if c.state != CampaignState::Running {
                continue;
            }
            let rank = c.spec.priority.rank();
            for t in tasks.values() {
                if t.state == TaskState::Pending {
                    self.due.insert(due_key(rank, t, *cid));
                }
            }
        }
    }

    // ---- reads ----

    /// The lease of `partition`, if it was ever granted.
    pub fn lease(&self, partition: u16) -> Option<&Lease> {
        self.leases.get(&partition)
    }

    /// Every granted lease by partition.
    pub fn leases(&self) -> impl Iterator<Item = (u16, &Lease)> {
        self.leases.iter().map(|(p, l)| (*p, l))
    }

    /// Each node's trunk capacity as its last heartbeat said (nodes of older releases say nothing).
    pub fn capacities(&self) -> impl Iterator<Item = (NodeId, u32)> + '_ {
        self.capacities.iter().map(|(n, c)| (*n, *c))
    }

    /// Whether `node` is stopping: its last heartbeat said a capacity of 0 (a node's configured
    /// channels are at least 1). Such a node is given no partitions and no calls.
    pub fn is_leaving(&self, node: NodeId) -> bool {
        self.capacities.get(&node) == Some(&0)
    }

    /// Each node's calls in progress at its last heartbeat.
    pub fn channels_in_use(&self) -> impl Iterator<Item = (NodeId, u32)> + '_ {
        self.channels.iter().map(|(n, c)| (*n, *c))
    }

    /// Each node's last heartbeat (lease renewal), on its own clock.
    pub fn heartbeats(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.heartbeats.iter().map(|(n, t)| (*n, *t))
    }

    /// The newest time a node stamped on a heartbeat or an attempt record the log holds.
    pub fn log_clock_ms(&self) -> u64 {
        self.log_clock_ms
    }

    /// `due_tasks` restricted to the subscribers `mine` accepts (a node's leased partitions).
    pub fn due_tasks_where(
        &self,
        now_ms: u64,
        limit: usize,
        mine: impl Fn(SubscriberId) -> bool,
    ) -> Vec<&CallTask> {
        self.due_tasks_filtered(now_ms, limit, |_, sid| mine(sid))
    }

    /// `due_tasks` restricted to the (campaign, subscriber) pairs `keep` accepts; the others do not
    /// count toward `limit` (a node's leased partitions, campaigns outside quiet hours).
    pub fn due_tasks_filtered(
        &self,
        now_ms: u64,
        limit: usize,
        keep: impl Fn(CampaignId, SubscriberId) -> bool,
    ) -> Vec<&CallTask> {
        self.due_tasks_up_to(Priority::Info, now_ms, limit, keep)
    }

    /// `due_tasks_filtered` for campaigns of priority `lowest` or higher only (the others are not
    /// even looked at: an emergency's due tasks are found without walking a city's info tasks).
    pub fn due_tasks_up_to(
        &self,
        lowest: Priority,
        now_ms: u64,
        limit: usize,
        keep: impl Fn(CampaignId, SubscriberId) -> bool,
    ) -> Vec<&CallTask> {
        let mut out = Vec::new();
        for rank in 0..=lowest.rank() {
            for class in 0..ATTEMPT_CLASSES as u8 {
                let range = (rank, class, 0, CampaignId(0), SubscriberId(0))
                    ..=(
                        rank,
                        class,
                        now_ms,
                        CampaignId(u64::MAX),
                        SubscriberId(u64::MAX),
                    );
                for (_, _, _, cid, sid) in self.due.range(range) {
                    if out.len() >= limit {
                        return out;
                    }
                    if !keep(*cid, *sid) {
                        continue;
                    }
                    if let Some(t) = self.task(*cid, *sid) {
                        out.push(t);
                    }
                }
            }
        }
        out
    }

    /// Every API token (hashes and scopes only).
    pub fn tokens(&self) -> impl Iterator<Item = &ApiToken> {
        self.tokens.values()
    }

    /// The token whose secret hashes to `sha256_hex`, if the cluster knows it.
    pub fn token(&self, sha256_hex: &str) -> Option<&ApiToken> {
        self.tokens.get(sha256_hex)
    }

    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.nodes.get(&id)
    }

    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    /// Nodes other than `except` that have calls in flight.
    pub fn nodes_with_calls_in_flight(&self, except: NodeId) -> BTreeSet<NodeId> {
        self.tasks
            .values()
            .flat_map(|t| t.values())
            .filter_map(|t| match t.state {
                TaskState::InFlight { node, .. } if node != except => Some(node),
                _ => None,
            })
            .collect()
    }

    pub fn subscriber(&self, id: SubscriberId) -> Option<&Subscriber> {
        self.subscribers.get(&id)
    }

    pub fn subscriber_by_phone(&self, tenant: &str, phone: &PhoneNumber) -> Option<&Subscriber> {
        self.phones
            .get(&(tenant.to_string(), phone.clone()))
            .and_then(|id| self.subscribers.get(id))
    }

    pub fn tenant(&self, slug: &str) -> Option<&Tenant> {
        self.tenants.0.get(slug)
    }

    pub fn tenants(&self) -> impl Iterator<Item = &Tenant> {
        self.tenants.0.values()
    }

    pub fn operator(&self, username: &str) -> Option<&Operator> {
        self.operators.get(username)
    }

    /// The operator a live session speaks for: known, not expired at `now_ms`, account enabled.
    pub fn session(&self, token_sha256: &str, now_ms: u64) -> Option<(&Session, &Operator)> {
        let session = self.sessions.get(token_sha256)?;
        if session.expires_ms <= now_ms {
            return None;
        }
        let op = self.operators.get(&session.username)?;
        (!op.disabled).then_some((session, op))
    }

    pub fn operators(&self) -> impl Iterator<Item = &Operator> {
        self.operators.values()
    }

    /// The audit log, oldest first.
    pub fn audit(&self) -> &[AuditEntry] {
        &self.audit
    }

    /// A recording, if it exists and belongs to `tenant`.
    pub fn audio(&self, tenant: &str, sha256: &str) -> Option<&AudioBlob> {
        self.audio.get(sha256).filter(|a| a.tenant == tenant)
    }

    pub fn subscribers(&self) -> impl Iterator<Item = &Subscriber> {
        self.subscribers.values()
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    pub fn campaign(&self, id: CampaignId) -> Option<&Campaign> {
        self.campaigns.get(&id)
    }

    pub fn campaigns(&self) -> impl Iterator<Item = &Campaign> {
        self.campaigns.values()
    }

    /// Every call task of a campaign, by subscriber id.
    pub fn tasks(&self, campaign: CampaignId) -> impl Iterator<Item = &CallTask> {
        self.tasks
            .get(&campaign)
            .into_iter()
            .flat_map(|t| t.values())
    }

    pub fn task(&self, campaign: CampaignId, subscriber: SubscriberId) -> Option<&CallTask> {
        self.tasks.get(&campaign).and_then(|t| t.get(&subscriber))
    }

    /// Pending tasks of running campaigns due at or before `now_ms`, in the order of `due_key`:
    /// emergencies first, then citizens called fewer times, then the longest due.
    pub fn due_tasks(&self, now_ms: u64, limit: usize) -> Vec<&CallTask> {
        self.due_tasks_where(now_ms, limit, |_| true)
    }

    /// The earliest due time of any pending task, to know how long the dialer may sleep.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.due.iter().map(|(_, _, due, _, _)| *due).min()
    }

    /// Tasks a node had in flight (used after a restart to give interrupted attempts back).
    pub fn in_flight_on(&self, node: NodeId) -> Vec<&CallTask> {
        self.tasks
            .values()
            .flat_map(|t| t.values())
            .filter(|t| matches!(t.state, TaskState::InFlight { node: n, .. } if n == node))
            .collect()
    }
}

fn wrong_state(c: &Campaign, wanted: &str, verb: &str) -> Refusal {
    Refusal::WrongCampaignState {
        id: c.id,
        state: c.state.as_str().to_string(),
        wanted: wanted.to_string(),
        verb: verb.to_string(),
    }
}

/// Hex SHA-256 of `bytes`.
fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What an audited command was about, for the audit log: ids and names, never a phone number, a
/// password hash or audio bytes.
fn audit_target(command: &Command, response: &Response) -> String {
    match (command, response) {
        (_, Response::SubscriberCreated(id)) => format!("subscriber {id}"),
        (_, Response::CampaignCreated(id)) => format!("campaign {id}"),
        (_, Response::AudioStored(sha)) => format!("recording {sha}"),
        (Command::CreateSubscribers { subscribers, .. }, _) => {
            format!("{} subscribers", subscribers.len())
        }
        (
            Command::DeleteSubscriber { id, .. }
            | Command::UpdateSubscriber { id, .. }
            | Command::RequestVerification { id, .. }
            | Command::ConfirmVerification { id, .. },
            _,
        ) => format!("subscriber {id}"),
        (
            Command::StartCampaign { id, .. }
            | Command::CancelCampaign { id, .. }
            | Command::PauseCampaign { id, .. }
            | Command::ResumeCampaign { id, .. }
            | Command::ApproveCampaign { id, .. },
            _,
        ) => format!("campaign {id}"),
        (Command::OverrideApproval { id, reason, .. }, _) => {
            format!("campaign {id} (override: {reason})")
        }
        (Command::CreateSession { session, .. }, _) => format!("operator {}", session.username),
        (Command::CreateTenant { slug, .. }, _) => format!("tenant {slug}"),
        (Command::CreateOperator { operator, .. }, _) => format!("operator {}", operator.username),
        (Command::UpdateOperator { update, .. }, _) => format!("operator {}", update.username),
        (Command::AddToken { token }, _) => format!("token {}", token.label),
        (Command::RevokeToken { sha256, .. }, _) => {
            format!("token {}", sha256.get(..12).unwrap_or(sha256))
        }
        (Command::ForgetNode { node, .. }, _) => format!("node {node}"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::*;

    fn sub(n: u32, zone: Option<&str>) -> Command {
        Command::CreateSubscriber {
            at_ms: 1,
            subscriber: NewSubscriber {
                tenant: crate::domain::default_tenant(),
                phone: PhoneNumber::parse(&format!("+39347{n:07}")).unwrap(),
                name: None,
                language: "it".into(),
                zone: zone.map(String::from),
                verified: true,
                consent: None,
            },
        }
    }

    fn campaign(audience: Audience) -> Command {
        Command::CreateCampaign {
            at_ms: 2,
            created_by: None,
            spec: CampaignSpec {
                not_before_ms: None,
                deadline_ms: None,
                tenant: crate::domain::default_tenant(),
                title: "Piena del fiume".into(),
                message: Message::Tts {
                    text: "Allerta".into(),
                    language: "it".into(),
                },
                audience,
                priority: Priority::Emergency,
                require_confirmation: true,
                retry: RetryPolicy::default_for(Priority::Emergency),
            },
        }
    }

    fn started(c: u64, s: u64, attempt: u32) -> AttemptEvent {
        AttemptEvent::Started {
            campaign: CampaignId(c),
            subscriber: SubscriberId(s),
            attempt,
            epoch: None,
        }
    }

    fn started_under(c: u64, s: u64, attempt: u32, epoch: u64) -> AttemptEvent {
        AttemptEvent::Started {
            campaign: CampaignId(c),
            subscriber: SubscriberId(s),
            attempt,
            epoch: Some(epoch),
        }
    }

    fn by(st: &mut State, node: u64, at_ms: u64, events: Vec<AttemptEvent>) -> Response {
        st.apply(&Command::RecordAttempts {
            at_ms,
            node: NodeId(node),
            events,
        })
    }

    fn finished(c: u64, s: u64, attempt: u32, outcome: Outcome, next: Next) -> AttemptEvent {
        AttemptEvent::Finished {
            campaign: CampaignId(c),
            subscriber: SubscriberId(s),
            attempt,
            outcome,
            next,
            epoch: None,
        }
    }

    /// Attempt `attempt` of subscriber `s` in campaign `c` ended with a 1.
    fn confirmed_by_one(c: u64, s: u64, attempt: u32) -> AttemptEvent {
        finished(
            c,
            s,
            attempt,
            Outcome::Confirmed,
            Next::Final(FinalState::Confirmed),
        )
    }

    fn record(st: &mut State, events: Vec<AttemptEvent>) -> Response {
        st.apply(&Command::RecordAttempts {
            at_ms: 10,
            node: NodeId(1),
            events,
        })
    }

    /// `sub` and `campaign`, moved to another tenant.
    fn in_tenant(tenant: &str, mut cmd: Command) -> Command {
        match &mut cmd {
            Command::CreateSubscriber { subscriber, .. } => subscriber.tenant = tenant.into(),
            Command::CreateCampaign { spec, .. } => spec.tenant = tenant.into(),
            _ => {}
        }
        cmd
    }

    fn operator(username: &str, role: Role, tenants: &[&str], hash: &str) -> Command {
        Command::CreateOperator {
            at_ms: 5,
            operator: Operator {
                totp_secret: None,
                username: username.into(),
                display_name: username.into(),
                role,
                tenants: tenants.iter().map(|t| t.to_string()).collect(),
                password_hash: hash.into(),
                disabled: false,
                created_ms: 0,
                updated_ms: 0,
            },
        }
    }

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA";

    #[test]
    fn tenants_keep_their_subscribers_and_campaigns_apart() {
        let mut st = State::default();
        assert!(
            st.tenant(DEFAULT_TENANT).is_some(),
            "a fresh state has `default`"
        );
        let pisa = |name: &str| Command::CreateTenant {
            at_ms: 1,
            slug: "pisa".into(),
            name: name.into(),
        };
        assert_eq!(st.apply(&pisa("Comune di Pisa")), Response::Ok);
        assert!(matches!(
            st.apply(&pisa("again")),
            Response::Refused(Refusal::DuplicateTenant(_))
        ));
        for bad in ["", "Pisa", "-pisa", "pi sa", &"p".repeat(41)] {
            let r = st.apply(&Command::CreateTenant {
                at_ms: 1,
                slug: bad.into(),
                name: "x".into(),
            });
            assert!(
                matches!(r, Response::Refused(Refusal::InvalidTenant(_))),
                "{bad:?}: {r:?}"
            );
        }
        // The same number may be registered with two comuni, but only once with each.
        assert!(matches!(
            st.apply(&sub(1, None)),
            Response::SubscriberCreated(_)
        ));
        assert!(matches!(
            st.apply(&in_tenant("pisa", sub(1, None))),
            Response::SubscriberCreated(_)
        ));
        assert!(matches!(
            st.apply(&in_tenant("pisa", sub(1, None))),
            Response::Refused(Refusal::DuplicatePhone(..))
        ));
        st.apply(&in_tenant("pisa", sub(2, None)));
        assert!(matches!(
            st.apply(&in_tenant("lucca", sub(3, None))),
            Response::Refused(Refusal::UnknownTenant(_))
        ));
        // A batch naming an unknown tenant is refused whole: nobody of it is created.
        let count = st.subscriber_count();
        let batch = |c: Command| match c {
            Command::CreateSubscriber { subscriber, .. } => subscriber,
            _ => unreachable!(),
        };
        let r = st.apply(&Command::CreateSubscribers {
            at_ms: 1,
            subscribers: vec![
                batch(in_tenant("pisa", sub(7, None))),
                batch(in_tenant("lucca", sub(8, None))),
            ],
        });
        assert_eq!(r, Response::Refused(Refusal::UnknownTenant("lucca".into())));
        assert_eq!(st.subscriber_count(), count);
        assert!(matches!(
            st.apply(&in_tenant("lucca", campaign(Audience::All))),
            Response::Refused(Refusal::UnknownTenant(_))
        ));
        // A campaign of Pisa calls Pisa's two subscribers, not the default tenant's.
        let Response::CampaignCreated(id) = st.apply(&in_tenant("pisa", campaign(Audience::All)))
        else {
            panic!("campaign not created");
        };
        st.apply(&Command::StartCampaign { at_ms: 3, id });
        let called: Vec<String> = st
            .tasks(id)
            .filter_map(|t| st.subscriber(t.subscriber))
            .map(|s| s.tenant.clone())
            .collect();
        assert_eq!(called, vec!["pisa".to_string(), "pisa".to_string()]);
        // Indexes rebuilt from a snapshot keep the per-tenant numbers apart.
        let mut copy: State = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        copy.rebuild_indexes();
        let phone = PhoneNumber::parse("+393470000001").unwrap();
        assert_ne!(
            copy.subscriber_by_phone("pisa", &phone).map(|s| s.id),
            copy.subscriber_by_phone(DEFAULT_TENANT, &phone)
                .map(|s| s.id)
        );
        // A snapshot of a release before tenants still has `default`.
        let old: State = serde_json::from_str(
            r#"{"next_subscriber":0,"next_campaign":0,"subscribers":{},"campaigns":{},"tasks":{}}"#,
        )
        .unwrap();
        assert!(old.tenant(DEFAULT_TENANT).is_some());
    }

    #[test]
    fn operators_hold_only_argon2id_hashes_and_valid_tenants() {
        let mut st = State::default();
        st.apply(&Command::CreateTenant {
            at_ms: 1,
            slug: "pisa".into(),
            name: "Pisa".into(),
        });
        let refused = |r: Response| matches!(r, Response::Refused(_));
        assert!(refused(st.apply(&operator(
            "anna",
            Role::Admin,
            &["pisa"],
            "hunter2"
        ))));
        assert!(refused(st.apply(&operator(
            "anna",
            Role::Admin,
            &["pisa", "default"],
            HASH
        ))));
        assert!(refused(st.apply(&operator("anna", Role::Admin, &[], HASH))));
        assert!(refused(st.apply(&operator(
            "anna",
            Role::Admin,
            &["lucca"],
            HASH
        ))));
        assert!(refused(st.apply(&operator(
            "an na",
            Role::Admin,
            &["pisa"],
            HASH
        ))));
        assert_eq!(
            st.apply(&operator("anna", Role::Admin, &["pisa"], HASH)),
            Response::Ok
        );
        assert!(matches!(
            st.apply(&operator("anna", Role::Viewer, &["pisa"], HASH)),
            Response::Refused(Refusal::DuplicateOperator(_))
        ));
        // A prefecture oversees several comuni.
        assert_eq!(
            st.apply(&operator(
                "prefetto",
                Role::Regional,
                &["pisa", "default"],
                HASH
            )),
            Response::Ok
        );
        assert!(st
            .operator("prefetto")
            .is_some_and(|o| o.serves("pisa") && o.serves("default")));
        let update = |disabled: Option<bool>, hash: Option<&str>| Command::UpdateOperator {
            at_ms: 9,
            update: OperatorUpdate {
                totp: None,
                username: "anna".into(),
                role: None,
                tenants: None,
                password_hash: hash.map(String::from),
                disabled,
            },
        };
        assert_eq!(st.apply(&update(Some(true), None)), Response::Ok);
        assert!(st
            .operator("anna")
            .is_some_and(|o| o.disabled && o.updated_ms == 9));
        assert!(refused(st.apply(&update(None, Some("plain")))));
        assert_eq!(
            st.operator("anna").map(|o| o.password_hash.as_str()),
            Some(HASH)
        );
        assert!(matches!(
            st.apply(&Command::UpdateOperator {
                at_ms: 9,
                update: OperatorUpdate {
                    totp: None,
                    username: "nobody".into(),
                    role: None,
                    tenants: None,
                    password_hash: None,
                    disabled: None,
                },
            }),
            Response::Refused(Refusal::UnknownOperator(_))
        ));
    }

    #[test]
    fn sessions_expire_end_on_logout_and_on_a_new_password_or_disabled_account() {
        let mut st = State::default();
        st.apply(&operator("anna", Role::Operator, &["default"], HASH));
        let login = |token: &str, at_ms: u64| Command::CreateSession {
            at_ms,
            session: Session {
                token_sha256: token.into(),
                username: "anna".into(),
                created_ms: at_ms,
                expires_ms: at_ms + 1_000,
            },
        };
        assert_eq!(st.apply(&login("a", 10)), Response::Ok);
        assert_eq!(
            st.session("a", 500).map(|(_, o)| o.username.as_str()),
            Some("anna")
        );
        assert!(st.session("a", 1_010).is_none(), "expired");
        assert!(st.session("nope", 500).is_none());
        // A login of an unknown account is refused.
        let mut ghost = login("g", 10);
        if let Command::CreateSession { session, .. } = &mut ghost {
            session.username = "ghost".into();
        }
        assert!(matches!(
            st.apply(&ghost),
            Response::Refused(Refusal::UnknownOperator(_))
        ));
        // Logout.
        st.apply(&login("b", 20));
        st.apply(&Command::EndSession {
            at_ms: 21,
            token_sha256: "b".into(),
        });
        assert!(st.session("b", 22).is_none());
        // A new password ends every session; so does disabling the account, which also refuses logins.
        st.apply(&login("c", 30));
        st.apply(&Command::UpdateOperator {
            at_ms: 31,
            update: OperatorUpdate {
                totp: None,
                username: "anna".into(),
                role: None,
                tenants: None,
                password_hash: Some(HASH.into()),
                disabled: None,
            },
        });
        assert!(st.session("c", 32).is_none());
        st.apply(&login("d", 40));
        st.apply(&Command::UpdateOperator {
            at_ms: 41,
            update: OperatorUpdate {
                totp: None,
                username: "anna".into(),
                role: None,
                tenants: None,
                password_hash: None,
                disabled: Some(true),
            },
        });
        assert!(st.session("d", 42).is_none());
        assert!(matches!(
            st.apply(&login("e", 50)),
            Response::Refused(Refusal::DisabledOperator(_))
        ));
        // Expired sessions are dropped when a login applies; one account keeps a bounded number.
        st.apply(&Command::UpdateOperator {
            at_ms: 60,
            update: OperatorUpdate {
                totp: None,
                username: "anna".into(),
                role: None,
                tenants: None,
                password_hash: None,
                disabled: Some(false),
            },
        });
        for i in 0..(MAX_SESSIONS_PER_OPERATOR as u64 + 5) {
            st.apply(&login(&format!("s{i}"), 100 + i));
        }
        assert_eq!(st.sessions.len(), MAX_SESSIONS_PER_OPERATOR);
        assert!(st.session("s0", 150).is_none(), "the oldest went first");
        st.apply(&login("late", 5_000));
        assert_eq!(st.sessions.len(), 1, "expired ones are gone");
    }

    #[test]
    fn a_campaign_from_an_operator_to_everyone_or_an_emergency_waits_for_a_second_person() {
        let mut st = State::default();
        let mut by = |who: Option<&str>, audience: Audience, priority: Priority| {
            let mut cmd = campaign(audience);
            if let Command::CreateCampaign {
                created_by, spec, ..
            } = &mut cmd
            {
                *created_by = who.map(str::to_string);
                spec.priority = priority;
            }
            let Response::CampaignCreated(id) = st.apply(&cmd) else {
                panic!("not created")
            };
            st.campaign(id)
                .map(|c| c.approval.clone())
                .unwrap_or_default()
        };
        let zones = || Audience::Zones(vec!["colle".into()]);
        assert_eq!(
            by(Some("anna"), Audience::All, Priority::Info),
            Approval::Pending
        );
        assert_eq!(
            by(Some("anna"), zones(), Priority::Emergency),
            Approval::Pending
        );
        assert_eq!(
            by(Some("anna"), zones(), Priority::Urgent),
            Approval::NotNeeded
        );
        assert_eq!(
            by(None, Audience::All, Priority::Emergency),
            Approval::NotNeeded
        );
        let id = CampaignId(1);
        assert!(matches!(
            st.apply(&Command::StartCampaign { at_ms: 5, id }),
            Response::Refused(Refusal::ApprovalRequired(_))
        ));
        assert!(matches!(
            st.apply(&Command::ApproveCampaign {
                at_ms: 5,
                id,
                by: "anna".into()
            }),
            Response::Refused(Refusal::SelfApproval(..))
        ));
        assert!(matches!(
            st.apply(&Command::OverrideApproval {
                at_ms: 5,
                id,
                by: "anna".into(),
                reason: "frana in corso adesso".into()
            }),
            Response::Refused(Refusal::OverrideNotEmergency(_))
        ));
        assert_eq!(
            st.apply(&Command::ApproveCampaign {
                at_ms: 6,
                id,
                by: "carla".into()
            }),
            Response::Ok
        );
        assert!(matches!(
            st.apply(&Command::ApproveCampaign {
                at_ms: 7,
                id,
                by: "dario".into()
            }),
            Response::Refused(Refusal::ApprovalNotNeeded(_))
        ));
        assert_eq!(
            st.apply(&Command::StartCampaign { at_ms: 8, id }),
            Response::Ok
        );
        let e = CampaignId(2);
        assert!(matches!(
            st.apply(&Command::OverrideApproval {
                at_ms: 9,
                id: e,
                by: "anna".into(),
                reason: "  corta ".into()
            }),
            Response::Refused(Refusal::OverrideWithoutReason)
        ));
        assert_eq!(
            st.apply(&Command::OverrideApproval {
                at_ms: 9,
                id: e,
                by: "anna".into(),
                reason: "frana in corso adesso".into()
            }),
            Response::Ok
        );
        assert_eq!(
            st.apply(&Command::StartCampaign { at_ms: 10, id: e }),
            Response::Ok
        );
    }

    #[test]
    fn a_verification_code_registers_or_erases_once_within_its_tries_and_time() {
        let mut st = State::default();
        let Response::SubscriberCreated(id) = st.apply(&sub(1, None)) else {
            panic!("not created")
        };
        let phone = st
            .subscriber(id)
            .map(|s| s.phone.clone())
            .expect("subscriber");
        let hash = |code: &str| verification_hash(DEFAULT_TENANT, &phone, code);
        let ask = |purpose, expires_ms| Command::RequestVerification {
            at_ms: 10,
            id,
            verification: Verification {
                code_sha256: hash("123456"),
                expires_ms,
                tries_left: VERIFICATION_TRIES,
                purpose,
            },
        };
        let confirm = |code: &str, at_ms| Command::ConfirmVerification {
            at_ms,
            id,
            code_sha256: hash(code),
        };
        // No code asked yet.
        assert!(matches!(
            st.apply(&confirm("123456", 11)),
            Response::Refused(Refusal::NoVerification(_))
        ));
        // Wrong codes use up tries; the last one voids the code.
        st.apply(&ask(VerificationPurpose::Register, 1_000));
        for left in (0..VERIFICATION_TRIES).rev() {
            assert_eq!(
                st.apply(&confirm("000000", 12)),
                Response::Refused(Refusal::WrongCode { tries_left: left })
            );
        }
        assert!(matches!(
            st.apply(&confirm("123456", 13)),
            Response::Refused(Refusal::NoVerification(_))
        ));
        // An expired code does nothing.
        st.apply(&ask(VerificationPurpose::Register, 1_000));
        assert!(matches!(
            st.apply(&confirm("123456", 1_000)),
            Response::Refused(Refusal::NoVerification(_))
        ));
        // The right code in time verifies, once.
        st.apply(&ask(VerificationPurpose::Register, 1_000));
        let mut unverified = st.subscriber(id).cloned().expect("subscriber");
        unverified.verified = false;
        st.subscribers.insert(id, unverified);
        assert_eq!(st.apply(&confirm("123456", 20)), Response::Ok);
        assert!(st
            .subscriber(id)
            .is_some_and(|s| s.verified && s.verification.is_none()));
        // A code for unsubscribing erases the subscriber and its number.
        st.apply(&ask(VerificationPurpose::Unsubscribe, 1_000));
        assert_eq!(st.apply(&confirm("123456", 30)), Response::Ok);
        assert!(st.subscriber(id).is_none());
        assert!(st.subscriber_by_phone(DEFAULT_TENANT, &phone).is_none());
    }

    #[test]
    fn at_the_deadline_waiting_citizens_end_exhausted_and_calls_up_are_not_retried() {
        let mut st = State::default();
        st.apply(&sub(1, None));
        st.apply(&sub(2, None));
        let mut cmd = campaign(Audience::All);
        if let Command::CreateCampaign { spec, .. } = &mut cmd {
            spec.deadline_ms = Some(1_000);
        }
        let Response::CampaignCreated(id) = st.apply(&cmd) else {
            panic!("not created")
        };
        st.apply(&Command::StartCampaign { at_ms: 5, id });
        assert!(st.expired_campaigns(999).is_empty());
        // Subscriber 1 is on the phone at the deadline; subscriber 2 waits.
        record(&mut st, vec![started(id.0, 1, 1)]);
        assert_eq!(st.expired_campaigns(1_000), vec![id]);
        assert_eq!(
            st.apply(&Command::CloseExpired { at_ms: 1_000 }),
            Response::Recorded { applied: 1 }
        );
        let state_of = |st: &State, s: u64| st.task(id, SubscriberId(s)).map(|t| t.state);
        assert_eq!(
            state_of(&st, 2),
            Some(TaskState::Final(FinalState::Exhausted))
        );
        assert!(st.expired_campaigns(2_000).is_empty());
        // The call up ends busy after the deadline: no retry, exhausted; the campaign completes.
        st.apply(&Command::RecordAttempts {
            at_ms: 1_500,
            node: NodeId(1),
            events: vec![finished(id.0, 1, 1, Outcome::Busy, Next::RetryAt(1_600))],
        });
        assert_eq!(
            state_of(&st, 1),
            Some(TaskState::Final(FinalState::Exhausted))
        );
        assert_eq!(
            st.campaign(id).map(|c| c.state),
            Some(CampaignState::Completed)
        );
    }

    #[test]
    fn a_tenant_caller_id_is_set_checked_and_cleared() {
        let mut st = State::default();
        let set = |number: &str, name: &str| Command::SetCallerId {
            at_ms: 1,
            tenant: DEFAULT_TENANT.into(),
            caller_id: Some(CallerId {
                number: number.into(),
                display_name: name.into(),
            }),
        };
        assert_eq!(st.apply(&set("+390502211", "Comune di Pisa")), Response::Ok);
        assert_eq!(
            st.tenant(DEFAULT_TENANT)
                .and_then(|t| t.caller_id.as_ref())
                .map(|c| c.number.as_str()),
            Some("+390502211")
        );
        for (number, name) in [
            ("12", "ok"),
            ("+39abc", "ok"),
            ("+390502211", "Pisa\"\r\nX: 1"),
            ("+390502211", ""),
        ] {
            assert!(
                matches!(
                    st.apply(&set(number, name)),
                    Response::Refused(Refusal::InvalidCallerId(_))
                ),
                "{number:?} {name:?}"
            );
        }
        let mut other = set("+390502211", "x");
        if let Command::SetCallerId { tenant, .. } = &mut other {
            *tenant = "nowhere".into();
        }
        assert!(matches!(
            st.apply(&other),
            Response::Refused(Refusal::UnknownTenant(_))
        ));
        st.apply(&Command::SetCallerId {
            at_ms: 2,
            tenant: DEFAULT_TENANT.into(),
            caller_id: None,
        });
        assert!(st
            .tenant(DEFAULT_TENANT)
            .is_some_and(|t| t.caller_id.is_none()));
    }

    #[test]
    fn a_tenant_quiet_hours_are_set_checked_and_cleared() {
        let mut st = State::default();
        let set = |start_minute, end_minute| Command::SetQuietHours {
            at_ms: 1,
            tenant: DEFAULT_TENANT.into(),
            quiet_hours: Some(QuietHours {
                start_minute,
                end_minute,
            }),
        };
        let quiet = |st: &State| st.tenant(DEFAULT_TENANT).and_then(|t| t.quiet_hours);
        assert_eq!(st.apply(&set(22 * 60, 7 * 60)), Response::Ok);
        assert_eq!(
            quiet(&st),
            Some(QuietHours {
                start_minute: 1320,
                end_minute: 420
            })
        );
        for (start, end) in [(600, 600), (1440, 60), (60, 2000)] {
            assert!(
                matches!(
                    st.apply(&set(start, end)),
                    Response::Refused(Refusal::InvalidQuietHours(_))
                ),
                "{start}..{end}"
            );
        }
        assert_eq!(
            quiet(&st).map(|q| q.start_minute),
            Some(1320),
            "refusals change nothing"
        );
        let elsewhere = Command::SetQuietHours {
            at_ms: 2,
            tenant: "nowhere".into(),
            quiet_hours: None,
        };
        assert!(matches!(
            st.apply(&elsewhere),
            Response::Refused(Refusal::UnknownTenant(_))
        ));
        st.apply(&Command::SetQuietHours {
            at_ms: 3,
            tenant: DEFAULT_TENANT.into(),
            quiet_hours: None,
        });
        assert_eq!(quiet(&st), None);
        // Audited like every operator's change, under the tenant it concerns.
        st.apply(&Command::Audited {
            at_ms: 4,
            actor: "sindaco".into(),
            tenant: None,
            command: Box::new(set(0, 360)),
        });
        let last = st.audit().last().expect("an audit line");
        assert_eq!(
            (
                last.action.as_str(),
                last.tenant.as_deref(),
                last.result.as_str()
            ),
            ("set_quiet_hours", Some(DEFAULT_TENANT), "ok")
        );
    }

    #[test]
    fn a_scheduled_campaign_calls_nobody_before_its_time() {
        let mut st = State::default();
        st.apply(&sub(1, None));
        let mut cmd = campaign(Audience::All);
        if let Command::CreateCampaign { spec, .. } = &mut cmd {
            spec.not_before_ms = Some(10_000);
        }
        let Response::CampaignCreated(id) = st.apply(&cmd) else {
            panic!("not created")
        };
        assert_eq!(
            st.apply(&Command::StartCampaign { at_ms: 100, id }),
            Response::Ok
        );
        assert!(st.due_tasks_where(9_999, 10, |_| true).is_empty());
        assert_eq!(st.due_tasks_where(10_000, 10, |_| true).len(), 1);
        // Started after its time: due at once.
        let mut late = campaign(Audience::All);
        if let Command::CreateCampaign { spec, .. } = &mut late {
            spec.not_before_ms = Some(50);
            spec.priority = Priority::Info;
        }
        let Response::CampaignCreated(id) = st.apply(&late) else {
            panic!("not created")
        };
        st.apply(&Command::StartCampaign { at_ms: 200, id });
        assert!(st
            .due_tasks_where(200, 10, |_| true)
            .iter()
            .any(|t| t.campaign == id));
        // Asked for emergencies only, the information campaign's tasks are not returned.
        let urgent_only = st.due_tasks_up_to(Priority::Emergency, 20_000, 10, |_, _| true);
        assert!(!urgent_only.is_empty());
        assert!(urgent_only.iter().all(|t| t.campaign != id));
    }

    #[test]
    fn audited_commands_leave_who_what_and_the_result_in_the_log() {
        let mut st = State::default();
        let audited = |cmd: Command| Command::Audited {
            at_ms: 7,
            actor: "anna".into(),
            tenant: Some(DEFAULT_TENANT.into()),
            command: Box::new(cmd),
        };
        st.apply(&audited(sub(1, None)));
        let Response::CampaignCreated(id) = st.apply(&audited(campaign(Audience::All))) else {
            panic!("campaign not created");
        };
        assert_eq!(
            st.apply(&audited(Command::StartCampaign { at_ms: 7, id })),
            Response::Ok
        );
        let r = st.apply(&audited(Command::StartCampaign { at_ms: 8, id }));
        assert!(matches!(r, Response::Refused(_)), "{r:?}");
        assert!(matches!(
            st.apply(&audited(audited(sub(2, None)))),
            Response::Refused(Refusal::NestedAudit)
        ));
        let log: Vec<(u64, &str, &str, &str)> = st
            .audit()
            .iter()
            .map(|e| {
                (
                    e.seq,
                    e.action.as_str(),
                    e.target.as_str(),
                    e.result.as_str(),
                )
            })
            .collect();
        assert_eq!(log.len(), 4, "{log:?}");
        assert_eq!(log[0], (1, "create_subscriber", "subscriber sub-1", "ok"));
        assert_eq!(log[1], (2, "create_campaign", "campaign cmp-1", "ok"));
        assert_eq!(log[2], (3, "start_campaign", "campaign cmp-1", "ok"));
        assert_eq!(log[3].1, "start_campaign");
        assert!(
            log[3].3.starts_with("refused: campaign cmp-1 is running"),
            "{log:?}"
        );
        assert!(st
            .audit()
            .iter()
            .all(|e| e.actor == "anna" && e.at_ms == 7 || e.seq == 4));
        // No phone number reaches the audit log.
        let text = serde_json::to_string(st.audit()).unwrap();
        assert!(!text.contains("3470000001"), "{text}");
    }

    #[test]
    fn recordings_are_content_addressed_capped_and_private_to_their_tenant() {
        let mut st = State::default();
        st.apply(&Command::CreateTenant {
            at_ms: 1,
            slug: "pisa".into(),
            name: "Pisa".into(),
        });
        let put = |tenant: &str, wav: Vec<u8>| Command::PutAudio {
            at_ms: 2,
            tenant: tenant.into(),
            wav,
        };
        let Response::AudioStored(sha) = st.apply(&put("pisa", b"RIFF-wav-bytes".to_vec())) else {
            panic!("not stored");
        };
        assert_eq!(sha.len(), 64);
        assert_eq!(
            st.apply(&put("pisa", b"RIFF-wav-bytes".to_vec())),
            Response::AudioStored(sha.clone())
        );
        assert!(st.audio("pisa", &sha).is_some());
        assert!(
            st.audio(DEFAULT_TENANT, &sha).is_none(),
            "another tenant cannot see it"
        );
        assert!(matches!(
            st.apply(&put("pisa", vec![0; MAX_AUDIO_BYTES + 1])),
            Response::Refused(Refusal::AudioTooLarge { .. })
        ));
        let with_recording = |tenant: &str| Command::CreateCampaign {
            at_ms: 3,
            created_by: None,
            spec: CampaignSpec {
                not_before_ms: None,
                deadline_ms: None,
                tenant: tenant.into(),
                title: "Registrata".into(),
                message: Message::Recording {
                    sha256: sha.clone(),
                },
                audience: Audience::All,
                priority: Priority::Urgent,
                require_confirmation: true,
                retry: RetryPolicy::default_for(Priority::Urgent),
            },
        };
        assert!(matches!(
            st.apply(&with_recording(DEFAULT_TENANT)),
            Response::Refused(Refusal::UnknownAudio(_))
        ));
        assert!(matches!(
            st.apply(&with_recording("pisa")),
            Response::CampaignCreated(_)
        ));
        // Audio survives a snapshot (base64 in JSON).
        let copy: State = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        assert_eq!(
            copy.audio("pisa", &sha).map(|a| a.wav.as_slice()),
            Some(&b"RIFF-wav-bytes"[..])
        );
    }

    #[test]
    fn duplicate_phone_is_refused_with_masked_number() {
        let mut st = State::default();
        assert_eq!(
            st.apply(&sub(1, None)),
            Response::SubscriberCreated(SubscriberId(1))
        );
        let r = st.apply(&sub(1, None));
        let Response::Refused(Refusal::DuplicatePhone(masked, id)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(id, SubscriberId(1));
        assert!(!masked.contains("0000001"));
    }

    #[test]
    fn zone_audience_targets_only_that_zone() {
        let mut st = State::default();
        st.apply(&sub(1, Some("centro")));
        st.apply(&sub(2, Some("porto")));
        st.apply(&sub(3, None));
        st.apply(&campaign(Audience::Zones(vec!["porto".into()])));
        assert_eq!(
            st.apply(&Command::StartCampaign {
                at_ms: 5,
                id: CampaignId(1)
            }),
            Response::Ok
        );
        let c = st.campaign(CampaignId(1)).unwrap();
        assert_eq!(c.counts.targeted, 1);
        assert_eq!(st.due_tasks(5, 10)[0].subscriber, SubscriberId(2));
    }

    /// Subscribers 1..=`subscribers` and campaign 1 to all of them, started at 5 ms.
    fn running(subscribers: u32) -> State {
        let mut st = State::default();
        for n in 1..=subscribers {
            st.apply(&sub(n, None));
        }
        st.apply(&campaign(Audience::All));
        st.apply(&Command::StartCampaign {
            at_ms: 5,
            id: CampaignId(1),
        });
        st
    }

    #[test]
    fn citizens_called_fewer_times_go_first_among_due_tasks() {
        let mut st = running(3);
        // Attempt `a` of subscriber `s` ends with `outcome`, next due at `due`.
        let call = |st: &mut State, s, a, outcome, due| {
            record(
                st,
                vec![
                    started(1, s, a),
                    finished(1, s, a, outcome, Next::RetryAt(due)),
                ],
            );
        };
        let order = |st: &State, now| -> Vec<u64> {
            st.due_tasks(now, 10)
                .iter()
                .map(|t| t.subscriber.0)
                .collect()
        };
        // Subscriber 1 has been called twice, 2 once; 3 not yet.
        for (s, attempts) in [(1, 2), (2, 1)] {
            for a in 1..=attempts {
                call(&mut st, s, a, Outcome::Busy, 10);
            }
        }
        assert_eq!(order(&st, 100), [3, 2, 1]);
        // Being called fewer times never makes a task due early.
        call(&mut st, 3, 1, Outcome::Busy, 200);
        assert_eq!(order(&st, 100), [2, 1]);
        assert_eq!(order(&st, 200), [2, 3, 1]);
        // An interrupted attempt is given back, and with it the task's place.
        call(&mut st, 1, 3, Outcome::Interrupted, 10);
        assert_eq!(order(&st, 200), [2, 3, 1]);
        assert_eq!(st.task(CampaignId(1), SubscriberId(1)).unwrap().attempts, 2);
    }

    #[test]
    fn a_task_walks_to_confirmed_and_the_campaign_completes() {
        let mut st = running(1);
        assert_eq!(
            record(&mut st, vec![started(1, 1, 1)]),
            Response::Recorded { applied: 1 }
        );
        assert!(st.due_tasks(100, 10).is_empty());
        assert_eq!(st.campaign(CampaignId(1)).unwrap().counts.in_flight, 1);
        record(
            &mut st,
            vec![finished(1, 1, 1, Outcome::Busy, Next::RetryAt(50))],
        );
        assert_eq!(st.due_tasks(49, 10).len(), 0);
        assert_eq!(st.due_tasks(50, 10).len(), 1);
        record(
            &mut st,
            vec![
                started(1, 1, 2),
                finished(
                    1,
                    1,
                    2,
                    Outcome::Confirmed,
                    Next::Final(FinalState::Confirmed),
                ),
            ],
        );
        let c = st.campaign(CampaignId(1)).unwrap();
        assert_eq!(c.state, CampaignState::Completed);
        assert_eq!(c.counts.confirmed, 1);
        assert_eq!(c.counts.attempts, 2);
        assert_eq!(c.counts.answered, 1);
        // Per node: node 1 placed both attempts and confirmed the citizen.
        assert_eq!(
            c.by_node.get(&NodeId(1)),
            Some(&NodeProgress {
                attempts: 2,
                answered: 1,
                confirmed: 1
            })
        );
        // A campaign without per-node progress (an earlier release's snapshot) still loads.
        let mut json = serde_json::to_value(c).unwrap();
        json.as_object_mut().unwrap().remove("by_node");
        let old: Campaign = serde_json::from_value(json).unwrap();
        assert!(old.by_node.is_empty());
    }

    #[test]
    fn duplicate_and_stale_records_change_nothing() {
        let mut st = running(1);
        record(&mut st, vec![started(1, 1, 1)]);
        assert_eq!(
            record(&mut st, vec![started(1, 1, 1)]),
            Response::Recorded { applied: 0 }
        );
        // A different node cannot finish an attempt it does not own.
        let r = st.apply(&Command::RecordAttempts {
            at_ms: 11,
            node: NodeId(2),
            events: vec![finished(
                1,
                1,
                1,
                Outcome::Confirmed,
                Next::Final(FinalState::Confirmed),
            )],
        });
        assert_eq!(r, Response::Recorded { applied: 0 });
        assert_eq!(st.campaign(CampaignId(1)).unwrap().counts.in_flight, 1);
    }

    fn handover(cseq: u32) -> CallHandover {
        CallHandover {
            call_id: "c1@campanile".into(),
            local_tag: "ours".into(),
            remote_tag: "theirs".into(),
            local_party: "<sip:alert@127.0.0.1>".into(),
            remote_party: "<sip:+393470000001@127.0.0.1>".into(),
            remote_target: "sip:+393470000001@127.0.0.1:5070".into(),
            route_set: vec![],
            local_cseq: cseq,
            via_transport: "UDP".into(),
            remote_rtp: "127.0.0.1:40000".into(),
            remote_rtcp: None,
            payload_type: 0,
            telephone_event: Some(101),
            ssrc: 7,
            at_ms: 100,
            frame: 0,
            seq: 1,
            ts: 160,
            answered_ms: 100,
            moved_from: vec![],
        }
    }

    fn answered(c: u64, s: u64, attempt: u32, cseq: u32) -> AttemptEvent {
        AttemptEvent::Answered {
            campaign: CampaignId(c),
            subscriber: SubscriberId(s),
            attempt,
            call: Box::new(handover(cseq)),
        }
    }

    #[test]
    fn an_answered_call_is_handed_over_and_only_its_new_node_ends_it() {
        let mut st = running(2);
        record(&mut st, vec![started(1, 1, 1), started(1, 2, 1)]);
        // Only the node on the call describes it, for the attempt it is on.
        assert_eq!(
            by(&mut st, 2, 11, vec![answered(1, 1, 1, 1)]),
            Response::Recorded { applied: 0 }
        );
        assert_eq!(
            record(&mut st, vec![answered(1, 1, 2, 1), answered(1, 1, 1, 1)]),
            Response::Recorded { applied: 1 }
        );
        assert_eq!(st.answered_calls_on(NodeId(1)).len(), 1);
        // Subscriber 2's call was never answered: it does not move.
        let moves = vec![
            (CampaignId(1), SubscriberId(1), NodeId(2)),
            (CampaignId(1), SubscriberId(2), NodeId(2)),
        ];
        let hand_over = Command::HandOverCalls {
            at_ms: 30,
            from: NodeId(1),
            moves: moves.clone(),
        };
        assert_eq!(st.apply(&hand_over), Response::Recorded { applied: 1 });
        assert_eq!(st.handovers_applied(), 1);
        let t = st.task(CampaignId(1), SubscriberId(1)).unwrap();
        assert_eq!(
            t.state,
            TaskState::InFlight {
                attempt: 1,
                node: NodeId(2),
                since_ms: 30,
                epoch: None,
            }
        );
        assert_eq!(t.attempts, 1, "the same attempt goes on");
        // Repeating the command changes nothing.
        assert_eq!(st.apply(&hand_over), Response::Recorded { applied: 0 });
        assert_eq!(st.handovers_applied(), 1);
        // The old node is fenced off; the new one updates the dialog and ends the call.
        let confirmed = || {
            finished(
                1,
                1,
                1,
                Outcome::Confirmed,
                Next::Final(FinalState::Confirmed),
            )
        };
        let hung_up = finished(
            1,
            1,
            1,
            Outcome::HungUp { after_ms: 900 },
            Next::RetryAt(100),
        );
        assert_eq!(
            record(&mut st, vec![answered(1, 1, 1, 9), hung_up]),
            Response::Recorded { applied: 0 }
        );
        assert_eq!(
            by(&mut st, 2, 40, vec![answered(1, 1, 1, 101)]),
            Response::Recorded { applied: 1 }
        );
        let t = st.task(CampaignId(1), SubscriberId(1)).unwrap();
        assert_eq!(t.handover.as_ref().map(|h| h.local_cseq), Some(101));
        assert_eq!(
            by(&mut st, 2, 41, vec![confirmed()]),
            Response::Recorded { applied: 1 }
        );
        let t = st.task(CampaignId(1), SubscriberId(1)).unwrap();
        assert_eq!(t.state, TaskState::Final(FinalState::Confirmed));
        assert!(
            t.handover.is_none(),
            "an ended call leaves nothing to take over"
        );
        assert!(st.answered_calls_on(NodeId(2)).is_empty());
    }

    #[test]
    fn a_confirmation_heard_before_a_call_moved_still_counts() {
        let mut st = running(3);
        record(
            &mut st,
            vec![started(1, 1, 1), started(1, 2, 1), started(1, 3, 1)],
        );
        record(
            &mut st,
            vec![
                answered(1, 1, 1, 1),
                answered(1, 2, 1, 1),
                answered(1, 3, 1, 1),
            ],
        );
        let moves = (1..=3)
            .map(|s| (CampaignId(1), SubscriberId(s), NodeId(2)))
            .collect();
        let hand_over = Command::HandOverCalls {
            at_ms: 30,
            from: NodeId(1),
            moves,
        };
        assert_eq!(st.apply(&hand_over), Response::Recorded { applied: 3 });
        // A node that never carried the call has no say, whatever it claims.
        let claim = confirmed_by_one(1, 1, 1);
        assert_eq!(
            by(&mut st, 3, 33, vec![claim]),
            Response::Recorded { applied: 0 }
        );
        // Node 2 continued subscriber 1's call: its dialog record keeps who carried it before.
        assert_eq!(
            by(&mut st, 2, 34, vec![answered(1, 1, 1, 101)]),
            Response::Recorded { applied: 1 }
        );
        let carried = |st: &State| {
            let t = st.task(CampaignId(1), SubscriberId(1)).unwrap();
            t.handover.as_ref().map(|h| h.moved_from.clone())
        };
        assert_eq!(carried(&st), Some(vec![NodeId(1)]));
        // Node 1 heard subscriber 1 press 1 and subscriber 2 press 9 before its calls moved; its
        // records reach the log only now. Subscriber 3 hung up on it: that is node 2's to find out.
        let late = vec![
            confirmed_by_one(1, 1, 1),
            finished(1, 2, 1, Outcome::OptOut, Next::Final(FinalState::OptedOut)),
            finished(1, 3, 1, Outcome::HungUp { after_ms: 5 }, Next::RetryAt(100)),
        ];
        assert_eq!(by(&mut st, 1, 35, late), Response::Recorded { applied: 2 });
        let state = |st: &State, sub| st.task(CampaignId(1), SubscriberId(sub)).unwrap().state;
        assert_eq!(state(&st, 1), TaskState::Final(FinalState::Confirmed));
        assert_eq!(state(&st, 2), TaskState::Final(FinalState::OptedOut));
        assert!(matches!(
            state(&st, 3),
            TaskState::InFlight {
                node: NodeId(2),
                ..
            }
        ));
        let c = st.campaign(CampaignId(1)).unwrap();
        assert_eq!(
            c.by_node[&NodeId(1)].confirmed,
            1,
            "counted where it was heard"
        );
        // The new owner's own end of those calls changes nothing now; of the third it does.
        let by_new = vec![
            finished(1, 1, 1, Outcome::Interrupted, Next::RetryAt(100)),
            finished(1, 3, 1, Outcome::HungUp { after_ms: 5 }, Next::RetryAt(100)),
        ];
        assert_eq!(
            by(&mut st, 2, 40, by_new),
            Response::Recorded { applied: 1 }
        );
        assert_eq!(state(&st, 1), TaskState::Final(FinalState::Confirmed));
        // Once the attempt has ended (here by its new owner) only the citizen's own answer is
        // recorded about it: see `a_late_answer_stands_after_its_attempt_ended`.
        assert_eq!(
            by(
                &mut st,
                1,
                50,
                vec![finished(1, 3, 1, Outcome::NotConfirmed, Next::RetryAt(100))]
            ),
            Response::Recorded { applied: 0 }
        );
    }

    #[test]
    fn a_late_answer_stands_after_its_attempt_ended() {
        // Subscriber 5 is never called here: the campaign stays open throughout.
        let mut st = running(5);
        let subs = 1..=4;
        record(&mut st, subs.clone().map(|s| started(1, s, 1)).collect());
        record(
            &mut st,
            subs.clone().map(|s| answered(1, s, 1, 1)).collect(),
        );
        let moves = subs
            .map(|s| (CampaignId(1), SubscriberId(s), NodeId(2)))
            .collect();
        st.apply(&Command::HandOverCalls {
            at_ms: 30,
            from: NodeId(1),
            moves,
        });
        // Node 2's re-INVITEs find no call (node 1 had ended them after the citizens' keys); it
        // ends the attempts: 1 and 2 to be called again, 3 exhausted, 4 as an invalid number.
        let ended = vec![
            finished(1, 1, 1, Outcome::NotConfirmed, Next::RetryAt(100)),
            finished(1, 2, 1, Outcome::NotConfirmed, Next::RetryAt(100)),
            finished(
                1,
                3,
                1,
                Outcome::NotConfirmed,
                Next::Final(FinalState::Exhausted),
            ),
            finished(
                1,
                4,
                1,
                Outcome::InvalidNumber { code: 404 },
                Next::Final(FinalState::Invalid),
            ),
        ];
        assert_eq!(by(&mut st, 2, 40, ended), Response::Recorded { applied: 4 });
        // Subscriber 2 is already being called again, by node 3.
        by(&mut st, 3, 45, vec![started(1, 2, 2)]);
        assert_eq!(st.campaign(CampaignId(1)).unwrap().counts.pending, 2);
        // Node 1's records of what the citizens pressed arrive only now.
        let late = vec![
            confirmed_by_one(1, 1, 1),
            confirmed_by_one(1, 2, 1),
            finished(1, 3, 1, Outcome::OptOut, Next::Final(FinalState::OptedOut)),
            confirmed_by_one(1, 4, 1),
            // An attempt the task never had, and a key that is not an answer, change nothing.
            confirmed_by_one(1, 1, 7),
            finished(1, 2, 1, Outcome::Heard, Next::Final(FinalState::Confirmed)),
        ];
        assert_eq!(by(&mut st, 1, 50, late), Response::Recorded { applied: 3 });
        let task = |sub| st.task(CampaignId(1), SubscriberId(sub)).unwrap();
        assert_eq!(task(1).state, TaskState::Final(FinalState::Confirmed));
        assert_eq!(task(2).state, TaskState::Final(FinalState::Confirmed));
        assert_eq!(task(3).state, TaskState::Final(FinalState::OptedOut));
        assert!(st.subscribers[&SubscriberId(3)].opted_out);
        assert_eq!(task(4).state, TaskState::Final(FinalState::Invalid));
        let due: Vec<_> = st
            .due_tasks(1_000, 10)
            .iter()
            .map(|t| t.subscriber)
            .collect();
        assert_eq!(
            due,
            vec![SubscriberId(5)],
            "only the subscriber never called is due"
        );
        let c = st.campaign(CampaignId(1)).unwrap();
        assert_eq!(c.by_node[&NodeId(1)].confirmed, 2);
        assert_eq!((c.counts.pending, c.counts.in_flight), (1, 0));
        // Node 3's call to subscriber 2 plays on; its end changes nothing, nor does a repeat.
        let again = vec![
            finished(1, 2, 2, Outcome::NotConfirmed, Next::RetryAt(200)),
            confirmed_by_one(1, 1, 1),
        ];
        assert_eq!(by(&mut st, 3, 60, again), Response::Recorded { applied: 0 });
    }

    #[test]
    fn reclaimed_calls_go_to_another_node_and_the_old_owner_is_fenced_off() {
        let mut st = running(1);
        record(&mut st, vec![started(1, 1, 1)]);
        assert_eq!(
            st.nodes_with_calls_in_flight(NodeId(2)),
            [NodeId(1)].into_iter().collect()
        );
        assert_eq!(
            st.apply(&Command::ReclaimTasks {
                at_ms: 20,
                from: NodeId(1)
            }),
            Response::Recorded { applied: 1 }
        );
        let t = st.task(CampaignId(1), SubscriberId(1)).unwrap();
        assert_eq!(t.state, TaskState::Pending);
        assert_eq!(t.attempts, 0, "an interrupted attempt is given back");
        assert_eq!(st.due_tasks(20, 10).len(), 1);
        // Node 2 takes it; node 1's late outcome for its old attempt changes nothing.
        let by_two = st.apply(&Command::RecordAttempts {
            at_ms: 21,
            node: NodeId(2),
            events: vec![started(1, 1, 1)],
        });
        assert_eq!(by_two, Response::Recorded { applied: 1 });
        assert_eq!(
            record(
                &mut st,
                vec![finished(
                    1,
                    1,
                    1,
                    Outcome::Confirmed,
                    Next::Final(FinalState::Confirmed)
                )]
            ),
            Response::Recorded { applied: 0 }
        );
        assert!(st
            .nodes_with_calls_in_flight(NodeId(1))
            .contains(&NodeId(2)));
    }

    #[test]
    fn an_import_batch_creates_the_new_and_names_the_duplicates() {
        let mut st = State::default();
        st.apply(&sub(2, None));
        let new = |n: u32| match sub(n, None) {
            Command::CreateSubscriber { subscriber, .. } => subscriber,
            _ => unreachable!(),
        };
        let r = st.apply(&Command::CreateSubscribers {
            at_ms: 3,
            subscribers: vec![new(1), new(2), new(3), new(1)],
        });
        assert_eq!(
            r,
            Response::Imported(vec![
                Imported::Created(SubscriberId(2)),
                Imported::Duplicate(SubscriberId(1)),
                Imported::Created(SubscriberId(3)),
                Imported::Duplicate(SubscriberId(2)),
            ])
        );
        assert_eq!(st.subscriber_count(), 3);
    }

    #[test]
    fn leases_fence_starts_and_move_only_when_expired() {
        let mut st = running(1);
        let p = partition_of(SubscriberId(1));
        let assign = |st: &mut State, at_ms: u64, node: u64| {
            st.apply(&Command::AssignLeases {
                at_ms,
                lease_ms: 100,
                grants: vec![(p, NodeId(node))],
            })
        };
        assert_eq!(assign(&mut st, 10, 1), Response::Recorded { applied: 1 });
        assert_eq!(st.lease(p).map(|l| (l.node, l.epoch)), Some((NodeId(1), 1)));
        // Without an epoch, or from another node, or under a wrong epoch: refused.
        assert_eq!(
            by(&mut st, 1, 20, vec![started(1, 1, 1)]),
            Response::Recorded { applied: 0 }
        );
        assert_eq!(
            by(&mut st, 2, 20, vec![started_under(1, 1, 1, 1)]),
            Response::Recorded { applied: 0 }
        );
        assert_eq!(
            by(&mut st, 1, 20, vec![started_under(1, 1, 1, 7)]),
            Response::Recorded { applied: 0 }
        );
        // A held lease does not move; renewal keeps it.
        assert_eq!(assign(&mut st, 50, 2), Response::Recorded { applied: 0 });
        st.apply(&Command::RenewLeases {
            at_ms: 90,
            node: NodeId(1),
            lease_ms: 100,
            channels_in_use: None,
            capacity: None,
        });
        assert_eq!(assign(&mut st, 150, 2), Response::Recorded { applied: 0 });
        assert_eq!(
            by(&mut st, 1, 160, vec![started_under(1, 1, 1, 1)]),
            Response::Recorded { applied: 1 }
        );
        // Node 1 stops renewing: after expiry the partition moves with a new epoch, node 1's call is
        // given back, its late outcome is refused, and node 2 dials under epoch 2.
        assert_eq!(
            by(&mut st, 1, 195, vec![started_under(1, 1, 2, 1)]),
            Response::Recorded { applied: 0 }
        );
        assert_eq!(assign(&mut st, 191, 2), Response::Recorded { applied: 1 });
        assert_eq!(st.lease(p).map(|l| (l.node, l.epoch)), Some((NodeId(2), 2)));
        let t = st.task(CampaignId(1), SubscriberId(1)).unwrap();
        assert_eq!((t.state, t.attempts), (TaskState::Pending, 0));
        let no_answer = finished(1, 1, 1, Outcome::NoAnswer, Next::RetryAt(1_000));
        assert_eq!(
            by(&mut st, 1, 200, vec![no_answer]),
            Response::Recorded { applied: 0 }
        );
        assert_eq!(
            by(&mut st, 1, 200, vec![started_under(1, 1, 1, 1)]),
            Response::Recorded { applied: 0 }
        );
        assert_eq!(
            by(&mut st, 2, 200, vec![started_under(1, 1, 1, 2)]),
            Response::Recorded { applied: 1 }
        );
        // An outcome carries the epoch its attempt started under: another epoch's is stale.
        let outcome_under = |epoch| AttemptEvent::Finished {
            campaign: CampaignId(1),
            subscriber: SubscriberId(1),
            attempt: 1,
            outcome: Outcome::Busy,
            next: Next::RetryAt(1_000),
            epoch: Some(epoch),
        };
        assert_eq!(
            by(&mut st, 2, 201, vec![outcome_under(1)]),
            Response::Recorded { applied: 0 }
        );
        assert_eq!(
            by(&mut st, 2, 201, vec![outcome_under(2), outcome_under(2)]),
            Response::Recorded { applied: 1 },
            "applied once"
        );
        // A released lease can be granted at once, and its former holder's renewal does not
        // bring it back.
        st.apply(&Command::ReleaseLeases {
            at_ms: 210,
            node: NodeId(2),
            partitions: vec![p],
        });
        st.apply(&Command::RenewLeases {
            at_ms: 210,
            node: NodeId(2),
            lease_ms: 100,
            channels_in_use: None,
            capacity: None,
        });
        assert_eq!(assign(&mut st, 211, 3), Response::Recorded { applied: 1 });
        assert_eq!(st.lease(p).map(|l| l.epoch), Some(3));
        assert_eq!(
            st.heartbeats().collect::<Vec<_>>(),
            vec![(NodeId(1), 90), (NodeId(2), 210)]
        );
        // Renewals are not serialised: one sent earlier but applied later moves neither the
        // heartbeat nor the lease back.
        let renew = |at_ms| Command::RenewLeases {
            at_ms,
            node: NodeId(3),
            lease_ms: 100,
            channels_in_use: None,
            capacity: None,
        };
        st.apply(&renew(260));
        let renewed = st.lease(p).map(|l| l.expires_ms);
        assert_eq!(renewed, Some(360));
        st.apply(&renew(240));
        assert_eq!(st.lease(p).map(|l| l.expires_ms), renewed);
        assert_eq!(st.heartbeats().last(), Some((NodeId(3), 260)));
    }

    #[test]
    fn a_paused_campaign_dials_nobody_lets_calls_end_and_resumes() {
        let mut st = running(2);
        record(&mut st, vec![started(1, 1, 1)]);
        let pause = Command::PauseCampaign {
            at_ms: 6,
            id: CampaignId(1),
        };
        assert_eq!(st.apply(&pause), Response::Ok);
        assert!(matches!(st.apply(&pause), Response::Refused(_)));
        assert!(st.due_tasks(u64::MAX, 10).is_empty());
        // Nothing starts; the call that was up ends and waits for the resume.
        assert_eq!(
            record(&mut st, vec![started(1, 2, 1)]),
            Response::Recorded { applied: 0 }
        );
        assert_eq!(
            record(
                &mut st,
                vec![finished(1, 1, 1, Outcome::Interrupted, Next::RetryAt(7))]
            ),
            Response::Recorded { applied: 1 }
        );
        assert!(st.due_tasks(u64::MAX, 10).is_empty());
        assert_eq!(
            st.apply(&Command::ResumeCampaign {
                at_ms: 8,
                id: CampaignId(1)
            }),
            Response::Ok
        );
        assert_eq!(st.due_tasks(u64::MAX, 10).len(), 2);
        assert_eq!(
            st.campaign(CampaignId(1)).unwrap().state,
            CampaignState::Running
        );
        // A paused campaign can be cancelled.
        st.apply(&pause);
        assert_eq!(
            st.apply(&Command::CancelCampaign {
                at_ms: 9,
                id: CampaignId(1)
            }),
            Response::Ok
        );
        assert_eq!(st.campaign(CampaignId(1)).unwrap().counts.cancelled, 2);
    }

    #[test]
    fn partitions_spread_dense_ids() {
        let mut counts = vec![0u32; PARTITIONS as usize];
        for id in 1..=25_600u64 {
            counts[partition_of(SubscriberId(id)) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 50 && *max < 150, "min {min} max {max}");
    }

    #[test]
    fn tokens_and_nodes_are_registered_idempotently() {
        let mut st = State::default();
        let token = ApiToken {
            scope: None,
            sha256: "ab".repeat(32),
            label: "admin token of node 1".into(),
            created_ms: 1,
        };
        st.apply(&Command::AddToken {
            token: token.clone(),
        });
        st.apply(&Command::AddToken {
            token: ApiToken {
                label: "other".into(),
                ..token.clone()
            },
        });
        assert_eq!(st.token_count(), 1);
        assert_eq!(st.token(&token.sha256), Some(&token));
        let info = |at: u64| NodeInfo {
            id: NodeId(2),
            datacenter: "dc-b".into(),
            raft_addr: "127.0.0.1:7002".into(),
            http_addr: "127.0.0.1:8002".into(),
            registered_ms: at,
            started_ms: at,
        };
        st.apply(&Command::RegisterNode {
            at_ms: 100,
            node: info(100),
        });
        st.apply(&Command::RegisterNode {
            at_ms: 200,
            node: info(200),
        });
        let n = st.node(NodeId(2)).unwrap();
        assert_eq!((n.registered_ms, n.started_ms), (100, 200));
        st.apply(&Command::ForgetNode {
            at_ms: 300,
            node: NodeId(2),
        });
        assert!(st.node(NodeId(2)).is_none());
        // Snapshots of the previous release have neither field and still load.
        let old =
            r#"{"next_subscriber":0,"next_campaign":0,"subscribers":{},"campaigns":{},"tasks":{}}"#;
        let loaded: State = serde_json::from_str(old).unwrap();
        assert_eq!(loaded.token_count(), 0);
    }

    #[test]
    fn interrupted_attempts_are_given_back() {
        let mut st = running(1);
        record(&mut st, vec![started(1, 1, 1)]);
        assert_eq!(st.in_flight_on(NodeId(1)).len(), 1);
        record(
            &mut st,
            vec![finished(1, 1, 1, Outcome::Interrupted, Next::RetryAt(10))],
        );
        let t = st.task(CampaignId(1), SubscriberId(1)).unwrap();
        assert_eq!(t.attempts, 0);
        assert_eq!(st.campaign(CampaignId(1)).unwrap().counts.attempts, 0);
        assert_eq!(
            record(&mut st, vec![started(1, 1, 1)]),
            Response::Recorded { applied: 1 }
        );
    }

    #[test]
    fn cancel_finishes_every_open_task_and_ignores_late_records() {
        let mut st = running(3);
        record(&mut st, vec![started(1, 1, 1)]);
        st.apply(&Command::CancelCampaign {
            at_ms: 6,
            id: CampaignId(1),
        });
        let c = st.campaign(CampaignId(1)).unwrap();
        assert_eq!(c.state, CampaignState::Cancelled);
        assert_eq!(c.counts.cancelled, 3);
        assert_eq!(c.counts.open(), 0);
        assert!(st.due_tasks(u64::MAX, 10).is_empty());
        assert_eq!(
            record(
                &mut st,
                vec![finished(
                    1,
                    1,
                    1,
                    Outcome::Confirmed,
                    Next::Final(FinalState::Confirmed)
                )]
            ),
            Response::Recorded { applied: 0 }
        );
    }

    #[test]
    fn snapshot_round_trip_rebuilds_indexes() {
        let st = running(2);
        let json = serde_json::to_vec(&st).unwrap();
        let mut back: State = serde_json::from_slice(&json).unwrap();
        back.rebuild_indexes();
        assert_eq!(back.due_tasks(5, 10).len(), 2);
        assert!(back
            .subscriber_by_phone("default", &PhoneNumber::parse("+393470000001").unwrap())
            .is_some());
        assert!(matches!(back.apply(&sub(1, None)), Response::Refused(_)));
    }

    #[test]
    fn unknown_ids_are_refused_not_panicked_on() {
        let mut st = State::default();
        assert!(matches!(
            st.apply(&Command::StartCampaign {
                at_ms: 1,
                id: CampaignId(9)
            }),
            Response::Refused(Refusal::UnknownCampaign(_))
        ));
        assert!(matches!(
            st.apply(&Command::DeleteSubscriber {
                at_ms: 1,
                id: SubscriberId(9)
            }),
            Response::Refused(Refusal::UnknownSubscriber(_))
        ));
        assert_eq!(
            record(&mut st, vec![started(9, 9, 1)]),
            Response::Recorded { applied: 0 }
        );
    }

    fn arb_command() -> impl proptest::strategy::Strategy<Value = Command> {
        use proptest::prelude::*;
        let outcome = prop_oneof![
            Just(Outcome::Confirmed),
            Just(Outcome::Busy),
            Just(Outcome::NoAnswer),
            Just(Outcome::Interrupted),
            Just(Outcome::TrunkRejected { code: 503 }),
            Just(Outcome::OptOut),
            Just(Outcome::InvalidNumber { code: 404 }),
        ];
        let next = prop_oneof![
            (0u64..100).prop_map(Next::RetryAt),
            Just(Next::Final(FinalState::Confirmed)),
            Just(Next::Final(FinalState::Exhausted)),
            Just(Next::Final(FinalState::Invalid)),
        ];
        let event = prop_oneof![
            (1u64..4, 1u64..12, 0u32..4).prop_map(|(c, s, a)| started(c, s, a)),
            (1u64..4, 1u64..12, 0u32..4, outcome, next)
                .prop_map(|(c, s, a, o, n)| finished(c, s, a, o, n)),
            (1u64..4, 1u64..12, 0u32..4, 0u32..3).prop_map(|(c, s, a, q)| answered(c, s, a, q)),
        ];
        prop_oneof![
            (1u32..12).prop_map(|n| sub(n, if n % 2 == 0 { Some("porto") } else { None })),
            proptest::collection::vec(1u32..12, 0..5).prop_map(|ns| {
                Command::CreateSubscribers {
                    at_ms: 2,
                    subscribers: ns
                        .into_iter()
                        .filter_map(|n| match sub(n, None) {
                            Command::CreateSubscriber { subscriber, .. } => Some(subscriber),
                            _ => None,
                        })
                        .collect(),
                }
            }),
            Just(campaign(Audience::All)),
            Just(campaign(Audience::Zones(vec!["porto".into()]))),
            (1u64..4).prop_map(|id| Command::StartCampaign {
                at_ms: 5,
                id: CampaignId(id)
            }),
            (1u64..4).prop_map(|id| Command::CancelCampaign {
                at_ms: 6,
                id: CampaignId(id)
            }),
            (1u64..4).prop_map(|id| Command::PauseCampaign {
                at_ms: 6,
                id: CampaignId(id)
            }),
            (1u64..4).prop_map(|id| Command::ResumeCampaign {
                at_ms: 6,
                id: CampaignId(id)
            }),
            (1u64..12).prop_map(|id| Command::DeleteSubscriber {
                at_ms: 7,
                id: SubscriberId(id)
            }),
            (1u64..3, proptest::collection::vec(event, 0..6)).prop_map(|(node, events)| {
                Command::RecordAttempts {
                    at_ms: 8,
                    node: NodeId(node),
                    events,
                }
            }),
            (1u64..3).prop_map(|n| Command::ReclaimTasks {
                at_ms: 9,
                from: NodeId(n)
            }),
            (1u64..3, 1u64..4, 1u64..12, 1u64..3).prop_map(|(from, c, s, to)| {
                Command::HandOverCalls {
                    at_ms: 9,
                    from: NodeId(from),
                    moves: vec![(CampaignId(c), SubscriberId(s), NodeId(to))],
                }
            }),
            (0u16..3, 1u64..3, 0u64..20).prop_map(|(p, n, at)| Command::AssignLeases {
                at_ms: at,
                lease_ms: 5,
                grants: vec![(p, NodeId(n))],
            }),
            (1u64..3, 0u64..20).prop_map(|(n, at)| Command::RenewLeases {
                at_ms: at,
                node: NodeId(n),
                lease_ms: 5,
                channels_in_use: None,
                capacity: None,
            }),
            (1u64..3).prop_map(|n| Command::ForgetNode {
                at_ms: 9,
                node: NodeId(n)
            }),
        ]
    }

    /// Counts and the due queue are kept incrementally; they must always equal a recount.
    fn check_invariants(st: &State) {
        for c in st.campaigns() {
            let mut recount = Counts::default();
            for t in st.tasks(c.id) {
                recount.enter(&t.state);
            }
            let k = c.counts;
            assert_eq!(
                (
                    k.pending,
                    k.in_flight,
                    k.confirmed,
                    k.exhausted,
                    k.invalid,
                    k.opted_out,
                    k.cancelled
                ),
                (
                    recount.pending,
                    recount.in_flight,
                    recount.confirmed,
                    recount.exhausted,
                    recount.invalid,
                    recount.opted_out,
                    recount.cancelled
                ),
                "campaign {}",
                c.id
            );
            assert_eq!(k.targeted as usize, st.tasks(c.id).count());
            if c.state == CampaignState::Running {
                assert!(
                    k.open() > 0,
                    "a running campaign with nothing open should have completed"
                );
            }
        }
        let mut rebuilt = st.clone();
        rebuilt.rebuild_indexes();
        assert_eq!(rebuilt.due, st.due, "due queue drifted from the tasks");
    }

    proptest::proptest! {
        #[test]
        fn any_command_sequence_keeps_counts_and_queue_consistent(
            cmds in proptest::collection::vec(arb_command(), 0..60)
        ) {
            let mut st = State::default();
            for cmd in &cmds {
                st.apply(cmd);
                check_invariants(&st);
            }
        }
    }
}
