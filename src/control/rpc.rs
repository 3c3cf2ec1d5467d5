//! The RPC service: one control-plane thread that owns the
//! [`RpcBook`], its write-ahead log ([`RpcLog`]) and the status producer.
//!
//! Inputs: requests from the admin API (and the Kafka intake), reports
//! from the shards (presence, results). Per loop turn, in this order: the
//! log records the book emitted are appended and fsynced; then requests are
//! answered, statuses published on `device.rpc.status.{tenant_id}` (key =
//! device_id) and executions sent to their shard (`ControlHandle::send_rpc`).
//! So nothing is acknowledged, announced or sent before it is durable.
//!
//! At start the log is replayed: RPCs still queued resume, RPCs that were
//! sent without a final answer end `failed` (the outcome is unknown, they
//! are not sent twice).

use super::campaign::{Campaign, CampaignSpec, Campaigns};
use super::directory::Directory;
use super::firmware::FirmwareStore;
use super::profiles::Profiles;
use super::rpc_book::{LogRecord, Refusal, Resolved, RpcBook, RpcRecord, Work};
use super::rpc_log::{RpcLog, WalLine};
use crate::config::Config;
use crate::metrics::RpcMetrics;
use crate::proto::lwm2m::firmware::{FirmwareParams, FirmwarePlan, FwImage, ImageRef, UriBases};
use crate::proto::lwm2m::profile::Profile;
use crate::proto::lwm2m::rpc::RpcStatus;
use crate::proto::lwm2m::rpc::{self, PresenceState, RpcEvent, RpcRequest};
use crate::proto::lwm2m::server::ControlMsg;
use crate::shard::runtime::ControlHandle;
use crate::sink::kafka_log::{broker_answered, GatewayContext};
use crate::sink::topic_for;
use crossbeam_channel::{Receiver, Sender};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::Value as J;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Weak;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

type Submitted = Result<RpcRecord, Refusal>;
/// Submissions answered once their log records are durable.
type Replies = Vec<(Sender<Submitted>, Submitted)>;

enum Cmd {
    Submit {
        req: RpcRequest,
        reply: Sender<Result<RpcRecord, Refusal>>,
    },
    Get {
        rpc_id: String,
        reply: Sender<Option<RpcRecord>>,
    },
    OfDevice {
        device_id: String,
        reply: Sender<(Vec<RpcRecord>, Option<PresenceState>)>,
    },
    Presences {
        device_ids: Vec<String>,
        reply: Sender<Vec<Option<PresenceState>>>,
    },
    CampaignCreate {
        spec: Box<CampaignSpec>,
        reply: Sender<Result<J, (u16, String)>>,
    },
    CampaignGet {
        id: Option<String>,
        reply: Sender<Vec<J>>,
    },
    CampaignAct {
        id: String,
        action: String,
        threshold: Option<f64>,
        reply: Sender<Result<J, (u16, String)>>,
    },
    /// A record of the request topic: the request (or why it is unusable)
    /// and the next offset of its partition, logged with its acceptance.
    Consumed {
        req: Result<RpcRequest, String>,
        partition: i32,
        next: i64,
    },
    Stop,
}

/// Talks to the RPC service from any thread (cheap to clone).
#[derive(Clone)]
pub struct RpcHandle(Sender<Cmd>, Arc<RpcMetrics>);

const ANSWER: Duration = Duration::from_secs(10);

impl RpcHandle {
    /// The service's figures (for `/metrics`).
    pub fn metrics(&self) -> &Arc<RpcMetrics> {
        &self.1
    }

    /// Creates a firmware campaign; its view, or (HTTP status, why not).
    pub fn campaign_create(&self, spec: CampaignSpec) -> Result<J, (u16, String)> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.0
            .send(Cmd::CampaignCreate {
                spec: Box::new(spec),
                reply: tx,
            })
            .map_err(|_| (503, "the RPC service is stopped".to_string()))?;
        rx.recv_timeout(ANSWER)
            .map_err(|_| (503, "the RPC service did not answer".to_string()))?
    }

    /// One campaign's view (`Some(id)`), or all of them.
    pub fn campaigns(&self, id: Option<&str>) -> Vec<J> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self
            .0
            .send(Cmd::CampaignGet {
                id: id.map(str::to_string),
                reply: tx,
            })
            .is_err()
        {
            return Vec::new();
        }
        rx.recv_timeout(ANSWER).unwrap_or_default()
    }

    /// `pause`, `resume` or `cancel` a campaign.
    pub fn campaign_act(
        &self,
        id: &str,
        action: &str,
        threshold: Option<f64>,
    ) -> Result<J, (u16, String)> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.0
            .send(Cmd::CampaignAct {
                id: id.to_string(),
                action: action.to_string(),
                threshold,
                reply: tx,
            })
            .map_err(|_| (503, "the RPC service is stopped".to_string()))?;
        rx.recv_timeout(ANSWER)
            .map_err(|_| (503, "the RPC service did not answer".to_string()))?
    }

    /// Submits a request; returns once it is durable (or refused).
    pub fn submit(&self, req: RpcRequest) -> Result<RpcRecord, Refusal> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.0
            .send(Cmd::Submit { req, reply: tx })
            .map_err(|_| Refusal::Invalid("the RPC service is stopped".into()))?;
        rx.recv_timeout(ANSWER)
            .map_err(|_| Refusal::Invalid("the RPC service did not answer".into()))?
    }

    pub fn get(&self, rpc_id: &str) -> Option<RpcRecord> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.0
            .send(Cmd::Get {
                rpc_id: rpc_id.to_string(),
                reply: tx,
            })
            .ok()?;
        rx.recv_timeout(ANSWER).ok().flatten()
    }

    /// A device's RPCs (oldest first) and what the shards last reported of
    /// its registration.
    pub fn of_device(&self, device_id: &str) -> (Vec<RpcRecord>, Option<PresenceState>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self
            .0
            .send(Cmd::OfDevice {
                device_id: device_id.to_string(),
                reply: tx,
            })
            .is_err()
        {
            return (Vec::new(), None);
        }
        rx.recv_timeout(ANSWER).unwrap_or_default()
    }

    /// What the shards last reported of each device (None: never seen
    /// since the book started, or the service did not answer).
    pub fn presences(&self, device_ids: Vec<String>) -> Vec<Option<PresenceState>> {
        let n = device_ids.len();
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self
            .0
            .send(Cmd::Presences {
                device_ids,
                reply: tx,
            })
            .is_err()
        {
            return vec![None; n];
        }
        rx.recv_timeout(ANSWER).unwrap_or_else(|_| vec![None; n])
    }
}

pub struct RpcService {
    handle: RpcHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    intake: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
pub enum RpcServiceError {
    #[error("rpc log in {0}: {1}")]
    Log(std::path::PathBuf, std::io::Error),
    #[error("rpc status producer: {0}")]
    Kafka(String),
}

/// Turns requests into what they do on the device: the endpoint, the
/// operation through the device's profile, or for `firmware_update` the
/// plan with its image (loaded once and shared by every update using it).
pub struct Resolver {
    pub directory: Arc<Directory>,
    pub profiles: Arc<Profiles>,
    pub firmware: Option<Arc<FirmwareStore>>,
    /// Images loaded for updates, by name (sha256, bytes): a campaign of
    /// a thousand devices shares one copy.
    loaded: RefCell<HashMap<String, LoadedImage>>,
}

impl Resolver {
    pub fn new(
        directory: Arc<Directory>,
        profiles: Arc<Profiles>,
        firmware: Option<Arc<FirmwareStore>>,
    ) -> Resolver {
        Resolver {
            directory,
            profiles,
            firmware,
            loaded: RefCell::new(HashMap::new()),
        }
    }

    pub fn resolve(&self, req: &RpcRequest) -> Resolved {
        let (endpoint, entry) = self
            .directory
            .by_device(&req.device_id)
            .ok_or_else(|| format!("unknown device_id {:?}", req.device_id))?;
        if entry.tenant_id != req.tenant_id {
            return Err("the device belongs to another tenant".into());
        }
        if req.method == FIRMWARE_UPDATE {
            let params = FirmwareParams::parse(&req.params)?;
            let image = match &params.image {
                Some(name) => Some(self.image(name)?),
                None => None,
            };
            return Ok((
                endpoint,
                Work::Firmware(Box::new(FirmwarePlan { params, image })),
            ));
        }
        let set = self.profiles.snapshot();
        let profile = Profile::lookup(&set, &entry.profile);
        let op = rpc::resolve(&req.method, &req.params, profile.map(|p| &**p))?;
        Ok((endpoint, Work::Op(op)))
    }

    fn image(&self, name: &str) -> Result<ImageRef, String> {
        let store = self
            .firmware
            .as_ref()
            .ok_or("this gateway has no firmware image store")?;
        let meta = store.meta(name).ok_or_else(|| {
            format!("no firmware image {name:?} (upload it with PUT /v1/firmware/{name})")
        })?;
        let mut loaded = self.loaded.borrow_mut();
        let cached = loaded
            .get(name)
            .filter(|(sha, _)| *sha == meta.sha256)
            .and_then(|(_, w)| w.upgrade());
        let bytes = match cached {
            Some(b) => b,
            None => {
                let (b, sha) = store.bytes(name).map_err(|e| e.to_string())?;
                loaded.retain(|_, (_, w)| w.strong_count() > 0);
                loaded.insert(name.to_string(), (sha, Arc::downgrade(&b)));
                b
            }
        };
        let mut digest = [0u8; 32];
        for (i, d) in digest.iter_mut().enumerate() {
            *d = u8::from_str_radix(meta.sha256.get(2 * i..2 * i + 2).unwrap_or("00"), 16)
                .unwrap_or(0);
        }
        Ok(ImageRef {
            name: Arc::from(name),
            version: meta.version,
            sha256: meta.sha256,
            image: FwImage::new(bytes, &digest),
        })
    }
}

/// An image loaded for updates: its sha256 and its bytes while in use.
type LoadedImage = (String, Weak<[u8]>);

/// The method of a firmware update RPC.
pub const FIRMWARE_UPDATE: &str = "firmware_update";

impl RpcService {
    /// Opens the log, replays it, starts the thread. Shard reports arrive
    /// on `events`; executions leave through `control`.
    pub fn start(
        cfg: &Config,
        resolver: Resolver,
        fw_bases: UriBases,
        control: ControlHandle,
        events: Receiver<RpcEvent>,
    ) -> Result<RpcService, RpcServiceError> {
        let dir = cfg.directory.snapshot_dir.clone();
        let (log, lines) = RpcLog::open(&dir).map_err(|e| RpcServiceError::Log(dir.clone(), e))?;
        let mut book = RpcBook::new(cfg.rpc.retention_s as i64 * 1000);
        book.set_max_finished(cfg.rpc.max_finished);
        book.set_firmware(fw_bases, cfg.firmware.poll_s.max(1) as i64 * 1000);
        let mut offsets = std::collections::BTreeMap::new();
        let records: Vec<LogRecord> = lines
            .into_iter()
            .filter_map(|l| match l {
                WalLine::Rpc(r) => Some(r),
                WalLine::Offset { partition, next } => {
                    offsets.insert(partition, next);
                    None
                }
                WalLine::Covers { .. } => None,
            })
            .collect();
        let (resumed, interrupted) = book.replay(wall_ms(), records, &|r| resolver.resolve(r));
        if resumed + interrupted > 0 {
            tracing::info!(
                resumed,
                interrupted,
                "RPCs from before the restart: queued ones resume, sent-but-unanswered ones end failed"
            );
        }
        let mut kc = crate::sink::kafka::client_config(&cfg.kafka);
        kc.set("client.id", format!("{}-rpc", cfg.kafka.client_id))
            // Its broker connections, every 5 s, for the process's
            // `kafka_broker_connections_up` gauge (sink::kafka_log).
            .set(
                "statistics.interval.ms",
                crate::sink::kafka_log::STATS_INTERVAL_MS.to_string(),
            );
        crate::sink::kafka::apply_security(&cfg.kafka, &mut kc)
            .map_err(|e| RpcServiceError::Kafka(e.to_string()))?;
        let producer: BaseProducer<GatewayContext> = kc
            .create_with_context(GatewayContext {
                client: "rpc-status",
            })
            .map_err(|e| RpcServiceError::Kafka(e.to_string()))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let metrics = Arc::new(RpcMetrics::default());
        let st = Worker {
            metrics: metrics.clone(),
            book,
            log,
            producer,
            control,
            resolver,
            status_topic: cfg.kafka.rpc_status_topic.clone(),
            default_timeout_ms: cfg.rpc.default_timeout_ms,
            firmware_timeout_ms: cfg.firmware.default_timeout_s.max(1) * 1000,
            compact_bytes: cfg.rpc.log_compact_bytes.max(1024),
            unpublished: Vec::new(),
            offsets: offsets.clone(),
            offset_lines: Vec::new(),
            campaigns: Campaigns::default(),
            campaigns_file: dir.join("campaigns.json"),
            campaigns_saved: Instant::now(),
        };
        let mut st = st;
        st.load_campaigns();
        let stop = Arc::new(AtomicBool::new(false));
        let mut intake_thread = None;
        if cfg.rpc.kafka_intake {
            let kcfg = cfg.kafka.clone();
            let (tx2, stop2) = (tx.clone(), stop.clone());
            intake_thread = Some(
                std::thread::Builder::new()
                    .name("rpc-intake".into())
                    .spawn(move || intake(kcfg, offsets, tx2, stop2))
                    .map_err(|e| RpcServiceError::Log(dir.clone(), e))?,
            );
        }
        let thread = std::thread::Builder::new()
            .name("rpc".into())
            .spawn(move || st.run(rx, events))
            .map_err(|e| RpcServiceError::Log(dir, e))?;
        Ok(RpcService {
            handle: RpcHandle(tx, metrics),
            thread: Some(thread),
            intake: intake_thread,
            stop,
        })
    }

    pub fn handle(&self) -> RpcHandle {
        self.handle.clone()
    }

    /// Stops the thread after it flushed the status producer.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.intake.take() {
            let _ = t.join();
        }
        let _ = self.handle.0.send(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    metrics: Arc<RpcMetrics>,
    book: RpcBook,
    log: RpcLog,
    producer: BaseProducer<GatewayContext>,
    control: ControlHandle,
    resolver: Resolver,
    status_topic: String,
    default_timeout_ms: u64,
    firmware_timeout_ms: u64,
    compact_bytes: u64,
    /// Statuses the producer could not queue yet (queue full).
    unpublished: Vec<(String, String, Vec<u8>)>,
    /// Next offset per partition of the request topic (durable with the
    /// requests they follow).
    offsets: std::collections::BTreeMap<i32, i64>,
    offset_lines: Vec<WalLine>,
    campaigns: Campaigns,
    /// `{snapshot_dir}/campaigns.json`.
    campaigns_file: std::path::PathBuf,
    campaigns_saved: Instant,
}

impl Worker {
    fn run(mut self, cmds: Receiver<Cmd>, events: Receiver<RpcEvent>) {
        let mut replies: Replies = Vec::new();
        self.resubmit_campaigns();
        // Statuses from the replay (interrupted RPCs).
        self.flush(&mut replies);
        loop {
            let now = wall_ms();
            let wait = self
                .book
                .poll_timeout()
                .map(|t| Duration::from_millis((t - now).clamp(0, 100) as u64))
                .unwrap_or(Duration::from_millis(100));
            let wait = if self.unpublished.is_empty() {
                wait
            } else {
                wait.min(Duration::from_millis(10))
            };
            let mut stop = false;
            crossbeam_channel::select! {
                recv(cmds) -> c => match c {
                    Ok(c) => stop |= self.command(c, &mut replies),
                    Err(_) => stop = true,
                },
                recv(events) -> e => if let Ok(e) = e {
                    self.book.handle_event(wall_ms(), e);
                },
                default(wait) => {}
            }
            // Take what else is waiting, so one fsync covers it (group
            // commit: the busier, the larger the batch), bounded so a flood
            // still gets its answers out.
            let t0 = Instant::now();
            let mut taken = 0;
            while taken < 8192 && t0.elapsed() < Duration::from_millis(20) {
                taken += 1;
                let mut any = false;
                if let Ok(c) = cmds.try_recv() {
                    stop |= self.command(c, &mut replies);
                    any = true;
                }
                if let Ok(e) = events.try_recv() {
                    self.book.handle_event(wall_ms(), e);
                    any = true;
                }
                if !any {
                    break;
                }
            }
            self.book.handle_timeout(wall_ms());
            self.start_campaign_rpcs();
            self.flush(&mut replies);
            if stop {
                break;
            }
        }
        self.save_campaigns();
        if let Err(e) = self.producer.flush(Duration::from_secs(5)) {
            tracing::warn!(error = %e, "rpc status producer did not flush");
        }
        self.log.wait_compaction();
    }

    /// Returns true on Stop.
    fn command(&mut self, c: Cmd, replies: &mut Replies) -> bool {
        match c {
            Cmd::Submit { req, reply } => {
                let r = self.submit(req);
                replies.push((reply, r));
            }
            Cmd::Get { rpc_id, reply } => {
                let _ = reply.send(self.book.get(&rpc_id).cloned());
            }
            Cmd::OfDevice { device_id, reply } => {
                let list = self
                    .book
                    .of_device(&device_id)
                    .into_iter()
                    .cloned()
                    .collect();
                let _ = reply.send((list, self.book.presence(&device_id).cloned()));
            }
            Cmd::Presences { device_ids, reply } => {
                let v = device_ids
                    .iter()
                    .map(|d| self.book.presence(d).cloned())
                    .collect();
                let _ = reply.send(v);
            }
            Cmd::Consumed {
                req,
                partition,
                next,
            } => {
                match req {
                    Ok(req) => match self.submit(req) {
                        Ok(_) => {}
                        Err(Refusal::Duplicate(r)) => {
                            tracing::debug!(rpc_id = %r.rpc_id, "duplicate rpc_id on the request topic: not run again")
                        }
                        Err(Refusal::Invalid(e)) => {
                            tracing::warn!(partition, offset = next - 1, error = %e, "RPC request refused")
                        }
                    },
                    Err(e) => {
                        tracing::warn!(partition, offset = next - 1, error = %e, "RPC request record skipped")
                    }
                }
                self.offsets.insert(partition, next);
                self.offset_lines.push(WalLine::Offset { partition, next });
            }
            Cmd::CampaignCreate { spec, reply } => {
                let r = self.create_campaign(&spec);
                let _ = reply.send(r);
            }
            Cmd::CampaignGet { id, reply } => {
                let v = match id {
                    Some(id) => self
                        .campaigns
                        .get(&id)
                        .map(Campaign::view)
                        .into_iter()
                        .collect(),
                    None => self.campaigns.all().map(Campaign::view).collect(),
                };
                let _ = reply.send(v);
            }
            Cmd::CampaignAct {
                id,
                action,
                threshold,
                reply,
            } => {
                let r = match self.campaigns.act(wall_ms(), &id, &action, threshold) {
                    Ok(c) => Ok(c.view()),
                    Err(e) if e.starts_with("no campaign") => Err((404, e)),
                    Err(e) if e.starts_with("unknown action") => Err((400, e)),
                    Err(e) => Err((409, e)),
                };
                let _ = reply.send(r);
            }
            Cmd::Stop => return true,
        }
        false
    }

    /// The devices a campaign selects, and the checks of its params.
    fn create_campaign(&mut self, spec: &CampaignSpec) -> Result<J, (u16, String)> {
        spec.validate().map_err(|e| (400, e))?;
        let params = FirmwareParams::parse(&spec.params()).map_err(|e| (400, e))?;
        if let Some(image) = &params.image {
            let known = self
                .resolver
                .firmware
                .as_ref()
                .is_some_and(|f| f.meta(image).is_some());
            if !known {
                return Err((422, format!("no firmware image {image:?}")));
            }
        }
        let dir = &self.resolver.directory;
        let targets: Vec<(String, String)> = match &spec.selector {
            Some(sel) => {
                let mut v: Vec<(String, String)> = dir
                    .all()
                    .values()
                    .filter(|e| {
                        e.tenant_id == sel.tenant_id
                            && sel.profile.as_ref().is_none_or(|p| *p == e.profile)
                    })
                    .map(|e| (e.device_id.clone(), e.tenant_id.clone()))
                    .collect();
                v.sort();
                v.dedup();
                v
            }
            None => {
                let mut seen = std::collections::HashSet::new();
                let mut v = Vec::new();
                let mut unknown = Vec::new();
                for d in &spec.devices {
                    if !seen.insert(d.clone()) {
                        continue;
                    }
                    match dir.by_device(d) {
                        Some((_, e)) => v.push((d.clone(), e.tenant_id.clone())),
                        None => unknown.push(d.clone()),
                    }
                }
                if !unknown.is_empty() {
                    unknown.truncate(10);
                    return Err((422, format!("unknown device ids: {unknown:?}")));
                }
                v
            }
        };
        let now = wall_ms();
        let view = match self.campaigns.create(now, spec, targets) {
            Ok(c) => c.view(),
            Err(e) if e.ends_with("exists") => return Err((409, e)),
            Err(e) => return Err((422, e)),
        };
        self.save_campaigns();
        Ok(view)
    }

    /// Submits what the running campaigns may start now.
    fn start_campaign_rpcs(&mut self) {
        let now = wall_ms();
        while let Some(req) = self.campaigns.poll_request(now) {
            self.submit_campaign_rpc(req);
        }
    }

    fn submit_campaign_rpc(&mut self, req: RpcRequest) {
        let id = req.rpc_id.clone();
        match self.submit(req) {
            Ok(_) => {}
            Err(Refusal::Duplicate(r)) => self.campaigns.handle_status(wall_ms(), &id, r.status),
            Err(Refusal::Invalid(e)) => {
                tracing::warn!(rpc_id = %id, error = %e, "campaign RPC refused");
                self.campaigns
                    .handle_status(wall_ms(), &id, RpcStatus::Failed);
            }
        }
    }

    fn load_campaigns(&mut self) {
        let list: Vec<Campaign> = match std::fs::read(&self.campaigns_file) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(file = %self.campaigns_file.display(), error = %e, "campaigns file unreadable; campaigns not resumed");
                    return;
                }
            },
            Err(_) => return,
        };
        self.campaigns = Campaigns::load(list);
    }

    /// After a restart: the statuses the book holds for the campaigns'
    /// started RPCs; those it never accepted are submitted again.
    fn resubmit_campaigns(&mut self) {
        let now = wall_ms();
        for id in self.campaigns.unfinished() {
            match self.book.get(&id).map(|r| r.status) {
                Some(s) => self.campaigns.handle_status(now, &id, s),
                None => {
                    if let Some(req) = self.campaigns.request_for(&id) {
                        self.submit_campaign_rpc(req);
                    }
                }
            }
        }
    }

    /// Writes the campaigns file (temp file, fsync, rename).
    fn save_campaigns(&mut self) {
        if !self.campaigns.dirty {
            return;
        }
        self.campaigns.dirty = false;
        self.campaigns_saved = Instant::now();
        let tmp = self.campaigns_file.with_extension("json.tmp");
        let r = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &self.campaigns.to_json())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.campaigns_file)
        })();
        if let Err(e) = r {
            self.campaigns.dirty = true;
            tracing::error!(file = %self.campaigns_file.display(), error = %e, "campaigns not saved");
        }
    }

    fn submit(&mut self, req: RpcRequest) -> Result<RpcRecord, Refusal> {
        let default_timeout = if req.method == FIRMWARE_UPDATE {
            self.firmware_timeout_ms
        } else {
            self.default_timeout_ms
        };
        if let Err(e) = req.validate() {
            use crate::proto::lwm2m::rpc::RpcError;
            // Without usable ids there is no status to publish (nor a key).
            match e {
                RpcError::Field {
                    field: "rpc_id" | "tenant_id" | "device_id",
                    ..
                }
                | RpcError::Json(_) => return Err(Refusal::Invalid(e.to_string())),
                _ => {
                    let now = wall_ms();
                    return self
                        .book
                        .handle_request(now, req, Err(e.to_string()), default_timeout)
                        .cloned();
                }
            }
        }
        let resolved = self.resolver.resolve(&req);
        self.book
            .handle_request(wall_ms(), req, resolved, default_timeout)
            .cloned()
    }

    /// Log first (fsync), then answers, statuses, executions.
    fn flush(&mut self, replies: &mut Replies) {
        let mut lines: Vec<WalLine> = std::iter::from_fn(|| self.book.poll_log())
            .map(WalLine::Rpc)
            .collect();
        // The consumed offsets go with the acceptances they follow.
        lines.append(&mut self.offset_lines);
        if let Err(e) = self.log.append(&lines) {
            // Not durable: refuse what is being submitted; what the shards
            // reported already happened and is still announced.
            tracing::error!(error = %e, "rpc log append failed");
            for (tx, r) in replies.drain(..) {
                let _ = tx.send(match r {
                    Ok(_) => Err(Refusal::Invalid(format!("rpc log: {e}"))),
                    other => other,
                });
            }
        }
        for (tx, r) in replies.drain(..) {
            let _ = tx.send(r);
        }
        while let Some(rec) = self.book.poll_status() {
            if rec.status == RpcStatus::Queued {
                self.metrics.accepted.fetch_add(1, Ordering::Relaxed);
            } else if rec.status.is_terminal() {
                self.metrics
                    .record_finished(rec.status.as_str(), rec.updated_at - rec.accepted_at);
            }
            self.campaigns
                .handle_status(rec.updated_at, &rec.rpc_id, rec.status);
            let topic = topic_for(&self.status_topic, &rec.tenant_id);
            let mut v = serde_json::to_value(&rec).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("ts".into(), rec.updated_at.into());
            }
            let payload = serde_json::to_vec(&v).unwrap_or_default();
            self.unpublished
                .push((topic, rec.device_id.clone(), payload));
        }
        let mut keep = Vec::new();
        for (topic, key, payload) in self.unpublished.drain(..) {
            let r = BaseRecord::<String, Vec<u8>>::to(&topic)
                .key(&key)
                .payload(&payload);
            if let Err((e, _)) = self.producer.send(r) {
                tracing::debug!(error = %e, "rpc status not queued yet; retrying");
                keep.push((topic, key, payload));
            }
        }
        self.unpublished = keep;
        self.producer.poll(Duration::ZERO);
        // Images before the operations that name them.
        while let Some((name, image)) = self.book.poll_serve() {
            tracing::info!(image = %name, serving = image.is_some(), "firmware image served to devices");
            self.control.send(ControlMsg::Firmware { name, image });
        }
        while let Some((shard, exec)) = self.book.poll_exec() {
            self.control.send_rpc(shard as usize, exec);
        }
        if self.campaigns.dirty && self.campaigns_saved.elapsed() >= Duration::from_secs(1) {
            self.save_campaigns();
        }
        if self.log.needs_compaction(self.compact_bytes) {
            // The state after everything appended so far; written in the
            // background while appends go on to a new segment.
            let mut lines: Vec<WalLine> = self
                .book
                .compacted()
                .into_iter()
                .map(WalLine::Rpc)
                .collect();
            lines.extend(self.offsets.iter().map(|(p, n)| WalLine::Offset {
                partition: *p,
                next: *n,
            }));
            if let Err(e) = self.log.compact(lines) {
                tracing::error!(error = %e, "rpc log compaction not started");
            }
        }
    }
}

/// The Kafka intake: reads `kafka.rpc_request_topic` from the offsets the
/// RPC log holds (manual assignment: a single gateway node consumes every
/// partition; a restart resumes exactly after the last request whose
/// acceptance is durable) and hands each record to the service.
fn intake(
    k: crate::config::KafkaConfig,
    offsets: std::collections::BTreeMap<i32, i64>,
    tx: Sender<Cmd>,
    stop: Arc<AtomicBool>,
) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("group.id", format!("{}-rpc-intake", k.client_id))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // librdkafka's default 500 ms fetch wait would sit in every RPC's
        // latency when requests trickle in.
        .set("fetch.wait.max.ms", "10")
        .set("auto.offset.reset", "earliest");
    if let Err(e) = crate::sink::kafka::apply_security(&k, &mut c) {
        tracing::error!(error = %e, "RPC intake not started");
        return;
    }
    let consumer: BaseConsumer<GatewayContext> = match c.create_with_context(GatewayContext {
        client: "rpc-intake",
    }) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "RPC intake consumer not created");
            return;
        }
    };
    let topic = k.rpc_request_topic.clone();
    // Wait for the topic (created at start by the topic manager), looking
    // at `stop` at least every second: a stop during a broker outage must
    // not wait out a metadata request.
    let parts = loop {
        match consumer.fetch_metadata(Some(&topic), Duration::from_millis(900)) {
            Ok(md) => {
                broker_answered("rpc-intake");
                let n = md
                    .topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len())
                    .unwrap_or(0);
                if n > 0 {
                    break n as i32;
                }
            }
            Err(e) => tracing::debug!(error = %e, "rpc intake metadata"),
        }
        for _ in 0..10 {
            if stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..parts {
        let off = match offsets.get(&p) {
            Some(n) => Offset::Offset(*n),
            None => Offset::Beginning,
        };
        if let Err(e) = tpl.add_partition_offset(&topic, p, off) {
            tracing::error!(error = %e, "RPC intake assignment");
            return;
        }
    }
    if let Err(e) = consumer.assign(&tpl) {
        tracing::error!(error = %e, "RPC intake assignment");
        return;
    }
    tracing::info!(topic = %topic, partitions = parts, "RPC intake consuming");
    let mut probed = std::time::Instant::now();
    loop {
        // During an outage (on record in the process's outage log) a
        // metadata request every 5 s tells when a broker answers again,
        // even with no records to deliver or consume.
        if crate::sink::kafka_log::outage().is_down() && probed.elapsed() >= Duration::from_secs(5)
        {
            probed = std::time::Instant::now();
            if consumer
                .fetch_metadata(Some(&topic), Duration::from_millis(500))
                .is_ok()
            {
                broker_answered("rpc-intake");
            }
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                broker_answered("rpc-intake");
                let req = match m.payload() {
                    Some(p) => RpcRequest::parse(p).map_err(|e| e.to_string()),
                    None => Err("empty record".into()),
                };
                let cmd = Cmd::Consumed {
                    req,
                    partition: m.partition(),
                    next: m.offset() + 1,
                };
                if tx.send(cmd).is_err() {
                    return;
                }
            }
            Some(Err(e)) => tracing::debug!(error = %e, "rpc intake"),
            None => {}
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
    }
}
