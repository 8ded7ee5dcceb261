//! What a call hears from its callee on its RTP socket: keys (RFC 4733 events when telephone-event
//! was negotiated, otherwise tones in the audio itself, for trunks that pass keys only in-band) and,
//! where the campaign asks, whether an answering machine picked up.
//!
//! A [`Listener`] has no task of its own: the call looks at its socket every
//! [`READ_INTERVAL`](crate::media::socket::READ_INTERVAL) and hands the [`Listener`] what has queued.
//! A task per call for this (as before) cost a spawn, two channels and a wake-up of each side per
//! key; `campanile bench call-setup` measured the difference (BENCHMARKS.md).

use std::io;
use std::net::SocketAddr;

use crate::media::dtmf::DtmfReceiver;
use crate::media::g711;
use crate::media::inband::InbandDetector;
use crate::media::machine::{MachineConfig, MachineDetector, MachineEvent};
use crate::media::rtp;
use crate::media::socket::{is_icmp_report, RtpSocket};
use crate::sip::sdp;

/// The most datagrams one look reads. A callee sends five in a [`READ_INTERVAL`]; anything past
/// this many is a flood, which stays queued (the kernel drops what overflows the socket's buffer)
/// so that a look's work stays bounded and the call's thread serves the others.
///
/// [`READ_INTERVAL`]: crate::media::socket::READ_INTERVAL
pub const MAX_PER_LOOK: usize = 64;

/// Something the callee's RTP said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    Key(char),
    Machine(MachineEvent),
}

/// One call's ears: the key and answering-machine detectors, fed from its RTP socket.
pub struct Listener {
    telephone_event: Option<u8>,
    machines: Option<MachineDetector>,
    events: DtmfReceiver,
    tones: InbandDetector,
    linear: Vec<i16>,
    buf: Box<[u8; 1500]>,
    strangers: u64,
    deaf: bool,
}

impl Listener {
    /// Keys come as RFC 4733 events with payload type `telephone_event` when the answer has one,
    /// otherwise as tones in the audio; `detect_machines` also runs answering-machine detection.
    pub fn new(telephone_event: Option<u8>, detect_machines: bool) -> Listener {
        Listener {
            telephone_event,
            machines: detect_machines.then(|| MachineDetector::new(MachineConfig::default())),
            events: DtmfReceiver::new(),
            tones: InbandDetector::new(),
            linear: Vec::with_capacity(160),
            buf: Box::new([0; 1500]),
            strangers: 0,
            deaf: false,
        }
    }

    /// Reads what is queued on `socket` now (up to [`MAX_PER_LOOK`] datagrams, without waiting)
    /// and appends what it says to `heard`.
    ///
    /// Only datagrams from `callee` (the media address of its SDP) count: a port is reused by
    /// later calls, and a key pressed on an earlier call (its last RFC 4733 packets still on the
    /// way) must never confirm the next citizen on that port. The socket is connected to the
    /// callee, but datagrams queued before it was (or before the callee moved) are still read here.
    pub fn look(&mut self, socket: &RtpSocket, callee: SocketAddr, heard: &mut Vec<Heard>) {
        for _ in 0..MAX_PER_LOOK {
            if self.deaf {
                return;
            }
            let (n, from) = match socket.try_recv_from(&mut self.buf[..]) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // An ICMP error for an earlier datagram of ours (the callee's port closed for a
                // moment, a router's complaint), reported once. The call goes on.
                Err(e) if is_icmp_report(&e) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read RTP: keys and answering machines go unheard");
                    self.deaf = true;
                    return;
                }
            };
            if from != callee {
                self.strangers += 1;
                if self.strangers == 1 {
                    tracing::debug!(%from, "RTP from an address other than the callee's: ignored");
                }
                continue;
            }
            self.feed(n, heard);
        }
    }

    /// The first `n` bytes of the buffer, one datagram from the callee.
    fn feed(&mut self, n: usize, heard: &mut Vec<Heard>) {
        let Ok((header, payload)) = rtp::parse(&self.buf[..n]) else {
            return;
        };
        if self.telephone_event == Some(header.payload_type) {
            if let Some(d) = self.events.feed(&header, payload) {
                heard.push(Heard::Key(d));
            }
            return;
        }
        self.linear.clear();
        match header.payload_type {
            sdp::PT_PCMU => self
                .linear
                .extend(payload.iter().map(|b| g711::ulaw_to_linear(*b))),
            sdp::PT_PCMA => self
                .linear
                .extend(payload.iter().map(|b| g711::alaw_to_linear(*b))),
            _ => return,
        }
        if let Some(d) = self.machines.as_mut() {
            heard.extend(d.feed(&self.linear).into_iter().map(Heard::Machine));
        }
        if self.telephone_event.is_none() {
            heard.extend(self.tones.feed(&self.linear).into_iter().map(Heard::Key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::dtmf::dtmf_packets;

    /// Looks until `socket` has given a key or `deadline` passes (datagrams on loopback are
    /// queued by the time `send_to` returns, so one look normally does).
    fn keys(ears: &mut Listener, socket: &RtpSocket, callee: SocketAddr) -> Vec<char> {
        let mut heard = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while heard.is_empty() && std::time::Instant::now() < deadline {
            ears.look(socket, callee, &mut heard);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        heard
            .into_iter()
            .filter_map(|h| match h {
                Heard::Key(d) => Some(d),
                Heard::Machine(_) => None,
            })
            .collect()
    }

    /// A port is reused by the next call: the last RFC 4733 packets of a key pressed on the earlier
    /// call must not confirm the citizen now on that port. Only the callee's address counts, and
    /// after a re-INVITE moves the callee, its new one.
    #[test]
    fn keys_count_only_from_the_callee_media_address() {
        let ours = RtpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = ours.local_addr();
        let callee = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let earlier_call = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut ears = Listener::new(Some(101), false);
        // The stranger's "1" goes first, then the callee's "5": the only key heard is the 5.
        for p in dtmf_packets('1', 7, 1, 160, 101) {
            earlier_call.send_to(&p, to).unwrap();
        }
        for p in dtmf_packets('5', 9, 1, 160, 101) {
            callee.send_to(&p, to).unwrap();
        }
        let callee_addr = callee.local_addr().unwrap();
        assert_eq!(keys(&mut ears, &ours, callee_addr), vec!['5']);
        for p in dtmf_packets('9', 11, 1, 320, 101) {
            earlier_call.send_to(&p, to).unwrap();
        }
        assert_eq!(
            keys(&mut ears, &ours, earlier_call.local_addr().unwrap()),
            vec!['9']
        );
    }

    /// A call's RTP socket is connected to the callee, so an ICMP "port unreachable" for one of our
    /// packets comes back as an error on the next read. The listener reads on: keys pressed after
    /// it still count.
    #[test]
    fn an_icmp_error_does_not_stop_the_listener() {
        let ours = RtpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = ours.local_addr();
        // The callee's port is closed for a moment while one of our packets reaches it.
        let callee_addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        ours.connect(callee_addr).unwrap();
        let mut out = crate::media::socket::Outbox::default();
        out.push(ours.source(), None, |b| b.extend_from_slice(b"rtp"));
        crate::media::socket::BatchSender::new(crate::media::socket::SendPath::Sendto)
            .0
            .send(&out, |_, _| {});
        let mut ears = Listener::new(Some(101), false);
        // The callee is back on its port and presses 4.
        let callee = std::net::UdpSocket::bind(callee_addr).unwrap();
        for p in dtmf_packets('4', 3, 1, 160, 101) {
            callee.send_to(&p, to).unwrap();
        }
        assert_eq!(keys(&mut ears, &ours, callee_addr), vec!['4']);
        assert!(!ears.deaf);
    }

    /// A flood is read at most [`MAX_PER_LOOK`] datagrams a look; the rest waits for the next.
    #[test]
    fn a_look_reads_a_bounded_number_of_datagrams() {
        let ours = RtpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let to = ours.local_addr();
        let callee = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let callee_addr = callee.local_addr().unwrap();
        let mut ears = Listener::new(Some(101), false);
        // Strangers' datagrams are read and ignored, so they show what a look takes.
        let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..MAX_PER_LOOK + 10 {
            stranger.send_to(b"x", to).unwrap();
        }
        let mut heard = Vec::new();
        ears.look(&ours, callee_addr, &mut heard);
        assert_eq!(ears.strangers, MAX_PER_LOOK as u64);
        ears.look(&ours, callee_addr, &mut heard);
        assert_eq!(ears.strangers, MAX_PER_LOOK as u64 + 10);
        assert!(heard.is_empty());
    }
}
