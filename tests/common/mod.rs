//! Shared fixtures for the loopback integration tests: a real tansu broker, the
//! real gateway binary, simulated devices on real UDP sockets, and a topic
//! reader that consumes what the gateway published.
//!
//! The broker binary is `$TANSU_BIN`, else `tansu` on PATH, else
//! `~/.cargo/bin/tansu` (scripts/setup installs it).

#![allow(dead_code)]

use corem_lwm2m::proto::coap::{Code, Message, MsgType};
use corem_lwm2m::testkit::dtls_client::{
    client_context, ClientAuth, ClientError, Datagrams, DtlsClient,
};
use corem_lwm2m::testkit::sim::{SimDevice, SimEvents};
use corem_lwm2m::tools::topic_reader::{Record, TopicReader};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Ports handed to gateways and brokers come from below the kernel's
/// ephemeral range (32768–60999 by default): a test that SIGKILLs a gateway
/// and starts it again on the same port must not find that port taken, in
/// between, by some client socket's ephemeral bind (seen in CI: "binding UDP
/// …: Address already in use" on the restart). Each test process starts at
/// its own offset; the port is checked free for both TCP and UDP.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LO: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = std::process::id().wrapping_mul(7_919).wrapping_add(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0),
    ) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::Relaxed, Ordering::Relaxed);
    loop {
        let port = (LO + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
}

pub fn free_tcp_port() -> u16 {
    free_port()
}

pub fn free_udp_port() -> u16 {
    free_port()
}

fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            let c = d.join("tansu");
            if c.is_file() {
                return c;
            }
        }
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    PathBuf::from(home).join(".cargo/bin/tansu")
}

pub struct Broker {
    pub port: u16,
    /// The port clients are told to connect to (a TLS proxy), when not `port`.
    pub advertised: Option<u16>,
    storage: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// In-memory storage (fast, lost on stop).
    pub fn memory() -> Broker {
        Self::start_with(format!("memory://tansu{}/", free_tcp_port()), tempdir())
    }

    /// SQLite storage in a temp dir: survives a broker restart.
    pub fn durable() -> Broker {
        let dir = tempdir();
        Self::start_with("sqlite://tansu.db".to_string(), dir)
    }

    fn start_with(storage: String, dir: PathBuf) -> Broker {
        let mut b = Broker {
            port: free_tcp_port(),
            advertised: None,
            storage,
            dir,
            child: None,
        };
        b.start();
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// In-memory storage on `port`, advertising `advertised` (a TLS proxy
    /// in front of it).
    pub fn memory_behind(port: u16, advertised: u16) -> Broker {
        let mut b = Broker {
            port,
            advertised: Some(advertised),
            storage: format!("memory://tansu{}/", free_tcp_port()),
            dir: tempdir(),
            child: None,
        };
        b.start();
        b
    }

    pub fn start(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let adv = format!("tcp://127.0.0.1:{}", self.advertised.unwrap_or(self.port));
        let log = std::fs::File::create(self.dir.join("broker.log")).unwrap();
        let child = Command::new(tansu_bin())
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &adv,
            ])
            .args(["--storage-engine", &self.storage])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start tansu ({}): {e}; run scripts/setup",
                    tansu_bin().display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(self.addr()).is_err() {
            assert!(Instant::now() < deadline, "broker did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn tempdir() -> PathBuf {
    tempfile::tempdir().unwrap().keep()
}

pub struct Gateway {
    pub coap: SocketAddr,
    /// The DTLS port.
    pub coaps: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    child: Option<Child>,
    pub log: Arc<Mutex<Vec<String>>>,
    config: PathBuf,
    /// Extra command-line arguments for the next `spawn`.
    pub args: Vec<String>,
    /// RUST_LOG of the next `spawn` (None: unset, `[log] level` applies).
    pub rust_log: Option<String>,
}

pub const PROVISIONING: &str = r#"
[[endpoint]]
endpoint = "urn:imei:123"
device_id = "d7b1c0e2-3f44-4a91-9b2e-2c5a1f0e9d33"
tenant_id = "acme"

[[endpoint]]
endpoint = "urn:imei:env"
device_id = "env-device"
tenant_id = "acme"
profile = "environment"
"#;

pub const ENV_PROFILE: &str = r#"
name = "environment"
[[resource]]
path = "/3303/0/5700"
metric = "temperature"
[[resource]]
path = "/3303/0/5701"
metric = "units"
kind = "string"
[[resource]]
path = "/3304/0/5700"
metric = "humidity"
[[observe]]
path = "/3303/0"
pmin = 1
pmax = 30
"#;

impl Gateway {
    /// [`Gateway::start`] with the admin API behind a bearer `token` (read
    /// from a token file, as operators configure it).
    pub fn start_with_token(
        broker: &Broker,
        shards: usize,
        provisioning: &str,
        token: &str,
    ) -> Gateway {
        let dir = tempdir();
        let token_file = dir.join("admin.token");
        std::fs::write(&token_file, token).unwrap();
        let extra = format!("[admin]\ntoken_file = \"{}\"\n", token_file.display());
        Gateway::start(broker, shards, provisioning, &extra)
    }

    /// Starts the gateway binary with `extra` appended to a generated config.
    pub fn start(broker: &Broker, shards: usize, provisioning: &str, extra: &str) -> Gateway {
        let dir = tempdir();
        std::fs::create_dir_all(dir.join("profiles")).unwrap();
        std::fs::write(dir.join("profiles/environment.toml"), ENV_PROFILE).unwrap();
        std::fs::write(dir.join("provisioning.toml"), provisioning).unwrap();
        let coap: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
        let coaps: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let cfg = format!(
            "[gateway]\nlisten = \"{coap}\"\nshards = {shards}\n\
             [dtls]\nlisten = \"{coaps}\"\n\
             [kafka]\nbrokers = \"{}\"\nlinger_ms = 1\n\
             [directory]\nprovisioning_file = \"provisioning.toml\"\nsnapshot_dir = \"snap\"\nsnapshot_interval_s = 1\n\
             [profiles]\ndir = \"profiles\"\n\
             [admin]\nlisten = \"{admin}\"\n{extra}\n",
            broker.addr()
        );
        // `extra` may re-open a table; TOML forbids duplicates, so merge by hand.
        let cfg = merge_toml(&cfg);
        let config = dir.join("gateway.toml");
        std::fs::write(&config, cfg).unwrap();
        let mut g = Gateway {
            coap,
            coaps,
            admin,
            dir,
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
            config,
            args: Vec::new(),
            rust_log: Some(std::env::var("GW_LOG").unwrap_or_else(|_| "info".into())),
        };
        g.spawn();
        g
    }

    pub fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_corem-lwm2m"));
        match &self.rust_log {
            Some(l) => cmd.env("RUST_LOG", l),
            None => cmd.env_remove("RUST_LOG"),
        };
        let mut child = cmd
            .arg("--config")
            .arg(&self.config)
            .env_remove("NO_COLOR")
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        for s in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = self.log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    eprintln!("[gateway] {line}");
                    log.lock().unwrap().push(line);
                }
            });
        }
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = http(self.admin, "GET", "/healthz", "") {
                break;
            }
            assert!(Instant::now() < deadline, "gateway did not become healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the generated config file (for the next `spawn`).
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let s = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, f(s)).unwrap();
    }

    /// The gateway process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident set size of the gateway process (KiB).
    pub fn rss_kib(&self) -> u64 {
        let Some(pid) = self.pid() else { return 0 };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_contains(&self, s: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(s))
    }

    /// Log lines containing `s`.
    pub fn log_count(&self, s: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(s))
            .count()
    }

    /// Sum of a counter or gauge over shards, from /metrics (`name` as in
    /// the shard's metrics: a counter's `_total` suffix is added here).
    pub fn metric(&self, name: &str) -> i64 {
        self.metric_by_shard(name).iter().sum()
    }

    pub fn metric_by_shard(&self, name: &str) -> Vec<i64> {
        let (_, body) = http(self.admin, "GET", "/metrics", "").unwrap();
        let counter = format!("# TYPE corem_lwm2m_{name}_total counter");
        let base = if body.lines().any(|l| l == counter) {
            format!("corem_lwm2m_{name}_total")
        } else {
            format!("corem_lwm2m_{name}")
        };
        // Per-shard series (`{shard=...}`) or a process-wide one.
        let (labelled, plain) = (format!("{base}{{"), format!("{base} "));
        body.lines()
            .filter(|l| l.starts_with(&labelled) || l.starts_with(&plain))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Merges repeated `[table]` headers so `extra` can add keys to any table.
fn merge_toml(s: &str) -> String {
    let mut tables: Vec<(String, Vec<String>)> = vec![(String::new(), vec![])];
    for line in s.lines() {
        let t = line.trim();
        if t.starts_with('[') && !t.starts_with("[[") {
            let name = t.to_string();
            if !tables.iter().any(|(n, _)| *n == name) {
                tables.push((name.clone(), vec![]));
            }
            let idx = tables.iter().position(|(n, _)| *n == name).unwrap();
            let tbl = tables.remove(idx);
            tables.push(tbl);
        } else if !t.is_empty() {
            // A key given again (in `extra`) replaces the earlier value.
            let key = t.split('=').next().unwrap_or("").trim().to_string();
            let lines = &mut tables.last_mut().unwrap().1;
            if t.contains('=') {
                lines.retain(|l| l.split('=').next().unwrap_or("").trim() != key);
            }
            lines.push(line.to_string());
        }
    }
    let mut out = String::new();
    for (n, lines) in tables {
        if !n.is_empty() {
            out.push_str(&n);
            out.push('\n');
        }
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// Minimal HTTP/1.1 client for the admin API.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    http_with(addr, method, path, "", body)
}

/// [`http`] with extra header lines (each ending in `\r\n`).
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    http_bytes(addr, method, path, headers, body.as_bytes())
}

/// [`http_with`] with a binary body.
pub fn http_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// A simulated device on a real UDP socket.
pub struct Device {
    pub sim: SimDevice,
    pub sock: UdpSocket,
    pub server: SocketAddr,
    /// Set for a device that talks DTLS (its own connected socket).
    pub dtls: Option<std::cell::RefCell<DtlsClient<Tap>>>,
    /// Requests the gateway sent us (path, code) — to count observations.
    pub requests_seen: Vec<(String, Code, Option<u32>)>,
    /// Drop every Nth datagram each way (a lossy link), when set.
    pub loss_every: Option<u64>,
    pub sent_n: std::cell::Cell<u64>,
    pub recv_n: std::cell::Cell<u64>,
}

impl Device {
    pub fn new(endpoint: &str, server: SocketAddr, seed: u16) -> Device {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Device {
            sim: SimDevice::new(endpoint, seed),
            sock,
            server,
            dtls: None,
            requests_seen: Vec::new(),
            loss_every: None,
            sent_n: std::cell::Cell::new(0),
            recv_n: std::cell::Cell::new(0),
        }
    }

    /// A device that handshakes with the gateway's DTLS port first.
    pub fn new_dtls(
        endpoint: &str,
        server: SocketAddr,
        seed: u16,
        auth: &ClientAuth,
        ciphers: &str,
    ) -> Result<Device, ClientError> {
        let mut d = Device::new(endpoint, server, seed);
        d.dtls = Some(std::cell::RefCell::new(dtls_connect(
            server, auth, ciphers,
        )?));
        Ok(d)
    }

    pub fn send(&self, d: &[u8]) {
        if let Some(n) = self.loss_every {
            self.sent_n.set(self.sent_n.get() + 1);
            if self.sent_n.get() % n == 0 {
                return;
            }
        }
        match &self.dtls {
            Some(c) => c.borrow_mut().send(d).unwrap(),
            None => {
                self.sock.send_to(d, self.server).unwrap();
            }
        }
    }

    /// One datagram (plaintext for DTLS), waiting up to ~50 ms; with
    /// `loss_every`, every Nth one is dropped.
    pub fn recv_one(&self, buf: &mut [u8]) -> Option<usize> {
        let n = self.recv_raw(buf)?;
        if let Some(k) = self.loss_every {
            self.recv_n.set(self.recv_n.get() + 1);
            if self.recv_n.get() % k == 0 {
                return None;
            }
        }
        Some(n)
    }

    fn recv_raw(&self, buf: &mut [u8]) -> Option<usize> {
        match &self.dtls {
            Some(c) => {
                let end = Instant::now() + Duration::from_millis(50);
                loop {
                    match c.borrow_mut().try_recv() {
                        Ok(Some(d)) => {
                            let n = d.len().min(buf.len());
                            buf[..n].copy_from_slice(&d[..n]);
                            return Some(n);
                        }
                        Ok(None) if Instant::now() < end => continue,
                        _ => return None,
                    }
                }
            }
            None => self.sock.recv_from(buf).ok().map(|(n, _)| n),
        }
    }

    /// Receives and answers for `dur`; returns everything that happened.
    pub fn pump(&mut self, dur: Duration) -> (SimEvents, Vec<Vec<u8>>) {
        let mut all = SimEvents::default();
        let mut raw = Vec::new();
        let deadline = Instant::now() + dur;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            if let Some(g) = self.sim.fw_tick(Instant::now()) {
                self.send(&g);
            }
            if let Some(n) = self.recv_one(&mut buf) {
                let d = buf[..n].to_vec();
                if let Ok(m) = Message::decode(&d) {
                    if m.code.is_request() {
                        let path: Vec<String> = m
                            .option_values(11)
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect();
                        self.requests_seen.push((
                            format!("/{}", path.join("/")),
                            m.code,
                            m.observe(),
                        ));
                    }
                }
                let ev = self.sim.handle(&d);
                all.registered |= ev.registered;
                all.deregistered |= ev.deregistered;
                if ev.response.is_some() {
                    all.response = ev.response;
                }
                all.observed.extend(ev.observed);
                all.executed.extend(ev.executed);
                all.bootstrap_finished |= ev.bootstrap_finished;
                for r in &ev.replies {
                    self.send(r);
                }
                raw.push(d);
            }
        }
        (all, raw)
    }

    /// Sends a request and waits for its response code (retransmitting like a
    /// CoAP client, RFC 7252 §4.2), answering server requests meanwhile.
    pub fn request(&mut self, msg: &[u8], timeout: Duration) -> Option<Code> {
        let deadline = Instant::now() + timeout;
        let mut next_send = Instant::now();
        let mut backoff = Duration::from_millis(300);
        while Instant::now() < deadline {
            if Instant::now() >= next_send {
                self.send(msg);
                next_send = Instant::now() + backoff;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            let (ev, _) = self.pump(Duration::from_millis(20));
            if let Some((_, code)) = ev.response {
                return Some(code);
            }
        }
        None
    }

    /// Registers and waits until `n_obs` observations are established.
    pub fn register(&mut self, n_obs: usize) -> Code {
        let r = self.sim.register();
        let code = self
            .request(&r, Duration::from_secs(10))
            .expect("no answer to Register");
        if code == Code::CREATED {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.sim.observations.len() < n_obs && Instant::now() < deadline {
                self.pump(Duration::from_millis(20));
            }
            assert!(
                self.sim.observations.len() >= n_obs,
                "observations not established: {:?}",
                self.sim.observations
            );
        }
        code
    }

    /// Sends a CON notification and waits for the gateway's answer (ACK or
    /// RST), retransmitting until `timeout` as a device's CoAP stack would.
    /// `None` when nothing answered.
    pub fn notify_con(&mut self, path: &str, timeout: Duration) -> Option<MsgType> {
        let (mid, n) = self.sim.notify(path, true).expect("not observed");
        let deadline = Instant::now() + timeout;
        let mut backoff = Duration::from_millis(200);
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            self.send(&n);
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                if let Some(k) = self.recv_one(&mut buf) {
                    if let Ok(m) = Message::decode(&buf[..k]) {
                        if m.mtype == MsgType::Ack && m.message_id == mid {
                            return Some(MsgType::Ack);
                        }
                        if m.mtype == MsgType::Rst && m.message_id == mid {
                            return Some(MsgType::Rst);
                        }
                    }
                    let ev = self.sim.handle(&buf[..k]);
                    for r in &ev.replies {
                        self.send(r);
                    }
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        None
    }
}

pub fn reader(broker: &Broker, topics: &[&str]) -> TopicReader {
    let t: Vec<String> = topics.iter().map(|s| s.to_string()).collect();
    TopicReader::new(&broker.addr(), &t, Duration::from_secs(30)).unwrap()
}

/// Reads until `want` records match `pred`, or `timeout`.
pub fn read_matching(
    r: &TopicReader,
    want: usize,
    timeout: Duration,
    pred: impl Fn(&Record) -> bool,
) -> Vec<Record> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        got.extend(
            r.read(usize::MAX, Duration::from_millis(200))
                .into_iter()
                .filter(|x| pred(x)),
        );
    }
    got
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

impl Broker {
    /// Writes one marker record to `topic` (partition 0). tansu 0.6 makes the
    /// last batches of a burst readable only after the next write; readers
    /// that must see everything write this first. Records with a `marker`
    /// field are not TelemetryPoints.
    pub fn write_marker(&self, topic: &str) {
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let prod: BaseProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.addr())
            .create()
            .unwrap();
        let rec = BaseRecord::to(topic)
            .partition(0)
            .key("marker")
            .payload("{\"marker\":true}");
        prod.send(rec).map_err(|(e, _)| e).unwrap();
        prod.flush(Duration::from_secs(10)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
}

impl Gateway {
    /// SIGKILL: no flush, no snapshot.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Device {
    /// Moves the device to a fresh source port (a NAT rebinding, or a
    /// client library that opens a new socket).
    pub fn new_port(&mut self) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        self.sock = sock;
    }

    pub fn local_addr(&self) -> SocketAddr {
        match &self.dtls {
            Some(c) => c.borrow_mut().transport().sock.local_addr().unwrap(),
            None => self.sock.local_addr().unwrap(),
        }
    }
}

/// Raises the open-file limit to its hard maximum (tests with many sockets).
pub fn raise_nofile() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// A connected UDP socket that keeps a copy of every datagram it sent (to
/// replay records in tests).
pub struct Tap {
    pub sock: UdpSocket,
    pub sent: Vec<Vec<u8>>,
}

impl Datagrams for Tap {
    fn send(&mut self, d: &[u8]) -> std::io::Result<()> {
        self.sent.push(d.to_vec());
        self.sock.send(d).map(|_| ())
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }
}

/// Handshakes with `server` from a fresh port.
pub fn dtls_connect(
    server: SocketAddr,
    auth: &ClientAuth,
    ciphers: &str,
) -> Result<DtlsClient<Tap>, ClientError> {
    let ctx = client_context(auth, ciphers)?;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut c = DtlsClient::new(
        &ctx,
        Tap {
            sock,
            sent: Vec::new(),
        },
    )?;
    c.handshake(Duration::from_secs(10))?;
    Ok(c)
}

/// A TLS-terminating TCP proxy (tansu 0.6.0 cannot serve TLS itself: its
/// `--cert` and `--key` flags exclude each other and its broker never uses
/// the acceptor it builds). Each connection: a thread shuttling bytes
/// between the TLS side and the plaintext backend.
pub struct TlsProxy {
    pub port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl TlsProxy {
    pub fn start(backend: u16, cert: &Path, key: &Path) -> TlsProxy {
        use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
        b.set_certificate_chain_file(cert).unwrap();
        b.set_private_key_file(key, SslFiletype::PEM).unwrap();
        let acceptor = Arc::new(b.build());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let acceptor = acceptor.clone();
                let st = st.clone();
                std::thread::spawn(move || {
                    client.set_nonblocking(false).ok();
                    let Ok(mut tls) = acceptor.accept(client) else {
                        return; // handshake refused (wrong CA on the client side)
                    };
                    let Ok(mut up) = TcpStream::connect(("127.0.0.1", backend)) else {
                        return;
                    };
                    tls.get_ref().set_nonblocking(true).ok();
                    up.set_nonblocking(true).ok();
                    let mut buf = vec![0u8; 64 * 1024];
                    while !st.load(std::sync::atomic::Ordering::Relaxed) {
                        let mut idle = true;
                        match tls.ssl_read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => {
                                idle = false;
                                up.set_nonblocking(false).ok();
                                if up.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                                up.set_nonblocking(true).ok();
                            }
                            Err(e) if e.code() == openssl::ssl::ErrorCode::WANT_READ => {}
                            Err(_) => return,
                        }
                        match up.read(&mut buf) {
                            Ok(0) => return,
                            Ok(n) => {
                                idle = false;
                                let mut off = 0;
                                while off < n {
                                    match tls.ssl_write(&buf[off..n]) {
                                        Ok(k) => off += k,
                                        Err(e)
                                            if e.code() == openssl::ssl::ErrorCode::WANT_WRITE =>
                                        {
                                            std::thread::sleep(Duration::from_micros(200))
                                        }
                                        Err(_) => return,
                                    }
                                }
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => return,
                        }
                        if idle {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                });
            }
        });
        TlsProxy { port, stop }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
