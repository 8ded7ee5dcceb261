//! Cluster benchmarks of BENCHMARKS.md (issue 4), each side by side with etcd 3.4 (Debian
//! etcd-server) on the same machine in the same run. Figures, not pass/fail.
//!
//!   bench-cluster import   [--subscribers N] [--batch B] [--concurrency C]
//!   bench-cluster failover [--trials T]
//!
//! Both start three real `campanile up` processes (QUIC/mTLS between them, on loopback) and three
//! etcd members (on loopback), and kill them with SIGKILL. Needs the release binary
//! (`cargo build --release`); installs etcd-server when it is missing.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use campanile_chaos_tests::*;
use serde_json::{json, Value};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str, default: usize| usize_flag(&args, name, default);
    ensure_etcd()?;
    match args.first().map(String::as_str) {
        Some("import") => import(
            flag("--subscribers", 1_000_000)?,
            flag("--batch", 1_000)?,
            flag("--concurrency", 8)?,
        ),
        Some("failover") => failover(flag("--trials", 20)?),
        _ => bail!("usage: bench-cluster import [--subscribers N] [--batch B] [--concurrency C] | failover [--trials T]"),
    }
}

fn ensure_etcd() -> anyhow::Result<()> {
    if std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .is_ok()
    {
        return Ok(());
    }
    let s = std::process::Command::new("apt-get")
        .args(["install", "-y", "etcd-server", "etcd-client"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    anyhow::ensure!(s.success(), "apt-get install etcd-server failed");
    Ok(())
}

// ---- the two systems under test ----

struct Campanile {
    nodes: Vec<NodeProc>,
    _city: SimCityProc,
}

impl Campanile {
    fn start(dir: &Path) -> anyhow::Result<Campanile> {
        let plan = ClusterPlan::new(dir, 3)?;
        let city = SimCityProc::start(dir, "always-answer", 1)?;
        let trunk = format!("sip:{}", city.addr);
        let nodes = (1..=3)
            .map(|id| plan.start(id, &fast_node_config(4), &trunk))
            .collect::<anyhow::Result<Vec<_>>>()?;
        wait_voters(&nodes[0], 3, Duration::from_secs(60))?;
        Ok(Campanile { nodes, _city: city })
    }

    fn leader(&self) -> anyhow::Result<usize> {
        wait_for("a campanile leader", Duration::from_secs(30), || {
            self.nodes.iter().find_map(|n| {
                let v = cluster_view(n)?;
                v["leader"].as_u64().map(|l| l as usize - 1)
            })
        })
    }
}

struct Etcd {
    members: Vec<EtcdMember>,
}

struct EtcdMember {
    proc: Option<Proc>,
    client: std::net::SocketAddr,
    args: Vec<String>,
    log: std::path::PathBuf,
}

impl Etcd {
    fn start(dir: &Path) -> anyhow::Result<Etcd> {
        std::fs::create_dir_all(dir)?;
        let clients: Vec<_> = (0..3).map(|_| free_tcp()).collect();
        let peers: Vec<_> = (0..3).map(|_| free_tcp()).collect();
        let initial: Vec<String> = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("e{}=http://{p}", i + 1))
            .collect();
        let mut members = Vec::new();
        for i in 0..3 {
            let args: Vec<String> = [
                "--name",
                &format!("e{}", i + 1),
                "--data-dir",
                &dir.join(format!("etcd{}", i + 1)).display().to_string(),
                "--listen-client-urls",
                &format!("http://{}", clients[i]),
                "--advertise-client-urls",
                &format!("http://{}", clients[i]),
                "--listen-peer-urls",
                &format!("http://{}", peers[i]),
                "--initial-advertise-peer-urls",
                &format!("http://{}", peers[i]),
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
                "--max-txn-ops",
                "10000",
                "--max-request-bytes",
                "16777216",
                "--quota-backend-bytes",
                "8589934592",
                "--log-level",
                "warn",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let log = dir.join(format!("etcd{}.out", i + 1));
            members.push(EtcdMember {
                proc: Some(Proc::spawn("etcd", Path::new("etcd"), &args, log.clone())?),
                client: clients[i],
                args,
                log,
            });
        }
        let etcd = Etcd { members };
        etcd.leader()?;
        Ok(etcd)
    }

    fn status(&self, i: usize) -> Option<Value> {
        ureq::post(&format!(
            "http://{}/v3/maintenance/status",
            self.members[i].client
        ))
        .timeout(Duration::from_secs(2))
        .send_json(json!({}))
        .ok()?
        .into_json()
        .ok()
    }

    fn leader(&self) -> anyhow::Result<usize> {
        wait_for("an etcd leader", Duration::from_secs(30), || {
            (0..self.members.len()).find_map(|i| {
                self.members[i].proc.as_ref()?;
                let s = self.status(i)?;
                let me = s["header"]["member_id"].as_str()?.to_string();
                let leader = s["leader"].as_str()?;
                if me == leader {
                    return Some(i);
                }
                // Ask the others who they are, to map the leader's member id to an index.
                (0..self.members.len()).find(|j| {
                    self.members[*j].proc.is_some()
                        && self
                            .status(*j)
                            .is_some_and(|o| o["header"]["member_id"].as_str() == Some(leader))
                })
            })
        })
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &mut self.members[i];
        let args: Vec<String> = m
            .args
            .iter()
            .map(|a| {
                if a == "new" {
                    "existing".into()
                } else {
                    a.clone()
                }
            })
            .collect();
        m.proc = Some(Proc::spawn(
            "etcd",
            Path::new("etcd"),
            &args,
            m.log.clone(),
        )?);
        Ok(())
    }

    /// One transaction of puts through member `i`; true when acknowledged within `timeout`.
    fn put_batch(&self, i: usize, kvs: &[(String, String)], timeout: Duration) -> bool {
        let ops: Vec<Value> = kvs
            .iter()
            .map(|(k, v)| json!({"requestPut": {"key": b64(k.as_bytes()), "value": b64(v.as_bytes())}}))
            .collect();
        ureq::post(&format!("http://{}/v3/kv/txn", self.members[i].client))
            .timeout(timeout)
            .send_json(json!({ "success": ops }))
            .is_ok()
    }
}

fn b64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for (k, shift) in [18, 12, 6, 0].iter().enumerate() {
            if k <= c.len() {
                out.push(T[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn du(path: &Path) -> u64 {
    std::process::Command::new("du")
        .args(["-sb", &path.display().to_string()])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// The record both systems store per subscriber: what the import API takes.
fn record(i: usize) -> Value {
    json!({ "phone": format!("+39347{:07}", i), "name": "Maria Rossi", "language": "it", "zone": "centro" })
}

// ---- import ----

fn import(n: usize, batch: usize, concurrency: usize) -> anyhow::Result<()> {
    anyhow::ensure!(n <= 10_000_000, "at most 10,000,000 subscribers");
    let dir = tempfile::tempdir()?;
    println!("import of {n} subscribers in batches of {batch}, {concurrency} concurrent clients, round-robin over 3 members");

    let ours = Campanile::start(&dir.path().join("campanile"))?;
    let batches = n.div_ceil(batch);
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for _ in 0..concurrency {
            let next = next.clone();
            let nodes = &ours.nodes;
            handles.push(s.spawn(move || -> anyhow::Result<()> {
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        return Ok(());
                    }
                    let items: Vec<Value> =
                        (b * batch..((b + 1) * batch).min(n)).map(record).collect();
                    let node = &nodes[b % nodes.len()];
                    let (status, body) = node.post(
                        "/api/v1/subscribers/import",
                        &json!({ "subscribers": items }),
                    )?;
                    if status != 200 || body["created"].as_u64() != Some(items.len() as u64) {
                        bail!("batch {b} through {}: {status} {body}", node.http);
                    }
                }
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        Ok(())
    })?;
    let ours_secs = t0.elapsed().as_secs_f64();
    let ours_disk: u64 = ours
        .nodes
        .iter()
        .map(|n| du(&n.data.join("raft")))
        .sum::<u64>()
        / 3;
    let (_, v) = ours.nodes[2].get("/api/v1/cluster")?;
    println!(
        "campanile: {n} in {ours_secs:.1} s = {:.0}/s; disk {:.0} bytes/subscriber per node ({} MB); applied index {}",
        n as f64 / ours_secs,
        ours_disk as f64 / n as f64,
        ours_disk / 1_000_000,
        v["applied_index"]
    );
    drop(ours);

    let mut etcd = Etcd::start(&dir.path().join("etcd"))?;
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let mut handles = Vec::new();
        for _ in 0..concurrency {
            let next = next.clone();
            let etcd = &etcd;
            handles.push(s.spawn(move || -> anyhow::Result<()> {
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if b >= batches {
                        return Ok(());
                    }
                    let kvs: Vec<(String, String)> = (b * batch..((b + 1) * batch).min(n))
                        .map(|i| {
                            let r = record(i);
                            (
                                format!("/subscribers/{}", r["phone"].as_str().unwrap_or_default()),
                                r.to_string(),
                            )
                        })
                        .collect();
                    if !etcd.put_batch(b % 3, &kvs, Duration::from_secs(60)) {
                        bail!("etcd batch {b} failed");
                    }
                }
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        Ok(())
    })?;
    let etcd_secs = t0.elapsed().as_secs_f64();
    let etcd_disk: u64 = (1..=3)
        .map(|i| du(&dir.path().join(format!("etcd/etcd{i}"))))
        .sum::<u64>()
        / 3;
    println!(
        "etcd 3.4:  {n} in {etcd_secs:.1} s = {:.0}/s; disk {:.0} bytes/subscriber per node ({} MB)",
        n as f64 / etcd_secs,
        etcd_disk as f64 / n as f64,
        etcd_disk / 1_000_000
    );
    println!(
        "ratio: campanile takes {:.2}x etcd's time, {:.2}x its disk",
        ours_secs / etcd_secs,
        ours_disk as f64 / etcd_disk.max(1) as f64
    );
    for i in 0..3 {
        etcd.kill(i);
    }
    Ok(())
}

// ---- failover ----

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(name: &str, mut times: Vec<f64>) {
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name}: {} trials, p50 {:.3} s, p99 {:.3} s, min {:.3} s, max {:.3} s",
        times.len(),
        percentile(&times, 50.0),
        percentile(&times, 99.0),
        times.first().copied().unwrap_or(f64::NAN),
        times.last().copied().unwrap_or(f64::NAN),
    );
}

/// A failover client gives up on a write after this long and sends a new one (to the other
/// survivor), as an application with a deadline would; only acknowledged writes count.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Polls `new_leader` every 10 ms from `t0` until it answers true (at most 30 s); the seconds it took.
fn watch_election(t0: Instant, new_leader: impl Fn() -> bool) -> f64 {
    while t0.elapsed() < Duration::from_secs(30) {
        if new_leader() {
            return t0.elapsed().as_secs_f64();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f64::NAN
}

/// Writes with `attempt(k)` (k = 0, 1, ...) until one is acknowledged; returns the seconds since `t0`
/// and when the `election` watcher saw a new leader.
fn finish_trial(
    system: &str,
    trial: usize,
    t0: Instant,
    election: std::thread::JoinHandle<f64>,
    mut attempt: impl FnMut(usize) -> bool,
) -> anyhow::Result<(f64, f64)> {
    let mut k = 0;
    while !attempt(k) {
        k += 1;
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("{system} trial {trial}: no acknowledged write within 30 s");
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let elected = election.join().unwrap_or(f64::NAN);
    eprintln!("{system} trial {trial}: new leader after {elected:.3} s, write acknowledged after {secs:.3} s");
    Ok((secs, elected))
}

fn failover(trials: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    println!("leader failover: SIGKILL of the leader → next acknowledged write through a survivor, {trials} trials, each write attempt given up after {ATTEMPT_TIMEOUT:?}");
    let mut ours = Campanile::start(&dir.path().join("campanile"))?;
    let mut times = Vec::new();
    let mut elections = Vec::new();
    let mut phone = 0u32;
    for trial in 0..trials {
        let leader = ours.leader()?;
        ours.nodes[leader].kill();
        let t0 = Instant::now();
        let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        let election = {
            let views: Vec<std::net::SocketAddr> =
                survivors.iter().map(|i| ours.nodes[*i].http).collect();
            let token = ours.nodes[survivors[0]].token().to_string();
            std::thread::spawn(move || {
                watch_election(t0, || {
                    views.iter().any(|h| {
                        ureq::get(&format!("http://{h}/api/v1/cluster"))
                            .set("Authorization", &format!("Bearer {token}"))
                            .timeout(Duration::from_millis(500))
                            .call()
                            .ok()
                            .and_then(|r| r.into_json::<Value>().ok())
                            .and_then(|v| v["leader"].as_u64())
                            .is_some_and(|l| l as usize != leader + 1)
                    })
                })
            })
        };
        let (secs, elected) = finish_trial("campanile", trial, t0, election, |k| {
            phone += 1;
            let node = &ours.nodes[survivors[k % 2]];
            let r = node.post_within(
                "/api/v1/subscribers",
                &json!({ "phone": format!("+39349{phone:07}") }),
                ATTEMPT_TIMEOUT,
            );
            matches!(r, Ok((201, _)))
        })?;
        times.push(secs);
        elections.push(elected);
        ours.nodes[leader].restart()?;
        wait_voters(&ours.nodes[leader], 3, Duration::from_secs(30))?;
        // Let the restarted node catch up before the next kill.
        wait_for("all members caught up", Duration::from_secs(30), || {
            let v = ours.nodes.iter().find_map(|n| {
                let v = cluster_view(n)?;
                (v["leader"] == v["node"]).then_some(v)
            })?;
            v["members"]
                .as_array()?
                .iter()
                .all(|m| m["lag"] == 0)
                .then_some(())
        })?;
    }
    drop(ours);

    let mut etcd = Etcd::start(&dir.path().join("etcd"))?;
    let mut etcd_times = Vec::new();
    let mut etcd_elections = Vec::new();
    for trial in 0..trials {
        let leader = etcd.leader()?;
        let old = etcd
            .status(leader)
            .and_then(|s| s["header"]["member_id"].as_str().map(str::to_string))
            .unwrap_or_default();
        etcd.kill(leader);
        let t0 = Instant::now();
        let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        let election = {
            let clients: Vec<std::net::SocketAddr> =
                survivors.iter().map(|i| etcd.members[*i].client).collect();
            std::thread::spawn(move || {
                watch_election(t0, || {
                    clients.iter().any(|c| {
                        ureq::post(&format!("http://{c}/v3/maintenance/status"))
                            .timeout(Duration::from_millis(500))
                            .send_json(json!({}))
                            .ok()
                            .and_then(|r| r.into_json::<Value>().ok())
                            .and_then(|v| v["leader"].as_str().map(str::to_string))
                            .is_some_and(|l| l != old && l != "0")
                    })
                })
            })
        };
        let (secs, elected) = finish_trial("etcd", trial, t0, election, |k| {
            phone += 1;
            etcd.put_batch(
                survivors[k % 2],
                &[(format!("/failover/{phone}"), "x".into())],
                ATTEMPT_TIMEOUT,
            )
        })?;
        etcd_times.push(secs);
        etcd_elections.push(elected);
        etcd.restart(leader)?;
        wait_for("the etcd member back", Duration::from_secs(30), || {
            etcd.status(leader).map(|_| ())
        })?;
    }
    for i in 0..3 {
        etcd.kill(i);
    }
    let (a, b) = (times.clone(), etcd_times.clone());
    report(
        "new leader known, campanile (election timeout 300-600 ms, heartbeat 100 ms)",
        elections,
    );
    report(
        "new leader known, etcd 3.4  (election timeout 1000 ms, heartbeat 100 ms)",
        etcd_elections,
    );
    report("next acknowledged write, campanile", times);
    report("next acknowledged write, etcd 3.4 ", etcd_times);
    let med = |mut v: Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        percentile(&v, 50.0)
    };
    println!(
        "ratio of medians (next acknowledged write) campanile/etcd: {:.2}",
        med(a) / med(b)
    );
    Ok(())
}
