//! Issue 3: a phone that answers after the node gave up on its INVITE (Timer B: no response at all
//! for 64×T1) is not left off the hook in silence. RFC 3261 §13.2.2.4: the caller ACKs every 2xx to
//! its INVITE and ends a dialog it does not want with BYE. The peer is SIPp (Debian package
//! sip-tester), whose scenario fails unless both arrive.

use std::time::Duration;

use campanile_chaos_tests::*;
use serde_json::json;

/// Silent until well after the node's Timer B (64 × 50 ms = 3.2 s) and its ring timeout (4 s), then
/// answers (5 s past the ring timeout, room for a slow machine); the call succeeds for SIPp only if
/// the ACK and then a BYE come.
const LATE_ANSWER: &str = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="answer after the caller's Timer B">
  <recv request="INVITE" crlf="true"/>
  <pause milliseconds="9000"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
[last_CSeq:]
Contact: <sip:[local_ip]:[local_port];transport=[transport]>
Content-Type: application/sdp
Content-Length: [len]

v=0
o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0
a=rtpmap:0 PCMU/8000

]]></send>
  <recv request="ACK" timeout="15000"/>
  <recv request="BYE" timeout="15000"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
</scenario>
"#;

fn metric(node: &NodeProc, name: &str) -> Option<u64> {
    let text = node.text("/metrics").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn an_answer_after_the_invite_timed_out_is_acked_and_ended_with_bye() {
    let dir = test_dir();
    let scenario = dir.path().join("late_answer.xml");
    std::fs::write(&scenario, LATE_ANSWER).unwrap();
    let sip = free_udp();
    let media = free_udp();
    let errors = dir.path().join("sipp-errors.log");
    let args: Vec<String> = [
        "-sf",
        &scenario.display().to_string(),
        "-i",
        "127.0.0.1",
        "-p",
        &sip.port().to_string(),
        "-mi",
        "127.0.0.1",
        "-mp",
        &media.port().to_string(),
        "-m",
        "1",
        "-nostdin",
        "-timeout",
        "60s",
        "-trace_err",
        "-error_file",
        &errors.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let mut sipp = Proc::spawn(
        "sipp",
        std::path::Path::new("sipp"),
        &args,
        dir.path().join("sipp.log"),
    )
    .expect("sipp is installed by the test command (Debian package sip-tester)");

    // Short SIP timers (Timer B 3.2 s) and no OPTIONS pings: SIPp's scenario is one call.
    let config = fast_node_config(1).replacen("[trunk]\n", "[trunk]\noptions_interval_s = 0\n", 1)
        + "\n[sip]\nt1_ms = 50\nt2_ms = 400\n";
    let node = NodeProc::start(&dir.path().join("node"), &config, &format!("sip:{sip}")).unwrap();
    node.register(1, 1).unwrap();
    let id = node.start_campaign(json!({"max_attempts": 1})).unwrap();
    let done = node
        .wait_campaign_done(id, Duration::from_secs(60))
        .unwrap();
    // The node gave up on the call before anything answered.
    assert_eq!(done["counts"]["attempts"], 1, "{done}");
    assert_eq!(done["counts"]["confirmed"], 0, "{done}");

    let status = sipp
        .wait_exit(Duration::from_secs(45))
        .expect("SIPp still waits for the ACK or the BYE");
    assert!(
        status.success(),
        "SIPp's late answer was not ACKed and ended ({status}): {}{}",
        sipp.log_text(),
        std::fs::read_to_string(&errors).unwrap_or_default()
    );
    assert_eq!(
        metric(&node, "campanile_sip_stray_answers_ended"),
        Some(1),
        "the node counts the answer it ended"
    );
    assert!(node
        .proc
        .log_text()
        .contains("ACKed, ending the call with BYE"));
}
