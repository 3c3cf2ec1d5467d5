//! Live heap per registered idle device, by component: what the RSS figure
//! of `perf/run-scenarios idle-100k` is made of (issue 12 target: ≤ 512 B per
//! plain registered device, observations included). A counting allocator
//! wraps the system one; each component is built for `N` devices and the
//! live bytes it holds are divided by `N`.
//!
//! `cargo bench --bench memory` (or `-- 100000` for another N). Prints a
//! table; nothing is asserted (perf/RESULTS.md records it).

use corem_lwm2m::control::directory::{Directory, EndpointEntry, ProvisionedEndpoint};
use corem_lwm2m::control::profiles::Profiles;
use corem_lwm2m::control::rpc_book::RpcBook;
use corem_lwm2m::metrics::ShardMetrics;
use corem_lwm2m::proto::coap::PeerId;
use corem_lwm2m::proto::lwm2m::output::DeliveryTag;
use corem_lwm2m::proto::lwm2m::rpc::RpcEvent;
use corem_lwm2m::proto::lwm2m::server::{Ctx, Now, Server, ServerConfig};
use corem_lwm2m::sink::{Sink, SinkError, StatusEvent, TelemetryPoint};
use corem_lwm2m::testkit::sim::SimDevice;
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Confirms every record at once and keeps nothing.
#[derive(Default)]
struct NullSink(Vec<DeliveryTag>);
impl Sink for NullSink {
    fn has_capacity(&self, _: usize) -> bool {
        true
    }
    fn publish_telemetry(
        &mut self,
        _: &TelemetryPoint<'_>,
        tag: Option<DeliveryTag>,
    ) -> Result<(), SinkError> {
        if let Some(t) = tag {
            self.0.push(t);
        }
        Ok(())
    }
    fn publish_status(&mut self, _: &StatusEvent<'_>) -> Result<(), SinkError> {
        Ok(())
    }
    fn publish_bootstrap(
        &mut self,
        _: &corem_lwm2m::proto::lwm2m::output::BootstrapEvent<'_>,
    ) -> Result<(), SinkError> {
        Ok(())
    }
}

fn endpoint(i: usize) -> String {
    format!("urn:imei:{:015}", 350_000_000_000_000 + i)
}

fn provisioned(n: usize) -> Vec<ProvisionedEndpoint> {
    (0..n)
        .map(|i| ProvisionedEndpoint {
            endpoint: endpoint(i),
            entry: EndpointEntry::new(&format!("dev-{i:08}"), "perf", "default"),
        })
        .collect()
}

/// Heap bytes the bench itself holds in the presence reports it keeps for
/// the RPC book (not the engine's).
fn events_bytes(v: &Vec<RpcEvent>) -> isize {
    let strings: usize = v
        .iter()
        .map(|e| match e {
            RpcEvent::Presence(p) => {
                p.device_id.capacity()
                    + p.tenant_id.capacity()
                    + p.registration_id.capacity()
                    + p.address.capacity()
                    + p.binding.capacity()
            }
            _ => 0,
        })
        .sum();
    (v.capacity() * std::mem::size_of::<RpcEvent>() + strings) as isize
}

fn per(bytes: isize, n: usize) -> f64 {
    bytes as f64 / n as f64
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    println!("live heap per device, N = {n} (counting allocator over the system one)\n");
    println!("| component | bytes / device |");
    println!("|---|---|");

    // The directory: one provisioned endpoint (not a registration; the
    // idle figure subtracts it as the start RSS).
    let l0 = live();
    let dir = Directory::default();
    dir.upsert_many(provisioned(n)).unwrap();
    let endpoints = dir.snapshot();
    println!(
        "| directory, per provisioned endpoint | {:.0} |",
        per(live() - l0, n)
    );

    // One shard's engine with N registered devices, each answering the
    // profile's Observes, then idle past EXCHANGE_LIFETIME.
    let profiles = Profiles::from_profiles(vec![]).snapshot();
    let mut sink = NullSink::default();
    let l1 = live();
    let mut e = Server::new(ServerConfig::default(), Arc::new(ShardMetrics::default()));
    let t0 = Instant::now();
    let wall0 = 1_795_608_634_287;
    let now_at = |d: Duration| Now {
        instant: t0 + d,
        wall_ms: wall0 + d.as_millis() as i64,
    };
    let mut rpc_events = Vec::new();
    for i in 0..n {
        let now = now_at(Duration::from_micros(i as u64 * 50));
        let addr = SocketAddr::from((
            Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8),
            40_000 + (i % 20_000) as u16,
        ));
        let peer = PeerId::udp(addr);
        let mut dev = SimDevice::new(&endpoint(i), i as u16);
        // As the idle scenario's load generator (--lifetime 3600).
        dev.lifetime_s = 3600;
        let mut inbound = vec![dev.register()];
        for _ in 0..20 {
            let mut next = Vec::new();
            for d in inbound {
                let mut ctx = Ctx {
                    endpoints: &endpoints,
                    profiles: &profiles,
                    sink: &mut sink,
                };
                e.handle_datagram(now, &mut ctx, peer, None, &d);
                for t in sink.0.drain(..) {
                    e.handle_delivery(now, t, true);
                }
                let out: Vec<Vec<u8>> = e.transmits().map(|(_, d)| d.to_vec()).collect();
                e.clear_transmits();
                for o in out {
                    next.extend(dev.handle(&o).replies);
                }
            }
            if next.is_empty() {
                break;
            }
            inbound = next;
        }
        while let Some(ev) = e.poll_rpc_event() {
            rpc_events.push(ev);
        }
    }
    let registered = live() - l1 - events_bytes(&rpc_events);
    let est_registered = e.heap_estimate();
    // Idle past EXCHANGE_LIFETIME (RFC 7252 §4.8.2: 247 s) so the Register
    // exchanges held for duplicate detection are gone.
    let late = now_at(Duration::from_secs(600));
    let mut ctx = Ctx {
        endpoints: &endpoints,
        profiles: &profiles,
        sink: &mut sink,
    };
    while e.poll_timeout().is_some_and(|t| t <= late.instant) {
        e.handle_timeout(late, &mut ctx);
    }
    e.clear_transmits();
    while let Some(ev) = e.poll_rpc_event() {
        rpc_events.push(ev);
    }
    let idle = live() - l1 - events_bytes(&rpc_events);
    println!(
        "| shard engine, just after registering (exchanges still held) | {:.0} |",
        per(registered, n)
    );
    println!(
        "| shard engine, after EXCHANGE_LIFETIME | {:.0} |",
        per(idle, n)
    );
    println!("\nthe shard engine's tables, estimated (bytes / device): just after registering → after EXCHANGE_LIFETIME\n");
    println!("| structure | registering | idle |");
    println!("|---|---|---|");
    for ((name, a), (_, b)) in est_registered.iter().zip(e.heap_estimate()) {
        println!(
            "| {name} | {:.0} | {:.0} |",
            per(*a as isize, n),
            per(b as isize, n)
        );
    }
    println!(
        "\nsizes: Registration {} B, Observation {} B, PeerId {} B, PresenceState {} B",
        std::mem::size_of::<corem_lwm2m::proto::lwm2m::registration::Registration>(),
        std::mem::size_of::<corem_lwm2m::proto::lwm2m::observe::Observation>(),
        std::mem::size_of::<PeerId>(),
        std::mem::size_of::<corem_lwm2m::proto::lwm2m::rpc::PresenceState>(),
    );
    println!(
        "\n({} registrations, {} observations on the engine; {} presence reports)\n",
        e.registration_count(),
        e.observation_count(),
        rpc_events.len()
    );

    // The RPC service's view: one presence report kept per device (the
    // reports' strings move into the book: counted with it).
    let moved = events_bytes(&rpc_events);
    let l2 = live();
    let mut book = RpcBook::new(3_600_000);
    for ev in rpc_events.drain(..) {
        book.handle_event(wall0, ev);
    }
    drop(rpc_events);
    println!(
        "| RPC book, presence per device | {:.0} |",
        per(live() - l2 + moved, n)
    );
    std::hint::black_box((&e, &book, &dir));
}
