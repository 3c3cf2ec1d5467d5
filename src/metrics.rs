//! Per-shard counters and gauges, rendered as Prometheus text by the admin
//! server.
//!
//! Each shard owns one [`ShardMetrics`]; only that shard's thread writes it
//! (relaxed atomic adds on its own cache lines), the admin thread only reads.
//! Nothing on the packet path contends.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

macro_rules! metrics {
    (counters { $($c:ident : $chelp:literal,)* } gauges { $($g:ident : $ghelp:literal,)* }) => {
        /// Counters and gauges of one shard.
        #[derive(Default, Debug)]
        #[repr(align(128))]
        pub struct ShardMetrics {
            $(pub $c: AtomicU64,)*
            $(pub $g: AtomicI64,)*
        }

        impl ShardMetrics {
            /// (name, help, kind, values per shard) for every metric.
            fn render_all(shards: &[&ShardMetrics], out: &mut String) {
                $(
                    let _ = writeln!(out, "# HELP corem_lwm2m_{} {}", stringify!($c), $chelp);
                    let _ = writeln!(out, "# TYPE corem_lwm2m_{} counter", stringify!($c));
                    for (i, s) in shards.iter().enumerate() {
                        let _ = writeln!(out, "corem_lwm2m_{}{{shard=\"{}\"}} {}", stringify!($c), i, s.$c.load(Ordering::Relaxed));
                    }
                )*
                $(
                    let _ = writeln!(out, "# HELP corem_lwm2m_{} {}", stringify!($g), $ghelp);
                    let _ = writeln!(out, "# TYPE corem_lwm2m_{} gauge", stringify!($g));
                    for (i, s) in shards.iter().enumerate() {
                        let _ = writeln!(out, "corem_lwm2m_{}{{shard=\"{}\"}} {}", stringify!($g), i, s.$g.load(Ordering::Relaxed));
                    }
                )*
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

/// Renders all shards' metrics in the Prometheus text exposition format.
pub fn render_prometheus(shards: &[std::sync::Arc<ShardMetrics>], extra: &[(&str, i64)]) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let refs: Vec<&ShardMetrics> = shards.iter().map(|s| s.as_ref()).collect();
    ShardMetrics::render_all(&refs, &mut out);
    for (name, v) in extra {
        let _ = writeln!(out, "# TYPE corem_lwm2m_{name} gauge");
        let _ = writeln!(out, "corem_lwm2m_{name} {v}");
    }
    out
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
        let t = render_prometheus(&[a, b], &[("directory_endpoints", 7)]);
        assert!(t.contains("corem_lwm2m_datagrams_rx{shard=\"0\"} 1\n"));
        assert!(t.contains("corem_lwm2m_datagrams_rx{shard=\"1\"} 5\n"));
        assert!(t.contains("corem_lwm2m_registrations_active{shard=\"1\"} 3\n"));
        assert!(t.contains("corem_lwm2m_directory_endpoints 7\n"));
    }
}
