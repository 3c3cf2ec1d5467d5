//! `lwm2m-devsim`: a handful of simulated LwM2M devices for the demo and for
//! manual testing. Each device has its own UDP socket, registers, answers the
//! gateway's Write-Attributes / Observe / Read / Execute, then sends a
//! notification for every observed resource each interval with drifting
//! values, updates before its lifetime runs out, and de-registers on exit.
//!
//! `--dtls`: each device first does a DTLS-PSK handshake with the gateway
//! (`--server` is then its DTLS port), with the identity and key the
//! provisioning file (`--provisioning`) holds for its endpoint.

use clap::Parser;
use corem_lwm2m::control::directory::Directory;
use corem_lwm2m::proto::lwm2m::content::{self, ResourcePath};
use corem_lwm2m::testkit::dtls_client::{client_context, ClientAuth, DtlsClient, Udp};
use corem_lwm2m::testkit::sim::SimDevice;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Gateway CoAP address.
    #[arg(long, default_value = "127.0.0.1:5683")]
    server: SocketAddr,
    /// Number of devices.
    #[arg(long, default_value_t = 3)]
    devices: usize,
    /// Endpoint names are PREFIX{index}.
    #[arg(long, default_value = "urn:imei:35000000000000")]
    prefix: String,
    /// Notification interval per device (ms).
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Content format: text, tlv, senml-json, senml-cbor, cbor, lwm2m-json, opaque.
    #[arg(long, default_value = "text")]
    format: String,
    /// Registration lifetime (s).
    #[arg(long, default_value_t = 60)]
    lifetime: u32,
    /// Run for this many seconds (0 = until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Use NON notifications instead of CON.
    #[arg(long)]
    non: bool,
    /// Talk DTLS-PSK (`--server` is the gateway's DTLS port).
    #[arg(long)]
    dtls: bool,
    /// Provisioning file holding each endpoint's PSK (with `--dtls`).
    #[arg(long, default_value = "config/provisioning.toml")]
    provisioning: std::path::PathBuf,
    /// Cipher suites offered (OpenSSL names) with `--dtls`.
    #[arg(long, default_value = "PSK-AES128-CCM8")]
    ciphers: String,
}

/// The device's transport: plain UDP or a DTLS session.
enum Link {
    Plain(UdpSocket),
    Dtls(Box<DtlsClient<Udp>>),
}

impl Link {
    fn send(&mut self, d: &[u8], server: SocketAddr) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.send_to(d, server).map(|_| ()),
            Link::Dtls(c) => c.send(d),
        }
    }
    fn recv(&mut self, buf: &mut [u8]) -> Option<usize> {
        match self {
            Link::Plain(s) => s.recv_from(buf).ok().map(|(n, _)| n),
            Link::Dtls(c) => match c.try_recv() {
                Ok(Some(d)) => {
                    let n = d.len().min(buf.len());
                    buf[..n].copy_from_slice(&d[..n]);
                    Some(n)
                }
                _ => None,
            },
        }
    }
}

fn format_code(s: &str) -> anyhow::Result<u16> {
    Ok(match s {
        "text" => content::CF_TEXT,
        "tlv" => content::CF_TLV,
        "senml-json" => content::CF_SENML_JSON,
        "senml-cbor" => content::CF_SENML_CBOR,
        "cbor" => content::CF_CBOR,
        "lwm2m-json" => content::CF_LWM2M_JSON,
        "opaque" => content::CF_OPAQUE,
        _ => anyhow::bail!("unknown format {s}"),
    })
}

struct Dev {
    sim: SimDevice,
    sock: Link,
    registered: bool,
    last_register: Instant,
    last_update: Instant,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let fmt = format_code(&a.format)?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let creds = if a.dtls {
        Directory::read_provisioning(&a.provisioning)?
    } else {
        Vec::new()
    };
    let mut devs = Vec::new();
    for i in 0..a.devices {
        let endpoint = format!("{}{}", a.prefix, i);
        let sock = if a.dtls {
            let e = creds
                .iter()
                .find(|p| p.endpoint == endpoint)
                .ok_or_else(|| {
                    anyhow::anyhow!("{endpoint} is not in {}", a.provisioning.display())
                })?;
            let (Some(identity), Some(key)) = (e.entry.psk_identity_bytes(), e.entry.psk_key())
            else {
                anyhow::bail!("{endpoint} has no PSK in {}", a.provisioning.display());
            };
            let ctx = client_context(&ClientAuth::Psk { identity, key }, &a.ciphers)?;
            let t = Instant::now();
            let mut c = DtlsClient::connect(
                &ctx,
                "127.0.0.1:0".parse()?,
                a.server,
                Duration::from_secs(10),
            )
            .map_err(|e| anyhow::anyhow!("{endpoint}: DTLS handshake with {}: {e}", a.server))?;
            println!(
                "{endpoint}: DTLS session ({}) in {:.1} ms",
                c.ssl().current_cipher().map(|c| c.name()).unwrap_or("?"),
                t.elapsed().as_secs_f64() * 1e3
            );
            c.transport_socket().set_nonblocking(true)?;
            Link::Dtls(Box::new(c))
        } else {
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            sock.set_nonblocking(true)?;
            Link::Plain(sock)
        };
        let mut sim = SimDevice::new(&endpoint, i as u16);
        sim.format = fmt;
        sim.lifetime_s = a.lifetime;
        devs.push(Dev {
            sim,
            sock,
            registered: false,
            last_register: Instant::now() - Duration::from_secs(60),
            last_update: Instant::now(),
        });
    }
    let start = Instant::now();
    let mut next_notify = Instant::now() + Duration::from_millis(a.interval_ms);
    let mut buf = [0u8; 2048];
    let mut tick: u64 = 0;
    while !stop.load(Ordering::Relaxed) && (a.seconds == 0 || start.elapsed().as_secs() < a.seconds)
    {
        for d in devs.iter_mut() {
            if !d.registered && d.last_register.elapsed() > Duration::from_secs(3) {
                d.last_register = Instant::now();
                let r = d.sim.register();
                d.sock.send(&r, a.server)?;
            }
            if d.registered
                && d.last_update.elapsed() > Duration::from_secs((a.lifetime as u64 * 2 / 3).max(1))
            {
                d.last_update = Instant::now();
                let u = d.sim.update(None, false);
                d.sock.send(&u, a.server)?;
            }
            while let Some(n) = d.sock.recv(&mut buf) {
                let ev = d.sim.handle(&buf[..n]);
                if ev.registered {
                    d.registered = true;
                    d.last_update = Instant::now();
                    println!(
                        "{} registered as /rd/{}",
                        d.sim.endpoint,
                        d.sim.location.as_deref().unwrap_or("?")
                    );
                }
                if let Some((_, code)) = ev.response {
                    if code.class() == 4 {
                        // 4.04 on Update: register again.
                        d.registered = false;
                        eprintln!("{}: server answered {code}", d.sim.endpoint);
                    }
                }
                for p in &ev.observed {
                    println!("{} observed by gateway: {p}", d.sim.endpoint);
                }
                for p in &ev.executed {
                    println!("{} executed {p}", d.sim.endpoint);
                }
                for r in ev.replies {
                    d.sock.send(&r, a.server)?;
                }
            }
        }
        if Instant::now() >= next_notify {
            next_notify += Duration::from_millis(a.interval_ms);
            tick += 1;
            for (i, d) in devs.iter_mut().enumerate() {
                // Drift the values a little so the topic shows change.
                let phase = (tick as f64 + i as f64) / 5.0;
                for (k, v) in d.sim.values.iter_mut() {
                    let base = match (k.object, k.resource) {
                        (3303, _) => 21.0 + 2.0 * phase.sin(),
                        (3304, _) => 45.0 + 5.0 * phase.cos(),
                        (3323, _) => 1013.0 + phase.sin(),
                        (3, Some(9)) => (100 - (tick / 10 % 100)) as f64,
                        _ => *v,
                    };
                    *v = (base * 100.0).round() / 100.0;
                }
                let paths: Vec<ResourcePath> = d.sim.observations.iter().map(|o| o.path).collect();
                for p in paths {
                    if let Some((_, msg)) = d.sim.notify(&p.to_string(), !a.non) {
                        d.sock.send(&msg, a.server)?;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for d in devs.iter_mut().filter(|d| d.registered) {
        let m = d.sim.deregister();
        let _ = d.sock.send(&m, a.server);
    }
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}
