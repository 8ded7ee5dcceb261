//! ITU-T G.711 companding: µ-law (PCMU, RTP payload type 0) and A-law (PCMA, payload type 8).
//! Audio is prepared once per campaign in both laws, so the hot path only copies bytes.

const BIAS: i32 = 0x84;
const CLIP: i32 = 32_635;

/// Encodes one 16-bit linear sample to µ-law.
pub fn linear_to_ulaw(sample: i16) -> u8 {
    let mut s = sample as i32;
    let sign = if s < 0 {
        s = -s;
        0x80
    } else {
        0
    };
    s = s.min(CLIP) + BIAS;
    // The segment is the position of the highest set bit among bits 7..=14.
    let mut exponent = 7;
    let mut mask = 0x4000;
    while exponent > 0 && s & mask == 0 {
        exponent -= 1;
        mask >>= 1;
    }
    let mantissa = (s >> (exponent + 3)) & 0x0F;
    !((sign | (exponent << 4) | mantissa) as u8)
}

/// Decodes one µ-law byte to a 16-bit linear sample.
pub fn ulaw_to_linear(byte: u8) -> i16 {
    let u = !byte as i32;
    let sign = u & 0x80;
    let exponent = (u >> 4) & 0x07;
    let mantissa = u & 0x0F;
    let magnitude = (((mantissa << 3) + BIAS) << exponent) - BIAS;
    (if sign != 0 { -magnitude } else { magnitude }) as i16
}

/// Encodes one 16-bit linear sample to A-law.
pub fn linear_to_alaw(sample: i16) -> u8 {
    let s = sample as i32;
    let (sign, mag) = if s >= 0 { (0x80, s) } else { (0x00, -s - 1) };
    let mag = mag.min(0x7FFF) >> 3; // 13-bit magnitude
    let byte = if mag < 32 {
        (mag >> 1) as u8
    } else {
        let mut seg = 1;
        while seg < 7 && mag >= (64 << (seg - 1)) {
            seg += 1;
        }
        ((seg << 4) | ((mag >> seg) & 0x0F)) as u8
    };
    (byte | sign) ^ 0x55
}

/// Decodes one A-law byte to a 16-bit linear sample.
pub fn alaw_to_linear(byte: u8) -> i16 {
    let a = (byte ^ 0x55) as i32;
    let seg = (a >> 4) & 0x07;
    let mantissa = a & 0x0F;
    let magnitude = if seg == 0 {
        (mantissa << 4) + 8
    } else {
        ((mantissa << 4) + 0x108) << (seg - 1)
    };
    (if a & 0x80 != 0 { magnitude } else { -magnitude }) as i16
}

/// Encodes a buffer with µ-law.
pub fn encode_ulaw(samples: &[i16]) -> Vec<u8> {
    samples.iter().map(|s| linear_to_ulaw(*s)).collect()
}

/// Encodes a buffer with A-law.
pub fn encode_alaw(samples: &[i16]) -> Vec<u8> {
    samples.iter().map(|s| linear_to_alaw(*s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_encodes_to_the_standard_idle_codes() {
        assert_eq!(linear_to_ulaw(0), 0xFF);
        assert_eq!(linear_to_alaw(0), 0xD5);
        assert_eq!(ulaw_to_linear(0xFF), 0);
    }

    #[test]
    fn round_trip_error_stays_within_the_quantisation_step() {
        for s in (i16::MIN as i32 + 1..=i16::MAX as i32).step_by(7) {
            let s = s as i16;
            let mag = (s as i32).abs();
            // G.711 keeps about 4 bits of mantissa per segment: error below 1/16 of the magnitude + 16.
            let bound = mag / 16 + 40;
            let u = ulaw_to_linear(linear_to_ulaw(s)) as i32;
            assert!((u - s as i32).abs() <= bound, "µ-law {s} -> {u}");
            let a = alaw_to_linear(linear_to_alaw(s)) as i32;
            assert!((a - s as i32).abs() <= bound, "A-law {s} -> {a}");
        }
    }

    #[test]
    fn every_code_decodes_and_re_encodes_to_itself() {
        for b in 0..=255u8 {
            assert_eq!(linear_to_alaw(alaw_to_linear(b)), b, "A-law {b:#x}");
            let u = linear_to_ulaw(ulaw_to_linear(b));
            // µ-law has two zeros (0x7F and 0xFF); both decode to 0, which encodes to 0xFF.
            if b != 0x7F {
                assert_eq!(u, b, "µ-law {b:#x}");
            }
        }
    }
}
