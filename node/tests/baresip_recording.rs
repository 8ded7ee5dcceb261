//! baresip, an auto-answering softphone we did not write, records what it hears from `campanile call`;
//! the recording must be the message we sent.
//!
//! Similarity measure: both signals are 8 kHz mono. The recording is aligned to the sent audio by the lag
//! (within ±1 s) that maximises their cross-correlation; over the overlap, the Pearson correlation of the
//! samples must be at least 0.9 (G.711 quantisation alone leaves it above 0.99), and the recorded duration
//! must be within 5 % of the sent one.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_udp_port, wait_until_bound, Reap};

fn read_wav(path: &std::path::Path) -> Vec<f64> {
    let mut r = hound::WavReader::open(path).unwrap();
    assert_eq!(r.spec().sample_rate, 8000, "{}", path.display());
    r.samples::<i16>().map(|s| s.unwrap() as f64).collect()
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut num, mut da, mut db) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        num += (x - ma) * (y - mb);
        da += (x - ma).powi(2);
        db += (y - mb).powi(2);
    }
    num / (da.sqrt() * db.sqrt()).max(1e-9)
}

/// The overlap of `sent` and `got` when `got` is shifted by `lag` samples (positive: got starts later).
fn overlap<'a>(sent: &'a [f64], got: &'a [f64], lag: i64) -> (&'a [f64], &'a [f64]) {
    if lag >= 0 {
        let got = &got[(lag as usize).min(got.len())..];
        let n = sent.len().min(got.len());
        (&sent[..n], &got[..n])
    } else {
        let sent = &sent[((-lag) as usize).min(sent.len())..];
        let n = sent.len().min(got.len());
        (&sent[..n], &got[..n])
    }
}

#[test]
fn baresip_hears_the_message_we_sent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_udp_port();
    let rec = d.join("rec");
    std::fs::create_dir_all(&rec).unwrap();
    // baresip hangs up when its audio source ends: give it a long silence to "speak".
    let sox = Command::new("sox")
        .args(["-n", "-r", "8000", "-c", "1", "-b", "16"])
        .arg(d.join("silence.wav"))
        .args(["trim", "0", "90"])
        .status()
        .expect("sox is installed by the test command");
    assert!(sox.success());
    std::fs::write(
        d.join("config"),
        format!(
            "module_path /usr/lib/baresip/modules\nsip_listen 127.0.0.1:{port}\n\
             audio_player aufile,{played}\naudio_source aufile,{silence}\naudio_alert aufile,{alert}\n\
             snd_path {rec}\nmodule g711.so\nmodule aufile.so\nmodule sndfile.so\nmodule account.so\nmodule menu.so\n",
            played = d.join("played.wav").display(),
            silence = d.join("silence.wav").display(),
            alert = d.join("alert.wav").display(),
            rec = rec.display(),
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("accounts"),
        format!("<sip:1000@127.0.0.1:{port}>;regint=0;answermode=auto\n"),
    )
    .unwrap();
    let log = std::fs::File::create(d.join("baresip.log")).unwrap();
    let baresip = Command::new("baresip")
        .arg("-f")
        .arg(d)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("baresip is installed by the test command (Debian package baresip-core)");
    let _baresip = Reap(baresip);
    wait_until_bound(port, "baresip", Some(&d.join("baresip.log")));

    let sent_path = d.join("sent.wav");
    let out = Command::new(env!("CARGO_BIN_EXE_campanile"))
        .args([
            "call",
            "--via",
            &format!("127.0.0.1:{port}"),
            "--to",
            "1000",
            "--confirm-wait",
            "1",
        ])
        .args([
            "--tts",
            "Questa è una prova del sistema di allerta del comune. Il fiume è in piena.",
            "--lang",
            "it",
        ])
        .arg("--dump-audio")
        .arg(&sent_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        "heard",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // baresip closes its recording when the call ends; wait for the decoded dump with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    let recorded = loop {
        let found = std::fs::read_dir(&rec)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with("-dec.wav"));
        if let Some(p) = found.filter(|p| {
            hound::WavReader::open(p)
                .map(|r| r.duration() > 8000)
                .unwrap_or(false)
        }) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "baresip wrote no recording: {}",
            std::fs::read_to_string(d.join("baresip.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let sent = read_wav(&sent_path);
    let got = read_wav(&recorded);
    let ratio = got.len() as f64 / sent.len() as f64;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "recorded {} samples for {} sent ({ratio:.3})",
        got.len(),
        sent.len()
    );

    // Coarse lag on 20 ms energy, then the exact lag on samples around it.
    let energy = |x: &[f64]| {
        x.chunks(160)
            .map(|c| c.iter().map(|v| v * v).sum::<f64>())
            .collect::<Vec<_>>()
    };
    let (es, eg) = (energy(&sent), energy(&got));
    let coarse = (-50i64..=50)
        .max_by(|a, b| {
            let (x, y) = overlap(&es, &eg, *a);
            let (u, v) = overlap(&es, &eg, *b);
            pearson(x, y).total_cmp(&pearson(u, v))
        })
        .unwrap();
    let lag = (coarse * 160 - 200..=coarse * 160 + 200)
        .max_by(|a, b| {
            let (x, y) = overlap(&sent, &got, *a);
            let (u, v) = overlap(&sent, &got, *b);
            pearson(x, y).total_cmp(&pearson(u, v))
        })
        .unwrap();
    let (x, y) = overlap(&sent, &got, lag);
    let r = pearson(x, y);
    eprintln!(
        "baresip recording: {:.2} s for {:.2} s sent, lag {lag} samples, correlation {r:.4}",
        got.len() as f64 / 8000.0,
        sent.len() as f64 / 8000.0
    );
    assert!(
        r >= 0.9,
        "recording does not match what was sent: correlation {r:.3} at lag {lag}"
    );
}
