//! A real headless Chromium inside a test's namespace, driven through
//! chromedriver's W3C WebDriver API with the `fantoccini` client.
//!
//! chromedriver runs in the namespace (`ip netns exec`) and starts Chromium
//! there, so the browser reaches only that namespace's addresses. The test
//! talks to chromedriver on the namespace's loopback: the WebDriver client
//! runs on a single-threaded tokio runtime that is only ever driven from a
//! thread inside the namespace ([`Netns::enter`]), so every socket it opens
//! (and every blocking-pool thread it starts) belongs to the namespace.
//! Chromium gets a fresh profile directory and the flags that keep an offline
//! machine quiet (no QUIC, sync, component updates or background networking).
//! Certificates: one public key is trusted by its SPKI hash
//! (`--ignore-certificate-errors-spki-list`), not every certificate.
//!
//! The test is synchronous; each call blocks on the runtime, bounded by
//! `CALL_TIMEOUT`.
//!
//! Requires Debian's `chromium` and `chromium-driver` (`cargo xtask
//! bootstrap` installs them). Dropping the [`Browser`] ends the session,
//! kills chromedriver's process group (Chromium with it) and removes the
//! profile.

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, error::CmdError, wd::Capabilities};
use hyper_util::client::legacy::connect::HttpConnector;
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
/// Bound on ending the session when the browser is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

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
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Option<Child>,
    scratch: ScratchDir,
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
        // Current-thread: its tasks run only on the thread that blocks on it,
        // which is always one inside the namespace (see `run`).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("building the WebDriver client's runtime: {e}"));
        let mut browser = Browser {
            ns,
            runtime,
            client: None,
            driver: Some(driver),
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
        let mut capabilities = Capabilities::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert("acceptInsecureCerts".into(), json!(false));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": binary(CHROMIUM_ENV, "/usr/bin/chromium"),
                "args": args,
            }),
        );
        let url = format!("http://{}", driver_addr());
        let connected = browser.block_on(CALL_TIMEOUT, async {
            ClientBuilder::new(HttpConnector::new())
                .capabilities(capabilities)
                .connect(&url)
                .await
        });
        match connected {
            Some(Ok(client)) => browser.client = Some(client),
            Some(Err(e)) => panic!(
                "chromedriver did not start a session: {e}\n{}",
                command::read_log(&log)
            ),
            None => panic!(
                "chromedriver did not start a session within {CALL_TIMEOUT:?}\n{}",
                command::read_log(&log)
            ),
        }
        browser
    }

    /// Waits until chromedriver accepts connections on the namespace's
    /// loopback (it listens once it is ready).
    fn wait_driver(&mut self) {
        let deadline = Instant::now() + DRIVER_READY;
        loop {
            let addr = driver_addr();
            if self
                .ns
                .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
                .is_ok()
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

    /// Drives `fut` to its end on the runtime, from a thread inside the
    /// namespace, for at most `timeout`; `None` when it took longer.
    fn block_on<T: Send>(
        &self,
        timeout: Duration,
        fut: impl Future<Output = T> + Send,
    ) -> Option<T> {
        let runtime = &self.runtime;
        // The timer is made inside `block_on`: it needs the runtime's context.
        self.ns.enter(|| {
            runtime
                .block_on(async { tokio::time::timeout(timeout, fut).await })
                .ok()
        })
    }

    fn client(&self) -> &Client {
        self.client
            .as_ref()
            .unwrap_or_else(|| panic!("the browser session is not open"))
    }

    /// One WebDriver call; panics, saying `what` it was, if it fails or
    /// takes longer than [`CALL_TIMEOUT`].
    fn run<T: Send>(
        &self,
        what: &dyn std::fmt::Display,
        call: impl Future<Output = Result<T, CmdError>> + Send,
    ) -> T {
        match self.block_on(CALL_TIMEOUT, call) {
            Some(Ok(v)) => v,
            Some(Err(e)) => panic!("{what}: {e}"),
            None => panic!("{what}: no answer within {CALL_TIMEOUT:?}"),
        }
    }

    /// Opens `url` (waits for the page's load event).
    pub fn goto(&self, url: &str) {
        self.run(
            &format_args!("navigating to {url}"),
            self.client().goto(url),
        );
    }

    /// Runs `script` (a function body; `return` gives the result) in the page.
    pub fn eval(&self, script: &str) -> Value {
        self.run(
            &format_args!("script {script:?}"),
            self.client().execute(script, Vec::new()),
        )
    }

    /// Runs `script` with a callback as its last argument
    /// (`arguments[arguments.length - 1]`), and returns what it was called with.
    pub fn eval_async(&self, script: &str) -> Value {
        self.run(
            &format_args!("async script {script:?}"),
            self.client().execute_async(script, Vec::new()),
        )
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
        let png = self.run(&"screenshot", self.client().screenshot());
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

fn driver_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, DRIVER_PORT))
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            match self.block_on(CLOSE_TIMEOUT, client.close()) {
                Some(Ok(())) => {}
                Some(Err(e)) => eprintln!("ending the browser session: {e}"),
                None => eprintln!("ending the browser session: no answer within {CLOSE_TIMEOUT:?}"),
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
