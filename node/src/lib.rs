//! The `campanile` node: telephony (SIP user agent and RTP media), the dialer that works campaigns'
//! call tasks, the simulated city used for drills and tests, and the wiring that joins them to the
//! replicated state (`campanile-cluster`) and the HTTP surface (`campanile-dashboard`).

pub mod admin;
pub mod bench;
pub mod call;
pub mod clockwatch;
pub mod config;
pub mod demo;
pub mod dialer;
pub mod engine;
pub mod media;
pub mod metrics;
pub mod node;
pub mod simcity;
pub mod sip;
pub mod verify;
pub mod watchdog;
