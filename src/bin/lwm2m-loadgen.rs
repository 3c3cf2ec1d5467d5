//! `lwm2m-loadgen`: a fleet of LwM2M clients for benchmarking the gateway.
//!
//! Every device has its own UDP socket (its own source address:port, spread
//! over 127.0.0.x when one address runs out of ports). Devices are handled by
//! worker processes (`--workers`, so that a fleet larger than one process's
//! file-descriptor limit fits), each a single-threaded mio event loop.
//!
//! Phases: ramped Register (`--register-rate`), wait for the gateway's
//! Observe, steady-state notifications at `--rate` (or open loop with 0),
//! Update before the lifetime runs out, De-register at the end. Devices answer
//! the gateway like real clients (Write-Attributes, Observe, Read, Execute) via
//! `corem_lwm2m::testkit::sim::SimDevice`.
//!
//! Measurement: every notification carries its send time (µs since the epoch)
//! as the value of /3303/0/5700, unique and increasing per device. The parent
//! consumes the telemetry topic and matches values to measure end-to-end
//! latency (send → readable in Kafka), loss and duplicates. Registration and
//! CON ACK latency are measured in the workers with hdrhistogram and merged.
//! A live progress line runs on stderr; a summary and a JSON report come at
//! the end.
//!
//! `--dtls psk|x509`: each device first does a real DTLS 1.2 handshake with
//! the gateway's DTLS port (OpenSSL client side, many handshakes in flight
//! per worker, `--register-window` at a time) and then registers and
//! notifies over its session; handshake rate and latency are in the report.
//! PSK keys are derived from the endpoint name (`--write-provisioning` with
//! `--dtls psk` writes them); certificates are issued per device by the CA
//! in `--pki DIR` (`--write-pki DIR` creates it and the gateway's
//! certificate).
//!
//! `--rpc-rate N` (with `--brokers`): once the fleet registered, platform
//! RPCs (`--rpc-method`, default a Read of /3/0/0) go to the gateway's
//! request topic at N/s, round robin over the devices, for the steady
//! state; their statuses are consumed back from
//! `device.rpc.status.{tenant}` (see `corem_lwm2m::tools::rpc_load`):
//! request→status latency and the count of each terminal status.

use clap::Parser;
use corem_lwm2m::proto::coap::{Code, Message, MsgType};
use corem_lwm2m::proto::lwm2m::content;
use corem_lwm2m::proto::lwm2m::content::ResourcePath;
use corem_lwm2m::testkit::certs::Pki;
use corem_lwm2m::testkit::dtls_client::{client_context, ClientAuth, Datagrams, DtlsClient};
use corem_lwm2m::testkit::sim::{SimDevice, SimObservation};
use corem_lwm2m::tools::rpc_load::{RpcLoad, RpcLoadConfig};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Parser, Debug, Clone)]
#[command(version, about = "LwM2M fleet load generator for corem-lwm2m")]
struct Args {
    /// Gateway CoAP address.
    #[arg(long, default_value = "127.0.0.1:5683")]
    server: SocketAddr,
    /// Number of devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Endpoint names are PREFIX{index}.
    #[arg(long, default_value = "urn:loadgen:")]
    prefix: String,
    /// Tenant used in the provisioning file (topic telemetry.raw.{tenant}).
    #[arg(long, default_value = "loadgen")]
    tenant: String,
    /// Write a provisioning file for the gateway and exit.
    #[arg(long)]
    write_provisioning: Option<std::path::PathBuf>,
    /// Registrations per second over the fleet (0 = as fast as accepted).
    #[arg(long, default_value_t = 0)]
    register_rate: u64,
    /// Maximum registrations outstanding at once (per worker).
    #[arg(long, default_value_t = 512)]
    register_window: usize,
    /// Give up registering after this many seconds (the devices not
    /// registered by then count as not registered; the run goes on).
    #[arg(long, default_value_t = 300)]
    register_timeout_s: u64,
    /// Steady-state notifications per second over the fleet (0 = open loop:
    /// as fast as accepted).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Steady-state duration in seconds.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Use NON notifications (default CON).
    #[arg(long)]
    non: bool,
    /// Use LwM2M Send (POST /dp, SenML) instead of Observe notifications.
    #[arg(long)]
    send: bool,
    /// Content format of notifications: text, tlv, senml-json, senml-cbor, cbor.
    #[arg(long, default_value = "text")]
    format: String,
    /// Registration lifetime (s); devices Update at 2/3 of it.
    #[arg(long, default_value_t = 300)]
    lifetime: u32,
    /// Skip notifications: register, hold for --duration, de-register (idle scale).
    #[arg(long)]
    idle: bool,
    /// Do not de-register at the end.
    #[arg(long)]
    no_deregister: bool,
    /// Kafka brokers: consume the telemetry topic to measure end-to-end latency and loss.
    #[arg(long)]
    brokers: Option<String>,
    /// Seconds to wait for the last points to reach Kafka after the steady state.
    #[arg(long, default_value_t = 15)]
    drain: u64,
    /// Worker processes (0 = enough to stay under the fd limit, at least 1).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Baseline mode: no LwM2M; send notification-sized CON datagrams to a UDP
    /// echo/ACK server (perf/udp_echo.rs) and count the echoes.
    #[arg(long)]
    baseline: bool,
    /// Write the JSON report here (also printed on stdout).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// DTLS mode: `psk` or `x509` (`--server` is then the DTLS port).
    #[arg(long)]
    dtls: Option<String>,
    /// Cipher suites offered in DTLS mode (OpenSSL names).
    #[arg(long, default_value = "PSK-AES128-CCM8:ECDHE-ECDSA-AES128-CCM8")]
    ciphers: String,
    /// Directory with ca.crt / ca.key issuing the device certificates (x509).
    #[arg(long)]
    pki: Option<std::path::PathBuf>,
    /// Write a CA (ca.crt, ca.key) and a gateway certificate (gateway.crt,
    /// gateway.key) into DIR and exit.
    #[arg(long)]
    write_pki: Option<std::path::PathBuf>,
    /// RPC phase: platform RPCs per second (over the fleet) written to the
    /// request topic once every device registered, for the steady state;
    /// their statuses are consumed back (needs --brokers).
    #[arg(long, default_value_t = 0)]
    rpc_rate: u64,
    /// The RPC method (`read` of --rpc-path, `reboot`, `execute` of
    /// --rpc-path, `discover`).
    #[arg(long, default_value = "read")]
    rpc_method: String,
    #[arg(long, default_value = "/3/0/0")]
    rpc_path: String,
    /// Timeout of each RPC (timeout_ms).
    #[arg(long, default_value_t = 30_000)]
    rpc_timeout_ms: u64,
    /// The gateway's RPC request topic.
    #[arg(long, default_value = "device.rpc.requests")]
    rpc_topic: String,
    /// Bootstrap storm first: every device handshakes DTLS-PSK with the
    /// gateway's bootstrap server at ADDR (its bootstrap credentials:
    /// identity `bs-{endpoint}`, key derived from it), bootstraps (up to
    /// `--register-window` at once per worker), and then handshakes with
    /// `--server` using the PSK the bootstrap wrote (needs `--dtls psk`;
    /// `--write-provisioning` then writes bootstrap credentials, and the
    /// gateway runs `[bootstrap] generate_psk = true`).
    #[arg(long)]
    bootstrap: Option<SocketAddr>,
    /// Devices have the Firmware Update object (object 5, version
    /// `1.0`): a `firmware_update` RPC or campaign finds them Idle; a pull
    /// downloads the Package URI in Block2 blocks, a push is taken in
    /// Block1; Update reboots the device (after `--fw-reboot-ms`) into
    /// version `2.0`, and it registers again.
    #[arg(long)]
    firmware: bool,
    /// With --firmware: every Nth device reports Update Result 5
    /// (integrity check failure) after downloading (0: none).
    #[arg(long, default_value_t = 0)]
    fw_fail_every: usize,
    #[arg(long, default_value_t = 200)]
    fw_reboot_ms: u64,
    /// Internal: run as worker I of the fleet.
    #[arg(long, hide = true)]
    worker_index: Option<usize>,
    #[arg(long, hide = true)]
    worker_count: Option<usize>,
}

const FW_UPDATE: ResourcePath = ResourcePath::resource(5, 0, 2);

const TEMPERATURE: ResourcePath = ResourcePath {
    object: 3303,
    instance: Some(0),
    resource: Some(5700),
    resource_instance: None,
};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn format_code(s: &str) -> u16 {
    match s {
        "tlv" => content::CF_TLV,
        "senml-json" => content::CF_SENML_JSON,
        "senml-cbor" => content::CF_SENML_CBOR,
        "cbor" => content::CF_CBOR,
        _ => content::CF_TEXT,
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!())
}

fn ser(h: &Histogram<u64>) -> String {
    let mut v = Vec::new();
    let _ = V2Serializer::new().serialize(h, &mut v);
    v.iter().map(|b| format!("{b:02x}")).collect()
}

fn de(s: &str) -> Histogram<u64> {
    let bytes: Vec<u8> = (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect();
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .unwrap_or_else(|_| hist())
}

#[derive(Serialize, Deserialize, Default, Debug, Clone)]
struct WorkerReport {
    devices: usize,
    registered: u64,
    register_failed: u64,
    register_retransmits: u64,
    /// Register exchanges that timed out (the device tries again later).
    register_timeouts: u64,
    observed: u64,
    notifications_sent: u64,
    notifications_acked: u64,
    notifications_retransmitted: u64,
    notifications_rejected: u64,
    busy_503: u64,
    updates: u64,
    deregistered: u64,
    server_requests: u64,
    steady_seconds: f64,
    register_seconds: f64,
    handshakes: u64,
    handshakes_failed: u64,
    handshake_seconds: f64,
    hs_hist: String,
    reg_hist: String,
    ack_hist: String,
    #[serde(default)]
    bootstrapped: u64,
    #[serde(default)]
    bootstrap_failed: u64,
    #[serde(default)]
    bootstrap_seconds: f64,
    #[serde(default)]
    bs_hist: String,
    #[serde(default)]
    fw_updated: u64,
    #[serde(default)]
    fw_bytes: u64,
}

/// One device of the bootstrap phase.
struct BsDev {
    sim: SimDevice,
    client: Option<Box<DtlsClient<MioUdp>>>,
    /// 0 handshaking, 1 requested, 2 bootstrapping, 3 done, 4 failed.
    state: u8,
    started: Instant,
    req: Vec<u8>,
    last_send: Instant,
}

/// The PSK (identity, key) a bootstrap gave each device, `None` if it failed.
type GivenKeys = Vec<Option<(Vec<u8>, Vec<u8>)>>;

/// The bootstrap identity and key of a loadgen device.
fn bs_identity(endpoint: &str) -> String {
    format!("bs-{endpoint}")
}

/// Bootstraps devices `lo..hi` against `bs` (DTLS-PSK with their bootstrap
/// credentials); returns the PSK each one was given (identity, key), and
/// fills the bootstrap figures of `rep`.
fn bootstrap_phase(
    a: &Args,
    bs: SocketAddr,
    lo: usize,
    hi: usize,
    rep: &mut WorkerReport,
) -> anyhow::Result<GivenKeys> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let n = hi - lo;
    let mut devs: Vec<Option<BsDev>> = (0..n).map(|_| None).collect();
    let mut out: GivenKeys = vec![None; n];
    let mut h = hist();
    let t0 = Instant::now();
    let mut next = 0usize;
    let mut active = 0usize;
    let mut finished = 0usize;
    let window = a.register_window.max(1);
    let mut buf = vec![0u8; 2048];
    let mut last_tick = Instant::now();
    while finished < n {
        while active < window && next < n {
            let g = lo + next;
            let endpoint = format!("{}{}", a.prefix, g);
            let id = bs_identity(&endpoint);
            let auth = ClientAuth::Psk {
                identity: id.as_bytes().to_vec(),
                key: psk_of(&id),
            };
            let std_sock = std::net::UdpSocket::bind(bind_addr(g))?;
            std_sock.set_nonblocking(true)?;
            let mut sock = UdpSocket::from_std(std_sock);
            poll.registry()
                .register(&mut sock, Token(next), Interest::READABLE)?;
            let ctx = client_context(&auth, &a.ciphers)?;
            let mut c = DtlsClient::new(&ctx, MioUdp { sock, server: bs })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let _ = c.handshake_step();
            let mut sim = SimDevice::new(&endpoint, g as u16);
            sim.set_bootstrap_account(&format!("coaps://{bs}"), 0, id.as_bytes(), &psk_of(&id));
            devs[next] = Some(BsDev {
                sim,
                client: Some(Box::new(c)),
                state: 0,
                started: Instant::now(),
                req: Vec::new(),
                last_send: Instant::now(),
            });
            next += 1;
            active += 1;
        }
        poll.poll(&mut events, Some(Duration::from_millis(20)))?;
        let mut ready: Vec<usize> = events.iter().map(|e| e.token().0).collect();
        let tick = last_tick.elapsed() >= Duration::from_millis(100);
        if tick {
            last_tick = Instant::now();
            ready.extend(
                devs.iter()
                    .enumerate()
                    .filter(|(_, d)| d.as_ref().is_some_and(|d| d.state < 3))
                    .map(|(i, _)| i),
            );
        }
        for i in ready {
            let Some(d) = devs[i].as_mut() else { continue };
            if d.state >= 3 {
                continue;
            }
            let Some(c) = d.client.as_mut() else { continue };
            if d.state == 0 {
                match c.handshake_step() {
                    Ok(true) => {
                        rep.handshakes += 1;
                        d.req = d.sim.bootstrap_request(None);
                        let _ = c.send(&d.req);
                        d.last_send = Instant::now();
                        d.state = 1;
                    }
                    Ok(false) => {
                        if tick {
                            c.handle_timeout();
                        }
                    }
                    Err(_) => d.state = 4,
                }
            }
            if d.state == 1 || d.state == 2 {
                while let Ok(Some(data)) = c.try_recv() {
                    let n = data.len().min(buf.len());
                    buf[..n].copy_from_slice(&data[..n]);
                    let ev = d.sim.handle(&buf[..n]);
                    if let Some((_, code)) = ev.response {
                        d.state = if code == Code::CHANGED { 2 } else { 4 };
                    }
                    for r in &ev.replies {
                        let _ = c.send(r);
                    }
                    if d.sim.bootstraps_finished > 0 {
                        d.state = 3;
                        break;
                    }
                }
                // Bootstrap-Request retransmission (RFC 7252 §4.2, simplified).
                if d.state == 1 && d.last_send.elapsed() > Duration::from_secs(2) {
                    let _ = c.send(&d.req);
                    d.last_send = Instant::now();
                }
            }
            if d.state < 3 && d.started.elapsed() > Duration::from_secs(60) {
                d.state = 4;
            }
            if d.state >= 3 {
                active -= 1;
                finished += 1;
                if let Some(mut c) = d.client.take() {
                    let _ = poll.registry().deregister(&mut c.transport().sock);
                }
                if d.state == 3 {
                    rep.bootstrapped += 1;
                    let _ = h.record(d.started.elapsed().as_micros() as u64);
                    out[i] = d.sim.server_account().map(|s| (s.identity, s.key));
                } else {
                    rep.bootstrap_failed += 1;
                }
                devs[i] = None;
            }
        }
    }
    rep.bootstrap_seconds = t0.elapsed().as_secs_f64();
    rep.bs_hist = ser(&h);
    Ok(out)
}

#[derive(Serialize, Deserialize, Default)]
struct Progress {
    registered: u64,
    sent: u64,
    acked: u64,
}

/// A device socket as the DTLS client's datagram transport.
struct MioUdp {
    sock: UdpSocket,
    server: SocketAddr,
}

impl Datagrams for MioUdp {
    fn send(&mut self, d: &[u8]) -> std::io::Result<()> {
        self.sock.send_to(d, self.server).map(|_| ())
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv_from(buf).map(|(n, _)| n)
    }
}

/// Plain UDP, or a DTLS session (handshaking until `connected`).
enum Link {
    Plain(UdpSocket),
    Dtls(Box<DtlsClient<MioUdp>>),
}

impl Link {
    fn send_to(&mut self, d: &[u8], server: SocketAddr) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.send_to(d, server),
            Link::Dtls(c) => c.send(d).map(|_| d.len()),
        }
    }
    /// One datagram (plaintext for DTLS) into `buf`.
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

/// The PSK of a loadgen device: 16 bytes derived from its endpoint name.
fn psk_of(endpoint: &str) -> Vec<u8> {
    openssl::sha::sha256(endpoint.as_bytes())[..16].to_vec()
}

struct Dev {
    sim: SimDevice,
    sock: Link,
    state: DevState,
    /// Send time and MID of the outstanding CON (register / notification / update).
    outstanding: Option<(Instant, u16, u8, u8)>,
    obs_token: Option<Vec<u8>>,
    last_value: u64,
    registered_at: Instant,
    last_update: Instant,
    pending_msg: Vec<u8>,
    /// Update /5/0/2 executed at: reboots after --fw-reboot-ms.
    reboot_at: Option<Instant>,
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum DevState {
    Idle,
    /// Register answered 5.03: register again.
    Busy,
    Registering,
    Registered,
    Deregistering,
    Done,
    Failed,
}

// Outstanding kinds.
const K_REGISTER: u8 = 1;
const K_NOTIFY: u8 = 2;
const K_UPDATE: u8 = 3;
const K_DEREGISTER: u8 = 4;

fn bind_addr(global: usize) -> SocketAddr {
    // ~25k ephemeral ports per address: spread over 127.0.0.1, .2, ...
    let host = 1 + (global / 25_000) as u8;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)), 0)
}

fn raise_nofile() {
    // SAFETY: plain getrlimit/setrlimit.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn fd_limit() -> usize {
    // SAFETY: plain getrlimit.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            return r.rlim_max as usize;
        }
    }
    1024
}

fn run_worker(a: &Args, index: usize, count: usize) -> anyhow::Result<()> {
    // A worker dies with its parent (a killed load generator must not
    // leave its fleet running). Linux: PR_SET_PDEATHSIG; the parent may
    // already be gone by then.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    if std::os::unix::process::parent_id() == 1 {
        anyhow::bail!("the parent load generator is gone");
    }
    raise_nofile();
    let lo = a.devices * index / count;
    let hi = a.devices * (index + 1) / count;
    let fmt = format_code(&a.format);
    let mut poll = Poll::new()?;
    let mut devs: Vec<Dev> = Vec::with_capacity(hi - lo);
    let ca = match (a.dtls.as_deref(), &a.pki) {
        (Some("x509"), Some(dir)) => Some(Pki {
            cert: openssl::x509::X509::from_pem(&std::fs::read(dir.join("ca.crt"))?)?,
            key: openssl::pkey::PKey::private_key_from_pem(&std::fs::read(dir.join("ca.key"))?)?,
        }),
        (Some("x509"), None) => anyhow::bail!("--dtls x509 needs --pki DIR (see --write-pki)"),
        (Some("psk") | None, _) => None,
        (Some(other), _) => anyhow::bail!("--dtls {other}: psk or x509"),
    };
    let mut boot_rep = WorkerReport::default();
    let boot = match a.bootstrap {
        Some(bs) => Some(bootstrap_phase(a, bs, lo, hi, &mut boot_rep)?),
        None => None,
    };
    for g in lo..hi {
        let endpoint = format!("{}{}", a.prefix, g);
        let std_sock = std::net::UdpSocket::bind(bind_addr(g))?;
        std_sock.set_nonblocking(true)?;
        let mut sock = UdpSocket::from_std(std_sock);
        poll.registry()
            .register(&mut sock, Token(devs.len()), Interest::READABLE)?;
        let link = match a.dtls.as_deref() {
            None => Link::Plain(sock),
            Some(mode) => {
                let given = boot.as_ref().and_then(|b| b[g - lo].clone());
                let auth = if let Some((identity, key)) = given {
                    ClientAuth::Psk { identity, key }
                } else if mode == "psk" {
                    ClientAuth::Psk {
                        identity: endpoint.as_bytes().to_vec(),
                        key: psk_of(&endpoint),
                    }
                } else {
                    let ca = ca.as_ref().ok_or_else(|| anyhow::anyhow!("no CA"))?;
                    let (cert, key) = ca.issue(&endpoint, &[]);
                    ClientAuth::Cert {
                        cert,
                        key,
                        ca: None,
                    }
                };
                let ctx = client_context(&auth, &a.ciphers)?;
                let c = DtlsClient::new(
                    &ctx,
                    MioUdp {
                        sock,
                        server: a.server,
                    },
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                Link::Dtls(Box::new(c))
            }
        };
        let mut sim = SimDevice::new(&endpoint, g as u16);
        sim.lifetime_s = a.lifetime;
        sim.format = fmt;
        // Only the temperature object: one observation per device.
        sim.objects = vec!["/1/0".into(), "/3/0".into(), "/3303/0".into()];
        if a.firmware {
            sim.enable_firmware("1.0");
            if a.fw_fail_every > 0 && g % a.fw_fail_every == 0 {
                if let Some(fw) = sim.fw.as_mut() {
                    fw.fail_download = Some(5);
                }
            }
        }
        if a.baseline {
            // No gateway to observe us: notification-sized datagrams on a
            // fixed token.
            sim.observations.push(SimObservation {
                token: vec![0, 0, 0, 1],
                path: TEMPERATURE,
                seq: 1,
            });
        }
        devs.push(Dev {
            sim,
            sock: link,
            state: DevState::Idle,
            outstanding: None,
            obs_token: None,
            last_value: 0,
            registered_at: Instant::now(),
            last_update: Instant::now(),
            pending_msg: Vec::new(),
            reboot_at: None,
        });
    }
    let n = devs.len();
    let mut rep = WorkerReport {
        devices: n,
        bootstrapped: boot_rep.bootstrapped,
        bootstrap_failed: boot_rep.bootstrap_failed,
        bootstrap_seconds: boot_rep.bootstrap_seconds,
        bs_hist: boot_rep.bs_hist,
        ..Default::default()
    };
    let mut reg_h = hist();
    let mut ack_h = hist();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 2048];
    let mut out;
    let server = a.server;
    let stdout = std::io::stdout();
    let mut last_progress = Instant::now();
    let progress = |rep: &WorkerReport| {
        let p = Progress {
            registered: rep.registered,
            sent: rep.notifications_sent,
            acked: rep.notifications_acked,
        };
        let mut s = stdout.lock();
        let _ = writeln!(s, "P {}", serde_json::to_string(&p).unwrap_or_default());
        let _ = s.flush();
    };

    // ---------------------------------------------------------- handle input
    // Returns true when the datagram completed the device's outstanding request.
    #[allow(clippy::too_many_arguments)]
    fn on_datagram(
        d: &mut Dev,
        data: &[u8],
        server: SocketAddr,
        rep: &mut WorkerReport,
        reg_h: &mut Histogram<u64>,
        ack_h: &mut Histogram<u64>,
        baseline: bool,
    ) {
        let Ok(m) = Message::decode(data) else { return };
        if let Some((t0, mid, kind, _)) = d.outstanding {
            let matches_mid = m.message_id == mid
                && (m.mtype == MsgType::Ack || m.mtype == MsgType::Rst || baseline);
            if matches_mid {
                let us = t0.elapsed().as_micros() as u64;
                d.outstanding = None;
                match kind {
                    K_NOTIFY => {
                        if m.mtype == MsgType::Rst {
                            rep.notifications_rejected += 1;
                        } else if m.code == Code::SERVICE_UNAVAILABLE {
                            rep.busy_503 += 1;
                        } else {
                            rep.notifications_acked += 1;
                            let _ = ack_h.record(us.max(1));
                        }
                    }
                    K_REGISTER => {
                        let ev = d.sim.handle(data);
                        if ev.registered {
                            rep.registered += 1;
                            let _ = reg_h.record(us.max(1));
                            d.state = DevState::Registered;
                            d.registered_at = Instant::now();
                            d.last_update = Instant::now();
                        } else if m.code == Code::SERVICE_UNAVAILABLE {
                            rep.busy_503 += 1;
                            d.state = DevState::Busy;
                            // Retry after Max-Age (RFC 7252 §5.9.3.4), at least 1 s.
                            d.registered_at = Instant::now();
                        } else {
                            rep.register_failed += 1;
                            d.state = DevState::Failed;
                        }
                        return;
                    }
                    K_UPDATE => {
                        rep.updates += 1;
                        let _ = d.sim.handle(data);
                        if m.code == Code::NOT_FOUND {
                            d.state = DevState::Busy;
                            d.obs_token = None;
                        }
                        return;
                    }
                    K_DEREGISTER => {
                        let _ = d.sim.handle(data);
                        rep.deregistered += 1;
                        d.state = DevState::Done;
                        return;
                    }
                    _ => {}
                }
                return;
            }
        }
        if m.code.is_response() {
            // A block of a firmware download (or a late answer).
            let ev = d.sim.handle(data);
            for r in &ev.replies {
                let _ = d.sock.send_to(r, server);
            }
            return;
        }
        if m.code.is_request() {
            rep.server_requests += 1;
            let ev = d.sim.handle(data);
            for r in &ev.replies {
                let _ = d.sock.send_to(r, server);
            }
            if ev.executed.contains(&FW_UPDATE) {
                d.reboot_at = Some(Instant::now());
            }
            if !ev.observed.is_empty() {
                if let Some(o) = d.sim.observations.iter().find(|o| o.path.object == 3303) {
                    if d.obs_token.is_none() {
                        rep.observed += 1;
                    }
                    d.obs_token = Some(o.token.clone());
                }
            }
        }
    }

    let drain = |devs: &mut Vec<Dev>,
                 poll: &mut Poll,
                 events: &mut Events,
                 buf: &mut Vec<u8>,
                 rep: &mut WorkerReport,
                 reg_h: &mut Histogram<u64>,
                 ack_h: &mut Histogram<u64>,
                 timeout: Duration| {
        let _ = poll.poll(events, Some(timeout));
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(d) = devs.get_mut(i) else { continue };
            if let Link::Dtls(c) = &mut d.sock {
                if !c.connected {
                    // Handshake input: advanced in the handshake phase.
                    continue;
                }
            }
            while let Some(k) = d.sock.recv(buf) {
                let data = buf[..k].to_vec();
                on_datagram(d, &data, server, rep, reg_h, ack_h, a.baseline);
            }
        }
    };
    // Every phase waits for input the same way.
    macro_rules! drain {
        ($timeout:expr) => {
            drain(
                &mut devs,
                &mut poll,
                &mut events,
                &mut buf,
                &mut rep,
                &mut reg_h,
                &mut ack_h,
                $timeout,
            )
        };
    }

    // How often the per-device timers (retransmissions, Updates, firmware
    // polls) are scanned: 20 µs per device (20 ms for 1k devices, 400 ms
    // for 20k), against a 2–3 s ACK_TIMEOUT. A scan visits every device
    // (a cache miss each): at 5 µs per device the 50 workers of a
    // million-device fleet spent the whole box scanning.
    let scan_every = Duration::from_micros(n as u64 * 20);

    // Retransmission of the outstanding CON (RFC 7252 §4.2 back-off).
    let retransmit = |d: &mut Dev, rep: &mut WorkerReport| {
        if let Some((t0, mid, kind, tries)) = d.outstanding {
            let timeout = Duration::from_millis(2000 << tries.min(5));
            if t0.elapsed() >= timeout {
                if tries >= 4 {
                    d.outstanding = None;
                    if kind == K_REGISTER {
                        // As a real client (TS 1.1 Core §6.2.1.1, Server object
                        // Communication Retry Timer): try again later, here
                        // after 30 s, rather than give up.
                        rep.register_timeouts += 1;
                        d.state = DevState::Busy;
                        d.registered_at = Instant::now() + Duration::from_secs(29);
                    }
                    if kind == K_DEREGISTER {
                        d.state = DevState::Done;
                    }
                    return;
                }
                let _ = d.sock.send_to(&d.pending_msg, server);
                // Keep the original start time for latency; count the retry.
                d.outstanding = Some((t0, mid, kind, tries + 1));
                match kind {
                    K_REGISTER => rep.register_retransmits += 1,
                    K_NOTIFY => rep.notifications_retransmitted += 1,
                    _ => {}
                }
            }
        }
    };

    // ---------------------------------------------------------- phase 0: DTLS handshakes
    let mut hs_h = hist();
    if a.dtls.is_some() {
        let t_hs = Instant::now();
        let mut next = 0usize;
        let mut pending: Vec<(usize, Instant)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        while (next < n || !pending.is_empty()) && Instant::now() < deadline {
            while next < n && pending.len() < a.register_window {
                if let Link::Dtls(c) = &mut devs[next].sock {
                    let _ = c.handshake_step();
                }
                pending.push((next, Instant::now()));
                next += 1;
            }
            let _ = poll.poll(&mut events, Some(Duration::from_millis(1)));
            pending.retain(|(i, t0)| {
                let Link::Dtls(c) = &mut devs[*i].sock else {
                    return false;
                };
                c.handle_timeout();
                match c.handshake_step() {
                    Ok(true) => {
                        rep.handshakes += 1;
                        let _ = hs_h.record((t0.elapsed().as_micros() as u64).max(1));
                        false
                    }
                    Ok(false) if t0.elapsed() < Duration::from_secs(30) => true,
                    _ => {
                        rep.handshakes_failed += 1;
                        devs[*i].state = DevState::Failed;
                        false
                    }
                }
            });
            if last_progress.elapsed() >= Duration::from_secs(1) {
                last_progress = Instant::now();
                progress(&rep);
            }
        }
        rep.handshake_seconds = t_hs.elapsed().as_secs_f64();
    }

    // ---------------------------------------------------------- phase 1: register
    let t_reg = Instant::now();
    if !a.baseline {
        let per_worker_rate = if a.register_rate == 0 {
            0
        } else {
            (a.register_rate / count as u64).max(1)
        };
        let mut next = 0usize;
        let mut issued = 0u64;
        let deadline = Instant::now() + Duration::from_secs(a.register_timeout_s);
        // The whole-fleet scans (in flight, retransmissions, done) run every
        // `scan_every`, not after every 1 ms drain: with 20k devices per
        // worker and 50 workers they were the load generator's whole CPU.
        let mut last_scan: Option<Instant> = None;
        let mut in_flight = 0usize;
        loop {
            let scan = last_scan.is_none_or(|t| t.elapsed() >= scan_every);
            if scan {
                in_flight = devs
                    .iter()
                    .filter(|d| d.state == DevState::Registering)
                    .count();
            }
            let allowed = if per_worker_rate == 0 {
                u64::MAX
            } else {
                (t_reg.elapsed().as_secs_f64() * per_worker_rate as f64) as u64
            };
            let mut room = a.register_window.saturating_sub(in_flight);
            while next < n && room > 0 && issued < allowed {
                let d = &mut devs[next];
                if d.state == DevState::Failed {
                    // Its handshake failed.
                    next += 1;
                    continue;
                }
                let msg = d.sim.register();
                d.start_request(msg, K_REGISTER, server);
                d.state = DevState::Registering;
                next += 1;
                issued += 1;
                room -= 1;
                in_flight += 1;
            }
            drain!(Duration::from_millis(1));
            if !scan {
                continue;
            }
            last_scan = Some(Instant::now());
            for d in devs.iter_mut() {
                retransmit(d, &mut rep);
                // Register answered 5.03 (or Update 4.04): register again.
                if d.state == DevState::Busy
                    && d.outstanding.is_none()
                    && d.registered_at.elapsed() >= Duration::from_secs(1)
                {
                    let msg = d.sim.register();
                    d.start_request(msg, K_REGISTER, server);
                    d.state = DevState::Registering;
                }
            }
            if last_progress.elapsed() >= Duration::from_secs(1) {
                last_progress = Instant::now();
                progress(&rep);
            }
            let done = next == n
                && devs
                    .iter()
                    .all(|d| matches!(d.state, DevState::Registered | DevState::Failed));
            let observed = a.idle
                || a.send
                || devs
                    .iter()
                    .all(|d| d.state != DevState::Registered || d.obs_token.is_some());
            if done && rep.register_seconds == 0.0 {
                // The registration storm ends with the last 2.01.
                if rep.register_seconds == 0.0 {
                    rep.register_seconds = t_reg.elapsed().as_secs_f64();
                }
            }
            if (done && observed) || Instant::now() > deadline {
                break;
            }
        }
        // Let the observe exchanges settle.
        let settle = Instant::now() + Duration::from_millis(300);
        while Instant::now() < settle {
            drain!(Duration::from_millis(5));
        }
    }
    if rep.register_seconds == 0.0 {
        rep.register_seconds = t_reg.elapsed().as_secs_f64();
    }

    // ---------------------------------------------------------- phase 2: steady state
    let t_steady = Instant::now();
    let steady = Duration::from_secs(a.duration);
    let per_worker_rate = a.rate as f64 / count as f64;
    let mut sent_total = 0u64;
    let mut rr = 0usize;
    let con = !a.non;
    let lifetime = Duration::from_secs(a.lifetime as u64);
    let mut last_scan = Instant::now();
    while t_steady.elapsed() < steady {
        if !a.idle {
            let due = if a.rate == 0 {
                u64::MAX
            } else {
                (t_steady.elapsed().as_secs_f64() * per_worker_rate) as u64
            };
            let mut budget = 256usize; // per loop iteration, to keep reading.
            let mut scanned = 0usize;
            while sent_total < due && budget > 0 && scanned < n {
                let d = &mut devs[rr];
                rr = (rr + 1) % n;
                scanned += 1;
                let ready = (d.state == DevState::Registered && (a.send || d.obs_token.is_some()))
                    || a.baseline;
                if !ready || (con && d.outstanding.is_some()) {
                    continue;
                }
                let v = now_us().max(d.last_value + 1);
                d.last_value = v;
                if a.send {
                    // LwM2M Send with the value as SenML.
                    d.sim.values.insert(TEMPERATURE, v as f64);
                    out = d
                        .sim
                        .send(&["/3303/0/5700"], None, fmt == content::CF_SENML_CBOR);
                    let mid = d.sim.outstanding.unwrap_or(0);
                    d.outstanding = Some((Instant::now(), mid, K_NOTIFY, 0));
                } else {
                    // The value is the send time: one builder for all formats
                    // (the simulated device's).
                    d.sim.values.insert(TEMPERATURE, v as f64);
                    let Some((mid, msg)) = d.sim.notify("/3303/0/5700", con) else {
                        continue;
                    };
                    out = msg;
                    if con {
                        d.outstanding = Some((Instant::now(), mid, K_NOTIFY, 0));
                    }
                }
                if con {
                    d.pending_msg.clear();
                    d.pending_msg.extend_from_slice(&out);
                }
                let _ = d.sock.send_to(&out, server);
                rep.notifications_sent += 1;
                sent_total += 1;
                budget -= 1;
            }
        }
        drain!(Duration::from_micros(if a.rate == 0 { 0 } else { 500 }));
        let now = Instant::now();
        if now.duration_since(last_scan) < scan_every {
            if last_progress.elapsed() >= Duration::from_secs(1) {
                last_progress = Instant::now();
                progress(&rep);
            }
            continue;
        }
        last_scan = now;
        for d in devs.iter_mut() {
            retransmit(d, &mut rep);
            if a.firmware {
                if let Some(g) = d.sim.fw_tick(now) {
                    let _ = d.sock.send_to(&g, server);
                }
                if d.reboot_at
                    .is_some_and(|t| now >= t + Duration::from_millis(a.fw_reboot_ms))
                    && d.outstanding.is_none()
                {
                    // The update ran: reboot into 2.0 and register again.
                    d.reboot_at = None;
                    rep.fw_updated += 1;
                    rep.fw_bytes += d.sim.fw_image().len() as u64;
                    d.sim.fw_reboot("2.0");
                    d.obs_token = None;
                    let msg = d.sim.register();
                    d.start_request(msg, K_REGISTER, server);
                    d.state = DevState::Registering;
                }
            }
            // Update at 2/3 of the lifetime (LwM2M client behaviour).
            if !a.baseline
                && d.state == DevState::Registered
                && d.outstanding.is_none()
                && d.last_update.elapsed() >= lifetime * 2 / 3
            {
                d.last_update = Instant::now();
                let msg = d.sim.update(None, false);
                d.start_request(msg, K_UPDATE, server);
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            progress(&rep);
        }
    }
    rep.steady_seconds = t_steady.elapsed().as_secs_f64();
    // Wait for the last ACKs.
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle && devs.iter().any(|d| d.outstanding.is_some()) {
        drain!(Duration::from_millis(5));
        for d in devs.iter_mut() {
            retransmit(d, &mut rep);
        }
    }

    // ---------------------------------------------------------- phase 3: de-register
    if !a.baseline && !a.no_deregister {
        for d in devs.iter_mut() {
            d.outstanding = None;
        }
        let mut next = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let in_flight = devs
                .iter()
                .filter(|d| d.state == DevState::Deregistering)
                .count();
            let mut room = a.register_window.saturating_sub(in_flight);
            while next < n && room > 0 {
                let d = &mut devs[next];
                next += 1;
                if d.state != DevState::Registered {
                    continue;
                }
                let msg = d.sim.deregister();
                d.start_request(msg, K_DEREGISTER, server);
                d.state = DevState::Deregistering;
                room -= 1;
            }
            drain!(Duration::from_millis(2).max(scan_every));
            for d in devs.iter_mut() {
                retransmit(d, &mut rep);
            }
            if next >= n && !devs.iter().any(|d| d.state == DevState::Deregistering) {
                break;
            }
        }
    }
    progress(&rep);
    rep.hs_hist = ser(&hs_h);
    rep.reg_hist = ser(&reg_h);
    rep.ack_hist = ser(&ack_h);
    let mut s = stdout.lock();
    writeln!(s, "R {}", serde_json::to_string(&rep)?)?;
    s.flush()?;
    Ok(())
}

impl Dev {
    /// Sends a CON request built by the simulated device and tracks it for
    /// retransmission and latency.
    fn start_request(&mut self, msg: Vec<u8>, kind: u8, server: SocketAddr) {
        let mid = self.sim.outstanding.unwrap_or(0);
        let _ = self.sock.send_to(&msg, server);
        self.pending_msg = msg;
        self.outstanding = Some((Instant::now(), mid, kind, 0));
    }
}

// -------------------------------------------------------------- parent side

struct E2e {
    hist: Mutex<Histogram<u64>>,
    /// (device key hash, value) → (partition, offset) of the first record.
    seen: Mutex<HashMap<(u64, u64), (i32, i64)>>,
    records: AtomicU64,
    /// The same value in two different records of the log.
    duplicates: AtomicU64,
    /// The same record delivered twice by the consumer (not a log duplicate).
    redelivered: AtomicU64,
}

fn key_hash(k: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    k.hash(&mut h);
    h.finish()
}

/// Pulls `"temperature":<number>` out of a TelemetryPoint without a full parse.
fn temperature(payload: &[u8]) -> Option<u64> {
    let pat = b"\"temperature\":";
    let pos = payload.windows(pat.len()).position(|w| w == pat)? + pat.len();
    let rest = &payload[pos..];
    let end = rest
        .iter()
        .position(|c| {
            !(c.is_ascii_digit()
                || *c == b'.'
                || *c == b'e'
                || *c == b'E'
                || *c == b'+'
                || *c == b'-')
        })
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end])
        .ok()?
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}

type Starts = Vec<(i32, i64)>;

fn start_consumer(
    brokers: &str,
    topic: &str,
    stop: Arc<AtomicBool>,
    e2e: Arc<E2e>,
) -> anyhow::Result<(std::thread::JoinHandle<()>, Starts)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "lwm2m-loadgen")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .set("enable.partition.eof", "false")
        // Never skip forward: a reset re-reads (counted as re-delivery).
        .set("auto.offset.reset", "earliest")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if parts == 0 {
        anyhow::bail!("topic {topic} not found (is the tenant provisioned in the gateway?)");
    }
    let mut tpl = TopicPartitionList::new();
    let mut starts = Vec::new();
    for p in 0..parts as i32 {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        starts.push((p, high));
        tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
    }
    consumer.assign(&tpl)?;
    let handle = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                let now = now_us();
                let Some(p) = m.payload() else { continue };
                let Some(v) = temperature(p) else { continue };
                // Only our stamped values (µs since the epoch), not the
                // devices' initial readings.
                if v < 1_000_000_000_000_000 {
                    continue;
                }
                e2e.records.fetch_add(1, Ordering::Relaxed);
                let k = key_hash(m.key().unwrap_or(b""));
                let at = (m.partition(), m.offset());
                match e2e
                    .seen
                    .lock()
                    .unwrap_or_else(|x| x.into_inner())
                    .entry((k, v))
                {
                    std::collections::hash_map::Entry::Occupied(o) => {
                        if *o.get() == at {
                            e2e.redelivered.fetch_add(1, Ordering::Relaxed);
                        } else {
                            e2e.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(at);
                    }
                }
                let lat = now.saturating_sub(v).max(1);
                let _ = e2e
                    .hist
                    .lock()
                    .unwrap_or_else(|x| x.into_inner())
                    .record(lat);
            }
        }
    });
    Ok((handle, starts))
}

/// After the run: reads the topic from the offsets recorded at the start up to
/// the current end and counts distinct stamped values and true duplicates
/// (the same value at two offsets). This is the authoritative loss count; the
/// live consumer only measures latency.
fn verify(brokers: &str, topic: &str, starts: &Starts) -> anyhow::Result<(u64, u64)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "lwm2m-loadgen-verify")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    // A marker record per partition first: with some brokers (tansu 0.6 was
    // seen doing this) the last acknowledged batches only become readable
    // once another write arrives. The marker carries no stamped value.
    {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let prod: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()?;
        for (p, _) in starts {
            let rec = BaseRecord::to(topic)
                .partition(*p)
                .key("lwm2m-loadgen-marker")
                .payload("{\"marker\":true}");
            if let Err((e, _)) = prod.send(rec) {
                eprintln!("marker not sent: {e}");
            }
        }
        let _ = prod.flush(Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for (p, start) in starts {
        let (_, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(10))?;
        ends.insert(*p, high);
        if high > *start {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*start))?;
        }
    }
    consumer.assign(&tpl)?;
    let mut seen: HashMap<(u64, u64), i64> = HashMap::new();
    let mut dups = 0u64;
    let (mut read, mut stamped) = (0u64, 0u64);
    let mut offsets: std::collections::BTreeMap<i32, (i64, i64, u64)> = Default::default();
    let mut done: HashMap<i32, bool> = starts.iter().map(|(p, s)| (*p, ends[p] <= *s)).collect();
    // Read to the end however long it takes; give up only when nothing
    // arrives for 30 s.
    let mut last_progress = Instant::now();
    while done.values().any(|d| !d) && last_progress.elapsed() < Duration::from_secs(30) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        last_progress = Instant::now();
        read += 1;
        let e = offsets.entry(m.partition()).or_insert((i64::MAX, -1, 0));
        e.0 = e.0.min(m.offset());
        e.1 = e.1.max(m.offset());
        e.2 += 1;
        if m.offset() + 1 >= ends[&m.partition()] {
            done.insert(m.partition(), true);
        }
        let Some(v) = m.payload().and_then(temperature) else {
            continue;
        };
        if v < 1_000_000_000_000_000 {
            continue;
        }
        stamped += 1;
        let k = key_hash(m.key().unwrap_or(b""));
        match seen.entry((k, v)) {
            std::collections::hash_map::Entry::Occupied(o) => {
                if *o.get() != m.offset() {
                    dups += 1;
                }
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(m.offset());
            }
        }
    }
    let span: i64 = starts.iter().map(|(p, s)| ends[p] - s).sum();
    eprintln!(
        "verification: read {read} records ({stamped} stamped) of {span} in the log since the start; offsets seen per partition {:?}",
        offsets.iter().map(|(p, (lo, hi, n))| (*p, *lo, *hi, *n)).collect::<Vec<_>>()
    );
    Ok((seen.len() as u64, dups))
}

fn pct(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::json!(null);
    }
    serde_json::json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50),
        "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99),
        "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
        "mean_us": h.mean().round(),
    })
}

fn ms(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        "-".into()
    } else {
        format!("{:.2} ms", h.value_at_quantile(q) as f64 / 1000.0)
    }
}

fn device_id(i: usize) -> String {
    format!("lg-{i:08}")
}

fn start_rpc_phase(a: &Args, brokers: &str) -> anyhow::Result<RpcLoad> {
    let params = match a.rpc_method.as_str() {
        "reboot" | "factory_reset" => serde_json::json!({}),
        _ => serde_json::json!({ "path": a.rpc_path }),
    };
    RpcLoad::start(RpcLoadConfig {
        brokers: brokers.to_string(),
        request_topic: a.rpc_topic.clone(),
        status_topic: format!("device.rpc.status.{}", a.tenant),
        tenant: a.tenant.clone(),
        device_ids: (0..a.devices).map(device_id).collect(),
        rate: a.rpc_rate,
        method: a.rpc_method.clone(),
        params,
        timeout_ms: a.rpc_timeout_ms,
        run_id: format!("lg{:x}", now_us()),
    })
}

fn write_provisioning(a: &Args, path: &std::path::Path) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(
        f,
        "# Written by lwm2m-loadgen: {} devices, tenant {}",
        a.devices, a.tenant
    )?;
    for i in 0..a.devices {
        let ep = format!("{}{}", a.prefix, i);
        writeln!(
            f,
            "[[endpoint]]\nendpoint = \"{ep}\"\ndevice_id = \"{}\"\ntenant_id = \"{}\"",
            device_id(i),
            a.tenant
        )?;
        match a.dtls.as_deref() {
            Some("psk") if a.bootstrap.is_some() => {
                let id = bs_identity(&ep);
                let key: String = psk_of(&id).iter().map(|b| format!("{b:02x}")).collect();
                writeln!(
                    f,
                    "bootstrap = {{ psk_identity = \"{id}\", psk_key_hex = \"{key}\" }}"
                )?
            }
            Some("psk") => {
                let key: String = psk_of(&ep).iter().map(|b| format!("{b:02x}")).collect();
                writeln!(f, "psk_identity = \"{ep}\"\npsk_key_hex = \"{key}\"")?
            }
            Some("x509") => writeln!(f, "x509 = true")?,
            _ => {}
        }
        writeln!(f)?;
    }
    f.flush()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if let (Some(i), Some(c)) = (a.worker_index, a.worker_count) {
        return run_worker(&a, i, c);
    }
    if let Some(dir) = &a.write_pki {
        std::fs::create_dir_all(dir)?;
        let ca = Pki::new("lwm2m-loadgen CA");
        corem_lwm2m::testkit::certs::write_pem(dir, "ca", &ca.cert, &ca.key);
        let (c, k) = ca.issue("gateway", &["localhost", "127.0.0.1"]);
        corem_lwm2m::testkit::certs::write_pem(dir, "gateway", &c, &k);
        eprintln!(
            "wrote ca.crt/ca.key and gateway.crt/gateway.key to {}",
            dir.display()
        );
        return Ok(());
    }
    if let Some(p) = &a.write_provisioning {
        write_provisioning(&a, p)?;
        eprintln!("wrote {} endpoints to {}", a.devices, p.display());
        return Ok(());
    }
    raise_nofile();
    let per_worker_cap = fd_limit().saturating_sub(200).max(100);
    let workers = if a.workers > 0 {
        a.workers
    } else {
        a.devices.div_ceil(per_worker_cap).max(1)
    };
    let stop = Arc::new(AtomicBool::new(false));
    let e2e = Arc::new(E2e {
        hist: Mutex::new(hist()),
        seen: Mutex::new(HashMap::new()),
        records: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
        redelivered: AtomicU64::new(0),
    });
    let topic = format!("telemetry.raw.{}", a.tenant);
    let consumer = match (&a.brokers, a.baseline || a.idle) {
        (Some(b), false) => Some(start_consumer(b, &topic, stop.clone(), e2e.clone())?),
        _ => None,
    };
    let t0 = Instant::now();
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    let progress: Arc<Mutex<Vec<Progress>>> = Arc::new(Mutex::new(
        (0..workers).map(|_| Progress::default()).collect(),
    ));
    let reports: Arc<Mutex<Vec<WorkerReport>>> = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for i in 0..workers {
        let mut cmd = Command::new(&exe);
        cmd.args(std::env::args_os().skip(1));
        cmd.arg("--worker-index").arg(i.to_string());
        cmd.arg("--worker-count").arg(workers.to_string());
        let mut child = cmd.stdout(Stdio::piped()).spawn()?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no worker stdout"))?;
        let progress = progress.clone();
        let reports = reports.clone();
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(p) = line.strip_prefix("P ") {
                    if let Ok(p) = serde_json::from_str::<Progress>(p) {
                        progress.lock().unwrap_or_else(|x| x.into_inner())[i] = p;
                    }
                } else if let Some(r) = line.strip_prefix("R ") {
                    if let Ok(r) = serde_json::from_str::<WorkerReport>(r) {
                        reports.lock().unwrap_or_else(|x| x.into_inner()).push(r);
                    }
                }
            }
        }));
        children.push(child);
    }
    // Live progress line; the RPC phase starts once the fleet registered
    // (or registration stalled for 10 s) and stops 3 s before the steady
    // state ends (the devices de-register after it).
    let mut last = (0u64, Instant::now());
    let mut rpc: Option<RpcLoad> = None;
    let mut rpc_until: Option<Instant> = None;
    let mut reg_moved = (0u64, Instant::now());
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let done = children
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(Some(_))));
        let (reg, sent, acked) = {
            let p = progress.lock().unwrap_or_else(|x| x.into_inner());
            p.iter().fold((0, 0, 0), |a, x| {
                (a.0 + x.registered, a.1 + x.sent, a.2 + x.acked)
            })
        };
        if reg != reg_moved.0 {
            reg_moved = (reg, Instant::now());
        }
        if let (Some(b), true, None) = (&a.brokers, a.rpc_rate > 0, &rpc_until) {
            let settled = reg as usize >= a.devices
                || (reg > 0 && reg_moved.1.elapsed() > Duration::from_secs(10));
            if settled {
                let window = Duration::from_secs(a.duration.saturating_sub(3).max(1));
                rpc_until = Some(Instant::now() + window);
                match start_rpc_phase(&a, b) {
                    Ok(r) => rpc = Some(r),
                    Err(e) => eprintln!("\nRPC phase not started: {e}"),
                }
            }
        }
        if let (Some(r), Some(until)) = (rpc.as_mut(), rpc_until) {
            if Instant::now() >= until {
                r.stop_producing();
            }
        }
        let rate = (sent - last.0) as f64 / last.1.elapsed().as_secs_f64();
        last = (sent, Instant::now());
        let rpcs = rpc
            .as_ref()
            .map(|r| format!("  rpc {}/{}", r.finished(), r.produced()))
            .unwrap_or_default();
        eprint!(
            "\r[{:>5.0}s] registered {reg:>7}/{}  sent {sent:>9}  acked {acked:>9}  {rate:>9.0}/s  kafka {:>9}{rpcs}   ",
            t0.elapsed().as_secs_f64(),
            a.devices,
            e2e.records.load(Ordering::Relaxed)
        );
        if done {
            break;
        }
    }
    eprintln!();
    let rpc_report = rpc.map(|r| {
        r.finish(Duration::from_secs(
            a.drain.max(a.rpc_timeout_ms / 1000 + 5),
        ))
    });
    for r in readers {
        let _ = r.join();
    }
    let reports = reports.lock().unwrap_or_else(|x| x.into_inner()).clone();
    let mut total = WorkerReport::default();
    let mut reg_h = hist();
    let mut ack_h = hist();
    let mut hs_h = hist();
    let mut bs_h = hist();
    for r in &reports {
        total.devices += r.devices;
        total.registered += r.registered;
        total.register_failed += r.register_failed;
        total.register_retransmits += r.register_retransmits;
        total.register_timeouts += r.register_timeouts;
        total.observed += r.observed;
        total.notifications_sent += r.notifications_sent;
        total.notifications_acked += r.notifications_acked;
        total.notifications_retransmitted += r.notifications_retransmitted;
        total.notifications_rejected += r.notifications_rejected;
        total.busy_503 += r.busy_503;
        total.updates += r.updates;
        total.deregistered += r.deregistered;
        total.server_requests += r.server_requests;
        total.steady_seconds = total.steady_seconds.max(r.steady_seconds);
        total.register_seconds = total.register_seconds.max(r.register_seconds);
        total.handshakes += r.handshakes;
        total.handshakes_failed += r.handshakes_failed;
        total.handshake_seconds = total.handshake_seconds.max(r.handshake_seconds);
        let _ = hs_h.add(de(&r.hs_hist));
        total.bootstrapped += r.bootstrapped;
        total.bootstrap_failed += r.bootstrap_failed;
        total.bootstrap_seconds = total.bootstrap_seconds.max(r.bootstrap_seconds);
        total.fw_updated += r.fw_updated;
        total.fw_bytes += r.fw_bytes;
        if !r.bs_hist.is_empty() {
            let _ = bs_h.add(de(&r.bs_hist));
        }
        let _ = reg_h.add(de(&r.reg_hist));
        let _ = ack_h.add(de(&r.ack_hist));
    }
    // Points the gateway accepted: ACKed for CON / Send, sent for NON.
    let expected = if a.non && !a.send {
        total.notifications_sent
    } else {
        total.notifications_acked
    };
    let mut lost = 0u64;
    let mut verified: Option<(u64, u64)> = None;
    if let Some((c, starts)) = consumer {
        let deadline = Instant::now() + Duration::from_secs(a.drain);
        while Instant::now() < deadline {
            let got = e2e.seen.lock().unwrap_or_else(|x| x.into_inner()).len() as u64;
            if got >= expected {
                // A moment more for late duplicates.
                std::thread::sleep(Duration::from_millis(500));
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        let _ = c.join();
        if let Some(b) = &a.brokers {
            match verify(b, &topic, &starts) {
                Ok(v) => verified = Some(v),
                Err(e) => eprintln!("verification pass failed: {e}"),
            }
        }
        let got = match verified {
            Some((unique, _)) => unique,
            None => e2e.seen.lock().unwrap_or_else(|x| x.into_inner()).len() as u64,
        };
        lost = expected.saturating_sub(got);
    }
    let log_dups = verified
        .map(|v| v.1)
        .unwrap_or_else(|| e2e.duplicates.load(Ordering::Relaxed));
    let e2e_h = e2e.hist.lock().unwrap_or_else(|x| x.into_inner()).clone();
    let throughput = total.notifications_sent as f64 / total.steady_seconds.max(1e-9);
    let acked_rate = total.notifications_acked as f64 / total.steady_seconds.max(1e-9);
    let reg_rate = total.registered as f64 / total.register_seconds.max(1e-9);
    let report = serde_json::json!({
        "config": {
            "server": a.server.to_string(), "devices": a.devices, "workers": workers,
            "rate": a.rate, "duration_s": a.duration, "con": !a.non, "send": a.send,
            "format": a.format, "lifetime_s": a.lifetime, "idle": a.idle, "baseline": a.baseline,
        },
        "dtls": if a.dtls.is_some() { serde_json::json!({
            "mode": a.dtls, "ciphers": a.ciphers, "handshakes": total.handshakes,
            "failed": total.handshakes_failed, "seconds": total.handshake_seconds,
            "per_second": total.handshakes as f64 / total.handshake_seconds.max(1e-9),
            "latency": pct(&hs_h),
        }) } else { serde_json::json!(null) },
        "bootstrap": if a.bootstrap.is_some() { serde_json::json!({
            "bootstrapped": total.bootstrapped, "failed": total.bootstrap_failed,
            "seconds": total.bootstrap_seconds,
            "per_second": total.bootstrapped as f64 / total.bootstrap_seconds.max(1e-9),
            "latency": pct(&bs_h),
        }) } else { serde_json::json!(null) },
        "registration": {
            "registered": total.registered, "failed": total.register_failed,
            "retransmits": total.register_retransmits, "timeouts": total.register_timeouts, "observed": total.observed,
            "seconds": total.register_seconds, "per_second": reg_rate, "latency": pct(&reg_h),
        },
        "notifications": {
            "sent": total.notifications_sent, "acked": total.notifications_acked,
            "retransmitted": total.notifications_retransmitted, "rejected": total.notifications_rejected,
            "busy_503": total.busy_503, "steady_seconds": total.steady_seconds,
            "sent_per_second": throughput, "acked_per_second": acked_rate,
            "ack_latency": pct(&ack_h),
        },
        "kafka": if a.brokers.is_some() && !a.baseline && !a.idle { serde_json::json!({
            "topic": topic, "expected": expected,
            "received_unique": verified.map(|v| v.0 as usize).unwrap_or_else(|| e2e.seen.lock().unwrap_or_else(|x| x.into_inner()).len()),
            "verified_from_log": verified.is_some(),
            "records": e2e.records.load(Ordering::Relaxed),
            "duplicates": log_dups,
            "consumer_redelivered": e2e.redelivered.load(Ordering::Relaxed), "lost": lost,
            "e2e_latency": pct(&e2e_h),
        }) } else { serde_json::json!(null) },
        "updates": total.updates, "deregistered": total.deregistered,
        "firmware": a.firmware.then(|| serde_json::json!({
            "updated": total.fw_updated, "package_bytes": total.fw_bytes,
        })),
        "server_requests": total.server_requests,
        "rpc": rpc_report.as_ref().map(|r| serde_json::json!({
            "method": a.rpc_method, "rate": a.rpc_rate, "report": r,
            "request_to_final_status": pct(&r.latency),
            "request_to_sent_status": pct(&r.to_sent),
            "accepted_to_finished_in_gateway": pct(&r.in_gateway),
        })),
    });
    println!("== lwm2m-loadgen summary ==");
    println!(
        "devices            {} ({} workers), registered {}, failed {}, observed {}",
        a.devices, workers, total.registered, total.register_failed, total.observed
    );
    if a.bootstrap.is_some() {
        println!(
            "bootstrap          {} ok, {} failed, {:.0}/s over {:.2} s (handshake + sequence); latency p50 {} p99 {}",
            total.bootstrapped,
            total.bootstrap_failed,
            total.bootstrapped as f64 / total.bootstrap_seconds.max(1e-9),
            total.bootstrap_seconds,
            ms(&bs_h, 0.5),
            ms(&bs_h, 0.99)
        );
    }
    if a.dtls.is_some() {
        println!(
            "DTLS handshakes    {} ok, {} failed, {:.0}/s over {:.2} s; latency p50 {} p99 {}",
            total.handshakes,
            total.handshakes_failed,
            total.handshakes as f64 / total.handshake_seconds.max(1e-9),
            total.handshake_seconds,
            ms(&hs_h, 0.5),
            ms(&hs_h, 0.99)
        );
    }
    println!(
        "registration       {:.0}/s over {:.2} s; latency p50 {} p99 {}",
        reg_rate,
        total.register_seconds,
        ms(&reg_h, 0.5),
        ms(&reg_h, 0.99)
    );
    println!(
        "notifications      {} sent ({:.0}/s), {} acked ({:.0}/s), {} retransmitted, {} 5.03, {} RST",
        total.notifications_sent, throughput, total.notifications_acked, acked_rate, total.notifications_retransmitted, total.busy_503, total.notifications_rejected
    );
    println!(
        "CON ACK latency    p50 {} p99 {} max {}",
        ms(&ack_h, 0.5),
        ms(&ack_h, 0.99),
        ms(&ack_h, 1.0)
    );
    if a.brokers.is_some() && !a.baseline && !a.idle {
        println!(
            "kafka              expected {expected}, lost {lost}, duplicates {log_dups} ({}; consumer re-deliveries {}); end-to-end p50 {} p99 {} max {}",
            if verified.is_some() { "verified from the log" } else { "live consumer only" },
            e2e.redelivered.load(Ordering::Relaxed),
            ms(&e2e_h, 0.5),
            ms(&e2e_h, 0.99),
            ms(&e2e_h, 1.0)
        );
    }
    if let Some(r) = &rpc_report {
        println!(
            "RPCs               {} requested ({:.0}/s over {:.1} s), {} finished ({:.0}/s, the last {:.1} s after the first request) {:?}, {} unfinished; request→status p50 {} p99 {} max {}; inside the gateway (accepted→finished) p50 {} p99 {}",
            r.requested,
            r.requested_per_second,
            r.seconds,
            r.finished,
            r.finished_per_second,
            r.finish_seconds,
            r.by_status,
            r.unfinished,
            ms(&r.latency, 0.5),
            ms(&r.latency, 0.99),
            ms(&r.latency, 1.0),
            ms(&r.in_gateway, 0.5),
            ms(&r.in_gateway, 0.99)
        );
    }
    println!(
        "updates {}, de-registered {}",
        total.updates, total.deregistered
    );
    let js = serde_json::to_string_pretty(&report)?;
    println!("{js}");
    if let Some(p) = &a.json {
        std::fs::write(p, &js)?;
    }
    Ok(())
}
