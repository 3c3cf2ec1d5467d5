//! End-to-end over loopback: real UDP sockets, the real gateway binary, a real
//! Kafka-protocol broker (tansu); records are consumed back and checked field
//! by field.

mod common;

use common::*;
use corem_lwm2m::proto::coap::{Code, MsgType};
use corem_lwm2m::proto::lwm2m::content::{self, ResourcePath};
use std::time::Duration;

const DEV: &str = "d7b1c0e2-3f44-4a91-9b2e-2c5a1f0e9d33";

fn rp(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap()
}

#[test]
fn register_then_notification_reaches_kafka() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 1, PROVISIONING, "");
    let status = reader(&broker, &["device.status.acme"]);
    let tele = reader(&broker, &["telemetry.raw.acme"]);

    let mut dev = Device::new("urn:imei:123", gw.coap, 1);
    assert_eq!(dev.register(4), Code::CREATED);
    let loc = dev.sim.location.clone().unwrap();

    let st = read_matching(&status, 1, Duration::from_secs(20), |_| true);
    assert_eq!(st.len(), 1);
    let s = &st[0];
    assert_eq!(s.topic, "device.status.acme");
    assert_eq!(s.key.as_deref(), Some(DEV));
    assert_eq!(s.value["device_id"], DEV);
    assert_eq!(s.value["tenant_id"], "acme");
    assert_eq!(s.value["endpoint"], "urn:imei:123");
    assert_eq!(s.value["status"], "online");
    assert_eq!(s.value["reason"], "registered");
    assert!(s.value["last_seen"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(s.value["registration"]["registration_id"], loc.as_str());
    assert_eq!(s.value["registration"]["lifetime_s"], 300);
    assert_eq!(s.value["registration"]["binding"], "U");
    assert_eq!(s.value["registration"]["lwm2m_version"], "1.1");

    // The initial observe responses carried values; now a fresh notification.
    dev.sim.values.insert(rp("/3303/0/5700"), 22.5);
    assert_eq!(
        dev.notify_con("/3303/0/5700", Duration::from_secs(5)),
        Some(MsgType::Ack)
    );
    let pts = read_matching(&tele, 5, Duration::from_secs(20), |_| true);
    assert_eq!(pts.len(), 5, "4 initial values + 1 notification");
    let last = pts.last().unwrap();
    assert_eq!(last.topic, "telemetry.raw.acme");
    assert_eq!(last.key.as_deref(), Some(DEV));
    let v = &last.value;
    assert_eq!(v["numeric_values"]["temperature"], 22.5);
    assert_eq!(v["device_id"], DEV);
    assert_eq!(v["tenant_id"], "acme");
    assert_eq!(v["endpoint"], "urn:imei:123");
    assert_eq!(v["source"]["path"], "/3303/0/5700");
    assert_eq!(v["source"]["operation"], "notify");
    assert_eq!(v["source"]["observe_seq"], 2);
    assert!(v["ts"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(v["string_values"], serde_json::json!({}));
    let battery = pts
        .iter()
        .find(|p| p.value["numeric_values"]["battery_level"].is_number())
        .unwrap();
    assert_eq!(battery.value["numeric_values"]["battery_level"], 87.0);
}

#[test]
fn every_content_format_decodes_to_metrics() {
    let broker = Broker::memory();
    let mut prov = String::from(PROVISIONING);
    let formats = [
        ("text", content::CF_TEXT),
        ("opaque", content::CF_OPAQUE),
        ("cbor", content::CF_CBOR),
        ("tlv", content::CF_TLV),
        ("senmljson", content::CF_SENML_JSON),
        ("senmlcbor", content::CF_SENML_CBOR),
        ("lwm2mjson", content::CF_LWM2M_JSON),
    ];
    for (name, _) in formats {
        prov.push_str(&format!(
            "\n[[endpoint]]\nendpoint = \"urn:fmt:{name}\"\ndevice_id = \"dev-{name}\"\ntenant_id = \"fmt\"\n"
        ));
    }
    let gw = Gateway::start(&broker, 1, &prov, "");
    let tele = reader(&broker, &["telemetry.raw.fmt"]);
    for (i, (name, cf)) in formats.iter().enumerate() {
        let mut d = Device::new(&format!("urn:fmt:{name}"), gw.coap, 10 + i as u16);
        d.sim.format = *cf;
        d.sim.values.insert(rp("/3303/0/5700"), -12.75);
        d.sim.values.insert(rp("/3/0/9"), 55.0);
        assert_eq!(d.register(4), Code::CREATED);
        let pts = read_matching(&tele, 4, Duration::from_secs(20), |r| {
            r.value["device_id"] == format!("dev-{name}")
        });
        let temp = pts
            .iter()
            .find(|p| p.value["numeric_values"].get("temperature").is_some())
            .expect(name);
        assert_eq!(
            temp.value["numeric_values"]["temperature"], -12.75,
            "{name}"
        );
        assert_eq!(temp.value["source"]["content_format"], *cf as i64, "{name}");
        let bat = pts
            .iter()
            .find(|p| p.value["numeric_values"].get("battery_level").is_some())
            .expect(name);
        assert_eq!(bat.value["numeric_values"]["battery_level"], 55.0, "{name}");
    }
}

#[test]
fn tlv_instance_observation_and_senml_send_with_time() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 1, PROVISIONING, "");
    let tele = reader(&broker, &["telemetry.raw.acme"]);
    // The environment profile observes the whole /3303/0 instance (TLV, with
    // Write-Attributes pmin/pmax first) and maps 5700 and 5701.
    let mut d = Device::new("urn:imei:env", gw.coap, 3);
    d.sim.format = content::CF_TLV;
    d.sim.values.insert(rp("/3303/0/5700"), 19.5);
    d.sim.values.insert(rp("/3303/0/5601"), 10.0); // unmapped
    assert_eq!(d.register(1), Code::CREATED);
    assert!(
        d.requests_seen
            .iter()
            .any(|(p, c, _)| p == "/3303/0" && *c == Code::PUT),
        "Write-Attributes before Observe: {:?}",
        d.requests_seen
    );
    let pts = read_matching(&tele, 1, Duration::from_secs(20), |_| true);
    assert_eq!(pts[0].value["numeric_values"]["temperature"], 19.5);
    assert_eq!(pts[0].value["source"]["path"], "/3303/0");
    assert!(gw.metric("unmapped_values") >= 1);

    // LwM2M 1.1 Send with SenML base time: ts is the device's time.
    let s = d.sim.send(
        &["/3303/0/5700", "/3304/0/5700"],
        Some(1_700_000_000.5),
        false,
    );
    assert_eq!(d.request(&s, Duration::from_secs(5)), Some(Code::CHANGED));
    let pts = read_matching(&tele, 1, Duration::from_secs(20), |r| {
        r.value["source"]["operation"] == "send"
    });
    let v = &pts[0].value;
    assert_eq!(v["ts"], 1_700_000_000_500i64);
    assert_eq!(v["numeric_values"]["temperature"], 19.5);
    assert_eq!(v["numeric_values"]["humidity"], 40.0);
    assert_eq!(v["source"]["content_format"], 110);
}

#[test]
fn update_deregister_expiry_and_reregistration() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 1, PROVISIONING, "");
    let status = reader(&broker, &["device.status.acme"]);

    let mut d = Device::new("urn:imei:123", gw.coap, 1);
    assert_eq!(d.register(4), Code::CREATED);
    let u = d.sim.update(Some(120), false);
    assert_eq!(d.request(&u, Duration::from_secs(5)), Some(Code::CHANGED));
    let del = d.sim.deregister();
    assert_eq!(d.request(&del, Duration::from_secs(5)), Some(Code::DELETED));
    let st = read_matching(&status, 3, Duration::from_secs(20), |_| true);
    let reasons: Vec<_> = st
        .iter()
        .map(|r| {
            (
                r.value["status"].as_str().unwrap().to_string(),
                r.value["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("online".into(), "registered".into()),
            ("online".into(), "updated".into()),
            ("offline".into(), "deregistered".into())
        ]
    );
    assert_eq!(st[1].value["registration"]["lifetime_s"], 120);

    // Lifetime expiry: lt=2 and no Update.
    let mut e = Device::new("urn:imei:123", gw.coap, 2);
    e.sim.lifetime_s = 2;
    assert_eq!(e.register(4), Code::CREATED);
    let st = read_matching(&status, 2, Duration::from_secs(20), |_| true);
    assert_eq!(st[1].value["status"], "offline");
    assert_eq!(st[1].value["reason"], "expired");
    assert_eq!(gw.metric("expirations"), 1);

    // Re-registration from a new socket (device reboot): the old registration
    // is replaced and observations are established once, not twice.
    let mut a = Device::new("urn:imei:123", gw.coap, 3);
    assert_eq!(a.register(4), Code::CREATED);
    let mut b = Device::new("urn:imei:123", gw.coap, 4);
    assert_eq!(b.register(4), Code::CREATED);
    b.pump(Duration::from_millis(300));
    let observes = b
        .requests_seen
        .iter()
        .filter(|(_, c, o)| *c == Code::GET && *o == Some(0))
        .count();
    assert_eq!(observes, 4);
    assert_eq!(gw.metric("observations_active"), 4);
    assert_eq!(gw.metric("registrations_active"), 1);
    // The old device's notification is refused (RST cancels it there).
    assert_eq!(
        a.notify_con("/3303/0/5700", Duration::from_secs(2)),
        Some(MsgType::Rst)
    );
    // Update on the replaced registration → 4.04.
    let u = a.sim.update(None, false);
    assert_eq!(a.request(&u, Duration::from_secs(5)), Some(Code::NOT_FOUND));
}

#[test]
fn unknown_endpoint_is_forbidden_and_nothing_is_published() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 1, PROVISIONING, "");
    let status = reader(&broker, &["device.status.acme"]);
    let mut x = Device::new("urn:imei:stranger", gw.coap, 9);
    assert_eq!(x.register(0), Code::FORBIDDEN);
    // A known device afterwards: its event is the first and only record.
    let mut d = Device::new("urn:imei:123", gw.coap, 1);
    assert_eq!(d.register(4), Code::CREATED);
    let st = read_matching(&status, 2, Duration::from_secs(5), |_| true);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].value["endpoint"], "urn:imei:123");
    assert_eq!(gw.metric("register_rejected_unknown_endpoint"), 1);
}

#[test]
fn duplicate_con_notification_yields_one_point() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 1, PROVISIONING, "");
    let tele = reader(&broker, &["telemetry.raw.acme"]);
    let mut d = Device::new("urn:imei:123", gw.coap, 1);
    assert_eq!(d.register(4), Code::CREATED);
    read_matching(&tele, 4, Duration::from_secs(20), |_| true);
    d.sim.values.insert(rp("/3303/0/5700"), 31.5);
    let (_, n) = d.sim.notify("/3303/0/5700", true).unwrap();
    for _ in 0..3 {
        d.send(&n);
    }
    // The ACK waits for the broker; copies that arrive meanwhile are
    // absorbed (the message is being processed), one ACK comes back.
    let (_, raw) = d.pump(Duration::from_millis(500));
    assert_eq!(raw.len(), 1, "one ACK for the copies in flight");
    // A later retransmission gets the cached ACK.
    d.send(&n);
    let (_, raw) = d.pump(Duration::from_millis(300));
    assert_eq!(raw.len(), 1, "each later copy is ACKed");
    let pts = read_matching(&tele, 2, Duration::from_secs(5), |_| true);
    assert_eq!(pts.len(), 1);
    assert_eq!(pts[0].value["numeric_values"]["temperature"], 31.5);
    assert_eq!(gw.metric("duplicates"), 3);
}

#[test]
fn ten_thousand_malformed_datagrams_do_not_hurt() {
    use rand::{Rng, SeedableRng};
    let broker = Broker::memory();
    let mut gw = Gateway::start(&broker, 2, PROVISIONING, "");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut sim = corem_lwm2m::testkit::sim::SimDevice::new("urn:imei:123", 5);
    for i in 0..10_000 {
        let d: Vec<u8> = if i % 3 == 0 {
            let mut v = sim.register();
            let k = rng.gen_range(0..v.len());
            v[k] = rng.gen();
            v.truncate(rng.gen_range(1..=v.len()));
            v
        } else {
            let n = rng.gen_range(0..200);
            (0..n).map(|_| rng.gen()).collect()
        };
        sock.send_to(&d, gw.coap).unwrap();
        if i % 500 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(gw.is_running());
    assert_eq!(gw.metric("datagrams_rx"), 10_000);
    assert!(
        gw.metric("malformed") > 5_000,
        "malformed={}",
        gw.metric("malformed")
    );
    // Still serving.
    let mut d = Device::new("urn:imei:123", gw.coap, 1);
    assert_eq!(d.register(4), Code::CREATED);
    assert_eq!(gw.stop(), Some(0));
}

#[test]
fn two_shards_spread_devices_and_publish_each_point_once() {
    let broker = Broker::memory();
    let mut prov = String::new();
    for i in 0..24 {
        prov.push_str(&format!("[[endpoint]]\nendpoint = \"urn:spread:{i}\"\ndevice_id = \"spread-{i}\"\ntenant_id = \"spread\"\n"));
    }
    let gw = Gateway::start(&broker, 2, &prov, "");
    let tele = reader(&broker, &["telemetry.raw.spread"]);
    let mut devs: Vec<Device> = (0..24)
        .map(|i| Device::new(&format!("urn:spread:{i}"), gw.coap, i as u16 + 100))
        .collect();
    for d in devs.iter_mut() {
        assert_eq!(d.register(4), Code::CREATED);
    }
    let per_shard = gw.metric_by_shard("registrations_active");
    assert_eq!(per_shard.len(), 2);
    assert!(
        per_shard.iter().all(|n| *n > 0),
        "devices on both shards: {per_shard:?}"
    );
    assert_eq!(per_shard.iter().sum::<i64>(), 24);
    for (i, d) in devs.iter_mut().enumerate() {
        d.sim.values.insert(rp("/3303/0/5700"), 1000.0 + i as f64);
        assert_eq!(
            d.notify_con("/3303/0/5700", Duration::from_secs(5)),
            Some(MsgType::Ack)
        );
    }
    // 24 x 4 initial values + 24 notifications, each exactly once.
    let pts = read_matching(&tele, 24 * 5 + 1, Duration::from_secs(10), |_| true);
    assert_eq!(pts.len(), 24 * 5);
    for i in 0..24 {
        let n = pts
            .iter()
            .filter(|p| p.value["numeric_values"]["temperature"] == 1000.0 + i as f64)
            .count();
        assert_eq!(n, 1, "device {i}");
        let key = format!("spread-{i}");
        assert!(
            pts.iter()
                .filter(|p| p.key.as_deref() == Some(key.as_str()))
                .count()
                == 5
        );
    }
    let shards_used: std::collections::BTreeSet<i64> = pts
        .iter()
        .map(|p| p.value["source"]["shard"].as_i64().unwrap())
        .collect();
    assert_eq!(shards_used.len(), 2);
}

/// `gateway.max_datagram` (2048) is enforced on the first datagram after
/// idle and on batches alike: a 60 KB Register gets 4.13 with Size1 and
/// registers nothing; a 64 KiB GET is dropped; both are counted.
#[test]
fn oversized_datagrams_are_refused() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 1, PROVISIONING, "");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut sim = corem_lwm2m::testkit::sim::SimDevice::new("urn:imei:123", 3);
    for i in 0..5300 {
        sim.objects.push(format!("/{}/0", 20_000 + i));
    }
    let reg = sim.register();
    assert!(reg.len() > 58_000 && reg.len() < 65_000, "{}", reg.len());
    let mut buf = [0u8; 4096];
    for round in 0..2 {
        // Once after idle (io_uring receive), once inside a batch.
        if round == 1 {
            for _ in 0..5 {
                sock.send_to(&[0x50, 0, 0, 1], gw.coap).unwrap();
            }
        }
        sock.send_to(&reg, gw.coap).unwrap();
        let (n, _) = sock
            .recv_from(&mut buf)
            .expect("an answer to the oversized Register");
        let m = corem_lwm2m::proto::coap::Message::decode(&buf[..n]).unwrap();
        assert_eq!(m.code, Code::REQUEST_ENTITY_TOO_LARGE);
        assert_eq!(m.size1(), Some(2048));
    }
    let get = corem_lwm2m::proto::coap::MessageBuilder::request(Code::GET, false)
        .mid(9)
        .path("x")
        .payload(&[7u8; 65_000])
        .to_vec();
    sock.send_to(&get, gw.coap).unwrap();
    assert!(
        sock.recv_from(&mut buf).is_err(),
        "a NON is dropped silently"
    );
    assert_eq!(gw.metric("oversized"), 3);
    assert_eq!(gw.metric("registrations"), 0);
}

/// RFC 7252 §5.3.2: a notification is matched by peer and token. Device B's
/// token sent from another address gets RST and is not B's telemetry. And a
/// stranger's bare GET gets an answer no larger than itself (no diagnostic
/// payload to unregistered senders).
#[test]
fn foreign_token_and_no_amplification() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 1, PROVISIONING, "");
    let tele = reader(&broker, &["telemetry.raw.acme"]);
    let mut d = Device::new("urn:imei:123", gw.coap, 1);
    assert_eq!(d.register(4), Code::CREATED);
    read_matching(&tele, 4, Duration::from_secs(20), |_| true);
    d.sim.values.insert(rp("/3303/0/5700"), 66.5);
    let (mid, n) = d.sim.notify("/3303/0/5700", true).unwrap();
    let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    other.send_to(&n, gw.coap).unwrap();
    let mut buf = [0u8; 2048];
    let (k, _) = other.recv_from(&mut buf).unwrap();
    let m = corem_lwm2m::proto::coap::Message::decode(&buf[..k]).unwrap();
    assert_eq!((m.mtype, m.message_id), (MsgType::Rst, mid));
    assert_eq!(gw.metric("notifications_wrong_peer"), 1);
    let pts = read_matching(&tele, 1, Duration::from_secs(2), |_| true);
    assert!(pts.is_empty(), "not published: {pts:?}");
    // A bare GET (4 bytes) from a stranger.
    other.send_to(&[0x40, 0x01, 0x12, 0x34], gw.coap).unwrap();
    let (k, _) = other.recv_from(&mut buf).unwrap();
    assert!(k <= 4, "{k} bytes answered to 4");
    assert_eq!(buf[1], Code::NOT_FOUND.0);
}

/// Logs a user can grep: no ANSI colour codes when stderr is a pipe, and
/// `--log-format json` gives one JSON object per line with the fields.
#[test]
fn logs_are_plain_and_json_on_request() {
    let broker = Broker::memory();
    let mut gw = Gateway::start(&broker, 1, PROVISIONING, "");
    let mut d = Device::new("urn:imei:123", gw.coap, 1);
    assert_eq!(d.register(4), Code::CREATED);
    assert!(gw.log_contains("registered"));
    assert!(
        gw.log.lock().unwrap().iter().all(|l| !l.contains('\u{1b}')),
        "no escape sequences in a piped log"
    );
    assert_eq!(gw.stop(), Some(0));
    gw.log.lock().unwrap().clear();
    gw.args = vec!["--log-format".into(), "json".into()];
    gw.spawn();
    let mut d = Device::new("urn:imei:123", gw.coap, 2);
    assert_eq!(d.register(4), Code::CREATED);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let line = loop {
        let found = gw
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("\"registered\""))
            .cloned();
        if let Some(l) = found {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no registered line");
        std::thread::sleep(Duration::from_millis(50));
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["message"], "registered");
    assert_eq!(v["endpoint"], "urn:imei:123");
    assert_eq!(v["device_id"], DEV);
    assert_eq!(v["shard"], 0);
    assert_eq!(v["level"], "INFO");
    assert_eq!(gw.stop(), Some(0));
}
