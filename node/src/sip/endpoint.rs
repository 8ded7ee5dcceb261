//! The transport drivers: UDP (one socket, a receive loop) or TCP (a listener for the peer's
//! connections and a pool of our own, one per remote address, RFC 3261 §18). Both parse what arrives
//! and hand each message to the call that owns its Call-ID, and both send. All protocol decisions live
//! in the sans-IO layers.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::framing::StreamFramer;

use super::dialog::Dialog;
use super::message::{self, response_bytes, response_to, status, Method, SipMessage};
use super::transaction::{ClientTransaction, Output, Timers};

/// A parsed message and where it came from.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub msg: SipMessage,
    pub from: SocketAddr,
}

type Routes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Inbound>>>>;

type Answered = Arc<Mutex<AnsweredCalls>>;

/// How long an answered call is remembered after it ended: well past any 2xx retransmission
/// (64×T1, 32 s by default).
const ANSWERED_LINGER: Duration = Duration::from_secs(300);

/// Most answered calls remembered; past that the oldest is forgotten (at 1,000 calls a second
/// that still covers the last 100 s).
const MAX_ANSWERED: usize = 100_000;

/// A dialog as a late 2xx names it: its Call-ID and the callee's tag (a forked INVITE's branches
/// share the Call-ID and differ in the tag).
type DialogKey = (String, String);

/// Dialogs of calls of ours that were answered (and so ACKed) and have ended, and when: a late 2xx
/// of one of them is ACKed again but its dialog is not ended by us (the call did that, or another
/// node took it over and holds it now). Another branch's 2xx with the same Call-ID is not one of them.
#[derive(Default)]
struct AnsweredCalls {
    ended: HashMap<DialogKey, std::time::Instant>,
    /// The same, oldest first, to forget in order.
    order: std::collections::VecDeque<(std::time::Instant, DialogKey)>,
}

impl AnsweredCalls {
    fn insert(&mut self, dialog: DialogKey, now: std::time::Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < ANSWERED_LINGER && self.order.len() < MAX_ANSWERED {
                break;
            }
            if let Some((at, id)) = self.order.pop_front() {
                // A Call-ID ended twice (a call resumed here) is forgotten at its last end.
                if self.ended.get(&id) == Some(&at) {
                    self.ended.remove(&id);
                }
            }
        }
        self.ended.insert(dialog.clone(), now);
        self.order.push_back((now, dialog));
    }

    fn contains(&self, dialog: &DialogKey) -> bool {
        self.ended
            .get(dialog)
            .is_some_and(|at| at.elapsed() < ANSWERED_LINGER)
    }
}

/// Counters of what the receive loop saw.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub received: AtomicU64,
    /// Datagrams that were not usable SIP (malformed, oversize, missing headers).
    pub dropped_malformed: AtomicU64,
    /// Responses for no call we know (a 2xx to an INVITE among them only when it was not ended,
    /// see [`StrayAnswers`]).
    pub dropped_stray: AtomicU64,
    /// Answers (2xx to an INVITE) for no call we know that were ACKed and ended with BYE.
    pub ended_stray: AtomicU64,
    /// Messages for no call (new requests, stray answers) dropped because `UNROUTED_QUEUE` of them
    /// were already waiting: a flood is shed here instead of growing memory; a UDP sender that
    /// meant it retransmits.
    pub dropped_busy: AtomicU64,
    /// Connections others opened that were closed at once because `MAX_INBOUND_TCP` were open.
    pub refused_connections: AtomicU64,
}

/// Which transport an endpoint speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// A SIP endpoint on one UDP socket or one TCP listener with its connections.
#[derive(Clone)]
pub struct Endpoint {
    wire: Wire,
    local: SocketAddr,
    routes: Routes,
    stats: Arc<EndpointStats>,
    receiver: Arc<tokio::task::AbortHandle>,
    answered: Answered,
}

#[derive(Clone)]
enum Wire {
    Udp(Arc<UdpWire>),
    Tcp(Arc<TcpWire>),
}

/// The UDP socket, registered with tokio's reactor for reading only. Registered for writing too (as
/// `tokio::net::UdpSocket` always is), every datagram sent would wake the reactor's epoll: on Linux a
/// UDP socket whose sent datagram is freed wakes whoever waits on it (`sock_def_write_space`), so
/// a worker thread parked in `epoll_wait` would wake for nothing at each of a call's sends that
/// finds one parked (`bench call-setup`: 0.8 `epoll_wait` a call fewer without).
struct UdpWire {
    fd: AsyncFd<std::net::UdpSocket>,
}

/// How often a send that found the socket's buffer full tries again, and for how long at most (a
/// datagram still not out then is lost, as UDP may lose it anyway; transactions retransmit).
const SEND_RETRY: Duration = Duration::from_millis(1);
const SEND_GIVE_UP: Duration = Duration::from_millis(50);

impl UdpWire {
    fn bind(addr: SocketAddr) -> io::Result<UdpWire> {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        // SAFETY: a `std::net::UdpSocket` owns its descriptor, which stays open and the same until
        // the `AsyncFd` (the socket's only owner) drops it.
        let fd = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE)? };
        Ok(UdpWire { fd })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.fd.get_ref().local_addr()
    }

    async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let mut ready = self.fd.readable().await?;
            if let Ok(result) = ready.try_io(|s| s.get_ref().recv_from(buf)) {
                return result;
            }
        }
    }

    /// Sends at once; a full send buffer (which nothing here can wait on without the wake-ups
    /// above) is tried again every [`SEND_RETRY`] for up to [`SEND_GIVE_UP`].
    async fn send_to(&self, bytes: &[u8], to: SocketAddr) -> io::Result<()> {
        self.send_within(bytes, to, SEND_GIVE_UP).await
    }

    /// [`UdpWire::send_to`] with its window for a full buffer given.
    async fn send_within(&self, bytes: &[u8], to: SocketAddr, window: Duration) -> io::Result<()> {
        let give_up = tokio::time::Instant::now() + window;
        loop {
            match self.fd.get_ref().send_to(bytes, to) {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        && tokio::time::Instant::now() < give_up =>
                {
                    tokio::time::sleep(SEND_RETRY).await
                }
                result => return result.map(|_| ()),
            }
        }
    }
}

/// How long we wait to open a TCP connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Open TCP connections by remote address: a writer queue each, and the tasks that serve them.
struct TcpWire {
    conns: Mutex<HashMap<SocketAddr, Conn>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    intake: Intake,
    /// Connections the other side opened that are still being read.
    inbound: AtomicUsize,
}

/// Most connections others may hold open to us at once. A trunk needs a handful (one per border
/// controller that sends us requests); past this a new one is closed as soon as it is accepted, so
/// that a flood of connections cannot take the file descriptors the calls' RTP sockets need.
pub const MAX_INBOUND_TCP: usize = 256;

/// Most messages waiting to be written to one TCP connection, beyond what the kernel holds. A peer
/// that lets more pile up is not reading what it asked for: its connection is closed rather than
/// let grow our memory.
pub const TCP_SEND_QUEUE: usize = 1024;

/// An open TCP connection: its writer's queue, and the writer.
#[derive(Clone)]
struct Conn {
    tx: mpsc::Sender<Vec<u8>>,
    writer: tokio::task::AbortHandle,
}

/// Most messages for no call (new INVITEs, stray requests and answers) waiting to be handled; past
/// this they are dropped and counted (`EndpointStats::dropped_busy`). A node handles a few a
/// second; the simulated city takes its INVITEs through here, at most a few thousand in a burst.
pub const UNROUTED_QUEUE: usize = 4096;

/// Where parsed messages go: the call that owns the Call-ID, or the unrouted queue.
#[derive(Clone)]
struct Intake {
    routes: Routes,
    stats: Arc<EndpointStats>,
    unrouted: mpsc::Sender<Inbound>,
}

/// The messages of one Call-ID; dropping it unregisters the call.
pub struct CallChannel {
    pub rx: mpsc::UnboundedReceiver<Inbound>,
    call_id: String,
    routes: Routes,
    answered: Answered,
    /// The callee's tag once the call was answered: then its dialog is remembered when it ends.
    answered_tag: std::sync::OnceLock<String>,
}

impl CallChannel {
    /// The call was answered by the callee with `tag` (we ACKed its 2xx, or took the answered call
    /// over).
    pub fn mark_answered(&self, tag: &str) {
        let _ = self.answered_tag.set(tag.to_string());
    }
}

impl Drop for CallChannel {
    fn drop(&mut self) {
        // Remembered before the route goes, so that no late 2xx finds neither.
        if let Some(tag) = self.answered_tag.take() {
            let dialog = (self.call_id.clone(), tag);
            lock(&self.answered).insert(dialog, std::time::Instant::now());
        }
        if let Ok(mut r) = self.routes.lock() {
            r.remove(&self.call_id);
        }
    }
}

impl Endpoint {
    /// Binds `addr` and starts the receive loop. Requests for Call-IDs nobody registered (new INVITEs,
    /// stray BYEs, OPTIONS) arrive on the returned receiver.
    pub async fn bind(addr: SocketAddr) -> io::Result<(Endpoint, mpsc::Receiver<Inbound>)> {
        Endpoint::bind_with(addr, Transport::Udp).await
    }

    /// Binds `addr` for the given transport (for TCP: listens there, and connects out on first send).
    pub async fn bind_with(
        addr: SocketAddr,
        transport: Transport,
    ) -> io::Result<(Endpoint, mpsc::Receiver<Inbound>)> {
        let routes: Routes = Arc::default();
        let stats = Arc::new(EndpointStats::default());
        let (unrouted_tx, unrouted_rx) = mpsc::channel(UNROUTED_QUEUE);
        let intake = Intake {
            routes: routes.clone(),
            stats: stats.clone(),
            unrouted: unrouted_tx,
        };
        let (wire, local, receiver) = match transport {
            Transport::Udp => {
                let socket = Arc::new(UdpWire::bind(addr)?);
                let local = socket.local_addr()?;
                let receiver = tokio::spawn(receive_loop(socket.clone(), intake));
                (Wire::Udp(socket), local, receiver)
            }
            Transport::Tcp => {
                let listener = TcpListener::bind(addr).await?;
                let local = listener.local_addr()?;
                let tcp = Arc::new(TcpWire {
                    conns: Mutex::default(),
                    tasks: Mutex::default(),
                    intake,
                    inbound: AtomicUsize::new(0),
                });
                let receiver = tokio::spawn(accept_loop(listener, tcp.clone()));
                (Wire::Tcp(tcp), local, receiver)
            }
        };
        let ep = Endpoint {
            wire,
            local,
            routes,
            stats,
            receiver: Arc::new(receiver.abort_handle()),
            answered: Arc::default(),
        };
        Ok((ep, unrouted_rx))
    }

    /// Stops receiving (and, on TCP, closes every connection); a UDP socket closes once every clone
    /// is dropped.
    pub fn close(&self) {
        self.receiver.abort();
        if let Wire::Tcp(tcp) = &self.wire {
            lock(&tcp.conns).clear();
            for t in lock(&tcp.tasks).drain(..) {
                t.abort();
            }
        }
    }

    pub fn transport(&self) -> Transport {
        match self.wire {
            Wire::Udp(_) => Transport::Udp,
            Wire::Tcp(_) => Transport::Tcp,
        }
    }

    /// The transport token of our Via headers.
    pub fn via_transport(&self) -> &'static str {
        match self.transport() {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
        }
    }

    /// Whether the transport is reliable: transactions then do not retransmit (§17.1.1.2).
    pub fn is_reliable(&self) -> bool {
        self.transport() == Transport::Tcp
    }

    /// Our Contact URI for `user`, naming the transport so the peer reaches us the same way.
    pub fn contact(&self, user: &str) -> String {
        match self.transport() {
            Transport::Udp => format!("sip:{user}@{}", self.local),
            Transport::Tcp => format!("sip:{user}@{};transport=tcp", self.local),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    /// Routes every later message with this Call-ID to the returned channel.
    pub fn register(&self, call_id: &str) -> CallChannel {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut r) = self.routes.lock() {
            r.insert(call_id.to_string(), tx);
        }
        CallChannel {
            rx,
            call_id: call_id.to_string(),
            routes: self.routes.clone(),
            answered: self.answered.clone(),
            answered_tag: Default::default(),
        }
    }

    /// Whether a call of ours was answered by the callee with `tag` and ended in the last
    /// [`ANSWERED_LINGER`].
    fn answered_recently(&self, call_id: &str, tag: &str) -> bool {
        lock(&self.answered).contains(&(call_id.to_string(), tag.to_string()))
    }

    /// Sends one message: a datagram, or on TCP over the connection to `to` (opened if there is none).
    /// Errors are reported, not retried (on UDP the transaction layer retransmits).
    pub async fn send(&self, bytes: &[u8], to: SocketAddr) -> io::Result<()> {
        match &self.wire {
            Wire::Udp(socket) => socket.send_to(bytes, to).await,
            Wire::Tcp(tcp) => {
                let open = lock(&tcp.conns)
                    .get(&to)
                    .filter(|c| !c.tx.is_closed())
                    .cloned();
                let conn = match open {
                    Some(c) => c,
                    None => {
                        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(to))
                            .await
                            .map_err(|_| {
                                io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    format!("TCP connect to {to} timed out"),
                                )
                            })??;
                        serve_connection(tcp, stream, to, false)
                    }
                };
                match conn.tx.try_send(bytes.to_vec()) {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        // Stopping the writer closes our side; the peer's requests are still read.
                        conn.writer.abort();
                        forget_conn(tcp, to, &conn.tx);
                        Err(io::Error::new(
                            io::ErrorKind::WouldBlock,
                            format!(
                                "closed the TCP connection to {to}: {TCP_SEND_QUEUE} messages \
                                 were waiting for it, the peer does not read"
                            ),
                        ))
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        format!("TCP connection to {to} closed"),
                    )),
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Accepts the peer's connections (requests inside dialogs whose Contact names TCP).
async fn accept_loop(listener: TcpListener, tcp: Arc<TcpWire>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if tcp.inbound.load(Ordering::Relaxed) >= MAX_INBOUND_TCP {
                    drop(stream);
                    let refused = tcp
                        .intake
                        .stats
                        .refused_connections
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    if refused % 1000 == 1 {
                        tracing::warn!(
                            %peer, refused,
                            "refused a SIP TCP connection: {MAX_INBOUND_TCP} are open already"
                        );
                    }
                    continue;
                }
                tcp.inbound.fetch_add(1, Ordering::Relaxed);
                serve_connection(&tcp, stream, peer, true);
            }
            Err(e) => {
                tracing::debug!(error = %e, "SIP TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Registers a connection under its peer's address and starts its writer and reader; responses to
/// requests that came over it go back over it (§18.2.2). An `inbound` one (the peer opened it)
/// counts against `MAX_INBOUND_TCP` until its reader ends.
fn serve_connection(
    tcp: &Arc<TcpWire>,
    stream: TcpStream,
    peer: SocketAddr,
    inbound: bool,
) -> Conn {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_SEND_QUEUE);
    let write_task = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
    let conn = Conn {
        tx: tx.clone(),
        writer: write_task.abort_handle(),
    };
    lock(&tcp.conns).insert(peer, conn.clone());
    let wire = tcp.clone();
    let mine = tx.clone();
    let read_task = tokio::spawn(async move {
        let mut framer = StreamFramer::new();
        let mut buf = vec![0u8; 16 * 1024];
        'read: loop {
            let n = match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            framer.push(&buf[..n]);
            while let Some(next) = framer.next_message() {
                match next {
                    Ok(bytes) => {
                        if !wire.intake.deliver(&bytes, peer) {
                            break 'read;
                        }
                    }
                    Err(e) => {
                        // Out of step with the stream: the only safe thing is to close it.
                        wire.intake.stats.received.fetch_add(1, Ordering::Relaxed);
                        wire.intake
                            .stats
                            .dropped_malformed
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, error = %e, "closing a SIP TCP connection");
                        break 'read;
                    }
                }
            }
        }
        // The writer ends when its queue's last sender is gone.
        forget_conn(&wire, peer, &mine);
        if inbound {
            wire.inbound.fetch_sub(1, Ordering::Relaxed);
        }
    });
    let mut tasks = lock(&tcp.tasks);
    tasks.retain(|t| !t.is_finished());
    tasks.push(write_task.abort_handle());
    tasks.push(read_task.abort_handle());
    conn
}

/// Forgets the connection to `peer` unless a newer one to the same peer replaced it.
fn forget_conn(tcp: &TcpWire, peer: SocketAddr, tx: &mpsc::Sender<Vec<u8>>) {
    let mut conns = lock(&tcp.conns);
    if conns.get(&peer).is_some_and(|c| c.tx.same_channel(tx)) {
        conns.remove(&peer);
    }
}

/// Sends BYE inside `dialog` and waits, at most `give_up`, for its final response; returns true when the
/// BYE was answered.
pub async fn end_dialog(
    endpoint: &Endpoint,
    channel: &mut CallChannel,
    dialog: &mut Dialog,
    timers: Timers,
    fallback_hop: SocketAddr,
    give_up: std::time::Duration,
) -> bool {
    let Ok(bye) = dialog.build(Method::Bye, endpoint.local_addr()) else {
        return false;
    };
    let hop = dialog.next_hop().unwrap_or(fallback_hop);
    request_and_wait(endpoint, channel, bye, hop, timers, give_up)
        .await
        .is_some()
}

/// Sends `request` through a client transaction and waits, at most `give_up`, for its final response.
/// A BYE from the other side meanwhile (both hung up at once) is answered 200; other messages of the call
/// are dropped.
pub async fn request_and_wait(
    endpoint: &Endpoint,
    channel: &mut CallChannel,
    request: message::Request,
    hop: SocketAddr,
    timers: Timers,
    give_up: std::time::Duration,
) -> Option<message::Response> {
    let answers = Answers::Channel(channel);
    transact(endpoint, answers, request, hop, timers, give_up).await
}

/// Sends `request` (a BYE that ends another branch of a forked INVITE) through a client transaction
/// in a task of its own, retransmitted on UDP until its final response or `give_up`, while the call
/// whose channel receives the responses goes on: the call passes them on with the returned sender,
/// by the request's Via branch (also returned). Once the call is over (the sender dropped) the
/// request is still retransmitted until `give_up`, unheard.
pub fn spawn_request(
    endpoint: &Endpoint,
    request: message::Request,
    hop: SocketAddr,
    timers: Timers,
    give_up: std::time::Duration,
) -> (String, mpsc::UnboundedSender<message::Response>) {
    let branch = message::via_branch(&request).unwrap_or_default();
    let (tx, rx) = mpsc::unbounded_channel();
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        let answers = Answers::Passed(Some(rx));
        transact(&endpoint, answers, request, hop, timers, give_up).await
    });
    (branch, tx)
}

/// Where a client transaction's responses come from.
enum Answers<'a> {
    /// The call's own channel, read here.
    Channel(&'a mut CallChannel),
    /// Passed on by whoever reads the channel; None once it stopped.
    Passed(Option<mpsc::UnboundedReceiver<message::Response>>),
}

impl Answers<'_> {
    /// The next response to the request with `branch`, or what happened instead: another message
    /// dealt with (a BYE from the other side is answered 200), or the call's channel closed. Pending
    /// forever once passed responses stop.
    async fn next(&mut self, endpoint: &Endpoint, branch: &str) -> Step {
        match self {
            Answers::Channel(channel) => match channel.rx.recv().await {
                Some(Inbound {
                    msg: SipMessage::Response(r),
                    ..
                }) if message::via_branch(&r).as_deref() == Some(branch) => Step::Response(r),
                Some(Inbound {
                    msg: SipMessage::Request(req),
                    from,
                }) if req.method == Method::Bye => {
                    let ok = response_to(&req, 200, None, &[], None);
                    let _ = endpoint.send(&response_bytes(&ok), from).await;
                    Step::Other
                }
                Some(_) => Step::Other,
                None => Step::Closed,
            },
            Answers::Passed(rx) => match rx.as_mut() {
                Some(r) => match r.recv().await {
                    Some(resp) => Step::Response(resp),
                    None => {
                        *rx = None;
                        Step::Other
                    }
                },
                None => std::future::pending().await,
            },
        }
    }
}

enum Step {
    Response(message::Response),
    Other,
    Closed,
}

/// Runs `request`'s client transaction: transmits (and on UDP retransmits) it to `hop` and returns
/// its final response, or None once it timed out or `give_up` passed.
async fn transact(
    endpoint: &Endpoint,
    mut answers: Answers<'_>,
    request: message::Request,
    hop: SocketAddr,
    timers: Timers,
    give_up: std::time::Duration,
) -> Option<message::Response> {
    let branch = message::via_branch(&request).unwrap_or_default();
    let mut tx = ClientTransaction::new(
        request,
        std::time::Instant::now(),
        timers,
        endpoint.is_reliable(),
    );
    let give_up = tokio::time::Instant::now() + give_up;
    loop {
        while let Some(o) = tx.poll_output() {
            match o {
                Output::Transmit(b) => {
                    let _ = endpoint.send(&b, hop).await;
                }
                Output::Response(r) if status(&r) >= 200 => return Some(r),
                Output::TimedOut | Output::Terminated => return None,
                _ => {}
            }
        }
        let timer = tx.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            step = answers.next(endpoint, &branch) => match step {
                Step::Response(r) => tx.handle_response(r, std::time::Instant::now()),
                Step::Other => {}
                Step::Closed => return None,
            },
            _ = sleep_until_opt(timer) => tx.handle_timeout(std::time::Instant::now()),
            _ = tokio::time::sleep_until(give_up) => return None,
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wake for (a disabled `select!` arm).
pub async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn receive_loop(socket: Arc<UdpWire>, intake: Intake) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                // ICMP port unreachable surfaces here on some systems; it is not fatal.
                tracing::debug!(error = %e, "SIP socket receive error");
                continue;
            }
        };
        if !intake.deliver(&buf[..n], from) {
            return;
        }
    }
}

impl Intake {
    /// Queues a message for no call; false once nobody takes them (an answer then only counts
    /// as stray: the receive loop goes on for the calls).
    fn unroute(&self, inbound: Inbound) -> bool {
        match self.unrouted.try_send(inbound) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats.dropped_busy.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(Inbound {
                msg: SipMessage::Response(_),
                ..
            })) => {
                self.stats.dropped_stray.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Parses one message and routes it by Call-ID; false once nobody takes unrouted requests.
    fn deliver(&self, bytes: &[u8], from: SocketAddr) -> bool {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let msg = match message::parse(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.stats.dropped_malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, error = %e, "dropped malformed SIP message");
                return true;
            }
        };
        let Some(call_id) = message::call_id(&msg) else {
            return true;
        };
        let target = self
            .routes
            .lock()
            .ok()
            .and_then(|r| r.get(call_id).cloned());
        let inbound = Inbound { msg, from };
        match target {
            Some(tx) => {
                if let Err(mpsc::error::SendError(inbound)) = tx.send(inbound) {
                    // The call just ended; treat the message as unrouted.
                    if wants_an_answer(&inbound.msg) {
                        self.unroute(inbound);
                    }
                }
                true
            }
            None if wants_an_answer(&inbound.msg) => self.unroute(inbound),
            None => {
                self.stats.dropped_stray.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }
}

/// Whether a message nobody holds still needs something from us: every request does (an answer),
/// and so does a 2xx to an INVITE (an ACK and a BYE, see [`StrayAnswers`]).
fn wants_an_answer(msg: &SipMessage) -> bool {
    match msg {
        SipMessage::Request(_) => true,
        SipMessage::Response(r) => is_answer_to_invite(r),
    }
}

/// A 2xx to an INVITE: it opened a dialog at the callee (RFC 3261 §13.2.2.4).
pub fn is_answer_to_invite(r: &message::Response) -> bool {
    (200..300).contains(&status(r)) && message::cseq(r).is_some_and(|(_, m)| m == Method::Invite)
}

/// Most stray answers being ended at once; past that they are ACKed only.
const MAX_ENDING: usize = 4096;

/// What the caller owes a 2xx to its INVITE that no call holds any more (RFC 3261 §13.2.2.4: ACK
/// every 2xx; end a dialog it does not want with BYE). Such an answer reaches the unrouted queue when
/// its call is gone: the INVITE transaction timed out (Timer B) before the phone answered, the call
/// gave up, or the node restarted. Left alone, the callee is off the hook with nobody talking until
/// its side gives up waiting for the ACK (64×T1, 32 s by default). A late 2xx of a call that was
/// answered here (our ACK was lost) is ACKed only: that call ended its dialog itself, or another
/// node took it over and must not lose it to our BYE.
///
/// Answers are taken only from `peer`'s address (the trunk, or the outbound proxy: where our
/// INVITEs go and their answers come from), and the ACK and BYE go back to the address the answer
/// came from, not to its Contact: a forged answer cannot make us send requests to a third party.
pub struct StrayAnswers {
    peer: std::net::IpAddr,
    timers: Timers,
    /// Dialogs being ended, by Call-ID and the callee's tag, and since when.
    ending: HashMap<(String, String), std::time::Instant>,
}

impl StrayAnswers {
    pub fn new(peer: std::net::IpAddr, timers: Timers) -> Self {
        StrayAnswers {
            peer,
            timers,
            ending: HashMap::new(),
        }
    }

    /// ACKs `resp`, a 2xx to an INVITE no call holds, and the first time its dialog is seen ends it
    /// with BYE (a client transaction of its own, in a task). A retransmission of the 2xx is ACKed
    /// again when it arrives here; once the BYE's task holds the Call-ID it takes them, and drops
    /// them (the BYE ends the dialog either way).
    pub async fn answer(
        &mut self,
        endpoint: &Endpoint,
        resp: &message::Response,
        from: SocketAddr,
    ) {
        let dropped = || endpoint.stats.dropped_stray.fetch_add(1, Ordering::Relaxed);
        if from.ip() != self.peer || !is_answer_to_invite(resp) {
            dropped();
            tracing::debug!(%from, "dropped a response for no call we know: not a 2xx to an INVITE from the trunk");
            return;
        }
        let Some(Unwanted {
            call_id,
            tag,
            ack,
            bye,
        }) = unwanted_answer(endpoint, resp)
        else {
            dropped();
            tracing::debug!(%from, "dropped a 2xx for no call we know: it names no dialog");
            return;
        };
        let _ = endpoint.send(&ack, from).await;
        if endpoint.answered_recently(&call_id, &tag) {
            // Our ACK for it was lost; the call itself ended the dialog, or handed it over.
            tracing::debug!(%call_id, "ACKed a late 2xx of an answered call of ours");
            return;
        }
        let now = std::time::Instant::now();
        let linger = self.timers.t1 * 64;
        self.ending
            .retain(|_, since| now.duration_since(*since) < linger);
        let key = (call_id.clone(), tag);
        if self.ending.contains_key(&key) || self.ending.len() >= MAX_ENDING {
            return;
        }
        self.ending.insert(key, now);
        endpoint.stats.ended_stray.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            %call_id,
            "a 2xx answered an INVITE no call holds any more: ACKed, ending the call with BYE"
        );
        let (endpoint, timers) = (endpoint.clone(), self.timers);
        tokio::spawn(async move {
            let mut channel = endpoint.register(&call_id);
            request_and_wait(&endpoint, &mut channel, bye, from, timers, linger).await;
        });
    }
}

/// The ACK and the BYE for a 2xx that opened a dialog nobody wants, built from the 2xx alone.
pub struct Unwanted {
    pub call_id: String,
    /// The callee's tag: which of a forked INVITE's dialogs this is.
    pub tag: String,
    pub ack: Vec<u8>,
    pub bye: message::Request,
}

/// [`Unwanted`] for `resp`, or None when it names no dialog (no To tag, no Contact).
pub fn unwanted_answer(endpoint: &Endpoint, resp: &message::Response) -> Option<Unwanted> {
    let mut dialog = Dialog::from_answer(resp, &endpoint.contact("campanile")).ok()?;
    dialog.via_transport = endpoint.via_transport().to_string();
    let ack = dialog.build(Method::Ack, endpoint.local_addr()).ok()?;
    let bye = dialog.build(Method::Bye, endpoint.local_addr()).ok()?;
    Some(Unwanted {
        call_id: dialog.call_id,
        tag: dialog.remote_tag,
        ack: message::request_bytes(&ack),
        bye,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse, Response};
    use std::os::fd::AsRawFd;
    use tokio::net::UdpSocket;

    fn answer(call_id: &str) -> Response {
        answer_tagged(call_id, "theirs")
    }

    /// Runs a command of iproute2 (in the caller's network namespace), failing with what it said.
    fn ip_tool(args: &[&str]) -> Result<(), String> {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .map_err(|e| format!("{}: {e} (Debian package iproute2)", args[0]))?;
        if !out.status.success() {
            return Err(format!(
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Sends from `wire`'s socket directly until the kernel refuses for a full buffer.
    fn fill(wire: &UdpWire, to: SocketAddr) {
        for _ in 0..1000 {
            match wire.fd.get_ref().send_to(&[0u8; 1000], to) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => panic!("filling the send buffer: {e}"),
            }
        }
        panic!("the send buffer never filled");
    }

    /// A datagram that finds the SIP socket's send buffer full is tried again until there is room,
    /// and given up with an error, not a hang, when there is none in time. A buffer fills only where
    /// datagrams wait to leave, so the test runs in a network namespace of its own (it needs root)
    /// whose loopback has a token-bucket queue (`tc qdisc ... tbf`): at 1 kbit/s it lets out one
    /// datagram of 1,000 bytes in eight seconds, and those waiting count against the socket's
    /// smallest send buffer until they leave or the queue is deleted.
    #[test]
    fn a_full_send_buffer_is_tried_again_and_then_given_up() {
        let in_namespace = std::thread::spawn(|| -> Result<(), String> {
            // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread (and the
            // processes it starts) into a new network namespace, gone when they are.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "unshare(CLONE_NEWNET): {} (the test needs root)",
                    io::Error::last_os_error()
                ));
            }
            let slow_queue = || {
                ip_tool(&[
                    "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1kbit", "burst",
                    "1600", "limit", "100000",
                ])
            };
            ip_tool(&["ip", "link", "set", "lo", "up"])?;
            slow_queue()?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let wire = UdpWire::bind("127.0.0.1:0".parse().unwrap()).unwrap();
                let one: libc::c_int = 1;
                // SAFETY: the option value is a c_int that outlives the call; the descriptor is open.
                let set = unsafe {
                    libc::setsockopt(
                        wire.fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_SNDBUF,
                        &one as *const libc::c_int as *const libc::c_void,
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                assert_eq!(set, 0, "SO_SNDBUF: {}", io::Error::last_os_error());
                let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                let to = sink.local_addr().unwrap();

                // Full, and the queue lets nothing out for seconds: the send waits (a generous
                // window here), and goes out once the queue is gone (its datagrams dropped).
                fill(&wire, to);
                {
                    let send = wire.send_within(b"waited for room", to, Duration::from_secs(60));
                    tokio::pin!(send);
                    assert!(
                        tokio::time::timeout(Duration::from_millis(20), &mut send)
                            .await
                            .is_err(),
                        "a send into a full buffer did not wait"
                    );
                    ip_tool(&["tc", "qdisc", "del", "dev", "lo", "root"]).unwrap();
                    send.await.expect("sent once the queue had room");
                    let mut buf = [0u8; 2048];
                    sink.set_read_timeout(Some(Duration::from_secs(10)))
                        .unwrap();
                    // Fillers that left before the queue filled arrive first (the rest went with it).
                    loop {
                        let n = sink
                            .recv(&mut buf)
                            .expect("the datagram that waited arrives");
                        if &buf[..n] == b"waited for room" {
                            break;
                        }
                    }
                }

                // Full again and slow again: after its window the send says so.
                slow_queue().unwrap();
                fill(&wire, to);
                let err =
                    tokio::time::timeout(Duration::from_secs(30), wire.send_to(b"never room", to))
                        .await
                        .expect("the send gave up")
                        .unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
            });
            Ok(())
        });
        in_namespace
            .join()
            .expect("the namespace thread panicked")
            .unwrap();
    }

    fn answer_tagged(call_id: &str, tag: &str) -> Response {
        let raw = format!(
            "INVITE sip:1000@127.0.0.1:5070 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKgone\r\n\
From: <sip:alert@127.0.0.1>;tag=ours\r\nTo: <sip:1000@127.0.0.1>\r\n\
Call-ID: {call_id}\r\nCSeq: 7 INVITE\r\nContact: <sip:alert@127.0.0.1:5060>\r\nContent-Length: 0\r\n\r\n"
        );
        let SipMessage::Request(invite) = parse(raw.as_bytes()).unwrap() else {
            unreachable!()
        };
        let contact = [("Contact", "<sip:1000@127.0.0.1:5070>".to_string())];
        response_to(&invite, 200, Some(tag), &contact, None)
    }

    async fn next_request(sock: &UdpSocket) -> message::Request {
        let mut buf = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .expect("a request within 5 s")
            .unwrap();
        match parse(&buf[..n]).unwrap() {
            SipMessage::Request(r) => r,
            SipMessage::Response(r) => panic!("expected a request, got {r}"),
        }
    }

    fn key(call_id: &str) -> DialogKey {
        (call_id.to_string(), "theirs".to_string())
    }

    /// Answered calls are forgotten oldest first past the cap, and after the linger time.
    #[test]
    fn answered_calls_are_forgotten_in_order() {
        let start = std::time::Instant::now();
        let mut calls = AnsweredCalls::default();
        for i in 0..MAX_ANSWERED + 2 {
            calls.insert(key(&format!("c{i}")), start);
        }
        assert!(!calls.contains(&key("c0")) && !calls.contains(&key("c1")));
        assert!(
            calls.contains(&key("c2")) && calls.contains(&key(&format!("c{}", MAX_ANSWERED + 1)))
        );
        assert_eq!(calls.ended.len(), MAX_ANSWERED);
        calls.insert(key("late"), start + ANSWERED_LINGER);
        assert_eq!(calls.ended.len(), 1);
        assert_eq!(calls.order.len(), 1);
    }

    /// The trunk's late 2xx gets an ACK and one BYE (CSeq after the INVITE's, the callee's tag);
    /// its retransmission an ACK only; a 2xx from anyone else nothing at all.
    #[tokio::test]
    async fn a_stray_answer_from_the_trunk_is_acked_and_ended_once() {
        let (endpoint, _unrouted) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let trunk = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let from = trunk.local_addr().unwrap();
        let timers = Timers {
            t1: Duration::from_millis(50),
            ..Timers::default()
        };
        let mut stray = StrayAnswers::new(from.ip(), timers);
        let ok = answer("late-1");
        stray.answer(&endpoint, &ok, from).await;
        let ack = next_request(&trunk).await;
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(message::cseq(&ack), Some((7, Method::Ack)));
        assert_eq!(ack.uri.to_string(), "sip:1000@127.0.0.1:5070");
        let bye = next_request(&trunk).await;
        assert_eq!(bye.method, Method::Bye);
        assert_eq!(message::cseq(&bye), Some((8, Method::Bye)));
        assert_eq!(message::to_tag(&bye), Some("theirs"));
        assert_eq!(message::from_tag(&bye), Some("ours"));
        let done = response_to(&bye, 200, None, &[], None);
        trunk
            .send_to(&response_bytes(&done), endpoint.local_addr())
            .await
            .unwrap();

        // The retransmitted 2xx: ACKed again, no second BYE.
        stray.answer(&endpoint, &ok, from).await;
        assert_eq!(next_request(&trunk).await.method, Method::Ack);
        let mut buf = [0u8; 2048];
        let more =
            tokio::time::timeout(Duration::from_millis(300), trunk.recv_from(&mut buf)).await;
        assert!(
            more.is_err(),
            "a second BYE (or a BYE retransmission after its 200)"
        );
        assert_eq!(endpoint.stats().ended_stray.load(Ordering::Relaxed), 1);

        // A late 2xx of a call of ours that was answered and has ended (or was handed over): ACKed,
        // and its dialog left alone.
        endpoint.register("answered-1").mark_answered("theirs");
        stray.answer(&endpoint, &answer("answered-1"), from).await;
        assert_eq!(next_request(&trunk).await.method, Method::Ack);
        let more =
            tokio::time::timeout(Duration::from_millis(300), trunk.recv_from(&mut buf)).await;
        assert!(more.is_err(), "a BYE for a call that was ours");
        assert_eq!(endpoint.stats().ended_stray.load(Ordering::Relaxed), 1);
        // Another branch of that call's forked INVITE, answering after the call ended: ended.
        stray
            .answer(&endpoint, &answer_tagged("answered-1", "fork"), from)
            .await;
        assert_eq!(next_request(&trunk).await.method, Method::Ack);
        let bye = next_request(&trunk).await;
        assert_eq!(
            (bye.method, message::to_tag(&bye)),
            (Method::Bye, Some("fork"))
        );
        let done = response_to(&bye, 200, None, &[], None);
        trunk
            .send_to(&response_bytes(&done), endpoint.local_addr())
            .await
            .unwrap();
        assert_eq!(endpoint.stats().ended_stray.load(Ordering::Relaxed), 2);

        // Another address: dropped and counted, nothing sent anywhere.
        let elsewhere = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let before = endpoint.stats().dropped_stray.load(Ordering::Relaxed);
        stray
            .answer(
                &endpoint,
                &answer("forged"),
                elsewhere.local_addr().unwrap(),
            )
            .await;
        assert_eq!(
            endpoint.stats().dropped_stray.load(Ordering::Relaxed),
            before + 1
        );
        let sent =
            tokio::time::timeout(Duration::from_millis(300), elsewhere.recv_from(&mut buf)).await;
        assert!(sent.is_err(), "a request to the forged answer's sender");
        assert_eq!(endpoint.stats().ended_stray.load(Ordering::Relaxed), 2);
    }

    /// A request for no call, from `from`, with its own Call-ID.
    fn request_for_no_call(method: &str, call_id: &str, from: SocketAddr) -> String {
        format!(
            "{method} sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {from};branch=z9hG4bK{call_id}\r\n\
From: <sip:a@b>;tag=1\r\nTo: <sip:x@127.0.0.1>;tag=2\r\nCall-ID: {call_id}\r\nCSeq: 1 {method}\r\n\
Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )
    }

    /// Messages for no call wait in a queue of `UNROUTED_QUEUE`, read here by nobody until the end:
    /// past it they are dropped and counted, the receive loop goes on (a call's message still
    /// arrives), and a message read off the queue makes room for one more.
    #[tokio::test]
    async fn a_flood_for_no_call_is_shed_past_the_queue_and_calls_still_hear_theirs() {
        let (endpoint, mut unrouted) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let to = endpoint.local_addr();
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let from = peer.local_addr().unwrap();
        let received = || endpoint.stats().received.load(Ordering::Relaxed);
        let busy = || endpoint.stats().dropped_busy.load(Ordering::Relaxed);
        // In batches the intake takes in before the next one goes, so the kernel drops none.
        let mut sent = 0u64;
        let send_batch = |first: u64, n: u64| {
            let peer = &peer;
            async move {
                for i in first..first + n {
                    let req = request_for_no_call("OPTIONS", &format!("flood-{i}"), from);
                    peer.send_to(req.as_bytes(), to).await.unwrap();
                }
            }
        };
        let wait_received = |n: u64| async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while received() < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the endpoint took in {} of {n} datagrams",
                    received()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let extra = 100u64;
        let total = UNROUTED_QUEUE as u64 + extra;
        while sent < total {
            let n = 64.min(total - sent);
            send_batch(sent, n).await;
            sent += n;
            wait_received(sent).await;
        }
        assert_eq!(busy(), extra);
        // The receive loop goes on for the calls.
        let mut call = endpoint.register("a-call");
        let bye = request_for_no_call("BYE", "a-call", from);
        peer.send_to(bye.as_bytes(), to).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), call.rx.recv()).await;
        assert!(matches!(got, Ok(Some(_))), "the call's BYE did not arrive");
        // Reading one makes room for one: the next is queued, the one after shed.
        let first = unrouted.recv().await.unwrap();
        assert_eq!(message::call_id(&first.msg), Some("flood-0"));
        send_batch(sent, 2).await;
        sent += 2;
        wait_received(sent + 1).await;
        assert_eq!(busy(), extra + 1);
        let mut queued = 0;
        let mut last = String::new();
        while let Ok(m) = unrouted.try_recv() {
            queued += 1;
            last = message::call_id(&m.msg).unwrap_or_default().to_string();
        }
        assert_eq!(queued, UNROUTED_QUEUE);
        assert_eq!(last, format!("flood-{}", total));
    }
}
