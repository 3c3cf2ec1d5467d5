//! The load generator's RPC phase: platform RPCs written to the gateway's
//! request topic at a fixed rate (over the whole fleet, round robin) while
//! telemetry flows, and their statuses consumed back from
//! `device.rpc.status.{tenant}`. Measures what a platform caller sees:
//! request produced → terminal status readable, per RPC, in an hdrhistogram
//! (µs), plus the count of each terminal status and the RPCs that never
//! finished.
//!
//! Every rpc_id is `{run}-{seq}`, so statuses of other runs on the same
//! topic are ignored. The broker used here (tansu 0.6.0) makes the last
//! batches of a burst readable only after the next write: at the end,
//! marker records go to every partition of both topics (the gateway skips
//! the one on the request topic with a warning).

use hdrhistogram::Histogram;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone)]
pub struct RpcLoadConfig {
    pub brokers: String,
    pub request_topic: String,
    pub status_topic: String,
    pub tenant: String,
    /// The fleet's platform device ids (RPCs go to them round robin).
    pub device_ids: Vec<String>,
    /// RPCs per second (over the fleet).
    pub rate: u64,
    pub method: String,
    pub params: serde_json::Value,
    pub timeout_ms: u64,
    /// Prefix of every rpc_id of this run.
    pub run_id: String,
}

#[derive(Default)]
struct Book {
    /// seq → produced at (µs).
    sent: HashMap<u64, u64>,
    /// seq → the status it ended with.
    ended: HashMap<u64, String>,
    latency: Option<Histogram<u64>>,
    /// Request produced → `sent` status readable (the gateway's intake and
    /// dispatch).
    to_sent: Option<Histogram<u64>>,
    /// Accepted → finished inside the gateway (the status's `accepted_at`
    /// to its `updated_at`, ms): the gateway and the device, without the
    /// broker's delivery of the request and of the status.
    in_gateway: Option<Histogram<u64>>,
    statuses: u64,
    /// When the last terminal status was read (µs since the epoch).
    last_end_us: u64,
}

/// The outcome of an RPC phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RpcLoadReport {
    pub requested: u64,
    pub produce_failed: u64,
    pub seconds: f64,
    pub requested_per_second: f64,
    pub finished: u64,
    /// Finished RPCs per second from the first request to the last
    /// terminal status read (what the pipeline sustained end to end).
    pub finished_per_second: f64,
    /// Seconds from the first request to the last terminal status.
    pub finish_seconds: f64,
    pub by_status: std::collections::BTreeMap<String, u64>,
    pub unfinished: u64,
    pub status_records: u64,
    #[serde(skip)]
    pub latency: Histogram<u64>,
    #[serde(skip)]
    pub to_sent: Histogram<u64>,
    #[serde(skip)]
    pub in_gateway: Histogram<u64>,
}

pub struct RpcLoad {
    cfg: RpcLoadConfig,
    book: Arc<Mutex<Book>>,
    stop_producing: Arc<AtomicBool>,
    stop_consuming: Arc<AtomicBool>,
    produced: Arc<AtomicU64>,
    produce_failed: Arc<AtomicU64>,
    producer: Option<JoinHandle<()>>,
    consumer: Option<JoinHandle<()>>,
    status_partitions: Vec<i32>,
    started: Instant,
    started_us: u64,
    stopped: Option<Instant>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!())
}

fn partitions(c: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let n = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if n == 0 {
        anyhow::bail!("topic {topic} not found (is the tenant provisioned in the gateway?)");
    }
    Ok((0..n as i32).collect())
}

impl RpcLoad {
    /// Starts consuming the status topic (from its end) and producing
    /// requests at `cfg.rate`.
    pub fn start(cfg: RpcLoadConfig) -> anyhow::Result<RpcLoad> {
        if cfg.device_ids.is_empty() || cfg.rate == 0 {
            anyhow::bail!("the RPC phase needs devices and a rate");
        }
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", "lwm2m-loadgen-rpc")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "5")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let status_partitions = partitions(&consumer, &cfg.status_topic)?;
        let mut tpl = TopicPartitionList::new();
        for p in &status_partitions {
            let (_, high) =
                consumer.fetch_watermarks(&cfg.status_topic, *p, Duration::from_secs(10))?;
            tpl.add_partition_offset(&cfg.status_topic, *p, Offset::Offset(high))?;
        }
        consumer.assign(&tpl)?;
        let book = Arc::new(Mutex::new(Book {
            latency: Some(hist()),
            to_sent: Some(hist()),
            in_gateway: Some(hist()),
            ..Default::default()
        }));
        let stop_consuming = Arc::new(AtomicBool::new(false));
        let prefix = format!("{}-", cfg.run_id);
        let consumer = {
            let book = book.clone();
            let stop = stop_consuming.clone();
            std::thread::Builder::new()
                .name("rpc-status".into())
                .spawn(move || consume(consumer, &prefix, &book, &stop))?
        };
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            // A platform caller batches: tansu 0.6.0 takes a few hundred
            // produce requests per second in all on this box, so 2-record
            // batches (linger 2 ms) capped the intake at ~700/s.
            .set("linger.ms", "20")
            .set("queue.buffering.max.messages", "1000000")
            .create()?;
        let stop_producing = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(AtomicU64::new(0));
        let produce_failed = Arc::new(AtomicU64::new(0));
        let producer = {
            let (cfg, book, stop, produced, failed) = (
                cfg.clone(),
                book.clone(),
                stop_producing.clone(),
                produced.clone(),
                produce_failed.clone(),
            );
            std::thread::Builder::new()
                .name("rpc-requests".into())
                .spawn(move || produce(producer, &cfg, &book, &stop, &produced, &failed))?
        };
        Ok(RpcLoad {
            cfg,
            book,
            stop_producing,
            stop_consuming,
            produced,
            produce_failed,
            producer: Some(producer),
            consumer: Some(consumer),
            status_partitions,
            started: Instant::now(),
            started_us: now_us(),
            stopped: None,
        })
    }

    /// Requests produced so far.
    pub fn produced(&self) -> u64 {
        self.produced.load(Ordering::Relaxed)
    }

    /// RPCs that reached a terminal status so far.
    pub fn finished(&self) -> u64 {
        self.book.lock().map(|b| b.ended.len() as u64).unwrap_or(0)
    }

    /// Stops producing (the RPCs produced go on).
    pub fn stop_producing(&mut self) {
        self.stop_producing.store(true, Ordering::Release);
        if let Some(h) = self.producer.take() {
            let _ = h.join();
        }
        self.stopped.get_or_insert_with(Instant::now);
    }

    /// Stops producing, waits up to `drain` for the statuses of every RPC
    /// produced, and reports.
    pub fn finish(mut self, drain: Duration) -> RpcLoadReport {
        self.stop_producing();
        let seconds = self
            .stopped
            .unwrap_or_else(Instant::now)
            .duration_since(self.started)
            .as_secs_f64();
        let requested = self.produced();
        let deadline = Instant::now() + drain;
        let mut next_marker = Instant::now();
        while self.finished() < requested && Instant::now() < deadline {
            if Instant::now() >= next_marker {
                self.markers();
                next_marker = Instant::now() + Duration::from_secs(2);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop_consuming.store(true, Ordering::Release);
        if let Some(h) = self.consumer.take() {
            let _ = h.join();
        }
        let mut b = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_status = std::collections::BTreeMap::new();
        for s in b.ended.values() {
            *by_status.entry(s.clone()).or_insert(0) += 1;
        }
        let finished = b.ended.len() as u64;
        let finish_seconds = b.last_end_us.saturating_sub(self.started_us) as f64 / 1e6;
        RpcLoadReport {
            requested,
            produce_failed: self.produce_failed.load(Ordering::Relaxed),
            seconds,
            requested_per_second: requested as f64 / seconds.max(1e-9),
            finished,
            finished_per_second: finished as f64 / finish_seconds.max(1e-9),
            finish_seconds,
            by_status,
            unfinished: requested.saturating_sub(finished),
            status_records: b.statuses,
            latency: b.latency.take().unwrap_or_else(hist),
            to_sent: b.to_sent.take().unwrap_or_else(hist),
            in_gateway: b.in_gateway.take().unwrap_or_else(hist),
        }
    }

    /// A marker on every partition of both topics (see the module doc).
    fn markers(&self) {
        let Ok(prod) = ClientConfig::new()
            .set("bootstrap.servers", &self.cfg.brokers)
            .create::<BaseProducer>()
        else {
            return;
        };
        for p in &self.status_partitions {
            let _ = prod.send(
                BaseRecord::to(&self.cfg.status_topic)
                    .partition(*p)
                    .key("lwm2m-loadgen-marker")
                    .payload("{\"marker\":true}"),
            );
        }
        let _ = prod.send(
            BaseRecord::to(&self.cfg.request_topic)
                .key("lwm2m-loadgen-marker")
                .payload("{\"marker\":true}"),
        );
        let _ = prod.flush(Duration::from_secs(5));
    }
}

fn produce(
    producer: BaseProducer,
    cfg: &RpcLoadConfig,
    book: &Mutex<Book>,
    stop: &AtomicBool,
    produced: &AtomicU64,
    failed: &AtomicU64,
) {
    let t0 = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        let due = (t0.elapsed().as_secs_f64() * cfg.rate as f64) as u64;
        while seq < due && !stop.load(Ordering::Relaxed) {
            let device = &cfg.device_ids[(seq % cfg.device_ids.len() as u64) as usize];
            let body = serde_json::json!({
                "rpc_id": format!("{}-{seq}", cfg.run_id),
                "tenant_id": cfg.tenant,
                "device_id": device,
                "method": cfg.method,
                "params": cfg.params,
                "timeout_ms": cfg.timeout_ms,
            })
            .to_string();
            let at = now_us();
            match producer.send(
                BaseRecord::to(&cfg.request_topic)
                    .key(device.as_str())
                    .payload(&body),
            ) {
                Ok(()) => {
                    if let Ok(mut b) = book.lock() {
                        b.sent.insert(seq, at);
                    }
                    produced.fetch_add(1, Ordering::Relaxed);
                }
                Err((e, _)) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if failed.load(Ordering::Relaxed) == 1 {
                        eprintln!("rpc request not produced: {e}");
                    }
                    producer.poll(Duration::from_millis(5));
                }
            }
            seq += 1;
        }
        producer.poll(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = producer.flush(Duration::from_secs(10));
}

fn consume(consumer: BaseConsumer, prefix: &str, book: &Mutex<Book>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let now = now_us();
        let Some(v) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        else {
            continue;
        };
        let Some(seq) = v["rpc_id"]
            .as_str()
            .and_then(|id| id.strip_prefix(prefix))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let status = v["status"].as_str().unwrap_or("").to_string();
        let Ok(mut b) = book.lock() else { return };
        b.statuses += 1;
        let Some(&at) = b.sent.get(&seq) else {
            continue;
        };
        let lat = now.saturating_sub(at).max(1);
        match status.as_str() {
            "queued" => {}
            "sent" => {
                if let Some(h) = b.to_sent.as_mut() {
                    let _ = h.record(lat);
                }
            }
            _ => {
                if let std::collections::hash_map::Entry::Vacant(e) = b.ended.entry(seq) {
                    e.insert(status);
                    b.last_end_us = b.last_end_us.max(now);
                    if let Some(h) = b.latency.as_mut() {
                        let _ = h.record(lat);
                    }
                    let inside = v["updated_at"].as_i64().unwrap_or(0)
                        - v["accepted_at"].as_i64().unwrap_or(0);
                    if let Some(h) = b.in_gateway.as_mut() {
                        let _ = h.record((inside.max(0) as u64 * 1000).max(1));
                    }
                }
            }
        }
    }
}
