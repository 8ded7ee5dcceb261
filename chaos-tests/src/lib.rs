//! Harness for multi-process tests: start real `campanile` processes and peers on loopback, talk to them
//! over their real interfaces, kill them with SIGKILL, and read the simulated city's ground-truth log.
//!
//! Every process started here is killed when its handle is dropped, so a failing test leaves nothing
//! running. Waits are polls with deadlines, never fixed sleeps.

pub mod browser;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// The `campanile` binary under test: `$CAMPANILE_BIN`, or the workspace's release or debug build.
pub fn campanile_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CAMPANILE_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("campanile");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "campanile binary not found: run `cargo build --release -p campanile` or set CAMPANILE_BIN"
    );
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback TCP port")
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free loopback UDP port")
}

/// `count` runs of `len` consecutive loopback ports, each port free for both TCP and UDP, no two
/// runs overlapping; returns each run's first address. For commands that give node N the port of
/// node 1 plus N-1 (`campanile demo`) and bind TCP and UDP on a SIP port: two separately picked
/// free ports are often neighbours, so node 2's HTTP port could be node 1's SIP port.
pub fn free_port_runs(count: usize, len: u16) -> Vec<SocketAddr> {
    let mut held = Vec::new();
    let mut runs = Vec::new();
    for _ in 0..1000 {
        if runs.len() == count {
            return runs;
        }
        let Ok(first) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(base) = first.local_addr() else {
            continue;
        };
        let run: Option<Vec<_>> = (0..len)
            .map(|i| {
                let addr = SocketAddr::new(base.ip(), base.port().checked_add(i)?);
                let tcp = if i == 0 {
                    None
                } else {
                    Some(TcpListener::bind(addr).ok()?)
                };
                Some((tcp, UdpSocket::bind(addr).ok()?))
            })
            .collect();
        if let Some(run) = run {
            held.push((first, run));
            runs.push(base);
        }
    }
    panic!("no {count} runs of {len} free loopback ports in 1000 tries");
}

/// A test's working directory (nodes' data and logs, the city's ground truth): removed when the
/// test passes, kept when it fails, with its path on stderr, so a failure that shows once in ten
/// runs can be read afterwards instead of being deleted with it.
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    pub fn path(&self) -> &Path {
        self.0.as_ref().map_or(Path::new(""), |d| d.path())
    }
}

/// A fresh [`TestDir`] under the system's temporary directory.
pub fn test_dir() -> TestDir {
    TestDir(Some(
        tempfile::Builder::new()
            .prefix("campanile-test-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a test directory: {e}")),
    ))
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            if std::thread::panicking() {
                eprintln!(
                    "the failed test's directory is kept: {}",
                    d.keep().display()
                );
            }
        }
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args`, sending stdout and stderr to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        Proc::spawn_with_env(name, program, args, log, &[])
    }

    /// `spawn` with more environment variables.
    pub fn spawn_with_env(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        env: &[(String, String)],
    ) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("CAMPANILE_LOG", "info,openraft=warn,sled=warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (what systemd sends to stop a service); the process is not reaped: `wait_exit`.
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet (so not reused).
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// Exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let until = Instant::now() + deadline;
        loop {
            if let Some(s) = self.try_exit() {
                self.child = None;
                return Ok(s);
            }
            if Instant::now() > until {
                bail!("{} did not exit within {deadline:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 100 ms until it returns `Some` or `deadline` passes.
pub fn wait_for<T>(
    what: &str,
    deadline: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > until {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A running `campanile sim-city`.
pub struct SimCityProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl SimCityProc {
    pub fn start(dir: &Path, profile: &str, seed: u64) -> anyhow::Result<SimCityProc> {
        SimCityProc::start_at(dir, profile, seed, free_udp())
    }

    /// Starts the city on a given address (to bring a killed one back where the node expects it).
    pub fn start_at(
        dir: &Path,
        profile: &str,
        seed: u64,
        addr: SocketAddr,
    ) -> anyhow::Result<SimCityProc> {
        let log = dir.join("sim-city.jsonl");
        let proc = Proc::spawn(
            "sim-city",
            &campanile_bin(),
            &[
                "sim-city".into(),
                "--listen".into(),
                addr.to_string(),
                "--log".into(),
                log.display().to_string(),
                "--profile".into(),
                profile.into(),
                "--seed".into(),
                seed.to_string(),
            ],
            dir.join("sim-city.out"),
        )?;
        let mut city = SimCityProc { proc, addr, log };
        wait_for("sim-city to listen", Duration::from_secs(20), || {
            if city.proc.try_exit().is_some() {
                return Some(Err(anyhow::anyhow!(
                    "sim-city exited: {}",
                    city.proc.log_text()
                )));
            }
            city.proc.log_text().contains("listening").then_some(Ok(()))
        })??;
        Ok(city)
    }

    /// The ground-truth log, parsed.
    pub fn events(&self) -> Vec<Value> {
        read_jsonl(&self.log)
    }
}

/// Parses a JSON-lines file, skipping a torn last line.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Numbers for which the simulated city logged a DTMF key press.
pub fn numbers_that_pressed(events: &[Value]) -> BTreeSet<String> {
    events
        .iter()
        .filter(|e| e["event"] == "dtmf")
        .filter_map(|e| e["number"].as_str().map(String::from))
        .collect()
}

/// Per number, the events in order.
pub fn events_by_number(events: &[Value]) -> BTreeMap<String, Vec<Value>> {
    let mut m: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for e in events {
        if let Some(n) = e["number"].as_str() {
            m.entry(n.to_string()).or_default().push(e.clone());
        }
    }
    m
}

/// One phone's events in the city's log, a line each: milliseconds since `t0`, the event, the
/// calling node, the Call-ID's first characters and the event's other fields. For a failure's
/// message, where the raw events would be ten times as long and cut off.
pub fn city_story(events: &[Value], number: &str, t0: u64) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["number"] == number)
        .map(|e| {
            let t = e["t_ms"].as_u64().unwrap_or(0).saturating_sub(t0);
            let call: String = e["call_id"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(6)
                .collect();
            let rest: Vec<String> = e
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| {
                    !matches!(
                        k.as_str(),
                        "t_ms" | "event" | "from" | "number" | "call_id" | "caller"
                    )
                })
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!(
                "{t:>8} {:<12} {} {call} {}",
                e["event"].as_str().unwrap_or("?"),
                e["from"].as_str().unwrap_or("?"),
                rest.join(" ")
            )
        })
        .collect()
}

/// The lines of the nodes' logs that `keep` picks (cut at 400 characters), each with its node's
/// SIP address in front.
pub fn node_lines(nodes: &[NodeProc], keep: impl Fn(&str) -> bool) -> Vec<String> {
    nodes
        .iter()
        .flat_map(|n| {
            n.proc
                .log_text()
                .lines()
                .filter(|l| keep(l))
                .map(|l| format!("{}: {}", n.sip, l.chars().take(400).collect::<String>()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every line of the nodes' logs about subscriber `id` (`subscriber=sub-<id>`).
pub fn node_lines_about(nodes: &[NodeProc], id: u64) -> Vec<String> {
    let field = format!("subscriber=sub-{id}");
    node_lines(nodes, |l| l.split_whitespace().any(|w| w == field))
}

/// A running `campanile up` node with its data directory and API token.
pub struct NodeProc {
    pub proc: Proc,
    pub http: SocketAddr,
    pub sip: SocketAddr,
    pub data: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    token: String,
}

/// Starts `campanile` with `args` and waits until its HTTP answers /healthz.
fn launch(
    dir: &Path,
    args: &[String],
    env: &[(String, String)],
    http: SocketAddr,
) -> anyhow::Result<Proc> {
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let mut proc = Proc::spawn_with_env(
        "campanile up",
        &campanile_bin(),
        args,
        dir.join(format!("node-{n}.out")),
        env,
    )?;
    wait_for("the node's /healthz", Duration::from_secs(30), || {
        if let Some(s) = proc.try_exit() {
            return Some(Err(anyhow::anyhow!(
                "node exited with {s}: {}",
                proc.log_text()
            )));
        }
        ureq::get(&format!("http://{http}/healthz"))
            .timeout(Duration::from_secs(2))
            .call()
            .ok()
            .map(|_| Ok(()))
    })??;
    Ok(proc)
}

fn read_token(data: &Path) -> anyhow::Result<String> {
    let path = data.join("admin-token");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string())
}

impl NodeProc {
    /// Writes `config_toml` beside the data directory and starts `campanile up` with it.
    pub fn start(dir: &Path, config_toml: &str, trunk: &str) -> anyhow::Result<NodeProc> {
        NodeProc::start_with(dir, config_toml, trunk, &[])
    }

    /// `start` with more `up` flags (a cluster member's --node-id, --raft, --certs, --join ...).
    pub fn start_with(
        dir: &Path,
        config_toml: &str,
        trunk: &str,
        extra: &[String],
    ) -> anyhow::Result<NodeProc> {
        NodeProc::start_with_env(dir, config_toml, trunk, extra, &[])
    }

    /// `start_with` with more environment variables (kept for `restart`).
    pub fn start_with_env(
        dir: &Path,
        config_toml: &str,
        trunk: &str,
        extra: &[String],
        env: &[(String, String)],
    ) -> anyhow::Result<NodeProc> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("campanile.toml");
        std::fs::write(&config, config_toml)?;
        let data = dir.join("data");
        let (http, sip) = (free_tcp(), free_udp());
        let args = vec![
            "up".into(),
            "--config".into(),
            config.display().to_string(),
            "--data".into(),
            data.display().to_string(),
            "--http".into(),
            http.to_string(),
            "--sip".into(),
            sip.to_string(),
            "--trunk".into(),
            trunk.to_string(),
        ];
        let args: Vec<String> = args.into_iter().chain(extra.iter().cloned()).collect();
        let proc = launch(dir, &args, env, http)?;
        let token = read_token(&data)?;
        Ok(NodeProc {
            proc,
            http,
            sip,
            data,
            dir: dir.to_path_buf(),
            args,
            env: env.to_vec(),
            token,
        })
    }

    /// SIGKILLs the node.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts the node again on the same data directory and addresses.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc = launch(&self.dir, &self.args, &self.env, self.http)?;
        self.token = read_token(&self.data)?;
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    /// GET an API path; returns (status, JSON body).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = ureq::get(&self.url(path))
            .set("Authorization", &self.auth())
            .timeout(Duration::from_secs(30))
            .call();
        into_json(r)
    }

    /// POST JSON to an API path; returns (status, JSON body).
    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        self.post_within(path, body, Duration::from_secs(30))
    }

    /// PUT JSON to an API path; returns (status, JSON body).
    pub fn put(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = ureq::put(&self.url(path))
            .set("Authorization", &self.auth())
            .timeout(Duration::from_secs(30))
            .send_json(body.clone());
        into_json(r)
    }

    /// DELETE an API path; returns (status, JSON body).
    pub fn delete(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = ureq::delete(&self.url(path))
            .set("Authorization", &self.auth())
            .timeout(Duration::from_secs(30))
            .call();
        into_json(r)
    }

    /// `post`, giving up on the answer after `timeout`.
    pub fn post_within(
        &self,
        path: &str,
        body: &Value,
        timeout: Duration,
    ) -> anyhow::Result<(u16, Value)> {
        let r = ureq::post(&self.url(path))
            .set("Authorization", &self.auth())
            .timeout(timeout)
            .send_json(body.clone());
        into_json(r)
    }

    /// POST raw bytes (`content_type`) to an API path; returns (status, JSON body).
    pub fn post_bytes(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, Value)> {
        let r = ureq::post(&self.url(path))
            .set("Authorization", &self.auth())
            .set("Content-Type", content_type)
            .timeout(Duration::from_secs(30))
            .send_bytes(body);
        into_json(r)
    }

    /// Raw text of an unauthenticated path (e.g. /metrics).
    pub fn text(&self, path: &str) -> anyhow::Result<String> {
        Ok(ureq::get(&self.url(path))
            .timeout(Duration::from_secs(30))
            .call()?
            .into_string()?)
    }

    /// Registers `n` subscribers with numbers `+39347` + 7 digits from `first`.
    pub fn register(&self, first: u32, n: u32) -> anyhow::Result<Vec<(u64, String)>> {
        let mut out = Vec::new();
        for i in first..first + n {
            let phone = format!("+39347{i:07}");
            let (status, body) = self.post(
                "/api/v1/subscribers",
                &serde_json::json!({ "phone": phone, "language": "it" }),
            )?;
            if status != 201 {
                bail!("registering {phone}: {status} {body}");
            }
            let id = body["id"].as_u64().context("subscriber id")?;
            out.push((id, body["phone"].as_str().unwrap_or_default().to_string()));
        }
        Ok(out)
    }

    /// Creates and starts an emergency TTS campaign for everyone; returns its id.
    pub fn start_campaign(&self, retry: Value) -> anyhow::Result<u64> {
        self.create_and_start(serde_json::json!({
            "title": "Allerta test",
            "message": { "tts": { "text": "Allerta di prova. Il fiume è in piena.", "language": "it" } },
            "audience": { "all": true },
            "priority": "emergency",
            "require_confirmation": true,
            "retry": retry,
        }))
    }

    /// Creates the campaign `spec` (the API's JSON) and starts it; answers its id.
    pub fn create_and_start(&self, spec: Value) -> anyhow::Result<u64> {
        let (status, body) = self.post("/api/v1/campaigns", &spec)?;
        if status != 201 {
            bail!("creating campaign: {status} {body}");
        }
        let id = body["id"].as_u64().context("campaign id")?;
        let (status, body) = self.post(&format!("/api/v1/campaigns/{id}/start"), &Value::Null)?;
        if status != 200 {
            bail!("starting campaign: {status} {body}");
        }
        Ok(id)
    }

    /// Waits until the campaign is no longer running; returns its final view.
    /// Polls the campaign until it is neither running nor paused. An answer other than 200 (a
    /// read during an election is answered 503) is asked again, not taken for the campaign.
    pub fn wait_campaign_done(&self, id: u64, deadline: Duration) -> anyhow::Result<Value> {
        wait_for("the campaign to finish", deadline, || {
            let (status, c) = self.get(&format!("/api/v1/campaigns/{id}")).ok()?;
            (status == 200 && !matches!(c["state"].as_str(), Some("running" | "paused")))
                .then_some(c)
        })
    }
}

fn into_json(r: Result<ureq::Response, ureq::Error>) -> anyhow::Result<(u16, Value)> {
    match r {
        Ok(resp) => {
            let status = resp.status();
            let text = resp.into_string()?;
            Ok((
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            ))
        }
        Err(ureq::Error::Status(status, resp)) => {
            let text = resp.into_string().unwrap_or_default();
            Ok((
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// The trunk's calls-per-second limit in [`fast_node_config`].
pub const TEST_CALLS_PER_SECOND: usize = 200;

/// A node config tuned for tests: short ring timeout and confirmation wait.
pub fn fast_node_config(max_channels: usize) -> String {
    format!(
        "[trunk]\nname = \"sim\"\nmax_channels = {max_channels}\ncalls_per_second = {TEST_CALLS_PER_SECOND}\n\n\
         [dialer]\nring_timeout_s = 4.0\nconfirm_wait_s = 3.0\nbatch_ms = 20\n"
    )
}

/// Runs `campanile ARGS` to completion; fails with its stderr when it does not succeed.
pub fn campanile(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(campanile_bin())
        .args(args)
        .output()
        .with_context(|| format!("running campanile {args:?}"))?;
    if !out.status.success() {
        bail!(
            "campanile {args:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A cluster's certificate authority and its members' Raft addresses, for starting members.
pub struct ClusterPlan {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub raft: Vec<SocketAddr>,
}

impl ClusterPlan {
    /// Makes a CA under `dir` and picks a loopback Raft address for each of `n` nodes.
    pub fn new(dir: &Path, n: usize) -> anyhow::Result<ClusterPlan> {
        let ca = dir.join("ca");
        campanile(&["certs", "init", "--out", &ca.display().to_string()])?;
        Ok(ClusterPlan {
            dir: dir.to_path_buf(),
            ca,
            raft: (0..n).map(|_| free_udp()).collect(),
        })
    }

    /// Issues node `id`'s certificate (once) and returns the `up` flags of a member: node 1 starts
    /// the cluster, the others join through node 1.
    pub fn member_args(&self, id: usize) -> anyhow::Result<Vec<String>> {
        let certs = self.dir.join(format!("certs{id}"));
        if !certs.exists() {
            campanile(&[
                "certs",
                "issue",
                "--ca",
                &self.ca.display().to_string(),
                "--node-id",
                &id.to_string(),
                "--host",
                "127.0.0.1",
                "--out",
                &certs.display().to_string(),
            ])?;
        }
        let mut a = vec![
            "--node-id".to_string(),
            id.to_string(),
            "--datacenter".into(),
            format!("dc{}", (id - 1) % 3 + 1),
            "--raft".into(),
            self.raft[id - 1].to_string(),
            "--certs".into(),
            certs.display().to_string(),
        ];
        if id > 1 {
            a.extend(["--join".to_string(), self.raft[0].to_string()]);
        }
        Ok(a)
    }

    /// Starts member `id` with `config_toml`, dialing `trunk`.
    pub fn start(&self, id: usize, config_toml: &str, trunk: &str) -> anyhow::Result<NodeProc> {
        self.start_with_env(id, config_toml, trunk, &[])
    }

    /// `start` with more environment variables.
    pub fn start_with_env(
        &self,
        id: usize,
        config_toml: &str,
        trunk: &str,
        env: &[(String, String)],
    ) -> anyhow::Result<NodeProc> {
        NodeProc::start_with_env(
            &self.dir.join(format!("n{id}")),
            config_toml,
            trunk,
            &self.member_args(id)?,
            env,
        )
    }
}

/// `GET /api/v1/cluster` of `node`, when it answers 200.
pub fn cluster_view(node: &NodeProc) -> Option<Value> {
    node.get("/api/v1/cluster")
        .ok()
        .filter(|(s, _)| *s == 200)
        .map(|(_, v)| v)
}

/// Members of a cluster view with a role in `roles`.
pub fn members_with_role(view: &Value, roles: &[&str]) -> Vec<u64> {
    view["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| roles.iter().any(|r| m["role"] == *r))
        .filter_map(|m| m["id"].as_u64())
        .collect()
}

/// Waits until `node` sees `voters` voting members and a leader; returns the view.
pub fn wait_voters(node: &NodeProc, voters: usize, deadline: Duration) -> anyhow::Result<Value> {
    wait_for(&format!("{voters} voters"), deadline, || {
        let v = cluster_view(node)?;
        (v["leader"].is_u64() && members_with_role(&v, &["leader", "follower"]).len() == voters)
            .then_some(v)
    })
}

impl NodeProc {
    /// The admin token this node wrote on first start.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// GET with another token.
    pub fn get_as(&self, token: &str, path: &str) -> anyhow::Result<(u16, Value)> {
        let r = ureq::get(&self.url(path))
            .set("Authorization", &format!("Bearer {token}"))
            .timeout(Duration::from_secs(20))
            .call();
        into_json(r)
    }

    /// Whether subscriber `id` is readable on this node.
    pub fn has_subscriber(&self, id: u64) -> bool {
        matches!(self.get(&format!("/api/v1/subscribers/{id}")), Ok((200, _)))
    }
}

/// One call as the simulated city saw it: from its INVITE to its end (a final rejection, CANCEL or
/// BYE either way); `end` is `u64::MAX` when the log shows no end.
#[derive(Debug, Clone)]
pub struct CallSpan {
    pub call_id: String,
    /// Where the INVITE came from (the dialing node's SIP address).
    pub from: String,
    pub start: u64,
    pub end: u64,
}

/// Every call of the city's log by number, in order of their INVITEs.
pub fn calls_by_number(events: &[Value]) -> BTreeMap<String, Vec<CallSpan>> {
    let mut by_call: BTreeMap<String, CallSpan> = BTreeMap::new();
    let mut number_of: BTreeMap<String, String> = BTreeMap::new();
    for e in events {
        let (Some(cid), Some(t)) = (e["call_id"].as_str(), e["t_ms"].as_u64()) else {
            continue;
        };
        match e["event"].as_str() {
            Some("invite") if !by_call.contains_key(cid) => {
                by_call.insert(
                    cid.to_string(),
                    CallSpan {
                        call_id: cid.to_string(),
                        from: e["from"].as_str().unwrap_or_default().to_string(),
                        start: t,
                        end: u64::MAX,
                    },
                );
                number_of.insert(
                    cid.to_string(),
                    e["number"].as_str().unwrap_or_default().to_string(),
                );
            }
            Some("reject" | "cancel" | "bye_received" | "bye_sent") => {
                if let Some(c) = by_call.get_mut(cid) {
                    c.end = c.end.min(t);
                }
            }
            _ => {}
        }
    }
    let mut out: BTreeMap<String, Vec<CallSpan>> = BTreeMap::new();
    for (cid, call) in by_call {
        out.entry(number_of[&cid].clone()).or_default().push(call);
    }
    for calls in out.values_mut() {
        calls.sort_by_key(|c| c.start);
    }
    out
}

/// The most calls each caller (a node's SIP address) had up at once, per the city's log. A call
/// ending at the same millisecond as another starts is counted as ended first. A call taken over
/// by another node still counts for the node that placed it: its channel is on that node's trunk
/// (the new owner's re-INVITE follows the call's route set), so a live node whose calls were moved
/// away and which dials new ones in their place goes over its trunk's channels.
pub fn peak_calls_by_caller(events: &[Value]) -> BTreeMap<String, usize> {
    let mut edges: BTreeMap<String, Vec<(u64, i32)>> = BTreeMap::new();
    for call in calls_by_number(events).into_values().flatten() {
        let e = edges.entry(call.from).or_default();
        e.push((call.start, 1));
        e.push((call.end, -1));
    }
    edges
        .into_iter()
        .map(|(from, mut e)| {
            e.sort_unstable();
            let (mut up, mut peak) = (0i32, 0i32);
            for (_, d) in e {
                up += d;
                peak = peak.max(up);
            }
            (from, peak as usize)
        })
        .collect()
}

/// The most calls each caller (a node's SIP address) started within any `window_ms`, per the city's
/// log (a call's first INVITE as the city received it).
pub fn busiest_window_by_caller(events: &[Value], window_ms: u64) -> BTreeMap<String, usize> {
    let mut starts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for call in calls_by_number(events).into_values().flatten() {
        starts.entry(call.from).or_default().push(call.start);
    }
    starts
        .into_iter()
        .map(|(from, mut t)| {
            t.sort_unstable();
            let busiest = (0..t.len())
                .map(|i| t[i..].partition_point(|x| *x < t[i] + window_ms))
                .max()
                .unwrap_or(0);
            (from, busiest)
        })
        .collect()
}

/// Call-IDs of the calls `caller` (a node's SIP address) had answered by `answered_by_ms` and that had
/// not ended by `at_ms`, per the city's log.
pub fn answered_calls_up(
    events: &[Value],
    caller: &str,
    answered_by_ms: u64,
    at_ms: u64,
) -> Vec<String> {
    let answered: BTreeSet<&str> = events
        .iter()
        .filter(|e| e["event"] == "answer" && e["from"] == caller)
        .filter(|e| e["t_ms"].as_u64().is_some_and(|t| t <= answered_by_ms))
        .filter_map(|e| e["call_id"].as_str())
        .collect();
    let ended: BTreeSet<&str> = events
        .iter()
        .filter(|e| {
            matches!(
                e["event"].as_str(),
                Some("bye_received" | "bye_sent" | "cancel" | "reject")
            ) && e["t_ms"].as_u64().is_some_and(|t| t <= at_ms)
        })
        .filter_map(|e| e["call_id"].as_str())
        .collect();
    answered.difference(&ended).map(|s| s.to_string()).collect()
}

/// A whole-number command-line flag `name` of `args` (`--trials 10`, `1_000` allowed), or `default`.
pub fn usize_flag(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .context(format!("{name} needs a value"))?
            .replace('_', "")
            .parse()
            .with_context(|| format!("{name} must be a whole number")),
        None => Ok(default),
    }
}

/// Pairs of calls to the same number that were up at the same time.
pub fn overlapping_calls(events: &[Value]) -> Vec<(String, CallSpan, CallSpan)> {
    let mut out = Vec::new();
    for (number, calls) in calls_by_number(events) {
        for (i, a) in calls.iter().enumerate() {
            for b in &calls[i + 1..] {
                if b.start < a.end {
                    out.push((number.clone(), a.clone(), b.clone()));
                }
            }
        }
    }
    out
}

impl NodeProc {
    /// Imports `n` subscribers (`+39347` + 7 digits from `first`) through the batch API.
    pub fn import(&self, first: u32, n: u32) -> anyhow::Result<()> {
        for chunk_start in (first..first + n).step_by(1000) {
            let end = (chunk_start + 1000).min(first + n);
            let items: Vec<Value> = (chunk_start..end)
                .map(|i| serde_json::json!({ "phone": format!("+39347{i:07}"), "language": "it" }))
                .collect();
            let (status, body) = self.post(
                "/api/v1/subscribers/import",
                &serde_json::json!({ "subscribers": items }),
            )?;
            if status != 200 || body["created"].as_u64() != Some((end - chunk_start) as u64) {
                bail!("import through {}: {status} {body}", self.http);
            }
        }
        Ok(())
    }
}

/// Cuts one node's cluster traffic on loopback: an nftables table of this test's own drops every UDP
/// datagram to or from the node's Raft (QUIC) port, so its SIP and HTTP keep working. Dropping the
/// guard heals the cut (the table is deleted). Needs root and `nft` (Debian nftables, which
/// `scripts/test-all.sh` installs); without them the test fails, it does not pass quietly.
pub struct RaftCut {
    table: String,
}

fn nft(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("nft")
        .args(args)
        .output()
        .context("cannot run `nft` (install Debian's nftables; scripts/test-all.sh does)")?;
    anyhow::ensure!(
        out.status.success(),
        "nft {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl RaftCut {
    pub fn start(raft: SocketAddr) -> anyhow::Result<RaftCut> {
        anyhow::ensure!(raft.ip().is_loopback(), "only loopback traffic is cut");
        let port = raft.port().to_string();
        let table = format!("campanile_cut_{}_{port}", std::process::id());
        nft(&["add", "table", "inet", &table])?;
        let cut = RaftCut { table };
        nft(&[
            "add",
            "chain",
            "inet",
            &cut.table,
            "out",
            "{ type filter hook output priority 0 ; policy accept ; }",
        ])?;
        for dir in ["dport", "sport"] {
            nft(&[
                "add", "rule", "inet", &cut.table, "out", "oifname", "lo", "udp", dir, &port,
                "drop",
            ])?;
        }
        Ok(cut)
    }
}

impl Drop for RaftCut {
    fn drop(&mut self) {
        if let Err(e) = nft(&["delete", "table", "inet", &self.table]) {
            eprintln!("could not heal the cut: {e}");
        }
    }
}
