//! `campanile call` against SIPp (Debian package sip-tester), a SIP peer we did not write: the built-in UAS
//! (issue 2) and the UAS scenarios in `tests/sipp/` (issue 3): ringing, early media, A-law only, CANCEL,
//! busy, a Digest challenge, a remote hang-up and a DTMF "1" replayed from the RFC 2833 capture that
//! ships with SIPp.

mod common;

use common::{campanile_call, start_sipp};

/// The call ends as `want` and SIPp completes its scenario successfully.
fn expect(scenario: &str, extra: &[&str], env: &[(&str, &str)], want: &str, delivered: bool) {
    let mut sipp = start_sipp(scenario);
    let (stdout, ok, stderr) = campanile_call(sipp.port, extra, env);
    assert!(
        stdout.starts_with(want),
        "{scenario}: campanile said `{stdout}`, expected `{want}`\n{stderr}"
    );
    assert_eq!(ok, delivered, "{scenario}: exit status for `{stdout}`");
    let status = sipp.wait();
    assert!(
        status.success(),
        "{scenario}: SIPp reported a failed call ({status}): {}",
        sipp.errors()
    );
    assert_eq!(
        sipp.stat("SuccessfulCall(C)"),
        Some(1),
        "{scenario}: SIPp statistics"
    );
}

#[test]
fn campanile_call_completes_one_call_that_sipp_counts_as_successful() {
    expect("uas", &[], &[], "heard", true);
}

/// A 200 OK without an SDP answer cannot be used: the call fails and its dialog is ended with a
/// BYE, retransmitted (RFC 3261 §17.1.2.2) until SIPp answers it 2 s later. Before, that BYE went
/// once: lost, it left the phone in a silent call.
#[test]
fn an_unusable_answer_is_ended_with_a_bye_retransmitted_until_answered() {
    let mut sipp = start_sipp("answer_without_sdp.xml");
    let (stdout, ok, stderr) = campanile_call(sipp.port, &[], &[]);
    assert!(
        stdout.starts_with("failed: callee's SDP unusable") && !ok,
        "campanile said `{stdout}`\n{stderr}"
    );
    let status = sipp.wait();
    assert!(status.success(), "SIPp: {}", sipp.errors());
    assert_eq!(sipp.stat("SuccessfulCall(C)"), Some(1));
    let again = sipp.retransmissions_received("BYE");
    assert!(
        again.is_some_and(|n| n >= 1),
        "SIPp received the BYE {again:?} more times: it was not retransmitted while unanswered"
    );
}

#[test]
fn ringing_then_answer_is_heard() {
    expect("ring_then_answer.xml", &[], &[], "heard", true);
}

#[test]
fn early_media_183_then_answer_is_heard() {
    expect("early_media_183.xml", &[], &[], "heard", true);
}

#[test]
fn an_a_law_only_answer_is_honoured() {
    expect("pcma_only.xml", &[], &[], "heard", true);
}

#[test]
fn busy_is_reported_and_exits_non_zero() {
    expect("busy.xml", &[], &[], "busy", false);
}

#[test]
fn ring_timeout_sends_cancel_and_handles_487() {
    expect(
        "ring_until_cancel.xml",
        &["--ring-timeout", "2"],
        &[],
        "no answer",
        false,
    );
}

/// The phone is picked up as our CANCEL for the ring timeout is on its way: its 200 OK crosses the
/// CANCEL. The citizen is on the line, so the message is played to them ("heard"); before, the
/// call was ended with BYE at once and reported as not answered.
#[test]
fn an_answer_crossing_the_ring_timeout_cancel_is_played_the_message() {
    expect(
        "answer_crossing_cancel.xml",
        &["--ring-timeout", "2"],
        &[],
        "heard",
        true,
    );
}

#[test]
fn a_401_challenge_is_answered_with_digest_credentials() {
    expect(
        "digest_401.xml",
        &["--user", "campanile"],
        &[("CAMPANILE_TRUNK_PASSWORD", "s3cret-pw")],
        "heard",
        true,
    );
}

#[test]
fn a_401_without_credentials_names_the_fix_and_never_prints_a_password() {
    let sipp = start_sipp("digest_401.xml");
    let (stdout, ok, stderr) = campanile_call(sipp.port, &[], &[]);
    assert!(!ok);
    assert_eq!(
        stdout,
        "rejected 401 Unauthorized: check the trunk's username and password"
    );
    drop(sipp);
    // Wrong password: SIPp answers 403 and the password appears nowhere.
    let sipp = start_sipp("digest_401.xml");
    let (stdout, ok, stderr2) = campanile_call(
        sipp.port,
        &["--user", "campanile"],
        &[("CAMPANILE_TRUNK_PASSWORD", "wrong-pw-123")],
    );
    assert!(!ok);
    assert!(stdout.starts_with("rejected 403"), "{stdout}");
    for text in [&stdout, &stderr, &stderr2] {
        assert!(!text.contains("wrong-pw-123"));
    }
}

#[test]
fn a_remote_hang_up_during_playback_is_reported_with_its_time() {
    expect("remote_bye.xml", &[], &[], "hung up after 1.", false);
}

#[test]
fn dtmf_1_from_sipps_rfc2833_capture_confirms() {
    expect("dtmf_1.xml", &[], &[], "confirmed", true);
}

#[test]
fn a_302_redirect_is_followed_once() {
    expect("redirect_302.xml", &[], &[], "heard", true);
}

#[test]
fn a_503_is_reported_as_the_trunk_overloaded_with_its_retry_after() {
    expect(
        "overloaded_503.xml",
        &[],
        &[],
        "trunk unavailable (503 Service Unavailable), retry after 2 s",
        false,
    );
}

#[test]
fn dtmf_1_by_sip_info_confirms_and_the_invite_asserts_our_identity() {
    expect("dtmf_info.xml", &[], &[], "confirmed", true);
}
