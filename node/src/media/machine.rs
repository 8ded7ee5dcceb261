//! Answering-machine detection on the audio the callee sends after answering (8 kHz linear samples).
//!
//! The heuristic, in the order it decides:
//! 1. **The beep**: a single steady tone between 300 and 2,500 Hz lasting at least 160 ms (8 frames of
//!    20 ms in a row whose zero-crossing frequency stays within 2 % and whose energy sits at that
//!    frequency: Goertzel power ≥ 60 % of the frame's energy) is a voicemail beep. A DTMF key is two
//!    tones, and speech moves its pitch and spreads its energy over harmonics, so neither passes.
//! 2. **A long greeting**: voice activity (frames above −40 dBFS, pauses shorter than 400 ms bridged)
//!    lasting 2.2 s or more within the first 6 s after the answer is a machine. People answer with a
//!    short "Pronto?" and wait; recorded greetings talk on.
//! 3. **A short greeting followed by silence** (speech shorter than 2.2 s, then 800 ms of silence) is a
//!    person. A callee that sends no audio at all is never judged: the call proceeds as for a person,
//!    because delaying the alert for a silent listener would be worse than the rare missed machine.
//!
//! After "machine" the caller stops talking over the greeting and waits for the end of the beep (at
//! most 800 ms once a beep was heard, since many boxes send nothing after it; at most 10 s for a
//! greeting without a beep), then plays the message once for the recording; the call's outcome is
//! `voicemail`, never `confirmed`.

/// Samples per 20 ms frame at 8 kHz.
const FRAME: usize = 160;
const FRAME_MS: u64 = 20;

/// Tunables of the heuristic (see the module documentation for what they mean).
#[derive(Debug, Clone, Copy)]
pub struct MachineConfig {
    pub voice_dbfs: f64,
    pub bridge_ms: u64,
    pub greeting_ms: u64,
    pub human_silence_ms: u64,
    pub analysis_ms: u64,
    pub beep_min_ms: u64,
    pub beep_hz: (f64, f64),
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            voice_dbfs: -40.0,
            bridge_ms: 400,
            greeting_ms: 2200,
            human_silence_ms: 800,
            analysis_ms: 6000,
            beep_min_ms: 160,
            beep_hz: (300.0, 2500.0),
        }
    }
}

/// What the detector concluded, reported once each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineEvent {
    Human,
    Machine,
    /// A beep has sounded long enough to be one (it may still be sounding; boxes often send nothing
    /// after it, so its end cannot always be heard).
    BeepStarted,
    /// The beep ended: the recording has started.
    Beep,
}

/// The detector; feed it the callee's audio in any chunk sizes.
pub struct MachineDetector {
    cfg: MachineConfig,
    pending: Vec<i16>,
    elapsed_ms: u64,
    /// Current run of voice (with bridged pauses), and the silence since the last voiced frame.
    voice_ms: u64,
    silence_ms: u64,
    verdict: Option<MachineEvent>,
    /// Consecutive tone frames and their frequency.
    tone_frames: u64,
    tone_hz: f64,
    beep_heard: bool,
}

impl MachineDetector {
    pub fn new(cfg: MachineConfig) -> Self {
        MachineDetector {
            cfg,
            pending: Vec::with_capacity(FRAME),
            elapsed_ms: 0,
            voice_ms: 0,
            silence_ms: 0,
            verdict: None,
            tone_frames: 0,
            tone_hz: 0.0,
            beep_heard: false,
        }
    }

    /// Whether a machine was detected (by its greeting or its beep).
    pub fn is_machine(&self) -> bool {
        self.verdict == Some(MachineEvent::Machine) || self.beep_heard
    }

    /// Feeds audio; returns what was concluded in it, in order.
    pub fn feed(&mut self, samples: &[i16]) -> Vec<MachineEvent> {
        let mut events = Vec::new();
        for &s in samples {
            self.pending.push(s);
            if self.pending.len() == FRAME {
                let frame = std::mem::take(&mut self.pending);
                self.frame(&frame, &mut events);
                self.pending = frame;
                self.pending.clear();
            }
        }
        events
    }

    fn frame(&mut self, frame: &[i16], events: &mut Vec<MachineEvent>) {
        if self.beep_heard {
            return;
        }
        self.elapsed_ms += FRAME_MS;
        let energy: f64 = frame.iter().map(|&s| (s as f64) * (s as f64)).sum();
        let rms = (energy / frame.len() as f64).sqrt();
        let dbfs = 20.0 * (rms.max(1e-9) / 32768.0).log10();
        let voiced = dbfs > self.cfg.voice_dbfs;

        // 1. The beep.
        match tone_of(frame, energy, self.cfg.beep_hz).filter(|_| voiced) {
            Some(hz)
                if self.tone_frames > 0 && (hz - self.tone_hz).abs() <= self.tone_hz * 0.02 =>
            {
                self.tone_frames += 1;
                if self.tone_frames * FRAME_MS == self.cfg.beep_min_ms {
                    if self.verdict != Some(MachineEvent::Machine) {
                        events.push(MachineEvent::Machine);
                        self.verdict = Some(MachineEvent::Machine);
                    }
                    events.push(MachineEvent::BeepStarted);
                }
            }
            Some(hz) => {
                self.tone_frames = 1;
                self.tone_hz = hz;
            }
            None => {
                if self.tone_frames * FRAME_MS >= self.cfg.beep_min_ms {
                    // The tone just ended: recording starts now.
                    self.beep_heard = true;
                    events.push(MachineEvent::Beep);
                    return;
                }
                self.tone_frames = 0;
            }
        }

        // 2 and 3. Greeting length, within the analysis window.
        if voiced {
            if self.silence_ms > self.cfg.bridge_ms {
                self.voice_ms = 0;
            }
            self.voice_ms += FRAME_MS + self.silence_ms.min(self.cfg.bridge_ms);
            self.silence_ms = 0;
        } else {
            self.silence_ms += FRAME_MS;
        }
        if self.verdict.is_some() || self.elapsed_ms > self.cfg.analysis_ms {
            return;
        }
        // A steady tone is not a greeting: leave it to the beep test.
        if self.voice_ms >= self.cfg.greeting_ms && self.tone_frames == 0 {
            self.verdict = Some(MachineEvent::Machine);
            events.push(MachineEvent::Machine);
        } else if self.voice_ms > 0 && self.silence_ms >= self.cfg.human_silence_ms {
            self.verdict = Some(MachineEvent::Human);
            events.push(MachineEvent::Human);
        }
    }
}

/// The frequency of a frame if it is one steady tone in `band`: zero crossings give the frequency,
/// a Goertzel filter at it must hold most of the energy.
fn tone_of(frame: &[i16], energy: f64, band: (f64, f64)) -> Option<f64> {
    if energy <= 0.0 || frame.len() < 2 {
        return None;
    }
    // Crossing instants, interpolated between samples; the frequency is half-periods over their span.
    let crossings: Vec<f64> = frame
        .windows(2)
        .enumerate()
        .filter(|(_, w)| (w[0] >= 0) != (w[1] >= 0))
        .map(|(i, w)| {
            let (a, b) = (w[0] as f64, w[1] as f64);
            i as f64 + if a == b { 0.0 } else { a / (a - b) }
        })
        .collect();
    let (Some(first), Some(last)) = (crossings.first(), crossings.last()) else {
        return None;
    };
    if crossings.len() < 3 || last <= first {
        return None;
    }
    let hz = (crossings.len() - 1) as f64 / 2.0 * 8000.0 / (last - first);
    if hz < band.0 || hz > band.1 {
        return None;
    }
    let coeff = 2.0 * (2.0 * std::f64::consts::PI * hz / 8000.0).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in frame {
        let s0 = x as f64 + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    // For a pure tone, power ≈ energy · N / 2.
    let purity = 2.0 * power / (energy * frame.len() as f64);
    (purity >= 0.6).then_some(hz)
}

/// Speech-like test audio and a voicemail greeting: syllables of a moving pitch with harmonics.
pub mod synth {
    /// `ms` of speech-like sound: 4 harmonics of a pitch gliding 110–190 Hz, syllables of 180 ms
    /// separated by 60 ms pauses, at about −18 dBFS.
    pub fn speech(ms: u64, seed: u64) -> Vec<i16> {
        let n = (ms * 8) as usize;
        let mut out = Vec::with_capacity(n);
        let mut phase = 0.0f64;
        let mut rng = seed | 1;
        let mut pitch = 150.0;
        for i in 0..n {
            let t_ms = i as u64 / 8;
            let in_syllable = t_ms % 240 < 180;
            if i % 1440 == 0 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                pitch = 110.0 + (rng % 80) as f64;
            }
            let glide = pitch + 20.0 * ((i as f64) / 800.0).sin();
            phase += 2.0 * std::f64::consts::PI * glide / 8000.0;
            let v: f64 = (1..=4).map(|h| (phase * h as f64).sin() / h as f64).sum();
            let envelope = if in_syllable {
                ((t_ms % 240) as f64 / 20.0).min(1.0)
            } else {
                0.0
            };
            out.push((v * envelope * 2500.0) as i16);
        }
        out
    }

    /// `ms` of a pure tone at `hz`, amplitude `amp`.
    pub fn tone(hz: f64, ms: u64, amp: f64) -> Vec<i16> {
        (0..ms * 8)
            .map(|i| ((2.0 * std::f64::consts::PI * hz * i as f64 / 8000.0).sin() * amp) as i16)
            .collect()
    }

    /// A voicemail box: a greeting of 3 to 4.5 s (by seed), 400 ms of silence, a 1 kHz beep of 500 ms.
    pub fn voicemail_greeting(seed: u64) -> Vec<i16> {
        let mut out = speech(3000 + seed % 1500, seed);
        out.extend(std::iter::repeat_n(0, 3200));
        out.extend(tone(1000.0, 500, 10_000.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::synth::*;
    use super::*;

    fn run(audio: &[i16]) -> Vec<(u64, MachineEvent)> {
        let mut d = MachineDetector::new(MachineConfig::default());
        let mut out = Vec::new();
        for (i, chunk) in audio.chunks(160).enumerate() {
            for e in d.feed(chunk) {
                out.push((i as u64 * 20, e));
            }
        }
        out
    }

    fn silence(ms: u64) -> Vec<i16> {
        vec![0; (ms * 8) as usize]
    }

    #[test]
    fn a_short_hello_then_silence_is_a_person() {
        let mut a = speech(800, 3);
        a.extend(silence(2000));
        let events = run(&a);
        assert_eq!(
            events.iter().map(|e| e.1).collect::<Vec<_>>(),
            [MachineEvent::Human]
        );
    }

    #[test]
    fn a_long_greeting_is_a_machine_and_its_beep_is_heard() {
        let mut a = speech(4000, 5);
        a.extend(silence(1000));
        a.extend(tone(1000.0, 400, 8000.0));
        a.extend(silence(500));
        let events = run(&a);
        let kinds: Vec<_> = events.iter().map(|e| e.1).collect();
        assert_eq!(
            kinds,
            [
                MachineEvent::Machine,
                MachineEvent::BeepStarted,
                MachineEvent::Beep
            ]
        );
        // The beep is reported when it ends (5.4 s), within a frame.
        assert!((5400..=5440).contains(&events[2].0), "{events:?}");
    }

    #[test]
    fn a_beep_alone_is_a_machine() {
        let mut a = silence(500);
        a.extend(tone(850.0, 300, 6000.0));
        a.extend(silence(200));
        let kinds: Vec<_> = run(&a).iter().map(|e| e.1).collect();
        assert_eq!(
            kinds,
            [
                MachineEvent::Machine,
                MachineEvent::BeepStarted,
                MachineEvent::Beep
            ]
        );
    }

    #[test]
    fn silence_is_never_judged() {
        assert!(run(&silence(8000)).is_empty());
    }

    #[test]
    fn endless_speech_is_a_machine_without_a_beep() {
        let kinds: Vec<_> = run(&speech(8000, 9)).iter().map(|e| e.1).collect();
        assert_eq!(kinds, [MachineEvent::Machine]);
    }

    #[test]
    fn a_dtmf_key_is_not_a_beep() {
        let mut a = crate::media::inband::key_tones('1', 300, 100);
        a.extend(silence(1000));
        assert!(!run(&a).iter().any(|e| e.1 == MachineEvent::Beep));
    }

    #[test]
    fn every_voicemail_greeting_is_recognised_with_its_beep() {
        for seed in 0..8 {
            let g = voicemail_greeting(seed);
            let mut a = g.clone();
            a.extend(silence(300));
            let events = run(&a);
            let kinds: Vec<_> = events.iter().map(|e| e.1).collect();
            assert_eq!(
                kinds,
                [
                    MachineEvent::Machine,
                    MachineEvent::BeepStarted,
                    MachineEvent::Beep
                ],
                "seed {seed}"
            );
            let beep_end_ms = g.len() as u64 / 8;
            assert!(events[2].0 <= beep_end_ms + 40, "seed {seed}: {events:?}");
        }
    }

    /// Real speech from espeak-ng (not our synthetic syllables): a short answer is a person, a
    /// recorded greeting is a machine, and neither contains a beep.
    #[test]
    fn espeak_speech_is_judged_by_its_length_and_never_taken_for_a_beep() {
        let hello = crate::media::tts::synthesize("Pronto?", "it").unwrap();
        let mut a = hello.clone();
        a.extend(silence(1500));
        let kinds: Vec<_> = run(&a).iter().map(|e| e.1).collect();
        assert_eq!(
            kinds,
            [MachineEvent::Human],
            "{} ms of hello",
            hello.len() / 8
        );
        let greeting = crate::media::tts::synthesize(
            "Risponde la segreteria telefonica di Mario Rossi. Lasciate un messaggio dopo il segnale acustico.",
            "it",
        )
        .unwrap();
        let kinds: Vec<_> = run(&greeting).iter().map(|e| e.1).collect();
        assert_eq!(kinds, [MachineEvent::Machine]);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_audio_never_panics(audio in proptest::collection::vec(proptest::num::i16::ANY, 0..4000)) {
            let mut d = MachineDetector::new(MachineConfig::default());
            for chunk in audio.chunks(97) {
                let _ = d.feed(chunk);
            }
        }
    }
}
