//! Issue 2: the real binary, 200 subscribers registered over the API, one campaign against
//! `campanile sim-city --profile realistic`; every subscriber's final state is checked against what the
//! simulated phones themselves logged.

use std::collections::BTreeMap;
use std::time::Duration;

use campanile_chaos_tests::*;
use serde_json::json;

#[test]
fn realistic_city_every_subscriber_final_and_confirmed_only_where_a_phone_pressed_1() {
    let dir = test_dir();
    let city = SimCityProc::start(dir.path(), "realistic", 7).unwrap();
    let node = NodeProc::start(
        dir.path(),
        &fast_node_config(60),
        &format!("sip:{}", city.addr),
    )
    .unwrap();

    let subscribers = node.register(1, 200).unwrap();
    let id = node
        .start_campaign(json!({
            "max_attempts": 6, "busy_delay_s": 1.0, "no_answer_delay_s": 2.0, "failure_delay_s": 1.0
        }))
        .unwrap();
    let done = node
        .wait_campaign_done(id, Duration::from_secs(600))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");

    let (status, tasks) = node.get(&format!("/api/v1/campaigns/{id}/tasks")).unwrap();
    assert_eq!(status, 200);
    let tasks = tasks.as_array().unwrap();
    assert_eq!(
        tasks.len(),
        subscribers.len(),
        "every subscriber was targeted"
    );

    let events = city.events();
    let pressed = numbers_that_pressed(&events);
    let by_number = events_by_number(&events);
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        let phone = t["phone"].as_str().unwrap();
        let state = t["state"].as_str().unwrap();
        *states.entry(state.to_string()).or_default() += 1;
        assert!(
            !matches!(state, "pending" | "in_flight"),
            "{phone} left in {state}"
        );
        let calls = by_number.get(phone).map(Vec::len).unwrap_or(0);
        assert!(
            calls > 0,
            "{phone} ended {state} but the city never saw a call"
        );
        if state == "confirmed" {
            assert!(
                pressed.contains(phone),
                "{phone} confirmed but its phone never pressed 1"
            );
        } else {
            assert!(
                !pressed.contains(phone),
                "{phone} pressed 1 but ended {state}"
            );
        }
        if state == "invalid" {
            let rejected_404 = by_number[phone]
                .iter()
                .any(|e| e["event"] == "reject" && e["code"] == 404);
            assert!(
                rejected_404,
                "{phone} marked invalid without a 404 from the city"
            );
        }
    }
    let counts = &done["counts"];
    assert_eq!(
        counts["confirmed"].as_u64().unwrap() as usize,
        pressed.len()
    );
    assert_eq!(counts["targeted"], 200);
    assert_eq!(counts["pending"], 0);
    assert_eq!(counts["in_flight"], 0);
    // A realistic city with retries reaches most people; a broken dialer would not.
    assert!(
        pressed.len() >= 150,
        "only {} of 200 confirmed: {states:?}",
        pressed.len()
    );
    eprintln!("final states: {states:?}");

    // 503s from the overloaded carrier back off the trunk and are not the citizens' attempts.
    let invites = events.iter().filter(|e| e["event"] == "invite").count() as u64;
    let overloads = events
        .iter()
        .filter(|e| e["event"] == "reject" && e["code"] == 503)
        .count() as u64;
    assert!(
        overloads > 0,
        "the realistic city sent no 503, so the trunk gate went untested"
    );
    assert_eq!(
        counts["attempts"].as_u64().unwrap(),
        invites - overloads,
        "{done}"
    );
    // After a 503 with Retry-After: 1 the whole trunk pauses: no new INVITE reaches the city until the
    // second is over (100 ms of slack for calls that were already on their way when the 503 arrived).
    let invite_times: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "invite")
        .filter_map(|e| e["t_ms"].as_u64())
        .collect();
    for e in events
        .iter()
        .filter(|e| e["event"] == "reject" && e["code"] == 503)
    {
        let t = e["t_ms"].as_u64().unwrap();
        let during = invite_times
            .iter()
            .filter(|i| **i > t + 100 && **i < t + 950)
            .count();
        assert_eq!(
            during, 0,
            "{during} INVITEs reached the city during the pause after the 503 at {t}"
        );
    }

    // The metrics endpoint is valid Prometheus text according to promtool.
    let metrics = node.text("/metrics").unwrap();
    assert!(
        metrics.contains(&format!(
            "campanile_trunk_rejections_total{{code=\"503\"}} {overloads}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("campanile_calls_total"), "{metrics}");
    let check = promtool_check(&metrics);
    assert!(check.is_empty(), "promtool check metrics: {check}");
    check_answer_rate_metrics(&metrics, id, counts, pressed.len() as f64, overloads as f64);
}

/// Issue 5's answer-rate series: per campaign and tenant, per trunk, takeovers; with values that
/// agree with the campaign's counts and with this (only) node's own calls.
fn check_answer_rate_metrics(
    metrics: &str,
    id: u64,
    counts: &serde_json::Value,
    pressed: f64,
    overloads: f64,
) {
    let campaign = id.to_string();
    let of_campaign = [("campaign", campaign.as_str()), ("tenant", "default")];
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(metrics, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{metrics}"))
    };
    let attempts = counts["attempts"].as_f64().unwrap();
    let answered = counts["answered"].as_f64().unwrap();
    let confirmed = counts["confirmed"].as_f64().unwrap();

    // Cluster-wide gauges from the replicated state.
    let ratio = get("campanile_campaign_answer_ratio", &of_campaign);
    assert!(
        (ratio - answered / attempts).abs() < 1e-9,
        "answer ratio {ratio}"
    );
    let ratio = get("campanile_campaign_confirmed_ratio", &of_campaign);
    assert!(
        (ratio - confirmed / 200.0).abs() < 1e-9,
        "confirmed ratio {ratio}"
    );
    let per = get("campanile_campaign_attempts_per_confirmed", &of_campaign);
    assert!(
        per >= 1.0 && (per - attempts / confirmed).abs() < 1e-9,
        "attempts per confirmed {per}"
    );
    let mut with_state = of_campaign.to_vec();
    with_state.push(("state", "confirmed"));
    assert_eq!(get("campanile_campaign_tasks", &with_state), confirmed);

    // This node's calls of the campaign, by outcome: every INVITE the city saw ended in one.
    let by_outcome = |outcome: &str| {
        let mut l = of_campaign.to_vec();
        l.push(("outcome", outcome));
        sample(metrics, "campanile_campaign_calls_total", &l).unwrap_or(0.0)
    };
    assert_eq!(by_outcome("confirmed"), pressed);
    assert_eq!(by_outcome("trunk_rejected"), overloads);
    let all_calls = sum_of(metrics, "campanile_campaign_calls_total", &of_campaign);
    assert_eq!(
        all_calls,
        attempts + overloads,
        "calls by outcome\n{metrics}"
    );

    // Histograms: one time to confirm per confirmed call; a time to answer for every call whose
    // outcome says when it was answered (confirmed, hung up).
    let to_confirm = get(
        "campanile_campaign_time_to_confirm_seconds_count",
        &of_campaign,
    );
    assert_eq!(to_confirm, by_outcome("confirmed"));
    assert_eq!(
        get("campanile_calls_total", &[("outcome", "confirmed")]),
        to_confirm,
        "the node's own confirmed calls"
    );
    let to_answer = get(
        "campanile_campaign_time_to_answer_seconds_count",
        &of_campaign,
    );
    // Every answered call is timed, whatever came of it.
    let answered: f64 = [
        "confirmed",
        "heard",
        "not_confirmed",
        "hung_up",
        "voicemail",
        "opt_out",
    ]
    .iter()
    .map(|o| by_outcome(o))
    .sum();
    assert_eq!(to_answer, answered);
    let mut inf = of_campaign.to_vec();
    inf.push(("le", "+Inf"));
    assert_eq!(
        get("campanile_campaign_time_to_answer_seconds_bucket", &inf),
        to_answer
    );
    let answer_sum = get(
        "campanile_campaign_time_to_answer_seconds_sum",
        &of_campaign,
    );
    // Phones ring at most ring_timeout_s = 4 s before the node gives up.
    assert!(
        answer_sum > 0.0 && answer_sum <= to_answer * 5.0,
        "time to answer sum {answer_sum}"
    );

    // Per node: the trunk's channels, and takeovers (none without a failure).
    let in_use = get("campanile_trunk_channels_in_use", &[("trunk", "sim")]);
    assert!((0.0..=60.0).contains(&in_use), "channels in use {in_use}");
    assert_eq!(
        get("campanile_trunk_channels_max", &[("trunk", "sim")]),
        60.0
    );
    for result in ["resumed", "redialled", "failed"] {
        assert_eq!(get("campanile_takeovers_total", &[("result", result)]), 0.0);
    }
}

/// The value of the series `name` carrying (at least) `labels`, in the text exposition format.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    series(metrics, name, labels).next()
}

/// The sum over every series `name` carrying (at least) `labels`.
fn sum_of(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    series(metrics, name, labels).sum()
}

fn series<'a>(
    metrics: &'a str,
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = f64> + 'a {
    metrics.lines().filter_map(move |line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, rest) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let has = |(k, v): &(&str, &str)| rest.split(',').any(|p| p == format!("{k}=\"{v}\""));
        labels.iter().all(has).then(|| value.parse().ok())?
    })
}

/// Runs `promtool check metrics` on `text`; returns its complaints (empty when clean).
fn promtool_check(text: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed by the test command (Debian package prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    if out.status.success() && s.trim().is_empty() {
        String::new()
    } else {
        format!("exit {}: {s}", out.status)
    }
}

/// `[media] pacer_send = "sendto"` (for hosts where one system call a packet has the shorter
/// lateness tail, BENCHMARKS.md): the node says so at start, and its calls' audio reaches the
/// phones, which press 1 only after hearing 3 s of it.
#[test]
fn a_node_told_to_send_rtp_with_sendto_plays_every_message() {
    let dir = test_dir();
    let (node, _city) = campaign_sending_with(dir.path(), "sendto", "one sendto per datagram");
    let log = node.proc.log_text();
    assert!(!log.contains("io_uring"), "{log}");
    pacer_metrics_and_alert_series_are_exported(&node);
}

/// `[media] pacer_send = "raw"`: the node (root here, so allowed a raw socket) writes every RTP
/// datagram's IPv4 and UDP headers itself, from each call's own port; the phones still hear the
/// message and press 1, and their keys come back to the calls' sockets.
#[test]
fn a_node_told_to_send_rtp_through_a_raw_socket_plays_every_message() {
    let dir = test_dir();
    let (node, _city) = campaign_sending_with(dir.path(), "raw", "a raw IPv4 socket");
    let log = node.proc.log_text();
    assert!(!log.contains("cannot open a raw socket"), "{log}");
}

/// A node with `pacer_send = path` calls 20 citizens of an `always-answer` city (each phone presses 1
/// only after hearing 3 s of audio): all confirmed, every phone pressed 1, and the node's log says
/// it sends with `says`.
fn campaign_sending_with(dir: &std::path::Path, path: &str, says: &str) -> (NodeProc, SimCityProc) {
    let city = SimCityProc::start(dir, "always-answer", 17).unwrap();
    let config = format!(
        "{}\n[media]\npacer_send = \"{path}\"\n",
        fast_node_config(10)
    );
    let node = NodeProc::start(dir, &config, &format!("sip:{}", city.addr)).unwrap();
    let subscribers = node.register(1, 20).unwrap();
    let id = node.start_campaign(json!({})).unwrap();
    let done = node
        .wait_campaign_done(id, Duration::from_secs(120))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(done["counts"]["confirmed"], subscribers.len(), "{done}");
    let pressed = numbers_that_pressed(&city.events());
    assert_eq!(
        pressed.len(),
        subscribers.len(),
        "every phone heard and pressed 1"
    );
    let log = node.proc.log_text();
    assert!(
        log.contains(&format!("threads sending with {says}")),
        "the node does not say it sends with {path}:\n{log}"
    );
    (node, city)
}

/// After a campaign: the pacer's figures in the metrics, valid for promtool, and every series
/// the shipped alert rules query.
fn pacer_metrics_and_alert_series_are_exported(node: &NodeProc) {
    // The pacer's figures in the metrics, valid for promtool: every packet sent counted once in
    // the lateness histogram, and nothing playing once the pacer has dropped the calls' stopped
    // streams (at each one's next phase, on a busy machine a moment after the campaign completes).
    let read = |metrics: &str, name: &str| -> Option<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    let metrics = wait_for("the calls' streams to end", Duration::from_secs(60), || {
        let m = node.text("/metrics").ok()?;
        (read(&m, "campanile_rtp_streams")? == 0.0).then_some(m)
    })
    .unwrap();
    let value = |name: &str| -> f64 {
        read(&metrics, name).unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    let sent = value("campanile_rtp_packets_sent_total");
    // 20 calls, each heard for at least 3 s (150 packets) before its phone pressed 1.
    assert!(sent >= 3000.0, "{sent} packets sent");
    assert_eq!(value("campanile_rtp_lateness_seconds_count"), sent);
    assert!(value("campanile_rtp_lateness_seconds_bucket{le=\"0.05\"}") <= sent);
    assert_eq!(value("campanile_rtp_streams"), 0.0);
    let check = promtool_check(&metrics);
    assert!(check.is_empty(), "promtool check metrics: {check}");

    // Every series the shipped alert rules query is one this node exports.
    let rules = std::fs::read_to_string(alert_rules()).unwrap();
    // An `expr:` line and the lines indented below it (a block scalar).
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut expr_indent = None;
    let expressions = rules.lines().filter(|l| {
        if l.trim_start().starts_with("expr:") {
            expr_indent = Some(indent(l));
        } else if expr_indent.is_some_and(|i| indent(l) <= i) {
            expr_indent = None;
        }
        expr_indent.is_some()
    });
    let queried: std::collections::BTreeSet<&str> = expressions
        .flat_map(|l| l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| w.starts_with("campanile_"))
        .collect();
    assert_eq!(queried.len(), 9, "{queried:?}");
    // A series only members of a cluster export, read back from a real cluster's /metrics by
    // `cluster_operations::a_member_whose_clock_is_off_is_reported_until_it_agrees_again`.
    let clustered = ["campanile_peer_clock_offset_seconds"];
    for name in queried.into_iter().filter(|n| !clustered.contains(n)) {
        assert!(
            metrics.lines().any(|l| l.starts_with(name)),
            "the alert rules query {name}, which the node does not export"
        );
    }
}

/// The alerting rules shipped for SREs (`deploy/prometheus`).
fn alert_rules() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/prometheus/campanile-alerts.yml")
}

/// The shipped alerting rules load in Prometheus (`promtool check rules`) and fire, and stay
/// quiet, as their unit tests say (`promtool test rules`: a node down, a trunk down, RTP late at
/// one node of three, a campaign whose calls are not answered, SIP traffic for no call shed, a
/// node that stopped running for more than a second, a member whose clock is off).
#[test]
fn the_shipped_alert_rules_pass_promtool_and_their_unit_tests() {
    let rules = alert_rules();
    let tests = rules.with_file_name("campanile-alerts.test.yml");
    for args in [
        ["check", "rules", rules.to_str().unwrap()],
        ["test", "rules", tests.to_str().unwrap()],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .output()
            .expect("promtool is installed by the test command (Debian package prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
