//! Finding SIP messages in a byte stream (RFC 3261 §18.3): on TCP a message ends where its
//! Content-Length says, so the header block must carry one. Sans-IO: bytes in, whole messages out.
//! Limits keep a hostile peer from growing our memory: a header block over 64 KiB or a body over
//! 1 MiB is an error, after which the connection must be closed.

/// Largest header block we accept.
pub const MAX_HEADERS: usize = 64 * 1024;
/// Largest body we accept.
pub const MAX_BODY: usize = 1024 * 1024;

/// Why the stream cannot be read further.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("header block longer than {MAX_HEADERS} bytes")]
    HeadersTooLong,
    #[error("message on a stream without Content-Length")]
    NoContentLength,
    #[error("Content-Length `{0}` is not a number")]
    BadContentLength(String),
    #[error("body of {0} bytes is over the {MAX_BODY}-byte limit")]
    BodyTooLong(usize),
}

/// Accumulates stream bytes and yields whole messages.
#[derive(Debug, Default)]
pub struct StreamFramer {
    buf: Vec<u8>,
    failed: bool,
}

impl StreamFramer {
    pub fn new() -> Self {
        StreamFramer::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if !self.failed {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next whole message, `None` when more bytes are needed, or an error (then always the same
    /// error: the stream is out of step and must be closed).
    pub fn next_message(&mut self) -> Option<Result<Vec<u8>, FramingError>> {
        if self.failed {
            return Some(Err(FramingError::HeadersTooLong));
        }
        // Keep-alives (RFC 5626 §3.5.1) and stray line ends between messages.
        let start = self
            .buf
            .iter()
            .position(|b| *b != b'\r' && *b != b'\n')
            .unwrap_or(self.buf.len());
        self.buf.drain(..start);
        if self.buf.is_empty() {
            return None;
        }
        let Some(end) = find(&self.buf, b"\r\n\r\n") else {
            if self.buf.len() > MAX_HEADERS {
                return Some(self.fail(FramingError::HeadersTooLong));
            }
            return None;
        };
        if end > MAX_HEADERS {
            return Some(self.fail(FramingError::HeadersTooLong));
        }
        let body_len = match content_length(&self.buf[..end]) {
            Ok(n) => n,
            Err(e) => return Some(self.fail(e)),
        };
        if body_len > MAX_BODY {
            return Some(self.fail(FramingError::BodyTooLong(body_len)));
        }
        let total = end + 4 + body_len;
        if self.buf.len() < total {
            return None;
        }
        Some(Ok(self.buf.drain(..total).collect()))
    }

    fn fail(&mut self, e: FramingError) -> Result<Vec<u8>, FramingError> {
        self.failed = true;
        self.buf = Vec::new();
        Err(e)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The Content-Length (or compact `l`) of a header block.
fn content_length(headers: &[u8]) -> Result<usize, FramingError> {
    let text = String::from_utf8_lossy(headers);
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l") {
            let v = value.trim();
            return v
                .parse()
                .map_err(|_| FramingError::BadContentLength(v.chars().take(20).collect()));
        }
    }
    Err(FramingError::NoContentLength)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSG: &[u8] =
        b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5060;branch=z9hG4bK1\r\n\
Content-Length: 5\r\n\r\nhello";

    #[test]
    fn a_message_split_at_every_byte_comes_out_whole() {
        for cut in 0..=MSG.len() {
            let mut f = StreamFramer::new();
            f.push(&MSG[..cut]);
            let first = f.next_message();
            f.push(&MSG[cut..]);
            let got = match first {
                Some(m) => m,
                None => f.next_message().expect("whole now"),
            };
            assert_eq!(got.unwrap(), MSG, "cut at {cut}");
            assert!(f.next_message().is_none());
        }
    }

    #[test]
    fn two_messages_and_keepalives_in_one_read() {
        let mut f = StreamFramer::new();
        let mut bytes = b"\r\n\r\n".to_vec();
        bytes.extend_from_slice(MSG);
        bytes.extend_from_slice(b"\r\n");
        bytes.extend_from_slice(&MSG.to_vec().replace_compact());
        f.push(&bytes);
        assert_eq!(f.next_message().unwrap().unwrap(), MSG);
        assert!(f.next_message().unwrap().unwrap().ends_with(b"hello"));
        assert!(f.next_message().is_none());
    }

    #[test]
    fn missing_length_and_oversize_input_are_errors_that_stay() {
        let mut f = StreamFramer::new();
        f.push(b"INVITE sip:a@b SIP/2.0\r\nVia: x\r\n\r\n");
        assert_eq!(f.next_message(), Some(Err(FramingError::NoContentLength)));
        assert!(f.next_message().unwrap().is_err());
        let mut f = StreamFramer::new();
        f.push(&vec![b'a'; MAX_HEADERS + 10]);
        assert_eq!(f.next_message(), Some(Err(FramingError::HeadersTooLong)));
        let mut f = StreamFramer::new();
        f.push(b"INVITE sip:a@b SIP/2.0\r\nContent-Length: 99999999\r\n\r\n");
        assert_eq!(
            f.next_message(),
            Some(Err(FramingError::BodyTooLong(99_999_999)))
        );
    }

    trait Compact {
        fn replace_compact(self) -> Vec<u8>;
    }
    impl Compact for Vec<u8> {
        fn replace_compact(self) -> Vec<u8> {
            String::from_utf8(self)
                .unwrap()
                .replace("Content-Length:", "l:")
                .into_bytes()
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..200), 0..20)) {
            let mut f = StreamFramer::new();
            for c in chunks {
                f.push(&c);
                while let Some(Ok(_)) = f.next_message() {}
            }
        }
    }
}
