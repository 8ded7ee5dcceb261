//! tshark, an independent decoder, judges what we put on the wire: two calls (PCMU and A-law only) to SIPp
//! are captured on loopback; tshark must find no malformed SIP, SDP or RTP, and its RTP stream analysis
//! must show every one of our streams complete, in sequence and without problems, and it must decode our
//! RTCP sender reports. Once as a node sends by default (io_uring), once with `pacer_send = "raw"`, whose
//! IPv4 and UDP headers are written by us: there tshark also verifies every RTP datagram's UDP checksum.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{campanile_call, start_sipp};

/// A tshark capture on lo, stopped with SIGINT on `stop` (and killed on drop).
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(dir: &std::path::Path) -> Capture {
        let file = dir.join("calls.pcapng");
        let err = dir.join("tshark.err");
        let child = Command::new("tshark")
            .args(["-i", "lo", "-f", "udp and host 127.0.0.1", "-w"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("tshark is installed by the test command (Debian package tshark)");
        let deadline = Instant::now() + Duration::from_secs(15);
        while !std::fs::read_to_string(&err)
            .unwrap_or_default()
            .contains("Capturing on")
        {
            assert!(
                Instant::now() < deadline,
                "tshark did not start capturing: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Capture { child, file }
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "tshark did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tshark(file: &std::path::Path, sip_ports: &[u16], args: &[&str]) -> String {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r")
        .arg(file)
        .args(["-o", "rtp.heuristic_rtp:TRUE"])
        .args(["-o", "rtcp.heuristic_rtcp:TRUE"]);
    for p in sip_ports {
        cmd.args(["-d", &format!("udp.port=={p},sip")]);
    }
    let out = cmd.args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The two tests capture on the same interface: one at a time.
static ONE_CAPTURE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn tshark_finds_no_malformed_packets_and_no_rtp_loss_in_our_calls() {
    calls_judged_by_tshark("io_uring");
}

#[test]
fn raw_sent_rtp_is_well_formed_with_valid_udp_checksums() {
    calls_judged_by_tshark("raw");
}

fn calls_judged_by_tshark(pacer_send: &str) {
    let _one = ONE_CAPTURE_AT_A_TIME
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mut capture = Capture::start(dir.path());
    let mut ports = Vec::new();
    let mut media_ports = Vec::new();
    for scenario in ["ring_then_answer.xml", "pcma_only.xml"] {
        let mut sipp = start_sipp(scenario);
        let (stdout, ok, stderr) = campanile_call(sipp.port, &["--pacer-send", pacer_send], &[]);
        assert!(ok && stdout == "heard", "{scenario}: {stdout} {stderr}");
        if pacer_send == "raw" {
            // Tests run as root (CAP_NET_RAW): the raw path must be the one that ran.
            assert!(
                stderr.contains("sending with a raw IPv4 socket"),
                "the raw path did not run: {stderr}"
            );
        }
        assert!(sipp.wait().success());
        ports.push(sipp.port);
        media_ports.push(sipp.media);
    }
    capture.stop();

    let malformed = tshark(
        &capture.file,
        &ports,
        &["-Y", "_ws.malformed || _ws.expert.severity == error"],
    );
    assert!(
        malformed.trim().is_empty(),
        "tshark found malformed packets:\n{malformed}"
    );

    let sip = tshark(
        &capture.file,
        &ports,
        &[
            "-Y",
            "sip",
            "-T",
            "fields",
            "-e",
            "sip.Method",
            "-e",
            "sip.Status-Code",
        ],
    );
    for needed in ["INVITE", "ACK", "BYE", "200"] {
        assert!(sip.contains(needed), "no {needed} decoded as SIP:\n{sip}");
    }

    let streams = tshark(&capture.file, &ports, &["-q", "-z", "rtp,streams"]);
    let stream_to = |port: u16| -> Vec<&str> {
        streams
            .lines()
            .filter(|l| l.contains(&format!(" {port} ")))
            .collect()
    };
    let (pcmu, pcma) = (stream_to(media_ports[0]), stream_to(media_ports[1]));
    assert_eq!(
        (pcmu.len(), pcma.len()),
        (1, 1),
        "expected one stream per call:\n{streams}"
    );
    assert!(
        pcmu[0].contains("g711U"),
        "the first call should be PCMU: {}",
        pcmu[0]
    );
    assert!(
        pcma[0].contains("g711A"),
        "an A-law only answer must get PCMA: {}",
        pcma[0]
    );
    let ours = [pcmu[0], pcma[0]];
    for line in ours {
        assert!(
            line.contains(" 0 (0.0%)"),
            "RTP loss or sequence errors: {line}"
        );
        assert!(
            !line.trim_end().ends_with('X'),
            "tshark flagged a problem: {line}"
        );
        let packets: u64 = line
            .split_whitespace()
            .nth(8)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        assert!(packets > 100, "too few packets: {line}");
        // Sent from an even port of the default `[media]` range, the one a firewall opens.
        let source: u16 = line
            .split_whitespace()
            .nth(3)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        assert!(
            source.is_multiple_of(2) && (16384..=32767).contains(&source),
            "RTP not from an even port in 16384-32767: {line}"
        );
        if pacer_send == "raw" {
            // Our headers, our checksum: tshark verifies it on every datagram of the stream. (A
            // UDP socket's datagrams on loopback carry a checksum the kernel never finished, which
            // is why only these are checked.)
            let statuses = tshark(
                &capture.file,
                &ports,
                &[
                    "-o",
                    "udp.check_checksum:TRUE",
                    "-Y",
                    &format!("udp.srcport == {source} && rtp"),
                    "-T",
                    "fields",
                    "-e",
                    "udp.checksum.status",
                ],
            );
            let statuses: Vec<&str> = statuses.lines().map(str::trim).collect();
            assert_eq!(statuses.len() as u64, packets, "{line}");
            let bad = statuses.iter().filter(|s| **s != "1").count();
            assert_eq!(
                bad,
                0,
                "{bad} of {packets} RTP datagrams from port {source} without a good UDP checksum \
                 (tshark's status 1), e.g. {:?}",
                statuses.iter().find(|s| **s != "1")
            );
        }
    }

    // RTCP sender reports (RFC 3550 §6.4.1) to the port after each call's RTP port, counting packets.
    for media in &media_ports {
        let reports = tshark(
            &capture.file,
            &ports,
            &[
                "-Y",
                &format!("rtcp.pt == 200 && udp.dstport == {}", media + 1),
                "-T",
                "fields",
                "-e",
                "rtcp.sender.packetcount",
            ],
        );
        let counts: Vec<u64> = reports
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        assert!(
            !counts.is_empty() && counts.iter().all(|c| *c > 0),
            "no sender report with a packet count to {}:\n{reports}",
            media + 1
        );
    }
}
