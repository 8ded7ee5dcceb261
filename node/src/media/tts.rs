//! Text to speech through the `espeak-ng` program. The text goes in on stdin, never through a shell,
//! and the WAV it writes to stdout is converted like any uploaded file.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Languages we have voices and prompts for.
pub const LANGUAGES: [&str; 5] = ["it", "en", "de", "fr", "es"];

/// Why speech could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TtsError {
    #[error("espeak-ng not found on PATH: install it (apt-get install espeak-ng)")]
    NotInstalled,
    #[error("language `{0}` is not supported for speech (use one of it, en, de, fr, es)")]
    Language(String),
    #[error("the text to speak is empty")]
    EmptyText,
    #[error("espeak-ng failed: {0}")]
    Failed(String),
    #[error("espeak-ng took longer than {0:?}")]
    Timeout(Duration),
    #[error("espeak-ng produced audio we cannot read: {0}")]
    BadOutput(#[from] super::wav::WavError),
}

const TIMEOUT: Duration = Duration::from_secs(60);

/// Checks once at startup that speech can be made, so a node never dials silence.
pub fn check_available() -> Result<(), TtsError> {
    synthesize("prova", "it").map(|_| ())
}

/// Speaks `text` in `lang`; returns mono 8 kHz samples.
pub fn synthesize(text: &str, lang: &str) -> Result<Vec<i16>, TtsError> {
    if !LANGUAGES.contains(&lang) {
        return Err(TtsError::Language(lang.chars().take(16).collect()));
    }
    if text.trim().is_empty() {
        return Err(TtsError::EmptyText);
    }
    let mut child = Command::new("espeak-ng")
        .args(["-v", lang, "--stdout", "--stdin", "-b", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TtsError::NotInstalled,
            _ => TtsError::Failed(e.to_string()),
        })?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| TtsError::Failed("no stdin".into()))?;
    let input = text.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut stdout = child
        .stdout
        .take()
        .ok_or_else(|| TtsError::Failed("no stdout".into()))?;
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() > TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(TtsError::Timeout(TIMEOUT));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(TtsError::Failed(e.to_string())),
        }
    };
    let _ = writer.join();
    let wav = reader.join().unwrap_or_default();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        return Err(TtsError::Failed(format!("{status}: {}", err.trim())));
    }
    Ok(super::wav::decode_to_8k(&wav)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_language_speaks() {
        for lang in LANGUAGES {
            let s = synthesize("Allerta. Alert. Achtung.", lang).unwrap();
            // At least half a second of audio, and not silence.
            assert!(s.len() > 4000, "{lang}: {} samples", s.len());
            assert!(s.iter().any(|v| v.abs() > 5000), "{lang} is silent");
        }
    }

    #[test]
    fn unsupported_language_and_empty_text_are_refused() {
        assert!(matches!(synthesize("x", "tlh"), Err(TtsError::Language(_))));
        assert!(matches!(synthesize("  ", "it"), Err(TtsError::EmptyText)));
    }
}
