//! The console's optional second factor: time-based one-time passwords (RFC 6238), the six-digit
//! codes of any authenticator app.
//!
//! An operator who turns it on shares a random secret with the app (as base32 text or a QR code of
//! an `otpauth://` address); at login the app's current code must come with the password. The
//! codes are HOTP (RFC 4226: HMAC-SHA-1 of a counter, dynamically truncated to six digits) with the
//! counter taken from the clock in 30-second steps. Everything here is pure: the caller passes the
//! time, so tests pin it to the RFCs' vectors. HMAC and SHA-1 come from the RustCrypto crates.

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Digits of a code.
pub const DIGITS: u32 = 6;
/// Seconds a code is current for (RFC 6238 §5.2's recommended time step).
pub const STEP_SECS: u64 = 30;
/// Steps either side of the current one still accepted, for clocks that drift (RFC 6238 §6).
pub const DRIFT_STEPS: u64 = 1;
/// Bytes of a new secret: 160 bits, RFC 4226 §4 R6's recommendation and SHA-1's output size.
pub const SECRET_BYTES: usize = 20;
/// Fewest secret bytes accepted from a form: RFC 4226 §4 R6's minimum of 128 bits.
pub const MIN_SECRET_BYTES: usize = 16;
/// Most secret bytes accepted from a form (a secret longer than HMAC's block is hashed anyway).
pub const MAX_SECRET_BYTES: usize = 64;

/// RFC 4648 §6's base32 alphabet.
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// Base32 (RFC 4648 §6) of `bytes`, upper case, without `=` padding, as authenticator apps take it.
pub fn base32_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in bytes {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// The bytes of base32 text: either case, with or without trailing `=` padding, spaces ignored
/// (people copy secrets in groups). None when it is not base32 — a letter outside the alphabet,
/// `=` before the end, a length no encoding produces, or bits left over that are not zero.
pub fn base32_decode(text: &str) -> Option<Vec<u8>> {
    let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let end = compact
        .iter()
        .rposition(|&b| b != b'=')
        .map_or(0, |i| i + 1);
    let symbols = &compact[..end];
    // RFC 4648 §6: the last quantum has 2, 4, 5 or 7 symbols (or none).
    if matches!(symbols.len() % 8, 1 | 3 | 6) {
        return None;
    }
    let mut out = Vec::with_capacity(symbols.len() * 5 / 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &s in symbols {
        let value = match s.to_ascii_uppercase() {
            c @ b'A'..=b'Z' => c - b'A',
            c @ b'2'..=b'7' => c - b'2' + 26,
            _ => return None,
        };
        buffer = (buffer << 5) | u32::from(value);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
        buffer &= (1 << bits) - 1;
    }
    // RFC 4648 §3.5: the pad bits of a canonical encoding are zero.
    (buffer == 0).then_some(out)
}

/// A fresh secret: `SECRET_BYTES` from the operating system's generator, base32.
pub fn new_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base32_encode(&bytes)
}

/// Whether `secret_b32` is base32 of `MIN_SECRET_BYTES` to `MAX_SECRET_BYTES` bytes: what a form
/// may hand back as a secret to turn on.
pub fn valid_secret(secret_b32: &str) -> bool {
    base32_decode(secret_b32)
        .is_some_and(|k| (MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&k.len()))
}

/// RFC 4226 §5.3: HMAC-SHA-1 of the big-endian counter, dynamically truncated, modulo 10^digits,
/// zero-padded to `digits`. None only if HMAC refused the key, which it never does (any length goes).
fn hotp(key: &[u8], counter: u64, digits: u32) -> Option<String> {
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(key).ok()?;
    mac.update(&counter.to_be_bytes());
    let hs = mac.finalize().into_bytes();
    // RFC 4226 §5.4: the low nibble of the last byte picks where 31 bits are read (at most byte 18).
    let offset = usize::from(*hs.last()? & 0x0f);
    let window = hs.get(offset..offset + 4)?;
    let binary = u32::from_be_bytes([window[0] & 0x7f, window[1], window[2], window[3]]);
    Some(format!(
        "{:0width$}",
        binary % 10u32.pow(digits),
        width = digits as usize
    ))
}

/// RFC 6238 §4.2: the number of whole steps since the Unix epoch.
fn step_at(unix_secs: u64) -> u64 {
    unix_secs / STEP_SECS
}

/// The key of a secret, None when it is not base32 or empty.
fn key_of(secret_b32: &str) -> Option<Vec<u8>> {
    base32_decode(secret_b32).filter(|k| !k.is_empty())
}

/// The six-digit code an authenticator app shows at `unix_secs` for `secret_b32`; None when the
/// secret is not base32 or empty.
pub fn code_at(secret_b32: &str, unix_secs: u64) -> Option<String> {
    let key = key_of(secret_b32)?;
    hotp(&key, step_at(unix_secs), DIGITS)
}

/// The step (`unix_secs / STEP_SECS`) whose code `code` is, among the current step and
/// `DRIFT_STEPS` either side; None when it is none of them or not six digits. Spaces in the code
/// are ignored (apps show it as `123 456`). All candidates are computed and compared in constant
/// time, so timing does not tell which step, or how many digits, matched. A caller that remembers
/// the step of the last accepted code can refuse a code used twice (RFC 6238 §5.2).
pub fn matching_step(secret_b32: &str, code: &str, unix_secs: u64) -> Option<u64> {
    let typed: Vec<u8> = code.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if typed.len() != DIGITS as usize || !typed.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let key = key_of(secret_b32)?;
    let now = step_at(unix_secs);
    let mut found = None;
    for step in now.saturating_sub(DRIFT_STEPS)..=now.saturating_add(DRIFT_STEPS) {
        let expected = hotp(&key, step, DIGITS)?;
        if constant_time_eq(expected.as_bytes(), &typed) && found.is_none() {
            found = Some(step);
        }
    }
    found
}

/// Whether `code` is the code of `secret_b32` at `unix_secs`, or one step before or after.
pub fn verify(secret_b32: &str, code: &str, unix_secs: u64) -> bool {
    matching_step(secret_b32, code, unix_secs).is_some()
}

/// Compares two byte strings in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `otpauth://` address an authenticator app reads from a QR code (Google Authenticator's Key
/// Uri Format): label `issuer:account`, the secret, and this module's algorithm, digits and period.
pub fn otpauth_uri(secret_b32: &str, account: &str, issuer: &str) -> String {
    // Apps want the secret without spaces or padding, upper case.
    let secret = base32_decode(secret_b32)
        .map(|k| base32_encode(&k))
        .unwrap_or_else(|| secret_b32.to_string());
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        percent_encode(issuer),
        percent_encode(account),
        percent_encode(&secret),
        percent_encode(issuer),
    )
}

/// RFC 3986 percent-encoding of everything but the unreserved characters (a space is `%20`, not
/// `+`: some apps show a `+` as it is).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 Appendix B's SHA-1 seed, "12345678901234567890" in ASCII, as base32.
    fn rfc_secret() -> String {
        base32_encode(b"12345678901234567890")
    }

    #[test]
    fn base32_matches_the_rfc_4648_vectors() {
        // RFC 4648 §10.
        let vectors = [
            ("", ""),
            ("f", "MY======"),
            ("fo", "MZXQ===="),
            ("foo", "MZXW6==="),
            ("foob", "MZXW6YQ="),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI======"),
        ];
        for (plain, padded) in vectors {
            assert_eq!(
                base32_encode(plain.as_bytes()),
                padded.trim_end_matches('=')
            );
            assert_eq!(
                base32_decode(padded).as_deref(),
                Some(plain.as_bytes()),
                "{padded}"
            );
            assert_eq!(
                base32_decode(padded.trim_end_matches('=')).as_deref(),
                Some(plain.as_bytes())
            );
        }
        assert_eq!(rfc_secret(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
    }

    #[test]
    fn base32_decoding_ignores_case_and_spaces_and_refuses_what_is_not_base32() {
        let grouped = "gezd gnbv gy3t qojq GEZD GNBV GY3T QOJQ";
        assert_eq!(
            base32_decode(grouped).as_deref(),
            Some(&b"12345678901234567890"[..])
        );
        assert_eq!(base32_decode("MZXW1YTB"), None, "1 is not in the alphabet");
        assert_eq!(base32_decode("MZ=XW6YTB"), None, "padding inside");
        assert_eq!(base32_decode("MZXW6YTBO"), None, "9 symbols encode nothing");
        assert_eq!(base32_decode("my"), Some(b"f".to_vec()));
        assert_eq!(base32_decode("MZ"), None, "non-zero pad bits");
    }

    #[test]
    fn base32_round_trips_every_length() {
        let bytes: Vec<u8> = (0..=255u8).rev().collect();
        for n in 0..64 {
            let enc = base32_encode(&bytes[..n]);
            assert!(!enc.contains('='));
            assert_eq!(
                base32_decode(&enc).as_deref(),
                Some(&bytes[..n]),
                "{n} bytes"
            );
            assert_eq!(
                base32_decode(&enc.to_lowercase()).as_deref(),
                Some(&bytes[..n])
            );
        }
    }

    #[test]
    fn hotp_matches_rfc_4226_appendix_d() {
        let key = b"12345678901234567890";
        let expected = [
            "755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583",
            "399871", "520489",
        ];
        for (counter, code) in expected.iter().enumerate() {
            assert_eq!(
                hotp(key, counter as u64, 6).as_deref(),
                Some(*code),
                "count {counter}"
            );
        }
    }

    #[test]
    fn totp_matches_rfc_6238_appendix_b_for_sha1() {
        let vectors = [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ];
        let secret = rfc_secret();
        for (t, eight) in vectors {
            assert_eq!(
                hotp(b"12345678901234567890", step_at(t), 8).as_deref(),
                Some(eight),
                "T = {t}"
            );
            assert_eq!(code_at(&secret, t).as_deref(), Some(&eight[2..]), "T = {t}");
            assert!(verify(&secret, &eight[2..], t));
        }
    }

    #[test]
    fn codes_one_step_away_are_accepted_and_two_steps_away_refused() {
        let secret = rfc_secret();
        let now = 1_234_567_890;
        let at = |steps: i64| code_at(&secret, (now as i64 + steps * 30) as u64).unwrap();
        assert!(verify(&secret, &at(0), now));
        assert!(verify(&secret, &at(-1), now));
        assert!(verify(&secret, &at(1), now));
        assert!(!verify(&secret, &at(-2), now));
        assert!(!verify(&secret, &at(2), now));
        assert_eq!(
            matching_step(&secret, &at(-1), now),
            Some(now / 30 - 1),
            "the step that matched"
        );
    }

    #[test]
    fn malformed_codes_and_secrets_are_refused() {
        let secret = rfc_secret();
        let t = 1_111_111_111;
        let code = code_at(&secret, t).unwrap();
        assert!(verify(
            &secret,
            &format!("{} {}", &code[..3], &code[3..]),
            t
        ));
        assert!(!verify(&secret, "", t));
        assert!(!verify(&secret, &code[..5], t));
        assert!(!verify(&secret, &format!("{code}0"), t));
        assert!(!verify(&secret, "abcdef", t));
        assert!(!verify(&secret, "-12345", t));
        assert!(!verify("not base32!", &code, t));
        assert!(!verify("", "000000", t));
        assert_eq!(code_at("", t), None);
        // The first step has no step before it.
        assert!(verify(&secret, &code_at(&secret, 0).unwrap(), 0));
    }

    #[test]
    fn new_secrets_are_160_random_bits_in_base32() {
        let a = new_secret();
        assert_eq!(a.len(), 32);
        assert_eq!(base32_decode(&a).map(|k| k.len()), Some(SECRET_BYTES));
        assert!(valid_secret(&a));
        assert_ne!(a, new_secret());
        assert!(!valid_secret("GEZDGNBV"), "40 bits are too few");
        assert!(!valid_secret("not base32"));
    }

    #[test]
    fn the_otpauth_address_names_issuer_account_and_parameters() {
        let uri = otpauth_uri(
            "gezd gnbv gy3t qojq gezd gnbv gy3t qojq",
            "mario.rossi@pisa",
            "Campanile Pisa",
        );
        assert_eq!(
            uri,
            "otpauth://totp/Campanile%20Pisa:mario.rossi%40pisa?\
             secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&issuer=Campanile%20Pisa\
             &algorithm=SHA1&digits=6&period=30"
        );
    }
}
