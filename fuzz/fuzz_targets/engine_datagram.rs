//! The whole LwM2M server on arbitrary datagrams: two shards, a registered
//! device, then fuzz input from its address and others, with timers running
//! and cross-shard messages delivered. Must never panic.
#![no_main]
use corem_lwm2m::proto::lwm2m::server::{Now, ServerConfig};
use corem_lwm2m::testkit::harness::Gateway;
use corem_lwm2m::testkit::sim::SimDevice;
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let mut gw = Gateway::new(2, ServerConfig::default());
    gw.provision("urn:imei:1", "d");
    let t0 = Instant::now();
    let now = |s: u64| Now {
        instant: t0 + Duration::from_secs(s),
        wall_ms: 1_700_000_000_000 + s as i64 * 1000,
    };
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let mut dev = SimDevice::new("urn:imei:1", 1);
    let mut inbound: Vec<Vec<u8>> = gw
        .datagram(now(0), peer, &dev.register())
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    for _ in 0..8 {
        let mut next = Vec::new();
        for d in inbound {
            for r in dev.handle(&d).replies {
                next.extend(gw.datagram(now(0), peer, &r).into_iter().map(|(_, d)| d));
            }
        }
        inbound = next;
    }
    for (i, chunk) in data.split(|b| *b == 0xA5).enumerate() {
        let p: SocketAddr = match i % 3 {
            0 => peer,
            1 => "127.0.0.1:6000".parse().unwrap(),
            _ => "127.0.0.1:6001".parse().unwrap(),
        };
        if chunk.first() == Some(&0x5A) {
            gw.oversized(now(i as u64), p, &chunk[1..]);
        } else {
            gw.datagram(now(i as u64), p, chunk);
        }
        gw.timeout(now(i as u64 * 3));
    }
});
