//! Notices when this node stops running, and says so in the log and on `/metrics`.
//!
//! Everything a node promises rests on it running: it renews its leases every 500 ms and stops
//! dialing a partition a second before the lease can pass to another node, it cancels a call still
//! ringing when its lease lapses, it streams audio every 20 ms. A node that stops running for a
//! second or two does none of that, and another node may dial the same citizen meanwhile. Two ways
//! to stop, told apart here:
//! - **the process** is not scheduled (an overloaded machine, a paused VM, a stop signal): a thread
//!   that sleeps 100 ms at a time wakes late;
//! - **the async runtime** polls no task while the process runs: a worker blocked in a system call
//!   or a lock, or a long computation on a worker. A task that notes the time every 50 ms falls
//!   behind while the thread above wakes on time.
//!
//! Stalls of [`REPORTED`] or more are timed by kind in the histogram `campanile_stall_seconds`
//! (its `_count` counts them); from [`WARNED`] on, a warning names the kind and the length.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// The shortest stall counted.
pub const REPORTED: Duration = Duration::from_millis(250);

/// The shortest stall logged at warn: half the margin by which a node stops before its lease ends.
pub const WARNED: Duration = Duration::from_millis(500);

/// How often the runtime's task notes the time.
const BEAT: Duration = Duration::from_millis(50);

/// How long the watching thread sleeps between looks.
const LOOK: Duration = Duration::from_millis(100);

/// What stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    Process,
    Runtime,
}

impl Stall {
    pub fn label(self) -> &'static str {
        match self {
            Stall::Process => "process",
            Stall::Runtime => "runtime",
        }
    }
}

/// The watch's state between looks: the pure part, driven by the thread with real times and by the
/// tests with made-up ones.
#[derive(Debug, Default)]
struct Watch {
    /// When the last look was (ms since the watch began).
    last_look: Option<u64>,
    /// The runtime's stall counts from no earlier than this (the end of a process stall, which
    /// explains the runtime's silence during it).
    runtime_from: u64,
    /// The longest the runtime had gone without a beat in the stall still going on.
    runtime_stalled: Option<u64>,
}

impl Watch {
    /// A look at `now` (ms), the runtime's last beat at `beat`, after a sleep of `slept` ms: the
    /// stalls that ended, with their lengths in ms.
    fn look(&mut self, now: u64, beat: u64, slept: u64) -> Vec<(Stall, u64)> {
        let mut ended = Vec::new();
        let reported = REPORTED.as_millis() as u64;
        if let Some(last) = self.last_look.replace(now) {
            let late = now.saturating_sub(last).saturating_sub(slept);
            if late >= reported {
                ended.push((Stall::Process, late));
                // The runtime could not run either; its silence up to now is the process's.
                self.runtime_from = now;
                self.runtime_stalled = None;
            }
        }
        let silent = now.saturating_sub(beat.max(self.runtime_from));
        // A beat is due every BEAT; silence beyond that is the runtime's delay.
        let delay = silent.saturating_sub(BEAT.as_millis() as u64);
        if delay >= reported {
            self.runtime_stalled = Some(self.runtime_stalled.unwrap_or(0).max(delay));
        } else if let Some(stall) = self.runtime_stalled.take() {
            ended.push((Stall::Runtime, stall));
        }
        ended
    }
}

/// Starts the watch: a task on the current runtime notes the time, a thread looks. Both end when
/// `stop` turns true.
pub fn spawn(metrics: Metrics, mut stop: tokio::sync::watch::Receiver<bool>) {
    let start = Instant::now();
    let beat = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let ms = move || start.elapsed().as_millis() as u64;
    {
        let (beat, done) = (beat.clone(), done.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(BEAT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => beat.store(ms(), Ordering::Relaxed),
                    _ = stop.changed() => {}
                }
                if *stop.borrow() {
                    break;
                }
            }
            done.store(true, Ordering::Relaxed);
        });
    }
    let spawned = std::thread::Builder::new()
        .name("campanile-watchdog".into())
        .spawn(move || {
            let mut watch = Watch::default();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(LOOK);
                let now = ms();
                for (kind, stall_ms) in
                    watch.look(now, beat.load(Ordering::Relaxed), LOOK.as_millis() as u64)
                {
                    let length = Duration::from_millis(stall_ms);
                    metrics.stalled(kind.label(), length);
                    if length >= WARNED {
                        match kind {
                            Stall::Process => tracing::warn!(
                                stalled_ms = stall_ms,
                                "this process was not scheduled for {stall_ms} ms (an overloaded \
                                 machine or a paused VM): leases, calls and audio all waited"
                            ),
                            Stall::Runtime => tracing::warn!(
                                stalled_ms = stall_ms,
                                "the async runtime ran no task for {stall_ms} ms (a worker blocked \
                                 or busy): leases, calls and audio all waited"
                            ),
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the stall watchdog; stalls go unreported");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Looks every 100 ms with the runtime beating every 50 ms, from `from` to `to` (ms).
    fn steady(w: &mut Watch, from: u64, to: u64) -> Vec<(Stall, u64)> {
        (from..=to)
            .step_by(100)
            .flat_map(|t| w.look(t, t - t % 50, 100))
            .collect()
    }

    #[test]
    fn a_node_that_runs_reports_nothing() {
        let mut w = Watch::default();
        assert_eq!(steady(&mut w, 0, 10_000), vec![]);
        // A look a little late, and a beat a little late, are not stalls.
        assert_eq!(w.look(10_300, 10_200, 100), vec![]);
        assert_eq!(w.look(10_400, 10_250, 100), vec![]);
    }

    #[test]
    fn a_blocked_runtime_is_reported_once_with_its_length_when_it_runs_again() {
        let mut w = Watch::default();
        steady(&mut w, 0, 1_000);
        // The runtime's last beat is at 1000; the thread goes on looking on time.
        let during: Vec<_> = (1_100..=2_500)
            .step_by(100)
            .flat_map(|t| w.look(t, 1_000, 100))
            .collect();
        assert_eq!(during, vec![]);
        // It beats again at 2550: one stall, from the beat it owed at 1050 to the last look.
        assert_eq!(w.look(2_600, 2_550, 100), vec![(Stall::Runtime, 1_450)]);
        assert_eq!(steady(&mut w, 2_700, 5_000), vec![]);
    }

    #[test]
    fn a_process_not_scheduled_is_one_process_stall_not_a_runtime_one_as_well() {
        let mut w = Watch::default();
        steady(&mut w, 0, 1_000);
        // Nothing ran from 1000 to 3000: the thread wakes 1900 ms late and the beat is as old.
        assert_eq!(w.look(3_000, 1_000, 100), vec![(Stall::Process, 1_900)]);
        // The runtime catches up within a beat or two: nothing more.
        assert_eq!(w.look(3_100, 1_000, 100), vec![]);
        assert_eq!(steady(&mut w, 3_200, 5_000), vec![]);
    }

    #[test]
    fn a_runtime_still_blocked_after_the_process_resumes_is_its_own_stall() {
        let mut w = Watch::default();
        steady(&mut w, 0, 1_000);
        assert_eq!(w.look(2_000, 1_000, 100), vec![(Stall::Process, 900)]);
        let during: Vec<_> = (2_100..=3_000)
            .step_by(100)
            .flat_map(|t| w.look(t, 1_000, 100))
            .collect();
        assert_eq!(during, vec![]);
        // Counted from the process's return (2000), less the beat's own period.
        assert_eq!(w.look(3_100, 3_050, 100), vec![(Stall::Runtime, 950)]);
    }
}
