//! Media: what a call plays and hears. Audio is prepared once per campaign as 20 ms G.711 frames
//! (`message`, from `tts` or an uploaded `wav`), streamed as RTP (`rtp`) by one shared `pacer`, and the
//! callee's key presses are read as RFC 4733 telephone-events (`dtmf`).

pub mod dtmf;
pub mod g711;
pub mod message;
pub mod pacer;
pub mod ports;
pub mod rtcp;
pub mod rtp;
pub mod socket;
pub mod tts;
pub mod wav;

pub use message::{AudioCache, PreparedAudio};

/// Why audio could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error(transparent)]
    Tts(#[from] tts::TtsError),
    #[error("uploaded audio: {0}")]
    Wav(#[from] wav::WavError),
    #[error("{0}")]
    Missing(String),
}
pub mod inband;
pub mod listen;
pub mod machine;
