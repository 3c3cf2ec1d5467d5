//! The web console in a real browser: Debian's headless Chromium, driven
//! through chromedriver's WebDriver protocol, loads `/console/` from a
//! running two-shard gateway with a simulated device on real UDP; the
//! device appears online in the list, its page shows its registration and
//! live telemetry, and the Reboot button ends in `succeeded`. Screenshots
//! are kept under `target/tmp/test-artifacts/`.

mod common;

use common::*;
use corem_lwm2m::ctl::http::Endpoint;
use corem_lwm2m::proto::coap::Code;
use serde_json::{json, Value};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ENV_DEV: &str = "env-device";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    child: std::process::Child,
    api: Endpoint,
    session: String,
    profile: std::path::PathBuf,
}

impl Driver {
    fn start() -> Driver {
        let port = free_tcp_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver; scripts/setup installs it)");
        let api = Endpoint::parse(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while api.get("/status").is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempdir();
        // Flags as for any headless run here: no sandbox (root), no
        // background connections (the machine has no network).
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-quic", "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let r = api.send_json("POST", "/session", &caps).unwrap();
        let v = r.json();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {}", r.text()))
            .to_string();
        Driver {
            child,
            api,
            session,
            profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let p = format!("/session/{}{path}", self.session);
        let r = if method == "GET" {
            self.api.get(&p)
        } else {
            self.api.send_json(method, &p, &body)
        }
        .unwrap();
        let v = r.json();
        assert!(r.status == 200, "{method} {path}: {}", r.text());
        v["value"].clone()
    }

    /// The open prompt's text, if one is open.
    fn alert_text(&self) -> Option<String> {
        let r = self
            .api
            .get(&format!("/session/{}/alert/text", self.session))
            .unwrap();
        (r.status == 200).then(|| r.json()["value"].as_str().unwrap_or("").to_string())
    }

    /// Waits for a prompt to open; returns its text.
    fn wait_alert(&self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(t) = self.alert_text() {
                return t;
            }
            assert!(Instant::now() < deadline, "no prompt opened");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    /// Runs `script` in the page (`return ...`).
    fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    fn click(&self, css: &str) {
        let el = self.call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        let id = el[ELEMENT].as_str().expect("element").to_string();
        self.call("POST", &format!("/element/{id}/click"), json!({}));
    }

    /// Waits until `script` returns a truthy value; returns it.
    fn wait_for(&self, what: &str, script: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.js(script);
            if !(v.is_null() || v == false || v == "") {
                return v;
            }
            if Instant::now() > deadline {
                let body = self.js("return document.body.innerText");
                panic!(
                    "timed out waiting for {what}; page text:\n{}",
                    body.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let b64 = self.call("GET", "/screenshot", Value::Null);
        let png = openssl::base64::decode_block(b64.as_str().unwrap()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
        path
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self
            .api
            .request("DELETE", &format!("/session/{}", self.session), None);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[test]
fn console_lists_the_device_shows_live_telemetry_and_reboots_it() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, PROVISIONING, "");
    let mut dev = Device::new("urn:imei:env", gw.coap, 5);
    assert_eq!(dev.register(1), Code::CREATED);
    // The device answers the gateway (the reboot) and reports a value every
    // 300 ms from its own thread while the browser works.
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let pump = std::thread::spawn(move || {
        let mut next = Instant::now();
        while !s.load(Ordering::Relaxed) {
            if Instant::now() >= next {
                if let Some((_, n)) = dev.sim.notify("/3303/0", false) {
                    dev.send(&n);
                }
                next = Instant::now() + Duration::from_millis(300);
            }
            dev.pump(Duration::from_millis(20));
        }
        dev
    });

    let d = Driver::start();
    let base = format!("http://{}", gw.admin);
    d.goto(&format!("{base}/console/"));
    // The list: the device appears, online.
    let state = d.wait_for(
        "the device online in the list",
        &format!(
            "const r = document.querySelector('tr[data-device=\"{ENV_DEV}\"]'); \
             return r && r.innerText.includes('online') ? r.innerText : null"
        ),
        Duration::from_secs(20),
    );
    assert!(state.as_str().unwrap().contains("urn:imei:env"), "{state}");
    d.screenshot("console-devices.png");

    // Its page: registration facts and live telemetry.
    d.click(&format!("tr[data-device=\"{ENV_DEV}\"] a"));
    d.wait_for(
        "the registration's shard",
        "const c = document.querySelector('td[data-fact=\"shard\"]'); return c && c.innerText !== '-' ? c.innerText : null",
        Duration::from_secs(20),
    );
    let t = d.wait_for(
        "live telemetry",
        "const r = document.querySelector('#telemetry tbody tr'); return r ? r.innerText : null",
        Duration::from_secs(20),
    );
    assert!(t.as_str().unwrap().contains("temperature=22.5"), "{t}");

    // Reboot: the RPC's row ends `succeeded`.
    d.click("#rpc-reboot");
    let st = d.wait_for(
        "the reboot RPC to finish",
        "const c = document.querySelector('#rpcs .rpc-status'); \
         return c && ['succeeded','failed','timed_out','expired'].includes(c.innerText) ? c.innerText : null",
        Duration::from_secs(30),
    );
    d.screenshot("console-device-rebooted.png");
    assert_eq!(st, "succeeded");

    // The firmware page renders (no images yet).
    d.goto(&format!("{base}/console/#/firmware"));
    d.wait_for(
        "the firmware page",
        "return document.querySelector('#campaigns') ? true : null",
        Duration::from_secs(10),
    );
    // Nothing from the device page (its long poll was in flight when we
    // left) lands on this one.
    std::thread::sleep(Duration::from_millis(1500));
    let err = d.js("return document.querySelector('#err').innerText");
    assert_eq!(err, "", "an error on the firmware page");
    d.screenshot("console-firmware.png");

    stop.store(true, Ordering::Relaxed);
    let dev = pump.join().unwrap();
    assert!(
        dev.sim
            .executed_args
            .iter()
            .any(|(p, _)| p.to_string() == "/3/0/4"),
        "the device executed /3/0/4"
    );
}

/// A gateway with an admin token: the console asks for it once (not once
/// per failing request), a cancelled prompt stays cancelled until the Token
/// button, and with the token the list loads.
#[test]
fn console_asks_once_for_the_admin_token() {
    const TOKEN: &str = "console-test-token-0123456789";
    let broker = Broker::memory();
    let gw = Gateway::start_with_token(&broker, 2, PROVISIONING, TOKEN);
    let mut dev = Device::new("urn:imei:env", gw.coap, 5);
    assert_eq!(dev.register(1), Code::CREATED);
    drop(dev);

    let d = Driver::start();
    d.goto(&format!("http://{}/console/", gw.admin));
    let text = d.wait_alert(Duration::from_secs(20));
    assert!(text.contains("admin token"), "{text}");
    // Cancelled: the page shows the 401 and does not ask again by itself.
    d.call("POST", "/alert/dismiss", json!({}));
    // The list reloads every 3 s: a second reload has come and gone.
    std::thread::sleep(Duration::from_millis(6500));
    assert_eq!(d.alert_text(), None, "asked again after a cancel");
    let err = d.wait_for(
        "the 401 on the page",
        "const e = document.querySelector('#err'); return e && e.innerText ? e.innerText : null",
        Duration::from_secs(10),
    );
    assert!(err.as_str().unwrap().contains("401"), "{err}");
    // A wrong token: asked again, once.
    d.click("#token-btn");
    d.wait_alert(Duration::from_secs(5));
    d.call("POST", "/alert/text", json!({ "text": "not-the-token" }));
    d.call("POST", "/alert/accept", json!({}));
    d.wait_alert(Duration::from_secs(10));
    d.call("POST", "/alert/text", json!({ "text": TOKEN }));
    d.call("POST", "/alert/accept", json!({}));
    let row = d.wait_for(
        "the device in the list",
        &format!(
            "const r = document.querySelector('tr[data-device=\"{ENV_DEV}\"]'); return r ? r.innerText : null"
        ),
        Duration::from_secs(20),
    );
    assert!(row.as_str().unwrap().contains("urn:imei:env"), "{row}");
    assert_eq!(d.alert_text(), None);
    d.screenshot("console-token.png");
}
