//! A real headless Chromium inside a test's namespace, driven through
//! chromedriver's W3C WebDriver HTTP API with a tiny client on std's
//! `TcpStream` (a few endpoints: session, url, execute, screenshot).
//!
//! chromedriver runs in the namespace (`ip netns exec`) and starts Chromium
//! there, so the browser reaches only that namespace's addresses; the test
//! talks to chromedriver on the namespace's loopback through sockets made
//! inside it. Chromium gets a fresh profile directory and the flags that keep
//! an offline machine quiet (no QUIC, sync, component updates or background
//! networking). Certificates: one public key is trusted by its SPKI hash
//! (`--ignore-certificate-errors-spki-list`), not every certificate.
//!
//! Requires Debian's `chromium` and `chromium-driver` (`cargo xtask
//! bootstrap` installs them). Dropping the [`Browser`] ends the session,
//! kills chromedriver's process group (Chromium with it) and removes the
//! profile.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{command, netns::Netns, scratch::ScratchDir};

/// Set to use that chromedriver binary.
pub const CHROMEDRIVER_ENV: &str = "SLUICE_CHROMEDRIVER";
/// Set to use that Chromium binary.
pub const CHROMIUM_ENV: &str = "SLUICE_CHROMIUM";
/// chromedriver's port on the namespace's loopback (the namespace is the
/// test's own, so no other test competes for it).
const DRIVER_PORT: u16 = 9515;
const DRIVER_READY: Duration = Duration::from_secs(20);
/// Bound on one WebDriver call (starting Chromium is the slowest).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

fn binary(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// Whether chromedriver and Chromium are installed (tests skip, saying why,
/// when not).
pub fn available() -> bool {
    binary(CHROMEDRIVER_ENV, "/usr/bin/chromedriver").is_file()
        && binary(CHROMIUM_ENV, "/usr/bin/chromium").is_file()
}

#[derive(Debug)]
pub struct Browser<'ns> {
    ns: &'ns Netns,
    driver: Option<Child>,
    session: Option<String>,
    scratch: ScratchDir,
}

/// What a WebDriver call answered: the HTTP status and the `value`.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub value: Value,
}

impl<'ns> Browser<'ns> {
    /// Starts chromedriver in `ns` and a headless Chromium session that
    /// trusts the public key whose SHA-256 SPKI hash (base64) is `spki_pin`.
    pub fn start(ns: &'ns Netns, spki_pin: &str) -> Self {
        let scratch = ScratchDir::new();
        let log = scratch.join("chromedriver.log");
        let mut cmd = ns.command(&[
            &binary(CHROMEDRIVER_ENV, "/usr/bin/chromedriver")
                .display()
                .to_string(),
            &format!("--port={DRIVER_PORT}"),
            &format!("--log-path={}", log.display()),
        ]);
        // Its own process group: dropping kills chromedriver and every
        // Chromium process it started, by that group's id.
        cmd.process_group(0).stdin(Stdio::null());
        let driver = command::spawn_logged(&mut cmd, &scratch.join("chromedriver.out"));
        let mut browser = Browser {
            ns,
            driver: Some(driver),
            session: None,
            scratch,
        };
        browser.wait_driver();
        let profile = browser.scratch.join("profile");
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-extensions".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1400,1300".to_owned(),
            format!("--user-data-dir={}", profile.display()),
            format!("--ignore-certificate-errors-spki-list={spki_pin}"),
        ];
        let answer = browser.call(
            "POST",
            "/session",
            Some(json!({
                "capabilities": { "alwaysMatch": {
                    "browserName": "chrome",
                    "acceptInsecureCerts": false,
                    "goog:chromeOptions": {
                        "binary": binary(CHROMIUM_ENV, "/usr/bin/chromium"),
                        "args": args,
                    },
                }}
            })),
        );
        let id = answer.value["sessionId"]
            .as_str()
            .unwrap_or_else(|| {
                panic!(
                    "chromedriver did not start a session ({}): {}\n{}",
                    answer.status,
                    answer.value,
                    command::read_log(&log)
                )
            })
            .to_owned();
        browser.session = Some(id);
        browser
    }

    fn wait_driver(&mut self) {
        let deadline = Instant::now() + DRIVER_READY;
        loop {
            if let Ok(a) = self.try_call("GET", "/status", None, Duration::from_secs(2))
                && a.value["ready"] == json!(true)
            {
                return;
            }
            if let Some(child) = self.driver.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "chromedriver exited ({status}):\n{}",
                    command::read_log(&self.scratch.join("chromedriver.out"))
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready within {DRIVER_READY:?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn session_path(&self, rest: &str) -> String {
        let id = self.session.as_deref().unwrap_or("none");
        format!("/session/{id}{rest}")
    }

    /// One WebDriver call; panics if chromedriver cannot be reached.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        self.try_call(method, path, body, CALL_TIMEOUT)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> std::io::Result<Answer> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, DRIVER_PORT));
        // Made inside the namespace: the socket stays there.
        let mut stream = self
            .ns
            .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{DRIVER_PORT}\r\n\
             Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes())?;
        let (status, payload) = read_answer(&mut stream)?;
        let parsed: Value = serde_json::from_str(&payload).unwrap_or(Value::Null);
        Ok(Answer {
            status,
            value: parsed.get("value").cloned().unwrap_or(parsed),
        })
    }

    /// Opens `url` (waits for the page's load event).
    pub fn goto(&self, url: &str) {
        let a = self.call(
            "POST",
            &self.session_path("/url"),
            Some(json!({ "url": url })),
        );
        assert_eq!(a.status, 200, "navigating to {url}: {}", a.value);
    }

    /// Runs `script` (a function body; `return` gives the result) in the page.
    pub fn eval(&self, script: &str) -> Value {
        let a = self.call(
            "POST",
            &self.session_path("/execute/sync"),
            Some(json!({ "script": script, "args": [] })),
        );
        assert_eq!(a.status, 200, "script {script:?}: {}", a.value);
        a.value
    }

    /// Runs `script` with a callback as its last argument
    /// (`arguments[arguments.length - 1]`), and returns what it was called with.
    pub fn eval_async(&self, script: &str) -> Value {
        let a = self.call(
            "POST",
            &self.session_path("/execute/async"),
            Some(json!({ "script": script, "args": [] })),
        );
        assert_eq!(a.status, 200, "async script {script:?}: {}", a.value);
        a.value
    }

    /// Evaluates `script` until `done` accepts its value, at most `timeout`;
    /// returns the accepted value or panics with the last one.
    pub fn wait_for(
        &self,
        what: &str,
        script: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(script);
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {timeout:?}; last value: {v}"
            );
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Saves a PNG screenshot of the window to `path`.
    pub fn screenshot(&self, path: &Path) {
        let a = self.call("GET", &self.session_path("/screenshot"), None);
        let encoded = a
            .value
            .as_str()
            .unwrap_or_else(|| panic!("screenshot: {}", a.value));
        let png = base64_decode(encoded).unwrap_or_else(|| panic!("screenshot: not base64"));
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        if self.session.is_some() {
            let path = self.session_path("");
            if let Err(e) = self.try_call("DELETE", &path, None, Duration::from_secs(10)) {
                eprintln!("ending the browser session: {e}");
            }
        }
        if let Some(mut child) = self.driver.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) with the negated id of the process group we
                // created for chromedriver (process_group(0) above): it
                // signals only chromedriver and the browser it started.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Reads one HTTP/1.1 answer: status and body. chromedriver keeps the
/// connection open despite `Connection: close`, so the body is read by its
/// length (or its chunks), never to the end of the stream.
fn read_answer(stream: &mut TcpStream) -> std::io::Result<(u16, String)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let complete = |raw: &[u8]| -> Option<(u16, String)> {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        let lower = head.to_ascii_lowercase();
        let length = lower.lines().find_map(|l| {
            l.strip_prefix("content-length:")
                .and_then(|v| v.trim().parse::<usize>().ok())
        });
        match length {
            Some(n) if body.len() >= n => Some((status, body[..n].to_owned())),
            Some(_) => None,
            None if lower.contains("transfer-encoding: chunked") => body
                .contains("\r\n0\r\n\r\n")
                .then(|| (status, dechunk(body))),
            None => None,
        }
    };
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            // Closed: whatever came is the answer.
            let text = String::from_utf8_lossy(&raw).into_owned();
            let (head, body) = text
                .split_once("\r\n\r\n")
                .ok_or_else(|| std::io::Error::other(format!("no HTTP answer: {text}")))?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
            return Ok((status, body.to_owned()));
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(answer) = complete(&raw) {
            return Ok(answer);
        }
    }
}

/// An HTTP/1.1 chunked body, decoded.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Standard base64 (screenshots), without a dependency for it.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len().max(1)]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_chunks_decode() {
        assert_eq!(base64_decode("aGVsbG8="), Some(b"hello".to_vec()));
        assert_eq!(base64_decode("aGVsbG8h"), Some(b"hello!".to_vec()));
        assert_eq!(base64_decode("aGk="), Some(b"hi".to_vec()));
        assert_eq!(base64_decode("a$"), None);
        assert_eq!(dechunk("5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"), "hello!");
    }
}
