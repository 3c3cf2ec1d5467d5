//! The bootstrap server on arbitrary input: a session opened by a valid
//! Bootstrap-Request, then fuzz chunks as raw datagrams or as answers (any
//! code, options, payload) to whatever request is outstanding, with timers
//! and store answers in between. Exercises the Bootstrap-Discover parser,
//! Block1 continuation and 4.13 handling, and every failure path. Must never
//! panic.
#![no_main]
use corem_lwm2m::metrics::ShardMetrics;
use corem_lwm2m::proto::coap::{Code, Message, MessageBuilder, MsgType, PeerId};
use corem_lwm2m::proto::lwm2m::bootstrap::{
    BootstrapConfig, BootstrapDefaults, BootstrapServer, BootstrapSettings, BsCtx,
};
use corem_lwm2m::proto::lwm2m::endpoint::{EndpointEntry, EndpointMap, Secret};
use corem_lwm2m::proto::lwm2m::server::Now;
use corem_lwm2m::testkit::memory_sink::MemorySink;
use corem_lwm2m::testkit::sim::SimDevice;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let cfg = BootstrapConfig {
        defaults: BootstrapDefaults {
            server_uri: Some("coaps://gw:5684".into()),
            server_uri_plain: Some("coap://gw:5683".into()),
            generate_psk: data.first().is_some_and(|b| b & 1 == 1),
            ..BootstrapDefaults::default()
        },
        delete_root: data.first().is_some_and(|b| b & 2 == 2),
        block_szx: 0,
        ..BootstrapConfig::default()
    };
    let mut bs = BootstrapServer::new(cfg, Arc::new(ShardMetrics::default()));
    let mut eps = EndpointMap::default();
    let mut e = EndpointEntry::new("d", "t", "default");
    e.psk_identity = Some("id".into());
    e.psk_key_hex = Some(Secret("0102".into()));
    e.bootstrap = Some(Box::new(BootstrapSettings {
        psk_identity: Some("x".into()),
        psk_key_hex: Some(Secret("0304".into())),
        ..BootstrapSettings::default()
    }));
    eps.insert("ep".into(), Arc::new(e));
    let mut sink = MemorySink::default();
    let t0 = Instant::now();
    let now = |s: u64| Now {
        instant: t0 + Duration::from_millis(s * 300),
        wall_ms: 1_700_000_000_000 + s as i64 * 300,
    };
    let peer = PeerId::dtls("127.0.0.1:5000".parse().unwrap());
    let id = corem_lwm2m::proto::lwm2m::endpoint::Identity::Psk(b"x".to_vec());
    let mut dev = SimDevice::new("ep", 1);
    let req = dev.bootstrap_request(None);
    let mut ctx = BsCtx {
        endpoints: &eps,
        sink: &mut sink,
    };
    bs.handle_datagram(now(0), &mut ctx, peer, Some(&id), &req);
    assert_eq!(bs.sessions(), 1);
    let mut last: Vec<u8> = bs.transmits().last().map(|(_, d)| d.to_vec()).unwrap_or_default();
    bs.clear_transmits();
    for (i, chunk) in data.split(|b| *b == 0xA5).enumerate() {
        let t = now(i as u64);
        let mut ctx = BsCtx {
            endpoints: &eps,
            sink: &mut sink,
        };
        match chunk.first() {
            // An answer to the outstanding request: code, then payload.
            Some(0x01) if chunk.len() >= 2 => {
                if let Ok(m) = Message::decode(&last) {
                    let a = MessageBuilder::new(MsgType::Ack, Code(chunk[1]))
                        .mid(m.message_id)
                        .token(m.token)
                        .payload(&chunk[2..])
                        .to_vec();
                    bs.handle_datagram(t, &mut ctx, peer, Some(&id), &a);
                }
            }
            Some(0x02) => {
                bs.handle_stored(t, &mut ctx, chunk.len() as u64 % 4, Err("x".into()))
            }
            Some(0x03) => bs.handle_stored(t, &mut ctx, 1, Ok(())),
            _ => bs.handle_datagram(t, &mut ctx, peer, Some(&id), chunk),
        }
        bs.handle_timeout(now(i as u64 * 2), &mut ctx);
        while bs.poll_store().is_some() {}
        if let Some((_, d)) = bs.transmits().last() {
            last = d.to_vec();
        }
        bs.clear_transmits();
    }
});
