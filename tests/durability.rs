//! Durability over restarts and outages: directory snapshots across gateway
//! restarts (and a corrupted snapshot), and a 20-second broker outage with
//! durable broker storage while devices keep reporting.

mod common;

use common::*;
use corem_lwm2m::proto::coap::{Code, MsgType};
use corem_lwm2m::proto::lwm2m::content::ResourcePath;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[test]
fn directory_changes_survive_restart_and_corrupt_snapshot_falls_back() {
    let broker = Broker::memory();
    let mut gw = Gateway::start(&broker, 1, PROVISIONING, "");
    // Add an endpoint and delete a provisioned one through the API.
    let (code, _) = http(
        gw.admin,
        "PUT",
        "/v1/endpoints/urn:imei:api-1",
        r#"{"device_id":"api-dev-1","tenant_id":"acme","profile":"default"}"#,
    )
    .unwrap();
    assert_eq!(code, 201);
    let (code, body) = http(gw.admin, "GET", "/v1/endpoints/urn%3Aimei%3Aapi-1", "").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("api-dev-1"));
    assert_eq!(
        http(gw.admin, "DELETE", "/v1/endpoints/urn:imei:env", "")
            .unwrap()
            .0,
        204
    );
    assert_eq!(
        http(gw.admin, "DELETE", "/v1/endpoints/urn:imei:env", "")
            .unwrap()
            .0,
        404
    );
    let (code, _) = http(gw.admin, "PUT", "/v1/endpoints/x", r#"{"device_id":""}"#).unwrap();
    assert_eq!(code, 400);
    // Bulk load.
    let (code, body) = http(
        gw.admin,
        "POST",
        "/v1/endpoints",
        r#"[{"endpoint":"urn:imei:bulk-1","device_id":"b1","tenant_id":"acme"},
            {"endpoint":"urn:imei:bulk-2","device_id":"b2","tenant_id":"acme"}]"#,
    )
    .unwrap();
    assert_eq!((code, body.contains("\"upserted\":2")), (200, true));

    // The API endpoint can register right away.
    let mut d = Device::new("urn:imei:api-1", gw.coap, 1);
    assert_eq!(d.register(4), Code::CREATED);

    assert_eq!(gw.stop(), Some(0));
    let snap = gw.dir.join("snap/directory.snap");
    assert!(snap.exists());

    // Restart: API changes are still there (the provisioning file is not
    // re-applied over the snapshot).
    gw.spawn();
    let (code, _) = http(gw.admin, "GET", "/v1/endpoints/urn:imei:api-1", "").unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        http(gw.admin, "GET", "/v1/endpoints/urn:imei:env", "")
            .unwrap()
            .0,
        404
    );
    assert_eq!(
        http(gw.admin, "GET", "/v1/endpoints/urn:imei:bulk-2", "")
            .unwrap()
            .0,
        200
    );
    let mut d = Device::new("urn:imei:api-1", gw.coap, 2);
    assert_eq!(d.register(4), Code::CREATED);

    // One more change, persisted by the shutdown snapshot; the previous
    // generation (without it) becomes directory.snap.prev.
    let (code, _) = http(
        gw.admin,
        "PUT",
        "/v1/endpoints/urn:imei:api-2",
        r#"{"device_id":"api-dev-2","tenant_id":"acme"}"#,
    )
    .unwrap();
    assert_eq!(code, 201);
    assert_eq!(gw.stop(), Some(0));

    // Corrupt the newest snapshot: flip a byte in its body.
    let mut bytes = std::fs::read(&snap).unwrap();
    let k = bytes.len() - 10;
    bytes[k] ^= 0x55;
    std::fs::write(&snap, &bytes).unwrap();
    gw.spawn();
    assert!(
        gw.log_contains("directory snapshot is corrupted; loaded the previous snapshot instead")
    );
    // The previous generation has api-1; api-2 (written after it) comes from
    // the write-ahead log: nothing answered is lost.
    assert_eq!(
        http(gw.admin, "GET", "/v1/endpoints/urn:imei:api-1", "")
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        http(gw.admin, "GET", "/v1/endpoints/urn:imei:api-2", "")
            .unwrap()
            .0,
        200
    );
    // After a fallback start the corrupted file must not become the kept
    // previous generation: corrupt the next current one too, and the start
    // still finds everything.
    assert_eq!(gw.stop(), Some(0));
    let mut bytes = std::fs::read(&snap).unwrap();
    let k = bytes.len() - 10;
    bytes[k] ^= 0x55;
    std::fs::write(&snap, &bytes).unwrap();
    gw.log.lock().unwrap().clear();
    gw.spawn();
    assert!(
        gw.log_contains("directory snapshot is corrupted; loaded the previous snapshot instead")
    );
    for ep in ["urn:imei:api-1", "urn:imei:api-2", "urn:imei:bulk-2"] {
        assert_eq!(
            http(gw.admin, "GET", &format!("/v1/endpoints/{ep}"), "")
                .unwrap()
                .0,
            200,
            "{ep}"
        );
    }
    assert_eq!(gw.stop(), Some(0));
}

/// The broker is stopped for 20 s (SQLite storage) while devices keep
/// notifying with CON and Send. With `ack_after = "queued"` and a small
/// producer queue, devices are told to back off (unacknowledged CON, 5.03
/// for Send) and retry. After the broker returns, every acknowledged value is
/// in Kafka exactly once.
#[test]
fn broker_outage_loses_nothing_acknowledged_ack_when_queued() {
    broker_outage("queued", Duration::from_secs(3));
}

/// The same outage with the default `ack_after = "delivered"`: nothing is
/// acknowledged until the broker has it, so devices keep retransmitting
/// through the outage (their CoAP layer does for up to 93 s) and are
/// acknowledged once it is back; still every acknowledged value exactly once.
#[test]
fn broker_outage_loses_nothing_acknowledged_ack_after_delivery() {
    broker_outage("delivered", Duration::from_secs(40));
}

fn broker_outage(ack_after: &str, device_patience: Duration) {
    let mut broker = Broker::durable();
    let gw = Gateway::start(
        &broker,
        1,
        PROVISIONING,
        &format!("[kafka]\nqueue_max_messages = 40\nmessage_timeout_ms = 120000\nack_after = \"{ack_after}\"\n[coap]\nbusy_max_age_s = 1\n"),
    );
    let tele = reader(&broker, &["telemetry.raw.acme"]);
    let mut notifier = Device::new("urn:imei:123", gw.coap, 1);
    assert_eq!(notifier.register(4), Code::CREATED);
    let mut sender = Device::new("urn:imei:env", gw.coap, 2);
    assert_eq!(sender.register(1), Code::CREATED);
    // Initial values: 4 + 1.
    let initial = read_matching(&tele, 5, Duration::from_secs(20), |_| true);
    assert_eq!(initial.len(), 5);
    drop(tele);

    // The broker-connection gauge (librdkafka statistics every 5 s) sees
    // the broker before the outage.
    let deadline = Instant::now() + Duration::from_secs(15);
    while gw.metric("kafka_broker_connections_up") < 1 {
        assert!(
            Instant::now() < deadline,
            "no broker connection reported up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let temp = ResourcePath::parse("/3303/0/5700").unwrap();
    let hum = ResourcePath::parse("/3304/0/5700").unwrap();
    let mut acked_notify = Vec::new();
    let mut acked_send = Vec::new();
    let mut busy_seen = 0;
    let start = Instant::now();
    let mut i = 0u32;
    let restarted = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|sc| {
        // The outage runs on its own clock: devices may block on an answer.
        sc.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            broker.stop();
            std::thread::sleep(Duration::from_secs(20));
            // Statistics come every 5 s: 20 s into the outage they say so.
            assert_eq!(
                gw.metric("kafka_broker_connections_up"),
                0,
                "no broker connection up during the outage"
            );
            broker.start();
            restarted.store(true, std::sync::atomic::Ordering::Release);
        });
        while start.elapsed() < Duration::from_secs(34) {
            i += 1;
            // CON notification with a unique value; the device retransmits until
            // it is acknowledged (or gives up, then the value is not counted as
            // acknowledged).
            let v = 10_000.0 + i as f64;
            notifier.sim.values.insert(temp, v);
            if notifier.notify_con("/3303/0/5700", device_patience) == Some(MsgType::Ack) {
                acked_notify.push(v);
            }
            // Send with a unique value; on 5.03, retry after Max-Age with a new
            // request until 2.04.
            let h = 20_000.0 + i as f64;
            sender.sim.values.insert(hum, h);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                let s = sender.sim.send(&["/3304/0/5700"], None, false);
                match sender.request(&s, device_patience) {
                Some(Code::CHANGED) => {
                    acked_send.push(h);
                    break;
                }
                Some(Code::SERVICE_UNAVAILABLE) => {
                    busy_seen += 1;
                    std::thread::sleep(Duration::from_millis(300));
                }
                // No answer within the device's patience: given up, not
                // acknowledged.
                None if ack_after == "delivered" => break,
                other => panic!(
                    "unexpected Send answer {other:?} at {:?}: busy_responses={} points={} kafka_queue={}",
                    start.elapsed(),
                    gw.metric("busy_responses"),
                    gw.metric("points_published"),
                    gw.metric("kafka_queue")
                ),
            }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let restarted = restarted.load(std::sync::atomic::Ordering::Acquire);
    assert!(restarted);
    if ack_after == "queued" {
        assert!(
            busy_seen > 0,
            "the small queue must have pushed back during the outage"
        );
        assert!(gw.metric("notifications_deferred_busy") > 0);
    } else {
        // Held through the outage, acknowledged after it.
        assert!(
            gw.metric("duplicates") > 0,
            "retransmissions during the outage were absorbed"
        );
    }
    assert!(!acked_notify.is_empty() && !acked_send.is_empty());

    let tele = reader(&broker, &["telemetry.raw.acme"]);
    let want = acked_notify.len() + acked_send.len();
    let mut all = read_matching(&tele, 5 + want, Duration::from_secs(60), |_| true);
    // Anything beyond that would be a duplicate: give it a moment to show up.
    all.extend(tele.read(usize::MAX, Duration::from_secs(3)));
    eprintln!(
        "outage: {} notifications and {} sends acknowledged, {} Send retries after 5.03, {} CON notifications withheld, {} records read",
        acked_notify.len(),
        acked_send.len(),
        busy_seen,
        gw.metric("notifications_deferred_busy"),
        all.len()
    );
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in &all {
        for m in ["temperature", "humidity"] {
            if let Some(v) = r.value["numeric_values"][m].as_f64() {
                if v >= 10_000.0 {
                    *counts.entry(format!("{m}={v}")).or_default() += 1;
                }
            }
        }
    }
    for v in &acked_notify {
        assert_eq!(
            counts.get(&format!("temperature={v}")),
            Some(&1),
            "acked notification {v}"
        );
    }
    for v in &acked_send {
        assert_eq!(
            counts.get(&format!("humidity={v}")),
            Some(&1),
            "acked send {v}"
        );
    }
    assert!(
        counts.values().all(|n| *n == 1),
        "no duplicates: {counts:?}"
    );
    assert_eq!(gw.metric("kafka_delivery_failed"), 0);

    // What the operator reads about the 20 s outage: one line when it
    // began, one when it ended, and librdkafka's own complaints held to
    // one per 30 s (they were several ERROR lines a second, per client).
    let down = gw.log_count("kafka: no broker reachable");
    let back = gw.log_count("kafka: a broker is reachable again");
    let lib = gw.log_count("(librdkafka;");
    eprintln!("outage log: {down} down, {back} back, {lib} librdkafka lines");
    assert_eq!(down, 1, "the outage is said once");
    assert!(back >= 1, "its end is said");
    assert!(lib <= 2, "librdkafka's lines are rate-limited: {lib}");
    assert_eq!(gw.log_count("ERROR"), 0, "no ERROR line for an outage");
    assert!(gw.metric("kafka_broker_connections_up") >= 1);
}
