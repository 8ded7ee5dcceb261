//! `campanile demo`: a three-node cluster in drill mode (three data-centre labels, QUIC with mutual TLS
//! between the nodes, certificates made on the spot) sharing one simulated city, a thousand simulated
//! citizens, one emergency alert, a progress bar and a summary. It is the first thing a new operator or
//! engineer runs. `--nodes 1` runs a single node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use campanile_cluster::{
    Audience, CampaignSpec, CampaignState, Message, NewSubscriber, PhoneNumber, Priority,
    RetryPolicy,
};
use campanile_dashboard::Engine;
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::node::Node;

/// What `campanile demo` was asked for (its command-line flags).
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// How many simulated citizens to register.
    #[arg(long, default_value_t = 1000)]
    pub citizens: u32,
    /// Data directory; a fresh temporary one when omitted.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:5060")]
    pub sip: SocketAddr,
    /// Where the simulated city listens.
    #[arg(long, default_value = "127.0.0.1:5070")]
    pub city: SocketAddr,
    /// always-answer, realistic, or a profile TOML file.
    #[arg(long, default_value = "realistic")]
    pub profile: String,
    /// Keep the nodes and their consoles running after the alert.
    #[arg(long)]
    pub stay: bool,
    /// Cluster size: 1, 3 or 5 nodes on this machine. Node N uses the HTTP and SIP ports of node 1
    /// plus N-1.
    #[arg(long, default_value_t = 3)]
    pub nodes: u16,
}

/// Data-centre labels of the demo's nodes.
const DATACENTERS: [&str; 3] = ["dc-nord", "dc-centro", "dc-sud"];

fn plus(addr: SocketAddr, n: u16) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port().saturating_add(n))
}

/// A free UDP port on loopback for a node's Raft endpoint.
fn free_raft_addr() -> anyhow::Result<SocketAddr> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free Raft port")?;
    Ok(s.local_addr()?)
}

/// Starts the demo's nodes: node 1 runs the simulated city, the others dial it and join node 1.
async fn start_nodes(opts: &DemoOptions, data: &std::path::Path) -> anyhow::Result<Vec<Node>> {
    let base = |id: u16| -> anyhow::Result<Config> {
        let mut cfg = Config::default();
        cfg.node.id = id as u64;
        cfg.node.data = if opts.nodes == 1 {
            data.to_path_buf()
        } else {
            data.join(format!("node{id}"))
        };
        cfg.node.datacenter = DATACENTERS[(id as usize - 1) % DATACENTERS.len()].into();
        cfg.node.voters = opts.nodes as usize;
        cfg.http.listen = plus(opts.http, id - 1);
        cfg.sip.listen = plus(opts.sip, id - 1);
        cfg.simcity.listen = opts.city;
        cfg.simcity.profile = opts.profile.clone();
        if id > 1 {
            cfg.simcity.shared = Some(opts.city);
        }
        cfg.trunk.max_channels = 200;
        cfg.trunk.calls_per_second = 100;
        cfg.dialer.ring_timeout_s = 8.0;
        cfg.dialer.confirm_wait_s = 4.0;
        Ok(cfg)
    };
    if opts.nodes == 1 {
        let cfg = base(1)?;
        cfg.validate()?;
        return Ok(vec![Node::start(cfg).await?]);
    }
    let ca = data.join("certs").join("ca");
    if !ca.join("ca.pem").exists() {
        campanile_cluster::tls::init_ca(&ca)?;
    }
    let mut nodes = Vec::new();
    let mut first_raft = None;
    for id in 1..=opts.nodes {
        let mut cfg = base(id)?;
        let certs = data.join("certs").join(format!("node{id}"));
        if !certs.join("node.pem").exists() {
            campanile_cluster::tls::issue(&ca, id as u64, "127.0.0.1", &certs)?;
        }
        let raft = free_raft_addr()?;
        cfg.node.raft = Some(raft);
        cfg.node.certs = Some(certs);
        cfg.node.join = first_raft;
        cfg.validate()?;
        let node = Node::start(cfg)
            .await
            .with_context(|| format!("starting demo node {id}"))?;
        first_raft.get_or_insert(raft);
        nodes.push(node);
    }
    Ok(nodes)
}

const ZONES: [&str; 3] = ["centro", "porto", "collina"];

/// Runs the demo to the end of its alert.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=100_000).contains(&opts.citizens),
        "--citizens must be between 1 and 100000"
    );
    anyhow::ensure!(matches!(opts.nodes, 1 | 3 | 5), "--nodes must be 1, 3 or 5");
    let data = match opts.data.clone() {
        Some(d) => d,
        None => std::env::temp_dir().join(format!(
            "campanile-demo-{}-{}",
            std::process::id(),
            crate::dialer::now_ms()
        )),
    };
    let nodes = start_nodes(&opts, &data).await?;
    let node = &nodes[0];
    println!(
        "Campanile demo: drill mode, {} node{} ({}), data in {}, simulated city profile `{}`",
        nodes.len(),
        if nodes.len() == 1 { "" } else { "s" },
        nodes
            .iter()
            .map(|n| format!(
                "node {} in {} at http://{}/",
                n.cluster.node_id().0,
                n.engine.datacenter,
                n.http_addr
            ))
            .collect::<Vec<_>>()
            .join(", "),
        data.display(),
        opts.profile
    );
    // Citizens register through the last node and the alert is sent through the second: writes
    // through any node reach the leader, and every node shows the same state.
    let engine = nodes[nodes.len() - 1].engine.clone();
    let alert_engine = nodes[nodes.len().min(2) - 1].engine.clone();

    let started = Instant::now();
    let mut registered = 0u32;
    for chunk in (1..=opts.citizens).collect::<Vec<_>>().chunks(50) {
        let futures = chunk.iter().map(|n| {
            let engine = engine.clone();
            let n = *n;
            async move {
                let phone = PhoneNumber::parse(&format!("+39347{n:07}"))?;
                engine
                    .create_subscriber(NewSubscriber {
                        tenant: campanile_cluster::default_tenant(),
                        phone,
                        name: Some(format!("Cittadino {n}")),
                        language: "it".into(),
                        zone: Some(ZONES[n as usize % ZONES.len()].into()),
                        verified: true,
                        consent: None,
                    })
                    .await
                    .map_err(anyhow::Error::from)
            }
        });
        for r in futures_join(futures).await {
            match r {
                Ok(_) => registered += 1,
                // A re-run on the same data directory finds its citizens already there.
                Err(e) if e.to_string().contains("already registered") => registered += 1,
                Err(e) => return Err(e).context("registering demo citizens"),
            }
        }
    }
    println!(
        "Registered {registered} citizens in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let campaign = alert_engine
        .create_campaign(
            CampaignSpec {
                not_before_ms: None,
                deadline_ms: None,
                tenant: campanile_cluster::default_tenant(),
                title: "Allerta rossa: piena del fiume".into(),
                message: Message::Tts {
                    text: "Attenzione. Allerta meteo rossa. Il fiume è in piena: \
                       allontanatevi dagli argini e salite ai piani alti."
                        .into(),
                    language: "it".into(),
                },
                audience: Audience::All,
                priority: Priority::Emergency,
                require_confirmation: true,
                retry: RetryPolicy {
                    max_attempts: 6,
                    busy_delay_ms: 5_000,
                    no_answer_delay_ms: 8_000,
                    failure_delay_ms: 5_000,
                    ..RetryPolicy::default_for(Priority::Emergency)
                },
            },
            None,
        )
        .await?;
    let campaign = alert_engine.start_campaign(campaign.id).await?;
    let alert_started = Instant::now();
    let bar = ProgressBar::new(campaign.counts.targeted);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40.green/white}] {pos}/{len} final · {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let final_view = loop {
        // Read where the alert was started: that node has applied its start (read your writes).
        let c = alert_engine.campaign(campaign.id).await?;
        let k = c.counts;
        bar.set_position(k.targeted - k.open());
        bar.set_message(format!(
            "{} confirmed, {} ringing now, {} waiting to retry",
            k.confirmed, k.in_flight, k.pending
        ));
        if matches!(c.state, CampaignState::Completed | CampaignState::Cancelled) {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    bar.finish();
    let k = final_view.counts;
    let truth = count_sim_dtmf(&node.data.join("sim-city.log"));
    println!();
    println!(
        "Alert \"{}\" {}",
        final_view.spec.title,
        final_view.state.as_str()
    );
    println!(
        "  reached in {:.1} s: {} targeted, {} confirmed, {} exhausted, {} invalid numbers",
        alert_started.elapsed().as_secs_f64(),
        k.targeted,
        k.confirmed,
        k.exhausted,
        k.invalid
    );
    println!(
        "  {} calls placed, {:.0}% answered; the simulated city logged {} key presses of 1",
        k.attempts,
        k.answer_ratio() * 100.0,
        truth
    );
    if nodes.len() > 1 {
        let status = node.cluster.status();
        // Each node first catches up to everything committed (read index), then is compared.
        for n in &nodes {
            if let Err(e) = n.cluster.linearizable().await {
                println!("  node {} could not catch up: {e}", n.cluster.node_id().0);
            }
        }
        let same = nodes.iter().all(|n| {
            n.cluster
                .read(|s| s.campaign(final_view.id).map(|c| c.counts))
                == Some(k)
        });
        println!(
            "  cluster: {} nodes, leader node {}, term {}; every node holds the same outcome: {}",
            nodes.len(),
            status
                .leader
                .map(|l| l.to_string())
                .unwrap_or_else(|| "none".into()),
            status.term,
            if same { "yes" } else { "NO" }
        );
    }
    if opts.stay {
        println!(
            "  console: http://{}/   API token: {}",
            node.http_addr,
            node.token_path.display()
        );
        println!("Press Ctrl-C to stop.");
        let _ = tokio::signal::ctrl_c().await;
    } else {
        println!(
            "  the console was at http://{}/ during the run; add --stay to keep it open afterwards",
            node.http_addr
        );
        println!(
            "  data, ground-truth log and API tokens: {}",
            data.display()
        );
    }
    // Followers first, so the leader does not see its peers vanish mid-shutdown.
    for n in nodes.into_iter().rev() {
        n.stop().await;
    }
    Ok(())
}

async fn futures_join<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// Distinct numbers that pressed 1 according to the simulated city's own log.
fn count_sim_dtmf(path: &std::path::Path) -> usize {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0;
    };
    let mut numbers = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            if v["event"] == "dtmf" {
                if let Some(n) = v["number"].as_str() {
                    numbers.insert(n.to_string());
                }
            }
        }
    }
    numbers.len()
}
