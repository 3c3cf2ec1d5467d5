//! glommio wiring of the shards: one executor per core, pinned, each owning
//! its SO_REUSEPORT socket, its [`Engine`], its Kafka producer and its timers.
//!
//! Per shard two tasks share the state through an `Rc<RefCell<_>>` (single
//! thread, never borrowed across an await):
//! * the receive loop awaits one datagram with glommio's io_uring `recv_from`,
//!   then drains everything else waiting with non-blocking `recvmmsg` batches,
//!   feeds the engine, and flushes its replies with `sendmmsg`;
//! * the tick loop (every `tick_ms`) runs engine timers, polls the producer for
//!   delivery reports, applies cross-shard messages, and watches for shutdown.
//!
//! Cross-shard traffic (registration takeovers) uses one crossbeam channel per
//! shard: explicit messages, no shared mutable state, nothing on the
//! per-datagram path blocks.

use crate::config::Config;
use crate::control::directory::Directory;
use crate::control::profiles::Profiles;
use crate::io::{self, RecvBatch};
use crate::metrics::ShardMetrics;
use crate::proto::lwm2m::server::{Engine, Now, ShardMsg};
use crate::sink::kafka::KafkaSink;
use crossbeam_channel::{Receiver, Sender};
use glommio::{LocalExecutorBuilder, Placement};
use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
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

pub struct Shards {
    pub metrics: Vec<Arc<ShardMetrics>>,
    pub local_addr: std::net::SocketAddr,
    joins: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl Shards {
    /// Waits for every shard to finish (after shutdown was signalled).
    pub fn join(self) {
        for j in self.joins {
            if let Err(e) = j.join() {
                tracing::error!(error = %e, "shard exited with an error");
            }
        }
    }
}

struct State {
    engine: Engine,
    sink: KafkaSink,
}

/// Binds the sockets and starts the shards.
pub fn start(
    cfg: &Config,
    directory: Arc<Directory>,
    profiles: Arc<Profiles>,
    shutdown: Arc<AtomicBool>,
) -> anyhow::Result<Shards> {
    let n = cfg.shard_count();
    let mut allowed = io::allowed_cpus();
    if allowed.is_empty() {
        allowed.push(0);
    }
    io::raise_memlock(64 << 20);
    // Bind every socket up front so configuration errors surface here, and
    // bind the first on the configured port (possibly 0) and the rest on the
    // port it got.
    let mut sockets = Vec::with_capacity(n);
    let mut addr = cfg.gateway.listen;
    for _ in 0..n {
        let s = io::bind_reuseport(
            addr,
            cfg.gateway.socket_recv_buffer,
            cfg.gateway.socket_send_buffer,
        )
        .map_err(|e| anyhow::anyhow!("binding UDP {addr}: {e}"))?;
        if addr.port() == 0 {
            addr = s
                .local_addr()?
                .as_socket()
                .ok_or_else(|| anyhow::anyhow!("socket has no inet address"))?;
        }
        sockets.push(s);
    }
    let (txs, rxs): (Vec<Sender<ShardMsg>>, Vec<Receiver<ShardMsg>>) =
        (0..n).map(|_| crossbeam_channel::unbounded()).unzip();
    let metrics: Vec<Arc<ShardMetrics>> =
        (0..n).map(|_| Arc::new(ShardMetrics::default())).collect();
    let mut joins = Vec::with_capacity(n);
    for (i, (sock, rx)) in sockets.into_iter().zip(rxs).enumerate() {
        let cpu = cfg
            .gateway
            .cpus
            .get(i)
            .copied()
            .unwrap_or(allowed[i % allowed.len()]);
        let sink = KafkaSink::new(&cfg.kafka, i, metrics[i].clone())?;
        let engine = Engine::new(
            i,
            n,
            cfg.coap.clone(),
            directory.clone(),
            profiles.clone(),
            metrics[i].clone(),
        );
        let peers = txs.clone();
        let shutdown = shutdown.clone();
        let gw = cfg.gateway.clone();
        let fd = sock.into_raw_fd();
        let j = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{i}"))
            .io_memory(1 << 20)
            .spawn(move || async move {
                run_shard(i, fd, State { engine, sink }, rx, peers, shutdown, gw).await;
            })
            .map_err(|e| anyhow::anyhow!("starting shard {i} on CPU {cpu}: {e}"))?;
        tracing::info!(shard = i, cpu, %addr, "shard started");
        joins.push(j);
    }
    Ok(Shards {
        metrics,
        local_addr: addr,
        joins,
    })
}

fn flush(i: usize, st: &mut State, fd: RawFd, peers: &[Sender<ShardMsg>]) {
    if st.engine.has_transmits() {
        let (sent, failed) = io::send_batch(fd, st.engine.transmits());
        let m = st.engine.metrics();
        ShardMetrics::add(&m.datagrams_tx, sent as u64);
        ShardMetrics::add(&m.tx_errors, failed as u64);
        st.engine.clear_transmits();
    }
    while let Some(msg) = st.engine.poll_broadcast() {
        for (j, p) in peers.iter().enumerate() {
            if j != i {
                let _ = p.send(msg.clone());
            }
        }
    }
}

async fn run_shard(
    i: usize,
    fd: RawFd,
    state: State,
    rx: Receiver<ShardMsg>,
    peers: Vec<Sender<ShardMsg>>,
    shutdown: Arc<AtomicBool>,
    gw: crate::config::GatewayConfig,
) {
    // SAFETY: `fd` is a bound UDP socket whose ownership we take here.
    let udp = Rc::new(unsafe { glommio::net::UdpSocket::from_raw_fd(fd) });
    let state = Rc::new(RefCell::new(state));
    let recv_state = state.clone();
    let recv_udp = udp.clone();
    let peers_rx = peers.clone();
    let batch = gw.recv_batch;
    let max = gw.max_datagram;
    let coalesce = Duration::from_micros(gw.coalesce_us);
    glommio::spawn_local(async move {
        let mut first = vec![0u8; max];
        let mut rb = RecvBatch::new(batch, max);
        let fd = recv_udp.as_raw_fd();
        // Drains the socket with recvmmsg batches (bounded, so the tick task
        // is never starved); returns how many datagrams were handled.
        let drain = |rb: &mut RecvBatch| -> usize {
            let mut st = recv_state.borrow_mut();
            let st = &mut *st;
            let mut total = 0;
            for _ in 0..32 {
                let t = now();
                let got = match rb.recv(fd) {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(shard = i, error = %e, "recvmmsg failed");
                        0
                    }
                };
                for k in 0..got {
                    if let Some((peer, data)) = rb.get(k) {
                        st.engine.handle_datagram(t, peer, data, &mut st.sink);
                    }
                }
                total += got;
                flush(i, st, fd, &peers_rx);
                if got < rb.capacity() {
                    break;
                }
            }
            total
        };
        loop {
            // Park until a datagram arrives (io_uring receive).
            let (n, peer) = match recv_udp.recv_from(&mut first).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(shard = i, error = %e, "recv_from failed");
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                    continue;
                }
            };
            {
                let mut st = recv_state.borrow_mut();
                let st = &mut *st;
                st.engine
                    .handle_datagram(now(), peer, &first[..n], &mut st.sink);
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
            loop {
                glommio::timer::sleep(coalesce).await;
                if drain(&mut rb) == 0 {
                    break;
                }
            }
        }
    })
    .detach();

    let tick = Duration::from_millis(gw.tick_ms.max(1));
    loop {
        glommio::timer::sleep(tick).await;
        let mut st = state.borrow_mut();
        let st = &mut *st;
        while let Ok(m) = rx.try_recv() {
            st.engine.handle_control(m);
        }
        st.engine.handle_timeout(now(), &mut st.sink);
        st.sink.poll();
        flush(i, st, udp.as_raw_fd(), &peers);
        if shutdown.load(Ordering::Acquire) {
            break;
        }
    }
    // Shutdown: stop reading (the receive task is dropped with the executor),
    // then give the producer a bounded time to deliver what it accepted.
    let st = state.borrow();
    let pending = st.sink.in_flight();
    let ok = st.sink.flush(Duration::from_millis(gw.shutdown_flush_ms));
    tracing::info!(shard = i, pending, flushed = ok, "shard stopped");
}
