//! RFC 3261 §12 dialogs: the state two user agents share after an INVITE succeeds, and how to build
//! requests inside it (route set, remote target, CSeq).
//!
//! A dialog is plain data (serde) so that a later release can commit it to Raft and let another node
//! continue the call.

use std::net::SocketAddr;

use rsip::message::HasHeaders;
use serde::{Deserialize, Serialize};

use super::message::{
    self, contact_uri, header_value, header_values, new_branch, uri_hostport, uri_of, HeaderName,
    Method, ParseError, Request, RequestBuilder, Response,
};

/// One side's view of a dialog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dialog {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
    /// Our From (UAC) or To (UAS) header value, without tag.
    pub local_party: String,
    /// Their header value, without tag.
    pub remote_party: String,
    /// Where in-dialog requests go (the peer's Contact).
    pub remote_target: String,
    /// Route set, in the order Route headers are written (§12.1.1 / §12.1.2).
    pub route_set: Vec<String>,
    pub local_cseq: u32,
    pub remote_cseq: Option<u32>,
    /// Our Contact URI.
    pub local_contact: String,
    /// The transport token of our Via headers (`UDP` or `TCP`).
    #[serde(default = "udp")]
    pub via_transport: String,
}

fn udp() -> String {
    "UDP".into()
}

/// Why a dialog could not be formed from a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DialogError {
    #[error("the {0} has no {1}, so no dialog can be formed")]
    Missing(&'static str, &'static str),
}

fn strip_tag(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let kept = value.split(';').filter(|p| {
        !p.trim_start()
            .get(..4)
            .is_some_and(|k| k.eq_ignore_ascii_case("tag="))
    });
    for (i, p) in kept.enumerate() {
        if i > 0 {
            out.push(';');
        }
        out.push_str(p);
    }
    out
}

impl Dialog {
    /// The caller's dialog, from our INVITE and the 2xx (or 1xx with tag) that answered it (§12.1.2).
    pub fn from_uac(
        invite: &Request,
        resp: &Response,
        local_contact: &str,
    ) -> Result<Self, DialogError> {
        Self::caller(invite, "INVITE", resp, local_contact)
    }

    /// The caller's dialog from a 2xx alone, for an INVITE no call holds any more (§13.2.2.4):
    /// the response carries the INVITE's Call-ID, From (with our tag) and CSeq.
    pub fn from_answer(resp: &Response, local_contact: &str) -> Result<Self, DialogError> {
        Self::caller(resp, "response", resp, local_contact)
    }

    /// The caller's dialog: Call-ID, our From and CSeq from `ours` (the INVITE, or a response that
    /// copied them), the peer's tag, target and route set from `resp`.
    fn caller(
        ours: &impl HasHeaders,
        what: &'static str,
        resp: &Response,
        local_contact: &str,
    ) -> Result<Self, DialogError> {
        let call_id = message::call_id(ours)
            .ok_or(DialogError::Missing(what, "Call-ID"))?
            .to_string();
        let local_tag = message::from_tag(ours)
            .ok_or(DialogError::Missing(what, "From tag"))?
            .to_string();
        let remote_tag = message::to_tag(resp)
            .ok_or(DialogError::Missing("response", "To tag"))?
            .to_string();
        let remote_target = contact_uri(resp).ok_or(DialogError::Missing("response", "Contact"))?;
        let mut route_set = header_values(resp, HeaderName::RecordRoute);
        route_set.reverse();
        Ok(Dialog {
            call_id,
            local_tag,
            remote_tag,
            local_party: strip_tag(header_value(ours, HeaderName::From).unwrap_or_default()),
            remote_party: strip_tag(header_value(resp, HeaderName::To).unwrap_or_default()),
            remote_target,
            route_set,
            local_cseq: message::cseq(ours).map(|c| c.0).unwrap_or(1),
            remote_cseq: None,
            local_contact: local_contact.to_string(),
            via_transport: udp(),
        })
    }

    /// The callee's dialog, from an INVITE we answer with `local_tag` (§12.1.1).
    pub fn from_uas(
        invite: &Request,
        local_tag: &str,
        local_contact: &str,
    ) -> Result<Self, DialogError> {
        Ok(Dialog {
            call_id: message::call_id(invite)
                .ok_or(DialogError::Missing("INVITE", "Call-ID"))?
                .to_string(),
            local_tag: local_tag.to_string(),
            remote_tag: message::from_tag(invite)
                .ok_or(DialogError::Missing("INVITE", "From tag"))?
                .to_string(),
            local_party: strip_tag(header_value(invite, HeaderName::To).unwrap_or_default()),
            remote_party: strip_tag(header_value(invite, HeaderName::From).unwrap_or_default()),
            remote_target: contact_uri(invite).ok_or(DialogError::Missing("INVITE", "Contact"))?,
            route_set: header_values(invite, HeaderName::RecordRoute),
            local_cseq: 0,
            remote_cseq: message::cseq(invite).map(|c| c.0),
            local_contact: local_contact.to_string(),
            via_transport: udp(),
        })
    }

    /// Where the next in-dialog request is sent: the first route (loose routing) or the remote target.
    pub fn next_hop(&self) -> Option<SocketAddr> {
        let uri = self
            .route_set
            .first()
            .map(|r| uri_of(r).to_string())
            .unwrap_or_else(|| self.remote_target.clone());
        uri_hostport(&uri)?.parse().ok()
    }

    /// Builds an in-dialog request (§12.2.1.1). ACK reuses the INVITE's CSeq number; others increment it.
    pub fn request(&mut self, method: Method, via_host: SocketAddr) -> RequestBuilder {
        let cseq = if method == Method::Ack {
            self.local_cseq
        } else {
            self.local_cseq += 1;
            self.local_cseq
        };
        let mut b = RequestBuilder::new(method, self.remote_target.clone())
            .header(
                "Via",
                format!(
                    "SIP/2.0/{} {via_host};branch={};rport",
                    self.via_transport,
                    new_branch()
                ),
            )
            .header("Max-Forwards", "70")
            .header(
                "From",
                format!("{};tag={}", self.local_party, self.local_tag),
            )
            .header(
                "To",
                format!("{};tag={}", self.remote_party, self.remote_tag),
            )
            .header("Call-ID", self.call_id.clone())
            .header("CSeq", format!("{cseq} {}", message::method_name(method)));
        for r in &self.route_set {
            b = b.header("Route", r.clone());
        }
        if matches!(method, Method::Invite | Method::Ack) {
            b = b.header("Contact", format!("<{}>", self.local_contact));
        }
        b
    }

    /// Checks an in-dialog request from the peer and records its CSeq (§12.2.2). Returns false for an
    /// out-of-order request, which must be answered 500.
    pub fn accept_remote_cseq(&mut self, req: &Request) -> bool {
        let Some((n, method)) = message::cseq(req) else {
            return false;
        };
        if method == Method::Ack || method == Method::Cancel {
            return true;
        }
        if self.remote_cseq.is_some_and(|last| n <= last) {
            return false;
        }
        self.remote_cseq = Some(n);
        true
    }

    /// Builds an in-dialog request and turns it into an rsip Request.
    pub fn build(&mut self, method: Method, via_host: SocketAddr) -> Result<Request, ParseError> {
        self.request(method, via_host).build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::sip::message::{parse, response_to, SipMessage};

    #[test]
    fn a_party_loses_its_tag_and_keeps_its_other_parameters() {
        assert_eq!(
            strip_tag("\"A\" <sip:a@b;user=phone>;tag=12;x=1"),
            "\"A\" <sip:a@b;user=phone>;x=1"
        );
        assert_eq!(strip_tag("<sip:a@b>; TAG=9"), "<sip:a@b>");
        assert_eq!(strip_tag("<sip:a@b>;tagged=1"), "<sip:a@b>;tagged=1");
        assert_eq!(strip_tag(";tag=1;x"), ";x");
    }

    fn invite() -> Request {
        let raw = "INVITE sip:+393471234567@127.0.0.1:5070 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bKp\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKa\r\n\
Record-Route: <sip:127.0.0.1:5080;lr>\r\n\
From: <sip:alert@127.0.0.1>;tag=ours\r\n\
To: <sip:+393471234567@127.0.0.1>\r\n\
Call-ID: d1\r\nCSeq: 1 INVITE\r\nContact: <sip:alert@127.0.0.1:5060>\r\nContent-Length: 0\r\n\r\n";
        match parse(raw.as_bytes()).unwrap() {
            SipMessage::Request(r) => r,
            _ => unreachable!(),
        }
    }

    /// The phone's 200 OK to [`invite`], with its tag and Contact.
    fn answer() -> Response {
        let contact = [("Contact", "<sip:phone@127.0.0.1:5070>".to_string())];
        response_to(&invite(), 200, Some("theirs"), &contact, None)
    }

    #[test]
    fn uac_dialog_routes_through_the_record_route() {
        let (inv, ok) = (invite(), answer());
        let mut d = Dialog::from_uac(&inv, &ok, "sip:alert@127.0.0.1:5060").unwrap();
        assert_eq!(d.route_set, vec!["<sip:127.0.0.1:5080;lr>"]);
        assert_eq!(d.next_hop(), Some("127.0.0.1:5080".parse().unwrap()));
        let bye = d
            .build(Method::Bye, "127.0.0.1:5060".parse().unwrap())
            .unwrap();
        assert_eq!(bye.uri.to_string(), "sip:phone@127.0.0.1:5070");
        assert_eq!(message::cseq(&bye), Some((2, Method::Bye)));
        assert_eq!(message::to_tag(&bye), Some("theirs"));
        assert_eq!(message::from_tag(&bye), Some("ours"));
        let ack = d
            .build(Method::Ack, "127.0.0.1:5060".parse().unwrap())
            .unwrap();
        assert_eq!(message::cseq(&ack), Some((2, Method::Ack)));
    }

    /// A 2xx carries what the INVITE said of us, so the dialog from the answer alone is the same.
    #[test]
    fn a_dialog_from_the_answer_alone_is_the_callers() {
        let (inv, ok) = (invite(), answer());
        let contact = "sip:alert@127.0.0.1:5060";
        assert_eq!(
            Dialog::from_answer(&ok, contact),
            Dialog::from_uac(&inv, &ok, contact)
        );
        let untagged = response_to(&inv, 200, None, &[], None);
        assert_eq!(
            Dialog::from_answer(&untagged, contact),
            Err(DialogError::Missing("response", "To tag"))
        );
    }

    #[test]
    fn uas_dialog_rejects_old_cseq() {
        let inv = invite();
        let mut d = Dialog::from_uas(&inv, "mine", "sip:phone@127.0.0.1:5070").unwrap();
        assert_eq!(d.remote_target, "sip:alert@127.0.0.1:5060");
        assert_eq!(d.next_hop(), Some("127.0.0.1:5080".parse().unwrap()));
        assert!(!d.accept_remote_cseq(&inv));
    }

    /// A 200 OK as a hostile or broken trunk might write it: a Contact, Record-Route and To of the
    /// usual shape with any printable text in their parts (the values a dialog copies into every
    /// request it builds).
    fn answer_with(contact: [&str; 3], record_route: [&str; 2], to: [&str; 2]) -> Vec<u8> {
        let [user, host, tail] = contact;
        let [rr_host, rr_tail] = record_route;
        let [tag, to_tail] = to;
        format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKa\r\n\
             From: <sip:alert@127.0.0.1>;tag=ours\r\nTo: <sip:+39@127.0.0.1>;tag={tag}{to_tail}\r\n\
             Call-ID: d1\r\nCSeq: 1 INVITE\r\nContact: <sip:{user}@{host}>{tail}\r\n\
             Record-Route: <sip:{rr_host};lr>{rr_tail}\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    proptest::proptest! {
        /// Whatever the answer's Contact, Record-Route and To say, forming the dialog and building
        /// its requests never panics, and a request that builds stays in this dialog: same Call-ID
        /// and tags, one Route per entry of the route set (nothing smuggled in as a header).
        #[test]
        fn hostile_answers_never_panic_nor_leave_the_dialog(
            contact in proptest::array::uniform3("[ -~]{0,16}"),
            record_route in proptest::array::uniform2("[ -~\\u{80}-\\u{10ffff}]{0,24}"),
            to in proptest::array::uniform2("[ -~]{0,16}"),
        ) {
            let contact = contact.each_ref().map(String::as_str);
            let record_route = record_route.each_ref().map(String::as_str);
            let to = to.each_ref().map(String::as_str);
            let Ok(SipMessage::Response(ok)) = parse(&answer_with(contact, record_route, to)) else {
                return Ok(());
            };
            let via = "127.0.0.1:5060".parse().unwrap();
            for d in [Dialog::from_uac(&invite(), &ok, "sip:alert@127.0.0.1:5060"), Dialog::from_answer(&ok, "sip:alert@127.0.0.1:5060")] {
                let Ok(mut d) = d else { continue };
                let _ = d.next_hop();
                for m in [Method::Ack, Method::Bye, Method::Invite] {
                    let Ok(req) = d.build(m, via) else { continue };
                    let again = match parse(&message::request_bytes(&req)) {
                        Ok(SipMessage::Request(r)) => r,
                        other => panic!("a request the dialog built does not parse back: {other:?}"),
                    };
                    proptest::prop_assert_eq!(message::call_id(&again), Some("d1"));
                    proptest::prop_assert_eq!(message::from_tag(&again), Some("ours"));
                    proptest::prop_assert_eq!(message::to_tag(&again), Some(d.remote_tag.as_str()));
                    let routes = again.headers.iter().filter(|h| matches!(h, rsip::Header::Route(_)));
                    proptest::prop_assert_eq!(routes.count(), d.route_set.len());
                }
            }
        }
    }
}
