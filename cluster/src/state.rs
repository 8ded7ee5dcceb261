//! The domain state machine: what every node holds once a command is committed.
//!
//! `State::apply` is deterministic — no clock, no randomness, no I/O — so every replica that applies the
//! same log reaches the same state. Indexes that can be derived (phone → subscriber, the due queue) are
//! skipped by serde and rebuilt by `State::rebuild_indexes` after a snapshot is loaded.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{Command, Imported, Refusal, Response};
use crate::domain::{
    partition_of, ApiToken, AttemptEvent, CallTask, Campaign, CampaignId, CampaignState, Counts,
    FinalState, Lease, NewSubscriber, Next, NodeId, NodeInfo, Outcome, PhoneNumber, Subscriber,
    SubscriberId, TaskState, PARTITIONS,
};

/// Key of the due queue: priority rank first, then due time, so the dialer pops emergencies first.
pub type DueKey = (u8, u64, CampaignId, SubscriberId);

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
    #[serde(skip)]
    phones: BTreeMap<PhoneNumber, SubscriberId>,
    #[serde(skip)]
    due: BTreeSet<DueKey>,
}

impl State {
    /// Applies one committed command. Never panics on any command, well-formed or not.
    pub fn apply(&mut self, cmd: &Command) -> Response {
        match cmd {
            Command::CreateSubscriber { at_ms, subscriber } => {
                match self.create_subscriber(subscriber, *at_ms) {
                    Imported::Created(id) => Response::SubscriberCreated(id),
                    Imported::Duplicate(existing) => Response::Refused(Refusal::DuplicatePhone(
                        subscriber.phone.masked(),
                        existing,
                    )),
                }
            }
            Command::CreateSubscribers { at_ms, subscribers } => Response::Imported(
                subscribers
                    .iter()
                    .map(|s| self.create_subscriber(s, *at_ms))
                    .collect(),
            ),
            Command::DeleteSubscriber { at_ms, id } => {
                let Some(sub) = self.subscribers.remove(id) else {
                    return Response::Refused(Refusal::UnknownSubscriber(*id));
                };
                self.phones.remove(&sub.phone);
                // Erasure: open tasks for this person end as cancelled; nobody dials a deleted number.
                let campaign_ids: Vec<CampaignId> = self.tasks.keys().copied().collect();
                for cid in campaign_ids {
                    self.finish_task_if_open(cid, *id, FinalState::Cancelled, *at_ms);
                }
                Response::Ok
            }
            Command::CreateCampaign { at_ms, spec } => {
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
                let applied = events
                    .iter()
                    .filter(|e| self.record(*node, e, *at_ms))
                    .count();
                Response::Recorded {
                    applied: applied as u32,
                }
            }
            Command::AddToken { token } => {
                self.tokens
                    .entry(token.sha256.clone())
                    .or_insert_with(|| token.clone());
                Response::Ok
            }
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
            Command::RenewLeases {
                at_ms,
                node,
                lease_ms,
            } => {
                self.heartbeats.insert(*node, *at_ms);
                let mut renewed = 0;
                // Only a live lease is renewed: an expired or released one must be granted anew
                // (with a new epoch) by the leader.
                for lease in self
                    .leases
                    .values_mut()
                    .filter(|l| l.node == *node && l.expires_ms > *at_ms)
                {
                    lease.expires_ms = at_ms.saturating_add(*lease_ms);
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
                for l in self.leases.values_mut().filter(|l| l.node == *node) {
                    l.expires_ms = 0;
                }
                Response::Recorded {
                    applied: self.reclaim(*node, *at_ms),
                }
            }
        }
    }

    /// Gives back every attempt `node` has in flight, as interrupted and due at once: the node is gone
    /// (or no longer dials) and another one must call these citizens. Late records from `node` about
    /// these attempts are then refused, because the task no longer names it.
    fn reclaim(&mut self, node: NodeId, at_ms: u64) -> u32 {
        self.reclaim_where(node, at_ms, |_| true)
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
                TaskState::InFlight { attempt, .. } => Some(AttemptEvent::Finished {
                    campaign: t.campaign,
                    subscriber: t.subscriber,
                    attempt,
                    outcome: Outcome::Interrupted,
                    next: Next::RetryAt(at_ms),
                }),
                _ => None,
            })
            .collect();
        stale.iter().filter(|e| self.record(node, e, at_ms)).count() as u32
    }

    fn create_subscriber(&mut self, subscriber: &NewSubscriber, at_ms: u64) -> Imported {
        if let Some(existing) = self.phones.get(&subscriber.phone) {
            return Imported::Duplicate(*existing);
        }
        self.next_subscriber += 1;
        let id = SubscriberId(self.next_subscriber);
        self.phones.insert(subscriber.phone.clone(), id);
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
        let rank = campaign.spec.priority.rank();
        let mut tasks = BTreeMap::new();
        let mut counts = Counts::default();
        for sub in self.subscribers.values() {
            if !sub.verified || sub.opted_out || !campaign.spec.audience.includes(sub) {
                continue;
            }
            tasks.insert(
                sub.id,
                CallTask {
                    campaign: id,
                    subscriber: sub.id,
                    phone: sub.phone.clone(),
                    language: sub.language.clone(),
                    attempts: 0,
                    state: TaskState::Pending,
                    next_due_ms: at_ms,
                    last_outcome: None,
                    updated_ms: at_ms,
                },
            );
            self.due.insert((rank, at_ms, id, sub.id));
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
                let key = (rank, t.next_due_ms, id, t.subscriber);
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
                self.due
                    .remove(&(rank, task.next_due_ms, campaign, subscriber));
                task.attempts = *attempt;
                task.state = TaskState::InFlight {
                    attempt: *attempt,
                    node,
                    since_ms: at_ms,
                };
            }
            AttemptEvent::Finished {
                attempt,
                outcome,
                next,
                ..
            } => {
                let TaskState::InFlight {
                    attempt: current,
                    node: owner,
                    ..
                } = before
                else {
                    return false;
                };
                if current != *attempt || owner != node {
                    return false;
                }
                let counts = &mut c.counts;
                if !outcome.is_subscribers_attempt() {
                    // Not the subscriber's attempt: give it back.
                    task.attempts = task.attempts.saturating_sub(1);
                } else {
                    counts.attempts += 1;
                    if outcome.answered() {
                        counts.answered += 1;
                    }
                }
                task.last_outcome = Some(outcome.clone());
                match next {
                    Next::RetryAt(due) => {
                        task.state = TaskState::Pending;
                        task.next_due_ms = *due;
                        if !paused {
                            self.due.insert((rank, *due, campaign, subscriber));
                        }
                    }
                    Next::Final(f) => task.state = TaskState::Final(*f),
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
            self.due.remove(&(
                c.spec.priority.rank(),
                task.next_due_ms,
                campaign,
                subscriber,
            ));
        }
        c.counts.leave(&task.state);
        task.state = TaskState::Final(to);
        task.updated_ms = at_ms;
        c.counts.enter(&task.state);
        self.complete_if_done(campaign, at_ms);
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
            .map(|s| (s.phone.clone(), s.id))
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
                    self.due.insert((rank, t.next_due_ms, *cid, t.subscriber));
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

    /// Each node's last heartbeat (lease renewal), on its own clock.
    pub fn heartbeats(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.heartbeats.iter().map(|(n, t)| (*n, *t))
    }

    /// `due_tasks` restricted to the subscribers `mine` accepts (a node's leased partitions).
    pub fn due_tasks_where(
        &self,
        now_ms: u64,
        limit: usize,
        mine: impl Fn(SubscriberId) -> bool,
    ) -> Vec<&CallTask> {
        let mut out = Vec::new();
        for rank in 0..=2u8 {
            let range = (rank, 0, CampaignId(0), SubscriberId(0))
                ..=(rank, now_ms, CampaignId(u64::MAX), SubscriberId(u64::MAX));
            for (_, _, cid, sid) in self.due.range(range) {
                if out.len() >= limit {
                    return out;
                }
                if !mine(*sid) {
                    continue;
                }
                if let Some(t) = self.task(*cid, *sid) {
                    out.push(t);
                }
            }
        }
        out
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

    pub fn subscriber_by_phone(&self, phone: &PhoneNumber) -> Option<&Subscriber> {
        self.phones
            .get(phone)
            .and_then(|id| self.subscribers.get(id))
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

    /// Pending tasks of running campaigns due at or before `now_ms`, emergencies first, oldest first.
    pub fn due_tasks(&self, now_ms: u64, limit: usize) -> Vec<&CallTask> {
        self.due_tasks_where(now_ms, limit, |_| true)
    }

    /// The earliest due time of any pending task, to know how long the dialer may sleep.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.due.iter().map(|(_, due, _, _)| *due).min()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::*;

    fn sub(n: u32, zone: Option<&str>) -> Command {
        Command::CreateSubscriber {
            at_ms: 1,
            subscriber: NewSubscriber {
                phone: PhoneNumber::parse(&format!("+39347{n:07}")).unwrap(),
                name: None,
                language: "it".into(),
                zone: zone.map(String::from),
                verified: true,
            },
        }
    }

    fn campaign(audience: Audience) -> Command {
        Command::CreateCampaign {
            at_ms: 2,
            spec: CampaignSpec {
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
        }
    }

    fn record(st: &mut State, events: Vec<AttemptEvent>) -> Response {
        st.apply(&Command::RecordAttempts {
            at_ms: 10,
            node: NodeId(1),
            events,
        })
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

    #[test]
    fn a_task_walks_to_confirmed_and_the_campaign_completes() {
        let mut st = State::default();
        st.apply(&sub(1, None));
        st.apply(&campaign(Audience::All));
        st.apply(&Command::StartCampaign {
            at_ms: 5,
            id: CampaignId(1),
        });
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
    }

    #[test]
    fn duplicate_and_stale_records_change_nothing() {
        let mut st = State::default();
        st.apply(&sub(1, None));
        st.apply(&campaign(Audience::All));
        st.apply(&Command::StartCampaign {
            at_ms: 5,
            id: CampaignId(1),
        });
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

    #[test]
    fn reclaimed_calls_go_to_another_node_and_the_old_owner_is_fenced_off() {
        let mut st = State::default();
        st.apply(&sub(1, None));
        st.apply(&campaign(Audience::All));
        st.apply(&Command::StartCampaign {
            at_ms: 5,
            id: CampaignId(1),
        });
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
        let mut st = State::default();
        st.apply(&sub(1, None));
        st.apply(&campaign(Audience::All));
        st.apply(&Command::StartCampaign {
            at_ms: 5,
            id: CampaignId(1),
        });
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
        assert_eq!(
            by(
                &mut st,
                1,
                200,
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
        assert_eq!(
            by(&mut st, 1, 200, vec![started_under(1, 1, 1, 1)]),
            Response::Recorded { applied: 0 }
        );
        assert_eq!(
            by(&mut st, 2, 200, vec![started_under(1, 1, 1, 2)]),
            Response::Recorded { applied: 1 }
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
        });
        assert_eq!(assign(&mut st, 211, 3), Response::Recorded { applied: 1 });
        assert_eq!(st.lease(p).map(|l| l.epoch), Some(3));
        assert_eq!(
            st.heartbeats().collect::<Vec<_>>(),
            vec![(NodeId(1), 90), (NodeId(2), 210)]
        );
    }

    #[test]
    fn a_paused_campaign_dials_nobody_lets_calls_end_and_resumes() {
        let mut st = State::default();
        st.apply(&sub(1, None));
        st.apply(&sub(2, None));
        st.apply(&campaign(Audience::All));
        st.apply(&Command::StartCampaign {
            at_ms: 5,
            id: CampaignId(1),
        });
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
        let mut st = State::default();
        st.apply(&sub(1, None));
        st.apply(&campaign(Audience::All));
        st.apply(&Command::StartCampaign {
            at_ms: 5,
            id: CampaignId(1),
        });
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
        let mut st = State::default();
        for n in 1..=3 {
            st.apply(&sub(n, None));
        }
        st.apply(&campaign(Audience::All));
        st.apply(&Command::StartCampaign {
            at_ms: 5,
            id: CampaignId(1),
        });
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
        let mut st = State::default();
        st.apply(&sub(1, None));
        st.apply(&sub(2, None));
        st.apply(&campaign(Audience::All));
        st.apply(&Command::StartCampaign {
            at_ms: 5,
            id: CampaignId(1),
        });
        let json = serde_json::to_vec(&st).unwrap();
        let mut back: State = serde_json::from_slice(&json).unwrap();
        back.rebuild_indexes();
        assert_eq!(back.due_tasks(5, 10).len(), 2);
        assert!(back
            .subscriber_by_phone(&PhoneNumber::parse("+393470000001").unwrap())
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
            (0u16..3, 1u64..3, 0u64..20).prop_map(|(p, n, at)| Command::AssignLeases {
                at_ms: at,
                lease_ms: 5,
                grants: vec![(p, NodeId(n))],
            }),
            (1u64..3, 0u64..20).prop_map(|(n, at)| Command::RenewLeases {
                at_ms: at,
                node: NodeId(n),
                lease_ms: 5,
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
