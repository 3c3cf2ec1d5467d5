//! `lwm2m-devsim`: a handful of simulated LwM2M devices for the demo and for
//! manual testing. Each device has its own UDP socket, registers, answers the
//! gateway's Write-Attributes / Observe / Read / Execute, then sends a
//! notification for every observed resource each interval with drifting
//! values, updates before its lifetime runs out, and de-registers on exit.
//!
//! `--dtls`: each device first does a DTLS-PSK handshake with the gateway
//! (`--server` is then its DTLS port), with the identity and key the
//! provisioning file (`--provisioning`) holds for its endpoint.
//!
//! `--bootstrap ADDR`: each device knows only its bootstrap credentials (the
//! `bootstrap = { psk_identity, psk_key_hex }` of its provisioning entry): it
//! handshakes DTLS-PSK with the bootstrap server at ADDR, sends
//! Bootstrap-Request, answers Discover / Delete / Write / Finish, then
//! connects to the LwM2M server URI it was written (`coaps://` with the PSK it
//! was given, or `coap://`) and registers there. Executing `/1/x/9`
//! (Bootstrap-Request Trigger) sends it back to the bootstrap server.

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
    /// Bootstrap first from this DTLS bootstrap server (the provisioning
    /// file holds each endpoint's bootstrap credentials); `--server` and
    /// `--dtls` are then ignored: the device uses what it was written.
    #[arg(long)]
    bootstrap: Option<SocketAddr>,
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
    /// Where it registers (`--server`, or the URI its bootstrap wrote).
    server: SocketAddr,
    /// The bootstrap credentials (identity, key) with `--bootstrap`.
    bs_psk: Option<(Vec<u8>, Vec<u8>)>,
    /// Executed a Bootstrap-Request Trigger: bootstrap again.
    rebootstrap: bool,
    registered: bool,
    last_register: Instant,
    /// Executed Update /5/0/2 at: reboots into the new firmware 1 s later.
    updating_since: Option<Instant>,
    last_update: Instant,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let fmt = format_code(&a.format)?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let creds = if a.dtls || a.bootstrap.is_some() {
        Directory::read_provisioning(&a.provisioning)?
    } else {
        Vec::new()
    };
    let mut devs = Vec::new();
    for i in 0..a.devices {
        let endpoint = format!("{}{}", a.prefix, i);
        let entry = || {
            creds
                .iter()
                .find(|p| p.endpoint == endpoint)
                .map(|p| &p.entry)
                .ok_or_else(|| anyhow::anyhow!("{endpoint} is not in {}", a.provisioning.display()))
        };
        let mut sim = SimDevice::new(&endpoint, i as u16);
        sim.format = fmt;
        sim.lifetime_s = a.lifetime;
        // Object 5 (TS 1.1 Core E.6): a firmware_update RPC finds it Idle.
        sim.enable_firmware("1.0.0");
        let (sock, server, bs_psk) = if let Some(bs) = a.bootstrap {
            let cred = entry()?
                .bootstrap
                .as_ref()
                .map(|b| b.credential_entry())
                .and_then(|c| Some((c.psk_identity_bytes()?, c.psk_key()?)))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{endpoint} has no bootstrap PSK in {}",
                        a.provisioning.display()
                    )
                })?;
            let (sock, server) = bootstrap(&mut sim, &cred, bs, &a.ciphers)?;
            (sock, server, Some(cred))
        } else if a.dtls {
            let e = entry()?;
            let (Some(identity), Some(key)) = (e.psk_identity_bytes(), e.psk_key()) else {
                anyhow::bail!("{endpoint} has no PSK in {}", a.provisioning.display());
            };
            (
                dtls_link(&endpoint, &identity, &key, a.server, &a.ciphers)?,
                a.server,
                None,
            )
        } else {
            let sock = UdpSocket::bind("127.0.0.1:0")?;
            sock.set_nonblocking(true)?;
            (Link::Plain(sock), a.server, None)
        };
        devs.push(Dev {
            sim,
            sock,
            server,
            bs_psk,
            rebootstrap: false,
            registered: false,
            last_register: Instant::now() - Duration::from_secs(60),
            updating_since: None,
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
            if d.rebootstrap {
                d.rebootstrap = false;
                d.registered = false;
                let (Some(bs), Some(cred)) = (a.bootstrap, d.bs_psk.as_ref()) else {
                    continue;
                };
                match bootstrap(&mut d.sim, cred, bs, &a.ciphers) {
                    Ok((sock, server)) => (d.sock, d.server) = (sock, server),
                    Err(e) => {
                        eprintln!("{}: {e:#}", d.sim.endpoint);
                        d.rebootstrap = true;
                        continue;
                    }
                }
            }
            if let Some(g) = d.sim.fw_tick(Instant::now()) {
                d.sock.send(&g, d.server)?;
            }
            if d.updating_since
                .is_some_and(|t| t.elapsed() > Duration::from_secs(1))
            {
                // The update ran: reboot into the new version, register again.
                d.updating_since = None;
                let bytes = d.sim.fw_image().len();
                d.sim.fw_reboot("2.0.0");
                d.registered = false;
                d.last_register = Instant::now() - Duration::from_secs(60);
                println!(
                    "{} rebooted into firmware 2.0.0 ({bytes} bytes received)",
                    d.sim.endpoint
                );
            }
            if !d.registered && d.last_register.elapsed() > Duration::from_secs(3) {
                d.last_register = Instant::now();
                let r = d.sim.register();
                d.sock.send(&r, d.server)?;
            }
            if d.registered
                && d.last_update.elapsed() > Duration::from_secs((a.lifetime as u64 * 2 / 3).max(1))
            {
                d.last_update = Instant::now();
                let u = d.sim.update(None, false);
                d.sock.send(&u, d.server)?;
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
                    // TS 1.1 Core §E.2: /1/x/9 Bootstrap-Request Trigger.
                    if p.object == 1 && p.resource == Some(9) {
                        d.rebootstrap = d.bs_psk.is_some();
                    }
                    // /5/0/2 Update (TS 1.1 Core E.6).
                    if p.object == 5 && p.resource == Some(2) {
                        d.updating_since = Some(Instant::now());
                    }
                }
                for r in ev.replies {
                    d.sock.send(&r, d.server)?;
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
                        d.sock.send(&msg, d.server)?;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for d in devs.iter_mut().filter(|d| d.registered) {
        let m = d.sim.deregister();
        let _ = d.sock.send(&m, d.server);
    }
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

/// A DTLS-PSK session with `server`, its socket non-blocking.
fn dtls_link(
    endpoint: &str,
    identity: &[u8],
    key: &[u8],
    server: SocketAddr,
    ciphers: &str,
) -> anyhow::Result<Link> {
    let auth = ClientAuth::Psk {
        identity: identity.to_vec(),
        key: key.to_vec(),
    };
    let ctx = client_context(&auth, ciphers)?;
    let t = Instant::now();
    let mut c = DtlsClient::connect(
        &ctx,
        "127.0.0.1:0".parse()?,
        server,
        Duration::from_secs(10),
    )
    .map_err(|e| anyhow::anyhow!("{endpoint}: DTLS handshake with {server}: {e}"))?;
    println!(
        "{endpoint}: DTLS session with {server} ({}) in {:.1} ms",
        c.ssl().current_cipher().map(|c| c.name()).unwrap_or("?"),
        t.elapsed().as_secs_f64() * 1e3
    );
    c.transport_socket().set_nonblocking(true)?;
    Ok(Link::Dtls(Box::new(c)))
}

/// The address in a `coap://` / `coaps://` server URI (TS 1.1 Core §E.1,
/// resource /0/x/0) and whether it is DTLS.
fn server_addr(uri: &str) -> anyhow::Result<(SocketAddr, bool)> {
    use std::net::ToSocketAddrs;
    let (secure, rest) = if let Some(r) = uri.strip_prefix("coaps://") {
        (true, r)
    } else if let Some(r) = uri.strip_prefix("coap://") {
        (false, r)
    } else {
        anyhow::bail!("unsupported server URI {uri}");
    };
    let host = rest.split('/').next().unwrap_or(rest);
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:{}", if secure { 5684 } else { 5683 })
    };
    let addr = host
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{uri}: no address"))?;
    Ok((addr, secure))
}

/// Bootstraps `sim` from the DTLS bootstrap server `bs` with its bootstrap
/// PSK (TS 1.1 Transport §6.1), then opens the link to the LwM2M server
/// account it was written: the server's address and the link.
fn bootstrap(
    sim: &mut SimDevice,
    (identity, key): &(Vec<u8>, Vec<u8>),
    bs: SocketAddr,
    ciphers: &str,
) -> anyhow::Result<(Link, SocketAddr)> {
    let endpoint = sim.endpoint.clone();
    sim.set_bootstrap_account(&format!("coaps://{bs}"), 0, identity, key);
    let ctx = client_context(
        &ClientAuth::Psk {
            identity: identity.clone(),
            key: key.clone(),
        },
        ciphers,
    )?;
    let mut c = DtlsClient::connect(&ctx, "127.0.0.1:0".parse()?, bs, Duration::from_secs(10))
        .map_err(|e| {
            anyhow::anyhow!("{endpoint}: DTLS handshake with bootstrap server {bs}: {e}")
        })?;
    let finished_before = sim.bootstraps_finished;
    let req = sim.bootstrap_request(None);
    c.send(&req)?;
    let t = Instant::now();
    let mut last_send = Instant::now();
    let mut accepted = false;
    while sim.bootstraps_finished == finished_before {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "{endpoint}: bootstrap from {bs} did not finish within 60 s"
        );
        // Bootstrap-Request retransmission while unanswered (RFC 7252 §4.2).
        if !accepted && last_send.elapsed() > Duration::from_secs(2) {
            c.send(&req)?;
            last_send = Instant::now();
        }
        let Some(d) = c.recv(Duration::from_millis(100))? else {
            continue;
        };
        let ev = sim.handle(&d);
        if let Some((_, code)) = ev.response {
            anyhow::ensure!(
                code.class() == 2,
                "{endpoint}: bootstrap server answered {code} to Bootstrap-Request"
            );
            accepted = true;
        }
        for r in &ev.replies {
            c.send(r)?;
        }
    }
    c.shutdown();
    let acct = sim
        .server_account()
        .ok_or_else(|| anyhow::anyhow!("{endpoint}: bootstrap wrote no server account"))?;
    println!(
        "{endpoint}: bootstrapped from {bs} in {:.1} ms: server {} ({})",
        t.elapsed().as_secs_f64() * 1e3,
        acct.uri,
        if acct.mode == 0 { "PSK" } else { "NoSec" }
    );
    let (server, secure) = server_addr(&acct.uri)?;
    let link = if secure {
        anyhow::ensure!(
            acct.mode == 0,
            "{endpoint}: only PSK server accounts are simulated"
        );
        dtls_link(&endpoint, &acct.identity, &acct.key, server, ciphers)?
    } else {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.set_nonblocking(true)?;
        Link::Plain(sock)
    };
    Ok((link, server))
}
