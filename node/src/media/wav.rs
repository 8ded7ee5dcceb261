//! Audio in: a WAV file of any common PCM or float format, rate and channel count becomes mono 16-bit
//! samples at 8 kHz, level-normalised, ready for G.711.
//!
//! Resampling is a windowed-sinc interpolator (Blackman window, 16 zero crossings each side) whose cutoff
//! is 90 % of the lower Nyquist frequency, so downsampling from 22.05 or 48 kHz does not alias.
//! Normalisation scales the peak to -3 dBFS, leaving telephone-network headroom.

use std::io::Cursor;

/// Telephone audio rate.
pub const RATE: u32 = 8000;

/// Why a WAV could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WavError {
    #[error("not a WAV file we can read: {0}")]
    NotWav(String),
    #[error("unsupported sample format: {0}")]
    Unsupported(String),
    #[error("the WAV file contains no audio")]
    Empty,
    #[error("the WAV file is longer than {0} minutes")]
    TooLong(u32),
}

/// The longest message we accept.
const MAX_MINUTES: u32 = 10;

/// Decodes WAV bytes into mono i16 at 8 kHz, normalised.
pub fn decode_to_8k(bytes: &[u8]) -> Result<Vec<i16>, WavError> {
    let bytes = repair_streamed_header(bytes);
    let reader = hound::WavReader::new(Cursor::new(&bytes[..]))
        .map_err(|e| WavError::NotWav(e.to_string()))?;
    let spec = reader.spec();
    if spec.channels == 0 || spec.sample_rate == 0 {
        return Err(WavError::NotWav(
            "zero channels or sample rate in the header".into(),
        ));
    }
    if spec.sample_rate < 4000 || spec.sample_rate > 384_000 {
        return Err(WavError::Unsupported(format!(
            "sample rate {} Hz",
            spec.sample_rate
        )));
    }
    let frames = reader.duration() as u64;
    if frames > MAX_MINUTES as u64 * 60 * spec.sample_rate as u64 {
        return Err(WavError::TooLong(MAX_MINUTES));
    }
    let channels = spec.channels as usize;
    let interleaved: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(|e| WavError::NotWav(e.to_string()))?,
        (hound::SampleFormat::Int, bits @ (8 | 16 | 24 | 32)) => {
            let scale = 1.0 / (1u64 << (bits - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(|e| WavError::NotWav(e.to_string()))?
        }
        (fmt, bits) => {
            return Err(WavError::Unsupported(format!("{bits}-bit {fmt:?}")));
        }
    };
    let mono: Vec<f32> = interleaved
        .chunks(channels)
        .map(|c| c.iter().sum::<f32>() / channels as f32)
        .collect();
    if mono.is_empty() {
        return Err(WavError::Empty);
    }
    let resampled = resample(&mono, spec.sample_rate, RATE);
    Ok(normalise(&resampled))
}

/// Programs that write WAV to a pipe (espeak-ng --stdout, sox -) cannot know the length in advance and
/// put a placeholder (often 0x7FFFFFFF or 0) in the RIFF and data sizes. Clamp them to what is there.
fn repair_streamed_header(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut pos = 12;
    while pos + 8 <= bytes.len() {
        let size = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]) as usize;
        let available = bytes.len() - pos - 8;
        if &bytes[pos..pos + 4] == b"data" {
            if size <= available && size != 0 {
                return std::borrow::Cow::Borrowed(bytes);
            }
            let mut fixed = bytes.to_vec();
            let data_len = (available as u32) & !1;
            fixed[pos + 4..pos + 8].copy_from_slice(&data_len.to_le_bytes());
            let riff_len = (pos + 8 - 8) as u32 + data_len;
            fixed[4..8].copy_from_slice(&riff_len.to_le_bytes());
            fixed.truncate(pos + 8 + data_len as usize);
            return std::borrow::Cow::Owned(fixed);
        }
        pos = match pos.checked_add(8 + size + (size & 1)) {
            Some(p) => p,
            None => break,
        };
    }
    std::borrow::Cow::Borrowed(bytes)
}

/// Converts f32 samples at `from` Hz to `to` Hz with a band-limited windowed-sinc interpolator.
pub fn resample(input: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || input.is_empty() {
        return input.to_vec();
    }
    const ZERO_CROSSINGS: f64 = 16.0;
    let ratio = to as f64 / from as f64;
    // Cutoff relative to the input rate: 90 % of the lower Nyquist.
    let cutoff = 0.45 * ratio.min(1.0);
    let half_width = ZERO_CROSSINGS / (2.0 * cutoff);
    let out_len = ((input.len() as f64) * ratio).round() as usize;
    let mut out = Vec::with_capacity(out_len);
    for n in 0..out_len {
        let x = n as f64 / ratio;
        let first = ((x - half_width).ceil().max(0.0)) as usize;
        let last = ((x + half_width).floor() as usize).min(input.len() - 1);
        let mut acc = 0.0f64;
        for (k, sample) in input.iter().enumerate().take(last + 1).skip(first) {
            let t = x - k as f64;
            let arg = 2.0 * cutoff * t;
            let sinc = if arg.abs() < 1e-9 {
                1.0
            } else {
                (std::f64::consts::PI * arg).sin() / (std::f64::consts::PI * arg)
            };
            // Blackman window over [-half_width, half_width].
            let w = (t + half_width) / (2.0 * half_width);
            let window = 0.42 - 0.5 * (2.0 * std::f64::consts::PI * w).cos()
                + 0.08 * (4.0 * std::f64::consts::PI * w).cos();
            acc += *sample as f64 * 2.0 * cutoff * sinc * window;
        }
        out.push(acc as f32);
    }
    out
}

/// Scales so the peak sits at -3 dBFS and converts to i16. Silence stays silence.
pub fn normalise(samples: &[f32]) -> Vec<i16> {
    let peak = samples.iter().fold(0.0f32, |m, s| m.max(s.abs()));
    let gain = if peak < 1e-6 { 0.0 } else { 0.708 / peak };
    samples
        .iter()
        .map(|s| (s * gain * 32767.0).round().clamp(-32768.0, 32767.0) as i16)
        .collect()
}

/// Writes 8 kHz mono 16-bit samples as WAV bytes.
pub fn encode_wav_8k(samples: &[i16]) -> Vec<u8> {
    let mut cursor = Cursor::new(Vec::new());
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    if let Ok(mut w) = hound::WavWriter::new(&mut cursor, spec) {
        for s in samples {
            if w.write_sample(*s).is_err() {
                break;
            }
        }
        let _ = w.finalize();
    }
    cursor.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(rate: u32, channels: u16, bits: u16, float: bool, samples: &[f32]) -> Vec<u8> {
        let mut cursor = Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: bits,
            sample_format: if float {
                hound::SampleFormat::Float
            } else {
                hound::SampleFormat::Int
            },
        };
        let mut w = hound::WavWriter::new(&mut cursor, spec).unwrap();
        for s in samples {
            for _ in 0..channels {
                if float {
                    w.write_sample(*s).unwrap();
                } else {
                    let max = ((1i64 << (bits - 1)) - 1) as f32;
                    w.write_sample((*s * max) as i32).unwrap();
                }
            }
        }
        w.finalize().unwrap();
        cursor.into_inner()
    }

    fn tone(rate: u32, hz: f32, secs: f32) -> Vec<f32> {
        (0..(rate as f32 * secs) as usize)
            .map(|i| 0.5 * (2.0 * std::f32::consts::PI * hz * i as f32 / rate as f32).sin())
            .collect()
    }

    /// Energy of `hz` in `x` (8 kHz) by correlation, relative to the signal energy.
    fn tone_share(x: &[i16], hz: f32) -> f32 {
        let (mut re, mut im, mut e) = (0.0f32, 0.0f32, 0.0f32);
        for (i, s) in x.iter().enumerate() {
            let s = *s as f32;
            let ph = 2.0 * std::f32::consts::PI * hz * i as f32 / 8000.0;
            re += s * ph.cos();
            im += s * ph.sin();
            e += s * s;
        }
        2.0 * (re * re + im * im) / (x.len() as f32 * e.max(1.0))
    }

    #[test]
    fn formats_rates_and_channels_all_become_8k_mono() {
        let t = tone(48_000, 440.0, 0.5);
        for (bits, float) in [
            (8, false),
            (16, false),
            (24, false),
            (32, false),
            (32, true),
        ] {
            let out = decode_to_8k(&wav(48_000, 2, bits, float, &t)).unwrap();
            assert_eq!(out.len(), 4000, "{bits}-bit float={float}");
            assert!(tone_share(&out, 440.0) > 0.9, "{bits}-bit float={float}");
            let peak = out.iter().map(|s| (*s as i32).abs()).max().unwrap();
            assert!(
                (22_000..=23_500).contains(&peak),
                "peak {peak} is not -3 dBFS"
            );
        }
    }

    #[test]
    fn downsampling_does_not_alias() {
        // 6 kHz is above the 4 kHz Nyquist of telephone audio: it must be filtered out, not folded to 2 kHz.
        let mut x = tone(22_050, 440.0, 0.5);
        for (i, s) in tone(22_050, 6000.0, 0.5).iter().enumerate() {
            x[i] += s;
        }
        let out = decode_to_8k(&wav(22_050, 1, 16, false, &x)).unwrap();
        assert!(tone_share(&out, 2000.0) < 0.01);
        assert!(tone_share(&out, 440.0) > 0.9);
    }

    #[test]
    fn bad_files_are_named() {
        assert!(matches!(
            decode_to_8k(b"RIFF...."),
            Err(WavError::NotWav(_))
        ));
        assert!(matches!(decode_to_8k(b"hello"), Err(WavError::NotWav(_))));
        assert!(matches!(
            decode_to_8k(&wav(8000, 1, 16, false, &[])),
            Err(WavError::Empty)
        ));
    }

    #[test]
    fn streamed_headers_with_placeholder_sizes_are_repaired() {
        let mut b = encode_wav_8k(&vec![1000i16; 800]);
        let data = b.windows(4).position(|w| w == b"data").unwrap();
        b[data + 4..data + 8].copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        b[4..8].copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        assert_eq!(decode_to_8k(&b).unwrap().len(), 800);
    }

    #[test]
    fn encoded_wav_decodes_back() {
        let samples: Vec<i16> = (0..800)
            .map(|i| ((i % 100) * 200 - 10_000) as i16)
            .collect();
        let back = decode_to_8k(&encode_wav_8k(&samples)).unwrap();
        assert_eq!(back.len(), samples.len());
    }

    /// A RIFF/WAVE container around a `fmt ` chunk of the given fields and a `data` chunk whose
    /// declared size may differ from what follows it.
    #[allow(clippy::too_many_arguments)]
    fn container(
        tag: u16,
        channels: u16,
        rate: u32,
        byte_rate: u32,
        align: u16,
        bits: u16,
        declared: u32,
        data: &[u8],
    ) -> Vec<u8> {
        let mut fmt = Vec::new();
        for f in [
            &tag.to_le_bytes()[..],
            &channels.to_le_bytes(),
            &rate.to_le_bytes(),
        ] {
            fmt.extend_from_slice(f);
        }
        for f in [
            &byte_rate.to_le_bytes()[..],
            &align.to_le_bytes(),
            &bits.to_le_bytes(),
        ] {
            fmt.extend_from_slice(f);
        }
        let mut out = b"RIFF\0\0\0\0WAVEfmt ".to_vec();
        out.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
        out.extend_from_slice(&fmt);
        out.extend_from_slice(b"data");
        out.extend_from_slice(&declared.to_le_bytes());
        out.extend_from_slice(data);
        let riff = (out.len() - 8) as u32;
        out[4..8].copy_from_slice(&riff.to_le_bytes());
        out
    }

    #[test]
    fn the_hostile_container_is_a_wav_when_its_fields_are_sound() {
        // So that the property below reaches the decoder's sample paths, not only its refusals.
        let data: Vec<u8> = (0..64u8).collect();
        let ok = container(1, 1, 8000, 16000, 2, 16, 64, &data);
        assert_eq!(
            decode_to_8k(&ok)
                .map(|s| s.len())
                .map_err(|e| e.to_string()),
            Ok(32)
        );
        let stereo_float = container(3, 2, 16000, 128_000, 8, 32, 64, &[0; 64]);
        assert_eq!(
            decode_to_8k(&stereo_float)
                .map(|s| s.len())
                .map_err(|e| e.to_string()),
            Ok(4)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode_to_8k(&b);
        }

        /// Random bytes rarely get past the RIFF header; here every header field is hostile
        /// (zero or huge channel counts, block alignments, sample sizes, rates; a data size that
        /// is not what follows) inside a container that parses, so the decoder meets them all.
        #[test]
        fn hostile_format_fields_never_panic(
            tag in proptest::sample::select(vec![1u16, 3, 0xFFFE, 0, 2, 6, 7]),
            channels in proptest::prop_oneof![0u16..4, proptest::num::u16::ANY],
            rate in proptest::prop_oneof![
                proptest::sample::select(vec![0u32, 3999, 4000, 8000, 44_100, 384_000, 384_001]),
                proptest::num::u32::ANY,
            ],
            byte_rate in proptest::num::u32::ANY,
            align in proptest::prop_oneof![0u16..9, proptest::num::u16::ANY],
            bits in proptest::prop_oneof![
                proptest::sample::select(vec![0u16, 1, 8, 12, 16, 24, 32, 33, 64]),
                proptest::num::u16::ANY,
            ],
            declared in proptest::prop_oneof![0u32..64, proptest::num::u32::ANY],
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            consistent in proptest::bool::weighted(0.7),
        ) {
            // Mostly fields that agree with each other, as a real file's do, so that the hostile
            // values get past the header checks into the sample paths; sometimes not.
            let (align, byte_rate) = if consistent {
                let align = channels.wrapping_mul(bits.div_ceil(8));
                (align, rate.wrapping_mul(u32::from(align)))
            } else {
                (align, byte_rate)
            };
            let _ = decode_to_8k(&container(tag, channels, rate, byte_rate, align, bits, declared, &data));
        }
    }
}
