//! `udp-echo-baseline`: the ceiling of this machine for the load generator's
//! traffic pattern — a minimal batched UDP receiver that answers every CON
//! datagram with a 4-byte empty ACK carrying the same Message ID (no CoAP
//! parsing beyond the header, no state, no Kafka). Same socket set-up as the
//! gateway: one SO_REUSEPORT socket per thread, recvmmsg / sendmmsg batches.
//! Prints the datagrams received per second; exits after --seconds.

use clap::Parser;
use corem_lwm2m::io::{bind_reuseport, RecvBatch, SendBatch};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "batched UDP echo/ACK baseline for perf/")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:5783")]
    listen: SocketAddr,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 0)]
    seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let count = Arc::new(AtomicU64::new(0));
    for _ in 0..a.threads {
        let s = bind_reuseport(a.listen, 8 << 20, 4 << 20)?;
        let count = count.clone();
        std::thread::spawn(move || {
            let fd = s.as_raw_fd();
            let mut rb = RecvBatch::new(64, 2048);
            let mut sb = SendBatch::new();
            let mut acks: Vec<(SocketAddr, [u8; 4])> = Vec::with_capacity(64);
            loop {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 100) };
                loop {
                    let n = rb.recv(fd).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    acks.clear();
                    for i in 0..n {
                        if let Some((peer, d, _)) = rb.get(i) {
                            if d.len() >= 4 && (d[0] >> 4) & 3 == 0 {
                                // CON → empty ACK with the same MID.
                                acks.push((peer, [0x60, 0, d[2], d[3]]));
                            }
                        }
                    }
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    sb.send(fd, acks.iter().map(|(p, b)| (*p, &b[..])));
                }
            }
        });
    }
    let start = Instant::now();
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let c = count.load(Ordering::Relaxed);
        eprintln!("udp-echo-baseline: {} datagrams/s (total {c})", c - last);
        last = c;
        if a.seconds > 0 && start.elapsed() >= Duration::from_secs(a.seconds) {
            return Ok(());
        }
    }
}
