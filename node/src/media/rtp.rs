//! RTP packets (RFC 3550): the fixed header we write, and a parser that tolerates CSRCs, header
//! extensions and padding and never panics on arbitrary bytes.

/// The fields of an RTP header we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    pub payload_type: u8,
    pub marker: bool,
    pub sequence: u16,
    pub timestamp: u32,
    pub ssrc: u32,
}

/// Why bytes are not an RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RtpError {
    #[error("packet of {0} bytes is shorter than an RTP header")]
    TooShort(usize),
    #[error("RTP version {0} is not 2")]
    BadVersion(u8),
    #[error("CSRC list, extension or padding runs past the end of the packet")]
    Truncated,
}

/// Length of the fixed header we write.
pub const HEADER_LEN: usize = 12;

/// Appends a packet (header + payload) to `out`.
pub fn write_packet(h: &RtpHeader, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(HEADER_LEN + payload.len());
    out.push(0x80);
    out.push(((h.marker as u8) << 7) | (h.payload_type & 0x7F));
    out.extend_from_slice(&h.sequence.to_be_bytes());
    out.extend_from_slice(&h.timestamp.to_be_bytes());
    out.extend_from_slice(&h.ssrc.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Parses a packet into its header and payload.
pub fn parse(buf: &[u8]) -> Result<(RtpHeader, &[u8]), RtpError> {
    if buf.len() < HEADER_LEN {
        return Err(RtpError::TooShort(buf.len()));
    }
    let version = buf[0] >> 6;
    if version != 2 {
        return Err(RtpError::BadVersion(version));
    }
    let padding = buf[0] & 0x20 != 0;
    let extension = buf[0] & 0x10 != 0;
    let csrc_count = (buf[0] & 0x0F) as usize;
    let mut start = HEADER_LEN + 4 * csrc_count;
    if extension {
        let ext = buf.get(start..start + 4).ok_or(RtpError::Truncated)?;
        let words = u16::from_be_bytes([ext[2], ext[3]]) as usize;
        start += 4 + 4 * words;
    }
    let mut end = buf.len();
    if padding {
        let pad = *buf.last().ok_or(RtpError::Truncated)? as usize;
        end = end.checked_sub(pad).ok_or(RtpError::Truncated)?;
    }
    if start > end {
        return Err(RtpError::Truncated);
    }
    let header = RtpHeader {
        payload_type: buf[1] & 0x7F,
        marker: buf[1] & 0x80 != 0,
        sequence: u16::from_be_bytes([buf[2], buf[3]]),
        timestamp: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
        ssrc: u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]),
    };
    Ok((header, &buf[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_bytes_follow_rfc_3550() {
        let h = RtpHeader {
            payload_type: 8,
            marker: true,
            sequence: 0x0102,
            timestamp: 0x03040506,
            ssrc: 0x0708090A,
        };
        let mut out = Vec::new();
        write_packet(&h, &[0xAA], &mut out);
        assert_eq!(out, [0x80, 0x88, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xAA]);
        assert_eq!(parse(&out).unwrap(), (h, &[0xAA][..]));
    }

    #[test]
    fn csrc_extension_and_padding_are_skipped() {
        let mut p = vec![0xB1, 0x00, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1];
        p.extend_from_slice(&[9, 9, 9, 9]); // one CSRC
        p.extend_from_slice(&[0xBE, 0xDE, 0, 1, 1, 2, 3, 4]); // extension of one word
        p.extend_from_slice(&[0x42, 0x43]); // payload
        p.extend_from_slice(&[0, 2]); // two bytes of padding
        let (_, payload) = parse(&p).unwrap();
        assert_eq!(payload, &[0x42, 0x43]);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            let _ = parse(&b);
        }

        #[test]
        fn write_then_parse_round_trips(pt in 0u8..128, m: bool, seq: u16, ts: u32, ssrc: u32,
                                        payload in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let h = RtpHeader { payload_type: pt, marker: m, sequence: seq, timestamp: ts, ssrc };
            let mut out = Vec::new();
            write_packet(&h, &payload, &mut out);
            let (back, p) = parse(&out).unwrap();
            proptest::prop_assert_eq!(back, h);
            proptest::prop_assert_eq!(p, &payload[..]);
        }
    }
}
