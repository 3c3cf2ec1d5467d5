//! The server through the deterministic in-memory harness
//! ([`crate::testkit::harness`]): shards, simulated devices, fake time. No
//! sockets, no threads.

use super::*;
use crate::testkit::harness::{Gateway, Out, SimClient, World, WALL0};
use crate::testkit::sim::{SimDevice, SimEvents};
use std::net::SocketAddr;

struct H {
    gw: Gateway,
    t0: Instant,
    now: Duration,
    /// Datagrams sent to peers other than the one a call asked about.
    other: Out,
}

impl H {
    fn new() -> H {
        Self::shards(1)
    }
    fn shards(n: usize) -> H {
        Self::with(n, ServerConfig::default())
    }
    fn with(n: usize, cfg: ServerConfig) -> H {
        let mut gw = Gateway::new(n, cfg);
        gw.provision("urn:imei:123", "dev-123");
        gw.provision("urn:imei:456", "dev-456");
        H {
            gw,
            t0: Instant::now(),
            now: Duration::ZERO,
            other: Out::new(),
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
        let out = self.gw.timeout(self.now());
        self.other.extend(out);
    }
    fn split(&mut self, peer: SocketAddr, out: Out) -> Vec<Vec<u8>> {
        let mut mine = Vec::new();
        for (a, d) in out {
            if a == peer {
                mine.push(d);
            } else {
                self.other.push((a, d));
            }
        }
        mine
    }
    /// Feeds a datagram, returns what the gateway sent to `peer`.
    fn input(&mut self, peer: SocketAddr, data: &[u8]) -> Vec<Vec<u8>> {
        let out = self.gw.datagram(self.now(), peer, data);
        self.split(peer, out)
    }
    fn take(&mut self, peer: SocketAddr) -> Vec<Vec<u8>> {
        let out = std::mem::take(&mut self.other);
        self.split(peer, out)
    }
    /// Delivers gateway output to the device and device replies to the
    /// gateway until quiet.
    fn pump(
        &mut self,
        peer: SocketAddr,
        dev: &mut SimDevice,
        mut inbound: Vec<Vec<u8>>,
    ) -> SimEvents {
        let mut all = SimEvents::default();
        // Block-wise transfers take a round per block.
        for _ in 0..1000 {
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
                all.executed.extend(ev.executed);
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
        self.gw.metric(name)
    }
    fn telemetry(&self) -> Vec<serde_json::Value> {
        self.gw.telemetry().into_iter().cloned().collect()
    }
    fn status(&self) -> Vec<serde_json::Value> {
        self.gw.status().into_iter().cloned().collect()
    }
    fn clear_telemetry(&mut self) {
        for s in &mut self.gw.sinks {
            s.telemetry.clear();
            s.telemetry_order.clear();
        }
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn msg(d: &[u8]) -> Message<'_> {
    Message::decode(d).unwrap()
}

fn code_of(d: &[u8]) -> Code {
    msg(d).code
}

fn rp(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap()
}

/// A port the harness's kernel routes to `shard`.
fn port_on(h: &H, shard: usize, from: u16) -> u16 {
    (from..).find(|p| h.gw.shard_of(addr(*p)) == shard).unwrap()
}

#[test]
fn register_publishes_online_and_observes_profile_paths() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    let ev = h.register(addr(1000), &mut dev);
    assert!(ev.registered);
    assert_eq!(dev.location.as_ref().unwrap().len(), 16);
    let st = h.status();
    assert_eq!(st.len(), 1);
    let s = &st[0];
    assert_eq!(s["status"], "online");
    assert_eq!(s["reason"], "registered");
    assert_eq!(s["device_id"], "dev-123");
    assert_eq!(s["tenant_id"], "acme");
    assert_eq!(s["last_seen"], WALL0);
    assert_eq!(s["registration"]["lifetime_s"], 300);
    assert_eq!(s["registration"]["lwm2m_version"], "1.1");
    assert_eq!(s["registration"]["address"], "127.0.0.1:1000");
    // The default profile observes the four brief resources; all present.
    assert_eq!(ev.observed.len(), 4);
    assert_eq!(h.gw.observations(), 4);
    // The initial Observe responses carry values: four points.
    let t = h.telemetry();
    assert_eq!(t.len(), 4);
    let temp = t
        .iter()
        .find(|p| p["numeric_values"]["temperature"].is_number())
        .unwrap();
    assert_eq!(temp["numeric_values"]["temperature"], 22.5);
    assert_eq!(temp["endpoint"], "urn:imei:123");
    // Integers stay integers: battery level 87 is published as 87, not 87.0.
    let bat = t
        .iter()
        .find(|p| p["numeric_values"]["battery_level"].is_number())
        .unwrap();
    assert!(bat["numeric_values"]["battery_level"].is_i64(), "{bat}");
}

#[test]
fn one_request_at_a_time_per_device() {
    // RFC 7252 §4.7 NSTART = 1: Write-Attributes and the Observes go one
    // after the other, each after the previous one was answered.
    let mut h = H::new();
    let mut profiles = h.gw.profiles.clone();
    let mut p = (*profiles["default"]).clone();
    for o in &mut p.observe {
        o.1 = Some(5);
    }
    profiles.insert("default".into(), Arc::new(p));
    h.gw.profiles = profiles;
    let mut dev = SimDevice::new("urn:imei:123", 1);
    let out = h.input(addr(1000), &dev.register());
    assert_eq!(out.len(), 2, "2.01 and exactly one request");
    let mut seen = Vec::new();
    let mut inbound: Vec<Vec<u8>> = out;
    for _ in 0..20 {
        let mut next = Vec::new();
        let requests: Vec<&Vec<u8>> = inbound
            .iter()
            .filter(|d| msg(d).code.is_request())
            .collect();
        assert!(
            requests.len() <= 1,
            "never two requests outstanding: {}",
            requests.len()
        );
        for d in &inbound {
            let m = msg(d);
            if m.code.is_request() {
                seen.push((m.code, m.observe()));
            }
            for r in dev.handle(d).replies {
                next.extend(h.input(addr(1000), &r));
            }
        }
        inbound = next;
    }
    // 4 x (Write-Attributes PUT, then GET Observe=0).
    assert_eq!(seen.len(), 8, "{seen:?}");
    assert!(seen
        .chunks(2)
        .all(|c| c[0] == (Code::PUT, None) && c[1] == (Code::GET, Some(0))));
    assert!(h.metric("requests_queued") >= 7);
}

#[test]
fn notification_becomes_telemetry_point_con_acked_once() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.clear_telemetry();
    dev.values.insert(rp("/3303/0/5700"), 23.25);
    let (mid, n) = dev.notify("/3303/0/5700", true).unwrap();
    let out = h.input(addr(1000), &n);
    assert_eq!(out.len(), 1);
    let ack = msg(&out[0]);
    assert_eq!(
        (ack.mtype, ack.code, ack.message_id),
        (MsgType::Ack, Code::EMPTY, mid)
    );
    let t = h.telemetry();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0]["numeric_values"]["temperature"], 23.25);
    assert_eq!(t[0]["ts"], WALL0);
    assert_eq!(t[0]["source"]["observe_seq"], 2);
    // The retransmitted duplicate is ACKed again but not published again.
    let out = h.input(addr(1000), &n);
    assert_eq!(code_of(&out[0]), Code::EMPTY);
    assert_eq!(h.telemetry().len(), 1);
    assert_eq!(h.metric("duplicates"), 1);
}

#[test]
fn ack_waits_for_the_broker() {
    let mut h = H::new();
    h.gw.auto_deliver = false;
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.gw.deliver(h.now());
    h.clear_telemetry();
    let (mid, n) = dev.notify("/3303/0/5700", true).unwrap();
    assert!(
        h.input(addr(1000), &n).is_empty(),
        "not acknowledged before delivery"
    );
    assert_eq!(h.telemetry().len(), 1, "published (queued)");
    // The device retransmits meanwhile: silence, not a second record.
    assert!(h.input(addr(1000), &n).is_empty());
    assert_eq!(h.telemetry().len(), 1);
    let out = h.gw.deliver(h.now());
    let out = h.split(addr(1000), out);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (msg(&out[0]).mtype, msg(&out[0]).message_id),
        (MsgType::Ack, mid)
    );
    // Send: its 2.04 also waits.
    let s = dev.send(&["/3303/0/5700"], None, false);
    assert!(h.input(addr(1000), &s).is_empty());
    let out = h.gw.deliver(h.now());
    let out = h.split(addr(1000), out);
    assert_eq!(code_of(&out[0]), Code::CHANGED);
    // A failed delivery withholds the ACK and forgets the message: the
    // retransmission is processed (and published) again.
    let (_, n2) = dev.notify("/3303/0/5700", true).unwrap();
    assert!(h.input(addr(1000), &n2).is_empty());
    let tags = h.gw.sinks[0].deliver_all();
    let now = h.now();
    for t in tags {
        h.gw.shards[0].handle_delivery(now, t, false);
    }
    assert_eq!(h.metric("acks_withheld_delivery_failed"), 1);
    assert!(h.input(addr(1000), &n2).is_empty());
    let out = h.gw.deliver(h.now());
    assert_eq!(
        h.split(addr(1000), out).len(),
        1,
        "acknowledged after the retry was delivered"
    );
}

#[test]
fn ack_when_queued_is_immediate() {
    let cfg = ServerConfig {
        ack_policy: AckPolicy::Queued,
        ..ServerConfig::default()
    };
    let mut h = H::with(1, cfg);
    h.gw.auto_deliver = false;
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    let (_, n) = dev.notify("/3303/0/5700", true).unwrap();
    assert_eq!(h.input(addr(1000), &n).len(), 1);
}

#[test]
fn notifications_are_published_once_in_any_order() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.clear_telemetry();
    let (_, n1) = dev.notify("/3303/0/5700", false).unwrap();
    let (_, n2) = dev.notify("/3303/0/5700", false).unwrap();
    h.input(addr(1000), &n2);
    h.input(addr(1000), &n1);
    assert_eq!(
        h.telemetry().len(),
        2,
        "a reordered sample is still a sample"
    );
    assert_eq!(h.metric("notifications_reordered"), 1);
    // The same notification again under a new MID (as from a client that
    // lost track): its Observe number was published, so it is not again.
    let mut again = n1.clone();
    again[2] ^= 0x55;
    h.input(addr(1000), &again);
    assert_eq!(h.telemetry().len(), 2);
    assert_eq!(h.metric("notifications_duplicate"), 1);
}

#[test]
fn register_errors_and_no_amplification() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:999", 1);
    let r = dev.register();
    let out = h.input(addr(1), &r);
    assert_eq!(code_of(&out[0]), Code::FORBIDDEN);
    assert!(
        msg(&out[0]).payload.is_empty(),
        "no diagnostic to an unregistered sender"
    );
    assert!(h.status().is_empty());
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

    // The smallest requests that get an error: 4 bytes in, never more out.
    for (code, path) in [
        (Code::GET, ""),
        (Code::GET, "x"),
        (Code::PUT, "rd"),
        (Code::POST, "dp"),
    ] {
        for tkl in [0usize, 8] {
            let tok = [7u8; 8];
            let req = MessageBuilder::request(code, true)
                .mid(77)
                .token(&tok[..tkl])
                .path(path)
                .to_vec();
            let out = h.input(addr(9), &req);
            assert_eq!(out.len(), 1);
            assert!(
                out[0].len() <= req.len(),
                "{} bytes for {} ({code} /{path})",
                out[0].len(),
                req.len()
            );
        }
    }
}

#[test]
fn update_and_deregister() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.advance(Duration::from_secs(100));
    let out = h.input(addr(1000), &dev.update(Some(600), false));
    assert_eq!(code_of(&out[0]), Code::CHANGED);
    let st = h.status();
    let s = st.last().unwrap();
    assert_eq!(s["reason"], "updated");
    assert_eq!(s["registration"]["lifetime_s"], 600);
    assert_eq!(s["last_seen"], WALL0 + 100_000);
    // Not expired at the old deadline (300 s after register).
    h.advance(Duration::from_secs(250));
    assert_eq!(h.gw.registrations(), 1);
    let (late_mid, late) = dev.notify("/3303/0/5700", true).unwrap();
    let out = h.input(addr(1000), &dev.deregister());
    assert_eq!(code_of(&out[0]), Code::DELETED);
    let st = h.status();
    let s = st.last().unwrap();
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("offline"), Some("deregistered"))
    );
    assert_eq!(h.gw.registrations(), 0);
    assert_eq!(h.gw.observations(), 0);
    // A late notification on the dead observation is rejected with RST.
    let out = h.input(addr(1000), &late);
    assert_eq!(out.len(), 1);
    let m = msg(&out[0]);
    assert_eq!((m.mtype, m.message_id), (MsgType::Rst, late_mid));
}

#[test]
fn lifetime_expiry_publishes_offline_expired() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    dev.lifetime_s = 30;
    h.register(addr(1000), &mut dev);
    h.advance(Duration::from_secs(29));
    assert_eq!(h.gw.registrations(), 1);
    assert!(h.gw.poll_timeout().unwrap() <= h.now().instant + Duration::from_secs(1));
    h.advance(Duration::from_secs(2));
    assert_eq!(h.gw.registrations(), 0);
    let st = h.status();
    let s = st.last().unwrap();
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("offline"), Some("expired"))
    );
    assert_eq!(h.metric("expirations"), 1);
}

#[test]
fn reregistration_replaces_old_without_duplicate_observations() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    let first = dev.location.clone();
    let mut dev2 = SimDevice::new("urn:imei:123", 2);
    h.register(addr(1001), &mut dev2);
    assert_ne!(first, dev2.location);
    assert_eq!(h.gw.registrations(), 1);
    assert_eq!(h.gw.observations(), 4);
    assert_eq!(h.metric("registrations_replaced"), 1);
    assert_eq!(
        code_of(&h.input(addr(1000), &dev.update(None, false))[0]),
        Code::NOT_FOUND
    );
}

#[test]
fn ping_malformed_and_critical_options() {
    let mut h = H::new();
    let ping = MessageBuilder::empty(MsgType::Con, 0x1234).to_vec();
    let out = h.input(addr(5), &ping);
    assert_eq!(
        crate::proto::coap::Header::peek(&out[0]).unwrap().mtype,
        MsgType::Rst
    );
    assert_eq!(
        crate::proto::coap::Header::peek(&out[0])
            .unwrap()
            .message_id,
        0x1234
    );
    // Malformed CON (reserved token length) → RST; malformed NON → nothing.
    assert_eq!(h.input(addr(5), &[0x49, 1, 0, 7]).len(), 1);
    assert_eq!(h.input(addr(5), &[0x59, 1, 0, 7]).len(), 0);
    assert_eq!(h.input(addr(5), &[1, 2]).len(), 0);
    assert_eq!(h.metric("malformed"), 3);
    let m = MessageBuilder::request(Code::POST, true)
        .mid(9)
        .token(&[1])
        .path("rd")
        .option(9, b"x")
        .to_vec();
    assert_eq!(code_of(&h.input(addr(5), &m)[0]), Code::BAD_OPTION);
    let m = MessageBuilder::request(Code::GET, true)
        .mid(10)
        .path("nope")
        .to_vec();
    assert_eq!(code_of(&h.input(addr(5), &m)[0]), Code::NOT_FOUND);
}

#[test]
fn oversized_register_gets_413_with_size1() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    for i in 0..3000 {
        dev.objects.push(format!("/{}/0", 10_000 + i));
    }
    let r = dev.register();
    assert!(r.len() > 2048);
    let out = h.gw.oversized(h.now(), addr(7), &r[..2048]);
    assert_eq!(out.len(), 1);
    let m = msg(&out[0].1);
    assert_eq!(m.code, Code::REQUEST_ENTITY_TOO_LARGE);
    assert_eq!(m.size1(), Some(2048));
    assert_eq!(h.gw.registrations(), 0);
    assert_eq!(h.metric("oversized"), 1);
    // A NON or an unparseable prefix is only counted.
    let mut non = r.clone();
    non[0] = (non[0] & 0xcf) | 0x10;
    assert!(h.gw.oversized(h.now(), addr(7), &non[..2048]).is_empty());
    assert!(h.gw.oversized(h.now(), addr(7), &r[..6]).is_empty());
    assert_eq!(h.metric("oversized"), 3);
}

#[test]
fn duplicate_register_is_answered_from_cache_and_processed_once() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    let r = dev.register();
    let a = h.input(addr(1000), &r);
    let b = h.input(addr(1000), &r);
    assert_eq!(a[0], b[0], "same response bytes");
    assert_eq!(h.metric("registrations"), 1);
    assert_eq!(h.status().len(), 1);
}

#[test]
fn backpressure_send_gets_503_and_con_notification_is_not_acked() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.clear_telemetry();
    h.gw.sinks[0].capacity = Some(0);
    let (_, n) = dev.notify("/3303/0/5700", true).unwrap();
    assert!(h.input(addr(1000), &n).is_empty());
    assert_eq!(h.metric("notifications_deferred_busy"), 1);
    let (_, nn) = dev.notify("/3304/0/5700", false).unwrap();
    assert!(h.input(addr(1000), &nn).is_empty());
    assert_eq!(h.metric("notifications_dropped_busy"), 1);
    let s = dev.send(&["/3303/0/5700"], Some(1_700_000_000.0), false);
    let out = h.input(addr(1000), &s);
    let m = msg(&out[0]);
    assert_eq!(m.code, Code::SERVICE_UNAVAILABLE);
    assert_eq!(m.max_age(), Some(5));
    // Broker back: the retransmitted notification is processed and ACKed.
    h.gw.sinks[0].capacity = None;
    let out = h.input(addr(1000), &n);
    assert_eq!(code_of(&out[0]), Code::EMPTY);
    assert_eq!(h.telemetry().len(), 1);
    let s = dev.send(&["/3303/0/5700"], Some(1_700_000_000.0), false);
    assert_eq!(code_of(&h.input(addr(1000), &s)[0]), Code::CHANGED);
    let t = h.telemetry();
    let p = t.last().unwrap();
    assert_eq!(p["ts"], 1_700_000_000_000i64);
    assert_eq!(p["source"]["operation"], "send");
}

#[test]
fn send_senml_cbor_and_unregistered_send() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    let s = dev.send(&["/3303/0/5700"], None, true);
    assert_eq!(code_of(&h.input(addr(1000), &s)[0]), Code::NOT_FOUND);
    h.register(addr(1000), &mut dev);
    h.clear_telemetry();
    let s = dev.send(&["/3303/0/5700", "/3/0/9"], Some(1_700_000_123.0), true);
    assert_eq!(code_of(&h.input(addr(1000), &s)[0]), Code::CHANGED);
    let t = h.telemetry();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0]["numeric_values"]["temperature"], 22.5);
    assert_eq!(t[0]["numeric_values"]["battery_level"], 87);
    assert!(t[0]["numeric_values"]["battery_level"].is_i64());
    assert_eq!(t[0]["ts"], 1_700_000_123_000i64);
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
        let mut h = H::new();
        let mut dev = SimDevice::new("urn:imei:123", 1);
        dev.format = cf;
        h.register(addr(1000), &mut dev);
        h.clear_telemetry();
        dev.values.insert(rp("/3303/0/5700"), -7.5);
        dev.values.insert(rp("/3/0/9"), 42.0);
        let (_, n) = dev.notify("/3303/0/5700", false).unwrap();
        h.input(addr(1000), &n);
        let (_, n) = dev.notify("/3/0/9", false).unwrap();
        h.input(addr(1000), &n);
        let t = h.telemetry();
        assert_eq!(t.len(), 2, "cf {cf}");
        assert_eq!(t[0]["numeric_values"]["temperature"], -7.5, "cf {cf}");
        assert_eq!(t[0]["source"]["content_format"], cf);
        assert_eq!(t[1]["numeric_values"]["battery_level"], 42, "cf {cf}");
        assert!(
            t[1]["numeric_values"]["battery_level"].is_i64(),
            "cf {cf}: {}",
            t[1]
        );
    }
}

#[test]
fn observe_retransmits_then_times_out_one_at_a_time() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    dev.lifetime_s = 3600;
    let out = h.input(addr(1000), &dev.register());
    // Registration reply + the first Observe; the device never answers.
    assert_eq!(out.len(), 2);
    let mut wire = 0;
    for _ in 0..500 {
        h.advance(Duration::from_secs(1));
        wire += h.take(addr(1000)).len();
    }
    assert_eq!(h.metric("request_timeouts"), 4);
    assert_eq!(
        h.metric("retransmissions"),
        16,
        "4 requests x MAX_RETRANSMIT 4"
    );
    assert_eq!(
        wire,
        16 + 3,
        "retransmissions plus the three queued first sends"
    );
    assert_eq!(h.gw.observations(), 0);
    assert_eq!(h.metric("observe_failed"), 4);
}

#[test]
fn notification_matched_by_peer_and_token() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.clear_telemetry();
    // Device B's token from another address: not B's telemetry.
    let (mid, n) = dev.notify("/3303/0/5700", true).unwrap();
    let out = h.input(addr(6666), &n);
    assert_eq!(out.len(), 1);
    let m = msg(&out[0]);
    assert_eq!((m.mtype, m.message_id), (MsgType::Rst, mid));
    assert!(h.telemetry().is_empty());
    assert_eq!(h.metric("notifications_wrong_peer"), 1);
    // The device's own copy still counts.
    let out = h.input(addr(1000), &n);
    assert_eq!(msg(&out[0]).mtype, MsgType::Ack);
    assert_eq!(h.telemetry().len(), 1);
}

#[test]
fn update_and_deregister_from_new_ports_on_two_shards() {
    let mut h = H::shards(2);
    let mut dev = SimDevice::new("urn:imei:123", 1);
    let home = port_on(&h, 0, 2000);
    h.register(addr(home), &mut dev);
    assert_eq!(h.gw.where_is("urn:imei:123")[0].0, 0);
    // Ten Updates, each from a fresh source port, half of them routed to the
    // other shard: all 2.04, no re-registration.
    let mut port = 3000;
    for i in 0..10 {
        port = port_on(&h, i % 2, port + 1);
        let out = h.input(addr(port), &dev.update(None, false));
        let out = h.pump(addr(port), &mut dev, out);
        assert_eq!(
            out.response.map(|r| r.1),
            Some(Code::CHANGED),
            "update {i} from port {port}"
        );
        let w = h.gw.where_is("urn:imei:123");
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0, i % 2, "the registration follows the device's shard");
        assert_eq!(w[0].2, PeerId::udp(addr(port)));
    }
    assert_eq!(h.metric("registrations"), 1);
    assert!(h.metric("registrations_moved_in") >= 5);
    let st = h.status();
    let last = st.last().unwrap();
    assert_eq!(last["reason"], "updated");
    assert_eq!(last["registration"]["address"], format!("127.0.0.1:{port}"));
    // Observations moved along: a notification from the new address flows.
    h.clear_telemetry();
    let (_, n) = dev.notify("/3303/0/5700", true).unwrap();
    assert_eq!(msg(&h.input(addr(port), &n)[0]).mtype, MsgType::Ack);
    assert_eq!(h.telemetry().len(), 1);
    // De-register from yet another port on the other shard.
    let p2 = port_on(&h, 1 - h.gw.shard_of(addr(port)), port + 1);
    let out = h.input(addr(p2), &dev.deregister());
    assert_eq!(code_of(&out[0]), Code::DELETED);
    assert_eq!(h.gw.registrations(), 0);
    let st = h.status();
    assert_eq!(st.last().unwrap()["reason"], "deregistered");
}

#[test]
fn home_shard_pointer_follows_and_is_cleared() {
    let mut h = H::shards(2);
    let mut dev = SimDevice::new("urn:imei:123", 1);
    let home = port_on(&h, 0, 2000);
    h.register(addr(home), &mut dev);
    let away = port_on(&h, 1, 3000);
    let out = h.input(addr(away), &dev.update(None, false));
    assert_eq!(code_of(&out[0]), Code::CHANGED);
    assert_eq!(h.gw.shards[0].homed_count(), 1, "home knows where it went");
    // Moves on again (to another port on shard 1), then back home.
    let away2 = port_on(&h, 1, away + 1);
    assert_eq!(
        code_of(&h.input(addr(away2), &dev.update(None, false))[0]),
        Code::CHANGED
    );
    let back = port_on(&h, 0, home + 1);
    assert_eq!(
        code_of(&h.input(addr(back), &dev.update(None, false))[0]),
        Code::CHANGED
    );
    assert_eq!(h.gw.where_is("urn:imei:123")[0].0, 0);
    assert_eq!(h.gw.shards[0].homed_count(), 0, "back home: no pointer");
    // Away again, then it ends there: the pointer goes too.
    let away3 = port_on(&h, 1, away2 + 1);
    assert_eq!(
        code_of(&h.input(addr(away3), &dev.update(None, false))[0]),
        Code::CHANGED
    );
    assert_eq!(h.gw.shards[0].homed_count(), 1);
    assert_eq!(
        code_of(&h.input(addr(away3), &dev.deregister())[0]),
        Code::DELETED
    );
    assert_eq!(
        h.gw.shards[0].homed_count(),
        0,
        "ended away: pointer cleared"
    );
}

#[test]
fn ten_deregisters_from_fresh_ports_all_succeed() {
    for i in 0..10u16 {
        let mut h = H::shards(2);
        let mut dev = SimDevice::new("urn:imei:123", i);
        let home = port_on(&h, (i % 2) as usize, 2000 + i * 10);
        h.register(addr(home), &mut dev);
        let other = port_on(&h, ((i + 1) % 2) as usize, 5000 + i * 10);
        let out = h.input(addr(other), &dev.deregister());
        assert_eq!(code_of(&out[0]), Code::DELETED, "try {i}");
        assert_eq!(h.gw.registrations(), 0);
        assert_eq!(h.status().last().unwrap()["reason"], "deregistered");
    }
}

#[test]
fn concurrent_registrations_of_one_endpoint_keep_the_newest() {
    let mut h = H::shards(2);
    let now = h.now();
    let mut devs = Vec::new();
    let mut replies = Vec::new();
    // 1,000 Registers of one endpoint from 1,000 ports, on both shards,
    // without letting the shards hear of each other in between: their
    // takeover messages cross.
    for i in 0..1000u16 {
        let mut d = SimDevice::new("urn:imei:123", i);
        let r = d.register();
        let a = addr(10_000 + i);
        let shard = h.gw.shard_of(a);
        {
            let Gateway {
                shards,
                sinks,
                endpoints,
                profiles,
                ..
            } = &mut h.gw;
            let mut ctx = Ctx {
                endpoints,
                profiles,
                sink: &mut sinks[shard],
            };
            shards[shard].handle_datagram(now, &mut ctx, PeerId::udp(a), None, &r);
            for (p, bytes) in shards[shard].transmits() {
                if p == PeerId::udp(a) {
                    replies.push((i, bytes.to_vec()));
                }
            }
            shards[shard].clear_transmits();
        }
        devs.push((a, d));
    }
    h.gw.pump(now);
    let created = replies
        .iter()
        .filter(|(_, b)| code_of(b) == Code::CREATED)
        .count();
    assert_eq!(created, 1000);
    for (i, b) in &replies {
        devs[*i as usize].1.handle(b);
    }
    assert_eq!(h.gw.registrations(), 1, "exactly one live registration");
    // The device was told what holds: the survivor's location answers 2.04,
    // every other 4.04 (the client registers again).
    let mut ok = 0;
    for (a, d) in devs.iter_mut() {
        let out = h.input(*a, &d.update(None, false));
        match code_of(&out[0]) {
            Code::CHANGED => ok += 1,
            Code::NOT_FOUND => {}
            c => panic!("unexpected {c}"),
        }
    }
    assert_eq!(ok, 1);
    // Nobody was told offline: the endpoint is online, once.
    assert!(h.status().iter().all(|s| s["status"] == "online"));
}

#[test]
fn deprovisioning_takes_effect_at_once() {
    let mut h = H::shards(2);
    let mut dev = SimDevice::new("urn:imei:123", 1);
    let p = port_on(&h, 1, 2000);
    h.register(addr(p), &mut dev);
    h.gw.endpoints.remove("urn:imei:123");
    let now = h.now();
    h.gw.control(
        now,
        ControlMsg::Endpoints(vec!["urn:imei:123".to_string()].into()),
    );
    assert_eq!(h.gw.registrations(), 0);
    assert_eq!(h.gw.observations(), 0);
    let st = h.status();
    let s = st.last().unwrap();
    assert_eq!(
        (s["status"].as_str(), s["reason"].as_str()),
        (Some("offline"), Some("deprovisioned"))
    );
    assert_eq!(h.metric("deprovisioned"), 1);
    // Further requests: Update 4.03 (from its address and from another
    // shard), notifications RST, Register 4.03.
    assert_eq!(
        code_of(&h.input(addr(p), &dev.update(None, false))[0]),
        Code::FORBIDDEN
    );
    let other = port_on(&h, 0, 4000);
    assert_eq!(
        code_of(&h.input(addr(other), &dev.update(None, false))[0]),
        Code::FORBIDDEN
    );
    let (_, n) = dev.notify("/3303/0/5700", true).unwrap();
    assert_eq!(msg(&h.input(addr(p), &n)[0]).mtype, MsgType::Rst);
    assert_eq!(
        code_of(&h.input(addr(p), &dev.register())[0]),
        Code::FORBIDDEN
    );
}

#[test]
fn endpoint_change_applies_to_live_registration() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.gw.endpoints.insert(
        "urn:imei:123".into(),
        Arc::new(crate::testkit::harness::entry("dev-new", "other")),
    );
    let now = h.now();
    h.gw.control(
        now,
        ControlMsg::Endpoints(vec!["urn:imei:123".to_string()].into()),
    );
    h.clear_telemetry();
    let (_, n) = dev.notify("/3303/0/5700", false).unwrap();
    h.input(addr(1000), &n);
    let t = h.telemetry();
    assert_eq!(
        (t[0]["device_id"].as_str(), t[0]["tenant_id"].as_str()),
        (Some("dev-new"), Some("other"))
    );
}

#[test]
fn profile_reload_observes_new_paths_and_cancels_removed_ones() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    assert_eq!(h.gw.observations(), 4);
    let old_token = dev
        .observations
        .iter()
        .find(|o| o.path == rp("/3304/0/5700"))
        .unwrap()
        .token
        .clone();
    // New profile: humidity no longer observed, /3/0 instance observed.
    let mut p = (*h.gw.profiles["default"]).clone();
    p.observe.retain(|(path, _, _)| *path != rp("/3304/0/5700"));
    p.observe.push((rp("/3/0"), None, None));
    h.gw.profiles.insert("default".into(), Arc::new(p));
    let now = h.now();
    let out = h.gw.control(now, ControlMsg::ProfilesChanged);
    let out = h.split(addr(1000), out);
    // One request on the wire (NSTART); pumping delivers both.
    assert_eq!(out.len(), 1);
    let mut seen = Vec::new();
    let mut inbound = out;
    for _ in 0..5 {
        let mut next = Vec::new();
        for d in &inbound {
            let m = msg(d);
            seen.push((
                m.observe(),
                m.token.to_vec(),
                m.uri_path()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
                    .join("/"),
            ));
            for r in dev.handle(d).replies {
                next.extend(h.input(addr(1000), &r));
            }
        }
        inbound = next;
    }
    assert!(
        seen.contains(&(Some(1), old_token.clone(), "3304/0/5700".into())),
        "cancel on the same token (RFC 7641 §3.6): {seen:?}"
    );
    assert!(
        seen.iter().any(|s| s.0 == Some(0) && s.2 == "3/0"),
        "{seen:?}"
    );
    assert_eq!(h.gw.observations(), 4);
    assert!(!dev.is_observed("/3304/0/5700"));
    assert!(dev.is_observed("/3/0"));
    assert_eq!(h.metric("observe_cancelled"), 1);
}

#[test]
fn dedup_cap_sheds_spoofed_sources_not_registered_devices() {
    let cfg = ServerConfig {
        exchange: crate::proto::coap::exchange::ExchangeConfig {
            dedup_max_peers: 100,
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    let mut h = H::with(1, cfg);
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    h.clear_telemetry();
    let (_, n) = dev.notify("/3303/0/5700", true).unwrap();
    h.input(addr(1000), &n);
    // A flood of Registers for unknown endpoints from 5,000 addresses.
    let mut spoof = SimDevice::new("urn:nobody", 9);
    for i in 0..5000u16 {
        h.input(
            SocketAddr::from(([10, 9, (i >> 8) as u8, i as u8], 40000)),
            &spoof.register(),
        );
    }
    h.advance(Duration::from_millis(10));
    assert!(
        h.metric("dedup_evicted") >= 4800,
        "{}",
        h.metric("dedup_evicted")
    );
    h.advance(Duration::from_millis(10));
    // The registered device's duplicate is still recognised.
    h.input(addr(1000), &n);
    assert_eq!(h.telemetry().len(), 1);
    assert!(h.gw.shards[0]
        .metrics()
        .values()
        .iter()
        .any(|(k, v)| *k == "log_lines_suppressed" && *v > 0));
}

#[test]
fn identifiers_come_from_the_seeded_csprng() {
    let loc = |seed: u64| {
        let mut h = H::with(
            1,
            ServerConfig {
                seed,
                ..ServerConfig::default()
            },
        );
        let mut dev = SimDevice::new("urn:imei:123", 1);
        h.register(addr(1000), &mut dev);
        (dev.location.unwrap(), dev.observations[0].token.clone())
    };
    assert_eq!(loc(1), loc(1), "reproducible with a seed");
    assert_ne!(loc(1), loc(2));
    assert_eq!(loc(1).1.len(), 8, "64-bit tokens");
}

#[test]
fn snapshot_restores_registrations_and_observations() {
    let mut h = H::new();
    let mut dev = SimDevice::new("urn:imei:123", 1);
    h.register(addr(1000), &mut dev);
    let (_, n) = dev.notify("/3303/0/5700", true).unwrap();
    h.input(addr(1000), &n);
    let snap = h.gw.shards[0].export_snapshot(h.now());
    let json = serde_json::to_vec(&snap).unwrap();
    // A new gateway (restart), 10 s later.
    let mut h2 = H::new();
    h2.now = h.now + Duration::from_secs(10);
    let snap: ShardSnapshot = serde_json::from_slice(&json).unwrap();
    let now = h2.now();
    {
        let Gateway {
            shards,
            sinks,
            endpoints,
            profiles,
            ..
        } = &mut h2.gw;
        let mut ctx = Ctx {
            endpoints,
            profiles,
            sink: &mut sinks[0],
        };
        assert_eq!(shards[0].import_snapshot(now, &mut ctx, &snap), 1);
    }
    assert_eq!(h2.gw.observations(), 4);
    assert_eq!(
        code_of(&h2.input(addr(1000), &dev.update(None, false))[0]),
        Code::CHANGED
    );
    // The notification already published is recognised; a new one flows.
    let mut again = n.clone();
    again[2] ^= 1;
    h2.input(addr(1000), &again);
    assert!(h2.telemetry().is_empty());
    let (_, n2) = dev.notify("/3303/0/5700", true).unwrap();
    assert_eq!(msg(&h2.input(addr(1000), &n2)[0]).mtype, MsgType::Ack);
    assert_eq!(h2.telemetry().len(), 1);
    // The Update renewed the lifetime: 300 s from it.
    h2.advance(Duration::from_secs(299));
    assert_eq!(h2.gw.registrations(), 1);
    h2.advance(Duration::from_secs(2));
    assert_eq!(h2.gw.registrations(), 0);
    // Without an Update the lifetime keeps running across the restart.
    let mut h3 = H::new();
    h3.now = h.now + Duration::from_secs(290);
    let now = h3.now();
    {
        let Gateway {
            shards,
            sinks,
            endpoints,
            profiles,
            ..
        } = &mut h3.gw;
        let mut ctx = Ctx {
            endpoints,
            profiles,
            sink: &mut sinks[0],
        };
        assert_eq!(shards[0].import_snapshot(now, &mut ctx, &snap), 1);
    }
    h3.advance(Duration::from_secs(11));
    assert_eq!(h3.gw.registrations(), 0);
}

#[test]
fn random_datagrams_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut h = H::shards(2);
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
        if i % 100 == 0 {
            h.advance(Duration::from_millis(500));
        }
    }
    assert!(h.metric("datagrams_rx") >= before + 10_000);
    assert!(h.metric("malformed") > 0);
}

/// Random loss, duplication and reordering in both directions, two shards,
/// devices that change their source port: every notification the gateway
/// acknowledged is published exactly once, none twice, and every device ends
/// up with exactly one registration at its current address.
fn lossy_world(seed: u64, loss: f64, dup: f64, jitter_ms: u64, port_change: bool) {
    let mut gw = Gateway::new(
        2,
        ServerConfig {
            seed,
            ..ServerConfig::default()
        },
    );
    let n_dev = 4;
    for i in 0..n_dev {
        gw.provision(&format!("urn:prop:{i}"), &format!("dev-{i}"));
    }
    let mut w = World::new(gw, seed);
    let link = crate::testkit::harness::Link {
        loss,
        duplicate: dup,
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(jitter_ms),
    };
    w.up = link;
    w.down = link;
    for i in 0..n_dev {
        let mut c = SimClient::new(
            &format!("urn:prop:{i}"),
            addr(20_000 + i as u16 * 100),
            seed + i as u64,
        );
        c.dev.lifetime_s = 3600;
        c.register();
        w.clients.push(c);
    }
    // Registration and observation; Updates heal lost observations.
    for round in 0..10 {
        w.run_for(Duration::from_secs(60));
        for c in w.clients.iter_mut() {
            if c.registered && !c.dev.is_observed("/3303/0/5700") && c.idle() {
                c.update();
            }
        }
        if round > 2
            && w.clients
                .iter()
                .all(|c| c.registered && c.dev.is_observed("/3303/0/5700"))
        {
            break;
        }
    }
    let mut value = 1000.0;
    for step in 0..40 {
        for (i, c) in w.clients.iter_mut().enumerate() {
            if c.registered && c.idle() {
                value += 1.0;
                c.notify("/3303/0/5700", value + i as f64 * 100_000.0);
            }
        }
        if port_change && step == 20 {
            // Every device's NAT binding changes: it moves to a new port and
            // tells the gateway with an Update (TS 1.1 Transport §6.5).
            for c in w.clients.iter_mut() {
                c.addr = SocketAddr::from(([127, 0, 0, 1], c.addr.port() + 1));
                c.update();
            }
        }
        w.run_for(Duration::from_secs(5));
    }
    w.run_for(Duration::from_secs(300));
    let t = w.gw.telemetry();
    for c in &w.clients {
        for v in &c.acked {
            let n = t
                .iter()
                .filter(|p| {
                    p["numeric_values"]["temperature"] == *v
                        && p["source"]["observe_seq"].as_u64().unwrap_or(0) >= 2
                })
                .count();
            assert_eq!(
                n, 1,
                "acknowledged value {v} of {} published {n} times (seed {seed})",
                c.dev.endpoint
            );
        }
        for v in &c.unacked {
            let n = t
                .iter()
                .filter(|p| {
                    p["numeric_values"]["temperature"] == *v
                        && p["source"]["observe_seq"].as_u64().unwrap_or(0) >= 2
                })
                .count();
            assert!(n <= 1, "unacknowledged value {v} published {n} times");
        }
    }
    for c in &w.clients {
        if !c.registered {
            continue;
        }
        let wh = w.gw.where_is(&c.dev.endpoint);
        assert_eq!(
            wh.len(),
            1,
            "{} registered once: {wh:?} (seed {seed})",
            c.dev.endpoint
        );
        if !port_change || !c.acked.is_empty() {
            assert_eq!(
                wh[0].2,
                PeerId::udp(c.addr),
                "at its current address (seed {seed})"
            );
        }
    }
    let acked: usize = w.clients.iter().map(|c| c.acked.len()).sum();
    let unacked: usize = w.clients.iter().map(|c| c.unacked.len()).sum();
    eprintln!("DBG seed {seed} loss {loss:.2} dup {dup:.2} jitter {jitter_ms} pc {port_change}: acked {acked} unacked {unacked} points {} regs {} moved {} now {:?}", t.len(), w.gw.registrations(), w.gw.metric("registrations_moved_in"), w.now);
    assert!(acked > 0, "something got through (seed {seed})");
}

#[test]
fn lossy_network_without_loss_delivers_everything() {
    lossy_world(1, 0.0, 0.0, 0, false);
}

#[test]
fn lossy_network_with_port_changes() {
    lossy_world(2, 0.05, 0.05, 100, true);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]
        #[test]
        fn acknowledged_notifications_published_exactly_once(
            seed in 0u64..1_000_000,
            loss in 0.0f64..0.25,
            dup in 0.0f64..0.25,
            jitter in 0u64..400,
            port_change: bool,
        ) {
            lossy_world(seed, loss, dup, jitter, port_change);
        }
    }
}

// ---------------------------------------------------------------- device management

mod dm {
    use super::*;
    use crate::proto::lwm2m::dm::Op;
    use crate::proto::lwm2m::encode::{WriteEntry, WriteValue};
    use crate::proto::lwm2m::rpc::{RpcEvent, RpcExec, RpcOutcome, RpcStatus};

    /// Sends `op` to the device as RPC `id` through the shard holding it,
    /// runs the exchange, returns the outcome (None: still in flight).
    fn run(
        h: &mut H,
        peer: SocketAddr,
        dev: &mut SimDevice,
        id: &str,
        op: Op,
    ) -> Option<RpcOutcome> {
        let shard = h.gw.shard_holding("dev-123").expect("device online");
        let exec = RpcExec {
            rpc_id: Arc::from(id),
            endpoint: Arc::from("urn:imei:123"),
            op,
            deadline_ms: h.now().wall_ms + 600_000,
            job: false,
        };
        let out = h.gw.exec(h.now(), shard, exec);
        let mine = h.split(peer, out);
        h.pump(peer, dev, mine);
        done(h, id)
    }

    fn done(h: &H, id: &str) -> Option<RpcOutcome> {
        h.gw.rpc_events.iter().find_map(|(_, e)| match e {
            RpcEvent::Done { rpc_id, outcome } if &**rpc_id == id => Some(outcome.clone()),
            _ => None,
        })
    }

    fn setup() -> (H, SocketAddr, SimDevice) {
        let mut h = H::new();
        let mut dev = SimDevice::new("urn:imei:123", 1);
        let peer = addr(1000);
        assert!(h.register(peer, &mut dev).registered);
        (h, peer, dev)
    }

    #[test]
    fn presence_reports_follow_the_registration() {
        let (mut h, peer, mut dev) = setup();
        let p =
            h.gw.rpc_events
                .iter()
                .find_map(|(_, e)| match e {
                    RpcEvent::Presence(p) => Some(p.clone()),
                    _ => None,
                })
                .unwrap();
        assert!(p.online && p.reachable);
        assert_eq!(
            (p.device_id.as_str(), &*p.endpoint),
            ("dev-123", "urn:imei:123")
        );
        let out = h.input(peer, &dev.deregister());
        h.pump(peer, &mut dev, out);
        match h.gw.rpc_events.last().unwrap() {
            (_, RpcEvent::Presence(p)) => {
                assert!(!p.online);
                assert_eq!(p.reason, Some("deregistered"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(h.gw.shard_holding("dev-123"), None);
    }

    #[test]
    fn execute_succeeds_fails_with_the_code_or_times_out() {
        let (mut h, peer, mut dev) = setup();
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "r1",
            Op::Execute {
                path: rp("/3/0/4"),
                args: None,
            },
        )
        .unwrap();
        assert_eq!(
            (o.status, o.code.as_deref()),
            (RpcStatus::Succeeded, Some("2.04"))
        );
        dev.fail
            .insert((Code::POST.0, rp("/3/0/4")), Code::METHOD_NOT_ALLOWED);
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "r2",
            Op::Execute {
                path: rp("/3/0/4"),
                args: Some("0='now'".into()),
            },
        )
        .unwrap();
        assert_eq!(
            (o.status, o.code.as_deref()),
            (RpcStatus::Failed, Some("4.05"))
        );
        dev.silent = true;
        assert!(run(
            &mut h,
            peer,
            &mut dev,
            "r3",
            Op::Execute {
                path: rp("/3/0/5"),
                args: None
            }
        )
        .is_none());
        let retransmits = h.metric("retransmissions");
        for _ in 0..100 {
            h.advance(Duration::from_secs(1));
        }
        let o = done(&h, "r3").expect("timed out after the retransmissions");
        assert_eq!(o.status, RpcStatus::TimedOut);
        assert_eq!(
            h.metric("retransmissions") - retransmits,
            4,
            "MAX_RETRANSMIT"
        );
        // The device is ready for the next RPC again.
        match h.gw.rpc_events.last().unwrap() {
            (_, RpcEvent::Presence(p)) => assert!(p.reachable),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn read_and_write_in_tlv_and_senml() {
        let (mut h, peer, mut dev) = setup();
        for (i, cf) in [content::CF_TLV, content::CF_SENML_JSON]
            .into_iter()
            .enumerate()
        {
            let o = run(
                &mut h,
                peer,
                &mut dev,
                &format!("read{i}"),
                Op::Read {
                    path: rp("/3/0"),
                    format: Some(cf),
                },
            )
            .unwrap();
            assert_eq!(o.status, RpcStatus::Succeeded, "{o:?}");
            let r = o.response.unwrap();
            assert_eq!(r["/3/0/0"], "CORE-M sim", "cf {cf}: {r}");
            assert_eq!(r["/3/0/3"], "1.0.0");
            assert_eq!(r["/3/0/9"], 87, "{r}");
            // The multiple-instance resource, instance by instance.
            assert_eq!(
                (r["/3/0/6/0"].clone(), r["/3/0/6/1"].clone()),
                (1.into(), 5.into())
            );
        }
        // A single resource, the device's choice of format (text).
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "read-one",
            Op::Read {
                path: rp("/1/0/1"),
                format: None,
            },
        )
        .unwrap();
        assert_eq!(o.response.unwrap()["/1/0/1"], 300);
        // Write a resource (text) and an instance (partial update, TLV and
        // SenML JSON); read them back from the device's store.
        for (i, cf) in [content::CF_TLV, content::CF_SENML_JSON]
            .into_iter()
            .enumerate()
        {
            let o = run(
                &mut h,
                peer,
                &mut dev,
                &format!("write{i}"),
                Op::Write {
                    path: rp("/1/0"),
                    entries: vec![
                        WriteEntry {
                            path: rp("/1/0/1"),
                            value: WriteValue::Int(600 + i as i64),
                        },
                        WriteEntry {
                            path: rp("/1/0/7"),
                            value: WriteValue::Str("UQ".into()),
                        },
                    ],
                    replace: false,
                    format: Some(cf),
                },
            )
            .unwrap();
            assert_eq!(
                (o.status, o.code.as_deref()),
                (RpcStatus::Succeeded, Some("2.04"))
            );
            assert_eq!(dev.store[&rp("/1/0/1")], WriteValue::Int(600 + i as i64));
            assert_eq!(dev.store[&rp("/1/0/7")], WriteValue::Str("UQ".into()));
        }
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "write-res",
            Op::Write {
                path: rp("/3/0/13"),
                entries: vec![WriteEntry {
                    path: rp("/3/0/13"),
                    value: WriteValue::Time(1_700_000_000),
                }],
                replace: true,
                format: None,
            },
        )
        .unwrap();
        assert_eq!(o.status, RpcStatus::Succeeded);
        assert_eq!(dev.store[&rp("/3/0/13")], WriteValue::Int(1_700_000_000));
    }

    #[test]
    fn discover_create_delete_and_attributes() {
        let (mut h, peer, mut dev) = setup();
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "d",
            Op::Discover { path: rp("/3/0") },
        )
        .unwrap();
        let links = o.response.unwrap();
        assert!(
            links.as_array().unwrap().iter().any(|l| l == "</3/0/0>"),
            "{links}"
        );
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "c",
            Op::Create {
                object: rp("/3303"),
                entries: vec![WriteEntry {
                    path: rp("/3303/1/5750"),
                    value: WriteValue::Str("outdoor".into()),
                }],
                format: Some(content::CF_TLV),
            },
        )
        .unwrap();
        assert_eq!(
            (o.code.as_deref(), o.response.clone()),
            (
                Some("2.01"),
                Some(serde_json::json!({"location": "/3303/1"}))
            )
        );
        assert!(dev.objects.contains(&"/3303/1".to_string()));
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "del",
            Op::Delete {
                path: rp("/3303/1"),
            },
        )
        .unwrap();
        assert_eq!(o.code.as_deref(), Some("2.02"));
        assert!(!dev.objects.contains(&"/3303/1".to_string()));
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "wa",
            Op::WriteAttributes {
                path: rp("/3303/0/5700"),
                attributes: vec!["pmin=5".into(), "gt=30".into()],
            },
        )
        .unwrap();
        assert_eq!(o.status, RpcStatus::Succeeded);
        assert_eq!(dev.attributes[&rp("/3303/0/5700")], vec!["pmin=5", "gt=30"]);
    }

    #[test]
    fn observe_and_cancel_by_rpc_start_and_stop_points() {
        let (mut h, peer, mut dev) = setup();
        // /3/0/7 (voltage) is mapped by the profile but not observed by it.
        let mut profiles = h.gw.profiles.clone();
        let mut p = (*profiles["default"]).clone();
        p.resources.insert(
            rp("/3/0/7"),
            crate::proto::lwm2m::profile::Mapping {
                metric: Arc::from("voltage"),
                kind: crate::proto::lwm2m::profile::MetricKind::Numeric,
                data_type: None,
            },
        );
        profiles.insert("default".into(), Arc::new(p));
        h.gw.profiles = profiles;
        dev.values.insert(rp("/3/0/7"), 3800.0);
        let before = h.gw.observations();
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "obs",
            Op::Observe {
                path: rp("/3/0/7"),
                format: None,
            },
        )
        .unwrap();
        assert_eq!(o.status, RpcStatus::Succeeded);
        assert_eq!(o.response.unwrap()["/3/0/7"], 3800);
        assert_eq!(h.gw.observations(), before + 1);
        h.clear_telemetry();
        let (_, n) = dev.notify("/3/0/7", false).unwrap();
        let out = h.input(peer, &n);
        h.pump(peer, &mut dev, out);
        assert_eq!(h.telemetry().len(), 1);
        assert_eq!(h.telemetry()[0]["numeric_values"]["voltage"], 3800);
        // A profile reload does not cancel it.
        let out = h.gw.control(h.now(), ControlMsg::ProfilesChanged);
        let mine = h.split(peer, out);
        h.pump(peer, &mut dev, mine);
        assert_eq!(h.gw.observations(), before + 1);
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "cancel",
            Op::CancelObserve { path: rp("/3/0/7") },
        )
        .unwrap();
        assert_eq!(o.status, RpcStatus::Succeeded);
        assert_eq!(h.gw.observations(), before);
        assert!(
            !dev.is_observed("/3/0/7"),
            "the device dropped the observer (RFC 7641 §3.6)"
        );
        // Nothing to cancel any more: refused before sending.
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "cancel2",
            Op::CancelObserve { path: rp("/3/0/7") },
        )
        .unwrap();
        assert_eq!(o.status, RpcStatus::Failed);
        assert!(o.code.is_none());
    }

    #[test]
    fn block_wise_read_and_write() {
        let (mut h, peer, mut dev) = setup();
        let blob: Vec<u8> = (0..16 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        dev.store
            .insert(rp("/33000/0/1"), WriteValue::Opaque(blob.clone()));
        dev.block_szx = 4; // 256-byte blocks: the device's size wins.
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "big-read",
            Op::Read {
                path: rp("/33000/0/1"),
                format: None,
            },
        );
        let o = o.unwrap_or_else(|| panic!("{:?}", h.gw.rpc_events.last()));
        assert_eq!(o.status, RpcStatus::Succeeded, "{o:?}");
        let hex = o.response.unwrap()["/33000/0/1"]["hex"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            crate::proto::lwm2m::endpoint::decode_hex(&hex).unwrap(),
            blob
        );
        assert!(h.metric("block2_continuations") >= 63);
        // A 16 KiB write goes out in Block1 blocks; the device asks for
        // 256-byte blocks after the first 1024.
        let data: Vec<u8> = blob.iter().rev().copied().collect();
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "big-write",
            Op::Write {
                path: rp("/33000/0/1"),
                entries: vec![WriteEntry {
                    path: rp("/33000/0/1"),
                    value: WriteValue::Opaque(data.clone()),
                }],
                replace: true,
                format: None,
            },
        )
        .unwrap();
        assert_eq!(o.status, RpcStatus::Succeeded, "{o:?}");
        assert_eq!(dev.bytes_of("/33000/0/1").unwrap(), data);
        // A device answering 4.13 to 1024-byte blocks gets smaller ones.
        dev.block1_refuse_large = true;
        let sent = h.metric("block1_sent");
        let o = run(
            &mut h,
            peer,
            &mut dev,
            "big-write-2",
            Op::Write {
                path: rp("/33000/0/1"),
                entries: vec![WriteEntry {
                    path: rp("/33000/0/1"),
                    value: WriteValue::Opaque(blob.clone()),
                }],
                replace: true,
                format: None,
            },
        )
        .unwrap();
        assert_eq!(o.status, RpcStatus::Succeeded, "{o:?}");
        assert_eq!(dev.bytes_of("/33000/0/1").unwrap(), blob);
        assert_eq!(
            h.metric("block1_sent") - sent,
            1 + 64,
            "one refused block, then 64 of 256 bytes"
        );
    }

    #[test]
    fn block1_register_and_the_maximum_body() {
        let mut h = H::new();
        let dev = SimDevice::new("urn:imei:123", 1);
        let peer = addr(1000);
        // A Register whose links come in 16-byte blocks is assembled.
        let links = dev.links();
        let q = format!("ep={}", dev.endpoint);
        let chunks: Vec<&[u8]> = links.as_bytes().chunks(16).collect();
        let mut last = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let b = crate::proto::coap::Block {
                num: i as u32,
                more: i + 1 < chunks.len(),
                szx: 0,
            };
            let m = MessageBuilder::request(Code::POST, true)
                .mid(100 + i as u16)
                .token(&[9])
                .path("rd")
                .query(&q)
                .content_format(content::CF_LINK)
                .block1(b)
                .payload(c)
                .to_vec();
            last = h.input(peer, &m);
            let want = if b.more {
                Code::CONTINUE
            } else {
                Code::CREATED
            };
            assert_eq!(code_of(&last[0]), want, "block {i}");
        }
        assert_eq!(
            msg(&last[0]).block1().map(|b| b.more),
            Some(false),
            "final Block1 echoed"
        );
        assert_eq!(h.gw.registrations(), 1);
        // A body above the maximum: 4.13 with Size1, nothing kept.
        let big = vec![b'x'; 1024];
        let mut code = Code::CONTINUE;
        for i in 0..80u32 {
            let b = crate::proto::coap::Block {
                num: i,
                more: true,
                szx: 6,
            };
            let m = MessageBuilder::request(Code::POST, true)
                .mid(500 + i as u16)
                .token(&[7])
                .path("dp")
                .content_format(content::CF_SENML_JSON)
                .block1(b)
                .payload(&big)
                .to_vec();
            let out = h.input(peer, &m);
            code = code_of(&out[0]);
            if code != Code::CONTINUE {
                assert_eq!(msg(&out[0]).size1(), Some(64 * 1024));
                break;
            }
        }
        assert_eq!(code, Code::REQUEST_ENTITY_TOO_LARGE);
        assert_eq!(h.gw.shards[0].blocks_in.len(), 0, "no state left behind");
        // Announced too large up front (Size1): refused at once.
        let m = MessageBuilder::request(Code::POST, true)
            .mid(900)
            .token(&[8])
            .path("dp")
            .block1(crate::proto::coap::Block {
                num: 0,
                more: true,
                szx: 6,
            })
            .size1(1 << 20)
            .payload(&big)
            .to_vec();
        assert_eq!(
            code_of(&h.input(peer, &m)[0]),
            Code::REQUEST_ENTITY_TOO_LARGE
        );
    }

    #[test]
    fn queue_mode_device_is_reachable_only_while_awake() {
        let mut h = H::new();
        let mut dev = SimDevice::new("urn:imei:123", 1);
        let peer = addr(1000);
        let q = [
            "ep=urn:imei:123".to_string(),
            "b=UQ".to_string(),
            "lt=600".to_string(),
        ];
        let links = dev.links();
        let r = MessageBuilder::request(Code::POST, true)
            .mid(1)
            .token(&[1])
            .path("rd")
            .query(&q[0])
            .query(&q[1])
            .query(&q[2])
            .content_format(content::CF_LINK)
            .payload(links.as_bytes())
            .to_vec();
        let out = h.input(peer, &r);
        let loc = msg(&out[0]).location_path().nth(1).unwrap().to_vec();
        dev.location = Some(String::from_utf8(loc).unwrap());
        h.pump(peer, &mut dev, out);
        let last_presence = |h: &H| {
            h.gw.rpc_events
                .iter()
                .rev()
                .find_map(|(_, e)| match e {
                    RpcEvent::Presence(p) => Some(p.clone()),
                    _ => None,
                })
                .unwrap()
        };
        assert!(last_presence(&h).reachable && last_presence(&h).queue_mode);
        h.advance(Duration::from_secs(94));
        assert!(!last_presence(&h).reachable, "asleep after 93 s");
        assert!(last_presence(&h).online);
        // An RPC now is handed back unsent.
        let out = h.gw.exec(
            h.now(),
            0,
            RpcExec {
                rpc_id: Arc::from("q1"),
                endpoint: Arc::from("urn:imei:123"),
                op: Op::Execute {
                    path: rp("/3/0/4"),
                    args: None,
                },
                deadline_ms: h.now().wall_ms + 60_000,
                job: false,
            },
        );
        assert!(
            h.split(peer, out).is_empty(),
            "nothing sent to a sleeping device"
        );
        assert!(
            matches!(h.gw.rpc_events.last(), Some((_, RpcEvent::Returned { rpc_id })) if &**rpc_id == "q1")
        );
        // Its next Update wakes it.
        let upd = dev.update(None, false);
        let out = h.input(peer, &upd);
        h.pump(peer, &mut dev, out);
        assert!(last_presence(&h).reachable);
    }

    #[test]
    fn lost_request_and_lost_answer_execute_once() {
        // RFC 7252 §4.2: the CON request is retransmitted until the device
        // answers; the device's duplicate detection answers the retransmission
        // of a request it already ran, so the reboot happens once.
        let (mut h, peer, mut dev) = setup();
        let shard = h.gw.shard_holding("dev-123").unwrap();
        let exec = RpcExec {
            rpc_id: Arc::from("lossy"),
            endpoint: Arc::from("urn:imei:123"),
            op: Op::Execute {
                path: rp("/3/0/4"),
                args: None,
            },
            deadline_ms: h.now().wall_ms + 600_000,
            job: false,
        };
        let out = h.gw.exec(h.now(), shard, exec);
        assert_eq!(h.split(peer, out).len(), 1, "the request (lost)");
        let mut executed = 0;
        let mut answers_lost = 0;
        for _ in 0..200 {
            h.advance(Duration::from_millis(500));
            for d in h.take(peer) {
                let ev = dev.handle(&d);
                executed += ev.executed.len();
                if answers_lost == 0 {
                    answers_lost += 1; // the first answer is lost too
                    continue;
                }
                for r in ev.replies {
                    let out = h.input(peer, &r);
                    h.pump(peer, &mut dev, out);
                }
            }
            if done(&h, "lossy").is_some() {
                break;
            }
        }
        let o = done(&h, "lossy").expect("finished after retransmissions");
        assert_eq!(o.status, RpcStatus::Succeeded, "{o:?}");
        assert_eq!(executed, 1, "executed once");
        assert!(h.metric("retransmissions") >= 2);
    }

    #[test]
    fn block1_update_from_a_new_port_on_the_other_shard() {
        // The Update's links come in Block1 blocks from a new source port
        // the kernel hashes to the other shard: the body is assembled there
        // and the whole request runs on the registration, which moves.
        let mut h = H::shards(2);
        let mut dev = SimDevice::new("urn:imei:123", 1);
        let p0 = addr(port_on(&h, 0, 2000));
        assert!(h.register(p0, &mut dev).registered);
        assert_eq!(h.gw.where_is("urn:imei:123")[0].0, 0);
        dev.objects.push("/3304/1".into());
        let links = dev.links();
        let p1 = addr(port_on(&h, 1, 3000));
        let loc = dev.location.clone().unwrap();
        let chunks: Vec<&[u8]> = links.as_bytes().chunks(32).collect();
        let mut last = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let b = crate::proto::coap::Block {
                num: i as u32,
                more: i + 1 < chunks.len(),
                szx: 1,
            };
            let m = MessageBuilder::request(Code::POST, true)
                .mid(700 + i as u16)
                .token(&[5, i as u8])
                .path_segment(b"rd")
                .path_segment(loc.as_bytes())
                .content_format(content::CF_LINK)
                .block1(b)
                .payload(c)
                .to_vec();
            last = h.input(p1, &m);
            if b.more {
                assert_eq!(code_of(&last[0]), Code::CONTINUE, "block {i}");
            }
        }
        let fin = last
            .iter()
            .find(|d| msg(d).code == Code::CHANGED)
            .expect("2.04 to the final block");
        assert_eq!(
            msg(fin).block1().map(|b| b.more),
            Some(false),
            "final Block1 echoed"
        );
        let w = h.gw.where_is("urn:imei:123");
        assert_eq!((w.len(), w[0].0), (1, 1), "moved to shard 1");
        let st = h.status();
        assert_eq!(st.last().unwrap()["reason"], "updated");
        let objs = st.last().unwrap()["registration"]["objects"].clone();
        assert!(
            objs.as_array().unwrap().iter().any(|o| o == "/3304/1"),
            "{objs}"
        );
    }

    #[test]
    fn an_rpc_in_flight_when_the_device_moves_shard_fails_cleanly() {
        let mut h = H::shards(2);
        let mut dev = SimDevice::new("urn:imei:123", 1);
        let p0 = addr(port_on(&h, 0, 2000));
        assert!(h.register(p0, &mut dev).registered);
        let out = h.gw.exec(
            h.now(),
            0,
            RpcExec {
                rpc_id: Arc::from("m1"),
                endpoint: Arc::from("urn:imei:123"),
                op: Op::Execute {
                    path: rp("/3/0/4"),
                    args: None,
                },
                deadline_ms: h.now().wall_ms + 600_000,
                job: false,
            },
        );
        assert_eq!(h.split(p0, out).len(), 1, "sent (and lost)");
        let p1 = addr(port_on(&h, 1, 3000));
        let upd = dev.update(None, false);
        let out = h.input(p1, &upd);
        h.pump(p1, &mut dev, out);
        let o = done(&h, "m1").expect("ended on the old shard");
        assert_eq!(o.status, RpcStatus::Failed);
        assert!(o.reason.unwrap().contains("moved"));
        // The control plane hears where the device is now, ready.
        assert_eq!(h.gw.shard_holding("dev-123"), Some(1));
        match h.gw.rpc_events.last().unwrap() {
            (1, RpcEvent::Presence(p)) => assert!(p.reachable && p.online),
            other => panic!("{other:?}"),
        }
    }
}

/// `GET /fw/{name}` (a pull firmware update, TS 1.1 Core §E.6): Block2
/// blocks in the device's size, any block on request, ETag and Size2;
/// 4.01 (no payload) to a sender the shard does not know, 4.04 for an image
/// not handed to the shard, 4.02 past the end.
#[test]
fn firmware_images_are_served_in_blocks_to_known_devices() {
    use crate::proto::coap::{opt, Block};
    let mut h = H::new();
    let image: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    let sha = openssl::sha::sha256(&image);
    let out = h.gw.control(
        h.now(),
        ControlMsg::Firmware {
            name: Arc::from("fw-1"),
            image: Some(FwImage::new(Arc::from(image.as_slice()), &sha)),
        },
    );
    assert!(out.is_empty());
    let get = |mid: u16, name: &str, block: Option<Block>| {
        let mut b = MessageBuilder::new(MsgType::Con, Code::GET)
            .mid(mid)
            .token(&[9, 9])
            .path("fw")
            .path_segment(name.as_bytes());
        if let Some(bl) = block {
            b = b.block2(bl);
        }
        b.to_vec()
    };
    // Not registered: 4.01, no larger than the request.
    let req = get(1, "fw-1", None);
    let r = h.input(addr(1500), &req);
    assert_eq!(r.len(), 1);
    assert_eq!(code_of(&r[0]), Code::UNAUTHORIZED);
    assert!(r[0].len() <= req.len());

    let mut dev = SimDevice::new("urn:imei:123", 1);
    assert!(h.register(addr(1000), &mut dev).registered);
    // The first block, our size (1024), ETag, Size2.
    let r = h.input(addr(1000), &get(2, "fw-1", None));
    let m = msg(&r[0]);
    assert_eq!(m.code, Code::CONTENT);
    assert_eq!(
        m.block2(),
        Some(Block {
            num: 0,
            more: true,
            szx: 6
        })
    );
    assert_eq!(m.payload, &image[..1024]);
    let etag: Vec<&[u8]> = m
        .options()
        .filter(|o| o.number == opt::ETAG)
        .map(|o| o.value)
        .collect();
    assert_eq!(etag, vec![&sha[..8]]);
    assert!(m.options().any(|o| o.number == opt::SIZE2));
    // The device asks for 256-byte blocks (SZX 4): block 5 is bytes 1280..1536.
    let r = h.input(
        addr(1000),
        &get(
            3,
            "fw-1",
            Some(Block {
                num: 5,
                more: false,
                szx: 4,
            }),
        ),
    );
    let m = msg(&r[0]);
    assert_eq!(
        m.block2(),
        Some(Block {
            num: 5,
            more: true,
            szx: 4
        })
    );
    assert_eq!(m.payload, &image[1280..1536]);
    // Any block again (a resumed download), the last one short.
    let r = h.input(
        addr(1000),
        &get(
            4,
            "fw-1",
            Some(Block {
                num: 4,
                more: false,
                szx: 6,
            }),
        ),
    );
    let m = msg(&r[0]);
    assert_eq!(
        m.block2(),
        Some(Block {
            num: 4,
            more: false,
            szx: 6
        })
    );
    assert_eq!(m.payload, &image[4096..]);
    // The whole image, block by block in the device's size, is the image.
    let mut got = Vec::new();
    for n in 0..100u32 {
        let r = h.input(
            addr(1000),
            &get(
                10 + n as u16,
                "fw-1",
                Some(Block {
                    num: n,
                    more: false,
                    szx: 5,
                }),
            ),
        );
        let m = msg(&r[0]);
        got.extend_from_slice(m.payload);
        if !m.block2().unwrap().more {
            break;
        }
    }
    assert_eq!(got, image);
    // Past the end: 4.02; unknown image: 4.04; another method: 4.05.
    let r = h.input(
        addr(1000),
        &get(
            200,
            "fw-1",
            Some(Block {
                num: 5,
                more: false,
                szx: 6,
            }),
        ),
    );
    assert_eq!(code_of(&r[0]), Code::BAD_OPTION);
    let r = h.input(addr(1000), &get(201, "nope", None));
    assert_eq!(code_of(&r[0]), Code::NOT_FOUND);
    let put = MessageBuilder::new(MsgType::Con, Code::PUT)
        .mid(202)
        .token(&[1])
        .path("fw/fw-1")
        .to_vec();
    assert_eq!(
        code_of(&h.input(addr(1000), &put)[0]),
        Code::METHOD_NOT_ALLOWED
    );
    // A retransmitted GET is served again, not from a cache.
    let again = h.input(
        addr(1000),
        &get(
            3,
            "fw-1",
            Some(Block {
                num: 5,
                more: false,
                szx: 4,
            }),
        ),
    );
    assert_eq!(msg(&again[0]).payload, &image[1280..1536]);
    // Withdrawn: 4.04.
    h.gw.control(
        h.now(),
        ControlMsg::Firmware {
            name: Arc::from("fw-1"),
            image: None,
        },
    );
    let r = h.input(addr(1000), &get(300, "fw-1", None));
    assert_eq!(code_of(&r[0]), Code::NOT_FOUND);
    assert!(h.metric("firmware_blocks_served") >= 8);
    assert_eq!(h.metric("firmware_refused"), 2);
}

/// Two shards: a device's GET /fw from its registered address is served
/// whichever shard holds it; the same device asking from a new source port
/// (a new 4-tuple, possibly another shard, no registration there) gets 4.01
/// without payload until it updates from that address.
#[test]
fn firmware_blocks_follow_the_registration_across_shards() {
    use crate::proto::coap::Block;
    let mut h = H::shards(2);
    let image: Vec<u8> = (0..3000u32).map(|i| (i % 253) as u8).collect();
    let sha = openssl::sha::sha256(&image);
    let _ = h.gw.control(
        h.now(),
        ControlMsg::Firmware {
            name: Arc::from("fw-2"),
            image: Some(FwImage::new(Arc::from(image.as_slice()), &sha)),
        },
    );
    let get = |mid: u16| {
        MessageBuilder::new(MsgType::Con, Code::GET)
            .mid(mid)
            .token(&[4])
            .path("fw/fw-2")
            .block2(Block {
                num: 1,
                more: false,
                szx: 6,
            })
            .to_vec()
    };
    let a = addr(port_on(&h, 0, 2000));
    let b = addr(port_on(&h, 1, 3000));
    let mut dev = SimDevice::new("urn:imei:123", 1);
    assert!(h.register(a, &mut dev).registered);
    let r = h.input(a, &get(1));
    assert_eq!(msg(&r[0]).payload, &image[1024..2048]);
    let r = h.input(b, &get(2));
    assert_eq!(code_of(&r[0]), Code::UNAUTHORIZED);
    assert!(msg(&r[0]).payload.is_empty());
    // The device's Update from the new port moves its registration there.
    let u = dev.update(None, false);
    let out = h.input(b, &u);
    h.pump(b, &mut dev, out);
    let r = h.input(b, &get(3));
    assert_eq!(msg(&r[0]).payload, &image[1024..2048]);
}
