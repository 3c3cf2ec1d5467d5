//! Firmware update through the Firmware Update object (LwM2M TS 1.1 Core
//! Appendix E.6, object 5), sans-IO: one [`FirmwareUpdate`] per
//! `firmware_update` RPC, driven by the RPC control plane
//! (`control::rpc_book`), which sends the operations it asks for to the
//! shard holding the device's registration and feeds back the answers,
//! the notifications of its observations, the bytes transferred and the
//! device's presence.
//!
//! The walk (E.6 state machine: State /5/0/3 0 Idle, 1 Downloading,
//! 2 Downloaded, 3 Updating; Update Result /5/0/5):
//!
//! 1. Observe /5/0/3 and /5/0/5 (the answers carry the current values).
//!    A device already Downloading or Downloaded is reset first by writing
//!    an empty Package URI (E.6: "the state machine is reset to Idle"); one
//!    already Updating is left alone (the RPC fails with that reason).
//! 2. Deliver: **pull** writes /5/0/1 Package URI (the gateway's own
//!    `coap(s)://…/fw/{name}`, served by the shards in Block2 blocks, or an
//!    external URI passed through), **push** writes /5/0/0 Package in
//!    Block1 blocks (RFC 7959; the shard shrinks the block size on 4.13).
//! 3. State 2 (Downloaded) → Execute /5/0/2 Update.
//! 4. Update Result 1 → Read /3/0/3 (the new firmware version) → succeeded;
//!    Update Result 2–9 at any point after delivery → failed with its
//!    meaning.
//! 5. Observations still standing on the device are cancelled.
//!
//! A device that re-registers (it rebooted into the new firmware, or came
//! back from a new address) has lost its observations (TS Core §6.2.1
//! leaves them to the new registration): they are set up again, and their
//! first answers tell where the device is. A pull resumes by itself (the
//! device asks for the blocks it lacks); a push interrupted by a new
//! registration or a lost exchange starts again, at most
//! [`MAX_PUSH_RESTARTS`] times. Without news for `poll_ms` the job reads
//! /5/0 (notifications may be lost or the device may not support Observe).
//! The RPC's deadline (`timeout_ms`) is the book's: it ends the job
//! `timed_out` wherever it is.

use super::content::ResourcePath;
use super::dm::{Op, Package};
use super::encode::{WriteEntry, WriteValue};
use super::rpc::{RpcOutcome, RpcStatus};
use serde_json::{json, Value as J};
use std::collections::VecDeque;
use std::sync::Arc;

/// /5/0/0 Package (W, Opaque).
pub const PACKAGE: ResourcePath = ResourcePath::resource(5, 0, 0);
/// /5/0/1 Package URI (RW, String).
pub const PACKAGE_URI: ResourcePath = ResourcePath::resource(5, 0, 1);
/// /5/0/2 Update (E).
pub const UPDATE: ResourcePath = ResourcePath::resource(5, 0, 2);
/// /5/0/3 State (R, Integer).
pub const STATE: ResourcePath = ResourcePath::resource(5, 0, 3);
/// /5/0/5 Update Result (R, Integer).
pub const RESULT: ResourcePath = ResourcePath::resource(5, 0, 5);
/// /3/0/3 Firmware Version (R, String).
pub const FIRMWARE_VERSION: ResourcePath = ResourcePath::resource(3, 0, 3);

/// Restarts of an interrupted push before the RPC fails.
pub const MAX_PUSH_RESTARTS: u32 = 3;
/// Operations that got no answer (lost exchange, registration replaced)
/// before the RPC fails.
pub const MAX_INTERRUPTIONS: u32 = 8;
/// Longest Package URI accepted (devices keep it in a small buffer).
pub const MAX_URI: usize = 1024;

/// The meaning of an Update Result (TS 1.1 Core E.6, /5/0/5).
pub fn result_meaning(r: u8) -> &'static str {
    match r {
        0 => "initial value",
        1 => "firmware updated successfully",
        2 => "not enough flash memory for the new firmware package",
        3 => "out of RAM during the downloading process",
        4 => "connection lost during the downloading process",
        5 => "integrity check failure for the new downloaded package",
        6 => "unsupported package type",
        7 => "invalid URI",
        8 => "firmware update failed",
        9 => "unsupported protocol",
        10 => "firmware update cancelled",
        _ => "unknown update result",
    }
}

/// An image the shards serve, or a push sends.
#[derive(Clone)]
pub struct FwImage {
    pub bytes: Arc<[u8]>,
    /// The first 8 bytes of its SHA-256 (the ETag of its blocks).
    pub etag: [u8; 8],
}

impl FwImage {
    /// `sha256` is the image's digest (32 bytes).
    pub fn new(bytes: Arc<[u8]>, sha256: &[u8; 32]) -> FwImage {
        let mut etag = [0u8; 8];
        etag.copy_from_slice(&sha256[..8]);
        FwImage { bytes, etag }
    }
}

impl std::fmt::Debug for FwImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FwImage")
            .field("len", &self.bytes.len())
            .field("etag", &self.etag)
            .finish()
    }
}

impl PartialEq for FwImage {
    fn eq(&self, o: &FwImage) -> bool {
        self.etag == o.etag && self.bytes.len() == o.bytes.len()
    }
}

/// How the package reaches the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The device downloads the Package URI (E.6 "pull").
    Pull,
    /// The server writes the Package (E.6 "push").
    Push,
}

/// The scheme of the gateway's own Package URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Coap,
    Coaps,
}

/// The `params` of a `firmware_update` RPC.
#[derive(Debug, Clone, PartialEq)]
pub struct FirmwareParams {
    /// An image of the gateway's store (required unless `uri`).
    pub image: Option<String>,
    pub delivery: Delivery,
    /// The scheme of the gateway's URI (`None`: the one the device
    /// registered over).
    pub scheme: Option<Scheme>,
    /// An external Package URI written as is (pull only).
    pub uri: Option<String>,
}

fn valid_uri(u: &str) -> bool {
    let schemes = [
        "coap://",
        "coaps://",
        "coap+tcp://",
        "coaps+tcp://",
        "http://",
        "https://",
    ];
    u.len() <= MAX_URI
        && schemes
            .iter()
            .any(|s| u.starts_with(s) && u.len() > s.len())
        && !u.chars().any(|c| c.is_control() || c == ' ')
}

impl FirmwareParams {
    /// `{image, method: pull|push, protocol: coap|coaps, uri}`; `protocol`
    /// may also be an external URI (the same as `uri`).
    pub fn parse(params: &J) -> Result<FirmwareParams, String> {
        let text = |k: &str| -> Result<Option<String>, String> {
            match params.get(k) {
                None | Some(J::Null) => Ok(None),
                Some(J::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("params.{k} must be a string")),
            }
        };
        let image = text("image")?;
        let delivery = match text("method")?.as_deref() {
            None | Some("pull") => Delivery::Pull,
            Some("push") => Delivery::Push,
            Some(m) => return Err(format!("params.method {m:?}: pull or push")),
        };
        let mut uri = text("uri")?;
        let scheme = match text("protocol")?.as_deref() {
            None => None,
            Some("coap") => Some(Scheme::Coap),
            Some("coaps") => Some(Scheme::Coaps),
            Some(u) if u.contains("://") => {
                if uri.as_deref().is_some_and(|x| x != u) {
                    return Err("params.protocol and params.uri name different URIs".into());
                }
                uri = Some(u.to_string());
                None
            }
            Some(p) => {
                return Err(format!(
                    "params.protocol {p:?}: coap, coaps, or an external package URI"
                ))
            }
        };
        if let Some(u) = &uri {
            if !valid_uri(u) {
                return Err(format!(
                    "params.uri must be a coap(s):// or http(s):// URI of at most {MAX_URI} bytes"
                ));
            }
            if delivery == Delivery::Push {
                return Err(
                    "params.uri is for method pull (push sends the gateway's image)".into(),
                );
            }
        } else if image.is_none() {
            return Err("params.image is required (an image uploaded to /v1/firmware)".into());
        }
        Ok(FirmwareParams {
            image,
            delivery,
            scheme,
            uri,
        })
    }
}

/// An image of the store as a job uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRef {
    pub name: Arc<str>,
    pub version: String,
    pub sha256: String,
    pub image: FwImage,
}

/// A `firmware_update` RPC resolved: its params and the image (none for
/// an external URI).
#[derive(Debug, Clone, PartialEq)]
pub struct FirmwarePlan {
    pub params: FirmwareParams,
    pub image: Option<ImageRef>,
}

impl FirmwarePlan {
    /// The image the shards must serve while the job runs (a pull from
    /// the gateway).
    pub fn served_image(&self) -> Option<&ImageRef> {
        match (&self.params.delivery, &self.params.uri) {
            (Delivery::Pull, None) => self.image.as_ref(),
            _ => None,
        }
    }
}

/// Where the gateway serves images (`coap://host:port`, no trailing /).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UriBases {
    pub coap: Option<String>,
    pub coaps: Option<String>,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Observing State and Update Result, resetting a leftover download.
    Preparing,
    /// The Package URI or Package write is under way.
    Delivering,
    /// The device accepted the package (URI): it is downloading.
    Downloading,
    /// State 2: Update is being executed.
    Downloaded,
    /// Update executed: waiting for the Update Result.
    Updating,
    /// Result known: reading /3/0/3, cancelling observations.
    Closing,
    Done,
}

/// One operation of the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    ObserveState,
    ObserveResult,
    Reset,
    Deliver,
    Update,
    ReadObject,
    ReadVersion,
    CancelState,
    CancelResult,
}

/// A status the RPC passes through (`downloading` with its progress,
/// `downloaded`, `updating`).
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub status: RpcStatus,
    pub progress: J,
}

/// One firmware update in progress on one device.
#[derive(Debug)]
pub struct FirmwareUpdate {
    plan: FirmwarePlan,
    /// The Package URI written (pull).
    uri: Option<String>,
    phase: Phase,
    pending: VecDeque<Step>,
    out: Option<Step>,
    /// The registration the observations were made on.
    registration: String,
    observing: bool,
    state: Option<u8>,
    result: Option<u8>,
    /// The delivery write was sent: Update Results from here on are about
    /// this package (E.6: a new download resets the result to 0).
    delivered: bool,
    push_restarts: u32,
    interruptions: u32,
    bytes: u64,
    published_pct: Option<u64>,
    last_news: i64,
    poll_ms: i64,
    statuses: VecDeque<Progress>,
    /// The result, held while observations are cancelled.
    outcome: Option<RpcOutcome>,
    finished: Option<RpcOutcome>,
    firmware_version: Option<J>,
}

fn as_u8(v: &J) -> Option<u8> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        .and_then(|n| u8::try_from(n).ok())
}

fn code_of(o: &RpcOutcome) -> &str {
    o.code.as_deref().unwrap_or("")
}

impl FirmwareUpdate {
    /// Starts a job for a device whose current registration is
    /// `registration`; `dtls`: it registered over DTLS (the default scheme
    /// of the gateway's URI). Fails when the Package URI cannot be made.
    pub fn start(
        now: i64,
        plan: FirmwarePlan,
        registration: &str,
        dtls: bool,
        bases: &UriBases,
        poll_ms: i64,
    ) -> Result<FirmwareUpdate, String> {
        let uri = match (&plan.params.delivery, &plan.params.uri, &plan.image) {
            (Delivery::Push, _, _) => None,
            (Delivery::Pull, Some(u), _) => Some(u.clone()),
            (Delivery::Pull, None, Some(img)) => {
                let scheme =
                    plan.params
                        .scheme
                        .unwrap_or(if dtls { Scheme::Coaps } else { Scheme::Coap });
                let base = match scheme {
                    Scheme::Coap => bases.coap.as_ref(),
                    Scheme::Coaps => bases.coaps.as_ref(),
                };
                let Some(base) = base else {
                    return Err(format!(
                        "the gateway has no {} address for devices: set firmware.{}_uri (or bind {} to a specific address)",
                        if scheme == Scheme::Coap { "coap" } else { "coaps" },
                        if scheme == Scheme::Coap { "coap" } else { "coaps" },
                        if scheme == Scheme::Coap { "gateway.bind" } else { "dtls.bind" },
                    ));
                };
                Some(format!("{base}/fw/{}", img.name))
            }
            (Delivery::Pull, None, None) => return Err("no image and no URI".into()),
        };
        Ok(FirmwareUpdate {
            plan,
            uri,
            phase: Phase::Preparing,
            pending: VecDeque::from([Step::ObserveState, Step::ObserveResult]),
            out: None,
            registration: registration.to_string(),
            observing: false,
            state: None,
            result: None,
            delivered: false,
            push_restarts: 0,
            interruptions: 0,
            bytes: 0,
            published_pct: None,
            last_news: now,
            poll_ms: poll_ms.max(100),
            statuses: VecDeque::new(),
            outcome: None,
            finished: None,
            firmware_version: None,
        })
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn package_uri(&self) -> Option<&str> {
        self.uri.as_deref()
    }

    pub fn plan(&self) -> &FirmwarePlan {
        &self.plan
    }

    /// An operation is out on the device.
    pub fn busy(&self) -> bool {
        self.out.is_some()
    }

    // ------------------------------------------------------------ outputs

    /// The next operation to send (the device is reachable, nothing else
    /// of this job is out).
    pub fn poll_op(&mut self) -> Option<Op> {
        if self.out.is_some() || self.phase == Phase::Done {
            return None;
        }
        let step = self.pending.pop_front()?;
        if step == Step::Deliver {
            self.delivered = true;
        }
        self.out = Some(step);
        Some(self.op(step))
    }

    /// The next intermediate status to publish.
    pub fn poll_status(&mut self) -> Option<Progress> {
        self.statuses.pop_front()
    }

    /// The RPC's end, once.
    pub fn poll_outcome(&mut self) -> Option<RpcOutcome> {
        self.finished.take()
    }

    /// When [`FirmwareUpdate::handle_timeout`] wants to run (a poll of
    /// /5/0 after `poll_ms` without news).
    pub fn poll_timeout(&self) -> Option<i64> {
        self.waiting().then_some(self.last_news + self.poll_ms)
    }

    fn waiting(&self) -> bool {
        matches!(
            self.phase,
            Phase::Downloading | Phase::Downloaded | Phase::Updating
        ) && self.out.is_none()
            && self.pending.is_empty()
    }

    fn op(&self, step: Step) -> Op {
        match step {
            Step::ObserveState => Op::Observe {
                path: STATE,
                format: None,
            },
            Step::ObserveResult => Op::Observe {
                path: RESULT,
                format: None,
            },
            Step::CancelState => Op::CancelObserve { path: STATE },
            Step::CancelResult => Op::CancelObserve { path: RESULT },
            Step::Reset => write_uri(""),
            Step::Deliver => match (&self.plan.params.delivery, &self.plan.image) {
                (Delivery::Push, Some(img)) => Op::WritePackage {
                    path: PACKAGE,
                    package: Package(img.image.bytes.clone()),
                },
                _ => write_uri(self.uri.as_deref().unwrap_or("")),
            },
            Step::Update => Op::Execute {
                path: UPDATE,
                args: None,
            },
            Step::ReadObject => Op::Read {
                path: ResourcePath::instance(5, 0),
                format: None,
            },
            Step::ReadVersion => Op::Read {
                path: FIRMWARE_VERSION,
                format: None,
            },
        }
    }

    // ------------------------------------------------------------ inputs

    /// The operation sent last was handed back unsent.
    pub fn handle_returned(&mut self) {
        if let Some(s) = self.out.take() {
            if s == Step::Deliver {
                self.delivered = self.phase > Phase::Delivering;
            }
            self.pending.push_front(s);
        }
    }

    /// The device's answer (or the shard's verdict) for the operation out.
    pub fn handle_done(&mut self, now: i64, o: &RpcOutcome) {
        let Some(step) = self.out.take() else { return };
        if self.outcome.is_some() {
            // Decided already: this was a cancel (or an answer that no
            // longer matters).
            return self.close_if_quiet();
        }
        let answered = o.code.is_some();
        if answered {
            self.last_news = now;
        }
        let ok = o.status == RpcStatus::Succeeded;
        if !answered {
            // No answer: a lost exchange, or the registration ended or
            // moved under it (a new registration report follows).
            self.interruptions += 1;
            if self.interruptions > MAX_INTERRUPTIONS {
                return self.end(RpcOutcome {
                    status: if o.status == RpcStatus::TimedOut {
                        RpcStatus::TimedOut
                    } else {
                        RpcStatus::Failed
                    },
                    code: None,
                    response: self.snapshot(),
                    reason: Some(format!(
                        "the device stopped answering: {}",
                        o.reason.as_deref().unwrap_or("no answer")
                    )),
                });
            }
        }
        match step {
            Step::ObserveState | Step::ObserveResult => {
                if ok {
                    self.observing = true;
                    if let Some(v) = &o.response {
                        self.absorb(v);
                    }
                } else if answered && code_of(o) == "4.04" && step == Step::ObserveState {
                    return self.end(self.failure(
                        o,
                        "the device has no Firmware Update object (/5/0/3: 4.04)".into(),
                    ));
                } else if answered {
                    // Observe refused (4.05 ...): polled instead.
                    self.queue(Step::ReadObject);
                } else {
                    self.retry(step);
                }
            }
            Step::ReadObject => {
                if ok {
                    if let Some(v) = &o.response {
                        self.absorb(v);
                    }
                } else if answered && code_of(o) == "4.04" {
                    return self.end(self.failure(
                        o,
                        "the device has no Firmware Update object (/5/0: 4.04)".into(),
                    ));
                }
            }
            Step::Reset => {
                if answered && !ok {
                    return self.end(self.failure(
                        o,
                        format!(
                            "the device refused to reset its Firmware Update state (empty /5/0/1: {})",
                            code_of(o)
                        ),
                    ));
                }
                if !answered {
                    self.retry(step);
                } else {
                    self.state = Some(0);
                }
            }
            Step::Deliver => {
                if ok {
                    if self.phase <= Phase::Delivering {
                        self.phase = Phase::Downloading;
                        self.progress_status(true);
                    }
                    if self.plan.params.delivery == Delivery::Push {
                        // The whole package is on the device: see what it
                        // made of it (a notification may say it first).
                        self.bytes = self.size().unwrap_or(self.bytes);
                        self.queue(Step::ReadObject);
                    }
                } else if answered {
                    let what = match self.plan.params.delivery {
                        Delivery::Pull => "the Package URI",
                        Delivery::Push => "the package",
                    };
                    return self.end(self.failure(
                        o,
                        format!(
                            "the device refused {what} ({}{})",
                            code_of(o),
                            o.reason
                                .as_deref()
                                .filter(|r| r.starts_with("block-wise"))
                                .map(|r| format!(": {r}"))
                                .unwrap_or_default()
                        ),
                    ));
                } else if self.plan.params.delivery == Delivery::Push {
                    self.push_restarts += 1;
                    if self.push_restarts > MAX_PUSH_RESTARTS {
                        return self.end(RpcOutcome {
                            status: RpcStatus::Failed,
                            code: None,
                            response: self.snapshot(),
                            reason: Some(format!(
                                "the push was interrupted {} times (last: {})",
                                self.push_restarts,
                                o.reason.as_deref().unwrap_or("no answer")
                            )),
                        });
                    }
                    self.bytes = 0;
                    self.delivered = false;
                    self.retry(step);
                } else {
                    self.delivered = false;
                    self.retry(step);
                }
            }
            Step::Update => {
                if ok {
                    self.enter_updating();
                } else if answered {
                    return self.end(self.failure(
                        o,
                        format!("the device refused Update /5/0/2 ({})", code_of(o)),
                    ));
                } else {
                    // Never executed twice: it may have run (and the device
                    // rebooted before answering). Its State tells.
                    self.enter_updating();
                    self.queue(Step::ReadObject);
                }
            }
            Step::ReadVersion => {
                if ok {
                    self.firmware_version = o
                        .response
                        .as_ref()
                        .and_then(|r| r.get(FIRMWARE_VERSION.to_string()).cloned());
                }
                if !answered && self.interruptions <= MAX_INTERRUPTIONS {
                    self.retry(step);
                } else {
                    self.finish_success();
                }
            }
            Step::CancelState | Step::CancelResult => {}
        }
        self.advance(now);
    }

    /// A notification of one of the job's observations (`{path: value}`).
    pub fn handle_values(&mut self, now: i64, values: &J) {
        self.last_news = now;
        self.absorb(values);
        self.advance(now);
    }

    /// Bytes of the package the device has (pull: the end of the highest
    /// block served; push: the end of the last block acknowledged).
    pub fn handle_progress(&mut self, now: i64, bytes: u64) {
        self.last_news = now;
        if bytes > self.bytes {
            self.bytes = bytes;
        }
        if matches!(self.phase, Phase::Delivering | Phase::Downloading) {
            if self.phase == Phase::Delivering && self.plan.params.delivery == Delivery::Pull {
                self.phase = Phase::Downloading;
            }
            self.progress_status(false);
        }
    }

    /// The device's registration as the shards last reported it.
    pub fn handle_presence(&mut self, now: i64, registration: &str, online: bool) {
        if !online || registration == self.registration {
            return;
        }
        // A new registration: the observations went with the old one.
        self.registration = registration.to_string();
        self.observing = false;
        self.last_news = now;
        if self.phase == Phase::Done {
            return;
        }
        self.pending
            .retain(|s| !matches!(s, Step::CancelState | Step::CancelResult));
        if self.phase == Phase::Closing {
            // Nothing left to cancel on the new registration.
            return;
        }
        for s in [Step::ObserveResult, Step::ObserveState] {
            if self.out != Some(s) && !self.pending.contains(&s) {
                self.pending.push_front(s);
            }
        }
    }

    /// The poll timer ([`FirmwareUpdate::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: i64) {
        if self.waiting() && now >= self.last_news + self.poll_ms {
            self.last_news = now;
            self.queue(Step::ReadObject);
        }
    }

    /// The RPC's deadline passed: the outcome the book publishes.
    pub fn timed_out(&self) -> RpcOutcome {
        let wh = match self.phase {
            Phase::Preparing => "preparing (observing /5/0/3 and /5/0/5)".to_string(),
            Phase::Delivering | Phase::Downloading => match self.size() {
                Some(size) if size > 0 => format!(
                    "downloading, {} of {} bytes ({}%)",
                    self.bytes,
                    size,
                    self.bytes * 100 / size
                ),
                _ => "downloading".to_string(),
            },
            Phase::Downloaded => "downloaded, Update not executed".into(),
            Phase::Updating => "updating, no Update Result".into(),
            Phase::Closing | Phase::Done => "finishing".into(),
        };
        RpcOutcome {
            status: RpcStatus::TimedOut,
            code: None,
            response: self.snapshot(),
            reason: Some(format!("no final result within timeout_ms (it was {wh})")),
        }
    }

    // ------------------------------------------------------------ internals

    fn size(&self) -> Option<u64> {
        self.plan.image.as_ref().map(|i| i.image.bytes.len() as u64)
    }

    fn queue(&mut self, s: Step) {
        if self.out != Some(s) && !self.pending.contains(&s) {
            self.pending.push_back(s);
        }
    }

    fn retry(&mut self, s: Step) {
        if !self.pending.contains(&s) {
            self.pending.push_front(s);
        }
    }

    fn absorb(&mut self, v: &J) {
        if let Some(s) = v.get(STATE.to_string()).and_then(as_u8) {
            self.state = Some(s);
        }
        if let Some(r) = v.get(RESULT.to_string()).and_then(as_u8) {
            self.result = Some(r);
        }
    }

    fn snapshot(&self) -> Option<J> {
        let mut m = serde_json::Map::new();
        if let Some(s) = self.state {
            m.insert("state".into(), s.into());
        }
        if let Some(r) = self.result {
            m.insert("update_result".into(), r.into());
        }
        if let Some(img) = &self.plan.image {
            m.insert("image".into(), J::String(img.name.to_string()));
            m.insert("image_version".into(), J::String(img.version.clone()));
        }
        (!m.is_empty()).then_some(J::Object(m))
    }

    fn failure(&self, o: &RpcOutcome, reason: String) -> RpcOutcome {
        RpcOutcome {
            status: RpcStatus::Failed,
            code: o.code.clone(),
            response: self.snapshot(),
            reason: Some(reason),
        }
    }

    fn enter_updating(&mut self) {
        if self.phase < Phase::Updating {
            self.phase = Phase::Updating;
            self.statuses.push_back(Progress {
                status: RpcStatus::Updating,
                progress: self.progress_json(),
            });
        }
    }

    fn progress_json(&self) -> J {
        let mut p = json!({ "bytes": self.bytes });
        if let Some(size) = self.size().filter(|s| *s > 0) {
            p["size"] = size.into();
            p["percent"] = (self.bytes.min(size) * 100 / size).into();
        }
        if let Some(u) = &self.uri {
            p["package_uri"] = J::String(u.clone());
        }
        if let Some(s) = self.state {
            p["state"] = s.into();
        }
        p
    }

    /// `downloading` with bytes and percent, published when the percent
    /// moved by 10 or more (and at 100) so a 1,000-device campaign does
    /// not flood the status topic.
    fn progress_status(&mut self, force: bool) {
        let pct = match self.size().filter(|s| *s > 0) {
            Some(size) => self.bytes.min(size) * 100 / size,
            None => 0,
        };
        let due = match self.published_pct {
            None => true,
            Some(last) => pct >= last + 10 || (pct == 100 && last != 100),
        };
        if force || due {
            self.published_pct = Some(pct);
            self.statuses.push_back(Progress {
                status: RpcStatus::Downloading,
                progress: self.progress_json(),
            });
        }
    }

    /// What the device's State and Update Result mean for the job now.
    fn advance(&mut self, _now: i64) {
        if self.outcome.is_some() || self.phase == Phase::Done {
            return self.close_if_quiet();
        }
        if self.phase == Phase::Preparing {
            if self.out.is_some() || !self.pending.is_empty() {
                return;
            }
            match self.state {
                Some(3) => {
                    return self.end(RpcOutcome {
                        status: RpcStatus::Failed,
                        code: None,
                        response: self.snapshot(),
                        reason: Some(
                            "the device is already updating a firmware (State 3); not interrupted"
                                .into(),
                        ),
                    })
                }
                Some(1 | 2) => self.pending.push_back(Step::Reset),
                _ => {}
            }
            self.phase = Phase::Delivering;
            self.pending.push_back(Step::Deliver);
            return;
        }
        // Update Results are about this package only once it was sent.
        if self.delivered {
            if let Some(r) = self.result.filter(|r| *r >= 2) {
                return self.end(RpcOutcome {
                    status: RpcStatus::Failed,
                    code: None,
                    response: self.snapshot(),
                    reason: Some(format!("Update Result {r}: {}", result_meaning(r))),
                });
            }
        }
        match self.phase {
            Phase::Delivering | Phase::Downloading => {
                if self.state == Some(2) && self.out != Some(Step::Deliver) {
                    self.phase = Phase::Downloaded;
                    if let Some(size) = self.size() {
                        self.bytes = self.bytes.max(size);
                    }
                    self.statuses.push_back(Progress {
                        status: RpcStatus::Downloaded,
                        progress: self.progress_json(),
                    });
                    self.queue(Step::Update);
                } else if self.state == Some(3) && self.phase == Phase::Downloading {
                    // The device updates by itself after downloading.
                    self.enter_updating();
                }
            }
            Phase::Downloaded if self.state == Some(3) => self.enter_updating(),
            Phase::Updating if self.result == Some(1) => {
                self.phase = Phase::Closing;
                self.queue(Step::ReadVersion);
            }
            _ => {}
        }
        self.close_if_quiet();
    }

    fn finish_success(&mut self) {
        let mut resp = self.snapshot().unwrap_or_else(|| json!({}));
        resp["firmware_version"] = self.firmware_version.clone().unwrap_or(J::Null);
        resp["update_result"] = 1.into();
        self.end(RpcOutcome {
            status: RpcStatus::Succeeded,
            code: None,
            response: Some(resp),
            reason: None,
        });
    }

    /// The result is known: cancel what is observed on the device, then
    /// report it.
    fn end(&mut self, o: RpcOutcome) {
        if self.outcome.is_some() || self.phase == Phase::Done {
            return;
        }
        self.outcome = Some(o);
        self.phase = Phase::Closing;
        self.pending.clear();
        if self.observing {
            self.pending.push_back(Step::CancelState);
            self.pending.push_back(Step::CancelResult);
            self.observing = false;
        }
        self.close_if_quiet();
    }

    fn close_if_quiet(&mut self) {
        if self.outcome.is_some() && self.out.is_none() && self.pending.is_empty() {
            self.phase = Phase::Done;
            self.finished = self.outcome.take();
        }
    }
}

fn write_uri(u: &str) -> Op {
    Op::Write {
        path: PACKAGE_URI,
        entries: vec![WriteEntry {
            path: PACKAGE_URI,
            value: WriteValue::Str(u.to_string()),
        }],
        replace: true,
        format: None,
    }
}

#[cfg(test)]
mod tests;
