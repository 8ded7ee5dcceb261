//! Issue 5, distributed dialing, with three real `campanile up` processes and the simulated city as
//! ground truth:
//! - 5,000 subscribers, every node dials its share (partition leases): the city sees INVITEs from
//!   all three nodes, every subscriber ends final, `confirmed` exactly where the city logged a 1,
//!   and no phone ever has two calls up at once;
//! - shares follow each node's trunk capacity;
//! - a non-leader SIGKILLed mid-campaign, and the leader in another run: its partitions go to the
//!   others, every subscriber still ends final, the only overlapping calls are ones the killed node
//!   had up (at most its channel count), and the calls it had answered go on under the same Call-ID
//!   from another node (a re-INVITE) with less than 2 s of silence on the phone;
//! - a node stopped with SIGTERM (the leader, or a follower) hands its answered calls over at once
//!   and hangs up on nobody who is listening, not even a phone picked up as its CANCEL went out.

use std::collections::BTreeSet;
use std::time::Duration;

use campanile_chaos_tests::*;
use serde_json::{json, Value};

/// Channels per node of the failure tests (the bound on calls a lost node can leave behind).
fn channels() -> usize {
    20
}

/// Subscribers of the shared-city test: the 5,000 (about three minutes on 3 × 200
/// channels); `CAMPANILE_CITY_SUBSCRIBERS` changes it.
fn city_size() -> u32 {
    env_number("CAMPANILE_CITY_SUBSCRIBERS").unwrap_or(5_000)
}

/// Channels per node of the shared-city test: enough for its 5,000 citizens.
fn city_channels() -> usize {
    env_number("CAMPANILE_CITY_CHANNELS").unwrap_or(200)
}

fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

fn retry() -> Value {
    json!({ "max_attempts": 5, "busy_delay_s": 1.0, "no_answer_delay_s": 2.0, "failure_delay_s": 1.0 })
}

/// A cluster of one node per entry of `channels` (its trunk's channels), all voters.
fn start_nodes(dir: &std::path::Path, city: &SimCityProc, channels: &[usize]) -> Vec<NodeProc> {
    let plan = ClusterPlan::new(dir, channels.len()).unwrap();
    let trunk = format!("sip:{}", city.addr);
    let nodes: Vec<NodeProc> = channels
        .iter()
        .zip(1..)
        .map(|(c, id)| plan.start(id, &fast_node_config(*c), &trunk).unwrap())
        .collect();
    wait_voters(&nodes[0], channels.len(), Duration::from_secs(60)).unwrap();
    nodes
}

/// Partitions each member holds, in member order, as `node` sees the cluster.
fn leases_held(node: &NodeProc) -> Option<Vec<u64>> {
    let v = cluster_view(node)?;
    Some(
        v["members"]
            .as_array()?
            .iter()
            .filter_map(|m| m["leases"].as_u64())
            .collect(),
    )
}

fn start_three(dir: &std::path::Path, city: &SimCityProc, channels: usize) -> Vec<NodeProc> {
    let nodes = start_nodes(dir, city, &[channels; 3]);
    // Every node holds a share of the 256 partitions.
    wait_for("leases on every node", Duration::from_secs(30), || {
        let held = leases_held(&nodes[0])?;
        (held.len() == 3 && held.iter().all(|h| *h >= 60) && held.iter().sum::<u64>() == 256)
            .then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nnode 1's log:\n{}",
            nodes[0]
                .proc
                .log_text()
                .lines()
                .filter(|l| l.contains("lease"))
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    nodes
}

/// The nodes' log lines about leases and takeovers, for a failure's message: what went wrong with
/// a run that had no fault injected is usually a lapse under load.
fn trouble(nodes: &[NodeProc]) -> Vec<String> {
    const SIGNS: [&str; 10] = [
        "not scheduled",
        "ran no task",
        "lapsed",
        "cannot renew",
        "took",
        "let go",
        "silent for",
        "taking over",
        "continuing",
        "could not take",
    ];
    node_lines(nodes, |l| SIGNS.iter().any(|s| l.contains(s)))
}

/// The failure tests' setup: the realistic city (`seed`), three nodes of `channels()` channels,
/// 300 subscribers and a campaign started; answers the city, the nodes and the campaign's id.
fn small_campaign(dir: &std::path::Path, seed: u64) -> (SimCityProc, Vec<NodeProc>, u64) {
    let city = SimCityProc::start(dir, "realistic", seed).unwrap();
    let nodes = start_three(dir, &city, channels());
    nodes[0].import(1, 300).unwrap();
    let id = nodes[0].start_campaign(retry()).unwrap();
    (city, nodes, id)
}

/// A node with twice the trunk channels is given twice the partitions (and so twice the citizens).
#[test]
fn partitions_follow_each_node_s_trunk_capacity() {
    let dir = test_dir();
    let city = SimCityProc::start(dir.path(), "realistic", 12).unwrap();
    let nodes = start_nodes(dir.path(), &city, &[20, 40, 20]);
    let held = wait_for("leases by capacity", Duration::from_secs(30), || {
        let held = leases_held(&nodes[0])?;
        // Partitions granted before every node's first heartbeat may sit with the first node
        // until the surplus is released; wait for the steady state.
        (held.len() == 3
            && held.iter().sum::<u64>() == 256
            && held[1] >= 126
            && held[0] <= 65
            && held[2] <= 65)
            .then_some(held)
    })
    .unwrap();
    eprintln!("partitions held by capacity 20/40/20: {held:?}");
}

/// What the city and the nodes' logs say about the citizen at `phone`, for a failure's message.
fn story(events: &[Value], nodes: &[NodeProc], phone: &str, tasks: &[Value]) -> String {
    let t0 = events.first().and_then(|e| e["t_ms"].as_u64()).unwrap_or(0);
    let id = tasks
        .iter()
        .find(|t| t["phone"] == phone)
        .and_then(|t| t["subscriber"].as_u64());
    format!(
        "{phone} in the city (ms since its first event):\n{}\n{phone} in the nodes' logs:\n{}",
        city_story(events, phone, t0).join("\n"),
        id.map(|id| node_lines_about(nodes, id).join("\n"))
            .unwrap_or_default()
    )
}

fn tasks(node: &NodeProc, id: u64) -> Vec<Value> {
    let (status, tasks) = node.get(&format!("/api/v1/campaigns/{id}/tasks")).unwrap();
    assert_eq!(status, 200, "{tasks}");
    tasks.as_array().unwrap().clone()
}

#[test]
fn three_nodes_share_the_city_and_agree_with_its_log() {
    let dir = test_dir();
    let city = SimCityProc::start(dir.path(), "realistic", 11).unwrap();
    let nodes = start_three(dir.path(), &city, city_channels());
    let size = city_size();
    nodes[2].import(1, size).unwrap();
    let id = nodes[1].start_campaign(retry()).unwrap();
    let done = nodes[0]
        .wait_campaign_done(id, Duration::from_secs(600 + u64::from(size) / 5))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");

    let events = city.events();
    let pressed = numbers_that_pressed(&events);
    let tasks = tasks(&nodes[2], id);
    assert_eq!(tasks.len(), size as usize);
    for t in &tasks {
        let (phone, state) = (t["phone"].as_str().unwrap(), t["state"].as_str().unwrap());
        assert!(
            !matches!(state, "pending" | "in_flight"),
            "{phone} left {state}"
        );
        if (state == "confirmed") != pressed.contains(phone) {
            panic!(
                "{phone} ended {state}; pressed 1 per the city: {}\ntask: {t}\n{}\nnodes: {:?}",
                pressed.contains(phone),
                story(&events, &nodes, phone, &tasks),
                trouble(&nodes)
            );
        }
    }
    // All three nodes dialled.
    let senders: BTreeSet<String> = events
        .iter()
        .filter(|e| e["event"] == "invite")
        .filter_map(|e| e["from"].as_str().map(str::to_string))
        .collect();
    for n in &nodes {
        assert!(
            senders.contains(&n.sip.to_string()),
            "node at {} placed no call; callers: {senders:?}",
            n.sip
        );
    }
    let overlaps = overlapping_calls(&events);
    if !overlaps.is_empty() {
        let first: Vec<_> = overlaps.iter().take(3).collect();
        let stories: Vec<String> = first
            .iter()
            .map(|(n, _, _)| story(&events, &nodes, n, &tasks))
            .collect();
        panic!(
            "phones with two calls at once: {first:?}\n{}\nnodes: {:?}",
            stories.join("\n"),
            trouble(&nodes)
        );
    }
    // No node had more calls up than its trunk's channels, though each starts a few tasks ahead.
    let peaks = peak_calls_by_caller(&events);
    assert_eq!(peaks.len(), 3, "{peaks:?}");
    for (node, peak) in &peaks {
        assert!(
            *peak <= city_channels(),
            "{node} had {peak} calls up at once, more than its {} channels",
            city_channels()
        );
    }
    // Nor started more calls in a second than its trunk's calls-per-second limit. The city logs
    // when an INVITE arrived, and a sender woken a little late can bring two INVITEs sent a second
    // apart closer: windows of 900 ms leave 100 ms for that.
    let busiest = busiest_window_by_caller(&events, 900);
    assert_eq!(busiest.len(), 3, "{busiest:?}");
    for (node, calls) in &busiest {
        assert!(
            *calls <= TEST_CALLS_PER_SECOND,
            "{node} started {calls} calls within 900 ms, over its limit of {TEST_CALLS_PER_SECOND} a second"
        );
    }
    eprintln!("most calls a node started within 900 ms: {busiest:?}");
    // Progress per node in the API adds up to the campaign's, and every node has a share.
    let by_node = done["by_node"].as_object().unwrap();
    assert_eq!(by_node.len(), 3, "{done}");
    for field in ["attempts", "answered", "confirmed"] {
        let sum: u64 = by_node.values().map(|p| p[field].as_u64().unwrap()).sum();
        assert_eq!(
            sum,
            done["counts"][field].as_u64().unwrap(),
            "{field}: {done}"
        );
    }
    assert!(
        by_node.values().all(|p| p["attempts"].as_u64() > Some(0)),
        "{done}"
    );
}

#[test]
fn a_node_killed_mid_campaign_hands_its_partitions_and_its_answered_calls_over() {
    kill_mid_campaign(false);
}

#[test]
fn the_leader_killed_mid_campaign_hands_its_partitions_and_its_answered_calls_over() {
    kill_mid_campaign(true);
}

/// The node to lose (the leader, or a follower) and another to watch from, as indexes of `nodes`.
fn victim_and_witness(nodes: &[NodeProc], leader: bool) -> (usize, usize) {
    let leader_id = cluster_view(&nodes[0]).unwrap()["leader"].as_u64().unwrap() as usize;
    let victim = if leader {
        leader_id - 1
    } else {
        (0..3).find(|i| *i + 1 != leader_id).unwrap()
    };
    (victim, (0..3).find(|i| *i != victim).unwrap())
}

/// As `node` sees the cluster, the member at index `at` holds no partition.
fn assert_holds_nothing(node: &NodeProc, at: usize) {
    let view = cluster_view(node).unwrap();
    let leases = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == at as u64 + 1)
        .and_then(|m| m["leases"].as_u64());
    assert_eq!(leases, Some(0), "{view}");
}

/// SIGKILLs one node (the leader, or a follower) once it has calls up, and checks what follows.
fn kill_mid_campaign(leader: bool) {
    let dir = test_dir();
    let (city, mut nodes, id) = small_campaign(dir.path(), 12);
    let (victim_at, witness) = victim_and_witness(&nodes, leader);
    let victim = nodes[victim_at].sip.to_string();
    wait_for("the victim on the phone", Duration::from_secs(60), || {
        let events = city.events();
        (events
            .iter()
            .filter(|e| e["event"] == "answer" && e["from"] == victim.as_str())
            .count()
            >= 5)
            .then_some(())
    })
    .unwrap();
    let killed_ms = now_ms();
    nodes[victim_at].kill();
    let done = nodes[witness]
        .wait_campaign_done(id, Duration::from_secs(600))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");

    // Its partitions went to the survivors.
    assert_holds_nothing(&nodes[witness], victim_at);

    let (overlaps, pressed) = check_outcomes_after_losing(&nodes[witness], id, &city, &victim);
    let (up, taken, gaps) = check_takeovers(&city.events(), &victim, killed_ms);
    assert!(
        up > 0,
        "the victim had no answered call up when it was killed"
    );
    assert!(taken > 0, "none of {up} answered calls was taken over");
    eprintln!(
        "{overlaps} overlapping calls after the SIGKILL; {pressed} numbers pressed 1; \
         {taken} of {up} answered calls taken over, silences {gaps:?} ms"
    );
}

#[test]
fn a_node_stopped_mid_campaign_hands_its_answered_calls_over_and_hangs_up_on_nobody() {
    stop_mid_campaign(false);
}

#[test]
fn the_leader_stopped_mid_campaign_hands_its_answered_calls_over_and_hangs_up_on_nobody() {
    stop_mid_campaign(true);
}

/// Stops one node (the leader, or a follower) with SIGTERM, as systemd does for a rolling upgrade,
/// once it has calls up, in a city where everyone answers and presses 1 after a few seconds of the
/// message: the node exits by itself and successfully; every call it had answered goes on under
/// the same Call-ID from another node, or ends after the citizen's 1, never with a BYE from the
/// stopped node in the middle of the message; nobody who was listening is called again; every
/// citizen ends confirmed, and the stopped node holds no partition.
fn stop_mid_campaign(leader: bool) {
    let dir = test_dir();
    let profile = dir.path().join("listeners.toml");
    std::fs::write(
        &profile,
        "answer = 1.0\nanswer_delay_ms = [300, 1500]\npress_on_time = 1.0\n\
         press_after_ms = [4000, 8000]\n",
    )
    .unwrap();
    let city = SimCityProc::start(dir.path(), &profile.display().to_string(), 21).unwrap();
    let mut nodes = start_three(dir.path(), &city, channels());
    nodes[0].import(1, 200).unwrap();
    let id = nodes[0].start_campaign(retry()).unwrap();
    let (victim_at, witness) = victim_and_witness(&nodes, leader);
    let victim = nodes[victim_at].sip.to_string();
    wait_for("the victim with calls up", Duration::from_secs(60), || {
        let events = city.events();
        (answered_calls_up(&events, &victim, now_ms().saturating_sub(500), now_ms()).len() >= 5)
            .then_some(())
    })
    .unwrap();
    let (stopped_ms, _, last_words) = stop_and_finish(&mut nodes, victim_at, witness, id);
    assert_holds_nothing(&nodes[witness], victim_at);

    let events = city.events();
    let (up, taken, gaps) = check_takeovers(&events, &victim, stopped_ms);
    assert!(up > 0, "the stopped node had no answered call up");
    let listening = answered_calls_up(&events, &victim, stopped_ms.saturating_sub(500), stopped_ms);
    for call in &listening {
        let of_call: Vec<&Value> = events.iter().filter(|e| e["call_id"] == *call).collect();
        let pressed = of_call.iter().position(|e| e["event"] == "dtmf");
        let cut = of_call.iter().position(|e| {
            e["event"] == "bye_received"
                && e["from"] == victim.as_str()
                && e["t_ms"].as_u64().is_some_and(|t| t >= stopped_ms)
        });
        if let Some(cut) = cut {
            assert!(
                pressed.is_some_and(|p| p < cut),
                "{call}: hung up by the stopped node before the citizen pressed 1 \
                 (stopped at {stopped_ms}; its log: {last_words:#?}): {of_call:#?}"
            );
        }
        let number = of_call[0]["number"].as_str().unwrap();
        let answers = events
            .iter()
            .filter(|e| e["event"] == "answer" && e["number"] == number)
            .count();
        assert_eq!(answers, 1, "{number} was called again after {call}");
    }
    eprintln!("{taken} of {up} answered calls handed over on SIGTERM, silences {gaps:?} ms");
}

/// A node stopped with SIGTERM cancels its calls that still ring; a phone picked up just as that
/// CANCEL arrives (its 200 OK crosses the CANCEL, RFC 3261 §9.2) has a citizen listening. In a city
/// where every phone answers its caller's CANCEL (`answer_on_cancel`; the nodes' ring timeout is
/// 4 s, so some answers cross a ring timeout's CANCEL too): each call the stopping node's CANCELs
/// turned into an answer goes on from another node (a re-INVITE), the stopping node never hangs up
/// on it before the citizen's 1, nobody is called twice, and every citizen ends confirmed.
#[test]
fn a_phone_answered_as_the_stopping_node_cancels_is_handed_over_not_hung_up() {
    let dir = test_dir();
    let profile = dir.path().join("cancel-answerers.toml");
    std::fs::write(
        &profile,
        "answer = 1.0\nanswer_delay_ms = [20000, 20000]\nanswer_on_cancel = true\n\
         press_on_time = 1.0\npress_after_ms = [3000, 5000]\n",
    )
    .unwrap();
    let city = SimCityProc::start(dir.path(), &profile.display().to_string(), 23).unwrap();
    let mut nodes = start_three(dir.path(), &city, channels());
    nodes[0].import(1, 90).unwrap();
    let id = nodes[0].start_campaign(retry()).unwrap();
    let (victim_at, witness) = victim_and_witness(&nodes, false);
    let victim = nodes[victim_at].sip.to_string();
    wait_for(
        "the victim with phones ringing",
        Duration::from_secs(60),
        || (ringing_calls(&city.events(), &victim).len() >= 3).then_some(()),
    )
    .unwrap();
    let (stopped_ms, exited_ms, last_words) = stop_and_finish(&mut nodes, victim_at, witness, id);

    let events = city.events();
    let crossed: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "answer" && e["from"] == victim.as_str())
        .filter(|e| e["crossed_cancel"] == true)
        .filter(|e| {
            e["t_ms"]
                .as_u64()
                .is_some_and(|t| (stopped_ms..=exited_ms).contains(&t))
        })
        .collect();
    assert!(
        !crossed.is_empty(),
        "no phone answered the stopping node's CANCEL (its log: {last_words:#?})"
    );
    for answer in &crossed {
        let call = answer["call_id"].as_str().unwrap();
        let of_call: Vec<&Value> = events.iter().filter(|e| e["call_id"] == call).collect();
        let taken = of_call
            .iter()
            .any(|e| e["event"] == "reinvite" && e["from"] != victim.as_str());
        let pressed = of_call.iter().position(|e| e["event"] == "dtmf");
        let cut = of_call
            .iter()
            .position(|e| e["event"] == "bye_received" && e["from"] == victim.as_str());
        assert!(
            taken && cut.is_none_or(|c| pressed.is_some_and(|p| p < c)),
            "{call}: answered as the stopping node cancelled, not handed over (its log: \
             {last_words:#?}): {of_call:#?}"
        );
        let number = answer["number"].as_str().unwrap();
        let answers = events
            .iter()
            .filter(|e| e["event"] == "answer" && e["number"] == number)
            .count();
        assert_eq!(answers, 1, "{number} was called again after {call}");
    }
    eprintln!(
        "{} calls answered as the stopping node cancelled them, all handed over",
        crossed.len()
    );
}

/// Stops `nodes[victim_at]` with SIGTERM; it exits by itself and successfully, and the campaign
/// `id` completes (as `witness` sees it) with every citizen confirmed. Answers when the stop was
/// sent, when the node had exited, and the stopped node's log lines about stopping.
fn stop_and_finish(
    nodes: &mut [NodeProc],
    victim_at: usize,
    witness: usize,
    id: u64,
) -> (u64, u64, Vec<String>) {
    let stopped_ms = now_ms();
    nodes[victim_at].proc.terminate();
    let status = nodes[victim_at]
        .proc
        .wait_exit(Duration::from_secs(30))
        .unwrap();
    assert!(status.success(), "the stopped node exited with {status}");
    let exited_ms = now_ms();
    let done = nodes[witness]
        .wait_campaign_done(id, Duration::from_secs(600))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    for t in tasks(&nodes[witness], id) {
        assert_eq!(t["state"], "confirmed", "{t}");
    }
    let last_words = nodes[victim_at]
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("stopping"))
        .map(String::from)
        .collect();
    (stopped_ms, exited_ms, last_words)
}

/// The calls `caller` has ringing: a phone that rang and has not answered or ended.
fn ringing_calls(events: &[Value], caller: &str) -> BTreeSet<String> {
    let of = |names: &[&str]| -> BTreeSet<String> {
        events
            .iter()
            .filter(|e| e["from"] == caller)
            .filter(|e| e["event"].as_str().is_some_and(|n| names.contains(&n)))
            .filter_map(|e| e["call_id"].as_str().map(String::from))
            .collect()
    };
    let rang = of(&["ringing"]);
    let over = of(&["answer", "cancel", "reject", "bye_received", "bye_sent"]);
    rang.difference(&over).cloned().collect()
}

/// The calls `victim` had answered and up when it was killed (`killed_ms`): each went on under the
/// same Call-ID from another node (a re-INVITE), none was left to die of silence, and where the
/// message was still playing the phone heard less than 2 s of silence. Answers how many calls were
/// up, how many were taken over, and the silences.
fn check_takeovers(events: &[Value], victim: &str, killed_ms: u64) -> (usize, usize, Vec<u64>) {
    // A call answered in the last moments before the kill may not have been committed yet (the
    // dialer records in batches of 20 ms): nobody can know of it, and its citizen is called again.
    let up = answered_calls_up(events, victim, killed_ms.saturating_sub(500), killed_ms);
    let mut gaps = Vec::new();
    for call in &up {
        let of_call: Vec<&Value> = events.iter().filter(|e| e["call_id"] == *call).collect();
        let taken = of_call
            .iter()
            .position(|e| e["event"] == "reinvite" && e["from"] != victim);
        let Some(taken) = taken else {
            // Not taken over: only acceptable if the call ended by itself around the kill (the
            // citizen hung up), never by the phone giving up on silence.
            let gave_up = of_call
                .iter()
                .any(|e| e["event"] == "bye_sent" && e["reason"] == "media_timeout");
            assert!(!gave_up, "{call} died of silence: {of_call:#?}");
            continue;
        };
        assert!(
            of_call[taken..]
                .iter()
                .any(|e| matches!(e["event"].as_str(), Some("bye_received" | "bye_sent"))),
            "{call} never ended after the takeover: {of_call:#?}"
        );
        if let Some(gap) = of_call[taken..]
            .iter()
            .find(|e| e["event"] == "media_gap")
            .and_then(|e| e["gap_ms"].as_u64())
        {
            assert!(gap < 2_000, "{call}: {gap} ms of silence: {of_call:#?}");
            gaps.push(gap);
        }
    }
    let taken = up
        .iter()
        .filter(|c| {
            events
                .iter()
                .any(|e| e["call_id"] == **c && e["event"] == "reinvite" && e["from"] != victim)
        })
        .count();
    gaps.sort_unstable();
    (up.len(), taken, gaps)
}

/// After a campaign lost a node (`victim`, its SIP address) mid-way: every task is final, `confirmed`
/// exactly where the city logged a 1 (a 1 pressed on a call of the lost node may not have reached the
/// cluster), and the only phones with two calls at once had one from the lost node, no more than its
/// channels. Answers the number of overlapping calls and of numbers that pressed 1.
fn check_outcomes_after_losing(
    node: &NodeProc,
    id: u64,
    city: &SimCityProc,
    victim: &str,
) -> (usize, usize) {
    let events = city.events();
    let pressed = numbers_that_pressed(&events);
    let by_number = calls_by_number(&events);
    for t in tasks(node, id) {
        let (phone, state) = (t["phone"].as_str().unwrap(), t["state"].as_str().unwrap());
        assert!(
            !matches!(state, "pending" | "in_flight"),
            "{phone} left {state}"
        );
        if state == "confirmed" {
            assert!(pressed.contains(phone), "{phone} confirmed without a 1");
        } else if pressed.contains(phone) {
            let on_victim = by_number[phone].iter().any(|c| c.from == victim);
            let of_phone: Vec<&Value> = events.iter().filter(|e| e["number"] == phone).collect();
            assert!(
                on_victim,
                "{phone} pressed 1 but ended {state}: {t:#}\nthe city's log: {of_phone:#?}"
            );
        }
    }
    let overlaps = overlapping_calls(&events);
    for (number, a, b) in &overlaps {
        assert!(
            a.from == victim || b.from == victim,
            "{number}: overlapping calls {a:?} and {b:?} without the lost node"
        );
    }
    assert!(
        overlaps.len() <= channels(),
        "{} overlapping calls, more than the lost node's {} channels",
        overlaps.len(),
        channels()
    );
    (overlaps.len(), pressed.len())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn invites_after(city: &SimCityProc, t_ms: u64) -> Vec<Value> {
    city.events()
        .into_iter()
        .filter(|e| e["event"] == "invite" && e["t_ms"].as_u64().is_some_and(|t| t > t_ms))
        .collect()
}

/// Waits until the campaign has no call in flight and no node has a call up (every dialer has seen
/// the change and hung up); returns the campaign.
fn wait_quiet(nodes: &[NodeProc], id: u64) -> Value {
    wait_for("every node quiet", Duration::from_secs(60), || {
        let idle = nodes.iter().all(|n| {
            n.text("/metrics")
                .ok()
                .is_some_and(|m| m.lines().any(|l| l.trim() == "campanile_calls_in_flight 0"))
        });
        let (_, c) = nodes[0].get(&format!("/api/v1/campaigns/{id}")).ok()?;
        (idle && c["counts"]["in_flight"] == 0).then_some(c)
    })
    .unwrap()
}

#[test]
fn pause_and_cancel_stop_every_node_within_a_second() {
    let dir = test_dir();
    let city = SimCityProc::start(dir.path(), "always-answer", 13).unwrap();
    let nodes = start_three(dir.path(), &city, channels());
    nodes[0].import(1, 600).unwrap();
    let id = nodes[0].start_campaign(retry()).unwrap();
    wait_for("calls from every node", Duration::from_secs(60), || {
        let senders: BTreeSet<String> = city
            .events()
            .iter()
            .filter(|e| e["event"] == "invite")
            .filter_map(|e| e["from"].as_str().map(str::to_string))
            .collect();
        (senders.len() == 3).then_some(())
    })
    .unwrap();

    let (status, body) = nodes[1]
        .post(&format!("/api/v1/campaigns/{id}/pause"), &Value::Null)
        .unwrap();
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("paused")),
        "{body}"
    );
    let paused_at = now_ms();
    let quiet = wait_quiet(&nodes, id);
    assert_eq!(quiet["state"], "paused");
    let late = invites_after(&city, paused_at + 1_000);
    assert!(
        late.is_empty(),
        "INVITEs more than 1 s after the pause: {late:?}"
    );
    let open = quiet["counts"]["pending"].as_u64().unwrap();
    assert!(
        open > 0,
        "the pause came too late to leave anyone pending: {quiet}"
    );

    let (status, body) = nodes[2]
        .post(&format!("/api/v1/campaigns/{id}/resume"), &Value::Null)
        .unwrap();
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("running")),
        "{body}"
    );
    let resumed_at = now_ms();
    wait_for(
        "dialing again after the resume",
        Duration::from_secs(30),
        || (!invites_after(&city, resumed_at).is_empty()).then_some(()),
    )
    .unwrap();

    let (status, body) = nodes[0]
        .post(&format!("/api/v1/campaigns/{id}/cancel"), &Value::Null)
        .unwrap();
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("cancelled")),
        "{body}"
    );
    let cancelled_at = now_ms();
    let done = wait_quiet(&nodes, id);
    assert_eq!(done["state"], "cancelled");
    let late = invites_after(&city, cancelled_at + 1_000);
    assert!(
        late.is_empty(),
        "INVITEs more than 1 s after the cancel: {late:?}"
    );
    for t in tasks(&nodes[2], id) {
        let state = t["state"].as_str().unwrap();
        assert!(!matches!(state, "pending" | "in_flight"), "{t}");
    }
}

/// Lease timing of a node (node/src/dialer/leases.rs): a lease lasts 3 s from its renewal, and a node
/// dials only until 1 s before it lapses.
const LEASE_MS: u64 = 3_000;
const MARGIN_MS: u64 = 1_000;

#[test]
fn a_node_cut_off_from_the_cluster_stops_dialing_and_the_others_take_its_partitions() {
    let dir = test_dir();
    let (city, nodes, id) = small_campaign(dir.path(), 13);

    // Cut a node that is not the leader, once it has calls up: only its Raft traffic.
    let view = cluster_view(&nodes[0]).unwrap();
    let leader = view["leader"].as_u64().unwrap();
    let cut_id: u64 = if leader == 3 { 2 } else { 3 };
    let (cut_node, others): (&NodeProc, Vec<&NodeProc>) = (
        &nodes[cut_id as usize - 1],
        nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u64 + 1 != cut_id)
            .map(|(_, n)| n)
            .collect(),
    );
    let raft: std::net::SocketAddr = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == cut_id)
        .and_then(|m| m["raft_addr"].as_str()?.parse().ok())
        .unwrap();
    let victim = cut_node.sip.to_string();
    wait_for(
        "the node to cut on the phone",
        Duration::from_secs(60),
        || {
            (city
                .events()
                .iter()
                .filter(|e| e["event"] == "answer" && e["from"] == victim.as_str())
                .count()
                >= 5)
                .then_some(())
        },
    )
    .unwrap();
    let cut = RaftCut::start(raft).unwrap();
    let cut_ms = now_ms();

    // The others take every partition once its leases expire.
    wait_for(
        "the others to hold all 256 partitions",
        Duration::from_secs(30),
        || {
            let v = cluster_view(others[0])?;
            let leases = |id: u64| {
                v["members"].as_array()?.iter().find(|m| m["id"] == id)?["leases"].as_u64()
            };
            let held: u64 = (1..=3).filter(|i| *i != cut_id).filter_map(leases).sum();
            (held == 256 && leases(cut_id) == Some(0)).then_some(())
        },
    )
    .unwrap();
    // Keep the cut a while: the others dial on, the cut-off node must stay silent.
    let others_dialing = wait_for(
        "the others dialing its share",
        Duration::from_secs(30),
        || {
            let after = city
                .events()
                .iter()
                .filter(|e| {
                    e["event"] == "invite"
                        && e["from"] != victim.as_str()
                        && e["t_ms"].as_u64().is_some_and(|t| t > cut_ms + LEASE_MS)
                })
                .count();
            (after >= 20 && now_ms() > cut_ms + 2 * LEASE_MS).then_some(())
        },
    );
    let heal_ms = now_ms();
    drop(cut);
    others_dialing.unwrap();

    // During the cut: no new call from the cut-off node after its lease margin, and every call it had
    // up ended before its leases could go to anyone else, or (answered) was taken over by another
    // node by then: the cut-off node left it without BYE.
    let events = city.events();
    let taken_over: BTreeSet<&str> = events
        .iter()
        .filter(|e| {
            e["event"] == "reinvite"
                && e["from"] != victim.as_str()
                && e["t_ms"].as_u64().is_some_and(|t| t <= cut_ms + LEASE_MS)
        })
        .filter_map(|e| e["call_id"].as_str())
        .collect();
    let (up, taken, gaps) = check_takeovers(&events, &victim, cut_ms);
    eprintln!(
        "{taken} of {up} answered calls of the cut-off node taken over, silences {gaps:?} ms"
    );
    let spans = calls_by_number(&events);
    let last_end = spans
        .values()
        .flatten()
        .filter(|c| c.from == victim && c.start < heal_ms && c.end != u64::MAX)
        .filter(|c| !taken_over.contains(c.call_id.as_str()))
        .map(|c| c.end.saturating_sub(cut_ms))
        .max();
    eprintln!("the cut-off node's last call ended {last_end:?} ms after the cut");
    for (number, calls) in &spans {
        for c in calls
            .iter()
            .filter(|c| c.from == victim && c.start < heal_ms)
        {
            assert!(
                c.start <= cut_ms + LEASE_MS - MARGIN_MS,
                "{number}: the cut-off node placed a call {} ms after the cut",
                c.start - cut_ms
            );
            assert!(
                c.end <= cut_ms + LEASE_MS || taken_over.contains(c.call_id.as_str()),
                "{number}: a call of the cut-off node lasted until {} ms after the cut",
                c.end.saturating_sub(cut_ms)
            );
        }
    }

    // After healing it rejoins and gets a share again; the campaign ends with everyone final.
    wait_for(
        "the healed node to hold leases again",
        Duration::from_secs(60),
        || {
            let v = cluster_view(others[0])?;
            let held = v["members"]
                .as_array()?
                .iter()
                .find(|m| m["id"] == cut_id)?["leases"]
                .as_u64()?;
            (held > 0).then_some(())
        },
    )
    .unwrap();
    let done = others[0]
        .wait_campaign_done(id, Duration::from_secs(600))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    let (overlaps, pressed) = check_outcomes_after_losing(others[1], id, &city, &victim);
    eprintln!(
        "cut node {cut_id} for {} ms; {} overlapping calls; {} numbers pressed 1",
        heal_ms - cut_ms,
        overlaps,
        pressed
    );
}

/// Every node loses the quorum at once (all three Raft ports cut) for longer than a lease, with
/// answered calls up on each: every node lets its answered calls go when its leases lapse, and no
/// leader can move them. After the heal each of those calls must be continued (a re-INVITE, from
/// its own node or another) or ended with BYE before its citizen is called again: no phone in two
/// calls at once, none left to hang up on silence, a 1 pressed counted, the campaign completed.
#[test]
fn a_lost_and_regained_quorum_leaves_no_citizen_in_a_silent_call() {
    let dir = test_dir();
    let (city, nodes, id) = small_campaign(dir.path(), 14);
    let view = cluster_view(&nodes[0]).unwrap();
    let rafts: Vec<std::net::SocketAddr> = view["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["raft_addr"].as_str()?.parse().ok())
        .collect();
    assert_eq!(rafts.len(), 3, "{view}");
    let sips: Vec<String> = nodes.iter().map(|n| n.sip.to_string()).collect();
    wait_for(
        "answered calls up on every node",
        Duration::from_secs(60),
        || {
            let (events, now) = (city.events(), now_ms());
            sips.iter()
                .all(|s| answered_calls_up(&events, s, now, now).len() >= 3)
                .then_some(())
        },
    )
    .unwrap();
    let lapses = |n: &NodeProc| n.proc.log_text().matches("partition leases lapsed").count();
    let before: Vec<usize> = nodes.iter().map(lapses).collect();
    let cut_ms = now_ms();
    let cuts: Vec<RaftCut> = rafts.iter().map(|r| RaftCut::start(*r).unwrap()).collect();
    // Past the leases: every node has let its calls go, and the leases have expired.
    wait_for(
        "every node to let its calls go",
        Duration::from_secs(30),
        || {
            let all = nodes.iter().zip(&before).all(|(n, b)| lapses(n) > *b);
            (all && now_ms() > cut_ms + LEASE_MS + 500).then_some(())
        },
    )
    .unwrap();
    let heal_ms = now_ms();
    drop(cuts);

    let done = nodes[0]
        .wait_campaign_done(id, Duration::from_secs(600))
        .unwrap();
    assert_eq!(done["state"], "completed", "{done}");
    let events = city.events();
    // The calls answered (and committed) before the cut and still up at it.
    let (mut continued, mut ended_before_heal, mut ended_by_node, mut ended) = (0, 0, 0, 0);
    for s in &sips {
        for call in answered_calls_up(&events, s, cut_ms.saturating_sub(500), cut_ms) {
            let of_call: Vec<&Value> = events.iter().filter(|e| e["call_id"] == call).collect();
            let gave_up = of_call
                .iter()
                .any(|e| e["event"] == "bye_sent" && e["reason"] == "media_timeout");
            assert!(!gave_up, "{call} died of silence: {of_call:#?}");
            if of_call
                .iter()
                .any(|e| e["event"] == "reinvite" && e["t_ms"].as_u64() > Some(cut_ms))
            {
                continued += 1;
            } else if of_call.iter().any(|e| {
                e["event"] == "bye_received" && e["t_ms"].as_u64().is_some_and(|t| t < heal_ms)
            }) {
                ended_before_heal += 1;
            } else if of_call.iter().any(|e| e["event"] == "bye_received") {
                ended_by_node += 1;
            } else {
                ended += 1;
            }
        }
    }
    assert!(
        continued > 0,
        "none of the {} calls up at the cut was continued after the heal",
        ended_before_heal + ended_by_node + ended
    );
    // No node was lost: nobody may leave a phone in a call while its citizen is dialled again.
    let (overlaps, pressed) = check_outcomes_after_losing(&nodes[1], id, &city, "none");
    assert_eq!(overlaps, 0);
    // The nodes' own count: every re-INVITE the city saw continued a parked call on its node or a
    // call moved to another (a takeover), and the calls were parked, not recorded.
    let total = |series: &str| -> f64 {
        nodes
            .iter()
            .map(|n| {
                let text = n.text("/metrics").unwrap();
                text.lines()
                    .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("no {series} in {}'s metrics", n.sip))
            })
            .sum()
    };
    let parked_continued = total("campanile_parked_calls_total{fate=\"continued\"}");
    let parked_moved = total("campanile_parked_calls_total{fate=\"moved\"}");
    let parked_ended = total("campanile_parked_calls_total{fate=\"ended\"}");
    let takeovers: f64 = ["resumed", "redialled", "failed"]
        .iter()
        .map(|r| total(&format!("campanile_takeovers_total{{result=\"{r}\"}}")))
        .sum();
    assert!(
        parked_continued + parked_moved >= 1.0 && parked_continued + takeovers >= continued as f64,
        "{continued} calls continued by the city's count; the nodes parked and continued \
         {parked_continued}, parked and saw moved {parked_moved}, took over {takeovers}"
    );
    eprintln!(
        "quorum lost for {} ms; of the calls up at the cut {continued} continued, \
         {ended_before_heal} ended by their node before the heal, {ended_by_node} after it, \
         {ended} by the phone; {pressed} numbers pressed 1; parked calls continued \
         {parked_continued}, moved {parked_moved}, ended {parked_ended}; takeovers {takeovers}",
        heal_ms - cut_ms
    );
}
