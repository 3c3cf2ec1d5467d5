//! glommio wiring of the shards: one executor per core, pinned, each owning
//! its SO_REUSEPORT socket, its LwM2M [`Server`], its Kafka producer and its
//! timers. Wiring only: every protocol decision is the server's.
//!
//! Per shard, tasks share the state through an `Rc<RefCell<_>>` (single
//! thread, never borrowed across an await):
//! * the **receive** task awaits one datagram with glommio's io_uring
//!   `recv_from`, then drains what else is waiting with non-blocking
//!   `recvmmsg` batches; the directory and profile snapshots are loaded once
//!   per batch;
//! * the **timer** task sleeps until the server's `poll_timeout` (or, while
//!   records await the broker, the Kafka poll interval), runs timers, serves
//!   delivery reports and writes the shard's registration snapshot; anything
//!   that moves the deadline earlier nudges it awake;
//! * one **inbox** task per peer channel applies messages from the other
//!   shards and from the control plane;
//! * the **outbox** task forwards the server's shard messages.
//!
//! Cross-shard and control traffic uses glommio shared channels (one per
//! ordered pair of executors), which wake the receiving executor: explicit
//! messages, no shared mutable state, nothing on the per-datagram path
//! blocks. The control plane's messages enter through a small relay
//! executor, since only executors can hold channel ends.

use crate::config::Config;
use crate::control::bootstrap::ShardStore;
use crate::control::directory::{BootstrapCredentials, Directory};
use crate::control::profiles::Profiles;
use crate::control::registrations::RegistrationStore;
use crate::control::sessions::SessionStore;
use crate::io::dtls::{OpensslAcceptor, TlsSetupError};
use crate::io::{self, RecvBatch, SendBatch};
use crate::metrics::ShardMetrics;
use crate::proto::coap::PeerId;
use crate::proto::dtls::endpoint::credential_tag;
use crate::proto::dtls::session::CloseReason;
use crate::proto::dtls::DtlsEndpoint;
use crate::proto::lwm2m::bootstrap::{BootstrapServer, BsCtx};
use crate::proto::lwm2m::endpoint::Identity;
use crate::proto::lwm2m::rpc::{RpcEvent, RpcExec};
use crate::proto::lwm2m::server::{
    ControlMsg, Ctx, Dest, DeviceView, Now, Server, SessionCmd, ShardMsg,
};
use crate::sink::kafka::KafkaSink;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::channels::shared_channel::{self, ConnectedReceiver, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};
use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn now() -> Now {
    Now {
        instant: Instant::now(),
        wall_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
    }
}

/// What travels between executors.
#[derive(Debug, Clone)]
pub enum Inbox {
    Shard(ShardMsg),
    Control(ControlMsg),
    /// An RPC for the device registered on this shard.
    Rpc(Box<RpcExec>),
    /// What this shard holds of an endpoint's registration (admin API).
    Describe(Arc<str>, crossbeam_channel::Sender<Option<Box<DeviceView>>>),
    /// The control plane recorded (or not) the PSK a bootstrap session of
    /// this shard generated.
    BootstrapStored(u64, Result<(), String>),
    /// Stop reading, flush, snapshot, exit.
    Shutdown,
}

/// Capacity of each inter-executor channel.
const CHANNEL: usize = 4096;
/// Longest sleep of the timer task (gauges, snapshots).
const MAX_SLEEP: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("gateway.cpus names CPU {0}, outside the CPUs this process may use {1:?} (systemd CPUAffinity=, taskset)")]
    Cpu(usize, Vec<usize>),
    #[error("binding UDP {0}: {1}")]
    Bind(std::net::SocketAddr, std::io::Error),
    #[error("creating the Kafka producer of shard {0}: {1}")]
    Kafka(usize, rdkafka::error::KafkaError),
    #[error("starting {0}: {1}")]
    Executor(String, String),
    #[error("shard {0} did not start within 60 s")]
    Timeout(usize),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("nothing to listen on: gateway.plain and dtls.enabled are both off")]
    NoListener,
}

pub struct Shards {
    pub metrics: Vec<Arc<ShardMetrics>>,
    /// The plain CoAP address (when `gateway.plain`).
    pub local_addr: Option<std::net::SocketAddr>,
    /// The DTLS address (when `dtls.enabled`).
    pub dtls_addr: Option<std::net::SocketAddr>,
    /// The bootstrap listeners (when `bootstrap.enabled`): plain, DTLS.
    pub bootstrap_addr: Option<std::net::SocketAddr>,
    pub bootstrap_dtls_addr: Option<std::net::SocketAddr>,
    /// Live telemetry of watched devices, fed by every shard's sink.
    pub tap: Arc<crate::sink::tap::Tap>,
    control: crossbeam_channel::Sender<(Option<usize>, Inbox)>,
    joins: Vec<glommio::ExecutorJoinHandle<()>>,
}

/// Sends control-plane messages to every shard, or to one (cheap to clone).
#[derive(Clone)]
pub struct ControlHandle(crossbeam_channel::Sender<(Option<usize>, Inbox)>);

impl ControlHandle {
    pub fn send(&self, m: ControlMsg) {
        let _ = self.0.send((None, Inbox::Control(m)));
    }

    /// An RPC to the shard that reported holding the device.
    pub fn send_rpc(&self, shard: usize, e: RpcExec) {
        let _ = self.0.send((Some(shard), Inbox::Rpc(Box::new(e))));
    }

    /// Answers a bootstrap session's store request.
    pub fn bootstrap_stored(&self, shard: usize, session: u64, result: Result<(), String>) {
        let _ = self
            .0
            .send((Some(shard), Inbox::BootstrapStored(session, result)));
    }

    /// Asks shard `shard` what it holds of `endpoint`'s registration;
    /// blocks the caller (a control-plane thread) up to `wait`. `None`: not
    /// there, or no answer in time.
    pub fn describe(&self, shard: usize, endpoint: &str, wait: Duration) -> Option<DeviceView> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.0
            .send((Some(shard), Inbox::Describe(Arc::from(endpoint), tx)))
            .ok()?;
        rx.recv_timeout(wait).ok().flatten().map(|b| *b)
    }
}

impl Shards {
    pub fn control(&self) -> ControlHandle {
        ControlHandle(self.control.clone())
    }

    /// Signals shutdown and waits for every shard to finish.
    pub fn shutdown(self) {
        let _ = self.control.send((None, Inbox::Shutdown));
        for j in self.joins {
            if let Err(e) = j.join() {
                tracing::error!(error = %e, "executor exited with an error");
            }
        }
    }
}

struct State {
    server: Server,
    sink: KafkaSink,
    directory: Arc<Directory>,
    profiles: Arc<Profiles>,
    send: SendBatch,
    /// The shard's DTLS endpoint and socket (when DTLS is on).
    dtls: Option<DtlsEndpoint<OpensslAcceptor>>,
    dtls_fd: RawFd,
    outbox: LocalSender<(Dest, ShardMsg)>,
    /// When the timer task will wake; a nudge when something is due earlier.
    timer_at: Rc<Cell<Instant>>,
    nudge: LocalSender<()>,
    fd: RawFd,
    stopping: bool,
    /// The directory version whose PSK changes this shard's sessions were
    /// last checked against (0: check them all at the first change).
    creds_seen: u64,
    /// Kafka poll interval while records await the broker.
    poll: Duration,
    /// Receive tasks in their coalescing loop: they wake every
    /// `gateway.coalesce_us` ..= `coalesce_max_us` and serve the producer then (see
    /// [`State::serve_sink`]), so the timer task need not wake for it.
    rx_coalescing: u32,
    /// Reports for the RPC control plane.
    rpc_events: Option<crossbeam_channel::Sender<RpcEvent>>,
    /// The bootstrap server of this shard (when `bootstrap.enabled`).
    bs: Option<BsState>,
}

/// A shard's bootstrap server, its sockets and its DTLS endpoint (own
/// sessions, the endpoints' bootstrap credentials).
struct BsState {
    server: BootstrapServer,
    dtls: Option<DtlsEndpoint<OpensslAcceptor>>,
    /// The bootstrap DTLS endpoint's own counters (copied into the shard's
    /// `bootstrap_dtls_*` metrics).
    dtls_metrics: Arc<ShardMetrics>,
    fd: RawFd,
    dtls_fd: RawFd,
    store: Option<crossbeam_channel::Sender<ShardStore>>,
    shard: usize,
}

/// Which socket a datagram came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    Coap,
    Coaps,
    BootstrapCoap,
    BootstrapCoaps,
}

impl State {
    /// Sends transmits, forwards shard messages, and (from tasks other than
    /// the timer) nudges the timer when its next deadline moved earlier.
    fn flush(&mut self) {
        self.send_out();
        let mut due = self.server.poll_timeout();
        if let Some(d) = self.dtls.as_ref().and_then(|d| d.poll_timeout()) {
            due = Some(due.map_or(d, |x| x.min(d)));
        }
        if let Some(d) = self.bs_timeout() {
            due = Some(due.map_or(d, |x| x.min(d)));
        }
        if self.needs_sink_poll() {
            let p = Instant::now() + self.poll;
            due = Some(due.map_or(p, |d| d.min(p)));
        }
        if due.is_some_and(|d| d < self.timer_at.get()) {
            let _ = self.nudge.try_send(());
        }
    }

    /// Whether the timer task must wake every `poll` to serve the producer:
    /// records await the broker and no receive task is coalescing (one
    /// that is serves it on its own wake-ups, so a loaded shard wakes once
    /// per coalescing interval, not twice).
    fn needs_sink_poll(&self) -> bool {
        self.rx_coalescing == 0
            && (self.server.awaiting_delivery() > 0 || self.sink.in_flight() > 0)
    }

    /// Serves the producer: delivery callbacks, then the answers they
    /// release (CON ACKs held until the broker has the record).
    fn serve_sink(&mut self, t: Now) {
        self.sink.poll();
        let server = &mut self.server;
        self.sink
            .drain_deliveries(|tag, ok| server.handle_delivery(t, tag, ok));
    }

    /// Runs `f` on the server with a context holding this batch's directory
    /// and profile snapshots and the shard's sink.
    fn with_ctx<R>(&mut self, f: impl FnOnce(&mut Server, &mut Ctx<'_>) -> R) -> R {
        let eps = self.directory.snapshot();
        let prof = self.profiles.snapshot();
        let mut ctx = Ctx {
            endpoints: &eps,
            profiles: &prof,
            sink: &mut self.sink,
        };
        f(&mut self.server, &mut ctx)
    }

    /// Runs `f` on the DTLS endpoint and the server with this batch's
    /// context (DTLS on only).
    fn with_dtls(
        &mut self,
        f: impl FnOnce(&mut DtlsEndpoint<OpensslAcceptor>, &mut Server, &mut Ctx<'_>),
    ) {
        let Some(dtls) = self.dtls.as_mut() else {
            return;
        };
        let eps = self.directory.snapshot();
        let prof = self.profiles.snapshot();
        let mut ctx = Ctx {
            endpoints: &eps,
            profiles: &prof,
            sink: &mut self.sink,
        };
        f(dtls, &mut self.server, &mut ctx)
    }

    /// The bootstrap server's next deadline (its own and its DTLS one's).
    fn bs_timeout(&mut self) -> Option<Instant> {
        let bs = self.bs.as_mut()?;
        let mut due = bs.server.poll_timeout();
        if let Some(d) = bs.dtls.as_ref().and_then(|d| d.poll_timeout()) {
            due = Some(due.map_or(d, |x| x.min(d)));
        }
        due
    }

    /// Runs `f` on the bootstrap server (and its DTLS endpoint) with this
    /// batch's directory snapshot and the shard's sink.
    fn with_bs(
        &mut self,
        f: impl FnOnce(&mut BootstrapServer, Option<&mut DtlsEndpoint<OpensslAcceptor>>, &mut BsCtx<'_>),
    ) {
        let Some(bs) = self.bs.as_mut() else {
            return;
        };
        let eps = self.directory.snapshot();
        let mut ctx = BsCtx {
            endpoints: &eps,
            sink: &mut self.sink,
        };
        f(&mut bs.server, bs.dtls.as_mut(), &mut ctx)
    }

    /// Bootstrap timers (the server's and its DTLS endpoint's).
    fn bs_handle_timeout(&mut self, t: Now) {
        self.with_bs(|srv, dtls, ctx| {
            srv.handle_timeout(t, ctx);
            if let Some(d) = dtls {
                d.handle_timeout(t);
            }
        });
        if let Some(bs) = &self.bs {
            let (m, b) = (self.server.metrics(), &bs.dtls_metrics);
            ShardMetrics::set(
                &m.bootstrap_dtls_sessions,
                b.dtls_sessions.load(std::sync::atomic::Ordering::Relaxed),
            );
            ShardMetrics::store(
                &m.bootstrap_dtls_handshakes_completed,
                ShardMetrics::get(&b.dtls_handshakes_completed),
            );
            ShardMetrics::store(
                &m.bootstrap_dtls_handshakes_failed,
                ShardMetrics::get(&b.dtls_handshakes_failed),
            );
        }
    }

    /// Ends DTLS sessions whose PSK no longer is the directory's (changed
    /// or removed), registered or not.
    fn revoke_stale_sessions(&mut self) {
        // Only the sessions of identities whose credentials changed since
        // the last look (all of them when the change log no longer reaches
        // back that far).
        let (seen, changed) = self.directory.psk_changes_since(self.creds_seen);
        self.creds_seen = seen;
        if changed.as_ref().is_some_and(|c| c.is_empty()) {
            return;
        }
        let creds = self.directory.credentials();
        if let Some(d) = self.bs.as_mut().and_then(|b| b.dtls.as_mut()) {
            let stale =
                |i: &[u8], tag| creds.bs_psk_key(i).map(|k| credential_tag(&k)) != Some(tag);
            match &changed {
                Some(c) => {
                    d.close_psk_where(CloseReason::Revoked, c.iter().map(|v| v.as_slice()), stale)
                }
                None => d.close_where(CloseReason::Revoked, |id, tag| match id {
                    Identity::Psk(i) => stale(i, tag),
                    Identity::X509 { .. } => false,
                }),
            };
        }
        let Some(dtls) = self.dtls.as_mut() else {
            return;
        };
        let stale = |i: &[u8], tag| creds.psk_key(i).map(|k| credential_tag(&k)) != Some(tag);
        let n = match &changed {
            Some(c) => {
                dtls.close_psk_where(CloseReason::Revoked, c.iter().map(|v| v.as_slice()), stale)
            }
            None => dtls.close_where(CloseReason::Revoked, |id, tag| match id {
                Identity::Psk(i) => stale(i, tag),
                Identity::X509 { .. } => false,
            }),
        };
        if n > 0 {
            tracing::info!(
                sessions = n,
                "DTLS sessions ended: their credentials changed"
            );
        }
    }

    /// Sends transmits and forwards shard messages. CoAP messages to DTLS
    /// peers are sealed by their session first.
    fn send_out(&mut self) {
        let m = self.server.metrics().clone();
        if self.server.has_transmits() {
            let server = &self.server;
            send_coap(&mut self.send, &m, self.fd, self.dtls.as_mut(), || {
                server.transmits()
            });
            self.server.clear_transmits();
        }
        let cmds = self.server.take_session_cmds();
        if let Some(dtls) = self.dtls.as_mut() {
            for c in cmds {
                match c {
                    SessionCmd::Revoke(p) => {
                        dtls.close(p.addr(), CloseReason::Revoked);
                    }
                    SessionCmd::Retire(p) => dtls.forget(p.addr()),
                    SessionCmd::IdleTimeout(p, secs) => dtls.set_idle_timeout(p.addr(), secs),
                }
            }
            send_dtls(&mut self.send, &m, self.dtls_fd, dtls);
        }
        if let Some(bs) = self.bs.as_mut() {
            if bs.server.has_transmits() {
                let server = &bs.server;
                send_coap(&mut self.send, &m, bs.fd, bs.dtls.as_mut(), || {
                    server.transmits()
                });
                bs.server.clear_transmits();
            }
            if let Some(d) = bs.dtls.as_mut() {
                send_dtls(&mut self.send, &m, bs.dtls_fd, d);
            }
            while let Some(r) = bs.server.poll_store() {
                match &bs.store {
                    Some(tx) => {
                        let _ = tx.send((bs.shard, r));
                    }
                    None => {
                        // No control plane (tests): the session fails at
                        // its store step when its deadline passes.
                        tracing::warn!("no bootstrap store: generated PSK not recorded");
                    }
                }
            }
        }
        while let Some(m) = self.server.poll_shard_msg() {
            let _ = self.outbox.try_send(m);
        }
        // Presence and RPC reports to the RPC control plane (dropped when
        // there is none, so nothing accumulates on the shard).
        while let Some(e) = self.server.poll_rpc_event() {
            if let Some(tx) = &self.rpc_events {
                let _ = tx.send(e);
            }
        }
    }
}

/// One listener's CoAP messages out: those to DTLS peers sealed by `dtls`
/// (their records go with [`send_dtls`]), the others sent on `fd`.
fn send_coap<'a, I: Iterator<Item = (PeerId, &'a [u8])>>(
    send: &mut SendBatch,
    m: &ShardMetrics,
    fd: RawFd,
    dtls: Option<&mut DtlsEndpoint<OpensslAcceptor>>,
    transmits: impl Fn() -> I,
) {
    if let Some(d) = dtls {
        for (p, data) in transmits().filter(|(p, _)| p.is_dtls()) {
            d.seal(p.addr(), data);
        }
    }
    if fd >= 0 {
        let (sent, failed) = send.send(
            fd,
            transmits()
                .filter(|(p, _)| !p.is_dtls())
                .map(|(p, d)| (p.addr(), d)),
        );
        ShardMetrics::add(&m.datagrams_tx, sent as u64);
        ShardMetrics::add(&m.tx_errors, failed as u64);
    }
}

/// A DTLS endpoint's records (handshake flights, sealed messages, alerts)
/// out on its socket `fd`.
fn send_dtls(
    send: &mut SendBatch,
    m: &ShardMetrics,
    fd: RawFd,
    dtls: &mut DtlsEndpoint<OpensslAcceptor>,
) {
    if dtls.has_transmits() {
        let (sent, failed) = send.send(fd, dtls.transmits());
        ShardMetrics::add(&m.datagrams_tx, sent as u64);
        ShardMetrics::add(&m.tx_errors, failed as u64);
        dtls.clear_transmits();
    }
}

/// Binds the sockets and starts the shards.
pub fn start(
    cfg: &Config,
    directory: Arc<Directory>,
    profiles: Arc<Profiles>,
    store: Option<Arc<RegistrationStore>>,
    sessions: Option<Arc<SessionStore>>,
    rpc_events: Option<crossbeam_channel::Sender<RpcEvent>>,
    bs_store: Option<crossbeam_channel::Sender<ShardStore>>,
) -> Result<Shards, StartError> {
    let n = cfg.shard_count();
    let mut allowed = io::allowed_cpus();
    // gateway.cpus must be CPUs this process may run on (systemd's
    // CPUAffinity=, taskset): a shard pinned outside would fail to start or
    // share a core the operator reserved for something else.
    if !allowed.is_empty() {
        if let Some(c) = cfg.gateway.cpus.iter().find(|c| !allowed.contains(c)) {
            return Err(StartError::Cpu(*c, allowed.clone()));
        }
    }
    if allowed.is_empty() {
        allowed.push(0);
    }
    io::raise_memlock(64 << 20);
    if !cfg.gateway.plain && !cfg.dtls.enabled {
        return Err(StartError::NoListener);
    }
    // Bind every socket up front so configuration errors surface here.
    let (sockets, addr) = if cfg.gateway.plain {
        let (v, a) = bind_all(cfg, cfg.gateway.listen, n)?;
        (v.into_iter().map(Some).collect(), Some(a))
    } else {
        ((0..n).map(|_| None).collect::<Vec<_>>(), None)
    };
    let (dtls_sockets, dtls_addr) = if cfg.dtls.enabled {
        let (v, a) = bind_all(cfg, cfg.dtls.listen, n)?;
        (v.into_iter().map(Some).collect(), Some(a))
    } else {
        ((0..n).map(|_| None).collect::<Vec<_>>(), None)
    };
    let tls = if cfg.dtls.enabled {
        let creds: Arc<dyn crate::io::dtls::Credentials> = directory.clone();
        let ctx = crate::io::dtls::server_context(&cfg.dtls.tls_settings(), creds.clone())?;
        Some((ctx, creds))
    } else {
        None
    };
    // The bootstrap listeners: their own sockets, and a TLS context whose
    // PSKs are the endpoints' bootstrap credentials.
    let bs_on = cfg.bootstrap.enabled;
    let (bs_sockets, bs_addr) = if bs_on && cfg.bootstrap.plain {
        let (v, a) = bind_all(cfg, cfg.bootstrap.listen, n)?;
        (v.into_iter().map(Some).collect(), Some(a))
    } else {
        ((0..n).map(|_| None).collect::<Vec<_>>(), None)
    };
    let bs_dtls_on = bs_on && cfg.bootstrap.dtls && cfg.dtls.enabled;
    let (bs_dtls_sockets, bs_dtls_addr) = if bs_dtls_on {
        let (v, a) = bind_all(cfg, cfg.bootstrap.dtls_listen, n)?;
        (v.into_iter().map(Some).collect(), Some(a))
    } else {
        ((0..n).map(|_| None).collect::<Vec<_>>(), None)
    };
    let bs_tls = if bs_dtls_on {
        let creds: Arc<dyn crate::io::dtls::Credentials> =
            Arc::new(BootstrapCredentials(directory.clone()));
        let ctx = crate::io::dtls::server_context(&cfg.dtls.tls_settings(), creds.clone())?;
        Some((ctx, creds))
    } else {
        None
    };
    let mut bs_sockets = bs_sockets.into_iter();
    let mut bs_dtls_sockets = bs_dtls_sockets.into_iter();
    // Channels: shard i → shard j (i != j), and relay → shard j.
    type Pair = (Option<SharedSender<Inbox>>, Option<SharedReceiver<Inbox>>);
    let mut grid: Vec<Vec<Pair>> = (0..=n)
        .map(|_| (0..n).map(|_| (None, None)).collect())
        .collect();
    for (from, row) in grid.iter_mut().enumerate() {
        for (to, cell) in row.iter_mut().enumerate() {
            if from != to {
                let (s, r) = shared_channel::new_bounded(CHANNEL);
                *cell = (Some(s), Some(r));
            }
        }
    }
    let mut senders: Vec<Vec<Option<SharedSender<Inbox>>>> = (0..=n).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<SharedReceiver<Inbox>>> = (0..n).map(|_| Vec::new()).collect();
    for (from, row) in grid.into_iter().enumerate() {
        for (to, (s, r)) in row.into_iter().enumerate() {
            senders[from].push(s);
            if let Some(r) = r {
                receivers[to].push(r);
            }
        }
    }
    let metrics: Vec<Arc<ShardMetrics>> =
        (0..n).map(|_| Arc::new(ShardMetrics::default())).collect();
    let base_seed = cfg.gateway.rng_seed.unwrap_or_else(rand::random);
    let mut joins = Vec::with_capacity(n + 1);
    let relay_senders = senders.pop().unwrap_or_default();
    let tap = Arc::new(crate::sink::tap::Tap::default());
    // Each shard reports when it is receiving, so "ready" means ready.
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded::<usize>();
    let mut dtls_sockets = dtls_sockets.into_iter();
    for (i, ((sock, outs), ins)) in sockets.into_iter().zip(senders).zip(receivers).enumerate() {
        let dtls_sock = dtls_sockets.next().flatten();
        let bs_sock = bs_sockets.next().flatten();
        let bs_dtls_sock = bs_dtls_sockets.next().flatten();
        let cpu = cfg
            .gateway
            .cpus
            .get(i)
            .copied()
            .unwrap_or(allowed[i % allowed.len()]);
        let mut sink = KafkaSink::new(&cfg.kafka, i, metrics[i].clone())
            .map_err(|e| StartError::Kafka(i, e))?;
        sink.set_tap(tap.clone());
        let seed = base_seed
            .wrapping_add(i as u64)
            .wrapping_mul(0x2545_f491_4f6c_dd1d);
        let mut server = Server::new(cfg.server_config(i, seed), metrics[i].clone());
        server.set_authorizer(Box::new(crate::proto::lwm2m::endpoint::DefaultAuthorizer {
            allow_plain_with_credentials: cfg.dtls.allow_plain_with_credentials,
        }));
        let metrics_i = metrics[i].clone();
        let (directory, profiles, store) = (directory.clone(), profiles.clone(), store.clone());
        let sessions = sessions.clone();
        let rpc_events = rpc_events.clone();
        let gw = cfg.gateway.clone();
        let poll = Duration::from_micros(cfg.kafka.poll_interval_us.max(100));
        let snap_every = Duration::from_secs(cfg.directory.snapshot_interval_s.max(1));
        let fd = sock.map(|s| s.into_raw_fd()).unwrap_or(-1);
        let dtls_fd = dtls_sock.map(|s| s.into_raw_fd()).unwrap_or(-1);
        let tls = tls.clone();
        let bs_tls = bs_tls.clone();
        let bs_fd = bs_sock.map(|s| s.into_raw_fd()).unwrap_or(-1);
        let bs_dtls_fd = bs_dtls_sock.map(|s| s.into_raw_fd()).unwrap_or(-1);
        let bs_cfg = bs_on.then(|| {
            let mut key_seed = [0u8; 32];
            if openssl::rand::rand_bytes(&mut key_seed).is_err() {
                key_seed = rand::random();
            }
            cfg.bootstrap_config(i, seed, key_seed)
        });
        let bs_store = bs_store.clone();
        let dtls_cfg = cfg.dtls.endpoint_config();
        // A bootstrap session is over once Finish is answered: its DTLS
        // session need not outlive the bootstrap timeout.
        let mut bs_dtls_cfg = dtls_cfg.clone();
        bs_dtls_cfg.idle_timeout = Duration::from_secs(cfg.bootstrap.session_timeout_s.max(1));
        let mtu = cfg.dtls.mtu;
        let ready = ready_tx.clone();
        let j = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{i}"))
            .io_memory(1 << 20)
            .spawn(move || async move {
                let dtls = tls.and_then(|(ctx, creds)| {
                    let mut seed = [0u8; 32];
                    if openssl::rand::rand_bytes(&mut seed).is_err() {
                        seed = rand::random();
                    }
                    let acc = OpensslAcceptor::new(ctx, mtu, creds);
                    match DtlsEndpoint::new(Instant::now(), dtls_cfg, acc, seed, metrics_i.clone())
                    {
                        Ok(d) => Some(d),
                        Err(e) => {
                            tracing::error!(shard = i, error = %e, "DTLS endpoint failed to start");
                            None
                        }
                    }
                });
                let bs = bs_cfg.map(|c| {
                    let dtls_metrics = Arc::new(ShardMetrics::default());
                    let dtls = bs_tls.and_then(|(ctx, creds)| {
                        let mut seed = [0u8; 32];
                        if openssl::rand::rand_bytes(&mut seed).is_err() {
                            seed = rand::random();
                        }
                        let acc = OpensslAcceptor::new(ctx, mtu, creds);
                        DtlsEndpoint::new(Instant::now(), bs_dtls_cfg, acc, seed, dtls_metrics.clone())
                            .map_err(|e| {
                                tracing::error!(shard = i, error = %e, "bootstrap DTLS endpoint failed to start")
                            })
                            .ok()
                    });
                    BsState {
                        server: BootstrapServer::new(c, metrics_i.clone()),
                        dtls,
                        dtls_metrics,
                        fd: bs_fd,
                        dtls_fd: bs_dtls_fd,
                        store: bs_store,
                        shard: i,
                    }
                });
                let args = ShardArgs {
                    i,
                    fd,
                    dtls_fd,
                    dtls,
                    bs,
                    sessions,
                    server,
                    sink,
                    directory,
                    profiles,
                    store,
                    outs,
                    ins,
                    gw,
                    poll,
                    snap_every,
                    shards: n,
                    ready,
                    rpc_events,
                };
                run_shard(args).await;
            })
            .map_err(|e| StartError::Executor(format!("shard {i} on CPU {cpu}"), e.to_string()))?;
        tracing::info!(shard = i, cpu, coap = ?addr, coaps = ?dtls_addr, bootstrap = ?bs_addr, bootstrap_dtls = ?bs_dtls_addr, "shard started");
        joins.push(j);
    }
    let (control_tx, control_rx) = crossbeam_channel::unbounded::<(Option<usize>, Inbox)>();
    let relay = LocalExecutorBuilder::new(Placement::Unbound)
        .name("control-relay")
        .spawn(move || async move { relay(relay_senders, control_rx).await })
        .map_err(|e| StartError::Executor("the control relay".into(), e.to_string()))?;
    joins.push(relay);
    for k in 0..n {
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| StartError::Timeout(k))?;
    }
    Ok(Shards {
        metrics,
        local_addr: addr,
        dtls_addr,
        bootstrap_addr: bs_addr,
        bootstrap_dtls_addr: bs_dtls_addr,
        tap,
        control: control_tx,
        joins,
    })
}

/// Binds `n` SO_REUSEPORT sockets on `addr`: the first on the configured
/// port (possibly 0), the rest on the port it got.
fn bind_all(
    cfg: &Config,
    mut addr: std::net::SocketAddr,
    n: usize,
) -> Result<(Vec<socket2::Socket>, std::net::SocketAddr), StartError> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let s = io::bind_reuseport(
            addr,
            cfg.gateway.socket_recv_buffer,
            cfg.gateway.socket_send_buffer,
        )
        .map_err(|e| StartError::Bind(addr, e))?;
        if addr.port() == 0 {
            addr = s
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or_else(|| StartError::Bind(addr, std::io::Error::other("no inet address")))?;
        }
        sockets.push(s);
    }
    Ok((sockets, addr))
}

/// Connects every channel end concurrently (each connect waits for its peer).
async fn connect_all(
    outs: Vec<Option<SharedSender<Inbox>>>,
    ins: Vec<SharedReceiver<Inbox>>,
) -> (
    Vec<Option<shared_channel::ConnectedSender<Inbox>>>,
    Vec<ConnectedReceiver<Inbox>>,
) {
    let out_tasks: Vec<_> = outs
        .into_iter()
        .map(|s| s.map(|s| glommio::spawn_local(s.connect())))
        .collect();
    let in_tasks: Vec<_> = ins
        .into_iter()
        .map(|r| glommio::spawn_local(r.connect()))
        .collect();
    let mut o = Vec::with_capacity(out_tasks.len());
    for t in out_tasks {
        o.push(match t {
            Some(t) => Some(t.await),
            None => None,
        });
    }
    let mut r = Vec::with_capacity(in_tasks.len());
    for t in in_tasks {
        r.push(t.await);
    }
    (o, r)
}

/// The control relay: control-plane messages (a plain thread's crossbeam
/// channel) to every shard's inbox. Blocking on the crossbeam channel is
/// fine here: this executor has nothing else to do.
async fn relay(
    outs: Vec<Option<SharedSender<Inbox>>>,
    rx: crossbeam_channel::Receiver<(Option<usize>, Inbox)>,
) {
    let (outs, _) = connect_all(outs, Vec::new()).await;
    while let Ok((to, m)) = rx.recv() {
        let stop = matches!(m, Inbox::Shutdown);
        match to {
            Some(i) => {
                if let Some(Some(s)) = outs.get(i) {
                    let _ = s.send(m).await;
                }
            }
            None => {
                for s in outs.iter().flatten() {
                    let _ = s.send(m.clone()).await;
                }
            }
        }
        if stop {
            break;
        }
    }
}

struct ShardArgs {
    i: usize,
    fd: RawFd,
    dtls_fd: RawFd,
    dtls: Option<DtlsEndpoint<OpensslAcceptor>>,
    bs: Option<BsState>,
    sessions: Option<Arc<SessionStore>>,
    server: Server,
    sink: KafkaSink,
    directory: Arc<Directory>,
    profiles: Arc<Profiles>,
    store: Option<Arc<RegistrationStore>>,
    outs: Vec<Option<SharedSender<Inbox>>>,
    ins: Vec<SharedReceiver<Inbox>>,
    gw: crate::config::GatewayConfig,
    poll: Duration,
    snap_every: Duration,
    shards: usize,
    ready: crossbeam_channel::Sender<usize>,
    rpc_events: Option<crossbeam_channel::Sender<RpcEvent>>,
}

async fn run_shard(a: ShardArgs) {
    let ShardArgs {
        i,
        fd,
        dtls_fd,
        mut dtls,
        bs,
        sessions,
        mut server,
        mut sink,
        directory,
        profiles,
        store,
        outs,
        ins,
        gw,
        poll,
        snap_every,
        shards,
        ready,
        rpc_events,
    } = a;
    // Registrations from the last run (this shard's snapshots).
    if let Some(store) = &store {
        let t = now();
        let eps = directory.snapshot();
        let prof = profiles.snapshot();
        let mut ctx = Ctx {
            endpoints: &eps,
            profiles: &prof,
            sink: &mut sink,
        };
        let mut restored = 0;
        for snap in store.load(i, shards) {
            restored += server.import_snapshot(t, &mut ctx, &snap);
        }
        if restored > 0 {
            tracing::info!(
                shard = i,
                registrations = restored,
                "registrations restored from snapshot"
            );
        }
        server.take_dirty();
    }
    // DTLS sessions saved at the last shutdown: this shard's, and those of
    // shards past the current count.
    if let (Some(store), Some(d)) = (&sessions, dtls.as_mut()) {
        let t = now();
        let idle_ms = cfg_idle_ms(d);
        let mut restored = 0;
        for idx in store.shards_saved() {
            if idx % shards.max(1) != i {
                continue;
            }
            match store.take(idx) {
                Ok(Some((_, list))) => {
                    for (peer, s) in list {
                        let limit = if s.idle_s > 0 {
                            s.idle_s as i64 * 1000
                        } else {
                            idle_ms
                        };
                        if t.wall_ms - s.last_rx_ms < limit {
                            d.import_session(peer, s);
                            restored += 1;
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(shard = i, error = %e, "DTLS sessions not restored; devices will handshake again")
                }
            }
        }
        if restored > 0 {
            tracing::info!(shard = i, sessions = restored, "DTLS sessions restored");
        }
    }
    let (outs, ins) = connect_all(outs, ins).await;
    // SAFETY: `fd` / `dtls_fd` are bound UDP sockets (or -1) whose
    // ownership we take here.
    let udp = (fd >= 0).then(|| Rc::new(unsafe { glommio::net::UdpSocket::from_raw_fd(fd) }));
    let dtls_udp =
        (dtls_fd >= 0).then(|| Rc::new(unsafe { glommio::net::UdpSocket::from_raw_fd(dtls_fd) }));
    // SAFETY: as above, the bootstrap sockets (or -1).
    let (bs_fd, bs_dtls_fd) = bs.as_ref().map_or((-1, -1), |b| (b.fd, b.dtls_fd));
    let bs_udp =
        (bs_fd >= 0).then(|| Rc::new(unsafe { glommio::net::UdpSocket::from_raw_fd(bs_fd) }));
    let bs_dtls_udp = (bs_dtls_fd >= 0)
        .then(|| Rc::new(unsafe { glommio::net::UdpSocket::from_raw_fd(bs_dtls_fd) }));
    let (out_tx, out_rx) = local_channel::new_unbounded::<(Dest, ShardMsg)>();
    let (nudge_tx, nudge_rx) = local_channel::new_bounded::<()>(1);
    let timer_at = Rc::new(Cell::new(Instant::now() + MAX_SLEEP));
    let state = Rc::new(RefCell::new(State {
        server,
        sink,
        directory,
        profiles,
        send: SendBatch::new(),
        outbox: out_tx,
        timer_at: timer_at.clone(),
        nudge: nudge_tx,
        fd,
        dtls,
        dtls_fd,
        stopping: false,
        creds_seen: 0,
        poll,
        rx_coalescing: 0,
        rpc_events,
        bs,
    }));

    // Outbox: the server's messages to other shards.
    let me = i;
    glommio::spawn_local(async move {
        while let Some((dest, msg)) = out_rx.recv().await {
            match dest {
                Dest::Shard(j) => {
                    if let Some(Some(s)) = outs.get(j as usize) {
                        let _ = s.send(Inbox::Shard(msg)).await;
                    }
                }
                Dest::Others => {
                    for (j, s) in outs.iter().enumerate() {
                        if let (true, Some(s)) = (j != me, s) {
                            let _ = s.send(Inbox::Shard(msg.clone())).await;
                        }
                    }
                }
            }
        }
    })
    .detach();

    // Inboxes: one task per channel into this shard.
    for rx in ins {
        let st = state.clone();
        glommio::spawn_local(async move {
            while let Some(m) = rx.recv().await {
                let mut s = st.borrow_mut();
                let s = &mut *s;
                let t = now();
                match m {
                    Inbox::Shard(m) => s.with_ctx(|srv, ctx| srv.handle_shard_msg(t, ctx, m)),
                    Inbox::Control(c) => {
                        let endpoints = matches!(c, ControlMsg::Endpoints(_));
                        s.with_ctx(|srv, ctx| srv.handle_control(t, ctx, c));
                        if endpoints {
                            s.revoke_stale_sessions();
                        }
                    }
                    Inbox::Rpc(e) => s.server.handle_rpc_exec(t, *e),
                    Inbox::Describe(ep, reply) => {
                        let _ = reply.try_send(s.server.describe(t, &ep).map(Box::new));
                    }
                    Inbox::BootstrapStored(id, result) => {
                        s.with_bs(|srv, _, ctx| srv.handle_stored(t, ctx, id, result))
                    }
                    Inbox::Shutdown => s.stopping = true,
                }
                s.flush();
                if s.stopping {
                    let _ = s.nudge.try_send(());
                }
            }
        })
        .detach();
    }

    // Receive: one task per socket.
    for (u, l) in [
        (udp, Listener::Coap),
        (dtls_udp, Listener::Coaps),
        (bs_udp, Listener::BootstrapCoap),
        (bs_dtls_udp, Listener::BootstrapCoaps),
    ] {
        if let Some(u) = u {
            spawn_receiver(state.clone(), u, l, &gw, i);
        }
    }
    let heartbeat = |st: &State, wall_ms: i64| {
        ShardMetrics::set(
            &st.server.metrics().shard_heartbeat_timestamp_seconds,
            wall_ms / 1000,
        );
    };
    heartbeat(&state.borrow(), now().wall_ms);
    let _ = ready.send(i);

    // Timers, Kafka delivery reports, snapshots; ends the shard on shutdown.
    let mut next_snapshot = Instant::now() + snap_every;
    loop {
        let wait = {
            let mut st = state.borrow_mut();
            let t = Instant::now();
            let mut at = st
                .server
                .poll_timeout()
                .unwrap_or(t + MAX_SLEEP)
                .min(t + MAX_SLEEP)
                .min(next_snapshot);
            if let Some(d) = st.dtls.as_ref().and_then(|d| d.poll_timeout()) {
                at = at.min(d);
            }
            if let Some(d) = st.bs_timeout() {
                at = at.min(d);
            }
            if st.needs_sink_poll() {
                at = at.min(t + poll);
            }
            st.timer_at.set(at);
            if st.stopping {
                break;
            }
            at.saturating_duration_since(t)
        };
        if wait.is_zero() {
            // Let the other tasks run even when timers are due back to back.
            glommio::executor().yield_now().await;
        } else {
            futures_lite::future::or(glommio::timer::sleep(wait), async {
                let _ = nudge_rx.recv().await;
            })
            .await;
        }
        let mut st = state.borrow_mut();
        let st = &mut *st;
        let t = now();
        st.serve_sink(t);
        st.with_ctx(|srv, ctx| srv.handle_timeout(t, ctx));
        if let Some(d) = st.dtls.as_mut() {
            d.handle_timeout(t);
        }
        st.bs_handle_timeout(t);
        st.send_out();
        heartbeat(st, t.wall_ms);
        if Instant::now() >= next_snapshot {
            next_snapshot = Instant::now() + snap_every;
            if let Some(store) = &store {
                if st.server.take_dirty() {
                    store.save_async(i, st.server.export_snapshot(t));
                }
            }
        }
    }
    // Shutdown: stop reading (the receive task is dropped with the executor),
    // give the producer a bounded time to deliver what it accepted (and
    // acknowledge what it delivered), then snapshot the registrations.
    let deadline = Instant::now() + Duration::from_millis(gw.shutdown_flush_ms);
    loop {
        {
            let mut st = state.borrow_mut();
            let st = &mut *st;
            st.sink.poll();
            let t = now();
            let server = &mut st.server;
            st.sink
                .drain_deliveries(|tag, ok| server.handle_delivery(t, tag, ok));
            st.send_out();
            if st.sink.in_flight() == 0 || Instant::now() >= deadline {
                break;
            }
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    let mut st = state.borrow_mut();
    let st = &mut *st;
    let pending = st.sink.in_flight();
    let ok = st.sink.flush(Duration::from_millis(100));
    if let (Some(sstore), Some(d)) = (&sessions, st.dtls.as_ref()) {
        match sstore.save(i, now().wall_ms, d.export_sessions()) {
            Ok(n) => tracing::info!(
                shard = i,
                sessions = n,
                "DTLS session snapshot written (encrypted)"
            ),
            Err(e) => tracing::error!(shard = i, error = %e, "DTLS session snapshot failed"),
        }
    }
    if let Some(store) = &store {
        let snap = st.server.export_snapshot(now());
        let n = snap.registrations.len();
        match store.save(i, &snap) {
            Ok(()) => tracing::info!(
                shard = i,
                registrations = n,
                "registration snapshot written"
            ),
            Err(e) => tracing::error!(shard = i, error = %e, "registration snapshot failed"),
        }
    }
    tracing::info!(shard = i, pending, flushed = ok, "shard stopped");
}

/// Handles one datagram from the socket of listener `l`.
fn handle_one(
    st: &mut State,
    t: Now,
    l: Listener,
    peer: std::net::SocketAddr,
    data: &mut [u8],
    truncated: bool,
) {
    match l {
        Listener::Coap => {
            let peer = PeerId::udp(peer);
            if truncated {
                st.server.handle_oversized(t, peer, data);
            } else {
                let data = &*data;
                st.with_ctx(|srv, ctx| srv.handle_datagram(t, ctx, peer, None, data));
            }
        }
        Listener::Coaps => {
            st.with_dtls(|d, srv, ctx| dtls_one(d, srv, ctx, t, peer, data, truncated))
        }
        Listener::BootstrapCoap | Listener::BootstrapCoaps => {
            let m = st.server.metrics().clone();
            st.with_bs(|srv, dtls, ctx| bs_one(srv, dtls, ctx, &m, t, l, peer, data, truncated))
        }
    }
}

/// One datagram from a bootstrap socket (plain, or DTLS opened in place).
#[allow(clippy::too_many_arguments)]
fn bs_one(
    srv: &mut BootstrapServer,
    dtls: Option<&mut DtlsEndpoint<OpensslAcceptor>>,
    ctx: &mut BsCtx<'_>,
    m: &ShardMetrics,
    t: Now,
    l: Listener,
    peer: std::net::SocketAddr,
    data: &mut [u8],
    truncated: bool,
) {
    if truncated {
        // Nothing on the bootstrap interface comes from the device that
        // large; a record cut short cannot be authenticated either.
        ShardMetrics::inc(&m.oversized);
        return;
    }
    if l == Listener::BootstrapCoap {
        return srv.handle_datagram(t, ctx, PeerId::udp(peer), None, data);
    }
    if let Some(d) = dtls {
        d.handle_datagram(t, peer, data, |identity, plaintext| {
            srv.handle_datagram(t, ctx, PeerId::dtls(peer), Some(identity), plaintext)
        });
    }
}

/// One datagram from the DTLS socket: records opened in place, the CoAP
/// messages they carry handed to the server with the session's identity.
fn dtls_one(
    d: &mut DtlsEndpoint<OpensslAcceptor>,
    srv: &mut Server,
    ctx: &mut Ctx<'_>,
    t: Now,
    peer: std::net::SocketAddr,
    data: &mut [u8],
    truncated: bool,
) {
    if truncated {
        // A record cut short cannot be authenticated (RFC 6347 §4.1.2.7).
        ShardMetrics::inc(&srv.metrics().oversized);
        return;
    }
    d.handle_datagram(t, peer, data, |identity, plaintext| {
        srv.handle_datagram(t, ctx, PeerId::dtls(peer), Some(identity), plaintext)
    });
}

/// The receive task of one socket: park on an io_uring receive, then drain
/// with non-blocking `recvmmsg` batches.
fn spawn_receiver(
    state: Rc<RefCell<State>>,
    udp: Rc<glommio::net::UdpSocket>,
    l: Listener,
    gw: &crate::config::GatewayConfig,
    i: usize,
) {
    let batch = gw.recv_batch;
    let max = gw.max_datagram;
    let coalesce = Duration::from_micros(gw.coalesce_us);
    let coalesce_max = Duration::from_micros(gw.coalesce_max_us.max(gw.coalesce_us));
    glommio::spawn_local(async move {
        // One byte more than the limit: a datagram that fills it is oversized.
        let mut first = vec![0u8; max + 1];
        let mut rb = RecvBatch::new(batch, max);
        let fd = udp.as_raw_fd();
        // Drains the socket with recvmmsg batches (bounded, so the other
        // tasks are never starved); returns how many datagrams were handled.
        let drain = |rb: &mut RecvBatch| -> usize {
            let mut st = state.borrow_mut();
            let st = &mut *st;
            if st.stopping {
                return 0;
            }
            let mut total = 0;
            for _ in 0..32 {
                let got = match rb.recv(fd) {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(shard = i, error = %e, "recvmmsg failed");
                        0
                    }
                };
                if got > 0 {
                    let t = now();
                    if matches!(l, Listener::BootstrapCoap | Listener::BootstrapCoaps) {
                        let m = st.server.metrics().clone();
                        st.with_bs(|srv, mut dtls, ctx| {
                            for k in 0..got {
                                if let Some((peer, data, truncated)) = rb.get_mut(k) {
                                    bs_one(
                                        srv,
                                        dtls.as_deref_mut(),
                                        ctx,
                                        &m,
                                        t,
                                        l,
                                        peer,
                                        data,
                                        truncated,
                                    );
                                }
                            }
                        });
                    } else if l == Listener::Coaps {
                        // One directory / profile snapshot for the whole batch.
                        st.with_dtls(|d, srv, ctx| {
                            for k in 0..got {
                                if let Some((peer, data, truncated)) = rb.get_mut(k) {
                                    dtls_one(d, srv, ctx, t, peer, data, truncated);
                                }
                            }
                        });
                    } else {
                        // One directory / profile snapshot for the whole batch.
                        st.with_ctx(|srv, ctx| {
                            for k in 0..got {
                                if let Some((peer, data, truncated)) = rb.get(k) {
                                    let peer = PeerId::udp(peer);
                                    if truncated {
                                        srv.handle_oversized(t, peer, data);
                                    } else {
                                        srv.handle_datagram(t, ctx, peer, None, data);
                                    }
                                }
                            }
                        });
                    }
                    st.flush();
                }
                total += got;
                if got < rb.capacity() {
                    break;
                }
            }
            total
        };
        loop {
            // Park until a datagram arrives (io_uring receive).
            let (n, peer) = match udp.recv_from(&mut first).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(shard = i, error = %e, "recv_from failed");
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            };
            {
                let mut st = state.borrow_mut();
                let st = &mut *st;
                if st.stopping {
                    // Shutting down: stop reading.
                    return;
                }
                let t = now();
                let truncated = n > max;
                let len = n.min(max);
                handle_one(st, t, l, peer, &mut first[..len], truncated);
                st.flush();
            }
            drain(&mut rb);
            // Software interrupt coalescing: while traffic keeps coming, wake
            // every `coalesce` and take what queued up in one recvmmsg batch,
            // instead of one park/wake cycle per datagram (context switches
            // dominate the cost per datagram at moderate rates). Back to
            // parking as soon as a poll finds the socket empty.
            if coalesce.is_zero() {
                glommio::yield_if_needed().await;
                continue;
            }
            state.borrow_mut().rx_coalescing += 1;
            let mut interval = coalesce;
            loop {
                glommio::timer::sleep(interval).await;
                {
                    // The producer is served on this wake-up (the timer
                    // task leaves it to us while we coalesce).
                    let mut st = state.borrow_mut();
                    st.serve_sink(now());
                }
                let n = drain(&mut rb);
                if n == 0 {
                    break;
                }
                interval = next_interval(interval, n, batch, coalesce, coalesce_max);
            }
            let mut st = state.borrow_mut();
            st.rx_coalescing -= 1;
            // Hand the producer back to the timer task (nudged if its next
            // wake-up is later than the poll interval).
            st.flush();
        }
    })
    .detach();
}

/// The next coalescing interval after a poll that found `n` datagrams: a
/// wake-up costs about the same whatever it carries (the park, the timer,
/// a cold cache), so aim at `batch / 2 ..= 2 × batch` datagrams per wake-up
/// within `[min, max]`.
fn next_interval(cur: Duration, n: usize, batch: usize, min: Duration, max: Duration) -> Duration {
    if n < batch / 2 {
        (cur * 2).min(max)
    } else if n > batch * 2 {
        (cur / 2).max(min)
    } else {
        cur
    }
}

fn cfg_idle_ms(d: &DtlsEndpoint<OpensslAcceptor>) -> i64 {
    d.config().idle_timeout.as_millis() as i64
}

#[cfg(test)]
mod tests {
    use super::next_interval;
    use std::time::Duration;

    #[test]
    fn coalescing_interval_adapts_to_datagrams_per_wake() {
        let ms = Duration::from_millis;
        let (min, max) = (ms(1), ms(4));
        // Few datagrams per wake-up: the interval doubles, up to max.
        assert_eq!(next_interval(ms(1), 10, 64, min, max), ms(2));
        assert_eq!(next_interval(ms(2), 31, 64, min, max), ms(4));
        assert_eq!(next_interval(ms(4), 1, 64, min, max), ms(4));
        // Within [batch/2, 2 × batch]: unchanged.
        assert_eq!(next_interval(ms(2), 32, 64, min, max), ms(2));
        assert_eq!(next_interval(ms(2), 128, 64, min, max), ms(2));
        // Many: halves, down to min.
        assert_eq!(next_interval(ms(4), 129, 64, min, max), ms(2));
        assert_eq!(next_interval(ms(1), 2048, 64, min, max), ms(1));
    }
}
