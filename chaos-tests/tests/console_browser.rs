//! The operator console and the citizen portal in a real browser: a real `campanile up` node in drill
//! mode against the sim-city, headless Chromium driven over WebDriver
//! (`campanile_chaos_tests::browser`), and what an operator or a citizen would do and see.
//! Screenshots of the main pages land in `target/artifacts/screenshots/`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use campanile_chaos_tests::browser::{decode_qr_png, screenshot_dir, Browser};
use campanile_chaos_tests::*;
use serde_json::Value;

const PASSWORD_SINDACO: &str = "piena-del-serchio-2026";
const PASSWORD_VICE: &str = "argini-alti-e-sicuri";

/// `campanile admin create-operator` against the node, as an SRE bootstraps the first accounts.
fn create_operator(node: &NodeProc, username: &str, role: &str, password: &str) {
    let out = Command::new(campanile_bin())
        .args([
            "admin",
            "create-operator",
            "--username",
            username,
            "--role",
            role,
            "--display-name",
            &format!("{username} (test)"),
            "--via",
            &node.http.to_string(),
            "--token-file",
        ])
        .arg(node.data.join("admin-token"))
        .env("CAMPANILE_PASSWORD", password)
        .output()
        .expect("run campanile admin create-operator");
    assert!(
        out.status.success(),
        "create-operator {username}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(username), "{stdout}");
    let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains(password), "the password must never be echoed");
}

/// Logs in through the login form and waits for the console's home page.
async fn log_in(browser: &Browser, base: &str, username: &str, password: &str) {
    browser.goto(&format!("{base}/")).await.unwrap();
    let url = browser.current_url().await.unwrap();
    assert!(
        url.ends_with("/login"),
        "the console sends a stranger to /login, not {url}"
    );
    browser.fill("#username", username).await.unwrap();
    browser.fill("#password", password).await.unwrap();
    browser.click("#login").await.unwrap();
    browser
        .wait_for_text("header.top .who", username, Duration::from_secs(15))
        .await
        .unwrap();
}

async fn log_out(browser: &Browser) {
    browser.click("header.top .who button").await.unwrap();
    browser
        .wait_until(
            async |b: &Browser| b.current_url().await.is_ok_and(|u| u.ends_with("/login")),
            Duration::from_secs(10),
            "the login page after logging out",
        )
        .await
        .unwrap();
}

/// Runs a script in the page and returns what it resolves to (`arguments[0]` is the callback).
async fn in_page(browser: &Browser, script: &str) -> Value {
    browser
        .client()
        .execute_async(script, vec![])
        .await
        .expect("script in the page")
}

#[tokio::test]
async fn an_operator_composes_a_second_approves_the_city_is_called_and_the_counters_move_live() {
    let dir = test_dir();
    let city = SimCityProc::start(dir.path(), "always-answer", 11).unwrap();
    let node = NodeProc::start(
        &dir.path().join("node"),
        &fast_node_config(4),
        &format!("sip:{}", city.addr),
    )
    .unwrap();
    let citizens = node.register(1, 3).unwrap();
    create_operator(&node, "sindaco", "operator", PASSWORD_SINDACO);
    create_operator(&node, "vicesindaco", "approver", PASSWORD_VICE);
    let base = format!("http://{}", node.http);
    let browser = Browser::start().await.unwrap();

    // A wrong password is refused on the page.
    browser.goto(&format!("{base}/login")).await.unwrap();
    browser.fill("#username", "sindaco").await.unwrap();
    browser.fill("#password", "not the password").await.unwrap();
    browser.click("#login").await.unwrap();
    browser
        .wait_for_text(
            "#login-error",
            "Wrong username, password or code",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    browser.screenshot("console-login").await.unwrap();

    // The operator composes a city-wide alert and listens to it.
    log_in(&browser, &base, "sindaco", PASSWORD_SINDACO).await;
    browser.click("#new-alert").await.unwrap();
    let title = "Piena dell'Arno <zona rossa> & Serchio";
    browser.fill("#title", title).await.unwrap();
    browser
        .fill(
            "#text",
            "Il fiume è in piena: salite ai piani alti e state lontani dagli argini.",
        )
        .await
        .unwrap();
    browser.select("#priority", "urgent").await.unwrap();
    browser.click("#preview").await.unwrap();
    browser
        .wait_for_text("#preview-status", "Ready", Duration::from_secs(30))
        .await
        .unwrap();
    let preview = in_page(
        &browser,
        "const done = arguments[0]; const a = document.getElementById('preview-audio');
         const check = () => a.duration > 0 ? done(a.duration) : setTimeout(check, 100); check();",
    )
    .await;
    assert!(
        preview.as_f64().is_some_and(|d| d > 3.0),
        "the preview plays the chime, the message and the prompt: {preview}"
    );
    in_page(&browser, "window.scrollTo(0, 0); arguments[0](true);").await;
    browser.screenshot("console-compose").await.unwrap();
    browser.click("#create").await.unwrap();
    browser
        .wait_for_text("#approval", "waiting for approval", Duration::from_secs(10))
        .await
        .unwrap();
    let campaign_url = browser.current_url().await.unwrap();
    // The author cannot start it or approve it.
    let source = browser.source().await.unwrap();
    assert!(!source.contains("id=\"start\"") && !source.contains("id=\"approve\""));
    log_out(&browser).await;

    // A second person approves.
    log_in(&browser, &base, "vicesindaco", PASSWORD_VICE).await;
    browser.goto(&campaign_url).await.unwrap();
    browser.click("#approve").await.unwrap();
    browser
        .wait_for_text(
            "#approval",
            "approved by vicesindaco",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    log_out(&browser).await;

    // The operator starts it and watches the counters move without reloading the page.
    log_in(&browser, &base, "sindaco", PASSWORD_SINDACO).await;
    browser.goto(&campaign_url).await.unwrap();
    browser.click("#start").await.unwrap();
    browser
        .wait_for_text(".notice", "Started", Duration::from_secs(10))
        .await
        .unwrap();
    in_page(&browser, "window.__same_page = 'yes'; arguments[0](true);").await;
    browser
        .wait_for_text("#count-confirmed", "3", Duration::from_secs(60))
        .await
        .unwrap();
    browser
        .wait_for_text("#state", "completed", Duration::from_secs(30))
        .await
        .unwrap();
    let same = in_page(&browser, "arguments[0](window.__same_page || 'reloaded');").await;
    assert_eq!(
        same, "yes",
        "the numbers must arrive without a reload (server-sent events)"
    );
    let points = in_page(
        &browser,
        "arguments[0](document.getElementById('line-confirmed').getAttribute('points'));",
    )
    .await;
    assert!(
        points.as_str().is_some_and(|p| p.split(' ').count() >= 2),
        "the chart draws confirmed over time: {points}"
    );
    browser.screenshot("console-campaign-live").await.unwrap();

    // The report lists every citizen with the outcome the sim-city saw: each pressed 1.
    let csv = in_page(
        &browser,
        "fetch(document.getElementById('report').href).then(r => r.text()).then(arguments[0]);",
    )
    .await;
    let csv = csv.as_str().unwrap_or_default().to_string();
    let pressed = numbers_that_pressed(&city.events());
    for (_, phone) in &citizens {
        let line = csv
            .lines()
            .find(|l| l.contains(phone.as_str()))
            .unwrap_or_else(|| panic!("{phone} missing from the report:\n{csv}"));
        assert!(line.contains(",confirmed,"), "{line}");
        assert!(pressed.contains(phone), "the city has no 1 from {phone}");
    }

    // The campaign list escapes what the operator typed.
    browser.goto(&format!("{base}/")).await.unwrap();
    browser
        .wait_for_text("table", title, Duration::from_secs(10))
        .await
        .unwrap();
    browser.screenshot("console-campaigns").await.unwrap();
    browser.goto(&format!("{base}/cluster")).await.unwrap();
    browser
        .wait_for_text("main", "healthy", Duration::from_secs(10))
        .await
        .unwrap();
    // Its trunk answers: the node dials, with the channels it offers.
    browser
        .wait_for_text("table", "yes, ", Duration::from_secs(10))
        .await
        .unwrap();
    browser.screenshot("console-cluster").await.unwrap();

    // The audit log names the people: composed by one, approved by the other.
    let (_, audit) = node.get("/api/v1/audit?limit=1000").unwrap();
    let entries = audit["entries"].as_array().cloned().unwrap_or_default();
    let did = |actor: &str, action: &str| {
        entries
            .iter()
            .any(|e| e["actor"] == actor && e["action"] == action && e["result"] == "ok")
    };
    assert!(did("sindaco", "create_campaign"), "{audit}");
    assert!(did("vicesindaco", "approve_campaign"), "{audit}");
    assert!(did("sindaco", "start_campaign"), "{audit}");
    assert!(
        did("vicesindaco", "create_session"),
        "logins are audited: {audit}"
    );
    assert!(
        did("vicesindaco", "end_session"),
        "logouts are audited: {audit}"
    );
    browser.close().await.unwrap();
}

#[tokio::test]
async fn a_citizen_registers_on_the_portal_and_verifies_the_number_with_the_code_the_call_reads() {
    let dir = test_dir();
    // Phones that note down a code they hear, as a citizen would.
    let profile = dir.path().join("listening-city.toml");
    std::fs::write(&profile, "hear_codes = true\n").unwrap();
    let city = SimCityProc::start(dir.path(), &profile.display().to_string(), 5).unwrap();
    let node = NodeProc::start(
        &dir.path().join("node"),
        &fast_node_config(4),
        &format!("sip:{}", city.addr),
    )
    .unwrap();
    let base = format!("http://{}", node.http);
    let browser = Browser::start().await.unwrap();

    browser.goto(&format!("{base}/r/default")).await.unwrap();
    browser
        .wait_for_text("h1", "Ricevi le allerte", Duration::from_secs(10))
        .await
        .unwrap();
    browser.screenshot("portal-register").await.unwrap();
    browser.fill("#phone", "347 555 0101").await.unwrap();
    browser.fill("#name", "Maria <b>Rossi</b>").await.unwrap();
    browser.select("#language", "it").await.unwrap();
    browser.click("#consent").await.unwrap();
    browser.click("#register").await.unwrap();
    browser
        .wait_for_text("#calling", "+393475550101", Duration::from_secs(10))
        .await
        .unwrap();
    browser.screenshot("portal-code").await.unwrap();

    // The call reaches the phone, which hears the code twice.
    let heard = wait_for(
        "the phone to hear the code",
        Duration::from_secs(60),
        || {
            city.events()
                .into_iter()
                .find(|e| e["event"] == "heard_code" && e["number"] == "+393475550101")
                .and_then(|e| e["digits"].as_str().map(str::to_string))
        },
    )
    .unwrap();
    assert_eq!(heard.len(), 12, "the code, then the code again: {heard}");
    let (code, again) = heard.split_at(6);
    assert_eq!(code, again);

    // A wrong code is refused; the heard one verifies the number.
    let wrong = if code == "000000" { "111111" } else { "000000" };
    browser.fill("#code", wrong).await.unwrap();
    browser.click("#confirm-code").await.unwrap();
    browser
        .wait_for_text("#code-error", "codice", Duration::from_secs(10))
        .await
        .unwrap();
    browser.fill("#code", code).await.unwrap();
    browser.click("#confirm-code").await.unwrap();
    browser
        .wait_for_text("h1", "Numero confermato", Duration::from_secs(10))
        .await
        .unwrap();
    browser.screenshot("portal-verified").await.unwrap();
    let (_, audit) = node.get("/api/v1/audit?limit=1000").unwrap();
    assert!(
        audit["entries"].as_array().is_some_and(|all| all
            .iter()
            .any(|e| { e["action"] == "confirm_verification" && e["result"] == "ok" })),
        "{audit}"
    );
    // The number is now one the city's campaigns call: a campaign reaches exactly it.
    let id = node
        .start_campaign(serde_json::json!({"max_attempts": 1}))
        .unwrap();
    let done = node
        .wait_campaign_done(id, Duration::from_secs(60))
        .unwrap();
    assert_eq!(done["counts"]["targeted"], 1, "{done}");

    // The QR code of the registration page decodes to its address; the poster shows it.
    let png = dir.path().join("qr.png");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut ureq::get(&format!("{base}/r/default/qr.png"))
            .call()
            .unwrap()
            .into_reader(),
        &mut bytes,
    )
    .unwrap();
    std::fs::write(&png, &bytes).unwrap();
    assert_eq!(decode_qr_png(&png).unwrap(), format!("{base}/r/default"));
    copy_artifact(&png, "portal-qr.png");
    browser
        .goto(&format!("{base}/r/default/poster"))
        .await
        .unwrap();
    browser
        .wait_for_text(
            "body",
            &format!("{base}/r/default"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    browser.screenshot("portal-poster").await.unwrap();
    browser.close().await.unwrap();
}

fn copy_artifact(from: &Path, name: &str) {
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(from, dir.join(name)).unwrap();
}

/// One second of a 440 Hz tone as 16-bit mono 16 kHz WAV.
fn tone_wav(path: &Path) {
    let rate = 16_000u32;
    let samples: Vec<i16> = (0..rate)
        .map(|i| ((i as f32 * 440.0 * std::f32::consts::TAU / rate as f32).sin() * 12_000.0) as i16)
        .collect();
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + 2 * samples.len() as u32).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * 2).to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&(2 * samples.len() as u32).to_le_bytes());
    for s in samples {
        b.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

#[tokio::test]
async fn an_operator_uploads_a_wav_or_records_from_the_microphone_and_the_city_hears_it() {
    let dir = test_dir();
    let city = SimCityProc::start(dir.path(), "always-answer", 3).unwrap();
    let node = NodeProc::start(
        &dir.path().join("node"),
        &fast_node_config(4),
        &format!("sip:{}", city.addr),
    )
    .unwrap();
    let mut zone_phones = Vec::new();
    for phone in ["+393471000001", "+393471000002"] {
        let (status, body) = node
            .post(
                "/api/v1/subscribers",
                &serde_json::json!({ "phone": phone, "zone": "centro" }),
            )
            .unwrap();
        assert_eq!(status, 201, "{body}");
        zone_phones.push(phone.to_string());
    }
    create_operator(&node, "sindaco", "operator", PASSWORD_SINDACO);
    let base = format!("http://{}", node.http);
    let browser = Browser::start().await.unwrap();
    log_in(&browser, &base, "sindaco", PASSWORD_SINDACO).await;

    // A WAV file chosen in the form is uploaded and stored.
    let wav = dir.path().join("tono.wav");
    tone_wav(&wav);
    browser
        .goto(&format!("{base}/campaigns/new"))
        .await
        .unwrap();
    browser
        .click("input[name=message_kind][value=recording]")
        .await
        .unwrap();
    browser
        .client()
        .find(fantoccini::Locator::Css("#wav"))
        .await
        .unwrap()
        .send_keys(&wav.display().to_string())
        .await
        .unwrap();
    browser
        .wait_for_text(
            "#upload-status",
            "Recording stored (1 s)",
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    // The microphone (Chromium's synthetic one) is captured, turned into WAV and uploaded too.
    browser.click("#record").await.unwrap();
    browser
        .wait_for_text("#upload-status", "speak now", Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await; // the length of what is recorded
    browser.click("#record").await.unwrap();
    browser
        .wait_for_text(
            "#upload-status",
            "Recording stored",
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    let sha = in_page(
        &browser,
        "arguments[0](document.getElementById('recording_sha256').value);",
    )
    .await;
    let sha = sha.as_str().unwrap_or_default().to_string();
    assert_eq!(
        sha.len(),
        64,
        "the form carries the recording's hash: {sha:?}"
    );
    browser
        .fill("#title", "Registrato al microfono")
        .await
        .unwrap();
    browser
        .click("input[name=audience][value=zones]")
        .await
        .unwrap();
    browser.fill("#zones", "centro").await.unwrap();
    browser.select("#priority", "info").await.unwrap();
    browser.click("#create").await.unwrap();
    browser
        .wait_for_text("#approval", "not needed", Duration::from_secs(10))
        .await
        .unwrap();
    let source = browser.source().await.unwrap();
    assert!(
        source.contains(&format!("recording {}", &sha[..12])),
        "the campaign plays the recording"
    );
    browser.click("#start").await.unwrap();
    browser
        .wait_for_text("#state", "completed", Duration::from_secs(60))
        .await
        .unwrap();
    // The citizens of the zone heard it (the city logged their answer and their 1).
    let pressed = numbers_that_pressed(&city.events());
    for phone in &zone_phones {
        assert!(
            pressed.contains(phone),
            "{phone} did not confirm: {pressed:?}"
        );
    }
    browser.close().await.unwrap();
}
