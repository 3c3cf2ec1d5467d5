//! Platform RPCs end to end: the admin API takes an RPC, the gateway binary
//! delivers it to a simulated device over real UDP, the device's answer
//! becomes the RPC's status, consumed back from `device.rpc.status.acme`
//! (a real Kafka-protocol broker) and checked field by field.

mod common;

use common::*;
use corem_lwm2m::proto::coap::Code;
use corem_lwm2m::proto::lwm2m::content::ResourcePath;
use std::time::{Duration, Instant};

const DEV: &str = "d7b1c0e2-3f44-4a91-9b2e-2c5a1f0e9d33";

fn rp(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap()
}

fn post_rpc(gw: &Gateway, device: &str, body: &str) -> (u16, serde_json::Value) {
    let (code, b) = http(gw.admin, "POST", &format!("/v1/devices/{device}/rpc"), body).unwrap();
    (code, serde_json::from_str(&b).unwrap_or_default())
}

fn rpc_status(gw: &Gateway, id: &str) -> serde_json::Value {
    let (code, b) = http(gw.admin, "GET", &format!("/v1/rpc/{id}"), "").unwrap();
    assert_eq!(code, 200, "{id}: {b}");
    serde_json::from_str(&b).unwrap()
}

/// Answers the gateway's requests until the RPC is finished.
fn until_final(gw: &Gateway, dev: &mut Device, id: &str, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        dev.pump(Duration::from_millis(50));
        let s = rpc_status(gw, id);
        let st = s["status"].as_str().unwrap_or("").to_string();
        if !["queued", "sent"].contains(&st.as_str()) || Instant::now() > deadline {
            return s;
        }
    }
}

/// The status events of `id` on the topic, in order.
fn events(
    broker: &Broker,
    r: &corem_lwm2m::tools::topic_reader::TopicReader,
    id: &str,
    n: usize,
) -> Vec<serde_json::Value> {
    broker.write_marker("device.rpc.status.acme");
    read_matching(r, n, Duration::from_secs(20), |x| x.value["rpc_id"] == id)
        .into_iter()
        .map(|x| {
            assert_eq!(x.key.as_deref(), Some(DEV), "keyed by device_id");
            x.value
        })
        .collect()
}

#[test]
fn reboot_succeeds_a_refusal_fails_with_its_code_silence_times_out() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, PROVISIONING, "[coap]\nack_timeout_ms = 300\n");
    let statuses = reader(&broker, &["device.rpc.status.acme"]);
    let mut dev = Device::new("urn:imei:123", gw.coap, 1);
    assert_eq!(dev.register(4), Code::CREATED);

    // reboot → Execute /3/0/4 → 2.04 → succeeded.
    let (code, r) = post_rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"rb-1","method":"reboot","timeout_ms":20000}"#,
    );
    assert_eq!(code, 202, "{r}");
    assert_eq!(r["rpc_id"], "rb-1");
    let s = until_final(&gw, &mut dev, "rb-1", Duration::from_secs(20));
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["code"], "2.04");
    assert!(dev
        .sim
        .executed_args
        .iter()
        .any(|(p, _)| *p == rp("/3/0/4")));
    let ev = events(&broker, &statuses, "rb-1", 3);
    let seq: Vec<&str> = ev.iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(seq, ["queued", "sent", "succeeded"]);
    let last = &ev[2];
    assert_eq!(last["device_id"], DEV);
    assert_eq!(last["tenant_id"], "acme");
    assert_eq!(last["method"], "reboot");
    assert_eq!(last["code"], "2.04");
    assert!(last["ts"].as_i64().unwrap() > 1_600_000_000_000);

    // The same rpc_id again is not run twice.
    let (code, r) = post_rpc(&gw, DEV, r#"{"rpc_id":"rb-1","method":"reboot"}"#);
    assert_eq!((code, r["status"].as_str()), (200, Some("succeeded")));

    // A device answering 4.05: failed with that code.
    dev.sim
        .fail
        .insert((Code::POST.0, rp("/3/0/4")), Code::METHOD_NOT_ALLOWED);
    let (code, _) = post_rpc(&gw, DEV, r#"{"rpc_id":"rb-2","method":"reboot"}"#);
    assert_eq!(code, 202);
    let s = until_final(&gw, &mut dev, "rb-2", Duration::from_secs(20));
    assert_eq!(
        (s["status"].as_str(), s["code"].as_str()),
        (Some("failed"), Some("4.05")),
        "{s}"
    );

    // Unknown method or bad params: failed with a reason, nothing sent.
    let seen = dev.requests_seen.len();
    let (code, _) = post_rpc(&gw, DEV, r#"{"rpc_id":"bad-1","method":"launch"}"#);
    assert_eq!(code, 202);
    let s = rpc_status(&gw, "bad-1");
    assert_eq!(s["status"], "failed");
    assert!(
        s["reason"].as_str().unwrap().contains("unknown method"),
        "{s}"
    );
    dev.pump(Duration::from_millis(300));
    assert_eq!(dev.requests_seen.len(), seen, "nothing reached the device");

    // The API refuses what would publish elsewhere or nowhere.
    let (code, _) = post_rpc(&gw, "no-such-device", r#"{"method":"reboot"}"#);
    assert_eq!(code, 404);
    let (code, _) = post_rpc(&gw, DEV, r#"{"method":"reboot","tenant_id":"other"}"#);
    assert_eq!(code, 400);
    let big = format!(r#"{{"method":"reboot","rpc_id":"{}"}}"#, "x".repeat(300));
    assert_eq!(post_rpc(&gw, DEV, &big).0, 400, "rpc_id too long");

    // A silent device: timed_out after the CoAP retransmissions.
    dev.sim.silent = true;
    let (code, _) = post_rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"rb-3","method":"factory_reset","timeout_ms":60000}"#,
    );
    assert_eq!(code, 202);
    let s = until_final(&gw, &mut dev, "rb-3", Duration::from_secs(40));
    assert_eq!(s["status"], "timed_out", "{s}");
    let five = dev
        .requests_seen
        .iter()
        .filter(|(p, c, _)| p == "/3/0/5" && *c == Code::POST)
        .count();
    assert_eq!(five, 5, "the request and its 4 retransmissions");
}

#[test]
fn an_rpc_for_an_offline_device_waits_for_it_or_expires() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, PROVISIONING, "");
    let statuses = reader(&broker, &["device.rpc.status.acme"]);
    let (code, _) = post_rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"late","method":"read","params":{"path":"/3/0/0"},"timeout_ms":60000}"#,
    );
    assert_eq!(code, 202);
    let (code, _) = post_rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"gone","method":"reboot","timeout_ms":500}"#,
    );
    assert_eq!(code, 202);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rpc_status(&gw, "gone")["status"], "expired");
    assert_eq!(rpc_status(&gw, "late")["status"], "queued");
    // The device registers: the queued read is delivered and answered.
    let mut dev = Device::new("urn:imei:123", gw.coap, 7);
    assert_eq!(dev.register(4), Code::CREATED);
    let s = until_final(&gw, &mut dev, "late", Duration::from_secs(20));
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["response"]["/3/0/0"], "CORE-M sim");
    let ev = events(&broker, &statuses, "gone", 2);
    let seq: Vec<&str> = ev.iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(seq, ["queued", "expired"]);
    // The device API shows the registration and the RPCs.
    let (code, b) = http(gw.admin, "GET", &format!("/v1/devices/{DEV}/rpc"), "").unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["registration"]["online"], true);
    assert_eq!(v["rpcs"].as_array().unwrap().len(), 2);
}

fn produce(broker: &Broker, topic: &str, payload: &str) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let prod: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.addr())
        .create()
        .unwrap();
    prod.send(BaseRecord::to(topic).key(DEV).payload(payload))
        .map_err(|(e, _)| e)
        .unwrap();
    prod.flush(Duration::from_secs(10)).unwrap();
    // tansu 0.6.0 makes the last batch readable only after the next write
    // (the marker is not an RPC request: the gateway skips it with a log
    // line).
    broker.write_marker(topic);
}

#[test]
fn kafka_requests_run_once_and_survive_sigkill() {
    let broker = Broker::durable();
    // A tiny compaction threshold: the RPC log is compacted (in the
    // background) many times during the test; the consumer offsets must
    // survive it.
    let mut gw = Gateway::start(
        &broker,
        2,
        PROVISIONING,
        "[rpc]\nlog_compact_bytes = 1024\n",
    );
    let statuses = reader(&broker, &["device.rpc.status.acme"]);
    let mut dev = Device::new("urn:imei:123", gw.coap, 3);
    assert_eq!(dev.register(4), Code::CREATED);
    // A reboot written to the request topic.
    produce(
        &broker,
        "device.rpc.requests",
        &format!(
            r#"{{"rpc_id":"k-1","tenant_id":"acme","device_id":"{DEV}","method":"reboot","params":{{}},"timeout_ms":30000}}"#
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while dev.sim.executed_args.is_empty() && Instant::now() < deadline {
        dev.pump(Duration::from_millis(50));
    }
    let s = until_final(&gw, &mut dev, "k-1", Duration::from_secs(10));
    assert_eq!(
        (s["status"].as_str(), s["code"].as_str()),
        (Some("succeeded"), Some("2.04")),
        "{s}"
    );
    let ev = events(&broker, &statuses, "k-1", 3);
    let seq: Vec<&str> = ev.iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(seq, ["queued", "sent", "succeeded"]);
    // Garbage on the topic is skipped, the next request still runs.
    produce(&broker, "device.rpc.requests", "{not json");
    // The device goes quiet; one RPC is sent to it (no answer), one waits
    // behind it; then the gateway is killed.
    dev.sim.silent = true;
    produce(
        &broker,
        "device.rpc.requests",
        &format!(
            r#"{{"rpc_id":"k-sent","tenant_id":"acme","device_id":"{DEV}","method":"read","params":{{"path":"/3/0/0"}},"timeout_ms":120000}}"#
        ),
    );
    produce(
        &broker,
        "device.rpc.requests",
        &format!(
            r#"{{"rpc_id":"k-queued","tenant_id":"acme","device_id":"{DEV}","method":"read","params":{{"path":"/3/0/1"}},"timeout_ms":120000}}"#
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        dev.pump(Duration::from_millis(50));
        let (_, a) = http(gw.admin, "GET", "/v1/rpc/k-sent", "").unwrap();
        let b = http(gw.admin, "GET", "/v1/rpc/k-queued", "").unwrap().0;
        if a.contains("\"status\":\"sent\"") && b == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{a}");
    }
    // More RPCs through the API (for a device that is offline: they wait)
    // until the log was compacted after the last consumed record: its
    // offset then lives only in the snapshot, and must come back from it.
    let snap = gw.dir.join("snap");
    let offset_only_in_snapshot = || {
        let segs: Vec<std::path::PathBuf> = std::fs::read_dir(&snap)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().contains("rpc.log."))
            .collect();
        snap.join("rpc.snap").exists()
            && segs.iter().all(|p| {
                !std::fs::read_to_string(p)
                    .unwrap_or_default()
                    .contains("{\"o\":")
            })
    };
    let mut pad = 0;
    while !offset_only_in_snapshot() {
        pad += 1;
        assert!(pad < 200, "the RPC log was never compacted");
        let (code, _) = post_rpc(
            &gw,
            "env-device",
            &format!(r#"{{"rpc_id":"pad-{pad}","method":"reboot","timeout_ms":600000}}"#),
        );
        assert_eq!(code, 202);
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.kill();
    gw.spawn();
    // After the restart: the sent one ends failed (outcome unknown), the
    // queued one runs once the device talks again; k-1 is not run again.
    dev.sim.silent = false;
    let executed = dev.sim.executed_args.len();
    dev.new_port();
    let upd = dev.sim.update(None, false);
    assert!(dev.request(&upd, Duration::from_secs(10)).is_some());
    let s = until_final(&gw, &mut dev, "k-queued", Duration::from_secs(30));
    assert_eq!(s["status"], "succeeded", "{s}");
    assert_eq!(s["response"]["/3/0/1"], "lwm2m-devsim");
    let s = rpc_status(&gw, "k-sent");
    assert_eq!(s["status"], "failed");
    assert!(s["reason"].as_str().unwrap().contains("restarted"), "{s}");
    assert_eq!(dev.sim.executed_args.len(), executed, "reboot not repeated");
    // The intake resumed after the last request it had accepted: the
    // garbage record before the restart was not read (nor skipped) again.
    let skipped = gw
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| {
            l.contains("RPC request record skipped")
                && l.contains("error=not a JSON RPC request: key must be a string")
        })
        .count();
    assert_eq!(
        skipped, 1,
        "the request topic was not re-read after the restart"
    );
    assert!(!gw.dir.join("snap/rpc.log").exists());
    assert!(
        gw.dir.join("snap/rpc.snap").exists(),
        "compacted at least once"
    );
    // Exactly one terminal status per RPC on the topic (read from the
    // start again).
    let all = reader(&broker, &["device.rpc.status.acme"]);
    broker.write_marker("device.rpc.status.acme");
    let recs = read_matching(&all, 9, Duration::from_secs(20), |x| {
        x.value["rpc_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("k-"))
    });
    for (id, n) in [("k-1", 3), ("k-sent", 3), ("k-queued", 3)] {
        let ev: Vec<&serde_json::Value> = recs
            .iter()
            .map(|r| &r.value)
            .filter(|v| v["rpc_id"] == id)
            .collect();
        assert_eq!(ev.len(), n, "{id}: {ev:?}");
        let terminal = ev
            .iter()
            .filter(|e| !["queued", "sent"].contains(&e["status"].as_str().unwrap()))
            .count();
        assert_eq!(terminal, 1, "{id}: {ev:?}");
    }
}

/// Posts an RPC for `device` and answers the gateway's requests until the
/// RPC is finished; returns its record.
fn call(gw: &Gateway, dev: &mut Device, device: &str, body: &str) -> serde_json::Value {
    let (code, r) = post_rpc(gw, device, body);
    assert_eq!(code, 202, "{body}: {r}");
    let id = r["rpc_id"].as_str().unwrap().to_string();
    until_final(gw, dev, &id, Duration::from_secs(20))
}

const ENV_DEV: &str = "env-device";

#[test]
fn every_operation_round_trips_through_the_http_api() {
    let broker = Broker::memory();
    let gw = Gateway::start(
        &broker,
        2,
        PROVISIONING,
        "[coap]\nmax_body = 32768\nack_timeout_ms = 500\n",
    );
    let telemetry = reader(&broker, &["telemetry.raw.acme"]);
    let mut dev = Device::new("urn:imei:env", gw.coap, 21);
    dev.sim.objects.push("/33000/0".into());
    assert_eq!(dev.register(1), Code::CREATED);
    let ok = |s: &serde_json::Value, code: &str| {
        assert_eq!(
            (s["status"].as_str(), s["code"].as_str()),
            (Some("succeeded"), Some(code)),
            "{s}"
        );
    };

    // Read: a single resource in TLV, an object instance in SenML JSON, a
    // multiple-instance resource.
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"read","params":{"path":"/3/0/0","format":"tlv"}}"#,
    );
    ok(&s, "2.05");
    assert_eq!(s["response"]["/3/0/0"], "CORE-M sim");
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"read","params":{"path":"/3/0","format":"senml_json"}}"#,
    );
    ok(&s, "2.05");
    assert_eq!(s["response"]["/3/0/1"], "lwm2m-devsim");
    assert_eq!(s["response"]["/3/0/9"], 87);
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"read","params":{"path":"/3/0/6","format":"tlv"}}"#,
    );
    ok(&s, "2.05");
    assert_eq!(
        (
            s["response"]["/3/0/6/0"].as_i64(),
            s["response"]["/3/0/6/1"].as_i64()
        ),
        (Some(1), Some(5)),
        "{s}"
    );

    // Write: a resource in TLV, read back in SenML JSON; an instance
    // (partial update) in SenML JSON; a multiple-instance resource.
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"write","params":{"path":"/3/0/14","value":"+02:00","format":"tlv"}}"#,
    );
    ok(&s, "2.04");
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"read","params":{"path":"/3/0/14","format":"senml_json"}}"#,
    );
    assert_eq!(s["response"]["/3/0/14"], "+02:00", "{s}");
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"write","params":{"path":"/3303/0","mode":"update","values":{"5701":"Cel","5750":"attic"},"format":"senml_json"}}"#,
    );
    ok(&s, "2.04");
    assert_eq!(dev.sim.bytes_of("/3303/0/5701").unwrap(), b"Cel");
    assert_eq!(dev.sim.bytes_of("/3303/0/5750").unwrap(), b"attic");
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"write","params":{"path":"/3/0/6","mode":"replace","values":{"/3/0/6/0":2,"/3/0/6/1":7},"format":"tlv"}}"#,
    );
    ok(&s, "2.04");
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"read","params":{"path":"/3/0/6","format":"senml_json"}}"#,
    );
    assert_eq!(
        (
            s["response"]["/3/0/6/0"].as_i64(),
            s["response"]["/3/0/6/1"].as_i64()
        ),
        (Some(2), Some(7)),
        "{s}"
    );

    // Discover: the links of an instance.
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"discover","params":{"path":"/3303/0"}}"#,
    );
    ok(&s, "2.05");
    let links = s["response"].as_array().unwrap_or_else(|| panic!("{s}"));
    assert!(links.iter().any(|l| l == "</3303/0/5700>"), "{s}");
    assert_eq!(links[0], "</3303/0>");

    // Create an instance, read it, delete it; a read after is 4.04.
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"create","params":{"path":"/3303","instance":1,"values":{"5700":12.5}}}"#,
    );
    ok(&s, "2.01");
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"read","params":{"path":"/3303/1/5700"}}"#,
    );
    assert_eq!(s["response"]["/3303/1/5700"], 12.5, "{s}");
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"delete","params":{"path":"/3303/1"}}"#,
    );
    ok(&s, "2.02");
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"read","params":{"path":"/3303/1/5700"}}"#,
    );
    assert_eq!(
        (s["status"].as_str(), s["code"].as_str()),
        (Some("failed"), Some("4.04")),
        "{s}"
    );

    // Write-Attributes, Observe: the device's notifications become
    // TelemetryPoints; Cancel Observation: they stop (RST).
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"write_attributes","params":{"path":"/3304/0/5700","attributes":{"pmin":1,"pmax":5}}}"#,
    );
    ok(&s, "2.04");
    let mut attrs = dev.sim.attributes[&rp("/3304/0/5700")].clone();
    attrs.sort();
    assert_eq!(attrs, ["pmax=5", "pmin=1"]);
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"observe","params":{"path":"/3304/0/5700"}}"#,
    );
    ok(&s, "2.05");
    assert_eq!(s["response"]["/3304/0/5700"], 40.0);
    dev.sim.values.insert(rp("/3304/0/5700"), 41.5);
    assert_eq!(
        dev.notify_con("/3304/0/5700", Duration::from_secs(10)),
        Some(corem_lwm2m::proto::coap::MsgType::Ack)
    );
    let pts = read_matching(&telemetry, 1, Duration::from_secs(20), |r| {
        r.value["device_id"] == ENV_DEV && r.value["numeric_values"]["humidity"] == 41.5
    });
    assert_eq!(pts[0].value["endpoint"], "urn:imei:env");
    // The observation as the device holds it, to notify on it after the
    // cancel as a device that missed the cancel would.
    let stale = dev
        .sim
        .observations
        .iter()
        .find(|o| o.path == rp("/3304/0/5700"))
        .cloned()
        .expect("observed");
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"cancel_observe","params":{"path":"/3304/0/5700"}}"#,
    );
    ok(&s, "2.05");
    assert!(
        !dev.sim.is_observed("/3304/0/5700"),
        "cancelled with a GET carrying Observe=1 (RFC 7641 §3.6)"
    );
    // A notification on the cancelled observation: RST, and no point.
    dev.sim.observations.push(stale);
    dev.sim.values.insert(rp("/3304/0/5700"), 42.5);
    assert_eq!(
        dev.notify_con("/3304/0/5700", Duration::from_secs(10)),
        Some(corem_lwm2m::proto::coap::MsgType::Rst)
    );
    dev.sim
        .observations
        .retain(|o| o.path != rp("/3304/0/5700"));
    broker.write_marker("telemetry.raw.acme");
    let late = read_matching(&telemetry, 1, Duration::from_secs(3), |r| {
        r.value["device_id"] == ENV_DEV && r.value["numeric_values"]["humidity"] == 42.5
    });
    assert!(late.is_empty(), "no point after the cancel: {late:?}");

    // Execute with arguments (TS 1.1 Core §5.4.5).
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"execute","params":{"path":"/3/0/4","args":{"0":"soft","1":null}}}"#,
    );
    ok(&s, "2.04");
    assert_eq!(
        dev.sim.executed_args.last().unwrap(),
        &(rp("/3/0/4"), "0='soft',1".to_string())
    );

    // 16 KiB read answered in Block2 blocks (the device's 256-byte size
    // wins), reassembled; 16 KiB written in Block1 blocks.
    let blob: Vec<u8> = (0..16 * 1024u32).map(|i| (i * 13 % 251) as u8).collect();
    let hex: String = blob.iter().map(|b| format!("{b:02x}")).collect();
    dev.sim.store.insert(
        rp("/33000/0/1"),
        corem_lwm2m::proto::lwm2m::encode::WriteValue::Opaque(blob.clone()),
    );
    dev.sim.block_szx = 4;
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"read","params":{"path":"/33000/0/1"}}"#,
    );
    ok(&s, "2.05");
    assert_eq!(
        s["response"]["/33000/0/1"]["hex"].as_str(),
        Some(hex.as_str())
    );
    let rev: String = blob.iter().rev().map(|b| format!("{b:02x}")).collect();
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        &format!(
            r#"{{"method":"write","params":{{"path":"/33000/0/1","value":{{"hex":"{rev}"}}}}}}"#
        ),
    );
    ok(&s, "2.04");
    assert_eq!(
        dev.sim.bytes_of("/33000/0/1").unwrap(),
        blob.iter().rev().copied().collect::<Vec<u8>>()
    );

    // An incoming body above coap.max_body (32 KiB): 4.13 with Size1, and
    // nothing kept (a fresh Send afterwards works).
    let big = vec![b'x'; 1024];
    let mut last = None;
    for i in 0..40u32 {
        let m = corem_lwm2m::proto::coap::MessageBuilder::request(Code::POST, true)
            .mid(40_000 + i as u16)
            .token(&[0x5e, 0x4d])
            .path("dp")
            .content_format(corem_lwm2m::proto::lwm2m::content::CF_SENML_JSON)
            .block1(corem_lwm2m::proto::coap::Block {
                num: i,
                more: true,
                szx: 6,
            })
            .payload(&big)
            .to_vec();
        dev.sim.outstanding = Some(40_000 + i as u16);
        let code = dev.request(&m, Duration::from_secs(5));
        last = code;
        if code != Some(Code::CONTINUE) {
            break;
        }
    }
    assert_eq!(last, Some(Code::REQUEST_ENTITY_TOO_LARGE));
    assert_eq!(
        gw.metric("block1_assemblies"),
        0,
        "no reassembly state left"
    );
    let send = dev.sim.send(&["/3303/0/5700"], None, false);
    assert_eq!(
        dev.request(&send, Duration::from_secs(5)),
        Some(Code::CHANGED)
    );

    // An RPC observation of a path the profile does not map: counted
    // only; with the profile's publish_unmapped, published under its path.
    let s = call(
        &gw,
        &mut dev,
        ENV_DEV,
        r#"{"method":"observe","params":{"path":"/3/0/9"}}"#,
    );
    ok(&s, "2.05");
    let unmapped = gw.metric("unmapped_values");
    dev.sim.values.insert(rp("/3/0/9"), 64.0);
    assert_eq!(
        dev.notify_con("/3/0/9", Duration::from_secs(10)),
        Some(corem_lwm2m::proto::coap::MsgType::Ack)
    );
    assert!(gw.metric("unmapped_values") > unmapped);
    std::fs::write(
        gw.dir.join("profiles/environment.toml"),
        format!("publish_unmapped = true\n{ENV_PROFILE}"),
    )
    .unwrap();
    assert_eq!(
        http(gw.admin, "POST", "/v1/profiles/reload", "").unwrap().0,
        200
    );
    dev.sim.values.insert(rp("/3/0/9"), 63.0);
    assert_eq!(
        dev.notify_con("/3/0/9", Duration::from_secs(10)),
        Some(corem_lwm2m::proto::coap::MsgType::Ack)
    );
    let pts = read_matching(&telemetry, 1, Duration::from_secs(20), |r| {
        r.value["device_id"] == ENV_DEV && !r.value["numeric_values"]["/3/0/9"].is_null()
    });
    assert_eq!(pts[0].value["numeric_values"]["/3/0/9"], 63);
    assert_eq!(pts[0].value["source"]["path"], "/3/0/9");
}

#[test]
fn a_queue_mode_device_gets_its_rpc_after_its_next_update() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, PROVISIONING, "[coap]\nqueue_awake_s = 1\n");
    let mut dev = Device::new("urn:imei:123", gw.coap, 31);
    dev.sim.binding = "UQ";
    assert_eq!(dev.register(4), Code::CREATED);
    // Asleep once its wake window passed: the RPC waits.
    std::thread::sleep(Duration::from_millis(1500));
    let (code, _) = post_rpc(
        &gw,
        DEV,
        r#"{"rpc_id":"q-1","method":"reboot","timeout_ms":60000}"#,
    );
    assert_eq!(code, 202);
    let seen = dev.requests_seen.len();
    dev.pump(Duration::from_millis(800));
    assert_eq!(rpc_status(&gw, "q-1")["status"], "queued");
    assert_eq!(
        dev.requests_seen.len(),
        seen,
        "nothing sent to a sleeping device"
    );
    // It wakes (an Update from a new port): the RPC goes out at once.
    dev.new_port();
    let upd = dev.sim.update(None, false);
    assert_eq!(
        dev.request(&upd, Duration::from_secs(10)),
        Some(Code::CHANGED)
    );
    let s = until_final(&gw, &mut dev, "q-1", Duration::from_secs(20));
    assert_eq!(
        (s["status"].as_str(), s["code"].as_str()),
        (Some("succeeded"), Some("2.04")),
        "{s}"
    );
    let (_, v) = http(gw.admin, "GET", &format!("/v1/devices/{DEV}"), "").unwrap();
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["registration"]["queue_mode"], true, "{v}");
}
