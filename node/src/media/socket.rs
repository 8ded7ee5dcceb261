//! The UDP socket of one call's RTP (or RTCP): sent to from the pacer thread with plain non-blocking
//! `sendto`, read by the call's task through tokio.
//!
//! It is registered with the reactor for readability only. A tokio `UdpSocket` also registers for
//! writability, and on Linux every datagram a UDP socket sends frees its buffer space and raises a
//! write-space event, so the reactor would wake for every RTP packet: measured with `campanile bench
//! media`, that tripled the CPU cost of a packet.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub struct RtpSocket {
    fd: AsyncFd<UdpSocket>,
}

impl RtpSocket {
    /// Binds `addr`; must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr) -> io::Result<RtpSocket> {
        let socket = UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        // SAFETY: the std socket owns its descriptor, and this struct never replaces or closes it
        // while the registration lives, which is what `register_with_interest` asks.
        let fd = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(RtpSocket { fd })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.fd.get_ref().local_addr()
    }

    /// Sends one datagram now or not at all (a full buffer drops it: the stream keeps its timing).
    pub fn try_send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        self.fd.get_ref().send_to(buf, to)
    }

    /// Receives the next datagram.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|s| s.get_ref().recv_from(buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}
