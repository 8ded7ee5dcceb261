//! How far a peer's wall clock is from ours, measured over the cluster's own QUIC connections.
//!
//! Heartbeats, leases and takeovers are stamped with the sending node's wall clock and judged
//! against the leader's (a lease is trusted 1 s less than it lasts; a takeover after an election
//! tolerates 300 ms), so members' clocks must agree far better than that. Nothing in Raft checks it;
//! this does, the way NTP does: ask the peer for its clock, and take the peer's reading as the time
//! halfway through the round trip. Of the last few probes, the one with the shortest round trip
//! (the least room for asymmetric delay) is the estimate; its error is at most half that round
//! trip.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::network::{connect_addr, RaftRpc};
use crate::tls;

/// Microseconds since the Unix epoch by this host's wall clock (0 before 1970).
pub fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One probe of a peer's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSample {
    /// The peer's clock minus ours, in microseconds: positive when the peer is ahead.
    pub offset_us: i64,
    /// The probe's round trip, in microseconds.
    pub rtt_us: u64,
}

impl ClockSample {
    /// From our wall clock when the probe left (`sent_us`), the peer's reading (`peer_us`) and how
    /// long the probe took (`rtt`, on the monotonic clock, so a step of ours in between does not
    /// distort it).
    pub fn new(sent_us: u64, peer_us: u64, rtt: Duration) -> ClockSample {
        let rtt_us = rtt.as_micros() as u64;
        let midpoint = i128::from(sent_us) + i128::from(rtt_us / 2);
        let offset = (i128::from(peer_us) - midpoint).clamp(i64::MIN.into(), i64::MAX.into());
        ClockSample {
            offset_us: offset as i64,
            rtt_us,
        }
    }
}

/// The last few probes of one peer; the estimate is the one with the shortest round trip.
#[derive(Debug, Clone, Default)]
pub struct ClockFilter {
    samples: VecDeque<ClockSample>,
}

/// Probes an estimate is chosen from (at one probe every 5 s, the last 20 s: a clock stepped right
/// by NTP shows right within that).
pub const FILTER_SAMPLES: usize = 4;

impl ClockFilter {
    pub fn push(&mut self, s: ClockSample) {
        if self.samples.len() == FILTER_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    /// The probe with the shortest round trip among the last [`FILTER_SAMPLES`].
    pub fn best(&self) -> Option<ClockSample> {
        self.samples.iter().min_by_key(|s| s.rtt_us).copied()
    }
}

/// The largest offset between members not warned about: two thirds of the 300 ms the takeover
/// grace tolerates (the node's `dialer::takeover::GRACE_LEAD`), so the warning comes before that
/// assumption breaks. Healthy NTP keeps a LAN's clocks within a few milliseconds.
pub const TOLERATED: Duration = Duration::from_millis(200);

/// How long one probe may take, connection included: a peer slower than this is not measured
/// this round (a round trip that long would say little about its clock anyway).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Asks the member `expected` at `addr` for its clock. Fails when it cannot be reached within
/// [`PROBE_TIMEOUT`], presents another node's certificate, or answers something unreadable (a
/// member of an older build, which does not know the request).
pub async fn probe(
    endpoint: &quinn::Endpoint,
    expected: u64,
    addr: std::net::SocketAddr,
) -> Result<ClockSample, String> {
    let body = serde_json::to_vec(&RaftRpc::Clock).map_err(|e| e.to_string())?;
    let attempt = async {
        let conn = connect_addr(endpoint, addr)
            .await
            .map_err(|e| e.to_string())?;
        let result = async {
            match tls::peer_node_id(&conn) {
                Some(id) if id == expected => {}
                other => {
                    return Err(format!(
                        "{addr} presented node {other:?}'s certificate, not node {expected}'s"
                    ))
                }
            }
            let (sent_us, started) = (wall_us(), Instant::now());
            let reply = tls::request(&conn, &body).await?;
            let rtt = started.elapsed();
            let peer_us: u64 = serde_json::from_slice(&reply)
                .map_err(|_| format!("node {expected} did not answer with its clock"))?;
            Ok(ClockSample::new(sent_us, peer_us, rtt))
        }
        .await;
        conn.close(quinn::VarInt::from_u32(0), b"done");
        result
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt)
        .await
        .map_err(|_| format!("node {expected} at {addr}: no answer within {PROBE_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_s_reading_is_taken_halfway_through_the_round_trip() {
        // Sent at 1,000,000 µs; the peer, 2 s ahead, read its clock 300 µs later (halfway).
        let s = ClockSample::new(1_000_000, 3_000_300, Duration::from_micros(600));
        assert_eq!(
            s,
            ClockSample {
                offset_us: 2_000_000,
                rtt_us: 600
            }
        );
        // A peer behind us.
        let s = ClockSample::new(5_000_000, 4_750_100, Duration::from_micros(200));
        assert_eq!(s.offset_us, -250_000);
        // Nonsense readings do not overflow.
        let s = ClockSample::new(u64::MAX, 0, Duration::from_secs(1));
        assert_eq!(s.offset_us, i64::MIN);
    }

    #[test]
    fn the_estimate_is_the_probe_with_the_shortest_round_trip_of_the_last_few() {
        let mut f = ClockFilter::default();
        assert_eq!(f.best(), None);
        let probe = |offset_us, rtt_us| ClockSample { offset_us, rtt_us };
        f.push(probe(900, 100));
        for i in 0..FILTER_SAMPLES as i64 - 1 {
            f.push(probe(5_000 + i, 2_000));
        }
        assert_eq!(f.best(), Some(probe(900, 100)));
        // One more and the quick probe is out of the window.
        f.push(probe(4_000, 3_000));
        assert_eq!(f.best(), Some(probe(5_000, 2_000)));
    }
}
