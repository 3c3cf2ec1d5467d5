//! DTLS end to end: the real gateway binary on loopback, real handshakes
//! (OpenSSL clients here, libcoap's OpenSSL and GnuTLS clients in
//! `libcoap_*`), a real broker, records consumed back and checked.

mod common;

use common::*;
use corem_lwm2m::proto::coap::{Code, MsgType};
use corem_lwm2m::proto::dtls::{handshake, record};
use corem_lwm2m::proto::lwm2m::content::ResourcePath;
use corem_lwm2m::testkit::certs::{self, Pki};
use corem_lwm2m::testkit::dtls_client::ClientAuth;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::Duration;

const PSK_KEY: &str = "000102030405060708090a0b0c0d0e0f";

fn provisioning() -> String {
    format!(
        r#"
[[endpoint]]
endpoint = "urn:imei:psk"
device_id = "psk-device"
tenant_id = "acme"
profile = "environment"
psk_identity = "psk-1"
psk_key_hex = "{PSK_KEY}"

[[endpoint]]
endpoint = "urn:imei:psk2"
device_id = "psk2-device"
tenant_id = "acme"
profile = "environment"
psk_identity = "psk-2"
psk_key_hex = "{PSK_KEY}"

[[endpoint]]
endpoint = "urn:imei:x509"
device_id = "x509-device"
tenant_id = "acme"
profile = "environment"
x509 = true

[[endpoint]]
endpoint = "urn:imei:nosec"
device_id = "nosec-device"
tenant_id = "acme"
profile = "environment"
"#
    )
}

struct Setup {
    pki: Pki,
    dir: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempdir();
        let pki = Pki::new("corem test CA");
        let (c, k) = pki.issue("gateway.test", &["localhost"]);
        certs::write_pem(&dir, "gateway", &c, &k);
        std::fs::write(dir.join("ca.crt"), pki.cert.to_pem().unwrap()).unwrap();
        Setup { pki, dir }
    }

    fn config(&self) -> String {
        format!(
            "[dtls]\ncert_file = \"{0}/gateway.crt\"\nkey_file = \"{0}/gateway.key\"\nca_file = \"{0}/ca.crt\"\n",
            self.dir.display()
        )
    }
}

fn psk(identity: &str, key: &str) -> ClientAuth {
    ClientAuth::Psk {
        identity: identity.as_bytes().to_vec(),
        key: corem_lwm2m::proto::lwm2m::endpoint::decode_hex(key).unwrap(),
    }
}

fn rp(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap()
}

/// Register, observe, a CON notification on Kafka checked field by field,
/// De-register → offline, for one DTLS device.
fn full_cycle(gw: &Gateway, broker: &Broker, mut dev: Device, device_id: &str, endpoint: &str) {
    let status = reader(broker, &["device.status.acme"]);
    let tele = reader(broker, &["telemetry.raw.acme"]);
    dev.sim.values.insert(rp("/3303/0/5700"), 21.0);
    assert_eq!(dev.register(1), Code::CREATED);
    let st = read_matching(&status, 1, Duration::from_secs(20), |r| {
        r.value["endpoint"] == endpoint
    });
    assert_eq!(st[0].value["status"], "online");
    assert_eq!(st[0].value["device_id"], device_id);
    assert!(
        st[0].value["registration"]["address"]
            .as_str()
            .unwrap()
            .starts_with("coaps://"),
        "{}",
        st[0].value
    );
    dev.sim.values.insert(rp("/3303/0/5700"), 22.5);
    assert_eq!(
        dev.notify_con("/3303/0", Duration::from_secs(5)),
        Some(MsgType::Ack)
    );
    let pts = read_matching(&tele, 2, Duration::from_secs(20), |r| {
        r.value["endpoint"] == endpoint
    });
    assert_eq!(pts.len(), 2, "initial value + notification");
    let v = &pts[1].value;
    assert_eq!(pts[1].key.as_deref(), Some(device_id));
    assert_eq!(v["numeric_values"]["temperature"], 22.5);
    assert_eq!(v["device_id"], device_id);
    assert_eq!(v["tenant_id"], "acme");
    assert_eq!(v["endpoint"], endpoint);
    assert_eq!(v["source"]["path"], "/3303/0");
    assert_eq!(v["source"]["operation"], "notify");
    let d = dev.sim.deregister();
    assert_eq!(dev.request(&d, Duration::from_secs(5)), Some(Code::DELETED));
    let st = read_matching(&status, 1, Duration::from_secs(20), |r| {
        r.value["endpoint"] == endpoint && r.value["status"] == "offline"
    });
    assert_eq!(st[0].value["reason"], "deregistered");
    let _ = gw;
}

#[test]
fn psk_and_x509_devices_register_observe_publish_deregister() {
    let broker = Broker::memory();
    let setup = Setup::new();
    let gw = Gateway::start(&broker, 2, &provisioning(), &setup.config());
    // A CCM-8-only client (what tinydtls offers).
    let dev = Device::new_dtls(
        "urn:imei:psk",
        gw.coaps,
        1,
        &psk("psk-1", PSK_KEY),
        "PSK-AES128-CCM8",
    )
    .unwrap();
    full_cycle(&gw, &broker, dev, "psk-device", "urn:imei:psk");
    let (cert, key) = setup.pki.issue("urn:imei:x509", &[]);
    let auth = ClientAuth::Cert {
        cert,
        key,
        ca: Some(setup.pki.cert.clone()),
    };
    let dev = Device::new_dtls(
        "urn:imei:x509",
        gw.coaps,
        2,
        &auth,
        "ECDHE-ECDSA-AES128-CCM8",
    )
    .unwrap();
    full_cycle(&gw, &broker, dev, "x509-device", "urn:imei:x509");
    assert_eq!(gw.metric("dtls_handshakes_completed"), 2);
    assert_eq!(gw.metric("register_rejected_unauthorized"), 0);
}

#[test]
fn identity_binding_and_refusals() {
    let broker = Broker::memory();
    let setup = Setup::new();
    let gw = Gateway::start(&broker, 2, &provisioning(), &setup.config());
    let tele = reader(&broker, &["telemetry.raw.acme", "device.status.acme"]);
    // psk-1 authenticates, but registers as psk2's endpoint: 4.03.
    let mut wrong = Device::new_dtls(
        "urn:imei:psk2",
        gw.coaps,
        1,
        &psk("psk-1", PSK_KEY),
        "PSK-AES128-CCM8",
    )
    .unwrap();
    assert_eq!(wrong.register(0), Code::FORBIDDEN);
    // A credentialed device on plain UDP: 4.03.
    let mut plain = Device::new("urn:imei:psk", gw.coap, 2);
    assert_eq!(plain.register(0), Code::FORBIDDEN);
    // A certificate naming another endpoint: 4.03.
    let (cert, key) = setup.pki.issue("urn:imei:other", &[]);
    let auth = ClientAuth::Cert {
        cert,
        key,
        ca: None,
    };
    let mut other = Device::new_dtls(
        "urn:imei:x509",
        gw.coaps,
        3,
        &auth,
        "ECDHE-ECDSA-AES128-CCM8",
    )
    .unwrap();
    assert_eq!(other.register(0), Code::FORBIDDEN);
    assert_eq!(gw.metric("register_rejected_unauthorized"), 3);
    // A certificate from another CA: no session at all.
    let foreign = Pki::new("someone else");
    let (cert, key) = foreign.issue("urn:imei:x509", &[]);
    let auth = ClientAuth::Cert {
        cert,
        key,
        ca: None,
    };
    assert!(Device::new_dtls(
        "urn:imei:x509",
        gw.coaps,
        4,
        &auth,
        "ECDHE-ECDSA-AES128-CCM8"
    )
    .is_err());
    // A wrong PSK: no session.
    assert!(Device::new_dtls(
        "urn:imei:psk",
        gw.coaps,
        5,
        &psk("psk-1", "ffffffffffffffffffffffffffffffff"),
        "PSK-AES128-CCM8"
    )
    .is_err());
    // Nothing was published for any of them.
    broker.write_marker("telemetry.raw.acme");
    let recs = tele.read(usize::MAX, Duration::from_secs(2));
    assert!(
        recs.iter().all(|r| r.value.get("marker").is_some()),
        "{recs:?}"
    );
}

#[test]
fn hello_without_cookie_gets_a_smaller_verify_request_and_no_state() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, &provisioning(), "");
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let hello = handshake::testing::client_hello(0, 0, &[], &[0xc0a8]);
    s.send_to(&hello, gw.coaps).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = s.recv_from(&mut buf).unwrap();
    assert!(n <= hello.len(), "{n} > {}", hello.len());
    let (rec, _) = record::parse(&buf[..n]).unwrap();
    let h = handshake::parse_header(rec.fragment).unwrap();
    assert_eq!(h.msg_type, handshake::msg_type::HELLO_VERIFY_REQUEST);
    assert_eq!(rec.seq, 0, "record sequence copied from the hello");
    assert_eq!(gw.metric("dtls_hello_verify_sent"), 1);
    assert_eq!(gw.metric("dtls_handshakes"), 0);
    assert_eq!(gw.metric("dtls_sessions"), 0);
    assert_eq!(gw.metric("dtls_handshakes_started"), 0);
    // Garbage and a CoAP message on the DTLS port: dropped, counted.
    s.send_to(&[0x16, 0xfe, 0xfd, 1], gw.coaps).unwrap();
    s.send_to(&[0x40, 0x01, 0, 1], gw.coaps).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(gw.metric("dtls_dropped_malformed") + gw.metric("dtls_records_no_session") >= 2);
}

#[test]
fn replayed_record_is_dropped_and_processed_once() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 1, &provisioning(), "");
    let tele = reader(&broker, &["telemetry.raw.acme"]);
    let mut dev = Device::new_dtls(
        "urn:imei:psk",
        gw.coaps,
        1,
        &psk("psk-1", PSK_KEY),
        "PSK-AES128-CCM8",
    )
    .unwrap();
    dev.sim.values.insert(rp("/3303/0/5700"), 1.0);
    assert_eq!(dev.register(1), Code::CREATED);
    read_matching(&tele, 1, Duration::from_secs(20), |_| true);
    // A NON notification, then the same record again, byte for byte.
    dev.sim.values.insert(rp("/3303/0/5700"), 2.0);
    let (_, n) = dev.sim.notify("/3303/0", false).unwrap();
    dev.send(&n);
    {
        let mut c = dev.dtls.as_ref().unwrap().borrow_mut();
        let record = c.transport().sent.last().unwrap().clone();
        c.transport().sock.send(&record).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(gw.metric("dtls_records_replayed"), 1);
    broker.write_marker("telemetry.raw.acme");
    let pts: Vec<_> = tele
        .read(usize::MAX, Duration::from_secs(3))
        .into_iter()
        .filter(|r| r.value.get("marker").is_none())
        .collect();
    assert_eq!(pts.len(), 1, "{pts:?}");
    assert_eq!(pts[0].value["numeric_values"]["temperature"], 2.0);
}

#[test]
fn credentials_removed_through_the_api_end_the_session() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, &provisioning(), "");
    let status = reader(&broker, &["device.status.acme"]);
    let mut dev = Device::new_dtls(
        "urn:imei:psk",
        gw.coaps,
        1,
        &psk("psk-1", PSK_KEY),
        "PSK-AES128-CCM8",
    )
    .unwrap();
    assert_eq!(dev.register(1), Code::CREATED);
    // New key through the admin API.
    let body = format!(
        r#"{{"device_id":"psk-device","tenant_id":"acme","profile":"environment","psk_identity":"psk-1","psk_key_hex":"{}"}}"#,
        "ab".repeat(16)
    );
    let (code, _) = http(gw.admin, "PUT", "/v1/endpoints/urn:imei:psk", &body).unwrap();
    assert!(code == 200 || code == 201, "{code}");
    let st = read_matching(&status, 1, Duration::from_secs(20), |r| {
        r.value["status"] == "offline"
    });
    assert_eq!(st[0].value["reason"], "credentials_changed");
    // The session is gone: the next request gets no answer.
    let u = dev.sim.update(None, false);
    assert_eq!(dev.request(&u, Duration::from_secs(2)), None);
    assert_eq!(gw.metric("dtls_sessions"), 0);
    // The key is never returned.
    let (_, body) = http(gw.admin, "GET", "/v1/endpoints/urn:imei:psk", "").unwrap();
    assert!(!body.contains(&"ab".repeat(16)), "{body}");
    assert!(!body.contains("psk_key_hex"), "{body}");
    // Credentials removed altogether (the entry kept): the same.
    let mut dev2 = Device::new_dtls(
        "urn:imei:psk2",
        gw.coaps,
        3,
        &psk("psk-2", PSK_KEY),
        "PSK-AES128-CCM8",
    )
    .unwrap();
    assert_eq!(dev2.register(1), Code::CREATED);
    let (code, _) = http(
        gw.admin,
        "PUT",
        "/v1/endpoints/urn:imei:psk2",
        r#"{"device_id":"psk2-device","tenant_id":"acme","profile":"environment"}"#,
    )
    .unwrap();
    assert_eq!(code, 200);
    let st = read_matching(&status, 1, Duration::from_secs(20), |r| {
        r.value["endpoint"] == "urn:imei:psk2" && r.value["status"] == "offline"
    });
    assert_eq!(st[0].value["reason"], "credentials_changed");
    let u = dev2.sim.update(None, false);
    assert_eq!(dev2.request(&u, Duration::from_secs(2)), None);
    // With the new key the device is back.
    let mut dev = Device::new_dtls(
        "urn:imei:psk",
        gw.coaps,
        2,
        &psk("psk-1", &"ab".repeat(16)),
        "PSK-AES128-CCM8",
    )
    .unwrap();
    assert_eq!(dev.register(1), Code::CREATED);
}

/// SIGTERM + restart with 1,000 established DTLS devices: the sessions are
/// saved encrypted and restored, so every device goes on sending over its
/// session with no new handshake, and its points reach the topic.
#[test]
fn sigterm_restart_keeps_1000_dtls_sessions() {
    raise_nofile();
    const N: usize = 1000;
    let broker = Broker::memory();
    let keydir = tempdir();
    std::fs::write(keydir.join("session.key"), "5a".repeat(32)).unwrap();
    let mut prov = String::new();
    for i in 0..N {
        prov.push_str(&format!(
            "[[endpoint]]\nendpoint = \"urn:imei:r{i}\"\ndevice_id = \"r{i}\"\ntenant_id = \"acme\"\nprofile = \"environment\"\npsk_identity = \"r{i}\"\npsk_key_hex = \"{:032x}\"\n\n",
            i + 1
        ));
    }
    let extra = format!(
        "[dtls]\nsession_key_file = \"{}/session.key\"\n",
        keydir.display()
    );
    let mut gw = Gateway::start(&broker, 2, &prov, &extra);
    let coaps = gw.coaps;
    // Handshake and register from four threads.
    let register = |range: std::ops::Range<usize>| {
        std::thread::spawn(move || {
            range
                .map(|i| {
                    let auth = psk(&format!("r{i}"), &format!("{:032x}", i + 1));
                    let mut d = Device::new_dtls(
                        &format!("urn:imei:r{i}"),
                        coaps,
                        i as u16,
                        &auth,
                        "PSK-AES128-CCM8",
                    )
                    .unwrap_or_else(|e| panic!("device {i}: {e}"));
                    // No observed objects: the test drives Send.
                    d.sim.objects = vec!["/1/0".into(), "/3/0".into()];
                    d.sim.values.insert(rp("/3303/0/5700"), i as f64);
                    assert_eq!(d.register(0), Code::CREATED, "device {i}");
                    d
                })
                .collect::<Vec<_>>()
        })
    };
    let threads: Vec<_> = (0..4)
        .map(|t| register(t * N / 4..(t + 1) * N / 4))
        .collect();
    let devices: Vec<Vec<Device>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(gw.metric("dtls_handshakes_completed"), N as i64);
    assert_eq!(gw.metric("dtls_sessions"), N as i64);
    assert_eq!(gw.stop(), Some(0));
    assert!(gw.log_contains("DTLS session snapshot written"));
    gw.spawn();
    assert_eq!(gw.metric("dtls_sessions_restored"), N as i64);
    let tele = reader(&broker, &["telemetry.raw.acme"]);
    // Every device sends over its old session.
    let threads: Vec<_> = devices
        .into_iter()
        .map(|mut ds| {
            std::thread::spawn(move || {
                for d in ds.iter_mut() {
                    let s = d.sim.send(&["/3303/0/5700"], None, false);
                    assert_eq!(
                        d.request(&s, Duration::from_secs(10)),
                        Some(Code::CHANGED),
                        "{} after the restart",
                        d.sim.endpoint
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(gw.metric("dtls_handshakes_started"), 0, "no new handshake");
    broker.write_marker("telemetry.raw.acme");
    let pts = read_matching(&tele, N, Duration::from_secs(60), |r| {
        r.value["source"]["operation"] == "send"
    });
    let mut ids: Vec<String> = pts
        .iter()
        .map(|r| r.value["device_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N);
    let _ = MsgType::Ack;
}

/// 20,000 ClientHellos from 2,000 source ports on another address, half of
/// them coming back with valid cookies: the caps hold (handshakes in
/// progress, per-address rate), the gateway's memory stays bounded, and an
/// established device keeps publishing through it all.
#[test]
fn handshake_flood_is_capped_and_established_devices_keep_publishing() {
    raise_nofile();
    let broker = Broker::memory();
    let extra = "[dtls]\nmax_handshakes_per_shard = 64\nhandshakes_per_ip_per_s = 200\nhandshake_timeout_ms = 2000\n";
    let gw = Gateway::start(&broker, 2, &provisioning(), extra);
    let tele = reader(&broker, &["telemetry.raw.acme"]);
    let mut dev = Device::new_dtls(
        "urn:imei:psk",
        gw.coaps,
        1,
        &psk("psk-1", PSK_KEY),
        "PSK-AES128-CCM8",
    )
    .unwrap();
    dev.sim.values.insert(rp("/3303/0/5700"), 0.0);
    assert_eq!(dev.register(1), Code::CREATED);
    let rss0 = gw.rss_kib();
    let coaps = gw.coaps;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let flood = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        let socks: Vec<UdpSocket> = (0..2000)
            .map(|_| {
                let s = UdpSocket::bind("127.0.0.2:0").unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        let mut sent = 0;
        let mut buf = [0u8; 512];
        let mut round = 0u8;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) || sent < 20_000 {
            round = round.wrapping_add(1);
            // A first hello from every port…
            for (i, s) in socks.iter().enumerate() {
                let h =
                    handshake::testing::client_hello_with(round ^ i as u8, 0, 0, &[], &[0xc0a8]);
                let _ = s.send_to(&h, coaps);
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
            // …and the second, with the cookie each got back.
            for (i, s) in socks.iter().enumerate() {
                while let Ok((n, _)) = s.recv_from(&mut buf) {
                    let Ok((rec, _)) = record::parse(&buf[..n]) else {
                        continue;
                    };
                    let Ok(h) = handshake::parse_header(rec.fragment) else {
                        continue;
                    };
                    if h.msg_type != handshake::msg_type::HELLO_VERIFY_REQUEST {
                        continue;
                    }
                    let cookie = &h.fragment[3..];
                    let h2 = handshake::testing::client_hello_with(
                        round ^ i as u8,
                        1,
                        1,
                        cookie,
                        &[0xc0a8],
                    );
                    let _ = s.send_to(&h2, coaps);
                    sent += 1;
                }
            }
        }
        (sent, start.elapsed())
    });
    // Meanwhile the established device notifies (CON), every one acknowledged.
    let mut acked = 0;
    for k in 1..=20 {
        dev.sim.values.insert(rp("/3303/0/5700"), k as f64);
        if dev.notify_con("/3303/0", Duration::from_secs(10)) == Some(MsgType::Ack) {
            acked += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, took) = flood.join().unwrap();
    assert!(sent >= 20_000, "flood sent {sent}");
    assert!(took < Duration::from_secs(60), "flood took {took:?}");
    assert_eq!(acked, 20, "the established device was served");
    let started = gw.metric("dtls_handshakes_started");
    let capped = gw.metric("dtls_dropped_handshake_cap") + gw.metric("dtls_dropped_rate");
    assert!(capped > 0, "caps never applied (started {started})");
    assert!(
        gw.metric("dtls_handshakes") <= 2 * 64,
        "{}",
        gw.metric("dtls_handshakes")
    );
    eprintln!(
        "flood: sent {sent} in {took:?}; HVR {}, started {started}, capped {capped}, completed {}, failed {}, timeouts {}",
        gw.metric("dtls_hello_verify_sent"),
        gw.metric("dtls_handshakes_completed"),
        gw.metric("dtls_handshakes_failed"),
        gw.metric("dtls_handshake_timeouts")
    );
    // Most first hellos were answered (the rest the kernel dropped from a
    // full socket buffer), statelessly.
    assert!(gw.metric("dtls_hello_verify_sent") >= sent as i64 / 4);
    assert_eq!(
        gw.metric("dtls_sessions"),
        1,
        "only the real device has a session"
    );
    let rss1 = gw.rss_kib();
    assert!(
        rss1 < rss0 + 64 * 1024,
        "RSS grew from {rss0} to {rss1} KiB"
    );
    // The half-open handshakes expire.
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(gw.metric("dtls_handshakes"), 0);
    let pts = read_matching(&tele, 21, Duration::from_secs(20), |r| {
        r.value["endpoint"] == "urn:imei:psk"
    });
    assert_eq!(
        pts.len(),
        21,
        "initial value + 20 notifications on the topic"
    );
}

/// A DTLS device whose address changes (NAT rebinding: a new port, a new
/// handshake, possibly on the other shard) updates its registration through
/// the new session; the old session is dropped, not kept until it idles out.
/// Its Update over plain CoAP is refused.
#[test]
fn new_session_takes_over_registration_and_old_session_goes() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, &provisioning(), "");
    let auth = psk("psk-1", PSK_KEY);
    let mut dev = Device::new_dtls("urn:imei:psk", gw.coaps, 1, &auth, "PSK-AES128-CCM8").unwrap();
    dev.sim.objects = vec!["/1/0".into(), "/3/0".into()];
    assert_eq!(dev.register(0), Code::CREATED);
    // Plain CoAP on the same location: refused.
    let mut plain = Device::new("urn:imei:psk", gw.coap, 2);
    plain.sim.location = dev.sim.location.clone();
    let u = plain.sim.update(None, false);
    assert_eq!(
        plain.request(&u, Duration::from_secs(3)),
        Some(Code::FORBIDDEN)
    );
    for round in 0..6 {
        let old = dev.dtls.take().unwrap();
        dev.dtls = Some(std::cell::RefCell::new(
            dtls_connect(gw.coaps, &auth, "PSK-AES128-CCM8").unwrap(),
        ));
        let u = dev.sim.update(None, false);
        assert_eq!(
            dev.request(&u, Duration::from_secs(5)),
            Some(Code::CHANGED),
            "round {round}"
        );
        drop(old);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            gw.metric("dtls_sessions"),
            1,
            "round {round}: the old session is gone"
        );
    }
    assert_eq!(gw.metric("registrations_active"), 1);
}

/// Posts an RPC and answers the gateway's requests (over the device's
/// DTLS session) until it is finished.
fn dtls_rpc(gw: &Gateway, dev: &mut Device, device: &str, body: &str) -> serde_json::Value {
    let (code, b) = http(gw.admin, "POST", &format!("/v1/devices/{device}/rpc"), body).unwrap();
    assert_eq!(code, 202, "{b}");
    let id = serde_json::from_str::<serde_json::Value>(&b).unwrap()["rpc_id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        dev.pump(Duration::from_millis(50));
        let (_, b) = http(gw.admin, "GET", &format!("/v1/rpc/{id}"), "").unwrap();
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        if !["queued", "sent"].contains(&v["status"].as_str().unwrap_or("")) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
    }
}

#[test]
fn rpcs_reach_dtls_devices_through_their_sessions() {
    let broker = Broker::memory();
    let setup = Setup::new();
    let gw = Gateway::start(&broker, 2, &provisioning(), &setup.config());
    let statuses = reader(&broker, &["device.rpc.status.acme"]);
    let mut dev = Device::new_dtls(
        "urn:imei:psk",
        gw.coaps,
        41,
        &psk("psk-1", PSK_KEY),
        "PSK-AES128-CCM8",
    )
    .unwrap();
    dev.sim.objects.push("/33000/0".into());
    assert_eq!(dev.register(1), Code::CREATED);
    let plain_before = gw.metric("dtls_tx_no_session");

    // reboot → Execute /3/0/4 inside the session → succeeded.
    let s = dtls_rpc(
        &gw,
        &mut dev,
        "psk-device",
        r#"{"rpc_id":"d-reboot","method":"reboot"}"#,
    );
    assert_eq!(
        (s["status"].as_str(), s["code"].as_str()),
        (Some("succeeded"), Some("2.04")),
        "{s}"
    );
    assert!(dev
        .sim
        .executed_args
        .iter()
        .any(|(p, _)| *p == rp("/3/0/4")));
    // A read, and a 16 KiB read and write in blocks, all through DTLS.
    let s = dtls_rpc(
        &gw,
        &mut dev,
        "psk-device",
        r#"{"method":"read","params":{"path":"/3/0/0"}}"#,
    );
    assert_eq!(s["response"]["/3/0/0"], "CORE-M sim", "{s}");
    let blob: Vec<u8> = (0..16 * 1024u32).map(|i| (i * 31 % 253) as u8).collect();
    dev.sim.store.insert(
        rp("/33000/0/1"),
        corem_lwm2m::proto::lwm2m::encode::WriteValue::Opaque(blob.clone()),
    );
    let s = dtls_rpc(
        &gw,
        &mut dev,
        "psk-device",
        r#"{"method":"read","params":{"path":"/33000/0/1"}}"#,
    );
    let hex: String = blob.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        s["response"]["/33000/0/1"]["hex"].as_str(),
        Some(hex.as_str()),
        "{}",
        s["status"]
    );
    let rev: String = blob.iter().rev().map(|b| format!("{b:02x}")).collect();
    let s = dtls_rpc(
        &gw,
        &mut dev,
        "psk-device",
        &format!(
            r#"{{"method":"write","params":{{"path":"/33000/0/1","value":{{"hex":"{rev}"}}}}}}"#
        ),
    );
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(
        dev.sim.bytes_of("/33000/0/1").unwrap(),
        blob.iter().rev().copied().collect::<Vec<u8>>()
    );
    assert!(gw.metric("block2_continuations") >= 15);
    assert!(gw.metric("block1_sent") >= 16);
    assert_eq!(
        gw.metric("dtls_tx_no_session"),
        plain_before,
        "nothing went out in clear"
    );
    // The reboot's statuses on the topic.
    broker.write_marker("device.rpc.status.acme");
    let ev = read_matching(&statuses, 3, Duration::from_secs(20), |r| {
        r.value["rpc_id"] == "d-reboot"
    });
    let seq: Vec<&str> = ev
        .iter()
        .map(|e| e.value["status"].as_str().unwrap())
        .collect();
    assert_eq!(seq, ["queued", "sent", "succeeded"]);
    assert_eq!(ev[2].value["device_id"], "psk-device");
    assert_eq!(ev[2].value["code"], "2.04");
}
