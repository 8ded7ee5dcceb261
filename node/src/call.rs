//! One outbound alert call, start to finish: INVITE through the trunk, ringing, answer, the message as
//! RTP, DTMF, BYE. It drives the sans-IO transaction and dialog layers with real time and returns what
//! happened in words the dialer and an operator both understand.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::media::listen::{Heard, Listener};
use crate::media::machine::MachineEvent;
use crate::media::pacer::{PacerHandle, PlayRequest, RtcpTarget, StreamHandle};
use crate::media::ports::RtpPorts;
use crate::media::socket::{RtpSocket, READ_INTERVAL};
use crate::media::PreparedAudio;
use crate::sip::auth::{Challenge, Credentials};
use crate::sip::dialog::Dialog;
use crate::sip::endpoint::{
    end_dialog, is_answer_to_invite, sleep_until_opt, spawn_request, unwanted_answer, CallChannel,
    Endpoint, Inbound,
};
use crate::sip::message::{
    self, new_branch, random_token, reason_phrase, request_bytes, response_bytes, response_to,
    status, Method, Request, RequestBuilder, SipMessage,
};
use crate::sip::sdp::{self, Codec, RemoteMedia};
use crate::sip::transaction::{ClientTransaction, Output, Timers};
use campanile_cluster::CallHandover;

/// How one call is placed.
#[derive(Clone)]
pub struct CallSpec {
    /// The number to call (user part of the Request-URI), E.164.
    pub to: String,
    /// Next hop: the trunk or the simulated city.
    pub trunk: SocketAddr,
    /// The host part written in the Request-URI and To (the trunk's domain).
    pub trunk_host: String,
    /// Caller ID: user part of From.
    pub from_user: String,
    /// Caller ID: display name of From.
    pub display_name: String,
    pub audio: PreparedAudio,
    /// Ring this long before CANCEL.
    pub ring_timeout: Duration,
    /// After the message ends, wait this long for a key press before hanging up.
    pub confirm_wait: Duration,
    pub require_confirmation: bool,
    /// Whether pressing 9 opts the citizen out (never on emergency alerts).
    pub allow_opt_out: bool,
    /// How many times the citizen may press 2 to hear the message again.
    pub max_replays: u32,
    pub timers: Timers,
    /// Digest credentials for the trunk, if it challenges.
    pub credentials: Option<Credentials>,
    /// Route header value of an outbound proxy (`<sip:proxy;lr>`): the INVITE and its CANCEL carry it,
    /// and `trunk` is then the proxy's address.
    pub outbound_proxy: Option<String>,
    /// Listen for an answering machine and, when one answers, leave the message after its beep
    /// (outcome `voicemail`) instead of talking over its greeting.
    pub detect_machines: bool,
    /// Whether keys do anything (1 confirms, 2 replays, 9 opts out). A verification call reads a
    /// code and asks nothing, so a key pressed by chance must not cut it short.
    pub listen_for_keys: bool,
    /// Send one re-INVITE this long after the answer (a trunk check: the takeover of a call by another
    /// node is a re-INVITE, so the trunk must accept one).
    pub reinvite_after: Option<Duration>,
}

impl CallSpec {
    /// A call playing `audio` to `to` through `trunk`, from `campanile`: 30 s of ringing, no
    /// confirmation asked and keys ignored, no replay, default timers, no credentials, proxy or
    /// answering-machine detection. Change what differs with struct update syntax.
    pub fn plain(to: &str, trunk: SocketAddr, audio: PreparedAudio) -> CallSpec {
        CallSpec {
            to: to.into(),
            trunk,
            trunk_host: trunk.to_string(),
            from_user: "campanile".into(),
            display_name: "Campanile".into(),
            audio,
            ring_timeout: Duration::from_secs(30),
            confirm_wait: Duration::ZERO,
            require_confirmation: false,
            allow_opt_out: false,
            max_replays: 0,
            timers: Timers::default(),
            credentials: None,
            reinvite_after: None,
            detect_machines: false,
            listen_for_keys: false,
            outbound_proxy: None,
        }
    }
}

/// The dialer's side of a call that another node may take over.
#[derive(Clone)]
pub struct HandoverHooks {
    /// Receives the dialog and the stream's position when the call is answered and whenever the
    /// message restarts (a replay, a voicemail beep).
    pub answered: mpsc::UnboundedSender<CallHandover>,
    /// Turns true when the cluster has given the call to another node: stop sending and leave
    /// without BYE (the dialog goes on there).
    pub let_go: watch::Receiver<bool>,
    /// Set before the abort of a node that is stopping gracefully: an answer that crosses that
    /// abort's CANCEL goes on (the node hands it over with its other answered calls, or aborts it
    /// again if it cannot) instead of being ended with BYE at once.
    pub stopping: Arc<AtomicBool>,
}

/// What happened on a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// The callee pressed 1.
    Confirmed {
        after: Duration,
    },
    /// The message played to the end and the call ended normally.
    Heard,
    /// The message played, no confirmation came.
    NotConfirmed,
    /// The callee hung up before the end of the message.
    HungUp {
        after: Duration,
    },
    /// An answering machine took the call; the message was played after its beep.
    Voicemail,
    OptOut,
    Busy,
    NoAnswer,
    InvalidNumber {
        code: u16,
    },
    Rejected {
        code: u16,
    },
    /// The trunk refused our credentials (or we had none to give).
    AuthRejected {
        code: u16,
    },
    /// The trunk is overloaded (503): the whole trunk backs off, the citizen is not at fault.
    TrunkUnavailable {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No response at all from the next hop.
    Unreachable,
    /// We ended the call because the campaign was cancelled or the node is stopping.
    Aborted,
    /// Another node took the call over; we left it without BYE.
    HandedOver,
    /// Taking over another node's call failed (the re-INVITE was refused or not answered).
    TakeoverFailed(String),
    /// Something local failed (socket, bad SDP from the peer ...).
    Failed(String),
}

impl fmt::Display for CallOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallOutcome::Confirmed { after } => {
                write!(
                    f,
                    "confirmed (1 pressed after {:.1} s)",
                    after.as_secs_f64()
                )
            }
            CallOutcome::Heard => f.write_str("heard"),
            CallOutcome::NotConfirmed => f.write_str("answered, message played, not confirmed"),
            CallOutcome::HungUp { after } => {
                write!(f, "hung up after {:.1} s", after.as_secs_f64())
            }
            CallOutcome::Voicemail => f.write_str("voicemail (message left after the beep)"),
            CallOutcome::OptOut => f.write_str("opted out (9 pressed)"),
            CallOutcome::Busy => f.write_str("busy"),
            CallOutcome::NoAnswer => f.write_str("no answer"),
            CallOutcome::InvalidNumber { code } => {
                write!(f, "invalid number ({code} {})", reason_phrase(*code))
            }
            CallOutcome::Rejected { code } => write!(f, "rejected {code} {}", reason_phrase(*code)),
            CallOutcome::AuthRejected { code } => write!(
                f,
                "rejected {code} {}: check the trunk's username and password",
                reason_phrase(*code)
            ),
            CallOutcome::TrunkUnavailable { code, retry_after } => {
                write!(f, "trunk unavailable ({code} {})", reason_phrase(*code))?;
                match retry_after {
                    Some(d) => write!(f, ", retry after {} s", d.as_secs()),
                    None => Ok(()),
                }
            }
            CallOutcome::Unreachable => f.write_str("unreachable (no response from the trunk)"),
            CallOutcome::Aborted => f.write_str("aborted"),
            CallOutcome::HandedOver => f.write_str("handed over to another node"),
            CallOutcome::TakeoverFailed(why) => write!(f, "takeover failed: {why}"),
            CallOutcome::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

impl CallOutcome {
    /// Success for `campanile call`: the message was delivered.
    pub fn delivered(&self) -> bool {
        matches!(self, CallOutcome::Confirmed { .. } | CallOutcome::Heard)
    }

    /// Maps the SIP result to the domain's attempt outcome.
    pub fn to_domain(&self) -> campanile_cluster::Outcome {
        use campanile_cluster::Outcome as O;
        match self {
            CallOutcome::Confirmed { .. } => O::Confirmed,
            CallOutcome::Heard => O::Heard,
            CallOutcome::NotConfirmed => O::NotConfirmed,
            CallOutcome::HungUp { after } => O::HungUp {
                after_ms: after.as_millis() as u64,
            },
            CallOutcome::Voicemail => O::Voicemail,
            CallOutcome::OptOut => O::OptOut,
            CallOutcome::Busy => O::Busy,
            CallOutcome::NoAnswer => O::NoAnswer,
            CallOutcome::InvalidNumber { code } => O::InvalidNumber { code: *code },
            CallOutcome::Rejected { code } | CallOutcome::AuthRejected { code } => {
                O::Rejected { code: *code }
            }
            CallOutcome::TrunkUnavailable { code, .. } => O::TrunkRejected { code: *code },
            CallOutcome::Unreachable | CallOutcome::Failed(_) => O::Unreachable,
            // Neither is the citizen's attempt: the call is dialled again at once.
            CallOutcome::Aborted | CallOutcome::HandedOver | CallOutcome::TakeoverFailed(_) => {
                O::Interrupted
            }
        }
    }
}

/// Maps a final error response to an outcome (RFC 3261 §21 classes).
fn outcome_for_status(resp: &message::Response) -> CallOutcome {
    let code = status(resp);
    match code {
        486 | 600 => CallOutcome::Busy,
        408 | 480 | 487 => CallOutcome::NoAnswer,
        404 | 484 | 604 => CallOutcome::InvalidNumber { code },
        503 => CallOutcome::TrunkUnavailable {
            code,
            retry_after: retry_after(resp),
        },
        _ => CallOutcome::Rejected { code },
    }
}

/// Retry-After in seconds (RFC 3261 §20.33: `120 (in a meeting);duration=3600` reads as 120 s).
fn retry_after(resp: &message::Response) -> Option<Duration> {
    let v = message::header_value(resp, message::HeaderName::RetryAfter)?;
    let secs: u64 = v
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

/// Everything a call needs from the node.
#[derive(Clone)]
pub struct CallContext {
    pub endpoint: Endpoint,
    pub pacer: PacerHandle,
    /// Where calls bind their RTP and RTCP sockets (`media.rtp_port_min`/`rtp_port_max`).
    pub ports: RtpPorts,
}

impl CallContext {
    /// Calls through `endpoint` with a pacer thread per core and the default RTP port range (a
    /// node takes its range from its config instead).
    pub fn new(endpoint: Endpoint) -> CallContext {
        CallContext::sending(endpoint, crate::media::socket::SendPath::IoUring)
    }

    /// [`CallContext::new`] with the pacer sending on `path` (`media.pacer_send`).
    pub fn sending(endpoint: Endpoint, path: crate::media::socket::SendPath) -> CallContext {
        CallContext {
            endpoint,
            pacer: crate::media::pacer::Pacer::spawn_sending(path),
            ports: RtpPorts::default(),
        }
    }
}

/// Places one call and returns its outcome. `abort` turning true ends the call early.
pub async fn place_call(
    ctx: &CallContext,
    spec: &CallSpec,
    abort: watch::Receiver<bool>,
) -> CallOutcome {
    place_call_with(ctx, spec, abort, None).await
}

/// `place_call`, reporting through `hooks` what another node needs to take the call over.
pub async fn place_call_with(
    ctx: &CallContext,
    spec: &CallSpec,
    mut abort: watch::Receiver<bool>,
    hooks: Option<HandoverHooks>,
) -> CallOutcome {
    let local = ctx.endpoint.local_addr();
    let (rtp_socket, rtcp_socket, rtp_addr) = match bind_media(&ctx.ports, local.ip()) {
        Ok(m) => m,
        Err(why) => return CallOutcome::Failed(why),
    };
    let contact = ctx.endpoint.contact(&spec.from_user);
    let via_transport = ctx.endpoint.via_transport();
    let (parts, sdp_session, invite) =
        match first_invite(spec, local, contact, via_transport, rtp_addr) {
            Ok(first) => first,
            Err(why) => return CallOutcome::Failed(why),
        };
    let mut channel = ctx.endpoint.register(&parts.call_id);
    let mut call = Call {
        ctx,
        spec,
        trunk: spec.trunk,
        channel: &mut channel,
        hooks,
    };
    // Each phase's state lives in a box of its own while it runs: the call's future, which the
    // dialer spawns (copying it into its task), stays small.
    let answered = match Box::pin(call.invite_phase(invite, &parts, &mut abort)).await {
        Ok(a) => a,
        Err(outcome) => return outcome,
    };
    let media = Media {
        rtp: rtp_socket,
        rtcp: rtcp_socket,
        sdp_session,
        sdp_version: sdp_session,
    };
    Box::pin(call.media_phase(answered, media, &mut abort, None)).await
}

/// A new call's first INVITE from `local` (Via and Contact naming it, over `via_transport`), offering
/// media at `rtp`, with a fresh Call-ID and From tag: the parts its later INVITEs reuse (one that
/// answers a challenge, one that follows a redirect), the SDP session id, and the request.
pub(crate) fn first_invite(
    spec: &CallSpec,
    local: SocketAddr,
    contact: String,
    via_transport: &'static str,
    rtp: SocketAddr,
) -> Result<(InviteParts, u64, Request), String> {
    let sdp_session = rand::random::<u32>() as u64;
    let parts = InviteParts {
        contact,
        from_tag: random_token(10),
        call_id: format!("{}@campanile", random_token(20)),
        local,
        via_transport,
        sdp: sdp::offer(sdp_session, rtp).into_bytes(),
    };
    let invite = parts
        .build(spec, None, 1, None)
        .map_err(|e| format!("cannot build INVITE: {e}"))?;
    Ok((parts, sdp_session, invite))
}

/// How long a takeover waits for the callee to accept our re-INVITE before giving the call up.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(3);

/// How long a failed takeover waits for the answer to the BYE that ends the call's dialog before
/// the citizen is called again.
const TAKEOVER_BYE_WAIT: Duration = Duration::from_secs(2);

/// The dialog a handover record describes, as this node continues it: its own Contact, and a CSeq
/// above anything the node that carried it may have sent after its last record, and above an
/// earlier continuation of the same record (one more per millisecond since the record).
fn continued_dialog(ctx: &CallContext, from_user: &str, h: &CallHandover) -> Dialog {
    let since_record = crate::dialer::now_ms().saturating_sub(h.at_ms);
    let local_cseq = h
        .local_cseq
        .saturating_add(100)
        .saturating_add(u32::try_from(since_record).unwrap_or(u32::MAX));
    Dialog {
        call_id: h.call_id.clone(),
        local_tag: h.local_tag.clone(),
        remote_tag: h.remote_tag.clone(),
        local_party: h.local_party.clone(),
        remote_party: h.remote_party.clone(),
        remote_target: h.remote_target.clone(),
        route_set: h.route_set.clone(),
        // RFC 3261 §8.1.1.5: below 2**31.
        local_cseq: local_cseq.min(i32::MAX as u32 - 1_000_000),
        remote_cseq: None,
        local_contact: ctx.endpoint.contact(from_user),
        via_transport: h.via_transport.clone(),
    }
}

/// Ends with BYE the dialog a handover record describes (a call this node let go and nobody
/// continues); `fallback_hop` is where the BYE goes when the dialog has no route. True when the
/// BYE was answered.
pub async fn end_recorded_dialog(
    ctx: &CallContext,
    from_user: &str,
    h: &CallHandover,
    timers: Timers,
    fallback_hop: SocketAddr,
) -> bool {
    let mut dialog = continued_dialog(ctx, from_user, h);
    let mut channel = ctx.endpoint.register(&h.call_id);
    channel.mark_answered(&h.remote_tag);
    end_dialog(
        &ctx.endpoint,
        &mut channel,
        &mut dialog,
        timers,
        fallback_hop,
        TAKEOVER_BYE_WAIT,
    )
    .await
}

/// Continues a call another node answered and can no longer carry: a re-INVITE inside its dialog
/// with our Contact and media address (RFC 3261 §14), then the message from where it should be now,
/// on the same RTP stream (SSRC, sequence and timestamp continue). A refused or unanswered re-INVITE
/// ends in `TakeoverFailed`, and the citizen is called again.
pub async fn resume_call(
    ctx: &CallContext,
    spec: &CallSpec,
    h: &CallHandover,
    mut abort: watch::Receiver<bool>,
    hooks: Option<HandoverHooks>,
) -> CallOutcome {
    let failed = |why: String| CallOutcome::TakeoverFailed(why);
    let Ok(committed_rtp) = h.remote_rtp.parse::<SocketAddr>() else {
        return failed(format!("unusable media address {:?}", h.remote_rtp));
    };
    let local = ctx.endpoint.local_addr();
    let (rtp_socket, rtcp_socket, rtp_addr) = match bind_media(&ctx.ports, local.ip()) {
        Ok(m) => m,
        Err(why) => return failed(why),
    };
    let codec = if h.payload_type == sdp::PT_PCMA {
        Codec::Pcma
    } else {
        Codec::Pcmu
    };
    let mut dialog = continued_dialog(ctx, &spec.from_user, h);
    let mut channel = ctx.endpoint.register(&h.call_id);
    channel.mark_answered(&h.remote_tag);
    let sdp_session = rand::random::<u32>() as u64;
    // Offer only the codec the call already uses, so the stream goes on unchanged.
    let te = h.telephone_event.or(Some(sdp::PT_TELEPHONE_EVENT));
    let body = sdp::answer_with(sdp_session, rtp_addr, &[codec], te).into_bytes();
    let reinvite = match dialog
        .request(Method::Invite, local)
        .body("application/sdp", body)
        .build()
    {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot build re-INVITE: {e}")),
    };
    let hop = dialog.next_hop().unwrap_or(spec.trunk);
    let resp = crate::sip::endpoint::request_and_wait(
        &ctx.endpoint,
        &mut channel,
        reinvite,
        hop,
        spec.timers,
        TAKEOVER_WAIT,
    )
    .await;
    let resp = match resp {
        Some(r) if status(&r) / 100 == 2 => r,
        other => {
            let mut why = match &other {
                Some(r) => format!("re-INVITE refused with {}", status(r)),
                None => "re-INVITE not answered".to_string(),
            };
            // The phone may still be in the call the previous node carried, listening to
            // silence, and would be busy for the call that follows: end that dialog first
            // (RFC 3261 §14.1: a refused re-INVITE leaves it as it was). Not after a 481: the
            // phone has no such dialog.
            if other.as_ref().map(status) != Some(481) {
                let ended = end_dialog(
                    &ctx.endpoint,
                    &mut channel,
                    &mut dialog,
                    spec.timers,
                    hop,
                    TAKEOVER_BYE_WAIT,
                )
                .await;
                why.push_str(if ended {
                    "; its dialog ended with BYE"
                } else {
                    "; BYE for its dialog not answered"
                });
            }
            return failed(why);
        }
    };
    let ack = match dialog.build(Method::Ack, local) {
        Ok(a) => request_bytes(&a),
        Err(e) => return failed(format!("cannot build ACK: {e}")),
    };
    if let Err(e) = ctx.endpoint.send(&ack, hop).await {
        tracing::debug!(error = %e, "ACK send failed");
    }
    if let Some(target) = message::contact_uri(&resp) {
        dialog.remote_target = target;
    }
    let remote = sdp::parse_remote(&resp.body).unwrap_or(RemoteMedia {
        addr: committed_rtp,
        codec,
        telephone_event: h.telephone_event,
        direction: sdp::Direction::SendRecv,
        rtcp: h.remote_rtcp.as_deref().and_then(|a| a.parse().ok()),
    });
    let now = crate::dialer::now_ms();
    let since_answer = Duration::from_millis(now.saturating_sub(h.answered_ms));
    // The stream goes on where it would be had it never stopped.
    let frames = (now.saturating_sub(h.at_ms) / 20) as usize;
    let rtp = RtpClock {
        ssrc: h.ssrc,
        seq: h.seq,
        ts: h.ts,
        packets: 0,
        frame: h.frame as usize,
    }
    .advanced(frames);
    let answered = Answered {
        dialog,
        remote,
        answered_at: Instant::now()
            .checked_sub(since_answer)
            .unwrap_or_else(Instant::now),
        ack,
    };
    let mut call = Call {
        ctx,
        spec,
        trunk: spec.trunk,
        channel: &mut channel,
        hooks,
    };
    let media = Media {
        rtp: rtp_socket,
        rtcp: rtcp_socket,
        sdp_session,
        sdp_version: sdp_session,
    };
    Box::pin(call.media_phase(answered, media, &mut abort, Some(rtp))).await
}

/// The Route header value for an outbound proxy given as a SIP URI or host:port: loose routing.
pub fn proxy_route(proxy: &str) -> String {
    let uri = message::uri_of(proxy.trim());
    let uri = if uri.starts_with("sip:") || uri.starts_with("sips:") {
        uri.to_string()
    } else {
        format!("sip:{uri}")
    };
    if uri.contains(";lr") {
        format!("<{uri}>")
    } else {
        format!("<{uri};lr>")
    }
}

/// A call's RTP and RTCP sockets (a pair from `ports`) and the RTP address for its SDP; the error
/// says what failed.
fn bind_media(
    ports: &RtpPorts,
    ip: IpAddr,
) -> Result<(Arc<RtpSocket>, Arc<RtpSocket>, SocketAddr), String> {
    let (rtp, rtcp) = ports
        .bind_pair(ip)
        .map_err(|e| format!("cannot bind RTP and RTCP sockets: {e}"))?;
    let addr = rtp.local_addr();
    Ok((Arc::new(rtp), Arc::new(rtcp), addr))
}

/// Our side of the media session.
struct Media {
    rtp: Arc<RtpSocket>,
    rtcp: Arc<RtpSocket>,
    sdp_session: u64,
    /// Raised with every new offer or answer we send (RFC 3264 §8).
    sdp_version: u64,
}

impl Media {
    fn next_sdp(&mut self) -> Vec<u8> {
        self.sdp_version += 1;
        sdp::offer_version(self.sdp_session, self.sdp_version, self.rtp.local_addr()).into_bytes()
    }
}

/// What stays the same across the INVITEs of one call (the first, and one answering a challenge).
pub(crate) struct InviteParts {
    pub(crate) call_id: String,
    from_tag: String,
    local: SocketAddr,
    via_transport: &'static str,
    contact: String,
    sdp: Vec<u8>,
}

impl InviteParts {
    fn request_uri(&self, spec: &CallSpec) -> String {
        format!("sip:{}@{}", spec.to, spec.trunk_host)
    }

    /// An INVITE with a fresh branch to `target` (the trunk's URI unless redirected); `auth` answers a
    /// 401/407 (RFC 3261 §22.2).
    fn build(
        &self,
        spec: &CallSpec,
        target: Option<&str>,
        cseq: u32,
        auth: Option<(&'static str, String)>,
    ) -> Result<Request, message::ParseError> {
        let to_uri = self.request_uri(spec);
        let uri = target.map(str::to_string).unwrap_or_else(|| to_uri.clone());
        let display = spec.display_name.replace('"', "");
        let mut b = RequestBuilder::new(Method::Invite, uri.clone())
            .header(
                "Via",
                format!(
                    "SIP/2.0/{} {};branch={};rport",
                    self.via_transport,
                    self.local,
                    new_branch()
                ),
            )
            .header("Max-Forwards", "70")
            .header(
                "From",
                format!(
                    "\"{display}\" <sip:{}@{}>;tag={}",
                    spec.from_user, self.local, self.from_tag
                ),
            )
            .header("To", format!("<{to_uri}>"))
            .header("Call-ID", self.call_id.clone())
            .header("CSeq", format!("{cseq} INVITE"))
            .header("Contact", format!("<{}>", self.contact))
            // RFC 3325: the caller ID the trunk should present, inside its trust domain.
            .header(
                "P-Asserted-Identity",
                format!("\"{display}\" <sip:{}@{}>", spec.from_user, spec.trunk_host),
            )
            .header("Allow", "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO")
            .header("User-Agent", "Campanile");
        if let Some(route) = &spec.outbound_proxy {
            b = b.header("Route", route.clone());
        }
        if let Some((name, value)) = auth {
            b = b.header(name, value);
        }
        b.body("application/sdp", self.sdp.clone()).build()
    }
}

struct Answered {
    dialog: Dialog,
    remote: RemoteMedia,
    answered_at: Instant,
    /// The 2xx's ACK, resent if the 2xx is retransmitted.
    ack: Vec<u8>,
}

impl Answered {
    /// The callee moved its media (a re-INVITE either way): send there and listen to it alone.
    fn set_remote_addr(&mut self, addr: SocketAddr, rtp: &RtpSocket) {
        self.remote.addr = addr;
        connect_media(rtp, addr);
    }
}

/// How long a BYE of ours waits for its answer (retransmitted meanwhile on UDP: at 0.5, 1.5 and
/// 3.5 s with the default T1) before the call gives up on it.
const BYE_WAIT: Duration = Duration::from_secs(4);

/// BYEs ending other branches of a forked INVITE, by the branch's tag: each BYE's Via branch and
/// the sender its answers are passed on with.
type Forks = std::collections::HashMap<String, (String, mpsc::UnboundedSender<message::Response>)>;

struct Call<'a> {
    ctx: &'a CallContext,
    spec: &'a CallSpec,
    trunk: SocketAddr,
    channel: &'a mut CallChannel,
    hooks: Option<HandoverHooks>,
}

impl Call<'_> {
    /// Reliable transports (TCP) get no retransmissions (§17.1.1.2, §17.1.2.2).
    fn reliable(&self) -> bool {
        self.ctx.endpoint.is_reliable()
    }

    /// Another branch of a forked INVITE answered too (RFC 3261 §13.2.2.4): its 2xx is ACKed
    /// (each time it comes) and its dialog ended with BYE, both sent back where it came from. The
    /// BYE runs in a transaction of its own task (retransmitted on UDP), to which this call passes
    /// the BYE's answers (`forks`: each BYE's Via branch and where its answers go).
    async fn end_fork(&self, resp: &message::Response, from: SocketAddr, forks: &mut Forks) {
        let Some(fork) = unwanted_answer(&self.ctx.endpoint, resp) else {
            return;
        };
        self.send(&fork.ack, from).await;
        if forks.contains_key(&fork.tag) {
            return;
        }
        tracing::info!(call_id = %fork.call_id, "a second branch answered the INVITE: ending it with BYE");
        let timers = self.spec.timers;
        let bye = spawn_request(&self.ctx.endpoint, fork.bye, from, timers, BYE_WAIT);
        forks.insert(fork.tag, bye);
    }

    async fn send(&self, bytes: &[u8], to: SocketAddr) {
        if let Err(e) = self.ctx.endpoint.send(bytes, to).await {
            tracing::debug!(error = %e, %to, "SIP send failed");
        }
    }

    async fn flush(&self, tx: &mut ClientTransaction) -> Vec<Output> {
        let mut events = Vec::new();
        while let Some(o) = tx.poll_output() {
            match o {
                Output::Transmit(bytes) => self.send(&bytes, self.trunk).await,
                other => events.push(other),
            }
        }
        events
    }

    /// INVITE until a final response, CANCEL on ring timeout (RFC 3261 §9.1: only after a provisional).
    async fn invite_phase(
        &mut self,
        invite: Request,
        parts: &InviteParts,
        abort: &mut watch::Receiver<bool>,
    ) -> Result<Answered, CallOutcome> {
        let start = Instant::now();
        // The INVITE in flight is the one its transaction holds (`tx.request()`).
        let mut tx = ClientTransaction::new(invite, start, self.spec.timers, self.reliable());
        let mut branch = tx.branch().unwrap_or_default();
        let mut challenged = false;
        let mut redirected = false;
        let mut cancel_tx: Option<ClientTransaction> = None;
        let mut provisional = false;
        let ring_deadline = tokio::time::Instant::from_std(start + self.spec.ring_timeout);
        let mut cancelled_for: Option<CallOutcome> = None;
        loop {
            for ev in self.flush(&mut tx).await {
                match ev {
                    Output::Response(resp) => {
                        let code = status(&resp);
                        if code < 200 {
                            provisional = true;
                            if cancelled_for.is_some() && cancel_tx.is_none() {
                                // Aborted before anything rang: the CANCEL waited for this (§9.1).
                                cancel_tx = Some(self.send_cancel(tx.request())?);
                            }
                        } else if code < 300 {
                            let answered = self.on_2xx(tx.request(), &resp).await?;
                            match cancelled_for.take() {
                                // Our CANCEL for the ring timeout crossed the 200 OK: the citizen
                                // picked up at the last moment and is listening, so the call goes
                                // on (the CANCEL has no effect on an answered INVITE, §9.2).
                                None | Some(CallOutcome::NoAnswer) => return Ok(answered),
                                // Likewise when the node is stopping: it hands answered calls over.
                                Some(CallOutcome::Aborted)
                                    if self
                                        .hooks
                                        .as_ref()
                                        .is_some_and(|h| h.stopping.load(Ordering::Acquire)) =>
                                {
                                    return Ok(answered)
                                }
                                // Aborted otherwise (lease lapsed, campaign stopped): this node
                                // may not carry the call, so it ends it with BYE.
                                Some(why) => {
                                    self.hang_up(answered.dialog).await;
                                    return Err(why);
                                }
                            }
                        } else if (code == 401 || code == 407) && cancelled_for.is_none() {
                            // RFC 3261 §22.2: answer the challenge once, in a new transaction.
                            let creds = match (&self.spec.credentials, challenged) {
                                (Some(c), false) => c,
                                _ => return Err(CallOutcome::AuthRejected { code }),
                            };
                            let challenge = Challenge::from_response(&resp).map_err(|e| {
                                CallOutcome::Failed(format!(
                                    "trunk sent an unusable challenge: {e}"
                                ))
                            })?;
                            let cseq = message::cseq(tx.request()).map(|c| c.0).unwrap_or(1) + 1;
                            // The digest covers the Request-URI actually used (after a redirect too).
                            let uri = tx.request().uri.to_string();
                            let auth =
                                challenge.answer(creds, "INVITE", &uri, &random_token(12), 1);
                            let invite = parts
                                .build(self.spec, Some(&uri), cseq, Some(auth))
                                .map_err(|e| {
                                    CallOutcome::Failed(format!("cannot build INVITE: {e}"))
                                })?;
                            (tx, branch) = self.new_invite_transaction(invite);
                            challenged = true;
                            provisional = false;
                        } else if (300..400).contains(&code)
                            && !redirected
                            && cancelled_for.is_none()
                        {
                            // Follow one redirect (RFC 3261 §8.1.3.4) to the first Contact.
                            let target = message::contact_uri(&resp)
                                .ok_or(CallOutcome::Rejected { code })?;
                            let hop = message::uri_hostport(&target)
                                .and_then(|hp| hp.parse::<SocketAddr>().ok())
                                .ok_or(CallOutcome::Rejected { code })?;
                            let cseq = message::cseq(tx.request()).map(|c| c.0).unwrap_or(1) + 1;
                            let invite = parts
                                .build(self.spec, Some(&target), cseq, None)
                                .map_err(|e| {
                                    CallOutcome::Failed(format!("cannot build INVITE: {e}"))
                                })?;
                            self.trunk = hop;
                            (tx, branch) = self.new_invite_transaction(invite);
                            redirected = true;
                            provisional = false;
                        } else {
                            return Err(cancelled_for.unwrap_or_else(|| outcome_for_status(&resp)));
                        }
                    }
                    Output::TimedOut => {
                        return Err(cancelled_for.unwrap_or(CallOutcome::Unreachable));
                    }
                    _ => {}
                }
            }
            if let Some(c) = cancel_tx.as_mut() {
                self.flush(c).await;
            }
            let next_timer = [
                tx.poll_timeout(),
                cancel_tx.as_ref().and_then(|c| c.poll_timeout()),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(tokio::time::Instant::from_std);
            let ring_armed = cancel_tx.is_none();
            tokio::select! {
                inbound = self.channel.rx.recv() => {
                    let Some(Inbound { msg, .. }) = inbound else {
                        return Err(CallOutcome::Failed("SIP endpoint stopped".into()));
                    };
                    let now = Instant::now();
                    match msg {
                        SipMessage::Response(resp) => {
                            let is_cancel = message::cseq(&resp).is_some_and(|(_, m)| m == Method::Cancel);
                            if message::via_branch(&resp).as_deref() != Some(branch.as_str()) {
                                continue;
                            }
                            if is_cancel {
                                if let Some(c) = cancel_tx.as_mut() { c.handle_response(resp, now); }
                            } else {
                                tx.handle_response(resp, now);
                            }
                        }
                        SipMessage::Request(req) => self.reject_early_request(&req).await,
                    }
                }
                _ = sleep_until_opt(next_timer) => {
                    let now = Instant::now();
                    tx.handle_timeout(now);
                    if let Some(c) = cancel_tx.as_mut() { c.handle_timeout(now); }
                }
                _ = tokio::time::sleep_until(ring_deadline), if ring_armed => {
                    if !provisional {
                        // Nothing rang: no CANCEL may be sent (§9.1); the next hop is not answering.
                        return Err(cancelled_for.unwrap_or(CallOutcome::Unreachable));
                    }
                    cancel_tx = Some(self.send_cancel(tx.request())?);
                    cancelled_for = Some(CallOutcome::NoAnswer);
                }
                changed = abort.changed(), if ring_armed && cancelled_for.is_none() => {
                    if changed.is_err() || *abort.borrow() {
                        cancelled_for = Some(CallOutcome::Aborted);
                        // RFC 3261 §9.1: no CANCEL before a provisional response; wait for one
                        // (or a 2xx, answered with ACK and BYE, or the end of the transaction)
                        // instead of leaving a phone that would ring and answer into silence.
                        if provisional {
                            cancel_tx = Some(self.send_cancel(tx.request())?);
                        }
                    }
                }
            }
        }
    }

    /// A client transaction for a re-sent INVITE (after a challenge or a redirect), and its branch.
    fn new_invite_transaction(&self, invite: Request) -> (ClientTransaction, String) {
        let tx = ClientTransaction::new(invite, Instant::now(), self.spec.timers, self.reliable());
        let branch = tx.branch().unwrap_or_default();
        (tx, branch)
    }

    /// A CANCEL for our INVITE (§9.1): same Request-URI, Call-ID, From, To, top Via and CSeq number.
    fn send_cancel(&self, invite: &Request) -> Result<ClientTransaction, CallOutcome> {
        let mut b = RequestBuilder::new(Method::Cancel, invite.uri.to_string());
        if let Some(v) = message::top_via(invite) {
            b = b.header("Via", v);
        }
        for (name, wire) in [
            (message::HeaderName::From, "From"),
            (message::HeaderName::To, "To"),
            (message::HeaderName::CallId, "Call-ID"),
        ] {
            if let Some(v) = message::header_value(invite, name) {
                b = b.header(wire, v);
            }
        }
        let n = message::cseq(invite).map(|c| c.0).unwrap_or(1);
        b = b
            .header("CSeq", format!("{n} CANCEL"))
            .header("Max-Forwards", "70");
        // §9.1: the CANCEL takes the same route as the INVITE.
        if let Some(route) = &self.spec.outbound_proxy {
            b = b.header("Route", route.clone());
        }
        let req = b
            .build()
            .map_err(|e| CallOutcome::Failed(format!("cannot build CANCEL: {e}")))?;
        Ok(ClientTransaction::new(
            req,
            Instant::now(),
            self.spec.timers,
            self.reliable(),
        ))
    }

    async fn reject_early_request(&self, req: &Request) {
        // Before the dialog exists the callee may only CANCEL-race us; answer anything else 481.
        if req.method != Method::Ack {
            let resp = response_to(req, 481, None, &[], None);
            self.send(&response_bytes(&resp), self.trunk).await;
        }
    }

    async fn on_2xx(
        &mut self,
        invite: &Request,
        resp: &message::Response,
    ) -> Result<Answered, CallOutcome> {
        let local_contact = self.ctx.endpoint.contact(&self.spec.from_user);
        let mut dialog = Dialog::from_uac(invite, resp, &local_contact)
            .map_err(|e| CallOutcome::Failed(e.to_string()))?;
        dialog.via_transport = self.ctx.endpoint.via_transport().to_string();
        let ack = dialog
            .build(Method::Ack, self.ctx.endpoint.local_addr())
            .map_err(|e| CallOutcome::Failed(e.to_string()))?;
        let ack = request_bytes(&ack);
        let hop = dialog.next_hop().unwrap_or(self.trunk);
        self.send(&ack, hop).await;
        self.channel.mark_answered(&dialog.remote_tag);
        let remote = match sdp::parse_remote(&resp.body) {
            Ok(r) => r,
            Err(e) => {
                self.hang_up(dialog).await;
                return Err(CallOutcome::Failed(format!("callee's SDP unusable: {e}")));
            }
        };
        Ok(Answered {
            dialog,
            remote,
            answered_at: Instant::now(),
            ack,
        })
    }

    /// Plays the message, listens for DTMF, hangs up.
    async fn media_phase(
        &mut self,
        mut a: Answered,
        mut media: Media,
        abort: &mut watch::Receiver<bool>,
        resumed: Option<RtpClock>,
    ) -> CallOutcome {
        let local = self.ctx.endpoint.local_addr();
        if !a.remote.accepts_audio() {
            self.hang_up(a.dialog).await;
            return CallOutcome::Failed(
                "the callee's answer does not accept audio (a=sendonly or a=inactive)".into(),
            );
        }
        connect_media(&media.rtp, a.remote.addr);
        // Keys arrive as RFC 4733 events or tones on RTP, which the call reads every
        // READ_INTERVAL, or as SIP INFO from trunks that only relay them that way.
        let mut ears = Listener::new(a.remote.telephone_event, self.spec.detect_machines);
        let mut look = tokio::time::interval(READ_INTERVAL);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What the callee said since the loop last looked at it, in the order it was said.
        let mut heard: Vec<Heard> = Vec::new();
        let mut machine = Machine::Unknown;
        // RFC 3550 §5.1: random SSRC, initial sequence number and timestamp; replays continue the
        // stream, and so does a node that takes the call over.
        let mut rtp = resumed.unwrap_or_else(|| RtpClock {
            ssrc: rand::random(),
            seq: rand::random(),
            ts: rand::random(),
            packets: 0,
            frame: 0,
        });
        let mut replays = 0;
        let (mut stream, mut message_done_at) = if rtp.frame < self.spec.audio.pcmu.len() {
            (Some(self.play(&a, &media, &rtp)), None)
        } else {
            // Taken over after the message ended: wait for the key as the first node did.
            (None, Some(tokio::time::Instant::now()))
        };
        self.report_handover(&a, &rtp);
        let mut let_go = self.hooks.as_ref().map(|h| h.let_go.clone());
        let mut handed_over = false;
        let mut remote_ended = false;
        // Other branches of a forked INVITE whose dialogs are being ended, by their tags.
        let mut forks = Forks::new();
        let mut reinvite_at = self
            .spec
            .reinvite_after
            .map(|d| tokio::time::Instant::now() + d);
        let mut reinvite: Option<ClientTransaction> = None;
        let max_call = tokio::time::sleep(
            Duration::from_secs(600) + a_duration(&self.spec.audio) * (self.spec.max_replays + 1),
        );
        tokio::pin!(max_call);
        let outcome = 'call: loop {
            for h in heard.drain(..) {
                match h {
                    // Once the message is being left on a machine, nothing it sends changes that.
                    Heard::Machine(_) if machine == Machine::Recording => {}
                    Heard::Machine(MachineEvent::Machine) if machine == Machine::Unknown => {
                        // Do not talk over the greeting: wait for the beep.
                        if let Some(s) = stream.take() {
                            s.stop();
                            rtp.advance(s.frames_sent());
                        }
                        tracing::debug!("answering machine: waiting for the beep");
                        message_done_at = None;
                        machine = Machine::AwaitingBeep {
                            until: tokio::time::Instant::now() + BEEP_WAIT,
                        };
                    }
                    Heard::Machine(MachineEvent::BeepStarted) => {
                        if let Some(s) = stream.take() {
                            s.stop();
                            rtp.advance(s.frames_sent());
                        }
                        message_done_at = None;
                        machine = Machine::AwaitingBeep {
                            until: tokio::time::Instant::now() + BEEP_END_WAIT,
                        };
                    }
                    Heard::Machine(MachineEvent::Beep) => {
                        if let Some(s) = stream.take() {
                            s.stop();
                            rtp.advance(s.frames_sent());
                        }
                        rtp.frame = 0;
                        stream = Some(self.play(&a, &media, &rtp));
                        self.report_handover(&a, &rtp);
                        message_done_at = None;
                        machine = Machine::Recording;
                    }
                    Heard::Machine(_) => {}
                    // A machine's keys (or its greeting's tones) never confirm anything.
                    Heard::Key(_) if machine != Machine::Unknown || !self.spec.listen_for_keys => {}
                    Heard::Key('1') => {
                        break 'call CallOutcome::Confirmed {
                            after: a.answered_at.elapsed(),
                        }
                    }
                    Heard::Key('9') if self.spec.allow_opt_out => break 'call CallOutcome::OptOut,
                    Heard::Key('2') if replays < self.spec.max_replays => {
                        replays += 1;
                        if let Some(s) = stream.take() {
                            s.stop();
                            rtp.advance(s.frames_sent());
                        }
                        rtp.frame = 0;
                        stream = Some(self.play(&a, &media, &rtp));
                        self.report_handover(&a, &rtp);
                        message_done_at = None;
                    }
                    Heard::Key(_) => {}
                }
            }
            let confirm_deadline = message_done_at.map(|t| t + self.spec.confirm_wait);
            let reinvite_timer = reinvite
                .as_ref()
                .and_then(|t| t.poll_timeout())
                .map(tokio::time::Instant::from_std);
            let beep_deadline = match machine {
                Machine::AwaitingBeep { until } => Some(until),
                _ => None,
            };
            tokio::select! {
                _ = look.tick() => ears.look(&media.rtp, a.remote.addr, &mut heard),
                _ = sleep_until_opt(beep_deadline), if beep_deadline.is_some() => {
                    // A greeting without a beep we could hear: leave the message now.
                    rtp.frame = 0;
                    stream = Some(self.play(&a, &media, &rtp));
                    self.report_handover(&a, &rtp);
                    message_done_at = None;
                    machine = Machine::Recording;
                }
                _ = wait_stream(stream.as_ref()), if stream.is_some() && message_done_at.is_none() => {
                    if machine == Machine::Recording {
                        break CallOutcome::Voicemail;
                    }
                    message_done_at = Some(tokio::time::Instant::now());
                }
                _ = sleep_until_opt(confirm_deadline), if confirm_deadline.is_some() => {
                    break if self.spec.require_confirmation { CallOutcome::NotConfirmed } else { CallOutcome::Heard };
                }
                _ = sleep_until_opt(reinvite_at), if reinvite_at.is_some() => {
                    reinvite_at = None;
                    let body = media.next_sdp();
                    match a.dialog.request(Method::Invite, local).body("application/sdp", body).build() {
                        Ok(req) => {
                            let mut tx = ClientTransaction::new(req, Instant::now(), self.spec.timers, self.reliable());
                            self.drive_reinvite(&mut tx, &mut a, stream.as_ref(), &media.rtp).await;
                            reinvite = Some(tx);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot build re-INVITE"),
                    }
                }
                _ = sleep_until_opt(reinvite_timer), if reinvite_timer.is_some() => {
                    if let Some(tx) = reinvite.as_mut() {
                        tx.handle_timeout(Instant::now());
                        self.drive_reinvite(tx, &mut a, stream.as_ref(), &media.rtp).await;
                    }
                }
                inbound = self.channel.rx.recv() => {
                    let Some(Inbound { msg, from }) = inbound else {
                        break CallOutcome::Failed("SIP endpoint stopped".into());
                    };
                    match msg {
                        SipMessage::Request(req) if req.method == Method::Bye => {
                            let ok = response_to(&req, 200, None, &[], None);
                            self.send(&response_bytes(&ok), from).await;
                            remote_ended = true;
                            let after = a.answered_at.elapsed();
                            if machine != Machine::Unknown {
                                // The box hung up: a message fully played is left, anything else is not.
                                break if machine == Machine::Recording && message_done_at.is_some() {
                                    CallOutcome::Voicemail
                                } else {
                                    CallOutcome::HungUp { after }
                                };
                            }
                            // Keys pressed before the hang-up win over it, even those still
                            // unread on the RTP socket.
                            if late_one(&mut ears, &media.rtp, a.remote.addr).await {
                                break CallOutcome::Confirmed { after };
                            }
                            break match message_done_at {
                                Some(_) if !self.spec.require_confirmation => CallOutcome::Heard,
                                Some(_) => CallOutcome::NotConfirmed,
                                None => CallOutcome::HungUp { after },
                            };
                        }
                        SipMessage::Request(req) => {
                            // Other in-dialog requests (re-INVITE, INFO, OPTIONS): 200 keeps the call; a
                            // re-INVITE moves or holds our stream and is answered with our SDP, an INFO
                            // may carry a key.
                            let code = if a.dialog.accept_remote_cseq(&req) { 200 } else { 500 };
                            if req.method == Method::Info && code == 200 {
                                let ct = message::header_value(&req, message::HeaderName::ContentType).unwrap_or("");
                                if let Some(d) = crate::media::dtmf::digit_from_info(ct, &req.body) {
                                    heard.push(Heard::Key(d));
                                }
                            }
                            if req.method == Method::Invite && code == 200 && !req.body.is_empty() {
                                if let Ok(remote) = sdp::parse_remote(&req.body) {
                                    self.follow_remote(&mut a, remote, &mut stream, &media, &mut rtp);
                                }
                            }
                            let body = (req.method == Method::Invite && code == 200)
                                .then(|| ("application/sdp", media.next_sdp()));
                            let extra = [("Contact", format!("<{}>", a.dialog.local_contact))];
                            if req.method != Method::Ack {
                                let resp = response_to(&req, code, None, &extra, body);
                                self.send(&response_bytes(&resp), from).await;
                            }
                        }
                        SipMessage::Response(resp) => {
                            let ours = reinvite.as_ref().and_then(|t| t.branch());
                            let branch = message::via_branch(&resp);
                            let fork_bye = forks.values().find(|(b, _)| Some(b) == branch.as_ref());
                            if let Some((_, answers)) = fork_bye {
                                let _ = answers.send(resp);
                            } else if ours.is_some() && branch == ours {
                                if let Some(tx) = reinvite.as_mut() {
                                    tx.handle_response(resp, Instant::now());
                                    self.drive_reinvite(tx, &mut a, stream.as_ref(), &media.rtp).await;
                                }
                            } else if is_answer_to_invite(&resp) {
                                if message::to_tag(&resp) == Some(a.dialog.remote_tag.as_str()) {
                                    // A retransmitted 2xx means our ACK was lost (§13.2.2.4).
                                    let hop = a.dialog.next_hop().unwrap_or(self.trunk);
                                    self.send(&a.ack, hop).await;
                                } else {
                                    self.end_fork(&resp, from, &mut forks).await;
                                }
                            }
                        }
                    }
                }
                changed = abort.changed() => {
                    if changed.is_err() || *abort.borrow() {
                        break CallOutcome::Aborted;
                    }
                }
                _ = until_true(let_go.as_mut()), if let_go.is_some() => {
                    handed_over = true;
                    break CallOutcome::HandedOver;
                }
                _ = &mut max_call => break CallOutcome::Failed("call exceeded its maximum duration".into()),
            }
        };
        if let Some(s) = stream.take() {
            s.stop();
        }
        let outcome = if handed_over {
            // The dialog goes on at the node that takes it over: no BYE from here, unless the
            // citizen pressed 1 as the call left. That 1 is still this node's to hear (the rest of
            // the key's packets keep coming here), and the log takes it from a node that carried
            // the attempt before. Then this node hangs up: nobody continues a confirmed call (a
            // lapsed lease may have let it go with no node to take it), and a new owner's
            // re-INVITE is answered 481 while the log keeps the 1.
            if late_one(&mut ears, &media.rtp, a.remote.addr).await {
                self.hang_up(a.dialog.clone()).await;
                CallOutcome::Confirmed {
                    after: a.answered_at.elapsed(),
                }
            } else {
                outcome
            }
        } else if remote_ended {
            outcome
        } else {
            self.hang_up(a.dialog.clone()).await;
            // Keys pressed just before our BYE (still unread on the RTP socket) or while it is in
            // flight still count: the citizen did hear the alert. Also when we hung up early (a
            // lapsed lease, a cancel): a 1 is a 1.
            match outcome {
                CallOutcome::NotConfirmed | CallOutcome::Heard | CallOutcome::Aborted
                    if late_one(&mut ears, &media.rtp, a.remote.addr).await =>
                {
                    CallOutcome::Confirmed {
                        after: a.answered_at.elapsed(),
                    }
                }
                o => o,
            }
        };
        outcome
    }

    /// Sends what our re-INVITE's transaction has to send and acts on its final response: a 2xx is
    /// ACKed and its SDP followed; a failure leaves the session as it was (RFC 3261 §14.1).
    async fn drive_reinvite(
        &self,
        tx: &mut ClientTransaction,
        a: &mut Answered,
        stream: Option<&StreamHandle>,
        rtp: &RtpSocket,
    ) {
        let hop = a.dialog.next_hop().unwrap_or(self.trunk);
        while let Some(o) = tx.poll_output() {
            match o {
                Output::Transmit(bytes) => self.send(&bytes, hop).await,
                Output::Response(resp) if status(&resp) / 100 == 2 => {
                    match a.dialog.build(Method::Ack, self.ctx.endpoint.local_addr()) {
                        Ok(ack) => {
                            a.ack = request_bytes(&ack);
                            self.send(&a.ack, hop).await;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot build ACK for re-INVITE"),
                    }
                    if let Ok(remote) = sdp::parse_remote(&resp.body) {
                        // Connect first, then move the stream (see `PlayRequest`).
                        a.set_remote_addr(remote.addr, rtp);
                        if let Some(s) = stream {
                            s.set_dest(remote.addr);
                        }
                        a.remote.rtcp = remote.rtcp;
                    }
                    tracing::info!(code = status(&resp), "re-INVITE accepted");
                }
                Output::Response(resp) if status(&resp) >= 300 => {
                    tracing::warn!(
                        code = status(&resp),
                        "re-INVITE refused; the call continues as it was"
                    );
                }
                Output::TimedOut => {
                    tracing::warn!("re-INVITE got no answer; the call continues as it was")
                }
                _ => {}
            }
        }
    }

    /// Applies the other side's new SDP (a re-INVITE): a new address moves our stream, `sendonly` or
    /// `inactive` (hold) pauses it, and taking the call off hold resumes the message where it stopped.
    fn follow_remote(
        &self,
        a: &mut Answered,
        remote: RemoteMedia,
        stream: &mut Option<StreamHandle>,
        media: &Media,
        rtp: &mut RtpClock,
    ) {
        let was_held = !a.remote.accepts_audio();
        a.set_remote_addr(remote.addr, &media.rtp);
        a.remote.rtcp = remote.rtcp;
        a.remote.direction = remote.direction;
        match (was_held, a.remote.accepts_audio()) {
            (false, false) => {
                if let Some(s) = stream.take() {
                    s.stop();
                    rtp.advance(s.frames_sent());
                }
            }
            (true, true) if stream.is_none() => *stream = Some(self.play(a, media, rtp)),
            _ => {
                if let Some(s) = stream.as_ref() {
                    s.set_dest(a.remote.addr);
                }
            }
        }
    }

    /// Tells the dialer what another node needs to continue this call: the dialog and where the
    /// stream that was just (re)started stands.
    fn report_handover(&self, a: &Answered, rtp: &RtpClock) {
        let Some(hooks) = &self.hooks else {
            return;
        };
        let d = &a.dialog;
        let now = crate::dialer::now_ms();
        let _ = hooks.answered.send(CallHandover {
            call_id: d.call_id.clone(),
            local_tag: d.local_tag.clone(),
            remote_tag: d.remote_tag.clone(),
            local_party: d.local_party.clone(),
            remote_party: d.remote_party.clone(),
            remote_target: d.remote_target.clone(),
            route_set: d.route_set.clone(),
            local_cseq: d.local_cseq,
            via_transport: d.via_transport.clone(),
            remote_rtp: a.remote.addr.to_string(),
            remote_rtcp: a.remote.rtcp.map(|r| r.to_string()),
            payload_type: a.remote.codec.payload_type(),
            telephone_event: a.remote.telephone_event,
            ssrc: rtp.ssrc,
            at_ms: now,
            frame: rtp.frame as u32,
            seq: rtp.seq,
            ts: rtp.ts,
            answered_ms: now.saturating_sub(a.answered_at.elapsed().as_millis() as u64),
            moved_from: Vec::new(),
        });
    }

    /// Plays the message from the clock's frame, continuing the RTP stream where `rtp` says it is.
    fn play(&self, a: &Answered, media: &Media, rtp: &RtpClock) -> StreamHandle {
        let frames = match a.remote.codec {
            Codec::Pcmu => self.spec.audio.pcmu.clone(),
            Codec::Pcma => self.spec.audio.pcma.clone(),
        };
        self.ctx.pacer.play(PlayRequest {
            socket: media.rtp.clone(),
            dest: a.remote.addr,
            frames,
            payload_type: a.remote.codec.payload_type(),
            ssrc: rtp.ssrc,
            start_frame: rtp.frame,
            initial_seq: rtp.seq,
            initial_ts: rtp.ts,
            initial_packets: rtp.packets,
            rtcp: a.remote.rtcp.map(|dest| RtcpTarget {
                socket: media.rtcp.clone(),
                dest,
            }),
        })
    }

    /// BYE through a transaction (retransmitted on UDP until answered), waiting at most
    /// [`BYE_WAIT`] for its answer.
    async fn hang_up(&mut self, mut dialog: Dialog) {
        let (endpoint, timers) = (&self.ctx.endpoint, self.spec.timers);
        end_dialog(
            endpoint,
            self.channel,
            &mut dialog,
            timers,
            self.trunk,
            BYE_WAIT,
        )
        .await;
    }
}

/// Whether the callee pressed 1 among the keys still queued on the call's RTP socket, or arriving
/// within one more [`READ_INTERVAL`]: for a call ending without a 1 (the callee's BYE, our BYE, a
/// move to another node), whose key pressed a moment before must not be lost with it. Over a
/// network the key's RTP may come a little after the BYE that followed it.
async fn late_one(ears: &mut Listener, rtp: &RtpSocket, callee: SocketAddr) -> bool {
    let mut heard = Vec::new();
    ears.look(rtp, callee, &mut heard);
    if !heard.contains(&Heard::Key('1')) {
        tokio::time::sleep(READ_INTERVAL).await;
        ears.look(rtp, callee, &mut heard);
    }
    heard.contains(&Heard::Key('1'))
}

/// Where our outgoing RTP stream is: replays of the message, and the message resumed after a hold,
/// continue it without gaps.
struct RtpClock {
    ssrc: u32,
    seq: u16,
    ts: u32,
    /// Packets sent on this SSRC (for sender reports).
    packets: u32,
    /// The frame of the message the next stream starts from.
    frame: usize,
}

impl RtpClock {
    /// The clock `frames` frames later.
    fn advanced(mut self, frames: usize) -> RtpClock {
        self.advance(frames);
        self
    }

    fn advance(&mut self, frames: usize) {
        self.packets = self.packets.wrapping_add(frames as u32);
        self.frame += frames;
        self.seq = self.seq.wrapping_add(frames as u16);
        self.ts = self
            .ts
            .wrapping_add((frames * crate::media::message::FRAME) as u32);
    }
}

fn a_duration(audio: &PreparedAudio) -> Duration {
    Duration::from_millis(audio.pcmu.len() as u64 * 20)
}

/// Waits until the switch turns true (forever if it is gone: nobody can throw it any more).
async fn until_true(rx: Option<&mut watch::Receiver<bool>>) {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn wait_stream(stream: Option<&StreamHandle>) {
    match stream {
        Some(s) => s.wait_finished().await,
        None => std::future::pending().await,
    }
}

/// How long we wait for the beep after judging the callee a machine.
const BEEP_WAIT: Duration = Duration::from_secs(10);
/// How long a beep may go on once heard (boxes often send nothing after it, so its end may not come).
const BEEP_END_WAIT: Duration = Duration::from_millis(800);

/// What we know about an answering machine on the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Machine {
    /// A person, or nothing judged yet.
    Unknown,
    /// A machine's greeting is playing; the message starts at the beep or at `until`.
    AwaitingBeep { until: tokio::time::Instant },
    /// The message is being left on the machine.
    Recording,
}

/// Connects the call's RTP socket to the callee's media address: the kernel then passes on only the
/// callee's datagrams, and the pacer sends without naming the address (a route lookup less per
/// packet; `campanile bench media`). Not being able to is no reason to end the call: the socket then
/// listens to everyone and the [`Listener`] picks the callee's datagrams out, as it always does.
fn connect_media(rtp: &RtpSocket, callee: SocketAddr) {
    if let Err(e) = rtp.connect(callee) {
        tracing::debug!(error = %e, "cannot connect the RTP socket to the callee's media address");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next request `phone` receives, and from where.
    async fn next_request(phone: &tokio::net::UdpSocket) -> (Request, SocketAddr) {
        let mut buf = vec![0u8; 8192];
        loop {
            let got = tokio::time::timeout(Duration::from_secs(10), phone.recv_from(&mut buf));
            let (n, from) = got.await.expect("a request within 10 s").unwrap();
            if let Ok(SipMessage::Request(req)) = message::parse(&buf[..n]) {
                return (req, from);
            }
        }
    }

    /// Two branches of a forked INVITE answer (RFC 3261 §13.2.2.4): the call goes on with the first,
    /// and the second's dialog is ended with a BYE that is retransmitted until answered (this phone
    /// leaves the first one unanswered), also once the call itself has ended.
    #[tokio::test]
    async fn the_bye_ending_a_forked_answer_is_retransmitted_until_answered() {
        let phone = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let phone_addr = phone.local_addr().unwrap();
        let media = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (endpoint, _unrouted) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let ctx = CallContext::new(endpoint);
        // 200 ms of message: the call ends by itself soon after it is answered.
        let audio = crate::media::message::PreparedAudio::from_samples(vec![0; 1_600]);
        let spec = CallSpec::plain("1000", phone_addr, audio);
        let (_abort, abort) = watch::channel(false);
        let call = tokio::spawn(async move { place_call(&ctx, &spec, abort).await });

        let (invite, caller) = next_request(&phone).await;
        assert_eq!(invite.method, Method::Invite);
        let port = media.local_addr().unwrap().port();
        let sdp = format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
        );
        let contact = [("Contact", format!("<sip:1000@{phone_addr}>"))];
        for tag in ["first", "fork"] {
            let body = Some(("application/sdp", sdp.clone().into_bytes()));
            let ok = response_to(&invite, 200, Some(tag), &contact, body);
            phone.send_to(&response_bytes(&ok), caller).await.unwrap();
        }
        let mut fork_byes = Vec::new();
        let mut call_ended = false;
        while fork_byes.len() < 2 || !call_ended {
            let (req, from) = next_request(&phone).await;
            if req.method != Method::Bye {
                continue;
            }
            let fork = message::to_tag(&req) == Some("fork");
            if fork {
                fork_byes.push(message::via_branch(&req));
            }
            // The fork's first BYE goes unanswered, as if lost.
            if !fork || fork_byes.len() == 2 {
                let ok = response_to(&req, 200, None, &[], None);
                phone.send_to(&response_bytes(&ok), from).await.unwrap();
            }
            call_ended |= !fork;
        }
        assert_eq!(
            fork_byes[0], fork_byes[1],
            "the same transaction, retransmitted"
        );
        let outcome = tokio::time::timeout(Duration::from_secs(10), call).await;
        assert!(matches!(outcome, Ok(Ok(CallOutcome::Heard))), "{outcome:?}");
    }

    /// How an answered call leaves this node right after the callee's key reached its RTP socket.
    #[derive(Clone, Copy, Debug)]
    enum Leaves {
        /// The callee hangs up.
        Bye,
        /// The cluster moves the call to another node (`HandoverHooks::let_go`).
        LetGo,
        /// The campaign is cancelled: we hang up.
        Cancel,
    }

    /// Answers a call with telephone-event, waits for its audio, sends the first packet of a 1 to
    /// its RTP socket and at once ends the call as `leaves` says; answers the call's outcome and
    /// whether the phone got a BYE from it.
    async fn one_then(leaves: Leaves) -> (CallOutcome, bool) {
        let phone = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let phone_addr = phone.local_addr().unwrap();
        let media = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (endpoint, _unrouted) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let ctx = CallContext::new(endpoint);
        // 10 s of message: the call is playing when the key comes.
        let audio = crate::media::message::PreparedAudio::from_samples(vec![0; 80_000]);
        let mut spec = CallSpec::plain("1000", phone_addr, audio);
        spec.require_confirmation = true;
        spec.listen_for_keys = true;
        spec.confirm_wait = Duration::from_secs(10);
        let (abort_tx, abort) = watch::channel(false);
        let (let_go_tx, let_go) = watch::channel(false);
        let (answered, _reports) = mpsc::unbounded_channel();
        let hooks = HandoverHooks {
            answered,
            let_go,
            stopping: Arc::default(),
        };
        let call =
            tokio::spawn(async move { place_call_with(&ctx, &spec, abort, Some(hooks)).await });

        let (invite, caller) = next_request(&phone).await;
        let ours = sdp::parse_remote(&invite.body).unwrap().addr;
        let port = media.local_addr().unwrap().port();
        let answer = format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n\
             a=rtpmap:101 telephone-event/8000\r\n"
        );
        let contact = format!("<sip:1000@{phone_addr}>");
        let ok = response_to(
            &invite,
            200,
            Some("phone"),
            &[("Contact", contact.clone())],
            Some(("application/sdp", answer.into_bytes())),
        );
        phone.send_to(&response_bytes(&ok), caller).await.unwrap();
        // Our audio arrives: the call is in its media phase and it reads its RTP socket.
        let mut buf = [0u8; 1500];
        tokio::time::timeout(Duration::from_secs(10), media.recv_from(&mut buf))
            .await
            .expect("audio within 10 s")
            .unwrap();
        // From now on the phone answers a BYE at once, as a phone on a LAN would.
        let phone = Arc::new(phone);
        let answering = phone.clone();
        let bye = Arc::new(AtomicBool::new(false));
        let got = bye.clone();
        let answerer = tokio::spawn(async move {
            loop {
                let (req, from) = next_request(&answering).await;
                if req.method == Method::Bye {
                    got.store(true, Ordering::Relaxed);
                    let ok = response_to(&req, 200, None, &[], None);
                    answering.send_to(&response_bytes(&ok), from).await.unwrap();
                    return;
                }
            }
        });
        let key = crate::media::dtmf::dtmf_packets('1', 5, 1, 160, 101);
        media.send_to(&key[0], ours).await.unwrap();
        match leaves {
            Leaves::Bye => {
                let mut dialog = Dialog::from_uas(&invite, "phone", &contact).unwrap();
                let bye = dialog.build(Method::Bye, phone_addr).unwrap();
                phone.send_to(&request_bytes(&bye), caller).await.unwrap();
            }
            Leaves::LetGo => {
                let_go_tx.send_replace(true);
            }
            Leaves::Cancel => {
                abort_tx.send_replace(true);
            }
        }
        // The rest of the key's packets, 20 ms apart, as a phone sends them.
        for p in &key[1..] {
            tokio::time::sleep(Duration::from_millis(20)).await;
            media.send_to(p, ours).await.unwrap();
        }
        let outcome = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the call ends")
            .unwrap();
        answerer.abort();
        (outcome, bye.load(Ordering::Relaxed))
    }

    /// A citizen who presses 1 and hangs up at once: the BYE comes while the key's packets still
    /// wait on the RTP socket, which is read every 100 ms. The 1 counts.
    #[tokio::test]
    async fn a_one_pressed_just_before_the_callee_hangs_up_counts() {
        let (outcome, bye) = one_then(Leaves::Bye).await;
        assert!(
            matches!(outcome, CallOutcome::Confirmed { .. }),
            "{outcome:?}"
        );
        assert!(!bye, "the callee ended the dialog: no BYE of ours");
    }

    /// The campaign is cancelled just as the citizen presses 1: our BYE goes out and is answered
    /// before the RTP socket is read again. The 1 counts.
    #[tokio::test]
    async fn a_one_pressed_just_before_our_bye_counts() {
        let (outcome, bye) = one_then(Leaves::Cancel).await;
        assert!(
            matches!(outcome, CallOutcome::Confirmed { .. }),
            "{outcome:?}"
        );
        assert!(bye);
    }

    /// The call is let go (moved to another node, or a lapsed lease) just as the citizen presses 1
    /// (the rest of the key's packets still come here): this node keeps the citizen's 1, and hangs
    /// up rather than leave the citizen in a call nobody may be playing to.
    #[tokio::test]
    async fn a_one_pressed_as_the_call_moves_to_another_node_counts_here() {
        let (outcome, bye) = one_then(Leaves::LetGo).await;
        assert!(
            matches!(outcome, CallOutcome::Confirmed { .. }),
            "{outcome:?}"
        );
        assert!(bye, "the citizen who pressed 1 is hung up on");
    }
}
