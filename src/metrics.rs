//! Per-shard counters, gauges and histograms, rendered as Prometheus text
//! (exposition format 0.0.4) by the admin server.
//!
//! Each shard owns one [`ShardMetrics`]; only that shard's thread writes it
//! (relaxed atomic adds on its own cache lines), the admin thread only reads.
//! Nothing on the packet path contends.
//!
//! Names follow the Prometheus conventions: the `corem_lwm2m_` prefix,
//! counters end in `_total`, durations are histograms in seconds, sizes in
//! bytes; `promtool check metrics` passes on the output (tests/metrics.rs).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the histogram buckets, in microseconds (rendered in
/// seconds): 0.5 ms to 2 minutes, covering an in-process step (sub-ms), a
/// device round trip (tens of ms to seconds with retransmissions) and an
/// RPC to a sleeping device (minutes end up in `+Inf`).
pub const BUCKETS_US: [u64; 17] = [
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
];

/// A fixed-bucket latency histogram written by one thread and read by the
/// admin thread (relaxed atomics; a scrape may see a sample in a bucket but
/// not yet in the sum, which Prometheus tolerates).
#[derive(Default, Debug)]
pub struct Histogram {
    /// Samples per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.observe_us(us);
    }

    pub fn observe_us(&self, us: u64) {
        let i = BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Samples observed so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// `name_bucket` / `name_sum` / `name_count` lines with `labels`
    /// (`shard="0"` or empty) in front of `le`.
    pub fn render(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            cum += b.load(Ordering::Relaxed);
            match BUCKETS_US.get(i) {
                Some(&le) => {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cum}",
                        le as f64 / 1e6
                    );
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
                }
            }
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let lb = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{lb} {sum}");
        let _ = writeln!(out, "{name}_count{lb} {cum}");
    }
}

/// `# HELP` and `# TYPE` lines of one metric family.
pub fn family_header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

macro_rules! metrics {
    (counters { $($c:ident : $chelp:literal,)* }
     gauges { $($g:ident : $ghelp:literal,)* }
     histograms { $($h:ident : $hhelp:literal,)* }) => {
        /// Counters, gauges and histograms of one shard.
        #[derive(Default, Debug)]
        #[repr(align(128))]
        pub struct ShardMetrics {
            $(pub $c: AtomicU64,)*
            $(pub $g: AtomicI64,)*
            $(pub $h: Histogram,)*
        }

        impl ShardMetrics {
            /// (name, help, kind, values per shard) for every metric.
            fn render_all(shards: &[&ShardMetrics], out: &mut String) {
                $(
                    let name = concat!("corem_lwm2m_", stringify!($c), "_total");
                    family_header(out, name, "counter", $chelp);
                    for (i, s) in shards.iter().enumerate() {
                        let _ = writeln!(out, "{name}{{shard=\"{}\"}} {}", i, s.$c.load(Ordering::Relaxed));
                    }
                )*
                $(
                    let name = concat!("corem_lwm2m_", stringify!($g));
                    family_header(out, name, "gauge", $ghelp);
                    for (i, s) in shards.iter().enumerate() {
                        let _ = writeln!(out, "{name}{{shard=\"{}\"}} {}", i, s.$g.load(Ordering::Relaxed));
                    }
                )*
                $(
                    let name = concat!("corem_lwm2m_", stringify!($h));
                    family_header(out, name, "histogram", $hhelp);
                    for (i, s) in shards.iter().enumerate() {
                        s.$h.render(name, &format!("shard=\"{i}\""), out);
                    }
                )*
            }

            /// Every metric family name the shards export (as rendered, with
            /// `_total` on counters), for the dashboard check.
            pub fn family_names() -> Vec<String> {
                vec![
                    $(concat!("corem_lwm2m_", stringify!($c), "_total").to_string(),)*
                    $(concat!("corem_lwm2m_", stringify!($g)).to_string(),)*
                    $(concat!("corem_lwm2m_", stringify!($h)).to_string(),)*
                ]
            }

            /// Snapshot as (name, value) pairs, for tests and the JSON status page.
            pub fn values(&self) -> Vec<(&'static str, i64)> {
                vec![
                    $((stringify!($c), self.$c.load(Ordering::Relaxed) as i64),)*
                    $((stringify!($g), self.$g.load(Ordering::Relaxed)),)*
                ]
            }
        }
    };
}

metrics! {
    counters {
        datagrams_rx: "UDP datagrams received",
        datagrams_tx: "UDP datagrams sent",
        bytes_rx: "UDP payload bytes received",
        tx_errors: "datagrams that could not be sent (socket error or full buffer)",
        malformed: "datagrams that are not valid CoAP (RFC 7252 message format error)",
        oversized: "datagrams larger than gateway.max_datagram (dropped; a CON request gets 4.13)",
        rst_sent: "RST messages sent (pings, malformed CON, unknown notifications)",
        bad_option: "requests rejected with 4.02 for an unknown critical option",
        duplicates: "duplicate CON/NON messages answered from the deduplication cache",
        requests_not_found: "requests for unknown resources (4.04)",
        registrations: "successful Register operations",
        registrations_replaced: "Register operations that replaced an existing registration",
        register_rejected_unknown_endpoint: "Register from an endpoint not in the directory (4.03)",
        register_rejected_bad_request: "Register or Update with invalid parameters or payload (4.00)",
        register_rejected_unauthorized: "Register, Update, De-register or Send refused by the authorizer (4.03)",
        updates: "successful Update operations",
        update_unknown: "Update or De-register for an unknown registration (4.04)",
        deregistrations: "successful De-register operations",
        expirations: "registrations removed because their lifetime expired",
        takeovers: "registrations dropped because a newer registration of the endpoint exists on another shard",
        claims_sent: "requests for a registration held by another shard, sent there to move it here",
        registrations_moved_in: "registrations moved to this shard (the device's datagrams now arrive here)",
        registrations_moved_out: "registrations handed to another shard",
        address_changes: "Updates from a new source address (registration rebound to it)",
        deprovisioned: "registrations ended because the endpoint was removed from the directory",
        notifications_rx: "Observe notifications received",
        notifications_stale: "notifications older than the Observe window (RFC 7641 §3.4), acknowledged, not published",
        notifications_duplicate: "notifications whose Observe number was already published (acknowledged, not published again)",
        notifications_reordered: "notifications that arrived after a newer one (published)",
        notifications_unknown: "notifications for unknown observations (answered with RST)",
        notifications_wrong_peer: "notifications with a known token from an address other than the device's (RST, RFC 7252 §5.3.2)",
        notifications_dropped_busy: "NON notifications dropped because the Kafka queue was full",
        notifications_deferred_busy: "CON notifications left unacknowledged because the Kafka queue was full",
        send_rx: "LwM2M Send operations (POST /dp) received",
        busy_responses: "requests answered 5.03 Service Unavailable because the Kafka queue was full",
        decode_errors: "payloads that could not be decoded in their content format",
        unmapped_values: "resource values not mapped to a metric by the device profile (not published)",
        points_published: "TelemetryPoints accepted by the Kafka producer queue",
        status_published: "device.status events accepted by the Kafka producer queue",
        kafka_delivered: "Kafka records acknowledged by the broker",
        kafka_delivery_failed: "Kafka records the producer gave up on (see logs)",
        kafka_enqueue_failed: "records the producer refused to queue",
        requests_sent: "server-initiated CoAP requests sent (Observe, Write-Attributes, ...)",
        requests_queued: "server-initiated requests that waited for a free NSTART slot (RFC 7252 §4.7)",
        retransmissions: "CoAP retransmissions of server-initiated CON requests",
        request_timeouts: "server-initiated requests that got no answer",
        observe_established: "observations established",
        observe_failed: "observe requests answered with an error code or timed out",
        observe_cancelled: "observations cancelled because the profile no longer asks for them",
        acks_withheld_delivery_failed: "acknowledgements withheld because the broker did not confirm the record",
        dedup_evicted: "peers evicted from duplicate detection by the dedup_max_peers cap",
        log_lines_suppressed: "log lines suppressed by the rate limit",
        dtls_hello_verify_sent: "HelloVerifyRequests sent (ClientHello without a valid cookie; no state kept, RFC 6347 §4.2.1)",
        dtls_dropped_malformed: "DTLS datagrams dropped: malformed records or an unexpected first message",
        dtls_dropped_handshake_cap: "verified ClientHellos dropped: dtls.max_handshakes in progress on the shard",
        dtls_dropped_session_cap: "verified ClientHellos dropped: dtls.max_sessions established on the shard",
        dtls_dropped_rate: "verified ClientHellos dropped: dtls.handshakes_per_ip_per_s exceeded by the source address",
        dtls_handshakes_started: "DTLS handshakes started (a ClientHello with a valid cookie)",
        dtls_handshakes_completed: "DTLS handshakes completed",
        dtls_handshakes_failed: "DTLS handshakes that failed (alert sent, bad credentials, unsupported suite)",
        dtls_handshake_timeouts: "DTLS handshakes abandoned after dtls.handshake_timeout_ms",
        dtls_records_replayed: "DTLS records dropped as replays (RFC 6347 §4.1.2.6)",
        dtls_records_bad: "DTLS records that failed authentication (dropped, RFC 6347 §4.1.2.7)",
        dtls_records_no_session: "DTLS records from an address without a session (dropped)",
        dtls_final_flight_resent: "final handshake flights resent because the client retransmitted its own",
        dtls_alerts_rx: "DTLS alerts received on established sessions",
        dtls_sessions_closed: "DTLS sessions ended (close_notify, fatal alert, idle timeout, credentials changed)",
        dtls_sessions_replaced: "DTLS sessions replaced by a new handshake from the same address (RFC 6347 §4.2.8)",
        dtls_sessions_restored: "DTLS sessions restored from the encrypted session snapshot",
        dtls_tx_no_session: "datagrams for a DTLS peer without a session (not sent)",
        rpc_exec_received: "RPCs handed to the shard for sending",
        rpc_returned: "RPCs handed back unsent (device not registered here or asleep)",
        rpc_succeeded: "RPCs the device answered with 2.xx",
        rpc_failed: "RPCs that failed (error code from the device, refused before sending, interrupted)",
        rpc_timed_out: "RPCs without an answer within the CoAP retransmissions or their timeout",
        block2_continuations: "Block2 continuation requests sent for large device responses (RFC 7959)",
        block1_sent: "Block1 blocks sent for large writes (RFC 7959)",
        block1_rx: "Block1 blocks received for large requests (Register, Send)",
        firmware_blocks_served: "firmware image blocks served to devices (GET /fw/{name}, Block2)",
        firmware_bytes_served: "firmware image bytes served to devices",
        firmware_refused: "firmware downloads refused (4.01 to a sender without registration or DTLS session, 4.02 block past the end)",
        block1_too_large: "Block1 request bodies refused with 4.13 (above gateway.max_body)",
        block1_incomplete: "Block1 request bodies refused with 4.08 (a block missing)",
        block1_expired: "Block1 request bodies dropped unfinished (no block for their lifetime)",
        bootstrap_requests: "Bootstrap-Request messages received (POST /bs)",
        bootstrap_refused: "Bootstrap-Requests refused (unknown endpoint 4.03, wrong identity 4.03, keys over plain CoAP 4.03, bad request 4.00, unsupported pct 4.15, no server configured 5.00)",
        bootstrap_restarted: "bootstrap sessions abandoned because the device sent a new Bootstrap-Request",
        bootstrap_discovers: "Bootstrap-Discover requests sent",
        bootstrap_deletes: "Bootstrap-Delete requests sent",
        bootstrap_writes: "Bootstrap-Write requests sent (each block counts)",
        bootstrap_psk_generated: "PSKs generated and recorded in the directory at bootstrap",
        bootstrap_finished: "bootstrap sessions ended with a successful Bootstrap-Finish",
        bootstrap_failed_discover: "bootstrap sessions failed at Bootstrap-Discover (5.xx, timeout, reset)",
        bootstrap_failed_delete: "bootstrap sessions failed at Bootstrap-Delete",
        bootstrap_failed_write: "bootstrap sessions failed at Bootstrap-Write",
        bootstrap_failed_store: "bootstrap sessions failed recording a generated PSK",
        bootstrap_failed_finish: "bootstrap sessions failed at Bootstrap-Finish (device error, timeout)",
        bootstrap_timeouts: "bootstrap sessions ended by bootstrap.session_timeout_s",
        bootstrap_dtls_handshakes_completed: "DTLS handshakes completed on the bootstrap listener",
        bootstrap_dtls_handshakes_failed: "DTLS handshakes failed on the bootstrap listener (wrong or unknown bootstrap credentials)",
        status_dropped: "status events dropped because the producer stayed full (backlog limit)",
    }
    gauges {
        registrations_active: "registrations currently held by the shard",
        observations_active: "observations currently held by the shard",
        pending_requests: "server-initiated requests awaiting an answer",
        acks_awaiting_delivery: "messages whose acknowledgement waits for the broker to confirm their records",
        dedup_peers: "peers held by duplicate detection",
        kafka_queue: "records in the shard producer's queue",
        dtls_sessions: "established DTLS sessions held by the shard",
        dtls_handshakes: "DTLS handshakes in progress on the shard",
        rpc_in_flight: "RPCs sent to devices and awaiting their answer",
        block1_assemblies: "Block1 request bodies being received (RFC 7959)",
        bootstrap_sessions: "bootstrap sessions in progress on the shard",
        bootstrap_dtls_sessions: "DTLS sessions on the bootstrap listener",
        shard_heartbeat_timestamp_seconds: "Unix time of the shard's last timer turn (at least once a second while it runs; /healthz and the systemd watchdog fail when one is 5 s old)",
    }
    histograms {
        registration_setup_seconds: "time from a Register to the last answer to the observations the profile asks for (telemetry flowing; 0 observations: the 2.01)",
        observe_setup_seconds: "time from an Observe request sent to the device's answer (retransmissions included)",
        con_ack_delay_seconds: "time a CON message's acknowledgement waited for the broker to confirm its records (kafka.ack_after = delivered)",
        kafka_delivery_seconds: "time from a record's production (notification or event processed) to the broker's acknowledgement",
        rpc_device_seconds: "time from an RPC request sent to the device to its final answer (Block2 continuations included)",
        dtls_handshake_seconds: "time from a verified ClientHello to the completed DTLS handshake",
    }
}

impl ShardMetrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn set(g: &AtomicI64, v: i64) {
        g.store(v, Ordering::Relaxed);
    }
    /// Sets a counter maintained elsewhere (a running total).
    pub fn store(c: &AtomicU64, v: u64) {
        c.store(v, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// Renders all shards' metrics in the Prometheus text exposition format,
/// then `extra` process-wide gauges (name without prefix, help, value).
pub fn render_prometheus(
    shards: &[std::sync::Arc<ShardMetrics>],
    extra: &[(&str, &str, i64)],
) -> String {
    let mut out = String::with_capacity(64 * 1024);
    let refs: Vec<&ShardMetrics> = shards.iter().map(|s| s.as_ref()).collect();
    ShardMetrics::render_all(&refs, &mut out);
    for (name, help, v) in extra {
        let name = format!("corem_lwm2m_{name}");
        family_header(&mut out, &name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    }
    out
}

/// The control plane's RPC figures (written by the RPC service thread).
#[derive(Default, Debug)]
pub struct RpcMetrics {
    /// RPCs accepted (HTTP or the Kafka request topic).
    pub accepted: AtomicU64,
    /// Terminal statuses by [`RpcMetrics::STATUSES`].
    pub finished: [AtomicU64; 4],
    /// Accepted → terminal status.
    pub duration: Histogram,
}

impl RpcMetrics {
    pub const STATUSES: [&'static str; 4] = ["succeeded", "failed", "timed_out", "expired"];

    /// Records a terminal status (`status` one of [`RpcMetrics::STATUSES`])
    /// reached `ms` after the RPC was accepted.
    pub fn record_finished(&self, status: &str, ms: i64) {
        if let Some(i) = Self::STATUSES.iter().position(|s| *s == status) {
            self.finished[i].fetch_add(1, Ordering::Relaxed);
        }
        self.duration.observe_us(ms.max(0) as u64 * 1000);
    }

    pub fn render(&self, out: &mut String) {
        family_header(
            out,
            "corem_lwm2m_rpc_accepted_total",
            "counter",
            "platform RPCs accepted (admin API or the Kafka request topic)",
        );
        let _ = writeln!(
            out,
            "corem_lwm2m_rpc_accepted_total {}",
            self.accepted.load(Ordering::Relaxed)
        );
        family_header(
            out,
            "corem_lwm2m_rpc_finished_total",
            "counter",
            "platform RPCs that reached a terminal status, by status",
        );
        for (i, st) in Self::STATUSES.iter().enumerate() {
            let _ = writeln!(
                out,
                "corem_lwm2m_rpc_finished_total{{status=\"{st}\"}} {}",
                self.finished[i].load(Ordering::Relaxed)
            );
        }
        family_header(
            out,
            "corem_lwm2m_rpc_duration_seconds",
            "histogram",
            "time from an RPC's acceptance to its terminal status (queueing for an asleep or offline device included)",
        );
        self.duration
            .render("corem_lwm2m_rpc_duration_seconds", "", out);
    }

    /// The metric family names [`RpcMetrics::render`] writes.
    pub const FAMILIES: [&'static str; 3] = [
        "corem_lwm2m_rpc_accepted_total",
        "corem_lwm2m_rpc_finished_total",
        "corem_lwm2m_rpc_duration_seconds",
    ];
}

/// The standard `process_*` metrics (as the Prometheus client libraries
/// export them) of this process, read from /proc at scrape time, and
/// `corem_lwm2m_build_info`.
pub fn render_process(out: &mut String) {
    family_header(
        out,
        "corem_lwm2m_build_info",
        "gauge",
        "always 1; the version of the running gateway in its label",
    );
    let _ = writeln!(
        out,
        "corem_lwm2m_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    let Some(p) = ProcessStats::read() else {
        return;
    };
    let mut g = |name: &str, kind: &str, help: &str, v: f64| {
        family_header(out, name, kind, help);
        let _ = writeln!(out, "{name} {v}");
    };
    g(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    g(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.rss_bytes as f64,
    );
    g(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.vsize_bytes as f64,
    );
    g(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_s,
    );
    g(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds as f64,
    );
    g(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        p.max_fds as f64,
    );
    g(
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
        p.threads as f64,
    );
}

/// This process's figures from /proc (Linux).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub vsize_bytes: u64,
    pub start_time_s: f64,
    pub open_fds: u64,
    pub max_fds: u64,
    pub threads: u64,
}

impl ProcessStats {
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // proc(5): the command name is in parentheses and may hold spaces;
        // fields are counted after the last ')'. Field 3 (state) is the
        // first after it.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_ascii_whitespace().collect();
        let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
        // SAFETY: sysconf has no memory-safety preconditions.
        let (tck, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
                libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
            )
        };
        let btime = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we pass.
        let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur
        } else {
            0
        };
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) as f64 / tck,
            threads: field(20)?,
            start_time_s: btime + field(22)? as f64 / tck,
            vsize_bytes: field(23)?,
            rss_bytes: field(24)? * page,
            open_fds,
            max_fds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn renders_per_shard() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        ShardMetrics::inc(&a.datagrams_rx);
        ShardMetrics::add(&b.datagrams_rx, 5);
        ShardMetrics::set(&b.registrations_active, 3);
        a.con_ack_delay_seconds.observe(Duration::from_micros(700));
        a.con_ack_delay_seconds.observe(Duration::from_secs(500));
        let t = render_prometheus(&[a, b], &[("directory_endpoints", "endpoints", 7)]);
        assert!(t.contains("corem_lwm2m_datagrams_rx_total{shard=\"0\"} 1\n"));
        assert!(t.contains("corem_lwm2m_datagrams_rx_total{shard=\"1\"} 5\n"));
        assert!(t.contains("# TYPE corem_lwm2m_datagrams_rx_total counter\n"));
        assert!(t.contains("corem_lwm2m_registrations_active{shard=\"1\"} 3\n"));
        assert!(t.contains("corem_lwm2m_directory_endpoints 7\n"));
        assert!(t.contains("# TYPE corem_lwm2m_con_ack_delay_seconds histogram\n"));
        // Cumulative buckets: 700 µs falls in le=0.001, 500 s only in +Inf.
        assert!(
            t.contains("corem_lwm2m_con_ack_delay_seconds_bucket{shard=\"0\",le=\"0.0005\"} 0\n")
        );
        assert!(
            t.contains("corem_lwm2m_con_ack_delay_seconds_bucket{shard=\"0\",le=\"0.001\"} 1\n")
        );
        assert!(t.contains("corem_lwm2m_con_ack_delay_seconds_bucket{shard=\"0\",le=\"120\"} 1\n"));
        assert!(t.contains("corem_lwm2m_con_ack_delay_seconds_bucket{shard=\"0\",le=\"+Inf\"} 2\n"));
        assert!(t.contains("corem_lwm2m_con_ack_delay_seconds_count{shard=\"0\"} 2\n"));
        let sum: f64 = t
            .lines()
            .find_map(|l| l.strip_prefix("corem_lwm2m_con_ack_delay_seconds_sum{shard=\"0\"} "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 500.0007).abs() < 1e-9);
        assert!(t.contains("corem_lwm2m_con_ack_delay_seconds_count{shard=\"1\"} 0\n"));
        for f in ShardMetrics::family_names() {
            assert!(t.contains(&format!("# TYPE {f} ")), "{f}");
        }
    }

    #[test]
    fn process_stats_read() {
        let p = ProcessStats::read().expect("/proc");
        assert!(p.rss_bytes > 0 && p.vsize_bytes >= p.rss_bytes);
        assert!(p.threads >= 1 && p.open_fds >= 3 && p.max_fds >= p.open_fds);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(p.start_time_s <= now + 1.0 && p.start_time_s > now - 86_400.0 * 365.0);
        let mut out = String::new();
        render_process(&mut out);
        assert!(out.contains("# TYPE process_cpu_seconds_total counter\n"));
        assert!(out.contains("corem_lwm2m_build_info{version=\""));
    }
}
