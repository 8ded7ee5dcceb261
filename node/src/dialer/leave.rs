//! A graceful stop (SIGTERM, `Node::stop`): nobody listening to the message is hung up on.
//!
//! A node that dies has its answered calls moved by the leader once it has been silent for
//! [`takeover::SILENCE`], and the phones hear about a second of silence. A node told to stop (a
//! rolling upgrade, a drill, a data centre emptied on purpose) knows it is going, so it
//! 1. hangs up the calls not answered yet (a CANCEL while they ring; tasks still waiting for a
//!    channel never call): the partitions' next holders call those citizens again, as after a
//!    lapse. A phone picked up just as the CANCEL went out (the 200 OK crossed it, RFC 3261 §9.2)
//!    has a citizen listening: that call goes on and, once its dialog is committed (at most
//!    [`DIALOG_WAIT`]), moves with the answered ones; if it is not committed in time it is ended
//!    with BYE, as before;
//! 2. waits, at most [`DIALOG_WAIT`], for the dialogs of calls answered a moment ago to be
//!    committed, so that those can be moved too;
//! 3. says in a last heartbeat that it takes nothing any more (capacity 0, `State::is_leaving`):
//!    the leader grants it no partition and moves no call to it;
//! 4. moves its answered calls, parked ones included, to live nodes (fewest calls first) with one
//!    `HandOverCalls` it writes itself, and lets them go once that is committed: the new owners
//!    continue each inside its dialog with a re-INVITE at once, as in a takeover but without the
//!    silence;
//! 5. hangs up whatever is left (no live node to take it, or the log did not answer in time),
//!    and waits, at most [`CALLS_WAIT`], for the calls' ends to be committed;
//! 6. gives its partitions up (`ReleaseLeases`), so they are granted again at once instead of
//!    when their leases expire; on the leader it grants them itself.
//!
//! Every write waits at most [`WRITE_WAIT`]: a node without a quorum stops in a few seconds all
//! the same, hanging up as before.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use campanile_cluster::{Command, State};

use super::{leases, lock, now_ms, takeover, Phase, Running, Shared, TaskKey};

/// How long calls answered just before the stop may take to have their dialogs committed.
const DIALOG_WAIT: Duration = Duration::from_secs(1);
/// How long each write to the log may take.
const WRITE_WAIT: Duration = Duration::from_secs(2);
/// How long the calls hung up or let go may take to end and have their ends committed.
const CALLS_WAIT: Duration = Duration::from_secs(3);

/// Hands this node's calls over and gives up its partitions; see the module's documentation.
pub(super) async fn leave(sh: &Arc<Shared>) {
    let me = sh.cfg.node;
    let cancelled = hang_up(sh, |answered, pending| !answered && !pending, true);
    let crossed = keep_crossed_answers(sh, &cancelled).await;
    let committed = until(DIALOG_WAIT, || {
        !lock(&sh.inflight)
            .values()
            .any(|r| r.dialog_pending && r.is_running())
    })
    .await;
    if !committed {
        tracing::warn!("stopping: calls answered a moment ago have no committed dialog yet");
    }
    // A renewal round still on its way would say this node's capacity again after the last word.
    until(WRITE_WAIT, || sh.renewing.load(Ordering::Relaxed) == 0).await;
    let up = lock(&sh.inflight)
        .values()
        .filter(|r| r.phase == Phase::Up)
        .count();
    let announced = write(
        sh,
        Command::RenewLeases {
            at_ms: now_ms(),
            node: me,
            lease_ms: sh.cfg.lease.lease.as_millis() as u64,
            channels_in_use: Some(up as u32),
            capacity: Some(0),
        },
        "say this node is stopping",
    )
    .await;
    let moved = if announced { hand_over(sh).await } else { 0 };
    let hung_up = hang_up(sh, |_, _| true, false).len();
    let ended = until(CALLS_WAIT, || {
        lock(&sh.inflight)
            .values()
            .all(|r| r.phase == Phase::Parked)
    })
    .await;
    if !ended {
        tracing::warn!(
            "stopping: some calls' ends are not committed yet; the partitions' next holders \
             call those citizens again"
        );
    }
    let released = release(sh).await;
    tracing::warn!(
        handed_over = moved,
        cancelled = cancelled.len() - crossed,
        answered_as_cancelled = crossed,
        hung_up,
        partitions = released,
        "stopping: answered calls handed over to other nodes, calls not answered yet cancelled \
         (the partitions' next holders dial them again), answered calls nobody could take hung up, \
         partitions given up"
    );
}

/// Tells the calls in progress that `which(answered, dialog_pending)` selects to hang up; answers
/// which. `answered`: its dialog is committed (another node could continue it). With
/// `keep_answers`, an answer crossing the CANCEL goes on ([`keep_crossed_answers`]).
fn hang_up(sh: &Shared, which: impl Fn(bool, bool) -> bool, keep_answers: bool) -> Vec<TaskKey> {
    let inflight = lock(&sh.inflight);
    sh.cluster.read(|s| {
        let mut keys = Vec::new();
        for (key, r) in inflight.iter() {
            if !r.is_running() || !which(r.dialog_recorded(s, *key), r.dialog_pending) {
                continue;
            }
            r.stopping.store(keep_answers, Ordering::Release);
            r.abort.send_replace(true);
            keys.push(*key);
        }
        keys
    })
}

/// Of the calls `cancelled` by the stop, those whose phone answered as the CANCEL went out: waits
/// (at most [`DIALOG_WAIT`]) until each has ended or has its dialog committed, then lets the
/// committed ones go on, to be moved with the other answered calls, and aborts the rest again (a
/// call still in its INVITE transaction takes no notice; an answered one without a committed
/// dialog, which nobody could continue, is ended with BYE). Answers how many go on.
async fn keep_crossed_answers(sh: &Shared, cancelled: &[TaskKey]) -> usize {
    if cancelled.is_empty() {
        return 0;
    }
    let continuable =
        |s: &State, r: &Running, k: TaskKey| !r.dialog_pending && r.dialog_recorded(s, k);
    until(DIALOG_WAIT, || {
        let inflight = lock(&sh.inflight);
        sh.cluster.read(|s| {
            cancelled.iter().all(|k| {
                inflight
                    .get(k)
                    .is_none_or(|r| r.phase != Phase::Up || continuable(s, r, *k))
            })
        })
    })
    .await;
    let inflight = lock(&sh.inflight);
    sh.cluster.read(|s| {
        let mut kept = 0;
        for k in cancelled {
            let Some(r) = inflight.get(k).filter(|r| r.phase == Phase::Up) else {
                continue;
            };
            if continuable(s, r, *k) {
                r.abort.send_replace(false);
                kept += 1;
            } else {
                r.stopping.store(false, Ordering::Release);
                r.abort.send_replace(true);
            }
        }
        kept
    })
}

/// Moves this node's answered calls to live nodes and lets them go; answers how many moved.
async fn hand_over(sh: &Arc<Shared>) -> usize {
    let me = sh.cfg.node;
    let now = now_ms();
    let moves = {
        let inflight = lock(&sh.inflight);
        sh.cluster.read(|s| {
            // Live by the lease, not by the leader's silence: a node whose renewals are slow to
            // commit (a busy log) takes the calls all the same, and one that died since is
            // silent to the leader, which moves them on.
            let beats: Vec<_> = s.heartbeats().filter(|(n, _)| *n != me).collect();
            let live_ms = sh.cfg.lease.lease.as_millis() as u64;
            let mut load = takeover::takers(s, &beats, now, live_ms);
            let calls: Vec<_> = s
                .answered_calls_on(me)
                .into_iter()
                .filter(|t| {
                    inflight
                        .get(&(t.campaign, t.subscriber))
                        .is_none_or(|r| r.may_move())
                })
                .collect();
            takeover::spread(&calls, &mut load)
        })
    };
    let Some(moves) = moves else {
        tracing::warn!("stopping: no other live node to take this node's answered calls");
        return 0;
    };
    if moves.is_empty() {
        return 0;
    }
    let cmd = Command::HandOverCalls {
        at_ms: now,
        from: me,
        moves,
    };
    if !write(sh, cmd, "hand this node's answered calls over").await {
        return 0;
    }
    let mut inflight = lock(&sh.inflight);
    let gone = sh.cluster.read(|s| takeover::moved_away(s, me, &inflight));
    for key in &gone {
        let parked = inflight.get(key).is_some_and(|r| r.phase == Phase::Parked);
        if parked {
            inflight.remove(key);
            sh.metrics.parked("moved");
        } else if let Some(r) = inflight.get(key) {
            r.let_go.send_replace(true);
        }
    }
    gone.len()
}

/// Gives up every partition this node holds (on the leader, grants them to the others at once);
/// answers how many.
async fn release(sh: &Arc<Shared>) -> usize {
    let (me, now) = (sh.cfg.node, now_ms());
    let partitions: Vec<u16> = sh.cluster.read(|s| {
        s.leases()
            .filter(|(_, l)| l.node == me && l.expires_ms > now)
            .map(|(p, _)| p)
            .collect()
    });
    if partitions.is_empty() {
        return 0;
    }
    let n = partitions.len();
    let cmd = Command::ReleaseLeases {
        at_ms: now,
        node: me,
        partitions,
    };
    if !write(sh, cmd, "give this node's partitions up").await {
        return 0;
    }
    if sh.cluster.is_leader()
        && tokio::time::timeout(WRITE_WAIT, leases::assign(&sh.cluster, sh.cfg.lease))
            .await
            .is_err()
    {
        tracing::warn!("stopping: could not grant the partitions given up in time");
    }
    n
}

/// Writes `cmd`, waiting at most [`WRITE_WAIT`]; false (and a warning naming `what`) if it was not
/// committed.
async fn write(sh: &Shared, cmd: Command, what: &str) -> bool {
    match tokio::time::timeout(WRITE_WAIT, sh.cluster.write(cmd)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "stopping: cannot {what}");
            false
        }
        Err(_) => {
            tracing::warn!(
                "stopping: cannot {what}: the log did not commit it within {} s",
                WRITE_WAIT.as_secs()
            );
            false
        }
    }
}

/// Waits until `done` holds or `limit` passes; answers whether it held.
async fn until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
