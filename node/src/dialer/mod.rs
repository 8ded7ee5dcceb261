//! The dialer: works the due call tasks of every running campaign within the trunk's limits, places the
//! calls, and commits each attempt's start and outcome through Raft in small batches.
//!
//! Decisions (what is due, what follows an outcome) are pure: `State::due_tasks` and `retry::next_step`.
//! This module only executes them. A task is dialled by this node only while it is in `inflight`, and it
//! leaves `inflight` only after its outcome is committed or the log shows it has left this node (moved
//! to another, or given back), so a task is never dialled twice at once.
//!
//! A call is placed only after its `Started` record is committed and the state machine shows the task
//! in flight on this node: a node cut off from the quorum cannot start calls.
//!
//! A trunk channel is held only from the INVITE to the call's end (`Phase::Up`), not through those
//! commits: a few tasks more than the free channels are started ahead (`lookahead`) and wait, committed,
//! for the next channel to free, and a channel is free again as soon as its call ends, while its
//! outcome is still on the way to the log. The channels then carry calls back to back.
//!
//! Every node dials the subscribers of the partitions whose lease it holds (`leases`), and every
//! start carries the lease's epoch so the state machine refuses a start from a stale holder. A node
//! whose lease lapses (it was cut off, or gave the partition up) hangs up its calls there; the next
//! holder is handed the calls still in flight and dials those citizens again. Answered calls are let
//! go instead (no BYE) and recorded as nothing (`Phase::Parked`): the leader moves them to a live
//! node, or this node continues them itself when it holds the lease again, or ends their dialog
//! with BYE if the log gives the task back; a citizen is never dialled while still in the silent call.

pub mod leases;
mod leave;
pub mod quiet;
pub mod retry;
mod takeover;
pub mod trunk;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use campanile_cluster::{
    AttemptEvent, CampaignId, CampaignState, Cluster, Command, Message, NodeId, Outcome, Priority,
    RetryPolicy, SubscriberId,
};
use tokio::sync::{mpsc, watch, Notify};

use crate::call::{place_call_with, CallContext, CallOutcome, CallSpec, HandoverHooks};
use crate::media::{AudioCache, PreparedAudio};
use crate::metrics::Metrics;
use crate::sip::transaction::Timers;

/// Milliseconds since the Unix epoch: the timestamps commands carry.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How this node dials.
#[derive(Clone, Debug)]
pub struct DialerConfig {
    pub node: NodeId,
    pub trunk: SocketAddr,
    pub trunk_host: String,
    pub max_channels: usize,
    pub calls_per_second: u32,
    pub ring_timeout: Duration,
    pub confirm_wait: Duration,
    pub batch: Duration,
    pub max_replays: u32,
    pub from_user: String,
    pub display_name: String,
    pub timers: Timers,
    /// Digest credentials for the trunk.
    pub credentials: Option<crate::sip::auth::Credentials>,
    /// The Route header value of the outbound proxy, if calls go through one.
    pub outbound_proxy: Option<String>,
    /// Interval of OPTIONS pings to the trunk; `None` turns them off.
    pub options_interval: Option<Duration>,
    /// Partition lease timing.
    pub lease: leases::LeaseTiming,
}

type TaskKey = (CampaignId, SubscriberId);

/// An attempt record for the batcher, with whom to tell once it is committed.
type Record = (AttemptEvent, Option<tokio::sync::oneshot::Sender<()>>);

/// What the dialer needs to know about a task it is about to call.
struct Due {
    key: TaskKey,
    attempt: u32,
    /// The lease epoch of the subscriber's partition this node dials under (for a call taken
    /// over, the one its attempt was started under); its outcome carries it.
    epoch: u64,
    phone: String,
    language: String,
    message: Message,
    priority: Priority,
    require_confirmation: bool,
    retry: RetryPolicy,
    /// The tenant's own caller ID, when it has one.
    caller: Option<campanile_cluster::CallerId>,
}

impl Due {
    /// Attempt `attempt` of task `t` of campaign `c`, under `epoch`.
    fn of(
        s: &campanile_cluster::State,
        t: &campanile_cluster::CallTask,
        c: &campanile_cluster::Campaign,
        attempt: u32,
        epoch: u64,
    ) -> Due {
        Due {
            key: (t.campaign, t.subscriber),
            attempt,
            epoch,
            phone: t.phone.as_str().to_string(),
            language: t.language.clone(),
            message: c.spec.message.clone(),
            priority: c.spec.priority,
            require_confirmation: c.spec.require_confirmation,
            retry: c.spec.retry,
            caller: s.tenant(&c.spec.tenant).and_then(|t| t.caller_id.clone()),
        }
    }
}

/// Where a task this node is responsible for stands, as far as the trunk's channels go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Its start is being committed, or it waits for a free channel.
    Starting,
    /// Its call holds a channel.
    Up,
    /// Its call ended (or was never placed); its record is on the way.
    Ended,
    /// Its answered call was let go when this node's leases lapsed and nobody has taken it over:
    /// nothing is recorded, the task stays this node's. The leader may still move it to another
    /// node; otherwise this node continues it (re-INVITE) once it may carry it again (`tend_parked`).
    Parked,
}

/// A call this node is responsible for.
struct Running {
    /// Turning true hangs the call up.
    abort: watch::Sender<bool>,
    /// Turning true leaves the call without BYE: another node has taken it over.
    let_go: watch::Sender<bool>,
    /// A call taken over from another node: its fence is the task's owner in the state machine,
    /// not this node's lease on the partition.
    taken_over: bool,
    /// Its campaign's priority: an emergency takes the channels of lower ones.
    priority: Priority,
    phase: Phase,
    /// While `Parked`: the dialog the phone may still be in, to end it with BYE if the task goes
    /// back to be dialled again instead of to a node that continues it.
    parked: Option<Box<campanile_cluster::CallHandover>>,
    /// The task's recorded dialog is not this call's: a new call after a failed takeover, until
    /// its own answer is committed. A lapse then hangs it up (a CANCEL while it rings) instead of
    /// letting it go, since nobody could continue it from the record.
    stale_record: bool,
    /// Answered, and its dialog is on its way to the log (`handover_hooks`).
    dialog_pending: bool,
    /// Aborted by a graceful stop: an answer crossing the CANCEL goes on (`HandoverHooks::stopping`).
    stopping: Arc<AtomicBool>,
}

impl Running {
    fn new(
        taken_over: bool,
        priority: Priority,
        phase: Phase,
    ) -> (Running, watch::Receiver<bool>, watch::Receiver<bool>) {
        let (abort, abort_rx) = watch::channel(false);
        let (let_go, let_go_rx) = watch::channel(false);
        (
            Running {
                abort,
                let_go,
                taken_over,
                priority,
                phase,
                parked: None,
                stale_record: false,
                dialog_pending: false,
                stopping: Arc::default(),
            },
            abort_rx,
            let_go_rx,
        )
    }

    /// Its call is placed or about to be, and nobody told it to stop.
    fn is_running(&self) -> bool {
        !matches!(self.phase, Phase::Ended | Phase::Parked)
            && !*self.abort.borrow()
            && !*self.let_go.borrow()
    }

    /// Its call was answered and the log holds that call's dialog (`key`'s task): another node
    /// could continue it.
    fn dialog_recorded(&self, s: &campanile_cluster::State, key: TaskKey) -> bool {
        !self.stale_record && s.task(key.0, key.1).is_some_and(|t| t.handover.is_some())
    }

    /// Its answered call may go to another node: up here, or parked.
    fn may_move(&self) -> bool {
        !self.stale_record
            && !*self.abort.borrow()
            && match self.phase {
                Phase::Up => !*self.let_go.borrow(),
                Phase::Parked => true,
                Phase::Starting | Phase::Ended => false,
            }
    }

    /// A placeholder for a task with no call (its record is on the way): nothing to abort.
    fn placeholder() -> Running {
        Running {
            abort: watch::channel(true).0,
            let_go: watch::channel(true).0,
            taken_over: false,
            priority: Priority::Emergency,
            phase: Phase::Ended,
            parked: None,
            stale_record: false,
            dialog_pending: false,
            stopping: Arc::default(),
        }
    }
}

/// Moves `key`'s task out of `Up` (to `phase`) and tells the tasks waiting for a channel.
fn release_channel(sh: &Shared, key: TaskKey, phase: Phase) {
    lock(&sh.inflight)
        .entry(key)
        .and_modify(|r| r.phase = phase);
    sh.channel_freed.notify_waiters();
}

/// How many of `inflight`'s tasks are in `phase`.
fn count(inflight: &HashMap<TaskKey, Running>, phase: Phase) -> usize {
    inflight.values().filter(|r| r.phase == phase).count()
}

struct Shared {
    cfg: DialerConfig,
    cluster: Cluster,
    ctx: CallContext,
    cache: Arc<AudioCache>,
    metrics: Metrics,
    /// Calls this node is responsible for.
    inflight: Mutex<HashMap<TaskKey, Running>>,
    /// Told when a channel frees: started tasks wait on it for one.
    channel_freed: Notify,
    /// When INVITEs may go out under the trunk's calls-per-second limit.
    call_rate: Mutex<trunk::CallRate>,
    /// Prepared audio per (campaign, subscriber language).
    audio: Mutex<HashMap<(CampaignId, String), AudioSlot>>,
    events: mpsc::UnboundedSender<Record>,
    wake: Notify,
    /// Closed while the trunk asks us to back off (503).
    gate: Mutex<trunk::TrunkGate>,
    /// The partition leases this node holds.
    held: leases::Held,
    /// Lease renewal rounds on their way through the log.
    renewing: std::sync::atomic::AtomicUsize,
}

enum AudioSlot {
    Preparing,
    Ready(PreparedAudio),
    Failed { until_ms: u64 },
}

/// Starts the dialer; it runs until `shutdown` turns true.
pub fn spawn(
    cfg: DialerConfig,
    cluster: Cluster,
    ctx: CallContext,
    cache: Arc<AudioCache>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let call_rate = Mutex::new(trunk::CallRate::new(cfg.calls_per_second));
    let shared = Arc::new(Shared {
        cfg,
        cluster,
        ctx,
        cache,
        metrics,
        inflight: Mutex::default(),
        channel_freed: Notify::new(),
        call_rate,
        audio: Mutex::default(),
        events: events_tx,
        wake: Notify::new(),
        gate: Mutex::default(),
        held: leases::Held::default(),
        renewing: Default::default(),
    });
    tokio::spawn(keep_leases(shared.clone(), shutdown.clone()));
    tokio::spawn(takeover::watch_silent_nodes(
        shared.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(batcher(shared.clone(), events_rx));
    if let Some(every) = shared.cfg.options_interval {
        tokio::spawn(ping_trunk(shared.clone(), every, shutdown.clone()));
    }
    tokio::spawn(run(shared, shutdown))
}

async fn run(sh: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    recover_interrupted(&sh);
    let mut handovers_seen = 0;
    let mut applied = sh.cluster.applied();
    let lookahead = lookahead(sh.cfg.max_channels);
    loop {
        tokio::select! {
            _ = applied.changed() => {}
            _ = sh.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            leave::leave(&sh).await;
            return;
        }
        let held = sh.held.valid(std::time::Instant::now());
        sh.metrics.leases_held.set(held.len() as i64);
        abort_unleased(&sh, &held);
        tend_parked(&sh);
        abort_stopped_campaigns(&sh);
        takeover::follow(&sh, &mut handovers_seen);
        preempt_for_emergencies(&sh, &held);
        let (up, starting) = {
            let inflight = lock(&sh.inflight);
            (
                count(&inflight, Phase::Up),
                count(&inflight, Phase::Starting),
            )
        };
        sh.metrics.calls_in_flight.set(up as i64);
        let wanted = (sh.cfg.max_channels.saturating_sub(up) + lookahead).saturating_sub(starting);
        if wanted == 0 {
            continue;
        }
        let reopens = lock(&sh.gate).reopens_at(std::time::Instant::now());
        if let Some(at) = reopens {
            // The trunk asked for a pause: start nothing until it ends (or something else wakes us),
            // but look at the leases at least every 250 ms: a lapsed lease hangs up its calls even
            // while the trunk backs off.
            let at = at.min(std::time::Instant::now() + Duration::from_millis(250));
            tokio::select! {
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        for due in collect_due(&sh, wanted, &held) {
            if lock(&sh.gate)
                .reopens_at(std::time::Instant::now())
                .is_some()
            {
                break;
            }
            let Some(audio) = audio_for(&sh, due.key.0, &due.message, &due.language) else {
                continue;
            };
            start_call(&sh, due, audio);
        }
    }
}

/// Most renewal rounds of this node on their way through the log at once.
const MAX_ROUNDS_IN_FLIGHT: usize = 4;

/// Renews this node's leases (and, on the leader, hands out free partitions) until shutdown.
///
/// A round starts every `renew_every` whether the last one has been committed or not: the renewal
/// is also the node's heartbeat, and a heartbeat that waited for the previous commit would space
/// out by the log's latency, so that a node whose writes take a few hundred milliseconds (a loaded
/// machine, a slow disk) would look silent to the leader and lose its answered calls to other nodes
/// while it is alive and dialing. At most [`MAX_ROUNDS_IN_FLIGHT`] overlap; past that the log is
/// not keeping up and more writes would only add to its queue.
async fn keep_leases(sh: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let timing = sh.cfg.lease;
    let mut tick = tokio::time::interval(timing.renew_every.max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if sh.renewing.load(std::sync::atomic::Ordering::Relaxed) >= MAX_ROUNDS_IN_FLIGHT {
            tracing::debug!("lease renewals are not being committed; waiting for the log");
            continue;
        }
        let (busy, calls): (std::collections::HashSet<u16>, usize) = {
            let inflight = lock(&sh.inflight);
            let busy = inflight
                .keys()
                .map(|(_, s)| campanile_cluster::partition_of(*s))
                .collect();
            (busy, count(&inflight, Phase::Up))
        };
        // While its trunk is down a node takes no partitions (capacity 0, as a stopping node
        // says): it gives up those without calls in flight and another data centre's node dials
        // their citizens until this trunk answers again.
        let capacity = if lock(&sh.gate).is_up() {
            sh.cfg.max_channels as u32
        } else {
            0
        };
        sh.renewing
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sh = sh.clone();
        tokio::spawn(async move {
            let before = sh.held.valid(std::time::Instant::now()).len();
            leases::round(
                sh.cfg.node,
                &sh.cluster,
                &sh.held,
                timing,
                calls as u32,
                capacity,
                |p| busy.contains(&p),
            )
            .await;
            if sh.held.valid(std::time::Instant::now()).len() != before {
                sh.wake.notify_one();
            }
            sh.renewing
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
}

/// Calls in partitions this node no longer holds a valid lease for end now: someone else may be
/// granted them once the lease has expired.
///
/// An answered call whose dialog is committed is not hung up but let go (no BYE): the leader hands
/// such calls to live nodes once this one falls silent, and a BYE from here would end the call the
/// new node continues. Calls this node took over go the same way once its own heartbeat lapses.
fn abort_unleased(sh: &Shared, held: &HashMap<u16, u64>) {
    let inflight = lock(&sh.inflight);
    let alive = sh.held.alive(std::time::Instant::now());
    let (mut lapsed, mut let_go) = (0, 0);
    sh.cluster.read(|s| {
        for (key, call) in inflight.iter() {
            // Ended and parked entries have no call left to stop (their records are on the way).
            if !call.is_running() {
                continue;
            }
            let sid = &key.1;
            let unleased = if call.taken_over {
                !alive
            } else {
                !held.contains_key(&campanile_cluster::partition_of(*sid))
            };
            if !unleased {
                continue;
            }
            if call.dialog_recorded(s, *key) {
                call.let_go.send_replace(true);
                let_go += 1;
            } else {
                call.abort.send_replace(true);
                lapsed += 1;
            }
        }
    });
    if lapsed + let_go > 0 {
        tracing::warn!(
            hung_up = lapsed,
            left_to_others = let_go,
            "partition leases lapsed: hanging up calls still ringing, leaving answered ones to \
             the node that takes them over; the next holder dials the rest"
        );
    }
}

/// An emergency takes channels from lower priorities at once: when emergency calls are due here
/// and the channels are full, calls of other campaigns are cut (those still ringing first; their
/// citizens are called again later, the attempt is not counted against them).
fn preempt_for_emergencies(sh: &Shared, held: &HashMap<u16, u64>) {
    let inflight = lock(&sh.inflight);
    let lower_in = |phase: Phase| -> Vec<(bool, TaskKey)> {
        inflight
            .iter()
            .filter(|(_, c)| {
                c.phase == phase && c.priority != Priority::Emergency && !*c.abort.borrow()
            })
            .map(|(k, _)| (false, *k))
            .collect()
    };
    let (mut lower, lower_waiting) = (lower_in(Phase::Up), lower_in(Phase::Starting));
    if lower.is_empty() && lower_waiting.is_empty() {
        return;
    }
    let max = sh.cfg.max_channels;
    let up = count(&inflight, Phase::Up);
    // Calls already told to stop free their channels as soon as they have hung up.
    let freeing = inflight
        .values()
        .filter(|c| c.phase == Phase::Up && *c.abort.borrow())
        .count();
    let free = max.saturating_sub(up) + freeing;
    // Emergency tasks started here already and waiting for a channel want one too.
    let waiting = inflight
        .values()
        .filter(|c| {
            c.phase == Phase::Starting && c.priority == Priority::Emergency && !*c.abort.borrow()
        })
        .count();
    let now = now_ms();
    let due = sh.cluster.read(|s| {
        let due = s.due_tasks_up_to(Priority::Emergency, now, max, |cid, sid| {
            held.contains_key(&campanile_cluster::partition_of(sid))
                && !inflight.contains_key(&(cid, sid))
        });
        for entry in lower.iter_mut() {
            // Answered calls (their dialog is committed) are cut only after ringing ones.
            entry.0 = s
                .task(entry.1 .0, entry.1 .1)
                .is_some_and(|t| t.handover.is_some());
        }
        due.len()
    });
    // Lower tasks started ahead give way where they leave the emergency's no room to start.
    let room =
        (max.saturating_sub(up) + lookahead(max)).saturating_sub(count(&inflight, Phase::Starting));
    let give_way = due.saturating_sub(room).min(lower_waiting.len());
    for (_, key) in &lower_waiting[..give_way] {
        if let Some(task) = inflight.get(key) {
            let _ = task.abort.send(true);
        }
    }
    let cut = (waiting + due).saturating_sub(free).min(lower.len());
    if cut == 0 {
        return;
    }
    lower.sort_unstable();
    for (_, key) in &lower[..cut] {
        if let Some(call) = inflight.get(key) {
            let _ = call.abort.send(true);
        }
    }
    tracing::warn!(
        calls = cut,
        "emergency calls are due and the channels are full: cutting lower-priority calls"
    );
}

/// Tasks this node had in flight before it stopped: their calls are gone, give the attempts back.
fn recover_interrupted(sh: &Arc<Shared>) {
    let now = now_ms();
    let stale: Vec<AttemptEvent> = sh.cluster.read(|s| {
        s.in_flight_on(sh.cfg.node)
            .into_iter()
            .filter_map(|t| match t.state {
                campanile_cluster::TaskState::InFlight { attempt, epoch, .. } => {
                    Some(AttemptEvent::Finished {
                        campaign: t.campaign,
                        subscriber: t.subscriber,
                        attempt,
                        outcome: Outcome::Interrupted,
                        next: campanile_cluster::Next::RetryAt(now),
                        epoch,
                    })
                }
                _ => None,
            })
            .collect()
    });
    if !stale.is_empty() {
        tracing::warn!(
            count = stale.len(),
            "calls were in flight when this node last stopped; they will be placed again"
        );
    }
    for ev in stale {
        if let AttemptEvent::Finished {
            campaign,
            subscriber,
            ..
        } = &ev
        {
            // Keep them out of the due list until the batch that frees them is committed.
            lock(&sh.inflight).insert((*campaign, *subscriber), Running::placeholder());
        }
        let _ = sh.events.send((ev, None));
    }
}

fn collect_due(sh: &Shared, free: usize, held: &HashMap<u16, u64>) -> Vec<Due> {
    let inflight = lock(&sh.inflight);
    let now = now_ms();
    sh.cluster.read(|s| {
        // Tasks of campaigns in their tenant's quiet hours stay due; they are not even counted.
        let quiet = quiet::held_campaigns(s, now);
        s.due_tasks_filtered(now, free + inflight.len(), |cid, sid| {
            !quiet.contains(&cid) && held.contains_key(&campanile_cluster::partition_of(sid))
        })
        .into_iter()
        .filter(|t| !inflight.contains_key(&(t.campaign, t.subscriber)))
        .take(free)
        .filter_map(|t| {
            let c = s
                .campaign(t.campaign)
                .filter(|c| !c.spec.past_deadline(now))?;
            let epoch = *held.get(&campanile_cluster::partition_of(t.subscriber))?;
            Some(Due::of(s, t, c, t.attempts + 1, epoch))
        })
        .collect()
    })
}

/// The campaign's audio in the subscriber's language, preparing it in the background on first use.
fn audio_for(
    sh: &Arc<Shared>,
    campaign: CampaignId,
    message: &Message,
    language: &str,
) -> Option<PreparedAudio> {
    let key = (campaign, language.to_string());
    let mut slots = lock(&sh.audio);
    match slots.get(&key) {
        Some(AudioSlot::Ready(a)) => return Some(a.clone()),
        Some(AudioSlot::Preparing) => return None,
        Some(AudioSlot::Failed { until_ms }) if *until_ms > now_ms() => return None,
        _ => {}
    }
    slots.insert(key.clone(), AudioSlot::Preparing);
    drop(slots);
    let sh = sh.clone();
    let prompt_lang = language.to_string();
    let message = message.clone();
    tokio::spawn(async move {
        let cache = sh.cache.clone();
        let cluster = sh.cluster.clone();
        let result = tokio::task::spawn_blocking(move || match message {
            Message::Tts {
                text,
                language: msg_lang,
            } => crate::media::message::prepare_tts_message(&text, &msg_lang, &prompt_lang, &cache),
            Message::Recording { sha256 } => {
                let wav = cluster.read(|s| {
                    s.campaign(campaign)
                        .and_then(|c| s.audio(&c.spec.tenant, &sha256))
                        .map(|a| a.wav.clone())
                });
                let wav = wav.ok_or_else(|| {
                    crate::media::MediaError::Missing(format!(
                        "recording {sha256} is not stored in the cluster"
                    ))
                })?;
                crate::media::message::prepare_recording(&sha256, &wav, &prompt_lang, &cache)
            }
        })
        .await;
        let slot = match result {
            Ok(Ok(a)) => AudioSlot::Ready(a),
            Ok(Err(e)) => {
                tracing::error!(%campaign, error = %e, "cannot prepare the campaign's audio; retrying in 30 s");
                AudioSlot::Failed {
                    until_ms: now_ms() + 30_000,
                }
            }
            Err(e) => {
                tracing::error!(%campaign, error = %e, "audio preparation task failed");
                AudioSlot::Failed {
                    until_ms: now_ms() + 30_000,
                }
            }
        };
        lock(&sh.audio).insert(key, slot);
        sh.wake.notify_one();
    });
    None
}

/// How many tasks beyond its free channels a node starts ahead, so that a channel freed by a call's
/// end carries the next call without waiting for a commit.
fn lookahead(max_channels: usize) -> usize {
    (max_channels / 8).clamp(2, 64)
}

fn start_call(sh: &Arc<Shared>, due: Due, audio: PreparedAudio) {
    let (running, mut abort_rx, let_go_rx) = Running::new(false, due.priority, Phase::Starting);
    lock(&sh.inflight).insert(due.key, running);
    let (committed_tx, committed_rx) = tokio::sync::oneshot::channel();
    let _ = sh.events.send((
        AttemptEvent::Started {
            campaign: due.key.0,
            subscriber: due.key.1,
            attempt: due.attempt,
            epoch: Some(due.epoch),
        },
        Some(committed_tx),
    ));
    let sh = sh.clone();
    tokio::spawn(async move {
        // Dial only what the cluster agreed this node dials now.
        let ours = committed_rx.await.is_ok()
            && sh.cluster.read(|s| {
                s.task(due.key.0, due.key.1).is_some_and(|t| {
                    matches!(t.state, campanile_cluster::TaskState::InFlight { attempt, node, .. }
                        if attempt == due.attempt && node == sh.cfg.node)
                })
            });
        if !ours {
            lock(&sh.inflight).remove(&due.key);
            sh.wake.notify_one();
            return;
        }
        if !take_channel(&sh, &due, &mut abort_rx).await {
            // Stopped (lease lapsed, campaign paused, shut down, its deadline came) before it
            // rang: not the citizen's attempt.
            release_channel(&sh, due.key, Phase::Ended);
            let _ = sh.events.send((
                AttemptEvent::Finished {
                    campaign: due.key.0,
                    subscriber: due.key.1,
                    attempt: due.attempt,
                    outcome: Outcome::Interrupted,
                    next: campanile_cluster::Next::RetryAt(now_ms()),
                    epoch: Some(due.epoch),
                },
                None,
            ));
            return;
        }
        let spec = call_spec(&sh, &due, audio, true);
        let started = std::time::Instant::now();
        let hooks = handover_hooks(&sh, &due, let_go_rx, Some(started));
        let outcome = place_call_with(&sh.ctx, &spec, abort_rx, Some(hooks)).await;
        call_ended(&sh, &due, &spec, outcome, started);
    });
}

/// Waits for a free channel for `due`, then for its turn under the trunk's calls-per-second limit.
/// An emergency goes before the other waiting tasks; nothing goes while the trunk asks us to back
/// off, and a pause that began while this task waited for its turn sends it back to wait. False when
/// the task was stopped meanwhile, its lease lapsed or its campaign's deadline came.
async fn take_channel(sh: &Shared, due: &Due, abort: &mut watch::Receiver<bool>) -> bool {
    loop {
        if !free_channel(sh, due, abort).await {
            return false;
        }
        let slot = lock(&sh.call_rate).reserve(std::time::Instant::now());
        tokio::time::sleep_until(slot.into()).await;
        // The lease is looked at here too, not only by the dialer's loop (`abort_unleased`, every
        // 250 ms at most): the INVITE goes out now, and the margin before another node may be
        // granted the partition is better spent on a node that runs late than on that loop.
        let leased = sh.held.holds(
            campanile_cluster::partition_of(due.key.1),
            due.epoch,
            std::time::Instant::now(),
        );
        if *abort.borrow() || !leased || past_deadline(sh, due.key.0) {
            return false;
        }
        if lock(&sh.gate)
            .reopens_at(std::time::Instant::now())
            .is_none()
        {
            return true;
        }
        release_channel(sh, due.key, Phase::Starting);
    }
}

/// Waits until the trunk takes new calls and a channel is free for `due`, and marks it taken.
async fn free_channel(sh: &Shared, due: &Due, abort: &mut watch::Receiver<bool>) -> bool {
    loop {
        let freed = sh.channel_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if *abort.borrow() || past_deadline(sh, due.key.0) {
            return false;
        }
        let mut wait = Duration::from_millis(250);
        if let Some(at) = lock(&sh.gate).reopens_at(std::time::Instant::now()) {
            wait = wait.min(at.saturating_duration_since(std::time::Instant::now()));
        } else {
            let mut inflight = lock(&sh.inflight);
            let emergency_waits = due.priority != Priority::Emergency
                && inflight.values().any(|r| {
                    r.phase == Phase::Starting
                        && r.priority == Priority::Emergency
                        && !*r.abort.borrow()
                });
            if count(&inflight, Phase::Up) < sh.cfg.max_channels && !emergency_waits {
                return match inflight.get_mut(&due.key) {
                    Some(r) => {
                        r.phase = Phase::Up;
                        true
                    }
                    None => false,
                };
            }
        }
        tokio::select! {
            _ = &mut freed => {}
            changed = abort.changed() => if changed.is_err() { return false },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn past_deadline(sh: &Shared, campaign: CampaignId) -> bool {
    let now = now_ms();
    sh.cluster.read(|s| {
        s.campaign(campaign)
            .is_some_and(|c| c.spec.past_deadline(now))
    })
}

/// How this node calls `due`'s citizen.
fn call_spec(sh: &Shared, due: &Due, audio: PreparedAudio, detect_machines: bool) -> CallSpec {
    CallSpec {
        to: due.phone.clone(),
        trunk: sh.cfg.trunk,
        trunk_host: sh.cfg.trunk_host.clone(),
        from_user: due
            .caller
            .as_ref()
            .map_or_else(|| sh.cfg.from_user.clone(), |c| c.number.clone()),
        display_name: due
            .caller
            .as_ref()
            .map_or_else(|| sh.cfg.display_name.clone(), |c| c.display_name.clone()),
        audio,
        ring_timeout: sh.cfg.ring_timeout,
        confirm_wait: sh.cfg.confirm_wait,
        require_confirmation: due.require_confirmation,
        allow_opt_out: due.priority != Priority::Emergency,
        max_replays: sh.cfg.max_replays,
        timers: sh.cfg.timers,
        credentials: sh.cfg.credentials.clone(),
        reinvite_after: None,
        detect_machines,
        listen_for_keys: true,
        outbound_proxy: sh.cfg.outbound_proxy.clone(),
    }
}

/// The call's reports of its dialog go into the attempt records, so another node can take it over.
/// The first report of a call placed at `invited` is its answer, which the metrics time. Once a
/// report is committed the record describes this call (`Running::stale_record` no longer holds).
fn handover_hooks(
    sh: &Arc<Shared>,
    due: &Due,
    let_go: watch::Receiver<bool>,
    mut invited: Option<std::time::Instant>,
) -> HandoverHooks {
    let (answered, mut reports) = mpsc::unbounded_channel();
    let (key, attempt) = (due.key, due.attempt);
    let stopping = lock(&sh.inflight)
        .get(&key)
        .map(|r| r.stopping.clone())
        .unwrap_or_default();
    let sh = sh.clone();
    tokio::spawn(async move {
        while let Some(call) = reports.recv().await {
            if let Some(at) = invited.take() {
                sh.metrics.answered(&sh.cluster, key.0, at.elapsed());
            }
            let (committed, is_committed) = tokio::sync::oneshot::channel();
            if let Some(r) = lock(&sh.inflight).get_mut(&key) {
                r.dialog_pending = true;
            }
            let _ = sh.events.send((
                AttemptEvent::Answered {
                    campaign: key.0,
                    subscriber: key.1,
                    attempt,
                    call: Box::new(call),
                },
                Some(committed),
            ));
            let sh = sh.clone();
            tokio::spawn(async move {
                let committed = is_committed.await.is_ok();
                if let Some(r) = lock(&sh.inflight).get_mut(&key) {
                    r.dialog_pending = false;
                    r.stale_record &= !committed;
                }
            });
        }
    });
    HandoverHooks {
        answered,
        let_go,
        stopping,
    }
}

/// A call let go while the log still has its task on this node (its leases lapsed and nobody has
/// moved the call) is parked instead of recorded: recorded as interrupted, it would be dialled again
/// while the phone still holds the silent call, and a 1 pressed there would be lost. False when the
/// task has left this node (moved, given back): the call's end is then recorded as any other.
fn park(sh: &Shared, due: &Due) -> bool {
    let mut inflight = lock(&sh.inflight);
    let handover = sh.cluster.read(|s| {
        s.task(due.key.0, due.key.1).and_then(|t| match t.state {
            campanile_cluster::TaskState::InFlight { node, attempt, .. }
                if node == sh.cfg.node && attempt == due.attempt =>
            {
                t.handover.clone()
            }
            _ => None,
        })
    });
    let (Some(handover), Some(call)) = (handover, inflight.get_mut(&due.key)) else {
        return false;
    };
    call.phase = Phase::Parked;
    call.parked = Some(Box::new(handover));
    drop(inflight);
    sh.channel_freed.notify_waiters();
    sh.wake.notify_one();
    tracing::warn!(
        campaign = %due.key.0,
        subscriber = %due.key.1,
        number = %campanile_cluster::mask_number(&due.phone),
        "answered call let go with this node's leases; it waits for the leader to move it or for \
         this node to continue it"
    );
    true
}

/// What becomes of a parked call, as the log has it now.
enum Fate {
    /// Still this node's, and it may carry it again: continue it.
    Continue(Box<(Due, campanile_cluster::CallHandover)>),
    /// Still this node's, not yet carried again (leases still lapsed, message not ready).
    Wait,
    /// Moved to another node, which continues the dialog: forget it here.
    Moved,
    /// Given back to be dialled again, or finished: end the silent dialog with BYE.
    Dropped,
    /// Still this node's but its campaign no longer runs: BYE and record it interrupted, as a
    /// call of a paused or cancelled campaign is hung up.
    Stopped { attempt: u32, epoch: Option<u64> },
}

/// A parked call is continued only under a fence that holds this long yet: right after the log
/// comes back a node's last counted renewal may be about to lapse, and a call continued then would
/// be let go again at once (and the phone re-invited twice).
const CONTINUE_MARGIN: Duration = Duration::from_millis(500);

/// Parked calls (`Phase::Parked`) whose fate the log has decided, acted on.
fn tend_parked(sh: &Arc<Shared>) {
    use campanile_cluster::TaskState;
    let mut inflight = lock(&sh.inflight);
    let parked: Vec<(TaskKey, bool)> = inflight
        .iter()
        .filter(|(_, r)| r.phase == Phase::Parked)
        .map(|(k, r)| (*k, r.taken_over))
        .collect();
    if parked.is_empty() {
        return;
    }
    let me = sh.cfg.node;
    let later = std::time::Instant::now() + CONTINUE_MARGIN;
    let (alive, held) = (sh.held.alive(later), sh.held.valid(later));
    let fates: Vec<(TaskKey, bool, Fate)> = sh.cluster.read(|s| {
        parked
            .iter()
            .map(|&(key, taken_over)| {
                let Some(t) = s.task(key.0, key.1) else {
                    return (key, taken_over, Fate::Dropped);
                };
                let TaskState::InFlight {
                    node,
                    attempt,
                    epoch,
                    ..
                } = t.state
                else {
                    return (key, taken_over, Fate::Dropped);
                };
                if node != me {
                    return (key, taken_over, Fate::Moved);
                }
                // The same fence that let it go: the heartbeat for a call taken over, the
                // partition's lease for one this node placed.
                let carry = if taken_over {
                    alive
                } else {
                    held.contains_key(&campanile_cluster::partition_of(key.1))
                };
                let fate = match (s.campaign(key.0), &t.handover) {
                    (Some(c), Some(h)) if c.state == CampaignState::Running => {
                        if carry {
                            let due = Due::of(s, t, c, attempt, epoch.unwrap_or(0));
                            Fate::Continue(Box::new((due, h.clone())))
                        } else {
                            Fate::Wait
                        }
                    }
                    _ => Fate::Stopped { attempt, epoch },
                };
                (key, taken_over, fate)
            })
            .collect()
    });
    let mut changed = false;
    for (key, taken_over, fate) in fates {
        changed |= !matches!(fate, Fate::Wait | Fate::Continue(..));
        match fate {
            Fate::Wait => {}
            Fate::Continue(call) => {
                let (due, handover) = *call;
                let number = campanile_cluster::mask_number(&due.phone);
                // Until the message is ready here the call stays parked (`audio_for` wakes us).
                let why = takeover::Continuing::Parked { taken_over };
                if takeover::continue_call(sh, &mut inflight, due, handover, why) {
                    changed = true;
                    sh.metrics.parked("continued");
                    tracing::info!(campaign = %key.0, subscriber = %key.1, %number,
                        "continuing an answered call this node let go with its leases");
                }
            }
            Fate::Moved => {
                inflight.remove(&key);
                sh.metrics.parked("moved");
            }
            Fate::Dropped | Fate::Stopped { .. } => {
                let Some(call) = inflight.get_mut(&key) else {
                    continue;
                };
                sh.metrics.parked("ended");
                let handover = call.parked.take();
                if let Fate::Stopped { attempt, epoch } = fate {
                    // The record takes the entry out once committed, as for any call's end.
                    call.phase = Phase::Ended;
                    let _ = sh.events.send((
                        AttemptEvent::Finished {
                            campaign: key.0,
                            subscriber: key.1,
                            attempt,
                            outcome: Outcome::Interrupted,
                            next: campanile_cluster::Next::RetryAt(now_ms()),
                            epoch,
                        },
                        None,
                    ));
                } else {
                    inflight.remove(&key);
                }
                if let Some(h) = handover {
                    let sh = sh.clone();
                    tokio::spawn(async move {
                        let answered = crate::call::end_recorded_dialog(
                            &sh.ctx,
                            &sh.cfg.from_user,
                            &h,
                            sh.cfg.timers,
                            sh.cfg.trunk,
                        )
                        .await;
                        tracing::info!(
                            campaign = %key.0,
                            subscriber = %key.1,
                            bye_answered = answered,
                            "ended the dialog of a call this node had let go and nobody continues"
                        );
                    });
                }
            }
        }
    }
    drop(inflight);
    if changed {
        sh.wake.notify_one();
    }
}

/// Records how a call this node placed (or took over) ended, and what follows for its citizen.
fn call_ended(
    sh: &Shared,
    due: &Due,
    spec: &CallSpec,
    outcome: CallOutcome,
    started: std::time::Instant,
) {
    if outcome == CallOutcome::HandedOver && park(sh, due) {
        return;
    }
    // A trunk that answered 503 pauses before anyone can take the channel this call frees.
    if let CallOutcome::TrunkUnavailable { retry_after, .. } = &outcome {
        tracing::warn!(outcome = %outcome, "trunk is overloaded; pausing new calls on it");
        lock(&sh.gate).on_overload(*retry_after, std::time::Instant::now());
    }
    // The channel is free for the next call now; the outcome's commit follows on its own.
    release_channel(sh, due.key, Phase::Ended);
    sh.wake.notify_one();
    let masked = campanile_cluster::mask_number(&spec.to);
    tracing::info!(
        campaign = %due.key.0,
        subscriber = %due.key.1,
        number = %masked,
        attempt = due.attempt,
        outcome = %outcome,
        secs = format_args!("{:.1}", started.elapsed().as_secs_f64()),
        "call ended"
    );
    let domain = outcome.to_domain();
    sh.metrics.call_ended(&sh.cluster, due.key.0, &outcome);
    let deadline = sh
        .cluster
        .read(|s| s.campaign(due.key.0).and_then(|c| c.spec.deadline_ms));
    let next = retry::next_step(
        &domain,
        due.attempt,
        &due.retry,
        due.require_confirmation,
        deadline,
        now_ms(),
    );
    let _ = sh.events.send((
        AttemptEvent::Finished {
            campaign: due.key.0,
            subscriber: due.key.1,
            attempt: due.attempt,
            outcome: domain,
            next,
            epoch: Some(due.epoch),
        },
        None,
    ));
}

/// Collects attempt events for `batch` and commits them as one Raft entry. A batch that fails to commit
/// is retried as it was: no outcome is dropped.
async fn batcher(sh: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Record>) {
    while let Some((first, notify)) = rx.recv().await {
        let mut events = vec![first];
        let mut waiting: Vec<tokio::sync::oneshot::Sender<()>> = notify.into_iter().collect();
        let deadline = tokio::time::Instant::now() + sh.cfg.batch;
        while events.len() < 512 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((e, notify))) => {
                    events.push(e);
                    waiting.extend(notify);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let cmd = Command::RecordAttempts {
                at_ms: now_ms(),
                node: sh.cfg.node,
                events: events.clone(),
            };
            match sh.cluster.write(cmd).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, events = events.len(), "cannot commit call outcomes yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        for w in waiting {
            let _ = w.send(());
        }
        let mut inflight = lock(&sh.inflight);
        for e in &events {
            if let AttemptEvent::Finished {
                campaign,
                subscriber,
                ..
            } = e
            {
                inflight.remove(&(*campaign, *subscriber));
            }
        }
        drop(inflight);
        sh.wake.notify_one();
    }
}

/// OPTIONS pings to the trunk: any response means it is reachable; two unanswered pings mark it down.
async fn ping_trunk(sh: Arc<Shared>, every: Duration, mut shutdown: watch::Receiver<bool>) {
    use crate::sip::message::{new_branch, random_token, Method, RequestBuilder};
    loop {
        let endpoint = sh.ctx.endpoint.clone();
        let local = endpoint.local_addr();
        let call_id = format!("{}@campanile-ping", random_token(16));
        let mut channel = endpoint.register(&call_id);
        let mut ping = RequestBuilder::new(Method::Options, format!("sip:{}", sh.cfg.trunk_host));
        if let Some(route) = &sh.cfg.outbound_proxy {
            ping = ping.header("Route", route.clone());
        }
        let ping = ping
            .header(
                "Via",
                format!(
                    "SIP/2.0/{} {local};branch={};rport",
                    endpoint.via_transport(),
                    new_branch()
                ),
            )
            .header("Max-Forwards", "70")
            .header(
                "From",
                format!("<sip:{}@{local}>;tag={}", sh.cfg.from_user, random_token(8)),
            )
            .header("To", format!("<sip:{}>", sh.cfg.trunk_host))
            .header("Call-ID", call_id)
            .header("CSeq", "1 OPTIONS")
            .build();
        let answered = match ping {
            Ok(req) => {
                let wait = every.min(Duration::from_secs(5));
                crate::sip::endpoint::request_and_wait(
                    &endpoint,
                    &mut channel,
                    req,
                    sh.cfg.trunk,
                    sh.cfg.timers,
                    wait,
                )
                .await
                .is_some()
            }
            Err(_) => false,
        };
        drop(channel);
        let (changed, up) = {
            let mut gate = lock(&sh.gate);
            (gate.on_ping(answered), gate.is_up())
        };
        sh.metrics.set_trunk_up(up);
        match changed {
            Some(false) => {
                tracing::error!(trunk = %sh.cfg.trunk_host, "trunk stopped answering OPTIONS pings: no new calls until it answers; other nodes, if any, take its partitions meanwhile")
            }
            Some(true) => {
                tracing::warn!(trunk = %sh.cfg.trunk_host, "trunk answers OPTIONS pings again: dialing resumes");
                sh.wake.notify_one();
            }
            None => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Cancelled campaigns stop ringing at once.
fn abort_stopped_campaigns(sh: &Shared) {
    let inflight = lock(&sh.inflight);
    if inflight.is_empty() {
        return;
    }
    sh.cluster.read(|s| {
        for ((cid, _), call) in inflight.iter() {
            let running = s
                .campaign(*cid)
                .is_some_and(|c| c.state == CampaignState::Running);
            if !running {
                let _ = call.abort.send(true);
            }
        }
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the maps inconsistent; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
