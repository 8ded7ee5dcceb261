//! SIP over TCP (RFC 3261 §18) against SIPp listening on TCP, a peer we did not write: the call's
//! INVITE, ACK and BYE travel over a connection, with `SIP/2.0/TCP` in Via, and the message plays.
//! Garbage on a connection to our listener closes that connection and nothing else, and a flood of
//! connections is held to a limit without shutting out a connection that comes once one closed.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use campanile::sip::endpoint::{Endpoint, Inbound, Transport};
use common::{campanile_call, start_sipp_tcp};

#[test]
fn a_call_over_tcp_completes_for_sipp() {
    let mut sipp = start_sipp_tcp("ring_then_answer.xml");
    let (stdout, ok, stderr) = campanile_call(sipp.port, &["--transport", "tcp"], &[]);
    assert!(ok && stdout == "heard", "{stdout}\n{stderr}");
    assert!(sipp.wait().success(), "SIPp: {}", sipp.errors());
    assert_eq!(sipp.stat("SuccessfulCall(C)"), Some(1));
}

/// An endpoint listening on TCP on a free loopback port, and its queue of messages for no call.
async fn tcp_endpoint() -> (Endpoint, tokio::sync::mpsc::Receiver<Inbound>) {
    Endpoint::bind_with("127.0.0.1:0".parse().unwrap(), Transport::Tcp)
        .await
        .unwrap()
}

/// An OPTIONS for no call, as a peer sends it on its connection.
fn options(call_id: &str) -> Vec<u8> {
    format!(
        "OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bK{call_id}\r\n\
From: <sip:a@b>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: {call_id}\r\nCSeq: 1 OPTIONS\r\n\
Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// The next message for no call, within 5 s.
async fn next_unrouted(rx: &mut tokio::sync::mpsc::Receiver<Inbound>) -> Inbound {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a request arrives within 5 s")
        .expect("the endpoint is open")
}

#[tokio::test]
async fn garbage_on_a_tcp_connection_closes_it_and_the_endpoint_keeps_working() {
    let (endpoint, mut unrouted) = tcp_endpoint().await;
    let addr = endpoint.local_addr();
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"NOT SIP AT ALL\r\n\r\n").unwrap();
        let mut buf = [0u8; 16];
        // The endpoint closes the connection: read sees end of stream (or a reset).
        matches!(s.read(&mut buf), Ok(0) | Err(_))
    })
    .await
    .unwrap();
    assert!(closed, "the connection stayed open after garbage");
    assert!(
        endpoint
            .stats()
            .dropped_malformed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    // A well-formed request on a new connection still arrives.
    // The connection stays open (held here) until the request has arrived.
    let _open = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(&options("tcp-1")).unwrap();
        s
    })
    .await
    .unwrap();
    let got = next_unrouted(&mut unrouted).await;
    assert!(matches!(
        got.msg,
        campanile::sip::message::SipMessage::Request(_)
    ));
}

/// Whether the endpoint closed `s` (end of stream or a reset) rather than holding it open for
/// `within`.
fn closed_by_endpoint(s: &mut std::net::TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_closed_and_one_that_closed_makes_room() {
    use campanile::sip::endpoint::MAX_INBOUND_TCP;
    let (endpoint, mut unrouted) = tcp_endpoint().await;
    let addr = endpoint.local_addr();
    let held = tokio::task::spawn_blocking(move || {
        let mut open: Vec<_> = (0..MAX_INBOUND_TCP)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        // The listener accepts in order, so this one comes after all of the others.
        let mut one_too_many = std::net::TcpStream::connect(addr).unwrap();
        assert!(
            closed_by_endpoint(&mut one_too_many, Duration::from_secs(10)),
            "connection {} was kept open",
            MAX_INBOUND_TCP + 1
        );
        // The limit's connections are all still open.
        assert!(!closed_by_endpoint(
            &mut open[0],
            Duration::from_millis(200)
        ));
        // One closes; a new connection gets its place (once the endpoint has seen it close).
        drop(open.pop());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut fresh = loop {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            if !closed_by_endpoint(&mut s, Duration::from_millis(300)) {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no new connection was kept after one of the {MAX_INBOUND_TCP} closed"
            );
        };
        fresh.write_all(&options("tcp-2")).unwrap();
        (open, fresh)
    })
    .await
    .unwrap();
    let got = next_unrouted(&mut unrouted).await;
    assert!(matches!(
        got.msg,
        campanile::sip::message::SipMessage::Request(_)
    ));
    drop(held);
}

/// A peer that asks and never reads what it is sent: past what the kernel holds and
/// `TCP_SEND_QUEUE` more, sending to it fails, saying why, and the endpoint closes its side, so that
/// the peer, reading at last, finds the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_does_not_read_is_closed_not_queued_for() {
    use campanile::sip::endpoint::TCP_SEND_QUEUE;
    let (endpoint, mut unrouted) = tcp_endpoint().await;
    let addr = endpoint.local_addr();
    let mut client = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(&options("tcp-3")).unwrap();
        s
    })
    .await
    .unwrap();
    // Its request arrived, so its connection is open on our side too.
    let got = next_unrouted(&mut unrouted).await;
    let peer = got.from;
    // Answers of 16 KiB that the client never reads: the kernel's buffers take a few hundred.
    let answer = vec![b'x'; 16 * 1024];
    let most = 20_000;
    let mut accepted = 0;
    let err = loop {
        match endpoint.send(&answer, peer).await {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(
            accepted < most,
            "{most} sends to a peer that does not read all succeeded"
        );
        // Let the writer move what the kernel still takes.
        if accepted % 64 == 0 {
            tokio::task::yield_now().await;
        }
    };
    assert!(
        accepted >= TCP_SEND_QUEUE,
        "failed after {accepted} sends: {err}"
    );
    assert!(err.to_string().contains("does not read"), "{err}");
    // Reading now, the client gets what was sent and then the end of the stream.
    let read_all = tokio::task::spawn_blocking(move || {
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            match client.read(&mut buf) {
                Ok(0) => return Ok(total),
                Ok(n) => total += n,
                Err(e) => return Err(format!("after {total} bytes: {e}")),
            }
        }
    })
    .await
    .unwrap();
    let total = read_all.expect("the endpoint closed its side of the connection");
    assert!(total > 0 && total <= accepted * answer.len());
}
