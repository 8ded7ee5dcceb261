//! The node's one configuration file (TOML), with a default for every key. Command-line flags override
//! it; secrets come only from the environment (`CAMPANILE_TRUNK_PASSWORD`, a later release).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration could not be used; always names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Value { key: &'static str, message: String },
}

/// The environment variable that holds the trunk's password.
pub const PASSWORD_ENV: &str = "CAMPANILE_TRUNK_PASSWORD";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeSection,
    pub http: HttpSection,
    pub sip: SipSection,
    pub trunk: TrunkSection,
    pub caller_id: CallerIdSection,
    pub dialer: DialerSection,
    pub media: MediaSection,
    pub simcity: SimCitySection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    pub id: u64,
    pub data: PathBuf,
    /// This node's data-centre label.
    pub datacenter: String,
    /// Address of this node's Raft endpoint (QUIC with mutual TLS). Unset: a one-node cluster with
    /// no network at all.
    pub raft: Option<std::net::SocketAddr>,
    /// The folder `campanile certs issue` wrote for this node (ca.pem, node.pem, node.key).
    pub certs: Option<PathBuf>,
    /// Any member's Raft address, to join its cluster. Unset with `raft`: this node starts a new
    /// cluster if its store is empty.
    pub join: Option<std::net::SocketAddr>,
    /// Voting members the cluster grows to as nodes join (3 or 5); later nodes stay learners and
    /// take a vote when a voter is removed.
    pub voters: usize,
    /// Build a Raft snapshot (and purge the log behind it) after this many entries.
    pub snapshot_every: u64,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            id: 1,
            data: PathBuf::from("./campanile-data"),
            datacenter: "dc1".into(),
            raft: None,
            certs: None,
            join: None,
            voters: 3,
            snapshot_every: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    pub listen: SocketAddr,
    /// The address citizens and operators reach this deployment at, for QR codes and posters (and
    /// Secure cookies when it is https); empty: the request's Host.
    pub public_url: String,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipSection {
    pub listen: SocketAddr,
    pub t1_ms: u64,
    pub t2_ms: u64,
    pub t4_ms: u64,
}

impl Default for SipSection {
    fn default() -> Self {
        SipSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 5060)),
            t1_ms: 500,
            t2_ms: 4000,
            t4_ms: 5000,
        }
    }
}

/// Where calls' media sockets live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaSection {
    pub rtp_port_min: u16,
    pub rtp_port_max: u16,
    /// How the RTP pacer sends: `io_uring` (batched; falls back to `sendto` where the kernel
    /// refuses it), `sendto` (one system call a packet) or `raw` (headers written by the node,
    /// batches through one raw socket; needs CAP_NET_RAW, falls back to `io_uring`). Which is
    /// better depends on the host (BENCHMARKS.md: `campanile bench media` measures them).
    pub pacer_send: crate::media::socket::SendPath,
}

impl Default for MediaSection {
    fn default() -> Self {
        MediaSection {
            rtp_port_min: crate::media::ports::DEFAULT_MIN,
            rtp_port_max: crate::media::ports::DEFAULT_MAX,
            pacer_send: crate::media::socket::SendPath::IoUring,
        }
    }
}

impl MediaSection {
    /// The RTP/RTCP port pairs of the configured range (checked by `Config::validate`).
    pub fn rtp_ports(&self) -> Result<crate::media::ports::RtpPorts, ConfigError> {
        crate::media::ports::RtpPorts::new(self.rtp_port_min, self.rtp_port_max).map_err(|e| {
            ConfigError::Value {
                key: "media.rtp_port_min",
                message: format!("with media.rtp_port_max: {e}"),
            }
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrunkSection {
    /// SIP URI of the carrier, e.g. `sip:trunk.example.net:5060`. Empty: drill mode.
    pub uri: Option<String>,
    /// A short name used in logs and metrics.
    pub name: String,
    /// Concurrent calls the trunk allows.
    pub max_channels: usize,
    /// New calls the trunk allows in any one second (a burst up to this many may go at once).
    /// Calls start on a 10 ms grid: one whose turn falls within a step waits for its end.
    pub calls_per_second: u32,
    /// Digest username, when the trunk challenges (401/407). The password comes only from the
    /// environment variable CAMPANILE_TRUNK_PASSWORD, never from this file.
    pub username: Option<String>,
    /// Seconds between OPTIONS pings to the trunk; 0 turns them off. Two unanswered pings mark the
    /// trunk down (no new calls) until one is answered.
    pub options_interval_s: f64,
    /// SIP URI of an outbound proxy (RFC 3261 §8.1.2): every new request goes to it with a Route
    /// header naming it, and the proxy forwards it to the trunk.
    pub outbound_proxy: Option<String>,
    /// `udp` (default) or `tcp`: how SIP reaches the trunk (RFC 3261 §18).
    pub transport: String,
}

impl TrunkSection {
    /// The transport named by `transport`, if it is one we speak.
    pub fn sip_transport(&self) -> Option<crate::sip::endpoint::Transport> {
        use crate::sip::endpoint::Transport;
        match self.transport.to_ascii_lowercase().as_str() {
            "udp" => Some(Transport::Udp),
            "tcp" => Some(Transport::Tcp),
            _ => None,
        }
    }
}

impl Default for TrunkSection {
    fn default() -> Self {
        TrunkSection {
            uri: None,
            name: "trunk".into(),
            max_channels: 100,
            calls_per_second: 50,
            username: None,
            options_interval_s: 30.0,
            outbound_proxy: None,
            transport: "udp".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallerIdSection {
    /// User part of From: the number citizens see.
    pub number: String,
    pub display_name: String,
}

impl Default for CallerIdSection {
    fn default() -> Self {
        CallerIdSection {
            number: "campanile".into(),
            display_name: "Protezione Civile".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DialerSection {
    pub ring_timeout_s: f64,
    pub confirm_wait_s: f64,
    /// How long outcomes wait to be batched into one Raft entry.
    pub batch_ms: u64,
    pub max_replays: u32,
}

impl Default for DialerSection {
    fn default() -> Self {
        DialerSection {
            ring_timeout_s: 30.0,
            confirm_wait_s: 6.0,
            batch_ms: 20,
            max_replays: 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimCitySection {
    /// Where the built-in simulated city listens in drill mode.
    pub listen: SocketAddr,
    /// `always-answer`, `realistic`, or a path to a profile TOML file.
    pub profile: String,
    pub seed: u64,
    /// Drill mode with several nodes: dial the simulated city another node runs at this address
    /// instead of starting one (the nodes of a drill share one city and its ground-truth log).
    pub shared: Option<SocketAddr>,
}

impl Default for SimCitySection {
    fn default() -> Self {
        SimCitySection {
            listen: SocketAddr::from(([127, 0, 0, 1], 5070)),
            profile: "realistic".into(),
            seed: 1,
            shared: None,
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Value {
                key,
                message: message.into(),
            })
        }
        if self.node.id == 0 {
            return bad("node.id", "must be 1 or more");
        }
        let url = self.http.public_url.trim();
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return bad(
                "http.public_url",
                "must start with https:// (or http://), e.g. https://allerta.comune.example",
            );
        }
        match (&self.node.raft, &self.node.certs) {
            (Some(_), None) => {
                return bad(
                    "node.certs",
                    "is needed with node.raft: nodes talk only with mutual TLS",
                )
            }
            (None, Some(_)) => return bad("node.raft", "is needed with node.certs"),
            _ => {}
        }
        if self.node.join.is_some() && self.node.raft.is_none() {
            return bad("node.raft", "is needed with node.join");
        }
        if !matches!(self.node.voters, 1 | 3 | 5) {
            return bad(
                "node.voters",
                format!(
                    "is {}; use 3 (survives one lost node) or 5 (survives two), or 1 for a lab",
                    self.node.voters
                ),
            );
        }
        self.media.rtp_ports()?;
        if self.node.snapshot_every < 10 {
            return bad("node.snapshot_every", "must be 10 or more");
        }
        if let Some(uri) = &self.trunk.uri {
            if crate::sip::message::uri_hostport(uri).is_none() {
                return bad(
                    "trunk.uri",
                    format!("`{uri}` is not a SIP URI like sip:host:port"),
                );
            }
        }
        if let Some(uri) = &self.trunk.outbound_proxy {
            if crate::sip::message::uri_hostport(uri).is_none() {
                return bad(
                    "trunk.outbound_proxy",
                    format!("`{uri}` is not a SIP URI like sip:proxy.example.net:5060"),
                );
            }
        }
        if self.trunk.sip_transport().is_none() {
            return bad(
                "trunk.transport",
                format!("`{}` is not udp or tcp", self.trunk.transport),
            );
        }
        if self.trunk.max_channels == 0 || self.trunk.max_channels > 100_000 {
            return bad("trunk.max_channels", "must be between 1 and 100000");
        }
        if self.trunk.calls_per_second == 0 {
            return bad("trunk.calls_per_second", "must be 1 or more");
        }
        let ping = self.trunk.options_interval_s;
        if !(ping == 0.0 || (0.2..=3600.0).contains(&ping)) {
            return bad(
                "trunk.options_interval_s",
                "must be 0 (off) or between 0.2 and 3600 seconds",
            );
        }
        if !(1.0..=300.0).contains(&self.dialer.ring_timeout_s) {
            return bad("dialer.ring_timeout_s", "must be between 1 and 300 seconds");
        }
        if !(0.0..=60.0).contains(&self.dialer.confirm_wait_s) {
            return bad("dialer.confirm_wait_s", "must be between 0 and 60 seconds");
        }
        if self.dialer.batch_ms == 0 || self.dialer.batch_ms > 5000 {
            return bad("dialer.batch_ms", "must be between 1 and 5000");
        }
        if self.sip.t1_ms == 0 || self.sip.t2_ms < self.sip.t1_ms {
            return bad("sip.t2_ms", "T1 must be positive and T2 at least T1");
        }
        if self.caller_id.number.is_empty()
            || !self
                .caller_id
                .number
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+')
        {
            return bad(
                "caller_id.number",
                "must be digits (optionally with a leading +) or letters",
            );
        }
        Ok(())
    }

    pub fn timers(&self) -> crate::sip::transaction::Timers {
        crate::sip::transaction::Timers {
            t1: Duration::from_millis(self.sip.t1_ms),
            t2: Duration::from_millis(self.sip.t2_ms),
            t4: Duration::from_millis(self.sip.t4_ms),
        }
    }

    /// Trunk credentials: `trunk.username` with the password from CAMPANILE_TRUNK_PASSWORD.
    pub fn credentials(&self) -> Result<Option<crate::sip::auth::Credentials>, ConfigError> {
        let Some(user) = &self.trunk.username else {
            return Ok(None);
        };
        match std::env::var(PASSWORD_ENV) {
            Ok(pw) if !pw.is_empty() => Ok(Some(crate::sip::auth::Credentials::new(user.clone(), pw))),
            _ => Err(ConfigError::Value {
                key: "trunk.username",
                message: format!("is set, so the trunk password must be in the environment variable {PASSWORD_ENV}"),
            }),
        }
    }

    /// True when no trunk is configured and calls go to the built-in simulated city.
    pub fn drill_mode(&self) -> bool {
        self.trunk.uri.is_none()
    }
}

/// `campanile config example`: every key, its default, and what it does.
pub const EXAMPLE: &str = r#"# Campanile node configuration. Every key is optional; the value shown is the default.
# Command-line flags override this file (--data, --http, --sip, --trunk).

[node]
# This node's id in the cluster (1 or more).
id = 1
# Where the Raft log, the state machine and the admin token live.
data = "./campanile-data"
# This node's data-centre label (shown in `campanile cluster status`).
datacenter = "dc1"
# Raft address (QUIC with mutual TLS) and the folder `campanile certs issue` made for this node.
# Both unset: a one-node cluster with no network at all.
# raft = "10.0.1.11:7000"
# certs = "/etc/campanile/certs"
# Any member's Raft address, to join its cluster. Unset with raft: start a new cluster if the data
# directory is empty.
# join = "10.0.1.10:7000"
# Voters the cluster grows to as nodes join: 3 (survives one lost node) or 5 (survives two).
voters = 3
# Build a Raft snapshot and purge the log behind it after this many entries.
snapshot_every = 10000

[http]
# Console, JSON API (/api/v1), citizen portal (/r/TENANT), /metrics and /healthz.
listen = "127.0.0.1:8080"
# The public address (https://allerta.comune.example) printed in QR codes and posters; empty = the
# request's Host. With https, session cookies are Secure.
public_url = ""

[sip]
# The UDP address calls are placed from.
listen = "127.0.0.1:5060"
# RFC 3261 timers: T1 (RTT estimate), T2 (retransmit cap), T4 (network lifetime), milliseconds.
t1_ms = 500
t2_ms = 4000
t4_ms = 5000

[trunk]
# The carrier's SIP URI. Leave unset for DRILL MODE: calls go to a built-in simulated city and
# no real phone ever rings.
# uri = "sip:trunk.example.net:5060"
# Name used in logs and metrics.
name = "trunk"
# Concurrent calls the trunk allows.
max_channels = 100
# New calls the trunk allows in any one second (a burst up to this many may go at once).
calls_per_second = 50
# Digest username if the trunk challenges (401/407). The password is read only from the
# environment variable CAMPANILE_TRUNK_PASSWORD and never appears in logs.
# username = "comune-alerts"
# Seconds between OPTIONS pings; 0 turns them off. Two unanswered pings mark the trunk down (no new
# calls, metric campanile_trunk_up 0) until one is answered.
options_interval_s = 30.0
# An outbound proxy (SBC) all calls go through, if the carrier requires one.
# outbound_proxy = "sip:sbc.example.net:5060"
# How SIP reaches the trunk: udp or tcp.
transport = "udp"

[caller_id]
# The number citizens see (From user part) and the name shown next to it.
number = "campanile"
display_name = "Protezione Civile"

[dialer]
# Ring this long before giving up (CANCEL), seconds.
ring_timeout_s = 30.0
# After the message ends, wait this long for the citizen to press 1, seconds.
confirm_wait_s = 6.0
# Outcomes are batched into one Raft entry for this long, milliseconds.
batch_ms = 20
# Times a citizen may press 2 to hear the message again in one call.
max_replays = 2

[media]
# UDP ports calls' RTP (even) and RTCP (the odd port after it) are bound from: open this range
# between the node and the trunk's media gateways. Each call holds one pair; below 32768 no
# outgoing connection of the host takes them.
rtp_port_min = 16384
rtp_port_max = 32767
# How the RTP pacer sends: "io_uring" (batches of up to 256 datagrams a system call; falls back to
# "sendto" where the kernel refuses io_uring), "sendto" (one system call a datagram) or "raw" (the
# node writes each datagram's IPv4 and UDP headers, from its call's own port, and sends up to 256
# through one raw socket a system call: the least CPU a packet, but the node needs CAP_NET_RAW, and
# falls back to "io_uring" without it; IPv6 calls send with sendto). Which costs less CPU and has the
# shorter lateness tail depends on the host: `campanile bench media --send io_uring,sendto,raw`
# measures them side by side (BENCHMARKS.md).
pacer_send = "io_uring"

[simcity]
# Drill mode only: where the built-in simulated city listens.
listen = "127.0.0.1:5070"
# always-answer, realistic, or a path to a profile TOML file.
profile = "realistic"
# Seed of the simulated citizens' behaviour.
seed = 1
# Several nodes in drill mode: dial the simulated city another node runs here instead of starting one.
# shared = "127.0.0.1:5070"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_a_valid_config_equal_to_the_defaults() {
        let cfg: Config = toml::from_str(EXAMPLE).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.http.listen, Config::default().http.listen);
        assert!(cfg.drill_mode());
        assert_eq!(
            (cfg.media.rtp_port_min, cfg.media.rtp_port_max),
            (
                crate::media::ports::DEFAULT_MIN,
                crate::media::ports::DEFAULT_MAX
            )
        );
        assert_eq!(cfg.media.pacer_send, MediaSection::default().pacer_send);
    }

    #[test]
    fn the_pacer_sends_as_configured_and_a_wrong_way_names_the_choices() {
        use crate::media::socket::SendPath;
        let cfg: Config = toml::from_str("[media]\npacer_send = \"sendto\"\n").unwrap();
        assert_eq!(cfg.media.pacer_send, SendPath::Sendto);
        let cfg: Config = toml::from_str("[media]\npacer_send = \"io_uring\"\n").unwrap();
        assert_eq!(cfg.media.pacer_send, SendPath::IoUring);
        let cfg: Config = toml::from_str("[media]\npacer_send = \"raw\"\n").unwrap();
        assert_eq!(cfg.media.pacer_send, SendPath::Raw);
        let err = toml::from_str::<Config>("[media]\npacer_send = \"uring\"\n")
            .unwrap_err()
            .to_string();
        for part in ["pacer_send", "uring", "io_uring", "sendto", "raw"] {
            assert!(err.contains(part), "{part} not in {err}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = toml::from_str::<Config>("[trunk]\nmax_chanels = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_chanels"), "{err}");
        let cfg: Config = toml::from_str("[trunk]\nmax_channels = 0\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("trunk.max_channels"), "{err}");
        let cfg: Config = toml::from_str("[trunk]\nuri = \"http://x\"\n").unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("trunk.uri"));
        let cfg: Config =
            toml::from_str("[media]\nrtp_port_min = 20001\nrtp_port_max = 20002\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("media.rtp_port_min"), "{err}");
        assert!(err.contains("20001..=20002"), "{err}");
        let err = toml::from_str::<Config>("[media]\nrtp_port_max = 70000\n").unwrap_err();
        assert!(err.to_string().contains("rtp_port_max"), "{err}");
    }
}
