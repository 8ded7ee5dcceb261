//! One simulated phone taking one call: the UAS side of an INVITE, driven by the sans-IO server
//! transaction, with the behaviour the profile chose, listening to the RTP it receives and pressing keys
//! as RFC 4733 events. Everything it experiences goes to the ground-truth log.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::UdpSocket;

use super::profile::{Behaviour, Listener};
use super::Shared;
use crate::media::{dtmf, rtp};
use crate::sip::dialog::Dialog;
use crate::sip::endpoint::{end_dialog, sleep_until_opt, CallChannel, Inbound};
use crate::sip::message::{
    self, random_token, response_bytes, response_to, Method, Request, SipMessage,
};
use crate::sip::sdp::{self, Codec, RemoteMedia};
use crate::sip::transaction::{Output, ServerTransaction};

/// Why `wait` returned.
enum Wake {
    Deadline,
    /// The caller CANCELled before we answered.
    Cancelled,
    /// The caller hung up.
    Bye,
    /// New audio arrived.
    Audio,
    /// A new INVITE of the same call (the caller answering our challenge).
    NewInvite(Box<Request>),
    Closed,
}

struct Media {
    socket: Arc<UdpSocket>,
    remote: RemoteMedia,
    seen: HashSet<u16>,
    last_rtp: Instant,
    /// The G.711 payload heard, in arrival order (only when the profile listens for codes).
    heard: Option<Vec<u8>>,
}

struct PhoneCall {
    shared: Arc<Shared>,
    channel: CallChannel,
    invite: Request,
    from: SocketAddr,
    number: String,
    call_id: String,
    tag: String,
    st: ServerTransaction,
    answered: bool,
    media: Option<Media>,
    /// The RTP socket bound for early media, reused by the answer.
    early_socket: Option<Arc<UdpSocket>>,
    /// The caller's Contact from its latest re-INVITE: another node that took the call over.
    moved_to: Option<String>,
    /// A CANCEL arrived and was answered 200 without 487 yet (`Profile::answer_on_cancel`).
    cancel_crossed: bool,
}

/// The caller ID a phone would show: P-Asserted-Identity (RFC 3325) when the trunk passes it, else From.
fn caller_of(invite: &Request) -> Option<String> {
    invite
        .headers
        .iter()
        .find_map(|h| match h {
            rsip::Header::Other(name, value)
                if name.eq_ignore_ascii_case("P-Asserted-Identity") =>
            {
                Some(value.clone())
            }
            _ => None,
        })
        .or_else(|| message::header_value(invite, message::HeaderName::From).map(str::to_string))
}

/// Handles one incoming INVITE to the end of its call.
pub(crate) async fn run(
    shared: Arc<Shared>,
    invite: Request,
    from: SocketAddr,
    channel: CallChannel,
) {
    let number = message::uri_user(&invite.uri.to_string())
        .unwrap_or("unknown")
        .to_string();
    let call_id = message::call_id(&invite).unwrap_or_default().to_string();
    let attempt = shared.next_attempt(&number);
    shared.stats.calls.fetch_add(1, Ordering::Relaxed);
    shared.stats.active.fetch_add(1, Ordering::Relaxed);
    shared.log(
        &number,
        &call_id,
        from,
        "invite",
        // The caller ID the trunk would present (RFC 3325), else From: what the phone's screen shows.
        json!({
            "attempt": attempt,
            "caller": caller_of(&invite),
        }),
    );
    let st = ServerTransaction::new(invite.clone(), Instant::now(), shared.timers, false);
    let mut call = PhoneCall {
        shared: shared.clone(),
        channel,
        invite,
        from,
        number,
        call_id,
        tag: random_token(10),
        st,
        answered: false,
        media: None,
        early_socket: None,
        cancel_crossed: false,
        moved_to: None,
    };
    call.respond(100, None).await;
    let over_cap = shared
        .profile
        .max_channels
        .is_some_and(|cap| shared.stats.active.load(Ordering::Relaxed) > cap);
    let behaviour = if over_cap {
        Behaviour::Congestion
    } else {
        shared.profile.behaviour(shared.seed, &call.number, attempt)
    };
    if call.authenticate().await {
        call.play(behaviour).await;
    }
    shared.stats.active.fetch_sub(1, Ordering::Relaxed);
}

impl PhoneCall {
    /// A challenging carrier: answers an INVITE without valid credentials with 401 and waits for the
    /// caller's new INVITE; false when the call ends here.
    async fn authenticate(&mut self) -> bool {
        let Some(auth) = self.shared.profile.auth.clone() else {
            return true;
        };
        // A nonce per call: the carrier does not need to remember it.
        let nonce = format!(
            "{:016x}",
            super::profile::Rng::for_call(self.shared.seed, &self.call_id, 0).next_u64()
        );
        let challenge = format!(
            "Digest realm=\"{}\", nonce=\"{nonce}\", qop=\"auth\", algorithm=MD5",
            auth.realm
        );
        let resp = response_to(
            &self.invite,
            401,
            Some(&self.tag),
            &[("WWW-Authenticate", challenge)],
            None,
        );
        self.st.respond(&resp, Instant::now());
        self.flush().await;
        self.log("challenge", json!({ "code": 401 }));
        let deadline = Instant::now() + Duration::from_secs(10);
        let new_invite = loop {
            match self.wait(Some(deadline)).await {
                Wake::NewInvite(req) => break req,
                Wake::Cancelled => {
                    self.end_cancelled().await;
                    return false;
                }
                Wake::Deadline | Wake::Closed | Wake::Bye => return false,
                Wake::Audio => {}
            }
        };
        let proof = message::header_value(&*new_invite, message::HeaderName::Authorization)
            .unwrap_or_default()
            .to_string();
        self.invite = *new_invite;
        self.st = ServerTransaction::new(
            self.invite.clone(),
            Instant::now(),
            self.shared.timers,
            false,
        );
        self.respond(100, None).await;
        let ok = crate::sip::auth::verify(
            &proof,
            "INVITE",
            &auth.username,
            &auth.password,
            &auth.realm,
            &nonce,
        );
        if !ok {
            self.reject(403).await;
        }
        ok
    }

    /// A CANCEL kept for `Profile::answer_on_cancel` that the phone did not answer after all (it
    /// was not going to): the INVITE ends with 487, as without the quirk.
    async fn end_cancelled(&mut self) {
        if self.cancel_crossed && !self.answered {
            self.log("cancel", json!({ "audio_ms": 0 }));
            self.respond(487, None).await;
        }
    }

    fn audio_ms(&self) -> u64 {
        self.media
            .as_ref()
            .map(|m| m.seen.len() as u64 * 20)
            .unwrap_or(0)
    }

    fn log(&self, event: &str, extra: serde_json::Value) {
        self.shared
            .log(&self.number, &self.call_id, self.from, event, extra);
    }

    async fn send(&self, bytes: &[u8], to: SocketAddr) {
        let _ = self.shared.endpoint.send(bytes, to).await;
    }

    async fn flush(&mut self) {
        while let Some(o) = self.st.poll_output() {
            if let Output::Transmit(b) = o {
                self.send(&b, self.from).await;
            }
        }
    }

    async fn respond(&mut self, code: u16, body: Option<(&str, Vec<u8>)>) {
        let contact = [("Contact", format!("<{}>", self.contact()))];
        let extra: &[(&str, String)] = if code < 300 && code > 100 {
            &contact
        } else {
            &[]
        };
        let tag = (code > 100).then_some(self.tag.as_str());
        let resp = response_to(&self.invite, code, tag, extra, body);
        self.st.respond(&resp, Instant::now());
        self.flush().await;
    }

    async fn play(&mut self, behaviour: Behaviour) {
        match behaviour {
            Behaviour::Invalid => self.reject(404).await,
            Behaviour::Busy => self.reject(486).await,
            Behaviour::Congestion => {
                let resp = response_to(
                    &self.invite,
                    503,
                    Some(&self.tag),
                    &[("Retry-After", "1".to_string())],
                    None,
                );
                self.log("reject", json!({ "code": 503, "audio_ms": 0 }));
                self.st.respond(&resp, Instant::now());
                self.flush().await;
            }
            Behaviour::Unreachable { after_ms } => {
                if let Wake::Deadline = self
                    .wait(Some(Instant::now() + Duration::from_millis(after_ms)))
                    .await
                {
                    self.reject(480).await;
                }
            }
            Behaviour::NoAnswer { max_ring_ms } => {
                self.ring().await;
                if let Wake::Deadline = self
                    .wait(Some(Instant::now() + Duration::from_millis(max_ring_ms)))
                    .await
                {
                    self.reject(480).await;
                }
            }
            Behaviour::Answer { delay_ms, listener } => {
                self.ring().await;
                let wake = self
                    .wait(Some(Instant::now() + Duration::from_millis(delay_ms)))
                    .await;
                if matches!(wake, Wake::Deadline) || self.cancel_crossed {
                    self.answer_and_listen(listener, None).await;
                }
            }
            Behaviour::Voicemail {
                delay_ms,
                listen_ms,
            } => {
                self.ring().await;
                if let Wake::Deadline = self
                    .wait(Some(Instant::now() + Duration::from_millis(delay_ms)))
                    .await
                {
                    self.answer_and_listen(Listener::Never, Some(listen_ms))
                        .await;
                }
            }
        }
        self.end_cancelled().await;
        // Let the transaction finish its retransmissions (ACK of a final response) before forgetting it.
        let linger = Instant::now() + Duration::from_secs(2);
        while !self.st.is_terminated() && Instant::now() < linger {
            if let Wake::Closed = self.wait(Some(linger)).await {
                break;
            }
        }
    }

    async fn ring(&mut self) {
        if self.shared.profile.early_media {
            // 183 with SDP: the carrier's own audio ("the number you called...") could flow now.
            if let Some(socket) = self.rtp_socket().await {
                let addr = socket.local_addr().ok();
                if let (Some(addr), Ok(offer)) = (addr, sdp::parse_remote(&self.invite.body)) {
                    let body = sdp::answer_with(1, addr, &[self.codec_for(&offer)], None);
                    self.respond(183, Some(("application/sdp", body.into_bytes())))
                        .await;
                    self.log("ringing", json!({ "early_media": true }));
                    return;
                }
            }
        }
        self.respond(180, None).await;
        self.log("ringing", json!({}));
    }

    /// The phone's RTP socket, bound once.
    async fn rtp_socket(&mut self) -> Option<Arc<UdpSocket>> {
        if self.early_socket.is_none() {
            let ip = self.shared.endpoint.local_addr().ip();
            self.early_socket = UdpSocket::bind(SocketAddr::new(ip, 0))
                .await
                .ok()
                .map(Arc::new);
        }
        self.early_socket.clone()
    }

    /// The codec the phone answers with: the caller's first, or PCMA on an A-law-only carrier.
    fn codec_for(&self, offer: &RemoteMedia) -> Codec {
        if self.shared.profile.alaw_only {
            Codec::Pcma
        } else {
            offer.codec
        }
    }

    /// Every end is logged before the caller can learn of it, so that in the log a caller's next
    /// call never seems to start before its previous one ended.
    async fn reject(&mut self, code: u16) {
        self.log("reject", json!({ "code": code, "audio_ms": 0 }));
        self.respond(code, None).await;
    }

    async fn answer_and_listen(&mut self, listener: Listener, listen_limit_ms: Option<u64>) {
        self.listen(listener, listen_limit_ms).await;
        let Some((heard, codec)) = self
            .media
            .as_mut()
            .and_then(|m| m.heard.take().map(|h| (h, m.remote.codec)))
        else {
            return;
        };
        let digits =
            tokio::task::spawn_blocking(move || super::hearing::digits_heard(&heard, codec))
                .await
                .unwrap_or_default();
        if !digits.is_empty() {
            self.log("heard_code", json!({ "digits": digits }));
        }
    }

    async fn listen(&mut self, listener: Listener, listen_limit_ms: Option<u64>) {
        let offer = match sdp::parse_remote(&self.invite.body) {
            Ok(o) => o,
            Err(_) => {
                self.reject(488).await;
                return;
            }
        };
        if self.shared.profile.alaw_only && !offers_pcma(&self.invite.body) {
            self.reject(488).await;
            return;
        }
        let ip = self.shared.endpoint.local_addr().ip();
        let Some(socket) = self.rtp_socket().await else {
            self.reject(500).await;
            return;
        };
        let local_rtp = socket
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(ip, 0));
        let codec = self.codec_for(&offer);
        // An in-band-only phone (or its trunk) does not take telephone-event: keys travel as tones.
        let telephone_event = offer
            .telephone_event
            .filter(|_| !self.shared.profile.inband_dtmf);
        let answer = sdp::answer_with(1, local_rtp, &[codec], telephone_event);
        let mut remote = offer;
        remote.telephone_event = telephone_event;
        remote.codec = codec;
        self.media = Some(Media {
            socket,
            remote,
            seen: HashSet::new(),
            last_rtp: Instant::now(),
            heard: self.shared.profile.hear_codes.then(Vec::new),
        });
        self.respond(200, Some(("application/sdp", answer.into_bytes())))
            .await;
        self.answered = true;
        self.shared.stats.answered.fetch_add(1, Ordering::Relaxed);
        self.log(
            "answer",
            json!({
                "codec": if codec == Codec::Pcmu { "PCMU" } else { "PCMA" },
                "crossed_cancel": self.cancel_crossed,
            }),
        );

        let media_timeout = Duration::from_millis(self.shared.profile.media_timeout_ms);
        let mut pressed = false;
        // A voicemail box plays its greeting and beep, then records: its limit counts from the beep.
        let mut beep_at = listen_limit_ms.map(|_| self.play_greeting(codec));
        let mut recorded_from: Option<u64> = None;
        loop {
            let last_rtp = self
                .media
                .as_ref()
                .map(|m| m.last_rtp)
                .unwrap_or_else(Instant::now);
            let wake = [Some(last_rtp + media_timeout), beep_at]
                .into_iter()
                .flatten()
                .min();
            if beep_at.is_some_and(|at| Instant::now() >= at) {
                beep_at = None;
                recorded_from = Some(self.audio_ms());
                self.log("beep", json!({ "audio_ms": self.audio_ms() }));
                continue;
            }
            match self.wait(wake).await {
                Wake::Bye | Wake::Closed => return,
                Wake::Cancelled | Wake::Audio | Wake::NewInvite(_) => {}
                Wake::Deadline => {
                    let idle = self
                        .media
                        .as_ref()
                        .map(|m| m.last_rtp.elapsed())
                        .unwrap_or_default();
                    if idle >= media_timeout && beep_at.is_none() {
                        self.hang_up("media_timeout").await;
                        return;
                    }
                }
            }
            let heard = self.audio_ms();
            match listener {
                Listener::PressAfter(ms) if !pressed && heard >= ms => {
                    pressed = true;
                    self.press('1').await;
                }
                Listener::HangUpAfter(ms) if heard >= ms => {
                    self.hang_up("listener").await;
                    return;
                }
                _ => {}
            }
            let recorded = recorded_from.map(|from| heard.saturating_sub(from));
            if listen_limit_ms.is_some_and(|limit| recorded.is_some_and(|r| r >= limit)) {
                self.hang_up("voicemail_full").await;
                return;
            }
        }
    }

    /// Plays the voicemail greeting and beep to the caller as RTP; returns when the beep ends.
    fn play_greeting(&self, codec: Codec) -> Instant {
        let seed = super::profile::Rng::for_call(self.shared.seed, &self.number, 7).next_u64();
        let greeting = crate::media::machine::synth::voicemail_greeting(seed);
        let ends = Instant::now() + Duration::from_millis(greeting.len() as u64 / 8);
        let Some(media) = &self.media else {
            return ends;
        };
        let (socket, dest) = (media.socket.clone(), media.remote.addr);
        tokio::spawn(async move {
            let (ssrc, mut seq, mut ts): (u32, u16, u32) =
                (rand::random(), rand::random(), rand::random());
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut out = Vec::with_capacity(172);
            for (i, frame) in greeting.chunks(160).enumerate() {
                tick.tick().await;
                let payload = match codec {
                    Codec::Pcmu => crate::media::g711::encode_ulaw(frame),
                    Codec::Pcma => crate::media::g711::encode_alaw(frame),
                };
                let h = rtp::RtpHeader {
                    payload_type: codec.payload_type(),
                    marker: i == 0,
                    sequence: seq,
                    timestamp: ts,
                    ssrc,
                };
                out.clear();
                rtp::write_packet(&h, &payload, &mut out);
                let _ = socket.send_to(&out, dest).await;
                seq = seq.wrapping_add(1);
                ts = ts.wrapping_add(frame.len() as u32);
            }
        });
        ends
    }

    /// Sends a key as RFC 4733 packets, 20 ms apart, to the caller's media address.
    async fn press(&mut self, digit: char) {
        let Some(media) = &self.media else { return };
        let packets = match media.remote.telephone_event {
            Some(pt) => {
                dtmf::dtmf_packets(digit, rand::random(), rand::random(), rand::random(), pt)
            }
            None => tone_packets(digit, media.remote.codec),
        };
        let method = if media.remote.telephone_event.is_some() {
            "rfc4733"
        } else {
            "inband"
        };
        let socket = media.socket.clone();
        let dest = media.remote.addr;
        self.shared.stats.dtmf.fetch_add(1, Ordering::Relaxed);
        self.log(
            "dtmf",
            json!({ "digit": digit.to_string(), "method": method, "audio_ms": self.audio_ms() }),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for p in packets {
                tick.tick().await;
                let _ = socket.send_to(&p, dest).await;
            }
        });
    }

    /// The phone hangs up: BYE inside the dialog, waiting (bounded) for the answer.
    async fn hang_up(&mut self, reason: &str) {
        self.log(
            "bye_sent",
            json!({ "audio_ms": self.audio_ms(), "reason": reason }),
        );
        let Ok(mut dialog) = Dialog::from_uas(&self.invite, &self.tag, &self.contact()) else {
            return;
        };
        dialog.local_cseq = 1;
        if let Some(target) = &self.moved_to {
            dialog.remote_target = target.clone();
        }
        let endpoint = self.shared.endpoint.clone();
        end_dialog(
            &endpoint,
            &mut self.channel,
            &mut dialog,
            self.shared.timers,
            self.from,
            Duration::from_secs(5),
        )
        .await;
    }

    /// Our Contact URI.
    fn contact(&self) -> String {
        format!("sip:{}@{}", self.number, self.shared.endpoint.local_addr())
    }

    /// Runs the SIP side (retransmissions, ACK, CANCEL, BYE, re-INVITE) and counts audio until
    /// something the caller of `wait` must act on happens.
    async fn wait(&mut self, until: Option<Instant>) -> Wake {
        let mut buf = [0u8; 2048];
        loop {
            let timer = self.st.poll_timeout();
            let wake_at = [timer, until]
                .into_iter()
                .flatten()
                .min()
                .map(tokio::time::Instant::from_std);
            let socket = self.media.as_ref().map(|m| m.socket.clone());
            tokio::select! {
                m = self.channel.rx.recv() => {
                    let Some(Inbound { msg, from }) = m else { return Wake::Closed };
                    if let Some(w) = self.on_sip(msg, from).await {
                        return w;
                    }
                }
                r = recv_opt(socket.as_deref(), &mut buf) => {
                    if let Some(n) = r {
                        if self.on_rtp(&buf[..n]) {
                            return Wake::Audio;
                        }
                    }
                }
                _ = sleep_until_opt(wake_at) => {
                    self.st.handle_timeout(Instant::now());
                    self.flush().await;
                    if until.is_some_and(|u| Instant::now() >= u) {
                        return Wake::Deadline;
                    }
                }
            }
        }
    }

    fn on_rtp(&mut self, packet: &[u8]) -> bool {
        let Some(media) = self.media.as_mut() else {
            return false;
        };
        let Ok((h, payload)) = rtp::parse(packet) else {
            return false;
        };
        if h.payload_type != 0 && h.payload_type != 8 {
            return false;
        }
        // Silence in the middle of the call (our caller stopped sending, or a node died and another
        // took the call over) is logged when the audio comes back.
        let gap = (!media.seen.is_empty()).then(|| media.last_rtp.elapsed());
        media.last_rtp = Instant::now();
        let new = media.seen.insert(h.sequence);
        if let (true, Some(heard)) = (new, media.heard.as_mut()) {
            // At most ten minutes: a listener, not a recorder.
            if heard.len() < 10 * 60 * 8_000 {
                heard.extend_from_slice(payload);
            }
        }
        if let Some(gap) = gap.filter(|g| *g >= MEDIA_GAP) {
            self.log(
                "media_gap",
                json!({ "gap_ms": gap.as_millis() as u64, "audio_ms": self.audio_ms() }),
            );
        }
        new
    }

    async fn on_sip(&mut self, msg: SipMessage, from: SocketAddr) -> Option<Wake> {
        let SipMessage::Request(req) = msg else {
            return None;
        };
        let now = Instant::now();
        match req.method {
            Method::Invite if message::to_tag(&req).is_none() => {
                if message::via_branch(&req) != message::via_branch(&self.invite) {
                    // A new transaction of the same call: the caller answering a challenge.
                    return Some(Wake::NewInvite(Box::new(req)));
                }
                // A retransmission of the INVITE.
                self.st.handle_retransmission();
                self.flush().await;
                None
            }
            Method::Invite => {
                // re-INVITE inside the dialog: accept it and follow the new media address, and the
                // new Contact (another node taking the call over) for our own requests.
                if from != self.from {
                    self.from = from;
                    self.moved_to = message::contact_uri(&req);
                }
                let silent_ms = self
                    .media
                    .as_ref()
                    .map_or(0, |m| m.last_rtp.elapsed().as_millis() as u64);
                self.log(
                    "reinvite",
                    json!({ "audio_ms": self.audio_ms(), "silent_ms": silent_ms }),
                );
                let local_rtp = self.media.as_ref().and_then(|m| m.socket.local_addr().ok());
                let inband = self.shared.profile.inband_dtmf;
                let mut codec = self.media.as_ref().map(|m| m.remote.codec);
                let mut telephone_event = (!inband).then_some(sdp::PT_TELEPHONE_EVENT);
                if let (Some(media), Ok(mut remote)) =
                    (self.media.as_mut(), sdp::parse_remote(&req.body))
                {
                    remote.telephone_event = remote.telephone_event.filter(|_| !inband);
                    codec = Some(remote.codec);
                    telephone_event = remote.telephone_event;
                    media.remote = remote;
                }
                // RFC 3264 §6: the answer lists only codecs of the offer; keep the one in use.
                let codecs = codec.map_or(vec![Codec::Pcmu, Codec::Pcma], |c| vec![c]);
                let body = local_rtp.map(|a| {
                    (
                        "application/sdp",
                        sdp::answer_with(2, a, &codecs, telephone_event).into_bytes(),
                    )
                });
                let contact = [("Contact", format!("<{}>", self.contact()))];
                let ok = response_to(&req, 200, None, &contact, body);
                self.send(&response_bytes(&ok), from).await;
                None
            }
            Method::Ack => {
                self.st.handle_ack(now);
                self.flush().await;
                None
            }
            Method::Cancel => {
                let ok = response_to(&req, 200, Some(&self.tag), &[], None);
                self.send(&response_bytes(&ok), from).await;
                if self.st.is_answered() {
                    return None;
                }
                if self.shared.profile.answer_on_cancel {
                    // Picked up as the CANCEL arrived: the 200 OK to the INVITE follows (`play`).
                    self.cancel_crossed = true;
                    return Some(Wake::Cancelled);
                }
                self.log("cancel", json!({ "audio_ms": 0 }));
                self.respond(487, None).await;
                Some(Wake::Cancelled)
            }
            Method::Bye => {
                let ok = response_to(&req, 200, None, &[], None);
                if self.answered {
                    self.shared.log(
                        &self.number,
                        &self.call_id,
                        from,
                        "bye_received",
                        json!({ "audio_ms": self.audio_ms() }),
                    );
                }
                self.send(&response_bytes(&ok), from).await;
                if !self.answered {
                    return None;
                }
                Some(Wake::Bye)
            }
            _ => {
                let ok = response_to(&req, 200, None, &[], None);
                self.send(&response_bytes(&ok), from).await;
                None
            }
        }
    }
}

/// Silence in a call at least this long is logged as a `media_gap` when the audio comes back.
const MEDIA_GAP: Duration = Duration::from_millis(300);

/// Whether an SDP offer lists PCMA (payload type 8) on its audio line.
fn offers_pcma(body: &[u8]) -> bool {
    std::str::from_utf8(body).is_ok_and(|text| {
        text.lines()
            .find_map(|l| l.trim_end().strip_prefix("m=audio "))
            .is_some_and(|m| m.split_whitespace().skip(2).any(|pt| pt == "8"))
    })
}

async fn recv_opt(socket: Option<&UdpSocket>, buf: &mut [u8]) -> Option<usize> {
    match socket {
        Some(s) => s.recv_from(buf).await.ok().map(|(n, _)| n),
        None => std::future::pending().await,
    }
}

/// A key as 100 ms of DTMF tones and 60 ms of silence, as G.711 RTP packets in the call's codec.
fn tone_packets(digit: char, codec: Codec) -> Vec<Vec<u8>> {
    let samples = crate::media::inband::key_tones(digit, 100, 60);
    let (ssrc, mut seq, mut ts): (u32, u16, u32) = (rand::random(), rand::random(), rand::random());
    samples
        .chunks(crate::media::inband::FRAME)
        .enumerate()
        .map(|(i, frame)| {
            let payload: Vec<u8> = match codec {
                Codec::Pcmu => crate::media::g711::encode_ulaw(frame),
                Codec::Pcma => crate::media::g711::encode_alaw(frame),
            };
            let h = rtp::RtpHeader {
                payload_type: codec.payload_type(),
                marker: i == 0,
                sequence: seq,
                timestamp: ts,
                ssrc,
            };
            let mut out = Vec::with_capacity(12 + payload.len());
            rtp::write_packet(&h, &payload, &mut out);
            seq = seq.wrapping_add(1);
            ts = ts.wrapping_add(frame.len() as u32);
            out
        })
        .collect()
}
