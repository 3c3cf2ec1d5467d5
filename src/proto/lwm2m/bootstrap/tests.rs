//! The bootstrap sequence against the simulated device, without sockets or
//! clocks: every datagram goes through the server and the device by hand.

use super::*;
use crate::proto::lwm2m::endpoint::Secret;
use crate::testkit::memory_sink::MemorySink;
use crate::testkit::sim::SimDevice;
use std::net::SocketAddr;

struct H {
    bs: BootstrapServer,
    sink: MemorySink,
    eps: EndpointMap,
    t0: Instant,
    t: Duration,
    /// Stores answered automatically (Ok) unless false.
    auto_store: bool,
    stores: Vec<StoreRequest>,
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl H {
    fn new(defaults: BootstrapDefaults) -> H {
        let cfg = BootstrapConfig {
            defaults,
            seed: 7,
            key_seed: [9; 32],
            ..BootstrapConfig::default()
        };
        H {
            bs: BootstrapServer::new(cfg, Arc::new(ShardMetrics::default())),
            sink: MemorySink::default(),
            eps: EndpointMap::default(),
            t0: Instant::now(),
            t: Duration::ZERO,
            auto_store: true,
            stores: Vec::new(),
        }
    }

    fn now(&self) -> Now {
        Now {
            instant: self.t0 + self.t,
            wall_ms: 1_800_000_000_000 + self.t.as_millis() as i64,
        }
    }

    fn provision(&mut self, ep: &str, e: EndpointEntry) {
        self.eps.insert(ep.to_string(), Arc::new(e));
    }

    /// One datagram from the device; returns what the server sent back.
    fn input(&mut self, peer: PeerId, id: Option<&Identity>, d: &[u8]) -> Vec<Vec<u8>> {
        let now = self.now();
        let mut ctx = BsCtx {
            endpoints: &self.eps,
            sink: &mut self.sink,
        };
        self.bs.handle_datagram(now, &mut ctx, peer, id, d);
        self.after(now)
    }

    fn after(&mut self, now: Now) -> Vec<Vec<u8>> {
        while let Some(s) = self.bs.poll_store() {
            self.stores.push(s.clone());
            if self.auto_store {
                let mut ctx = BsCtx {
                    endpoints: &self.eps,
                    sink: &mut self.sink,
                };
                self.bs.handle_stored(now, &mut ctx, s.session, Ok(()));
            }
        }
        let out: Vec<Vec<u8>> = self.bs.transmits().map(|(_, d)| d.to_vec()).collect();
        self.bs.clear_transmits();
        out
    }

    fn advance(&mut self, d: Duration) -> Vec<Vec<u8>> {
        self.t += d;
        let now = self.now();
        let mut ctx = BsCtx {
            endpoints: &self.eps,
            sink: &mut self.sink,
        };
        self.bs.handle_timeout(now, &mut ctx);
        self.after(now)
    }

    /// Runs the exchange between the device and the server until nothing
    /// is left to send; returns the device's first answer code.
    fn run(
        &mut self,
        dev: &mut SimDevice,
        peer: PeerId,
        id: Option<&Identity>,
        first: Vec<u8>,
    ) -> (Option<Code>, bool) {
        let mut to_server = vec![first];
        let mut first_code = None;
        let mut finished = false;
        for _ in 0..200 {
            if to_server.is_empty() {
                break;
            }
            let mut to_dev = Vec::new();
            for d in to_server.drain(..) {
                to_dev.extend(self.input(peer, id, &d));
            }
            for d in to_dev {
                let ev = dev.handle(&d);
                if let Some((_, c)) = ev.response {
                    first_code.get_or_insert(c);
                }
                finished |= ev.bootstrap_finished;
                to_server.extend(ev.replies);
            }
        }
        (first_code, finished)
    }

    fn reasons(&self) -> Vec<String> {
        self.sink
            .status
            .iter()
            .map(|v| v["reason"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

fn defaults() -> BootstrapDefaults {
    BootstrapDefaults {
        server_uri: Some("coaps://gw.example:5684".into()),
        server_uri_plain: Some("coap://gw.example:5683".into()),
        lifetime_s: 300,
        ..BootstrapDefaults::default()
    }
}

fn bs_entry(device: &str, bs_identity: &str) -> EndpointEntry {
    let mut e = EndpointEntry::new(device, "acme", "default");
    e.bootstrap = Some(Box::new(BootstrapSettings {
        psk_identity: Some(bs_identity.into()),
        psk_key_hex: Some(Secret("00112233".into())),
        ..BootstrapSettings::default()
    }));
    e
}

#[test]
fn dtls_bootstrap_with_generated_psk_over_senml_cbor() {
    let mut h = H::new(BootstrapDefaults {
        generate_psk: true,
        ..defaults()
    });
    h.provision("urn:imei:1", bs_entry("dev-1", "bs-1"));
    let mut dev = SimDevice::new("urn:imei:1", 1);
    dev.set_bootstrap_account(
        "coaps://gw.example:5784",
        0,
        b"bs-1",
        &[0, 0x11, 0x22, 0x33],
    );
    let id = Identity::Psk(b"bs-1".to_vec());
    let peer = PeerId::dtls(addr(40001));
    let req = dev.bootstrap_request(Some(CF_SENML_CBOR));
    let (code, finished) = h.run(&mut dev, peer, Some(&id), req);
    assert_eq!(code, Some(Code::CHANGED));
    assert!(finished, "Bootstrap-Finish reached the device");
    // One store request, answered before Finish; its key is what the
    // device got.
    assert_eq!(h.stores.len(), 1);
    let st = &h.stores[0];
    assert_eq!(st.endpoint, "urn:imei:1");
    assert_eq!(st.psk.identity, b"urn:imei:1");
    assert_eq!(st.psk.key.len(), 16);
    let acc = dev.server_account().expect("a server account was written");
    assert_eq!(acc.uri, "coaps://gw.example:5684");
    assert_eq!(acc.mode, 0);
    assert_eq!(acc.identity, b"urn:imei:1");
    assert_eq!(acc.key, st.psk.key);
    assert_eq!(acc.ssid, 1);
    assert_eq!(acc.lifetime, Some(300));
    assert_eq!(acc.binding.as_deref(), Some("U"));
    // The factory bootstrap account survived the Delete of /0, the new
    // Security instance went next to it.
    assert_eq!(dev.bytes_of("/0/0/3").as_deref(), Some(b"bs-1".as_slice()));
    assert!(dev.bytes_of("/0/1/5").is_some());
    assert!(dev.write_formats.iter().all(|cf| *cf == CF_SENML_CBOR));
    assert_eq!(h.reasons(), ["bootstrapping", "bootstrapped"]);
    let ev = &h.sink.status[1];
    assert_eq!(ev["status"], "bootstrap");
    assert_eq!(ev["device_id"], "dev-1");
    assert_eq!(ev["tenant_id"], "acme");
    assert_eq!(ev["bootstrap"]["transport"], "coaps");
    assert_eq!(ev["bootstrap"]["psk_generated"], true);
    assert_eq!(ev["bootstrap"]["lwm2m_version"], "1.1");
    assert_eq!(ev["bootstrap"]["servers"][0], "coaps://gw.example:5684");
    let key_hex: String = st.psk.key.iter().map(|b| format!("{b:02x}")).collect();
    assert!(!ev.to_string().contains(&key_hex));
    assert_eq!(h.bs.sessions(), 0);
    // Bootstrapping again rotates the key.
    let req = dev.bootstrap_request(Some(CF_SENML_CBOR));
    let (_, finished) = h.run(&mut dev, peer, Some(&id), req);
    assert!(finished);
    assert_eq!(h.stores.len(), 2);
    assert_ne!(h.stores[1].psk.key, h.stores[0].psk.key);
    assert_eq!(dev.server_account().unwrap().key, h.stores[1].psk.key);
}

#[test]
fn tlv_for_a_1_0_client_without_discover() {
    let mut h = H::new(defaults());
    let e = EndpointEntry::new("dev-2", "acme", "default");
    h.provision("ep2", e);
    let mut dev = SimDevice::new("ep2", 2);
    dev.lwm2m_version = "1.0";
    dev.accept_formats = Some(vec![CF_TLV]);
    dev.set_bootstrap_account("coap://gw.example:5783", 0, b"", b"");
    let peer = PeerId::udp(addr(40002));
    let req = dev.bootstrap_request(None);
    let (code, finished) = h.run(&mut dev, peer, None, req);
    assert_eq!(code, Some(Code::CHANGED));
    assert!(finished);
    let acc = dev.server_account().unwrap();
    assert_eq!(acc.uri, "coap://gw.example:5683");
    assert_eq!(acc.mode, 3);
    assert!(acc.key.is_empty());
    assert!(dev.write_formats.iter().all(|cf| *cf == CF_TLV));
    assert_eq!(h.reasons(), ["bootstrapping", "bootstrapped"]);
    assert_eq!(h.sink.status[1]["bootstrap"]["lwm2m_version"], "1.0");
    assert!(h.stores.is_empty());
}

#[test]
fn refusals() {
    let mut h = H::new(defaults());
    h.provision("urn:imei:1", bs_entry("dev-1", "bs-1"));
    h.provision("urn:imei:2", bs_entry("dev-2", "bs-2"));
    let mut with_psk = EndpointEntry::new("dev-3", "acme", "default");
    with_psk.psk_identity = Some("id3".into());
    with_psk.psk_key_hex = Some(Secret("0102".into()));
    h.provision("ep3", with_psk);
    let peer = PeerId::dtls(addr(40003));
    // Unknown endpoint: 4.03, nothing written, no event.
    let mut dev = SimDevice::new("urn:imei:404", 3);
    let req = dev.bootstrap_request(None);
    let (code, finished) = h.run(&mut dev, peer, Some(&Identity::Psk(b"bs-1".to_vec())), req);
    assert_eq!((code, finished), (Some(Code::FORBIDDEN), false));
    // An identity bootstrapping another endpoint: 4.03.
    let mut dev = SimDevice::new("urn:imei:2", 3);
    let req = dev.bootstrap_request(None);
    let (code, _) = h.run(&mut dev, peer, Some(&Identity::Psk(b"bs-1".to_vec())), req);
    assert_eq!(code, Some(Code::FORBIDDEN));
    // Bootstrap credentials but plain CoAP: 4.03.
    let req = dev.bootstrap_request(None);
    let (code, _) = h.run(&mut dev, PeerId::udp(addr(40004)), None, req);
    assert_eq!(code, Some(Code::FORBIDDEN));
    // No bootstrap credentials, but the configuration carries a key:
    // never over plain CoAP.
    let mut dev = SimDevice::new("ep3", 4);
    let req = dev.bootstrap_request(None);
    let (code, _) = h.run(&mut dev, PeerId::udp(addr(40005)), None, req);
    assert_eq!(code, Some(Code::FORBIDDEN));
    assert!(dev.server_account().is_none(), "nothing written");
    assert_eq!(h.reasons(), ["bootstrap_failed"]);
    assert_eq!(h.sink.status[0]["bootstrap"]["step"], "request");
    assert_eq!(h.sink.status[0]["bootstrap"]["code"], "4.03");
    // Unsupported pct: 4.15; missing ep: 4.00.
    let mut dev = SimDevice::new("urn:imei:1", 5);
    let req = dev.bootstrap_request(Some(0));
    let (code, _) = h.run(&mut dev, peer, Some(&Identity::Psk(b"bs-1".to_vec())), req);
    assert_eq!(code, Some(Code::UNSUPPORTED_CONTENT_FORMAT));
    let bad = MessageBuilder::request(Code::POST, true)
        .mid(77)
        .token(&[1])
        .path("bs")
        .to_vec();
    let out = h.input(peer, None, &bad);
    assert_eq!(Message::decode(&out[0]).unwrap().code, Code::BAD_REQUEST);
    // Anything but POST /bs: 4.04; nothing in progress.
    let other = MessageBuilder::request(Code::POST, true)
        .mid(78)
        .token(&[1])
        .path("rd")
        .to_vec();
    let out = h.input(peer, None, &other);
    assert_eq!(Message::decode(&out[0]).unwrap().code, Code::NOT_FOUND);
    // Malformed input: no panic; a CON with a valid header (here a token
    // length of 9, RFC 7252 §3) gets RST with its MID, a runt nothing.
    assert!(h.input(peer, None, &[0x40, 0x01, 0x00]).is_empty());
    let out = h.input(peer, None, &[0x49, 0x01, 0x00, 0x07]);
    let rst = Message::decode(&out[0]).unwrap();
    assert_eq!((rst.mtype, rst.message_id), (MsgType::Rst, 7));
    assert_eq!(h.bs.sessions(), 0);
}

#[test]
fn device_errors_end_the_session_with_step_and_code() {
    let mut h = H::new(defaults());
    h.provision("urn:imei:1", bs_entry("dev-1", "bs-1"));
    let id = Identity::Psk(b"bs-1".to_vec());
    let peer = PeerId::dtls(addr(40010));
    // 4.00 to the Write of the Server instance.
    let mut dev = SimDevice::new("urn:imei:1", 1);
    dev.set_bootstrap_account("coaps://gw:5784", 0, b"bs-1", &[0, 0x11, 0x22, 0x33]);
    dev.fail.insert(
        (Code::PUT.0, ResourcePath::parse("/1/0").unwrap()),
        Code::BAD_REQUEST,
    );
    let req = dev.bootstrap_request(None);
    let (_, finished) = h.run(&mut dev, peer, Some(&id), req);
    assert!(!finished, "no Finish after a failed write");
    assert_eq!(h.reasons(), ["bootstrapping", "bootstrap_failed"]);
    let b = &h.sink.status[1]["bootstrap"];
    assert_eq!(b["step"], "write");
    assert_eq!(b["path"], "/1/0");
    assert_eq!(b["code"], "4.00");
    assert_eq!(b["diagnostic"], "refused");
    // 4.06 to Finish, with the client's diagnostic.
    h.sink.status.clear();
    dev.fail.clear();
    dev.fail_finish = Some((Code::NOT_ACCEPTABLE, "no server account".into()));
    let req = dev.bootstrap_request(None);
    let (_, finished) = h.run(&mut dev, peer, Some(&id), req);
    assert!(!finished);
    let b = &h.sink.status[1]["bootstrap"];
    assert_eq!(
        (b["step"].as_str(), b["code"].as_str()),
        (Some("finish"), Some("4.06"))
    );
    assert_eq!(b["diagnostic"], "no server account");
    // A device that goes silent: retransmissions, then timeout.
    h.sink.status.clear();
    dev.fail_finish = None;
    dev.silent = true;
    let req = dev.bootstrap_request(None);
    let out = h.input(peer, Some(&id), &req);
    assert_eq!(out.len(), 2, "2.04 and the first request");
    let mut sent = 0;
    for _ in 0..100 {
        sent += h.advance(Duration::from_secs(5)).len();
    }
    assert_eq!(sent, 4, "MAX_RETRANSMIT retransmissions (RFC 7252 §4.2)");
    let b = &h.sink.status[1]["bootstrap"];
    assert_eq!(
        (b["step"].as_str(), b["code"].as_str()),
        (Some("discover"), Some("timeout"))
    );
    assert_eq!(h.bs.sessions(), 0);
}

#[test]
fn store_failure_sends_no_finish_and_restart_replaces_the_session() {
    let mut h = H::new(BootstrapDefaults {
        generate_psk: true,
        ..defaults()
    });
    h.auto_store = false;
    h.provision("urn:imei:1", bs_entry("dev-1", "bs-1"));
    let id = Identity::Psk(b"bs-1".to_vec());
    let peer = PeerId::dtls(addr(40020));
    let mut dev = SimDevice::new("urn:imei:1", 1);
    dev.set_bootstrap_account("coaps://gw:5784", 0, b"bs-1", &[0, 0x11, 0x22, 0x33]);
    let req = dev.bootstrap_request(None);
    let (_, finished) = h.run(&mut dev, peer, Some(&id), req);
    assert!(!finished, "Finish waits for the store");
    assert_eq!(h.stores.len(), 1);
    let now = h.now();
    let mut ctx = BsCtx {
        endpoints: &h.eps,
        sink: &mut h.sink,
    };
    h.bs.handle_stored(
        now,
        &mut ctx,
        h.stores[0].session,
        Err("psk identity already provisioned for x".into()),
    );
    assert!(h.after(now).is_empty(), "no Finish");
    let b = &h.sink.status[1]["bootstrap"];
    assert_eq!(
        (b["step"].as_str(), b["code"].as_str()),
        (Some("store"), Some("5.00"))
    );
    // A new request while a session runs starts over.
    h.auto_store = true;
    let req = dev.bootstrap_request(None);
    let out = h.input(peer, Some(&id), &req);
    assert_eq!(out.len(), 2);
    let req = dev.bootstrap_request(None);
    let (_, finished) = h.run(&mut dev, peer, Some(&id), req);
    assert!(finished);
    assert_eq!(h.bs.sessions(), 0);
}

#[test]
fn large_writes_go_in_blocks_and_shrink_on_4_13() {
    let mut h = H::new(defaults());
    let mut e = bs_entry("dev-1", "bs-1");
    let big = "ab".repeat(1500);
    e.bootstrap.as_mut().unwrap().servers = vec![ServerAccount {
        security: Some(SecurityMode::X509),
        certificate_hex: Some(big.clone()),
        private_key_hex: Some(Secret("cd".repeat(100))),
        server_certificate_hex: Some(big),
        ..ServerAccount::new("coaps://other:5684", 3)
    }];
    h.provision("urn:imei:1", e);
    let id = Identity::Psk(b"bs-1".to_vec());
    let mut dev = SimDevice::new("urn:imei:1", 1);
    dev.set_bootstrap_account("coaps://gw:5784", 0, b"bs-1", &[0, 0x11, 0x22, 0x33]);
    dev.block_szx = 4;
    dev.block1_refuse_large = true;
    let req = dev.bootstrap_request(None);
    let (_, finished) = h.run(&mut dev, PeerId::dtls(addr(40030)), Some(&id), req);
    assert!(finished);
    assert_eq!(dev.bytes_of("/0/1/3").unwrap().len(), 1500);
    assert_eq!(dev.bytes_of("/0/1/4").unwrap(), vec![0xab; 1500]);
    let acc = dev.server_account().unwrap();
    assert_eq!((acc.mode, acc.ssid), (2, 3));
    // /0/1 is ~3.1 KB: one 1024-byte block refused with 4.13, then 256-byte
    // blocks (RFC 7959 §2.9.3).
    let writes = ShardMetrics::get(&h.bs.metrics.bootstrap_writes);
    assert!(writes >= 14, "{writes} write requests");
}

/// Every third datagram lost in each direction: the server retransmits its
/// requests, the device its Bootstrap-Request, duplicates are answered from
/// both sides' caches (RFC 7252 §4.2, §4.5), and the bootstrap ends once,
/// on both sides, with the key the device holds.
#[test]
fn lossy_network_still_finishes_once() {
    let mut h = H::new(BootstrapDefaults {
        generate_psk: true,
        ..defaults()
    });
    h.provision("urn:imei:1", bs_entry("dev-1", "bs-1"));
    let id = Identity::Psk(b"bs-1".to_vec());
    let peer = PeerId::dtls(addr(40040));
    let mut dev = SimDevice::new("urn:imei:1", 1);
    dev.set_bootstrap_account("coaps://gw:5784", 0, b"bs-1", &[0, 0x11, 0x22, 0x33]);
    let req = dev.bootstrap_request(None);
    let mut n = 0u32;
    let mut to_server = vec![req.clone()];
    let mut answered = false;
    let mut lost = 0;
    for round in 0..600 {
        let mut to_dev = Vec::new();
        for d in to_server.drain(..) {
            n += 1;
            if n % 3 == 0 {
                lost += 1;
                continue;
            }
            to_dev.extend(h.input(peer, Some(&id), &d));
        }
        if to_dev.is_empty() {
            to_dev = h.advance(Duration::from_secs(1));
            if !answered && round % 3 == 2 {
                to_server.push(req.clone());
            }
        }
        for d in to_dev {
            n += 1;
            if n % 3 == 0 {
                lost += 1;
                continue;
            }
            let ev = dev.handle(&d);
            answered |= ev.response.is_some();
            to_server.extend(ev.replies);
        }
        if dev.bootstraps_finished > 0 && h.bs.sessions() == 0 {
            break;
        }
    }
    assert!(lost >= 5, "{lost} datagrams lost");
    assert_eq!(dev.bootstraps_finished, 1);
    assert_eq!(h.bs.sessions(), 0);
    assert_eq!(h.reasons(), ["bootstrapping", "bootstrapped"]);
    assert_eq!(h.stores.len(), 1);
    assert_eq!(dev.server_account().unwrap().key, h.stores[0].psk.key);
}
