//! A headless Chromium driven through `WebDriver` (Debian's `chromium` and
//! `chromium-driver`, installed by `cargo xtask setup`). `chromedriver` runs
//! inside a test namespace, so the browser speaks from that namespace's
//! addresses; the harness reaches the driver over a socket opened from a
//! thread that entered the namespace, with plain HTTP/1.1 and JSON.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::{Value, json};

use crate::{
    http::{Daemon, require},
    netns::{Netns, enter},
};

/// The W3C name of an element reference in JSON.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// The driver's port inside the namespace.
const DRIVER_PORT: u16 = 9515;

/// Where the screenshots go: `target/console/` of the workspace.
#[must_use]
pub fn screenshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("console")
}

/// One browser session. Dropping it ends the session and the driver (which
/// ends its browser).
pub struct Browser {
    ns: PathBuf,
    driver_addr: SocketAddr,
    session: String,
    _driver: Daemon,
    profile: PathBuf,
}

fn decode_base64(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => bail!("not base64: {c}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).expect("a byte"));
        }
    }
    Ok(out)
}

impl Browser {
    /// Start `chromedriver` in `ns` and open a headless session
    /// `width`×900 pixels; `dir` holds its log and profile.
    pub fn start(ns: &Netns, dir: &Path, width: u32) -> anyhow::Result<Self> {
        Self::start_with(ns, dir, width, true)
    }

    /// [`Browser::start`], with JavaScript off when `script` is false (the
    /// console's forms must work without it).
    pub fn start_with(ns: &Netns, dir: &Path, width: u32, script: bool) -> anyhow::Result<Self> {
        require("chromedriver")?;
        require("chromium")?;
        let driver_addr: SocketAddr = ([127, 0, 0, 1], DRIVER_PORT).into();
        let driver = Daemon::start(
            ns,
            "chromedriver",
            &[&format!("--port={DRIVER_PORT}")],
            &dir.join("chromedriver.log"),
            driver_addr,
        )?;
        let profile = dir.join(format!("chromium-profile-{}", std::process::id()));
        let mut b = Self {
            ns: ns.path(),
            driver_addr,
            session: String::new(),
            _driver: driver,
            profile: profile.clone(),
        };
        let mut caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--no-first-run",
                    "--disable-background-networking", "--disable-extensions",
                    "--disable-sync", "--disable-component-update",
                    format!("--window-size={width},900"),
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        if !script {
            caps["capabilities"]["alwaysMatch"]["goog:chromeOptions"]["prefs"] =
                json!({ "profile.managed_default_content_settings.javascript": 2 });
        }
        if width < 500 {
            // Headless windows are at least 500 px wide: emulate a phone's
            // viewport instead.
            caps["capabilities"]["alwaysMatch"]["goog:chromeOptions"]["mobileEmulation"] =
                json!({ "deviceMetrics": { "width": width, "height": 900, "pixelRatio": 1 } });
        }
        let v = b.call("POST", "/session", Some(&caps))?;
        v["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session id in {v}"))?
            .clone_into(&mut b.session);
        Ok(b)
    }

    /// One `WebDriver` command: its `value`, or the driver's error.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let ns = self.ns.clone();
        let addr = self.driver_addr;
        let stream = thread::spawn(move || -> anyhow::Result<TcpStream> {
            enter(&ns)?;
            Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?)
        })
        .join()
        .map_err(|_| anyhow!("the connecting thread panicked"))??;
        let mut stream = stream;
        stream.set_read_timeout(Some(Duration::from_mins(1)))?;
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        // The driver keeps the connection open: read the head, then as many
        // bytes as it announces (or to the close when it announces none).
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if let Some(length) = length {
                    while raw.len() < end + 4 + length {
                        let n = stream.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        raw.extend_from_slice(&buf[..n]);
                    }
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&raw);
        let (head, rest) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no HTTP answer from chromedriver: {text}"))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = if chunked {
            let mut out = String::new();
            let mut r = rest;
            while let Some((size, after)) = r.split_once("\r\n") {
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                if n == 0 || after.len() < n {
                    break;
                }
                out.push_str(&after[..n]);
                r = after[n..].trim_start_matches("\r\n");
            }
            out
        } else {
            rest.to_owned()
        };
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("chromedriver answered {status}: {body}"))?;
        if status != 200 {
            bail!("{method} {path}: {status} {}", v["value"]);
        }
        Ok(v["value"].clone())
    }

    fn s(&self, path: &str) -> String {
        format!("/session/{}{path}", self.session)
    }

    pub fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call("POST", &self.s("/url"), Some(&json!({ "url": url })))
            .map(drop)
    }

    pub fn url(&self) -> anyhow::Result<String> {
        Ok(self
            .call("GET", &self.s("/url"), None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    pub fn source(&self) -> anyhow::Result<String> {
        Ok(self
            .call("GET", &self.s("/source"), None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Every element matching `css`.
    pub fn all(&self, css: &str) -> anyhow::Result<Vec<String>> {
        let v = self.call(
            "POST",
            &self.s("/elements"),
            Some(&json!({ "using": "css selector", "value": css })),
        )?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e[ELEMENT].as_str().map(str::to_owned))
            .collect())
    }

    /// The element matching `css`, waiting up to `timeout` for it.
    pub fn wait(&self, css: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.all(css)?.into_iter().next() {
                return Ok(e);
            }
            if Instant::now() > deadline {
                bail!(
                    "no {css} after {timeout:?} at {}: {}",
                    self.url()?,
                    self.source()?
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The element matching `css` now.
    pub fn find(&self, css: &str) -> anyhow::Result<String> {
        self.wait(css, Duration::from_secs(5))
    }

    pub fn click(&self, css: &str) -> anyhow::Result<()> {
        let e = self.find(css)?;
        self.call(
            "POST",
            &self.s(&format!("/element/{e}/click")),
            Some(&json!({})),
        )
        .map(drop)
    }

    /// Type `text` into the element (keyboard events, as a person types).
    pub fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let e = self.find(css)?;
        self.call(
            "POST",
            &self.s(&format!("/element/{e}/value")),
            Some(&json!({ "text": text })),
        )
        .map(drop)
    }

    pub fn clear(&self, css: &str) -> anyhow::Result<()> {
        let e = self.find(css)?;
        self.call(
            "POST",
            &self.s(&format!("/element/{e}/clear")),
            Some(&json!({})),
        )
        .map(drop)
    }

    /// The element's visible text.
    pub fn text(&self, css: &str) -> anyhow::Result<String> {
        let e = self.find(css)?;
        Ok(self
            .call("GET", &self.s(&format!("/element/{e}/text")), None)?
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The element's DOM property `name` (`value` of an input).
    pub fn property(&self, css: &str, name: &str) -> anyhow::Result<Value> {
        let e = self.find(css)?;
        self.call(
            "GET",
            &self.s(&format!("/element/{e}/property/{name}")),
            None,
        )
    }

    /// Wait until `css`'s text contains `want`.
    pub fn wait_text(&self, css: &str, want: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.all(css)?.first().map(|_| self.text(css)).transpose()?;
            if let Some(t) = &text
                && t.contains(want)
            {
                return Ok(t.clone());
            }
            if Instant::now() > deadline {
                bail!("{css} never said {want:?} (it says {text:?})");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Run `script` in the page (a function body; `arguments` are `args`).
    pub fn script(&self, script: &str, args: &[Value]) -> anyhow::Result<Value> {
        self.call(
            "POST",
            &self.s("/execute/sync"),
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// The value of cookie `name` (`HttpOnly` ones too: the driver sees them).
    pub fn cookie(&self, name: &str) -> anyhow::Result<Option<Value>> {
        let all = self.call("GET", &self.s("/cookie"), None)?;
        Ok(all
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .cloned())
    }

    /// Save a screenshot of the page as `target/console/NAME.png`.
    pub fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let v = self.call("GET", &self.s("/screenshot"), None)?;
        let png = decode_base64(v.as_str().unwrap_or_default())?;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png)?;
        Ok(path)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert!(decode_base64("a*").is_err());
    }
}
