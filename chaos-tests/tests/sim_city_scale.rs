//! Issue 3: the simulated city holds 10,000 concurrent calls. SIPp, a load generator we did not write,
//! places 10,000 calls at 1,000 per second that each stay up 15 s; every one must succeed for SIPp, and
//! the city's own ground-truth log must show 10,000 phones off the hook at the same moment.

use std::process::{Command, Stdio};
use std::time::Duration;

use campanile_chaos_tests::*;

const CALLS: u64 = 10_000;

#[test]
fn sim_city_holds_ten_thousand_concurrent_calls_from_sipp() {
    let dir = test_dir();
    // Phones answer at once, never press, and do not hang up on SIPp's silence while it holds the call.
    let profile = dir.path().join("scale.toml");
    std::fs::write(
        &profile,
        "answer_delay_ms = [0, 0]\npress_on_time = 0.0\nmedia_timeout_ms = 120000\n",
    )
    .unwrap();
    let city = SimCityProc::start(dir.path(), profile.to_str().unwrap(), 1).unwrap();
    let port = free_udp().port();
    let out = Command::new("sipp")
        .args(["-sn", "uac", &city.addr.to_string(), "-i", "127.0.0.1"])
        .args(["-p", &port.to_string()])
        .args(["-r", "1000", "-l", "12000", "-m", &CALLS.to_string()])
        .args(["-d", "15000", "-nostdin", "-max_socket", "60000"])
        .args(["-trace_stat", "-stf", "stats.csv", "-timeout", "120s"])
        .args(["-timeout_error"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("sipp is installed by the test command (Debian package sip-tester)");
    let stats = std::fs::read_to_string(dir.path().join("stats.csv")).unwrap_or_default();
    let column = |name: &str| -> u64 {
        let header = stats.lines().next().unwrap_or_default();
        let last = stats.lines().last().unwrap_or_default();
        header
            .split(';')
            .position(|c| c == name)
            .and_then(|i| last.split(';').nth(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        (column("SuccessfulCall(C)"), column("FailedCall(C)")),
        (CALLS, 0),
        "SIPp: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The city's side: every call answered and ended by SIPp's BYE; then the peak of calls that were
    // up at once, from answer to BYE.
    let events = wait_for("the city to log every BYE", Duration::from_secs(20), || {
        let events = city.events();
        let byes = events
            .iter()
            .filter(|e| e["event"] == "bye_received")
            .count() as u64;
        (byes >= CALLS).then_some(events)
    })
    .unwrap();
    let mut edges: Vec<(u64, i64)> = Vec::new();
    for e in &events {
        let t = e["t_ms"].as_u64().unwrap_or(0);
        match e["event"].as_str() {
            Some("answer") => edges.push((t, 1)),
            Some("bye_received") => edges.push((t, -1)),
            Some("reject") | Some("bye_sent") => panic!("the city refused or dropped a call: {e}"),
            _ => {}
        }
    }
    // At equal times count the hang-ups first, so the peak is never overstated.
    edges.sort();
    let (mut up, mut peak) = (0i64, 0i64);
    for (_, d) in edges {
        up += d;
        peak = peak.max(up);
    }
    assert_eq!(
        events.iter().filter(|e| e["event"] == "answer").count() as u64,
        CALLS
    );
    assert!(
        peak >= CALLS as i64,
        "only {peak} calls were up at once; expected all {CALLS}"
    );
}
