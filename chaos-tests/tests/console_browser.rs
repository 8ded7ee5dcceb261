//! The operator console in a real browser: a real `campanile up` node, headless Chromium driven over
//! WebDriver (`campanile_chaos_tests::browser`), and what an operator would see on the page.
//! Screenshots land in `target/artifacts/screenshots/`.

use std::time::Duration;

use campanile_chaos_tests::browser::Browser;
use campanile_chaos_tests::*;
use serde_json::json;

/// Opens the console's home page at `base` (`http://HOST:PORT`) as an operator would.
///
/// Fails, rather than testing the login page by mistake, when the console sends the browser to
/// `/login` first.
async fn open_console(browser: &Browser, base: &str) -> anyhow::Result<()> {
    browser.goto(&format!("{base}/")).await?;
    let url = browser.current_url().await?;
    let path = url
        .strip_prefix(base)
        .unwrap_or(&url)
        .split(['?', '#'])
        .next()
        .unwrap_or_default();
    if path.starts_with("/login") {
        anyhow::bail!("console requires login; use the login helper ({base}/ redirected to {url})");
    }
    Ok(())
}

#[tokio::test]
async fn console_page_lists_campaigns_in_headless_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let city = SimCityProc::start(dir.path(), "always-answer", 11).unwrap();
    let node = NodeProc::start(
        &dir.path().join("node"),
        &fast_node_config(4),
        &format!("sip:{}", city.addr),
    )
    .unwrap();
    node.register(1, 3).unwrap();

    // Characters the page must escape, so the browser shows them only if the HTML is right.
    let title = "Piena dell'Arno & Serchio <zona rossa>";
    let (status, body) = node
        .post(
            "/api/v1/campaigns",
            &json!({
                "title": title,
                "message": { "tts": { "text": "Il fiume è in piena: salite ai piani alti.", "language": "it" } },
                "audience": { "all": true },
                "priority": "emergency",
            }),
        )
        .unwrap();
    assert_eq!(status, 201, "{body}");

    let browser = Browser::start().await.unwrap();
    let base = format!("http://{}", node.http);
    open_console(&browser, &base).await.unwrap();
    browser
        .wait_for_text("body", title, Duration::from_secs(15))
        .await
        .unwrap();
    let shot = browser.screenshot("console-campaigns").await.unwrap();
    assert!(std::fs::metadata(&shot).unwrap().len() > 0);
    let page_title = browser.title().await.unwrap();
    assert!(
        page_title.contains("Campanile"),
        "page title is {page_title:?}"
    );
    browser.close().await.unwrap();
}
