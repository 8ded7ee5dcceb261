//! RFC 3261 §17 transactions as sans-IO state machines.
//!
//! A transaction takes messages and `now`, and hands back what to transmit, what the transaction user
//! must hear about, and when it wants to be woken (`poll_timeout`). It never reads a clock or touches a
//! socket, so tests replay §17's timer schedules exactly with virtual time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::message::{
    self, header_value, request_bytes, response_bytes, status, HeaderName, Method, Request,
    Response,
};

/// RFC 3261 timer base values (§17.1.1.1, Table 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// RTT estimate (default 500 ms).
    pub t1: Duration,
    /// Maximum retransmit interval for non-INVITE requests and INVITE responses (default 4 s).
    pub t2: Duration,
    /// Maximum time a message remains in the network (default 5 s).
    pub t4: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

/// What a transaction asks of its driver or tells its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send these bytes to the transaction's peer.
    Transmit(Vec<u8>),
    /// A response for the transaction user (client transactions; retransmissions are absorbed).
    Response(Response),
    /// An ACK for a non-2xx final response arrived (INVITE server transaction).
    Acked,
    /// Timer B, F or H fired: the peer never answered (§17.1.1.2, §17.1.2.2, §17.2.1).
    TimedOut,
    /// The transaction is over and can be forgotten.
    Terminated,
}

/// The earliest of a transaction's armed timers.
fn earliest(timers: [Option<Instant>; 3]) -> Option<Instant> {
    timers.into_iter().flatten().min()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Invite,
    NonInvite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    Calling,
    Proceeding,
    Completed,
    Terminated,
}

/// A client transaction (§17.1): one request we sent, its retransmissions and its responses.
#[derive(Debug)]
pub struct ClientTransaction {
    kind: Kind,
    state: ClientState,
    request: Request,
    wire: Vec<u8>,
    reliable: bool,
    timers: Timers,
    /// Current retransmit interval (Timer A or E).
    interval: Duration,
    retransmit_at: Option<Instant>,
    /// Timer B or F.
    give_up_at: Option<Instant>,
    /// Timer D or K.
    linger_until: Option<Instant>,
    ack: Option<Vec<u8>>,
    out: VecDeque<Output>,
}

impl ClientTransaction {
    /// Starts a client transaction for `request` and queues its first transmission.
    /// `reliable` is true over TCP, where retransmission timers A and E are not used.
    pub fn new(request: Request, now: Instant, timers: Timers, reliable: bool) -> Self {
        let kind = if request.method == Method::Invite {
            Kind::Invite
        } else {
            Kind::NonInvite
        };
        let wire = request_bytes(&request);
        let mut tx = ClientTransaction {
            kind,
            state: ClientState::Calling,
            request,
            wire: wire.clone(),
            reliable,
            timers,
            interval: timers.t1,
            retransmit_at: None,
            // Timer B and F are both 64*T1.
            give_up_at: Some(now + timers.t1 * 64),
            linger_until: None,
            ack: None,
            out: VecDeque::new(),
        };
        tx.out.push_back(Output::Transmit(wire));
        if !reliable {
            // RFC 3261 §17.1.1.2 / §17.1.2.2: Timer A / E start at T1.
            tx.retransmit_at = Some(now + timers.t1);
        }
        tx
    }

    /// The branch that identifies this transaction.
    pub fn branch(&self) -> Option<String> {
        message::via_branch(&self.request)
    }

    pub fn request(&self) -> &Request {
        &self.request
    }

    pub fn method(&self) -> &Method {
        &self.request.method
    }

    pub fn is_terminated(&self) -> bool {
        self.state == ClientState::Terminated
    }

    /// Feeds a response whose top Via branch matched this transaction (§17.1.3).
    pub fn handle_response(&mut self, resp: Response, now: Instant) {
        let code = status(&resp);
        match (self.kind, self.state) {
            (_, ClientState::Terminated) => {}
            (Kind::Invite, ClientState::Calling | ClientState::Proceeding) => {
                if code < 200 {
                    // §17.1.1.2: a provisional response stops Timer A.
                    self.state = ClientState::Proceeding;
                    self.retransmit_at = None;
                    self.out.push_back(Output::Response(resp));
                } else if code < 300 {
                    // The 2xx is acknowledged by the TU end to end; the transaction ends (§17.1.1.2).
                    self.out.push_back(Output::Response(resp));
                    self.terminate();
                } else {
                    // The ACK is built from messages that already parsed; if that ever failed, sending
                    // nothing is right: the server retransmits its response until Timer H.
                    if let Some(ack) = self.build_ack(&resp).map(|a| request_bytes(&a)) {
                        self.out.push_back(Output::Transmit(ack.clone()));
                        self.ack = Some(ack);
                    }
                    self.out.push_back(Output::Response(resp));
                    self.state = ClientState::Completed;
                    self.retransmit_at = None;
                    self.give_up_at = None;
                    // Timer D: at least 32 s for unreliable transports, zero for reliable ones.
                    let d = if self.reliable {
                        Duration::ZERO
                    } else {
                        Duration::from_secs(32)
                    };
                    self.linger_until = Some(now + d);
                    self.maybe_finish_linger(now);
                }
            }
            (Kind::Invite, ClientState::Completed) => {
                // A retransmitted final response: send the ACK again (§17.1.1.2).
                if code >= 300 {
                    if let Some(ack) = &self.ack {
                        self.out.push_back(Output::Transmit(ack.clone()));
                    }
                }
            }
            (Kind::NonInvite, ClientState::Calling | ClientState::Proceeding) => {
                if code < 200 {
                    self.state = ClientState::Proceeding;
                    self.out.push_back(Output::Response(resp));
                } else {
                    self.out.push_back(Output::Response(resp));
                    self.state = ClientState::Completed;
                    self.retransmit_at = None;
                    self.give_up_at = None;
                    // Timer K: T4 for unreliable transports, zero for reliable ones (§17.1.2.2).
                    let k = if self.reliable {
                        Duration::ZERO
                    } else {
                        self.timers.t4
                    };
                    self.linger_until = Some(now + k);
                    self.maybe_finish_linger(now);
                }
            }
            (Kind::NonInvite, ClientState::Completed) => {}
        }
    }

    /// Tells the transaction that `now` has come; fires any timers that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == ClientState::Terminated {
            return;
        }
        if self.give_up_at.is_some_and(|t| now >= t) {
            self.out.push_back(Output::TimedOut);
            self.terminate();
            return;
        }
        if let Some(at) = self.retransmit_at {
            if now >= at {
                self.out.push_back(Output::Transmit(self.wire.clone()));
                self.interval = match (self.kind, self.state) {
                    // §17.1.1.2: Timer A doubles each time, without a cap.
                    (Kind::Invite, _) => self.interval * 2,
                    // §17.1.2.2: Timer E doubles up to T2 while Trying, and is T2 once Proceeding.
                    (Kind::NonInvite, ClientState::Proceeding) => self.timers.t2,
                    (Kind::NonInvite, _) => (self.interval * 2).min(self.timers.t2),
                };
                self.retransmit_at = Some(now + self.interval);
            }
        }
        self.maybe_finish_linger(now);
    }

    fn maybe_finish_linger(&mut self, now: Instant) {
        if self.linger_until.is_some_and(|t| now >= t) {
            self.terminate();
        }
    }

    fn terminate(&mut self) {
        self.state = ClientState::Terminated;
        self.retransmit_at = None;
        self.give_up_at = None;
        self.linger_until = None;
        self.out.push_back(Output::Terminated);
    }

    /// When the transaction next wants `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        earliest([self.retransmit_at, self.give_up_at, self.linger_until])
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The ACK for a non-2xx final response (§17.1.1.3): same Request-URI, Call-ID, From, top Via and
    /// CSeq number as the INVITE, and the To of the response.
    fn build_ack(&self, resp: &Response) -> Option<Request> {
        let mut b = message::RequestBuilder::new(Method::Ack, self.request.uri.to_string());
        if let Some(via) = message::top_via(&self.request) {
            b = b.header("Via", via);
        }
        for (name, wire) in [(HeaderName::From, "From"), (HeaderName::CallId, "Call-ID")] {
            if let Some(v) = header_value(&self.request, name) {
                b = b.header(wire, v);
            }
        }
        if let Some(to) = header_value(resp, HeaderName::To) {
            b = b.header("To", to);
        }
        let n = message::cseq(&self.request).map(|c| c.0).unwrap_or(1);
        b = b
            .header("CSeq", format!("{n} ACK"))
            .header("Max-Forwards", "70");
        for route in self.request.headers.iter().filter_map(|h| match h {
            rsip::Header::Route(r) => Some(rsip::headers::UntypedHeader::value(r).to_string()),
            _ => None,
        }) {
            b = b.header("Route", route);
        }
        b.build().ok()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerState {
    Trying,
    Proceeding,
    /// INVITE answered with 2xx; retransmitting it until the ACK (RFC 6026 "Accepted").
    Accepted,
    Completed,
    Confirmed,
    Terminated,
}

/// A server transaction (§17.2): one request we received and the responses we send to it.
///
/// For INVITE, the 2xx is retransmitted here until the ACK arrives (§13.3.1.4, with RFC 6026's
/// Accepted state), so a UAS needs no timers of its own.
#[derive(Debug)]
pub struct ServerTransaction {
    kind: Kind,
    state: ServerState,
    request: Request,
    reliable: bool,
    timers: Timers,
    last_response: Option<Vec<u8>>,
    interval: Duration,
    retransmit_at: Option<Instant>,
    give_up_at: Option<Instant>,
    linger_until: Option<Instant>,
    out: VecDeque<Output>,
}

impl ServerTransaction {
    pub fn new(request: Request, now: Instant, timers: Timers, reliable: bool) -> Self {
        let kind = if request.method == Method::Invite {
            Kind::Invite
        } else {
            Kind::NonInvite
        };
        let _ = now;
        ServerTransaction {
            kind,
            state: if kind == Kind::Invite {
                ServerState::Proceeding
            } else {
                ServerState::Trying
            },
            request,
            reliable,
            timers,
            last_response: None,
            interval: timers.t1,
            retransmit_at: None,
            give_up_at: None,
            linger_until: None,
            out: VecDeque::new(),
        }
    }

    pub fn request(&self) -> &Request {
        &self.request
    }

    pub fn is_terminated(&self) -> bool {
        self.state == ServerState::Terminated
    }

    /// True once a final response was sent.
    pub fn is_answered(&self) -> bool {
        !matches!(self.state, ServerState::Trying | ServerState::Proceeding)
    }

    /// The transaction user responds.
    pub fn respond(&mut self, resp: &Response, now: Instant) {
        if self.is_answered() && self.state != ServerState::Accepted {
            return;
        }
        let code = status(resp);
        let wire = response_bytes(resp);
        self.out.push_back(Output::Transmit(wire.clone()));
        self.last_response = Some(wire);
        if code < 200 {
            if self.state == ServerState::Trying {
                self.state = ServerState::Proceeding;
            }
            return;
        }
        match self.kind {
            Kind::Invite if code < 300 => {
                self.state = ServerState::Accepted;
                self.interval = self.timers.t1;
                self.retransmit_at = Some(now + self.timers.t1);
                // §13.3.1.4: give up if no ACK within 64*T1.
                self.give_up_at = Some(now + self.timers.t1 * 64);
            }
            Kind::Invite => {
                self.state = ServerState::Completed;
                // Timer G (unreliable only) and Timer H (§17.2.1).
                if !self.reliable {
                    self.interval = self.timers.t1;
                    self.retransmit_at = Some(now + self.timers.t1);
                }
                self.give_up_at = Some(now + self.timers.t1 * 64);
            }
            Kind::NonInvite => {
                self.state = ServerState::Completed;
                // Timer J: 64*T1 for unreliable transports, zero for reliable (§17.2.2).
                let j = if self.reliable {
                    Duration::ZERO
                } else {
                    self.timers.t1 * 64
                };
                self.linger_until = Some(now + j);
                self.maybe_finish_linger(now);
            }
        }
    }

    /// A retransmission of the request arrived: resend the last response (§17.2.1, §17.2.2).
    pub fn handle_retransmission(&mut self) {
        if let Some(r) = &self.last_response {
            self.out.push_back(Output::Transmit(r.clone()));
        }
    }

    /// An ACK for this INVITE arrived.
    pub fn handle_ack(&mut self, now: Instant) {
        match self.state {
            ServerState::Accepted => {
                self.state = ServerState::Terminated;
                self.clear_timers();
                self.out.push_back(Output::Acked);
                self.out.push_back(Output::Terminated);
            }
            ServerState::Completed if self.kind == Kind::Invite => {
                self.state = ServerState::Confirmed;
                self.clear_timers();
                self.out.push_back(Output::Acked);
                // Timer I: T4 for unreliable transports, zero for reliable.
                let i = if self.reliable {
                    Duration::ZERO
                } else {
                    self.timers.t4
                };
                self.linger_until = Some(now + i);
                self.maybe_finish_linger(now);
            }
            _ => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == ServerState::Terminated {
            return;
        }
        if self.give_up_at.is_some_and(|t| now >= t) {
            self.state = ServerState::Terminated;
            self.clear_timers();
            self.out.push_back(Output::TimedOut);
            self.out.push_back(Output::Terminated);
            return;
        }
        if let Some(at) = self.retransmit_at {
            if now >= at {
                if let Some(r) = &self.last_response {
                    self.out.push_back(Output::Transmit(r.clone()));
                }
                // Timer G doubles up to T2 (§17.2.1); so does the 2xx retransmission (§13.3.1.4).
                self.interval = (self.interval * 2).min(self.timers.t2);
                self.retransmit_at = Some(now + self.interval);
            }
        }
        self.maybe_finish_linger(now);
    }

    fn maybe_finish_linger(&mut self, now: Instant) {
        if self.linger_until.is_some_and(|t| now >= t) {
            self.state = ServerState::Terminated;
            self.clear_timers();
            self.out.push_back(Output::Terminated);
        }
    }

    fn clear_timers(&mut self) {
        self.retransmit_at = None;
        self.give_up_at = None;
        self.linger_until = None;
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        earliest([self.retransmit_at, self.give_up_at, self.linger_until])
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::message::{parse, response_to, RequestBuilder, SipMessage};

    fn invite() -> Request {
        RequestBuilder::new(Method::Invite, "sip:+393471234567@127.0.0.1:5070")
            .header("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKtest")
            .header("From", "<sip:alert@127.0.0.1>;tag=a")
            .header("To", "<sip:+393471234567@127.0.0.1>")
            .header("Call-ID", "c@h")
            .header("CSeq", "1 INVITE")
            .build()
            .unwrap()
    }

    fn bye() -> Request {
        RequestBuilder::new(Method::Bye, "sip:x@127.0.0.1:5070")
            .header("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKbye")
            .header("From", "<sip:alert@127.0.0.1>;tag=a")
            .header("To", "<sip:x@127.0.0.1>;tag=b")
            .header("Call-ID", "c@h")
            .header("CSeq", "2 BYE")
            .build()
            .unwrap()
    }

    fn drain(tx: &mut ClientTransaction) -> Vec<Output> {
        std::iter::from_fn(|| tx.poll_output()).collect()
    }

    /// Runs the transaction's timers until `until`, returning the offsets (ms) at which it transmitted.
    fn transmit_times(tx: &mut ClientTransaction, t0: Instant, until: Duration) -> Vec<u64> {
        let mut times = Vec::new();
        for o in drain(tx) {
            if matches!(o, Output::Transmit(_)) {
                times.push(0);
            }
        }
        while let Some(at) = tx.poll_timeout() {
            if at > t0 + until {
                break;
            }
            tx.handle_timeout(at);
            for o in drain(tx) {
                if matches!(o, Output::Transmit(_)) {
                    times.push((at - t0).as_millis() as u64);
                }
            }
        }
        times
    }

    #[test]
    fn invite_retransmits_on_timer_a_doubling_and_times_out_on_timer_b() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(invite(), t0, Timers::default(), false);
        let times = transmit_times(&mut tx, t0, Duration::from_secs(40));
        // RFC 3261 §17.1.1.2: Timer A fires at T1, then doubles: 0, .5, 1.5, 3.5, 7.5, 15.5, 31.5 s.
        assert_eq!(times, vec![0, 500, 1500, 3500, 7500, 15500, 31500]);
        // Timer B fired at 64*T1 = 32 s.
        assert!(tx.is_terminated());
    }

    #[test]
    fn timer_b_reports_a_timeout() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(invite(), t0, Timers::default(), false);
        drain(&mut tx);
        tx.handle_timeout(t0 + Duration::from_secs(32));
        assert_eq!(drain(&mut tx), vec![Output::TimedOut, Output::Terminated]);
    }

    #[test]
    fn provisional_response_stops_timer_a() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(invite(), t0, Timers::default(), false);
        drain(&mut tx);
        tx.handle_response(response_to(&invite(), 180, Some("b"), &[], None), t0);
        assert!(matches!(drain(&mut tx)[..], [Output::Response(_)]));
        // Only Timer B remains.
        assert_eq!(tx.poll_timeout(), Some(t0 + Duration::from_secs(32)));
    }

    #[test]
    fn non_2xx_final_is_acked_and_its_retransmission_reacked() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(invite(), t0, Timers::default(), false);
        drain(&mut tx);
        let busy = response_to(&invite(), 486, Some("b"), &[], None);
        tx.handle_response(busy.clone(), t0);
        let out = drain(&mut tx);
        let Output::Transmit(ack) = &out[0] else {
            panic!("{out:?}")
        };
        let SipMessage::Request(ack) = parse(ack).unwrap() else {
            panic!()
        };
        assert_eq!(ack.method, Method::Ack);
        assert_eq!(message::via_branch(&ack).as_deref(), Some("z9hG4bKtest"));
        assert_eq!(message::to_tag(&ack), Some("b"));
        assert_eq!(message::cseq(&ack), Some((1, Method::Ack)));
        assert!(matches!(out[1], Output::Response(_)));
        tx.handle_response(busy, t0 + Duration::from_secs(1));
        assert!(matches!(drain(&mut tx)[..], [Output::Transmit(_)]));
        // Timer D = 32 s over UDP.
        tx.handle_timeout(t0 + Duration::from_secs(32));
        assert!(tx.is_terminated());
    }

    #[test]
    fn two_hundred_terminates_the_invite_transaction_at_once() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(invite(), t0, Timers::default(), false);
        drain(&mut tx);
        tx.handle_response(response_to(&invite(), 200, Some("b"), &[], None), t0);
        assert!(matches!(
            drain(&mut tx)[..],
            [Output::Response(_), Output::Terminated]
        ));
    }

    #[test]
    fn non_invite_timer_e_caps_at_t2_and_timer_f_times_out() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(bye(), t0, Timers::default(), false);
        let times = transmit_times(&mut tx, t0, Duration::from_secs(40));
        // §17.1.2.2: E = .5, 1, 2, 4, 4, 4 ... until F at 32 s.
        let mut want = vec![0, 500, 1500, 3500, 7500];
        let mut t = 7500;
        while t + 4000 < 32_000 {
            t += 4000;
            want.push(t);
        }
        assert_eq!(times, want);
        assert!(tx.is_terminated());
    }

    #[test]
    fn non_invite_final_response_lingers_for_timer_k() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(bye(), t0, Timers::default(), false);
        drain(&mut tx);
        tx.handle_response(response_to(&bye(), 200, None, &[], None), t0);
        assert!(matches!(drain(&mut tx)[..], [Output::Response(_)]));
        assert_eq!(tx.poll_timeout(), Some(t0 + Duration::from_secs(5)));
        tx.handle_timeout(t0 + Duration::from_secs(5));
        assert!(tx.is_terminated());
    }

    #[test]
    fn reliable_transport_sends_once() {
        let t0 = Instant::now();
        let mut tx = ClientTransaction::new(invite(), t0, Timers::default(), true);
        assert_eq!(
            transmit_times(&mut tx, t0, Duration::from_secs(31)),
            vec![0]
        );
    }

    #[test]
    fn server_2xx_is_retransmitted_until_ack() {
        let t0 = Instant::now();
        let mut st = ServerTransaction::new(invite(), t0, Timers::default(), false);
        st.respond(&response_to(&invite(), 200, Some("b"), &[], None), t0);
        let mut sends = 0;
        while let Some(o) = st.poll_output() {
            sends += matches!(o, Output::Transmit(_)) as u32;
        }
        st.handle_timeout(t0 + Duration::from_millis(500));
        st.handle_timeout(t0 + Duration::from_millis(1500));
        while let Some(o) = st.poll_output() {
            sends += matches!(o, Output::Transmit(_)) as u32;
        }
        assert_eq!(sends, 3);
        st.handle_ack(t0 + Duration::from_secs(2));
        assert!(st.is_terminated());
    }

    #[test]
    fn server_non_2xx_waits_for_ack_then_timer_i() {
        let t0 = Instant::now();
        let mut st = ServerTransaction::new(invite(), t0, Timers::default(), false);
        st.respond(&response_to(&invite(), 487, Some("b"), &[], None), t0);
        st.handle_ack(t0 + Duration::from_millis(100));
        assert!(!st.is_terminated());
        st.handle_timeout(t0 + Duration::from_millis(5100));
        assert!(st.is_terminated());
    }

    #[test]
    fn server_timer_h_gives_up_without_ack() {
        let t0 = Instant::now();
        let mut st = ServerTransaction::new(invite(), t0, Timers::default(), false);
        st.respond(&response_to(&invite(), 486, Some("b"), &[], None), t0);
        st.handle_timeout(t0 + Duration::from_secs(32));
        let outs: Vec<_> = std::iter::from_fn(|| st.poll_output()).collect();
        assert!(outs.contains(&Output::TimedOut));
    }
}
