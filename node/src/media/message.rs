//! What a call plays, prepared once per campaign and language: an attention chime, the message, and a
//! prompt in the citizen's language, as 20 ms G.711 frames in both laws. Prepared audio is
//! content-addressed and cached in memory and on disk, so a message is synthesised once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::{g711, tts, wav, MediaError};

/// Samples per 20 ms frame at 8 kHz.
pub const FRAME: usize = 160;

/// Audio ready to stream.
#[derive(Debug, Clone)]
pub struct PreparedAudio {
    pub samples: Arc<Vec<i16>>,
    pub pcmu: Arc<Vec<[u8; FRAME]>>,
    pub pcma: Arc<Vec<[u8; FRAME]>>,
}

impl PreparedAudio {
    /// Frames the samples in both laws, padding the last frame with silence.
    pub fn from_samples(samples: Vec<i16>) -> PreparedAudio {
        let mut pcmu = Vec::with_capacity(samples.len() / FRAME + 1);
        let mut pcma = Vec::with_capacity(samples.len() / FRAME + 1);
        for chunk in samples.chunks(FRAME) {
            let mut u = [g711::linear_to_ulaw(0); FRAME];
            let mut a = [g711::linear_to_alaw(0); FRAME];
            for (i, s) in chunk.iter().enumerate() {
                u[i] = g711::linear_to_ulaw(*s);
                a[i] = g711::linear_to_alaw(*s);
            }
            pcmu.push(u);
            pcma.push(a);
        }
        PreparedAudio {
            samples: Arc::new(samples),
            pcmu: Arc::new(pcmu),
            pcma: Arc::new(pcma),
        }
    }

    /// Length in milliseconds.
    pub fn duration_ms(&self) -> u64 {
        self.pcmu.len() as u64 * 20
    }
}

/// Content-addressed store of prepared audio.
pub struct AudioCache {
    memory: Mutex<HashMap<String, PreparedAudio>>,
    dir: Option<PathBuf>,
}

/// Bumped whenever the composition below changes, so old cache entries are not reused.
const COMPOSITION_VERSION: &str = "campanile-audio-v1";

impl AudioCache {
    /// A cache in memory, and on disk under `dir` when given.
    pub fn new(dir: Option<PathBuf>) -> AudioCache {
        if let Some(d) = &dir {
            if let Err(e) = std::fs::create_dir_all(d) {
                tracing::warn!(dir = %d.display(), error = %e, "audio cache directory unusable; caching in memory only");
            }
        }
        AudioCache {
            memory: Mutex::default(),
            dir,
        }
    }

    fn get_or_make(
        &self,
        key: &str,
        make: impl FnOnce() -> Result<Vec<i16>, MediaError>,
    ) -> Result<PreparedAudio, MediaError> {
        if let Some(a) = self.memory.lock().ok().and_then(|m| m.get(key).cloned()) {
            return Ok(a);
        }
        let path = self.dir.as_ref().map(|d| d.join(format!("{key}.wav")));
        let from_disk = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| wav::decode_to_8k(&b).ok());
        let samples = match from_disk {
            Some(s) => s,
            None => {
                let s = make()?;
                if let Some(p) = &path {
                    if let Err(e) = std::fs::write(p, wav::encode_wav_8k(&s)) {
                        tracing::warn!(path = %p.display(), error = %e, "cannot store prepared audio");
                    }
                }
                s
            }
        };
        let audio = PreparedAudio::from_samples(samples);
        if let Ok(mut m) = self.memory.lock() {
            m.insert(key.to_string(), audio.clone());
        }
        Ok(audio)
    }
}

fn content_key(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(COMPOSITION_VERSION);
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// The prompt after the message, in the citizen's language.
pub fn prompt_text(lang: &str) -> &'static str {
    match lang {
        "en" => "Press 1 to confirm you have heard this message. Press 2 to hear it again.",
        "de" => "Drücken Sie 1, um zu bestätigen. Drücken Sie 2, um die Nachricht erneut zu hören.",
        "fr" => "Appuyez sur 1 pour confirmer. Appuyez sur 2 pour réécouter le message.",
        "es" => "Pulse 1 para confirmar. Pulse 2 para escuchar el mensaje de nuevo.",
        _ => "Premere 1 per confermare l'ascolto. Premere 2 per riascoltare il messaggio.",
    }
}

/// Two soft descending tones, the attention signal before every alert (about one second).
pub fn chime() -> Vec<i16> {
    let mut out = Vec::new();
    for (hz, ms) in [(880.0f32, 400usize), (660.0, 500)] {
        let n = wav::RATE as usize * ms / 1000;
        for i in 0..n {
            let t = i as f32 / wav::RATE as f32;
            // 10 ms attack, exponential decay: a bell rather than a beep.
            let env = (i as f32 / 80.0).min(1.0) * (-3.0 * t).exp();
            let v = 0.5
                * env
                * ((2.0 * std::f32::consts::PI * hz * t).sin()
                    + 0.3 * (4.0 * std::f32::consts::PI * hz * t).sin());
            out.push((v * 20_000.0) as i16);
        }
        out.extend(silence(80));
    }
    out
}

fn silence(ms: usize) -> Vec<i16> {
    vec![0; wav::RATE as usize * ms / 1000]
}

/// Chime, the message spoken in `message_lang`, and the prompt in `prompt_lang`.
pub fn prepare_tts_message(
    text: &str,
    message_lang: &str,
    prompt_lang: &str,
    cache: &AudioCache,
) -> Result<PreparedAudio, MediaError> {
    let key = content_key(&["tts", text, message_lang, prompt_lang]);
    cache.get_or_make(&key, || {
        let message = tts::synthesize(text, message_lang)?;
        let prompt = tts::synthesize(prompt_text(prompt_lang), prompt_lang)?;
        Ok(compose(&message, &prompt))
    })
}

/// Chime, a recorded WAV message (any common format), and the prompt in `prompt_lang`.
pub fn prepare_wav(bytes: &[u8], prompt_lang: &str) -> Result<PreparedAudio, MediaError> {
    Ok(PreparedAudio::from_samples(recording_samples(
        bytes,
        prompt_lang,
    )?))
}

/// `prepare_wav` for a recording stored in the cluster under `sha256`, cached by it.
pub fn prepare_recording(
    sha256: &str,
    bytes: &[u8],
    prompt_lang: &str,
    cache: &AudioCache,
) -> Result<PreparedAudio, MediaError> {
    let key = content_key(&["recording", sha256, prompt_lang]);
    cache.get_or_make(&key, || recording_samples(bytes, prompt_lang))
}

fn recording_samples(bytes: &[u8], prompt_lang: &str) -> Result<Vec<i16>, MediaError> {
    let message = wav::decode_to_8k(bytes)?;
    let prompt = tts::synthesize(prompt_text(prompt_lang), prompt_lang)?;
    Ok(compose(&message, &prompt))
}

/// Said before a message that is played again from the start because the call carrying it was lost.
pub fn repeated_text(lang: &str) -> &'static str {
    match lang {
        "en" => "This message is repeated.",
        "de" => "Diese Nachricht wird wiederholt.",
        "fr" => "Ce message est répété.",
        "es" => "Este mensaje se repite.",
        _ => "Questo messaggio viene ripetuto.",
    }
}

/// `audio` with "this message is repeated" in `lang` before it (the spoken words are cached).
pub fn with_repeated_prefix(
    audio: &PreparedAudio,
    lang: &str,
    cache: &AudioCache,
) -> Result<PreparedAudio, MediaError> {
    let key = content_key(&["repeated", lang]);
    let prefix = cache.get_or_make(&key, || {
        let mut words = tts::synthesize(repeated_text(lang), lang)?;
        words.extend(silence(300));
        Ok(words)
    })?;
    let mut samples = Vec::with_capacity(prefix.samples.len() + audio.samples.len());
    samples.extend_from_slice(&prefix.samples);
    samples.extend_from_slice(&audio.samples);
    Ok(PreparedAudio::from_samples(samples))
}

/// The words around a verification code, per language: the introduction and "again".
pub fn code_phrases(lang: &str) -> (&'static str, &'static str) {
    match lang {
        "en" => (
            "This is your verification code for voice alerts. The code is:",
            "Again:",
        ),
        "de" => (
            "Dies ist Ihr Bestätigungscode für Sprachwarnungen. Der Code lautet:",
            "Noch einmal:",
        ),
        "fr" => (
            "Voici votre code de vérification pour les alertes vocales. Le code est :",
            "Je répète :",
        ),
        "es" => (
            "Este es su código de verificación para las alertas de voz. El código es:",
            "Repito:",
        ),
        _ => (
            "Questo è il codice di verifica per le allerte vocali. Il codice è:",
            "Ripeto:",
        ),
    }
}

/// One digit as the code message speaks it: each digit is synthesised on its own, so a listener
/// (or the simulated city) hears the same sound for the same digit every time.
pub fn digit_samples(digit: char, lang: &str) -> Result<Vec<i16>, MediaError> {
    Ok(tts::synthesize(&digit.to_string(), lang)?)
}

/// A verification call's audio: the chime, the introduction, the code digit by digit, and the code
/// again. No prompt: nothing is asked of the citizen but to note the code.
pub fn prepare_code_message(code: &str, lang: &str) -> Result<PreparedAudio, MediaError> {
    let (intro, again) = code_phrases(lang);
    let mut digits = Vec::new();
    for d in code.chars() {
        digits.extend(digit_samples(d, lang)?);
        digits.extend(silence(450));
    }
    let mut out = chime();
    out.extend(silence(300));
    out.extend(tts::synthesize(intro, lang)?);
    out.extend(silence(500));
    out.extend_from_slice(&digits);
    out.extend(silence(500));
    out.extend(tts::synthesize(again, lang)?);
    out.extend(silence(500));
    out.extend_from_slice(&digits);
    out.extend(silence(300));
    Ok(PreparedAudio::from_samples(out))
}

fn compose(message: &[i16], prompt: &[i16]) -> Vec<i16> {
    let mut out = chime();
    out.extend(silence(300));
    out.extend_from_slice(message);
    out.extend(silence(600));
    out.extend_from_slice(prompt);
    out.extend(silence(300));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cover_the_samples_in_both_laws() {
        let a = PreparedAudio::from_samples(vec![1000; 161]);
        assert_eq!(a.pcmu.len(), 2);
        assert_eq!(a.pcma.len(), 2);
        assert_eq!(a.pcmu[1][1], g711::linear_to_ulaw(0));
        assert_eq!(a.duration_ms(), 40);
    }

    #[test]
    fn a_message_is_synthesised_once_then_served_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = AudioCache::new(Some(dir.path().to_path_buf()));
        let a = prepare_tts_message("Allerta di prova.", "it", "en", &cache).unwrap();
        // chime + message + prompt: several seconds.
        assert!(a.duration_ms() > 3000, "{} ms", a.duration_ms());
        let b = prepare_tts_message("Allerta di prova.", "it", "en", &cache).unwrap();
        assert!(Arc::ptr_eq(&a.pcmu, &b.pcmu));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A new cache on the same directory reads the stored audio instead of speaking again.
        let c = prepare_tts_message(
            "Allerta di prova.",
            "it",
            "en",
            &AudioCache::new(Some(dir.path().to_path_buf())),
        )
        .unwrap();
        assert_eq!(c.pcmu.len(), a.pcmu.len());
    }

    #[test]
    fn a_repeated_message_is_said_to_be_repeated_then_played_whole() {
        let cache = AudioCache::new(None);
        let message = PreparedAudio::from_samples(vec![1234; 8_000]);
        let repeated = with_repeated_prefix(&message, "it", &cache).unwrap();
        let extra = repeated.samples.len() - message.samples.len();
        // The spoken words and a short pause, then the whole message unchanged.
        assert!(extra > 4_000, "{extra} samples of prefix");
        assert_eq!(&repeated.samples[extra..], &message.samples[..]);
        assert!(repeated.samples[..extra].iter().any(|s| s.abs() > 1_000));
    }

    #[test]
    fn undecodable_upload_is_named() {
        let err = prepare_wav(b"not audio", "it").unwrap_err().to_string();
        assert!(err.contains("WAV"), "{err}");
    }
}
