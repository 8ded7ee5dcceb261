//! In-band DTMF: some trunks pass keys only as tones inside the audio. A Goertzel filter per DTMF
//! frequency runs over each 20 ms frame (160 samples at 8 kHz); a key is reported once when the same
//! row/column pair dominates two consecutive frames (40 ms, the ITU-T Q.24 minimum), and again only
//! after a frame without it.
//!
//! A frame counts as a key when (1) the strongest row and column tones hold at least half the frame's
//! energy, (2) each beats the runner-up of its group by 6 dB, and (3) their twist is within 8 dB. These
//! reject speech and single tones (the chime), which rarely put half their energy in one row and one
//! column tone at once.

/// Samples per frame at 8 kHz.
pub const FRAME: usize = 160;
const ROWS: [f64; 4] = [697.0, 770.0, 852.0, 941.0];
const COLS: [f64; 4] = [1209.0, 1336.0, 1477.0, 1633.0];
const KEYS: [[char; 4]; 4] = [
    ['1', '2', '3', 'A'],
    ['4', '5', '6', 'B'],
    ['7', '8', '9', 'C'],
    ['*', '0', '#', 'D'],
];

/// Power of `freq` in `samples` (Goertzel), normalised so a full-scale sine of that frequency gives
/// about N²/4 · amplitude².
fn goertzel(samples: &[f64], freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / 8000.0;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0, 0.0);
    for x in samples {
        let s0 = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

/// The key whose tone pair dominates one frame, if any.
pub fn detect_frame(frame: &[i16]) -> Option<char> {
    if frame.len() < FRAME / 2 {
        return None;
    }
    let x: Vec<f64> = frame.iter().map(|s| *s as f64).collect();
    let energy: f64 = x.iter().map(|v| v * v).sum();
    // Below about -45 dBFS there is no key worth hearing.
    if energy < (x.len() as f64) * 180.0 {
        return None;
    }
    let rows: Vec<f64> = ROWS.iter().map(|f| goertzel(&x, *f)).collect();
    let cols: Vec<f64> = COLS.iter().map(|f| goertzel(&x, *f)).collect();
    let pick = |p: &[f64]| -> Option<(usize, f64)> {
        let (i, best) = p
            .iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        let second = p
            .iter()
            .copied()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, v)| v)
            .fold(0.0, f64::max);
        (best > 4.0 * second).then_some((i, best))
    };
    let (r, rp) = pick(&rows)?;
    let (c, cp) = pick(&cols)?;
    // A pure tone of amplitude A over N samples gives Goertzel power ≈ (A·N/2)², and energy A²·N/2.
    let n = x.len() as f64;
    let tone_energy = (rp + cp) * 2.0 / n;
    if tone_energy < 0.5 * energy {
        return None;
    }
    let twist = rp / cp;
    if !(1.0 / 6.3..=6.3).contains(&twist) {
        return None;
    }
    Some(KEYS[r][c])
}

/// Turns frames into key presses, each reported once.
#[derive(Debug, Default)]
pub struct InbandDetector {
    candidate: Option<char>,
    reported: Option<char>,
    pending: Vec<i16>,
}

impl InbandDetector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds decoded audio of any length; returns the keys that started in it.
    pub fn feed(&mut self, samples: &[i16]) -> Vec<char> {
        self.pending.extend_from_slice(samples);
        let mut keys = Vec::new();
        while self.pending.len() >= FRAME {
            let frame: Vec<i16> = self.pending.drain(..FRAME).collect();
            let d = detect_frame(&frame);
            match d {
                Some(k) if self.candidate == Some(k) && self.reported != Some(k) => {
                    self.reported = Some(k);
                    keys.push(k);
                }
                Some(_) => {}
                None => self.reported = None,
            }
            self.candidate = d;
        }
        keys
    }
}

/// A key as in-band DTMF (both tones at -9 dBFS) for `ms`, then `gap` ms of silence; nothing for a
/// character that is not a key.
pub fn key_tones(key: char, ms: usize, gap: usize) -> Vec<i16> {
    let found = (0..4)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .find(|(r, c)| KEYS[*r][*c] == key);
    let Some((r, c)) = found else {
        return Vec::new();
    };
    let n = 8 * ms;
    let mut out: Vec<i16> = (0..n)
        .map(|i| {
            let t = i as f64 / 8000.0;
            let v = 0.35 * (2.0 * std::f64::consts::PI * ROWS[r] * t).sin()
                + 0.35 * (2.0 * std::f64::consts::PI * COLS[c] * t).sin();
            (v * 32767.0) as i16
        })
        .collect();
    out.extend(std::iter::repeat_n(0, 8 * gap));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_detected_once_through_g711() {
        use crate::media::g711::{alaw_to_linear, linear_to_alaw, linear_to_ulaw, ulaw_to_linear};
        for key in "0123456789*#ABCD".chars() {
            let tones = key_tones(key, 100, 60);
            let via_ulaw: Vec<i16> = tones
                .iter()
                .map(|s| ulaw_to_linear(linear_to_ulaw(*s)))
                .collect();
            let via_alaw: Vec<i16> = tones
                .iter()
                .map(|s| alaw_to_linear(linear_to_alaw(*s)))
                .collect();
            for audio in [&tones, &via_ulaw, &via_alaw] {
                assert_eq!(InbandDetector::new().feed(audio), vec![key], "key {key}");
            }
        }
    }

    #[test]
    fn a_key_held_long_is_one_press_and_two_presses_are_two() {
        let mut d = InbandDetector::new();
        assert_eq!(d.feed(&key_tones('1', 600, 0)), vec!['1']);
        let mut two = key_tones('1', 80, 60);
        two.extend(key_tones('1', 80, 60));
        assert_eq!(InbandDetector::new().feed(&two), vec!['1', '1']);
    }

    #[test]
    fn blips_single_tones_noise_and_the_chime_are_not_keys() {
        // 20 ms is shorter than the 40 ms a key must last.
        assert!(InbandDetector::new()
            .feed(&key_tones('5', 20, 60))
            .is_empty());
        let single: Vec<i16> = (0..8000)
            .map(|i| {
                ((i as f64 * 2.0 * std::f64::consts::PI * 770.0 / 8000.0).sin() * 12000.0) as i16
            })
            .collect();
        assert!(InbandDetector::new().feed(&single).is_empty());
        let mut seed = 12345u64;
        let noise: Vec<i16> = (0..16000)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((seed >> 33) as i32 % 20000 - 10000) as i16
            })
            .collect();
        assert!(InbandDetector::new().feed(&noise).is_empty());
        assert!(InbandDetector::new()
            .feed(&crate::media::message::chime())
            .is_empty());
    }

    #[test]
    fn speech_is_not_taken_for_keys() {
        let speech = crate::media::tts::synthesize(
            "Premere uno per confermare. Allerta meteo rossa sul fiume.",
            "it",
        )
        .unwrap();
        assert!(InbandDetector::new().feed(&speech).is_empty());
    }
}
