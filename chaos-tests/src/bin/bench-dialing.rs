//! Distributed-dialing benchmarks of BENCHMARKS.md (issue 5): three real `campanile up` processes
//! (QUIC/mTLS between them, on loopback) dial the simulated city (`campanile sim-city`, realistic
//! profile), whose log is the ground truth for every figure. Figures, not pass/fail.
//!
//!   bench-dialing failover [--trials T] [--subscribers N] [--channels C] [--sigterm]
//!   bench-dialing reach    [--subscribers N] [--channels C] [--cps R]
//!
//! `failover` SIGKILLs one node per trial mid-campaign (a follower in even trials, the leader in odd
//! ones) and measures how long its partitions stay undialled and how much silence the phones it had
//! answered hear before another node takes their calls over; with `--sigterm` the node is stopped
//! as systemd stops it instead, and hands its calls and partitions over itself. `reach` runs one whole campaign and
//! compares its completion time with the channel bound. Needs the release binary
//! (`cargo build --release -p campanile`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use campanile_chaos_tests::*;
use serde_json::{json, Value};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| usize_flag(&args, name, default);
    match args.first().map(String::as_str) {
        Some("failover") => failover(
            flag("--trials", 10)?,
            flag("--subscribers", 1_000)?,
            flag("--channels", 20)?,
            if args.iter().any(|a| a == "--sigterm") {
                Signal::Term
            } else {
                Signal::Kill
            },
        ),
        Some("reach") => reach(
            flag("--subscribers", 2_000)?,
            flag("--channels", 150)?,
            flag("--cps", 100)?,
        ),
        _ => bail!(
            "usage: bench-dialing failover [--trials T] [--subscribers N] [--channels C per node] \
             [--sigterm] | reach [--subscribers N] [--channels C in total] [--cps R per node]"
        ),
    }
}

// ---- shared ----

/// The alert both benchmarks play: the demo's message.
const MESSAGE: &str = "Attenzione. Allerta meteo rossa. Il fiume è in piena: \
     allontanatevi dagli argini e salite ai piani alti.";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A subscriber's partition: the same function as `campanile_cluster::partition_of`
/// (cluster/src/domain.rs), copied because this crate does not link the cluster crate. `failover`
/// checks it on every trial: every INVITE before the kill must come from its partition's holder.
fn partition_of(subscriber: u64) -> u16 {
    (subscriber.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u16 % 256
}

/// Starts three members dialing `city`, each with `configs[i]`, and waits until every one holds a
/// share of the 256 partitions.
fn start_cluster(
    dir: &Path,
    city: &SimCityProc,
    configs: &[String],
) -> anyhow::Result<Vec<NodeProc>> {
    let plan = ClusterPlan::new(dir, 3)?;
    let trunk = format!("sip:{}", city.addr);
    let nodes = (1..=3)
        .map(|id| plan.start(id, &configs[id - 1], &trunk))
        .collect::<anyhow::Result<Vec<_>>>()?;
    wait_voters(&nodes[0], 3, Duration::from_secs(60))?;
    wait_for("leases on every node", Duration::from_secs(60), || {
        let v = cluster_view(&nodes[0])?;
        let held: Vec<u64> = v["members"]
            .as_array()?
            .iter()
            .filter_map(|m| m["leases"].as_u64())
            .collect();
        (held.len() == 3 && held.iter().all(|h| *h >= 60) && held.iter().sum::<u64>() == 256)
            .then_some(())
    })?;
    Ok(nodes)
}

/// Creates and starts an emergency campaign for everyone; returns its id and the epoch ms just
/// before it was created.
fn start_campaign(node: &NodeProc, text: &str, retry: Value) -> anyhow::Result<(u64, u64)> {
    let t0 = now_ms();
    let id = node.create_and_start(json!({
        "title": "Benchmark",
        "message": { "tts": { "text": text, "language": "it" } },
        "audience": { "all": true },
        "priority": "emergency",
        "require_confirmation": true,
        "retry": retry,
    }))?;
    Ok((id, t0))
}

/// Phone number → subscriber id, from the campaign's tasks.
fn subscribers_by_phone(node: &NodeProc, id: u64) -> anyhow::Result<BTreeMap<String, u64>> {
    let (status, tasks) = node.get(&format!("/api/v1/campaigns/{id}/tasks"))?;
    if status != 200 {
        bail!("listing the tasks: {status} {tasks}");
    }
    Ok(tasks
        .as_array()
        .context("tasks")?
        .iter()
        .filter_map(|t| Some((t["phone"].as_str()?.to_string(), t["subscriber"].as_u64()?)))
        .collect())
}

/// Nearest-rank percentile of a sorted slice.
fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn secs(ms: Option<u64>) -> String {
    ms.map_or("-".into(), |ms| format!("{:.3} s", ms as f64 / 1000.0))
}

/// Busy and total jiffies of the whole machine, from /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// CPU seconds (user + system) used so far by the processes started under `dir` (the nodes and the
/// city: their command lines name files in it), from /proc.
fn cpu_of_processes_under(dir: &Path) -> f64 {
    let needle = dir.display().to_string();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&needle) {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
        let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
        let f: Vec<u64> = after
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|x| x.parse().ok())
            .collect();
        total += f.iter().sum::<u64>();
    }
    total as f64 / ticks
}

// ---- failover ----

/// The campaign of the failover trials: the chaos test's quick retries, so a partition always has
/// someone due and the first call into it measures the failover, not a retry delay.
fn failover_retry() -> Value {
    json!({ "max_attempts": 5, "busy_delay_s": 1.0, "no_answer_delay_s": 2.0, "failure_delay_s": 1.0 })
}

/// How the victim goes: killed, or stopped as systemd stops it (a graceful stop, `dialer::leave`).
#[derive(Clone, Copy)]
enum Signal {
    Kill,
    Term,
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signal::Kill => "SIGKILL",
            Signal::Term => "SIGTERM",
        })
    }
}

struct Trial {
    role: &'static str,
    /// The signal → first INVITE from a survivor into one of the victim's partitions.
    redial_ms: Option<u64>,
    /// The signal → a survivor's cluster view shows the victim with no lease and the survivors with
    /// all.
    leases_ms: Option<u64>,
    /// Answered calls of the victim still up at the kill.
    up: usize,
    taken: usize,
    /// Silence each taken-over call's phone heard (`media_gap` after the re-INVITE).
    gaps: Vec<u64>,
    /// Taken-over calls without a `media_gap` after the re-INVITE, and why they ended.
    no_gap: Vec<String>,
    /// Answered calls up at the kill that no other node re-INVITEd: how long before the kill they
    /// were answered, and what the phone logged next.
    not_taken: Vec<String>,
    /// Calls of the survivors that another node re-INVITEd after the kill: moved although their
    /// node was alive (each costs its phone a moment of silence).
    survivors_moved: usize,
}

fn failover(
    trials: usize,
    subscribers: usize,
    channels: usize,
    signal: Signal,
) -> anyhow::Result<()> {
    println!(
        "failover: {trials} trials, each a fresh 3-node cluster ({channels} channels per node) and \
         a realistic city, {subscribers} subscribers; {signal} to a follower (even trials) or the \
         leader (odd trials) once it has 5 answered calls"
    );
    let mut results = Vec::new();
    for trial in 0..trials {
        let r = failover_trial(trial, subscribers, channels, signal)
            .with_context(|| format!("trial {trial}"))?;
        results.push(r);
    }

    println!("\n| trial | victim | partitions dialled again | leases moved | answered calls up | taken over | media gaps (ms) |");
    println!("|---:|---|---:|---:|---:|---:|---|");
    for (i, r) in results.iter().enumerate() {
        println!(
            "| {i} | {} | {} | {} | {} | {} | {:?}{} |",
            r.role,
            secs(r.redial_ms),
            secs(r.leases_ms),
            r.up,
            r.taken,
            r.gaps,
            if r.no_gap.is_empty() {
                String::new()
            } else {
                format!(" no gap logged: {:?}", r.no_gap)
            },
        );
        if !r.not_taken.is_empty() {
            println!("|  | not taken over: {:?} | | | | | |", r.not_taken);
        }
    }
    let summary = |what: &str, mut v: Vec<u64>| {
        v.sort_unstable();
        println!(
            "{what}: n {}, p50 {}, p99 {}, min {}, max {}",
            v.len(),
            secs(percentile(&v, 50.0)),
            secs(percentile(&v, 99.0)),
            secs(v.first().copied()),
            secs(v.last().copied()),
        );
    };
    println!();
    for role in ["follower", "leader", "all"] {
        let of = |f: &dyn Fn(&Trial) -> Option<u64>| -> Vec<u64> {
            results
                .iter()
                .filter(|r| role == "all" || r.role == role)
                .filter_map(f)
                .collect()
        };
        summary(
            &format!("{signal} → victim's partitions dialled again ({role})"),
            of(&|r| r.redial_ms),
        );
        summary(
            &format!("{signal} → leases moved, API view ({role})"),
            of(&|r| r.leases_ms),
        );
        let gaps: Vec<u64> = results
            .iter()
            .filter(|r| role == "all" || r.role == role)
            .flat_map(|r| r.gaps.iter().copied())
            .collect();
        summary(&format!("media gap of taken-over calls ({role})"), gaps);
    }
    let missing = results.iter().filter(|r| r.redial_ms.is_none()).count();
    let (up, taken): (usize, usize) = results
        .iter()
        .fold((0, 0), |(u, t), r| (u + r.up, t + r.taken));
    let survivors: usize = results.iter().map(|r| r.survivors_moved).sum();
    println!(
        "trials without a redial seen: {missing}; answered calls up at the kill: {up}, taken over: {taken}; \
         answered calls of live nodes moved: {survivors}"
    );
    Ok(())
}

fn failover_trial(
    trial: usize,
    subscribers: usize,
    channels: usize,
    signal: Signal,
) -> anyhow::Result<Trial> {
    let dir = tempfile::tempdir()?;
    let city = SimCityProc::start(dir.path(), "realistic", 100 + trial as u64)?;
    let config = fast_node_config(channels);
    let mut nodes = start_cluster(dir.path(), &city, &[config.clone(), config.clone(), config])?;
    nodes[0].import(1, subscribers as u32)?;
    let (id, _) = start_campaign(&nodes[0], MESSAGE, failover_retry())?;
    let subscriber_of = subscribers_by_phone(&nodes[0], id)?;
    let leader = cluster_view(&nodes[0])
        .and_then(|v| v["leader"].as_u64())
        .context("no leader")? as usize
        - 1;
    let (role, victim_at) = if trial % 2 == 1 {
        ("leader", leader)
    } else {
        ("follower", (0..3).find(|i| *i != leader).unwrap_or(0))
    };
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim_at).collect();
    let victim = nodes[victim_at].sip.to_string();
    let sips: BTreeMap<String, u64> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.sip.to_string(), i as u64 + 1))
        .collect();
    wait_for(
        "5 answered calls on the victim",
        Duration::from_secs(120),
        || {
            (city
                .events()
                .iter()
                .filter(|e| e["event"] == "answer" && e["from"] == victim.as_str())
                .count()
                >= 5)
                .then_some(())
        },
    )?;
    // Who holds which partition, from a consistent copy of the state taken just before the kill.
    let holders = lease_holders(&nodes[survivors[0]])?;
    let killed_ms = now_ms();
    match signal {
        Signal::Kill => nodes[victim_at].kill(),
        Signal::Term => nodes[victim_at].proc.terminate(),
    }

    // In the meantime, a survivor's API view of the leases.
    let leases_ms = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            wait_for("the leases to move", Duration::from_secs(60), || {
                survivors.iter().find_map(|i| {
                    let v = cluster_view(&nodes[*i])?;
                    let leases = |id: usize| -> Option<u64> {
                        v["members"]
                            .as_array()?
                            .iter()
                            .find(|m| m["id"] == id as u64 + 1)?["leases"]
                            .as_u64()
                    };
                    let survivors_hold: u64 = survivors.iter().filter_map(|j| leases(*j)).sum();
                    (leases(victim_at) == Some(0) && survivors_hold == 256)
                        .then(|| now_ms() - killed_ms)
                })
            })
            .ok()
        });
        let redial = wait_for(
            "a survivor dialing the victim's partitions",
            Duration::from_secs(60),
            || match first_redial(
                &city.events(),
                Sender {
                    victim: &victim,
                    victim_id: victim_at as u64 + 1,
                    sip: &sips,
                },
                killed_ms,
                &holders,
                &subscriber_of,
            ) {
                Ok(found) => found.map(Ok),
                Err(e) => Some(Err(e)),
            },
        )
        .and_then(|r| r);
        (watcher.join().ok().flatten(), redial)
    });
    let (leases_ms, redial) = leases_ms;
    let (redial_ms, checked) = match redial {
        Ok((ms, checked)) => (Some(ms), checked),
        Err(e) => {
            eprintln!("trial {trial}: {e}");
            (None, String::new())
        }
    };

    // The victim's answered calls that were up at the kill: wait (bounded) for each to end.
    let up_at_kill = |events: &[Value]| answered_calls_up(events, &victim, killed_ms, killed_ms);
    let ended = |events: &[Value], call: &str| {
        events.iter().any(|e| {
            e["call_id"] == call && matches!(e["event"].as_str(), Some("bye_received" | "bye_sent"))
        })
    };
    let _ = wait_for(
        "the victim's answered calls to end",
        Duration::from_secs(60),
        || {
            let events = city.events();
            up_at_kill(&events)
                .iter()
                .all(|c| ended(&events, c))
                .then_some(())
        },
    );
    let events = city.events();
    let up = up_at_kill(&events);
    let survivors_moved = survivors_moved(&events, &victim, killed_ms);
    let mut gaps = Vec::new();
    let mut no_gap = Vec::new();
    let mut not_taken = Vec::new();
    let mut taken = 0;
    for call in &up {
        let of_call: Vec<&Value> = events
            .iter()
            .filter(|e| e["call_id"] == call.as_str())
            .collect();
        let Some(at) = of_call
            .iter()
            .position(|e| e["event"] == "reinvite" && e["from"] != victim.as_str())
        else {
            let answered = of_call
                .iter()
                .find(|e| e["event"] == "answer")
                .and_then(|e| e["t_ms"].as_u64())
                .unwrap_or(killed_ms);
            let next = of_call
                .iter()
                .find(|e| e["t_ms"].as_u64().is_some_and(|t| t > killed_ms))
                .map_or("nothing".to_string(), |e| {
                    format!(
                        "{} {}",
                        e["event"].as_str().unwrap_or_default(),
                        e["reason"].as_str().unwrap_or_default()
                    )
                    .trim_end()
                    .to_string()
                });
            not_taken.push(format!(
                "answered {} ms before the kill, then {next}",
                killed_ms.saturating_sub(answered)
            ));
            continue;
        };
        taken += 1;
        match of_call[at..]
            .iter()
            .find(|e| e["event"] == "media_gap")
            .and_then(|e| e["gap_ms"].as_u64())
        {
            Some(gap) => gaps.push(gap),
            None => {
                let end = of_call[at..]
                    .iter()
                    .find(|e| matches!(e["event"].as_str(), Some("bye_received" | "bye_sent")));
                no_gap.push(match end {
                    Some(e) => format!(
                        "{} {}",
                        e["event"].as_str().unwrap_or_default(),
                        e["reason"].as_str().unwrap_or_default()
                    )
                    .trim_end()
                    .to_string(),
                    None => "not ended".into(),
                });
            }
        }
    }
    gaps.sort_unstable();
    eprintln!(
        "trial {trial} ({role} {} sent {signal}): partitions dialled again after {}, leases moved after {}, \
         {taken} of {} answered calls taken over, gaps {gaps:?} ms{}; {checked}",
        victim_at + 1,
        secs(redial_ms),
        secs(leases_ms),
        up.len(),
        if no_gap.is_empty() {
            String::new()
        } else {
            format!(", no gap logged: {no_gap:?}")
        }
    );
    if !not_taken.is_empty() {
        eprintln!("trial {trial}: not taken over: {not_taken:?}");
    }
    if survivors_moved > 0 {
        eprintln!("trial {trial}: {survivors_moved} answered calls of live nodes moved");
    }
    Ok(Trial {
        role,
        redial_ms,
        leases_ms,
        up: up.len(),
        taken,
        gaps,
        no_gap,
        not_taken,
        survivors_moved,
    })
}

/// Calls first placed by a node other than `victim` that another node re-INVITEd after `killed_ms`.
fn survivors_moved(events: &[Value], victim: &str, killed_ms: u64) -> usize {
    let mut first_from: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
    let mut moved = std::collections::HashSet::new();
    for e in events {
        let (Some(call), Some(from)) = (e["call_id"].as_str(), e["from"].as_str()) else {
            continue;
        };
        if e["event"] == "invite" {
            first_from.entry(call).or_insert(from);
        } else if e["event"] == "reinvite"
            && e["t_ms"].as_u64().is_some_and(|t| t > killed_ms)
            && first_from
                .get(call)
                .is_some_and(|first| *first != victim && *first != from)
        {
            moved.insert(call);
        }
    }
    moved.len()
}

/// Partition → id of the node holding its lease, from `GET /api/v1/backup` of `node` (a header line,
/// then the replicated state as JSON, whose `leases` map is what the leader assigned).
fn lease_holders(node: &NodeProc) -> anyhow::Result<BTreeMap<u16, u64>> {
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut ureq::get(&format!("http://{}/api/v1/backup", node.http))
            .set("Authorization", &format!("Bearer {}", node.token()))
            .timeout(Duration::from_secs(30))
            .call()?
            .into_reader(),
        &mut text,
    )?;
    let state: Value = serde_json::from_str(text.split_once('\n').context("backup header")?.1)?;
    let holders: BTreeMap<u16, u64> = state["leases"]
        .as_object()
        .context("no leases in the backup")?
        .iter()
        .filter_map(|(p, l)| Some((p.parse().ok()?, l["node"].as_u64()?)))
        .collect();
    anyhow::ensure!(
        holders.len() == 256,
        "{} leases in the backup",
        holders.len()
    );
    Ok(holders)
}

/// Who is who in the city's log: the killed node's SIP address and id, and every node's id by SIP
/// address.
#[derive(Clone, Copy)]
struct Sender<'a> {
    victim: &'a str,
    victim_id: u64,
    sip: &'a BTreeMap<String, u64>,
}

/// The victim's partitions are those whose lease it held just before the kill (`holders`). Answers
/// the ms from the kill to the first INVITE a survivor sent into one of them, with a line on what was
/// checked; an error when an INVITE before the kill came from a node other than its partition's
/// holder (the copied partition map would be wrong, or leases moved during the run).
fn first_redial(
    events: &[Value],
    who: Sender,
    killed_ms: u64,
    holders: &BTreeMap<u16, u64>,
    subscriber_of: &BTreeMap<String, u64>,
) -> anyhow::Result<Option<(u64, String)>> {
    let partition = |e: &Value| {
        e["number"]
            .as_str()
            .and_then(|n| subscriber_of.get(n))
            .map(|s| partition_of(*s))
    };
    let invites = || events.iter().filter(|e| e["event"] == "invite");
    let before: Vec<&Value> = invites()
        .filter(|e| e["t_ms"].as_u64().is_some_and(|t| t <= killed_ms))
        .collect();
    let strays = before
        .iter()
        .filter(|e| {
            let sender = e["from"].as_str().and_then(|f| who.sip.get(f));
            partition(e).and_then(|p| holders.get(&p)) != sender
        })
        .count();
    if strays > 0 {
        bail!(
            "{strays} of {} INVITEs before the kill came from a node not holding their partition",
            before.len()
        );
    }
    let victims: BTreeSet<u16> = holders
        .iter()
        .filter(|(_, n)| **n == who.victim_id)
        .map(|(p, _)| *p)
        .collect();
    let first = invites()
        .filter(|e| e["from"] != who.victim)
        .filter(|e| e["t_ms"].as_u64().is_some_and(|t| t > killed_ms))
        .filter(|e| partition(e).is_some_and(|p| victims.contains(&p)))
        .filter_map(|e| e["t_ms"].as_u64())
        .min();
    Ok(first.map(|t| {
        (
            t - killed_ms,
            format!(
                "the victim held {} partitions; all {} INVITEs before the kill came from their partition's holder",
                victims.len(),
                before.len()
            ),
        )
    }))
}

// ---- reach ----

/// The demo's retry policy (`campanile demo`).
fn reach_retry() -> Value {
    json!({ "max_attempts": 6, "busy_delay_s": 5.0, "no_answer_delay_s": 8.0, "failure_delay_s": 5.0 })
}

/// The shortest retry delay of `reach_retry`, for the per-citizen chain bound.
const MIN_RETRY_DELAY_MS: u64 = 5_000;

fn reach_config(channels: usize, cps: usize) -> String {
    format!(
        "[trunk]\nname = \"sim\"\nmax_channels = {channels}\ncalls_per_second = {cps}\n\n\
         [dialer]\nring_timeout_s = 8.0\nconfirm_wait_s = 4.0\nbatch_ms = 20\n"
    )
}

fn reach(subscribers: usize, channels: usize, cps: usize) -> anyhow::Result<()> {
    anyhow::ensure!(channels >= 3, "at least one channel per node");
    let per_node: Vec<usize> = (0..3)
        .map(|i| channels / 3 + usize::from(i < channels % 3))
        .collect();
    println!(
        "time to reach a city: {subscribers} subscribers, 3 nodes, {channels} channels in all \
         ({per_node:?} per node), at most {cps} calls/s per node, realistic city; ring timeout 8 s, \
         confirmation wait 4 s, retry {}",
        reach_retry()
    );
    let dir = tempfile::tempdir()?;
    let city = SimCityProc::start(dir.path(), "realistic", 1)?;
    let configs: Vec<String> = per_node.iter().map(|c| reach_config(*c, cps)).collect();
    let nodes = start_cluster(dir.path(), &city, &configs)?;
    let t = std::time::Instant::now();
    nodes[0].import(1, subscribers as u32)?;
    println!(
        "imported {subscribers} in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let cpu0 = cpu_jiffies();
    let ours0 = cpu_of_processes_under(dir.path());
    let (id, t0) = start_campaign(&nodes[0], MESSAGE, reach_retry())?;
    let mut last_print = now_ms();
    let done = wait_for("the campaign to finish", Duration::from_secs(3600), || {
        let (status, c) = nodes[0].get(&format!("/api/v1/campaigns/{id}")).ok()?;
        if status != 200 {
            eprintln!("campaign {id}: HTTP {status}: {c}");
            return None;
        }
        if now_ms() - last_print >= 30_000 {
            last_print = now_ms();
            eprintln!(
                "{:>5.0} s: {}",
                (last_print - t0) as f64 / 1000.0,
                c["counts"]
            );
        }
        (!matches!(c["state"].as_str(), Some("running" | "paused"))).then_some(c)
    })?;
    let api_done_ms = now_ms() - t0;
    let cpu1 = cpu_jiffies();
    let ours1 = cpu_of_processes_under(dir.path());
    let busy = (cpu1.0 - cpu0.0) as f64 / (cpu1.1 - cpu0.1).max(1) as f64;
    println!("campaign {}: {}", done["state"], done["counts"]);
    println!("retry as the cluster holds it: {}", done["retry"]);

    let events = city.events();
    let by_number = calls_by_number(&events);
    let calls: Vec<&CallSpan> = by_number.values().flatten().collect();
    let unended = calls.iter().filter(|c| c.end == u64::MAX).count();
    let channel_ms: u64 = calls
        .iter()
        .filter(|c| c.end != u64::MAX)
        .map(|c| c.end - c.start)
        .sum();
    let first_invite = calls.iter().map(|c| c.start).min().unwrap_or(t0);
    let last_end = calls
        .iter()
        .filter(|c| c.end != u64::MAX)
        .map(|c| c.end)
        .max()
        .unwrap_or(t0);
    let completion_ms = last_end - t0;
    let bound_ms = channel_ms / channels as u64;
    // However many channels, one citizen's calls follow each other with a retry delay between them.
    let chain_ms = by_number
        .values()
        .map(|cs| {
            cs.iter()
                .filter(|c| c.end != u64::MAX)
                .map(|c| c.end - c.start)
                .sum::<u64>()
                + (cs.len() as u64 - 1) * MIN_RETRY_DELAY_MS
        })
        .max()
        .unwrap_or(0);
    // Calls up at once, from the city's log.
    let mut edges: Vec<(u64, i64)> = calls
        .iter()
        .filter(|c| c.end != u64::MAX)
        .flat_map(|c| [(c.start, 1), (c.end, -1)])
        .collect();
    edges.sort_unstable();
    let (mut up, mut peak) = (0i64, 0i64);
    for (_, d) in edges {
        up += d;
        peak = peak.max(up);
    }
    // Until every citizen has had a first call there is always someone to dial: how full were the
    // channels then, and after (the tail, when only retries waiting out their delay are left)?
    let last_first_call = by_number
        .values()
        .filter_map(|cs| cs.first().map(|c| c.start))
        .max()
        .unwrap_or(t0);
    let busy_ms_between = |from: u64, to: u64| -> u64 {
        calls
            .iter()
            .filter(|c| c.end != u64::MAX)
            .map(|c| c.end.min(to).saturating_sub(c.start.max(from)))
            .sum()
    };
    let full_phase_up = busy_ms_between(t0, last_first_call) as f64
        / last_first_call.saturating_sub(t0).max(1) as f64;
    let tail_up = busy_ms_between(last_first_call, last_end) as f64
        / last_end.saturating_sub(last_first_call).max(1) as f64;
    let answered: BTreeSet<&str> = events
        .iter()
        .filter(|e| e["event"] == "answer")
        .filter_map(|e| e["call_id"].as_str())
        .collect();
    let mean_len = |pick: &dyn Fn(&CallSpan) -> bool| {
        let l: Vec<u64> = calls
            .iter()
            .filter(|c| c.end != u64::MAX && pick(c))
            .map(|c| c.end - c.start)
            .collect();
        (
            l.len(),
            l.iter().sum::<u64>() as f64 / l.len().max(1) as f64 / 1000.0,
        )
    };
    let (n_answered, answered_len) = mean_len(&|c| answered.contains(c.call_id.as_str()));
    let (n_other, other_len) = mean_len(&|c| !answered.contains(c.call_id.as_str()));
    let mut confirmed_at: Vec<u64> = events_by_number(&events)
        .values()
        .filter_map(|es| {
            es.iter()
                .find(|e| e["event"] == "dtmf" && e["digit"] == "1")
                .and_then(|e| e["t_ms"].as_u64())
        })
        .map(|t| t - t0)
        .collect();
    confirmed_at.sort_unstable();
    let gap_events: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "media_gap")
        .collect();
    let gaps = gap_events.len();
    let sorted = |f: &str| {
        let mut v: Vec<u64> = gap_events.iter().filter_map(|e| e[f].as_u64()).collect();
        v.sort_unstable();
        v
    };
    let (gap_ms, gap_at) = (sorted("gap_ms"), sorted("audio_ms"));
    let silence_deaths = events
        .iter()
        .filter(|e| e["event"] == "bye_sent" && e["reason"] == "media_timeout")
        .count();
    let overlaps = overlapping_calls(&events).len();

    let s = |ms: u64| ms as f64 / 1000.0;
    println!(
        "calls placed: {} ({} without an end in the log)",
        calls.len(),
        unended
    );
    println!(
        "create + start requests → first INVITE: {:.3} s",
        s(first_invite - t0)
    );
    println!(
        "completion (create + start requests → last call's end): {:.1} s; campaign seen completed through the API after {:.1} s",
        s(completion_ms),
        s(api_done_ms)
    );
    println!(
        "channel-seconds: {:.0}; channel bound ({:.0} / {channels}): {:.1} s",
        s(channel_ms),
        s(channel_ms),
        s(bound_ms)
    );
    println!(
        "efficiency (bound / completion): {:.3}",
        bound_ms as f64 / completion_ms.max(1) as f64
    );
    println!(
        "longest single citizen's chain (its calls + {} s between them): {:.1} s; \
         efficiency against max(channel bound, chain): {:.3}",
        MIN_RETRY_DELAY_MS / 1000,
        s(chain_ms),
        bound_ms.max(chain_ms) as f64 / completion_ms.max(1) as f64
    );
    println!(
        "calls per hour: {:.0}; mean calls up: {:.1}, peak {peak} of {channels}",
        calls.len() as f64 * 3_600_000.0 / completion_ms.max(1) as f64,
        channel_ms as f64 / completion_ms.max(1) as f64
    );
    println!(
        "until the last citizen's first call ({:.1} s): {full_phase_up:.1} calls up on average ({:.1} % of {channels}); \
         after it, the tail of retries ({:.1} s): {tail_up:.1} up",
        s(last_first_call - t0),
        100.0 * full_phase_up / channels as f64,
        s(last_end - last_first_call),
    );
    println!(
        "call length INVITE → end: answered {n_answered} calls, mean {answered_len:.2} s; \
         not answered {n_other} calls, mean {other_len:.2} s"
    );
    // The city's congestion: every 503 (Retry-After: 1) pauses its node's new calls for a second.
    let congestion = events
        .iter()
        .filter(|e| e["event"] == "reject" && e["code"] == 503)
        .count();
    println!(
        "503 from the city: {congestion} ({:.1} % of calls), each pausing its node's new calls for 1 s",
        100.0 * congestion as f64 / calls.len().max(1) as f64
    );
    println!(
        "confirmed (a 1 in the city's log): {} of {subscribers} ({:.1} %); the API says {}",
        confirmed_at.len(),
        100.0 * confirmed_at.len() as f64 / subscribers.max(1) as f64,
        done["counts"]["confirmed"]
    );
    for p in [50.0, 90.0, 99.0] {
        println!(
            "time to {p:.0} % of the confirmed: {}",
            secs(percentile(&confirmed_at, p))
        );
    }
    println!(
        "health: {gaps} media gaps ≥ 300 ms heard by phones, {silence_deaths} calls ended by a phone \
         hearing nothing for 10 s, {overlaps} pairs of overlapping calls to one phone; machine CPU busy \
         {:.0} % during the campaign, of which the nodes and the city {:.2} CPU s/s",
        busy * 100.0,
        (ours1 - ours0) / s(api_done_ms).max(0.001)
    );
    println!(
        "media gaps: length p50 {} p99 {} max {}; position in the call's audio p10 {} p50 {} p90 {}",
        secs(percentile(&gap_ms, 50.0)),
        secs(percentile(&gap_ms, 99.0)),
        secs(gap_ms.last().copied()),
        secs(percentile(&gap_at, 10.0)),
        secs(percentile(&gap_at, 50.0)),
        secs(percentile(&gap_at, 90.0)),
    );
    drop(nodes);
    Ok(())
}
