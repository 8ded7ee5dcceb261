//! The `campanile` command: run a node, the simulated city, a one-off test call, or the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use campanile::call::{place_call, CallContext, CallSpec};
use campanile::config::{self, Config};
use campanile::media;
use campanile::simcity::{self, SimCity, SimCityConfig};
use campanile::sip::endpoint::Endpoint;

#[derive(Parser)]
#[command(
    name = "campanile",
    version,
    about = "High-availability mass voice alerting"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node. With no trunk configured it dials a built-in simulated city (drill mode).
    Up {
        /// TOML configuration file (see `campanile config example`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (overrides node.data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// HTTP listen address (overrides http.listen).
        #[arg(long)]
        http: Option<SocketAddr>,
        /// SIP listen address (overrides sip.listen).
        #[arg(long)]
        sip: Option<SocketAddr>,
        /// SIP URI of the trunk (overrides trunk.uri); without one the node runs in drill mode.
        #[arg(long)]
        trunk: Option<String>,
        /// This node's id in the cluster (overrides node.id).
        #[arg(long)]
        node_id: Option<u64>,
        /// This node's data-centre label (overrides node.datacenter).
        #[arg(long)]
        datacenter: Option<String>,
        /// Raft address, QUIC with mutual TLS (overrides node.raft).
        #[arg(long)]
        raft: Option<SocketAddr>,
        /// Certificate folder made by `campanile certs issue` (overrides node.certs).
        #[arg(long)]
        certs: Option<PathBuf>,
        /// Any member's Raft address: join its cluster (overrides node.join).
        #[arg(long)]
        join: Option<SocketAddr>,
    },
    /// Run the simulated city: a carrier and a population of phones on one UDP port.
    SimCity {
        #[arg(long)]
        listen: SocketAddr,
        /// Ground-truth log, one JSON object per line.
        #[arg(long)]
        log: PathBuf,
        /// always-answer, realistic, or a profile TOML file.
        #[arg(long, default_value = "realistic")]
        profile: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Place one call and print its outcome: the trunk smoke test.
    Call {
        /// Where to send the INVITE (trunk or phone), host:port.
        #[arg(long)]
        via: String,
        /// The number to call.
        #[arg(long)]
        to: String,
        /// Text to speak.
        #[arg(long, conflicts_with = "wav", required_unless_present = "wav")]
        tts: Option<String>,
        /// Language of the text and the prompt.
        #[arg(long, default_value = "it")]
        lang: String,
        /// A WAV file to play instead of text.
        #[arg(long)]
        wav: Option<PathBuf>,
        /// Local SIP address to call from.
        #[arg(long, default_value = "127.0.0.1:0")]
        sip: SocketAddr,
        /// Seconds to ring before giving up.
        #[arg(long, default_value_t = 30.0)]
        ring_timeout: f64,
        /// Seconds to wait for a key press after the message.
        #[arg(long, default_value_t = 4.0)]
        confirm_wait: f64,
        /// Digest username if the trunk challenges; the password is read from CAMPANILE_TRUNK_PASSWORD.
        #[arg(long)]
        user: Option<String>,
        /// Also write the exact audio the call plays (8 kHz WAV) to this file, to listen to it.
        #[arg(long)]
        dump_audio: Option<PathBuf>,
        /// Send a re-INVITE this many seconds after the answer: checks that the trunk accepts the
        /// re-INVITE another node sends when it takes a call over.
        #[arg(long)]
        reinvite_after: Option<f64>,
        /// Do not listen for an answering machine (by default the message is left after its beep).
        #[arg(long)]
        no_machine_detection: bool,
        /// SIP transport: udp or tcp.
        #[arg(long, default_value = "udp", value_parser = ["udp", "tcp"])]
        transport: String,
        /// Send the call through this outbound proxy (host:port or SIP URI); --via is then the trunk
        /// named in the Request-URI.
        #[arg(long)]
        proxy: Option<String>,
        /// How the RTP pacer sends, as `[media] pacer_send`: io_uring, sendto or raw.
        #[arg(long, default_value = "io_uring")]
        pacer_send: campanile::media::socket::SendPath,
    },
    /// Start a node with the simulated city, register demo citizens and run one emergency alert.
    Demo(campanile::demo::DemoOptions),
    /// Benchmarks of BENCHMARKS.md (figures, not pass/fail).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        what: ConfigCmd,
    },
    /// The cluster's certificates: a CA, and one certificate per node (QUIC with mutual TLS).
    Certs {
        #[command(subcommand)]
        what: CertsCmd,
    },
    /// Console accounts, through any node's HTTP API with an API token.
    Admin {
        #[command(subcommand)]
        what: AdminCmd,
    },
    /// Look at or change the cluster through any node's HTTP API.
    Cluster {
        #[command(subcommand)]
        what: ClusterCmd,
    },
    /// Write a consistent backup of the replicated state (subscribers, campaigns, outcomes, token
    /// hashes) from a running node. The file holds personal data; it is created mode 0600.
    Backup {
        /// HTTP address of any node.
        #[arg(long, default_value = "127.0.0.1:8080")]
        via: String,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        auth: campanile::admin::TokenArgs,
    },
    /// Make a new data directory from a backup; start a node on it and the others join it.
    Restore {
        file: PathBuf,
        /// The new data directory (must not hold a store).
        #[arg(long, default_value = "campanile-data")]
        data: PathBuf,
        /// Id of the node that will run on it.
        #[arg(long, default_value_t = 1)]
        node_id: u64,
        /// Its Raft address, for a node that will be a cluster member.
        #[arg(long)]
        raft: Option<SocketAddr>,
    },
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Make a console account (the first admin of a comune, or a regional account). The password
    /// is read from CAMPANILE_PASSWORD or, when unset, from the first line of standard input.
    CreateOperator {
        #[arg(long)]
        username: String,
        /// admin, approver, operator, viewer or regional.
        #[arg(long, default_value = "admin")]
        role: String,
        /// The tenant it works for; repeat for a regional account.
        #[arg(long = "tenant", default_value = "default")]
        tenants: Vec<String>,
        /// The name the console shows (default: the username).
        #[arg(long)]
        display_name: Option<String>,
        /// HTTP address of any node.
        #[arg(long, default_value = "127.0.0.1:8080")]
        via: String,
        #[command(flatten)]
        auth: campanile::admin::TokenArgs,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Leader, term, and every member with its data centre, role, applied index and lag.
    Status {
        /// HTTP address of any node.
        #[arg(long, default_value = "127.0.0.1:8080")]
        via: String,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        auth: campanile::admin::TokenArgs,
    },
    /// Remove a node from the cluster; a waiting learner takes its vote, and its calls go to others.
    Remove {
        node: u64,
        /// HTTP address of any node.
        #[arg(long, default_value = "127.0.0.1:8080")]
        via: String,
        #[command(flatten)]
        auth: campanile::admin::TokenArgs,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Make the cluster CA (ca.pem, and ca.key readable only by its owner) in a new folder.
    Init {
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a node's certificate and key, signed by the CA, into the folder `up --certs` reads.
    Issue {
        /// The folder `certs init` made.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        node_id: u64,
        /// The host name or IP address other nodes reach this node by.
        #[arg(long)]
        host: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// N concurrent G.711 streams through the pacer against a bare sendmmsg loop.
    Media {
        /// Stream counts to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,2000,4000,5000")]
        streams: Vec<usize>,
        /// Seconds measured per row.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Pacer threads, and as many bare loops (default: one per core, as a node runs).
        #[arg(long)]
        threads: Option<usize>,
        /// Callees (a child process) send RTP back and every stream is read as a call reads it;
        /// compared with the same streams sent to sinks nobody reads, instead of the bare loop.
        #[arg(long)]
        answer: bool,
        /// The streams send from this many shared, unconnected sockets (each datagram naming its
        /// destination) instead of one connected socket each: what sharing would buy. Calls do not
        /// share sockets; each has its own port, for symmetric RTP.
        #[arg(long)]
        share_sockets: Option<usize>,
        /// How the pacer sends, each in turn for every stream count, comma-separated: io_uring,
        /// sendto, raw (the values of `[media] pacer_send`).
        #[arg(long, value_delimiter = ',', default_value = "io_uring,sendto")]
        send: Vec<campanile::media::socket::SendPath>,
    },
    /// The callees of `bench media --answer` (started by it, driven through stdin).
    #[command(hide = true)]
    MediaCallee {
        #[arg(long)]
        streams: usize,
    },
    /// Calls per second and CPU per call: campanile's UAC against `sipp -sn uac`, both to `sipp -sn uas`,
    /// and a one-loop sketch of the dialer's SIP parts (with and without RTP sockets) for reference.
    CallSetup {
        /// Offered rates in calls per second, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "250,500,1000")]
        rates: Vec<f64>,
        /// Seconds of calls per rate.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Commit many Raft entries through a one-node store and watch its size on disk stay bounded.
    LogSoak {
        #[arg(long, default_value_t = 10_000_000)]
        entries: u64,
        /// Store directory (default: a temporary one, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Concurrent writers.
        #[arg(long, default_value_t = 64)]
        writers: usize,
    },
    /// Memory a Raft snapshot and a backup of many subscribers add above the state itself.
    SnapshotMemory {
        #[arg(long, default_value_t = 1_000_000)]
        subscribers: usize,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print a complete, commented configuration with every default.
    Example,
    /// Validate a configuration file without starting anything.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo draws a progress bar; per-call log lines would drown it.
    let default_filter = match cli.command {
        Cmd::Demo(_) => "warn,campanile::node=info",
        _ => "info,openraft=warn,sled=warn",
    };
    init_tracing(default_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("campanile: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("campanile: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAMPANILE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colours only for a person at a terminal: journald, a log file or a log shipper would store
    // the escape codes, and `key=value` fields would no longer be greppable as written.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Certs {
            what: CertsCmd::Init { out },
        } => {
            campanile_cluster::tls::init_ca(&out)?;
            eprintln!(
                "cluster CA written to {}: keep ca.key offline, give each node only what `certs issue` makes",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Certs {
            what:
                CertsCmd::Issue {
                    ca,
                    node_id,
                    host,
                    out,
                },
        } => {
            if node_id == 0 {
                anyhow::bail!("--node-id must be 1 or more");
            }
            campanile_cluster::tls::issue(&ca, node_id, &host, &out)?;
            eprintln!(
                "certificate for node {node_id} ({host}) written to {}",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Admin {
            what:
                AdminCmd::CreateOperator {
                    username,
                    role,
                    tenants,
                    display_name,
                    via,
                    auth,
                },
        } => {
            let password = campanile::admin::read_password()?;
            let body = serde_json::json!({
                "username": username,
                "role": role,
                "tenants": tenants,
                "display_name": display_name,
                "password": password,
            });
            let out = tokio::task::spawn_blocking(move || {
                campanile::admin::create_operator(&via, body, &auth)
            })
            .await??;
            println!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cluster {
            what: ClusterCmd::Status { via, json, auth },
        } => {
            let out = tokio::task::spawn_blocking(move || {
                campanile::admin::cluster_status(&via, &auth, json)
            })
            .await??;
            print!("{out}");
            if !out.ends_with('\n') {
                println!();
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cluster {
            what: ClusterCmd::Remove { node, via, auth },
        } => {
            let out = tokio::task::spawn_blocking(move || {
                campanile::admin::cluster_remove(&via, node, &auth)
            })
            .await??;
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Backup { via, out, auth } => {
            let path = out.clone();
            let h =
                tokio::task::spawn_blocking(move || campanile::admin::backup(&via, &out, &auth))
                    .await??;
            println!(
                "backup of node {} at log index {} ({} subscribers) written to {}",
                h.node,
                h.applied_index,
                h.subscribers,
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Restore {
            file,
            data,
            node_id,
            raft,
        } => {
            if node_id == 0 {
                anyhow::bail!("--node-id must be 1 or more");
            }
            println!(
                "{}",
                campanile::admin::restore(&file, &data, node_id, raft)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Config {
            what: ConfigCmd::Example,
        } => {
            print!("{}", config::EXAMPLE);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Config {
            what: ConfigCmd::Check { file },
        } => {
            Config::load(&file)?;
            println!("{}: ok", file.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Up {
            config,
            data,
            http,
            sip,
            trunk,
            node_id,
            datacenter,
            raft,
            certs,
            join,
        } => {
            let mut cfg = match &config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            if let Some(d) = data {
                cfg.node.data = d;
            }
            if let Some(h) = http {
                cfg.http.listen = h;
            }
            if let Some(s) = sip {
                cfg.sip.listen = s;
            }
            if let Some(t) = trunk {
                cfg.trunk.uri = Some(t);
            }
            if let Some(n) = node_id {
                cfg.node.id = n;
            }
            if let Some(d) = datacenter {
                cfg.node.datacenter = d;
            }
            if raft.is_some() {
                cfg.node.raft = raft;
            }
            if certs.is_some() {
                cfg.node.certs = certs;
            }
            if join.is_some() {
                cfg.node.join = join;
            }
            cfg.validate()?;
            let node = campanile::node::Node::start(cfg).await?;
            eprintln!(
                "campanile is up: console http://{}/ · API token in {}",
                node.http_addr,
                node.token_path.display()
            );
            wait_for_signal().await;
            eprintln!("campanile: stopping");
            node.stop().await;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::SimCity {
            listen,
            log,
            profile,
            seed,
        } => {
            let profile = simcity::load_profile(&profile)?;
            let city = SimCity::start(SimCityConfig {
                listen,
                log: Some(log),
                profile,
                seed,
            })
            .await?;
            eprintln!("sim-city listening on {}", city.local_addr());
            wait_for_signal().await;
            city.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Call {
            via,
            to,
            tts,
            lang,
            wav,
            sip,
            ring_timeout,
            confirm_wait,
            user,
            dump_audio,
            reinvite_after,
            no_machine_detection,
            proxy,
            transport,
            pacer_send,
        } => {
            let credentials = match user {
                None => None,
                Some(u) => {
                    let pw = std::env::var(config::PASSWORD_ENV).map_err(|_| {
                        anyhow::anyhow!(
                            "--user needs the password in the environment variable {}",
                            config::PASSWORD_ENV
                        )
                    })?;
                    Some(campanile::sip::auth::Credentials::new(u, pw))
                }
            };
            // The next hop: the outbound proxy when there is one, else the trunk itself.
            let (flag, hop) = match &proxy {
                Some(p) => (
                    "--proxy",
                    campanile::sip::message::uri_hostport(campanile::sip::message::uri_of(p))
                        .unwrap_or(p)
                        .to_string(),
                ),
                None => ("--via", via.clone()),
            };
            let trunk = tokio::net::lookup_host(&hop)
                .await
                .ok()
                .and_then(|mut a| a.next())
                .with_context(|| format!("{flag}: cannot resolve `{hop}` (expected host:port)"))?;
            let audio = match (tts, wav) {
                (Some(text), _) => {
                    let cache = media::AudioCache::new(None);
                    tokio::task::spawn_blocking(move || {
                        media::message::prepare_tts_message(&text, &lang, &lang, &cache)
                    })
                    .await??
                }
                (None, Some(path)) => {
                    let bytes = std::fs::read(&path)
                        .with_context(|| format!("--wav: cannot read {}", path.display()))?;
                    media::message::prepare_wav(&bytes, &lang)
                        .with_context(|| format!("--wav {}", path.display()))?
                }
                (None, None) => anyhow::bail!("give --tts TEXT or --wav FILE"),
            };
            if let Some(path) = &dump_audio {
                std::fs::write(path, media::wav::encode_wav_8k(&audio.samples))
                    .with_context(|| format!("--dump-audio: cannot write {}", path.display()))?;
            }
            let transport = if transport == "tcp" {
                campanile::sip::endpoint::Transport::Tcp
            } else {
                campanile::sip::endpoint::Transport::Udp
            };
            let (endpoint, _unrouted) = Endpoint::bind_with(sip, transport)
                .await
                .with_context(|| format!("--sip: cannot bind {sip}"))?;
            let ctx = CallContext::sending(endpoint, pacer_send);
            let spec = CallSpec {
                to: to.clone(),
                trunk,
                trunk_host: via.clone(),
                from_user: "campanile".into(),
                display_name: "Campanile test call".into(),
                audio,
                ring_timeout: Duration::from_secs_f64(ring_timeout.clamp(1.0, 300.0)),
                confirm_wait: Duration::from_secs_f64(confirm_wait.clamp(0.0, 60.0)),
                require_confirmation: false,
                allow_opt_out: false,
                max_replays: 1,
                timers: Default::default(),
                credentials,
                reinvite_after: reinvite_after
                    .map(|s| Duration::from_secs_f64(s.clamp(0.0, 3600.0))),
                detect_machines: !no_machine_detection,
                listen_for_keys: true,
                outbound_proxy: proxy.as_deref().map(campanile::call::proxy_route),
            };
            let (_abort_tx, abort_rx) = tokio::sync::watch::channel(false);
            let outcome = place_call(&ctx, &spec, abort_rx).await;
            println!("{outcome}");
            Ok(if outcome.delivered() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Bench { what } => {
            match what {
                BenchCmd::Media {
                    streams,
                    seconds,
                    threads,
                    answer,
                    share_sockets,
                    send,
                } => {
                    let threads = threads.unwrap_or_else(|| {
                        std::thread::available_parallelism().map_or(1, |n| n.get())
                    });
                    campanile::bench::media(
                        &streams,
                        seconds.clamp(1.0, 600.0),
                        threads.clamp(1, 64),
                        answer,
                        share_sockets,
                        &send,
                    )
                    .await?
                }
                BenchCmd::MediaCallee { streams } => {
                    campanile::bench::media_callee(streams).await?
                }
                BenchCmd::CallSetup { rates, seconds } => {
                    campanile::bench::call_setup(&rates, seconds.clamp(1.0, 600.0)).await?
                }
                BenchCmd::LogSoak {
                    entries,
                    dir,
                    writers,
                } => campanile::bench::log_soak(entries, dir, writers.clamp(1, 1024)).await?,
                BenchCmd::SnapshotMemory { subscribers } => {
                    campanile::bench::snapshot_memory(subscribers.clamp(1, 10_000_000)).await?
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Demo(opts) => {
            campanile::demo::run(opts).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
