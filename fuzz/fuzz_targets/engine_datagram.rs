//! The whole server engine on arbitrary datagrams: a registered device, then
//! fuzz input from the same and other peers. Must never panic.
#![no_main]
use corem_lwm2m::config::CoapConfig;
use corem_lwm2m::control::directory::{Directory, EndpointEntry};
use corem_lwm2m::metrics::ShardMetrics;
use corem_lwm2m::control::profiles::Profiles;
use corem_lwm2m::proto::lwm2m::server::{Engine, Now};
use corem_lwm2m::testkit::sim::SimDevice;
use corem_lwm2m::sink::MemorySink;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let d = Directory::default();
    let _ = d.upsert(
        "urn:imei:1",
        EndpointEntry {
            device_id: "d".into(),
            tenant_id: "t".into(),
            profile: "default".into(),
            psk_identity: None,
            psk_key_hex: None,
        },
    );
    let mut e = Engine::new(0, 1, CoapConfig::default(), Arc::new(d), Arc::new(Profiles::from_profiles(vec![])), Arc::new(ShardMetrics::default()));
    let mut sink = MemorySink::default();
    let t0 = Instant::now();
    let peer = "127.0.0.1:5000".parse().unwrap();
    let mut dev = SimDevice::new("urn:imei:1", 1);
    let now = |s: u64| Now { instant: t0 + Duration::from_secs(s), wall_ms: 1_700_000_000_000 };
    e.handle_datagram(now(0), peer, &dev.register(), &mut sink);
    let replies: Vec<Vec<u8>> = e.transmits().map(|(_, d)| d.to_vec()).collect();
    e.clear_transmits();
    for r in replies {
        for a in dev.handle(&r).replies {
            e.handle_datagram(now(0), peer, &a, &mut sink);
        }
    }
    for (i, chunk) in data.split(|b| *b == 0xA5).enumerate() {
        let p = if i % 2 == 0 { peer } else { "127.0.0.1:6000".parse().unwrap() };
        e.handle_datagram(now(i as u64), p, chunk, &mut sink);
        e.handle_timeout(now(i as u64 * 3), &mut sink);
        e.clear_transmits();
    }
});
