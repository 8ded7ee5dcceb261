//! The simulated city (`campanile sim-city`): a carrier and a population of phones behind one UDP port.
//!
//! Each INVITE reaches a simulated phone whose behaviour is drawn deterministically from the profile, the
//! seed, the number and how often it was called before. What every phone actually experienced is written
//! to a ground-truth log, one JSON object per line, which tests compare the cluster's claims against:
//! `t_ms`, `number`, `call_id`, `from` (source of the request), `event` (`invite`, `ringing`, `answer`,
//! `reject`, `dtmf`, `cancel`, `bye_received`, `bye_sent`, `reinvite`, `challenge`) and `audio_ms`,
//! `code`, `digit`, `attempt` where they apply.
//!
//! Besides the phones, the profile can give the city a carrier's quirks: a Digest challenge on every
//! new INVITE (`auth`), PCMA-only answers (`alaw_only`), 183 early media (`early_media`), a channel cap
//! beyond which new calls get 503 with Retry-After (`max_channels`) and in-band-only keys
//! (`inband_dtmf`).

mod hearing;
mod phone;
pub mod profile;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub use profile::{load_profile, Behaviour, Listener, Profile, ProfileError};

use crate::sip::endpoint::{Endpoint, Inbound};
use crate::sip::message::{response_bytes, response_to, Method, SipMessage};
use crate::sip::transaction::Timers;

/// How to run a simulated city.
pub struct SimCityConfig {
    pub listen: SocketAddr,
    pub log: Option<PathBuf>,
    pub profile: Profile,
    pub seed: u64,
}

/// Why the city could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimCityError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("cannot open the ground-truth log {0}: {1}")]
    Log(PathBuf, std::io::Error),
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

/// Counters of what the city saw.
#[derive(Debug, Default)]
pub struct SimStats {
    pub calls: AtomicU64,
    pub answered: AtomicU64,
    pub dtmf: AtomicU64,
    pub active: AtomicU64,
}

pub(crate) struct Shared {
    endpoint: Endpoint,
    profile: Profile,
    seed: u64,
    timers: Timers,
    log: Mutex<Option<BufWriter<File>>>,
    attempts: Mutex<HashMap<String, u32>>,
    stats: Arc<SimStats>,
}

impl Shared {
    fn next_attempt(&self, number: &str) -> u32 {
        let mut a = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        let n = a.entry(number.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    /// Appends one event to the ground-truth log; lines never interleave.
    fn log(
        &self,
        number: &str,
        call_id: &str,
        from: SocketAddr,
        event: &str,
        extra: serde_json::Value,
    ) {
        let t_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut line = serde_json::json!({
            "t_ms": t_ms, "number": number, "call_id": call_id, "from": from.to_string(), "event": event,
        });
        if let (Some(obj), serde_json::Value::Object(more)) = (line.as_object_mut(), extra) {
            obj.extend(more);
        }
        let mut guard = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = guard.as_mut() {
            let ok = writeln!(w, "{line}").and_then(|_| w.flush());
            if let Err(e) = ok {
                tracing::error!(error = %e, "sim-city: cannot write the ground-truth log");
            }
        }
    }
}

/// A running simulated city.
pub struct SimCity {
    shared: Arc<Shared>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl SimCity {
    /// Binds the city's SIP port and starts answering.
    pub async fn start(cfg: SimCityConfig) -> Result<SimCity, SimCityError> {
        let log = match &cfg.log {
            Some(path) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| SimCityError::Log(path.clone(), e))?;
                Some(BufWriter::new(f))
            }
            None => None,
        };
        let (endpoint, unrouted) = Endpoint::bind(cfg.listen)
            .await
            .map_err(|e| SimCityError::Bind(cfg.listen, e))?;
        let shared = Arc::new(Shared {
            endpoint,
            profile: cfg.profile,
            seed: cfg.seed,
            timers: Timers::default(),
            log: Mutex::new(log),
            attempts: Mutex::default(),
            stats: Arc::default(),
        });
        let acceptor = tokio::spawn(accept(shared.clone(), unrouted));
        tracing::info!(listen = %shared.endpoint.local_addr(), "sim-city listening");
        Ok(SimCity { shared, acceptor })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.endpoint.local_addr()
    }

    pub fn stats(&self) -> Arc<SimStats> {
        self.shared.stats.clone()
    }

    /// Stops taking calls and closes the socket.
    pub async fn shutdown(self) {
        self.acceptor.abort();
        self.shared.endpoint.close();
    }
}

/// New requests: INVITEs become phone calls; strays are answered so callers do not retransmit forever.
async fn accept(shared: Arc<Shared>, mut rx: tokio::sync::mpsc::Receiver<Inbound>) {
    let mut recent: HashMap<String, Instant> = HashMap::new();
    while let Some(Inbound { msg, from }) = rx.recv().await {
        let SipMessage::Request(req) = msg else {
            continue;
        };
        match req.method {
            Method::Invite if crate::sip::message::to_tag(&req).is_none() => {
                let Some(call_id) = crate::sip::message::call_id(&req).map(str::to_string) else {
                    continue;
                };
                // A retransmission queued before the call registered its Call-ID is not a new call.
                if recent.contains_key(&call_id) {
                    continue;
                }
                if recent.len() > 50_000 {
                    recent.retain(|_, t| t.elapsed().as_secs() < 120);
                }
                recent.insert(call_id.clone(), Instant::now());
                let channel = shared.endpoint.register(&call_id);
                tokio::spawn(phone::run(shared.clone(), req, from, channel));
            }
            Method::Ack => {}
            Method::Options => {
                let ok = response_to(&req, 200, Some("simcity"), &[], None);
                let _ = shared.endpoint.send(&response_bytes(&ok), from).await;
            }
            _ => {
                let resp = response_to(&req, 481, Some("simcity"), &[], None);
                let _ = shared.endpoint.send(&response_bytes(&resp), from).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
