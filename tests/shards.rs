//! The gateway as the world hits it: two shards (the kernel's reuseport hash
//! sends a new 4-tuple to either), devices that change source port, one
//! endpoint registering from 1,000 ports at once, restarts and SIGKILL. Real
//! binary, real UDP, real tansu broker; records consumed back and checked.

mod common;

use common::*;
use corem_lwm2m::proto::coap::{Code, Message, MsgType};
use corem_lwm2m::proto::lwm2m::content::ResourcePath;
use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn rp(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap()
}

fn temperatures(recs: &[corem_lwm2m::tools::topic_reader::Record]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in recs {
        if let Some(v) = r.value["numeric_values"]["temperature"].as_f64() {
            if v >= 1000.0 {
                *m.entry(format!("{v}")).or_default() += 1;
            }
        }
    }
    m
}

/// Update and De-register, each from 10 fresh source ports on a two-shard
/// gateway: every one succeeds (LwM2M names the registration by its location,
/// TS 1.1 Transport §6.2.2 / §6.2.3), with no re-registration.
#[test]
fn update_and_deregister_from_fresh_ports_on_two_shards() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, PROVISIONING, "");
    let status = reader(&broker, &["device.status.acme"]);
    let mut d = Device::new("urn:imei:123", gw.coap, 1);
    assert_eq!(d.register(4), Code::CREATED);
    let mut ports = Vec::new();
    for i in 0..10 {
        d.new_port();
        ports.push(d.local_addr());
        let u = d.sim.update(None, false);
        assert_eq!(
            d.request(&u, Duration::from_secs(10)),
            Some(Code::CHANGED),
            "update {i} from {}",
            d.local_addr()
        );
    }
    assert_eq!(gw.metric("registrations"), 1, "no re-registration");
    assert_eq!(gw.metric("registrations_active"), 1);
    let mut st = read_matching(&status, 11, Duration::from_secs(20), |_| true);
    assert_eq!(st.len(), 11);
    // Events of a registration that moved between shards come from two
    // producers; `registration.seq` orders them.
    st.sort_by_key(|s| s.value["registration"]["seq"].as_u64().unwrap());
    let seqs: Vec<u64> = st
        .iter()
        .map(|s| s.value["registration"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..11).collect::<Vec<u64>>());
    assert_eq!(st[0].value["reason"], "registered");
    for (s, p) in st[1..].iter().zip(&ports) {
        assert_eq!(s.value["reason"], "updated");
        assert_eq!(s.value["registration"]["address"], p.to_string());
    }
    // The registration followed the device: a notification from the
    // current port is acknowledged and published.
    let tele = reader(&broker, &["telemetry.raw.acme"]);
    d.sim.values.insert(rp("/3303/0/5700"), 1234.5);
    assert_eq!(
        d.notify_con("/3303/0/5700", Duration::from_secs(5)),
        Some(MsgType::Ack)
    );
    let pts = read_matching(&tele, 5, Duration::from_secs(20), |_| true);
    assert_eq!(temperatures(&pts).get("1234.5"), Some(&1));

    // Ten times: register, then De-register from a fresh port.
    for i in 0..10 {
        let mut d = Device::new("urn:imei:123", gw.coap, 100 + i);
        assert_eq!(d.register(4), Code::CREATED);
        d.new_port();
        let del = d.sim.deregister();
        assert_eq!(
            d.request(&del, Duration::from_secs(10)),
            Some(Code::DELETED),
            "de-register {i}"
        );
        assert_eq!(gw.metric("registrations_active"), 0, "de-register {i}");
    }
    let st = read_matching(&status, 11 + 20, Duration::from_secs(20), |_| true);
    let dereg = st
        .iter()
        .filter(|s| s.value["reason"] == "deregistered")
        .count();
    assert_eq!(dereg, 10);
    assert!(st.iter().all(|s| s.value["reason"] != "expired"));
}

/// A device whose source port changes mid-stream (its NAT rebinds; it
/// starts with an Update, TS 1.1 Transport §6.5): no re-registration, no lost
/// or duplicated points, and the next status event carries the new address.
#[test]
fn port_change_mid_stream_keeps_publishing() {
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, PROVISIONING, "");
    let tele = reader(&broker, &["telemetry.raw.acme"]);
    let status = reader(&broker, &["device.status.acme"]);
    let mut d = Device::new("urn:imei:123", gw.coap, 7);
    assert_eq!(d.register(4), Code::CREATED);
    let mut acked = Vec::new();
    for round in 0..4 {
        for k in 0..10 {
            let v = 1000.0 + (round * 10 + k) as f64;
            d.sim.values.insert(rp("/3303/0/5700"), v);
            if d.notify_con("/3303/0/5700", Duration::from_secs(5)) == Some(MsgType::Ack) {
                acked.push(v);
            }
        }
        if round < 3 {
            d.new_port();
            let u = d.sim.update(None, false);
            assert_eq!(d.request(&u, Duration::from_secs(10)), Some(Code::CHANGED));
        }
    }
    assert_eq!(acked.len(), 40, "every notification acknowledged");
    assert_eq!(gw.metric("registrations"), 1);
    broker.write_marker("telemetry.raw.acme");
    let pts = read_matching(&tele, 44, Duration::from_secs(20), |_| true);
    let mut all = pts;
    all.extend(tele.read(usize::MAX, Duration::from_secs(2)));
    let counts = temperatures(&all);
    for v in &acked {
        assert_eq!(counts.get(&format!("{v}")), Some(&1), "value {v}");
    }
    assert_eq!(counts.len(), 40);
    let mut st = read_matching(&status, 4, Duration::from_secs(20), |_| true);
    st.sort_by_key(|s| s.value["registration"]["seq"].as_u64().unwrap());
    assert_eq!(
        st.last().unwrap().value["registration"]["address"],
        d.local_addr().to_string()
    );
}

/// One endpoint registering from 1,000 source ports in a burst, spread over
/// both shards: every Register gets 2.01, exactly one registration survives
/// (the newest), and exactly one of the 1,000 locations answers Update with
/// 2.04; the others get 4.04 (the client registers again).
#[test]
fn thousand_port_register_burst_keeps_exactly_one() {
    raise_nofile();
    let broker = Broker::memory();
    let gw = Gateway::start(&broker, 2, PROVISIONING, "");
    let socks: Vec<UdpSocket> = (0..1000)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let mut sims: Vec<_> = (0..1000)
        .map(|i| corem_lwm2m::testkit::sim::SimDevice::new("urn:imei:123", i as u16))
        .collect();
    let regs: Vec<Vec<u8>> = sims.iter_mut().map(|s| s.register()).collect();
    for (s, r) in socks.iter().zip(&regs) {
        s.send_to(r, gw.coap).unwrap();
    }
    // Collect the answers (retransmitting, as clients would, until each has
    // one).
    let mut answered = vec![false; 1000];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = [0u8; 2048];
    let mut last_retx = Instant::now();
    while answered.iter().any(|a| !a) && Instant::now() < deadline {
        let mut got = false;
        for (i, s) in socks.iter().enumerate() {
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                got = true;
                let Ok(m) = Message::decode(&buf[..n]) else {
                    continue;
                };
                if m.code.is_request() {
                    // Observe etc.: answer like a device.
                    for r in sims[i].handle(&buf[..n]).replies {
                        let _ = s.send_to(&r, gw.coap);
                    }
                    continue;
                }
                if m.mtype == MsgType::Ack && !m.code.is_empty() {
                    let ev = sims[i].handle(&buf[..n]);
                    if ev.response.is_some() {
                        assert_eq!(m.code, Code::CREATED, "register {i}");
                        answered[i] = true;
                    }
                }
            }
        }
        if last_retx.elapsed() > Duration::from_secs(2) {
            last_retx = Instant::now();
            for (i, s) in socks.iter().enumerate() {
                if !answered[i] {
                    let _ = s.send_to(&regs[i], gw.coap);
                }
            }
        }
        if !got {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(answered.iter().all(|a| *a), "every Register answered");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(gw.metric("registrations"), 1000);
    let per_shard = gw.metric_by_shard("registrations");
    assert!(
        per_shard.iter().all(|n| *n > 0),
        "both shards took registrations: {per_shard:?}"
    );
    assert_eq!(
        gw.metric("registrations_active"),
        1,
        "exactly one live registration"
    );
    // Each location's Update, from its own port.
    let mut ok = 0;
    for (i, s) in socks.iter().enumerate() {
        let mut dev = Device {
            sim: std::mem::replace(
                &mut sims[i],
                corem_lwm2m::testkit::sim::SimDevice::new("x", 0),
            ),
            sock: s.try_clone().unwrap(),
            server: gw.coap,
            dtls: None,
            requests_seen: Vec::new(),
            loss_every: None,
            sent_n: Default::default(),
            recv_n: Default::default(),
        };
        dev.sock.set_nonblocking(false).unwrap();
        dev.sock
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let u = dev.sim.update(None, false);
        match dev.request(&u, Duration::from_secs(10)) {
            Some(Code::CHANGED) => ok += 1,
            Some(Code::NOT_FOUND) => {}
            other => panic!("update {i}: {other:?}"),
        }
    }
    assert_eq!(ok, 1, "exactly one location is live");
}

/// SIGTERM and start again: devices do not notice. Updates get 2.04 and a
/// notification on an existing observation produces a TelemetryPoint, with
/// no re-registration.
#[test]
fn restart_is_invisible_to_devices() {
    let broker = Broker::memory();
    let mut gw = Gateway::start(&broker, 2, PROVISIONING, "");
    let tele = reader(&broker, &["telemetry.raw.acme"]);
    let mut devs = [Device::new("urn:imei:123", gw.coap, 10)];
    let mut env = Device::new("urn:imei:env", gw.coap, 20);
    assert_eq!(devs[0].register(4), Code::CREATED);
    assert_eq!(env.register(1), Code::CREATED);
    assert_eq!(gw.stop(), Some(0));
    assert!(gw.log_contains("registration snapshot written"));
    gw.spawn();
    assert!(gw.log_contains("registrations restored from snapshot"));
    for d in devs.iter_mut().chain(std::iter::once(&mut env)) {
        let u = d.sim.update(None, false);
        assert_eq!(d.request(&u, Duration::from_secs(10)), Some(Code::CHANGED));
    }
    devs[0].sim.values.insert(rp("/3303/0/5700"), 4321.0);
    assert_eq!(
        devs[0].notify_con("/3303/0/5700", Duration::from_secs(5)),
        Some(MsgType::Ack)
    );
    env.sim.values.insert(rp("/3303/0/5700"), 5432.0);
    assert_eq!(
        env.notify_con("/3303/0", Duration::from_secs(5)),
        Some(MsgType::Ack)
    );
    assert_eq!(gw.metric("registrations"), 0, "nobody registered again");
    assert_eq!(gw.metric("registrations_active"), 2);
    broker.write_marker("telemetry.raw.acme");
    let pts = read_matching(&tele, 7, Duration::from_secs(20), |_| true);
    let counts = temperatures(&pts);
    assert_eq!(counts.get("4321"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("5432"), Some(&1), "{counts:?}");
    // SIGKILL after the periodic snapshot (every second here) caught the
    // Updates above: only what changed since then is lost, so these
    // registrations survive too.
    std::thread::sleep(Duration::from_millis(2500));
    gw.kill();
    gw.spawn();
    for d in devs.iter_mut().chain(std::iter::once(&mut env)) {
        let u = d.sim.update(None, false);
        assert_eq!(
            d.request(&u, Duration::from_secs(10)),
            Some(Code::CHANGED),
            "after SIGKILL"
        );
    }
    assert_eq!(gw.metric("registrations"), 0, "nobody registered again");
    assert_eq!(gw.stop(), Some(0));
}

/// SIGKILL under CON load: every notification the gateway acknowledged is in
/// the topic (acknowledged only after the broker confirmed it), and an
/// endpoint PUT answered just before the kill survives (write-ahead log).
#[test]
fn sigkill_under_con_load_loses_nothing_acknowledged() {
    let broker = Broker::memory();
    let mut prov = String::new();
    for i in 0..4 {
        prov.push_str(&format!(
            "[[endpoint]]\nendpoint = \"urn:kill:{i}\"\ndevice_id = \"kill-{i}\"\ntenant_id = \"kill\"\n"
        ));
    }
    let mut gw = Gateway::start(
        &broker,
        2,
        &prov,
        "[directory]\nsnapshot_interval_s = 3600\n",
    );
    let tele = reader(&broker, &["telemetry.raw.kill"]);
    let acked: Arc<Mutex<Vec<f64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let coap = gw.coap;
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut d = Device::new(&format!("urn:kill:{i}"), coap, 50 + i as u16);
                assert_eq!(d.register(4), Code::CREATED);
                let mut k = 0;
                while !stop.load(Ordering::Acquire) {
                    k += 1;
                    let v = 100_000.0 * (i + 1) as f64 + k as f64;
                    d.sim.values.insert(rp("/3303/0/5700"), v);
                    if d.notify_con("/3303/0/5700", Duration::from_millis(1500))
                        == Some(MsgType::Ack)
                    {
                        acked.lock().unwrap().push(v);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let (code, _) = http(
        gw.admin,
        "PUT",
        "/v1/endpoints/urn:kill:late",
        r#"{"device_id":"late","tenant_id":"kill"}"#,
    )
    .unwrap();
    assert_eq!(code, 201);
    gw.kill();
    stop.store(true, Ordering::Release);
    for t in threads {
        let _ = t.join();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 100, "load: {} acknowledged", acked.len());
    broker.write_marker("telemetry.raw.kill");
    let mut all = read_matching(&tele, acked.len() + 16, Duration::from_secs(30), |_| true);
    all.extend(tele.read(usize::MAX, Duration::from_secs(2)));
    let counts = temperatures(&all);
    let missing: Vec<&f64> = acked
        .iter()
        .filter(|v| !counts.contains_key(&format!("{v}")))
        .collect();
    eprintln!(
        "SIGKILL: {} acknowledged, {} records read, {} acknowledged missing",
        acked.len(),
        all.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    gw.spawn();
    assert_eq!(
        http(gw.admin, "GET", "/v1/endpoints/urn:kill:late", "")
            .unwrap()
            .0,
        200,
        "the answered PUT survived the kill"
    );
    assert_eq!(gw.stop(), Some(0));
}
