//! The simulated city against the real caller (`call::place_call`) over loopback UDP.

use std::time::Duration;

use super::*;
use crate::call::{place_call, CallContext, CallOutcome, CallSpec};
use crate::media::PreparedAudio;

fn fast(profile: Profile) -> Profile {
    Profile {
        answer_delay_ms: [100, 100],
        press_after_ms: [600, 600],
        hang_up_after_ms: [400, 400],
        ..profile
    }
}

fn tone_audio(secs: f32) -> PreparedAudio {
    let n = (8000.0 * secs) as usize;
    PreparedAudio::from_samples(
        (0..n)
            .map(|i| ((i as f32 * 0.3).sin() * 8000.0) as i16)
            .collect(),
    )
}

/// A city on a loopback port, writing its log to `log` when given.
async fn start_city(profile: Profile, log: Option<std::path::PathBuf>) -> SimCity {
    SimCity::start(SimCityConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        log,
        profile,
        seed: 1,
    })
    .await
    .unwrap()
}

/// What a node places calls with: its own SIP endpoint and pacer on loopback.
async fn caller() -> CallContext {
    let (endpoint, _unrouted) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    CallContext::new(endpoint)
}

/// A call to `to` through the city at `city`: a 2 s message, 5 s of ringing, 500 ms to press a key.
fn spec_to(city: std::net::SocketAddr, to: &str) -> CallSpec {
    CallSpec {
        display_name: "Test".into(),
        ring_timeout: Duration::from_secs(5),
        confirm_wait: Duration::from_millis(500),
        require_confirmation: true,
        detect_machines: true,
        listen_for_keys: true,
        ..CallSpec::plain(to, city, tone_audio(2.0))
    }
}

struct Run {
    outcome: CallOutcome,
    events: Vec<serde_json::Value>,
}

async fn call_city(profile: Profile, number: &str, ring_timeout: Duration) -> Run {
    call_city_with(profile, number, ring_timeout, |_| {}).await
}

async fn call_city_with(
    profile: Profile,
    number: &str,
    ring_timeout: Duration,
    adjust: impl FnOnce(&mut CallSpec),
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("city.jsonl");
    let city = start_city(profile, Some(log.clone())).await;
    let ctx = caller().await;
    let mut spec = CallSpec {
        ring_timeout,
        ..spec_to(city.local_addr(), number)
    };
    adjust(&mut spec);
    let (_abort, abort_rx) = tokio::sync::watch::channel(false);
    let outcome = tokio::time::timeout(Duration::from_secs(30), place_call(&ctx, &spec, abort_rx))
        .await
        .expect("the call ends by itself");
    let events = events_once_ended(&log).await;
    city.shutdown().await;
    Run { outcome, events }
}

/// The city's log once it shows the call's end. The phone logs its side of the hang-up as soon as
/// it sees the BYE; this waits for it with a deadline.
async fn events_once_ended(log: &std::path::Path) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let events: Vec<serde_json::Value> = std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let ended = events.iter().any(|e| {
            matches!(
                e["event"].as_str(),
                Some("bye_received" | "bye_sent" | "reject" | "cancel")
            )
        });
        if ended || std::time::Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kinds(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn an_answering_phone_presses_1_and_the_caller_sees_confirmed() {
    let run = call_city(
        fast(Profile::always_answer()),
        "+393470000001",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        matches!(run.outcome, CallOutcome::Confirmed { .. }),
        "{:?}",
        run.outcome
    );
    assert_eq!(
        kinds(&run.events),
        ["invite", "ringing", "answer", "dtmf", "bye_received"]
    );
    let invite = &run.events[0];
    assert_eq!(invite["number"], "+393470000001");
    assert_eq!(invite["attempt"], 1);
    assert!(invite["from"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(invite["t_ms"].as_u64().unwrap() > 1_700_000_000_000);
    assert!(run.events[4]["audio_ms"].as_u64().unwrap() >= 600);
}

#[tokio::test]
async fn a_busy_phone_gives_busy() {
    let p = Profile {
        answer: 0.0,
        busy: 1.0,
        ..fast(Profile::always_answer())
    };
    let run = call_city(p, "+393470000002", Duration::from_secs(5)).await;
    assert_eq!(run.outcome, CallOutcome::Busy);
    assert_eq!(run.events.last().unwrap()["code"], 486);
}

#[tokio::test]
async fn an_unanswered_phone_is_cancelled_on_ring_timeout() {
    let p = Profile {
        answer: 0.0,
        no_answer: 1.0,
        ..fast(Profile::always_answer())
    };
    let run = call_city(p, "+393470000003", Duration::from_secs(1)).await;
    assert_eq!(run.outcome, CallOutcome::NoAnswer);
    assert_eq!(kinds(&run.events), ["invite", "ringing", "cancel"]);
}

#[tokio::test]
async fn a_phone_that_hangs_up_mid_message_is_reported_with_the_time() {
    let p = Profile {
        press_on_time: 0.0,
        hang_up_early: 1.0,
        ..fast(Profile::always_answer())
    };
    let run = call_city(p, "+393470000004", Duration::from_secs(5)).await;
    assert!(
        matches!(run.outcome, CallOutcome::HungUp { .. }),
        "{:?}",
        run.outcome
    );
    assert_eq!(run.events.last().unwrap()["event"], "bye_sent");
}

#[tokio::test]
async fn a_number_that_does_not_exist_is_invalid() {
    let p = Profile {
        invalid_numbers: 1.0,
        ..fast(Profile::always_answer())
    };
    let run = call_city(p, "+393470000005", Duration::from_secs(5)).await;
    assert_eq!(run.outcome, CallOutcome::InvalidNumber { code: 404 });
}

#[tokio::test]
async fn a_phone_that_never_presses_leaves_the_call_not_confirmed() {
    let p = Profile {
        press_on_time: 0.0,
        ..fast(Profile::always_answer())
    };
    let run = call_city(p, "+393470000006", Duration::from_secs(5)).await;
    assert_eq!(run.outcome, CallOutcome::NotConfirmed);
    let bye = run.events.last().unwrap();
    assert_eq!(bye["event"], "bye_received");
    // The whole 2 s message arrived.
    assert!(bye["audio_ms"].as_u64().unwrap() >= 1900, "{bye}");
}

#[tokio::test]
async fn a_phone_that_sends_only_in_band_tones_is_confirmed() {
    let p = Profile {
        inband_dtmf: true,
        ..fast(Profile::always_answer())
    };
    let run = call_city(p, "+393470000007", Duration::from_secs(5)).await;
    assert!(
        matches!(run.outcome, CallOutcome::Confirmed { .. }),
        "{:?}",
        run.outcome
    );
    let dtmf = run
        .events
        .iter()
        .find(|e| e["event"] == "dtmf")
        .expect("the phone pressed 1");
    assert_eq!(dtmf["method"], "inband");
}

fn challenging(profile: Profile) -> Profile {
    Profile {
        auth: Some(profile::AuthQuirk {
            realm: "city".into(),
            username: "comune".into(),
            password: "s3cret".into(),
        }),
        ..profile
    }
}

#[tokio::test]
async fn a_challenging_carrier_takes_the_right_credentials_and_refuses_wrong_ones() {
    let p = challenging(fast(Profile::always_answer()));
    let run = call_city_with(p.clone(), "+393470000011", Duration::from_secs(5), |s| {
        s.credentials = Some(crate::sip::auth::Credentials::new("comune", "s3cret"));
    })
    .await;
    assert!(
        matches!(run.outcome, CallOutcome::Confirmed { .. }),
        "{:?}",
        run.outcome
    );
    assert_eq!(
        kinds(&run.events),
        [
            "invite",
            "challenge",
            "ringing",
            "answer",
            "dtmf",
            "bye_received"
        ]
    );
    let wrong = call_city_with(p.clone(), "+393470000012", Duration::from_secs(5), |s| {
        s.credentials = Some(crate::sip::auth::Credentials::new("comune", "guess"));
    })
    .await;
    assert_eq!(wrong.outcome, CallOutcome::Rejected { code: 403 });
    let none = call_city(p, "+393470000013", Duration::from_secs(5)).await;
    assert_eq!(none.outcome, CallOutcome::AuthRejected { code: 401 });
}

#[tokio::test]
async fn an_a_law_only_carrier_gets_pcma_and_early_media_is_handled() {
    let p = Profile {
        alaw_only: true,
        early_media: true,
        ..fast(Profile::always_answer())
    };
    let run = call_city(p, "+393470000014", Duration::from_secs(5)).await;
    assert!(
        matches!(run.outcome, CallOutcome::Confirmed { .. }),
        "{:?}",
        run.outcome
    );
    assert_eq!(run.events[1]["early_media"], true);
    let answer = run.events.iter().find(|e| e["event"] == "answer").unwrap();
    assert_eq!(answer["codec"], "PCMA");
    // The phone heard PCMA audio: it pressed 1 after its 600 ms.
    let dtmf = run.events.iter().find(|e| e["event"] == "dtmf").unwrap();
    assert!(dtmf["audio_ms"].as_u64().unwrap() >= 600, "{dtmf}");
}

#[tokio::test]
async fn a_carrier_at_its_channel_cap_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("city.jsonl");
    let profile = Profile {
        max_channels: Some(1),
        press_on_time: 0.0,
        ..fast(Profile::always_answer())
    };
    let city = start_city(profile, Some(log.clone())).await;
    let ctx = caller().await;
    let spec = |to: &str| CallSpec {
        confirm_wait: Duration::from_millis(200),
        ..spec_to(city.local_addr(), to)
    };
    let (_abort, abort_rx) = tokio::sync::watch::channel(false);
    let first_spec = spec("+393470000015");
    let first = place_call(&ctx, &first_spec, abort_rx.clone());
    let second = async {
        // Wait (bounded) until the first call holds the only channel.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while city
            .stats()
            .active
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the first call never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        place_call(&ctx, &spec("+393470000016"), abort_rx.clone()).await
    };
    let (first, second) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(first, second)
    })
    .await
    .expect("both calls end");
    assert_eq!(first, CallOutcome::NotConfirmed);
    assert_eq!(
        second,
        CallOutcome::TrunkUnavailable {
            code: 503,
            retry_after: Some(Duration::from_secs(1))
        }
    );
    city.shutdown().await;
}

#[tokio::test]
async fn a_phone_accepts_our_re_invite_mid_message_and_keeps_listening() {
    let run = call_city_with(
        fast(Profile::always_answer()),
        "+393470000017",
        Duration::from_secs(5),
        |s| s.reinvite_after = Some(Duration::from_millis(300)),
    )
    .await;
    assert!(
        matches!(run.outcome, CallOutcome::Confirmed { .. }),
        "{:?}",
        run.outcome
    );
    assert_eq!(
        kinds(&run.events),
        [
            "invite",
            "ringing",
            "answer",
            "reinvite",
            "dtmf",
            "bye_received"
        ]
    );
}

#[tokio::test]
async fn a_voicemail_box_gets_the_message_after_its_beep_and_the_outcome_is_voicemail() {
    let p = Profile {
        answer: 0.0,
        voicemail: 1.0,
        voicemail_delay_ms: [100, 100],
        ..fast(Profile::always_answer())
    };
    let mut run = call_city(p, "+393470000018", Duration::from_secs(5)).await;
    assert_eq!(run.outcome, CallOutcome::Voicemail);
    // We fall silent while the greeting plays (the box logs that silence when we speak again).
    run.events.retain(|e| e["event"] != "media_gap");
    assert_eq!(
        kinds(&run.events),
        ["invite", "ringing", "answer", "beep", "bye_received"]
    );
    // Nothing of ours talked over the greeting for long, and the whole 2 s message was recorded.
    let before = run.events[3]["audio_ms"].as_u64().unwrap();
    let total = run.events[4]["audio_ms"].as_u64().unwrap();
    assert!(
        before < 2600,
        "we kept talking over the greeting: {before} ms"
    );
    assert!(
        total - before >= 1900,
        "recorded only {} ms",
        total - before
    );
}

/// One node answers, then falls silent mid-message (let go: no BYE, as if it died); a second node,
/// with its own SIP endpoint and media, continues the call from what the first one reported: a
/// re-INVITE inside the same dialog, the same RTP stream, and the citizen's 1 reaches the second.
#[tokio::test]
async fn a_second_node_continues_an_answered_call_inside_its_dialog() {
    use crate::call::{place_call_with, resume_call, HandoverHooks};
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("city.jsonl");
    // The citizen presses 1 after hearing 1.5 s of the 3 s message.
    let profile = Profile {
        press_after_ms: [1_500, 1_500],
        ..fast(Profile::always_answer())
    };
    let city = start_city(profile, Some(log.clone())).await;
    let (first, second) = (caller().await, caller().await);
    let spec = CallSpec {
        audio: tone_audio(3.0),
        detect_machines: false,
        ..spec_to(city.local_addr(), "+393470000019")
    };
    let (reports_tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let (let_go, let_go_rx) = tokio::sync::watch::channel(false);
    let (_abort, abort_rx) = tokio::sync::watch::channel(false);
    let hooks = HandoverHooks {
        answered: reports_tx,
        let_go: let_go_rx,
        stopping: Default::default(),
    };
    let first_call = tokio::spawn({
        let spec = spec.clone();
        let abort_rx = abort_rx.clone();
        async move { place_call_with(&first, &spec, abort_rx, Some(hooks)).await }
    });
    let handover = tokio::time::timeout(Duration::from_secs(10), reports.recv())
        .await
        .expect("the answer is reported")
        .expect("a handover record");
    // 500 ms into the message the first node goes silent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let_go.send_replace(true);
    let left = tokio::time::timeout(Duration::from_secs(5), first_call)
        .await
        .expect("the first node leaves at once")
        .unwrap();
    assert_eq!(left, CallOutcome::HandedOver);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        resume_call(&second, &spec, &handover, abort_rx, None),
    )
    .await
    .expect("the continued call ends by itself");
    assert!(
        matches!(outcome, CallOutcome::Confirmed { .. }),
        "{outcome:?}"
    );
    let events = events_once_ended(&log).await;
    city.shutdown().await;
    assert_eq!(
        kinds(&events),
        [
            "invite",
            "ringing",
            "answer",
            "reinvite",
            "media_gap",
            "dtmf",
            "bye_received"
        ],
        "{events:#?}"
    );
    // One call: the same Call-ID throughout; the second half came from the second node.
    assert!(events.iter().all(|e| e["call_id"] == events[0]["call_id"]));
    let first_from = events[0]["from"].as_str().unwrap();
    let second_from = second.endpoint.local_addr().to_string();
    assert_ne!(first_from, second_from);
    for e in &events[3..] {
        assert_eq!(e["from"], second_from.as_str(), "{e}");
    }
    // The gap is the silence we made (0.3 s) plus the re-INVITE, not a restart of the message:
    // the citizen pressed 1 after 1.5 s of audio in all, not 1.5 s after the takeover.
    let gap = events[4]["gap_ms"].as_u64().unwrap();
    assert!((300..2_000).contains(&gap), "{gap} ms of silence");
    let heard_at_takeover = events[3]["audio_ms"].as_u64().unwrap();
    assert!(
        (300..=700).contains(&heard_at_takeover),
        "{heard_at_takeover} ms heard from the first node"
    );
}

/// A takeover of a dialog the phone no longer has (it hung up meanwhile) is refused (481) and
/// reported as a failed takeover, so the citizen is called again rather than the call assumed up.
#[tokio::test]
async fn a_takeover_of_a_dialog_the_phone_no_longer_has_fails_with_its_reason() {
    use crate::call::resume_call;
    let city = start_city(fast(Profile::always_answer()), None).await;
    let ctx = caller().await;
    let spec = CallSpec {
        audio: tone_audio(1.0),
        detect_machines: false,
        ..spec_to(city.local_addr(), "+393470000020")
    };
    let gone = campanile_cluster::CallHandover {
        call_id: "ended-long-ago@campanile".into(),
        local_tag: "ours".into(),
        remote_tag: "theirs".into(),
        local_party: "<sip:campanile@127.0.0.1>".into(),
        remote_party: format!("<sip:+393470000020@{}>", city.local_addr()),
        remote_target: format!("sip:+393470000020@{}", city.local_addr()),
        route_set: vec![],
        local_cseq: 3,
        via_transport: "UDP".into(),
        remote_rtp: "127.0.0.1:9".into(),
        remote_rtcp: None,
        payload_type: 0,
        telephone_event: Some(101),
        ssrc: 1,
        at_ms: 0,
        frame: 0,
        seq: 0,
        ts: 0,
        answered_ms: 0,
        moved_from: vec![],
    };
    let (_abort, abort_rx) = tokio::sync::watch::channel(false);
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        resume_call(&ctx, &spec, &gone, abort_rx, None),
    )
    .await
    .expect("a refused takeover ends by itself");
    match outcome {
        CallOutcome::TakeoverFailed(why) => assert!(why.contains("481"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        CallOutcome::TakeoverFailed(String::new()).to_domain(),
        campanile_cluster::Outcome::Interrupted,
        "not held against the citizen"
    );
    city.shutdown().await;
}

/// A call aborted (a lapsed lease, a cancelled campaign) before anything rang may not CANCEL yet
/// (RFC 3261 §9.1), but it must not walk away either: the INVITE is on its way and the phone would
/// ring and answer into silence. It waits for the first provisional response and cancels then.
#[tokio::test]
async fn a_call_aborted_before_anything_rang_cancels_once_it_rings() {
    use crate::sip::message::{self, Method};
    let ctx = caller().await;
    let phone = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let spec = spec_to(phone.local_addr().unwrap(), "+393470000001");
    let (abort, abort_rx) = tokio::sync::watch::channel(false);
    let call = tokio::spawn(async move { place_call(&ctx, &spec, abort_rx).await });
    let mut buf = vec![0u8; 65_536];
    let (invite, caller_addr) = next_request(&phone, &mut buf).await;
    assert_eq!(invite.method, Method::Invite);
    // The abort comes before any response; on this one-thread runtime the call task sees it while
    // this task yields.
    abort.send_replace(true);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        !call.is_finished(),
        "the call gave up its INVITE without cancelling it"
    );
    let ringing = message::response_to(&invite, 180, Some("phone"), &[], None);
    phone
        .send_to(&message::response_bytes(&ringing), caller_addr)
        .await
        .unwrap();
    let (cancel, _) = next_request(&phone, &mut buf).await;
    assert_eq!(cancel.method, Method::Cancel);
    assert_eq!(message::call_id(&cancel), message::call_id(&invite));
    for (req, code) in [(&cancel, 200), (&invite, 487)] {
        let resp = message::response_to(req, code, Some("phone"), &[], None);
        phone
            .send_to(&message::response_bytes(&resp), caller_addr)
            .await
            .unwrap();
    }
    let outcome = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ends once its INVITE is cancelled")
        .unwrap();
    assert!(matches!(outcome, CallOutcome::Aborted), "{outcome:?}");
}

/// The next request the caller sends to `phone`, within 10 s.
async fn next_request(
    phone: &tokio::net::UdpSocket,
    buf: &mut [u8],
) -> (crate::sip::message::Request, std::net::SocketAddr) {
    use crate::sip::message::{parse, SipMessage};
    let (n, from) = tokio::time::timeout(Duration::from_secs(10), phone.recv_from(buf))
        .await
        .expect("the caller sends within 10 s")
        .unwrap();
    match parse(&buf[..n]).unwrap() {
        SipMessage::Request(r) => (r, from),
        SipMessage::Response(_) => panic!("the caller sent a response"),
    }
}
