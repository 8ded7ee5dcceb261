//! The pacer: one task sends every active stream's next 20 ms frame on each tick, instead of one timer
//! per call. Its lateness (actual send time minus due time) is measured on every tick.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::message::FRAME;
use super::rtp::{write_packet, RtpHeader};

/// Packetisation interval.
pub const TICK: Duration = Duration::from_millis(20);

/// One stream to play.
pub struct PlayRequest {
    pub socket: Arc<UdpSocket>,
    pub dest: SocketAddr,
    pub frames: Arc<Vec<[u8; FRAME]>>,
    pub payload_type: u8,
    pub ssrc: u32,
    /// Frame to start from (resuming playback at an offset).
    pub start_frame: usize,
    pub initial_seq: u16,
    pub initial_ts: u32,
}

struct StreamShared {
    stopped: AtomicBool,
    sent: AtomicUsize,
    dest: Mutex<SocketAddr>,
    done: watch::Sender<bool>,
}

struct Stream {
    req: PlayRequest,
    shared: Arc<StreamShared>,
    next: usize,
    seq: u16,
    ts: u32,
    first: bool,
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
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Recent tick lateness, in microseconds.
#[derive(Default)]
struct Lateness {
    recent: Mutex<VecDeque<u32>>,
}

/// Percentiles of recent pacer lateness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatenessSnapshot {
    pub ticks: usize,
    pub p50_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
}

/// Submits streams to the pacer task.
#[derive(Clone)]
pub struct PacerHandle {
    tx: mpsc::UnboundedSender<Stream>,
    lateness: Arc<Lateness>,
    active: Arc<AtomicUsize>,
}

/// The pacer task.
pub struct Pacer;

impl Pacer {
    /// Starts the pacer on the current tokio runtime.
    pub fn spawn() -> PacerHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let lateness = Arc::new(Lateness::default());
        let active = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(rx, lateness.clone(), active.clone()));
        PacerHandle {
            tx,
            lateness,
            active,
        }
    }
}

impl PacerHandle {
    /// Starts playing a stream from its next tick.
    pub fn play(&self, req: PlayRequest) -> StreamHandle {
        let (done, _) = watch::channel(false);
        let shared = Arc::new(StreamShared {
            stopped: AtomicBool::new(false),
            sent: AtomicUsize::new(0),
            dest: Mutex::new(req.dest),
            done,
        });
        let stream = Stream {
            next: req.start_frame,
            seq: req.initial_seq,
            ts: req.initial_ts,
            first: true,
            req,
            shared: shared.clone(),
        };
        if let Err(mpsc::error::SendError(s)) = self.tx.send(stream) {
            // The pacer is gone (runtime shutting down): report the stream as finished.
            s.shared.done.send_replace(true);
        }
        StreamHandle { shared }
    }

    /// Streams currently playing.
    pub fn active_streams(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// p50/p99/max lateness over the last few thousand ticks.
    pub fn lateness_snapshot(&self) -> LatenessSnapshot {
        let mut v: Vec<u32> = self
            .lateness
            .recent
            .lock()
            .map(|r| r.iter().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        let pick = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        LatenessSnapshot {
            ticks: v.len(),
            p50_us: pick(0.5),
            p99_us: pick(0.99),
            max_us: v.last().copied().unwrap_or(0),
        }
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Stream>,
    lateness: Arc<Lateness>,
    active: Arc<AtomicUsize>,
) {
    let mut streams: Vec<Stream> = Vec::new();
    let mut buf = Vec::with_capacity(256);
    loop {
        if streams.is_empty() {
            // Park until there is something to play.
            match rx.recv().await {
                Some(s) => streams.push(s),
                None => return,
            }
        }
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while !streams.is_empty() {
            let due = interval.tick().await;
            let late = tokio::time::Instant::now().saturating_duration_since(due);
            if let Ok(mut r) = lateness.recent.lock() {
                if r.len() >= 4096 {
                    r.pop_front();
                }
                r.push_back(late.as_micros().min(u32::MAX as u128) as u32);
            }
            while let Ok(s) = rx.try_recv() {
                streams.push(s);
            }
            streams.retain_mut(|s| send_next(s, &mut buf));
            active.store(streams.len(), Ordering::Relaxed);
        }
    }
}

/// Sends one frame; returns false when the stream is over.
fn send_next(s: &mut Stream, buf: &mut Vec<u8>) -> bool {
    if s.shared.stopped.load(Ordering::Relaxed) || s.next >= s.req.frames.len() {
        s.shared.done.send_replace(true);
        return false;
    }
    buf.clear();
    let h = RtpHeader {
        payload_type: s.req.payload_type,
        marker: s.first,
        sequence: s.seq,
        timestamp: s.ts,
        ssrc: s.req.ssrc,
    };
    write_packet(&h, &s.req.frames[s.next], buf);
    let dest = s.shared.dest.lock().map(|d| *d).unwrap_or(s.req.dest);
    // A full socket buffer or an ICMP error drops this frame only; the stream keeps its timing.
    let _ = s.req.socket.try_send_to(buf, dest);
    s.first = false;
    s.next += 1;
    s.seq = s.seq.wrapping_add(1);
    s.ts = s.ts.wrapping_add(FRAME as u32);
    s.shared.sent.fetch_add(1, Ordering::Relaxed);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::rtp::parse;

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
        let send = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
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
        assert!(pacer.lateness_snapshot().ticks >= 10);
    }

    #[tokio::test]
    async fn stop_ends_a_stream_early_and_resumes_at_an_offset() {
        let pacer = Pacer::spawn();
        let send = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
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
        });
        receive(&rx, 3).await;
        s.stop();
        tokio::time::timeout(Duration::from_secs(2), s.wait_finished())
            .await
            .unwrap();
        assert!(s.frames_sent() < 10);
    }
}
