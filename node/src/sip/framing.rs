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
///
/// Each byte is looked at a bounded number of times however the stream is cut up: the search for the
/// end of the header block resumes where the last one stopped, and a message's length is read once,
/// not again for every read that brings more of its body. A peer that trickles a header block or a
/// body a byte at a time costs the work of reading it once.
#[derive(Debug, Default)]
pub struct StreamFramer {
    buf: Vec<u8>,
    /// The leading bytes of `buf` in which the end of the header block is known not to start.
    searched: usize,
    /// The length of the message at the front of `buf`, once its header block is whole.
    message_len: Option<usize>,
    /// The error that put the stream out of step, if one did.
    failed: Option<FramingError>,
}

impl StreamFramer {
    pub fn new() -> Self {
        StreamFramer::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// The next whole message, `None` when more bytes are needed, or an error (then always the same
    /// error: the stream is out of step and must be closed).
    pub fn next_message(&mut self) -> Option<Result<Vec<u8>, FramingError>> {
        if let Some(e) = &self.failed {
            return Some(Err(e.clone()));
        }
        let total = match self.message_len {
            Some(total) => total,
            None => match self.find_headers()? {
                Ok(total) => {
                    self.message_len = Some(total);
                    total
                }
                Err(e) => return Some(self.fail(e)),
            },
        };
        if self.buf.len() < total {
            return None;
        }
        self.message_len = None;
        self.searched = 0;
        Some(Ok(self.buf.drain(..total).collect()))
    }

    /// The length of the message at the front of the buffer once its header block is whole;
    /// `None` while more bytes are needed.
    fn find_headers(&mut self) -> Option<Result<usize, FramingError>> {
        // Keep-alives (RFC 5626 §3.5.1) and stray line ends between messages.
        let start = self
            .buf
            .iter()
            .position(|b| *b != b'\r' && *b != b'\n')
            .unwrap_or(self.buf.len());
        if start > 0 {
            self.buf.drain(..start);
            self.searched = 0;
        }
        if self.buf.is_empty() {
            return None;
        }
        // The end may straddle the bytes already searched and the new ones.
        let from = self.searched.saturating_sub(3);
        let Some(end) = find(&self.buf[from..], b"\r\n\r\n").map(|i| i + from) else {
            self.searched = self.buf.len();
            if self.buf.len() > MAX_HEADERS {
                return Some(Err(FramingError::HeadersTooLong));
            }
            return None;
        };
        if end > MAX_HEADERS {
            return Some(Err(FramingError::HeadersTooLong));
        }
        let body_len = match content_length(&self.buf[..end]) {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        if body_len > MAX_BODY {
            return Some(Err(FramingError::BodyTooLong(body_len)));
        }
        Some(Ok(end + 4 + body_len))
    }

    fn fail(&mut self, e: FramingError) -> Result<Vec<u8>, FramingError> {
        self.failed = Some(e.clone());
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
        f.push(MSG);
        assert_eq!(f.next_message(), Some(Err(FramingError::NoContentLength)));
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

    /// Every message of `stream`, read in pieces cut at `cuts`, with what ended the reading.
    fn read_in_pieces(stream: &[u8], cuts: &[usize]) -> (Vec<Vec<u8>>, Option<FramingError>) {
        let mut f = StreamFramer::new();
        let mut out = Vec::new();
        let mut at = 0;
        for cut in cuts
            .iter()
            .map(|c| c % (stream.len() + 1))
            .chain([stream.len()])
        {
            if cut < at {
                continue;
            }
            f.push(&stream[at..cut]);
            at = cut;
            while let Some(m) = f.next_message() {
                match m {
                    Ok(m) => out.push(m),
                    Err(e) => return (out, Some(e)),
                }
            }
        }
        (out, None)
    }

    #[test]
    fn a_trickled_stream_gives_what_one_read_gives() {
        // Header blocks of different lengths, the longest first, with and without keep-alives
        // between the messages.
        let mut stream = b"\r\n".to_vec();
        for (subject, body, after) in [
            ("a long subject line", "", "\r\n"),
            ("short", "hello", ""),
            ("", "\r\n\r\n", ""),
            ("mid length", "a body with \r\n\r\n inside", "\r\n"),
        ] {
            stream.extend_from_slice(
                format!(
                    "BYE sip:a@b SIP/2.0\r\nSubject: {subject}\r\nl: {}\r\n\r\n{body}{after}",
                    body.len()
                )
                .as_bytes(),
            );
        }
        let every_byte: Vec<usize> = (0..stream.len()).collect();
        let whole = read_in_pieces(&stream, &[]);
        assert_eq!(whole.0.len(), 4);
        assert_eq!(whole.1, None);
        assert_eq!(read_in_pieces(&stream, &every_byte), whole);
    }

    proptest::proptest! {
        /// However a stream of messages (some with CRLFCRLF in their bodies, some with keep-alives
        /// between them) is cut into reads, the messages and the error that ends them are those
        /// of reading it whole.
        #[test]
        fn cutting_a_stream_changes_nothing(
            bodies in proptest::collection::vec(
                (
                    proptest::collection::vec(proptest::sample::select(b"ab\r\n".to_vec()), 0..12),
                    0usize..30,
                    proptest::bool::ANY,
                ),
                0..5,
            ),
            junk in proptest::collection::vec(proptest::num::u8::ANY, 0..40),
            cuts in proptest::collection::vec(proptest::num::usize::ANY, 0..30),
        ) {
            let mut stream = Vec::new();
            // Header blocks of any length, keep-alives after some messages and not others.
            for (body, subject, keepalive) in &bodies {
                let subject = "s".repeat(*subject);
                stream.extend_from_slice(
                    format!("INFO sip:a@b SIP/2.0\r\nSubject: {subject}\r\nContent-Length: {}\r\n\r\n", body.len())
                        .as_bytes(),
                );
                stream.extend_from_slice(body);
                if *keepalive {
                    stream.extend_from_slice(b"\r\n");
                }
            }
            stream.extend_from_slice(&junk);
            let mut sorted = cuts.iter().map(|c| c % (stream.len() + 1)).collect::<Vec<_>>();
            sorted.sort_unstable();
            let whole = read_in_pieces(&stream, &[]);
            proptest::prop_assert!(whole.0.len() >= bodies.len());
            proptest::prop_assert_eq!(read_in_pieces(&stream, &sorted), whole);
        }

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
