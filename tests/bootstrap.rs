//! The Bootstrap Interface end to end (LwM2M TS 1.1 Core §6.1): the gateway
//! binary with two shards, simulated devices that know only their bootstrap
//! server, real DTLS handshakes on both ports, a real broker, records
//! consumed back from `device.status.acme` / `telemetry.raw.acme` and checked.

mod common;

use common::*;
use corem_lwm2m::proto::coap::{Code, MsgType};
use corem_lwm2m::proto::lwm2m::content::{ResourcePath, CF_SENML_CBOR, CF_TLV};
use corem_lwm2m::testkit::dtls_client::ClientAuth;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const BS_KEY: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf";
const CIPHERS: &str = "PSK-AES128-CCM8";

fn provisioning(p: &Ports) -> String {
    let coap = p.coap;
    format!(
        r#"
[[endpoint]]
endpoint = "urn:imei:bs1"
device_id = "bs-device-1"
tenant_id = "acme"
profile = "environment"
bootstrap = {{ psk_identity = "bs-id-1", psk_key_hex = "{BS_KEY}" }}

[[endpoint]]
endpoint = "urn:imei:bs2"
device_id = "bs-device-2"
tenant_id = "acme"
profile = "environment"
bootstrap = {{ psk_identity = "bs-id-2", psk_key_hex = "{BS_KEY}" }}

[[endpoint]]
endpoint = "urn:imei:bs10"
device_id = "bs-device-10"
tenant_id = "acme"
profile = "environment"
bootstrap = {{ servers = [{{ uri = "coap://{coap}" }}] }}
"#
    )
}

struct Ports {
    coap: SocketAddr,
    coaps: SocketAddr,
    bs: SocketAddr,
    bs_dtls: SocketAddr,
}

fn start(broker: &Broker) -> (Gateway, Ports) {
    let p = Ports {
        coap: format!("127.0.0.1:{}", free_udp_port()).parse().unwrap(),
        coaps: format!("127.0.0.1:{}", free_udp_port()).parse().unwrap(),
        bs: format!("127.0.0.1:{}", free_udp_port()).parse().unwrap(),
        bs_dtls: format!("127.0.0.1:{}", free_udp_port()).parse().unwrap(),
    };
    let extra = format!(
        "[gateway]\nlisten = \"{}\"\n[dtls]\nlisten = \"{}\"\n\
         [bootstrap]\nenabled = true\nlisten = \"{}\"\ndtls_listen = \"{}\"\n\
         server_uri = \"coaps://{}\"\nserver_uri_plain = \"coap://{}\"\n\
         generate_psk = true\nlifetime_s = 300\nsession_timeout_s = 20\n",
        p.coap, p.coaps, p.bs, p.bs_dtls, p.coaps, p.coap
    );
    let gw = Gateway::start(broker, 2, &provisioning(&p), &extra);
    (gw, p)
}

fn psk(identity: &[u8], key: &[u8]) -> ClientAuth {
    ClientAuth::Psk {
        identity: identity.to_vec(),
        key: key.to_vec(),
    }
}

fn bs_key() -> Vec<u8> {
    corem_lwm2m::proto::lwm2m::endpoint::decode_hex(BS_KEY).unwrap()
}

fn rp(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap()
}

/// Sends Bootstrap-Request and answers the server until Bootstrap-Finish;
/// returns the 2.04 (or the refusal) and whether Finish came.
fn bootstrap(dev: &mut Device, pct: Option<u16>, within: Duration) -> (Option<Code>, bool) {
    let before = dev.sim.bootstraps_finished;
    let req = dev.sim.bootstrap_request(pct);
    let code = dev.request(&req, Duration::from_secs(10));
    if code != Some(Code::CHANGED) {
        return (code, false);
    }
    let deadline = Instant::now() + within;
    while Instant::now() < deadline && dev.sim.bootstraps_finished == before {
        dev.pump(Duration::from_millis(50));
    }
    (code, dev.sim.bootstraps_finished > before)
}

fn post_rpc(gw: &Gateway, device: &str, body: &str) -> String {
    let (code, b) = http(gw.admin, "POST", &format!("/v1/devices/{device}/rpc"), body).unwrap();
    assert_eq!(code, 202, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    v["rpc_id"].as_str().unwrap().to_string()
}

fn rpc_status(gw: &Gateway, id: &str) -> serde_json::Value {
    let (code, b) = http(gw.admin, "GET", &format!("/v1/rpc/{id}"), "").unwrap();
    assert_eq!(code, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

/// A device with only bootstrap information: Bootstrap-Request over DTLS,
/// Delete / Write / Finish, a generated PSK recorded in the directory, DTLS
/// registration with that key, observe, a TelemetryPoint on Kafka. Then the
/// `rebootstrap` RPC: the device bootstraps again, gets a new key, the old
/// one no longer completes a handshake, and it re-registers.
#[test]
fn dtls_bootstrap_generated_psk_register_publish_and_rebootstrap() {
    let broker = Broker::memory();
    let (mut gw, p) = start(&broker);
    let status = reader(&broker, &["device.status.acme"]);
    let tele = reader(&broker, &["telemetry.raw.acme"]);
    let rpc_topic = reader(&broker, &["device.rpc.status.acme"]);
    let ep = "urn:imei:bs1";

    let mut dev = Device::new_dtls(ep, p.bs_dtls, 11, &psk(b"bs-id-1", &bs_key()), CIPHERS)
        .expect("bootstrap handshake with the bootstrap PSK");
    dev.sim
        .set_bootstrap_account(&format!("coaps://{}", p.bs_dtls), 0, b"bs-id-1", &bs_key());
    let (code, finished) = bootstrap(&mut dev, Some(CF_SENML_CBOR), Duration::from_secs(15));
    assert_eq!(code, Some(Code::CHANGED));
    assert!(finished, "Bootstrap-Finish received");
    let acc = dev.sim.server_account().expect("server account written");
    assert_eq!(acc.uri, format!("coaps://{}", p.coaps));
    assert_eq!(acc.mode, 0, "PSK mode");
    assert_eq!(acc.identity, ep.as_bytes());
    assert_eq!(acc.key.len(), 16);
    assert_eq!(acc.lifetime, Some(300));
    assert!(dev.sim.write_formats.iter().all(|cf| *cf == CF_SENML_CBOR));
    // The factory bootstrap account is still there.
    assert_eq!(
        dev.sim.bytes_of("/0/0/3").as_deref(),
        Some(b"bs-id-1".as_slice())
    );

    let st = read_matching(&status, 2, Duration::from_secs(20), |r| {
        r.value["endpoint"] == ep && r.value["status"] == "bootstrap"
    });
    assert_eq!(st[0].value["reason"], "bootstrapping");
    assert_eq!(st[1].value["reason"], "bootstrapped");
    assert_eq!(st[1].key.as_deref(), Some("bs-device-1"));
    let b = &st[1].value["bootstrap"];
    assert_eq!(b["transport"], "coaps");
    assert_eq!(b["psk_generated"], true);
    assert_eq!(b["content_format"], CF_SENML_CBOR);
    assert_eq!(b["servers"][0], format!("coaps://{}", p.coaps));
    assert_eq!(st[1].value["device_id"], "bs-device-1");
    assert_eq!(st[1].value["tenant_id"], "acme");
    // The directory holds the generated PSK (never shown).
    let (code, body) = http(gw.admin, "GET", &format!("/v1/endpoints/{ep}"), "").unwrap();
    assert_eq!(code, 200);
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["psk_identity"], ep);
    assert_eq!(e["psk_key"], "set");
    assert_eq!(e["bootstrap"]["psk_key_hex"], "set");
    assert!(!body.contains(&hex(&acc.key)));

    // Register over DTLS with what the bootstrap wrote, observe, publish.
    let sim = std::mem::replace(
        &mut dev.sim,
        corem_lwm2m::testkit::sim::SimDevice::new(ep, 0),
    );
    let mut reg = Device::new_dtls(ep, p.coaps, 12, &psk(&acc.identity, &acc.key), CIPHERS)
        .expect("handshake with the generated PSK");
    reg.sim = sim;
    reg.sim.values.insert(rp("/3303/0/5700"), 21.5);
    assert_eq!(reg.register(1), Code::CREATED);
    let st = read_matching(&status, 1, Duration::from_secs(20), |r| {
        r.value["endpoint"] == ep && r.value["status"] == "online"
    });
    assert_eq!(st[0].value["reason"], "registered");
    assert_eq!(st[0].value["registration"]["lifetime_s"], 300);
    reg.sim.values.insert(rp("/3303/0/5700"), 23.25);
    assert_eq!(
        reg.notify_con("/3303/0", Duration::from_secs(5)),
        Some(MsgType::Ack)
    );
    let pts = read_matching(&tele, 2, Duration::from_secs(20), |r| {
        r.value["endpoint"] == ep
    });
    assert_eq!(pts[1].key.as_deref(), Some("bs-device-1"));
    let v = &pts[1].value;
    assert_eq!(v["numeric_values"]["temperature"], 23.25);
    assert_eq!(v["device_id"], "bs-device-1");
    assert_eq!(v["tenant_id"], "acme");
    assert_eq!(v["source"]["path"], "/3303/0");
    assert_eq!(v["source"]["protocol"], "lwm2m");

    // rebootstrap: Execute /1/0/9 reaches the device, the RPC succeeds.
    let id = post_rpc(
        &gw,
        "bs-device-1",
        r#"{"method":"rebootstrap","timeout_ms":10000}"#,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut executed = false;
    while Instant::now() < deadline && !executed {
        let (ev, _) = reg.pump(Duration::from_millis(50));
        executed |= ev.executed.contains(&rp("/1/0/9"));
    }
    assert!(executed, "Bootstrap-Request Trigger executed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while rpc_status(&gw, &id)["status"] != "succeeded" && Instant::now() < deadline {
        reg.pump(Duration::from_millis(50));
    }
    assert_eq!(rpc_status(&gw, &id)["status"], "succeeded");
    let rs = read_matching(&rpc_topic, 1, Duration::from_secs(20), |r| {
        r.value["rpc_id"] == id.as_str() && r.value["status"] == "succeeded"
    });
    assert_eq!(rs[0].value["method"], "rebootstrap");

    // The device goes back to its bootstrap server (from a new port) and
    // gets a new key.
    let mut again = Device::new_dtls(ep, p.bs_dtls, 13, &psk(b"bs-id-1", &bs_key()), CIPHERS)
        .expect("second bootstrap handshake");
    again.sim = std::mem::replace(
        &mut reg.sim,
        corem_lwm2m::testkit::sim::SimDevice::new(ep, 0),
    );
    let (code, finished) = bootstrap(&mut again, Some(CF_TLV), Duration::from_secs(15));
    assert_eq!((code, finished), (Some(Code::CHANGED), true));
    let acc2 = again.sim.server_account().unwrap();
    assert_ne!(acc2.key, acc.key, "a new key at each bootstrap");
    assert!(again
        .sim
        .write_formats
        .iter()
        .rev()
        .take(2)
        .all(|cf| *cf == CF_TLV));
    // The registration made with the old key ended with its session.
    let st = read_matching(&status, 1, Duration::from_secs(20), |r| {
        r.value["endpoint"] == ep && r.value["status"] == "offline"
    });
    assert_eq!(st[0].value["reason"], "credentials_changed");
    // The old key no longer completes a handshake; the new one does.
    assert!(
        dtls_connect(p.coaps, &psk(&acc.identity, &acc.key), CIPHERS).is_err(),
        "the previous key must stop working"
    );
    let mut back = Device::new_dtls(ep, p.coaps, 14, &psk(&acc2.identity, &acc2.key), CIPHERS)
        .expect("handshake with the rotated key");
    back.sim = std::mem::replace(
        &mut again.sim,
        corem_lwm2m::testkit::sim::SimDevice::new(ep, 0),
    );
    assert_eq!(back.register(1), Code::CREATED);
    let st = read_matching(&status, 1, Duration::from_secs(20), |r| {
        r.value["endpoint"] == ep && r.value["reason"] == "registered"
    });
    assert_eq!(st.len(), 1);
    assert!(gw.metric("bootstrap_finished") >= 2);
    assert!(gw.metric("bootstrap_psk_generated") >= 2);
    // SIGTERM with the bootstrap server on: a clean exit (the PSK store
    // thread once waited forever for senders the shards never dropped).
    assert_eq!(
        gw.stop(),
        Some(0),
        "gateway did not exit cleanly on SIGTERM"
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A 1.0 client (TLV only, no Bootstrap-Discover) over plain CoAP gets the
/// NoSec server and registers; an unknown endpoint gets 4.03 with nothing
/// written; an identity bootstrapping another endpoint gets 4.03; a device
/// refusing a Write ends as `bootstrap_failed` with the step and the code.
#[test]
fn tlv_client_refusals_and_device_errors() {
    let broker = Broker::memory();
    let (gw, p) = start(&broker);
    let status = reader(&broker, &["device.status.acme"]);

    let ep = "urn:imei:bs10";
    let mut dev = Device::new(ep, p.bs, 21);
    dev.sim.lwm2m_version = "1.0";
    dev.sim.accept_formats = Some(vec![CF_TLV]);
    dev.sim
        .set_bootstrap_account(&format!("coap://{}", p.bs), 0, b"", b"");
    let (code, finished) = bootstrap(&mut dev, None, Duration::from_secs(15));
    assert_eq!((code, finished), (Some(Code::CHANGED), true));
    let acc = dev.sim.server_account().unwrap();
    assert_eq!(acc.uri, format!("coap://{}", p.coap));
    assert_eq!(acc.mode, 3, "NoSec");
    assert!(!dev.sim.write_formats.is_empty());
    assert!(dev.sim.write_formats.iter().all(|cf| *cf == CF_TLV));
    let st = read_matching(&status, 2, Duration::from_secs(20), |r| {
        r.value["endpoint"] == ep && r.value["status"] == "bootstrap"
    });
    assert_eq!(st[1].value["reason"], "bootstrapped");
    assert_eq!(st[1].value["bootstrap"]["lwm2m_version"], "1.0");
    assert_eq!(st[1].value["bootstrap"]["transport"], "coap");
    // ...and registers where it was sent.
    let mut reg = Device::new(ep, p.coap, 22);
    reg.sim = std::mem::replace(
        &mut dev.sim,
        corem_lwm2m::testkit::sim::SimDevice::new(ep, 0),
    );
    reg.sim.lwm2m_version = "1.0";
    assert_eq!(reg.register(1), Code::CREATED);

    // Unknown endpoint: 4.03, nothing written.
    let mut unknown = Device::new("urn:imei:nobody", p.bs, 23);
    let (code, finished) = bootstrap(&mut unknown, None, Duration::from_secs(2));
    assert_eq!((code, finished), (Some(Code::FORBIDDEN), false));
    assert!(unknown.sim.server_account().is_none());
    // bs-id-1's session asking for urn:imei:bs2: 4.03.
    let mut other = Device::new_dtls(
        "urn:imei:bs2",
        p.bs_dtls,
        24,
        &psk(b"bs-id-1", &bs_key()),
        CIPHERS,
    )
    .unwrap();
    let (code, _) = bootstrap(&mut other, None, Duration::from_secs(2));
    assert_eq!(code, Some(Code::FORBIDDEN));
    assert!(other.sim.server_account().is_none());
    // A device with bootstrap credentials on the plain port: 4.03.
    let mut plain = Device::new("urn:imei:bs2", p.bs, 25);
    let (code, _) = bootstrap(&mut plain, None, Duration::from_secs(2));
    assert_eq!(code, Some(Code::FORBIDDEN));
    // Wrong bootstrap key: no session at all.
    assert!(dtls_connect(p.bs_dtls, &psk(b"bs-id-2", &[1, 2, 3, 4]), CIPHERS).is_err());

    // 4.00 to the Write of /1/0: bootstrap_failed with step and code.
    let mut bad = Device::new_dtls(
        "urn:imei:bs2",
        p.bs_dtls,
        26,
        &psk(b"bs-id-2", &bs_key()),
        CIPHERS,
    )
    .unwrap();
    bad.sim
        .set_bootstrap_account(&format!("coaps://{}", p.bs_dtls), 0, b"bs-id-2", &bs_key());
    bad.sim
        .fail
        .insert((Code::PUT.0, rp("/1/0")), Code::BAD_REQUEST);
    let (code, finished) = bootstrap(&mut bad, None, Duration::from_secs(3));
    assert_eq!((code, finished), (Some(Code::CHANGED), false));
    let st = read_matching(&status, 1, Duration::from_secs(20), |r| {
        r.value["endpoint"] == "urn:imei:bs2" && r.value["reason"] == "bootstrap_failed"
    });
    let b = &st[0].value["bootstrap"];
    assert_eq!(b["step"], "write");
    assert_eq!(b["path"], "/1/0");
    assert_eq!(b["code"], "4.00");
    assert_eq!(st[0].value["device_id"], "bs-device-2");
    assert!(gw.metric("bootstrap_failed_write") >= 1);
    assert!(gw.metric("bootstrap_refused") >= 3);
    // The failed session stored nothing: the endpoint has no DTLS key.
    let (_, body) = http(gw.admin, "GET", "/v1/endpoints/urn:imei:bs2", "").unwrap();
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(e.get("psk_identity").is_none(), "{e}");
}

/// `PUT /v1/endpoints/{ep}/bootstrap` sets what the bootstrap server writes
/// (here an explicit NoSec server with its own lifetime and binding);
/// `GET` shows it without keys, `DELETE` falls back to the defaults.
#[test]
fn bootstrap_settings_through_the_admin_api() {
    let broker = Broker::memory();
    let (gw, p) = start(&broker);
    let ep = "urn:imei:bs10";
    let body = format!(
        r#"{{"servers":[{{"uri":"coap://{}","short_server_id":7,"lifetime_s":120,"binding":"UQ"}}]}}"#,
        p.coap
    );
    let (code, b) = http(
        gw.admin,
        "PUT",
        &format!("/v1/endpoints/{ep}/bootstrap"),
        &body,
    )
    .unwrap();
    assert_eq!(code, 200, "{b}");
    let (code, b) = http(
        gw.admin,
        "GET",
        &format!("/v1/endpoints/{ep}/bootstrap"),
        "",
    )
    .unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["servers"][0]["short_server_id"], 7);
    // Invalid settings are refused whole.
    let (code, _) = http(
        gw.admin,
        "PUT",
        &format!("/v1/endpoints/{ep}/bootstrap"),
        r#"{"servers":[{"uri":"http://x"}]}"#,
    )
    .unwrap();
    assert_eq!(code, 400);
    let (code, _) = http(
        gw.admin,
        "PUT",
        "/v1/endpoints/urn:imei:none/bootstrap",
        &body,
    )
    .unwrap();
    assert_eq!(code, 404);

    let mut dev = Device::new(ep, p.bs, 31);
    dev.sim
        .set_bootstrap_account(&format!("coap://{}", p.bs), 0, b"", b"");
    let (code, finished) = bootstrap(&mut dev, None, Duration::from_secs(15));
    assert_eq!((code, finished), (Some(Code::CHANGED), true));
    let acc = dev.sim.server_account().unwrap();
    assert_eq!(
        (acc.ssid, acc.lifetime, acc.binding.as_deref()),
        (7, Some(120), Some("UQ"))
    );

    // Without settings the gateway defaults apply: a generated PSK, which
    // is never written over plain CoAP.
    let status = reader(&broker, &["device.status.acme"]);
    let (code, _) = http(
        gw.admin,
        "DELETE",
        &format!("/v1/endpoints/{ep}/bootstrap"),
        "",
    )
    .unwrap();
    assert_eq!(code, 204);
    let (code, _) = http(
        gw.admin,
        "GET",
        &format!("/v1/endpoints/{ep}/bootstrap"),
        "",
    )
    .unwrap();
    assert_eq!(code, 404);
    let (code, finished) = bootstrap(&mut dev, None, Duration::from_secs(2));
    assert_eq!((code, finished), (Some(Code::FORBIDDEN), false));
    let st = read_matching(&status, 1, Duration::from_secs(20), |r| {
        r.value["endpoint"] == ep && r.value["reason"] == "bootstrap_failed"
    });
    assert_eq!(st[0].value["bootstrap"]["step"], "request");
    assert_eq!(st[0].value["bootstrap"]["code"], "4.03");
}
