//! Prometheus metrics on the node's own registry (never the global one), named after Prometheus
//! conventions so `promtool check metrics` is clean.
//!
//! Two kinds of series:
//! - **Cluster-wide** (`campanile_campaign_*` gauges): refreshed from the replicated state at scrape
//!   time, so every node reports the same answer rates; aggregate them with `max`, never `sum`.
//! - **This node's own** (counters and histograms): what this node observed on the calls it placed;
//!   aggregate them across nodes with `sum`.
//!
//! Per-campaign series are kept only for the campaigns an operator still looks at (see
//! [`reported_campaigns`]): running and paused ones, and the [`REPORTED_CAMPAIGNS`] most recent
//! others. Older campaigns' series are dropped, so a city that sends an alert a day does not grow
//! its scrape without bound.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use campanile_cluster::{Campaign, CampaignId, CampaignState, Cluster, Outcome};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::call::CallOutcome;

/// Finished campaigns (besides running and paused ones) whose series are kept.
pub const REPORTED_CAMPAIGNS: usize = 50;

/// How a takeover of another node's call ended (the `result` label of `takeovers_total`).
pub const TAKEOVER_RESULTS: [&str; 3] = ["resumed", "redialled", "failed"];

/// What became of an answered call this node let go when its leases lapsed (the `fate` label of
/// `parked_calls_total`): continued here with a re-INVITE, moved to another node by the leader, or
/// ended with BYE because the log gave its task back or its campaign stopped.
pub const PARKED_FATES: [&str; 3] = ["continued", "moved", "ended"];

/// Upper bounds of `campanile_rtp_lateness_seconds`, in µs: the 20 ms tick's phases are 1 ms
/// apart, and the media benchmark's bound is 10 ms. Below the pacer's last bucket (100 ms), which
/// also holds everything later.
const RTP_LATENESS_BOUNDS_US: [u64; 7] = [500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000];

/// The node's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    calls: IntCounterVec,
    confirmed_calls: IntCounter,
    trunk_rejections: IntCounterVec,
    pub calls_in_flight: IntGauge,
    pub leases_held: IntGauge,
    answer_ratio: GaugeVec,
    confirmed_ratio: GaugeVec,
    attempts_per_confirmed: GaugeVec,
    campaign_tasks: IntGaugeVec,
    campaign_calls: IntCounterVec,
    time_to_answer: HistogramVec,
    time_to_confirm: HistogramVec,
    trunk_channels: IntGaugeVec,
    trunk_channels_max: IntGaugeVec,
    takeovers: IntCounterVec,
    parked: IntCounterVec,
    stalls: HistogramVec,
    peer_clock_offset: GaugeVec,
    peer_clock_rtt: GaugeVec,
    raft_applied: IntGauge,
    drill_mode: IntGauge,
    trunk_up: IntGauge,
    sip_malformed: IntGauge,
    sip_stray_answers_ended: IntGauge,
    sip_shed: IntGauge,
    sip_tcp_refused: IntGauge,
    rtp_streams: IntGauge,
    rtp_packets: IntCounter,
    /// The pacer's per-packet lateness (a histogram the pacer keeps; see `set_rtp`).
    rtp_lateness: Arc<Mutex<Option<prometheus::proto::MetricFamily>>>,
    /// This node's trunk: its name and channel limit.
    trunk: Arc<Mutex<Option<(String, usize)>>>,
    /// Label sets of this node's per-campaign series, so those of campaigns no longer reported
    /// can be removed.
    observed: Arc<Mutex<Observed>>,
}

/// (campaign, tenant) → the outcome labels seen for it.
type Observed = BTreeMap<(String, String), BTreeSet<&'static str>>;

fn must<T>(r: Result<T, prometheus::Error>) -> T {
    // Metric definitions are static; a failure here is a programming error caught by the tests.
    r.unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("campanile".into()), None)
            .unwrap_or_else(|_| Registry::new());
        let calls = must(IntCounterVec::new(
            Opts::new(
                "calls_total",
                "Call attempts placed by this node, by outcome.",
            ),
            &["outcome"],
        ));
        let confirmed_calls = must(IntCounter::new(
            "confirmed_calls_total",
            "Calls on which the citizen pressed 1, placed by this node.",
        ));
        let trunk_rejections = must(IntCounterVec::new(
            Opts::new(
                "trunk_rejections_total",
                "Calls the trunk or the network refused, by SIP status code (busy and no answer excluded).",
            ),
            &["code"],
        ));
        let calls_in_flight = must(IntGauge::new(
            "calls_in_flight",
            "Calls this node has in progress right now.",
        ));
        let leases_held = must(IntGauge::new(
            "leases_held",
            "Partitions whose lease this node holds now (it dials only their subscribers).",
        ));
        let answer_ratio = must(GaugeVec::new(
            Opts::new(
                "campaign_answer_ratio",
                "Answered attempts over finished attempts, per campaign (cluster-wide).",
            ),
            &["campaign", "tenant"],
        ));
        let confirmed_ratio = must(GaugeVec::new(
            Opts::new(
                "campaign_confirmed_ratio",
                "Confirmed subscribers over targeted subscribers, per campaign (cluster-wide).",
            ),
            &["campaign", "tenant"],
        ));
        let attempts_per_confirmed = must(GaugeVec::new(
            Opts::new(
                "campaign_attempts_per_confirmed",
                "Calls placed over subscribers confirmed, per campaign (cluster-wide; absent until the first confirmation).",
            ),
            &["campaign", "tenant"],
        ));
        let campaign_tasks = must(IntGaugeVec::new(
            Opts::new(
                "campaign_tasks",
                "Call tasks per campaign by state (cluster-wide).",
            ),
            &["campaign", "tenant", "state"],
        ));
        let campaign_calls = must(IntCounterVec::new(
            Opts::new(
                "campaign_calls_total",
                "Calls of a campaign placed by this node, by outcome.",
            ),
            &["campaign", "tenant", "outcome"],
        ));
        let time_to_answer = must(HistogramVec::new(
            HistogramOpts::new(
                "campaign_time_to_answer_seconds",
                "From the INVITE to the answer, for calls of a campaign placed by this node.",
            )
            .buckets(vec![
                1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
            ]),
            &["campaign", "tenant"],
        ));
        let time_to_confirm = must(HistogramVec::new(
            HistogramOpts::new(
                "campaign_time_to_confirm_seconds",
                "From the answer to the key press 1, for calls of a campaign placed by this node.",
            )
            .buckets(vec![
                5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0,
            ]),
            &["campaign", "tenant"],
        ));
        let trunk_channels = must(IntGaugeVec::new(
            Opts::new(
                "trunk_channels_in_use",
                "Channels of the trunk this node's alert calls use right now.",
            ),
            &["trunk"],
        ));
        let trunk_channels_max = must(IntGaugeVec::new(
            Opts::new(
                "trunk_channels_max",
                "Concurrent channels the trunk allows this node (trunk.max_channels).",
            ),
            &["trunk"],
        ));
        let takeovers = must(IntCounterVec::new(
            Opts::new(
                "takeovers_total",
                "Calls answered on a failed node that this node took over, by result (resumed, redialled, failed).",
            ),
            &["result"],
        ));
        for result in TAKEOVER_RESULTS {
            takeovers.with_label_values(&[result]);
        }
        let parked = must(IntCounterVec::new(
            Opts::new(
                "parked_calls_total",
                "Answered calls this node let go when its leases lapsed (parked, the phone still in \
                 the call), by fate: continued here, moved to another node, ended with BYE.",
            ),
            &["fate"],
        ));
        for fate in PARKED_FATES {
            parked.with_label_values(&[fate]);
        }
        let stalls = must(HistogramVec::new(
            HistogramOpts::new(
                "stall_seconds",
                "Times this node stopped running for 250 ms or more, by kind: the process not \
                 scheduled, or the async runtime polling no task (leases, calls and audio wait).",
            )
            .buckets(vec![0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0]),
            &["kind"],
        ));
        for kind in [
            crate::watchdog::Stall::Process,
            crate::watchdog::Stall::Runtime,
        ] {
            stalls.with_label_values(&[kind.label()]);
        }
        let peer_clock_offset = must(GaugeVec::new(
            Opts::new(
                "peer_clock_offset_seconds",
                "Another member's wall clock minus this node's (positive: it is ahead), from the \
                 quickest of its last probes over the cluster's QUIC connection; absent while the \
                 member cannot be probed.",
            ),
            &["peer"],
        ));
        let peer_clock_rtt = must(GaugeVec::new(
            Opts::new(
                "peer_clock_rtt_seconds",
                "Round trip of the probe behind campanile_peer_clock_offset_seconds (the offset's \
                 error is at most half of it).",
            ),
            &["peer"],
        ));
        let raft_applied = must(IntGauge::new(
            "raft_applied_index",
            "Index of the last Raft log entry applied on this node.",
        ));
        let drill_mode = must(IntGauge::new(
            "drill_mode",
            "1 when calls go to the built-in simulated city instead of a real trunk.",
        ));
        let trunk_up = must(IntGauge::new(
            "trunk_up",
            "1 while the trunk answers OPTIONS pings (or pings are off), 0 when it is down.",
        ));
        trunk_up.set(1);
        let sip_malformed = must(IntGauge::new(
            "sip_malformed_datagrams",
            "Datagrams dropped by the SIP intake as malformed since the node started.",
        ));
        let sip_stray_answers_ended = must(IntGauge::new(
            "sip_stray_answers_ended",
            "2xx answers to INVITEs no call held any more (timed out, given up), ACKed and ended with BYE since the node started.",
        ));
        let sip_shed = must(IntGauge::new(
            "sip_shed_messages",
            format!(
                "SIP messages for no call (new requests, stray answers) dropped since the node started because {} were already waiting: a flood.",
                crate::sip::endpoint::UNROUTED_QUEUE
            ),
        ));
        let sip_tcp_refused = must(IntGauge::new(
            "sip_tcp_connections_refused",
            format!(
                "SIP TCP connections closed as soon as accepted since the node started because {} opened by others were open already.",
                crate::sip::endpoint::MAX_INBOUND_TCP
            ),
        ));
        let rtp_streams = must(IntGauge::new(
            "rtp_streams",
            "RTP streams the pacer is playing right now (one per call hearing the message).",
        ));
        let rtp_packets = must(IntCounter::new(
            "rtp_packets_sent_total",
            "RTP packets the pacer sent since the node started.",
        ));
        for c in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(confirmed_calls.clone()),
            Box::new(trunk_rejections.clone()),
            Box::new(calls_in_flight.clone()),
            Box::new(leases_held.clone()),
            Box::new(answer_ratio.clone()),
            Box::new(confirmed_ratio.clone()),
            Box::new(attempts_per_confirmed.clone()),
            Box::new(campaign_tasks.clone()),
            Box::new(campaign_calls.clone()),
            Box::new(time_to_answer.clone()),
            Box::new(time_to_confirm.clone()),
            Box::new(trunk_channels.clone()),
            Box::new(trunk_channels_max.clone()),
            Box::new(takeovers.clone()),
            Box::new(parked.clone()),
            Box::new(stalls.clone()),
            Box::new(peer_clock_offset.clone()),
            Box::new(peer_clock_rtt.clone()),
            Box::new(raft_applied.clone()),
            Box::new(drill_mode.clone()),
            Box::new(trunk_up.clone()),
            Box::new(sip_malformed.clone()),
            Box::new(sip_stray_answers_ended.clone()),
            Box::new(sip_shed.clone()),
            Box::new(sip_tcp_refused.clone()),
            Box::new(rtp_streams.clone()),
            Box::new(rtp_packets.clone()),
        ] {
            must(registry.register(c));
        }
        Metrics {
            registry: Arc::new(registry),
            calls,
            confirmed_calls,
            trunk_rejections,
            calls_in_flight,
            leases_held,
            answer_ratio,
            confirmed_ratio,
            attempts_per_confirmed,
            campaign_tasks,
            campaign_calls,
            time_to_answer,
            time_to_confirm,
            trunk_channels,
            trunk_channels_max,
            takeovers,
            parked,
            stalls,
            peer_clock_offset,
            peer_clock_rtt,
            raft_applied,
            drill_mode,
            trunk_up,
            sip_malformed,
            sip_stray_answers_ended,
            sip_shed,
            sip_tcp_refused,
            rtp_streams,
            rtp_packets,
            rtp_lateness: Arc::default(),
            trunk: Arc::default(),
            observed: Arc::default(),
        }
    }

    /// Counts one finished call (this node's totals, by outcome and by trunk rejection code).
    pub fn record_call(&self, outcome: &Outcome, confirmed: bool) {
        self.calls.with_label_values(&[outcome.label()]).inc();
        if confirmed {
            self.confirmed_calls.inc();
        }
        if let Outcome::Rejected { code }
        | Outcome::TrunkRejected { code }
        | Outcome::InvalidNumber { code } = outcome
        {
            self.trunk_rejections
                .with_label_values(&[&code.to_string()])
                .inc();
        }
    }

    /// Counts one finished alert call of `campaign`: this node's totals, the campaign's calls by
    /// outcome, and its time to confirm.
    pub fn call_ended(&self, cluster: &Cluster, campaign: CampaignId, outcome: &CallOutcome) {
        let domain = outcome.to_domain();
        self.record_call(&domain, matches!(outcome, CallOutcome::Confirmed { .. }));
        let Some(tenant) = cluster.read(|s| s.campaign(campaign).map(|c| c.spec.tenant.clone()))
        else {
            return;
        };
        let label = domain.label();
        let (id, tenant) = (campaign.0.to_string(), tenant);
        let labels = [id.as_str(), tenant.as_str()];
        self.campaign_calls
            .with_label_values(&[&id, &tenant, label])
            .inc();
        if let Some(t) = time_to_confirm(outcome) {
            self.time_to_confirm
                .with_label_values(&labels)
                .observe(t.as_secs_f64());
        }
        lock(&self.observed)
            .entry((id, tenant))
            .or_default()
            .insert(label);
    }

    /// Observes the time from a call's INVITE to its answer (every answered call this node placed,
    /// whatever its outcome turns out to be).
    pub fn answered(&self, cluster: &Cluster, campaign: CampaignId, after: Duration) {
        let Some(tenant) = cluster.read(|s| s.campaign(campaign).map(|c| c.spec.tenant.clone()))
        else {
            return;
        };
        self.time_to_answer
            .with_label_values(&[campaign.0.to_string().as_str(), tenant.as_str()])
            .observe(after.as_secs_f64());
    }

    /// Counts a takeover of a call answered on another node: `result` is one of
    /// [`TAKEOVER_RESULTS`] (`resumed`, `redialled`, `failed`).
    pub fn takeover(&self, result: &str) {
        self.takeovers.with_label_values(&[result]).inc();
    }

    /// Counts what became of a parked call: `fate` is one of [`PARKED_FATES`].
    pub fn parked(&self, fate: &str) {
        self.parked.with_label_values(&[fate]).inc();
    }

    /// Times a stall of this node (`kind`: `process` or `runtime`, see `watchdog`).
    pub fn stalled(&self, kind: &str, length: Duration) {
        self.stalls
            .with_label_values(&[kind])
            .observe(length.as_secs_f64());
    }

    /// Another member's clock as last estimated (`clockwatch`), or `None` to drop its series
    /// (it cannot be probed, or left the cluster).
    pub fn set_peer_clock(&self, peer: u64, estimate: Option<(Duration, f64)>) {
        let peer = peer.to_string();
        match estimate {
            Some((rtt, offset_s)) => {
                self.peer_clock_offset
                    .with_label_values(&[&peer])
                    .set(offset_s);
                self.peer_clock_rtt
                    .with_label_values(&[&peer])
                    .set(rtt.as_secs_f64());
            }
            None => {
                let _ = self.peer_clock_offset.remove_label_values(&[&peer]);
                let _ = self.peer_clock_rtt.remove_label_values(&[&peer]);
            }
        }
    }

    /// Names this node's trunk (`trunk.name`) and its channel limit for the per-trunk series.
    pub fn set_trunk(&self, name: &str, max_channels: usize) {
        self.trunk_channels_max
            .with_label_values(&[name])
            .set(max_channels as i64);
        self.trunk_channels.with_label_values(&[name]).set(0);
        *lock(&self.trunk) = Some((name.to_string(), max_channels));
    }

    pub fn set_trunk_up(&self, up: bool) {
        self.trunk_up.set(up as i64);
    }

    pub fn set_drill_mode(&self, on: bool) {
        self.drill_mode.set(on as i64);
    }

    /// Takes the SIP intake's counters.
    pub fn set_sip(&self, stats: &crate::sip::endpoint::EndpointStats) {
        let load =
            |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed) as i64;
        self.sip_malformed.set(load(&stats.dropped_malformed));
        self.sip_stray_answers_ended.set(load(&stats.ended_stray));
        self.sip_shed.set(load(&stats.dropped_busy));
        self.sip_tcp_refused.set(load(&stats.refused_connections));
    }

    /// Takes the pacer's figures: streams playing, packets sent, and per-packet lateness (how
    /// long after its due time each packet went out) as the histogram
    /// `campanile_rtp_lateness_seconds`, from the pacer's own 10 µs buckets.
    pub fn set_rtp(&self, pacer: &crate::media::pacer::PacerHandle) {
        use prometheus::proto::{Bucket, Histogram, Metric, MetricFamily, MetricType};
        // One scrape at a time, so that two cannot both add the same packets to the counter.
        let mut lateness = lock(&self.rtp_lateness);
        self.rtp_streams.set(pacer.active_streams() as i64);
        let sent = pacer.packets_sent();
        let counted = self.rtp_packets.get();
        if sent > counted {
            self.rtp_packets.inc_by(sent - counted);
        }
        let totals = pacer.lateness_totals(&RTP_LATENESS_BOUNDS_US);
        let mut h = Histogram::default();
        h.set_sample_count(totals.count);
        h.set_sample_sum(totals.sum_us as f64 / 1e6);
        h.set_bucket(
            totals
                .below
                .iter()
                .map(|&(bound, n)| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(bound as f64 / 1e6);
                    b.set_cumulative_count(n);
                    b
                })
                .collect(),
        );
        let mut m = Metric::default();
        m.set_histogram(h);
        let mut family = MetricFamily::default();
        family.set_name("campanile_rtp_lateness_seconds".into());
        family.set_help(
            "How late the pacer sent each RTP packet after its due time (since the node started). \
             Bounds are at 10 µs resolution: a packet exactly on a bound counts in the next."
                .into(),
        );
        family.set_field_type(MetricType::HISTOGRAM);
        family.mut_metric().push(m);
        *lateness = Some(family);
    }

    /// Refreshes the state-derived gauges and renders the text exposition format.
    pub fn render(&self, cluster: &Cluster) -> String {
        self.raft_applied.set(*cluster.applied().borrow() as i64);
        if let Some((name, _)) = lock(&self.trunk).as_ref() {
            // The dialer's calls are the trunk's alert channels (one trunk per node).
            self.trunk_channels
                .with_label_values(&[name])
                .set(self.calls_in_flight.get());
        }
        self.answer_ratio.reset();
        self.confirmed_ratio.reset();
        self.attempts_per_confirmed.reset();
        self.campaign_tasks.reset();
        let reported = cluster.read(|s| {
            let reported = reported_campaigns(s.campaigns());
            for c in s.campaigns().filter(|c| reported.contains(&c.id)) {
                self.set_campaign_gauges(c);
            }
            reported
        });
        self.forget_unreported(&reported);
        let mut families = self.registry.gather();
        families.extend(lock(&self.rtp_lateness).clone());
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn set_campaign_gauges(&self, c: &Campaign) {
        let id = c.id.0.to_string();
        let labels = [id.as_str(), c.spec.tenant.as_str()];
        let k = &c.counts;
        self.answer_ratio
            .with_label_values(&labels)
            .set(k.answer_ratio());
        let confirmed = if k.targeted == 0 {
            0.0
        } else {
            k.confirmed as f64 / k.targeted as f64
        };
        self.confirmed_ratio
            .with_label_values(&labels)
            .set(confirmed);
        if k.confirmed > 0 {
            self.attempts_per_confirmed
                .with_label_values(&labels)
                .set(k.attempts as f64 / k.confirmed as f64);
        }
        for (state, n) in [
            ("pending", k.pending),
            ("in_flight", k.in_flight),
            ("confirmed", k.confirmed),
            ("exhausted", k.exhausted),
            ("invalid", k.invalid),
            ("opted_out", k.opted_out),
            ("cancelled", k.cancelled),
        ] {
            self.campaign_tasks
                .with_label_values(&[labels[0], labels[1], state])
                .set(n as i64);
        }
    }

    /// Drops this node's per-campaign counters and histograms of campaigns no longer reported.
    fn forget_unreported(&self, reported: &BTreeSet<CampaignId>) {
        let mut observed = lock(&self.observed);
        observed.retain(|(id, tenant), outcomes| {
            let keep = id
                .parse()
                .is_ok_and(|n: u64| reported.contains(&CampaignId(n)));
            if !keep {
                for outcome in outcomes.iter() {
                    let _ = self.campaign_calls.remove_label_values(&[
                        id.as_str(),
                        tenant.as_str(),
                        outcome,
                    ]);
                }
                let _ = self
                    .time_to_answer
                    .remove_label_values(&[id.as_str(), tenant.as_str()]);
                let _ = self
                    .time_to_confirm
                    .remove_label_values(&[id.as_str(), tenant.as_str()]);
            }
            keep
        });
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The campaigns whose per-campaign series are exported: every running or paused one, and the
/// [`REPORTED_CAMPAIGNS`] most recently created among the others (drafts never: nothing is dialled).
pub fn reported_campaigns<'a>(
    campaigns: impl Iterator<Item = &'a Campaign>,
) -> BTreeSet<CampaignId> {
    let mut out = BTreeSet::new();
    let mut ended: Vec<(u64, CampaignId)> = Vec::new();
    for c in campaigns {
        match c.state {
            CampaignState::Draft => {}
            CampaignState::Running | CampaignState::Paused => {
                out.insert(c.id);
            }
            CampaignState::Completed | CampaignState::Cancelled => ended.push((c.created_ms, c.id)),
        }
    }
    ended.sort_unstable_by(|a, b| b.cmp(a));
    out.extend(ended.into_iter().take(REPORTED_CAMPAIGNS).map(|(_, id)| id));
    out
}

/// How long after the answer a call was confirmed, where its outcome says.
fn time_to_confirm(outcome: &CallOutcome) -> Option<Duration> {
    match outcome {
        CallOutcome::Confirmed { after } => Some(*after),
        _ => None,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain bookkeeping: a panic elsewhere while holding it cannot leave it inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use campanile_cluster::{Audience, CampaignSpec, Counts, Message, Priority, RetryPolicy};

    fn campaign(id: u64, state: CampaignState) -> Campaign {
        Campaign {
            id: CampaignId(id),
            spec: CampaignSpec {
                title: format!("allerta {id}"),
                message: Message::Tts {
                    text: "Allerta".into(),
                    language: "it".into(),
                },
                audience: Audience::All,
                priority: Priority::Info,
                require_confirmation: true,
                retry: RetryPolicy::default_for(Priority::Info),
                tenant: "pisa".into(),
                not_before_ms: None,
                deadline_ms: None,
            },
            state,
            created_ms: 1_000 * id,
            started_ms: None,
            finished_ms: None,
            counts: Counts::default(),
            created_by: None,
            approval: Default::default(),
            by_node: Default::default(),
        }
    }

    #[test]
    fn running_campaigns_and_the_fifty_latest_ended_ones_are_reported() {
        let mut all: Vec<Campaign> = (1..=120)
            .map(|id| campaign(id, CampaignState::Completed))
            .collect();
        all[0].state = CampaignState::Running;
        all[1].state = CampaignState::Paused;
        all[2].state = CampaignState::Cancelled;
        all[119].state = CampaignState::Draft;
        let reported = reported_campaigns(all.iter());
        assert!(reported.contains(&CampaignId(1)), "running, however old");
        assert!(reported.contains(&CampaignId(2)), "paused, however old");
        assert!(!reported.contains(&CampaignId(3)), "old and ended");
        assert!(!reported.contains(&CampaignId(120)), "a draft dials nobody");
        let ended: Vec<u64> = reported.iter().map(|c| c.0).filter(|&c| c > 2).collect();
        assert_eq!(ended, (70..=119).collect::<Vec<u64>>());
    }

    #[test]
    fn confirmation_time_comes_from_the_outcome() {
        let after = Duration::from_secs(25);
        assert_eq!(
            time_to_confirm(&CallOutcome::Confirmed { after }),
            Some(after)
        );
        assert_eq!(time_to_confirm(&CallOutcome::Busy), None);
    }

    /// A labelled counter's series: (label value, count), sorted.
    fn series(m: &Metrics, name: &str) -> Vec<(String, f64)> {
        let families = m.registry.gather();
        let family = families
            .iter()
            .find(|f| f.name() == name)
            .unwrap_or_else(|| panic!("{name} is registered"));
        let mut seen: Vec<(String, f64)> = family
            .get_metric()
            .iter()
            .map(|m| {
                (
                    m.get_label()[0].value().to_string(),
                    m.get_counter().get_value(),
                )
            })
            .collect();
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        seen
    }

    #[test]
    fn takeover_results_and_parked_fates_are_exported_from_the_start() {
        let m = Metrics::new();
        m.takeover("resumed");
        m.parked("moved");
        let counts = |pairs: &[(&str, f64)]| -> Vec<(String, f64)> {
            pairs.iter().map(|(l, v)| (l.to_string(), *v)).collect()
        };
        assert_eq!(
            series(&m, "campanile_takeovers_total"),
            counts(&[("failed", 0.0), ("redialled", 0.0), ("resumed", 1.0)])
        );
        assert_eq!(
            series(&m, "campanile_parked_calls_total"),
            counts(&[("continued", 0.0), ("ended", 0.0), ("moved", 1.0)])
        );
    }
}
