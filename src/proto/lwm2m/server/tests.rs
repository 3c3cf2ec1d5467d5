//! Deterministic in-memory harness: the engine, a [`MemorySink`], simulated
//! devices and fake time. No sockets, no threads.

use super::*;
use crate::control::directory::EndpointEntry;
use crate::proto::coap::Header;
use crate::sink::MemorySink;
use crate::testkit::sim::SimDevice;

struct Harness {
    engine: Engine,
    sink: MemorySink,
    t0: Instant,
    now: Duration,
}

const WALL0: i64 = 1_800_000_000_000;

fn entry(dev: &str) -> EndpointEntry {
    EndpointEntry {
        device_id: dev.into(),
        tenant_id: "acme".into(),
        profile: "default".into(),
        psk_identity: None,
        psk_key_hex: None,
    }
}

impl Harness {
    fn new() -> Harness {
        Self::with_shards(1, 0)
    }
    fn with_shards(shards: usize, shard: usize) -> Harness {
        let d = Directory::default();
        d.upsert("urn:imei:123", entry("dev-123")).unwrap();
        d.upsert("urn:imei:456", entry("dev-456")).unwrap();
        let profiles = Profiles::from_profiles(vec![]);
        Harness {
            engine: Engine::new(
                shard,
                shards,
                CoapConfig::default(),
                Arc::new(d),
                Arc::new(profiles),
                Arc::new(ShardMetrics::default()),
            ),
            sink: MemorySink::default(),
            t0: Instant::now(),
            now: Duration::ZERO,
        }
    }
    fn now(&self) -> Now {
        Now {
            instant: self.t0 + self.now,
            wall_ms: WALL0 + self.now.as_millis() as i64,
        }
    }
    fn advance(&mut self, d: Duration) {
        self.now += d;
        let now = self.now();
        self.engine.handle_timeout(now, &mut self.sink);
    }
    /// Feeds a datagram, returns what the engine sent to `peer`.
    fn input(&mut self, peer: SocketAddr, data: &[u8]) -> Vec<Vec<u8>> {
        let now = self.now();
        self.engine.handle_datagram(now, peer, data, &mut self.sink);
        self.take(peer)
    }
    fn take(&mut self, peer: SocketAddr) -> Vec<Vec<u8>> {
        let out: Vec<Vec<u8>> = self
            .engine
            .transmits()
            .filter(|(a, _)| *a == peer)
            .map(|(_, d)| d.to_vec())
            .collect();
        self.engine.clear_transmits();
        out
    }
    /// Delivers engine output to the device and device replies to the engine
    /// until quiet.
    fn pump(
        &mut self,
        peer: SocketAddr,
        dev: &mut SimDevice,
        mut inbound: Vec<Vec<u8>>,
    ) -> SimEvents {
        let mut all = SimEvents::default();
        for _ in 0..20 {
            if inbound.is_empty() {
                break;
            }
            let mut next = Vec::new();
            for d in inbound {
                let ev = dev.handle(&d);
                all.registered |= ev.registered;
                all.deregistered |= ev.deregistered;
                if ev.response.is_some() {
                    all.response = ev.response;
                }
                all.observed.extend(ev.observed);
                for r in ev.replies {
                    next.extend(self.input(peer, &r));
                }
            }
            inbound = next;
        }
        all
    }
    fn register(&mut self, peer: SocketAddr, dev: &mut SimDevice) -> SimEvents {
        let r = dev.register();
        let out = self.input(peer, &r);
        self.pump(peer, dev, out)
    }
    fn metric(&self, name: &str) -> i64 {
        self.engine
            .metrics()
            .values()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or(-1)
    }
}

use crate::testkit::sim::SimEvents;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn code_of(d: &[u8]) -> Code {
    Message::decode(d).unwrap().code
}

#[test]
fn register_publishes_online_and_observes_profile_paths() {
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    let ev = h.register(addr(1000), &mut dev);
    assert!(ev.registered);
    assert_eq!(dev.location.as_ref().unwrap().len(), 16);
    assert_eq!(h.sink.status.len(), 1);
    let s = &h.sink.status[0];
    assert_eq!(s["status"], "online");
    assert_eq!(s["reason"], "registered");
    assert_eq!(s["device_id"], "dev-123");
    assert_eq!(s["tenant_id"], "acme");
    assert_eq!(s["last_seen"], WALL0);
    assert_eq!(s["registration"]["lifetime_s"], 300);
    assert_eq!(s["registration"]["lwm2m_version"], "1.1");
    // The default profile observes the four brief resources; all present.
    assert_eq!(ev.observed.len(), 4);
    assert_eq!(h.engine.observation_count(), 4);
    // The initial Observe responses carry values: four points.
    assert_eq!(h.sink.telemetry.len(), 4);
    let temp = h
        .sink
        .telemetry
        .iter()
        .find(|p| p["numeric_values"]["temperature"].is_number())
        .unwrap();
    assert_eq!(temp["numeric_values"]["temperature"], 22.5);
    assert_eq!(temp["endpoint"], "urn:imei:123");
}

#[test]
fn notification_becomes_telemetry_point_con_acked_once() {
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.sink.telemetry.clear();
    dev.values
        .insert(ResourcePath::parse("/3303/0/5700").unwrap(), 23.25);
    let (mid, n) = dev.notify("/3303/0/5700", true).unwrap();
    let out = h.input(addr(1000), &n);
    assert_eq!(out.len(), 1);
    let ack = Message::decode(&out[0]).unwrap();
    assert_eq!(
        (ack.mtype, ack.code, ack.message_id),
        (MsgType::Ack, Code::EMPTY, mid)
    );
    assert_eq!(h.sink.telemetry.len(), 1);
    assert_eq!(h.sink.telemetry[0]["numeric_values"]["temperature"], 23.25);
    assert_eq!(h.sink.telemetry[0]["ts"], WALL0);
    // The retransmitted duplicate is ACKed again but not published again.
    let out = h.input(addr(1000), &n);
    assert_eq!(code_of(&out[0]), Code::EMPTY);
    assert_eq!(h.sink.telemetry.len(), 1);
    assert_eq!(h.metric("duplicates"), 1);
}

#[test]
fn stale_notifications_are_discarded() {
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.sink.telemetry.clear();
    let (_, n1) = dev.notify("/3303/0/5700", false).unwrap();
    let (_, n2) = dev.notify("/3303/0/5700", false).unwrap();
    h.input(addr(1000), &n2);
    h.input(addr(1000), &n1);
    assert_eq!(h.sink.telemetry.len(), 1);
    assert_eq!(h.metric("notifications_stale"), 1);
}

#[test]
fn register_errors() {
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:999", 1);
    let out = h.input(addr(1), &dev.register());
    assert_eq!(code_of(&out[0]), Code::FORBIDDEN);
    assert!(h.sink.status.is_empty());
    assert_eq!(h.metric("register_rejected_unknown_endpoint"), 1);

    // Missing ep → 4.00.
    let mut d2 = SimDevice::new("", 2);
    let out = h.input(addr(2), &d2.register());
    assert_eq!(code_of(&out[0]), Code::BAD_REQUEST);

    // Update / De-register of an unknown location → 4.04.
    let mut d3 = SimDevice::new("urn:imei:123", 3);
    d3.location = Some("0000000000000000".into());
    assert_eq!(
        code_of(&h.input(addr(3), &d3.update(None, false))[0]),
        Code::NOT_FOUND
    );
    assert_eq!(
        code_of(&h.input(addr(3), &d3.deregister())[0]),
        Code::NOT_FOUND
    );
}

#[test]
fn update_and_deregister() {
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.advance(Duration::from_secs(100));
    let out = h.input(addr(1000), &dev.update(Some(600), false));
    assert_eq!(code_of(&out[0]), Code::CHANGED);
    let s = h.sink.status.last().unwrap();
    assert_eq!(s["reason"], "updated");
    assert_eq!(s["registration"]["lifetime_s"], 600);
    assert_eq!(s["last_seen"], WALL0 + 100_000);
    // Not expired at the old deadline (300 s after register).
    h.advance(Duration::from_secs(250));
    assert_eq!(h.engine.registration_count(), 1);
    let (late_mid, late) = dev.notify("/3303/0/5700", true).unwrap();
    let out = h.input(addr(1000), &dev.deregister());
    assert_eq!(code_of(&out[0]), Code::DELETED);
    let s = h.sink.status.last().unwrap();
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("offline"), Some("deregistered"))
    );
    assert_eq!(h.engine.registration_count(), 0);
    assert_eq!(h.engine.observation_count(), 0);
    // A late notification on the dead observation (built before the
    // De-register completed on the device) is rejected with RST.
    let out = h.input(addr(1000), &late);
    assert_eq!(out.len(), 1);
    let m = Message::decode(&out[0]).unwrap();
    assert_eq!((m.mtype, m.message_id), (MsgType::Rst, late_mid));
}

#[test]
fn lifetime_expiry_publishes_offline_expired() {
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    dev.lifetime_s = 30;
    h.register(addr(1000), &mut dev);
    h.advance(Duration::from_secs(29));
    assert_eq!(h.engine.registration_count(), 1);
    h.advance(Duration::from_secs(2));
    assert_eq!(h.engine.registration_count(), 0);
    let s = h.sink.status.last().unwrap();
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("offline"), Some("expired"))
    );
    assert_eq!(h.metric("expirations"), 1);
}

#[test]
fn reregistration_replaces_old_without_duplicate_observations() {
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    let first = dev.location.clone();
    // Device reboots: same endpoint, new port, registers again.
    let mut dev2 = SimDevice::new("urn:imei:123", 2);
    h.register(addr(1001), &mut dev2);
    assert_ne!(first, dev2.location);
    assert_eq!(h.engine.registration_count(), 1);
    assert_eq!(h.engine.observation_count(), 4);
    assert_eq!(h.metric("registrations_replaced"), 1);
    // Old location is gone.
    assert_eq!(
        code_of(&h.input(addr(1000), &dev.update(None, false))[0]),
        Code::NOT_FOUND
    );
}

#[test]
fn ping_malformed_and_critical_options() {
    let mut h = Harness::new();
    // Empty CON → RST with the same MID.
    let ping = MessageBuilder::empty(MsgType::Con, 0x1234).to_vec();
    let out = h.input(addr(5), &ping);
    assert_eq!(Header::peek(&out[0]).unwrap().mtype, MsgType::Rst);
    assert_eq!(Header::peek(&out[0]).unwrap().message_id, 0x1234);
    // Malformed CON (reserved token length) → RST; malformed NON → nothing.
    assert_eq!(h.input(addr(5), &[0x49, 1, 0, 7]).len(), 1);
    assert_eq!(h.input(addr(5), &[0x59, 1, 0, 7]).len(), 0);
    assert_eq!(h.input(addr(5), &[1, 2]).len(), 0);
    assert_eq!(h.metric("malformed"), 3);
    // Unknown critical option (9) in a request → 4.02.
    let m = MessageBuilder::request(Code::POST, true)
        .mid(9)
        .token(&[1])
        .path("rd")
        .option(9, b"x")
        .to_vec();
    assert_eq!(code_of(&h.input(addr(5), &m)[0]), Code::BAD_OPTION);
    // Unknown path → 4.04.
    let m = MessageBuilder::request(Code::GET, true)
        .mid(10)
        .path("nope")
        .to_vec();
    assert_eq!(code_of(&h.input(addr(5), &m)[0]), Code::NOT_FOUND);
}

#[test]
fn duplicate_register_is_answered_from_cache_and_processed_once() {
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    let r = dev.register();
    let a = h.input(addr(1000), &r);
    let b = h.input(addr(1000), &r);
    assert_eq!(a[0], b[0], "same response bytes");
    assert_eq!(h.metric("registrations"), 1);
    assert_eq!(h.sink.status.len(), 1);
}

#[test]
fn backpressure_send_gets_503_and_con_notification_is_not_acked() {
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.sink.telemetry.clear();
    h.sink.capacity = Some(0);
    // CON notification: no ACK, not recorded as duplicate.
    let (_, n) = dev.notify("/3303/0/5700", true).unwrap();
    assert!(h.input(addr(1000), &n).is_empty());
    assert_eq!(h.metric("notifications_deferred_busy"), 1);
    // NON notification: dropped and counted.
    let (_, nn) = dev.notify("/3304/0/5700", false).unwrap();
    assert!(h.input(addr(1000), &nn).is_empty());
    assert_eq!(h.metric("notifications_dropped_busy"), 1);
    // Send: 5.03 with Max-Age.
    let s = dev.send(&["/3303/0/5700"], Some(1_700_000_000.0), false);
    let out = h.input(addr(1000), &s);
    let m = Message::decode(&out[0]).unwrap();
    assert_eq!(m.code, Code::SERVICE_UNAVAILABLE);
    assert_eq!(m.max_age(), Some(5));
    // Broker back: the retransmitted notification is processed and ACKed.
    h.sink.capacity = None;
    let out = h.input(addr(1000), &n);
    assert_eq!(code_of(&out[0]), Code::EMPTY);
    assert_eq!(h.sink.telemetry.len(), 1);
    // The device retries Send with a new MID: accepted, SenML time kept.
    let s = dev.send(&["/3303/0/5700"], Some(1_700_000_000.0), false);
    assert_eq!(code_of(&h.input(addr(1000), &s)[0]), Code::CHANGED);
    let p = h.sink.telemetry.last().unwrap();
    assert_eq!(p["ts"], 1_700_000_000_000i64);
    assert_eq!(p["source"]["operation"], "send");
}

#[test]
fn send_senml_cbor_and_unregistered_send() {
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    let s = dev.send(&["/3303/0/5700"], None, true);
    assert_eq!(code_of(&h.input(addr(1000), &s)[0]), Code::NOT_FOUND);
    h.register(addr(1000), &mut dev);
    h.sink.telemetry.clear();
    let s = dev.send(&["/3303/0/5700", "/3/0/9"], Some(1_700_000_123.0), true);
    assert_eq!(code_of(&h.input(addr(1000), &s)[0]), Code::CHANGED);
    assert_eq!(h.sink.telemetry.len(), 1);
    let p = &h.sink.telemetry[0];
    assert_eq!(p["numeric_values"]["temperature"], 22.5);
    assert_eq!(p["numeric_values"]["battery_level"], 87.0);
    assert_eq!(p["ts"], 1_700_000_123_000i64);
}

#[test]
fn every_content_format_maps_to_metrics() {
    for cf in [
        content::CF_TEXT,
        content::CF_OPAQUE,
        content::CF_CBOR,
        content::CF_TLV,
        content::CF_SENML_JSON,
        content::CF_SENML_CBOR,
        content::CF_LWM2M_JSON,
    ] {
        let mut h = Harness::new();
        let mut dev = SimDevice::new("urn:imei:123", 1);
        dev.format = cf;
        h.register(addr(1000), &mut dev);
        h.sink.telemetry.clear();
        dev.values
            .insert(ResourcePath::parse("/3303/0/5700").unwrap(), -7.5);
        dev.values
            .insert(ResourcePath::parse("/3/0/9").unwrap(), 42.0);
        let (_, n) = dev.notify("/3303/0/5700", false).unwrap();
        h.input(addr(1000), &n);
        let (_, n) = dev.notify("/3/0/9", false).unwrap();
        h.input(addr(1000), &n);
        assert_eq!(h.sink.telemetry.len(), 2, "cf {cf}");
        assert_eq!(
            h.sink.telemetry[0]["numeric_values"]["temperature"], -7.5,
            "cf {cf}"
        );
        assert_eq!(h.sink.telemetry[0]["source"]["content_format"], cf);
        assert_eq!(
            h.sink.telemetry[1]["numeric_values"]["battery_level"], 42.0,
            "cf {cf}"
        );
    }
}

#[test]
fn observe_retransmits_then_times_out() {
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    let out = h.input(addr(1000), &dev.register());
    // Registration reply + four Observe requests; the device never answers them.
    assert_eq!(out.len(), 5);
    let mut retx = 0;
    for _ in 0..200 {
        h.advance(Duration::from_secs(1));
        retx += h.take(addr(1000)).len();
    }
    assert_eq!(retx, 16, "4 requests x MAX_RETRANSMIT 4");
    assert_eq!(h.metric("request_timeouts"), 4);
    assert_eq!(h.engine.observation_count(), 0);
}

#[test]
fn takeover_from_another_shard_drops_registration_silently() {
    let mut h = Harness::with_shards(2, 0);
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    assert!(matches!(
        h.engine.poll_broadcast(),
        Some(ShardMsg::Takeover { .. })
    ));
    let statuses = h.sink.status.len();
    h.engine.handle_control(ShardMsg::Takeover {
        endpoint: "urn:imei:123".into(),
        shard: 1,
    });
    assert_eq!(h.engine.registration_count(), 0);
    assert_eq!(
        h.sink.status.len(),
        statuses,
        "no offline event: it is online elsewhere"
    );
}

#[test]
fn random_datagrams_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut h = Harness::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let valid = dev.notify("/3303/0/5700", true).unwrap().1;
    let before = h.metric("datagrams_rx");
    for i in 0..10_000 {
        let d: Vec<u8> = if i % 2 == 0 {
            let n = rng.gen_range(0..80);
            (0..n).map(|_| rng.gen()).collect()
        } else {
            // Mutate a valid notification / register.
            let mut v = if i % 4 == 1 {
                valid.clone()
            } else {
                dev.register()
            };
            for _ in 0..rng.gen_range(1..4) {
                let k = rng.gen_range(0..v.len());
                v[k] = rng.gen();
            }
            v
        };
        h.input(addr(2000 + (i % 50) as u16), &d);
    }
    assert_eq!(h.metric("datagrams_rx"), before + 10_000);
    assert!(h.metric("malformed") > 0);
}
