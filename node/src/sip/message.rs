//! SIP messages on rsip's types, with the few accessors the transaction and dialog layers need.
//!
//! rsip parses the start line, headers and body; it does not know RFC 3261 §7.3.3's compact header forms,
//! and its typed headers fail on some valid inputs. So `parse` maps compact names to their full forms, and
//! the accessors here read parameters and URIs from header values with small, tested string functions.

use rand::Rng;
use rsip::headers::{Header, UntypedHeader};
use rsip::message::HasHeaders;
pub use rsip::{Method, Request, Response, SipMessage, StatusCode};

/// The largest SIP datagram we accept; anything bigger is dropped as hostile.
pub const MAX_MESSAGE_BYTES: usize = 65_000;

/// Why an incoming datagram was not a usable SIP message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("datagram of {0} bytes is larger than the {MAX_MESSAGE_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("not a SIP message: {0}")]
    Syntax(String),
    #[error("SIP message lacks a usable {0} header")]
    MissingHeader(&'static str),
}

/// Parses a datagram into a SIP message, normalising compact header names (`v:`, `i:`, `f:` ...).
/// Checks that the headers every transaction needs (Via, Call-ID, CSeq, From, To) are present and readable.
pub fn parse(bytes: &[u8]) -> Result<SipMessage, ParseError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(ParseError::TooLarge(bytes.len()));
    }
    let mut msg = SipMessage::try_from(bytes).map_err(|e| ParseError::Syntax(short(&e)))?;
    for h in msg.headers_mut().iter_mut() {
        if let Header::Other(name, value) = h {
            if let Some(full) = expand_compact(name, value) {
                *h = full;
            }
        }
    }
    required_headers(&msg)?;
    Ok(msg)
}

/// The headers every transaction needs (Via, Call-ID, CSeq, From, To), present and readable.
fn required_headers(msg: &impl HasHeaders) -> Result<(), ParseError> {
    top_via_str(msg).ok_or(ParseError::MissingHeader("Via"))?;
    call_id(msg).ok_or(ParseError::MissingHeader("Call-ID"))?;
    cseq(msg).ok_or(ParseError::MissingHeader("CSeq"))?;
    header_value(msg, HeaderName::From).ok_or(ParseError::MissingHeader("From"))?;
    header_value(msg, HeaderName::To).ok_or(ParseError::MissingHeader("To"))?;
    Ok(())
}

fn short(e: &impl std::fmt::Display) -> String {
    let s = e.to_string();
    s.chars().take(120).collect()
}

/// RFC 3261 §7.3.3 compact forms (and RFC 3515's `r`, RFC 4028's `x`, RFC 3841's `j` are not needed).
fn expand_compact(name: &str, value: &str) -> Option<Header> {
    let v = value.to_string();
    Some(match name.to_ascii_lowercase().as_str() {
        "v" => Header::Via(rsip::headers::Via::new(v)),
        "i" => Header::CallId(rsip::headers::CallId::new(v)),
        "f" => Header::From(rsip::headers::From::new(v)),
        "t" => Header::To(rsip::headers::To::new(v)),
        "m" => Header::Contact(rsip::headers::Contact::new(v)),
        "l" => Header::ContentLength(rsip::headers::ContentLength::new(v)),
        "c" => Header::ContentType(rsip::headers::ContentType::new(v)),
        "k" => Header::Supported(rsip::headers::Supported::new(v)),
        "e" => Header::ContentEncoding(rsip::headers::ContentEncoding::new(v)),
        "s" => Header::Subject(rsip::headers::Subject::new(v)),
        _ => return None,
    })
}

/// The headers we read by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    Contact,
    RecordRoute,
    ContentType,
    RetryAfter,
    WwwAuthenticate,
    ProxyAuthenticate,
    Authorization,
}

fn value_of(h: &Header, name: HeaderName) -> Option<&str> {
    Some(match (h, name) {
        (Header::Via(v), HeaderName::Via) => v.value(),
        (Header::From(v), HeaderName::From) => v.value(),
        (Header::To(v), HeaderName::To) => v.value(),
        (Header::CallId(v), HeaderName::CallId) => v.value(),
        (Header::CSeq(v), HeaderName::CSeq) => v.value(),
        (Header::Contact(v), HeaderName::Contact) => v.value(),
        (Header::RecordRoute(v), HeaderName::RecordRoute) => v.value(),
        (Header::ContentType(v), HeaderName::ContentType) => v.value(),
        (Header::RetryAfter(v), HeaderName::RetryAfter) => v.value(),
        (Header::WwwAuthenticate(v), HeaderName::WwwAuthenticate) => v.value(),
        (Header::ProxyAuthenticate(v), HeaderName::ProxyAuthenticate) => v.value(),
        (Header::Authorization(v), HeaderName::Authorization) => v.value(),
        _ => return None,
    })
}

/// The first value of a header.
pub fn header_value(msg: &impl HasHeaders, name: HeaderName) -> Option<&str> {
    msg.headers().iter().find_map(|h| value_of(h, name))
}

/// Every value of a header, in order, with comma-separated values split (for Via and Record-Route).
pub fn header_values(msg: &impl HasHeaders, name: HeaderName) -> Vec<String> {
    msg.headers()
        .iter()
        .filter_map(|h| value_of(h, name))
        .flat_map(split_comma_list)
        .collect()
}

/// Splits a header value on commas that are outside `<...>` and quotes.
pub fn split_comma_list(value: &str) -> Vec<String> {
    comma_items(value).map(str::to_string).collect()
}

/// The items of a comma-separated header value (commas inside `<...>` and quotes do not
/// separate), trimmed, as slices of it; a trailing empty item is left out.
fn comma_items(value: &str) -> impl Iterator<Item = &str> {
    let (mut depth, mut quoted, mut start) = (0i32, false, 0usize);
    let mut chars = value.char_indices();
    std::iter::from_fn(move || {
        for (i, ch) in chars.by_ref() {
            match ch {
                '"' => quoted = !quoted,
                '<' if !quoted => depth += 1,
                '>' if !quoted => depth -= 1,
                ',' if !quoted && depth <= 0 => {
                    let item = value[start..i].trim();
                    start = i + 1;
                    return Some(item);
                }
                _ => {}
            }
        }
        let last = value[start..].trim();
        start = value.len();
        (!last.is_empty()).then_some(last)
    })
}

/// A `;name=value` parameter of a header value, outside any `<...>` (so not a URI parameter).
pub fn param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let tail = match value.rfind('>') {
        Some(i) => &value[i + 1..],
        None => value,
    };
    tail.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The URI of a name-addr (`"Bob" <sip:bob@x>;tag=1` → `sip:bob@x`) or of a bare addr-spec.
pub fn uri_of(value: &str) -> &str {
    if let (Some(a), Some(b)) = (value.find('<'), value.rfind('>')) {
        if a < b {
            return value[a + 1..b].trim();
        }
    }
    value.split(';').next().unwrap_or("").trim()
}

/// The user part of a SIP URI (`sip:+39347@host` → `+39347`).
pub fn uri_user(uri: &str) -> Option<&str> {
    let rest = uri
        .strip_prefix("sip:")
        .or_else(|| uri.strip_prefix("sips:"))
        .or_else(|| uri.strip_prefix("tel:"))?;
    let user = rest.split('@').next()?;
    let user = user.split(';').next()?;
    (!user.is_empty()).then_some(user)
}

/// `host:port` of a SIP URI (`sip:u@127.0.0.1:5070;transport=udp` → `127.0.0.1:5070`).
pub fn uri_hostport(uri: &str) -> Option<&str> {
    let rest = uri
        .strip_prefix("sip:")
        .or_else(|| uri.strip_prefix("sips:"))?;
    let after_user = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let hp = after_user.split([';', '?']).next()?;
    (!hp.is_empty()).then_some(hp)
}

pub fn call_id(msg: &impl HasHeaders) -> Option<&str> {
    header_value(msg, HeaderName::CallId).map(str::trim)
}

/// The CSeq number and method.
pub fn cseq(msg: &impl HasHeaders) -> Option<(u32, Method)> {
    let v = header_value(msg, HeaderName::CSeq)?;
    let mut it = v.split_whitespace();
    let n = it.next()?.parse().ok()?;
    let m = method_from(it.next()?)?;
    Some((n, m))
}

/// Every method rsip knows, by the name it has on the wire.
const METHODS: [(&str, Method); 14] = [
    ("INVITE", Method::Invite),
    ("ACK", Method::Ack),
    ("BYE", Method::Bye),
    ("CANCEL", Method::Cancel),
    ("OPTIONS", Method::Options),
    ("INFO", Method::Info),
    ("PRACK", Method::PRack),
    ("UPDATE", Method::Update),
    ("REGISTER", Method::Register),
    ("MESSAGE", Method::Message),
    ("NOTIFY", Method::Notify),
    ("PUBLISH", Method::Publish),
    ("REFER", Method::Refer),
    ("SUBSCRIBE", Method::Subscribe),
];

/// A method from its name, in any case (rsip's own conversion writes every name out to compare).
pub fn method_from(s: &str) -> Option<Method> {
    METHODS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map(|(_, m)| *m)
}

/// A method's name on the wire (rsip's `Display` builds it anew each time).
pub fn method_name(method: Method) -> &'static str {
    METHODS
        .iter()
        .find(|(_, m)| *m == method)
        .map_or("INVITE", |(name, _)| name)
}

/// The first value of the first Via (ours, on a request we send; the one that names the
/// transaction, on a response).
fn top_via_str(msg: &impl HasHeaders) -> Option<&str> {
    msg.headers()
        .iter()
        .filter_map(|h| value_of(h, HeaderName::Via))
        .flat_map(comma_items)
        .next()
}

pub fn top_via(msg: &impl HasHeaders) -> Option<String> {
    top_via_str(msg).map(str::to_string)
}

/// The branch of the top Via (the transaction id, RFC 3261 §17.1.3).
pub fn via_branch(msg: &impl HasHeaders) -> Option<String> {
    top_via_str(msg).and_then(|v| param(v, "branch").map(String::from))
}

pub fn from_tag(msg: &impl HasHeaders) -> Option<&str> {
    header_value(msg, HeaderName::From).and_then(|v| param(v, "tag"))
}

pub fn to_tag(msg: &impl HasHeaders) -> Option<&str> {
    header_value(msg, HeaderName::To).and_then(|v| param(v, "tag"))
}

/// The Contact URI, if any.
pub fn contact_uri(msg: &impl HasHeaders) -> Option<String> {
    header_value(msg, HeaderName::Contact).map(|v| uri_of(v).to_string())
}

/// Status code of a response as a number.
pub fn status(resp: &Response) -> u16 {
    resp.status_code.code()
}

/// The standard reason phrase for a status code (rsip prints its enum names instead).
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        183 => "Session Progress",
        200 => "OK",
        301 => "Moved Permanently",
        302 => "Moved Temporarily",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        415 => "Unsupported Media Type",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        484 => "Address Incomplete",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        600 => "Busy Everywhere",
        603 => "Decline",
        604 => "Does Not Exist Anywhere",
        606 => "Not Acceptable",
        _ => "Unknown",
    }
}

/// A fresh RFC 3261 branch (magic cookie `z9hG4bK` + random).
pub fn new_branch() -> String {
    let mut branch = String::with_capacity(7 + 16);
    branch.push_str("z9hG4bK");
    push_random(&mut branch, 16);
    branch
}

/// A random token for tags and Call-IDs.
pub fn random_token(len: usize) -> String {
    let mut token = String::with_capacity(len);
    push_random(&mut token, len);
    token
}

/// Appends `len` random lowercase letters and digits.
fn push_random(to: &mut String, len: usize) {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    to.extend((0..len).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char));
}

/// Serialises a SIP message the way it goes on the wire, with a correct Content-Length.
pub fn to_bytes(msg: &SipMessage) -> Vec<u8> {
    msg.to_string().into_bytes()
}

/// Builds a request from its parts; header values are written verbatim.
pub struct RequestBuilder {
    method: Method,
    uri: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    content_type: Option<String>,
}

impl RequestBuilder {
    pub fn new(method: Method, uri: impl Into<String>) -> Self {
        RequestBuilder {
            method,
            uri: uri.into(),
            headers: Vec::new(),
            body: Vec::new(),
            content_type: None,
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn body(mut self, content_type: &str, body: Vec<u8>) -> Self {
        self.content_type = Some(content_type.to_string());
        self.body = body;
        self
    }

    /// The request as rsip's types, each header typed by its name as parsing would (so the
    /// accessors here find it), without writing it out and parsing it back. Fails on a request
    /// URI rsip cannot read or with a space in it, a header value with a line break in it (it
    /// would smuggle in another header), or a missing Via, Call-ID, CSeq, From or To.
    pub fn build(self) -> Result<Request, ParseError> {
        let bad_uri =
            |why: String| ParseError::Syntax(format!("request URI {:?}: {why}", self.uri));
        // rsip reads a URI up to the first space and ignores the rest; the start line cannot.
        if self
            .uri
            .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(bad_uri("has a space or control character".into()));
        }
        let uri = rsip::Uri::try_from(self.uri.as_str()).map_err(|e| bad_uri(short(&e)))?;
        let mut headers = Vec::with_capacity(self.headers.len() + 2);
        for (name, value) in self.headers {
            headers.push(owned_header(name, value)?);
        }
        if let Some(ct) = &self.content_type {
            headers.push(typed_header("Content-Type", ct)?);
        }
        headers.push(Header::ContentLength(rsip::headers::ContentLength::new(
            self.body.len().to_string(),
        )));
        let req = Request {
            method: self.method,
            uri,
            version: rsip::Version::V2,
            headers: headers.into(),
            body: self.body,
        };
        required_headers(&req)?;
        Ok(req)
    }
}

/// Makes a header around its value.
type MakeHeader = fn(String) -> Header;

/// The headers we send most, each made around a value we own (as [`typed_header`] types it).
const OWNED_HEADERS: [(&str, MakeHeader); 8] = {
    use rsip::headers as h;
    [
        ("Via", |v| Header::Via(h::Via::new(v))),
        ("From", |v| Header::From(h::From::new(v))),
        ("To", |v| Header::To(h::To::new(v))),
        ("Call-ID", |v| Header::CallId(h::CallId::new(v))),
        ("CSeq", |v| Header::CSeq(h::CSeq::new(v))),
        ("Contact", |v| Header::Contact(h::Contact::new(v))),
        ("Max-Forwards", |v| {
            Header::MaxForwards(h::MaxForwards::new(v))
        }),
        ("Route", |v| Header::Route(h::Route::new(v))),
    ]
};

/// [`typed_header`] for a value we own: the headers we send most are made around it instead of
/// a copy of it.
fn owned_header(name: &str, value: String) -> Result<Header, ParseError> {
    if value.contains(['\r', '\n']) || value.starts_with(char::is_whitespace) {
        return typed_header(name, &value);
    }
    match OWNED_HEADERS
        .iter()
        .find(|(n, _)| name.eq_ignore_ascii_case(n))
    {
        Some((_, make)) => Ok(make(value)),
        None => typed_header(name, &value),
    }
}

/// A header as rsip types it when it parses `name: value`.
fn typed_header(name: &str, value: &str) -> Result<Header, ParseError> {
    if value.contains(['\r', '\n']) || name.contains(['\r', '\n', ':']) {
        return Err(ParseError::Syntax(format!(
            "header {name:?} would break the message: its name or value has a line break"
        )));
    }
    let token = rsip::headers::header::tokenizer::Tokenizer::from((
        name.as_bytes(),
        value.trim_start().as_bytes(),
    ));
    token
        .try_into()
        .map_err(|e: rsip::Error| ParseError::Syntax(format!("header {name:?}: {}", short(&e))))
}

/// Builds a response to `req` (RFC 3261 §8.2.6.2): copies Via, From, Call-ID, CSeq and To, adding
/// `to_tag` to To when the request's To has none.
pub fn response_to(
    req: &Request,
    code: u16,
    to_tag: Option<&str>,
    extra: &[(&str, String)],
    body: Option<(&str, Vec<u8>)>,
) -> Response {
    let mut lines: Vec<(&str, String)> = Vec::new();
    for v in header_values(req, HeaderName::Via) {
        lines.push(("Via", v));
    }
    for name in [HeaderName::From, HeaderName::CallId, HeaderName::CSeq] {
        if let Some(v) = header_value(req, name) {
            lines.push((wire_name(name), v.to_string()));
        }
    }
    if let Some(to) = header_value(req, HeaderName::To) {
        match (param(to, "tag"), to_tag) {
            (None, Some(tag)) => lines.push(("To", format!("{to};tag={tag}"))),
            _ => lines.push(("To", to.to_string())),
        }
    }
    if (200..300).contains(&code) || code < 200 {
        for rr in header_values(req, HeaderName::RecordRoute) {
            lines.push(("Record-Route", rr));
        }
    }
    for (k, v) in extra {
        lines.push((k, v.clone()));
    }
    let (content_type, body) = body.unwrap_or(("", Vec::new()));
    if !body.is_empty() {
        lines.push(("Content-Type", content_type.to_string()));
    }
    lines.push(("Content-Length", body.len().to_string()));
    let headers: Result<Vec<Header>, ParseError> =
        lines.into_iter().map(|(k, v)| owned_header(k, v)).collect();
    Response {
        status_code: StatusCode::from(code),
        version: rsip::Version::V2,
        // Only a line break fails: in one of our own `extra` values, or a lone CR or LF inside a
        // header of a hostile request. Such a response goes out without headers, which its peer
        // drops, rather than with a smuggled header.
        headers: headers.unwrap_or_default().into(),
        body,
    }
}

fn wire_name(name: HeaderName) -> &'static str {
    match name {
        HeaderName::Via => "Via",
        HeaderName::From => "From",
        HeaderName::To => "To",
        HeaderName::CallId => "Call-ID",
        HeaderName::CSeq => "CSeq",
        HeaderName::Contact => "Contact",
        HeaderName::RecordRoute => "Record-Route",
        HeaderName::ContentType => "Content-Type",
        HeaderName::RetryAfter => "Retry-After",
        HeaderName::WwwAuthenticate => "WWW-Authenticate",
        HeaderName::ProxyAuthenticate => "Proxy-Authenticate",
        HeaderName::Authorization => "Authorization",
    }
}

/// Wire bytes of a response, with our own reason phrase.
pub fn response_bytes(resp: &Response) -> Vec<u8> {
    let code = status(resp);
    let start = format!("SIP/2.0 {code} {}\r\n", reason_phrase(code));
    wire_bytes(start, &resp.headers, &resp.body)
}

/// Wire bytes of a request.
pub fn request_bytes(req: &Request) -> Vec<u8> {
    let start = format!("{} {} SIP/2.0\r\n", method_name(req.method), req.uri);
    wire_bytes(start, &req.headers, &req.body)
}

/// A start line, the headers and the body as they go on the wire, written into one buffer (rsip's
/// own `Display` of the headers writes each one to a string of its own and joins them).
fn wire_bytes(start_line: String, headers: &rsip::Headers, body: &[u8]) -> Vec<u8> {
    use std::fmt::Write;
    let mut s = start_line;
    s.reserve(512 + body.len());
    for h in headers.iter() {
        // Writing to a String cannot fail.
        let _ = write!(s, "{h}\r\n");
    }
    s.push_str("\r\n");
    let mut bytes = s.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_made_around_their_value_are_the_ones_parsing_makes() {
        for name in [
            "Via",
            "via",
            "From",
            "To",
            "Call-ID",
            "call-id",
            "CSeq",
            "Contact",
            "Max-Forwards",
            "Route",
            "Allow",
            "User-Agent",
            "P-Asserted-Identity",
            "Authorization",
        ] {
            for value in ["<sip:a@b>;tag=1", " 70", "x\r\ny: z"] {
                assert_eq!(
                    owned_header(name, value.to_string()),
                    typed_header(name, value),
                    "{name}: {value:?}"
                );
            }
        }
    }

    #[test]
    fn every_method_has_its_wire_name_both_ways() {
        for m in Method::all() {
            let name = m.to_string();
            assert_eq!(method_name(m), name);
            assert_eq!(method_from(&name.to_ascii_lowercase()), Some(m));
        }
        assert_eq!(METHODS.len(), Method::all().len());
        assert_eq!(method_from("FOO"), None);
    }

    #[test]
    fn comma_lists_split_outside_brackets_and_quotes_only() {
        assert_eq!(
            split_comma_list(r#" <sip:a,b@x>;lr , "c, d" <sip:e@y>,,f , "#),
            [r#"<sip:a,b@x>;lr"#, r#""c, d" <sip:e@y>"#, "", "f"]
        );
        assert!(split_comma_list("  ").is_empty());
    }

    const INVITE: &str = "INVITE sip:+393471234567@127.0.0.1:5070 SIP/2.0\r\n\
v: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKabc;rport\r\n\
f: \"Comune\" <sip:alert@127.0.0.1>;tag=111\r\n\
t: <sip:+393471234567@127.0.0.1>\r\n\
i: call-1@127.0.0.1\r\n\
CSeq: 7 INVITE\r\n\
m: <sip:alert@127.0.0.1:5060>\r\n\
Record-Route: <sip:p1;lr>, <sip:p2;lr>\r\n\
l: 0\r\n\r\n";

    #[test]
    fn compact_headers_are_understood() {
        let msg = parse(INVITE.as_bytes()).unwrap();
        assert_eq!(call_id(&msg), Some("call-1@127.0.0.1"));
        assert_eq!(cseq(&msg), Some((7, Method::Invite)));
        assert_eq!(via_branch(&msg).as_deref(), Some("z9hG4bKabc"));
        assert_eq!(from_tag(&msg), Some("111"));
        assert_eq!(to_tag(&msg), None);
        assert_eq!(
            contact_uri(&msg).as_deref(),
            Some("sip:alert@127.0.0.1:5060")
        );
        assert_eq!(
            header_values(&msg, HeaderName::RecordRoute),
            vec!["<sip:p1;lr>", "<sip:p2;lr>"]
        );
    }

    #[test]
    fn response_copies_dialog_headers_and_adds_the_to_tag() {
        let SipMessage::Request(req) = parse(INVITE.as_bytes()).unwrap() else {
            panic!()
        };
        let resp = response_to(&req, 486, Some("xyz"), &[], None);
        assert_eq!(status(&resp), 486);
        assert_eq!(to_tag(&resp), Some("xyz"));
        assert_eq!(via_branch(&resp).as_deref(), Some("z9hG4bKabc"));
        let wire = String::from_utf8(response_bytes(&resp)).unwrap();
        assert!(wire.starts_with("SIP/2.0 486 Busy Here\r\n"), "{wire}");
        let back = parse(wire.as_bytes()).unwrap();
        assert_eq!(call_id(&back), Some("call-1@127.0.0.1"));
    }

    #[test]
    fn a_built_response_is_what_parsing_its_wire_text_gives() {
        let SipMessage::Request(req) = parse(INVITE.as_bytes()).unwrap() else {
            panic!()
        };
        for code in [100, 180, 200, 487, 503, 599] {
            let resp = response_to(
                &req,
                code,
                Some("xyz"),
                &[("Contact", "<sip:phone@127.0.0.1:5070>".into())],
                Some(("application/sdp", b"v=0\r\n".to_vec())),
            );
            let SipMessage::Response(back) = parse(&response_bytes(&resp)).unwrap() else {
                panic!("{code} came back as a request")
            };
            // (An unknown code's reason text is not compared: we write our own phrase.)
            assert_eq!(
                (status(&resp), &resp.headers, &resp.body),
                (status(&back), &back.headers, &back.body),
                "{code}"
            );
        }
    }

    #[test]
    fn uri_helpers_read_users_and_hosts() {
        assert_eq!(uri_of("\"A, B\" <sip:a@h:1;lr>;tag=3"), "sip:a@h:1;lr");
        assert_eq!(uri_user("sip:+3906@127.0.0.1:5"), Some("+3906"));
        assert_eq!(
            uri_hostport("sip:+3906@127.0.0.1:5;transport=udp"),
            Some("127.0.0.1:5")
        );
        assert_eq!(uri_hostport("sip:127.0.0.1"), Some("127.0.0.1"));
        assert_eq!(param("<sip:x;tag=no>;tag=yes", "tag"), Some("yes"));
        assert_eq!(split_comma_list("\"a,b\" <sip:x>, <sip:y>").len(), 2);
    }

    #[test]
    fn messages_without_required_headers_are_refused() {
        let bad = "OPTIONS sip:x SIP/2.0\r\nCSeq: 1 OPTIONS\r\n\r\n";
        assert!(matches!(
            parse(bad.as_bytes()),
            Err(ParseError::MissingHeader(_))
        ));
        assert!(matches!(
            parse(&[0u8; 70_000]),
            Err(ParseError::TooLarge(_))
        ));
    }

    #[test]
    fn builder_round_trips() {
        let req = RequestBuilder::new(Method::Bye, "sip:u@127.0.0.1:5070")
            .header("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1")
            .header("From", "<sip:a@h>;tag=1")
            .header("To", "<sip:b@h>;tag=2")
            .header("Call-ID", "c1")
            .header("CSeq", "2 BYE")
            .build()
            .unwrap();
        let back = parse(&request_bytes(&req)).unwrap();
        assert_eq!(cseq(&back), Some((2, Method::Bye)));
    }

    #[test]
    fn a_built_request_is_what_parsing_its_wire_text_gives() {
        // Every kind of header our requests carry, typed or not, and a body.
        let req = RequestBuilder::new(Method::Invite, "sip:+393471234567@127.0.0.1:5070")
            .header("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1;rport")
            .header("Max-Forwards", "70")
            .header("Route", "<sip:127.0.0.1:5080;lr>")
            .header("From", "\"Protezione Civile\" <sip:campanile@h>;tag=1")
            .header("To", "<sip:+393471234567@h>")
            .header("Call-ID", "c1@campanile")
            .header("CSeq", "1 INVITE")
            .header("Contact", "<sip:campanile@127.0.0.1:5060>")
            .header("P-Asserted-Identity", "<sip:+390502211@h>")
            .header("Authorization", "Digest username=\"u\", realm=\"r\"")
            .header("User-Agent", "campanile")
            .body("application/sdp", b"v=0\r\n".to_vec())
            .build()
            .unwrap();
        let back = parse(&request_bytes(&req)).unwrap();
        assert_eq!(SipMessage::Request(req), back);
    }

    #[test]
    fn a_header_that_would_smuggle_in_another_is_refused_by_name() {
        let err = RequestBuilder::new(Method::Bye, "sip:u@127.0.0.1:5070")
            .header("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1")
            .header("From", "<sip:a@h>;tag=1\r\nRoute: <sip:evil>")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("\"From\""), "{err}");
        let err = RequestBuilder::new(Method::Bye, "not a uri at all")
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("request URI"), "{err}");
        let err = RequestBuilder::new(Method::Bye, "sip:u@127.0.0.1:5070")
            .header("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1")
            .build()
            .unwrap_err();
        assert_eq!(err, ParseError::MissingHeader("Call-ID"));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn mutated_invites_never_panic(cut in 0usize..400, byte in proptest::num::u8::ANY) {
            let mut b = INVITE.as_bytes().to_vec();
            let i = cut % b.len();
            b[i] = byte;
            if let Ok(m) = parse(&b) {
                let _ = (call_id(&m), cseq(&m), via_branch(&m), contact_uri(&m));
                if let SipMessage::Request(r) = &m {
                    let _ = response_bytes(&response_to(r, 200, Some("t"), &[], None));
                }
            }
        }
    }
}
