//! Kamailio, a SIP proxy we did not write, record-routes between `campanile call` and SIPp: our ACK,
//! re-INVITE and BYE must follow the route set learned from Record-Route (RFC 3261 §12.1.2, §12.2.1.1)
//! through the proxy, which the SIPp scenario checks on the Via of each request; when it forks our INVITE
//! and two phones answer, the second answer is ACKed and ended with BYE through it. As an outbound proxy
//! that only accepts requests carrying a Route to it (RFC 3261 §8.1.2), it must receive our INVITE. And
//! when another node takes an answered call over and the phone refuses its re-INVITE, that node ends
//! the dialog with BYE along the same route.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use std::time::Duration;

use campanile::call::{
    place_call_with, resume_call, CallContext, CallOutcome, CallSpec, HandoverHooks,
};
use campanile::media::PreparedAudio;
use campanile::sip::endpoint::Endpoint;
use common::{campanile_call, free_udp_port, start_sipp_with, wait_until_bound, ReapGroup};

/// Where the installed Kamailio keeps its modules.
fn kamailio_modules() -> String {
    let out = Command::new("dpkg")
        .args(["-L", "kamailio"])
        .output()
        .expect("dpkg");
    let list = String::from_utf8_lossy(&out.stdout);
    let sl = list
        .lines()
        .find(|l| l.ends_with("/modules/sl.so"))
        .expect("kamailio is installed by the test command (Debian package kamailio)");
    sl.trim_end_matches("sl.so").to_string()
}

/// Starts Kamailio on `port` with `routing` as its request_route body; killed with its workers on drop.
fn start_kamailio(dir: &std::path::Path, port: u16, routing: &str) -> ReapGroup {
    let cfg = format!(
        r#"#!KAMAILIO
listen=udp:127.0.0.1:{port}
children=1
disable_tcp=yes
auto_aliases=no
log_stderror=yes
debug=1
mpath="{modules}"
loadmodule "sl.so"
loadmodule "tm.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "textops.so"
loadmodule "maxfwd.so"
loadmodule "siputils.so"
loadmodule "corex.so"
modparam("rr", "enable_full_lr", 1)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{ sl_send_reply("483", "Too Many Hops"); exit; }}
    if (has_totag()) {{
        if (loose_route()) {{ t_relay(); exit; }}
        if (is_method("ACK")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
        sl_send_reply("404", "Not here"); exit;
    }}
    if (is_method("CANCEL")) {{ if (t_check_trans()) {{ t_relay(); }} exit; }}
{routing}
}}
"#,
        modules = kamailio_modules(),
    );
    let cfg_path = dir.join("kamailio.cfg");
    std::fs::write(&cfg_path, cfg).unwrap();
    let log = std::fs::File::create(dir.join("kamailio.log")).unwrap();
    let kamailio = Command::new("kamailio")
        .args(["-DD", "-E", "-f"])
        .arg(&cfg_path)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("kamailio is installed by the test command (Debian package kamailio)");
    let kamailio = ReapGroup(kamailio);
    wait_until_bound(port, "kamailio", Some(&dir.join("kamailio.log")));
    kamailio
}

#[test]
fn ack_reinvite_and_bye_follow_the_record_route_through_kamailio() {
    let dir = tempfile::tempdir().unwrap();
    let kam_port = free_udp_port();
    let mut sipp = start_sipp_with("record_route.xml", &[("@KAM_PORT@", kam_port.to_string())]);
    let routing = format!(
        "    record_route();\n    $du = \"sip:127.0.0.1:{}\";\n    t_relay();",
        sipp.port
    );
    let _kamailio = start_kamailio(dir.path(), kam_port, &routing);

    let (stdout, ok, stderr) = campanile_call(kam_port, &["--reinvite-after", "0.5"], &[]);
    assert!(ok && stdout == "heard", "{stdout}\n{stderr}");
    let status = sipp.wait();
    assert!(
        status.success(),
        "SIPp missed the re-INVITE or saw a request that bypassed the proxy: {}",
        sipp.errors()
    );
    assert_eq!(sipp.stat("SuccessfulCall(C)"), Some(1));
}

/// Kamailio forks the INVITE to two phones that both answer: the call goes on with one, and the
/// other's 200 OK is ACKed and its dialog ended with BYE (RFC 3261 §13.2.2.4), through the proxy.
#[test]
fn a_second_answer_to_a_forked_invite_is_acked_and_ended_through_kamailio() {
    let dir = tempfile::tempdir().unwrap();
    let kam_port = free_udp_port();
    let kam = [("@KAM_PORT@", kam_port.to_string())];
    let mut phones = [
        start_sipp_with("forked_answer.xml", &kam),
        start_sipp_with("forked_answer.xml", &kam),
    ];
    let routing = format!(
        "    record_route();\n    $ru = \"sip:1000@127.0.0.1:{}\";\n    \
         append_branch(\"sip:1000@127.0.0.1:{}\");\n    t_relay();",
        phones[0].port, phones[1].port
    );
    let _kamailio = start_kamailio(dir.path(), kam_port, &routing);

    let (stdout, ok, stderr) = campanile_call(kam_port, &[], &[]);
    assert!(ok && stdout == "heard", "{stdout}\n{stderr}");
    for (i, phone) in phones.iter_mut().enumerate() {
        let status = phone.wait();
        assert!(
            status.success(),
            "phone {i} was left without an ACK or a BYE through the proxy: {}",
            phone.errors()
        );
        assert_eq!(phone.stat("SuccessfulCall(C)"), Some(1), "phone {i}");
    }
    assert!(
        stderr.contains("a second branch answered the INVITE"),
        "{stderr}"
    );
}

#[test]
fn an_outbound_proxy_gets_the_invite_with_a_route_to_itself() {
    let dir = tempfile::tempdir().unwrap();
    let kam_port = free_udp_port();
    let mut sipp = start_sipp_with("via_proxy.xml", &[("@KAM_PORT@", kam_port.to_string())]);
    // Only requests pre-routed to this proxy are relayed, to their Request-URI (SIPp).
    let routing = format!(
        "    if (!is_present_hf(\"Route\") || !($hdr(Route) =~ \"127.0.0.1:{kam_port}\")) {{\n        \
         sl_send_reply(\"403\", \"No Route to this proxy\"); exit;\n    }}\n    \
         loose_route();\n    t_relay();"
    );
    let _kamailio = start_kamailio(dir.path(), kam_port, &routing);

    let proxy = format!("sip:127.0.0.1:{kam_port}");
    let (stdout, ok, stderr) = campanile_call(sipp.port, &["--proxy", &proxy], &[]);
    assert!(ok && stdout == "heard", "{stdout}\n{stderr}");
    assert!(sipp.wait().success(), "SIPp: {}", sipp.errors());
    assert_eq!(sipp.stat("SuccessfulCall(C)"), Some(1));
}

/// A node of its own: a SIP endpoint and a pacer on loopback.
async fn caller() -> CallContext {
    let (endpoint, _unrouted) = Endpoint::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    CallContext::new(endpoint)
}

/// Another node takes an answered call over (its first node went silent) with a re-INVITE along the
/// route set, and the phone refuses it: the dialog is ended with BYE through the proxy before the
/// citizen is called again, not left off the hook in silence.
#[tokio::test]
async fn a_refused_takeover_ends_the_dialog_with_bye_through_kamailio() {
    let dir = tempfile::tempdir().unwrap();
    let kam_port = free_udp_port();
    let mut sipp = start_sipp_with(
        "takeover_refused.xml",
        &[("@KAM_PORT@", kam_port.to_string())],
    );
    let routing = format!(
        "    record_route();\n    $du = \"sip:127.0.0.1:{}\";\n    t_relay();",
        sipp.port
    );
    let _kamailio = start_kamailio(dir.path(), kam_port, &routing);
    let trunk = std::net::SocketAddr::from(([127, 0, 0, 1], kam_port));
    let (first, second) = (caller().await, caller().await);
    // A 10 s tone: the first node is still playing it when it lets go.
    let tone = (0..80_000)
        .map(|i| ((i as f32 * 0.3).sin() * 8000.0) as i16)
        .collect();
    let spec = CallSpec {
        ring_timeout: Duration::from_secs(5),
        ..CallSpec::plain("1000", trunk, PreparedAudio::from_samples(tone))
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
        let (spec, abort_rx) = (spec.clone(), abort_rx.clone());
        async move { place_call_with(&first, &spec, abort_rx, Some(hooks)).await }
    });
    let handover = tokio::time::timeout(Duration::from_secs(20), reports.recv())
        .await
        .expect("the answer is reported")
        .expect("a handover record");
    // The first node goes (no BYE, as if it died); the second takes the call over.
    let_go.send_replace(true);
    let left = tokio::time::timeout(Duration::from_secs(5), first_call)
        .await
        .expect("the first node leaves at once")
        .unwrap();
    assert_eq!(left, CallOutcome::HandedOver);
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        resume_call(&second, &spec, &handover, abort_rx, None),
    )
    .await
    .expect("a refused takeover ends by itself");
    match &outcome {
        CallOutcome::TakeoverFailed(why) => assert!(
            why.contains("refused with 488") && why.contains("ended with BYE"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    let status = sipp.wait();
    assert!(
        status.success(),
        "SIPp got no BYE, or one that bypassed the proxy: {}",
        sipp.errors()
    );
    assert_eq!(sipp.stat("SuccessfulCall(C)"), Some(1), "{}", sipp.errors());
}
