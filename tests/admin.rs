//! The admin HTTP API against the gateway binary: the server holds up
//! against slow and hostile clients (header/body/idle timeouts, connection
//! and body limits, bearer token), fields are length-checked, and the
//! device endpoints list, page and describe real registrations (simulated
//! devices over real UDP, two shards).

mod common;

use common::*;
use corem_lwm2m::proto::coap::Code;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token-0123456789abcdef";

fn auth() -> String {
    format!("Authorization: Bearer {TOKEN}\r\n")
}

fn get(admin: SocketAddr, path: &str) -> (u16, Value) {
    let (code, b) = http_with(admin, "GET", path, &auth(), "").unwrap();
    (code, serde_json::from_str(&b).unwrap_or(Value::Null))
}

/// Writes `head` on a fresh connection and reads until the server closes
/// it: (status, body), status 0 when it closed without answering. Panics
/// when the server does not close it within 15 s.
fn raw(admin: SocketAddr, head: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(head).unwrap();
    read_response(&mut s)
}

fn read_response(s: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    if let Err(e) = s.read_to_end(&mut buf) {
        // A reset after the answer is a close too; a timeout is not.
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server kept the connection open: {e}"
        );
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

fn error_code(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    assert!(
        v["message"].is_string(),
        "JSON error with a message: {body}"
    );
    v["code"].as_str().unwrap_or("").to_string()
}

#[test]
fn admin_api_holds_up_against_slow_and_hostile_clients() {
    let broker = Broker::memory();
    let dir = tempdir();
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let gw = Gateway::start(
        &broker,
        2,
        PROVISIONING,
        &format!(
            "[admin]\ntoken_file = \"{}\"\nheader_timeout_ms = 2000\nbody_timeout_ms = 1000\n\
             idle_timeout_ms = 3000\nmax_connections = 8\n",
            token_file.display()
        ),
    );
    let admin = gw.admin;

    // Health and metrics need no token; everything else does.
    assert_eq!(http(admin, "GET", "/healthz", "").unwrap().0, 200);
    let (code, b) = http(admin, "GET", "/v1/endpoints", "").unwrap();
    assert_eq!((code, error_code(&b).as_str()), (401, "unauthorized"));
    let wrong = "Authorization: Bearer test-token-0123456789abcdeX\r\n";
    assert_eq!(
        http_with(admin, "GET", "/v1/endpoints", wrong, "")
            .unwrap()
            .0,
        401
    );
    let (code, v) = get(admin, "/v1/endpoints");
    assert_eq!(code, 200);
    assert_eq!(v["urn:imei:123"]["tenant_id"], "acme");

    // Unknown paths and methods: JSON errors too.
    let (code, b) = http_with(admin, "GET", "/v2/nothing", &auth(), "").unwrap();
    assert_eq!((code, error_code(&b).as_str()), (404, "not_found"));
    let (code, b) = http_with(admin, "DELETE", "/v1/profiles", &auth(), "").unwrap();
    assert_eq!((code, error_code(&b).as_str()), (405, "method_not_allowed"));

    // A client trickling its body: /healthz still answers at once, the
    // trickler gets 408 once the body timeout passed.
    let mut slow = TcpStream::connect(admin).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    write!(
        slow,
        "POST /v1/endpoints HTTP/1.1\r\nHost: x\r\n{}Content-Length: 100\r\n\r\n[",
        auth()
    )
    .unwrap();
    assert_eq!(http(admin, "GET", "/healthz", "").unwrap().0, 200);
    assert_eq!(
        http(admin, "GET", "/metrics", "").unwrap().0,
        200,
        "metrics while a body trickles"
    );
    let (code, b) = read_response(&mut slow);
    assert_eq!((code, error_code(&b).as_str()), (408, "request_timeout"));

    // A client that never finishes its headers is dropped (raw() fails
    // if the connection stays open).
    let (code, _) = raw(admin, b"GET /v1/endpoints HTTP/1.1\r\nHost: x\r\n");
    assert_ne!(code, 200, "no answer to a request without its end");

    // Body limits: 1 MiB for single calls (413 from Content-Length, before
    // reading), 64 MiB for bulk provisioning.
    let (code, b) = raw(
        admin,
        format!(
            "POST /v1/devices/x/rpc HTTP/1.1\r\nHost: x\r\n{}Content-Length: 5000000\r\n\r\n",
            auth()
        )
        .as_bytes(),
    );
    assert_eq!((code, error_code(&b).as_str()), (413, "payload_too_large"));
    // A 5 MB device_id, sent as curl sends large bodies (Expect:
    // 100-continue): refused before the body is sent.
    let (code, b) = raw(
        admin,
        format!(
            "PUT /v1/endpoints/big HTTP/1.1\r\nHost: x\r\n{}Expect: 100-continue\r\n\
             Content-Length: 5000038\r\n\r\n",
            auth()
        )
        .as_bytes(),
    );
    assert_eq!((code, error_code(&b).as_str()), (413, "payload_too_large"));
    assert_eq!(get(admin, "/v1/endpoints/big").0, 404);
    let bulk: Vec<Value> = (0..12_000)
        .map(|i| {
            serde_json::json!({
                "endpoint": format!("urn:bulk:{i:06}"),
                "device_id": format!("bulk-device-{i:06}-0123456789abcdef0123456789"),
                "tenant_id": "acme",
            })
        })
        .collect();
    let bulk = serde_json::to_string(&bulk).unwrap();
    assert!(bulk.len() > 1 << 20);
    let (code, b) = http_with(admin, "POST", "/v1/endpoints", &auth(), &bulk).unwrap();
    assert_eq!(code, 200, "{b}");

    // Field lengths.
    let long_tenant = format!(r#"{{"device_id":"d-1","tenant_id":"{}"}}"#, "t".repeat(300));
    let (code, b) = http_with(admin, "PUT", "/v1/endpoints/ep-1", &auth(), &long_tenant).unwrap();
    assert_eq!((code, error_code(&b).as_str()), (400, "invalid_entry"));
    let long_device = format!(
        r#"{{"device_id":"{}","tenant_id":"acme"}}"#,
        "d".repeat(300)
    );
    let (code, _) = http_with(admin, "PUT", "/v1/endpoints/ep-1", &auth(), &long_device).unwrap();
    assert_eq!(code, 400);
    let long_ep = "e".repeat(300);
    let (code, _) = http_with(
        admin,
        "PUT",
        &format!("/v1/endpoints/{long_ep}"),
        &auth(),
        r#"{"device_id":"d-1","tenant_id":"acme"}"#,
    )
    .unwrap();
    assert_eq!(code, 400);
    let (code, _) = get(admin, &format!("/v1/rpc/{}", "r".repeat(300)));
    assert_eq!(code, 400);
    assert_eq!(get(admin, "/v1/endpoints/ep-1").0, 404, "nothing stored");

    // Connections: at most 8. Eight idle ones fill the server; a ninth is
    // closed without an answer; once the idle ones are dropped (header /
    // idle timeout) the server answers again.
    let idle: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(admin).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let (code, _) = raw(admin, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(code, 0, "over max_connections: closed");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok((200, _)) = http(admin, "GET", "/healthz", "") {
            break;
        }
        assert!(Instant::now() < deadline, "server did not recover");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(idle);

    // What it refused is counted.
    let (_, m) = http(admin, "GET", "/metrics", "").unwrap();
    let metric = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("corem_lwm2m_admin_{name}_total ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert!(metric("unauthorized") >= 2);
    assert!(metric("body_timeouts") >= 1);
    assert!(metric("too_large") >= 2);
    assert!(metric("connections_refused") >= 1);
}

#[test]
fn device_api_lists_pages_and_describes_registrations() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, PROVISIONING, "");
    let admin = gw.admin;
    // 30 more devices: 20 of tenant acme, 10 of tenant beta.
    let more: Vec<Value> = (0..30)
        .map(|i| {
            serde_json::json!({
                "endpoint": format!("urn:dev:{i:02}"),
                "device_id": format!("dev-{i:02}"),
                "tenant_id": if i % 3 == 0 { "beta" } else { "acme" },
            })
        })
        .collect();
    let (code, _) = http(
        admin,
        "POST",
        "/v1/endpoints",
        &serde_json::to_string(&more).unwrap(),
    )
    .unwrap();
    assert_eq!(code, 200);

    // The environment device registers and gets its profile observation.
    let mut dev = Device::new("urn:imei:env", gw.coap, 11);
    assert_eq!(dev.register(1), Code::CREATED);

    // Paging through everything: 32 devices in device_id order, once each.
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            Some(c) => format!("/v1/devices?limit=7&cursor={c}"),
            None => "/v1/devices?limit=7".to_string(),
        };
        let (code, v) = get(admin, &q);
        assert_eq!(code, 200, "{v}");
        let list = v["devices"].as_array().unwrap();
        assert!(list.len() <= 7);
        seen.extend(
            list.iter()
                .map(|d| d["device_id"].as_str().unwrap().to_string()),
        );
        pages += 1;
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 20);
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "in order, no repeats");
    assert_eq!(seen.len(), 32);

    // Filters.
    let (_, v) = get(admin, "/v1/devices?tenant=beta&limit=100");
    let beta = v["devices"].as_array().unwrap();
    assert_eq!(beta.len(), 10);
    assert!(beta.iter().all(|d| d["tenant_id"] == "beta"));
    let (_, v) = get(admin, "/v1/devices?online=true");
    let online = v["devices"].as_array().unwrap();
    assert_eq!(online.len(), 1, "{v}");
    assert_eq!(online[0]["device_id"], "env-device");
    assert_eq!(online[0]["endpoint"], "urn:imei:env");
    assert!(online[0]["shard"].is_u64());
    assert!(online[0]["last_seen"].as_i64().unwrap() > 1_600_000_000_000);
    let (_, v) = get(admin, "/v1/devices?online=false&tenant=acme&limit=1000");
    assert_eq!(v["devices"].as_array().unwrap().len(), 21);
    for bad in ["limit=0", "limit=1001", "online=maybe", "limit=x"] {
        let (code, v) = get(admin, &format!("/v1/devices?{bad}"));
        assert_eq!(
            (code, v["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }

    // One device: its registration as its shard holds it.
    let (code, v) = get(admin, "/v1/devices/env-device");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["online"], true);
    assert_eq!(v["endpoint"], "urn:imei:env");
    assert_eq!(v["tenant_id"], "acme");
    assert_eq!(v["profile"], "environment");
    let reg = &v["registration"];
    assert_eq!(reg["address"], dev.local_addr().to_string());
    assert_eq!(reg["dtls"], false);
    assert_eq!(reg["binding"], "U");
    assert_eq!(reg["lwm2m_version"], "1.1");
    assert!(reg["lifetime_s"].as_u64().unwrap() > 0);
    let objects: Vec<&str> = reg["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert!(objects.contains(&"/3303/0"), "{objects:?}");
    let obs = reg["observations"].as_array().unwrap();
    assert_eq!(obs.len(), 1, "{reg}");
    assert_eq!(obs[0]["path"], "/3303/0");
    assert_eq!(obs[0]["origin"], "profile");

    // The device moves to a new source port (maybe another shard): the
    // description follows it.
    dev.new_port();
    let upd = dev.sim.update(None, false);
    assert_eq!(
        dev.request(&upd, Duration::from_secs(10)),
        Some(Code::CHANGED)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = get(admin, "/v1/devices/env-device");
        if v["registration"]["address"] == dev.local_addr().to_string() {
            assert!(v["registration"]["shard"].as_u64().unwrap() < 2);
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        dev.pump(Duration::from_millis(100));
    }

    // An offline device with a pending RPC.
    let (code, _) = http(
        admin,
        "POST",
        "/v1/devices/dev-01/rpc",
        r#"{"rpc_id":"wait-1","method":"reboot","timeout_ms":600000}"#,
    )
    .unwrap();
    assert_eq!(code, 202);
    let (code, v) = get(admin, "/v1/devices/dev-01");
    assert_eq!(code, 200);
    assert_eq!(v["online"], false);
    assert_eq!(v["registration"], Value::Null);
    assert_eq!(v["pending_rpcs"][0]["rpc_id"], "wait-1");
    assert_eq!(v["pending_rpcs"][0]["status"], "queued");
    let (code, v) = get(admin, "/v1/devices/no-such-device");
    assert_eq!((code, v["code"].as_str()), (404, Some("not_found")));
}

/// The control plane is never open beyond loopback: the gateway refuses to
/// start (exit code 1, the reason on stderr) when the admin API would
/// listen on a non-loopback address without a token; `--check` says the
/// same; with a token it starts.
#[test]
fn refuses_an_admin_api_beyond_loopback_without_a_token() {
    let dir = tempdir();
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("gateway.toml");
    let port = free_tcp_port();
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{}\"\nshards = 1\n[admin]\nlisten = \"0.0.0.0:{port}\"\n[directory]\nsnapshot_dir = \"snap\"\n",
            free_udp_port()
        ),
    )
    .unwrap();
    for check in [true, false] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_corem-lwm2m"));
        cmd.arg("--config").arg(&cfg);
        if check {
            cmd.arg("--check");
        }
        let out = cmd
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "check={check}: {err}");
        assert!(
            err.contains("beyond loopback") && err.contains("admin.token_file"),
            "check={check}: {err}"
        );
    }
    // With a token file the same configuration passes the check.
    std::fs::write(dir.join("token"), "an-admin-token-of-32-characters!\n").unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[admin]\n",
        &format!(
            "[admin]\ntoken_file = \"{}\"\n",
            dir.join("token").display()
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_corem-lwm2m"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `systemctl reload` (SIGHUP): the provisioning file's new endpoint can
/// register at once, `[log] level` is applied, a changed setting that needs
/// a restart is named in the log, and a file that does not parse changes
/// nothing.
#[test]
fn sighup_adds_provisioned_endpoints_applies_the_log_level_and_names_restart_settings() {
    let broker = Broker::memory();
    let mut gw = Gateway::start(&broker, 2, PROVISIONING, "[log]\nlevel = \"info\"\n");
    // Without RUST_LOG (which would win over `[log] level`).
    gw.stop();
    gw.rust_log = None;
    gw.spawn();
    let hup = |gw: &Gateway| {
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(gw.pid().unwrap() as i32, libc::SIGHUP) };
    };
    let wait_log = |gw: &Gateway, s: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !gw.log_contains(s) {
            assert!(Instant::now() < deadline, "no log line with {s:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let mut dev = Device::new("urn:imei:777", gw.coap, 9);
    assert_eq!(dev.register(0), Code::FORBIDDEN, "not provisioned yet");

    let prov = gw.dir.join("provisioning.toml");
    let mut text = std::fs::read_to_string(&prov).unwrap();
    text.push_str("\n[[endpoint]]\nendpoint = \"urn:imei:777\"\ndevice_id = \"dev-777\"\ntenant_id = \"acme\"\n");
    std::fs::write(&prov, text).unwrap();
    gw.edit_config(|c| {
        c.replace("level = \"info\"", "level = \"debug\"")
            .replace("[gateway]\n", "[gateway]\nrecv_batch = 32\n")
    });
    hup(&gw);
    wait_log(&gw, "provisioning: new endpoints added (SIGHUP)");
    wait_log(&gw, "log level changed (SIGHUP)");
    wait_log(&gw, "gateway.recv_batch");
    assert!(gw.log_contains("needs a restart"));
    assert!(
        !gw.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("needs a restart") && l.contains("log.level")),
        "log.level is applied, not a restart"
    );
    let mut dev = Device::new("urn:imei:777", gw.coap, 10);
    assert_eq!(dev.register(0), Code::CREATED, "registers after the reload");
    let (code, body) = http(gw.admin, "GET", "/v1/endpoints/urn:imei:777", "").unwrap();
    assert_eq!(code, 200, "{body}");

    // A broken file: logged, nothing changes, the gateway keeps running.
    gw.edit_config(|c| format!("{c}\n[[[broken\n"));
    hup(&gw);
    wait_log(&gw, "configuration not reloaded (SIGHUP)");
    assert_eq!(http(gw.admin, "GET", "/healthz", "").unwrap().0, 200);
}

/// A telemetry long poll (up to 25 s) in flight when SIGTERM arrives does
/// not hold up the stop and is not cut off: the poll is answered at once
/// (no points), the connection closes, and the gateway exits 0.
#[test]
fn a_telemetry_long_poll_does_not_hold_up_sigterm() {
    let broker = Broker::memory();
    let mut gw = Gateway::start(&broker, 2, PROVISIONING, "");
    let admin = gw.admin;
    let poll = std::thread::spawn(move || {
        let mut s = TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        s.write_all(
            b"GET /v1/devices/env-device/telemetry?wait_ms=25000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let started = Instant::now();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        (started.elapsed(), resp)
    });
    // The poll is waiting (the tap watches the device).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = http(admin, "GET", "/metrics", "").unwrap();
        if m.contains("corem_lwm2m_telemetry_watched_devices 1") {
            break;
        }
        assert!(Instant::now() < deadline, "the long poll never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    assert_eq!(gw.stop(), Some(0));
    let stopped = t.elapsed();
    let (waited, resp) = poll.join().unwrap();
    assert!(
        stopped < Duration::from_secs(12),
        "SIGTERM took {stopped:?} with a long poll in flight"
    );
    assert!(
        waited < Duration::from_secs(15),
        "the poll was held {waited:?}"
    );
    // Answered with what it had (nothing), not cut off.
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:?}");
    assert!(resp.contains("\"points\":[]"), "{resp}");
}
