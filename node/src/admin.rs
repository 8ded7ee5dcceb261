//! Operator commands that talk to a running node over its HTTP API (`campanile cluster status`,
//! `campanile cluster remove`, `campanile backup`) and the offline `campanile restore`.
//!
//! The token comes from `CAMPANILE_TOKEN` or from a token file (by default the admin token of a node
//! whose data directory is `./campanile-data`); any token the cluster knows works on every node.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The first line of a backup file names its format; the state follows on the next line.
pub const BACKUP_FORMAT: &str = "campanile-backup-v1";

/// The first line of a backup file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupHeader {
    pub format: String,
    pub taken_ms: u64,
    /// The node that answered, and the log index its state reflected.
    pub node: u64,
    pub applied_index: u64,
    pub subscribers: u64,
}

/// Where the API token comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// File holding an API token (ignored when CAMPANILE_TOKEN is set).
    #[arg(long, default_value = "campanile-data/admin-token")]
    pub token_file: PathBuf,
}

impl TokenArgs {
    fn token(&self) -> anyhow::Result<String> {
        if let Ok(t) = std::env::var("CAMPANILE_TOKEN") {
            if !t.trim().is_empty() {
                return Ok(t.trim().to_string());
            }
        }
        let t = std::fs::read_to_string(&self.token_file).with_context(|| {
            format!(
                "cannot read the API token from {} (set CAMPANILE_TOKEN or --token-file)",
                self.token_file.display()
            )
        })?;
        Ok(t.trim().to_string())
    }
}

/// One API call; the error carries the API's own message, never the token.
fn call(method: &str, via: &str, path: &str, auth: &TokenArgs) -> anyhow::Result<ureq::Response> {
    call_with(method, via, path, auth, None)
}

/// `call` with an optional JSON body.
fn call_with(
    method: &str,
    via: &str,
    path: &str,
    auth: &TokenArgs,
    body: Option<&Value>,
) -> anyhow::Result<ureq::Response> {
    let token = auth.token()?;
    let base = if via.starts_with("http://") || via.starts_with("https://") {
        via.trim_end_matches('/').to_string()
    } else {
        format!("http://{via}")
    };
    let url = format!("{base}{path}");
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(600))
        .build();
    let req = agent
        .request(method, &url)
        .set("Authorization", &format!("Bearer {token}"));
    let sent = match body {
        Some(b) => req.send_json(b.clone()),
        None => req.call(),
    };
    match sent {
        Ok(r) => Ok(r),
        Err(ureq::Error::Status(code, r)) => {
            let body = r.into_string().unwrap_or_default();
            let message = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or(body);
            anyhow::bail!("{method} {url}: {code}: {message}")
        }
        Err(e) => anyhow::bail!("{method} {url}: {e}"),
    }
}

fn json(r: ureq::Response) -> anyhow::Result<Value> {
    r.into_json::<Value>()
        .context("the node's answer is not JSON")
}

/// The new operator's password: `CAMPANILE_PASSWORD`, or the first line of standard input.
pub fn read_password() -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("CAMPANILE_PASSWORD") {
        if !p.is_empty() {
            return Ok(p);
        }
    }
    eprintln!("Password for the new operator (at least 12 characters), then Enter:");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("cannot read the password from standard input")?;
    let p = line.trim_end_matches(['\r', '\n']).to_string();
    if p.is_empty() {
        anyhow::bail!("no password given: set CAMPANILE_PASSWORD or type it on standard input");
    }
    Ok(p)
}

/// `campanile admin create-operator`: `POST /api/v1/operators` (the node hashes the password).
pub fn create_operator(via: &str, body: Value, auth: &TokenArgs) -> anyhow::Result<String> {
    let v = json(call_with(
        "POST",
        via,
        "/api/v1/operators",
        auth,
        Some(&body),
    )?)?;
    Ok(format!(
        "operator `{}` ({}) created for {}; log in at http://{}/login",
        v["username"].as_str().unwrap_or("?"),
        v["role"].as_str().unwrap_or("?"),
        v["tenants"]
            .as_array()
            .map(|t| t
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        via.trim_start_matches("http://").trim_end_matches('/')
    ))
}

/// `campanile cluster status`: the cluster as the node at `via` sees it.
pub fn cluster_status(via: &str, auth: &TokenArgs, as_json: bool) -> anyhow::Result<String> {
    let mut v = json(call("GET", via, "/api/v1/cluster", auth)?)?;
    // Only the leader knows every member's applied index and lag: ask it when it is another node.
    if v["leader"].is_u64() && v["leader"] != v["node"] {
        let leader_http = v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["id"] == v["leader"])
            .and_then(|m| m["http_addr"].as_str().map(str::to_string));
        if let Some(addr) = leader_http {
            match call("GET", &addr, "/api/v1/cluster", auth).and_then(json) {
                Ok(lv) => v = lv,
                Err(e) => {
                    eprintln!("(the leader at {addr} did not answer: {e:#}; showing {via}'s view)")
                }
            }
        }
    }
    if as_json {
        return Ok(serde_json::to_string_pretty(&v)?);
    }
    Ok(render_status(&v))
}

/// `campanile cluster remove NODE`: the node leaves the cluster.
pub fn cluster_remove(via: &str, node: u64, auth: &TokenArgs) -> anyhow::Result<String> {
    let v = json(call(
        "DELETE",
        via,
        &format!("/api/v1/cluster/members/{node}"),
        auth,
    )?)?;
    Ok(format!("node {node} removed\n{}", render_status(&v)))
}

/// A table of the cluster view (`GET /api/v1/cluster`).
pub fn render_status(v: &Value) -> String {
    let cell = |x: &Value| match x {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = format!(
        "leader: {}   term: {}   answered by node {}\n",
        v["leader"]
            .as_u64()
            .map(|l| format!("node {l}"))
            .unwrap_or_else(|| "NONE (no quorum?)".into()),
        cell(&v["term"]),
        cell(&v["node"]),
    );
    let header = [
        "ID",
        "DATACENTER",
        "ROLE",
        "RAFT",
        "HTTP",
        "APPLIED",
        "LAG",
        "DIALLING",
        "CLOCK",
    ];
    let mut rows = vec![header.map(str::to_string).to_vec()];
    for m in v["members"].as_array().into_iter().flatten() {
        rows.push(vec![
            cell(&m["id"]),
            cell(&m["datacenter"]),
            cell(&m["role"]),
            cell(&m["raft_addr"]),
            cell(&m["http_addr"]),
            cell(&m["applied_index"]),
            cell(&m["lag"]),
            campanile_dashboard::console::dialling(m["capacity"].as_u64()),
            campanile_dashboard::console::clock(
                m["clock_offset_ms"].as_f64(),
                m["id"] == v["node"],
            ),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `campanile backup`: writes a consistent copy of the replicated state to `out` (mode 0600: it holds
/// phone numbers), through a temporary file so a failed backup never leaves half a file.
pub fn backup(via: &str, out: &Path, auth: &TokenArgs) -> anyhow::Result<BackupHeader> {
    if out.exists() {
        anyhow::bail!("{} exists; choose a new file name", out.display());
    }
    let r = call("GET", via, "/api/v1/backup", auth)?;
    let tmp = out.with_extension("partial");
    let written = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        std::io::copy(&mut r.into_reader(), &mut f).context("the backup download was cut off")?;
        f.sync_all()
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        let f = std::fs::File::open(&tmp)?;
        let (header, _) = read_backup_header(std::io::BufReader::new(f))?;
        anyhow::Ok(header)
    })();
    let header = match written {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).with_context(|| format!("cannot create {}", out.display()))?;
    Ok(header)
}

/// Longest header line a backup may have.
const MAX_HEADER: u64 = 64 * 1024;

/// Reads a backup's header line, checking the format; answers it and the reader positioned at the
/// state that follows.
pub fn read_backup_header<R: std::io::BufRead>(mut reader: R) -> anyhow::Result<(BackupHeader, R)> {
    let mut line = Vec::new();
    (&mut reader)
        .take(MAX_HEADER)
        .read_until(b'\n', &mut line)
        .context("cannot read the backup")?;
    anyhow::ensure!(
        line.last() == Some(&b'\n'),
        "not a Campanile backup: no header line"
    );
    let header: BackupHeader = serde_json::from_slice(&line)
        .context("not a Campanile backup: the header line is unreadable")?;
    anyhow::ensure!(
        header.format == BACKUP_FORMAT,
        "backup format `{}` is not one this release reads ({BACKUP_FORMAT})",
        header.format
    );
    Ok((header, reader))
}

/// `campanile restore FILE`: makes a new data directory whose state is the backup's. The node started
/// on it (with the same node id, and raft address when clustered) leads a one-voter cluster that
/// others join.
pub fn restore(
    file: &Path,
    data: &Path,
    node_id: u64,
    raft: Option<std::net::SocketAddr>,
) -> anyhow::Result<String> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let (header, state) = read_backup_header(std::io::BufReader::new(f))
        .with_context(|| file.display().to_string())?;
    let raft_dir = data.join("raft");
    if raft_dir.exists() {
        anyhow::bail!(
            "{} already holds a store; restore into a new data directory",
            data.display()
        );
    }
    std::fs::create_dir_all(data).with_context(|| format!("cannot create {}", data.display()))?;
    let addr = raft
        .map(|a| a.to_string())
        .unwrap_or_else(|| "local".into());
    let subscribers = campanile_cluster::store::restore(&raft_dir, node_id, &addr, state)
        .with_context(|| format!("cannot restore into {}", data.display()))?;
    Ok(format!(
        "restored {} subscribers (backup of node {} at log index {}) into {}; start it with `campanile up --data {}{}`",
        subscribers,
        header.node,
        header.applied_index,
        data.display(),
        data.display(),
        raft.map(|r| format!(" --node-id {node_id} --raft {r} --certs DIR")).unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backups_of_another_format_or_without_a_header_are_refused() {
        assert!(read_backup_header(&b"{}"[..]).is_err());
        let e = read_backup_header(&b"{\"format\":\"x\",\"taken_ms\":1,\"node\":1,\"applied_index\":1,\"subscribers\":0}\n{}"[..])
            .unwrap_err();
        assert!(e.to_string().contains("format `x`"), "{e}");
    }

    #[test]
    fn the_status_table_shows_every_member() {
        let v = serde_json::json!({
            "node": 2, "leader": 1, "term": 3,
            "members": [
                {"id": 1, "datacenter": "dc-a", "role": "leader", "raft_addr": "127.0.0.1:7001",
                 "http_addr": "127.0.0.1:8001", "applied_index": 10, "lag": 0},
                {"id": 2, "datacenter": "dc-b", "role": "follower", "raft_addr": "127.0.0.1:7002",
                 "http_addr": null, "applied_index": 9, "lag": null, "capacity": 0},
                {"id": 3, "datacenter": "dc-c", "role": "follower", "raft_addr": "127.0.0.1:7003",
                 "http_addr": null, "applied_index": 9, "lag": null, "capacity": 4,
                 "clock_offset_ms": -1500.25}
            ]
        });
        let t = render_status(&v);
        assert!(t.starts_with("leader: node 1   term: 3"), "{t}");
        assert!(t.contains("dc-b"), "{t}");
        // Node 1 has sent no capacity yet; node 2 said 0: its trunk is down or it is stopping.
        let row = |id: &str| t.lines().find(|l| l.starts_with(id)).unwrap_or_default();
        assert!(row("1 ").contains('—'), "{t}");
        assert!(row("2 ").contains("NO: trunk down or stopping"), "{t}");
        // Clocks: node 1 was not measured, node 2 answered, node 3 is 1.5 s behind it.
        assert!(row("1 ").trim_end().ends_with(" —"), "{t}");
        assert!(row("2 ").trim_end().ends_with("here"), "{t}");
        assert!(row("3 ").trim_end().ends_with("-1.500 s OFF"), "{t}");
        assert_eq!(t.lines().count(), 5, "{t}");
    }
}
