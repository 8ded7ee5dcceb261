//! The UDP driver: one socket, a receive loop that parses datagrams and hands each message to the call
//! that owns its Call-ID, and a send function. All protocol decisions live in the sans-IO layers.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::mpsc;

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

/// A SIP endpoint bound to one UDP socket.
#[derive(Clone)]
pub struct Endpoint {
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    routes: Routes,
    stats: Arc<EndpointStats>,
    receiver: Arc<tokio::task::AbortHandle>,
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
        let socket = Arc::new(UdpSocket::bind(addr).await?);
        let local = socket.local_addr()?;
        let routes: Routes = Arc::default();
        let stats = Arc::new(EndpointStats::default());
        let (unrouted_tx, unrouted_rx) = mpsc::unbounded_channel();
        let receiver = tokio::spawn(receive_loop(
            socket.clone(),
            routes.clone(),
            stats.clone(),
            unrouted_tx,
        ));
        let ep = Endpoint {
            socket,
            local,
            routes,
            stats,
            receiver: Arc::new(receiver.abort_handle()),
        };
        Ok((ep, unrouted_rx))
    }

    /// Stops receiving; the socket closes once every clone is dropped.
    pub fn close(&self) {
        self.receiver.abort();
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

    /// Sends one datagram; errors are reported, not retried (the transaction layer retransmits).
    pub async fn send(&self, bytes: &[u8], to: SocketAddr) -> io::Result<()> {
        self.socket.send_to(bytes, to).await.map(|_| ())
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
    let branch = message::via_branch(&request).unwrap_or_default();
    let mut tx = ClientTransaction::new(request, std::time::Instant::now(), timers, false);
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

async fn receive_loop(
    socket: Arc<UdpSocket>,
    routes: Routes,
    stats: Arc<EndpointStats>,
    unrouted: mpsc::UnboundedSender<Inbound>,
) {
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
        stats.received.fetch_add(1, Ordering::Relaxed);
        let msg = match message::parse(&buf[..n]) {
            Ok(m) => m,
            Err(e) => {
                stats.dropped_malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, error = %e, "dropped malformed SIP datagram");
                continue;
            }
        };
        let Some(call_id) = message::call_id(&msg).map(str::to_string) else {
            continue;
        };
        let target = routes.lock().ok().and_then(|r| r.get(&call_id).cloned());
        let inbound = Inbound { msg, from };
        match target {
            Some(tx) => {
                if let Err(mpsc::error::SendError(inbound)) = tx.send(inbound) {
                    // The call just ended; treat the message as unrouted.
                    if matches!(inbound.msg, SipMessage::Request(_)) {
                        let _ = unrouted.send(inbound);
                    }
                }
            }
            None => match inbound.msg {
                SipMessage::Request(_) => {
                    if unrouted.send(inbound).is_err() {
                        return;
                    }
                }
                SipMessage::Response(_) => {
                    stats.dropped_stray.fetch_add(1, Ordering::Relaxed);
                }
            },
        }
    }
}
