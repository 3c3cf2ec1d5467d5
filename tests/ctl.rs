//! `corem-ctl` against a running two-shard gateway with a token: every
//! command, as a table and as `--json`, with its exit code; a simulated
//! device on real UDP answers the RPCs and sends the telemetry that
//! `telemetry tail` prints.

mod common;

use common::*;
use corem_lwm2m::proto::coap::{Code, MsgType};
use serde_json::Value;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TOKEN: &str = "ctl-test-token-0123456789";
const ENV_DEV: &str = "env-device";

struct Ctl {
    admin: String,
}

impl Ctl {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_corem-ctl"));
        c.arg("--admin")
            .arg(&self.admin)
            .args(args)
            .env("COREM_ADMIN_TOKEN", TOKEN)
            .stdin(Stdio::null());
        c
    }
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let o: Output = self.cmd(args).output().unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
    /// Runs and expects `code`; returns stdout.
    fn expect(&self, code: i32, args: &[&str]) -> String {
        let (c, out, err) = self.run(args);
        assert_eq!(c, code, "corem-ctl {args:?}\nstdout: {out}\nstderr: {err}");
        out
    }
    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.expect(0, &a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}\n{out}"))
    }
}

/// Pumps a device on its own thread (it answers the gateway's requests)
/// until dropped.
struct Pumped {
    stop: Arc<AtomicBool>,
    h: Option<std::thread::JoinHandle<Device>>,
}

impl Pumped {
    fn new(mut dev: Device) -> Pumped {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let h = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                dev.pump(Duration::from_millis(20));
            }
            dev
        });
        Pumped { stop, h: Some(h) }
    }
    fn stop(mut self) -> Device {
        self.stop.store(true, Ordering::Relaxed);
        self.h.take().unwrap().join().unwrap()
    }
}

#[test]
fn every_command_as_table_and_json_with_meaningful_exit_codes() {
    let broker = Broker::memory();
    let dir = tempdir();
    let gw = Gateway::start_with_token(&broker, 2, PROVISIONING, TOKEN);
    // The CLI's own copy, for --token-file.
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let ctl = Ctl {
        admin: format!("http://{}", gw.admin),
    };
    let mut dev = Device::new("urn:imei:env", gw.coap, 3);
    assert_eq!(dev.register(1), Code::CREATED);

    // Auth and reachability.
    let (code, _, err) = {
        let o = Command::new(env!("CARGO_BIN_EXE_corem-ctl"))
            .args(["--admin", &ctl.admin, "devices", "list"])
            .env_remove("COREM_ADMIN_TOKEN")
            .output()
            .unwrap();
        (
            o.status.code(),
            o.stdout,
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(4), "no token → 4: {err}");
    assert!(err.contains("401"), "{err}");
    let (code, _, err) = ctl.run(&["--token", "wrong-token-wrong-token", "devices", "list"]);
    assert_eq!(code, 4, "{err}");
    let nowhere = Ctl {
        admin: format!("http://127.0.0.1:{}", free_tcp_port()),
    };
    let (code, _, err) = nowhere.run(&["status"]);
    assert_eq!(code, 3, "unreachable → 3: {err}");
    assert!(err.contains("cannot reach"), "{err}");
    let (code, _, _) = ctl.run(&["devices", "frobnicate"]);
    assert_eq!(code, 2, "usage → 2");
    let tf = ctl.expect(
        0,
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "endpoints",
            "list",
        ],
    );
    assert!(tf.contains("urn:imei:env"), "{tf}");

    // status
    let s = ctl.expect(0, &["status"]);
    assert!(s.contains("healthy") && s.contains("1 registered"), "{s}");
    let s = ctl.json(&["status"]);
    assert_eq!(s["healthy"], true);
    assert_eq!(s["shards"], 2.0);
    assert_eq!(s["registrations"], 1.0);
    assert!(s["rss_bytes"].as_f64().unwrap() > 1e6);

    // devices
    let t = ctl.expect(0, &["devices", "list"]);
    let line = t
        .lines()
        .find(|l| l.starts_with(ENV_DEV))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(
        line.contains("urn:imei:env") && line.contains("yes"),
        "{line}"
    );
    assert!(t.starts_with("DEVICE_ID"), "{t}");
    let v = ctl.json(&["devices", "list", "--online", "true"]);
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["device_id"], ENV_DEV);
    let v = ctl.json(&["devices", "list", "--online", "false", "--tenant", "acme"]);
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    let t = ctl.expect(0, &["devices", "show", ENV_DEV]);
    assert!(
        t.contains("online") && t.contains("yes") && t.contains("observation"),
        "{t}"
    );
    let v = ctl.json(&["devices", "show", ENV_DEV]);
    assert!(v["registration"].is_object(), "{v}");
    ctl.expect(5, &["devices", "show", "no-such-device"]);

    // endpoints: add, list, import CSV and JSON, remove
    let t = ctl.expect(
        0,
        &[
            "endpoints",
            "add",
            "urn:imei:900",
            "--device-id",
            "dev-900",
            "--tenant",
            "acme",
            "--psk-identity",
            "id-900",
            "--psk-key-hex",
            "000102030405060708090a0b0c0d0e0f",
        ],
    );
    assert_eq!(t.trim(), "added urn:imei:900");
    let v = ctl.json(&[
        "endpoints",
        "add",
        "urn:imei:900",
        "--device-id",
        "dev-900",
        "--tenant",
        "acme",
    ]);
    assert_eq!(v["created"], false);
    let t = ctl.expect(0, &["endpoints", "list"]);
    assert!(
        t.lines()
            .any(|l| l.starts_with("urn:imei:900") && l.contains("dev-900")),
        "{t}"
    );
    assert!(!t.contains("000102"), "keys are never shown");
    let csv = dir.join("fleet.csv");
    std::fs::write(
        &csv,
        "endpoint,device_id,tenant_id,profile,psk_identity,psk_key_hex\n\
         urn:imei:901,dev-901,acme,environment,,\n\
         \"urn:imei:902\",dev-902,acme,,id-902,101112131415161718191a1b1c1d1e1f\n",
    )
    .unwrap();
    let t = ctl.expect(0, &["endpoints", "import", csv.to_str().unwrap()]);
    assert!(t.contains("imported 2 endpoints"), "{t}");
    let js = dir.join("fleet.json");
    std::fs::write(
        &js,
        r#"[{"endpoint":"urn:imei:903","device_id":"dev-903","tenant_id":"acme"}]"#,
    )
    .unwrap();
    let v = ctl.json(&["endpoints", "import", js.to_str().unwrap()]);
    assert_eq!(v["upserted"], 1);
    let v = ctl.json(&["endpoints", "list"]);
    for ep in ["urn:imei:901", "urn:imei:902", "urn:imei:903"] {
        assert!(v[ep].is_object(), "{ep} not imported: {v}");
    }
    assert_eq!(v["urn:imei:901"]["profile"], "environment");
    let bad = dir.join("bad.csv");
    std::fs::write(&bad, "endpoint,tenant_id\nx,y\n").unwrap();
    ctl.expect(2, &["endpoints", "import", bad.to_str().unwrap()]);
    let bad_entry = dir.join("bad.json");
    std::fs::write(
        &bad_entry,
        r#"[{"endpoint":"x","device_id":"","tenant_id":"a b"}]"#,
    )
    .unwrap();
    ctl.expect(1, &["endpoints", "import", bad_entry.to_str().unwrap()]);
    assert_eq!(
        ctl.expect(0, &["endpoints", "remove", "urn:imei:903"])
            .trim(),
        "removed urn:imei:903"
    );
    ctl.expect(5, &["endpoints", "remove", "urn:imei:903"]);

    // telemetry tail: two notifications → two lines (table), then JSON.
    let tail = ctl
        .cmd(&[
            "telemetry",
            "tail",
            "--device",
            ENV_DEV,
            "--count",
            "2",
            "--seconds",
            "20",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..2 {
        assert_eq!(
            dev.notify_con("/3303/0", Duration::from_secs(10)),
            Some(MsgType::Ack)
        );
    }
    let o = tail.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.lines()
            .all(|l| l.contains("temperature=22.5") && l.ends_with("(/3303/0)")),
        "{text}"
    );
    let tail = ctl
        .cmd(&[
            "--json",
            "telemetry",
            "tail",
            "--device",
            ENV_DEV,
            "--count",
            "1",
            "--seconds",
            "20",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    dev.notify_con("/3303/0", Duration::from_secs(10));
    let o = tail.wait_with_output().unwrap();
    let p: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(p["device_id"], ENV_DEV);
    assert_eq!(p["numeric_values"]["temperature"], 22.5);
    ctl.expect(
        5,
        &["telemetry", "tail", "--device", "nobody", "--count", "1"],
    );

    // rpc send --wait: each transition printed once, exit 0 on success.
    let pumped = Pumped::new(dev);
    let t = ctl.expect(
        0,
        &[
            "rpc", "send", ENV_DEV, "reboot", "--rpc-id", "ctl-1", "--wait",
        ],
    );
    let statuses: Vec<&str> = t
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    // The acceptance (queued, or sent at once to an online device), then
    // the final status.
    assert!(matches!(statuses.first(), Some(&"queued" | &"sent")), "{t}");
    assert!(statuses.len() >= 2, "{t}");
    assert_eq!(statuses.last(), Some(&"succeeded"), "{t}");
    assert!(t.contains("code=2.04"), "{t}");
    let out = ctl.expect(
        0,
        &[
            "--json",
            "rpc",
            "send",
            ENV_DEV,
            "read",
            "--params",
            r#"{"path":"/3303/0/5700"}"#,
            "--wait",
        ],
    );
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "succeeded", "{out}");
    assert_eq!(last["response"]["/3303/0/5700"], 22.5, "{out}");
    let t = ctl.expect(0, &["rpc", "show", "ctl-1"]);
    assert!(t.contains("succeeded") && t.contains("reboot"), "{t}");
    let v = ctl.json(&["rpc", "list", ENV_DEV]);
    assert!(v["rpcs"].as_array().unwrap().len() >= 2, "{v}");
    assert!(ctl.expect(0, &["rpc", "list", ENV_DEV]).contains("ctl-1"));
    ctl.expect(5, &["rpc", "show", "no-such-rpc"]);
    // Refused before it runs (unknown method) → failed → exit 1.
    let (code, out, err) = ctl.run(&["rpc", "send", ENV_DEV, "no_such_method", "--wait"]);
    assert_eq!(code, 1, "{out}{err}");
    ctl.expect(2, &["rpc", "send", ENV_DEV, "read", "--params", "not json"]);
    let dev = pumped.stop();

    // A silent device: the RPC times out → exit 1.
    drop(dev);
    let (code, out, _) = ctl.run(&[
        "rpc",
        "send",
        ENV_DEV,
        "reboot",
        "--timeout-ms",
        "1500",
        "--wait",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.lines().last().unwrap_or("").contains("timed_out") || out.contains("failed"),
        "{out}"
    );

    // firmware: upload, list, campaign create/show/pause/cancel, remove
    let img = dir.join("fw.bin");
    std::fs::write(&img, vec![0x5a; 3000]).unwrap();
    let t = ctl.expect(
        0,
        &[
            "firmware",
            "upload",
            img.to_str().unwrap(),
            "--name",
            "fw-ctl",
            "--version",
            "2.0.0",
        ],
    );
    assert!(t.contains("uploaded fw-ctl 2.0.0: 3000 bytes"), "{t}");
    let v = ctl.json(&["firmware", "list"]);
    assert_eq!(v[0]["name"], "fw-ctl");
    assert_eq!(v[0]["size"], 3000);
    assert!(ctl.expect(0, &["firmware", "list"]).contains("fw-ctl"));
    let v = ctl.json(&[
        "firmware",
        "campaign",
        "create",
        "--image",
        "fw-ctl",
        "--id",
        "camp-1",
        "--devices",
        "dev-900,dev-901",
        "--concurrency",
        "1",
    ]);
    assert_eq!(v["campaign_id"], "camp-1");
    assert_eq!(v["devices"], 2);
    let t = ctl.expect(0, &["firmware", "campaign", "pause", "camp-1"]);
    assert!(t.contains("camp-1") && t.contains("paused"), "{t}");
    assert!(ctl
        .expect(0, &["firmware", "campaign", "list"])
        .contains("camp-1"));
    let v = ctl.json(&["firmware", "campaign", "cancel", "camp-1"]);
    assert_eq!(v["state"], "cancelled", "{v}");
    ctl.expect(1, &["firmware", "campaign", "resume", "camp-1"]);
    ctl.expect(5, &["firmware", "campaign", "show", "nope"]);
    ctl.expect(2, &["firmware", "campaign", "create", "--image", "fw-ctl"]);
    ctl.expect(0, &["firmware", "remove", "fw-ctl"]);
    ctl.expect(5, &["firmware", "remove", "fw-ctl"]);

    // completion
    let c = ctl.expect(0, &["completion", "bash"]);
    assert!(
        c.contains("corem-ctl") && c.contains("telemetry"),
        "{}",
        &c[..c.len().min(200)]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
