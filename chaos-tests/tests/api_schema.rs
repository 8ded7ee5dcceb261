//! The JSON API against its own OpenAPI document, on a real `campanile up` process:
//! - `GET /api/v1/openapi.json` answers without a token, and every other API route still wants one;
//! - schemathesis (from PyPI) reads the document and sends valid and invalid requests to every
//!   operation — examples, boundary values, random data, and chains of calls it infers from the
//!   responses — with the node's admin token, and checks that the node never answers 5xx, that every
//!   answer's body matches the document (every error in the one `{"error": {"code", "message"}}`
//!   format), and that every answer's Content-Type is one the document names (a plain-text error
//!   would pass a body check unseen);
//! - afterwards the node is healthy and its log holds no panic.
//!
//! Schemathesis is installed, pinned, into a virtualenv under `target/` the first time (PyPI must be
//! reachable then); when it cannot be installed the test fails, it does not pass quietly.
//!
//! `DELETE /cluster/members/{id}` is left out: it would remove the node from its own one-node
//! cluster, and every later request would fail for that reason, not for a bug. `GET /backup` is a
//! read and is fuzzed like the rest.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use campanile_chaos_tests::*;
use serde_json::{json, Value};

/// The schemathesis release the test runs; its CLI changed between 3.x and 4.x.
const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// Generated cases per operation and phase: enough to find the classes of bugs, small enough that
/// the whole run takes well under a minute on two cores.
const MAX_EXAMPLES: u32 = 20;

/// Fixed, so a failure in CI replays the same requests.
const SEED: u32 = 1;

/// The run is killed past this; a normal one takes 10 to 30 s.
const RUN_DEADLINE: Duration = Duration::from_secs(240);

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// Runs `cmd` to completion within `deadline` (killing it past that), its output in `log`;
/// returns (success, output).
fn run_bounded(mut cmd: Command, log: &Path, deadline: Duration) -> (bool, String) {
    let out = std::fs::File::create(log).expect("a log file");
    let err = out.try_clone().expect("a log file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let until = Instant::now() + deadline;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break Some(s);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    match status {
        Some(s) => (s.success(), text),
        None => (false, format!("{text}\n*** killed after {deadline:?} ***")),
    }
}

fn installed_version(st: &Path) -> Option<String> {
    let out = Command::new(st).arg("--version").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The pinned schemathesis, installed into `target/schemathesis-venv` when it is not there yet.
fn schemathesis() -> PathBuf {
    let venv = target_dir().join("schemathesis-venv");
    let st = venv.join("bin").join("schemathesis");
    let wanted = format!("schemathesis, version {SCHEMATHESIS_VERSION}");
    if installed_version(&st).as_deref() == Some(wanted.as_str()) {
        return st;
    }
    eprintln!(
        "installing schemathesis {SCHEMATHESIS_VERSION} into {}",
        venv.display()
    );
    let log = target_dir().join("schemathesis-install.log");
    let mut venv_cmd = Command::new("python3");
    venv_cmd.args(["-m", "venv"]).arg(&venv);
    let (ok, out) = run_bounded(venv_cmd, &log, Duration::from_secs(120));
    assert!(ok, "`python3 -m venv {}` failed: {out}", venv.display());
    let mut pip = Command::new(venv.join("bin").join("python"));
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &format!("schemathesis=={SCHEMATHESIS_VERSION}"),
    ]);
    let (ok, out) = run_bounded(pip, &log, Duration::from_secs(600));
    assert!(
        ok,
        "installing schemathesis from PyPI failed (this test needs it; it does not skip): {out}"
    );
    assert_eq!(
        installed_version(&st).as_deref(),
        Some(wanted.as_str()),
        "schemathesis installed, but `{} --version` does not say {SCHEMATHESIS_VERSION}",
        st.display()
    );
    st
}

/// Half a second of 8 kHz mono 16-bit PCM: a tone, as a recording to store.
fn short_wav() -> Vec<u8> {
    let (rate, frames) = (8_000u32, 4_000u32);
    let data_len = frames * 2;
    let mut w = Vec::with_capacity(44 + data_len as usize);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&rate.to_le_bytes());
    w.extend_from_slice(&(rate * 2).to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    for i in 0..frames {
        let t = i as f64 / rate as f64;
        let v = ((2.0 * std::f64::consts::PI * 440.0 * t).sin() * 8_000.0) as i16;
        w.extend_from_slice(&v.to_le_bytes());
    }
    w
}

/// Something of every kind for the fuzzer to find at small ids: subscribers, a second tenant, an
/// operator, a recording, a finished campaign and two drafts.
fn seed(node: &NodeProc) {
    node.register(1, 3).unwrap();
    let created = |path: &str, body: Value| {
        let (status, answer) = node.post(path, &body).unwrap();
        assert_eq!(status, 201, "POST {path}: {answer}");
        answer
    };
    created(
        "/api/v1/tenants",
        json!({ "slug": "pisa", "name": "Comune di Pisa" }),
    );
    created(
        "/api/v1/operators",
        json!({ "username": "sindaco", "role": "admin", "password": "correct horse battery" }),
    );
    created(
        "/api/v1/subscribers",
        json!({ "phone": "+393471234567", "name": "Maria Rossi", "zone": "centro", "tenant": "pisa" }),
    );
    let (status, audio) = node
        .post_bytes("/api/v1/audio", "audio/wav", &short_wav())
        .unwrap();
    assert_eq!(status, 201, "{audio}");
    let id = node.start_campaign(json!({ "max_attempts": 1 })).unwrap();
    node.wait_campaign_done(id, Duration::from_secs(60))
        .unwrap();
    created(
        "/api/v1/campaigns",
        json!({
            "title": "Registrazione",
            "message": { "recording": { "sha256": audio["sha256"] } },
            "audience": { "zones": ["centro"] },
            "priority": "info",
        }),
    );
    created(
        "/api/v1/campaigns",
        json!({
            "title": "Allerta meteo",
            "message": { "tts": { "text": "Restate in casa.", "language": "it" } },
            "audience": { "all": true },
            "priority": "urgent",
            "require_confirmation": false,
            "tenant": "pisa",
        }),
    );
}

#[test]
fn every_api_answer_matches_the_openapi_document_under_fuzzing() {
    let st = schemathesis();
    let dir = test_dir();
    let city = SimCityProc::start(dir.path(), "always-answer", 11).unwrap();
    let mut node = NodeProc::start(
        &dir.path().join("node"),
        &fast_node_config(10),
        &format!("sip:{}", city.addr),
    )
    .unwrap();

    // The document is public; the data is not.
    let url = format!("http://{}/api/v1/openapi.json", node.http);
    let doc: Value = ureq::get(&url)
        .timeout(Duration::from_secs(10))
        .call()
        .expect("GET /api/v1/openapi.json without a token")
        .into_json()
        .expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.0.3", "{doc}");
    assert!(doc["paths"]["/campaigns"].is_object(), "{doc}");
    match ureq::get(&format!("http://{}/api/v1/campaigns", node.http)).call() {
        Err(ureq::Error::Status(401, _)) => {}
        other => panic!("GET /api/v1/campaigns without a token: {other:?}"),
    }

    seed(&node);

    let started = Instant::now();
    let mut cmd = Command::new(&st);
    cmd.current_dir(dir.path())
        .env("NO_COLOR", "1")
        .arg("run")
        .arg(&url)
        .args([
            "--header",
            &format!("Authorization: Bearer {}", node.token()),
        ])
        .args([
            "--checks",
            "not_a_server_error,response_schema_conformance,content_type_conformance",
        ])
        .args(["--exclude-path", "/cluster/members/{id}"])
        .args(["--max-examples", &MAX_EXAMPLES.to_string()])
        .args(["--seed", &SEED.to_string()])
        .args(["--request-timeout", "30"])
        .args(["--workers", "1"])
        .args(["--generation-database", "none"])
        .arg("--no-color");
    let (ok, output) = run_bounded(cmd, &dir.path().join("schemathesis.out"), RUN_DEADLINE);
    eprintln!(
        "schemathesis {SCHEMATHESIS_VERSION} ran for {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let log = node.proc.log_text();
    assert!(
        !log.contains("panicked"),
        "the node panicked during the run:\n{log}"
    );
    assert!(
        ok,
        "schemathesis found answers that break the OpenAPI document:\n{output}"
    );
    let (status, health) = node.get("/healthz").unwrap();
    assert_eq!(
        status, 200,
        "the node is not healthy after the run: {health}"
    );
    node.kill();
}
