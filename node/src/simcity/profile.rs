//! How the simulated citizens behave: a profile of probabilities and delays, and a deterministic choice
//! for each call from (seed, number, attempt), so a run can be replayed exactly.

use std::path::Path;

use serde::Deserialize;

/// Why a profile could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("unknown profile `{0}`: use always-answer, realistic, or a path to a TOML file")]
    Unknown(String),
    #[error("cannot read profile {0}: {1}")]
    Read(String, std::io::Error),
    #[error("profile {0}: {1}")]
    Invalid(String, String),
}

/// A population's behaviour. Weights of call outcomes need not sum to one; they are normalised.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Profile {
    /// Share of numbers that do not exist (always answered 404).
    pub invalid_numbers: f64,
    /// Per call: weight of answering.
    pub answer: f64,
    /// Per call: weight of a busy line (486).
    pub busy: f64,
    /// Per call: weight of ringing until the caller gives up (CANCEL).
    pub no_answer: f64,
    /// Per call: weight of a phone that is off or out of coverage (480 after `unreachable_delay_ms`).
    pub unreachable: f64,
    /// Per call: weight of voicemail picking up.
    pub voicemail: f64,
    /// Per call: weight of the carrier refusing the call as overloaded (503 with Retry-After: 1).
    pub congestion: f64,
    /// Answer after this many milliseconds, uniformly in [min, max].
    pub answer_delay_ms: [u64; 2],
    /// Of answered calls: share that press 1 after `press_after_ms` of audio.
    pub press_on_time: f64,
    /// Of answered calls: share that press 1 only after `late_press_after_ms` of audio.
    pub press_late: f64,
    /// Of answered calls: share that hang up after `hang_up_after_ms` of audio.
    pub hang_up_early: f64,
    pub press_after_ms: [u64; 2],
    pub late_press_after_ms: [u64; 2],
    pub hang_up_after_ms: [u64; 2],
    /// Voicemail answers after this delay and hangs up after `voicemail_listen_ms` of audio.
    pub voicemail_delay_ms: [u64; 2],
    pub voicemail_listen_ms: u64,
    pub unreachable_delay_ms: u64,
    /// A phone that is not answered stops ringing after this long (480).
    pub max_ring_ms: u64,
    /// An answered phone hangs up when no audio arrives for this long (the caller died).
    pub media_timeout_ms: u64,
    /// Phones answer without telephone-event and press keys as in-band tones (trunks that pass only audio).
    pub inband_dtmf: bool,
    /// The carrier answers with PCMA only (refusing calls that do not offer it, 488).
    pub alaw_only: bool,
    /// Ringing phones send 183 Session Progress with SDP (early media) instead of 180.
    pub early_media: bool,
    /// A phone that would answer is picked up just as the caller's CANCEL arrives: it answers the
    /// INVITE (200 OK) instead of 487, as when the 200 OK crosses the CANCEL (RFC 3261 §9.2).
    pub answer_on_cancel: bool,
    /// The carrier challenges every new INVITE (401) and wants these credentials; `None` = no auth.
    pub auth: Option<AuthQuirk>,
    /// The carrier's channel cap: a new call beyond this many in progress gets 503 with Retry-After.
    pub max_channels: Option<u64>,
    /// Phones listen for a spoken verification code (the public page's call) and write the digits
    /// they heard to the log (`heard_code`), as a citizen would note them down.
    pub hear_codes: bool,
}

/// The credentials a challenging carrier expects.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthQuirk {
    pub realm: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for AuthQuirk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AuthQuirk {{ realm: {:?}, username: {:?}, password: <redacted> }}",
            self.realm, self.username
        )
    }
}

impl Default for Profile {
    fn default() -> Self {
        Profile::always_answer()
    }
}

impl Profile {
    /// Every phone answers after 1 s and presses 1 after hearing 3 s of audio.
    pub fn always_answer() -> Profile {
        Profile {
            invalid_numbers: 0.0,
            answer: 1.0,
            busy: 0.0,
            no_answer: 0.0,
            unreachable: 0.0,
            voicemail: 0.0,
            congestion: 0.0,
            answer_delay_ms: [1000, 1000],
            press_on_time: 1.0,
            press_late: 0.0,
            hang_up_early: 0.0,
            press_after_ms: [3000, 3000],
            late_press_after_ms: [30_000, 30_000],
            hang_up_after_ms: [2000, 2000],
            voicemail_delay_ms: [3000, 3000],
            voicemail_listen_ms: 20_000,
            unreachable_delay_ms: 1000,
            max_ring_ms: 60_000,
            media_timeout_ms: 10_000,
            inband_dtmf: false,
            alaw_only: false,
            early_media: false,
            answer_on_cancel: false,
            auth: None,
            max_channels: None,
            hear_codes: false,
        }
    }

    /// A city on a weekday: most answer, some are busy or away, a few numbers are dead, some voicemail.
    pub fn realistic() -> Profile {
        Profile {
            invalid_numbers: 0.02,
            answer: 0.60,
            busy: 0.12,
            no_answer: 0.12,
            unreachable: 0.06,
            voicemail: 0.08,
            congestion: 0.02,
            answer_delay_ms: [300, 3000],
            press_on_time: 0.75,
            press_late: 0.10,
            hang_up_early: 0.05,
            press_after_ms: [2000, 5000],
            late_press_after_ms: [20_000, 40_000],
            hang_up_after_ms: [1000, 3000],
            voicemail_delay_ms: [2500, 3500],
            voicemail_listen_ms: 20_000,
            unreachable_delay_ms: 1000,
            max_ring_ms: 60_000,
            media_timeout_ms: 10_000,
            inband_dtmf: false,
            alaw_only: false,
            early_media: false,
            answer_on_cancel: false,
            auth: None,
            max_channels: None,
            hear_codes: false,
        }
    }

    fn weights(&self) -> [f64; 6] {
        [
            self.answer,
            self.busy,
            self.no_answer,
            self.unreachable,
            self.voicemail,
            self.congestion,
        ]
    }

    fn validate(&self) -> Result<(), String> {
        let weights = self.weights();
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || weights.iter().sum::<f64>() <= 0.0
        {
            return Err("answer, busy, no_answer, unreachable, voicemail and congestion must be non-negative and not all zero".into());
        }
        for (key, v) in [
            ("invalid_numbers", self.invalid_numbers),
            ("press_on_time", self.press_on_time),
            ("press_late", self.press_late),
            ("hang_up_early", self.hang_up_early),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("`{key}` must be between 0 and 1"));
            }
        }
        if self.press_on_time + self.press_late + self.hang_up_early > 1.0 + 1e-9 {
            return Err("press_on_time + press_late + hang_up_early must not exceed 1".into());
        }
        for (key, [a, b]) in [
            ("answer_delay_ms", self.answer_delay_ms),
            ("press_after_ms", self.press_after_ms),
            ("late_press_after_ms", self.late_press_after_ms),
            ("hang_up_after_ms", self.hang_up_after_ms),
            ("voicemail_delay_ms", self.voicemail_delay_ms),
        ] {
            if a > b {
                return Err(format!("`{key}` must be [min, max] with min <= max"));
            }
        }
        Ok(())
    }
}

/// Loads a built-in profile by name or a TOML file by path.
pub fn load_profile(name_or_path: &str) -> Result<Profile, ProfileError> {
    match name_or_path {
        "always-answer" => return Ok(Profile::always_answer()),
        "realistic" => return Ok(Profile::realistic()),
        _ => {}
    }
    let path = Path::new(name_or_path);
    if !path.exists() {
        return Err(ProfileError::Unknown(name_or_path.into()));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| ProfileError::Read(name_or_path.into(), e))?;
    let p: Profile = toml::from_str(&text).map_err(|e| {
        ProfileError::Invalid(name_or_path.into(), e.to_string().trim().replace('\n', " "))
    })?;
    p.validate()
        .map_err(|e| ProfileError::Invalid(name_or_path.into(), e))?;
    Ok(p)
}

/// What an answered phone does with the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Press 1 after this much audio.
    PressAfter(u64),
    /// Hang up after this much audio.
    HangUpAfter(u64),
    /// Listen and never press.
    Never,
}

/// What one phone does with one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Invalid,
    Busy,
    Unreachable {
        after_ms: u64,
    },
    NoAnswer {
        max_ring_ms: u64,
    },
    Answer {
        delay_ms: u64,
        listener: Listener,
    },
    Voicemail {
        delay_ms: u64,
        listen_ms: u64,
    },
    /// The carrier is overloaded: 503 with Retry-After.
    Congestion,
}

/// SplitMix64: small, fast, and the same on every platform.
pub struct Rng(u64);

impl Rng {
    /// Seeds from (seed, number, attempt) with FNV-1a over the number.
    pub fn for_call(seed: u64, number: &str, attempt: u32) -> Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in number.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Rng(seed ^ h.rotate_left(17) ^ (attempt as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [a, b].
    pub fn between(&mut self, [a, b]: [u64; 2]) -> u64 {
        if b <= a {
            a
        } else {
            a + self.next_u64() % (b - a + 1)
        }
    }
}

impl Profile {
    /// The behaviour of `number` on its `attempt`-th call (1-based), for this seed.
    pub fn behaviour(&self, seed: u64, number: &str, attempt: u32) -> Behaviour {
        if Rng::for_call(seed, number, 0).unit() < self.invalid_numbers {
            return Behaviour::Invalid;
        }
        let mut rng = Rng::for_call(seed, number, attempt.max(1));
        let weights = self.weights();
        let total: f64 = weights.iter().sum();
        let mut pick = rng.unit() * total;
        let mut choice = 0;
        for (i, w) in weights.iter().enumerate() {
            if pick < *w {
                choice = i;
                break;
            }
            pick -= w;
            choice = i;
        }
        match choice {
            0 => {
                let delay_ms = rng.between(self.answer_delay_ms);
                let r = rng.unit();
                let listener = if r < self.press_on_time {
                    Listener::PressAfter(rng.between(self.press_after_ms))
                } else if r < self.press_on_time + self.press_late {
                    Listener::PressAfter(rng.between(self.late_press_after_ms))
                } else if r < self.press_on_time + self.press_late + self.hang_up_early {
                    Listener::HangUpAfter(rng.between(self.hang_up_after_ms))
                } else {
                    Listener::Never
                };
                Behaviour::Answer { delay_ms, listener }
            }
            1 => Behaviour::Busy,
            2 => Behaviour::NoAnswer {
                max_ring_ms: self.max_ring_ms,
            },
            3 => Behaviour::Unreachable {
                after_ms: self.unreachable_delay_ms,
            },
            5 => Behaviour::Congestion,
            _ => Behaviour::Voicemail {
                delay_ms: rng.between(self.voicemail_delay_ms),
                listen_ms: self.voicemail_listen_ms,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_city() {
        let p = Profile::realistic();
        for n in 0..200 {
            let number = format!("+39347{n:07}");
            for attempt in 1..4 {
                assert_eq!(
                    p.behaviour(7, &number, attempt),
                    p.behaviour(7, &number, attempt)
                );
            }
        }
        let differs = (0..200).any(|n| {
            let number = format!("+39347{n:07}");
            p.behaviour(7, &number, 1) != p.behaviour(8, &number, 1)
        });
        assert!(differs, "the seed changes nothing");
    }

    #[test]
    fn realistic_mix_is_close_to_its_weights() {
        let p = Profile::realistic();
        let (mut answer, mut busy, mut invalid) = (0, 0, 0);
        let n = 20_000;
        for i in 0..n {
            match p.behaviour(1, &format!("+39347{i:07}"), 1) {
                Behaviour::Answer { .. } => answer += 1,
                Behaviour::Busy => busy += 1,
                Behaviour::Invalid => invalid += 1,
                _ => {}
            }
        }
        let share = |k: i32| k as f64 / n as f64;
        // The call weights sum to 0.98 and apply to the 98 % of numbers that exist: shares equal the weights.
        assert!(
            (share(answer) - 0.60).abs() < 0.03,
            "answer {}",
            share(answer)
        );
        assert!((share(busy) - 0.12).abs() < 0.02, "busy {}", share(busy));
        assert!(
            (share(invalid) - 0.02).abs() < 0.01,
            "invalid {}",
            share(invalid)
        );
    }

    #[test]
    fn congestion_is_drawn_at_its_weight() {
        let p = Profile::realistic();
        let n = 20_000;
        let congested = (0..n)
            .filter(|i| p.behaviour(5, &format!("+39347{i:07}"), 1) == Behaviour::Congestion)
            .count();
        let share = congested as f64 / n as f64;
        assert!((share - 0.02).abs() < 0.006, "congestion share {share}");
    }

    #[test]
    fn invalid_numbers_stay_invalid() {
        let p = Profile {
            invalid_numbers: 0.5,
            ..Profile::realistic()
        };
        for i in 0..100 {
            let number = format!("+39347{i:07}");
            let first = p.behaviour(3, &number, 1) == Behaviour::Invalid;
            for attempt in 2..5 {
                assert_eq!(
                    p.behaviour(3, &number, attempt) == Behaviour::Invalid,
                    first
                );
            }
        }
    }

    #[test]
    fn profile_files_are_validated_and_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "answer = 1.0\nbusy = 1.0\npress_on_time = 0.5\n").unwrap();
        let p = load_profile(path.to_str().unwrap()).unwrap();
        assert_eq!(p.busy, 1.0);
        std::fs::write(&path, "answr = 1.0\n").unwrap();
        let err = load_profile(path.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("answr"), "{err}");
        std::fs::write(&path, "press_on_time = 2.0\n").unwrap();
        let err = load_profile(path.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("press_on_time"), "{err}");
        assert!(matches!(
            load_profile("nonsense"),
            Err(ProfileError::Unknown(_))
        ));
    }
}
