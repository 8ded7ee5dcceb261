//! Helpers shared by the tests that drive SIPp and `campanile call`.
#![allow(dead_code)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The first of four consecutive free UDP ports on 127.0.0.1 (SIPp's media port takes audio RTP and
/// RTCP and video RTP and RTCP from it).
pub fn free_udp_block() -> u16 {
    loop {
        let first = free_udp_port();
        let held: Vec<_> = (first..first.saturating_add(4))
            .map(|p| UdpSocket::bind(("127.0.0.1", p)))
            .collect();
        if first < u16::MAX - 4 && held.iter().all(|h| h.is_ok()) {
            return first;
        }
    }
}

/// A SIPp UAS, killed on drop so a failed assertion leaves nothing behind.
pub struct Sipp {
    pub child: std::process::Child,
    pub port: u16,
    pub media: u16,
    pub dir: tempfile::TempDir,
}

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn scenario_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sipp")
        .join(name)
}

/// SIPp's RFC 2833 capture of a "1", from the installed package.
pub fn dtmf_pcap() -> String {
    let out = Command::new("dpkg")
        .args(["-L", "sip-tester"])
        .output()
        .expect("dpkg");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.ends_with("dtmf_2833_1.pcap"))
        .expect("sip-tester ships dtmf_2833_1.pcap")
        .to_string()
}

/// Starts SIPp as a UAS for one call: the built-in `uas` scenario or a file from tests/sipp.
pub fn start_sipp(scenario: &str) -> Sipp {
    start_sipp_with(scenario, &[])
}

/// `start_sipp`, replacing `@NAME@` placeholders of the scenario file first.
pub fn start_sipp_with(scenario: &str, replacements: &[(&str, String)]) -> Sipp {
    start_sipp_on(scenario, replacements, false)
}

/// `start_sipp` with SIPp listening on TCP (`-t t1`).
pub fn start_sipp_tcp(scenario: &str) -> Sipp {
    start_sipp_on(scenario, &[], true)
}

fn start_sipp_on(scenario: &str, replacements: &[(&str, String)], tcp: bool) -> Sipp {
    // Ports picked free can be taken by another test before SIPp binds them: then SIPp exits
    // with EADDRINUSE and is started again on new ports (at most three times).
    let mut attempt = 0;
    loop {
        attempt += 1;
        match try_start_sipp(scenario, replacements, tcp) {
            Ok(sipp) => return sipp,
            Err(log) if attempt < 3 && log.contains("Address already in use") => continue,
            Err(log) => panic!("sipp did not start: {log}"),
        }
    }
}

fn try_start_sipp(
    scenario: &str,
    replacements: &[(&str, String)],
    tcp: bool,
) -> Result<Sipp, String> {
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let media = free_udp_block();
    let mut cmd = Command::new("sipp");
    cmd.current_dir(dir.path());
    if scenario == "uas" {
        cmd.args(["-sn", "uas"]);
    } else {
        let text = std::fs::read_to_string(scenario_path(scenario))
            .unwrap()
            .replace("@DTMF_PCAP@", &dtmf_pcap());
        let text = replacements.iter().fold(text, |t, (k, v)| t.replace(k, v));
        let file = dir.path().join(scenario);
        std::fs::write(&file, text).unwrap();
        cmd.arg("-sf").arg(&file);
    }
    if tcp {
        cmd.args(["-t", "t1"]);
    }
    cmd.args([
        "-i",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-mi",
        "127.0.0.1",
        "-mp",
        &media.to_string(),
    ])
    .args([
        "-m",
        "1",
        "-nostdin",
        "-timeout",
        "60s",
        "-trace_stat",
        "-stf",
        "stats.csv",
        "-trace_err",
        "-trace_screen",
    ])
    .stdout(Stdio::null())
    .stderr(
        std::fs::File::create(dir.path().join("sipp.stderr"))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null()),
    );
    let child = cmd
        .spawn()
        .expect("sipp is installed by the test command (Debian package sip-tester)");
    let mut sipp = Sipp {
        child,
        port,
        media,
        dir,
    };
    let log = sipp.dir.path().join("sipp.stderr");
    // Generous: on a loaded CI machine a peer's start can take seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = if tcp {
            tcp_listening(port)
        } else {
            udp_port_held(port)
        };
        if up {
            return Ok(sipp);
        }
        let exited = matches!(sipp.child.try_wait(), Ok(Some(_)));
        if exited || Instant::now() > deadline {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "{} on 127.0.0.1:{port}: {text}",
                if exited {
                    "sipp exited"
                } else {
                    "sipp never bound"
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Sipp {
    /// Waits for SIPp to finish its one call; returns its exit status.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "sipp did not finish its call");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The text of the first file SIPp wrote whose name `named` accepts.
    fn file(&self, named: impl Fn(&str) -> bool) -> Option<String> {
        std::fs::read_dir(self.dir.path())
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| named(&e.file_name().to_string_lossy()))
            .and_then(|e| std::fs::read_to_string(e.path()).ok())
    }

    /// A column of SIPp's last statistics line.
    pub fn stat(&self, column: &str) -> Option<u64> {
        let stats = self.file(|name| name.starts_with("stats"))?;
        let header = stats.lines().next()?;
        let last = stats.lines().last()?;
        let i = header.split(';').position(|c| c == column)?;
        last.split(';').nth(i)?.parse().ok()
    }

    /// How many retransmissions of the request `method` SIPp received, from the screen it wrote
    /// when it ended (`-trace_screen`): the "Retrans" column of that message's line.
    pub fn retransmissions_received(&self, method: &str) -> Option<u64> {
        let screen = self.file(|name| name.ends_with("_screen.log"))?;
        // "  ----------> BYE    1    2    0    0": a request received, then the counts of
        // messages, retransmissions, timeouts and unexpected messages.
        let arrow = format!("----------> {method} ");
        let line = screen
            .lines()
            .find(|l| l.trim_start().starts_with(&arrow))?;
        let counts = &line.trim_start()[arrow.len()..];
        counts.split_whitespace().nth(1)?.parse().ok()
    }

    pub fn errors(&self) -> String {
        std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().contains("errors"))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    }
}

/// Runs `campanile call` against SIPp; returns (stdout, success).
pub fn campanile_call(port: u16, extra: &[&str], env: &[(&str, &str)]) -> (String, bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_campanile"));
    cmd.args([
        "call",
        "--via",
        &format!("127.0.0.1:{port}"),
        "--to",
        "1000",
    ])
    .args([
        "--tts",
        "Prova del sistema di allerta.",
        "--lang",
        "it",
        "--confirm-wait",
        "1",
    ])
    .args(extra)
    .env_remove("CAMPANILE_TRUNK_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A child process killed and reaped when dropped, so a failed assertion leaves nothing running.
pub struct Reap(pub std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether some process holds UDP `port` (on any local address), read from
/// `/proc/net/udp`: probing by binding the port ourselves could take it from the peer at the
/// very moment the peer binds it, which made SIPp exit at start-up now and then.
pub fn udp_port_held(port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    ["/proc/net/udp", "/proc/net/udp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1))
            .any(|local| local.ends_with(&suffix))
    })
}

/// A child started as the leader of its own process group (`Command::process_group(0)`), killed with
/// its whole group when dropped: Kamailio forks workers that outlive a killed parent otherwise.
pub struct ReapGroup(pub std::process::Child);

impl Drop for ReapGroup {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) with a negative pid signals that process group; no memory is involved.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.0.wait();
    }
}

/// Whether something listens on TCP `port`, read from `/proc/net/tcp` (state 0A).
pub fn tcp_listening(port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .any(|f| f.len() > 3 && f[1].ends_with(&suffix) && f[3] == "0A")
    })
}

/// Waits (bounded) until a peer listens on TCP `port`.
pub fn wait_until_listening(port: u16, who: &str, log: Option<&Path>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !tcp_listening(port) {
        assert!(
            Instant::now() < deadline,
            "{who} never listened on TCP 127.0.0.1:{port}: {}",
            log.and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) until a peer holds UDP `port` on 127.0.0.1; on timeout, fails with its log.
pub fn wait_until_bound(port: u16, who: &str, log: Option<&Path>) {
    // Generous: on a loaded CI machine a peer's start can take seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !udp_port_held(port) {
        assert!(
            Instant::now() < deadline,
            "{who} never bound 127.0.0.1:{port}: {}",
            log.and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
