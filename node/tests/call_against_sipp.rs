//! `campanile call` against SIPp (Debian package sip-tester), a SIP peer we did not write: the built-in UAS
//! (issue 2) and the UAS scenarios in `tests/sipp/` (issue 3): ringing, early media, A-law only, CANCEL,
//! busy, a Digest challenge, a remote hang-up and a DTMF "1" replayed from the RFC 2833 capture that
//! ships with SIPp.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A SIPp UAS, killed on drop so a failed assertion leaves nothing behind.
struct Sipp {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Sipp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scenario_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sipp")
        .join(name)
}

/// SIPp's RFC 2833 capture of a "1", from the installed package.
fn dtmf_pcap() -> String {
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
fn start_sipp(scenario: &str) -> Sipp {
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let media = free_udp_port();
    let mut cmd = Command::new("sipp");
    cmd.current_dir(dir.path());
    if scenario == "uas" {
        cmd.args(["-sn", "uas"]);
    } else {
        let text = std::fs::read_to_string(scenario_path(scenario))
            .unwrap()
            .replace("@DTMF_PCAP@", &dtmf_pcap());
        let file = dir.path().join(scenario);
        std::fs::write(&file, text).unwrap();
        cmd.arg("-sf").arg(&file);
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
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child = cmd
        .spawn()
        .expect("sipp is installed by the test command (Debian package sip-tester)");
    let sipp = Sipp { child, port, dir };
    // Wait (bounded) until SIPp holds its port.
    let deadline = Instant::now() + Duration::from_secs(10);
    while UdpSocket::bind(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "sipp never bound 127.0.0.1:{port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    sipp
}

impl Sipp {
    /// Waits for SIPp to finish its one call; returns its exit status.
    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "sipp did not finish its call");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A column of SIPp's last statistics line.
    fn stat(&self, column: &str) -> Option<u64> {
        let stats = std::fs::read_dir(self.dir.path())
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("stats"))
            .and_then(|e| std::fs::read_to_string(e.path()).ok())?;
        let header = stats.lines().next()?;
        let last = stats.lines().last()?;
        let i = header.split(';').position(|c| c == column)?;
        last.split(';').nth(i)?.parse().ok()
    }

    fn errors(&self) -> String {
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
fn campanile_call(port: u16, extra: &[&str], env: &[(&str, &str)]) -> (String, bool, String) {
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

/// The call ends as `want` and SIPp completes its scenario successfully.
fn expect(scenario: &str, extra: &[&str], env: &[(&str, &str)], want: &str, delivered: bool) {
    let mut sipp = start_sipp(scenario);
    let (stdout, ok, stderr) = campanile_call(sipp.port, extra, env);
    assert!(
        stdout.starts_with(want),
        "{scenario}: campanile said `{stdout}`, expected `{want}`\n{stderr}"
    );
    assert_eq!(ok, delivered, "{scenario}: exit status for `{stdout}`");
    let status = sipp.wait();
    assert!(
        status.success(),
        "{scenario}: SIPp reported a failed call ({status}): {}",
        sipp.errors()
    );
    assert_eq!(
        sipp.stat("SuccessfulCall(C)"),
        Some(1),
        "{scenario}: SIPp statistics"
    );
}

#[test]
fn campanile_call_completes_one_call_that_sipp_counts_as_successful() {
    expect("uas", &[], &[], "heard", true);
}

#[test]
fn ringing_then_answer_is_heard() {
    expect("ring_then_answer.xml", &[], &[], "heard", true);
}

#[test]
fn early_media_183_then_answer_is_heard() {
    expect("early_media_183.xml", &[], &[], "heard", true);
}

#[test]
fn an_a_law_only_answer_is_honoured() {
    expect("pcma_only.xml", &[], &[], "heard", true);
}

#[test]
fn busy_is_reported_and_exits_non_zero() {
    expect("busy.xml", &[], &[], "busy", false);
}

#[test]
fn ring_timeout_sends_cancel_and_handles_487() {
    expect(
        "ring_until_cancel.xml",
        &["--ring-timeout", "2"],
        &[],
        "no answer",
        false,
    );
}

#[test]
fn a_401_challenge_is_answered_with_digest_credentials() {
    expect(
        "digest_401.xml",
        &["--user", "campanile"],
        &[("CAMPANILE_TRUNK_PASSWORD", "s3cret-pw")],
        "heard",
        true,
    );
}

#[test]
fn a_401_without_credentials_names_the_fix_and_never_prints_a_password() {
    let sipp = start_sipp("digest_401.xml");
    let (stdout, ok, stderr) = campanile_call(sipp.port, &[], &[]);
    assert!(!ok);
    assert_eq!(
        stdout,
        "rejected 401 Unauthorized: check the trunk's username and password"
    );
    drop(sipp);
    // Wrong password: SIPp answers 403 and the password appears nowhere.
    let sipp = start_sipp("digest_401.xml");
    let (stdout, ok, stderr2) = campanile_call(
        sipp.port,
        &["--user", "campanile"],
        &[("CAMPANILE_TRUNK_PASSWORD", "wrong-pw-123")],
    );
    assert!(!ok);
    assert!(stdout.starts_with("rejected 403"), "{stdout}");
    for text in [&stdout, &stderr, &stderr2] {
        assert!(!text.contains("wrong-pw-123"));
    }
}

#[test]
fn a_remote_hang_up_during_playback_is_reported_with_its_time() {
    expect("remote_bye.xml", &[], &[], "hung up after 1.", false);
}

#[test]
fn dtmf_1_from_sipps_rfc2833_capture_confirms() {
    expect("dtmf_1.xml", &[], &[], "confirmed", true);
}
