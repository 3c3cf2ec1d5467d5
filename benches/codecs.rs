//! Micro-benchmarks of the per-datagram work: CoAP decode/encode, link-format,
//! TLV / SenML JSON / SenML CBOR decode, directory lookups under concurrent
//! readers, TelemetryPoint encoding, and one whole notification through the
//! engine (decode → map → encode → ACK) with an in-memory sink.
//! `cargo bench` (results are not asserted; see perf/RESULTS.md).

use corem_lwm2m::control::directory::{Directory, EndpointEntry, ProvisionedEndpoint};
use corem_lwm2m::control::profiles::Profiles;
use corem_lwm2m::metrics::ShardMetrics;
use corem_lwm2m::proto::cbor::enc;
use corem_lwm2m::proto::coap::PeerId;
use corem_lwm2m::proto::coap::{Code, Message, MessageBuilder, MsgType};
use corem_lwm2m::proto::lwm2m::content::Num;
use corem_lwm2m::proto::lwm2m::content::{self, tlv_kind, ResourcePath};
use corem_lwm2m::proto::lwm2m::link_format;
use corem_lwm2m::proto::lwm2m::output::{AckPolicy, DeliveryTag};
use corem_lwm2m::proto::lwm2m::server::{Ctx, Now, Server, ServerConfig};
use corem_lwm2m::sink::json;
use corem_lwm2m::sink::{PointSource, Sink, SinkError, StatusEvent, TelemetryPoint};
use corem_lwm2m::testkit::sim::SimDevice;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn notification() -> Vec<u8> {
    MessageBuilder::request(Code::CONTENT, true)
        .mid(0x1234)
        .token(&[1, 2, 3, 4, 5, 6, 7, 8])
        .observe(0x1234)
        .content_format(0)
        .payload(b"22.5")
        .to_vec()
}

fn coap_benches(c: &mut Criterion) {
    let n = notification();
    let mut g = c.benchmark_group("coap");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_notification", |b| {
        b.iter(|| {
            let m = Message::decode(black_box(&n)).unwrap();
            black_box((m.observe(), m.content_format(), m.payload.len()))
        })
    });
    let mut reg = SimDevice::new("urn:imei:123456789012345", 1);
    let r = reg.register();
    g.bench_function("decode_register_and_walk_options", |b| {
        b.iter(|| {
            let m = Message::decode(black_box(&r)).unwrap();
            black_box(m.options().count())
        })
    });
    let mut out = Vec::with_capacity(128);
    g.bench_function("encode_register_response", |b| {
        b.iter(|| {
            out.clear();
            MessageBuilder::response_to(MsgType::Con, 7, Code::CREATED)
                .token(&[1, 2, 3, 4])
                .location_segment(b"rd")
                .location_segment(b"07eb3e554bfdee5f")
                .encode(&mut out);
            black_box(out.len())
        })
    });
    g.finish();
}

fn payload_benches(c: &mut Criterion) {
    let links = br#"</>;rt="oma.lwm2m";ct="60 110 112 11542 11543",</1/0>,</3/0>;ver=1.1,</4/0>,</5/0>,</3303/0>,</3303/1>,</3304/0>,</3323/0>,</6/0>"#;
    let mut tlv = Vec::new();
    for (id, v) in [(5700u16, 22.5f64), (5601, 10.0), (5602, 30.0)] {
        content::encode_tlv_resource(&mut tlv, tlv_kind::RESOURCE, id, &v.to_be_bytes());
    }
    content::encode_tlv_resource(&mut tlv, tlv_kind::RESOURCE, 5701, b"Cel");
    let senml_json = br#"[{"bn":"/3303/0/","bt":1700000000,"n":"5700","v":22.5},{"n":"5601","v":10},{"n":"5602","v":30},{"n":"5701","vs":"Cel"}]"#;
    let mut senml_cbor = Vec::new();
    enc::array(&mut senml_cbor, 3);
    for (i, (n, v)) in [("5700", 22.5), ("5601", 10.0), ("5602", 30.0)]
        .iter()
        .enumerate()
    {
        enc::map(&mut senml_cbor, if i == 0 { 3 } else { 2 });
        if i == 0 {
            enc::int(&mut senml_cbor, -2);
            enc::text(&mut senml_cbor, "/3303/0/");
        }
        enc::int(&mut senml_cbor, 0);
        enc::text(&mut senml_cbor, n);
        enc::int(&mut senml_cbor, 2);
        enc::f64(&mut senml_cbor, *v);
    }
    let inst = ResourcePath::parse("/3303/0").unwrap();
    let root = ResourcePath::parse("/0").unwrap();
    let mut g = c.benchmark_group("payload");
    g.throughput(Throughput::Elements(1));
    g.bench_function("link_format_registration_10_links", |b| {
        b.iter(|| link_format::parse_registration(black_box(links)).unwrap())
    });
    g.bench_function("tlv_instance_4_resources", |b| {
        b.iter(|| content::decode(content::CF_TLV, inst, black_box(&tlv), 0).unwrap())
    });
    g.bench_function("senml_json_4_records", |b| {
        b.iter(|| content::decode(content::CF_SENML_JSON, root, black_box(senml_json), 0).unwrap())
    });
    g.bench_function("senml_cbor_3_records", |b| {
        b.iter(|| content::decode(content::CF_SENML_CBOR, root, black_box(&senml_cbor), 0).unwrap())
    });
    g.bench_function("text_single", |b| {
        let p = ResourcePath::parse("/3303/0/5700").unwrap();
        b.iter(|| content::decode(content::CF_TEXT, p, black_box(b"22.5"), 0).unwrap())
    });
    g.finish();
}

fn entry(i: usize) -> EndpointEntry {
    EndpointEntry::new(&format!("device-{i:08}"), "acme", "default")
}

fn directory_benches(c: &mut Criterion) {
    let d = Arc::new(Directory::default());
    d.upsert_many(
        (0..100_000)
            .map(|i| ProvisionedEndpoint {
                endpoint: format!("urn:imei:{i:015}"),
                entry: entry(i),
            })
            .collect(),
    )
    .unwrap();
    let mut g = c.benchmark_group("directory");
    g.throughput(Throughput::Elements(1));
    g.bench_function("lookup_100k", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % 100_000;
            black_box(d.get(&format!("urn:imei:{i:015}")))
        })
    });
    // The same lookup while another thread hammers reads and a writer swaps
    // in a new map every 10 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (d, stop) = (d.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i = (i + 104_729) % 100_000;
                black_box(d.get(&format!("urn:imei:{i:015}")));
            }
        })
    };
    let writer = {
        let (d, stop) = (d.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let _ = d.upsert(&format!("urn:new:{i}"), entry(i));
                i += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    g.bench_function("lookup_100k_concurrent_reader_and_writer", |b| {
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7919) % 100_000;
            black_box(d.get(&format!("urn:imei:{i:015}")))
        })
    });
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let _ = writer.join();
    g.finish();
}

fn telemetry_encoding(c: &mut Criterion) {
    let nv = [
        ("battery_level", Num::Int(87)),
        ("temperature", Num::Float(22.5)),
    ];
    let p = TelemetryPoint {
        tenant_id: "acme",
        device_id: "d7b1c0e2-3f44-4a91-9b2e-2c5a1f0e9d33",
        endpoint: "urn:imei:123456789012345",
        ts: 1_795_608_634_287,
        received_at: 1_795_608_634_287,
        numeric_values: &nv,
        string_values: &[],
        bool_values: &[],
        source: PointSource {
            protocol: "lwm2m",
            operation: "notify",
            path: "/3303/0/5700",
            content_format: 0,
            observe_seq: Some(12),
            shard: 0,
            registration_id: "07eb3e554bfdee5f",
        },
    };
    let mut buf = Vec::with_capacity(512);
    let mut g = c.benchmark_group("sink");
    g.throughput(Throughput::Elements(1));
    g.bench_function("telemetry_point_json", |b| {
        b.iter(|| {
            buf.clear();
            json::encode_point(black_box(&p), &mut buf);
            black_box(buf.len())
        })
    });
    g.finish();
}

/// Encodes what a real producer would be handed, without Kafka; remembers
/// the delivery tags so the bench can confirm them.
struct NullSink(Vec<u8>, Vec<DeliveryTag>);
impl Sink for NullSink {
    fn has_capacity(&self, _: usize) -> bool {
        true
    }
    fn publish_telemetry(
        &mut self,
        p: &TelemetryPoint<'_>,
        tag: Option<DeliveryTag>,
    ) -> Result<(), SinkError> {
        self.0.clear();
        json::encode_point(p, &mut self.0);
        if let Some(t) = tag {
            self.1.push(t);
        }
        Ok(())
    }
    fn publish_status(&mut self, e: &StatusEvent<'_>) -> Result<(), SinkError> {
        self.0.clear();
        json::encode_status(e, &mut self.0).map_err(|_| SinkError::Rejected)
    }
    fn publish_bootstrap(
        &mut self,
        e: &corem_lwm2m::proto::lwm2m::output::BootstrapEvent<'_>,
    ) -> Result<(), SinkError> {
        self.0.clear();
        serde_json::to_writer(&mut self.0, e).map_err(|_| SinkError::Rejected)
    }
}

fn engine_benches(c: &mut Criterion) {
    let d = Directory::default();
    d.upsert("urn:imei:1", entry(1)).unwrap();
    let endpoints = d.snapshot();
    let profiles = Profiles::from_profiles(vec![]).snapshot();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    for (name, con, policy) in [
        ("notification_non", false, AckPolicy::Queued),
        ("notification_con", true, AckPolicy::Queued),
        (
            "notification_con_ack_after_delivery",
            true,
            AckPolicy::Delivered,
        ),
    ] {
        let cfg = ServerConfig {
            ack_policy: policy,
            ..ServerConfig::default()
        };
        let mut e = Server::new(cfg, Arc::new(ShardMetrics::default()));
        let mut sink = NullSink(Vec::with_capacity(512), Vec::new());
        let peer = PeerId::udp("127.0.0.1:40000".parse().unwrap());
        let t0 = Instant::now();
        let now = Now {
            instant: t0,
            wall_ms: 1_795_608_634_287,
        };
        let mut dev = SimDevice::new("urn:imei:1", 1);
        // Register and answer the Observes (one at a time, NSTART = 1).
        let mut inbound = {
            let mut ctx = Ctx {
                endpoints: &endpoints,
                profiles: &profiles,
                sink: &mut sink,
            };
            e.handle_datagram(now, &mut ctx, peer, None, &dev.register());
            let out: Vec<Vec<u8>> = e.transmits().map(|(_, d)| d.to_vec()).collect();
            e.clear_transmits();
            out
        };
        for _ in 0..20 {
            let mut next = Vec::new();
            for o in inbound {
                for r in dev.handle(&o).replies {
                    let mut ctx = Ctx {
                        endpoints: &endpoints,
                        profiles: &profiles,
                        sink: &mut sink,
                    };
                    e.handle_datagram(now, &mut ctx, peer, None, &r);
                    next.extend(e.transmits().map(|(_, d)| d.to_vec()));
                    e.clear_transmits();
                }
            }
            inbound = next;
        }
        for t in std::mem::take(&mut sink.1) {
            e.handle_delivery(now, t, true);
        }
        e.clear_transmits();
        g.bench_function(name, |b| {
            b.iter_batched(
                || dev.notify("/3303/0/5700", con).unwrap().1,
                |n| {
                    let mut ctx = Ctx {
                        endpoints: &endpoints,
                        profiles: &profiles,
                        sink: &mut sink,
                    };
                    e.handle_datagram(now, &mut ctx, peer, None, &n);
                    for t in sink.1.drain(..) {
                        e.handle_delivery(now, t, true);
                    }
                    e.clear_transmits();
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// One device's whole registration cycle through the engine, as the
/// registration storm drives it: Register (status event, presence report),
/// the profile's Observe requests answered with their first values, then
/// De-register. Devices are pre-built so the device side is not timed; each
/// iteration uses a fresh endpoint and address.
fn registration_benches(c: &mut Criterion) {
    const N: usize = 4096;
    let d = Directory::default();
    d.upsert_many(
        (0..N)
            .map(|i| ProvisionedEndpoint {
                endpoint: format!("urn:imei:{i:015}"),
                entry: entry(i),
            })
            .collect(),
    )
    .unwrap();
    let endpoints = d.snapshot();
    let profiles = Profiles::from_profiles(vec![]).snapshot();
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    let mut e = Server::new(ServerConfig::default(), Arc::new(ShardMetrics::default()));
    let mut sink = NullSink(Vec::with_capacity(512), Vec::new());
    let t0 = Instant::now();
    let mut i = 0usize;
    g.bench_function("registration_cycle", |b| {
        b.iter_batched(
            || {
                i += 1;
                let k = i % N;
                let dev = SimDevice::new(&format!("urn:imei:{k:015}"), k as u16);
                let peer = PeerId::udp(std::net::SocketAddr::from((
                    [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                    40_000 + (i % 20_000) as u16,
                )));
                (dev, peer, i)
            },
            |(mut dev, peer, i)| {
                let now = Now {
                    instant: t0 + Duration::from_micros(i as u64),
                    wall_ms: 1_795_608_634_287 + i as i64 / 1000,
                };
                let mut inbound = vec![dev.register()];
                for round in 0..21 {
                    if inbound.is_empty() {
                        if round > 0 {
                            inbound.push(dev.deregister());
                        }
                        if inbound.is_empty() {
                            break;
                        }
                    }
                    let mut next = Vec::new();
                    for m in inbound.drain(..) {
                        let mut ctx = Ctx {
                            endpoints: &endpoints,
                            profiles: &profiles,
                            sink: &mut sink,
                        };
                        e.handle_datagram(now, &mut ctx, peer, None, &m);
                        for t in sink.1.drain(..) {
                            e.handle_delivery(now, t, true);
                        }
                        let out: Vec<Vec<u8>> = e.transmits().map(|(_, d)| d.to_vec()).collect();
                        e.clear_transmits();
                        for o in out {
                            next.extend(dev.handle(&o).replies);
                        }
                    }
                    while e.poll_rpc_event().is_some() {}
                    inbound = next;
                    if inbound.is_empty() && e.registration_count() == 0 {
                        break;
                    }
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    registration_benches,
    coap_benches,
    payload_benches,
    directory_benches,
    telemetry_encoding,
    engine_benches
);
criterion_main!(benches);
