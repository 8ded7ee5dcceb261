//! Everything the node reads from the network, fed arbitrary bytes: the SIP parser and the accessors the
//! transaction layer calls on what it accepts, SDP, Digest challenges, RTP and RFC 4733 payloads.
#![no_main]

use campanile::media::{dtmf, rtp};
use campanile::sip::{auth, message, sdp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = message::parse(data) {
        let _ = (message::call_id(&msg), message::cseq(&msg), message::via_branch(&msg));
        let _ = (message::from_tag(&msg), message::to_tag(&msg), message::contact_uri(&msg));
        let _ = message::header_values(&msg, message::HeaderName::RecordRoute);
        if let message::SipMessage::Request(req) = &msg {
            let _ = message::response_bytes(&message::response_to(req, 200, Some("t"), &[], None));
        }
        if let message::SipMessage::Response(resp) = &msg {
            let _ = auth::Challenge::from_response(resp);
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
