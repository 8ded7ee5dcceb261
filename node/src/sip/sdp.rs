//! SDP offer/answer for one audio stream (RFC 4566, RFC 3264): we offer PCMU, PCMA and
//! telephone-event at 20 ms packetisation, and read back the codec, address and port of the answer.

use std::net::{IpAddr, SocketAddr};

/// RTP payload type of PCMU (static, RFC 3551).
pub const PT_PCMU: u8 = 0;
/// RTP payload type of PCMA (static, RFC 3551).
pub const PT_PCMA: u8 = 8;
/// The dynamic payload type we offer for telephone-event (RFC 4733).
pub const PT_TELEPHONE_EVENT: u8 = 101;

/// A G.711 codec we can send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Pcmu,
    Pcma,
}

impl Codec {
    pub fn payload_type(self) -> u8 {
        match self {
            Codec::Pcmu => PT_PCMU,
            Codec::Pcma => PT_PCMA,
        }
    }
}

/// Media direction attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

/// What the other side's SDP says about its audio stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMedia {
    /// Where to send RTP.
    pub addr: SocketAddr,
    /// The first G.711 codec of their m= line that we support.
    pub codec: Codec,
    /// Their payload type for telephone-event, if they accept RFC 4733.
    pub telephone_event: Option<u8>,
    pub direction: Direction,
    /// Where to send RTCP: `a=rtcp` (RFC 3605) or the RTP port plus one (RFC 3550 §11).
    pub rtcp: Option<SocketAddr>,
}

impl RemoteMedia {
    /// Whether the other side accepts audio from us (it is not `sendonly` or `inactive`, RFC 3264 §6.1).
    pub fn accepts_audio(&self) -> bool {
        matches!(self.direction, Direction::SendRecv | Direction::RecvOnly)
    }
}

/// Why an SDP body could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SdpError {
    #[error("SDP has no audio m= line")]
    NoAudio,
    #[error("SDP has no usable connection address (c= line)")]
    NoAddress,
    #[error("SDP offers no codec we support (we need PCMU or PCMA)")]
    NoCommonCodec,
    #[error("SDP is not UTF-8 text")]
    NotText,
}

/// Our offer: PCMU, PCMA and telephone-event, ptime 20, send and receive.
pub fn offer(session_id: u64, addr: SocketAddr) -> String {
    offer_version(session_id, session_id, addr)
}

/// A later offer of the same session (a re-INVITE): same session id, higher version (RFC 3264 §8).
pub fn offer_version(session_id: u64, version: u64, addr: SocketAddr) -> String {
    render(
        session_id,
        version,
        addr,
        &[Codec::Pcmu, Codec::Pcma],
        Some(PT_TELEPHONE_EVENT),
    )
}

/// An SDP body for the given codecs in preference order (used by the simulated phones to answer).
pub fn answer_with(
    session_id: u64,
    addr: SocketAddr,
    codecs: &[Codec],
    telephone_event: Option<u8>,
) -> String {
    render(session_id, session_id, addr, codecs, telephone_event)
}

fn render(
    session_id: u64,
    version: u64,
    addr: SocketAddr,
    codecs: &[Codec],
    telephone_event: Option<u8>,
) -> String {
    let ip = addr.ip();
    let family = if ip.is_ipv4() { "IP4" } else { "IP6" };
    let mut pts: Vec<String> = codecs
        .iter()
        .map(|c| c.payload_type().to_string())
        .collect();
    if let Some(te) = telephone_event {
        pts.push(te.to_string());
    }
    let mut s = format!(
        "v=0\r\no=campanile {session_id} {version} IN {family} {ip}\r\ns=campanile\r\n\
         c=IN {family} {ip}\r\nt=0 0\r\nm=audio {} RTP/AVP {}\r\n",
        addr.port(),
        pts.join(" ")
    );
    for c in codecs {
        match c {
            Codec::Pcmu => s.push_str("a=rtpmap:0 PCMU/8000\r\n"),
            Codec::Pcma => s.push_str("a=rtpmap:8 PCMA/8000\r\n"),
        }
    }
    if let Some(te) = telephone_event {
        s.push_str(&format!(
            "a=rtpmap:{te} telephone-event/8000\r\na=fmtp:{te} 0-16\r\n"
        ));
    }
    s.push_str("a=ptime:20\r\na=sendrecv\r\n");
    s
}

/// Reads the audio stream of an SDP body (offer or answer), honouring the first codec we support.
pub fn parse_remote(body: &[u8]) -> Result<RemoteMedia, SdpError> {
    let text = std::str::from_utf8(body).map_err(|_| SdpError::NotText)?;
    let mut session_ip: Option<IpAddr> = None;
    let mut media_ip: Option<IpAddr> = None;
    let mut port: Option<u16> = None;
    let mut formats: Vec<u8> = Vec::new();
    let mut rtpmap: Vec<(u8, String)> = Vec::new();
    let mut direction = Direction::SendRecv;
    let mut rtcp_attr: Option<(u16, Option<IpAddr>)> = None;
    let mut in_audio = false;
    let mut seen_audio = false;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("m=") {
            in_audio = rest.starts_with("audio ") && !seen_audio;
            if in_audio {
                seen_audio = true;
                let mut it = rest.split_whitespace().skip(1);
                port = it.next().and_then(|p| p.parse().ok());
                formats = it.skip(1).filter_map(|f| f.parse().ok()).collect();
            }
        } else if let Some(rest) = line.strip_prefix("c=") {
            let ip = rest
                .split_whitespace()
                .nth(2)
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse().ok());
            if seen_audio && in_audio {
                media_ip = ip;
            } else if !seen_audio {
                session_ip = ip;
            }
        } else if in_audio {
            if let Some(rest) = line.strip_prefix("a=rtcp:") {
                // RFC 3605: `a=rtcp:PORT [IN IP4 ADDR]`.
                let mut it = rest.split_whitespace();
                if let Some(p) = it.next().and_then(|p| p.parse().ok()) {
                    rtcp_attr = Some((p, it.nth(2).and_then(|a| a.parse().ok())));
                }
            } else if let Some(rest) = line.strip_prefix("a=rtpmap:") {
                if let Some((pt, enc)) = rest.split_once(' ') {
                    if let Ok(pt) = pt.parse() {
                        rtpmap.push((pt, enc.to_ascii_lowercase()));
                    }
                }
            } else {
                direction = match line {
                    "a=sendonly" => Direction::SendOnly,
                    "a=recvonly" => Direction::RecvOnly,
                    "a=inactive" => Direction::Inactive,
                    "a=sendrecv" => Direction::SendRecv,
                    _ => direction,
                };
            }
        }
    }
    let port = port.filter(|_| seen_audio).ok_or(SdpError::NoAudio)?;
    let ip = media_ip.or(session_ip).ok_or(SdpError::NoAddress)?;
    let codec = formats
        .iter()
        .find_map(|pt| match pt {
            0 => Some(Codec::Pcmu),
            8 => Some(Codec::Pcma),
            _ => None,
        })
        .ok_or(SdpError::NoCommonCodec)?;
    let telephone_event = rtpmap
        .iter()
        .find(|(pt, enc)| enc.starts_with("telephone-event/") && formats.contains(pt))
        .map(|(pt, _)| *pt);
    // A port of zero rejects the stream (RFC 3264 §6).
    let direction = if port == 0 {
        Direction::Inactive
    } else {
        direction
    };
    let rtcp = match rtcp_attr {
        Some((p, addr)) => Some(SocketAddr::new(addr.unwrap_or(ip), p)),
        None => port.checked_add(1).map(|p| SocketAddr::new(ip, p)),
    };
    Ok(RemoteMedia {
        addr: SocketAddr::new(ip, port),
        codec,
        telephone_event,
        direction,
        rtcp: rtcp.filter(|_| port != 0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_offer_parses_back() {
        let addr: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let m = parse_remote(offer(1, addr).as_bytes()).unwrap();
        assert_eq!(m.addr, addr);
        assert_eq!(m.codec, Codec::Pcmu);
        assert_eq!(m.telephone_event, Some(101));
        assert_eq!(m.direction, Direction::SendRecv);
        assert_eq!(m.rtcp, Some("127.0.0.1:40001".parse().unwrap()));
        assert!(m.accepts_audio());
    }

    #[test]
    fn a_later_offer_keeps_the_session_and_raises_the_version() {
        let addr: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        assert!(offer_version(7, 8, addr).contains("o=campanile 7 8 IN IP4 127.0.0.1"));
    }

    #[test]
    fn rtcp_attribute_and_hold_are_read() {
        let sdp = "v=0\r\nc=IN IP4 127.0.0.2\r\nm=audio 6000 RTP/AVP 0\r\n\
                   a=rtcp:7001 IN IP4 127.0.0.3\r\na=sendonly\r\n";
        let m = parse_remote(sdp.as_bytes()).unwrap();
        assert_eq!(m.rtcp, Some("127.0.0.3:7001".parse().unwrap()));
        assert!(!m.accepts_audio());
    }

    #[test]
    fn pcma_only_answer_is_honoured() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n\
                   m=audio 6000 RTP/AVP 8 96\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:96 telephone-event/8000\r\n";
        let m = parse_remote(sdp.as_bytes()).unwrap();
        assert_eq!(m.codec, Codec::Pcma);
        assert_eq!(m.telephone_event, Some(96));
        assert_eq!(m.addr, "127.0.0.2:6000".parse().unwrap());
    }

    #[test]
    fn unusable_sdp_is_named() {
        assert_eq!(parse_remote(b"v=0\r\n"), Err(SdpError::NoAudio));
        let no_codec = "v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 5 RTP/AVP 18\r\n";
        assert_eq!(
            parse_remote(no_codec.as_bytes()),
            Err(SdpError::NoCommonCodec)
        );
        assert_eq!(parse_remote(&[0xff, 0xfe]), Err(SdpError::NotText));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_sdp_never_panics(s in "\\PC{0,300}") {
            let _ = parse_remote(s.as_bytes());
        }
    }
}
