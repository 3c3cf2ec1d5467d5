//! Interoperability with a CoAP client we did not write: libcoap's
//! `coap-client-openssl` (Debian `libcoap3-bin`, installed by scripts/setup).
//! Every invocation opens a new socket, so every request comes from a new
//! source port, which on a two-shard gateway lands on either shard: exactly
//! the client behaviour that used to get 4.04 for Update and De-register.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// Runs coap-client-openssl; returns (response code, Location-Path
/// segments) of the answer.
fn coap_client(args: &[&str]) -> (String, Vec<String>) {
    let (text, r) = run_client("coap-client-openssl", args);
    r.unwrap_or_else(|| panic!("no response in coap-client output:\n{text}"))
}

#[test]
fn libcoap_client_registers_updates_and_deregisters_from_new_ports() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, PROVISIONING, "");
    let status = reader(&broker, &["device.status.acme"]);
    let base = format!("coap://{}", gw.coap);
    let (code, loc) = coap_client(&[
        "-m",
        "post",
        "-t",
        "40",
        "-e",
        "</1/0>,</3/0>,</3303/0>",
        &format!("{base}/rd?ep=urn:imei:123&lt=300&lwm2m=1.1&b=U"),
    ]);
    assert_eq!(code, "2.01");
    assert_eq!(loc.len(), 2, "{loc:?}");
    assert_eq!(loc[0], "rd");
    let location = &loc[1];
    for i in 0..10 {
        let (code, _) = coap_client(&["-m", "post", &format!("{base}/rd/{location}?lt=600")]);
        assert_eq!(code, "2.04", "update {i} from a new port");
    }
    assert_eq!(gw.metric("registrations"), 1, "no re-registration");
    assert_eq!(gw.metric("update_unknown"), 0);
    let (code, _) = coap_client(&["-m", "delete", &format!("{base}/rd/{location}")]);
    assert_eq!(code, "2.02");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(gw.metric("registrations_active"), 0);
    let mut st = read_matching(&status, 12, Duration::from_secs(20), |_| true);
    st.sort_by_key(|s| s.value["registration"]["seq"].as_u64().unwrap_or(0));
    assert_eq!(st.len(), 12);
    assert_eq!(st[0].value["reason"], "registered");
    assert!(st[1..11]
        .iter()
        .all(|s| s.value["reason"] == "updated" && s.value["registration"]["lifetime_s"] == 600));
    assert_eq!(st[11].value["reason"], "deregistered");
    // The old location is gone for everyone; a stranger's request carries
    // no diagnostic payload.
    let (code, _) = coap_client(&["-m", "post", &format!("{base}/rd/{location}")]);
    assert_eq!(code, "4.04");
}

/// Runs a libcoap client binary with verbose PDU logging; returns its
/// combined output and (response code, Location-Path segments) of the
/// first non-empty ACK ("v:1 t:ACK c:2.01 i:476d {01} [ Location-Path:rd, ... ]"),
/// if any.
fn run_client(bin: &str, args: &[&str]) -> (String, Option<(String, Vec<String>)>) {
    let out = Command::new(bin)
        .args(["-B", "5", "-v", "7"])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{bin} not runnable ({e}); run scripts/setup"));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("t:ACK c:") && !l.contains("c:0.00"))
        .map(|line| {
            let code = line
                .split("c:")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("")
                .to_string();
            let locs = line
                .split("Location-Path:")
                .skip(1)
                .map(|s| s.split([',', ' ', ']']).next().unwrap_or("").to_string())
                .collect();
            (code, locs)
        });
    (text, line)
}

const LIBCOAP_PSK: &str = "libcoap-psk-key!";

fn dtls_provisioning() -> String {
    let hex: String = LIBCOAP_PSK.bytes().map(|b| format!("{b:02x}")).collect();
    format!(
        r#"
[[endpoint]]
endpoint = "urn:imei:libcoap-psk"
device_id = "libcoap-psk-device"
tenant_id = "acme"
psk_identity = "libcoap-dev"
psk_key_hex = "{hex}"

[[endpoint]]
endpoint = "urn:imei:libcoap-cert"
device_id = "libcoap-cert-device"
tenant_id = "acme"
x509 = true
"#
    )
}

#[test]
fn libcoap_dtls_clients_register_with_psk_and_certificates() {
    use corem_lwm2m::testkit::certs::{self, Pki};
    let broker = Broker::memory();
    let dir = tempdir();
    let pki = Pki::new("interop CA");
    let (c, k) = pki.issue("localhost", &["localhost", "127.0.0.1"]);
    certs::write_pem(&dir, "gateway", &c, &k);
    let (dc, dk) = pki.issue("urn:imei:libcoap-cert", &[]);
    let (dev_cert, dev_key) = certs::write_pem(&dir, "device", &dc, &dk);
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, pki.cert.to_pem().unwrap()).unwrap();
    let extra = format!(
        "[dtls]\ncert_file = \"{0}/gateway.crt\"\nkey_file = \"{0}/gateway.key\"\nca_file = \"{0}/ca.crt\"\n",
        dir.display()
    );
    let gw = Gateway::start(&broker, 2, &dtls_provisioning(), &extra);
    let status = reader(&broker, &["device.status.acme"]);
    let base = format!("coaps://{}", gw.coaps);
    let mut registered = 0;
    for bin in ["coap-client-openssl", "coap-client-gnutls"] {
        // PSK.
        let (text, r) = run_client(
            bin,
            &[
                "-u",
                "libcoap-dev",
                "-k",
                LIBCOAP_PSK,
                "-m",
                "post",
                "-e",
                "</1/0>,</3/0>",
                &format!("{base}/rd?ep=urn:imei:libcoap-psk&lt=300&lwm2m=1.1&b=U"),
            ],
        );
        let (code, loc) = r.unwrap_or_else(|| panic!("{bin} PSK: no response:\n{text}"));
        assert_eq!(code, "2.01", "{bin} PSK");
        assert_eq!(loc.first().map(String::as_str), Some("rd"), "{loc:?}");
        registered += 1;
        // A wrong key: the handshake fails, no registration.
        let (text, r) = run_client(
            bin,
            &[
                "-u",
                "libcoap-dev",
                "-k",
                "not-the-key-1234",
                "-m",
                "post",
                "-e",
                "</1/0>",
                &format!("{base}/rd?ep=urn:imei:libcoap-psk&lt=300"),
            ],
        );
        assert!(r.is_none(), "{bin} wrong key answered:\n{text}");
        // A certificate issued by the gateway's CA, naming the endpoint.
        let (text, r) = run_client(
            bin,
            &[
                "-c",
                dev_cert.to_str().unwrap(),
                "-j",
                dev_key.to_str().unwrap(),
                "-C",
                ca.to_str().unwrap(),
                "-m",
                "post",
                "-e",
                "</1/0>,</3/0>",
                &format!("{base}/rd?ep=urn:imei:libcoap-cert&lt=300&lwm2m=1.1&b=U"),
            ],
        );
        let (code, _) = r.unwrap_or_else(|| panic!("{bin} certificate: no response:\n{text}"));
        assert_eq!(code, "2.01", "{bin} certificate");
        registered += 1;
    }
    let st = read_matching(&status, registered, Duration::from_secs(20), |r| {
        r.value["reason"] == "registered"
    });
    assert_eq!(st.len(), registered);
    assert!(st.iter().all(|s| s.value["registration"]["address"]
        .as_str()
        .unwrap()
        .starts_with("coaps://")));
    assert_eq!(gw.metric("dtls_handshakes_completed"), 4);
}

/// coap-node (npm, by PeterEB: a LwM2M 1.0 client on node-coap and
/// smartobject) run by `tests/interop-node/coap-node-client.js`, installed
/// by scripts/setup. Its stdout carries one JSON event per line.
struct NodeClient {
    child: std::process::Child,
    events: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl NodeClient {
    fn spawn(gateway: std::net::SocketAddr, endpoint: &str) -> NodeClient {
        Self::spawn_script("coap-node-client.js", gateway, endpoint)
    }

    fn spawn_script(script: &str, gateway: std::net::SocketAddr, endpoint: &str) -> NodeClient {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop-node");
        assert!(
            dir.join("node_modules/coap-node").exists(),
            "coap-node is not installed: run scripts/setup"
        );
        let mut child = Command::new("node")
            .current_dir(&dir)
            .args([
                script,
                &gateway.ip().to_string(),
                &gateway.port().to_string(),
                endpoint,
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("node (Node.js) is needed for the interop tests");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[coap-node] {line}");
                if let Ok(v) = serde_json::from_str(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        NodeClient { child, events: rx }
    }

    /// Waits for an event with `event` = `name` (and `path`, when given).
    fn wait(&self, name: &str, path: Option<&str>, within: Duration) -> serde_json::Value {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if v["event"] == name && path.is_none_or(|p| v["path"] == p) => return v,
                Ok(v) => assert!(
                    v["event"] != "register_failed" && v["event"] != "bootstrap_failed",
                    "{v}"
                ),
                Err(_) => panic!("coap-node: no {name} event within {within:?}"),
            }
        }
    }
}

impl Drop for NodeClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rpc(gw: &Gateway, device: &str, body: &str, within: Duration) -> serde_json::Value {
    let (code, b) = http(gw.admin, "POST", &format!("/v1/devices/{device}/rpc"), body).unwrap();
    assert_eq!(code, 202, "{b}");
    let id = serde_json::from_str::<serde_json::Value>(&b).unwrap()["rpc_id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + within;
    loop {
        let (_, b) = http(gw.admin, "GET", &format!("/v1/rpc/{id}"), "").unwrap();
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        if !["queued", "sent"].contains(&v["status"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A profile for the coap-node device: its temperature observed with a
/// short pmax (coap-node reports on pmax).
const NODE_PROFILE: &str = r#"
name = "coap-node"
[[resource]]
path = "/3303/0/5700"
metric = "temperature"
[[observe]]
path = "/3303/0/5700"
pmin = 0
pmax = 1
"#;

#[test]
fn coap_node_lwm2m_client_reboots_reads_and_reports() {
    let broker = Broker::memory();
    let prov = format!(
        "{PROVISIONING}\n[[endpoint]]\nendpoint = \"coap-node-1\"\ndevice_id = \"node-device\"\n\
         tenant_id = \"acme\"\nprofile = \"coap-node\"\n"
    );
    let gw = Gateway::start(&broker, 2, &prov, "");
    std::fs::write(gw.dir.join("profiles/coap-node.toml"), NODE_PROFILE).unwrap();
    assert_eq!(
        http(gw.admin, "POST", "/v1/profiles/reload", "").unwrap().0,
        200
    );
    let telemetry = reader(&broker, &["telemetry.raw.acme"]);
    let statuses = reader(&broker, &["device.rpc.status.acme"]);
    let node = NodeClient::spawn(gw.coap, "coap-node-1");
    node.wait("registered", None, Duration::from_secs(20));

    // reboot → Execute /3/0/4 on coap-node → 2.04 → succeeded.
    let s = rpc(
        &gw,
        "node-device",
        r#"{"rpc_id":"node-reboot","method":"reboot","timeout_ms":30000}"#,
        Duration::from_secs(30),
    );
    assert_eq!(
        (s["status"].as_str(), s["code"].as_str()),
        (Some("succeeded"), Some("2.04")),
        "{s}"
    );
    node.wait("exec", Some("/3/0/4"), Duration::from_secs(5));

    // read of one resource and of the whole instance (coap-node answers
    // TLV): values decoded per path.
    let s = rpc(
        &gw,
        "node-device",
        r#"{"method":"read","params":{"path":"/3/0/0"}}"#,
        Duration::from_secs(30),
    );
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["code"], "2.05");
    assert_eq!(s["response"]["/3/0/0"], "coap-node", "{s}");
    let s = rpc(
        &gw,
        "node-device",
        r#"{"method":"read","params":{"path":"/3/0"}}"#,
        Duration::from_secs(30),
    );
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["response"]["/3/0/1"], "interop-model", "{s}");
    assert_eq!(s["response"]["/3/0/3"], "0.2.5", "{s}");

    // The profile's observation: coap-node's notifications become
    // TelemetryPoints.
    let points = read_matching(&telemetry, 2, Duration::from_secs(30), |r| {
        r.value["device_id"] == "node-device"
    });
    for p in &points {
        assert_eq!(p.key.as_deref(), Some("node-device"));
        assert_eq!(p.value["tenant_id"], "acme");
        assert_eq!(p.value["endpoint"], "coap-node-1");
        let t = p.value["numeric_values"]["temperature"].as_f64().unwrap();
        assert!((21.0..100.0).contains(&t), "{t}");
    }

    // The reboot's statuses on the topic, in order.
    broker.write_marker("device.rpc.status.acme");
    let ev = read_matching(&statuses, 3, Duration::from_secs(20), |r| {
        r.value["rpc_id"] == "node-reboot"
    });
    let seq: Vec<&str> = ev
        .iter()
        .map(|e| e.value["status"].as_str().unwrap())
        .collect();
    assert_eq!(seq, ["queued", "sent", "succeeded"]);
}

/// npm coap-node bootstraps from the gateway's bootstrap server (plain
/// CoAP, TLV writes; it rejects Bootstrap-Discover with RST and takes only
/// a Bootstrap-Delete of `/`, hence `delete_root`), then registers with the
/// LwM2M server it was given and its telemetry reaches Kafka.
#[test]
fn coap_node_bootstraps_then_registers() {
    let broker = Broker::memory();
    let coap: std::net::SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let bs: std::net::SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let prov = format!(
        "{PROVISIONING}\n[[endpoint]]\nendpoint = \"coap-node-bs\"\ndevice_id = \"node-bs-device\"\n\
         tenant_id = \"acme\"\nprofile = \"coap-node\"\n"
    );
    let extra = format!(
        "[gateway]\nlisten = \"{coap}\"\n[bootstrap]\nenabled = true\nlisten = \"{bs}\"\n\
         dtls = false\nserver_uri_plain = \"coap://{coap}\"\ndelete_root = true\nlifetime_s = 300\n"
    );
    let gw = Gateway::start(&broker, 2, &prov, &extra);
    std::fs::write(gw.dir.join("profiles/coap-node.toml"), NODE_PROFILE).unwrap();
    assert_eq!(
        http(gw.admin, "POST", "/v1/profiles/reload", "").unwrap().0,
        200
    );
    let status = reader(&broker, &["device.status.acme"]);
    let telemetry = reader(&broker, &["telemetry.raw.acme"]);
    let node = NodeClient::spawn_script("coap-node-bootstrap.js", bs, "coap-node-bs");
    let b = node.wait("bootstrapped", None, Duration::from_secs(30));
    // What coap-node stored from our TLV writes.
    let sec = b["security"].as_object().unwrap();
    assert!(
        sec.values()
            .any(|s| s["lwm2mServerURI"] == format!("coap://{coap}").as_str()),
        "{b}"
    );
    node.wait("registered", None, Duration::from_secs(30));
    let st = read_matching(&status, 3, Duration::from_secs(20), |r| {
        r.value["endpoint"] == "coap-node-bs"
    });
    let reasons: Vec<&str> = st
        .iter()
        .map(|r| r.value["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["bootstrapping", "bootstrapped", "registered"]);
    assert_eq!(st[1].value["bootstrap"]["lwm2m_version"], "1.0");
    assert_eq!(st[2].value["registration"]["lifetime_s"], 300);
    let points = read_matching(&telemetry, 1, Duration::from_secs(30), |r| {
        r.value["device_id"] == "node-bs-device"
    });
    assert!(points[0].value["numeric_values"]["temperature"]
        .as_f64()
        .is_some());
}
