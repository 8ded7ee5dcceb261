//! The pacer: one thread per core sends its streams' next 20 ms frames on each tick, instead of one
//! timer per call. Streams are spread over the tick's 20 one-millisecond phases (each new stream takes the
//! least loaded phase), so the node sends a steady trickle rather than one burst every 20 ms. The thread
//! sleeps until the next phase that has streams, writes that phase's packets into an outbox and sends
//! them as one batch. Lateness (actual send time minus the packet's due time) is measured for every
//! packet into a histogram; a batched packet counts as sent when its batch's system call returns.
//!
//! Why not `sendmmsg`: every call has its own RTP socket (the port in its SDP, which is also where its
//! keys come back, RFC 4961 symmetric RTP), and `sendmmsg` batches datagrams of one socket only, so per
//! stream there is one datagram per tick to send. A phase's datagrams from many sockets go out together
//! through io_uring instead (see `socket::BatchSender`), or one `sendto` each where io_uring is not
//! allowed. `campanile bench media` measures what that costs against a `sendmmsg` loop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::message::FRAME;
use super::rtcp::{self, SenderInfo, REPORT_INTERVAL_FRAMES};
use super::rtp::{write_packet, RtpHeader};
use super::socket::{BatchSender, Outbox, RtpSocket, SendPath, Source};

/// Packetisation interval.
pub const TICK: Duration = Duration::from_millis(20);
/// Phases per tick.
pub const PHASES: usize = 20;
const PHASE: Duration = Duration::from_millis(1);

/// Where a stream's RTCP goes: our RTCP socket and the callee's RTCP address.
#[derive(Clone)]
pub struct RtcpTarget {
    pub socket: Arc<RtpSocket>,
    pub dest: SocketAddr,
}

/// One stream to play.
///
/// If `socket` is connected to `dest` when the stream starts, or when [`StreamHandle::set_dest`]
/// moves it, its datagrams leave without naming the address. Whoever connects the socket
/// elsewhere during the stream then calls `set_dest` (a call connects first, then moves the stream).
pub struct PlayRequest {
    pub socket: Arc<RtpSocket>,
    pub dest: SocketAddr,
    pub frames: Arc<Vec<[u8; FRAME]>>,
    pub payload_type: u8,
    pub ssrc: u32,
    /// Frame to start from (resuming playback at an offset).
    pub start_frame: usize,
    pub initial_seq: u16,
    pub initial_ts: u32,
    /// Packets this SSRC already sent before this request (a replay continues the stream's counts).
    pub initial_packets: u32,
    /// Sender reports, when the call has an RTCP socket.
    pub rtcp: Option<RtcpTarget>,
}

struct StreamShared {
    stopped: AtomicBool,
    sent: AtomicUsize,
    dest: Mutex<SocketAddr>,
    /// Set with a new `dest`, so that the pacer takes the lock only after a change.
    dest_changed: AtomicBool,
    done: watch::Sender<bool>,
}

struct Stream {
    req: PlayRequest,
    shared: Arc<StreamShared>,
    next: usize,
    /// Frames sent by this request (`StreamShared::sent` is its copy for the handle).
    sent: usize,
    dest: SocketAddr,
    seq: u16,
    ts: u32,
    first: bool,
    /// Frames until the next sender report.
    report_in: usize,
    /// The RTP socket as this thread's sender names it (registered while the stream plays).
    rtp: Source,
    /// The RTCP socket, if there is one.
    rtcp: Option<Source>,
    /// Whether the RTP socket is connected to `dest` (as a call's is, to the callee): its datagrams
    /// then leave without naming it, which spares the kernel a route lookup per datagram.
    connected: bool,
}

/// Controls one stream; dropping it stops the stream.
pub struct StreamHandle {
    shared: Arc<StreamShared>,
}

impl StreamHandle {
    /// Frames sent so far: the playback offset.
    pub fn frames_sent(&self) -> usize {
        self.shared.sent.load(Ordering::Relaxed)
    }

    /// Resolves when the last frame was sent or the stream was stopped.
    pub async fn wait_finished(&self) {
        let mut rx = self.shared.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Stops sending; idempotent.
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
    }

    /// Sends the rest of the stream somewhere else (after a re-INVITE).
    pub fn set_dest(&self, dest: SocketAddr) {
        if let Ok(mut d) = self.shared.dest.lock() {
            *d = dest;
            self.shared.dest_changed.store(true, Ordering::Release);
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Per-packet lateness in 10 µs buckets up to 100 ms (later ones land in the last bucket).
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum_us: u64,
    max_us: u64,
}

const BUCKET_US: u64 = 10;
const BUCKETS: usize = 10_000;

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: vec![0; BUCKETS],
            count: 0,
            sum_us: 0,
            max_us: 0,
        }
    }

    fn record(&mut self, late: Duration) {
        let us = late.as_micros().min(u64::MAX as u128) as u64;
        let i = ((us / BUCKET_US) as usize).min(BUCKETS - 1);
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max_us = self.max_us.max(us);
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.max_us = self.max_us.max(other.max_us);
    }

    fn quantile_us(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return (i as u64 + 1) * BUCKET_US;
            }
        }
        self.max_us
    }
}

/// Per-packet lateness as a Prometheus histogram wants it: at each bound, how many packets were
/// less late than it (at the 10 µs resolution of the pacer's buckets; a bound of 100 ms or more
/// also counts the packets later than that), and the count and sum of all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatenessTotals {
    pub below: Vec<(u64, u64)>,
    pub count: u64,
    pub sum_us: u64,
}

/// Percentiles of per-packet lateness since the pacer started (or since `reset_lateness`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatenessSnapshot {
    pub packets: u64,
    /// Upper bounds of the 10 µs buckets the quantiles fall in.
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

struct Shared {
    lateness: Mutex<Histogram>,
    active: AtomicUsize,
    packets: AtomicU64,
}

/// Submits streams to the pacer thread.
#[derive(Clone)]
pub struct PacerHandle {
    lanes: Arc<Vec<Lane>>,
    path: SendPath,
}

/// One pacer thread and the streams it owns.
struct Lane {
    tx: mpsc::Sender<Stream>,
    shared: Arc<Shared>,
}

/// The pacer threads.
pub struct Pacer;

impl Pacer {
    /// Starts one pacer thread per core; a stream goes to the thread with the fewest streams.
    pub fn spawn() -> PacerHandle {
        Pacer::spawn_sending(SendPath::IoUring)
    }

    /// Starts one pacer thread per core sending on `path` (a node's `media.pacer_send`).
    pub fn spawn_sending(path: SendPath) -> PacerHandle {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Pacer::spawn_with(threads, path)
    }

    /// Starts `threads` pacer threads; each ends when every handle is dropped and its streams are done.
    pub fn spawn_threads(threads: usize) -> PacerHandle {
        Pacer::spawn_with(threads, SendPath::IoUring)
    }

    /// Starts `threads` pacer threads sending on `path` (io_uring falls back to `sendto` where the
    /// kernel does not allow it); logs which path runs.
    pub fn spawn_with(threads: usize, path: SendPath) -> PacerHandle {
        let threads = threads.max(1);
        // Each thread makes its own sender (an io_uring belongs to the thread that submits to it)
        // and reports what it got.
        let (path_tx, path_rx) = mpsc::channel();
        let lanes = (0..threads)
            .map(|i| {
                let path_tx = path_tx.clone();
                let (tx, rx) = mpsc::channel();
                let shared = Arc::new(Shared {
                    lateness: Mutex::new(Histogram::new()),
                    active: AtomicUsize::new(0),
                    packets: AtomicU64::new(0),
                });
                let thread_shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("campanile-pacer-{i}"))
                    .spawn(move || {
                        let (sender, why) = BatchSender::new(path);
                        let _ = path_tx.send((sender.path(), why, sender.details()));
                        run(rx, &thread_shared, sender)
                    });
                if let Err(e) = spawned {
                    // Without the thread its streams finish at once (see `play`); say why loudly.
                    tracing::error!(error = %e, "cannot start an RTP pacer thread: its calls get no audio");
                }
                Lane { tx, shared }
            })
            .collect();
        drop(path_tx);
        let mut running = path;
        let mut reason = None;
        let mut details = String::new();
        for _ in 0..threads {
            match path_rx.recv_timeout(Duration::from_secs(5)) {
                Ok((p, why, d)) => {
                    // The slowest path any thread runs.
                    running = running.min(p);
                    reason = reason.or(why);
                    details = d;
                }
                // A thread that did not start was logged above.
                Err(_) => break,
            }
        }
        match (path, running, reason) {
            (SendPath::IoUring, SendPath::Sendto, Some(why)) => tracing::warn!(
                error = %why,
                "RTP pacer: {threads} threads; io_uring is not available, so every packet is sent \
                 with its own sendto (slower, see BENCHMARKS.md)"
            ),
            (SendPath::Raw, _, Some(why)) if running < SendPath::Raw => tracing::warn!(
                error = %why,
                "RTP pacer: {threads} threads; pacer_send = \"raw\" cannot open a raw socket, so \
                 they send with {running} instead ({details})"
            ),
            (_, SendPath::Sendto, _) => {
                tracing::info!("RTP pacer: {threads} threads sending with {running}")
            }
            _ => tracing::info!("RTP pacer: {threads} threads sending with {running} ({details})"),
        }
        PacerHandle {
            lanes: Arc::new(lanes),
            path: running,
        }
    }
}

impl PacerHandle {
    /// How the pacer threads send: the slowest path any of them runs (a thread that could not set
    /// up the path asked for runs the next one down).
    pub fn send_path(&self) -> SendPath {
        self.path
    }

    /// Starts playing a stream from its phase's next slot.
    pub fn play(&self, req: PlayRequest) -> StreamHandle {
        let (done, _) = watch::channel(false);
        let shared = Arc::new(StreamShared {
            stopped: AtomicBool::new(false),
            sent: AtomicUsize::new(0),
            dest: Mutex::new(req.dest),
            dest_changed: AtomicBool::new(false),
            done,
        });
        let stream = Stream {
            next: req.start_frame,
            sent: 0,
            dest: req.dest,
            seq: req.initial_seq,
            ts: req.initial_ts,
            first: true,
            // RFC 3550 §6.2: the first report after half an interval, then every interval.
            report_in: REPORT_INTERVAL_FRAMES / 2,
            rtp: req.socket.source(),
            rtcp: req.rtcp.as_ref().map(|t| t.socket.source()),
            // Worked out by the pacer thread when the stream arrives.
            connected: false,
            req,
            shared: shared.clone(),
        };
        let lane = self
            .lanes
            .iter()
            .min_by_key(|l| l.shared.active.load(Ordering::Relaxed));
        let Some(lane) = lane else {
            shared.done.send_replace(true);
            return StreamHandle { shared };
        };
        lane.shared.active.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::SendError(s)) = lane.tx.send(stream) {
            // The pacer thread is gone: report the stream as finished rather than hang its call.
            lane.shared.active.fetch_sub(1, Ordering::Relaxed);
            s.shared.done.send_replace(true);
        }
        StreamHandle { shared }
    }

    /// Streams currently playing.
    pub fn active_streams(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| l.shared.active.load(Ordering::Relaxed))
            .sum()
    }

    /// RTP packets sent since the pacer started.
    pub fn packets_sent(&self) -> u64 {
        self.lanes
            .iter()
            .map(|l| l.shared.packets.load(Ordering::Relaxed))
            .sum()
    }

    /// Per-packet lateness percentiles over all pacer threads.
    pub fn lateness_snapshot(&self) -> LatenessSnapshot {
        let all = self.merged_lateness();
        LatenessSnapshot {
            packets: all.count,
            p50_us: all.quantile_us(0.50),
            p99_us: all.quantile_us(0.99),
            max_us: all.max_us,
        }
    }

    /// Per-packet lateness over all pacer threads since the pacer started (or since
    /// `reset_lateness`), cumulated at each of `bounds_us` (the node's metrics).
    pub fn lateness_totals(&self, bounds_us: &[u64]) -> LatenessTotals {
        let all = self.merged_lateness();
        let below = bounds_us
            .iter()
            .map(|&bound| {
                let whole = ((bound / BUCKET_US) as usize).min(BUCKETS);
                (bound, all.buckets[..whole].iter().sum())
            })
            .collect();
        LatenessTotals {
            below,
            count: all.count,
            sum_us: all.sum_us,
        }
    }

    fn merged_lateness(&self) -> Histogram {
        let mut all = Histogram::new();
        for lane in self.lanes.iter() {
            if let Ok(h) = lane.shared.lateness.lock() {
                all.merge(&h);
            }
        }
        all
    }

    /// Starts a new lateness measurement (benchmarks measure the steady state only).
    pub fn reset_lateness(&self) {
        for lane in self.lanes.iter() {
            if let Ok(mut h) = lane.shared.lateness.lock() {
                *h = Histogram::new();
            }
        }
    }
}

fn run(rx: mpsc::Receiver<Stream>, shared: &Shared, mut sender: BatchSender) {
    let mut phases: Vec<Vec<Stream>> = (0..PHASES).map(|_| Vec::new()).collect();
    let mut active = 0usize;
    let mut outbox = Outbox::default();
    // Which of the outbox's datagrams are RTP (measured for lateness) rather than RTCP.
    let mut is_rtp: Vec<bool> = Vec::new();
    let mut late: Vec<Duration> = Vec::new();
    let mut epoch = Instant::now();
    // Absolute phase counter since `epoch`: phase `n` is due at `epoch + n ms`.
    let mut n: u64 = 0;
    loop {
        if active == 0 {
            // Park until there is something to play; the clock restarts from the new stream.
            match rx.recv() {
                Ok(mut s) => {
                    register(&mut s, &mut sender);
                    phases[0].push(s);
                    active = 1;
                    epoch = Instant::now();
                    n = 0;
                }
                Err(_) => return,
            }
        }
        while let Ok(mut s) = rx.try_recv() {
            register(&mut s, &mut sender);
            // The least loaded phase; ties go to the one due soonest.
            let start = (n as usize) % PHASES;
            let pick = (0..PHASES)
                .map(|k| (start + k) % PHASES)
                .min_by_key(|p| phases[*p].len())
                .unwrap_or(start);
            phases[pick].push(s);
            active += 1;
        }
        // Skip empty phases: at most one tick ahead.
        while phases[(n as usize) % PHASES].is_empty() {
            n += 1;
        }
        let due = epoch + PHASE * (n as u32);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let phase = &mut phases[(n as usize) % PHASES];
        let before = phase.len();
        outbox.clear();
        is_rtp.clear();
        late.clear();
        // A stream that ended queued nothing, so dropping it (and perhaps closing its socket)
        // before the send is safe; the others keep their sockets open until after it.
        phase.retain_mut(|s| {
            let more = queue_next(s, &mut outbox, &mut is_rtp);
            if !more {
                sender.unregister(s.rtp);
            }
            more
        });
        sender.send(&outbox, |sent, now| {
            let after = now.saturating_duration_since(due);
            late.extend(sent.filter(|i| is_rtp[*i]).map(|_| after));
        });
        // The phase's sockets stay open until their datagrams have left.
        outbox.clear();
        active -= before - phase.len();
        shared
            .active
            .fetch_sub(before - phase.len(), Ordering::Relaxed);
        shared
            .packets
            .fetch_add(late.len() as u64, Ordering::Relaxed);
        if let Ok(mut h) = shared.lateness.lock() {
            for l in &late {
                h.record(*l);
            }
        }
        n += 1;
        if n >= u32::MAX as u64 {
            // About 50 days of continuous playing: restart the phase clock where it is.
            epoch += PHASE * (n as u32);
            n = 0;
        }
    }
}

/// Registers a new stream's sockets with the sender (with io_uring: a slot in its file table; with
/// a raw socket: the address its headers name; otherwise nothing).
/// Registering costs two system calls per stream (in and out), saving one descriptor lookup per
/// packet: worth it for a message, not for a stream of a few frames (a call setup's empty stream),
/// nor for RTCP, one packet every 5 s; those send from their own sockets.
fn register(s: &mut Stream, sender: &mut BatchSender) {
    s.connected = s.req.socket.peer() == Some(s.dest);
    if s.req.frames.len().saturating_sub(s.next) > REGISTER_FROM_FRAMES {
        s.rtp = sender.register(&s.req.socket);
    }
}

/// Streams longer than this (one second) have their RTP socket registered with the sender.
const REGISTER_FROM_FRAMES: usize = 50;

/// Queues one frame (and a sender report when one is due) in `out`; returns false when the stream
/// is over. A frame the kernel then refuses (full socket buffer, ICMP error) is dropped; the stream
/// keeps its timing.
fn queue_next(s: &mut Stream, out: &mut Outbox, is_rtp: &mut Vec<bool>) -> bool {
    if s.shared.stopped.load(Ordering::Relaxed) || s.next >= s.req.frames.len() {
        s.shared.done.send_replace(true);
        return false;
    }
    let h = RtpHeader {
        payload_type: s.req.payload_type,
        marker: s.first,
        sequence: s.seq,
        timestamp: s.ts,
        ssrc: s.req.ssrc,
    };
    let mut moved = false;
    if s.shared.dest_changed.load(Ordering::Relaxed)
        && s.shared.dest_changed.swap(false, Ordering::Acquire)
    {
        if let Ok(d) = s.shared.dest.lock() {
            s.dest = *d;
            moved = true;
        }
    }
    if moved {
        s.connected = s.req.socket.peer() == Some(s.dest);
        s.rtp.follow(&s.req.socket);
    }
    // A raw datagram always names its destination: the headers are ours.
    let to = (!s.connected || s.rtp.is_raw()).then_some(s.dest);
    out.push(s.rtp, to, |buf| {
        write_packet(&h, &s.req.frames[s.next], buf)
    });
    is_rtp.push(true);
    // Only this thread writes the count: a store, not a read-modify-write.
    s.sent += 1;
    let sent = s.sent;
    s.shared.sent.store(sent, Ordering::Relaxed);
    s.report_in = s.report_in.saturating_sub(1);
    if s.report_in == 0 {
        s.report_in = REPORT_INTERVAL_FRAMES;
        if let (Some(target), Some(from)) = (&s.req.rtcp, s.rtcp) {
            let packets = s.req.initial_packets.wrapping_add(sent as u32);
            let info = SenderInfo {
                ssrc: s.req.ssrc,
                ntp: rtcp::ntp_now(),
                rtp_timestamp: s.ts,
                packets,
                octets: packets.wrapping_mul(FRAME as u32),
            };
            out.push(from, Some(target.dest), |buf| {
                rtcp::write_sender_report(&info, buf)
            });
            is_rtp.push(false);
        }
    }
    s.first = false;
    s.next += 1;
    s.seq = s.seq.wrapping_add(1);
    s.ts = s.ts.wrapping_add(FRAME as u32);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::rtp::parse;
    use tokio::net::UdpSocket;

    fn sender() -> Arc<RtpSocket> {
        Arc::new(RtpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap())
    }

    async fn receive(sock: &UdpSocket, n: usize) -> Vec<RtpHeader> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1500];
        while out.len() < n {
            let (len, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
                .await
                .expect("packets keep coming")
                .unwrap();
            out.push(parse(&buf[..len]).unwrap().0);
        }
        out
    }

    #[tokio::test]
    async fn two_streams_get_consecutive_packets_and_finish() {
        let pacer = Pacer::spawn();
        let send = sender();
        let rx1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rx2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let frames = Arc::new(vec![[0xFFu8; FRAME]; 10]);
        let mk = |dest, ssrc| PlayRequest {
            socket: send.clone(),
            dest,
            frames: frames.clone(),
            payload_type: 0,
            ssrc,
            start_frame: 0,
            initial_seq: 65_530,
            initial_ts: 1000,
            initial_packets: 0,
            rtcp: None,
        };
        let a = pacer.play(mk(rx1.local_addr().unwrap(), 1));
        let b = pacer.play(mk(rx2.local_addr().unwrap(), 2));
        let got = receive(&rx1, 10).await;
        receive(&rx2, 10).await;
        assert!(got[0].marker);
        assert!(got[1..].iter().all(|h| !h.marker));
        for w in got.windows(2) {
            assert_eq!(w[1].sequence, w[0].sequence.wrapping_add(1));
            assert_eq!(w[1].timestamp, w[0].timestamp + 160);
        }
        tokio::time::timeout(Duration::from_secs(2), a.wait_finished())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), b.wait_finished())
            .await
            .unwrap();
        assert_eq!(a.frames_sent(), 10);
        assert!(pacer.lateness_snapshot().packets >= 20);
    }

    #[test]
    fn lateness_totals_count_the_packets_below_each_bound() {
        let pacer = Pacer::spawn_threads(1);
        let us = [5, 15, 995, 1000, 200_000];
        if let Ok(mut h) = pacer.lanes[0].shared.lateness.lock() {
            for u in us {
                h.record(Duration::from_micros(u));
            }
        }
        let t = pacer.lateness_totals(&[10, 1000, 100_000]);
        // 1000 µs falls in the bucket from 1000 to 1010, not below 1000; the last bucket also
        // holds what was later than 100 ms.
        assert_eq!(t.below, vec![(10, 1), (1000, 3), (100_000, 5)]);
        assert_eq!((t.count, t.sum_us), (5, us.iter().sum()));
    }

    #[tokio::test]
    async fn streams_are_spread_over_the_phases_and_send_sender_reports() {
        let pacer = Pacer::spawn_threads(1);
        let send = sender();
        let rtcp_send = sender();
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rtcp_rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let frames = Arc::new(vec![[0xFFu8; FRAME]; 200]);
        let handles: Vec<_> = (0..PHASES as u32)
            .map(|i| {
                pacer.play(PlayRequest {
                    socket: send.clone(),
                    dest: rx.local_addr().unwrap(),
                    frames: frames.clone(),
                    payload_type: 0,
                    ssrc: i,
                    start_frame: 0,
                    initial_seq: 0,
                    initial_ts: 0,
                    initial_packets: 1000,
                    rtcp: (i == 0).then(|| RtcpTarget {
                        socket: rtcp_send.clone(),
                        dest: rtcp_rx.local_addr().unwrap(),
                    }),
                })
            })
            .collect();
        // One tick's packets: one stream per phase, so they arrive over the tick, not at once.
        let mut arrivals = Vec::new();
        let mut buf = [0u8; 1500];
        while arrivals.len() < 3 * PHASES {
            tokio::time::timeout(Duration::from_secs(5), rx.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            arrivals.push(Instant::now());
        }
        let spread = arrivals[2 * PHASES - 1] - arrivals[PHASES];
        assert!(
            spread >= Duration::from_millis(10),
            "a tick's packets arrived within {spread:?}: not spread over the phases"
        );
        // The first sender report comes after half an interval (125 frames, 2.5 s).
        let (n, _) = tokio::time::timeout(Duration::from_secs(6), rtcp_rx.recv_from(&mut buf))
            .await
            .expect("a sender report")
            .unwrap();
        assert!(rtcp::is_valid_compound(&buf[..n]));
        let sr = rtcp::parse_sender_report(&buf[..n]).unwrap();
        assert_eq!(sr.ssrc, 0);
        assert_eq!(sr.packets, 1000 + 125);
        assert_eq!(sr.octets, (1000 + 125) * FRAME as u32);
        assert_eq!(sr.rtp_timestamp, 124 * FRAME as u32);
        drop(handles);
    }

    /// 200 streams, each on its own socket as calls are, played to 10 sinks: every packet of every
    /// stream arrives exactly once, in order, with consecutive sequence numbers and timestamps.
    async fn every_stream_packet_arrives_once_in_sequence(path: SendPath) {
        const STREAMS: u32 = 200;
        // Over REGISTER_FROM_FRAMES, so the sockets go through io_uring's registered files.
        const FRAMES: usize = REGISTER_FROM_FRAMES + 10;
        let pacer = Pacer::spawn_with(2, path);
        if path == SendPath::Sendto {
            assert_eq!(pacer.send_path(), SendPath::Sendto);
        }
        crate::media::socket::tests::expect_raw_where_allowed(path, pacer.send_path(), &None);
        let mut sinks = Vec::new();
        for _ in 0..10 {
            sinks.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        }
        let frames = Arc::new(vec![[0xD5u8; FRAME]; FRAMES]);
        let handles: Vec<_> = (0..STREAMS)
            .map(|i| {
                pacer.play(PlayRequest {
                    socket: sender(),
                    dest: sinks[i as usize % sinks.len()].local_addr().unwrap(),
                    frames: frames.clone(),
                    payload_type: 8,
                    ssrc: i,
                    start_frame: 0,
                    // Some streams wrap their sequence number mid-stream.
                    initial_seq: 65_530u16.wrapping_add(i as u16 * 7),
                    initial_ts: i * 1000,
                    initial_packets: 0,
                    rtcp: None,
                })
            })
            .collect();
        let mut got: Vec<Vec<RtpHeader>> = vec![Vec::new(); STREAMS as usize];
        let mut buf = [0u8; 1500];
        let collect = async {
            let mut total = 0;
            while total < STREAMS as usize * FRAMES {
                for sink in &sinks {
                    while let Ok((len, _)) = sink.try_recv_from(&mut buf) {
                        let (h, payload) = parse(&buf[..len]).unwrap();
                        assert_eq!(payload, &[0xD5u8; FRAME][..]);
                        got[h.ssrc as usize].push(h);
                        total += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), collect)
            .await
            .expect("every packet arrives");
        for (i, packets) in got.iter().enumerate() {
            let seq0 = 65_530u16.wrapping_add(i as u16 * 7);
            let expected: Vec<(u16, u32, bool)> = (0..FRAMES)
                .map(|k| {
                    (
                        seq0.wrapping_add(k as u16),
                        i as u32 * 1000 + (k * FRAME) as u32,
                        k == 0,
                    )
                })
                .collect();
            let seen: Vec<_> = packets
                .iter()
                .map(|h| (h.sequence, h.timestamp, h.marker))
                .collect();
            assert_eq!(seen, expected, "stream {i}");
        }
        for h in &handles {
            tokio::time::timeout(Duration::from_secs(5), h.wait_finished())
                .await
                .unwrap();
            assert_eq!(h.frames_sent(), FRAMES);
        }
        // Nothing more arrives after the last frame: no packet was sent twice.
        tokio::time::sleep(Duration::from_millis(100)).await;
        for sink in &sinks {
            assert!(sink.try_recv_from(&mut buf).is_err());
        }
        assert_eq!(pacer.packets_sent(), STREAMS as u64 * FRAMES as u64);
        assert_eq!(
            pacer.lateness_snapshot().packets,
            STREAMS as u64 * FRAMES as u64
        );
    }

    #[tokio::test]
    async fn io_uring_batches_send_each_stream_packet_once_in_sequence() {
        every_stream_packet_arrives_once_in_sequence(SendPath::IoUring).await;
    }

    #[tokio::test]
    async fn sendto_fallback_sends_each_stream_packet_once_in_sequence() {
        every_stream_packet_arrives_once_in_sequence(SendPath::Sendto).await;
    }

    #[tokio::test]
    async fn raw_socket_sends_each_stream_packet_once_in_sequence() {
        every_stream_packet_arrives_once_in_sequence(SendPath::Raw).await;
    }

    /// A stream of 200 s from `socket` to `dest`, registered with the ring like a message.
    fn long_stream(socket: Arc<RtpSocket>, dest: SocketAddr, ssrc: u32) -> PlayRequest {
        PlayRequest {
            socket,
            dest,
            frames: Arc::new(vec![[0xFFu8; FRAME]; 10_000]),
            payload_type: 0,
            ssrc,
            start_frame: 0,
            initial_seq: 100,
            initial_ts: 0,
            initial_packets: 0,
            rtcp: None,
        }
    }

    #[tokio::test]
    async fn set_dest_moves_the_rest_of_the_stream() {
        let pacer = Pacer::spawn_threads(1);
        let rx1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rx2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let s = pacer.play(long_stream(sender(), rx1.local_addr().unwrap(), 5));
        let first = receive(&rx1, 2).await;
        s.set_dest(rx2.local_addr().unwrap());
        let moved = receive(&rx2, 3).await;
        // The stream goes on where it was: no packet repeated, none from before the change.
        assert!(moved[0].sequence > first[1].sequence);
        for w in moved.windows(2) {
            assert_eq!(w[1].sequence, w[0].sequence.wrapping_add(1));
        }
    }

    /// A call's socket is connected to the callee, and its datagrams leave without an address. A
    /// stream moved to an address the socket is not connected to still gets there, and one
    /// connected anew (as a call does before moving its stream) too.
    #[tokio::test]
    async fn a_connected_socket_streams_to_its_peer_and_follows_moves() {
        for path in [SendPath::IoUring, SendPath::Sendto, SendPath::Raw] {
            let pacer = Pacer::spawn_with(1, path);
            let rx1 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let rx2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let rx3 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let socket = sender();
            socket.connect(rx1.local_addr().unwrap()).unwrap();
            assert_eq!(socket.peer(), Some(rx1.local_addr().unwrap()));
            let s = pacer.play(long_stream(socket.clone(), rx1.local_addr().unwrap(), 6));
            let first = receive(&rx1, 3).await;
            // Moved without connecting: the socket is still connected to rx1, yet rx2 gets them.
            s.set_dest(rx2.local_addr().unwrap());
            let second = receive(&rx2, 3).await;
            assert!(second[0].sequence > first[2].sequence);
            // Connected to rx3 first, then moved there.
            socket.connect(rx3.local_addr().unwrap()).unwrap();
            s.set_dest(rx3.local_addr().unwrap());
            let third = receive(&rx3, 3).await;
            assert!(third[0].sequence > second[2].sequence);
            for w in third.windows(2) {
                assert_eq!(w[1].sequence, w[0].sequence.wrapping_add(1));
            }
            // Connected to rx1 again, the socket hears only rx1: rx2's datagram is not delivered.
            socket.connect(rx1.local_addr().unwrap()).unwrap();
            rx2.send_to(b"stranger", socket.local_addr()).await.unwrap();
            rx1.send_to(b"callee", socket.local_addr()).await.unwrap();
            let mut buf = [0u8; 64];
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let (n, from) = loop {
                match socket.try_recv_from(&mut buf) {
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            && std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    got => break got.expect("the callee's datagram within 5 s"),
                }
            };
            assert_eq!(
                (&buf[..n], from),
                (&b"callee"[..], rx1.local_addr().unwrap())
            );
            s.stop();
        }
    }

    #[tokio::test]
    async fn stop_ends_a_stream_early_and_resumes_at_an_offset() {
        let pacer = Pacer::spawn();
        let send = sender();
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let frames = Arc::new(vec![[0xFFu8; FRAME]; 10_000]);
        let s = pacer.play(PlayRequest {
            socket: send.clone(),
            dest: rx.local_addr().unwrap(),
            frames: frames.clone(),
            payload_type: 8,
            ssrc: 9,
            start_frame: 9_990,
            initial_seq: 0,
            initial_ts: 0,
            initial_packets: 0,
            rtcp: None,
        });
        receive(&rx, 3).await;
        s.stop();
        tokio::time::timeout(Duration::from_secs(2), s.wait_finished())
            .await
            .unwrap();
        assert!(s.frames_sent() < 10);
    }
}
