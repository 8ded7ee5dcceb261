//! The `campanile` node: telephony (SIP user agent and RTP media), the dialer that works campaigns'
//! call tasks, the simulated city used for drills and tests, and the wiring that joins them to the
//! replicated state (`campanile-cluster`) and the HTTP surface (`campanile-dashboard`).

pub mod media;
pub mod sip;
