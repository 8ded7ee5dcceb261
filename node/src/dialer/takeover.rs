//! Taking over the answered calls of a node that went silent.
//!
//! A node renews its leases every `renew_every` (500 ms by default), and the renewal is its
//! heartbeat. Its partitions move only when their leases expire (3 s), because a node that is merely
//! cut off may still be dialing until its own clock says stop. An answered call cannot wait that
//! long: the citizen is listening. So the leader watches heartbeats every 100 ms, and when a node
//! has been silent for [`SILENCE`] (by the leader's clock, and by the log's: other nodes'
//! heartbeats or attempt records that much newer than its last heartbeat are in the log) it moves
//! that node's answered calls (those with a committed dialog, `CallTask::handover`) to live nodes
//! with one `HandOverCalls` entry. The new owner sends a re-INVITE inside the same dialog (same
//! Call-ID and tags, a higher CSeq, its own Contact and media address) and continues the message on
//! the same RTP stream where it should be by now.
//!
//! Fencing: the state machine refuses records about a moved call from anyone but its new owner,
//! and a node that was only slow, not dead, sees the move in the log and leaves the call without
//! BYE (`Running::let_go`). The callee follows the latest re-INVITE, so at worst it hears both
//! streams for the moment the slow node needs to notice. Calls that were still ringing are not
//! moved: they end with the lease, and the partition's next holder calls those citizens again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use campanile_cluster::{CallHandover, CampaignId, Command, NodeId, SubscriberId, TaskState};
use tokio::sync::watch;

use super::{audio_for, call_ended, call_spec, handover_hooks, lock, now_ms, Due, Running, Shared};
use crate::call::{resume_call, CallOutcome};

/// How long a node may go without a heartbeat before the leader moves its answered calls: two
/// renewals missed.
pub const SILENCE: Duration = Duration::from_millis(1000);

/// Silence after which a node's calls are no longer looked for: by then its leases have expired
/// and whatever it still had in flight was given back to be dialled again.
pub(super) const GIVE_UP_AFTER_MS: u64 = 15_000;

/// How often the leader looks.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// After an election, how long before a member's own leases stop it the leader stops waiting for
/// its renewal and moves its calls: the move must enter the log before the member, letting its calls
/// go, records them as interrupted (which would have them dialled again while the phone still holds
/// the silent call). It also bounds the clock skew this grace tolerates.
const GRACE_LEAD: Duration = Duration::from_millis(300);

/// After a failed takeover, how long the new owner waits for the log to settle the task before it
/// calls the citizen again: a re-INVITE answered 481 may mean the node that carried the call heard
/// a 1 as it let the call go and hung up, and that node's record of the 1 is a commit away.
const SETTLE_WAIT: Duration = Duration::from_secs(1);

/// What the leader knows beyond the log about whom it can hear: since when it leads, and which
/// members acknowledged its entries since.
///
/// Nobody's renewal can be committed while there is no leader, so after an election every node's
/// heartbeat in the log is as old as the election is long, dead or alive. A member the new leader
/// hears from (Raft replication) is given one silence past the election to renew, but its calls
/// still move [`GRACE_LEAD`] before its own leases stop it (its last heartbeat plus a lease less the
/// margin, when it lets go of its answered calls by itself): a leader failover does not move every
/// live node's answered calls. A member it does not hear from is judged by its heartbeat alone, as before.
///
/// A heartbeat also counts from when this leader saw it arrive (`arrived`), not only from when its
/// node sent it: a renewal is stamped when sent and applied a commit later, so under a slow log
/// (a loaded machine, a slow disk) a live node renewing every 500 ms would look a second old and
/// lose its answered calls to other nodes while it plays them. The same bound holds: its silence
/// counts from no later than `valid_for_ms` after the heartbeat was sent.
#[derive(Debug, Default)]
pub(super) struct Leadership {
    pub since_ms: u64,
    pub reached: std::collections::BTreeSet<NodeId>,
    /// A reached member's silence counts from no later than this long after its last heartbeat
    /// (lease − margin − silence − [`GRACE_LEAD`]): its calls move [`GRACE_LEAD`] before its own
    /// leases stop it and it lets them go.
    pub valid_for_ms: u64,
    /// Each node's last heartbeat (its send time) and when this leader saw it in the log.
    pub arrived: BTreeMap<NodeId, (u64, u64)>,
}

impl Leadership {
    /// From when `node`, whose last heartbeat is `beat`, counts as silent.
    fn silent_from(&self, node: NodeId, beat: u64) -> u64 {
        let mut from = beat;
        if self.reached.contains(&node) {
            from = from.max(self.since_ms);
        }
        if let Some((b, at)) = self.arrived.get(&node) {
            if *b == beat {
                from = from.max(*at);
            }
        }
        beat.max(from.min(beat.saturating_add(self.valid_for_ms)))
    }

    /// Notes the heartbeats the log holds at `now`: one not seen at the last look arrived since
    /// (counted from a look earlier, to be safe). At the first look of a leadership nobody knows
    /// when the heartbeats arrived, and each counts from when it was sent.
    fn note_arrivals(&mut self, beats: impl Iterator<Item = (NodeId, u64)>, now: u64, first: bool) {
        let earliest = now.saturating_sub(LOOK_EVERY.as_millis() as u64);
        for (node, beat) in beats {
            if self.arrived.get(&node).map(|(b, _)| *b) != Some(beat) {
                let at = if first { beat } else { earliest.max(beat) };
                self.arrived.insert(node, (beat, at));
            }
        }
    }
}

/// On the leader: moves the answered calls of silent nodes to live ones, fewest calls first.
pub(super) async fn watch_silent_nodes(sh: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let silence = SILENCE.max(sh.cfg.lease.renew_every * 2).as_millis() as u64;
    let valid_for_ms = sh
        .cfg
        .lease
        .lease
        .saturating_sub(sh.cfg.lease.margin)
        .saturating_sub(Duration::from_millis(silence))
        .saturating_sub(GRACE_LEAD)
        .as_millis() as u64;
    // The term this node leads in, and what it has seen since.
    let mut led: Option<(u64, Leadership)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOOK_EVERY) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        let Some((term, reached)) = sh.cluster.leadership() else {
            led = None;
            continue;
        };
        let now = now_ms();
        let first = !matches!(&led, Some((t, _)) if *t == term);
        if first {
            led = Some((
                term,
                Leadership {
                    since_ms: now,
                    valid_for_ms,
                    ..Default::default()
                },
            ));
        }
        let Some((_, leadership)) = led.as_mut() else {
            continue;
        };
        leadership.reached = reached;
        // The arrivals noted and the plan made on the same state.
        let planned = sh.cluster.read(|s| {
            leadership.note_arrivals(s.heartbeats(), now, first);
            plan(s, now, silence, leadership)
        });
        for (from, moves) in planned {
            let n = moves.len();
            let cmd = Command::HandOverCalls {
                at_ms: now,
                from,
                moves,
            };
            match sh.cluster.write(cmd).await {
                Ok(_) => tracing::warn!(
                    node = %from,
                    calls = n,
                    "node silent for {silence} ms: its answered calls go to live nodes"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot hand over a silent node's calls"),
            }
        }
    }
}

/// Calls to move: (campaign, subscriber, new node).
type Moves = Vec<(CampaignId, SubscriberId, NodeId)>;

/// Which answered calls of silent nodes go where: to the live node with the fewest calls.
fn plan(
    s: &campanile_cluster::State,
    now: u64,
    silence: u64,
    leadership: &Leadership,
) -> Vec<(NodeId, Moves)> {
    // A node is silent only once the log has moved on past its heartbeat (the log's own clock: the
    // newest heartbeat or attempt record it holds, from any node), not merely the leader's clock:
    // while the log itself stalls (a slow disk, a loaded machine, replication timing out) every
    // renewal is late, and the node whose renewal happened to be due first would lose its answered
    // calls to other nodes while it plays them. Attempt records, frequent while calls are up, move
    // that clock soon after an election, before the next renewals.
    let log_now = s.log_clock_ms();
    // Each node with the time from which its silence counts.
    let beats: Vec<(NodeId, u64)> = s
        .heartbeats()
        .map(|(n, t)| (n, leadership.silent_from(n, t)))
        .collect();
    // Past a few leases of silence the node's partitions have moved and every call it had in
    // flight was given back: nothing is left to look for (and a long-dead node is not scanned on
    // every round).
    let silent: Vec<NodeId> = s
        .heartbeats()
        .filter(|(n, beat)| {
            let from = leadership.silent_from(*n, *beat);
            from.saturating_add(silence) <= now
                && from.saturating_add(GIVE_UP_AFTER_MS) > now
                && beat.saturating_add(silence) <= log_now
        })
        .map(|(n, _)| n)
        .collect();
    if silent.is_empty() {
        return Vec::new();
    }
    let mut load = takers(s, &beats, now, silence);
    let mut out = Vec::new();
    for from in silent {
        let Some(moves) = spread(&s.answered_calls_on(from), &mut load) else {
            return out;
        };
        if !moves.is_empty() {
            out.push((from, moves));
        }
    }
    out
}

/// Nodes that can take calls over, each with its calls in progress: heard from within `silence`
/// (`beats`: each node with the time its silence counts from), and not stopping.
pub(super) fn takers(
    s: &campanile_cluster::State,
    beats: &[(NodeId, u64)],
    now: u64,
    silence: u64,
) -> BTreeMap<NodeId, u32> {
    let channels: BTreeMap<NodeId, u32> = s.channels_in_use().collect();
    beats
        .iter()
        .filter(|(n, t)| t.saturating_add(silence) > now && !s.is_leaving(*n))
        .map(|(n, _)| (*n, channels.get(n).copied().unwrap_or(0)))
        .collect()
}

/// Gives each of `calls` to the node of `load` with the fewest calls (counting the ones given);
/// None when there is a call and no node to take it.
pub(super) fn spread(
    calls: &[&campanile_cluster::CallTask],
    load: &mut BTreeMap<NodeId, u32>,
) -> Option<Moves> {
    let mut moves = Vec::with_capacity(calls.len());
    for t in calls {
        let (to, count) = load.iter_mut().min_by_key(|(n, c)| (**c, **n))?;
        *count += 1;
        moves.push((t.campaign, t.subscriber, *to));
    }
    Some(moves)
}

/// On every node, after the cluster moved calls (`seen` is the last move it acted on): lets go of
/// calls given to another node, and continues the calls given to this one.
pub(super) fn follow(sh: &Arc<Shared>, seen: &mut u64) {
    let applied = sh.cluster.read(|s| s.handovers_applied());
    if applied == *seen {
        return;
    }
    let me = sh.cfg.node;
    let mut inflight = lock(&sh.inflight);
    let now = now_ms();
    let (gone, mine) = sh.cluster.read(|s| {
        let gone = moved_away(s, me, &inflight);
        let mine: Vec<(Due, CallHandover)> = s
            .answered_calls_on(me)
            .into_iter()
            .filter(|t| !inflight.contains_key(&(t.campaign, t.subscriber)))
            .filter_map(|t| {
                let TaskState::InFlight { attempt, epoch, .. } = t.state else {
                    return None;
                };
                let c = s.campaign(t.campaign)?;
                let due = Due::of(s, t, c, attempt, epoch.unwrap_or(0));
                Some((due, t.handover.clone()?))
            })
            .collect();
        (gone, mine)
    });
    for key in gone {
        if let Some(call) = inflight.get(&key) {
            let _ = call.let_go.send(true);
        }
    }
    let lapsing = !sh
        .held
        .alive(std::time::Instant::now() + super::CONTINUE_MARGIN);
    let mut waiting = false;
    if lapsing && !mine.is_empty() {
        // Moved here while this node's own heartbeat is about to lapse (its renewals are late
        // reaching the log): taken over now, the calls would be let go again at once. The next
        // round looks again.
        tracing::debug!(
            calls = mine.len(),
            "calls moved here wait for this node's next renewal"
        );
        waiting = true;
    }
    for (due, handover) in mine.into_iter().filter(|_| !lapsing) {
        let (key, number) = (due.key, campanile_cluster::mask_number(&due.phone));
        let silent_for_ms = now.saturating_sub(handover.at_ms);
        if continue_call(sh, &mut inflight, due, handover, Continuing::MovedHere) {
            tracing::info!(campaign = %key.0, subscriber = %key.1, %number, silent_for_ms,
                "taking over an answered call");
        } else {
            // The message must be ready here; until it is, look again on the next round.
            waiting = true;
        }
    }
    if !waiting {
        *seen = applied;
    }
}

/// The calls of `inflight` whose task the log has in flight on another node than `me`: moved.
pub(super) fn moved_away(
    s: &campanile_cluster::State,
    me: NodeId,
    inflight: &std::collections::HashMap<super::TaskKey, Running>,
) -> Vec<super::TaskKey> {
    inflight
        .keys()
        .filter(|(c, sid)| {
            s.task(*c, *sid)
                .is_some_and(|t| matches!(t.state, TaskState::InFlight { node, .. } if node != me))
        })
        .copied()
        .collect()
}

/// Which answered call a node continues.
pub(super) enum Continuing {
    /// One the leader moved here from a silent node (a takeover, counted in `takeovers_total`).
    MovedHere,
    /// One this node let go when its leases lapsed (parked); `taken_over` when it had been moved
    /// here before.
    Parked { taken_over: bool },
}

/// Continues `due`'s answered call on this node with a re-INVITE inside its recorded dialog: a call
/// moved here (fenced by this node's heartbeat) or one this node let go when its leases lapsed
/// (fenced as before it was let go: by the partition's lease for a call it placed). False, and
/// nothing started, while the message is not ready here.
pub(super) fn continue_call(
    sh: &Arc<Shared>,
    inflight: &mut std::collections::HashMap<super::TaskKey, Running>,
    due: Due,
    handover: CallHandover,
    why: Continuing,
) -> bool {
    let Some(audio) = audio_for(sh, due.key.0, &due.message, &due.language) else {
        return false;
    };
    let taken_over = match why {
        Continuing::MovedHere => true,
        Continuing::Parked { taken_over } => taken_over,
    };
    let (running, abort_rx, let_go_rx) = Running::new(taken_over, due.priority, super::Phase::Up);
    inflight.insert(due.key, running);
    let sh = sh.clone();
    tokio::spawn(async move {
        let spec = call_spec(&sh, &due, audio, false);
        let started = std::time::Instant::now();
        let hooks = handover_hooks(&sh, &due, let_go_rx.clone(), None);
        let mut outcome =
            resume_call(&sh.ctx, &spec, &handover, abort_rx.clone(), Some(hooks)).await;
        let mut result = "resumed";
        if let CallOutcome::TakeoverFailed(why) = &outcome {
            tracing::warn!(campaign = %due.key.0, subscriber = %due.key.1, reason = %why,
                "could not take the call over; calling the citizen again");
            result = "failed";
            // The new call is not the recorded dialog until its own answer is committed.
            if let Some(r) = lock(&sh.inflight).get_mut(&due.key) {
                r.stale_record = true;
            }
            if let Some(redialled) = redial(&sh, &due, &spec, abort_rx, let_go_rx).await {
                outcome = redialled;
                result = "redialled";
            }
        }
        if let Continuing::MovedHere = why {
            sh.metrics.takeover(result);
        }
        call_ended(&sh, &due, &spec, outcome, started);
    });
    true
}

/// After a failed takeover, while the task is still this node's once the log has had
/// [`SETTLE_WAIT`] to settle it: a new call to the citizen, inside the same attempt, with "this
/// message is repeated" before the message. None when the call cannot be placed here (the campaign
/// stopped, the task moved or was settled, the prefix cannot be spoken): the attempt then ends
/// interrupted and the citizen is called again by the partition's holder, unless settled.
async fn redial(
    sh: &Arc<Shared>,
    due: &Due,
    spec: &crate::call::CallSpec,
    abort: watch::Receiver<bool>,
    let_go: watch::Receiver<bool>,
) -> Option<CallOutcome> {
    let still_ours = || {
        sh.cluster.read(|s| {
            s.campaign(due.key.0)
                .is_some_and(|c| c.state == campanile_cluster::CampaignState::Running)
                && s.task(due.key.0, due.key.1).is_some_and(|t| {
                    matches!(t.state, TaskState::InFlight { node, attempt, .. }
                        if node == sh.cfg.node && attempt == due.attempt)
                })
        })
    };
    if !settles(&mut sh.cluster.applied(), SETTLE_WAIT, still_ours).await
        || *abort.borrow()
        || *let_go.borrow()
    {
        return None;
    }
    let (audio, lang, cache) = (spec.audio.clone(), due.language.clone(), sh.cache.clone());
    let prefixed = tokio::task::spawn_blocking(move || {
        crate::media::message::with_repeated_prefix(&audio, &lang, &cache)
    })
    .await;
    let audio = match prefixed {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot prepare the repeated message");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "repeated message preparation failed");
            return None;
        }
    };
    let spec = crate::call::CallSpec {
        audio,
        detect_machines: true,
        ..spec.clone()
    };
    let started = std::time::Instant::now();
    let hooks = handover_hooks(sh, due, let_go, Some(started));
    Some(crate::call::place_call_with(&sh.ctx, &spec, abort, Some(hooks)).await)
}

/// Waits until `still_ours()` turns false, looking again at every entry applied (`applied`), or
/// until `bound` has passed; returns its last answer.
async fn settles(
    applied: &mut watch::Receiver<u64>,
    bound: Duration,
    still_ours: impl Fn() -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + bound;
    while still_ours() {
        match tokio::time::timeout_at(deadline, applied.changed()).await {
            Ok(Ok(())) => {}
            // The bound passed, or nothing applies any more.
            _ => return still_ours(),
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use campanile_cluster::*;

    /// A task the log settles while the new owner waits is not dialled again; one it does not
    /// settle within the bound is, after the bound.
    #[tokio::test(start_paused = true)]
    async fn a_failed_takeover_waits_for_the_log_before_calling_again() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (tx, mut rx) = watch::channel(1u64);
        let ours = Arc::new(AtomicBool::new(true));
        let (flag, started) = (ours.clone(), tokio::time::Instant::now());
        tokio::spawn(async move {
            // Unrelated entries first, then the previous node's record of the 1.
            for i in 2..5 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                tx.send_replace(i);
            }
            flag.store(false, Ordering::SeqCst);
            tx.send_replace(5);
            std::future::pending::<()>().await;
        });
        let still = settles(&mut rx, SETTLE_WAIT, || ours.load(Ordering::SeqCst)).await;
        assert!(!still);
        assert_eq!(started.elapsed(), Duration::from_millis(150));

        // Nothing settles it: ours still, once the bound has passed.
        let (tx, mut rx) = watch::channel(1u64);
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send_replace(2);
            std::future::pending::<()>().await;
        });
        assert!(settles(&mut rx, SETTLE_WAIT, || true).await);
        assert_eq!(started.elapsed(), SETTLE_WAIT);
    }

    fn sub(n: u32) -> Command {
        Command::CreateSubscriber {
            at_ms: 1,
            subscriber: NewSubscriber {
                tenant: default_tenant(),
                phone: PhoneNumber::parse(&format!("+39347{n:07}")).unwrap(),
                name: None,
                language: "it".into(),
                zone: None,
                verified: true,
                consent: None,
            },
        }
    }

    fn beat(st: &mut State, node: u64, at_ms: u64, calls: u32) {
        st.apply(&Command::RenewLeases {
            at_ms,
            node: NodeId(node),
            lease_ms: 3_000,
            channels_in_use: Some(calls),
            capacity: None,
        });
    }

    /// A campaign with three calls on `node`: subscribers 1 and 2 answered, 3 still ringing.
    fn calls_on(st: &mut State, node: NodeId) {
        for n in 1..=3 {
            st.apply(&sub(n));
        }
        st.apply(&Command::CreateCampaign {
            at_ms: 2,
            spec: CampaignSpec {
                title: "t".into(),
                message: Message::Tts {
                    text: "Allerta".into(),
                    language: "it".into(),
                },
                audience: Audience::All,
                priority: Priority::Emergency,
                require_confirmation: true,
                retry: RetryPolicy::default_for(Priority::Emergency),
                tenant: default_tenant(),
                not_before_ms: None,
                deadline_ms: None,
            },
            created_by: None,
        });
        st.apply(&Command::StartCampaign {
            at_ms: 3,
            id: CampaignId(1),
        });
        let mut events = Vec::new();
        for s in 1..=3 {
            events.push(AttemptEvent::Started {
                campaign: CampaignId(1),
                subscriber: SubscriberId(s),
                attempt: 1,
                epoch: None,
            });
        }
        // Subscribers 1 and 2 answered; 3 is still ringing.
        for s in 1..=2 {
            events.push(AttemptEvent::Answered {
                campaign: CampaignId(1),
                subscriber: SubscriberId(s),
                attempt: 1,
                call: Box::new(CallHandover {
                    call_id: format!("c{s}"),
                    local_tag: "a".into(),
                    remote_tag: "b".into(),
                    local_party: "<sip:alert@127.0.0.1>".into(),
                    remote_party: "<sip:x@127.0.0.1>".into(),
                    remote_target: "sip:x@127.0.0.1:5070".into(),
                    route_set: vec![],
                    local_cseq: 1,
                    via_transport: "UDP".into(),
                    remote_rtp: "127.0.0.1:40000".into(),
                    remote_rtcp: None,
                    payload_type: 0,
                    telephone_event: None,
                    ssrc: 1,
                    at_ms: 10,
                    frame: 0,
                    seq: 0,
                    ts: 0,
                    answered_ms: 10,
                    moved_from: vec![],
                }),
            });
        }
        st.apply(&Command::RecordAttempts {
            at_ms: 10,
            node,
            events,
        });
    }

    #[test]
    fn answered_calls_of_a_silent_node_go_to_the_least_busy_live_node() {
        let mut st = State::default();
        calls_on(&mut st, NodeId(3));
        beat(&mut st, 1, 1_000, 5);
        beat(&mut st, 2, 1_000, 0);
        beat(&mut st, 3, 1_000, 3);
        let steady = Leadership {
            since_ms: 0,
            reached: [NodeId(1), NodeId(2), NodeId(3)].into(),
            valid_for_ms: 1_000,
            ..Default::default()
        };
        // Everyone is fresh: nothing moves.
        assert!(plan(&st, 1_500, 1_000, &steady).is_empty());
        // Long silent: not looked at any more.
        assert!(plan(&st, 1_000 + GIVE_UP_AFTER_MS, 1_000, &steady).is_empty());
        beat(&mut st, 1, 2_000, 5);
        beat(&mut st, 2, 2_000, 1);
        // Node 3 missed its renewals: its two answered calls go to node 2, then node 2 again
        // (1 + 1 = 2 < 5), never to the busy node 1, and the ringing call stays.
        let moves = plan(&st, 2_100, 1_000, &steady);
        assert_eq!(moves.len(), 1);
        let (from, moves) = &moves[0];
        assert_eq!(*from, NodeId(3));
        assert_eq!(
            moves,
            &vec![
                (CampaignId(1), SubscriberId(1), NodeId(2)),
                (CampaignId(1), SubscriberId(2), NodeId(2)),
            ]
        );
        // Node 2 is stopping (its last heartbeat says a capacity of 0): node 1 takes them.
        st.apply(&Command::RenewLeases {
            at_ms: 2_000,
            node: NodeId(2),
            lease_ms: 3_000,
            channels_in_use: Some(1),
            capacity: Some(0),
        });
        let moves = plan(&st, 2_100, 1_000, &steady);
        assert_eq!(
            moves[0].1,
            vec![
                (CampaignId(1), SubscriberId(1), NodeId(1)),
                (CampaignId(1), SubscriberId(2), NodeId(1)),
            ]
        );
    }

    /// The log stalls for a moment: nobody's renewal is committed, and by the leader's clock the
    /// node whose renewal was due first has been silent a second. The log has not moved on past
    /// its heartbeat, so its calls stay; once records a silence newer than its heartbeat are in
    /// the log, they move.
    #[test]
    fn a_stalled_log_silences_nobody() {
        let mut st = State::default();
        calls_on(&mut st, NodeId(3));
        beat(&mut st, 1, 1_000, 0);
        beat(&mut st, 2, 1_150, 0);
        beat(&mut st, 3, 700, 1);
        let mut l = Leadership {
            since_ms: 0,
            reached: [NodeId(1), NodeId(2), NodeId(3)].into(),
            valid_for_ms: 700,
            ..Default::default()
        };
        // Each heartbeat arrived 100 ms after it was sent; the log has stood still since 1,250.
        for (n, t) in [(1, 1_000), (2, 1_150), (3, 700)] {
            l.arrived.insert(NodeId(n), (t, t + 100));
        }
        assert!(plan(&st, 1_700, 1_000, &l).is_empty(), "fresh by any clock");
        assert!(
            plan(&st, 2_100, 1_000, &l).is_empty(),
            "silent by the leader's clock only: the log stalled"
        );
        // The log moves again, with node 1's next renewal and node 2's record of its calls (the
        // newest), and node 3's renewal is not in it.
        beat(&mut st, 1, 1_500, 0);
        st.apply(&Command::RecordAttempts {
            at_ms: 1_700,
            node: NodeId(2),
            events: vec![],
        });
        assert_eq!(
            plan(&st, 2_100, 1_000, &l),
            vec![(
                NodeId(3),
                vec![
                    (CampaignId(1), SubscriberId(1), NodeId(1)),
                    (CampaignId(1), SubscriberId(2), NodeId(2)),
                ]
            )]
        );
    }

    /// After an election every heartbeat in the log is old. A member the new leader hears from is
    /// given one silence from the election to renew, but its calls move [`GRACE_LEAD`] before its
    /// own leases stop it; one the leader does not hear from (the old leader, dead) is judged by its
    /// heartbeat.
    #[test]
    fn a_new_leader_waits_for_the_members_it_hears_from_and_not_for_the_others() {
        // The default timing: leases of 3 s, a margin of 1 s, a silence of 1 s.
        let valid_for_ms = 3_000 - 1_000 - 1_000 - GRACE_LEAD.as_millis() as u64;
        let lead = |since_ms, reached: &[u64]| Leadership {
            since_ms,
            reached: reached.iter().map(|n| NodeId(*n)).collect(),
            valid_for_ms,
            ..Default::default()
        };
        // Last heartbeats at 1,000; an election ends at 1,500, the new leader hears node 2 only.
        let l = lead(1_500, &[2]);
        assert_eq!(
            l.silent_from(NodeId(3), 1_000),
            1_000,
            "not heard: as before"
        );
        assert_eq!(
            l.silent_from(NodeId(2), 1_000),
            1_500,
            "heard: from the election"
        );
        // An election that ends too late for that: node 2 lets its calls go at 3,000 (its
        // heartbeat, plus a lease less the margin), so they move 300 ms before (1,700 + 1,000).
        let l = lead(2_500, &[2]);
        assert_eq!(l.silent_from(NodeId(2), 1_000), 1_700);
        // A fresher heartbeat than the election counts as it is.
        assert_eq!(l.silent_from(NodeId(2), 2_700), 2_700);
    }

    /// A live node whose renewals (every 500 ms) take 900 ms to commit: each heartbeat is almost a
    /// second old when the leader sees it, and it is never silent. Once they stop arriving it is,
    /// and no later than its own leases stop it less [`GRACE_LEAD`].
    #[test]
    fn a_heartbeat_counts_from_its_arrival_but_no_later_than_the_node_s_own_lapse() {
        let valid_for_ms = 3_000 - 1_000 - 1_000 - GRACE_LEAD.as_millis() as u64;
        let node = NodeId(2);
        // A leader elected at 10,000 that hears from the node.
        let mut l = Leadership {
            since_ms: 10_000,
            reached: [node].into(),
            valid_for_ms,
            ..Default::default()
        };
        // The renewal sent at `sent` is in the log 900 ms later.
        let last_in_log = |now: u64| (now - 900) / 500 * 500;
        l.note_arrivals([(node, last_in_log(10_000))].into_iter(), 10_000, true);
        for now in (10_100u64..=30_000).step_by(100) {
            let beat = last_in_log(now);
            l.note_arrivals([(node, beat)].into_iter(), now, false);
            let from = l.silent_from(node, beat);
            assert!(
                from + 1_000 > now,
                "silent at {now}: heartbeat {beat}, counted from {from}"
            );
        }
        // The node dies: its last heartbeat (sent at 29,000) arrived at 29,900. By its send time it
        // would count as silent from 29,000; by its arrival, from 29,700 (its own leases stop it
        // at 31,000, and its calls must move 300 ms before, 1,000 of silence after 29,700).
        let beat = last_in_log(30_000);
        assert_eq!(beat, 29_000);
        assert_eq!(l.silent_from(node, beat), 29_000 + valid_for_ms);
        // A leader that knows no arrival (and does not hear from the node) counts it as sent.
        let mut other = Leadership {
            since_ms: 29_950,
            valid_for_ms,
            ..Default::default()
        };
        other.note_arrivals([(node, beat)].into_iter(), 29_950, true);
        assert_eq!(other.silent_from(node, beat), 29_000);
    }
}
