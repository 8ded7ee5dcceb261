//! Digest authentication to a trunk (RFC 3261 §22, RFC 2617 with MD5 and qop=auth): read a 401/407
//! challenge, answer it with an Authorization or Proxy-Authorization header. Passwords never leave this
//! module except hashed, and `Credentials` never prints them.

use std::fmt;

use md5::{Digest, Md5};

use super::message::{header_value, HeaderName, Response};

/// A trunk's username and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    password: String,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ username: {:?}, password: <redacted> }}",
            self.username
        )
    }
}

/// A parsed Digest challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
    pub opaque: Option<String>,
    /// Whether the server offered qop=auth.
    pub qop_auth: bool,
    /// True for 407 (answer with Proxy-Authorization).
    pub proxy: bool,
}

/// Why a challenge cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the {0} response has no {1} header")]
    NoChallenge(u16, &'static str),
    #[error("the challenge is not Digest or lacks realm/nonce")]
    Malformed,
    #[error("the challenge asks for algorithm {0}; only MD5 is supported")]
    Algorithm(String),
}

/// Splits `k=v, k="v, with comma"` into pairs.
fn params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches([' ', ',', '\t']);
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_ascii_lowercase();
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            value = r[..end].to_string();
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        out.push((key, value));
    }
    out
}

impl Challenge {
    /// Reads the challenge of a 401 (WWW-Authenticate) or 407 (Proxy-Authenticate) response.
    pub fn from_response(resp: &Response) -> Result<Challenge, AuthError> {
        let code = resp.status_code.code();
        let proxy = code == 407;
        let (name, label) = if proxy {
            (HeaderName::ProxyAuthenticate, "Proxy-Authenticate")
        } else {
            (HeaderName::WwwAuthenticate, "WWW-Authenticate")
        };
        let value = header_value(resp, name).ok_or(AuthError::NoChallenge(code, label))?;
        Challenge::parse(value, proxy)
    }

    pub fn parse(value: &str, proxy: bool) -> Result<Challenge, AuthError> {
        let v = value.trim();
        let rest = v
            .get(..6)
            .filter(|s| s.eq_ignore_ascii_case("digest"))
            .map(|_| &v[6..])
            .ok_or(AuthError::Malformed)?;
        let p = params(rest);
        let get = |k: &str| p.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        if let Some(alg) = get("algorithm") {
            if !alg.eq_ignore_ascii_case("md5") {
                return Err(AuthError::Algorithm(alg));
            }
        }
        Ok(Challenge {
            realm: get("realm").ok_or(AuthError::Malformed)?,
            nonce: get("nonce").ok_or(AuthError::Malformed)?,
            opaque: get("opaque"),
            qop_auth: get("qop")
                .is_some_and(|q| q.split(',').any(|x| x.trim().eq_ignore_ascii_case("auth"))),
            proxy,
        })
    }

    /// The header (name, value) that answers this challenge for `method` on `uri`.
    pub fn answer(
        &self,
        creds: &Credentials,
        method: &str,
        uri: &str,
        cnonce: &str,
        nc: u32,
    ) -> (&'static str, String) {
        let ha1 = md5_hex(&format!(
            "{}:{}:{}",
            creds.username, self.realm, creds.password
        ));
        let ha2 = md5_hex(&format!("{method}:{uri}"));
        let nc = format!("{nc:08x}");
        let response = if self.qop_auth {
            md5_hex(&format!("{ha1}:{}:{nc}:{cnonce}:auth:{ha2}", self.nonce))
        } else {
            md5_hex(&format!("{ha1}:{}:{ha2}", self.nonce))
        };
        let mut v = format!(
            "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{uri}\", response=\"{response}\", algorithm=MD5",
            creds.username, self.realm, self.nonce
        );
        if self.qop_auth {
            v.push_str(&format!(", qop=auth, nc={nc}, cnonce=\"{cnonce}\""));
        }
        if let Some(o) = &self.opaque {
            v.push_str(&format!(", opaque=\"{o}\""));
        }
        let name = if self.proxy {
            "Proxy-Authorization"
        } else {
            "Authorization"
        };
        (name, v)
    }
}

/// The server side (the simulated carrier): whether an Authorization or Proxy-Authorization header
/// `value` proves knowledge of `password` for `username` in `realm`, against the `nonce` we issued.
pub fn verify(
    value: &str,
    method: &str,
    username: &str,
    password: &str,
    realm: &str,
    nonce: &str,
) -> bool {
    let v = value.trim();
    let Some(rest) = v
        .get(..6)
        .filter(|s| s.eq_ignore_ascii_case("digest"))
        .map(|_| &v[6..])
    else {
        return false;
    };
    let p = params(rest);
    let get = |k: &str| p.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    if get("username") != Some(username)
        || get("realm") != Some(realm)
        || get("nonce") != Some(nonce)
    {
        return false;
    }
    let (Some(uri), Some(response)) = (get("uri"), get("response")) else {
        return false;
    };
    let ha1 = md5_hex(&format!("{username}:{realm}:{password}"));
    let ha2 = md5_hex(&format!("{method}:{uri}"));
    let expected = match (get("qop"), get("nc"), get("cnonce")) {
        (Some(q), Some(nc), Some(cnonce)) if q.eq_ignore_ascii_case("auth") => {
            md5_hex(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"))
        }
        _ => md5_hex(&format!("{ha1}:{nonce}:{ha2}")),
    };
    expected.eq_ignore_ascii_case(response)
}

fn md5_hex(s: &str) -> String {
    hex::encode(Md5::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_answer_verifies_and_a_wrong_password_does_not() {
        let c = Challenge::parse(r#"Digest realm="city", nonce="n1", qop="auth""#, false).unwrap();
        let (_, v) = c.answer(&Credentials::new("u", "pw"), "INVITE", "sip:1@x", "cn", 1);
        assert!(verify(&v, "INVITE", "u", "pw", "city", "n1"));
        assert!(!verify(&v, "INVITE", "u", "other", "city", "n1"));
        assert!(!verify(&v, "INVITE", "u", "pw", "city", "n2"));
        assert!(!verify("Basic abc", "INVITE", "u", "pw", "city", "n1"));
    }

    #[test]
    fn rfc_2617_worked_example() {
        // RFC 2617 §3.5: Mufasa / "Circle Of Life" on /dir/index.html.
        let c = Challenge::parse(
            r#"Digest realm="testrealm@host.com", qop="auth,auth-int", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", opaque="5ccc069c403ebaf9f0171e9517f40e41""#,
            false,
        )
        .unwrap();
        assert!(c.qop_auth);
        let (name, v) = c.answer(
            &Credentials::new("Mufasa", "Circle Of Life"),
            "GET",
            "/dir/index.html",
            "0a4f113b",
            1,
        );
        assert_eq!(name, "Authorization");
        assert!(
            v.contains("response=\"6629fae49393a05397450978507c4ef1\""),
            "{v}"
        );
        assert!(v.contains("nc=00000001"));
        assert!(v.contains("opaque=\"5ccc069c403ebaf9f0171e9517f40e41\""));
    }

    #[test]
    fn challenges_without_qop_and_proxy_challenges() {
        let c = Challenge::parse(
            r#"Digest realm="sip.example", nonce="abc", algorithm=MD5"#,
            true,
        )
        .unwrap();
        assert!(!c.qop_auth);
        let (name, v) = c.answer(&Credentials::new("u", "p"), "INVITE", "sip:1@x", "c", 1);
        assert_eq!(name, "Proxy-Authorization");
        // response = MD5(MD5(u:sip.example:p):abc:MD5(INVITE:sip:1@x))
        let expect = md5_hex(&format!(
            "{}:abc:{}",
            md5_hex("u:sip.example:p"),
            md5_hex("INVITE:sip:1@x")
        ));
        assert!(v.contains(&expect));
        assert!(!v.contains("qop"));
    }

    #[test]
    fn unusable_challenges_are_named_and_passwords_never_print() {
        assert_eq!(
            Challenge::parse("Basic realm=x", false),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            Challenge::parse(r#"Digest nonce="n""#, false),
            Err(AuthError::Malformed)
        );
        assert!(matches!(
            Challenge::parse(r#"Digest realm="r", nonce="n", algorithm=SHA-256"#, false),
            Err(AuthError::Algorithm(_))
        ));
        let dbg = format!("{:?}", Credentials::new("trunk-user", "s3cret-pw"));
        assert!(!dbg.contains("s3cret-pw"), "{dbg}");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_challenges_never_panic(s in "\\PC{0,200}") {
            let _ = Challenge::parse(&s, false);
            let _ = Challenge::parse(&format!("Digest {s}"), true);
        }
    }
}
