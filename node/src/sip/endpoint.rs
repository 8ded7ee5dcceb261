//! The transport drivers: UDP (one socket, a receive loop) or TCP (a listener for the peer's
//! connections and a pool of our own, one per remote address, RFC 3261 §18). Both parse what arrives
//! and hand each message to the call that owns its Call-ID, and both send. All protocol decisions live
//! in the sans-IO layers.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
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

/// Counters of what the receive loop saw.
#[derive(Debug, Default)]
pub struct EndpointStats {
    pub received: AtomicU64,
    /// Datagrams that were not usable SIP (malformed, oversize, missing headers).
    pub dropped_malformed: AtomicU64,
    /// Responses for no call we know.
    pub dropped_stray: AtomicU64,
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
}

#[derive(Clone)]
enum Wire {
    Udp(Arc<UdpSocket>),
    Tcp(Arc<TcpWire>),
}

/// How long we wait to open a TCP connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Open TCP connections by remote address: a writer queue each, and the tasks that serve them.
struct TcpWire {
    conns: Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<Vec<u8>>>>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    intake: Intake,
}

/// Where parsed messages go: the call that owns the Call-ID, or the unrouted queue.
#[derive(Clone)]
struct Intake {
    routes: Routes,
    stats: Arc<EndpointStats>,
    unrouted: mpsc::UnboundedSender<Inbound>,
}

/// The messages of one Call-ID; dropping it unregisters the call.
pub struct CallChannel {
    pub rx: mpsc::UnboundedReceiver<Inbound>,
    call_id: String,
    routes: Routes,
}

impl Drop for CallChannel {
    fn drop(&mut self) {
        if let Ok(mut r) = self.routes.lock() {
            r.remove(&self.call_id);
        }
    }
}

impl Endpoint {
    /// Binds `addr` and starts the receive loop. Requests for Call-IDs nobody registered (new INVITEs,
    /// stray BYEs, OPTIONS) arrive on the returned receiver.
    pub async fn bind(
        addr: SocketAddr,
    ) -> io::Result<(Endpoint, mpsc::UnboundedReceiver<Inbound>)> {
        Endpoint::bind_with(addr, Transport::Udp).await
    }

    /// Binds `addr` for the given transport (for TCP: listens there, and connects out on first send).
    pub async fn bind_with(
        addr: SocketAddr,
        transport: Transport,
    ) -> io::Result<(Endpoint, mpsc::UnboundedReceiver<Inbound>)> {
        let routes: Routes = Arc::default();
        let stats = Arc::new(EndpointStats::default());
        let (unrouted_tx, unrouted_rx) = mpsc::unbounded_channel();
        let intake = Intake {
            routes: routes.clone(),
            stats: stats.clone(),
            unrouted: unrouted_tx,
        };
        let (wire, local, receiver) = match transport {
            Transport::Udp => {
                let socket = Arc::new(UdpSocket::bind(addr).await?);
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
        }
    }

    /// Sends one message: a datagram, or on TCP over the connection to `to` (opened if there is none).
    /// Errors are reported, not retried (on UDP the transaction layer retransmits).
    pub async fn send(&self, bytes: &[u8], to: SocketAddr) -> io::Result<()> {
        match &self.wire {
            Wire::Udp(socket) => socket.send_to(bytes, to).await.map(|_| ()),
            Wire::Tcp(tcp) => {
                let open = lock(&tcp.conns)
                    .get(&to)
                    .filter(|c| !c.is_closed())
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
                        serve_connection(tcp, stream, to)
                    }
                };
                conn.send(bytes.to_vec()).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        format!("TCP connection to {to} closed"),
                    )
                })
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
                serve_connection(&tcp, stream, peer);
            }
            Err(e) => {
                tracing::debug!(error = %e, "SIP TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Registers a connection under its peer's address and starts its writer and reader; responses to
/// requests that came over it go back over it (§18.2.2).
fn serve_connection(
    tcp: &Arc<TcpWire>,
    stream: TcpStream,
    peer: SocketAddr,
) -> mpsc::UnboundedSender<Vec<u8>> {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    lock(&tcp.conns).insert(peer, tx.clone());
    let write_task = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if writer.write_all(&bytes).await.is_err() {
                break;
            }
        }
    });
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
        // Forget the connection (unless a newer one to the same peer replaced it); the writer ends
        // when its queue's last sender is gone.
        let mut conns = lock(&wire.conns);
        if conns.get(&peer).is_some_and(|c| c.same_channel(&mine)) {
            conns.remove(&peer);
        }
    });
    let mut tasks = lock(&tcp.tasks);
    tasks.retain(|t| !t.is_finished());
    tasks.push(write_task.abort_handle());
    tasks.push(read_task.abort_handle());
    tx
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
            m = channel.rx.recv() => match m {
                Some(Inbound { msg: SipMessage::Response(r), .. })
                    if message::via_branch(&r).as_deref() == Some(branch.as_str()) =>
                {
                    tx.handle_response(r, std::time::Instant::now());
                }
                Some(Inbound { msg: SipMessage::Request(req), from }) if req.method == Method::Bye => {
                    let ok = response_to(&req, 200, None, &[], None);
                    let _ = endpoint.send(&response_bytes(&ok), from).await;
                }
                Some(_) => {}
                None => return None,
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

async fn receive_loop(socket: Arc<UdpSocket>, intake: Intake) {
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
        let Some(call_id) = message::call_id(&msg).map(str::to_string) else {
            return true;
        };
        let target = self
            .routes
            .lock()
            .ok()
            .and_then(|r| r.get(&call_id).cloned());
        let inbound = Inbound { msg, from };
        match target {
            Some(tx) => {
                if let Err(mpsc::error::SendError(inbound)) = tx.send(inbound) {
                    // The call just ended; treat the message as unrouted.
                    if matches!(inbound.msg, SipMessage::Request(_)) {
                        let _ = self.unrouted.send(inbound);
                    }
                }
                true
            }
            None => match inbound.msg {
                SipMessage::Request(_) => self.unrouted.send(inbound).is_ok(),
                SipMessage::Response(_) => {
                    self.stats.dropped_stray.fetch_add(1, Ordering::Relaxed);
                    true
                }
            },
        }
    }
}
