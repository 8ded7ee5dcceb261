//! A simulated citizen noting down a verification code. The public page's verification call speaks
//! each digit as its own synthesised clip (`media::message::prepare_code_message`), so a listener
//! who knows the voice recognises a digit by its exact sound: the clip, encoded in the call's G.711
//! law, appears byte for byte in what the phone received. This is template matching against our own
//! TTS voice, not speech recognition; it proves the code travelled through SIP and RTP to the phone.

use std::sync::OnceLock;

use crate::media::{g711, message, tts};
use crate::sip::sdp::Codec;

/// Every digit's clip in every language, trimmed of leading and trailing silence.
fn templates() -> &'static [(char, Vec<i16>)] {
    static T: OnceLock<Vec<(char, Vec<i16>)>> = OnceLock::new();
    T.get_or_init(|| {
        let mut out = Vec::new();
        for lang in tts::LANGUAGES {
            for d in '0'..='9' {
                match message::digit_samples(d, lang) {
                    Ok(s) => out.push((d, trim(&s).to_vec())),
                    Err(e) => {
                        tracing::warn!(error = %e, "sim-city cannot synthesise digit templates")
                    }
                }
            }
        }
        out
    })
}

fn trim(s: &[i16]) -> &[i16] {
    let loud = |x: &i16| x.unsigned_abs() > 64;
    let start = s.iter().position(loud).unwrap_or(s.len());
    let end = s.iter().rposition(loud).map_or(start, |i| i + 1);
    &s[start..end]
}

/// The digits whose clips occur in `heard` (G.711 payload in `codec`), in the order spoken.
pub fn digits_heard(heard: &[u8], codec: Codec) -> String {
    let encode = |s: &[i16]| match codec {
        Codec::Pcma => g711::encode_alaw(s),
        _ => g711::encode_ulaw(s),
    };
    let mut found: Vec<(usize, usize, char)> = Vec::new();
    for (digit, clip) in templates() {
        if clip.len() < 400 {
            continue;
        }
        let needle = encode(clip);
        let mut from = 0;
        while let Some(at) = find(&heard[from..], &needle) {
            found.push((from + at, needle.len(), *digit));
            from += at + needle.len();
        }
    }
    found.sort();
    let mut out = String::new();
    let mut end = 0;
    for (at, len, d) in found {
        if at >= end {
            out.push(d);
            end = at + len;
        }
    }
    out
}

/// First position of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut i = 0;
    while i + needle.len() <= hay.len() {
        let at = hay[i..hay.len() - rest.len()]
            .iter()
            .position(|&b| b == first)?
            + i;
        if hay[at + 1..at + needle.len()] == *rest {
            return Some(at);
        }
        i = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_message_is_heard_digit_by_digit_in_both_laws() {
        if tts::synthesize("1", "it").is_err() {
            panic!("espeak-ng is needed (scripts/test-all.sh installs it)");
        }
        let audio = message::prepare_code_message("407193", "it").expect("code message");
        let samples: Vec<i16> = audio.samples.to_vec();
        assert_eq!(
            digits_heard(&g711::encode_ulaw(&samples), Codec::Pcmu),
            "407193407193"
        );
        assert_eq!(
            digits_heard(&g711::encode_alaw(&samples), Codec::Pcma),
            "407193407193"
        );
        let en = message::prepare_code_message("552", "en").expect("code message");
        assert_eq!(
            digits_heard(&g711::encode_ulaw(&en.samples), Codec::Pcmu),
            "552552"
        );
        assert_eq!(digits_heard(&[0xFF; 16_000], Codec::Pcmu), "");
    }

    #[test]
    fn find_finds_the_first_occurrence_or_none() {
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"abc", b"abcd"), None);
        assert_eq!(find(b"", b"a"), None);
        assert_eq!(find(b"aaab", b"ab"), Some(2));
    }
}
