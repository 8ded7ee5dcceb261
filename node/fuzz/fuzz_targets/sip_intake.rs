//! Everything the node reads from the network, fed arbitrary bytes: the SIP parser and the accessors the
//! transaction layer calls on what it accepts, SDP, Digest challenges, RTP and RFC 4733 payloads; and
//! what parses goes on into the layers above, as it would from the trunk: a response into an INVITE
//! client transaction and a caller's dialog (whose ACK, BYE and re-INVITE are then built), a request
//! into a server transaction and a callee's dialog, a challenge into the answer to it.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use campanile::media::{dtmf, rtp};
use campanile::sip::dialog::Dialog;
use campanile::sip::message::{Method, Request, SipMessage};
use campanile::sip::transaction::{ClientTransaction, ServerTransaction, Timers};
use campanile::sip::{auth, message, sdp};
use libfuzzer_sys::fuzz_target;

/// The INVITE a trunk's answers answer (ours, so it parses).
fn invite() -> &'static Request {
    static INVITE: OnceLock<Request> = OnceLock::new();
    INVITE.get_or_init(|| {
        let raw = "INVITE sip:+393471234567@127.0.0.1:5070 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKfuzz;rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:alert@127.0.0.1>;tag=ours\r\nTo: <sip:+393471234567@127.0.0.1>\r\n\
Call-ID: fuzz\r\nCSeq: 1 INVITE\r\nContact: <sip:alert@127.0.0.1:5060>\r\nContent-Length: 0\r\n\r\n";
        match message::parse(raw.as_bytes()) {
            Ok(SipMessage::Request(r)) => r,
            _ => panic!("the fuzz target's own INVITE does not parse"),
        }
    })
}

/// Runs a transaction's timers out and drains what it asks for.
fn run_out(mut step: impl FnMut(Instant), start: Instant) {
    for s in [1, 5, 40] {
        step(start + Duration::from_secs(s));
    }
}

fuzz_target!(|data: &[u8]| {
    let via: std::net::SocketAddr = ([127, 0, 0, 1], 5060).into();
    let contact = "sip:alert@127.0.0.1:5060";
    if let Ok(msg) = message::parse(data) {
        let _ = (message::call_id(&msg), message::cseq(&msg), message::via_branch(&msg));
        let _ = (message::from_tag(&msg), message::to_tag(&msg), message::contact_uri(&msg));
        let _ = message::header_values(&msg, message::HeaderName::RecordRoute);
        let now = Instant::now();
        match &msg {
            SipMessage::Request(req) => {
                let _ = message::response_bytes(&message::response_to(req, 200, Some("t"), &[], None));
                let mut tx = ServerTransaction::new(req.clone(), now, Timers::default(), false);
                tx.respond(&message::response_to(req, 486, Some("t"), &[], None), now);
                tx.handle_retransmission();
                tx.handle_ack(now);
                run_out(|t| tx.handle_timeout(t), now);
                while tx.poll_output().is_some() {}
                if let Ok(mut d) = Dialog::from_uas(req, "t", contact) {
                    let _ = d.accept_remote_cseq(req);
                    let _ = (d.next_hop(), d.build(Method::Bye, via));
                }
            }
            SipMessage::Response(resp) => {
                if let Ok(c) = auth::Challenge::from_response(resp) {
                    let creds = auth::Credentials::new("comune", "secret");
                    let (name, value) = c.answer(&creds, "INVITE", "sip:+39@127.0.0.1", "c", 1);
                    let _ = message::RequestBuilder::new(Method::Invite, invite().uri.to_string())
                        .header(name, value)
                        .build();
                }
                let mut tx = ClientTransaction::new(invite().clone(), now, Timers::default(), false);
                tx.handle_response(resp.clone(), now);
                run_out(|t| tx.handle_timeout(t), now);
                while tx.poll_output().is_some() {}
                for d in [Dialog::from_uac(invite(), resp, contact), Dialog::from_answer(resp, contact)] {
                    if let Ok(mut d) = d {
                        let _ = d.next_hop();
                        for m in [Method::Ack, Method::Bye, Method::Invite, Method::Info] {
                            let _ = d.build(m, via);
                        }
                    }
                }
            }
        }
        let _ = sdp::parse_remote(msg.body());
    }
    let _ = sdp::parse_remote(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = auth::Challenge::parse(text, false);
    }
    if let Ok((h, payload)) = rtp::parse(data) {
        let _ = dtmf::DtmfReceiver::new().feed(&h, payload);
    }
    let _ = dtmf::digit_from_info("application/dtmf-relay", data);
});
