//! Prometheus metrics on the node's own registry (never the global one), named after Prometheus
//! conventions so `promtool check metrics` is clean. Per-campaign gauges are refreshed from the
//! replicated state at scrape time, so every node reports the same answer rates.

use std::sync::Arc;

use campanile_cluster::{CampaignState, Cluster, Outcome};
use prometheus::{
    Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

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
    campaign_tasks: IntGaugeVec,
    raft_applied: IntGauge,
    drill_mode: IntGauge,
    trunk_up: IntGauge,
    sip_malformed: IntGauge,
}

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
            &["campaign"],
        ));
        let confirmed_ratio = must(GaugeVec::new(
            Opts::new(
                "campaign_confirmed_ratio",
                "Confirmed subscribers over targeted subscribers, per campaign (cluster-wide).",
            ),
            &["campaign"],
        ));
        let campaign_tasks = must(IntGaugeVec::new(
            Opts::new(
                "campaign_tasks",
                "Call tasks per campaign by state (cluster-wide).",
            ),
            &["campaign", "state"],
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
        for c in [
            Box::new(calls.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(confirmed_calls.clone()),
            Box::new(trunk_rejections.clone()),
            Box::new(calls_in_flight.clone()),
            Box::new(leases_held.clone()),
            Box::new(answer_ratio.clone()),
            Box::new(confirmed_ratio.clone()),
            Box::new(campaign_tasks.clone()),
            Box::new(raft_applied.clone()),
            Box::new(drill_mode.clone()),
            Box::new(trunk_up.clone()),
            Box::new(sip_malformed.clone()),
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
            campaign_tasks,
            raft_applied,
            drill_mode,
            trunk_up,
            sip_malformed,
        }
    }

    /// Counts one finished call.
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

    pub fn set_trunk_up(&self, up: bool) {
        self.trunk_up.set(up as i64);
    }

    pub fn set_drill_mode(&self, on: bool) {
        self.drill_mode.set(on as i64);
    }

    pub fn set_sip_malformed(&self, n: u64) {
        self.sip_malformed.set(n as i64);
    }

    /// Refreshes the state-derived gauges and renders the text exposition format.
    pub fn render(&self, cluster: &Cluster) -> String {
        self.raft_applied.set(*cluster.applied().borrow() as i64);
        self.answer_ratio.reset();
        self.confirmed_ratio.reset();
        self.campaign_tasks.reset();
        cluster.read(|s| {
            for c in s.campaigns() {
                if c.state == CampaignState::Draft {
                    continue;
                }
                let id = c.id.0.to_string();
                self.answer_ratio
                    .with_label_values(&[&id])
                    .set(c.counts.answer_ratio());
                let confirmed = if c.counts.targeted == 0 {
                    0.0
                } else {
                    c.counts.confirmed as f64 / c.counts.targeted as f64
                };
                self.confirmed_ratio
                    .with_label_values(&[&id])
                    .set(confirmed);
                for (state, n) in [
                    ("pending", c.counts.pending),
                    ("in_flight", c.counts.in_flight),
                    ("confirmed", c.counts.confirmed),
                    ("exhausted", c.counts.exhausted),
                    ("invalid", c.counts.invalid),
                    ("opted_out", c.counts.opted_out),
                    ("cancelled", c.counts.cancelled),
                ] {
                    self.campaign_tasks
                        .with_label_values(&[&id, state])
                        .set(n as i64);
                }
            }
        });
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
