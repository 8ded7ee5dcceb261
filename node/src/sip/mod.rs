//! SIP: messages, sans-IO transactions and dialogs, SDP, and the UDP and TCP drivers.
//!
//! The protocol logic (`transaction`, `dialog`) never touches a socket or a clock: it takes messages and
//! `now` and returns what to send and when to be woken, so tests drive RFC 3261's timers with virtual
//! time. `endpoint` is the thin tokio driver that owns the UDP socket or the TCP listener and
//! connections; `framing` finds messages in a TCP byte stream.

pub mod auth;
pub mod dialog;
pub mod endpoint;
pub mod framing;
pub mod message;
pub mod sdp;
pub mod transaction;
