//! `campanile bench`: the two telephony benchmarks of BENCHMARKS.md, each measured against a named
//! reference in the same run. They are commands, not tests: they print figures, they assert nothing.
//!
//! * `media`: N concurrent G.711 streams through the pacer (one socket per stream, as calls have) versus
//!   a bare `sendmmsg` loop pushing the same 172-byte datagrams over the same loopback as fast as it can
//!   (the machine's limit). Both send to the same N sink sockets, which nobody reads: the figure is the
//!   sender's cost alone (sim-city's phones would compete with the sender for the same cores).
//!   With `--answer`, the same streams once to those sinks and once to callees in a child process that
//!   send RTP back, every stream read as a call reads it: what the other half of a call costs.
//! * `call-setup`: calls per second and CPU per 1,000 calls, campanile's UAC versus `sipp -sn uac`,
//!   both against the same `sipp -sn uas`; and a sketch of the dialer's shape-to-be (its SIP parts
//!   driven by one loop, [`one_loop_setup`]), with and without the calls' RTP sockets.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rsip::{Method, Response};

use crate::call::{first_invite, place_call, CallContext, CallOutcome, CallSpec};
use crate::dialer::trunk::on_launch_tick;
use crate::media::listen::Listener;
use crate::media::message::FRAME;
use crate::media::pacer::{Pacer, PacerHandle, PlayRequest, StreamHandle};
use crate::media::ports::RtpPorts;
use crate::media::socket::{RtpSocket, SendPath};
use crate::media::PreparedAudio;
use crate::sip::dialog::Dialog;
use crate::sip::endpoint::Endpoint;
use crate::sip::message::{self, SipMessage};
use crate::sip::sdp;
use crate::sip::transaction::{ClientTransaction, Output, Timers};

/// Bytes of one G.711 RTP datagram: 12 header + 160 payload.
const DATAGRAM: usize = 12 + FRAME;

/// CPU seconds (user + system) used so far by this process or by its reaped children.
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage only writes the struct we pass; a zeroed rusage is a valid initial value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, exclusively borrowed rusage.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises the soft limit on open files to the hard limit: each stream or call holds sockets.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: plain libc calls on a stack struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        lim.rlim_cur
    }
}

/// One row of the media benchmark.
#[derive(Debug, Clone)]
pub struct MediaRow {
    pub streams: usize,
    pub packets_per_s: f64,
    /// CPU seconds per second of wall time, per stream, in microseconds.
    pub cpu_us_per_stream_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// How the pacer sent.
    pub path: SendPath,
    /// Packets a second the callees sent back (0 when they do not answer).
    pub heard_per_s: f64,
    /// Of those, dropped a second by the kernel at the streams' full sockets: not read in time.
    pub dropped_per_s: f64,
}

/// The sink: N sockets nobody reads, standing in for N phones.
fn sinks(n: usize) -> anyhow::Result<(Vec<StdUdpSocket>, Vec<SocketAddr>)> {
    let mut socks = Vec::with_capacity(n);
    let mut addrs = Vec::with_capacity(n);
    for _ in 0..n {
        let s = StdUdpSocket::bind("127.0.0.1:0").context("binding a sink socket")?;
        addrs.push(s.local_addr()?);
        socks.push(s);
    }
    Ok((socks, addrs))
}

/// One bare loop: this thread, one socket, `sendmmsg` batches of 64 datagrams round-robin over the sinks,
/// flat out for `secs`. Returns (packets per second, CPU seconds per second).
pub fn bare_loop(dests: &[SocketAddr], secs: f64) -> anyhow::Result<(f64, f64)> {
    use std::os::fd::AsRawFd;
    const BATCH: usize = 64;
    let sock = StdUdpSocket::bind("127.0.0.1:0")?;
    let fd = sock.as_raw_fd();
    let payload = [0x80u8; DATAGRAM];
    let addrs: Vec<libc::sockaddr_in> = dests
        .iter()
        .map(|d| {
            // SAFETY: sockaddr_in is plain data; zeroed is a valid starting value.
            let mut a: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            a.sin_family = libc::AF_INET as libc::sa_family_t;
            a.sin_port = d.port().to_be();
            a.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            a
        })
        .collect();
    if addrs.is_empty() {
        bail!("no destinations");
    }
    let mut iovs: Vec<libc::iovec> = (0..BATCH)
        .map(|_| libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: DATAGRAM,
        })
        .collect();
    let mut next = 0usize;
    let mut sent: u64 = 0;
    let cpu0 = thread_cpu_seconds();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        // SAFETY: every header points into `iovs` and `addrs`, which outlive the call.
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH)
            .map(|i| {
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = &addrs[(next + i) % addrs.len()] as *const _ as *mut _;
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
                h.msg_hdr.msg_iov = &mut iovs[i];
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: `msgs` is a valid array of BATCH headers.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
        if n > 0 {
            sent += n as u64;
            next = (next + n as usize) % addrs.len();
        }
    }
    let wall = start.elapsed().as_secs_f64();
    Ok((sent as f64 / wall, (thread_cpu_seconds() - cpu0) / wall))
}

fn thread_cpu_seconds() -> f64 {
    cpu_seconds(libc::RUSAGE_THREAD)
}

/// The pacer with `n` streams, one socket each, to the sinks; measured for `secs` after a warm-up.
/// With `shared` = Some(k), the streams send from k unconnected sockets in turn instead, each
/// datagram naming its destination: what calls sharing sending sockets would cost (calls do not).
pub async fn pacer_run(
    dests: &[SocketAddr],
    secs: f64,
    threads: usize,
    path: SendPath,
    mut callees: Option<&mut Callees>,
    shared: Option<usize>,
) -> anyhow::Result<MediaRow> {
    let n = dests.len();
    let warmup = 2.0;
    let frames = ((secs + warmup + 2.0) * 50.0) as usize;
    let audio = Arc::new(vec![[0xFFu8; FRAME]; frames]);
    let pacer = Pacer::spawn_with(threads, path);
    let mut handles = Vec::with_capacity(n);
    let mut sockets = Vec::with_capacity(n);
    let bind = || -> anyhow::Result<Arc<RtpSocket>> {
        Ok(Arc::new(
            RtpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .context("binding a stream socket")?,
        ))
    };
    let pool = match shared {
        Some(k) if callees.is_some() => {
            bail!("{k} shared sockets: the callees need one per stream")
        }
        Some(k) => (0..k.clamp(1, n.max(1)))
            .map(|_| bind())
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    for (i, dest) in dests.iter().enumerate() {
        let (socket, connect) = match pool.get(i % pool.len().max(1)) {
            Some(s) => (s.clone(), false),
            None => (bind()?, true),
        };
        sockets.push(socket.clone());
        handles.push(play_to(&pacer, socket, *dest, connect, &audio, i as u32)?);
    }
    // With callees answering, every stream's socket is read as a call's is: keys, and an answering
    // machine detector on the decoded audio.
    let mut listeners = Vec::new();
    let mut ports = std::collections::HashSet::new();
    if let Some(callees) = callees.as_deref_mut() {
        let ours: Vec<_> = sockets.iter().map(|s| s.local_addr()).collect();
        ports = ours.iter().map(|a| a.port()).collect();
        callees.play(&ours)?;
        for (socket, dest) in sockets.iter().zip(dests) {
            let (socket, callee) = (socket.clone(), *dest);
            // What we offer for keys; the callees send audio only.
            let mut ears = Listener::new(Some(sdp::PT_TELEPHONE_EVENT), true);
            listeners.push(tokio::spawn(async move {
                let mut look = tokio::time::interval(crate::media::socket::READ_INTERVAL);
                look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut heard = Vec::new();
                loop {
                    look.tick().await;
                    ears.look(&socket, callee, &mut heard);
                    heard.clear();
                }
            }));
        }
    }
    drop(sockets);
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    // Each count is divided by the time between its own two readings: reading /proc/net/udp
    // with thousands of sockets takes a while, and so does asking the callees.
    let dropped0 = (udp_drops(&ports), Instant::now());
    let heard0 = match callees.as_deref_mut() {
        Some(c) => (c.sent()?, Instant::now()),
        None => (0, Instant::now()),
    };
    pacer.reset_lateness();
    let packets0 = pacer.packets_sent();
    let cpu0 = cpu_seconds(libc::RUSAGE_SELF);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let wall = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(libc::RUSAGE_SELF) - cpu0;
    let packets = pacer.packets_sent() - packets0;
    let lateness = pacer.lateness_snapshot();
    let heard_per_s = match callees {
        Some(c) => {
            let heard =
                c.sent()?.saturating_sub(heard0.0) as f64 / heard0.1.elapsed().as_secs_f64();
            c.stop()?;
            heard
        }
        None => 0.0,
    };
    let dropped_per_s =
        udp_drops(&ports).saturating_sub(dropped0.0) as f64 / dropped0.1.elapsed().as_secs_f64();
    drop(handles);
    for task in listeners {
        task.abort();
    }
    // The pacer threads close the streams' sockets as they drop them, at their next phase; the
    // next row binds as many again, against the same open-file limit.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pacer.active_streams() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(MediaRow {
        streams: n,
        packets_per_s: packets as f64 / wall,
        cpu_us_per_stream_s: cpu / wall / n as f64 * 1e6,
        p50_us: lateness.p50_us,
        p99_us: lateness.p99_us,
        max_us: lateness.max_us,
        path: pacer.send_path(),
        heard_per_s,
        dropped_per_s,
    })
}

/// Datagrams the kernel dropped so far at this host's IPv4 UDP sockets bound to `ports` (the
/// `drops` column of /proc/net/udp: the socket's receive buffer was full).
fn udp_drops(ports: &std::collections::HashSet<u16>) -> u64 {
    if ports.is_empty() {
        return 0;
    }
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = fields.get(1)?.rsplit(':').next()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            ports
                .contains(&port)
                .then(|| fields.last()?.parse::<u64>().ok())?
        })
        .sum()
}

/// The callees of `bench media --answer`: a child process (`campanile bench media-callee`) whose
/// sockets are the sinks, and which plays RTP back to each stream's socket, 50 packets a second,
/// as a phone does. A process of its own, so that its CPU is not counted as the node's (it still
/// takes its share of the machine's cores). Killed on drop.
pub struct Callees {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    addrs: Vec<SocketAddr>,
}

impl Callees {
    fn spawn(n: usize) -> anyhow::Result<Callees> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["bench", "media-callee", "--streams", &n.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the callees (campanile bench media-callee)")?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("the callees' pipes were not opened");
        };
        let mut callees = Callees {
            child,
            stdin,
            stdout: std::io::BufReader::new(stdout),
            addrs: Vec::new(),
        };
        let ports = callees.reply()?;
        callees.addrs = ports
            .split_whitespace()
            .map(|p| Ok(SocketAddr::from(([127, 0, 0, 1], p.parse()?))))
            .collect::<anyhow::Result<_>>()
            .context("reading the callees' ports")?;
        if callees.addrs.len() != n {
            bail!("the callees bound {} sockets, not {n}", callees.addrs.len());
        }
        Ok(callees)
    }

    fn reply(&mut self) -> anyhow::Result<String> {
        use std::io::BufRead;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the callees' process ended");
        }
        Ok(line.trim().to_string())
    }

    fn ask(&mut self, line: &str) -> anyhow::Result<String> {
        use std::io::Write;
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        self.reply()
    }

    /// The first `to.len()` callees play to `to`, each to its stream.
    fn play(&mut self, to: &[SocketAddr]) -> anyhow::Result<()> {
        let ports: Vec<String> = to.iter().map(|a| a.port().to_string()).collect();
        self.ask(&format!("play {}", ports.join(" ")))?;
        Ok(())
    }

    /// Packets the callees have sent so far.
    fn sent(&mut self) -> anyhow::Result<u64> {
        Ok(self.ask("sent")?.parse()?)
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        self.ask("stop")?;
        Ok(())
    }
}

impl Drop for Callees {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `campanile bench media-callee`: the other end of `bench media --answer`. Binds `n` loopback
/// sockets and prints their ports on one line; then, line by line on stdin, `play PORT...` connects
/// the first sockets to those ports of 127.0.0.1 and plays RTP (G.711 silence, one pacer thread) to
/// them until `stop`; `sent` prints the packets sent so far. Ends at the end of stdin.
pub async fn media_callee(n: usize) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;
    raise_fd_limit();
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(Arc::new(RtpSocket::bind(SocketAddr::from((
            [127, 0, 0, 1],
            0,
        )))?));
    }
    let ports: Vec<String> = sockets
        .iter()
        .map(|s| s.local_addr().port().to_string())
        .collect();
    println!("{}", ports.join(" "));
    let pacer = Pacer::spawn_threads(1);
    let audio = Arc::new(vec![[0xFFu8; FRAME]; 50 * 3600]);
    let mut playing = Vec::new();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("play") => {
                for (i, (socket, port)) in sockets.iter().zip(words).enumerate() {
                    let dest = SocketAddr::from(([127, 0, 0, 1], port.parse()?));
                    playing.push(play_to(
                        &pacer,
                        socket.clone(),
                        dest,
                        true,
                        &audio,
                        i as u32,
                    )?);
                }
                println!("ok");
            }
            Some("sent") => println!("{}", pacer.packets_sent()),
            Some("stop") => {
                playing.clear();
                println!("ok");
            }
            _ => bail!("unknown request {line:?}"),
        }
    }
    Ok(())
}

/// Plays `frames` (G.711 µ-law) from the start from `socket` to `dest`; with `connect`, connects the
/// socket to `dest` first, as a call's socket is once the callee's media address is known.
fn play_to(
    pacer: &PacerHandle,
    socket: Arc<RtpSocket>,
    dest: SocketAddr,
    connect: bool,
    frames: &Arc<Vec<[u8; FRAME]>>,
    ssrc: u32,
) -> anyhow::Result<StreamHandle> {
    if connect {
        socket.connect(dest).context("connecting a stream socket")?;
    }
    Ok(pacer.play(PlayRequest {
        socket,
        dest,
        frames: frames.clone(),
        payload_type: sdp::PT_PCMU,
        ssrc,
        start_frame: 0,
        initial_seq: 0,
        initial_ts: 0,
        initial_packets: 0,
        rtcp: None,
    }))
}

/// `campanile bench media`; with `answer`, [`media_answered`] instead. With `shared` = Some(k), the
/// streams send from k shared sockets instead of one socket each.
pub async fn media(
    stream_counts: &[usize],
    secs: f64,
    threads: usize,
    answer: bool,
    shared: Option<usize>,
    paths: &[SendPath],
) -> anyhow::Result<()> {
    if answer && shared.is_some() {
        bail!("--share-sockets measures streams to sinks; --answer needs one socket per stream");
    }
    if shared == Some(0) {
        bail!("--share-sockets 0: the streams need at least one socket to send from");
    }
    let limit = raise_fd_limit();
    let most = stream_counts.iter().copied().max().unwrap_or(0);
    // Every stream holds a socket, and so does every sink: one sink per stream while the open-file
    // limit allows, past that the streams share the sinks (and the bare loop sends to all of them).
    // With shared sockets too, so that both ways send to the same sinks.
    let spare = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(most + 100);
    if spare == 0 {
        bail!("{most} streams need more than {limit} open files, the limit");
    }
    let (_sinks, addrs) = sinks(most.min(spare))?;
    let threads = threads.max(1);
    if answer {
        return media_answered(stream_counts, &addrs, secs, threads).await;
    }
    let names: Vec<String> = paths.iter().map(|p| path_name(*p).to_string()).collect();
    println!(
        "Each stream count: the bare sendmmsg loop on {threads} threads ({secs} s), then the pacer on \
         {threads} threads sending with {} ({secs} s each after a 2 s warm-up).",
        names.join(", then with ")
    );
    if let Some(k) = shared {
        println!("The streams send from {k} shared sockets, not from one socket each as calls do.");
    }
    if addrs.len() < most {
        println!(
            "{} sink sockets (the open-file limit is {limit}): streams beyond that share them.",
            addrs.len()
        );
    }
    println!(
        "| streams | pacer sends with | packets/s | bare loop packets/s | % of bare loop | \
         CPU µs per packet | bare loop CPU µs per packet | lateness p50 | p99 | max |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in stream_counts {
        // The reference is measured again for every row: on a shared machine it moves.
        let (bare_pps, bare_cpu) = bare_loops(&addrs, secs, threads)?;
        // Each count on every path asked for (by default io_uring, what a node runs, and the
        // fallback, one sendto per packet).
        for &path in paths {
            let row = pacer_run(&round_robin(&addrs, n), secs, threads, path, None, shared).await?;
            let mut name = path_name(row.path).to_string();
            if row.path != path {
                // Asked for a path the kernel or the process's privileges refused (logged).
                name.push_str(&format!(" ({} refused)", path_name(path)));
            }
            if let Some(k) = shared {
                name.push_str(&format!(", {k} shared sockets"));
            }
            println!(
                "| {} | {name} | {:.0} | {bare_pps:.0} | {:.1} % | {:.2} | {:.2} | {:.2} ms | {:.2} ms | {:.2} ms |",
                row.streams,
                row.packets_per_s,
                row.packets_per_s / bare_pps * 100.0,
                row.cpu_us_per_stream_s * row.streams as f64 / row.packets_per_s.max(1.0),
                bare_cpu / bare_pps * 1e6,
                row.p50_us as f64 / 1000.0,
                row.p99_us as f64 / 1000.0,
                row.max_us as f64 / 1000.0,
            );
        }
    }
    Ok(())
}

/// A send path as the config spells it.
fn path_name(path: SendPath) -> &'static str {
    match path {
        SendPath::IoUring => "io_uring",
        SendPath::Sendto => "sendto",
        SendPath::Raw => "raw",
    }
}

/// `n` destinations taken from `sinks` in turn.
fn round_robin(sinks: &[SocketAddr], n: usize) -> Vec<SocketAddr> {
    sinks.iter().copied().cycle().take(n).collect()
}

/// `campanile bench media --answer`: what the callees' RTP coming back costs. For each stream
/// count, the pacer (io_uring) plays to the sinks nobody reads, as in the plain benchmark, and then to
/// callees in a child process that play back to every stream, 50 packets a second, while each
/// stream's socket is read as a call reads it (a `media::listen::Listener` every 100 ms: keys,
/// answering machines).
async fn media_answered(
    stream_counts: &[usize],
    sinks: &[SocketAddr],
    secs: f64,
    threads: usize,
) -> anyhow::Result<()> {
    let most = stream_counts.iter().copied().max().unwrap_or(0);
    let mut callees = Callees::spawn(most)?;
    println!(
        "Each stream count: the pacer on {threads} threads (io_uring) to sinks nobody reads, then to \
         callees that send RTP back, each stream read as a call reads it ({secs} s each after a 2 s warm-up)."
    );
    println!(
        "| streams | callees send back | packets sent/s | packets back/s | dropped unread/s | \
         CPU µs per stream-second | CPU µs per packet sent | lateness p50 | p99 | max |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in stream_counts {
        for answering in [false, true] {
            let row = if answering {
                let to = callees.addrs[..n].to_vec();
                pacer_run(
                    &to,
                    secs,
                    threads,
                    SendPath::IoUring,
                    Some(&mut callees),
                    None,
                )
                .await?
            } else {
                let to = round_robin(sinks, n);
                pacer_run(&to, secs, threads, SendPath::IoUring, None, None).await?
            };
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} ms | {:.2} ms | {:.2} ms |",
                row.streams,
                if answering { "yes" } else { "no" },
                row.packets_per_s,
                row.heard_per_s,
                row.dropped_per_s,
                row.cpu_us_per_stream_s,
                row.cpu_us_per_stream_s * row.streams as f64 / row.packets_per_s.max(1.0),
                row.p50_us as f64 / 1000.0,
                row.p99_us as f64 / 1000.0,
                row.max_us as f64 / 1000.0,
            );
        }
    }
    Ok(())
}

/// As many bare loops as the pacer has threads, each over its share of the sinks, at once:
/// (packets per second, CPU seconds per second), summed.
fn bare_loops(addrs: &[SocketAddr], secs: f64, threads: usize) -> anyhow::Result<(f64, f64)> {
    let loops: Vec<_> = addrs
        .chunks(addrs.len().div_ceil(threads).max(1))
        .map(|share| {
            let share = share.to_vec();
            std::thread::spawn(move || bare_loop(&share, secs))
        })
        .collect();
    let (mut bare_pps, mut bare_cpu) = (0.0, 0.0);
    for l in loops {
        let (pps, cpu) = l
            .join()
            .map_err(|_| anyhow::anyhow!("a bare loop thread panicked"))??;
        bare_pps += pps;
        bare_cpu += cpu;
    }
    Ok((bare_pps, bare_cpu))
}

/// Result of one call-setup run.
#[derive(Debug, Clone)]
pub struct SetupRun {
    pub attempted: u64,
    pub succeeded: u64,
    pub wall_s: f64,
    pub cpu_s: f64,
}

/// Places `calls` calls at `rate` per second to `uas`: INVITE, 200, ACK, BYE (no audio), and counts
/// the ones that completed. The calls are placed from a task of the runtime, as a node's dialer
/// places them, not from the thread that waits for the benchmark, and on the dialer's launch
/// grid ([`crate::dialer::trunk::LAUNCH_TICK`], the step SIPp's own scheduler starts calls on):
/// the calls due within one step start together at its end.
pub async fn campanile_setup(uas: SocketAddr, rate: f64, calls: u64) -> anyhow::Result<SetupRun> {
    tokio::spawn(place_setup_calls(uas, rate, calls))
        .await
        .map_err(|e| anyhow::anyhow!("the call-setup task failed: {e}"))?
}

/// The call both of campanile's UACs place: to `uas`, no audio.
fn setup_spec(uas: SocketAddr) -> CallSpec {
    CallSpec {
        display_name: "bench".into(),
        ring_timeout: Duration::from_secs(10),
        listen_for_keys: true,
        ..CallSpec::plain("1000", uas, PreparedAudio::from_samples(Vec::new()))
    }
}

/// When the `i`th of the calls placed at `rate` from `start` is launched.
fn launch_at(start: Instant, rate: f64, i: u64) -> Instant {
    on_launch_tick(start, start + Duration::from_secs_f64(i as f64 / rate))
}

async fn place_setup_calls(uas: SocketAddr, rate: f64, calls: u64) -> anyhow::Result<SetupRun> {
    let (endpoint, _unrouted) = Endpoint::bind("127.0.0.1:0".parse()?).await?;
    let ctx = CallContext::new(endpoint);
    let spec = Arc::new(setup_spec(uas));
    let ok = Arc::new(AtomicU64::new(0));
    let (_abort_tx, abort_rx) = tokio::sync::watch::channel(false);
    let cpu0 = cpu_seconds(libc::RUSAGE_SELF);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..calls {
        let due = launch_at(start, rate, i);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let (ctx, spec, ok, abort) = (ctx.clone(), spec.clone(), ok.clone(), abort_rx.clone());
        tasks.spawn(async move {
            if place_call(&ctx, &spec, abort).await == CallOutcome::Heard {
                ok.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Calls that ended give their task back now, as a node's detached call tasks do; kept
        // to the end, every finished call's task would hold its memory for the whole run.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Ok(SetupRun {
        attempted: calls,
        succeeded: ok.load(Ordering::Relaxed),
        wall_s: start.elapsed().as_secs_f64(),
        cpu_s: cpu_seconds(libc::RUSAGE_SELF) - cpu0,
    })
}

/// How often [`one_loop_setup`] looks at its calls' transaction timers.
const SWEEP: Duration = Duration::from_millis(50);

/// One call of [`one_loop_setup`]: its INVITE transaction, then its BYE's; the RTP and RTCP
/// sockets it offered, held until it ends as a call holds them.
struct SketchCall {
    invite: ClientTransaction,
    /// Past this it is given up (failed), whatever it waits for: a call that rings and is never
    /// answered (the dialer would CANCEL it) must not keep the run going.
    give_up_at: Instant,
    bye: Option<ClientTransaction>,
    _media: Option<(RtpSocket, RtpSocket)>,
}

/// What a transaction has for its driver: its datagrams go into `sends`; returns its responses,
/// and whether it gave up waiting for one (Timer B or F).
fn take_outputs(tx: &mut ClientTransaction, sends: &mut Vec<Vec<u8>>) -> (Vec<Response>, bool) {
    let (mut responses, mut timed_out) = (Vec::new(), false);
    while let Some(out) = tx.poll_output() {
        match out {
            Output::Transmit(bytes) => sends.push(bytes),
            Output::Response(r) => responses.push(r),
            Output::TimedOut => timed_out = true,
            Output::Acked | Output::Terminated => {}
        }
    }
    (responses, timed_out)
}

/// Answers `invite`'s 2xx `answer` as the sketch does at once: its ACK, then the BYE that ends the
/// call (into `sends`); the BYE's transaction, or `None` when the answer cannot start a dialog
/// (no To tag or Contact, or a Contact that is no URI).
fn ack_and_bye(
    invite: &ClientTransaction,
    answer: &Response,
    (contact, local): (&str, SocketAddr),
    timers: Timers,
    now: Instant,
    sends: &mut Vec<Vec<u8>>,
) -> Option<ClientTransaction> {
    let mut dialog = Dialog::from_uac(invite.request(), answer, contact).ok()?;
    let ack = dialog.build(Method::Ack, local).ok()?;
    sends.push(message::request_bytes(&ack));
    let bye = dialog.build(Method::Bye, local).ok()?;
    let mut tx = ClientTransaction::new(bye, now, timers, false);
    take_outputs(&mut tx, sends);
    Some(tx)
}

/// The reference the call-setup target is measured against besides SIPp, in the same run: the
/// same calls as [`campanile_setup`] (the dialer's INVITE from [`first_invite`], with an RTP and
/// RTCP socket pair from the same port range; 200, ACK, BYE; no audio), built and read with the
/// dialer's own SIP parts ([`message::parse`], the RFC 3261 transaction and dialog machines), but
/// every call driven by one loop on one task and one socket, as SIPp's one loop drives its calls,
/// instead of a task per call fed by the endpoint through a channel. A sketch of the shape the
/// target needs, not the dialer: no media phase, challenge, redirect or CANCEL, and the calls'
/// timers swept every [`SWEEP`] instead of each set on tokio's wheel. A call counts when its BYE
/// is answered 2xx; one whose transaction times out (Timer B or F), or still not over after the
/// ring timeout and Timer F's 64·T1, fails, so the run always ends; so does one whose 2xx cannot
/// start a dialog (no To tag or Contact).
///
/// Without `media_sockets`, the calls offer the loop's own address for media and open no sockets
/// (what the pair costs; SIPp's UAC opens none).
pub async fn one_loop_setup(
    uas: SocketAddr,
    rate: f64,
    calls: u64,
    media_sockets: bool,
) -> anyhow::Result<SetupRun> {
    tokio::spawn(sketch_calls(uas, rate, calls, media_sockets))
        .await
        .map_err(|e| anyhow::anyhow!("the one-loop sketch failed: {e}"))?
}

async fn sketch_calls(
    uas: SocketAddr,
    rate: f64,
    calls: u64,
    media_sockets: bool,
) -> anyhow::Result<SetupRun> {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let local = socket.local_addr()?;
    let spec = setup_spec(uas);
    let contact = format!("sip:{}@{local}", spec.from_user);
    let (ports, timers) = (RtpPorts::default(), spec.timers);
    let mut live: HashMap<String, SketchCall> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    let mut sends = Vec::new();
    let (mut placed, mut ok) = (0u64, 0u64);
    let cpu0 = cpu_seconds(libc::RUSAGE_SELF);
    let start = Instant::now();
    let mut next_sweep = start + SWEEP;
    while placed < calls || !live.is_empty() {
        let now = Instant::now();
        while placed < calls && launch_at(start, rate, placed) <= now {
            placed += 1;
            let media = match media_sockets {
                true => Some(ports.bind_pair(local.ip())?),
                false => None,
            };
            let rtp = media.as_ref().map_or(local, |(rtp, _)| rtp.local_addr());
            let (parts, _, invite) = first_invite(&spec, local, contact.clone(), "UDP", rtp)
                .map_err(|why| anyhow::anyhow!(why))?;
            let mut tx = ClientTransaction::new(invite, now, timers, false);
            take_outputs(&mut tx, &mut sends);
            live.insert(
                parts.call_id,
                SketchCall {
                    invite: tx,
                    give_up_at: now + spec.ring_timeout + timers.t1 * 64,
                    bye: None,
                    _media: media,
                },
            );
        }
        if now >= next_sweep {
            next_sweep = now + SWEEP;
            live.retain(|_, c| {
                if now >= c.give_up_at {
                    return false;
                }
                let tx = c.bye.as_mut().unwrap_or(&mut c.invite);
                if tx.poll_timeout().is_some_and(|t| t <= now) {
                    tx.handle_timeout(now);
                }
                !take_outputs(tx, &mut sends).1
            });
        }
        for bytes in sends.drain(..) {
            socket.send_to(&bytes, uas).await?;
        }
        let wake = match placed < calls {
            true => launch_at(start, rate, placed).min(next_sweep),
            false => next_sweep,
        };
        let (n, _) = tokio::select! {
            got = socket.recv_from(&mut buf) => got?,
            _ = tokio::time::sleep_until(wake.into()) => continue,
        };
        let Ok(SipMessage::Response(resp)) = message::parse(&buf[..n]) else {
            continue;
        };
        let (Some(call_id), Some((_, method))) = (message::call_id(&resp), message::cseq(&resp))
        else {
            continue;
        };
        let Some(call) = live.get_mut(call_id) else {
            continue;
        };
        let call_id = call_id.to_string();
        let now = Instant::now();
        let ended = match (&mut call.bye, method) {
            (None, Method::Invite) => {
                call.invite.handle_response(resp, now);
                let (responses, timed_out) = take_outputs(&mut call.invite, &mut sends);
                let mut ended = timed_out;
                for r in responses {
                    match message::status(&r) {
                        100..=199 => {}
                        200..=299 => match ack_and_bye(
                            &call.invite,
                            &r,
                            (&contact, local),
                            timers,
                            now,
                            &mut sends,
                        ) {
                            Some(bye) => call.bye = Some(bye),
                            None => ended = true,
                        },
                        _ => ended = true,
                    }
                }
                ended
            }
            (Some(bye), Method::Bye) => {
                bye.handle_response(resp, now);
                let (responses, timed_out) = take_outputs(bye, &mut sends);
                let answered = responses.iter().any(|r| message::status(r) >= 200);
                if responses
                    .iter()
                    .any(|r| (200..300).contains(&message::status(r)))
                {
                    ok += 1;
                }
                answered || timed_out
            }
            // A 2xx retransmitted after our ACK, an answer to nothing we sent: nothing to do.
            _ => false,
        };
        if ended {
            live.remove(&call_id);
        }
    }
    for bytes in sends.drain(..) {
        socket.send_to(&bytes, uas).await?;
    }
    Ok(SetupRun {
        attempted: calls,
        succeeded: ok,
        wall_s: start.elapsed().as_secs_f64(),
        cpu_s: cpu_seconds(libc::RUSAGE_SELF) - cpu0,
    })
}

/// A `sipp -sn uas` on a free loopback port, killed on drop.
struct SippUas {
    child: std::process::Child,
    addr: SocketAddr,
}

impl SippUas {
    fn start() -> anyhow::Result<SippUas> {
        let port = StdUdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("sipp")
            .args(["-sn", "uas", "-i", "127.0.0.1", "-p", &port.to_string()])
            .args(["-nostdin", "-max_socket", "60000"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sipp (Debian package sip-tester)")?;
        let uas = SippUas {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        // Wait (bounded) until SIPp holds its port, read from /proc/net/udp.
        let needle = format!(":{port:04X} ");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string("/proc/net/udp")
            .unwrap_or_default()
            .contains(&needle)
        {
            if Instant::now() > deadline {
                bail!("sipp -sn uas did not bind 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(uas)
    }
}

impl Drop for SippUas {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sipp -sn uac` against `uas`: (successful calls, failed calls, wall seconds, CPU seconds).
fn sipp_setup(uas: SocketAddr, rate: f64, calls: u64) -> anyhow::Result<SetupRun> {
    let dir = tempfile_dir()?;
    let port = StdUdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    let cpu0 = cpu_seconds(libc::RUSAGE_CHILDREN);
    let start = Instant::now();
    let status = Command::new("sipp")
        .args(["-sn", "uac", &uas.to_string(), "-i", "127.0.0.1"])
        .args(["-p", &port.to_string()])
        .args([
            "-r",
            &format!("{rate}"),
            "-m",
            &calls.to_string(),
            "-d",
            "0",
        ])
        .args([
            "-nostdin",
            "-trace_stat",
            "-stf",
            "stats.csv",
            "-max_socket",
            "60000",
        ])
        .args(["-timeout", "120s", "-timeout_error"])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr"))?)
        .status()
        .context("running sipp -sn uac")?;
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    let wall_s = start.elapsed().as_secs_f64();
    let cpu_s = cpu_seconds(libc::RUSAGE_CHILDREN) - cpu0;
    let stats = std::fs::read_to_string(dir.join("stats.csv")).unwrap_or_default();
    let header = stats.lines().next().unwrap_or_default();
    let last = stats.lines().last().unwrap_or_default();
    let column = |name: &str| -> u64 {
        header
            .split(';')
            .position(|c| c == name)
            .and_then(|i| last.split(';').nth(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let succeeded = column("SuccessfulCall(C)");
    if succeeded == 0 && !status.success() {
        bail!("sipp -sn uac failed ({status}) with no successful call: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(SetupRun {
        attempted: calls,
        succeeded,
        wall_s,
        cpu_s,
    })
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "campanile-bench-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `campanile bench call-setup`: for each rate, SIPp's UAC and ours against a fresh `sipp -sn uas`.
pub async fn call_setup(rates: &[f64], secs: f64) -> anyhow::Result<()> {
    raise_fd_limit();
    println!("| rate offered (calls/s) | UAC | calls | failed | achieved calls/s | CPU s per 1,000 calls |");
    println!("|---:|---|---:|---:|---:|---:|");
    for &rate in rates {
        let calls = (rate * secs).round().max(1.0) as u64;
        let row = |who: &str, r: &SetupRun| {
            println!(
                "| {rate:.0} | {who} | {} | {} | {:.0} | {:.3} |",
                r.attempted,
                r.attempted - r.succeeded.min(r.attempted),
                r.succeeded as f64 / r.wall_s,
                r.cpu_s / (r.succeeded.max(1) as f64) * 1000.0
            )
        };
        let uas = SippUas::start()?;
        let addr = uas.addr;
        let sipp = tokio::task::spawn_blocking(move || sipp_setup(addr, rate, calls)).await??;
        drop(uas);
        row("sipp -sn uac", &sipp);
        let uas = SippUas::start()?;
        let ours = campanile_setup(uas.addr, rate, calls).await?;
        drop(uas);
        row("campanile", &ours);
        for (media_sockets, who) in [
            (true, "one-loop sketch (not the dialer)"),
            (false, "one-loop sketch, no RTP sockets"),
        ] {
            let uas = SippUas::start()?;
            let sketch = one_loop_setup(uas.addr, rate, calls, media_sockets).await?;
            drop(uas);
            row(who, &sketch);
        }
    }
    Ok(())
}

/// Log soak: commits `entries` small commands through a one-node store in `dir` (default: a
/// temporary directory) with the production compaction settings, printing the store's size on disk
/// as it goes: snapshots and purges must keep it bounded. The commands overwrite one node record,
/// so the state itself does not grow and what is measured is the log and the store.
pub async fn log_soak(
    entries: u64,
    dir: Option<std::path::PathBuf>,
    writers: usize,
) -> anyhow::Result<()> {
    use campanile_cluster::{Cluster, ClusterOptions, Command as RaftCommand, NodeId, NodeInfo};
    let tmp = tempfile::TempDir::new()?;
    let path = dir.unwrap_or_else(|| tmp.path().to_path_buf());
    let options = ClusterOptions::default();
    let cluster = Cluster::open_with(NodeId(1), &path, options).await?;
    println!(
        "log soak: {entries} entries, {writers} concurrent writers, snapshot every {} entries, {} kept behind; store at {}",
        options.snapshot_every,
        options.keep_behind_snapshot,
        path.display()
    );
    println!(
        "{:>12} {:>9} {:>10} {:>12} {:>12} {:>12}",
        "entries", "seconds", "entries/s", "disk MB", "snapshot", "purged"
    );
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (cluster, done) = (cluster.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = done.fetch_add(1, Ordering::Relaxed);
                if n >= entries {
                    return Ok::<(), anyhow::Error>(());
                }
                cluster
                    .write_here(RaftCommand::RegisterNode {
                        at_ms: n,
                        node: NodeInfo {
                            id: NodeId(1 + w as u64 % 3),
                            datacenter: "soak".into(),
                            raft_addr: "local".into(),
                            http_addr: "127.0.0.1:8080".into(),
                            registered_ms: n,
                            started_ms: n,
                        },
                    })
                    .await?;
            }
        }));
    }
    let report_every = (entries / 20).max(1);
    let mut next_report = report_every;
    let mut max_disk = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = cluster.status();
        let applied = status.applied_index;
        if applied >= next_report || tasks.iter().all(|t| t.is_finished()) {
            let disk = dir_size(&path);
            max_disk = max_disk.max(disk);
            println!(
                "{:>12} {:>9.1} {:>10.0} {:>12.1} {:>12} {:>12}",
                applied,
                t0.elapsed().as_secs_f64(),
                applied as f64 / t0.elapsed().as_secs_f64(),
                disk as f64 / 1e6,
                status.snapshot_index.unwrap_or(0),
                status.purged_index.unwrap_or(0)
            );
            next_report = applied + report_every;
        }
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "largest store seen: {:.1} MB after up to {entries} entries",
        max_disk as f64 / 1e6
    );
    cluster.shutdown().await?;
    Ok(())
}

/// Bytes of every file under `path`.
fn dir_size(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Resident memory now and its peak since the last reset, in bytes (Linux `/proc/self/status`).
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets the peak resident memory to the current one (Linux `clear_refs`, value 5).
fn reset_peak_rss() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
        .context("cannot reset the peak RSS (/proc/self/clear_refs)")
}

/// Snapshot memory: imports `subscribers` into a one-node store, then measures how much resident
/// memory a Raft snapshot (streamed to a file) and a backup (streamed to a file) add above the state
/// itself, against serialising the state into memory first, as snapshots were built before.
pub async fn snapshot_memory(subscribers: usize) -> anyhow::Result<()> {
    use campanile_cluster::{
        Cluster, ClusterOptions, Command as RaftCommand, NewSubscriber, NodeId, PhoneNumber,
    };
    let tmp = tempfile::TempDir::new()?;
    let options = ClusterOptions {
        // No snapshot while importing: the one measured is asked for below.
        snapshot_every: u64::MAX / 2,
        ..ClusterOptions::default()
    };
    let (rss0, _) = rss();
    let cluster = Cluster::open_with(NodeId(1), tmp.path(), options).await?;
    let t0 = Instant::now();
    for start in (0..subscribers).step_by(5_000) {
        let batch = (start..(start + 5_000).min(subscribers))
            .map(|i| {
                Ok(NewSubscriber {
                    tenant: campanile_cluster::default_tenant(),
                    phone: PhoneNumber::parse(&format!("+39347{i:07}"))?,
                    name: Some("Maria Rossi".into()),
                    language: "it".into(),
                    zone: Some("centro".into()),
                    verified: true,
                    consent: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        cluster
            .write_here(RaftCommand::CreateSubscribers {
                at_ms: start as u64,
                subscribers: batch,
            })
            .await?;
    }
    let count = cluster.read(|s| s.subscriber_count());
    let (state_rss, _) = rss();
    println!(
        "snapshot memory: {count} subscribers imported in {:.1} s; process RSS {:.0} MB (before opening the store: {:.0} MB)",
        t0.elapsed().as_secs_f64(),
        state_rss as f64 / 1e6,
        rss0 as f64 / 1e6
    );
    println!(
        "{:<44} {:>10} {:>14} {:>12}",
        "operation", "seconds", "peak +RSS MB", "output MB"
    );
    let row = |name: &str, secs: f64, before: u64, peak: u64, out: u64| {
        println!(
            "{name:<44} {secs:>10.2} {:>14.1} {:>12.1}",
            peak.saturating_sub(before) as f64 / 1e6,
            out as f64 / 1e6
        );
    };

    // Streamed Raft snapshot: state → file.
    let (before, _) = rss();
    reset_peak_rss()?;
    let t = Instant::now();
    cluster.snapshot_now().await?;
    let applied = cluster.status().applied_index;
    let deadline = Instant::now() + Duration::from_secs(600);
    while cluster.status().snapshot_index.unwrap_or(0) < applied {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the snapshot was not built in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let (_, peak) = rss();
    let snapshot_bytes = dir_size(&tmp.path().join("raft").join("snapshots"));
    row(
        "Raft snapshot, streamed to a file",
        secs,
        before,
        peak,
        snapshot_bytes,
    );

    // Streamed backup: state → file.
    let (before, _) = rss();
    reset_peak_rss()?;
    let t = Instant::now();
    let file = cluster.backup_to(tempfile::tempfile()?, |_, _| Vec::new())?;
    let secs = t.elapsed().as_secs_f64();
    let (_, peak) = rss();
    row(
        "backup, streamed to a file",
        secs,
        before,
        peak,
        file.metadata()?.len(),
    );
    drop(file);

    // The earlier way, for comparison: the whole state serialised into memory.
    let (before, _) = rss();
    reset_peak_rss()?;
    let t = Instant::now();
    let len = cluster.read(|s| serde_json::to_vec(s).map(|v| v.len()))?;
    let secs = t.elapsed().as_secs_f64();
    let (_, peak) = rss();
    row(
        "state serialised into memory (before)",
        secs,
        before,
        peak,
        len as u64,
    );

    // Loading the snapshot on restart: parsed from the file through a buffer. (Its memory is not
    // shown: the first store's freed memory stays with the allocator, so RSS cannot isolate it.)
    cluster.shutdown().await?;
    drop(cluster);
    let t = Instant::now();
    let cluster = Cluster::open_with(NodeId(1), tmp.path(), options).await?;
    let reopened = cluster.read(|s| s.subscriber_count());
    println!(
        "restart: snapshot file parsed into {reopened} subscribers in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    anyhow::ensure!(
        reopened == count,
        "reopened with {reopened} subscribers, not {count}"
    );
    cluster.shutdown().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-loop sketch places real calls: against `sipp -sn uas` every one is set up, ACKed
    /// and ended with a BYE that SIPp answers (a call counts only then), and the run ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_one_loop_sketch_completes_its_calls_against_sipp() {
        let uas = SippUas::start().expect("sipp (Debian package sip-tester) runs");
        let run = one_loop_setup(uas.addr, 200.0, 60, true).await.unwrap();
        assert_eq!((run.attempted, run.succeeded), (60, 60), "{run:?}");
    }

    /// `--share-sockets`: every stream's packets arrive, and from the shared sockets only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_sockets_carry_every_stream() {
        let (sinks, addrs) = sinks(6).unwrap();
        for s in &sinks {
            s.set_nonblocking(true).unwrap();
        }
        let row = pacer_run(&addrs, 1.0, 1, SendPath::IoUring, None, Some(2))
            .await
            .unwrap();
        assert!(row.packets_per_s > 200.0, "{row:?}");
        let mut sources = std::collections::HashSet::new();
        let mut buf = [0u8; 2048];
        for s in &sinks {
            let mut got = 0;
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                assert_eq!(n, DATAGRAM);
                sources.insert(from);
                got += 1;
            }
            assert!(got > 0, "a stream's sink got nothing");
        }
        assert_eq!(sources.len(), 2, "sent from {sources:?}");
    }
}
