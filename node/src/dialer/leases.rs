//! Partition leases on the node's side (the rules are in the state machine: `Command::RenewLeases`,
//! `AssignLeases`, `ReleaseLeases`, and the epoch check on every `Started`).
//!
//! Every node renews its leases every `renew_every`; the renewal is also its heartbeat. A node counts a
//! lease as valid until `sent + lease - margin` on its own monotonic clock, where `sent` is when it
//! sent the renewal that was committed: it stops dialing a partition before anyone can be granted it.
//! The leader hands expired or free partitions to live nodes (a renewal within the lease) in
//! proportion to each node's trunk capacity (its concurrent channels, carried by its heartbeat), so
//! a data centre with twice the channels dials twice the citizens; a node holding more than its share
//! releases the surplus among partitions where it has no call in flight. Data centres need no rule
//! of their own: a data centre's share is the sum of its nodes' capacities, and when one is lost its
//! partitions spread over the survivors in the same proportion.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use campanile_cluster::{Cluster, Command, NodeId, PARTITIONS};

use super::now_ms;

/// Lease timing. The defaults suit one city over a few data centres: a dead node's partitions are
/// dialled again about `lease + renew_every` after its last renewal.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTiming {
    pub lease: Duration,
    pub renew_every: Duration,
    /// Stop this much before the lease ends (covers clock-rate drift and wall-clock skew between
    /// nodes, which must stay below it).
    pub margin: Duration,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming {
            lease: Duration::from_secs(3),
            renew_every: Duration::from_millis(500),
            margin: Duration::from_secs(1),
        }
    }
}

/// The leases this node may dial under: partition → (epoch, valid until).
#[derive(Default)]
pub struct Held {
    map: std::sync::Mutex<HashMap<u16, (u64, Instant)>>,
    /// Until when this node's last committed heartbeat keeps it in the cluster (the same margin as
    /// a lease): past it, the leader may have handed its answered calls to other nodes.
    alive_until: std::sync::Mutex<Option<Instant>>,
}

impl Held {
    /// Whether this node's last committed heartbeat still counts at `now`.
    pub fn alive(&self, now: Instant) -> bool {
        super::lock(&self.alive_until).is_some_and(|until| until > now)
    }

    /// Partitions valid at `now`, with their epochs.
    pub fn valid(&self, now: Instant) -> HashMap<u16, u64> {
        super::lock(&self.map)
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(p, (e, _))| (*p, *e))
            .collect()
    }

    /// Whether this node may still dial partition `p` under `epoch` at `now`.
    pub fn holds(&self, p: u16, epoch: u64, now: Instant) -> bool {
        super::lock(&self.map)
            .get(&p)
            .is_some_and(|(e, until)| *e == epoch && *until > now)
    }

    fn replace(&self, fresh: HashMap<u16, (u64, Instant)>) {
        *super::lock(&self.map) = fresh;
    }

    fn forget(&self, partitions: &[u16]) {
        let mut m = super::lock(&self.map);
        for p in partitions {
            m.remove(p);
        }
    }
}

/// On the leader: campaigns whose deadline has come stop waiting for calls (a write only when one
/// has).
async fn close_expired(cluster: &Cluster) {
    let now = now_ms();
    if cluster.read(|s| s.expired_campaigns(now).is_empty()) {
        return;
    }
    if let Err(e) = cluster.write(Command::CloseExpired { at_ms: now }).await {
        tracing::warn!(error = %e, "cannot close campaigns past their deadline; trying again");
    }
}

/// One round: renew (and learn what this node holds), then on the leader assign free partitions,
/// then give up a surplus. `busy` says whether this node has a call in flight in a partition;
/// `channels_in_use` (its calls in progress) goes with the heartbeat for the cluster view.
pub async fn round(
    node: NodeId,
    cluster: &Cluster,
    held: &Held,
    timing: LeaseTiming,
    channels_in_use: u32,
    capacity: u32,
    busy: impl Fn(u16) -> bool,
) {
    let lease_ms = timing.lease.as_millis() as u64;
    let sent = Instant::now();
    let renewed = cluster
        .write(Command::RenewLeases {
            at_ms: now_ms(),
            node,
            lease_ms,
            channels_in_use: Some(channels_in_use),
            capacity: Some(capacity),
        })
        .await;
    if let Err(e) = &renewed {
        tracing::warn!(error = %e, "cannot renew partition leases; this node stops dialing when they lapse");
    }
    let valid_for = timing.lease.saturating_sub(timing.margin);
    let took = sent.elapsed();
    if renewed.is_ok() && took > valid_for / 2 {
        tracing::warn!(
            took_ms = took.as_millis() as u64,
            "a lease renewal took {} ms to commit: the cluster's log is slow, and past {} ms this \
             node stops dialing",
            took.as_millis(),
            valid_for.as_millis()
        );
    }
    if cluster.is_leader() {
        assign(cluster, timing).await;
        close_expired(cluster).await;
    }
    if renewed.is_ok() {
        let until = sent + valid_for;
        {
            // Renewals overlap when the log is slow: one sent before the last that was counted
            // says nothing newer.
            let mut alive = super::lock(&held.alive_until);
            if alive.is_some_and(|a| a >= until) {
                return;
            }
            *alive = Some(until);
        }
        let now = now_ms();
        let mine: HashMap<u16, (u64, Instant)> = cluster.read(|s| {
            s.leases()
                .filter(|(_, l)| l.node == node && l.expires_ms > now)
                .map(|(p, l)| (p, (l.epoch, until)))
                .collect()
        });
        held.replace(mine);
        release_surplus(node, cluster, held, lease_ms, busy).await;
    }
}

/// Live nodes: those whose last renewal is younger than a lease (on the leader's clock), less those
/// stopping (`State::is_leaving`).
fn live_nodes(cluster: &Cluster, lease_ms: u64) -> Vec<NodeId> {
    let now = now_ms();
    cluster.read(|s| {
        s.heartbeats()
            .filter(|(n, t)| t.saturating_add(lease_ms) > now && !s.is_leaving(*n))
            .map(|(n, _)| n)
            .collect()
    })
}

/// Each live node's weight: its trunk capacity, or the median of the others' when its heartbeat
/// does not say (a node of an older release), so it is neither starved nor flooded.
fn weights(cluster: &Cluster, live: &[NodeId]) -> BTreeMap<NodeId, u64> {
    let caps: BTreeMap<NodeId, u32> = cluster.read(|s| s.capacities().collect());
    let mut known: Vec<u64> = live
        .iter()
        .filter_map(|n| caps.get(n).map(|c| u64::from(*c)))
        .collect();
    known.sort_unstable();
    let fallback = known.get(known.len() / 2).copied().unwrap_or(1);
    live.iter()
        .map(|n| (*n, caps.get(n).map_or(fallback, |c| u64::from(*c)).max(1)))
        .collect()
}

/// Hands each free partition to the node whose share would stay lowest relative to its weight
/// (`held + 1) / weight`, compared without division), lowest id first among equals.
fn plan_grants(
    free: &[u16],
    load: &mut BTreeMap<NodeId, usize>,
    weight: &BTreeMap<NodeId, u64>,
) -> Vec<(u16, NodeId)> {
    let mut grants = Vec::with_capacity(free.len());
    for p in free {
        let best = load
            .iter()
            .map(|(n, held)| (*n, *held as u64 + 1, weight.get(n).copied().unwrap_or(1)))
            .min_by(|(a, ha, wa), (b, hb, wb)| (ha * wb).cmp(&(hb * wa)).then(a.cmp(b)));
        let Some((node, _, _)) = best else {
            break;
        };
        if let Some(held) = load.get_mut(&node) {
            *held += 1;
        }
        grants.push((*p, node));
    }
    grants
}

/// Expired partitions go back to their last holder first, where it is live and below its fair
/// share, or whatever its share where it still has answered calls there (given to another node,
/// the partition's in-flight tasks would be handed back and those citizens dialled while their
/// phones still hold the calls). A partition whose last holder is not live but still has
/// answered calls there is left free this round: the leader moves those calls first
/// (`takeover`). Answers the grants and the partitions left for `plan_grants`.
///
/// After the log was unavailable for longer than a lease (every lease expired at once), each node
/// thus keeps its partitions, continues the answered calls it let go there, and the partitions do
/// not all move at once.
fn keep_with_last_holder(
    free: &[(u16, Option<NodeId>)],
    holder_has_calls: &std::collections::BTreeSet<u16>,
    load: &mut BTreeMap<NodeId, usize>,
    weight: &BTreeMap<NodeId, u64>,
) -> (Vec<(u16, NodeId)>, Vec<u16>) {
    let mut kept = Vec::new();
    let mut rest = Vec::new();
    for (p, last) in free {
        let calls = holder_has_calls.contains(p);
        match last.filter(|n| load.contains_key(n)) {
            Some(n) if calls || load[&n] < fair_share(n, weight) => {
                *load.entry(n).or_default() += 1;
                kept.push((*p, n));
            }
            None if calls => {}
            _ => rest.push(*p),
        }
    }
    (kept, rest)
}

/// A node's fair share of the partitions: its weight's part of all live nodes' weights, rounded up.
fn fair_share(me: NodeId, weight: &BTreeMap<NodeId, u64>) -> usize {
    let total: u64 = weight.values().sum();
    let mine = weight.get(&me).copied().unwrap_or(0);
    if total == 0 {
        return PARTITIONS as usize;
    }
    (u64::from(PARTITIONS) * mine).div_ceil(total) as usize
}

/// The leader's part: every free or expired partition goes to a live node, by capacity.
pub(super) async fn assign(cluster: &Cluster, timing: LeaseTiming) {
    let lease_ms = timing.lease.as_millis() as u64;
    let live = live_nodes(cluster, lease_ms);
    if live.is_empty() {
        return;
    }
    let now = now_ms();
    let (mut load, free, holder_has_calls) = cluster.read(|s| {
        let mut load: BTreeMap<NodeId, usize> = live.iter().map(|n| (*n, 0)).collect();
        let mut free = Vec::new();
        for p in 0..PARTITIONS {
            match s.lease(p) {
                Some(l) if l.expires_ms > now => {
                    if let Some(c) = load.get_mut(&l.node) {
                        *c += 1;
                    }
                }
                last => free.push((p, last.map(|l| l.node))),
            }
        }
        // Free partitions where their last holder, heard from lately, still has answered calls.
        // (Past `GIVE_UP_AFTER_MS` of silence nobody moves its calls any more: they are given
        // back with the partition.)
        let holders: std::collections::BTreeSet<NodeId> =
            free.iter().filter_map(|(_, n)| *n).collect();
        let holder_has_calls: std::collections::BTreeSet<u16> = s
            .heartbeats()
            .filter(|(n, t)| {
                holders.contains(n) && t.saturating_add(super::takeover::GIVE_UP_AFTER_MS) > now
            })
            .flat_map(|(n, _)| {
                s.answered_calls_on(n)
                    .into_iter()
                    .map(|t| campanile_cluster::partition_of(t.subscriber))
                    .filter(move |p| s.lease(*p).is_some_and(|l| l.node == n))
            })
            .collect();
        (load, free, holder_has_calls)
    });
    if free.is_empty() {
        return;
    }
    let weight = weights(cluster, &live);
    let (mut grants, rest) = keep_with_last_holder(&free, &holder_has_calls, &mut load, &weight);
    grants.extend(plan_grants(&rest, &mut load, &weight));
    let n = grants.len();
    match cluster
        .write(Command::AssignLeases {
            at_ms: now,
            lease_ms,
            grants,
        })
        .await
    {
        Ok(_) => tracing::info!(
            partitions = n,
            nodes = load.len(),
            "assigned free partition leases"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot assign partition leases"),
    }
}

/// A node holding more than its fair share (a node joined) gives up the surplus, choosing
/// partitions where it has no call in flight, and stops dialing them before it says so.
async fn release_surplus(
    node: NodeId,
    cluster: &Cluster,
    held: &Held,
    lease_ms: u64,
    busy: impl Fn(u16) -> bool,
) {
    let live = live_nodes(cluster, lease_ms);
    let fair = fair_share(node, &weights(cluster, &live));
    let mine = held.valid(Instant::now());
    if mine.len() <= fair + 1 {
        return;
    }
    let mut candidates: Vec<u16> = mine.keys().copied().filter(|p| !busy(*p)).collect();
    candidates.sort_unstable();
    candidates.truncate(mine.len() - fair);
    if candidates.is_empty() {
        return;
    }
    held.forget(&candidates);
    let n = candidates.len();
    if let Err(e) = cluster
        .write(Command::ReleaseLeases {
            at_ms: now_ms(),
            node,
            partitions: candidates,
        })
        .await
    {
        tracing::warn!(error = %e, "cannot release surplus leases; they lapse instead");
    } else {
        tracing::info!(
            partitions = n,
            "released surplus partition leases for a newer node"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_follow_trunk_capacity() {
        let nodes = [NodeId(1), NodeId(2), NodeId(3)];
        let weight: BTreeMap<NodeId, u64> = nodes.iter().copied().zip([100, 200, 100]).collect();
        let mut load: BTreeMap<NodeId, usize> = nodes.iter().map(|n| (*n, 0)).collect();
        let free: Vec<u16> = (0..PARTITIONS).collect();
        let grants = plan_grants(&free, &mut load, &weight);
        assert_eq!(grants.len(), PARTITIONS as usize);
        assert_eq!(load[&NodeId(1)], 64);
        assert_eq!(load[&NodeId(2)], 128);
        assert_eq!(load[&NodeId(3)], 64);
        assert_eq!(fair_share(NodeId(2), &weight), 128);
        assert_eq!(fair_share(NodeId(1), &weight), 64);
    }

    #[test]
    fn a_lost_node_s_partitions_spread_by_capacity_over_the_survivors() {
        // Node 3 (a data centre of its own) is gone: its 64 partitions are free again.
        let weight: BTreeMap<NodeId, u64> = [(NodeId(1), 100), (NodeId(2), 300)].into();
        let mut load: BTreeMap<NodeId, usize> = [(NodeId(1), 64), (NodeId(2), 128)].into();
        let free: Vec<u16> = (0..64).collect();
        plan_grants(&free, &mut load, &weight);
        assert_eq!(load[&NodeId(1)], 64, "already at its share");
        assert_eq!(load[&NodeId(2)], 192);
    }

    #[test]
    fn expired_partitions_go_back_to_their_live_holders_within_their_share() {
        // Every lease expired at once (the log was unavailable): nodes 1 and 2 are live again,
        // node 3 is not; node 2 released partition 9 above its share earlier, and has answered
        // calls in partition 10; node 3 has some in partition 11.
        let weight: BTreeMap<NodeId, u64> = [(NodeId(1), 20), (NodeId(2), 20)].into();
        let mut load: BTreeMap<NodeId, usize> = [(NodeId(1), 0), (NodeId(2), 127)].into();
        let free = [
            (1, Some(NodeId(1))),
            (2, Some(NodeId(2))),
            (3, Some(NodeId(3))),
            (4, None),
            (9, Some(NodeId(2))),
            (10, Some(NodeId(2))),
            (11, Some(NodeId(3))),
        ];
        let calls = [10, 11].into();
        let (kept, rest) = keep_with_last_holder(&free, &calls, &mut load, &weight);
        assert_eq!(
            kept,
            vec![(1, NodeId(1)), (2, NodeId(2)), (10, NodeId(2))],
            "back to live holders: within their share, or past it where they have calls"
        );
        assert_eq!(
            rest,
            vec![3, 4, 9],
            "a dead holder without calls, none, and one past its share; 11 waits for its calls"
        );
        assert_eq!(load[&NodeId(2)], 129);
        let rest = plan_grants(&rest, &mut load, &weight);
        assert!(rest.iter().all(|(_, n)| *n == NodeId(1)), "{rest:?}");
    }

    #[test]
    fn a_lease_is_held_under_its_own_epoch_until_it_lapses() {
        let held = Held::default();
        let now = Instant::now();
        let until = now + Duration::from_secs(2);
        held.replace([(7, (3, until))].into());
        assert!(held.holds(7, 3, now));
        assert!(!held.holds(7, 2, now), "an older epoch is another lease");
        assert!(!held.holds(8, 3, now), "another partition");
        assert!(!held.holds(7, 3, until), "lapsed at its end");
        held.forget(&[7]);
        assert!(!held.holds(7, 3, now), "released");
    }

    #[test]
    fn equal_capacities_share_equally_and_ties_go_to_the_lowest_id() {
        let weight: BTreeMap<NodeId, u64> = [(NodeId(1), 20), (NodeId(2), 20)].into();
        let mut load: BTreeMap<NodeId, usize> = [(NodeId(1), 0), (NodeId(2), 0)].into();
        let grants = plan_grants(&[7, 8, 9], &mut load, &weight);
        assert_eq!(grants, vec![(7, NodeId(1)), (8, NodeId(2)), (9, NodeId(1))]);
    }
}
