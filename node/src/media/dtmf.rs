//! DTMF as RFC 4733 telephone-events: decoding what a phone sends (each key reported exactly once),
//! and encoding the packet sequence a simulated phone sends for a key.

use super::rtp::{write_packet, RtpHeader};

/// One telephone-event payload (RFC 4733 §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelephoneEvent {
    /// 0–9, 10 = `*`, 11 = `#`, 12–15 = A–D.
    pub event: u8,
    pub end: bool,
    /// Power level in -dBm0 (0–63).
    pub volume: u8,
    /// Duration so far, in timestamp units (8 kHz).
    pub duration: u16,
}

impl TelephoneEvent {
    pub fn decode(payload: &[u8]) -> Option<TelephoneEvent> {
        let b = payload.get(..4)?;
        Some(TelephoneEvent {
            event: b[0],
            end: b[1] & 0x80 != 0,
            volume: b[1] & 0x3F,
            duration: u16::from_be_bytes([b[2], b[3]]),
        })
    }

    pub fn encode(&self) -> [u8; 4] {
        let d = self.duration.to_be_bytes();
        [
            self.event,
            ((self.end as u8) << 7) | (self.volume & 0x3F),
            d[0],
            d[1],
        ]
    }
}

/// The key for an event code, if it is a DTMF key.
pub fn event_to_digit(event: u8) -> Option<char> {
    match event {
        0..=9 => Some((b'0' + event) as char),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some((b'A' + event - 12) as char),
        _ => None,
    }
}

/// The event code for a key.
pub fn digit_to_event(digit: char) -> Option<u8> {
    match digit {
        '0'..='9' => Some(digit as u8 - b'0'),
        '*' => Some(10),
        '#' => Some(11),
        'A'..='D' => Some(digit as u8 - b'A' + 12),
        _ => None,
    }
}

/// The key carried by a SIP INFO body: `application/dtmf-relay` (`Signal=1` / `Duration=160` lines)
/// or `application/dtmf` (the bare key), as trunks that do not pass RFC 4733 send it.
pub fn digit_from_info(content_type: &str, body: &[u8]) -> Option<char> {
    let text = std::str::from_utf8(body).ok()?;
    let ct = content_type.split(';').next()?.trim().to_ascii_lowercase();
    let value = match ct.as_str() {
        "application/dtmf-relay" => text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            k.trim().eq_ignore_ascii_case("signal").then(|| v.trim())
        })?,
        "application/dtmf" => text.trim(),
        _ => return None,
    };
    let mut chars = value.chars();
    let c = chars.next()?.to_ascii_uppercase();
    (chars.next().is_none() && digit_to_event(c).is_some()).then_some(c)
}

/// Turns a stream of telephone-event packets into key presses, each reported once.
///
/// All packets of one event share an RTP timestamp (RFC 4733 §2.5.1.2), so the first packet with a new
/// timestamp is a new key; its updates and its three end packets are duplicates.
#[derive(Debug, Default)]
pub struct DtmfReceiver {
    last_timestamp: Option<(u32, u32)>,
}

impl DtmfReceiver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one packet of the telephone-event payload type; returns a key when a new one starts.
    pub fn feed(&mut self, header: &RtpHeader, payload: &[u8]) -> Option<char> {
        let ev = TelephoneEvent::decode(payload)?;
        let key = (header.ssrc, header.timestamp);
        if self.last_timestamp == Some(key) {
            return None;
        }
        let digit = event_to_digit(ev.event)?;
        self.last_timestamp = Some(key);
        Some(digit)
    }
}

/// The packets of one 100 ms key press (five updates 20 ms apart, then three end packets), ready to send
/// 20 ms apart. Returns nothing for a character that is not a DTMF key.
pub fn dtmf_packets(
    digit: char,
    ssrc: u32,
    seq_start: u16,
    timestamp: u32,
    pt: u8,
) -> Vec<Vec<u8>> {
    let Some(event) = digit_to_event(digit) else {
        return Vec::new();
    };
    let mut packets = Vec::new();
    let mut seq = seq_start;
    let push = |duration: u16, end: bool, marker: bool, seq: u16| {
        let mut out = Vec::with_capacity(16);
        let h = RtpHeader {
            payload_type: pt,
            marker,
            sequence: seq,
            timestamp,
            ssrc,
        };
        let ev = TelephoneEvent {
            event,
            end,
            volume: 10,
            duration,
        };
        write_packet(&h, &ev.encode(), &mut out);
        out
    };
    for i in 1..=5u16 {
        packets.push(push(160 * i, false, i == 1, seq));
        seq = seq.wrapping_add(1);
    }
    for _ in 0..3 {
        packets.push(push(160 * 6, true, false, seq));
        seq = seq.wrapping_add(1);
    }
    packets
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::rtp::parse;

    #[test]
    fn payload_bytes_follow_rfc_4733() {
        let ev = TelephoneEvent {
            event: 1,
            end: true,
            volume: 10,
            duration: 960,
        };
        assert_eq!(ev.encode(), [1, 0x8A, 0x03, 0xC0]);
        assert_eq!(TelephoneEvent::decode(&ev.encode()), Some(ev));
        assert_eq!(TelephoneEvent::decode(&[1, 2]), None);
    }

    #[test]
    fn a_key_press_is_reported_exactly_once() {
        let packets = dtmf_packets('1', 42, 100, 8000, 101);
        assert_eq!(packets.len(), 8);
        let mut rx = DtmfReceiver::new();
        let mut digits = Vec::new();
        for p in &packets {
            let (h, payload) = parse(p).unwrap();
            digits.extend(rx.feed(&h, payload));
        }
        // A retransmitted end packet later changes nothing.
        let (h, payload) = parse(&packets[7]).unwrap();
        digits.extend(rx.feed(&h, payload));
        assert_eq!(digits, vec!['1']);
        let (first, _) = parse(&packets[0]).unwrap();
        assert!(first.marker);
    }

    #[test]
    fn the_same_key_twice_is_two_presses() {
        let mut rx = DtmfReceiver::new();
        let mut digits = Vec::new();
        for ts in [8000, 16000] {
            for p in dtmf_packets('2', 1, 0, ts, 101) {
                let (h, payload) = parse(&p).unwrap();
                digits.extend(rx.feed(&h, payload));
            }
        }
        assert_eq!(digits, vec!['2', '2']);
    }

    #[test]
    fn sip_info_bodies_carry_keys() {
        assert_eq!(
            digit_from_info("application/dtmf-relay", b"Signal=1\r\nDuration=160\r\n"),
            Some('1')
        );
        assert_eq!(
            digit_from_info(
                "Application/DTMF-Relay; charset=x",
                b"signal= #\nduration=100"
            ),
            Some('#')
        );
        assert_eq!(digit_from_info("application/dtmf", b"9\r\n"), Some('9'));
        assert_eq!(
            digit_from_info("application/dtmf-relay", b"Signal=12\r\n"),
            None
        );
        assert_eq!(digit_from_info("text/plain", b"Signal=1"), None);
        assert_eq!(
            digit_from_info("application/dtmf-relay", &[0xff, 0xfe]),
            None
        );
    }

    #[test]
    fn keys_map_both_ways() {
        for d in "0123456789*#ABCD".chars() {
            assert_eq!(event_to_digit(digit_to_event(d).unwrap()), Some(d));
        }
        assert_eq!(digit_to_event('x'), None);
        assert_eq!(event_to_digit(200), None);
    }
}
