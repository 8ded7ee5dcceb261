//! A running node: replicated state, SIP endpoint, pacer, dialer, HTTP, and in drill mode the built-in
//! simulated city. `up` and `demo` both start one of these.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use campanile_cluster::{Cluster, NodeId};
use tokio::sync::{mpsc, watch};

use crate::call::CallContext;
use crate::config::Config;
use crate::dialer::{self, DialerConfig};
use crate::engine::NodeEngine;
use crate::media::{pacer::Pacer, AudioCache};
use crate::metrics::Metrics;
use crate::simcity::{self, SimCity, SimCityConfig};
use crate::sip::endpoint::{Endpoint, Inbound, StrayAnswers};
use crate::sip::message::{response_bytes, response_to, Method, SipMessage};

/// Handles of a running node.
pub struct Node {
    pub cluster: Cluster,
    pub engine: Arc<NodeEngine>,
    pub http_addr: SocketAddr,
    pub token_path: PathBuf,
    pub admin_token: String,
    pub simcity: Option<SimCity>,
    /// The node's data directory.
    pub data: PathBuf,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

const DRILL_BANNER: &str = "DRILL MODE: no SIP trunk is configured; calls go to the built-in simulated city and no real phone rings";

impl Node {
    /// Starts every part of the node from a validated config.
    pub async fn start(cfg: Config) -> anyhow::Result<Node> {
        let data = cfg.node.data.clone();
        std::fs::create_dir_all(&data)
            .with_context(|| format!("cannot create data directory {}", data.display()))?;
        let (token_path, admin_token) = admin_token(&data)?;
        crate::media::tts::check_available()
            .context("text-to-speech is required to play alerts")?;
        let cluster = open_cluster(&cfg, &data).await?;
        let metrics = Metrics::new();

        let (simcity, trunk, trunk_host, drill) = match &cfg.trunk.uri {
            Some(uri) => {
                let hp = crate::sip::message::uri_hostport(uri)
                    .unwrap_or_default()
                    .to_string();
                // With an outbound proxy, every request's next hop is the proxy.
                let (key, hop) = match &cfg.trunk.outbound_proxy {
                    Some(proxy) => (
                        "trunk.outbound_proxy",
                        crate::sip::message::uri_hostport(proxy)
                            .unwrap_or_default()
                            .to_string(),
                    ),
                    None => ("trunk.uri", hp.clone()),
                };
                let addr = tokio::net::lookup_host(&hop)
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .with_context(|| format!("{key}: cannot resolve `{hop}`"))?;
                (None, addr, hp, None)
            }
            None if cfg.simcity.shared.is_some() => {
                tracing::warn!("{DRILL_BANNER}");
                let addr = cfg.simcity.shared.unwrap_or(cfg.simcity.listen);
                (None, addr, addr.to_string(), Some(DRILL_BANNER.to_string()))
            }
            None => {
                tracing::warn!("{DRILL_BANNER}");
                let profile =
                    simcity::load_profile(&cfg.simcity.profile).context("simcity.profile")?;
                let city = SimCity::start(SimCityConfig {
                    listen: cfg.simcity.listen,
                    log: Some(data.join("sim-city.log")),
                    profile,
                    seed: cfg.simcity.seed,
                })
                .await
                .with_context(|| {
                    format!("cannot start the simulated city on {}", cfg.simcity.listen)
                })?;
                let addr = city.local_addr();
                (
                    Some(city),
                    addr,
                    addr.to_string(),
                    Some(DRILL_BANNER.to_string()),
                )
            }
        };
        metrics.set_drill_mode(drill.is_some());
        metrics.set_trunk(&cfg.trunk.name, cfg.trunk.max_channels);

        // The simulated city speaks UDP; a real trunk speaks what trunk.transport says.
        let transport = match (&cfg.trunk.uri, cfg.trunk.sip_transport()) {
            (Some(_), Some(t)) => t,
            _ => crate::sip::endpoint::Transport::Udp,
        };
        let (endpoint, unrouted) = Endpoint::bind_with(cfg.sip.listen, transport)
            .await
            .with_context(|| {
                format!("cannot bind SIP on {} (sip.listen / --sip)", cfg.sip.listen)
            })?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        crate::watchdog::spawn(metrics.clone(), shutdown_rx.clone());
        // Answers to INVITEs no call holds any more come from where the INVITEs went.
        let stray = StrayAnswers::new(trunk.ip(), cfg.timers());
        let mut tasks = vec![
            tokio::spawn(answer_unrouted(endpoint.clone(), unrouted, stray)),
            tokio::spawn(crate::clockwatch::watch(
                cluster.clone(),
                metrics.clone(),
                shutdown_rx.clone(),
            )),
        ];

        let ctx = CallContext {
            endpoint: endpoint.clone(),
            pacer: Pacer::spawn_sending(cfg.media.pacer_send),
            ports: cfg.media.rtp_ports()?,
        };
        let cache = Arc::new(AudioCache::new(Some(data.join("audio-cache"))));
        let dialer_cfg = DialerConfig {
            node: NodeId(cfg.node.id),
            trunk,
            trunk_host,
            max_channels: cfg.trunk.max_channels,
            calls_per_second: cfg.trunk.calls_per_second,
            ring_timeout: Duration::from_secs_f64(cfg.dialer.ring_timeout_s),
            confirm_wait: Duration::from_secs_f64(cfg.dialer.confirm_wait_s),
            batch: Duration::from_millis(cfg.dialer.batch_ms),
            max_replays: cfg.dialer.max_replays,
            from_user: cfg.caller_id.number.clone(),
            display_name: cfg.caller_id.display_name.clone(),
            timers: cfg.timers(),
            credentials: cfg.credentials()?,
            outbound_proxy: cfg
                .trunk
                .outbound_proxy
                .as_deref()
                .map(crate::call::proxy_route),
            options_interval: (cfg.trunk.options_interval_s > 0.0)
                .then(|| Duration::from_secs_f64(cfg.trunk.options_interval_s)),
            lease: Default::default(),
        };
        let verifier = crate::verify::Verifier::new(dialer_cfg.clone(), ctx.clone());
        let pacer = ctx.pacer.clone();
        tasks.push(dialer::spawn(
            dialer_cfg,
            cluster.clone(),
            ctx,
            cache,
            metrics.clone(),
            shutdown_rx.clone(),
        ));

        let engine = Arc::new(NodeEngine {
            cluster: cluster.clone(),
            metrics,
            endpoint,
            pacer,
            admin_token: admin_token.clone(),
            drill,
            datacenter: cfg.node.datacenter.clone(),
            verifier,
            public_url: Some(cfg.http.public_url.trim().trim_end_matches('/').to_string())
                .filter(|u| !u.is_empty()),
        });
        let listener = tokio::net::TcpListener::bind(cfg.http.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot bind HTTP on {} (http.listen / --http)",
                    cfg.http.listen
                )
            })?;
        let http_addr = listener.local_addr()?;
        register(&cluster, &cfg, &admin_token, http_addr).await?;
        let mut http_shutdown = shutdown_rx.clone();
        let dyn_engine: Arc<dyn campanile_dashboard::Engine> = engine.clone();
        tasks.push(tokio::spawn(async move {
            let stop = async move {
                let _ = http_shutdown.wait_for(|s| *s).await;
            };
            if let Err(e) = campanile_dashboard::serve(listener, dyn_engine, stop).await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }));
        tracing::info!(
            http = %http_addr,
            sip = %cfg.sip.listen,
            data = %data.display(),
            token_file = %token_path.display(),
            "campanile node is up"
        );
        Ok(Node {
            cluster,
            engine,
            http_addr,
            token_path,
            admin_token,
            simcity,
            data,
            shutdown,
            tasks,
        })
    }

    /// Stops dialing (handing answered calls to the other nodes, `dialer::leave`), HTTP and Raft.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
        if let Some(city) = self.simcity {
            city.shutdown().await;
        }
        if let Err(e) = self.cluster.shutdown().await {
            tracing::warn!(error = %e, "Raft shutdown reported an error");
        }
    }
}

/// Reads `DATA/admin-token`, creating it (mode 0600) with a random token on first start.
fn admin_token(data: &Path) -> anyhow::Result<(PathBuf, String)> {
    let path = data.join("admin-token");
    if path.exists() {
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_string();
        anyhow::ensure!(
            token.len() >= 32,
            "{} is too short to be an admin token; delete it to have a new one made",
            path.display()
        );
        return Ok((path, token));
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{token}").with_context(|| format!("cannot write {}", path.display()))?;
    tracing::info!(path = %path.display(), "wrote a new admin API token (send it as Authorization: Bearer)");
    Ok((path, token))
}

/// Makes this node's admin token valid on every node (the cluster stores its SHA-256, never the
/// token) and announces the node's data centre and addresses. Both are idempotent and run on every
/// start; they need the cluster to accept writes, so a member without quorum waits here, bounded.
async fn register(
    cluster: &Cluster,
    cfg: &Config,
    admin_token: &str,
    http_addr: SocketAddr,
) -> anyhow::Result<()> {
    let at_ms = crate::dialer::now_ms();
    let sha256 = crate::engine::token_sha256(admin_token);
    let commands = [
        (cluster.read(|s| s.token(&sha256).is_none())).then(|| {
            campanile_cluster::Command::AddToken {
                token: campanile_cluster::ApiToken {
                    scope: None,
                    sha256,
                    label: format!("admin token of node {}", cfg.node.id),
                    created_ms: at_ms,
                },
            }
        }),
        Some(campanile_cluster::Command::RegisterNode {
            at_ms,
            node: campanile_cluster::NodeInfo {
                id: NodeId(cfg.node.id),
                datacenter: cfg.node.datacenter.clone(),
                raft_addr: cfg
                    .node
                    .raft
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "local".into()),
                http_addr: http_addr.to_string(),
                registered_ms: at_ms,
                started_ms: at_ms,
            },
        }),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for cmd in commands.into_iter().flatten() {
        loop {
            match cluster.write(cmd.clone()).await {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "cannot register this node with the cluster yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e).context("cannot register this node with the cluster"),
            }
        }
    }
    Ok(())
}

/// Requests for no call of ours (we place calls, we do not take them yet), and answers to INVITEs
/// no call holds any more (ACKed and ended, see [`StrayAnswers`]).
async fn answer_unrouted(
    endpoint: Endpoint,
    mut rx: mpsc::Receiver<Inbound>,
    mut stray: StrayAnswers,
) {
    while let Some(Inbound { msg, from }) = rx.recv().await {
        let req = match msg {
            SipMessage::Request(req) => req,
            SipMessage::Response(resp) => {
                stray.answer(&endpoint, &resp, from).await;
                continue;
            }
        };
        let code = match req.method {
            Method::Ack => continue,
            Method::Options => 200,
            Method::Invite => 480,
            _ => 481,
        };
        let resp = response_to(&req, code, Some("campanile"), &[], None);
        let _ = endpoint.send(&response_bytes(&resp), from).await;
    }
}

/// Compaction and membership settings from the config: keep a tenth of a snapshot interval of log
/// behind each snapshot for followers that lag a little.
fn cluster_options(cfg: &Config) -> campanile_cluster::ClusterOptions {
    campanile_cluster::ClusterOptions {
        snapshot_every: cfg.node.snapshot_every,
        keep_behind_snapshot: (cfg.node.snapshot_every / 10).max(5),
        purge_batch: (cfg.node.snapshot_every / 40).clamp(1, 256),
        voters: cfg.node.voters,
    }
}

/// The replicated store: alone, or a member of a multi-node cluster over QUIC with mutual TLS.
async fn open_cluster(cfg: &Config, data: &std::path::Path) -> anyhow::Result<Cluster> {
    let id = NodeId(cfg.node.id);
    let (Some(raft_addr), Some(certs)) = (cfg.node.raft, cfg.node.certs.as_ref()) else {
        return Cluster::open_with(id, data, cluster_options(cfg))
            .await
            .context("cannot open the replicated store");
    };
    let identity = campanile_cluster::tls::NodeIdentity::load(certs)
        .with_context(|| format!("node.certs {}", certs.display()))?;
    if identity.node_id != cfg.node.id {
        anyhow::bail!(
            "node.certs {} holds node {}'s certificate, but this is node {}",
            certs.display(),
            identity.node_id,
            cfg.node.id
        );
    }
    let endpoint = campanile_cluster::tls::endpoint(raft_addr, &identity)
        .with_context(|| format!("cannot open the Raft endpoint on {raft_addr}"))?;
    let cluster = Cluster::open_member(
        id,
        data,
        cluster_options(cfg),
        campanile_cluster::MemberNet {
            endpoint,
            raft_addr,
            bootstrap: cfg.node.join.is_none(),
        },
    )
    .await
    .context("cannot open the replicated store")?;
    if let Some(seed) = cfg.node.join {
        // The seed may be starting too: retry for a bounded time.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match cluster.join(seed).await {
                Ok(()) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::warn!(error = %e, "cannot join yet; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e).context(format!("cannot join the cluster through {seed}")),
            }
        }
    }
    let leader = cluster
        .wait_for_leader(Duration::from_secs(30))
        .await
        .context("no cluster leader")?;
    tracing::info!(node = cfg.node.id, leader, raft = %raft_addr, datacenter = %cfg.node.datacenter, "cluster member up");
    Ok(cluster)
}
