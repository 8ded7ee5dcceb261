//! Where a call's media sockets are bound: an even RTP port and the odd RTCP port after it (RFC 3550
//! §11), from the range `media.rtp_port_min`..=`media.rtp_port_max`, so that a data centre can open
//! exactly that range in the firewall between the node and its trunk.
//!
//! Pairs are handed out in turn around the range, starting at a random pair, so a port is used again
//! only after every other pair has been: a late packet of a call that ended reaches a closed port,
//! not the next call. A pair that another socket holds (a long call still up when the turn comes
//! round, another process) is skipped. Each bind names its port, so no socket is opened only to be
//! thrown back, as asking the kernel for any port and keeping the even ones does.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::socket::RtpSocket;

/// The default range, below Linux's ephemeral ports (32768–60999), so that no outgoing connection
/// takes one of them: 8,192 pairs.
pub const DEFAULT_MIN: u16 = 16384;
pub const DEFAULT_MAX: u16 = 32767;

/// Why a port range cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{min}..={max} holds no even RTP port followed by its RTCP port")]
pub struct NoPair {
    pub min: u16,
    pub max: u16,
}

/// The RTP/RTCP port pairs of one node; cheap to clone (clones share the turn).
#[derive(Clone, Debug)]
pub struct RtpPorts {
    /// The first pair's RTP port (even).
    first: u16,
    pairs: u32,
    next: Arc<AtomicU32>,
}

impl Default for RtpPorts {
    fn default() -> Self {
        // DEFAULT_MIN is even and DEFAULT_MAX the odd port of the range's last pair.
        RtpPorts::with_pairs(
            DEFAULT_MIN,
            u32::from(DEFAULT_MAX - DEFAULT_MIN).div_ceil(2),
        )
    }
}

impl RtpPorts {
    /// The pairs within `min..=max` (both ports of a pair inside it).
    pub fn new(min: u16, max: u16) -> Result<RtpPorts, NoPair> {
        let first = u32::from(min) + u32::from(min) % 2;
        if first + 1 > u32::from(max) {
            return Err(NoPair { min, max });
        }
        Ok(RtpPorts::with_pairs(
            first as u16,
            (u32::from(max) - first).div_ceil(2),
        ))
    }

    /// `pairs` (at least one) from the even port `first`, the turn starting at a random one.
    fn with_pairs(first: u16, pairs: u32) -> RtpPorts {
        RtpPorts {
            first,
            pairs,
            next: Arc::new(AtomicU32::new(rand::random::<u32>() % pairs)),
        }
    }

    /// Binds the next free pair on `ip`. Fails when every pair is held, naming the range, or at
    /// once on an error other than a port in use (an address this host does not have, a port
    /// below 1024 without the right to bind it).
    pub fn bind_pair(&self, ip: IpAddr) -> io::Result<(RtpSocket, RtpSocket)> {
        for _ in 0..self.pairs {
            let k = self.next.fetch_add(1, Ordering::Relaxed) % self.pairs;
            let port = self.first + 2 * k as u16;
            let rtp = match RtpSocket::bind(SocketAddr::new(ip, port)) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(with_port(e, ip, port)),
            };
            match RtpSocket::bind(SocketAddr::new(ip, port + 1)) {
                Ok(rtcp) => return Ok((rtp, rtcp)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(with_port(e, ip, port + 1)),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "all {} RTP/RTCP port pairs from {} to {} on {ip} are in use: widen \
                 media.rtp_port_min/media.rtp_port_max or lower trunk.max_channels",
                self.pairs,
                self.first,
                self.last()
            ),
        ))
    }

    /// The last pair's RTCP port.
    fn last(&self) -> u32 {
        u32::from(self.first) + 2 * self.pairs - 1
    }
}

fn with_port(e: io::Error, ip: IpAddr, port: u16) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot bind {}: {e}", SocketAddr::new(ip, port)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn port(s: &RtpSocket) -> u16 {
        s.local_addr().port()
    }

    #[test]
    fn a_range_needs_an_even_port_and_the_one_after_it() {
        assert_eq!(
            RtpPorts::new(20001, 20002).unwrap_err(),
            NoPair {
                min: 20001,
                max: 20002
            }
        );
        assert!(RtpPorts::new(20000, 20000).is_err());
        assert!(RtpPorts::new(20010, 20000).is_err());
        assert!(RtpPorts::new(65534, 65535).is_ok());
        let p = RtpPorts::new(20001, 20006).unwrap();
        assert_eq!((p.first, p.pairs, p.last()), (20002, 2, 20005));
        let d = RtpPorts::default();
        assert_eq!(
            (d.first, d.pairs, d.last()),
            (DEFAULT_MIN, 8192, u32::from(DEFAULT_MAX))
        );
    }

    #[test]
    fn pairs_are_even_and_odd_inside_the_range_and_go_round_it_in_turn() {
        // Below the default range and the ephemeral ports, where nothing else in the tests binds.
        let ports = RtpPorts::new(15100, 15107).unwrap();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (rtp, rtcp) = ports.bind_pair(LOOPBACK).unwrap();
            assert_eq!(port(&rtp) % 2, 0);
            assert_eq!(port(&rtcp), port(&rtp) + 1);
            assert!((15100..=15107).contains(&port(&rtcp)));
            seen.push(port(&rtp));
        }
        // Closed at once, each pair still waits for its turn: four calls, four different pairs.
        seen.sort_unstable();
        assert_eq!(seen, [15100, 15102, 15104, 15106]);
    }

    #[test]
    fn a_pair_held_elsewhere_is_skipped_and_a_full_range_says_which_keys_to_change() {
        let ports = RtpPorts::new(15200, 15205).unwrap();
        // Someone else holds one RTP port and one RTCP port: one pair is left.
        let _a = std::net::UdpSocket::bind((LOOPBACK, 15200)).unwrap();
        let _b = std::net::UdpSocket::bind((LOOPBACK, 15203)).unwrap();
        let (rtp, rtcp) = ports.bind_pair(LOOPBACK).unwrap();
        assert_eq!(port(&rtp), 15204);
        let Err(err) = ports.bind_pair(LOOPBACK) else {
            panic!("a pair was bound though every one is held");
        };
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let text = err.to_string();
        assert!(text.contains("15200 to 15205"), "{text}");
        assert!(text.contains("media.rtp_port_min"), "{text}");
        // The pair comes back when its call ends.
        drop(rtp);
        drop(rtcp);
        assert_eq!(port(&ports.bind_pair(LOOPBACK).unwrap().0), 15204);
    }
}
