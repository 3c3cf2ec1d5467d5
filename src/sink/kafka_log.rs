//! What the gateway says when the broker is away.
//!
//! Every Kafka client of the process (one producer per shard, the RPC
//! status producer, the RPC intake consumer, the topic manager) reports
//! here. librdkafka repeats itself during an outage: every client raises
//! `AllBrokersDown` again and again and logs a `FAIL` line per reconnect
//! attempt, so a two-shard gateway printed several ERROR lines a second for
//! as long as the broker was down. An operator needs three lines instead:
//!
//! * one WARN when no broker is reachable (the first client to notice),
//!   and a reminder every [`REMIND_MS`] while it lasts, with its duration;
//! * one INFO when a broker answers again (a delivery, a consumed record,
//!   a metadata answer), with how long it was away;
//! * librdkafka's own warnings and errors at most once per [`LIB_EVERY_MS`],
//!   with the count of the ones held back; the rest go to debug.
//!
//! TLS and SASL failures (the operator's configuration, not an outage) stay
//! at ERROR, under a rate limit of their own.
//!
//! The decisions are sans-IO ([`OutageLog`], given the time); the
//! process-wide instance and the tracing calls are below it.

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Reminder interval while no broker is reachable.
pub const REMIND_MS: u64 = 60_000;
/// At most one librdkafka warning/error line per this interval.
pub const LIB_EVERY_MS: u64 = 30_000;

/// What to say about an `AllBrokersDown`.
#[derive(Debug, PartialEq, Eq)]
pub enum Down {
    /// The outage starts: say so.
    Started,
    /// Still down for this long: remind.
    Still { for_ms: u64 },
    /// Already said recently.
    Quiet,
}

/// The outage state of the process's Kafka clients.
#[derive(Debug, Default)]
pub struct OutageLog {
    /// Wall time (ms, +1 so that 0 means "up") the outage began.
    down_since: AtomicU64,
    state: Mutex<Limits>,
}

#[derive(Debug, Default)]
struct Limits {
    last_remind: u64,
    lines: [Every; 2],
}

/// One rate-limited kind of line: when it was last let through, and how
/// many were held back since.
#[derive(Debug, Default)]
struct Every {
    last: Option<u64>,
    held_back: u64,
}

/// The rate-limited kinds of line.
#[derive(Debug, Clone, Copy)]
pub enum Line {
    /// librdkafka's own warnings and errors.
    Lib = 0,
    /// TLS handshake or SASL failures.
    Auth = 1,
}

impl OutageLog {
    /// A client found no broker reachable at `now_ms`.
    pub fn all_down(&self, now_ms: u64) -> Down {
        let Ok(mut l) = self.state.lock() else {
            return Down::Quiet;
        };
        let since = self.down_since.load(Ordering::Acquire);
        if since == 0 {
            self.down_since.store(now_ms + 1, Ordering::Release);
            l.last_remind = now_ms;
            return Down::Started;
        }
        if now_ms.saturating_sub(l.last_remind) >= REMIND_MS {
            l.last_remind = now_ms;
            return Down::Still {
                for_ms: now_ms.saturating_sub(since - 1),
            };
        }
        Down::Quiet
    }

    /// A broker answered at `now_ms`: how long it was away, if it was.
    /// One relaxed-cost load while the broker is up (called per delivery).
    #[inline]
    pub fn reachable(&self, now_ms: u64) -> Option<u64> {
        if self.down_since.load(Ordering::Acquire) == 0 {
            return None;
        }
        let since = self.down_since.swap(0, Ordering::AcqRel);
        (since != 0).then(|| now_ms.saturating_sub(since - 1))
    }

    /// True while an outage is on record.
    pub fn is_down(&self) -> bool {
        self.down_since.load(Ordering::Acquire) != 0
    }

    /// A line of kind `kind` at `now_ms`: `Some(held_back)` when it may
    /// be logged (with the count of lines of its kind held back since the
    /// last one), None when it goes to debug.
    pub fn line(&self, kind: Line, now_ms: u64) -> Option<u64> {
        let Ok(mut l) = self.state.lock() else {
            return None;
        };
        let e = &mut l.lines[kind as usize];
        match e.last {
            Some(t) if now_ms.saturating_sub(t) < LIB_EVERY_MS => {
                e.held_back += 1;
                None
            }
            _ => {
                e.last = Some(now_ms);
                Some(std::mem::take(&mut e.held_back))
            }
        }
    }
}

/// The process's outage log.
pub fn outage() -> &'static OutageLog {
    static LOG: std::sync::OnceLock<OutageLog> = std::sync::OnceLock::new();
    LOG.get_or_init(OutageLog::default)
}

/// Set once the gateway stops: clients being torn down report their
/// brokers as gone, which is not an outage (logged at debug from then on).
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The gateway is stopping (SIGTERM).
pub fn shutting_down() {
    STOPPING.store(true, Ordering::Relaxed);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `ClientContext::error` of every gateway client.
pub fn client_error(client: &str, error: &KafkaError, reason: &str) {
    if STOPPING.load(Ordering::Relaxed) {
        tracing::debug!(client, %error, reason, "kafka client error while stopping");
        return;
    }
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::AllBrokersDown) => match outage().all_down(now_ms()) {
            Down::Started => tracing::warn!(
                client,
                reason,
                "kafka: no broker reachable; records stay queued until a broker answers or kafka.message_timeout_ms passes (reminder every 60 s)"
            ),
            Down::Still { for_ms } => tracing::warn!(
                client,
                down_s = for_ms / 1000,
                reason,
                "kafka: still no broker reachable"
            ),
            Down::Quiet => tracing::debug!(client, reason, "kafka: all brokers down"),
        },
        Some(RDKafkaErrorCode::SSL) | Some(RDKafkaErrorCode::Authentication) => {
            // TLS handshake or SASL failure: the configuration, not an
            // outage; records stay queued until it is fixed.
            match outage().line(Line::Auth, now_ms()) {
                Some(held_back) => tracing::error!(
                    client,
                    reason,
                    held_back,
                    "kafka: TLS/SASL connection to the broker failed; records stay queued"
                ),
                None => tracing::debug!(client, reason, "kafka: TLS/SASL failure"),
            }
        }
        _ => tracing::debug!(client, %error, reason, "kafka client error"),
    }
}

/// `ClientContext::log` of every gateway client: librdkafka's warnings
/// and errors rate-limited, the rest at debug.
pub fn client_log(client: &str, level: RDKafkaLogLevel, fac: &str, msg: &str) {
    let loud = matches!(
        level,
        RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning
    );
    if !loud || STOPPING.load(Ordering::Relaxed) {
        tracing::debug!(target: "librdkafka", client, fac, "{msg}");
        return;
    }
    match outage().line(Line::Lib, now_ms()) {
        Some(held_back) => tracing::warn!(
            target: "librdkafka",
            client,
            fac,
            held_back,
            "{msg} (librdkafka; similar lines at most every 30 s, the rest at debug)"
        ),
        None => tracing::debug!(target: "librdkafka", client, fac, "{msg}"),
    }
}

/// A broker answered (a delivery, a consumed record, a metadata answer).
#[inline]
pub fn broker_answered(client: &str) {
    // Per delivery: one atomic load while the broker is up.
    let o = outage();
    if !o.is_down() {
        return;
    }
    if let Some(ms) = o.reachable(now_ms()) {
        tracing::info!(
            client,
            down_s = ms / 1000,
            "kafka: a broker is reachable again"
        );
    }
}

/// Broker connections in state UP in the last statistics of the RPC status
/// producer (`statistics.interval.ms`, [`STATS_INTERVAL_MS`]); -1 before
/// the first. Exported as `corem_lwm2m_kafka_broker_connections_up`.
static CONNECTIONS_UP: AtomicI64 = AtomicI64::new(-1);

/// How often the RPC status producer reports its broker connections.
pub const STATS_INTERVAL_MS: u64 = 5_000;

/// Broker connections in state UP, as last reported (-1: no report yet).
pub fn broker_connections_up() -> i64 {
    CONNECTIONS_UP.load(Ordering::Relaxed)
}

/// Connections in state UP in librdkafka's statistics (bootstrap entries
/// included: before the first metadata answer they are the only ones).
pub fn count_up(stats: &rdkafka::statistics::Statistics) -> i64 {
    stats.brokers.values().filter(|b| b.state == "UP").count() as i64
}

/// The context of the gateway's Kafka clients other than the shard
/// producers (which add delivery tags and metrics): the RPC status
/// producer, the RPC intake consumer and the topic manager.
pub struct GatewayContext {
    pub client: &'static str,
}

impl rdkafka::ClientContext for GatewayContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        client_log(self.client, level, fac, msg);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        client_error(self.client, &error, reason);
    }
    /// Only the RPC status producer asks for statistics: its broker
    /// connections feed the `kafka_broker_connections_up` gauge, and one
    /// that is up ends an outage on record even when no record moves.
    fn stats(&self, stats: rdkafka::statistics::Statistics) {
        let up = count_up(&stats);
        CONNECTIONS_UP.store(up, Ordering::Relaxed);
        if up > 0 {
            broker_answered(self.client);
        }
    }
}

impl rdkafka::consumer::ConsumerContext for GatewayContext {}

impl rdkafka::producer::ProducerContext for GatewayContext {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        if r.is_ok() {
            broker_answered(self.client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_said_once_reminded_and_its_end_said_once() {
        let o = OutageLog::default();
        assert_eq!(o.reachable(1_000), None, "nothing to say while up");
        assert_eq!(o.all_down(10_000), Down::Started);
        // Every client, again and again: quiet.
        for t in (10_001..70_000).step_by(500) {
            assert_eq!(o.all_down(t), Down::Quiet);
        }
        assert!(o.is_down());
        assert_eq!(o.all_down(70_000), Down::Still { for_ms: 60_000 });
        assert_eq!(o.all_down(70_500), Down::Quiet);
        assert_eq!(o.reachable(75_000), Some(65_000));
        assert_eq!(o.reachable(75_001), None, "said once");
        assert!(!o.is_down());
        // The next outage starts afresh.
        assert_eq!(o.all_down(80_000), Down::Started);
        assert_eq!(o.reachable(80_000), Some(0));
    }

    #[test]
    fn an_outage_at_time_zero_is_still_an_outage() {
        let o = OutageLog::default();
        assert_eq!(o.all_down(0), Down::Started);
        assert!(o.is_down());
        assert_eq!(o.reachable(5), Some(5));
    }

    #[test]
    fn librdkafka_lines_are_let_through_every_30_s_with_the_count_held_back() {
        let o = OutageLog::default();
        assert_eq!(o.line(Line::Lib, 0), Some(0));
        for t in 1..=9 {
            assert_eq!(o.line(Line::Lib, t * 1000), None);
        }
        // A TLS failure is not held back by librdkafka's chatter.
        assert_eq!(o.line(Line::Auth, 9_500), Some(0));
        assert_eq!(o.line(Line::Auth, 9_600), None);
        assert_eq!(o.line(Line::Lib, LIB_EVERY_MS), Some(9));
        assert_eq!(o.line(Line::Lib, LIB_EVERY_MS + 1), None);
        assert_eq!(o.line(Line::Lib, 2 * LIB_EVERY_MS + 5), Some(1));
        assert_eq!(o.line(Line::Auth, 9_600 + LIB_EVERY_MS), Some(1));
    }
}
