//! The UDP sockets of calls' RTP (and RTCP), and the system calls that send from them.
//!
//! A call's socket is sent from by the pacer thread and read by the call's task, which looks at it
//! every [`READ_INTERVAL`] and reads what has queued; the socket is not registered with tokio's
//! reactor at all. Registered, each datagram the callee sends (50 a second) would wake the reactor
//! and the call's task, and each one we send would wake the reactor's epoll too: on Linux a UDP
//! socket that sends frees buffer space and wakes whoever waits on it (`sock_def_write_space`),
//! whatever they wait for. `campanile bench media --answer` measured what that costs: a call's
//! media, both ways, took a median 368 µs of CPU a second read through the reactor, 284 read this
//! way (1,000–3,000 calls; BENCHMARKS.md).
//!
//! The pacer sends a phase's datagrams together through a [`BatchSender`]. Every datagram leaves from
//! its own call's socket (symmetric RTP, RFC 4961: the callee sends its keys back to the port in our
//! SDP), so `sendmmsg`, which batches datagrams of one socket, does not apply; io_uring does: one
//! `io_uring_enter` submits up to [`URING_BATCH`] `sendmsg`s from as many sockets. Where io_uring is
//! missing (kernels before 5.6, a seccomp profile that forbids it, `kernel.io_uring_disabled`) the
//! sender falls back to one non-blocking `sendto` per datagram, and says so.
//!
//! A call connects its socket to the callee's media address ([`RtpSocket::connect`]): the kernel
//! then hears only the callee, and a datagram for that address leaves without naming it, which
//! spares a route lookup per packet.
//!
//! A third path, [`SendPath::Raw`], chosen by the SRE (it needs `CAP_NET_RAW`), writes each
//! datagram's IPv4 and UDP headers itself, with its call's socket's address and port as the
//! source, and sends a whole phase through one raw socket (`IPPROTO_RAW`, send-only) with
//! `sendmmsg`. On the wire nothing changes: the callee sees the datagram come from the port in our
//! SDP and answers there, where the call's socket reads it. What changes is the sender's cost: one
//! hot socket instead of thousands of cold ones, and a system call per batch instead of per
//! datagram (BENCHMARKS.md). IPv6 calls, calls whose socket has no specific local address yet, and
//! short streams send as the fallback does, one `sendto` each.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

/// How often a call looks at its [`RtpSocket`] and reads what has queued (`media::listen`). A callee
/// sends a datagram every 20 ms, so a look finds about five and a call's task wakes ten times a
/// second instead of fifty; a key or an answering machine's beep is noticed at most this much
/// later, which nobody on a phone can tell.
pub const READ_INTERVAL: Duration = Duration::from_millis(100);

pub struct RtpSocket {
    fd: UdpSocket,
    /// The address it is bound to (a call binds a named port, so this is known without asking).
    local: SocketAddr,
    /// Where the socket is connected, if it is: it then receives datagrams from there only, and
    /// datagrams sent without an address go there.
    peer: Mutex<Option<SocketAddr>>,
}

impl RtpSocket {
    /// Binds `addr`, non-blocking from the start (a call binds two of these: the system calls
    /// `UdpSocket::bind` and `set_nonblocking` would add, and asking for the address it has, are
    /// spared per call).
    pub fn bind(addr: SocketAddr) -> io::Result<RtpSocket> {
        let family = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // SAFETY: socket() takes no pointers.
        let raw = unsafe {
            libc::socket(
                family,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor just opened that nothing else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        // SAFETY: sockaddr_in6 is plain data for which all-zero bytes are valid.
        let mut name: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let len = write_sockaddr(addr, &mut name);
        // SAFETY: `name` is valid for `len` bytes; the descriptor is ours (closed on error by drop).
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &name as *const libc::sockaddr_in6 as *const libc::sockaddr,
                len,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = UdpSocket::from(fd);
        let local = if addr.port() == 0 {
            fd.local_addr()?
        } else {
            addr
        };
        Ok(RtpSocket {
            fd,
            local,
            peer: Mutex::new(None),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Receives the first datagram queued, or `WouldBlock` at once when there is none.
    pub fn try_recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.fd.recv_from(buf)
    }

    /// Connects the socket to `to` (the callee's media address): the kernel then drops datagrams
    /// from anyone else, reports ICMP errors for `to` (as `ECONNREFUSED` on the next receive or
    /// send), and the pacer sends without naming the address. Connecting again moves it.
    pub fn connect(&self, to: SocketAddr) -> io::Result<()> {
        let mut peer = self.peer.lock().unwrap_or_else(|e| e.into_inner());
        if *peer == Some(to) {
            return Ok(());
        }
        let result = self.fd.connect(to);
        if result.is_err() {
            // A failed connect leaves the old connection in place, which would keep the new
            // address out: dissolve it, so the socket hears everyone (the caller filters).
            self.disconnect();
        }
        *peer = result.as_ref().ok().map(|_| to);
        result
    }

    /// Dissolves the connection (`connect` to `AF_UNSPEC`, POSIX's way for datagram sockets).
    fn disconnect(&self) {
        // SAFETY: sockaddr is plain data for which all-zero bytes are valid; only the family is
        // read for AF_UNSPEC.
        let mut unspec: libc::sockaddr = unsafe { std::mem::zeroed() };
        unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        // SAFETY: the address is valid for the length given; the descriptor is ours.
        unsafe {
            libc::connect(
                self.raw_fd(),
                &unspec,
                std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
            )
        };
    }

    /// Where the socket is connected, if it is.
    pub fn peer(&self) -> Option<SocketAddr> {
        *self.peer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Where datagrams from this socket leave from in an [`Outbox`] (not registered with a sender).
    pub fn source(&self) -> Source {
        Source {
            fd: self.raw_fd(),
            slot: None,
            raw_from: None,
        }
    }

    /// The IPv4 address and port a raw-sent datagram names as its source: the socket's own, when
    /// it is specific (bound to one address, or connected, which picks one). `None` for IPv6 and
    /// for a socket bound to the wildcard address and not connected.
    fn raw_source(&self) -> Option<SocketAddrV4> {
        match self.fd.local_addr() {
            Ok(SocketAddr::V4(a)) if !a.ip().is_unspecified() => Some(a),
            _ => None,
        }
    }
}

/// A socket as an [`Outbox`] names it: its descriptor, and its slot in the sender's registered
/// files when it has one. Copied into the outbox per datagram, so that queueing a packet touches
/// neither the socket nor a reference count; made only from an [`RtpSocket`], which must stay open
/// until the outbox is sent or cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    fd: RawFd,
    slot: Option<Slot>,
    /// With a [`SendPath::Raw`] sender: the socket's address, which its datagrams name as their
    /// source in the headers we write.
    raw_from: Option<SocketAddrV4>,
}

impl Source {
    /// Whether datagrams from this source go through the raw socket (when they are IPv4).
    pub fn is_raw(&self) -> bool {
        self.raw_from.is_some()
    }

    /// Reads the socket's address again after it was connected elsewhere (a raw source only):
    /// connecting can change the local address the kernel picked.
    pub fn follow(&mut self, socket: &RtpSocket) {
        if self.raw_from.is_some() {
            self.raw_from = socket.raw_source();
        }
    }
}

/// Datagrams queued for one batched send, each with the socket it leaves from. Buffers are kept and
/// reused from one batch to the next.
///
/// The outbox holds descriptors, not the sockets: whoever queues a datagram keeps its socket open
/// until the outbox is sent or cleared (the pacer drops a stream only after its phase was sent).
#[derive(Default)]
pub struct Outbox {
    bufs: Vec<Vec<u8>>,
    sources: Vec<Source>,
    /// `None`: where the socket is connected.
    dests: Vec<Option<SocketAddr>>,
}

/// A socket's place in a [`BatchSender`]'s table of registered files: io_uring then skips looking
/// the descriptor up (and counting a reference to it) for every datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(u32);

impl Outbox {
    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Queues a datagram that `write` fills in, to be sent from `from` to `dest` (`None`: where
    /// `from` is connected); returns its index. `from`'s socket must stay open until the outbox is
    /// sent or cleared. A raw source's datagram to an IPv4 `dest` gets its IPv4 and UDP headers
    /// here; to anywhere else it leaves from the socket itself.
    pub fn push(
        &mut self,
        mut from: Source,
        dest: Option<SocketAddr>,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> usize {
        let i = self.sources.len();
        if self.bufs.len() == i {
            self.bufs.push(Vec::with_capacity(256));
        }
        let buf = &mut self.bufs[i];
        buf.clear();
        match (from.raw_from, dest) {
            (Some(src), Some(SocketAddr::V4(dst))) => {
                buf.resize(RAW_HEADERS, 0);
                write(buf);
                write_ipv4_udp_headers(src, dst, buf);
            }
            _ => {
                from.raw_from = None;
                write(buf);
            }
        }
        self.sources.push(from);
        self.dests.push(dest);
        i
    }

    /// Forgets the queued datagrams; keeps the buffers.
    pub fn clear(&mut self) {
        self.sources.clear();
        self.dests.clear();
    }

    /// Sends datagram `i` with one `sendto` from its own socket; false if the kernel refused it.
    fn send_alone(&self, i: usize) -> bool {
        send_to(self.sources[i].fd, &self.bufs[i], self.dests[i]).is_ok()
    }

    /// The bytes of datagram `i` (its UDP payload).
    pub fn datagram(&self, i: usize) -> &[u8] {
        let skip = if self.sources[i].is_raw() {
            RAW_HEADERS
        } else {
            0
        };
        &self.bufs[i][skip..]
    }
}

/// Bytes of the IPv4 header (no options) and the UDP header that a raw datagram carries.
const RAW_HEADERS: usize = 20 + 8;

/// Fills the first [`RAW_HEADERS`] bytes of `buf` (the UDP payload follows them) with the IPv4 and
/// UDP headers of a datagram from `src` to `dst`, as a UDP socket's would be: don't-fragment set
/// (small datagrams, path MTU discovery's default), TTL 64. The kernel fills in the IP header's
/// total length, identification and checksum (raw(7)); the UDP checksum is ours (RFC 768).
fn write_ipv4_udp_headers(src: SocketAddrV4, dst: SocketAddrV4, buf: &mut [u8]) {
    let udp_len = (buf.len() - 20) as u16;
    let (ip, udp) = buf.split_at_mut(20);
    ip[..12].copy_from_slice(&[
        0x45,
        0,
        0,
        0,
        0,
        0,
        0x40,
        0,
        64,
        libc::IPPROTO_UDP as u8,
        0,
        0,
    ]);
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    udp[0..2].copy_from_slice(&src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    let sum = udp_checksum(*src.ip(), *dst.ip(), udp);
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
}

/// The UDP checksum over the IPv4 pseudo-header and `udp` (header with a zero checksum, then the
/// payload): the ones' complement of the ones' complement sum of 16-bit words; a result of 0 is
/// sent as 0xFFFF (0 means "no checksum", RFC 768).
fn udp_checksum(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, udp: &[u8]) -> u16 {
    let pseudo = u64::from(u16::from_be_bytes([0, libc::IPPROTO_UDP as u8]))
        + udp.len() as u64
        + u64::from(u16::from_be(ones_sum(&src.octets())))
        + u64::from(u16::from_be(ones_sum(&dst.octets())));
    let sum = fold(pseudo + u64::from(u16::from_be(ones_sum(udp))));
    match !sum {
        0 => 0xFFFF,
        c => c,
    }
}

/// The ones' complement sum of `bytes` as 16-bit words in the machine's byte order (RFC 1071:
/// the sum is independent of byte order up to a final swap, so it can take 8 bytes at a time;
/// a datagram's worth per packet, hence the care).
fn ones_sum(bytes: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut add = |v: u64| {
        let (s, carry) = acc.overflowing_add(v);
        acc = s + u64::from(carry);
    };
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        add(u64::from_ne_bytes(w));
    }
    let mut words = chunks.remainder().chunks_exact(2);
    for w in &mut words {
        add(u64::from(u16::from_ne_bytes([w[0], w[1]])));
    }
    if let [last] = words.remainder() {
        // The odd byte is the high half of a last word padded with zero (in network order).
        add(u64::from(u16::from_ne_bytes([*last, 0])));
    }
    fold(acc)
}

/// Folds a 64-bit ones' complement sum to 16 bits.
fn fold(mut sum: u64) -> u16 {
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum as u16
}

/// How the pacer sends: batched through io_uring when the kernel lets it, else one `sendto` each;
/// or, where the node may open a raw socket, with the headers written by us and `sendmmsg`.
/// In the config (`media.pacer_send`): `"io_uring"`, `"sendto"` or `"raw"`. Ordered from the
/// fallback up: a sender that cannot set up its path takes the next one down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SendPath {
    Sendto,
    IoUring,
    Raw,
}

impl std::fmt::Display for SendPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendPath::IoUring => {
                write!(f, "io_uring, up to {URING_BATCH} datagrams per system call")
            }
            SendPath::Sendto => f.write_str("one sendto per datagram"),
            SendPath::Raw => write!(
                f,
                "a raw IPv4 socket, up to {RAW_BATCH} datagrams per sendmmsg, each from its call's port"
            ),
        }
    }
}

/// Read from the config as its name ([`SendPath::from_str`]'s spelling, and its error).
impl<'de> serde::Deserialize<'de> for SendPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SendPath, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for SendPath {
    type Err = String;

    /// The config's spelling: `io_uring`, `sendto` or `raw`.
    fn from_str(s: &str) -> Result<SendPath, String> {
        match s {
            "io_uring" => Ok(SendPath::IoUring),
            "sendto" => Ok(SendPath::Sendto),
            "raw" => Ok(SendPath::Raw),
            other => Err(format!(
                "unknown send path {other:?}: expected io_uring, sendto or raw"
            )),
        }
    }
}

/// Most `sendmsg`s submitted with one `io_uring_enter` (and the ring's size).
pub const URING_BATCH: usize = 256;

/// Sends an [`Outbox`]'s datagrams. Must be made and used on one thread (the ring is created for
/// a single issuer).
pub struct BatchSender {
    uring: Option<Uring>,
    raw: Option<RawSender>,
}

impl BatchSender {
    /// A sender on `wanted`'s path; a path that cannot be set up falls back to the next one down
    /// (raw to io_uring, io_uring to `sendto`), with the reason.
    pub fn new(wanted: SendPath) -> (BatchSender, Option<io::Error>) {
        let mut why = None;
        if wanted == SendPath::Raw {
            match RawSender::new() {
                Ok(raw) => {
                    let sender = BatchSender {
                        uring: None,
                        raw: Some(raw),
                    };
                    return (sender, None);
                }
                Err(e) => why = Some(e),
            }
        }
        if wanted >= SendPath::IoUring {
            match Uring::new() {
                Ok(u) => {
                    let sender = BatchSender {
                        uring: Some(u),
                        raw: None,
                    };
                    return (sender, why);
                }
                Err(e) => why = why.or(Some(e)),
            }
        }
        let sender = BatchSender {
            uring: None,
            raw: None,
        };
        (sender, why)
    }

    /// Registers `socket` with the ring, so that its datagrams skip the descriptor lookup: the
    /// returned source names its slot, or only its descriptor when there is no ring, no table, or
    /// no free slot. The registration keeps the socket open until [`BatchSender::unregister`].
    /// With a raw socket, the returned source names the socket's address instead, when it has a
    /// specific IPv4 one (nothing to register).
    pub fn register(&mut self, socket: &RtpSocket) -> Source {
        let fd = socket.raw_fd();
        Source {
            fd,
            slot: self.uring.as_mut().and_then(|u| u.register(fd)),
            raw_from: self.raw.as_ref().and_then(|_| socket.raw_source()),
        }
    }

    /// Frees `source`'s slot, if it has one (the socket closes if nothing else holds it).
    pub fn unregister(&mut self, source: Source) {
        if let (Some(u), Some(slot)) = (self.uring.as_mut(), source.slot) {
            u.unregister(slot);
        }
    }

    /// What the ring uses, for the log: "IORING_OP_SEND with addresses, registered files".
    pub fn details(&self) -> String {
        if self.raw.is_some() {
            return "sendmmsg on an IPPROTO_RAW socket".into();
        }
        match &self.uring {
            None => "sendto".into(),
            Some(u) => format!(
                "{}, {}",
                if u.send_to {
                    "IORING_OP_SEND with addresses"
                } else {
                    "IORING_OP_SENDMSG"
                },
                if u.files.is_some() {
                    "registered files"
                } else {
                    "descriptors"
                }
            ),
        }
    }

    pub fn path(&self) -> SendPath {
        if self.raw.is_some() {
            SendPath::Raw
        } else if self.uring.is_some() {
            SendPath::IoUring
        } else {
            SendPath::Sendto
        }
    }

    /// Sends every queued datagram once, calling `sent(range, now)` as each part of the outbox has
    /// left. A datagram the kernel refuses (full buffer, ICMP error) is dropped: streams keep their
    /// timing. Returns how many were refused.
    pub fn send(&mut self, out: &Outbox, mut sent: impl FnMut(Range<usize>, Instant)) -> usize {
        if let Some(raw) = self.raw.as_mut() {
            return raw.send(out, sent);
        }
        let mut start = 0;
        let mut refused = 0;
        while start < out.len() {
            let Some(uring) = self.uring.as_mut() else {
                break;
            };
            let end = (start + URING_BATCH).min(out.len());
            match uring.send(out, start..end) {
                Ok(n) => refused += n,
                Err(e) => {
                    // Which of this part's datagrams left is unknown: they count as dropped rather
                    // than risk sending one twice. The ring may still hold their addresses, so it
                    // is never touched or freed again.
                    refused += end - start;
                    tracing::warn!(
                        error = %e,
                        "io_uring send failed: this RTP pacer thread now sends with sendto"
                    );
                    if let Some(u) = self.uring.take() {
                        std::mem::forget(u);
                    }
                }
            }
            sent(start..end, Instant::now());
            start = end;
        }
        for i in start..out.len() {
            refused += usize::from(!out.send_alone(i));
            sent(i..i + 1, Instant::now());
        }
        refused
    }
}

/// Most datagrams one `sendmmsg` on the raw socket carries.
pub const RAW_BATCH: usize = 256;

/// How long the raw sender waits, at most once a phase, for room in its socket's buffer before it
/// drops datagrams: the one socket carries all of its thread's streams, so a full buffer is a slow
/// link draining, not one callee.
const RAW_FULL_WAIT: Duration = Duration::from_millis(2);

/// A send-only raw IPv4 socket (`IPPROTO_RAW`: we write the IP header, and it receives nothing)
/// and the arguments of one `sendmmsg`.
struct RawSender {
    fd: std::os::fd::OwnedFd,
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in6>,
}

impl RawSender {
    fn new() -> io::Result<RawSender> {
        // SAFETY: a plain system call; the descriptor is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot open a raw socket (it needs CAP_NET_RAW): {e}"),
            ));
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // One socket carries every stream of the thread: a phase's batch (hundreds of datagrams
        // while a slow link drains) must fit in its send buffer, as it did in the streams' own.
        // Past `net.core.wmem_max` only with CAP_NET_ADMIN; otherwise as much as that allows
        // (and a full buffer makes the sender wait for room, see `RAW_FULL_WAIT`).
        let want: libc::c_int = 8 << 20;
        for opt in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
            // SAFETY: the option value is a c_int that outlives the call.
            let set = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    &want as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if set == 0 {
                break;
            }
        }
        // SAFETY: mmsghdr, iovec and sockaddr_in6 are plain C structs for which all-zero bytes
        // are valid.
        Ok(RawSender {
            fd,
            headers: vec![unsafe { std::mem::zeroed() }; RAW_BATCH],
            iovecs: vec![unsafe { std::mem::zeroed() }; RAW_BATCH],
            addrs: vec![unsafe { std::mem::zeroed() }; RAW_BATCH],
        })
    }

    /// Sends the outbox in order: runs of raw datagrams with `sendmmsg` (up to [`RAW_BATCH`] a
    /// call), the others with one `sendto` each. A datagram the kernel refuses is dropped and
    /// counted, and the batch goes on after it.
    fn send(&mut self, out: &Outbox, mut sent: impl FnMut(Range<usize>, Instant)) -> usize {
        let mut refused = 0;
        // At most one wait for room per outbox (one phase): a buffer that stays full drops
        // datagrams rather than hold every stream of the thread back.
        let mut waited = false;
        let mut i = 0;
        while i < out.len() {
            if !out.sources[i].is_raw() {
                refused += usize::from(!out.send_alone(i));
                sent(i..i + 1, Instant::now());
                i += 1;
                continue;
            }
            let mut end = i;
            while end < out.len() && end - i < RAW_BATCH && out.sources[end].is_raw() {
                end += 1;
            }
            let mut start = i;
            while start < end {
                match self.send_batch(out, start..end) {
                    Ok(n) => start += n,
                    // The socket's buffer is full (the NIC drains it more slowly than a phase
                    // fills it): wait a moment for room, once, rather than drop the datagram.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && !waited => {
                        self.wait_writable(RAW_FULL_WAIT);
                        waited = true;
                    }
                    Err(_) => {
                        // The first of them was refused (still no room, no route, a firewall).
                        refused += 1;
                        start += 1;
                    }
                }
            }
            sent(i..end, Instant::now());
            i = end;
        }
        refused
    }

    /// Waits until the socket has room to send, at most `limit`.
    fn wait_writable(&self, limit: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as libc::c_int) };
    }

    /// One `sendmmsg` of `range` (raw datagrams, at most [`RAW_BATCH`]): how many left, at least
    /// one, or the error that refused the first.
    fn send_batch(&mut self, out: &Outbox, range: Range<usize>) -> io::Result<usize> {
        let n = range.len();
        for (j, i) in range.enumerate() {
            let len = match out.dests[i] {
                Some(dest) => write_sockaddr(dest, &mut self.addrs[j]),
                None => 0,
            };
            point_msghdr(
                &mut self.headers[j].msg_hdr,
                &mut self.iovecs[j],
                &out.bufs[i],
                &mut self.addrs[j] as *mut libc::sockaddr_in6 as *mut libc::c_void,
                len,
            );
        }
        loop {
            // SAFETY: the first `n` headers point at iovecs, addresses and buffers that live
            // until the call returns (`out` is borrowed for it, our arrays are never resized).
            let sent = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    self.headers.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if sent > 0 {
                return Ok(sent as usize);
            }
            let e = io::Error::last_os_error();
            if sent == 0 || e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }
}

/// An io_uring and the arguments of one submission, which the kernel reads until each send
/// completes.
struct Uring {
    ring: IoUring,
    /// `IORING_OP_SEND` with a destination (kernel 6.0+) instead of `IORING_OP_SENDMSG`: the kernel
    /// then copies an address, not a `msghdr` and its iovec, per datagram.
    send_to: bool,
    files: Option<FileTable>,
    headers: Vec<libc::msghdr>,
    iovecs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_in6>,
}

/// The ring's registered files: which slots are free.
struct FileTable {
    free: Vec<u32>,
}

/// Most files a pacer thread registers (its streams' RTP and RTCP sockets); past that, or past the
/// process's open-file limit, datagrams name their descriptor.
const MAX_REGISTERED: u64 = 32_768;

impl Uring {
    fn new() -> io::Result<Uring> {
        let entries = URING_BATCH as u32;
        // One thread submits and reaps; completions are only wanted when it asks (kernel 6.1+).
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::SendMsg::CODE) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this kernel's io_uring has no sendmsg",
            ));
        }
        // SAFETY (for the zeroed values): msghdr, iovec and sockaddr_in6 are plain C structs for
        // which all-zero bytes are valid.
        let mut uring = Uring {
            ring,
            send_to: false,
            files: None,
            headers: vec![unsafe { std::mem::zeroed() }; URING_BATCH],
            iovecs: vec![unsafe { std::mem::zeroed() }; URING_BATCH],
            addrs: vec![unsafe { std::mem::zeroed() }; URING_BATCH],
        };
        uring.send_to = uring.sends_with_address()?;
        let limit = open_file_limit().min(MAX_REGISTERED) as u32;
        // Sparse tables need kernel 5.19; without one every datagram names its descriptor.
        if limit > 0 && uring.ring.submitter().register_files_sparse(limit).is_ok() {
            uring.files = Some(FileTable {
                free: (0..limit).rev().collect(),
            });
        }
        Ok(uring)
    }

    /// Whether `IORING_OP_SEND` honours a destination address here: one datagram to ourselves on
    /// loopback tells (older kernels ignore the address or refuse the request). An error means the
    /// ring itself failed and must not be used.
    fn sends_with_address(&mut self) -> io::Result<bool> {
        let Ok(probe) = UdpSocket::bind("127.0.0.1:0") else {
            return Ok(false);
        };
        let me = probe.local_addr()?;
        let len = write_sockaddr(me, &mut self.addrs[0]);
        let byte = [0u8; 1];
        let sqe = opcode::Send::new(types::Fd(probe.as_raw_fd()), byte.as_ptr(), 1)
            .dest_addr(&self.addrs[0] as *const libc::sockaddr_in6 as *const libc::sockaddr)
            .dest_addr_len(len)
            .flags(libc::MSG_DONTWAIT)
            .build();
        // SAFETY: the byte, the address and the socket outlive the wait below, which reaps the
        // only request in the ring; if the wait fails, the caller drops the ring unused, which
        // closes it before anything could submit the request again.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            return Ok(false);
        }
        self.ring.submit_and_wait(1)?;
        let sent = self
            .ring
            .completion()
            .next()
            .is_some_and(|c| c.result() == 1);
        let mut buf = [0u8; 4];
        Ok(sent
            && probe.set_nonblocking(true).is_ok()
            && probe.recv(&mut buf).is_ok_and(|n| n == 1))
    }

    fn register(&mut self, fd: RawFd) -> Option<Slot> {
        let table = self.files.as_mut()?;
        let slot = table.free.pop()?;
        match self.ring.submitter().register_files_update(slot, &[fd]) {
            Ok(1) => Some(Slot(slot)),
            _ => {
                table.free.push(slot);
                None
            }
        }
    }

    fn unregister(&mut self, slot: Slot) {
        let Some(table) = self.files.as_mut() else {
            return;
        };
        // A slot that cannot be emptied is not reused (it keeps its socket open: logged).
        match self.ring.submitter().register_files_update(slot.0, &[-1]) {
            Ok(_) => table.free.push(slot.0),
            Err(e) => {
                tracing::warn!(error = %e, slot = slot.0, "cannot unregister an RTP socket from io_uring")
            }
        }
    }

    /// Submits `range` (at most `URING_BATCH` datagrams) and waits until every one has completed.
    /// Returns how many the kernel refused. An error means the ring itself failed; then which
    /// datagrams left, and what the ring still reads, is unknown.
    fn send(&mut self, out: &Outbox, range: Range<usize>) -> io::Result<usize> {
        let n = range.len();
        debug_assert!(n <= URING_BATCH);
        for (j, i) in range.enumerate() {
            // A connected socket's datagram names no address (null, length 0).
            let (addr, addr_len) = match out.dests[i] {
                Some(dest) => (
                    &self.addrs[j] as *const libc::sockaddr_in6,
                    write_sockaddr(dest, &mut self.addrs[j]),
                ),
                None => (std::ptr::null(), 0),
            };
            let buf = &out.bufs[i];
            // MSG_DONTWAIT: a full socket buffer completes with EAGAIN at once (the frame is
            // dropped, as with a non-blocking sendto) instead of waiting in the ring for space.
            let sqe = if self.send_to {
                let (ptr, len) = (buf.as_ptr(), buf.len() as u32);
                match out.sources[i].slot {
                    Some(Slot(k)) => opcode::Send::new(types::Fixed(k), ptr, len),
                    None => opcode::Send::new(types::Fd(out.sources[i].fd), ptr, len),
                }
                .dest_addr(addr as *const libc::sockaddr)
                .dest_addr_len(addr_len)
                .flags(libc::MSG_DONTWAIT)
                .build()
            } else {
                let h = &mut self.headers[j];
                point_msghdr(
                    h,
                    &mut self.iovecs[j],
                    buf,
                    addr as *mut libc::c_void,
                    addr_len,
                );
                match out.sources[i].slot {
                    Some(Slot(k)) => opcode::SendMsg::new(types::Fixed(k), h),
                    None => opcode::SendMsg::new(types::Fd(out.sources[i].fd), h),
                }
                .flags(libc::MSG_DONTWAIT as u32)
                .build()
            };
            // SAFETY: the header, its iovec, address and buffer stay alive and unmoved until the
            // completion is reaped below (`out` is borrowed for the whole call, our arrays are
            // never resized), the socket is kept open by whoever queued it (see `Outbox`), and
            // the queue has room: it holds URING_BATCH entries and is empty between calls.
            if unsafe { self.ring.submission().push(&sqe.user_data(j as u64)) }.is_err() {
                return Err(io::Error::other("io_uring submission queue full"));
            }
        }
        let mut done = 0;
        let mut refused = 0;
        let mut busy = 0;
        while done < n {
            match self.ring.submit_and_wait(n - done) {
                Ok(_) => {}
                // Interrupted before anything was taken: ask again.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The kernel wants completions reaped first (reaping below does it), or is short
                // of memory for a moment; not for ever.
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN))
                        && busy < 1000 =>
                {
                    busy += 1;
                }
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                done += 1;
                if cqe.result() < 0 {
                    refused += 1;
                }
            }
        }
        Ok(refused)
    }
}

/// Points `h` at one datagram, `buf` (through `iov`), sent to `name` (null with length 0: where
/// the socket is connected). The pointers must stay valid until the kernel has read them.
fn point_msghdr(
    h: &mut libc::msghdr,
    iov: &mut libc::iovec,
    buf: &[u8],
    name: *mut libc::c_void,
    name_len: libc::socklen_t,
) {
    *iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    h.msg_name = name;
    h.msg_namelen = name_len;
    h.msg_iov = iov;
    h.msg_iovlen = 1;
    h.msg_control = std::ptr::null_mut();
    h.msg_controllen = 0;
    h.msg_flags = 0;
}

/// Whether `e` is how a connected UDP socket reports an ICMP error for an earlier datagram (port
/// or host unreachable, and the like): once per error, nothing wrong with the socket itself.
pub fn is_icmp_report(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EMSGSIZE
        )
    )
}

/// One non-blocking `sendto` from `fd` to `to` (`None`: where `fd` is connected); a full buffer
/// refuses the datagram rather than wait.
fn send_to(fd: RawFd, buf: &[u8], to: Option<SocketAddr>) -> io::Result<usize> {
    // SAFETY: sockaddr_in6 is plain data for which all-zero bytes are valid.
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    let (name, len) = match to {
        Some(to) => {
            let len = write_sockaddr(to, &mut addr);
            (
                &addr as *const libc::sockaddr_in6 as *const libc::sockaddr,
                len,
            )
        }
        None => (std::ptr::null(), 0),
    };
    // SAFETY: `buf` and `addr` are valid for the lengths given and outlive the call.
    let n = unsafe {
        libc::sendto(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
            name,
            len,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The soft limit on open files (registered files count against it).
fn open_file_limit() -> u64 {
    // SAFETY: getrlimit only writes the struct we pass.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid, exclusively borrowed rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur
}

/// Writes `addr` as a C socket address into `out`; returns its length.
fn write_sockaddr(addr: SocketAddr, out: &mut libc::sockaddr_in6) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_in is smaller than sockaddr_in6 and has no stricter alignment.
            let v4 = unsafe { &mut *(out as *mut libc::sockaddr_in6 as *mut libc::sockaddr_in) };
            v4.sin_family = libc::AF_INET as libc::sa_family_t;
            v4.sin_port = a.port().to_be();
            v4.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            v4.sin_zero = [0; 8];
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            out.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            out.sin6_port = a.port().to_be();
            out.sin6_flowinfo = a.flowinfo();
            out.sin6_addr.s6_addr = a.ip().octets();
            out.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    /// `count` datagrams from `senders` sockets round-robin to `receivers` sockets, each datagram
    /// naming its index; every one must arrive exactly once from the socket it was queued on.
    async fn every_datagram_arrives_once_from_its_socket(path: SendPath, sendmsg: bool) {
        let senders: Vec<_> = (0..40)
            .map(|_| Arc::new(RtpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap()))
            .collect();
        let mut receivers = Vec::new();
        for _ in 0..8 {
            receivers.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        }
        let (mut sender, why) = BatchSender::new(path);
        if sendmsg {
            if let Some(u) = sender.uring.as_mut() {
                u.send_to = false;
            }
        }
        if path == SendPath::IoUring && sender.path() != SendPath::IoUring {
            // The fallback is what runs here; it is tested below as well.
            eprintln!("io_uring unavailable here ({why:?}); testing the sendto path");
        }
        expect_raw_where_allowed(path, sender.path(), &why);
        // More than one ring's worth, so a batch is split.
        let count = URING_BATCH + URING_BATCH / 2 + 3;
        let mut out = Outbox::default();
        // Registered sockets go through the ring's file table; the same sockets also send by
        // descriptor, so both kinds of request are exercised.
        let registered: Vec<Source> = senders.iter().map(|s| sender.register(s)).collect();
        if sender.path() == SendPath::Sendto {
            assert!(registered.iter().all(|r| r.slot.is_none()));
        }
        // A raw sender writes the headers of every registered (IPv4, bound to 127.0.0.1) socket's
        // datagrams; those sent by descriptor leave from the socket itself, in the same batch.
        assert_eq!(
            registered.iter().all(|r| r.is_raw()),
            sender.path() == SendPath::Raw
        );
        let mut from = HashMap::new();
        for i in 0..count {
            let k = i % senders.len();
            let socket = &senders[k];
            let source = if (i / senders.len()) % 2 == 0 {
                registered[k]
            } else {
                socket.source()
            };
            let dest = receivers[i % receivers.len()].local_addr().unwrap();
            let j = out.push(source, Some(dest), |b| {
                b.extend_from_slice(&(i as u32).to_be_bytes())
            });
            assert_eq!(j, i);
            from.insert(i as u32, socket.local_addr());
        }
        let mut reported = vec![0u32; count];
        let receive = async {
            let mut got = HashMap::new();
            let mut buf = [0u8; 64];
            while got.len() < count {
                for r in &receivers {
                    while let Ok((len, src)) = r.try_recv_from(&mut buf) {
                        assert_eq!(len, 4);
                        let i = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                        assert!(got.insert(i, src).is_none(), "datagram {i} arrived twice");
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            got
        };
        let refused = sender.send(&out, |range, _| {
            for i in range {
                reported[i] += 1;
            }
        });
        assert_eq!(refused, 0);
        assert!(
            reported.iter().all(|n| *n == 1),
            "each datagram reported sent once"
        );
        let got = tokio::time::timeout(Duration::from_secs(10), receive)
            .await
            .expect("every datagram arrives");
        assert_eq!(got, from);
        // A connected socket's datagrams name no address; registered or not, they reach its peer.
        let peer = &receivers[1];
        senders[2].connect(peer.local_addr().unwrap()).unwrap();
        out.clear();
        out.push(registered[2], None, |b| b.extend_from_slice(b"via slot"));
        out.push(senders[2].source(), None, |b| {
            b.extend_from_slice(b"via fd")
        });
        assert_eq!(sender.send(&out, |_, _| {}), 0);
        let mut heard = Vec::new();
        let mut buf = [0u8; 64];
        while heard.len() < 2 {
            let (len, from) =
                tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
                    .await
                    .expect("both connected datagrams arrive")
                    .unwrap();
            assert_eq!(from, senders[2].local_addr());
            heard.push(buf[..len].to_vec());
        }
        heard.sort();
        assert_eq!(heard, vec![b"via fd".to_vec(), b"via slot".to_vec()]);
        for r in registered {
            sender.unregister(r);
        }
        // The outbox is reusable: the next batch sends only what was queued after `clear`.
        out.clear();
        assert!(out.is_empty());
        out.push(
            senders[0].source(),
            Some(receivers[0].local_addr().unwrap()),
            |b| b.extend_from_slice(b"next"),
        );
        assert_eq!(out.datagram(0), b"next");
        assert_eq!(sender.send(&out, |_, _| {}), 0);
        let mut buf = [0u8; 64];
        let (len, _) =
            tokio::time::timeout(Duration::from_secs(5), receivers[0].recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(&buf[..len], b"next");
    }

    #[tokio::test]
    async fn io_uring_batches_send_every_datagram_once_from_its_own_socket() {
        every_datagram_arrives_once_from_its_socket(SendPath::IoUring, false).await;
    }

    #[tokio::test]
    async fn io_uring_sendmsg_batches_for_kernels_before_6_0_send_every_datagram_once() {
        every_datagram_arrives_once_from_its_socket(SendPath::IoUring, true).await;
    }

    #[tokio::test]
    async fn sendto_fallback_sends_every_datagram_once_from_its_own_socket() {
        every_datagram_arrives_once_from_its_socket(SendPath::Sendto, false).await;
    }

    #[tokio::test]
    async fn raw_socket_batches_send_every_datagram_once_from_its_own_port() {
        every_datagram_arrives_once_from_its_socket(SendPath::Raw, false).await;
    }

    /// Where the process may open a raw socket (root, as in CI, or CAP_NET_RAW) a raw sender must
    /// be one; elsewhere the fallback runs and the test says so, naming the reason.
    pub(crate) fn expect_raw_where_allowed(
        asked: SendPath,
        got: SendPath,
        why: &Option<io::Error>,
    ) {
        if asked != SendPath::Raw {
            return;
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(got, SendPath::Raw, "root may open a raw socket: {why:?}");
        } else if got != SendPath::Raw {
            eprintln!("no raw socket here ({why:?}); testing the {got:?} fallback");
        }
    }

    /// RFC 768's sum, one big-endian word at a time, as the RFC states it.
    fn checksum_by_the_book(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, udp: &[u8]) -> u16 {
        let mut bytes = [src.octets(), dst.octets()].concat();
        bytes.extend_from_slice(&[0, 17]);
        bytes.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        bytes.extend_from_slice(udp);
        if bytes.len() % 2 == 1 {
            bytes.push(0);
        }
        let mut sum: u32 = 0;
        for w in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        match !(sum as u16) {
            0 => 0xFFFF,
            c => c,
        }
    }

    proptest::proptest! {
        /// The checksum taken 8 bytes at a time equals the one taken word by word, for any
        /// addresses and any datagram, odd lengths included.
        #[test]
        fn the_fast_udp_checksum_is_rfc_768s(
            src: [u8; 4],
            dst: [u8; 4],
            udp in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        ) {
            let (src, dst) = (src.into(), dst.into());
            proptest::prop_assert_eq!(
                udp_checksum(src, dst, &udp),
                checksum_by_the_book(src, dst, &udp)
            );
        }
    }

    /// A raw datagram's headers are a UDP socket's: checked against a datagram whose checksum
    /// was worked out by hand (RFC 768 over the pseudo-header, 127.0.0.1:4000 to 127.0.0.1:5000).
    #[test]
    fn raw_headers_carry_the_ports_lengths_and_a_valid_udp_checksum() {
        let src: SocketAddrV4 = "127.0.0.1:4000".parse().unwrap();
        let dst: SocketAddrV4 = "127.0.0.1:5000".parse().unwrap();
        let socket = RtpSocket::bind(SocketAddr::V4(src))
            .unwrap_or_else(|_| RtpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap());
        let mut from = socket.source();
        from.raw_from = Some(src);
        let mut out = Outbox::default();
        out.push(from, Some(SocketAddr::V4(dst)), |b| {
            b.extend_from_slice(b"abc")
        });
        let d = &out.bufs[0];
        assert_eq!(out.datagram(0), b"abc");
        assert_eq!(d.len(), RAW_HEADERS + 3);
        assert_eq!(&d[..4], &[0x45, 0, 0, 0]);
        assert_eq!(d[6], 0x40, "don't fragment");
        assert_eq!(d[9], 17, "UDP");
        assert_eq!(&d[12..20], &[127, 0, 0, 1, 127, 0, 0, 1]);
        // Source port 4000 (0x0FA0), destination 5000 (0x1388), length 8 + 3 = 11.
        assert_eq!(&d[20..26], &[0x0F, 0xA0, 0x13, 0x88, 0, 11]);
        // Pseudo-header 7F00+0001+7F00+0001+0011+000B, header 0FA0+1388+000B, payload
        // 6162+6300: 0x1_E5B3, folded 0xE5B4, complemented 0x1A4B.
        assert_eq!(&d[26..28], &[0x1A, 0x4B]);
        // Summed with its checksum, the datagram folds to all ones: what a receiver checks.
        assert_eq!(udp_checksum(*src.ip(), *dst.ip(), &d[20..]), 0xFFFF);
        // An IPv6 destination, or none, leaves from the socket itself.
        out.clear();
        out.push(from, None, |b| b.extend_from_slice(b"abc"));
        assert!(!out.sources[0].is_raw());
        assert_eq!(out.datagram(0), b"abc");
    }

    #[test]
    fn this_kernel_offers_io_uring_or_says_why_not() {
        // Not an assertion that io_uring exists (CI kernels and sandboxes may forbid it), but that
        // asking for it yields either the ring or a reason.
        let (sender, why) = BatchSender::new(SendPath::IoUring);
        assert_eq!(sender.path() == SendPath::Sendto, why.is_some());
        let (sender, why) = BatchSender::new(SendPath::Sendto);
        assert_eq!(sender.path(), SendPath::Sendto);
        let (sender, why_not_raw) = BatchSender::new(SendPath::Raw);
        expect_raw_where_allowed(SendPath::Raw, sender.path(), &why_not_raw);
        assert_eq!(sender.path() == SendPath::Raw, why_not_raw.is_none());
        assert!(why.is_none());
    }

    #[test]
    fn socket_addresses_are_written_for_both_families() {
        let mut a: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let len = write_sockaddr("127.0.0.1:5004".parse().unwrap(), &mut a);
        assert_eq!(len as usize, std::mem::size_of::<libc::sockaddr_in>());
        // SAFETY: just written as a sockaddr_in.
        let v4 = unsafe { &*(&a as *const libc::sockaddr_in6 as *const libc::sockaddr_in) };
        assert_eq!(v4.sin_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(u16::from_be(v4.sin_port), 5004);
        assert_eq!(v4.sin_addr.s_addr.to_ne_bytes(), [127, 0, 0, 1]);
        let len = write_sockaddr("[::1]:5006".parse().unwrap(), &mut a);
        assert_eq!(len as usize, std::mem::size_of::<libc::sockaddr_in6>());
        assert_eq!(a.sin6_family, libc::AF_INET6 as libc::sa_family_t);
        assert_eq!(u16::from_be(a.sin6_port), 5006);
        assert_eq!(a.sin6_addr.s6_addr, std::net::Ipv6Addr::LOCALHOST.octets());
    }

    #[test]
    fn a_bound_socket_is_non_blocking_and_knows_its_address() {
        let any = RtpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(any.local_addr(), any.fd.local_addr().unwrap());
        assert_ne!(any.local_addr().port(), 0);
        let mut buf = [0u8; 16];
        let err = any.fd.recv_from(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // A named port is the address it says it has, without asking the kernel.
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let named = RtpSocket::bind(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
        assert_eq!(named.local_addr(), named.fd.local_addr().unwrap());
        // A port in use is refused as UdpSocket::bind refuses it.
        let taken = RtpSocket::bind(named.local_addr()).err().unwrap();
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse);
        any.fd.send_to(b"x", named.local_addr()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = loop {
            match named.fd.recv_from(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                other => break other.unwrap(),
            }
        };
        assert_eq!(got, (1, any.local_addr()));
    }
}
