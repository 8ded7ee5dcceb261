//! SIP over TCP (RFC 3261 §18) against SIPp listening on TCP, a peer we did not write: the call's
//! INVITE, ACK and BYE travel over a connection, with `SIP/2.0/TCP` in Via, and the message plays.
//! Garbage on a connection to our listener closes that connection and nothing else.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{campanile_call, start_sipp_tcp};

#[test]
fn a_call_over_tcp_completes_for_sipp() {
    let mut sipp = start_sipp_tcp("ring_then_answer.xml");
    let (stdout, ok, stderr) = campanile_call(sipp.port, &["--transport", "tcp"], &[]);
    assert!(ok && stdout == "heard", "{stdout}\n{stderr}");
    assert!(sipp.wait().success(), "SIPp: {}", sipp.errors());
    assert_eq!(sipp.stat("SuccessfulCall(C)"), Some(1));
}

#[tokio::test]
async fn garbage_on_a_tcp_connection_closes_it_and_the_endpoint_keeps_working() {
    use campanile::sip::endpoint::{Endpoint, Transport};
    let (endpoint, mut unrouted) =
        Endpoint::bind_with("127.0.0.1:0".parse().unwrap(), Transport::Tcp)
            .await
            .unwrap();
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
        s.write_all(
            b"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKa\r\n\
From: <sip:a@b>;tag=1\r\nTo: <sip:x@127.0.0.1>\r\nCall-ID: tcp-1\r\nCSeq: 1 OPTIONS\r\n\
Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
        )
        .unwrap();
        s
    })
    .await
    .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), unrouted.recv())
        .await
        .expect("the OPTIONS arrives")
        .unwrap();
    assert!(matches!(
        got.msg,
        campanile::sip::message::SipMessage::Request(_)
    ));
}
