//! Issue 2: `campanile call` against SIPp's built-in UAS (Debian package sip-tester), a peer we did not
//! write; SIPp must count one successful call.

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child on drop so a failed assertion leaves no SIPp behind.
struct Reap(std::process::Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn campanile_call_completes_one_call_that_sipp_counts_as_successful() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let media = free_udp_port();
    let sipp = Command::new("sipp")
        .current_dir(dir.path())
        .args(["-sn", "uas", "-i", "127.0.0.1", "-p", &port.to_string()])
        .args(["-mi", "127.0.0.1", "-mp", &media.to_string()])
        .args([
            "-m",
            "1",
            "-nostdin",
            "-timeout",
            "60s",
            "-trace_stat",
            "-stf",
            "stats.csv",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sipp is installed by the test command (Debian package sip-tester)");
    let mut sipp = Reap(sipp);

    // SIPp binds its port quickly; wait until the port is taken, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    while UdpSocket::bind(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "sipp never bound 127.0.0.1:{port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let out = Command::new(env!("CARGO_BIN_EXE_campanile"))
        .args([
            "call",
            "--via",
            &format!("127.0.0.1:{port}"),
            "--to",
            "1000",
        ])
        .args(["--tts", "Prova del sistema di allerta.", "--lang", "it"])
        .args(["--confirm-wait", "1", "--ring-timeout", "10"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "campanile call failed: {stdout} {stderr}"
    );
    assert_eq!(stdout.trim(), "heard", "{stderr}");

    // SIPp with -m 1 exits by itself, with status 0 only if its one call succeeded.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = sipp.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "sipp did not finish its call");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "sipp reported a failed call: {status}");
    let stats = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("stats"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .unwrap_or_default();
    if let Some((header, last)) = stats.lines().next().zip(stats.lines().last()) {
        let cols: Vec<&str> = header.split(';').collect();
        let vals: Vec<&str> = last.split(';').collect();
        let successful = cols
            .iter()
            .position(|c| *c == "SuccessfulCall(C)")
            .and_then(|i| vals.get(i))
            .and_then(|v| v.parse::<u32>().ok());
        assert_eq!(successful, Some(1), "SIPp statistics: {stats}");
    } else {
        panic!("SIPp wrote no statistics file");
    }
}

#[test]
fn campanile_call_reports_busy_and_exits_non_zero() {
    // A UDP "carrier" that answers every INVITE with 486, written as a SIPp scenario file.
    let dir = tempfile::tempdir().unwrap();
    let scenario = r#"<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="busy">
  <recv request="INVITE"/>
  <send><![CDATA[
SIP/2.0 486 Busy Here
[last_Via:]
[last_From:]
[last_To:];tag=[pid]SIPpTag01[call_number]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

  ]]></send>
  <recv request="ACK"/>
</scenario>
"#;
    std::fs::write(dir.path().join("busy.xml"), scenario).unwrap();
    let port = free_udp_port();
    let sipp = Command::new("sipp")
        .current_dir(dir.path())
        .args([
            "-sf",
            "busy.xml",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args(["-m", "1", "-nostdin", "-timeout", "30s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sipp");
    let _sipp = Reap(sipp);
    let deadline = Instant::now() + Duration::from_secs(10);
    while UdpSocket::bind(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "sipp never bound");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new(env!("CARGO_BIN_EXE_campanile"))
        .args([
            "call",
            "--via",
            &format!("127.0.0.1:{port}"),
            "--to",
            "1000",
            "--tts",
            "prova",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "busy");
    assert!(!out.status.success());
}
