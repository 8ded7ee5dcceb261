//! Checks that the other members' wall clocks agree with this node's, and says so when they do not.
//!
//! Heartbeats, leases and call records are stamped with the sending node's wall clock and judged by
//! the leader's: a node trusts a lease 1 s less than it lasts, and after an election the leader
//! moves a member's answered calls 300 ms before that member's own leases would stop it, which
//! holds only while their clocks agree within those 300 ms. A node whose clock is a second behind
//! looks silent to the leader while it plays its calls (they move away from under it); one ahead
//! is found dead that much later. Raft itself never notices. So every [`PROBE_EVERY`] each node
//! asks every other member for its clock (`campanile_cluster::clock`: NTP's arithmetic over the
//! cluster's QUIC connection), publishes each estimate as `campanile_peer_clock_offset_seconds`,
//! and warns while one is off by more than [`TOLERATED`]; the Prometheus rule
//! `CampanilePeerClockOffset` alerts on the same series. Nothing is corrected: keeping clocks right
//! is NTP's job (chrony, systemd-timesyncd), and this tells the SRE when it is not being done.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use campanile_cluster::clock::TOLERATED;
use campanile_cluster::Cluster;

use crate::metrics::Metrics;

/// How often every other member's clock is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// While a member's clock stays off, the warning is repeated this often.
const WARN_AGAIN: Duration = Duration::from_secs(60);

/// What to say about one member after a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Say {
    /// Its clock is off by more than [`TOLERATED`] (first time, or again after [`WARN_AGAIN`]).
    Off,
    /// Back within [`TOLERATED`] after having been off.
    Agrees,
}

/// The verdicts between probes: the pure part, driven by the task with real times and by the tests
/// with made-up ones.
#[derive(Debug, Default)]
struct Verdicts {
    /// Members whose clock is off now, with when that was last said.
    off: BTreeMap<u64, Instant>,
}

impl Verdicts {
    /// Judges member `peer`'s clock, `offset_us` from ours, at `now`.
    fn judge(&mut self, peer: u64, offset_us: i64, now: Instant) -> Option<Say> {
        if offset_us.unsigned_abs() > TOLERATED.as_micros() as u64 {
            match self.off.get(&peer) {
                Some(said) if now.duration_since(*said) < WARN_AGAIN => None,
                _ => {
                    self.off.insert(peer, now);
                    Some(Say::Off)
                }
            }
        } else {
            self.off.remove(&peer).map(|_| Say::Agrees)
        }
    }

    /// Forgets members that are no longer there.
    fn keep(&mut self, present: impl Fn(u64) -> bool) {
        self.off.retain(|peer, _| present(*peer));
    }
}

/// Probes the other members' clocks every [`PROBE_EVERY`] until `stop` turns true.
pub async fn watch(
    cluster: Cluster,
    metrics: Metrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut verdicts = Verdicts::default();
    let mut probed: Vec<u64> = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        let results = cluster.probe_clocks().await;
        for gone in probed
            .iter()
            .filter(|p| !results.iter().any(|(id, _)| id == *p))
        {
            metrics.set_peer_clock(*gone, None);
        }
        probed = results.iter().map(|(id, _)| *id).collect();
        verdicts.keep(|p| probed.contains(&p));
        for (peer, estimate) in results {
            let sample = match estimate {
                Ok(s) => s,
                Err(why) => {
                    // A member down is reported by Raft and the dashboard; its series goes.
                    tracing::debug!(node = peer, reason = %why, "cannot probe a member's clock");
                    metrics.set_peer_clock(peer, None);
                    continue;
                }
            };
            let offset_s = sample.offset_us as f64 / 1e6;
            let rtt = Duration::from_micros(sample.rtt_us);
            metrics.set_peer_clock(peer, Some((rtt, offset_s)));
            let (offset_ms, rtt_ms) = (sample.offset_us as f64 / 1e3, rtt.as_secs_f64() * 1e3);
            let way = if offset_s > 0.0 { "ahead of" } else { "behind" };
            match verdicts.judge(peer, sample.offset_us, Instant::now()) {
                Some(Say::Off) => tracing::warn!(
                    node = peer,
                    offset_ms,
                    rtt_ms,
                    "node {peer}'s clock is {:.3} s {way} this node's: leases and takeovers \
                     assume members' clocks within 300 ms (a node behind loses its answered \
                     calls to others while it plays them); check NTP on both",
                    offset_s.abs()
                ),
                Some(Say::Agrees) => tracing::info!(
                    node = peer,
                    offset_ms,
                    rtt_ms,
                    "node {peer}'s clock agrees with this node's again"
                ),
                None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_past_the_tolerance_is_said_once_a_minute_and_its_end_once() {
        let mut v = Verdicts::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let tolerated = TOLERATED.as_micros() as i64;
        // Within the tolerance, either way: nothing to say.
        assert_eq!(v.judge(2, tolerated, at(0)), None);
        assert_eq!(v.judge(2, -tolerated, at(0)), None);
        // Past it, behind: said, then not again for a minute.
        assert_eq!(v.judge(2, -tolerated - 1, at(5)), Some(Say::Off));
        assert_eq!(v.judge(2, -2_000_000, at(10)), None);
        assert_eq!(v.judge(2, -2_000_000, at(64)), None);
        assert_eq!(v.judge(2, -2_000_000, at(65)), Some(Say::Off));
        // Another member ahead is judged on its own.
        assert_eq!(v.judge(3, 900_000, at(66)), Some(Say::Off));
        // Back within: said once.
        assert_eq!(v.judge(2, 1_000, at(70)), Some(Say::Agrees));
        assert_eq!(v.judge(2, 1_000, at(75)), None);
        // A member that left is forgotten: should it come back off, that is news again.
        v.keep(|p| p != 3);
        assert_eq!(v.judge(3, 900_000, at(80)), Some(Say::Off));
    }
}
