//! Headless Chromium driven over WebDriver, for tests that use the operator console as a person would.
//!
//! A [`Browser`] owns a `chromedriver` process on a free loopback port, the Chromium it launches, and a
//! fresh profile directory. Dropping it SIGKILLs chromedriver's whole process group (Chromium and its
//! helpers run in it) and waits until they are gone, so a failing test leaves nothing running. Waits are
//! polls with deadlines, never fixed sleeps; a wait that times out says what it waited for, where the
//! page was, and what it showed.
//!
//! Chromium and chromedriver are Debian's `chromium` and `chromium-driver`, and QR codes are decoded
//! with `zbarimg` from `zbar-tools`; `scripts/test-all.sh` installs all three. Without them a test
//! fails with an error that says so: it never passes quietly.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// How often [`Browser::wait_until`] looks again.
const POLL: Duration = Duration::from_millis(100);

/// How long chromedriver may take to answer `/status` with `ready: true`.
const DRIVER_READY: Duration = Duration::from_secs(20);

/// How many loopback ports to try when another process takes the one we picked first.
const PORT_TRIES: usize = 5;

/// How much of the page source a failed wait shows.
const SNIPPET: usize = 1500;

/// `program` as found on `PATH`, like `which`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// `$var` when set, or the first of `names` on `PATH`; the error names the package that provides it.
fn tool(var: &str, names: &[&str], package: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        anyhow::ensure!(
            p.is_file(),
            "${var} is {}, which does not exist",
            p.display()
        );
        return Ok(p);
    }
    names.iter().find_map(|n| which(n)).with_context(|| {
        format!(
            "`{}` is not on PATH: install Debian's {package} (scripts/test-all.sh does), or set ${var}",
            names[0]
        )
    })
}

/// Where screenshots go: `<workspace>/target/artifacts/screenshots`.
pub fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("artifacts")
        .join("screenshots")
}

/// A running chromedriver, leader of its own process group; the group is SIGKILLed when dropped.
struct Driver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Driver {
    /// Starts chromedriver on a free loopback port and waits until it is ready for a session.
    async fn start(program: &Path, work: &Path) -> anyhow::Result<Driver> {
        let mut last = String::new();
        for attempt in 0..PORT_TRIES {
            let port = free_port()?;
            let log = work.join(format!("chromedriver-{attempt}.log"));
            let out = std::fs::File::create(&log)?;
            let err = out.try_clone()?;
            // Without `--allowed-ips` chromedriver listens on 127.0.0.1 and [::1] only and accepts
            // local clients only; with it, it listens on every interface.
            let child = Command::new(program)
                .arg(format!("--port={}", port.port()))
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                // Its own process group, so Drop can kill Chromium and its helpers with it.
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start {}", program.display()))?;
            let mut driver = Driver {
                child,
                url: format!("http://{port}"),
                log,
            };
            match driver.wait_ready().await? {
                true => return Ok(driver),
                // Exited: most likely someone took the port between our probe and its bind.
                false => last = driver.log_text(),
            }
        }
        bail!("chromedriver exited on each of {PORT_TRIES} loopback ports; its last log: {last}")
    }

    /// Polls `/status` until it says ready (true) or the process exits (false); errors at the deadline.
    async fn wait_ready(&mut self) -> anyhow::Result<bool> {
        let until = Instant::now() + DRIVER_READY;
        let status = format!("{}/status", self.url);
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(false);
            }
            let url = status.clone();
            let ready = tokio::task::spawn_blocking(move || {
                let body: serde_json::Value = ureq::get(&url)
                    .timeout(Duration::from_secs(2))
                    .call()
                    .ok()?
                    .into_json()
                    .ok()?;
                Some(body["value"]["ready"] == true)
            })
            .await?;
            if ready == Some(true) {
                return Ok(true);
            }
            if Instant::now() > until {
                bail!(
                    "chromedriver at {} was not ready within {DRIVER_READY:?}; its log: {}",
                    self.url,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let group = -(self.child.id() as libc::pid_t);
        // SAFETY: kill(2) with a negative pid signals the process group we created at spawn.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
        // Chromium's processes are reparented to init when chromedriver dies, and init may reap them
        // seconds later; wait (bounded) only until none of them runs, so the profile directory can be
        // removed after us.
        let until = Instant::now() + Duration::from_secs(5);
        while group_running(-group) && Instant::now() < until {
            // SAFETY: as above; stragglers forked after the first signal get one too.
            unsafe { libc::kill(group, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether a process of group `pgid` is still running (zombies waiting for init do not count).
fn group_running(pgid: libc::pid_t) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return false;
    };
    procs.flatten().any(|p| {
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            return false;
        };
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|f| f.parse::<libc::pid_t>().ok());
        pgrp == Some(pgid) && !matches!(state, Some("Z" | "X"))
    })
}

/// A loopback port that was free a moment ago (bound, then released for chromedriver to take).
fn free_port() -> anyhow::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("no free loopback TCP port")
}

/// Headless Chromium with a session open, and the helpers browser tests use.
pub struct Browser {
    client: Client,
    // Declared before `work`: the driver (and Chromium) must be dead before the profile is removed.
    driver: Driver,
    work: tempfile::TempDir,
    /// How long chromedriver and Chromium took to be ready for the first command.
    pub startup: Duration,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session with a fresh profile.
    pub async fn start() -> anyhow::Result<Browser> {
        let t0 = Instant::now();
        let chromedriver = tool("CHROMEDRIVER", &["chromedriver"], "chromium-driver")?;
        let chromium = tool("CHROMIUM", &["chromium", "chromium-browser"], "chromium")?;
        let work = tempfile::Builder::new()
            .prefix("campanile-browser-")
            .tempdir()?;
        let profile = work.path().join("profile");
        std::fs::create_dir_all(&profile)?;
        let driver = Driver::start(&chromedriver, work.path()).await?;

        let mut caps = fantoccini::wd::Capabilities::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium.display().to_string(),
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.display()),
                    // The test machines reach nothing but loopback: no update, sync or other
                    // background traffic.
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    // A synthetic microphone (a beep) that needs no permission prompt: the
                    // console's "record with the microphone" can be driven like any button.
                    "--use-fake-device-for-media-stream",
                    "--use-fake-ui-for-media-stream",
                ],
            }),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url)
            .await
            .with_context(|| {
                format!(
                    "chromedriver at {} could not start {}; its log: {}",
                    driver.url,
                    chromium.display(),
                    driver.log_text()
                )
            })?;
        let startup = t0.elapsed();
        eprintln!("browser: headless Chromium ready in {startup:?}");
        Ok(Browser {
            client,
            driver,
            work,
            startup,
        })
    }

    /// The underlying WebDriver client, for what the helpers do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Navigates to `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.client
            .goto(url)
            .await
            .with_context(|| format!("browser could not open {url}"))
    }

    /// The page's current URL (after any redirects).
    pub async fn current_url(&self) -> anyhow::Result<String> {
        Ok(self
            .client
            .current_url()
            .await
            .context("browser: reading the current URL")?
            .to_string())
    }

    /// The page's `<title>`.
    pub async fn title(&self) -> anyhow::Result<String> {
        self.client
            .title()
            .await
            .context("browser: reading the page title")
    }

    /// The page's current HTML source.
    pub async fn source(&self) -> anyhow::Result<String> {
        self.client
            .source()
            .await
            .context("browser: reading the page source")
    }

    async fn find(&self, css: &str) -> anyhow::Result<fantoccini::elements::Element> {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => Ok(e),
            Err(e) => {
                let at = self.current_url().await.unwrap_or_default();
                Err(anyhow::Error::new(e).context(format!("no element matches `{css}` on {at}")))
            }
        }
    }

    /// Replaces the value of the input matching `css` with `text`, typed key by key.
    pub async fn fill(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let e = self.find(css).await?;
        e.clear()
            .await
            .with_context(|| format!("clearing `{css}`"))?;
        e.send_keys(text)
            .await
            .with_context(|| format!("typing into `{css}`"))
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        self.find(css)
            .await?
            .click()
            .await
            .with_context(|| format!("clicking `{css}`"))
    }

    /// Chooses the option with `value` in the `<select>` matching `css`.
    pub async fn select(&self, css: &str, value: &str) -> anyhow::Result<()> {
        self.find(css)
            .await?
            .select_by_value(value)
            .await
            .with_context(|| format!("choosing value `{value}` in `{css}`"))
    }

    /// The rendered text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        self.find(css)
            .await?
            .text()
            .await
            .with_context(|| format!("reading the text of `{css}`"))
    }

    /// Waits until the text of the element matching `css` contains `needle`; returns that text.
    pub async fn wait_for_text(
        &self,
        css: &str,
        needle: &str,
        deadline: Duration,
    ) -> anyhow::Result<String> {
        self.wait_until(
            async |b: &Browser| matches!(b.text(css).await, Ok(t) if t.contains(needle)),
            deadline,
            &format!("`{css}` to show {needle:?}"),
        )
        .await?;
        self.text(css).await
    }

    /// Polls `ready` every 100 ms until it returns true. At the deadline it fails naming `what`, with
    /// the page's URL, a snippet of its source, and a screenshot of it.
    pub async fn wait_until(
        &self,
        mut ready: impl AsyncFnMut(&Browser) -> bool,
        deadline: Duration,
        what: &str,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        loop {
            if ready(self).await {
                return Ok(());
            }
            if Instant::now() > until {
                let url = self
                    .current_url()
                    .await
                    .unwrap_or_else(|e| format!("? ({e})"));
                let source = self.source().await.unwrap_or_else(|e| format!("? ({e})"));
                let shot = match self.screenshot(&format!("timeout-{}", slug(what))).await {
                    Ok(p) => p.display().to_string(),
                    Err(e) => format!("none ({e})"),
                };
                bail!(
                    "timed out after {deadline:?} waiting for {what}\n  page: {url}\n  screenshot: {shot}\n  \
                     source: {}",
                    snippet(&source, SNIPPET)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Writes a PNG of the viewport to `<workspace>/target/artifacts/screenshots/<name>.png`, prints
    /// the path, and returns it.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        anyhow::ensure!(
            !name.is_empty() && !name.contains(['/', '\\']) && name != "..",
            "screenshot name {name:?} must be a plain file name"
        );
        let png = self
            .client
            .screenshot()
            .await
            .with_context(|| format!("taking screenshot {name}"))?;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("browser: screenshot {}", path.display());
        Ok(path)
    }

    /// Ends the WebDriver session (Chromium quits), then stops chromedriver.
    pub async fn close(self) -> anyhow::Result<()> {
        let closed = self
            .client
            .clone()
            .close()
            .await
            .context("closing the browser session");
        drop(self);
        closed
    }

    /// The profile and log directory of this browser (removed when it is dropped).
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// chromedriver's log so far.
    pub fn driver_log(&self) -> String {
        self.driver.log_text()
    }
}

/// The first `max` characters of `s`, marking what was cut.
fn snippet(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}… ({} more bytes)", &s[..i], s.len() - i),
        None => s.to_string(),
    }
}

/// `what` as a file name: letters and digits, the rest as dashes.
fn slug(what: &str) -> String {
    let s: String = what
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.split('-')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("-")
        .chars()
        .take(60)
        .collect()
}

/// Decodes the QR code in the PNG at `path` with `zbarimg --raw -q`; returns its text (every code
/// found, one a line, without the last newline).
pub fn decode_qr_png(path: &Path) -> anyhow::Result<String> {
    let zbarimg = tool("ZBARIMG", &["zbarimg"], "zbar-tools")?;
    let out = Command::new(&zbarimg)
        .args(["--raw", "-q"])
        .arg(path)
        .output()
        .with_context(|| format!("running {}", zbarimg.display()))?;
    match out.status.code() {
        Some(0) => {}
        // zbarimg's exit status 4: the image was read but held no code.
        Some(4) => bail!("no QR code found in {}", path.display()),
        _ => bail!(
            "zbarimg could not read {}: {} {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
    let text = String::from_utf8(out.stdout)
        .with_context(|| format!("the QR code in {} is not UTF-8", path.display()))?;
    Ok(text.strip_suffix('\n').unwrap_or(&text).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PNG of `text` as a QR code: 8 pixels a module, with the 4-module quiet zone scanners need.
    fn qr_png(text: &str, path: &Path) {
        let code = qrcode::QrCode::new(text.as_bytes()).unwrap();
        let (modules, scale, quiet) = (code.width(), 8, 4);
        let colors = code.to_colors();
        let side = (modules + 2 * quiet) * scale;
        let mut pixels = vec![255u8; side * side];
        for (i, c) in colors.iter().enumerate() {
            if *c == qrcode::Color::Dark {
                let (mx, my) = (i % modules + quiet, i / modules + quiet);
                for y in my * scale..(my + 1) * scale {
                    pixels[y * side + mx * scale..y * side + (mx + 1) * scale].fill(0);
                }
            }
        }
        let file = std::fs::File::create(path).unwrap();
        let mut enc = png::Encoder::new(file, side as u32, side as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .unwrap()
            .write_image_data(&pixels)
            .unwrap();
    }

    #[test]
    fn qr_code_decodes_with_zbarimg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qr.png");
        let text = "http://127.0.0.1:8080/iscriviti?comune=pisa&codice=7F3K-9QZ2";
        qr_png(text, &path);
        assert_eq!(decode_qr_png(&path).unwrap(), text);
    }

    #[test]
    fn a_png_without_a_code_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blank.png");
        let file = std::fs::File::create(&path).unwrap();
        let mut enc = png::Encoder::new(file, 64, 64);
        enc.set_color(png::ColorType::Grayscale);
        enc.write_header()
            .unwrap()
            .write_image_data(&[255u8; 64 * 64])
            .unwrap();
        let err = decode_qr_png(&path).unwrap_err().to_string();
        assert!(err.contains("no QR code found"), "{err}");
    }

    /// A form page with no server behind it: a `data:` URL.
    const FORM: &str = "data:text/html;charset=utf-8,<title>Prova</title>\
        <input id=name value=old><select id=zone><option value=centro>Centro</option>\
        <option value=lungarno>Lungarno</option></select>\
        <button id=go onclick=\"document.getElementById('out').textContent=\
        document.getElementById('name').value+' @ '+document.getElementById('zone').value\">Go</button>\
        <p id=out></p>";

    #[tokio::test]
    async fn helpers_fill_a_form_and_a_timed_out_wait_says_where_it_was() {
        let browser = Browser::start().await.unwrap();
        browser.goto(FORM).await.unwrap();
        assert_eq!(browser.title().await.unwrap(), "Prova");
        browser.fill("#name", "Mario Rossi").await.unwrap();
        browser.select("#zone", "lungarno").await.unwrap();
        browser.click("#go").await.unwrap();
        let out = browser
            .wait_for_text("#out", "Lungarno", Duration::from_millis(50))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            out.contains("waiting for `#out` to show \"Lungarno\""),
            "{out}"
        );
        let out = browser
            .wait_for_text("#out", "lungarno", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(out, "Mario Rossi @ lungarno");

        let err = browser
            .wait_until(async |_| false, Duration::from_millis(200), "a miracle")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("timed out after 200ms waiting for a miracle"),
            "{err}"
        );
        assert!(err.contains("page: data:text/html"), "{err}");
        assert!(err.contains("id=\"out\""), "{err}");
        assert!(err.contains("timeout-a-miracle.png"), "{err}");

        let err = browser.click("#missing").await.unwrap_err();
        assert!(
            format!("{err:#}").contains("no element matches `#missing`"),
            "{err:#}"
        );
        // Dropped without close(): Drop must still take chromedriver and Chromium down.
        let group = browser.driver.child.id() as libc::pid_t;
        assert!(group_running(group));
        drop(browser);
        assert!(!group_running(group), "Chromium outlived its Browser");
    }

    #[test]
    fn snippets_cut_on_character_boundaries() {
        assert_eq!(snippet("città", 10), "città");
        assert_eq!(snippet("città", 4), "citt… (2 more bytes)");
        assert_eq!(slug("`body` to show \"Allerta\""), "body-to-show-Allerta");
    }
}
