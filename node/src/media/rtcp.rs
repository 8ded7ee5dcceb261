//! RTCP sender reports (RFC 3550 §6.4.1) for our outgoing streams, sent as the compound packet §6.1
//! requires: SR first, then SDES with a CNAME. We send no reception reports: we do not measure the
//! callee's audio quality, we only listen for keys.

use std::time::{SystemTime, UNIX_EPOCH};

/// RTCP packet types.
pub const PT_SR: u8 = 200;
pub const PT_SDES: u8 = 202;

/// Seconds between sender reports (§6.2's minimum interval).
pub const REPORT_INTERVAL_FRAMES: usize = 250;

/// The canonical name we announce in SDES: one per node is enough for a receiver to group streams.
pub const CNAME: &str = "campanile";

/// What a sender report says about a stream at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderInfo {
    pub ssrc: u32,
    /// NTP timestamp (seconds since 1900 in the high 32 bits, fraction in the low 32).
    pub ntp: u64,
    /// The RTP timestamp that corresponds to `ntp`.
    pub rtp_timestamp: u32,
    pub packets: u32,
    pub octets: u32,
}

/// Now as an NTP timestamp.
pub fn ntp_now() -> u64 {
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // 70 years (17 of them leap) between 1900 and 1970.
    let secs = since_unix.as_secs() + 2_208_988_800;
    let frac = ((since_unix.subsec_nanos() as u64) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// Appends a compound SR + SDES(CNAME) packet to `out`.
pub fn write_sender_report(info: &SenderInfo, out: &mut Vec<u8>) {
    // SR: header (RC = 0), SSRC, NTP, RTP ts, packet count, octet count = 7 words → length 6.
    out.push(0x80);
    out.push(PT_SR);
    out.extend_from_slice(&6u16.to_be_bytes());
    out.extend_from_slice(&info.ssrc.to_be_bytes());
    out.extend_from_slice(&info.ntp.to_be_bytes());
    out.extend_from_slice(&info.rtp_timestamp.to_be_bytes());
    out.extend_from_slice(&info.packets.to_be_bytes());
    out.extend_from_slice(&info.octets.to_be_bytes());
    // SDES: one chunk (SC = 1): SSRC, CNAME item, END, padded to a 32-bit boundary.
    let start = out.len();
    out.push(0x81);
    out.push(PT_SDES);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&info.ssrc.to_be_bytes());
    out.push(1);
    out.push(CNAME.len() as u8);
    out.extend_from_slice(CNAME.as_bytes());
    out.push(0);
    while !(out.len() - start).is_multiple_of(4) {
        out.push(0);
    }
    let words = ((out.len() - start) / 4 - 1) as u16;
    out[start + 2..start + 4].copy_from_slice(&words.to_be_bytes());
}

/// Reads the sender info of the first packet of a compound RTCP packet, if it is an SR.
pub fn parse_sender_report(buf: &[u8]) -> Option<SenderInfo> {
    let b = buf.get(..28)?;
    if b[0] >> 6 != 2 || b[1] != PT_SR {
        return None;
    }
    let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Some(SenderInfo {
        ssrc: word(4),
        ntp: ((word(8) as u64) << 32) | word(12) as u64,
        rtp_timestamp: word(16),
        packets: word(20),
        octets: word(24),
    })
}

/// Whether `buf` is a well-formed compound RTCP packet: every packet's length field lands exactly on
/// the end, version 2 throughout, and the first one is an SR or RR (§6.1).
pub fn is_valid_compound(buf: &[u8]) -> bool {
    let mut at = 0;
    let mut first = true;
    while at < buf.len() {
        let Some(h) = buf.get(at..at + 4) else {
            return false;
        };
        if h[0] >> 6 != 2 || (first && h[1] != PT_SR && h[1] != 201) {
            return false;
        }
        first = false;
        at += 4 * (u16::from_be_bytes([h[2], h[3]]) as usize + 1);
    }
    at == buf.len() && !first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sender_report_round_trips_and_is_a_valid_compound_packet() {
        let info = SenderInfo {
            ssrc: 0xDEAD_BEEF,
            ntp: ntp_now(),
            rtp_timestamp: 123_456,
            packets: 250,
            octets: 40_000,
        };
        let mut out = Vec::new();
        write_sender_report(&info, &mut out);
        assert_eq!(out.len() % 4, 0);
        assert!(is_valid_compound(&out));
        assert_eq!(parse_sender_report(&out), Some(info));
    }

    #[test]
    fn ntp_time_is_after_2020() {
        // 2020-01-01 is 3_786_825_600 s after 1900.
        assert!(ntp_now() >> 32 > 3_786_825_600);
    }

    #[test]
    fn garbage_is_not_a_sender_report() {
        assert_eq!(parse_sender_report(&[0u8; 3]), None);
        assert!(!is_valid_compound(&[0x80, 200, 0, 9]));
        assert!(!is_valid_compound(&[]));
    }
}
