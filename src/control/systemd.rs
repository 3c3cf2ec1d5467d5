//! The systemd service manager protocol (sd_notify(3)), without libsystemd:
//! `READY=1` once every shard listens, `RELOADING=1` / `READY=1` around a
//! SIGHUP reload, `STOPPING=1` at shutdown, and `WATCHDOG=1` every half
//! `WATCHDOG_USEC` while the shards are healthy (a stalled shard stops the
//! pings and systemd restarts the service).
//!
//! Messages are datagrams on the unix socket named by `NOTIFY_SOCKET` (a
//! path, or an abstract name starting with `@`). Without it (not started by
//! systemd) every call does nothing.

use crate::metrics::ShardMetrics;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the service
/// manager. False when there is none or the send failed.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        match std::os::unix::net::SocketAddr::from_abstract_name(name) {
            Ok(addr) => sock.send_to_addr(state.as_bytes(), &addr),
            Err(e) => Err(e),
        }
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = &sent {
        tracing::warn!(error = %e, "sd_notify failed");
    }
    sent.is_ok()
}

/// Half the watchdog interval systemd asked for (`WATCHDOG_USEC`, for this
/// process when `WATCHDOG_PID` is set), or None without a watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// A shard whose timer task has not turned for this long is stalled (the
/// task turns at least once a second).
pub const STALLED_AFTER_S: i64 = 5;

/// The shards' health: `Err` names the first shard whose timer task has not
/// run for [`STALLED_AFTER_S`] (a busy loop, a deadlock, a blocked
/// system call). `now_s` is the Unix time.
pub fn shards_healthy(shards: &[Arc<ShardMetrics>], now_s: i64) -> Result<(), String> {
    for (i, m) in shards.iter().enumerate() {
        let beat = m.shard_heartbeat_timestamp_seconds.load(Ordering::Relaxed);
        if beat > 0 && now_s - beat > STALLED_AFTER_S {
            return Err(format!(
                "shard {i} has not run its timers for {} s",
                now_s - beat
            ));
        }
    }
    Ok(())
}

pub fn unix_now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Starts the watchdog thread when systemd asked for one: `WATCHDOG=1`
/// every half interval while [`shards_healthy`]; a stall is logged once and
/// the pings stop until it clears.
pub fn start_watchdog(shards: Vec<Arc<ShardMetrics>>) {
    let Some(every) = watchdog_interval() else {
        return;
    };
    tracing::info!(
        every_ms = every.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let r = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut stalled = false;
            loop {
                match shards_healthy(&shards, unix_now_s()) {
                    Ok(()) => {
                        stalled = false;
                        notify("WATCHDOG=1");
                    }
                    Err(why) => {
                        if !stalled {
                            tracing::error!(reason = %why, "not pinging the systemd watchdog");
                        }
                        stalled = true;
                    }
                }
                std::thread::sleep(every);
            }
        });
    if let Err(e) = r {
        tracing::error!(error = %e, "watchdog thread not started");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_socket_and_is_silent_without_one() {
        let dir = std::env::temp_dir().join(format!("corem-sdnotify-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let rx = std::os::unix::net::UnixDatagram::bind(&dir).unwrap();
        // SAFETY (of the test): no other test reads NOTIFY_SOCKET.
        std::env::set_var("NOTIFY_SOCKET", &dir);
        assert!(notify("READY=1\nSTATUS=ok"));
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=ok");
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!notify("READY=1"));
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn a_stalled_shard_is_unhealthy() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        let shards = vec![a.clone(), b.clone()];
        // Not started yet (0): not a stall.
        assert!(shards_healthy(&shards, 1_000).is_ok());
        ShardMetrics::set(&a.shard_heartbeat_timestamp_seconds, 1_000);
        ShardMetrics::set(&b.shard_heartbeat_timestamp_seconds, 994);
        let e = shards_healthy(&shards, 1_000).unwrap_err();
        assert!(e.starts_with("shard 1 "), "{e}");
        ShardMetrics::set(&b.shard_heartbeat_timestamp_seconds, 999);
        assert!(shards_healthy(&shards, 1_000).is_ok());
    }
}
